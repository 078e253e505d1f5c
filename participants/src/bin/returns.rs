//! The returns participant.
use participant_sdk::NoSettings;

fn main() -> Result<(), messaging::Report> {
    participant_sdk::main(
        "Receives returned items for return sagas.",
        |_: NoSettings| participants::returns::participant(),
    )
}
