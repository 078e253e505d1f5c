//! The returns participant.
use participants::sdk::NoSettings;

fn main() -> Result<(), messaging::Report> {
    participants::sdk::main(
        "Receives returned items for return sagas.",
        |_: NoSettings| participants::returns::participant(),
    )
}
