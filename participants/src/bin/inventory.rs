//! The inventory participant.
use participant_sdk::NoSettings;

fn main() -> Result<(), messaging::Report> {
    participant_sdk::main(
        "Reserves and releases stock for order sagas.",
        |_: NoSettings| participants::inventory::participant(),
    )
}
