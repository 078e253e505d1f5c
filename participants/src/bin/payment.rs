//! The payment participant.
use participant_sdk::NoSettings;

fn main() -> Result<(), messaging::Report> {
    participant_sdk::main(
        "Charges and refunds customers for order sagas.",
        |_: NoSettings| participants::payment::participant(),
    )
}
