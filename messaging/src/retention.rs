//! Retention: handled-message ids (the inbox) do not grow without bound. Rows older than
//! `INBOX_RETENTION_SECS` are deleted in small batches, so the sweep never holds long locks.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionConfig;

/// Rows deleted per statement.
pub const SWEEP_BATCH: i64 = 5_000;

/// Runs `sweep` every `interval` until `stop`; a sweep that deleted a full batch runs again at
/// once. `sweep` returns how many rows it deleted.
pub async fn every<F, Fut>(what: &str, interval: Duration, stop: CancellationToken, mut sweep: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<u64>>,
{
    loop {
        match sweep().await {
            Ok(deleted) if deleted >= SWEEP_BATCH as u64 => {
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            Ok(deleted) if deleted > 0 => tracing::info!(deleted, "{what}: swept"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error.message = %e, "{what}: sweep failed; retrying later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Deletes up to [`SWEEP_BATCH`] inbox rows, and as many marks of dead-lettered records, older
/// than the retention.
pub async fn sweep_inbox(pool: &PgPool, config: &RetentionConfig) -> sqlx::Result<u64> {
    // Cast out here: `expr as T` among the macro's arguments would be a type override, which
    // skips checking the parameter.
    let retention_secs = config.inbox_retention_secs as f64;
    let deleted = sqlx::query!(
        "WITH dead AS (
             DELETE FROM dead_lettered WHERE ctid IN (
                 SELECT ctid FROM dead_lettered
                 WHERE dead_lettered_at < now() - make_interval(secs => $1) LIMIT $2))
         DELETE FROM inbox WHERE message_id IN (
             SELECT message_id FROM inbox
             WHERE received_at < now() - make_interval(secs => $1)
             ORDER BY received_at LIMIT $2)",
        retention_secs,
        SWEEP_BATCH,
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(deleted)
}
