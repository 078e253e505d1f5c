//! The inbox: which messages this service has already handled.

use sqlx::PgConnection;
use uuid::Uuid;

/// Records `message_id` in the current transaction. Returns `false` when the message was
/// handled before, in which case the caller must not act on it again.
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
pub async fn first_delivery(tx: &mut PgConnection, message_id: Uuid) -> sqlx::Result<bool> {
    let inserted = sqlx::query("INSERT INTO inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(message_id)
        .execute(tx)
        .await?
        .rows_affected();
    Ok(inserted == 1)
}
