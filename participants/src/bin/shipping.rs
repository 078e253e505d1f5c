//! The shipping participant.
use participants::shipping::ShippingConfig;

fn main() -> Result<(), messaging::Report> {
    participants::sdk::main(
        "Schedules shipments for order sagas.",
        |settings: ShippingConfig| participants::shipping::participant(&settings),
    )
}
