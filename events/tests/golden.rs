//! Golden files: one JSON example per message type, exactly as it appears on the wire.
//! Each must parse into its type and serialise back to the same JSON, so a change to the
//! contract shows up here before it breaks another service.

use std::path::PathBuf;

use events::{Command, Envelope, OrderPlaced, Reply, SagaEvent};
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
fn commands() {
    for name in Command::TYPE_NAMES {
        let envelope: Envelope<Command> = round_trip(name);
        assert_eq!(envelope.body.type_name(), name);
        assert_eq!(Envelope::<Command>::from_json(&golden(name)), Ok(envelope));
    }
}

#[test]
fn replies() {
    for name in Reply::TYPE_NAMES {
        let envelope: Envelope<Reply> = round_trip(name);
        assert_eq!(envelope.body.type_name(), name);
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

#[test]
fn a_command_is_not_a_reply_and_versions_are_checked() {
    assert!(Envelope::<Reply>::from_json(&golden("ReserveStock")).is_err());
    let mut future: Value = serde_json::from_slice(&golden("StockReserved")).expect("JSON");
    future["schema_version"] = 2.into();
    let bytes = serde_json::to_vec(&future).expect("JSON");
    assert_eq!(
        Envelope::<Reply>::from_json(&bytes),
        Err(events::ContractError::UnsupportedSchemaVersion {
            found: 2,
            supported: 1
        })
    );
}

#[test]
fn replies_answer_their_commands() {
    let envelope: Envelope<Command> = round_trip("ChargePayment");
    let reply = Reply::refused(&envelope.body, "no money");
    assert_eq!(reply.type_name(), "PaymentDeclined");
    assert_eq!(reply.step(), envelope.body.step());
    assert_eq!(reply.attempt(), 1);
    let refund: Envelope<Command> = round_trip("RefundPayment");
    assert_eq!(Reply::done(&refund.body).type_name(), "PaymentRefunded");
    assert_eq!(
        Reply::refused(&refund.body, "down").type_name(),
        "CompensationFailed"
    );
}
