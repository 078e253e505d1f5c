//! `Envelope::<Reply>::from_json`: the decoder the orchestrator runs on `saga.replies`.
#![no_main]

use events::{Outcome, Reply, MAX_REASON_LEN};
use libfuzzer_sys::fuzz_target;
use saga_fuzz::{envelope_round_trip, wire_type};

fuzz_target!(|data: &[u8]| {
    let Some((envelope, json)) = envelope_round_trip::<Reply>(data) else {
        return;
    };
    let reply = &envelope.body;
    // The fields the state machine fences on agree with the wire, within their bounds.
    assert_eq!(wire_type(&json), reply.name);
    assert_eq!(json["step"], reply.step.as_str());
    assert_eq!(json["key"], reply.key.as_str());
    assert_eq!(json["attempt"], u64::from(reply.attempt));
    assert_eq!(json["action"], reply.action.as_str());
    assert_eq!(reply.validate(), Ok(()));
    assert!(events::is_name(&reply.step) && events::is_key(&reply.key) && reply.attempt >= 1);
    // A failure carries its reason, bounded and without NUL; a success none.
    match &reply.outcome {
        Outcome::Succeeded => {
            assert_eq!(json["outcome"], "succeeded");
            assert!(json.get("reason").is_none());
        }
        Outcome::Failed { reason } => {
            assert_eq!(json["outcome"], "failed");
            assert_eq!(json["reason"], reason.as_str());
            assert!(reason.len() <= MAX_REASON_LEN && !reason.contains('\0'));
        }
    }
});
