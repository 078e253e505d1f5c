//! `Envelope::<Command>::from_json`: the decoder every participant runs on its commands topic.
#![no_main]

use events::{Action, Command, Outcome, Reply};
use libfuzzer_sys::fuzz_target;
use saga_fuzz::{envelope_round_trip, wire_attempt, wire_order_id, wire_type};

fuzz_target!(|data: &[u8]| {
    let Some((envelope, json)) = envelope_round_trip::<Command>(data) else {
        return;
    };
    let command = &envelope.body;
    // The accessors agree with the wire.
    assert_eq!(wire_type(&json), command.type_name());
    assert_eq!(wire_order_id(&json), command.order_id().to_string());
    assert_eq!(wire_attempt(&json), u64::from(command.attempt()));
    // The replies a participant builds for it answer this very command.
    let done = Reply::done(command);
    let refused = Reply::refused(command, "no");
    for reply in [&done, &refused] {
        assert_eq!(reply.step(), command.step());
        assert_eq!(reply.action(), command.action());
        assert_eq!(reply.order_id(), command.order_id());
        assert_eq!(reply.attempt(), command.attempt());
    }
    assert_eq!(done.outcome(), Outcome::Succeeded);
    assert_eq!(
        refused.outcome(),
        Outcome::Failed {
            reason: "no".into()
        }
    );
    assert_eq!(
        matches!(refused, Reply::CompensationFailed(_)),
        command.action() == Action::Compensate
    );
});
