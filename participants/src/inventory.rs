//! Inventory: reserves stock for an order (all lines or none) and releases it.

use std::collections::BTreeMap;

use events::{Command, Participant};
use messaging::consumer::HandlerError;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{StepOutcome, StepService};

static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/inventory");

pub struct Inventory;

impl StepService for Inventory {
    const PARTICIPANT: Participant = Participant::Inventory;

    fn migrations() -> &'static Migrator {
        &MIGRATIONS
    }

    async fn forward(
        &self,
        tx: &mut PgConnection,
        saga_id: Uuid,
        command: &Command,
    ) -> Result<StepOutcome, HandlerError> {
        let Command::ReserveStock {
            order_id, items, ..
        } = command
        else {
            return Err(unexpected(command));
        };
        // One line per SKU, in SKU order: rows are locked in the same order by every
        // transaction, so two reservations cannot deadlock.
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for item in items {
            *wanted.entry(item.sku.as_str()).or_default() += i64::from(item.quantity);
        }
        let skus: Vec<String> = wanted.keys().map(|s| (*s).to_owned()).collect();
        let rows: Vec<(String, i32)> = sqlx::query_as(
            "SELECT sku, available FROM stock WHERE sku = ANY($1) ORDER BY sku FOR UPDATE",
        )
        .bind(&skus)
        .fetch_all(&mut *tx)
        .await?;
        let available: BTreeMap<&str, i64> = rows
            .iter()
            .map(|(sku, n)| (sku.as_str(), i64::from(*n)))
            .collect();
        for (sku, quantity) in &wanted {
            match available.get(sku) {
                None => return Ok(StepOutcome::Refused(format!("unknown SKU {sku}"))),
                Some(have) if have < quantity => {
                    return Ok(StepOutcome::Refused(format!(
                        "insufficient stock for {sku}: {quantity} requested, {have} available"
                    )))
                }
                Some(_) => {}
            }
        }
        let quantities: Vec<i32> = wanted
            .values()
            .map(|q| i32::try_from(*q).unwrap_or(i32::MAX))
            .collect();
        sqlx::query(
            "UPDATE stock SET available = available - wanted.quantity \
             FROM UNNEST($1::text[], $2::int[]) AS wanted (sku, quantity) \
             WHERE stock.sku = wanted.sku",
        )
        .bind(&skus)
        .bind(&quantities)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO reservations (order_id, saga_id, status) VALUES ($1, $2, 'reserved')",
        )
        .bind(order_id)
        .bind(saga_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO reservation_lines (order_id, sku, quantity) \
             SELECT $1, sku, quantity FROM UNNEST($2::text[], $3::int[]) AS l (sku, quantity)",
        )
        .bind(order_id)
        .bind(&skus)
        .bind(&quantities)
        .execute(&mut *tx)
        .await?;
        Ok(StepOutcome::Done)
    }

    async fn compensate(
        &self,
        tx: &mut PgConnection,
        _saga_id: Uuid,
        command: &Command,
    ) -> Result<StepOutcome, HandlerError> {
        let Command::ReleaseStock { order_id, .. } = command else {
            return Err(unexpected(command));
        };
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
        Ok(StepOutcome::Done)
    }
}

/// The runtime only routes this service's own commands here; anything else is a bug upstream.
pub(crate) fn unexpected(command: &Command) -> HandlerError {
    HandlerError::Reject(format!("unexpected command {}", command.type_name()))
}
