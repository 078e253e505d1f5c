//! The returns participant's part: the return saga's invariant reads its returns, so the run
//! waits for its tables.

use super::{Books, Check, Checking, Invariant};

pub struct Returns;

impl Invariant for Returns {
    fn ready(&self) -> Option<&'static str> {
        Some("to_regclass('returns.return_lines') IS NOT NULL")
    }

    fn check<'a>(&'a self, _books: &'a Books<'a>) -> Checking<'a, Vec<Check>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}
