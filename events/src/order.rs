//! `OrderPlaced`: the one message that outside clients publish (topic `orders`, key = order id).
//!
//! It carries no envelope, because clients should not have to know our internals; unknown fields
//! are ignored so that clients may send more than we read.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ContractError, Malformed, Result};

/// A customer placed an order: the event that starts a saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "OrderPlaced")]
pub struct OrderPlaced {
    pub order_id: Uuid,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub total_cents: i64,
    /// ISO 4217 code, three upper-case letters.
    pub currency: String,
    pub shipping_address: Address,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// ISO 3166-1 alpha-2 code, two upper-case letters.
    pub country: String,
    pub city: String,
    pub line1: String,
    pub postal_code: String,
}

impl OrderPlaced {
    /// Its `type` on the wire.
    pub const TYPE_NAME: &'static str = "OrderPlaced";

    /// Its JSON Schema, the contract's (`events/contract/schemas/`): the orchestrator reads the
    /// fields a saga definition may name, and a valid sample message (its `examples`), from it.
    pub const SCHEMA: &'static str = include_str!("../contract/schemas/OrderPlaced.schema.json");
}

/// Just the `type` field of a record on `orders`.
#[derive(Deserialize)]
struct TypeTag<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// Refuses a record whose `type` is not `name`. serde writes the `type` tag of a struct but
/// does not check it on reading.
pub(crate) fn expect_type(bytes: &[u8], name: &str) -> Result<()> {
    let tag: TypeTag<'_> = serde_json::from_slice(bytes)?;
    if tag.kind.as_deref() == Some(name) {
        return Ok(());
    }
    Err(ContractError::Malformed(Malformed::OtherType {
        expected: name.to_owned(),
        found: tag
            .kind
            .as_deref()
            .map(|k| k.chars().take(64).collect::<String>()),
    }))
}

/// Upper bounds that keep one order's arithmetic far from overflow.
pub(crate) const MAX_ITEMS: usize = 100;
pub(crate) const MAX_QUANTITY: i32 = 1_000_000;
pub(crate) const MAX_UNIT_PRICE_CENTS: i64 = 1_000_000_000;
const MAX_TEXT_LEN: usize = 200;

impl OrderPlaced {
    /// Parses a client's JSON and checks it with [`OrderPlaced::validate`].
    ///
    /// # Errors
    /// [`ContractError::Malformed`] when the bytes are not an `OrderPlaced`, `InvalidField`
    /// when a field breaks a rule.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let order: Self = serde_json::from_slice(bytes)?;
        // serde writes the `type` tag of a struct but does not check it on reading, so an
        // `OrderCancelled` with an order's fields would otherwise start a saga.
        expect_type(bytes, OrderPlaced::TYPE_NAME)?;
        order.validate()?;
        Ok(order)
    }

    /// Checks the business rules of the contract: at least one item, positive quantities and
    /// prices, a total equal to the sum of the lines, well-formed currency and country codes,
    /// text that is not blank, not too long and without NUL.
    ///
    /// # Errors
    /// `InvalidField` naming the first field that breaks a rule.
    pub fn validate(&self) -> Result<()> {
        check_text("customer_id", &self.customer_id)?;
        check_item_count(self.items.len(), "an order", "order")?;
        let mut sum: i64 = 0;
        for item in &self.items {
            check_line(&item.sku, item.quantity)?;
            if !(0..=MAX_UNIT_PRICE_CENTS).contains(&item.unit_price_cents) {
                return Err(ContractError::invalid(
                    "items[].unit_price_cents",
                    format!(
                        "must be between 0 and {MAX_UNIT_PRICE_CENTS}, got {}",
                        item.unit_price_cents
                    ),
                ));
            }
            // Bounded above, so this cannot overflow an i64.
            sum += i64::from(item.quantity) * item.unit_price_cents;
        }
        if self.total_cents != sum {
            return Err(ContractError::invalid(
                "total_cents",
                format!("is {} but the items add up to {sum}", self.total_cents),
            ));
        }
        check_currency(&self.currency)?;
        let address = &self.shipping_address;
        if !is_upper_code(&address.country, 2) {
            return Err(ContractError::invalid(
                "shipping_address.country",
                format!(
                    "expected an ISO 3166 alpha-2 code like \"DE\", got {:?}",
                    address.country
                ),
            ));
        }
        check_text("shipping_address.city", &address.city)?;
        check_text("shipping_address.line1", &address.line1)?;
        check_text("shipping_address.postal_code", &address.postal_code)?;
        Ok(())
    }
}

/// At least one and at most [`MAX_ITEMS`] items: `a_noun` ("an order") and `noun` ("order")
/// name what holds them in the messages.
pub(crate) fn check_item_count(items: usize, a_noun: &str, noun: &str) -> Result<()> {
    if items == 0 {
        return Err(ContractError::invalid(
            "items",
            format!("{a_noun} needs at least one item"),
        ));
    }
    if items > MAX_ITEMS {
        return Err(ContractError::invalid(
            "items",
            format!("at most {MAX_ITEMS} items per {noun}"),
        ));
    }
    Ok(())
}

/// A line's SKU is text and its quantity 1 to [`MAX_QUANTITY`].
pub(crate) fn check_line(sku: &str, quantity: i32) -> Result<()> {
    check_text("items[].sku", sku)?;
    if !(1..=MAX_QUANTITY).contains(&quantity) {
        return Err(ContractError::invalid(
            "items[].quantity",
            format!("must be between 1 and {MAX_QUANTITY}, got {quantity}"),
        ));
    }
    Ok(())
}

/// An ISO 4217 code: three upper-case letters.
pub(crate) fn check_currency(code: &str) -> Result<()> {
    if is_upper_code(code, 3) {
        Ok(())
    } else {
        Err(ContractError::invalid(
            "currency",
            format!("expected an ISO 4217 code like \"EUR\", got {code:?}"),
        ))
    }
}

pub(crate) fn check_text(field: &'static str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(ContractError::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_TEXT_LEN {
        return Err(ContractError::invalid(
            field,
            format!("must be at most {MAX_TEXT_LEN} bytes"),
        ));
    }
    // PostgreSQL's text and jsonb refuse NUL, and no field has a use for control characters.
    if value.chars().any(char::is_control) {
        return Err(ContractError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub(crate) fn is_upper_code(value: &str, len: usize) -> bool {
    value.len() == len && value.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> OrderPlaced {
        OrderPlaced {
            order_id: Uuid::nil(),
            customer_id: "alice".into(),
            items: vec![
                LineItem {
                    sku: "WIDGET".into(),
                    quantity: 2,
                    unit_price_cents: 1_000,
                },
                LineItem {
                    sku: "GADGET".into(),
                    quantity: 1,
                    unit_price_cents: 500,
                },
            ],
            total_cents: 2_500,
            currency: "EUR".into(),
            shipping_address: Address {
                country: "DE".into(),
                city: "Berlin".into(),
                line1: "Unter den Linden 1".into(),
                postal_code: "10117".into(),
            },
        }
    }

    #[test]
    fn a_consistent_order_is_valid() {
        assert_eq!(order().validate(), Ok(()));
    }

    #[test]
    fn each_rule_names_its_field() {
        type BreakRule = Box<dyn Fn(&mut OrderPlaced)>;
        let cases: Vec<(&str, BreakRule)> = vec![
            ("items", Box::new(|o| o.items.clear())),
            ("items[].quantity", Box::new(|o| o.items[0].quantity = 0)),
            (
                "items[].unit_price_cents",
                Box::new(|o| o.items[0].unit_price_cents = -1),
            ),
            ("items[].sku", Box::new(|o| o.items[0].sku = " ".into())),
            ("total_cents", Box::new(|o| o.total_cents += 1)),
            ("currency", Box::new(|o| o.currency = "eur".into())),
            (
                "shipping_address.country",
                Box::new(|o| o.shipping_address.country = "DEU".into()),
            ),
            (
                "shipping_address.city",
                Box::new(|o| o.shipping_address.city = String::new()),
            ),
            ("customer_id", Box::new(|o| o.customer_id = "x".repeat(201))),
            (
                "shipping_address.line1",
                Box::new(|o| o.shipping_address.line1 = "Unter\0den Linden".into()),
            ),
        ];
        for (field, break_rule) in cases {
            let mut o = order();
            break_rule(&mut o);
            match o.validate() {
                Err(ContractError::InvalidField { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected InvalidField, got {other:?}"),
            }
        }
    }

    #[test]
    fn extra_fields_are_ignored_and_garbage_is_malformed() {
        let mut json = serde_json::to_value(order()).expect("serialisable");
        json["coupon"] = "SPRING".into();
        let bytes = serde_json::to_vec(&json).expect("serialisable");
        assert_eq!(OrderPlaced::from_json(&bytes), Ok(order()));
        assert!(matches!(
            OrderPlaced::from_json(b"{not json"),
            Err(ContractError::Malformed(_))
        ));
        assert!(matches!(
            OrderPlaced::from_json(br#"{"type":"OrderShipped"}"#),
            Err(ContractError::Malformed(_))
        ));
    }

    #[test]
    fn only_an_order_placed_type_is_an_order_placed() {
        let with_type = |kind: Option<&str>| {
            let mut json = serde_json::to_value(order()).expect("serialisable");
            match kind {
                Some(kind) => json["type"] = kind.into(),
                None => {
                    json.as_object_mut().expect("object").remove("type");
                }
            }
            serde_json::to_vec(&json).expect("serialisable")
        };
        assert_eq!(
            OrderPlaced::from_json(&with_type(Some("OrderPlaced"))),
            Ok(order())
        );
        for kind in [Some("OrderCancelled"), Some(""), None] {
            assert!(
                matches!(
                    OrderPlaced::from_json(&with_type(kind)),
                    Err(ContractError::Malformed(_))
                ),
                "type {kind:?} must not pass as an OrderPlaced"
            );
        }
    }
}
