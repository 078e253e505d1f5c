//! The payment's invariant: money is conserved per customer, and no order is refunded beyond
//! its charge.

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::{count, Books, Check, Checking, Databases, Invariant};

/// Whose tables these are: read from its database.
const SERVICE: &str = "payment";

/// The balance per customer when the run began.
#[derive(Default)]
pub struct Payment {
    initial: BTreeMap<String, i64>,
}

impl Invariant for Payment {
    /// The demo accounts the conservation check starts from are in.
    fn ready(&self) -> Option<&'static str> {
        Some("EXISTS (SELECT 1 FROM payment.accounts)")
    }

    fn before<'a>(&'a mut self, db: &'a Databases) -> Checking<'a, ()> {
        Box::pin(async move {
            self.initial = balances(db.of(SERVICE)).await?;
            Ok(())
        })
    }

    fn check<'a>(&'a self, books: &'a Books<'a>) -> Checking<'a, Vec<Check>> {
        Box::pin(async move {
            let db = books.db.of(SERVICE);
            Ok(vec![
                money_conserved(db, &self.initial).await?,
                refunds_within_charges(db).await?,
            ])
        })
    }
}

/// Balance per customer.
async fn balances(db: &PgPool) -> anyhow::Result<BTreeMap<String, i64>> {
    let balances: Vec<(String, i64)> =
        sqlx::query_as("SELECT customer_id, balance_cents FROM payment.accounts")
            .fetch_all(db)
            .await?;
    Ok(balances.into_iter().collect())
}

/// Per customer, what the account held at first is what it holds now and what its standing
/// charges took.
async fn money_conserved(db: &PgPool, initial: &BTreeMap<String, i64>) -> anyhow::Result<Check> {
    let now = balances(db).await?;
    // A charge still standing counts less what its returns refunded; a charge paid back (its
    // order saga undone) counts nothing, its returns' refunds included (the order's refund paid
    // back only the rest).
    let charged: Vec<(String, i64)> = sqlx::query_as(
        "SELECT p.customer_id, sum(p.amount_cents - (SELECT coalesce(sum(r.amount_cents), 0) \
                                                     FROM payment.return_refunds r \
                                                     WHERE r.order_id = p.order_id))::bigint \
         FROM payment.payments p WHERE p.status = 'charged' GROUP BY p.customer_id",
    )
    .fetch_all(db)
    .await?;
    let charged: BTreeMap<String, i64> = charged.into_iter().collect();
    let money_broken: Vec<String> = initial
        .iter()
        .filter(|(c, before)| {
            now.get(*c).copied().unwrap_or(0) + charged.get(*c).copied().unwrap_or(0) != **before
        })
        .map(|(c, _)| c.clone())
        .collect();
    Ok(Check::new(
        "money conserved: initial = balance + net charges (charges less their returns' refunds), per customer",
        money_broken.is_empty(),
        format!(
            "{} customers checked, broken: {money_broken:?}",
            initial.len()
        ),
    ))
}

/// No order's returns refunded more than it was charged, and no refund without a charge.
async fn refunds_within_charges(db: &PgPool) -> anyhow::Result<Check> {
    let over_refunded = count(
        db,
        "SELECT count(*) FROM payment.payments p \
         WHERE (SELECT coalesce(sum(r.amount_cents), 0) FROM payment.return_refunds r \
                WHERE r.order_id = p.order_id) > p.amount_cents",
    )
    .await?;
    let refunds_without_charge = count(
        db,
        "SELECT count(*) FROM payment.return_refunds r \
         WHERE NOT EXISTS (SELECT 1 FROM payment.payments p WHERE p.order_id = r.order_id)",
    )
    .await?;
    Ok(Check::new(
        "no order refunded beyond its charge",
        over_refunded == 0 && refunds_without_charge == 0,
        format!(
            "{over_refunded} orders refunded more than charged, {refunds_without_charge} refunds without a charge"
        ),
    ))
}
