//! The contract's JSON Schemas (`events/contract/schemas/`, read at run time so that the kit
//! judges by the documents a participant's author reads): a reply is validated against the
//! schema named after its `type`, or `Reply`'s when its type has none.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

/// Every schema of the contract directory, compiled.
pub struct Schemas {
    by_name: HashMap<String, events::schemas::Validator>,
}

impl Schemas {
    /// Compiles every `*.schema.json` of `contract_dir/schemas`.
    pub fn load(contract_dir: &Path) -> anyhow::Result<Self> {
        let dir = contract_dir.join("schemas");
        let mut by_name = HashMap::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".schema.json"))
            else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let schema: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let schemas_dir = dir.clone();
            let validator = events::schemas::compile(&schema, move |name| {
                Ok(std::fs::read_to_string(schemas_dir.join(name))?)
            })
            .map_err(|e| anyhow::anyhow!("{} does not compile: {e}", path.display()))?;
            by_name.insert(name.to_owned(), validator);
        }
        anyhow::ensure!(
            by_name.contains_key("Reply"),
            "{} has no Reply.schema.json",
            dir.display()
        );
        Ok(Self { by_name })
    }

    /// Checks a reply against its type's schema (`Reply`'s when the type has none); the
    /// errors, each with where it is, when it breaks it.
    pub fn validate(&self, reply: &Value) -> Result<(), String> {
        let name = reply["type"].as_str().unwrap_or("Reply");
        let (schema, validator) = match self.by_name.get(name) {
            Some(validator) => (name, validator),
            None => ("Reply", self.by_name.get("Reply").ok_or("no Reply schema")?),
        };
        let errors: Vec<String> = validator
            .iter_errors(reply)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "breaks {schema}.schema.json: {}",
                errors.join(", ")
            ))
        }
    }
}
