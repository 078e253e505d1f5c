//! Commands (orchestrator → participant), replies (participant → orchestrator) and saga
//! lifecycle events (orchestrator → anyone).
//!
//! Every command and reply carries the order id and the `attempt` it belongs to, so that the
//! orchestrator can fence off replies to attempts it no longer waits for.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::order::{Address, LineItem};

/// The forward steps of the order saga, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepName {
    ReserveStock,
    ChargePayment,
    ScheduleShipment,
}

impl StepName {
    pub const ALL: [Self; 3] = [
        Self::ReserveStock,
        Self::ChargePayment,
        Self::ScheduleShipment,
    ];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReserveStock => "reserve_stock",
            Self::ChargePayment => "charge_payment",
            Self::ScheduleShipment => "schedule_shipment",
        }
    }
}

/// Whether a command does a step or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Forward,
    Compensate,
}

/// What a participant is asked to do.
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
    /// Every command's type name (the `type` on the wire), in declaration order.
    pub const TYPE_NAMES: [&'static str; 5] = [
        "ReserveStock",
        "ReleaseStock",
        "ChargePayment",
        "RefundPayment",
        "ScheduleShipment",
    ];

    pub fn step(&self) -> StepName {
        match self {
            Self::ReserveStock { .. } | Self::ReleaseStock { .. } => StepName::ReserveStock,
            Self::ChargePayment { .. } | Self::RefundPayment { .. } => StepName::ChargePayment,
            Self::ScheduleShipment { .. } => StepName::ScheduleShipment,
        }
    }

    pub fn action(&self) -> Action {
        match self {
            Self::ReleaseStock { .. } | Self::RefundPayment { .. } => Action::Compensate,
            Self::ReserveStock { .. }
            | Self::ChargePayment { .. }
            | Self::ScheduleShipment { .. } => Action::Forward,
        }
    }

    pub fn order_id(&self) -> Uuid {
        match self {
            Self::ReserveStock { order_id, .. }
            | Self::ReleaseStock { order_id, .. }
            | Self::ChargePayment { order_id, .. }
            | Self::RefundPayment { order_id, .. }
            | Self::ScheduleShipment { order_id, .. } => *order_id,
        }
    }

    pub fn attempt(&self) -> u32 {
        match self {
            Self::ReserveStock { attempt, .. }
            | Self::ReleaseStock { attempt, .. }
            | Self::ChargePayment { attempt, .. }
            | Self::RefundPayment { attempt, .. }
            | Self::ScheduleShipment { attempt, .. } => *attempt,
        }
    }

    /// The wire name of the command, as in its `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::ReserveStock { .. } => "ReserveStock",
            Self::ReleaseStock { .. } => "ReleaseStock",
            Self::ChargePayment { .. } => "ChargePayment",
            Self::RefundPayment { .. } => "RefundPayment",
            Self::ScheduleShipment { .. } => "ScheduleShipment",
        }
    }
}

/// A step (or its compensation) did what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDone {
    pub order_id: Uuid,
    pub attempt: u32,
}

/// A forward step was refused for a business reason; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRefused {
    pub order_id: Uuid,
    pub attempt: u32,
    pub reason: String,
}

/// A compensation could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompensationFailed {
    pub order_id: Uuid,
    pub attempt: u32,
    pub step: StepName,
    pub reason: String,
}

/// A participant's answer to a command. Every variant names the step it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
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

/// How a step or compensation ended, as the orchestrator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed { reason: String },
}

/// The longest failure reason a reply may carry, in bytes. Reasons are stored in the saga and
/// its history and sent on in saga events, so they are bounded like every stored text.
pub const MAX_REASON_LEN: usize = 2_000;

impl Reply {
    /// Every reply's type name (the `type` on the wire), in declaration order.
    pub const TYPE_NAMES: [&'static str; 9] = [
        "StockReserved",
        "StockUnavailable",
        "StockReleased",
        "PaymentCharged",
        "PaymentDeclined",
        "PaymentRefunded",
        "ShipmentScheduled",
        "ShipmentRejected",
        "CompensationFailed",
    ];

    /// Checks what the types cannot: a failure reason is at most [`MAX_REASON_LEN`] bytes and
    /// holds no NUL (PostgreSQL's text refuses it).
    ///
    /// # Errors
    /// `InvalidField` for the reason.
    pub fn validate(&self) -> crate::Result<()> {
        if let Outcome::Failed { reason } = self.outcome() {
            if reason.len() > MAX_REASON_LEN {
                return Err(crate::ContractError::invalid(
                    "reason",
                    format!("must be at most {MAX_REASON_LEN} bytes"),
                ));
            }
            if reason.contains('\0') {
                return Err(crate::ContractError::invalid(
                    "reason",
                    "must not contain NUL",
                ));
            }
        }
        Ok(())
    }

    /// Builds the reply that says `command` succeeded.
    pub fn done(command: &Command) -> Self {
        let done = StepDone {
            order_id: command.order_id(),
            attempt: command.attempt(),
        };
        match command {
            Command::ReserveStock { .. } => Self::StockReserved(done),
            Command::ReleaseStock { .. } => Self::StockReleased(done),
            Command::ChargePayment { .. } => Self::PaymentCharged(done),
            Command::RefundPayment { .. } => Self::PaymentRefunded(done),
            Command::ScheduleShipment { .. } => Self::ShipmentScheduled(done),
        }
    }

    /// Builds the reply that says `command` was refused (a forward step) or could not be
    /// carried out (a compensation).
    pub fn refused(command: &Command, reason: impl Into<String>) -> Self {
        let order_id = command.order_id();
        let attempt = command.attempt();
        let reason = reason.into();
        let refused = StepRefused {
            order_id,
            attempt,
            reason: reason.clone(),
        };
        match command {
            Command::ReserveStock { .. } => Self::StockUnavailable(refused),
            Command::ChargePayment { .. } => Self::PaymentDeclined(refused),
            Command::ScheduleShipment { .. } => Self::ShipmentRejected(refused),
            Command::ReleaseStock { .. } | Command::RefundPayment { .. } => {
                Self::CompensationFailed(CompensationFailed {
                    order_id,
                    attempt,
                    step: command.step(),
                    reason,
                })
            }
        }
    }

    pub fn step(&self) -> StepName {
        match self {
            Self::StockReserved(_) | Self::StockUnavailable(_) | Self::StockReleased(_) => {
                StepName::ReserveStock
            }
            Self::PaymentCharged(_) | Self::PaymentDeclined(_) | Self::PaymentRefunded(_) => {
                StepName::ChargePayment
            }
            Self::ShipmentScheduled(_) | Self::ShipmentRejected(_) => StepName::ScheduleShipment,
            Self::CompensationFailed(failed) => failed.step,
        }
    }

    pub fn action(&self) -> Action {
        match self {
            Self::StockReleased(_) | Self::PaymentRefunded(_) | Self::CompensationFailed(_) => {
                Action::Compensate
            }
            _ => Action::Forward,
        }
    }

    pub fn order_id(&self) -> Uuid {
        match self {
            Self::StockReserved(d)
            | Self::StockReleased(d)
            | Self::PaymentCharged(d)
            | Self::PaymentRefunded(d)
            | Self::ShipmentScheduled(d) => d.order_id,
            Self::StockUnavailable(r) | Self::PaymentDeclined(r) | Self::ShipmentRejected(r) => {
                r.order_id
            }
            Self::CompensationFailed(f) => f.order_id,
        }
    }

    pub fn attempt(&self) -> u32 {
        match self {
            Self::StockReserved(d)
            | Self::StockReleased(d)
            | Self::PaymentCharged(d)
            | Self::PaymentRefunded(d)
            | Self::ShipmentScheduled(d) => d.attempt,
            Self::StockUnavailable(r) | Self::PaymentDeclined(r) | Self::ShipmentRejected(r) => {
                r.attempt
            }
            Self::CompensationFailed(f) => f.attempt,
        }
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Self::StockUnavailable(r) | Self::PaymentDeclined(r) | Self::ShipmentRejected(r) => {
                Outcome::Failed {
                    reason: r.reason.clone(),
                }
            }
            Self::CompensationFailed(f) => Outcome::Failed {
                reason: f.reason.clone(),
            },
            _ => Outcome::Succeeded,
        }
    }

    /// The wire name of the reply, as in its `type` field.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::StockReserved(_) => "StockReserved",
            Self::StockUnavailable(_) => "StockUnavailable",
            Self::StockReleased(_) => "StockReleased",
            Self::PaymentCharged(_) => "PaymentCharged",
            Self::PaymentDeclined(_) => "PaymentDeclined",
            Self::PaymentRefunded(_) => "PaymentRefunded",
            Self::ShipmentScheduled(_) => "ShipmentScheduled",
            Self::ShipmentRejected(_) => "ShipmentRejected",
            Self::CompensationFailed(_) => "CompensationFailed",
        }
    }
}

/// A saga's lifecycle, published on `saga.events` for anyone who wants to follow along.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum SagaEvent {
    SagaStarted {
        order_id: Uuid,
        customer_id: String,
        total_cents: i64,
        currency: String,
    },
    SagaCompleted {
        order_id: Uuid,
    },
    SagaCompensated {
        order_id: Uuid,
        reason: String,
    },
    SagaFailed {
        order_id: Uuid,
        reason: String,
    },
}

impl SagaEvent {
    pub fn order_id(&self) -> Uuid {
        match self {
            Self::SagaStarted { order_id, .. }
            | Self::SagaCompleted { order_id }
            | Self::SagaCompensated { order_id, .. }
            | Self::SagaFailed { order_id, .. } => *order_id,
        }
    }
}
