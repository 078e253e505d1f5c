//! The inbox: which messages this service has already handled.

use std::collections::HashMap;

use sqlx::PgConnection;
use uuid::Uuid;

/// Records a delivery of each of `items` in the current transaction, in one statement, and
/// keeps those that are their message's first delivery: not handled before, and not an
/// earlier item of `items` (a batch may hold a record and its redelivery). Every delivery is
/// counted; each dropped one is logged in its span. `delivery` says an item's message id and
/// the span it is handled in.
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
pub async fn keep_first_deliveries<T>(
    tx: &mut PgConnection,
    items: Vec<T>,
    delivery: impl Fn(&T) -> (Uuid, &tracing::Span),
) -> sqlx::Result<Vec<T>> {
    let message_ids: Vec<Uuid> = items.iter().map(|item| delivery(item).0).collect();
    // `fresh`: the count is the batch's own share, so no earlier batch had the message.
    let counted = sqlx::query!(
        r#"WITH batch AS (
             SELECT id, count(*)::int AS n FROM UNNEST($1::uuid[]) AS d(id) GROUP BY id
         ), counted AS (
             INSERT INTO inbox (message_id, deliveries) SELECT id, n FROM batch
             ON CONFLICT (message_id) DO UPDATE SET deliveries = inbox.deliveries + excluded.deliveries
             RETURNING message_id, deliveries
         )
         SELECT counted.message_id, counted.deliveries = batch.n AS "fresh!"
         FROM counted JOIN batch ON batch.id = counted.message_id"#,
        &message_ids
    )
    .fetch_all(tx)
    .await?;
    let mut fresh: HashMap<Uuid, bool> = counted
        .into_iter()
        .map(|row| (row.message_id, row.fresh))
        .collect();
    Ok(items
        .into_iter()
        .filter(|item| {
            let (message_id, span) = delivery(item);
            // Only the first item of a message may be its first delivery.
            let first = fresh.insert(message_id, false).unwrap_or(false);
            if !first {
                span.in_scope(|| tracing::debug!(%message_id, "redelivered message ignored"));
            }
            first
        })
        .collect())
}
