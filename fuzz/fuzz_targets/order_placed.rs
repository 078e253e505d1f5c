//! `OrderPlaced::from_json`: the decoder of the `orders` topic, the one the outside world
//! writes to.
#![no_main]

use events::{ContractError, OrderPlaced};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let order = match OrderPlaced::from_json(data) {
        Ok(order) => order,
        Err(ContractError::Malformed(_) | ContractError::InvalidField { .. }) => return,
        Err(e @ ContractError::UnsupportedSchemaVersion { .. }) => {
            panic!("an order has no schema version: {e}")
        }
    };
    // What decodes is a valid order.
    assert_eq!(order.validate(), Ok(()), "{order:?}");
    // It re-encodes to an order that decodes to the same value, both through `from_json` and
    // the way the orchestrator reads its stored copy back (`order_data`, a JSON value).
    let bytes = serde_json::to_vec(&order).expect("an order serialises");
    assert_eq!(OrderPlaced::from_json(&bytes).as_ref(), Ok(&order));
    let value = serde_json::to_value(&order).expect("an order serialises");
    assert_eq!(value["type"], "OrderPlaced");
    let stored: OrderPlaced = serde_json::from_value(value).expect("the stored copy reads back");
    assert_eq!(stored, order);
});
