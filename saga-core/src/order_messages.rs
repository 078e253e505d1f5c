//! The order saga's commands and replies as the tests write them: one variant per message, in
//! the shapes the `events` crate had before messages became generic. Each converts to the
//! generic wire message that `sagas/order.toml` makes (and a command back from it), so a test
//! says `Reply::StockReserved(done(1))` where the wire says `{"type": "StockReserved",
//! "step": "reserve_stock", "action": "forward", ...}`.

use events::{Action, Address, LineItem, Outcome, ReplyNames};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// The order saga's commands: name, step, direction, success and failure reply.
const COMMANDS: [(&str, &str, Action, &str, &str); 5] = [
    (
        "ReserveStock",
        "reserve_stock",
        Action::Forward,
        "StockReserved",
        "StockUnavailable",
    ),
    (
        "ReleaseStock",
        "reserve_stock",
        Action::Compensate,
        "StockReleased",
        "CompensationFailed",
    ),
    (
        "ChargePayment",
        "charge_payment",
        Action::Forward,
        "PaymentCharged",
        "PaymentDeclined",
    ),
    (
        "RefundPayment",
        "charge_payment",
        Action::Compensate,
        "PaymentRefunded",
        "CompensationFailed",
    ),
    (
        "ScheduleShipment",
        "schedule_shipment",
        Action::Forward,
        "ShipmentScheduled",
        "ShipmentRejected",
    ),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum Command {
    ReserveStock {
        order_id: Uuid,
        attempt: u32,
        items: Vec<LineItem>,
    },
    ReleaseStock {
        order_id: Uuid,
        attempt: u32,
    },
    ChargePayment {
        order_id: Uuid,
        attempt: u32,
        customer_id: String,
        amount_cents: i64,
        currency: String,
    },
    RefundPayment {
        order_id: Uuid,
        attempt: u32,
    },
    ScheduleShipment {
        order_id: Uuid,
        attempt: u32,
        address: Address,
        items: Vec<LineItem>,
    },
}

impl Command {
    /// The generic command the orchestrator sends for this one.
    pub fn wire(&self) -> events::Command {
        let tagged = serde_json::to_value(self).expect("serialises");
        let name = tagged["type"].as_str().expect("tagged").to_owned();
        let mut payload = tagged["payload"].as_object().expect("fields").clone();
        let attempt = payload
            .remove("attempt")
            .and_then(|a| a.as_u64())
            .and_then(|a| u32::try_from(a).ok())
            .expect("an attempt");
        let key = payload["order_id"]
            .as_str()
            .expect("an order id")
            .to_owned();
        let (_, step, action, success, failure) = COMMANDS
            .into_iter()
            .find(|c| c.0 == name)
            .expect("an order saga command");
        events::Command {
            name,
            saga_type: "order".into(),
            saga_version: 1,
            step: step.into(),
            action,
            attempt,
            key,
            replies: ReplyNames {
                success: success.into(),
                failure: Some(failure.into()),
            },
            payload,
        }
    }

    /// The order saga command `command` is, if it is one.
    pub fn from_wire(command: &events::Command) -> Option<Self> {
        let mut payload = command.payload.clone();
        payload.insert("attempt".into(), Value::from(command.attempt));
        serde_json::from_value(serde_json::json!({ "type": command.name, "payload": payload })).ok()
    }
}

/// A step (or its compensation) did what it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepDone {
    pub order_id: Uuid,
    pub attempt: u32,
}

/// A forward step was refused for a business reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRefused {
    pub order_id: Uuid,
    pub attempt: u32,
    pub reason: String,
}

/// A compensation could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompensationFailed {
    pub order_id: Uuid,
    pub attempt: u32,
    pub step: &'static str,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    StockReserved(StepDone),
    StockUnavailable(StepRefused),
    StockReleased(StepDone),
    PaymentCharged(StepDone),
    PaymentDeclined(StepRefused),
    PaymentRefunded(StepDone),
    ShipmentScheduled(StepDone),
    ShipmentRejected(StepRefused),
    CompensationFailed(CompensationFailed),
}

impl Reply {
    /// The generic reply a participant sends for this one.
    pub fn wire(&self) -> events::Reply {
        let (name, step, action) = match self {
            Self::StockReserved(_) => ("StockReserved", "reserve_stock", Action::Forward),
            Self::StockUnavailable(_) => ("StockUnavailable", "reserve_stock", Action::Forward),
            Self::StockReleased(_) => ("StockReleased", "reserve_stock", Action::Compensate),
            Self::PaymentCharged(_) => ("PaymentCharged", "charge_payment", Action::Forward),
            Self::PaymentDeclined(_) => ("PaymentDeclined", "charge_payment", Action::Forward),
            Self::PaymentRefunded(_) => ("PaymentRefunded", "charge_payment", Action::Compensate),
            Self::ShipmentScheduled(_) => {
                ("ShipmentScheduled", "schedule_shipment", Action::Forward)
            }
            Self::ShipmentRejected(_) => ("ShipmentRejected", "schedule_shipment", Action::Forward),
            Self::CompensationFailed(f) => ("CompensationFailed", f.step, Action::Compensate),
        };
        let (order_id, attempt, outcome) = match self {
            Self::StockReserved(d)
            | Self::StockReleased(d)
            | Self::PaymentCharged(d)
            | Self::PaymentRefunded(d)
            | Self::ShipmentScheduled(d) => (d.order_id, d.attempt, Outcome::Succeeded),
            Self::StockUnavailable(r) | Self::PaymentDeclined(r) | Self::ShipmentRejected(r) => (
                r.order_id,
                r.attempt,
                Outcome::Failed {
                    reason: r.reason.clone(),
                },
            ),
            Self::CompensationFailed(f) => (
                f.order_id,
                f.attempt,
                Outcome::Failed {
                    reason: f.reason.clone(),
                },
            ),
        };
        events::Reply {
            name: name.into(),
            saga_type: "order".into(),
            step: step.into(),
            action,
            attempt,
            key: order_id.to_string(),
            outcome,
        }
    }
}
