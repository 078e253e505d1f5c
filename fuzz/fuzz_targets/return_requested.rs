//! `ReturnRequested::from_json`: the decoder of the `returns` topic, which outside clients
//! write to.
#![no_main]

use events::{ContractError, ReturnRequested};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let request = match ReturnRequested::from_json(data) {
        Ok(request) => request,
        Err(ContractError::Malformed(_) | ContractError::InvalidField { .. }) => return,
        Err(e @ ContractError::UnsupportedSchemaVersion { .. }) => {
            panic!("a return has no schema version: {e}")
        }
    };
    // What decodes is a valid return.
    assert_eq!(request.validate(), Ok(()), "{request:?}");
    // It re-encodes to a return that decodes to the same value, both through `from_json` and
    // the way the orchestrator reads its stored copy back (the saga's trigger, a JSON value).
    let bytes = serde_json::to_vec(&request).expect("a return serialises");
    assert_eq!(ReturnRequested::from_json(&bytes).as_ref(), Ok(&request));
    let value = serde_json::to_value(&request).expect("a return serialises");
    assert_eq!(value["type"], "ReturnRequested");
    let stored: ReturnRequested =
        serde_json::from_value(value).expect("the stored copy reads back");
    assert_eq!(stored, request);
});
