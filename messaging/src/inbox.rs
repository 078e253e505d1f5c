//! The inbox: which messages this service has already handled.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records `message_id` in the current transaction. Returns `false` when the message was
/// handled before, in which case the caller must not act on it again; the redelivery is still
/// counted, so operators can see how many duplicates were absorbed.
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
pub async fn first_delivery(tx: &mut PgConnection, message_id: Uuid) -> sqlx::Result<bool> {
    let deliveries: i32 = sqlx::query_scalar(
        "INSERT INTO inbox (message_id) VALUES ($1) \
         ON CONFLICT (message_id) DO UPDATE SET deliveries = inbox.deliveries + 1 \
         RETURNING deliveries",
    )
    .bind(message_id)
    .fetch_one(tx)
    .await?;
    Ok(deliveries == 1)
}
