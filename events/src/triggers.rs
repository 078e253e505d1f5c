//! The messages that can start a saga, each registered once, here, with what the engine needs
//! of it: its `type` on the wire, its JSON Schema (the engine reads from it the fields a saga
//! definition may name and a sample message), how to read and check its bytes, and what
//! `SagaStarted` repeats of it. A new saga type's trigger is a message type of this crate (its
//! rules and its schema in `contract/schemas/`) and one entry in [`SAGA_TRIGGERS`]; the
//! engine (`saga-core`) knows no trigger by name.

use serde_json::Value;

use crate::{ContractError, OrderPlaced, ReturnRequested};

/// A message type that can start a saga.
#[derive(Debug, Clone, Copy)]
pub struct SagaTrigger {
    /// Its `type` on the wire.
    pub name: &'static str,
    /// Its JSON Schema, the contract's (`contract/schemas/`), with at least one `examples`
    /// entry.
    pub schema: &'static str,
    /// Reads a record's bytes as this message, checked by its contract rules, and returns it
    /// as JSON (as the typed message writes itself, `type` tag included): what a saga keeps
    /// as its trigger.
    pub decode: fn(&[u8]) -> Result<Value, ContractError>,
    /// The fields `SagaStarted` copies from the message, for whoever follows `saga.events`.
    pub summary: &'static [&'static str],
}

/// `decode` of [`SAGA_TRIGGERS`]: a typed message's check, then the message as JSON.
fn decoded<T: serde::Serialize>(message: Result<T, ContractError>) -> Result<Value, ContractError> {
    let message = message?;
    serde_json::to_value(&message).map_err(ContractError::from)
}

/// Every message a saga can be started by.
pub static SAGA_TRIGGERS: &[SagaTrigger] = &[
    SagaTrigger {
        name: OrderPlaced::TYPE_NAME,
        schema: OrderPlaced::SCHEMA,
        decode: |bytes| decoded(OrderPlaced::from_json(bytes)),
        summary: &["order_id", "customer_id", "total_cents", "currency"],
    },
    SagaTrigger {
        name: ReturnRequested::TYPE_NAME,
        schema: ReturnRequested::SCHEMA,
        decode: |bytes| decoded(ReturnRequested::from_json(bytes)),
        summary: &[
            "return_id",
            "order_id",
            "customer_id",
            "refund_cents",
            "currency",
        ],
    },
];
