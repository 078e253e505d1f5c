//! Golden files: one JSON example per message type, exactly as it appears on the wire.
//! Each must parse into its type and serialise back to the same JSON, so a change to the
//! contract shows up here before it breaks another service.

use std::path::PathBuf;

use events::{Action, Command, Envelope, OrderPlaced, Outcome, Reply, ReturnRequested, SagaEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

fn golden(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.json"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn round_trip<T: Serialize + DeserializeOwned>(name: &str) -> T {
    let bytes = golden(name);
    let parsed: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected: Value = serde_json::from_slice(&bytes).expect("golden files are JSON");
    let written = serde_json::to_value(&parsed).expect("serialisable");
    assert_eq!(
        written, expected,
        "{name} does not serialise back to its golden file"
    );
    parsed
}

#[test]
fn order_placed() {
    let order: OrderPlaced = round_trip("OrderPlaced");
    assert_eq!(order.validate(), Ok(()));
    assert_eq!(OrderPlaced::from_json(&golden("OrderPlaced")), Ok(order));
}

#[test]
fn return_requested() {
    let request: ReturnRequested = round_trip("ReturnRequested");
    assert_eq!(request.validate(), Ok(()));
    assert_eq!(
        ReturnRequested::from_json(&golden("ReturnRequested")),
        Ok(request)
    );
    // An order is no return, and a return no order.
    assert!(OrderPlaced::from_json(&golden("ReturnRequested")).is_err());
    assert!(ReturnRequested::from_json(&golden("OrderPlaced")).is_err());
}

/// The order saga's commands, each with the step and action it serves.
const COMMANDS: [(&str, &str, Action); 5] = [
    ("ReserveStock", "reserve_stock", Action::Forward),
    ("ReleaseStock", "reserve_stock", Action::Compensate),
    ("ChargePayment", "charge_payment", Action::Forward),
    ("RefundPayment", "charge_payment", Action::Compensate),
    ("ScheduleShipment", "schedule_shipment", Action::Forward),
];

/// The order saga's replies, each with whether it says the action failed.
const REPLIES: [(&str, bool); 9] = [
    ("StockReserved", false),
    ("StockUnavailable", true),
    ("StockReleased", false),
    ("PaymentCharged", false),
    ("PaymentDeclined", true),
    ("PaymentRefunded", false),
    ("ShipmentScheduled", false),
    ("ShipmentRejected", true),
    ("CompensationFailed", true),
];

#[test]
fn commands() {
    for (name, step, action) in COMMANDS {
        let envelope: Envelope<Command> = round_trip(name);
        let command = &envelope.body;
        assert_eq!(command.name, name);
        assert_eq!((command.step.as_str(), command.action), (step, action));
        assert_eq!(
            (command.saga_type.as_str(), command.saga_version),
            ("order", 1)
        );
        assert!(
            !command.payload.contains_key("attempt"),
            "{name}: the attempt is the command's, not the payload's"
        );
        assert_eq!(
            command.payload.get("order_id").and_then(|id| id.as_str()),
            Some(command.key.as_str()),
            "{name}: the order saga's key is the order id"
        );
        assert_eq!(Envelope::<Command>::from_json(&golden(name)), Ok(envelope));
    }
}

#[test]
fn replies() {
    for (name, failed) in REPLIES {
        let envelope: Envelope<Reply> = round_trip(name);
        assert_eq!(envelope.body.name, name);
        assert_eq!(
            matches!(envelope.body.outcome, Outcome::Failed { .. }),
            failed,
            "{name}"
        );
        assert_eq!(Envelope::<Reply>::from_json(&golden(name)), Ok(envelope));
    }
}

/// The return saga's commands (with the step and action each serves) and replies (with
/// whether each says the action failed): generic messages like the order saga's, keyed by the
/// return id.
#[test]
fn return_saga_commands_and_replies() {
    for (name, step, action) in [
        ("ReceiveReturn", "receive_return", Action::Forward),
        ("RejectReturn", "receive_return", Action::Compensate),
        ("Restock", "restock", Action::Forward),
        ("UndoRestock", "restock", Action::Compensate),
        ("IssueRefund", "refund", Action::Forward),
    ] {
        let envelope: Envelope<Command> = round_trip(name);
        let command = &envelope.body;
        assert_eq!(
            (command.name.as_str(), command.step.as_str(), command.action),
            (name, step, action)
        );
        assert_eq!(
            (command.saga_type.as_str(), command.saga_version),
            ("return", 2)
        );
        assert_eq!(
            command.payload.get("return_id").and_then(|id| id.as_str()),
            Some(command.key.as_str()),
            "{name}: the return saga's key is the return id"
        );
    }
    for (name, failed) in [
        ("ReturnReceived", false),
        ("ReturnRejected", false),
        ("Restocked", false),
        ("RestockRefused", true),
        ("RestockUndone", false),
        ("RefundIssued", false),
        ("RefundRefused", true),
    ] {
        let envelope: Envelope<Reply> = round_trip(name);
        assert_eq!(envelope.body.name, name);
        assert_eq!(envelope.body.saga_type, "return");
        assert_eq!(
            matches!(envelope.body.outcome, Outcome::Failed { .. }),
            failed,
            "{name}"
        );
    }
}

#[test]
fn saga_events() {
    for name in [
        "SagaStarted",
        "SagaCompleted",
        "SagaCompensated",
        "SagaFailed",
    ] {
        let envelope: Envelope<SagaEvent> = round_trip(name);
        assert!(
            envelope.sequence.is_some(),
            "{name} carries its saga sequence"
        );
    }
}

fn edited(name: &str, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut message: Value = serde_json::from_slice(&golden(name)).expect("JSON");
    edit(&mut message);
    serde_json::to_vec(&message).expect("JSON")
}

#[test]
fn a_command_is_not_a_reply_and_versions_are_checked() {
    assert!(Envelope::<Reply>::from_json(&golden("ReserveStock")).is_err());
    assert!(Envelope::<Command>::from_json(&golden("StockReserved")).is_err());
    // Version 1 (the closed enums) is as unknown as a version from the future.
    for version in [1, 3] {
        let bytes = edited("StockReserved", |m| m["schema_version"] = version.into());
        assert_eq!(
            Envelope::<Reply>::from_json(&bytes),
            Err(events::ContractError::UnsupportedSchemaVersion {
                found: version,
                supported: 2
            })
        );
    }
}

/// A change to a golden message, with the text the error it causes must hold.
type Edit = (&'static str, fn(&mut Value));

#[test]
fn decoding_enforces_the_bounds() {
    // Each with the text its error must hold: the field, or for a payload that is no object
    // (JSON names no field there) what was expected.
    let refused_commands: [Edit; 8] = [
        ("step", |m| m["step"] = "reserve-stock".into()),
        ("type", |m| m["type"] = "A".repeat(65).into()),
        ("attempt", |m| m["attempt"] = 0.into()),
        ("key", |m| m["key"] = "".into()),
        ("key", |m| m["key"] = "a\0b".into()),
        ("saga_version", |m| m["saga_version"] = 0.into()),
        ("replies.failure", |m| {
            m["replies"]["failure"] = "no such".into()
        }),
        ("expected a map", |m| {
            m["payload"] = serde_json::json!([1, 2])
        }),
    ];
    for (field, edit) in refused_commands {
        let bytes = edited("ReserveStock", edit);
        let error = Envelope::<Command>::from_json(&bytes).expect_err(field);
        assert!(error.to_string().contains(field), "{field}: {error}");
    }
    let refused_replies: [Edit; 4] = [
        ("reason", |m| m["reason"] = "x".repeat(2_001).into()),
        ("reason", |m| m["reason"] = "a\0b".into()),
        ("reason", |m| {
            if let Some(fields) = m.as_object_mut() {
                fields.remove("reason");
            }
        }),
        ("unknown variant `maybe`", |m| m["outcome"] = "maybe".into()),
    ];
    for (field, edit) in refused_replies {
        let bytes = edited("PaymentDeclined", edit);
        let error = Envelope::<Reply>::from_json(&bytes).expect_err(field);
        assert!(error.to_string().contains(field), "{field}: {error}");
    }
    let with_reason = edited("PaymentCharged", |m| m["reason"] = "why".into());
    assert!(Envelope::<Reply>::from_json(&with_reason).is_err());
}

#[test]
fn replies_answer_their_commands() {
    let envelope: Envelope<Command> = round_trip("ChargePayment");
    let reply = Reply::failed(&envelope.body, "no money").expect("ChargePayment may fail");
    assert_eq!(reply.name, "PaymentDeclined");
    assert_eq!(reply.step, envelope.body.step);
    assert_eq!(reply.key, envelope.body.key);
    assert_eq!(reply.attempt, 1);
    let refund: Envelope<Command> = round_trip("RefundPayment");
    assert_eq!(Reply::succeeded(&refund.body).name, "PaymentRefunded");
    assert_eq!(
        Reply::failed(&refund.body, "down").map(|r| r.name),
        Some("CompensationFailed".to_owned())
    );
    assert_eq!(
        Reply::succeeded(&refund.body).action,
        events::Action::Compensate
    );
}
