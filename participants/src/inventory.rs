//! Inventory: reserves stock for an order (all lines or none) and releases it.

use std::collections::BTreeMap;

use events::{Command, Participant};
use messaging::consumer::HandlerError;
use messaging::db::column;
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

    /// All reservations of a batch in four statements: lock every SKU they name, check and
    /// take stock in memory in the commands' order, then write the stock, the reservations
    /// and their lines.
    async fn forward_all(
        &self,
        tx: &mut PgConnection,
        commands: &[(Uuid, &Command)],
    ) -> Result<Vec<StepOutcome>, HandlerError> {
        let mut requests = Vec::with_capacity(commands.len());
        for (saga_id, command) in commands {
            let Command::ReserveStock {
                order_id, items, ..
            } = command
            else {
                return Err(unexpected(command));
            };
            let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
            for item in items {
                *wanted.entry(item.sku.as_str()).or_default() += i64::from(item.quantity);
            }
            requests.push((*saga_id, *order_id, wanted));
        }
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
                    None => Some(format!("unknown SKU {sku}")),
                    Some(have) if have < quantity => Some(format!(
                        "insufficient stock for {sku}: {quantity} requested, {have} available"
                    )),
                    Some(_) => None,
                });
            if let Some(reason) = refusal {
                outcomes.push(StepOutcome::Refused(reason));
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
            outcomes.push(StepOutcome::Done);
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
