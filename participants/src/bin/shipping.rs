//! The shipping participant.
use participants::shipping::ShippingConfig;

fn main() -> anyhow::Result<()> {
    participants::sdk::main(
        "Schedules shipments for order sagas.",
        |settings: ShippingConfig| participants::shipping::participant(&settings),
    )
}
