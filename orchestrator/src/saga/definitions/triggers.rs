//! The messages that can start a saga, and what they look like, for checking paths at load time.

use serde_json::{Map, Value};

/// The shape of a trigger message's field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Text,
    Integer,
    Object(&'static [(&'static str, Shape)]),
    List(&'static Shape),
}

impl Shape {
    pub(super) fn is_scalar(self) -> bool {
        matches!(self, Self::Text | Self::Integer)
    }

    pub(super) fn field(self, name: &str) -> Option<Shape> {
        match self {
            Self::Object(fields) => fields.iter().find(|(n, _)| *n == name).map(|(_, s)| *s),
            _ => None,
        }
    }
}

const LINE_ITEM: Shape = Shape::Object(&[
    ("sku", Shape::Text),
    ("quantity", Shape::Integer),
    ("unit_price_cents", Shape::Integer),
]);

const ADDRESS: Shape = Shape::Object(&[
    ("country", Shape::Text),
    ("city", Shape::Text),
    ("line1", Shape::Text),
    ("postal_code", Shape::Text),
]);

/// `events::OrderPlaced` as JSON (its `type` tag aside); a test keeps the two in step.
const ORDER_PLACED: Shape = Shape::Object(&[
    ("order_id", Shape::Text),
    ("customer_id", Shape::Text),
    ("items", Shape::List(&LINE_ITEM)),
    ("total_cents", Shape::Integer),
    ("currency", Shape::Text),
    ("shipping_address", ADDRESS),
]);

const RETURN_ITEM: Shape = Shape::Object(&[("sku", Shape::Text), ("quantity", Shape::Integer)]);

/// `events::ReturnRequested` as JSON (its `type` tag aside); a test keeps the two in step.
const RETURN_REQUESTED: Shape = Shape::Object(&[
    ("return_id", Shape::Text),
    ("order_id", Shape::Text),
    ("customer_id", Shape::Text),
    ("items", Shape::List(&RETURN_ITEM)),
    ("refund_cents", Shape::Integer),
    ("currency", Shape::Text),
]);

/// A message that can start a saga: everything the engine knows of it, in one place. A new
/// trigger message is a type in `events` (with its validation) and one entry here.
#[derive(Debug, Clone, Copy)]
pub struct TriggerMessage {
    /// Its `type` on the wire.
    pub name: &'static str,
    /// Its fields as JSON (the `type` tag aside), for checking paths at load time.
    pub shape: Shape,
    /// Reads a record's bytes as this message, checked by its contract rules, and returns it
    /// as JSON (as the typed message writes itself, `type` tag included): what a saga keeps
    /// as its trigger.
    pub decode: fn(&[u8]) -> Result<Value, events::ContractError>,
    /// The fields `SagaStarted` copies from the message, for whoever follows `saga.events`.
    pub summary: &'static [&'static str],
    /// A message with every field of [`Self::shape`], for building each command of a
    /// definition once at load time.
    pub sample: fn() -> Value,
}

impl TriggerMessage {
    /// The `SagaStarted` subject of `trigger`: the [`Self::summary`] fields it has.
    pub fn summary_of(&self, trigger: &Value) -> Map<String, Value> {
        self.summary
            .iter()
            .filter_map(|field| Some(((*field).to_owned(), trigger.get(field)?.clone())))
            .collect()
    }
}

/// `decode` of [`TRIGGER_MESSAGES`]: a typed message's check, then the message as JSON.
fn decoded<T: serde::Serialize>(
    message: Result<T, events::ContractError>,
) -> Result<Value, events::ContractError> {
    let message = message?;
    serde_json::to_value(&message).map_err(|e| events::ContractError::Malformed(e.to_string()))
}

/// The messages a saga can be triggered by.
pub const TRIGGER_MESSAGES: [TriggerMessage; 2] = [
    TriggerMessage {
        name: events::OrderPlaced::TYPE_NAME,
        shape: ORDER_PLACED,
        decode: |bytes| decoded(events::OrderPlaced::from_json(bytes)),
        summary: &["order_id", "customer_id", "total_cents", "currency"],
        sample: || {
            serde_json::json!({
                "type": events::OrderPlaced::TYPE_NAME,
                "order_id": "00000000-0000-4000-8000-000000000001",
                "customer_id": "c",
                "items": [{ "sku": "s", "quantity": 1, "unit_price_cents": 1 }],
                "total_cents": 1,
                "currency": "EUR",
                "shipping_address": { "country": "DE", "city": "c", "line1": "l", "postal_code": "p" }
            })
        },
    },
    TriggerMessage {
        name: events::ReturnRequested::TYPE_NAME,
        shape: RETURN_REQUESTED,
        decode: |bytes| decoded(events::ReturnRequested::from_json(bytes)),
        summary: &[
            "return_id",
            "order_id",
            "customer_id",
            "refund_cents",
            "currency",
        ],
        sample: || {
            serde_json::json!({
                "type": events::ReturnRequested::TYPE_NAME,
                "return_id": "00000000-0000-4000-8000-000000000002",
                "order_id": "00000000-0000-4000-8000-000000000001",
                "customer_id": "c",
                "items": [{ "sku": "s", "quantity": 1 }],
                "refund_cents": 1,
                "currency": "EUR"
            })
        },
    },
];

/// The trigger message named `message`, if there is one.
pub fn trigger_message(message: &str) -> Option<&'static TriggerMessage> {
    TRIGGER_MESSAGES.iter().find(|m| m.name == message)
}

pub(super) fn trigger_shape(message: &str) -> Option<Shape> {
    trigger_message(message).map(|m| m.shape)
}
