//! `ReturnRequested`: a customer sends items of an order back (topic `returns`, key = return
//! id). Like `OrderPlaced` it comes from outside clients, so it carries no envelope and unknown
//! fields are ignored.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::order::{check_currency, check_item_count, check_line, check_text, expect_type};
use crate::{ContractError, Result};

/// A customer asked to return items of an order, and to be refunded `refund_cents`: the event
/// that starts a return saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "ReturnRequested")]
pub struct ReturnRequested {
    pub return_id: Uuid,
    /// The order the items came from (whose charge the refund is paid back from).
    pub order_id: Uuid,
    pub customer_id: String,
    pub items: Vec<ReturnItem>,
    pub refund_cents: i64,
    /// ISO 4217 code, three upper-case letters.
    pub currency: String,
}

/// A returned line: how many of a SKU come back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnItem {
    pub sku: String,
    pub quantity: i32,
}

/// The largest refund one return may ask for: far from overflowing any sum of them.
const MAX_REFUND_CENTS: i64 = 100_000_000_000;

impl ReturnRequested {
    /// Its `type` on the wire.
    pub const TYPE_NAME: &'static str = "ReturnRequested";

    /// Its JSON Schema, the contract's (`events/contract/schemas/`): the orchestrator reads the
    /// fields a saga definition may name, and a valid sample message (its `examples`), from it.
    pub const SCHEMA: &'static str =
        include_str!("../contract/schemas/ReturnRequested.schema.json");

    /// Parses a client's JSON and checks it with [`ReturnRequested::validate`].
    ///
    /// # Errors
    /// [`ContractError::Malformed`] when the bytes are not a `ReturnRequested` (another `type`
    /// among them), `InvalidField` when a field breaks a rule.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        // The type first, so that another message on the topic (an order, say) is named as
        // such rather than by the first field it lacks.
        expect_type(bytes, Self::TYPE_NAME)?;
        let request: Self = serde_json::from_slice(bytes)?;
        request.validate()?;
        Ok(request)
    }

    /// Checks the business rules of the contract: at least one item, positive quantities, a
    /// positive refund within bounds, a well-formed currency code, text that is not blank, not
    /// too long and without control characters. Whether the refund fits what the order was
    /// charged is the payment service's to decide (it refuses the step), not the contract's.
    ///
    /// # Errors
    /// `InvalidField` naming the first field that breaks a rule.
    pub fn validate(&self) -> Result<()> {
        check_text("customer_id", &self.customer_id)?;
        check_item_count(self.items.len(), "a return", "return")?;
        for item in &self.items {
            check_line(&item.sku, item.quantity)?;
        }
        if !(1..=MAX_REFUND_CENTS).contains(&self.refund_cents) {
            return Err(ContractError::invalid(
                "refund_cents",
                format!(
                    "must be between 1 and {MAX_REFUND_CENTS}, got {}",
                    self.refund_cents
                ),
            ));
        }
        check_currency(&self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::order::{MAX_ITEMS, MAX_QUANTITY};

    fn request() -> ReturnRequested {
        ReturnRequested {
            return_id: Uuid::from_u128(1),
            order_id: Uuid::from_u128(2),
            customer_id: "alice".into(),
            items: vec![ReturnItem {
                sku: "WIDGET".into(),
                quantity: 2,
            }],
            refund_cents: 2_000,
            currency: "EUR".into(),
        }
    }

    #[test]
    fn a_consistent_return_is_valid() {
        assert_eq!(request().validate(), Ok(()));
        let bytes = serde_json::to_vec(&request()).expect("serialisable");
        assert_eq!(ReturnRequested::from_json(&bytes), Ok(request()));
    }

    #[test]
    fn each_rule_names_its_field() {
        type BreakRule = Box<dyn Fn(&mut ReturnRequested)>;
        let cases: Vec<(&str, BreakRule)> = vec![
            ("customer_id", Box::new(|r| r.customer_id = " ".into())),
            ("customer_id", Box::new(|r| r.customer_id = "a\0b".into())),
            ("items", Box::new(|r| r.items.clear())),
            (
                "items",
                Box::new(|r| r.items = vec![r.items[0].clone(); MAX_ITEMS + 1]),
            ),
            ("items[].sku", Box::new(|r| r.items[0].sku = String::new())),
            ("items[].quantity", Box::new(|r| r.items[0].quantity = 0)),
            (
                "items[].quantity",
                Box::new(|r| r.items[0].quantity = MAX_QUANTITY + 1),
            ),
            ("refund_cents", Box::new(|r| r.refund_cents = 0)),
            ("refund_cents", Box::new(|r| r.refund_cents = -5)),
            (
                "refund_cents",
                Box::new(|r| r.refund_cents = MAX_REFUND_CENTS + 1),
            ),
            ("currency", Box::new(|r| r.currency = "euro".into())),
        ];
        for (field, break_rule) in cases {
            let mut r = request();
            break_rule(&mut r);
            match r.validate() {
                Err(ContractError::InvalidField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected InvalidField, got {other:?}"),
            }
        }
    }

    #[test]
    fn another_type_or_garbage_is_malformed_and_extra_fields_are_ignored() {
        let mut json = serde_json::to_value(request()).expect("serialisable");
        json["note"] = "scratched".into();
        let bytes = serde_json::to_vec(&json).expect("serialisable");
        assert_eq!(ReturnRequested::from_json(&bytes), Ok(request()));
        json["type"] = "OrderPlaced".into();
        let bytes = serde_json::to_vec(&json).expect("serialisable");
        assert!(matches!(
            ReturnRequested::from_json(&bytes),
            Err(ContractError::Malformed(_))
        ));
        for garbage in [
            &b"{not json"[..],
            b"",
            b"null",
            b"\xff\xfe",
            br#"{"type":"ReturnRequested"}"#,
        ] {
            assert!(
                matches!(
                    ReturnRequested::from_json(garbage),
                    Err(ContractError::Malformed(_))
                ),
                "{garbage:?}"
            );
        }
    }
}
