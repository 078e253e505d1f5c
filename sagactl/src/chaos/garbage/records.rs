//! The garbage records: each kind built for the topic it goes to, from a message that topic's
//! consumer would accept, so that it is hostile in exactly one way.

use chrono::Utc;
use events::{Action, Envelope, Reply};
use saga_core::definitions::SagaDefinition;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{GarbageKind, Target};

/// Size of the [`GarbageKind::HugePayload`] record's value.
const HUGE_PAYLOAD_BYTES: usize = 1_040_000;
/// Size of the [`GarbageKind::HugeHeader`] record's `tracestate`.
const HUGE_HEADER_BYTES: usize = 200 * 1024;

/// One hostile record, before it is sent.
pub(super) struct Hostile {
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Option<Vec<u8>>,
    /// Name and value of each header, bytes as sent (`None`: a null value).
    pub(super) headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// A valid trigger of `saga` whose key is `key`: its trigger message's sample, keyed.
fn trigger(saga: &SagaDefinition, key: Uuid) -> Value {
    crate::deployment::keyed_trigger(saga, &key.to_string())
}

/// The forward command of step `step` of `saga` for the saga keyed `key`, as the saga sends
/// it, in an envelope of `saga_id`. (The registry built every command of the definition when
/// it loaded it; should this one fail all the same, the record is garbage of another kind.)
fn command(saga: &SagaDefinition, step: usize, key: Uuid, saga_id: Uuid) -> Value {
    let Some(definition) = saga.steps.get(step) else {
        return json!({ "note": "no such step" });
    };
    match definition
        .forward
        .command(saga, definition, Action::Forward, &trigger(saga, key), 1)
    {
        Ok(command) => envelope(saga_id, command),
        Err(e) => json!({ "note": format!("no command: {e}") }),
    }
}

/// The command on the first participant's topic, for the targets that carry no command.
fn any_command(targets: &[Target], key: Uuid, saga_id: Uuid) -> Value {
    targets
        .iter()
        .find_map(|t| match t {
            Target::Commands { saga, step, .. } => Some(command(saga, *step, key, saga_id)),
            _ => None,
        })
        .unwrap_or_default()
}

fn envelope(saga_id: Uuid, body: impl Serialize) -> Value {
    serde_json::to_value(Envelope::new(saga_id, None, Utc::now(), body)).unwrap_or_default()
}

/// A message `targets[at]`'s consumer would accept.
fn valid(targets: &[Target], at: usize, key: Uuid, saga_id: Uuid) -> Value {
    match &targets[at] {
        Target::Trigger(saga) => trigger(saga, key),
        Target::Commands { saga, step, .. } => command(saga, *step, key, saga_id),
        Target::Replies => {
            let command = any_command(targets, key, saga_id);
            match serde_json::from_value::<Envelope<events::Command>>(command) {
                Ok(command) => envelope(saga_id, Reply::succeeded(&command.body)),
                Err(_) => Value::Null,
            }
        }
    }
}

/// A message of another topic than `targets[at]`'s.
fn wrong(targets: &[Target], at: usize, key: Uuid, saga_id: Uuid) -> Value {
    let same_kind = |t: &Target| {
        matches!(
            (&targets[at], t),
            (Target::Trigger(_), Target::Trigger(_))
                | (Target::Commands { .. }, Target::Commands { .. })
        )
    };
    // The next target of the same kind, going round.
    let other = (1..targets.len())
        .map(|n| (at + n) % targets.len())
        .find(|&i| same_kind(&targets[i]));
    match (&targets[at], other) {
        (Target::Replies, _) => any_command(targets, key, saga_id),
        (_, Some(other)) => valid(targets, other, key, saga_id),
        (Target::Trigger(_), None) => {
            let replies = targets.iter().position(|t| matches!(t, Target::Replies));
            replies.map_or(Value::Null, |r| valid(targets, r, key, saga_id))
        }
        (Target::Commands { .. }, None) => {
            let trigger = targets.iter().position(|t| matches!(t, Target::Trigger(_)));
            trigger.map_or(Value::Null, |t| valid(targets, t, key, saga_id))
        }
    }
}

/// Puts a NUL in the middle of the first string in `value` that is not a UUID nor a `type`
/// (so that the message still decodes as far as the step's fields).
fn put_nul(value: &mut Value) -> bool {
    match value {
        Value::String(text) if Uuid::parse_str(text).is_err() => {
            let at = text
                .chars()
                .take(text.chars().count() / 2)
                .map(char::len_utf8)
                .sum();
            text.insert(at, '\0');
            true
        }
        Value::Object(fields) => fields
            .iter_mut()
            .filter(|(name, _)| *name != "type")
            .any(|(_, field)| put_nul(field)),
        Value::Array(items) => items.iter_mut().any(put_nul),
        _ => false,
    }
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Builds the garbage record of `kind` for `targets[at]`, about the saga keyed `key` (and
/// `saga_id` where it has an envelope).
pub(super) fn build(
    kind: GarbageKind,
    targets: &[Target],
    at: usize,
    key: Uuid,
    saga_id: Uuid,
) -> Hostile {
    let target = &targets[at];
    let mut valid = valid(targets, at, key, saga_id);
    let type_name = valid["type"].as_str().unwrap_or_default().to_owned();
    let note = |note: &str| to_bytes(&json!({ "type": type_name, "note": note }));
    let mut hostile = Hostile {
        key: Some(key.to_string().into_bytes()),
        payload: None,
        headers: Vec::new(),
    };
    hostile.payload = Some(match kind {
        GarbageKind::NulBytes => {
            hostile.key = Some(format!("\0{key}\0").into_bytes());
            format!("{{\"type\":\"{type_name}\",\"key\":\"\0\0\0\"}}\0").into_bytes()
        }
        GarbageKind::NulInJson => nul_in_json(target, valid),
        GarbageKind::InvalidUtf8 => {
            // (The key as text: its 16 raw bytes may hold a NUL, which is another kind.)
            hostile.key = Some([&[0xff, 0xfe][..], key.to_string().as_bytes()].concat());
            invalid_utf8(&valid)
        }
        GarbageKind::TruncatedJson => {
            let bytes = to_bytes(&valid);
            bytes[..bytes.len() / 2].to_vec()
        }
        GarbageKind::UnknownType => unknown_type(target, valid),
        GarbageKind::MissingType => {
            if let Some(map) = valid.as_object_mut() {
                map.remove("type");
            }
            to_bytes(&valid)
        }
        GarbageKind::FutureSchema => future_schema(target, valid, &type_name, saga_id),
        GarbageKind::WrongMessage => to_bytes(&wrong(targets, at, key, saga_id)),
        GarbageKind::EmptyPayload => Vec::new(),
        GarbageKind::NullPayload => {
            hostile.payload = None;
            return hostile;
        }
        GarbageKind::NoKey => {
            hostile.key = None;
            note("a record without a key")
        }
        GarbageKind::NulKey => {
            hostile.key = Some(format!("{key}\0").into_bytes());
            note("a key with a NUL byte")
        }
        GarbageKind::HugeHeader => {
            hostile.headers = huge_header();
            note("a 200 KB tracestate header")
        }
        GarbageKind::AnyBytesHeaders => {
            hostile.headers = any_bytes_headers();
            note("headers of any bytes")
        }
        GarbageKind::HugePayload => huge_payload(&type_name),
    });
    hostile
}

/// `valid` with a NUL inside a string of the message: a trigger's, a command's payload, a
/// reply's reason.
fn nul_in_json(target: &Target, mut valid: Value) -> Vec<u8> {
    match target {
        Target::Trigger(_) => {
            put_nul(&mut valid);
        }
        Target::Commands { .. } => {
            put_nul(&mut valid["payload"]);
        }
        Target::Replies => {
            // (Reply::failed takes the NUL out of a reason: set it by hand.)
            valid["outcome"] = "failed".into();
            valid["reason"] = "out of\0stock".into();
        }
    }
    to_bytes(&valid)
}

/// `valid` with two bytes that are no UTF-8 at the start of its first string value.
fn invalid_utf8(valid: &Value) -> Vec<u8> {
    let mut bytes = to_bytes(valid);
    let at = bytes
        .windows(3)
        .position(|w| w == b"\":\"")
        .map_or(0, |i| i + 3);
    bytes.splice(at..at, [0xc3, 0x28]);
    bytes
}

/// `valid` as a message type no one knows, with the fields it would name.
fn unknown_type(target: &Target, mut valid: Value) -> Vec<u8> {
    valid["type"] = "OrderCancelled".into();
    match target {
        Target::Trigger(_) => {}
        Target::Commands { .. } => valid["step"] = "cancel_order".into(),
        Target::Replies => valid["outcome"] = "cancelled".into(),
    }
    to_bytes(&valid)
}

/// `valid`'s envelope with a schema version from the future.
fn future_schema(target: &Target, valid: Value, type_name: &str, saga_id: Uuid) -> Vec<u8> {
    let mut future = match target {
        // An enveloped trigger: the message is the envelope's payload.
        Target::Trigger(_) => envelope(saga_id, json!({ "type": type_name, "payload": valid })),
        _ => valid,
    };
    future["schema_version"] = 999.into();
    to_bytes(&future)
}

/// A valid `traceparent` with a 200 KB `tracestate`.
fn huge_header() -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let traceparent = messaging::telemetry::new_traceparent();
    let mut tracestate = b"garbage=".to_vec();
    tracestate.resize(HUGE_HEADER_BYTES, b'x');
    vec![
        (b"traceparent".to_vec(), Some(traceparent.into_bytes())),
        (b"tracestate".to_vec(), Some(tracestate)),
    ]
}

/// Headers whose names and values are any bytes: not UTF-8, NULs, empty, 64 KB long.
fn any_bytes_headers() -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let long_name = vec![0xc3; 64 * 1024];
    vec![
        (vec![0xc3, 0x28], Some(b"a name that is not UTF-8".to_vec())),
        (vec![0xff, 0xfe, 0xfd], Some(vec![0xc3, 0x28])),
        (b"traceparent".to_vec(), Some(vec![0xff, 0xfe])),
        (b"tracestate".to_vec(), Some(b"\0\0".to_vec())),
        (b"nul\0inside".to_vec(), None),
        (Vec::new(), Some(Vec::new())),
        (long_name, Some(vec![0; 1024])),
    ]
}

/// A message of `type_name` padded to [`HUGE_PAYLOAD_BYTES`].
fn huge_payload(type_name: &str) -> Vec<u8> {
    let mut bytes = format!("{{\"type\":\"{type_name}\",\"padding\":\"").into_bytes();
    bytes.resize(HUGE_PAYLOAD_BYTES - 2, b'x');
    bytes.extend_from_slice(b"\"}");
    bytes
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::super::tests::targets;
    use super::*;

    fn bytes(kind: GarbageKind, targets: &[Target], at: usize) -> Vec<u8> {
        build(kind, targets, at, Uuid::new_v4(), Uuid::new_v4())
            .payload
            .unwrap_or_default()
    }

    #[test]
    fn the_valid_messages_are_valid() {
        let targets = targets();
        for at in 0..targets.len() {
            let payload = to_bytes(&valid(&targets, at, Uuid::new_v4(), Uuid::new_v4()));
            assert!(accepted(&targets[at], &payload), "{:?}", targets[at]);
        }
    }

    /// Whether the consumer of `target` would take `payload` as its own message.
    fn accepted(target: &Target, payload: &[u8]) -> bool {
        match target {
            Target::Trigger(saga) => saga_core::definitions::trigger_message(&saga.trigger.message)
                .is_some_and(|m| (m.decode)(payload).is_ok()),
            Target::Commands {
                participant, saga, ..
            } => Envelope::<events::Command>::from_json(payload).is_ok_and(|e| {
                saga.step(&e.body.step)
                    .is_some_and(|s| &s.participant == participant)
            }),
            Target::Replies => Envelope::<Reply>::from_json(payload).is_ok(),
        }
    }

    #[test]
    fn nothing_built_is_a_valid_message() {
        let targets = targets();
        for kind in GarbageKind::value_variants() {
            for (at, target) in targets.iter().enumerate() {
                let payload = bytes(*kind, &targets, at);
                // Whether the contract refuses a wrong or missing `type` on an order is for the
                // chaos run to show (the record then starts a saga); an escaped NUL is valid
                // JSON that only the database refuses.
                let contract = matches!(target, Target::Trigger(saga) if saga.trigger.message == "OrderPlaced")
                    && matches!(kind, GarbageKind::UnknownType | GarbageKind::MissingType);
                // A return's decoder checks its type, so nothing of it is left to the run.
                let nul = *kind == GarbageKind::NulInJson;
                assert!(
                    !accepted(target, &payload) || contract || nul,
                    "{kind:?} on {target:?} decodes as a valid message"
                );
            }
        }
    }

    #[test]
    fn the_huge_ones_have_their_size() {
        let targets = targets();
        let replies = targets.len() - 1;
        assert_eq!(
            bytes(GarbageKind::HugePayload, &targets, replies).len(),
            HUGE_PAYLOAD_BYTES
        );
        let header = build(
            GarbageKind::HugeHeader,
            &targets,
            0,
            Uuid::nil(),
            Uuid::nil(),
        );
        assert_eq!(
            header.headers[1].1.as_ref().map(Vec::len),
            Some(HUGE_HEADER_BYTES)
        );
    }

    #[test]
    fn invalid_utf8_is_invalid() {
        let targets = targets();
        for at in 0..targets.len() {
            assert!(std::str::from_utf8(&bytes(GarbageKind::InvalidUtf8, &targets, at)).is_err());
        }
    }
}
