//! The shipping participant.
use participants::shipping::ShippingConfig;

fn main() -> Result<(), messaging::Report> {
    participant_sdk::main(
        "Schedules shipments for order sagas.",
        |settings: ShippingConfig| participants::shipping::participant(&settings),
    )
}
