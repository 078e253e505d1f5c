//! The inventory participant.
use participants::sdk::NoSettings;

fn main() -> Result<(), messaging::Report> {
    participants::sdk::main(
        "Reserves and releases stock for order sagas.",
        |_: NoSettings| participants::inventory::participant(),
    )
}
