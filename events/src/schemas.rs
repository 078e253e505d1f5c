//! The contract's JSON Schemas compiled for validation (feature `schemas`, for the contract
//! tests and `sagactl conformance`). Every schema of `contract/schemas/` has its `$id` under one
//! base and names the others by `$ref`; a reference resolves by the file name at the end of its
//! URI, through a reader the caller gives (the directory on disk, or files in memory), so this
//! crate still does no I/O and nothing is fetched from the network.

use jsonschema::{Retrieve, Uri};
use serde_json::Value;

pub use jsonschema::Validator;

/// Why a schema could not be read: the caller's reader's error, or JSON that does not parse.
pub type ReadError = Box<dyn std::error::Error + Send + Sync>;

/// Compiles `schema` as draft 2020-12 with formats checked, reading each schema it refers to
/// with `read` (given the referred file's name, e.g. `common.schema.json`).
///
/// # Errors
/// The schema does not compile, or a schema it refers to cannot be read.
pub fn compile<R>(
    schema: &Value,
    read: R,
) -> Result<Validator, jsonschema::ValidationError<'static>>
where
    R: Fn(&str) -> Result<String, ReadError> + Send + Sync + 'static,
{
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .with_retriever(ByFileName(read))
        .should_validate_formats(true)
        .build(schema)
}

struct ByFileName<R>(R);

impl<R> Retrieve for ByFileName<R>
where
    R: Fn(&str) -> Result<String, ReadError> + Send + Sync,
{
    fn retrieve(&self, uri: &Uri<String>) -> Result<Value, ReadError> {
        let name = uri.path().as_str().rsplit('/').next().unwrap_or_default();
        if name.is_empty() {
            return Err(format!("the schema URI {uri} names no file").into());
        }
        Ok(serde_json::from_str(&(self.0)(name)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BASE: &str = "https://example.test/schemas";

    fn read_common(name: &str) -> Result<String, ReadError> {
        match name {
            "common.schema.json" => Ok(json!({
                "$id": format!("{BASE}/common.schema.json"),
                "$defs": { "cents": { "type": "integer", "minimum": 0 } }
            })
            .to_string()),
            other => Err(format!("no schema {other}").into()),
        }
    }

    #[test]
    fn a_reference_to_another_file_resolves_through_the_reader_by_its_file_name() {
        let schema = json!({
            "$id": format!("{BASE}/Charge.schema.json"),
            "type": "object",
            "properties": { "amount": { "$ref": "common.schema.json#/$defs/cents" } }
        });
        let validator = compile(&schema, read_common).expect("compiles");
        assert!(validator.is_valid(&json!({ "amount": 5 })));
        assert!(!validator.is_valid(&json!({ "amount": -5 })));
    }

    #[test]
    fn a_reference_the_reader_cannot_give_fails_the_compilation_with_the_readers_reason() {
        let schema = json!({
            "$id": format!("{BASE}/Charge.schema.json"),
            "properties": { "amount": { "$ref": "missing.schema.json" } }
        });
        let error = compile(&schema, read_common).expect_err("a missing reference");
        assert!(
            error.to_string().contains("no schema missing.schema.json"),
            "{error}"
        );
    }
}
