//! The inbox: which messages this service has already handled.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records a delivery of each of `message_ids` in the current transaction, in one statement,
/// and returns, for each, whether it is the message's first delivery: not handled before, and
/// not an earlier entry of `message_ids` (a batch may hold a record and its redelivery). Every
/// delivery is counted.
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
pub async fn record_deliveries(
    tx: &mut PgConnection,
    message_ids: &[Uuid],
) -> sqlx::Result<Vec<bool>> {
    let counted: Vec<(Uuid, i32)> = sqlx::query_as(
        "INSERT INTO inbox (message_id, deliveries) \
         SELECT id, count(*) FROM UNNEST($1::uuid[]) AS d(id) GROUP BY id \
         ON CONFLICT (message_id) DO UPDATE SET deliveries = inbox.deliveries + excluded.deliveries \
         RETURNING message_id, deliveries",
    )
    .bind(message_ids)
    .fetch_all(tx)
    .await?;
    let mut in_batch: std::collections::HashMap<Uuid, i32> = std::collections::HashMap::new();
    for id in message_ids {
        *in_batch.entry(*id).or_default() += 1;
    }
    // Handled before this batch exactly when the count is more than the batch's share.
    let mut fresh: std::collections::HashMap<Uuid, bool> = counted
        .into_iter()
        .map(|(id, total)| (id, Some(&total) == in_batch.get(&id)))
        .collect();
    Ok(message_ids
        .iter()
        .map(|id| fresh.insert(*id, false).unwrap_or(false))
        .collect())
}
