//! Checks shared by the decoder targets, and the body of `orchestrator_records` ([`records`]).

pub mod records;

use std::fmt::Debug;

use events::{ContractError, Envelope, SCHEMA_VERSION};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Decodes `data` the way every consumer does ([`Envelope::from_json`]) and checks what it
/// gets: a refusal is one of the two errors an envelope can have; an envelope has the version
/// this build reads, re-encodes ([`Envelope::to_json`], what producers write) to bytes that
/// decode to the same value, and re-encoding that is stable. Returns the envelope with its
/// re-encoding as JSON, for the target's own checks of the body.
pub fn envelope_round_trip<T>(data: &[u8]) -> Option<(Envelope<T>, Value)>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let envelope = match Envelope::<T>::from_json(data) {
        Ok(envelope) => envelope,
        Err(ContractError::Malformed(_)) => return None,
        Err(ContractError::UnsupportedSchemaVersion { found, supported }) => {
            assert_eq!(supported, SCHEMA_VERSION);
            assert_ne!(found, SCHEMA_VERSION, "refused the version it supports");
            return None;
        }
        // A body's field rules are checked while decoding, so serde reports them: Malformed.
        Err(e @ ContractError::InvalidField { .. }) => {
            panic!("decoding reports field rules as Malformed, not {e}")
        }
    };
    assert_eq!(envelope.schema_version, SCHEMA_VERSION);
    let bytes = envelope.to_json();
    assert!(!bytes.is_empty(), "to_json failed for {envelope:?}");
    let again = Envelope::<T>::from_json(&bytes).unwrap_or_else(|e| {
        panic!(
            "re-encoded envelope does not decode: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(again, envelope, "round trip changed the envelope");
    assert_eq!(again.to_json(), bytes, "re-encoding is not stable");
    let json: Value = serde_json::from_slice(&bytes).expect("to_json writes JSON");
    assert_eq!(json["schema_version"], u64::from(SCHEMA_VERSION));
    assert_eq!(json["message_id"], envelope.message_id.to_string());
    assert_eq!(json["saga_id"], envelope.saga_id.to_string());
    Some((envelope, json))
}

/// The `type` of an encoded body, for comparing with its fields.
pub fn wire_type(json: &Value) -> &str {
    json["type"]
        .as_str()
        .expect("every body has a string `type`")
}
