//! The order saga's steps. Changing this list changes behaviour for new sagas only: every saga
//! records the [`DEFINITION_VERSION`] it started with.

use events::{Command, OrderPlaced, StepName};

/// Bump when [`STEPS`] changes shape.
pub const DEFINITION_VERSION: i32 = 1;

/// One step of the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDefinition {
    pub name: StepName,
    /// Whether the step can be undone. The last step needs no compensation: nothing runs after
    /// it that could fail.
    pub compensable: bool,
}

/// The order saga: reserve stock, charge payment, schedule shipment.
pub const STEPS: [StepDefinition; 3] = [
    StepDefinition {
        name: StepName::ReserveStock,
        compensable: true,
    },
    StepDefinition {
        name: StepName::ChargePayment,
        compensable: true,
    },
    StepDefinition {
        name: StepName::ScheduleShipment,
        compensable: false,
    },
];

/// The command that does `step` for `order`.
pub(crate) fn forward_command(step: StepName, order: &OrderPlaced, attempt: u32) -> Command {
    let order_id = order.order_id;
    match step {
        StepName::ReserveStock => Command::ReserveStock {
            order_id,
            attempt,
            items: order.items.clone(),
        },
        StepName::ChargePayment => Command::ChargePayment {
            order_id,
            attempt,
            customer_id: order.customer_id.clone(),
            amount_cents: order.total_cents,
            currency: order.currency.clone(),
        },
        StepName::ScheduleShipment => Command::ScheduleShipment {
            order_id,
            attempt,
            address: order.shipping_address.clone(),
            items: order.items.clone(),
        },
    }
}

/// The command that undoes `step`, or `None` for a step without compensation.
pub(crate) fn compensation_command(
    step: StepName,
    order_id: uuid::Uuid,
    attempt: u32,
) -> Option<Command> {
    match step {
        StepName::ReserveStock => Some(Command::ReleaseStock { order_id, attempt }),
        StepName::ChargePayment => Some(Command::RefundPayment { order_id, attempt }),
        StepName::ScheduleShipment => None,
    }
}
