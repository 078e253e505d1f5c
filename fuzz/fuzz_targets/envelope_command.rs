//! `Envelope::<Command>::from_json`: the decoder every participant runs on its commands topic.
#![no_main]

use events::{Command, Envelope, Outcome, Reply};
use libfuzzer_sys::fuzz_target;
use saga_fuzz::{envelope_round_trip, wire_type};

fuzz_target!(|data: &[u8]| {
    let Some((envelope, json)) = envelope_round_trip::<Command>(data) else {
        return;
    };
    let command = &envelope.body;
    // The fields agree with the wire, and decoding kept every bound.
    assert_eq!(wire_type(&json), command.name);
    assert_eq!(json["step"], command.step.as_str());
    assert_eq!(json["key"], command.key.as_str());
    assert_eq!(json["attempt"], u64::from(command.attempt));
    assert!(json["payload"].is_object());
    assert_eq!(command.validate(), Ok(()));
    assert!(events::is_name(&command.step) && events::is_key(&command.key));
    assert!(command.attempt >= 1 && command.saga_version >= 1);
    // The replies a participant builds for it answer this very command, with the names it
    // gave, and the orchestrator reads them back as they were written.
    let done = Reply::succeeded(command);
    let refused = Reply::failed(command, "no");
    assert_eq!(refused.is_some(), command.replies.failure.is_some());
    for reply in std::iter::once(&done).chain(refused.as_ref()) {
        assert_eq!(reply.saga_type, command.saga_type);
        assert_eq!(reply.step, command.step);
        assert_eq!(reply.action, command.action);
        assert_eq!(reply.key, command.key);
        assert_eq!(reply.attempt, command.attempt);
        assert_eq!(reply.validate(), Ok(()));
        let sent = Envelope::new(
            envelope.saga_id,
            Some(envelope.message_id),
            envelope.occurred_at,
            reply.clone(),
        );
        assert_eq!(Envelope::<Reply>::from_json(&sent.to_json()), Ok(sent));
    }
    assert_eq!(done.name, command.replies.success);
    assert_eq!(done.outcome, Outcome::Succeeded);
    if let Some(refused) = refused {
        assert_eq!(Some(&refused.name), command.replies.failure.as_ref());
        assert_eq!(
            refused.outcome,
            Outcome::Failed {
                reason: "no".into()
            }
        );
    }
});
