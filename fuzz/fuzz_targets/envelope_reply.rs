//! `Envelope::<Reply>::from_json`: the decoder the orchestrator runs on `saga.replies`.
#![no_main]

use events::{Action, Outcome, Reply};
use libfuzzer_sys::fuzz_target;
use saga_fuzz::{envelope_round_trip, wire_attempt, wire_order_id, wire_type};

fuzz_target!(|data: &[u8]| {
    let Some((envelope, json)) = envelope_round_trip::<Reply>(data) else {
        return;
    };
    let reply = &envelope.body;
    // The accessors the state machine fences on agree with the wire.
    assert_eq!(wire_type(&json), reply.type_name());
    assert_eq!(wire_order_id(&json), reply.order_id().to_string());
    assert_eq!(wire_attempt(&json), u64::from(reply.attempt()));
    if let Reply::CompensationFailed(failed) = reply {
        assert_eq!(json["payload"]["step"], failed.step.as_str());
        assert_eq!(reply.step(), failed.step);
    }
    // A failure carries its reason; only the three refusals and a failed compensation fail,
    // and only a compensation's answers run backwards.
    match reply.outcome() {
        Outcome::Succeeded => assert!(json["payload"].get("reason").is_none()),
        Outcome::Failed { reason } => assert_eq!(json["payload"]["reason"], reason.as_str()),
    }
    let compensating = matches!(
        reply,
        Reply::StockReleased(_) | Reply::PaymentRefunded(_) | Reply::CompensationFailed(_)
    );
    assert_eq!(reply.action() == Action::Compensate, compensating);
});
