//! `Envelope::<SagaEvent>::from_json`: the decoder of `saga.events`, for anyone following
//! sagas.
#![no_main]

use events::SagaEvent;
use libfuzzer_sys::fuzz_target;
use saga_fuzz::{envelope_round_trip, wire_order_id, wire_type};

fuzz_target!(|data: &[u8]| {
    let Some((envelope, json)) = envelope_round_trip::<SagaEvent>(data) else {
        return;
    };
    let event = &envelope.body;
    assert_eq!(wire_order_id(&json), event.order_id().to_string());
    let expected = match event {
        SagaEvent::SagaStarted { .. } => "SagaStarted",
        SagaEvent::SagaCompleted { .. } => "SagaCompleted",
        SagaEvent::SagaCompensated { .. } => "SagaCompensated",
        SagaEvent::SagaFailed { .. } => "SagaFailed",
    };
    assert_eq!(wire_type(&json), expected);
});
