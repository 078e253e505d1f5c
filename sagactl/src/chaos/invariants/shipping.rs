//! The shipping participant's part: the order saga's invariant reads its shipments, so the
//! run waits for its tables.

use super::{Books, Check, Checking, Invariant};

pub struct Shipping;

impl Invariant for Shipping {
    fn ready(&self) -> Option<&'static str> {
        Some("to_regclass('shipping.shipments') IS NOT NULL")
    }

    fn check<'a>(&'a self, _books: &'a Books<'a>) -> Checking<'a, Vec<Check>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}
