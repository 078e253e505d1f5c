//! Inventory: reserves stock for an order (all lines or none) and releases it. It serves the
//! order saga's `reserve_stock` step.

use std::collections::BTreeMap;
use std::fmt;

use events::LineItem;
use messaging::consumer::HandlerError;
use messaging::db::column;
use serde::Deserialize;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::sdk::{Participant, Request, Step};

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/inventory");

/// The inventory participant: its tables and its one step.
pub fn participant() -> Participant {
    Participant::new("inventory", &MIGRATIONS)
        .metrics_port(9181)
        .step(ReserveStock)
}

/// `reserve_stock`: takes every line of an order from stock, or none.
pub struct ReserveStock;

/// What `ReserveStock` carries.
#[derive(Debug, Deserialize)]
pub struct Reservation {
    pub order_id: Uuid,
    pub items: Vec<LineItem>,
}

/// What `ReleaseStock` carries.
#[derive(Debug, Deserialize)]
pub struct Release {
    pub order_id: Uuid,
}

/// Why stock was not reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockRefusal {
    UnknownSku(String),
    Insufficient {
        sku: String,
        requested: i64,
        available: i64,
    },
}

impl fmt::Display for StockRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownSku(sku) => write!(f, "unknown SKU {sku}"),
            Self::Insufficient {
                sku,
                requested,
                available,
            } => write!(
                f,
                "insufficient stock for {sku}: {requested} requested, {available} available"
            ),
        }
    }
}

impl Step for ReserveStock {
    const STEP: &'static str = "reserve_stock";
    type Forward = Reservation;
    type Compensation = Release;
    type Failure = StockRefusal;

    /// All reservations of a batch in four statements: lock every SKU they name, check and
    /// take stock in memory in the commands' order, then write the stock, the reservations
    /// and their lines.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        requests: &[Request<'_, Reservation>],
    ) -> Result<Vec<Result<(), StockRefusal>>, HandlerError> {
        let requests: Vec<(Uuid, Uuid, BTreeMap<&str, i64>)> = requests
            .iter()
            .map(|request| {
                let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
                for item in &request.payload.items {
                    *wanted.entry(item.sku.as_str()).or_default() += i64::from(item.quantity);
                }
                (request.saga_id, request.payload.order_id, wanted)
            })
            .collect();
        let skus: Vec<String> = requests
            .iter()
            .flat_map(|(_, _, wanted)| wanted.keys().map(|sku| (*sku).to_owned()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "SELECT sku, available FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
        )
        .bind(&skus)
        .fetch_all(&mut *tx)
        .await?;
        let mut available: BTreeMap<String, i64> = rows
            .into_iter()
            .map(|(sku, n)| (sku, i64::from(n)))
            .collect();
        let mut outcomes = Vec::with_capacity(requests.len());
        let mut reservations: Vec<(Uuid, Uuid)> = Vec::new();
        let mut lines: Vec<(Uuid, String, i32)> = Vec::new();
        for (saga_id, order_id, wanted) in &requests {
            let refusal = wanted
                .iter()
                .find_map(|(sku, quantity)| match available.get(*sku) {
                    None => Some(StockRefusal::UnknownSku((*sku).to_owned())),
                    Some(have) if have < quantity => Some(StockRefusal::Insufficient {
                        sku: (*sku).to_owned(),
                        requested: *quantity,
                        available: *have,
                    }),
                    Some(_) => None,
                });
            if let Some(refusal) = refusal {
                outcomes.push(Err(refusal));
                continue;
            }
            for (sku, quantity) in wanted {
                if let Some(have) = available.get_mut(*sku) {
                    *have -= quantity;
                }
                let quantity = i32::try_from(*quantity).unwrap_or(i32::MAX);
                lines.push((*order_id, (*sku).to_owned(), quantity));
            }
            reservations.push((*order_id, *saga_id));
            outcomes.push(Ok(()));
        }
        if reservations.is_empty() {
            return Ok(outcomes);
        }
        // The rows are locked: what is left of each SKU can be written as it stands.
        let (left_skus, left): (Vec<&String>, Vec<i32>) = available
            .iter()
            .map(|(sku, n)| (sku, i32::try_from(*n).unwrap_or(i32::MAX)))
            .unzip();
        sqlx::query(
            "UPDATE stock SET available = left_over.available \
             FROM UNNEST($1::text[], $2::int[]) AS left_over (sku, available) \
             WHERE stock.sku = left_over.sku AND stock.available <> left_over.available",
        )
        .bind(left_skus)
        .bind(left)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO reservations (order_id, saga_id, status) \
             SELECT order_id, saga_id, 'reserved' FROM UNNEST($1::uuid[], $2::uuid[]) \
                  AS r (order_id, saga_id)",
        )
        .bind(column(&reservations, |r| r.0))
        .bind(column(&reservations, |r| r.1))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO reservation_lines (order_id, sku, quantity) \
             SELECT order_id, sku, quantity FROM UNNEST($1::uuid[], $2::text[], $3::int[]) \
                  AS l (order_id, sku, quantity)",
        )
        .bind(column(&lines, |l| l.0))
        .bind(column(&lines, |l| l.1.as_str()))
        .bind(column(&lines, |l| l.2))
        .execute(&mut *tx)
        .await?;
        Ok(outcomes)
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        request: Request<'_, Release>,
    ) -> Result<Result<(), StockRefusal>, HandlerError> {
        let order_id = request.payload.order_id;
        let released = sqlx::query(
            "UPDATE reservations SET status = 'released', released_at = now() \
             WHERE order_id = $1 AND status = 'reserved'",
        )
        .bind(order_id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if released == 1 {
            sqlx::query(
                "UPDATE stock SET available = available + l.quantity \
                 FROM reservation_lines l WHERE l.order_id = $1 AND stock.sku = l.sku",
            )
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        }
        // Nothing reserved (the reservation never happened here): nothing to release.
        Ok(Ok(()))
    }
}
