//! The payment participant.
use participants::sdk::NoSettings;

fn main() -> Result<(), messaging::Report> {
    participants::sdk::main(
        "Charges and refunds customers for order sagas.",
        |_: NoSettings| participants::payment::participant(),
    )
}
