//! `Envelope::<SagaEvent>::from_json`: the decoder of `saga.events`, for anyone following
//! sagas.
#![no_main]

use events::SagaEvent;
use libfuzzer_sys::fuzz_target;
use saga_fuzz::{envelope_round_trip, wire_type};

fuzz_target!(|data: &[u8]| {
    let Some((envelope, json)) = envelope_round_trip::<SagaEvent>(data) else {
        return;
    };
    let event = &envelope.body;
    // The key is read as it is written (an event of before saga types had none).
    assert_eq!(
        json["payload"]["key"].as_str().unwrap_or_default(),
        event.key()
    );
    let expected = match event {
        SagaEvent::SagaStarted { .. } => "SagaStarted",
        SagaEvent::SagaCompleted { .. } => "SagaCompleted",
        SagaEvent::SagaCompensated { .. } => "SagaCompensated",
        SagaEvent::SagaFailed { .. } => "SagaFailed",
    };
    assert_eq!(wire_type(&json), expected);
});
