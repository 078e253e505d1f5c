//! The inbox: which messages this service has already handled.

use sqlx::PgConnection;
use uuid::Uuid;

/// The statement that records a delivery of message `$1` and returns how many there were
/// (1 the first time). Handlers may run it as a CTE of their first statement, to save a round
/// trip; [`first_delivery`] runs it alone.
pub const RECORD_DELIVERY: &str = "INSERT INTO inbox (message_id) VALUES ($1) \
     ON CONFLICT (message_id) DO UPDATE SET deliveries = inbox.deliveries + 1 \
     RETURNING deliveries";

/// Records `message_id` in the current transaction. Returns `false` when the message was
/// handled before, in which case the caller must not act on it again; the redelivery is still
/// counted, so operators can see how many duplicates were absorbed.
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
pub async fn first_delivery(tx: &mut PgConnection, message_id: Uuid) -> sqlx::Result<bool> {
    let deliveries: i32 = sqlx::query_scalar(RECORD_DELIVERY)
        .bind(message_id)
        .fetch_one(tx)
        .await?;
    Ok(deliveries == 1)
}

/// Records a delivery of each of `message_ids` (distinct) in the current transaction, in one
/// statement, and returns how many deliveries each has had, in the same order (1 the first
/// time).
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
pub async fn record_deliveries(
    tx: &mut PgConnection,
    message_ids: &[Uuid],
) -> sqlx::Result<Vec<i32>> {
    let counted: Vec<(Uuid, i32)> = sqlx::query_as(
        "INSERT INTO inbox (message_id) SELECT * FROM UNNEST($1::uuid[]) \
         ON CONFLICT (message_id) DO UPDATE SET deliveries = inbox.deliveries + 1 \
         RETURNING message_id, deliveries",
    )
    .bind(message_ids)
    .fetch_all(tx)
    .await?;
    let counted: std::collections::HashMap<Uuid, i32> = counted.into_iter().collect();
    Ok(message_ids
        .iter()
        .map(|id| counted.get(id).copied().unwrap_or(1))
        .collect())
}
