//! Bounded values for the payloads of commands, checked while a payload decodes (serde's
//! `try_from`): a participant's step never sees a negative quantity or amount, a blank SKU or a
//! made-up currency, whoever wrote the command. A command whose payload breaks one is
//! dead-lettered with the field and the reason, like any message that breaks the contract.
//!
//! The bounds are the triggers' own (`OrderPlaced`, `ReturnRequested`), so every command the
//! engine maps from a valid trigger fits them.

use serde::{Deserialize, Serialize};

use crate::order::{check_currency, check_line, MAX_ITEMS, MAX_QUANTITY, MAX_UNIT_PRICE_CENTS};
use crate::ContractError;

/// One line of an order or a return as a step needs it: a SKU (text, not blank, without
/// control characters) and a quantity of 1 to 1,000,000. Other fields of the line are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LineFields")]
pub struct Line {
    sku: String,
    quantity: i32,
}

#[derive(Deserialize)]
struct LineFields {
    sku: String,
    quantity: i32,
}

impl TryFrom<LineFields> for Line {
    type Error = ContractError;

    fn try_from(fields: LineFields) -> Result<Self, Self::Error> {
        check_line(&fields.sku, fields.quantity)?;
        Ok(Self {
            sku: fields.sku,
            quantity: fields.quantity,
        })
    }
}

impl Line {
    pub fn sku(&self) -> &str {
        &self.sku
    }

    /// At least 1.
    pub fn quantity(&self) -> i32 {
        self.quantity
    }
}

/// An amount of money in cents: 0 up to the largest order total the contract allows (every
/// line at its largest quantity and price), so sums of a few never overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Cents(i64);

impl Cents {
    pub const MAX: i64 = MAX_ITEMS as i64 * MAX_QUANTITY as i64 * MAX_UNIT_PRICE_CENTS;

    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Cents {
    type Error = ContractError;

    fn try_from(cents: i64) -> Result<Self, Self::Error> {
        if (0..=Self::MAX).contains(&cents) {
            Ok(Self(cents))
        } else {
            Err(ContractError::invalid(
                "amount",
                format!("cents must be between 0 and {}, got {cents}", Self::MAX),
            ))
        }
    }
}

impl From<Cents> for i64 {
    fn from(cents: Cents) -> Self {
        cents.0
    }
}

/// An ISO 4217 currency code: three upper-case letters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl Currency {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Currency {
    type Error = ContractError;

    fn try_from(code: String) -> Result<Self, Self::Error> {
        check_currency(&code)?;
        Ok(Self(code))
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> Self {
        currency.0
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{Cents, Currency, Line};

    #[test]
    fn lines_take_a_sku_and_a_positive_bounded_quantity() {
        let line: Line =
            serde_json::from_value(json!({"sku": "WIDGET", "quantity": 2, "unit_price_cents": 5}))
                .expect("a line");
        assert_eq!((line.sku(), line.quantity()), ("WIDGET", 2));
        for (bad, field) in [
            (json!({"sku": "WIDGET", "quantity": 0}), "items[].quantity"),
            (json!({"sku": "WIDGET", "quantity": -3}), "items[].quantity"),
            (
                json!({"sku": "WIDGET", "quantity": 1_000_001}),
                "items[].quantity",
            ),
            (json!({"sku": " ", "quantity": 1}), "items[].sku"),
            (json!({"sku": "A\u{0}B", "quantity": 1}), "items[].sku"),
        ] {
            let error = serde_json::from_value::<Line>(bad.clone()).expect_err("refused");
            assert!(error.to_string().contains(field), "{bad}: {error}");
        }
    }

    #[test]
    fn amounts_are_never_negative_nor_past_the_largest_order() {
        let cents: Cents = serde_json::from_value(json!(0)).expect("zero");
        assert_eq!(cents.get(), 0);
        assert_eq!(serde_json::to_value(cents).expect("serialises"), json!(0));
        let largest: Cents = serde_json::from_value(json!(Cents::MAX)).expect("largest");
        assert_eq!(largest.get(), 100_000_000_000_000_000);
        for bad in [
            json!(-1),
            json!(Cents::MAX + 1),
            json!(i64::MIN),
            json!(1.5),
        ] {
            assert!(
                serde_json::from_value::<Cents>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn currencies_are_iso_codes() {
        let euro: Currency = serde_json::from_value(json!("EUR")).expect("EUR");
        assert_eq!(euro.as_str(), "EUR");
        for bad in [json!("eur"), json!("EURO"), json!(""), json!(978)] {
            assert!(
                serde_json::from_value::<Currency>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
