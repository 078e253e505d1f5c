//! The inventory's invariant: stock is conserved across orders and their returns.

use std::collections::BTreeMap;

use sqlx::PgPool;

use super::{count, Books, Check, Checking, Databases, Invariant};

/// Whose tables these are: read from its database.
const SERVICE: &str = "inventory";

/// The stock per SKU when the run began.
#[derive(Default)]
pub struct Inventory {
    initial: BTreeMap<String, i64>,
}

impl Invariant for Inventory {
    /// The demo stock the conservation check starts from is in.
    fn ready(&self) -> Option<&'static str> {
        Some("EXISTS (SELECT 1 FROM inventory.stock)")
    }

    fn before<'a>(&'a mut self, db: &'a Databases) -> Checking<'a, ()> {
        Box::pin(async move {
            self.initial = stock(db.of(SERVICE)).await?;
            Ok(())
        })
    }

    fn check<'a>(&'a self, books: &'a Books<'a>) -> Checking<'a, Vec<Check>> {
        Box::pin(async move {
            let db = books.db.of(SERVICE);
            let now = stock(db).await?;
            Ok(vec![stock_conserved(db, &self.initial, &now).await?])
        })
    }
}

/// Stock per SKU.
async fn stock(db: &PgPool) -> anyhow::Result<BTreeMap<String, i64>> {
    let stock: Vec<(String, i64)> =
        sqlx::query_as("SELECT sku, available::bigint FROM inventory.stock")
            .fetch_all(db)
            .await?;
    Ok(stock.into_iter().collect())
}

/// Stock conservation across orders and their returns, per SKU. What an order keeps of a SKU
/// is what it reserved, less what its release gave back, less what its returns put back and
/// did not undo; it is never below 0, and 0 once the reservation is released (an order undone
/// keeps nothing, whatever its returns did). Stock moves only by orders and returns, so per SKU
/// `current = initial − Σ what each order keeps (+ restocks naming no order, from before
/// inventory migration 1003)`: never above where it started, however many returns, over-returns
/// and returns of undone orders came. A standing restock of a SKU its order did not take breaks
/// it too.
async fn stock_conserved(
    db: &PgPool,
    initial: &BTreeMap<String, i64>,
    now: &BTreeMap<String, i64>,
) -> anyhow::Result<Check> {
    // Per SKU: what orders keep, how many (order, SKU) keep less than 0 or, released, not 0.
    let kept: Vec<(String, i64, i64)> = sqlx::query_as(
        "WITH back AS (SELECT r.order_id, l.sku, sum(l.quantity) AS quantity \
                       FROM inventory.restocks r JOIN inventory.restock_lines l USING (return_id) \
                       WHERE r.status = 'restocked' AND r.order_id IS NOT NULL GROUP BY 1, 2), \
              kept AS (SELECT l.sku, s.status, \
                              l.quantity - l.released - coalesce(b.quantity, 0) AS kept \
                       FROM inventory.reservation_lines l \
                       JOIN inventory.reservations s USING (order_id) \
                       LEFT JOIN back b USING (order_id, sku)) \
         SELECT sku, sum(kept)::bigint, \
                count(*) FILTER (WHERE kept < 0 OR (status = 'released' AND kept <> 0)) \
         FROM kept GROUP BY sku",
    )
    .fetch_all(db)
    .await?;
    let beyond_order = count(
        db,
        "SELECT count(*) FROM inventory.restocks r JOIN inventory.restock_lines l USING (return_id) \
         WHERE r.status = 'restocked' AND r.order_id IS NOT NULL AND NOT EXISTS ( \
             SELECT 1 FROM inventory.reservation_lines o \
             WHERE o.order_id = r.order_id AND o.sku = l.sku)",
    )
    .await?;
    let unbound: Vec<(String, i64)> = sqlx::query_as(
        "SELECT l.sku, sum(l.quantity)::bigint FROM inventory.restocks r \
         JOIN inventory.restock_lines l USING (return_id) \
         WHERE r.status = 'restocked' AND r.order_id IS NULL GROUP BY l.sku",
    )
    .fetch_all(db)
    .await?;
    let unbound: BTreeMap<String, i64> = unbound.into_iter().collect();
    let over_kept: i64 = kept.iter().map(|(_, _, bad)| bad).sum();
    let kept: BTreeMap<String, i64> = kept.into_iter().map(|(sku, k, _)| (sku, k)).collect();
    let broken: Vec<String> = initial
        .iter()
        .filter(|(sku, before)| {
            let expected = **before - kept.get(*sku).copied().unwrap_or(0)
                + unbound.get(*sku).copied().unwrap_or(0);
            now.get(*sku).copied().unwrap_or(0) != expected
        })
        .map(|(sku, _)| sku.clone())
        .collect();
    Ok(Check::new(
        "stock conserved: current = initial − what orders keep (reserved − released − returned, ≥ 0, 0 once released), per SKU",
        broken.is_empty() && over_kept == 0 && beyond_order == 0,
        format!(
            "{} SKUs checked, broken: {broken:?}; {over_kept} (order, SKU) returned beyond what was taken or kept after a release; {beyond_order} restocked lines of a SKU the order did not take",
            initial.len()
        ),
    ))
}
