//! Retention: no runtime table grows without bound. Handled-message ids (the inbox) and the
//! marks of dead-lettered records older than `INBOX_RETENTION_SECS`, and parked outbox rows
//! older than `OUTBOX_PARKED_RETENTION_SECS`, are deleted in small batches, so the sweep never
//! holds long locks; a sweep that filled any batch runs again at once, so each table is swept
//! as fast as it can fill.

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
        // A sweep cut short by the stop is rolled back and done again at the next start: the
        // stop must not wait for a database that does not answer.
        let swept = tokio::select! {
            swept = sweep() => swept,
            _ = stop.cancelled() => return,
        };
        match swept {
            Ok(deleted) if deleted >= SWEEP_BATCH as u64 => {
                if stop.is_cancelled() {
                    return;
                }
                continue;
            }
            Ok(deleted) if deleted > 0 => tracing::info!(deleted, "{what}: swept"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error.message = %crate::Chain(&e), "{what}: sweep failed; retrying later")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Deletes up to [`SWEEP_BATCH`] inbox rows, as many marks of dead-lettered records, older
/// than the inbox retention, and as many parked outbox rows older than theirs. Returns the
/// most it deleted from any one table, so that [`every`] sweeps again at once while any of
/// them had a full batch to delete (counting only the inbox's let a flood of dead letters be
/// swept 5,000 a minute).
pub async fn sweep_inbox(pool: &PgPool, config: &RetentionConfig) -> sqlx::Result<u64> {
    // Cast out here: `expr as T` among the macro's arguments would be a type override, which
    // skips checking the parameter.
    let retention_secs = config.inbox_retention_secs as f64;
    let parked_retention_secs = config.outbox_parked_retention_secs as f64;
    let deleted = sqlx::query_scalar!(
        r#"WITH dead AS (
             DELETE FROM dead_lettered WHERE ctid IN (
                 SELECT ctid FROM dead_lettered
                 WHERE dead_lettered_at < now() - make_interval(secs => $1)
                 ORDER BY dead_lettered_at LIMIT $2)
             RETURNING 1
         ), handled AS (
             DELETE FROM inbox WHERE message_id IN (
                 SELECT message_id FROM inbox
                 WHERE received_at < now() - make_interval(secs => $1)
                 ORDER BY received_at LIMIT $2)
             RETURNING 1
         ), parked AS (
             DELETE FROM outbox_parked WHERE id IN (
                 SELECT id FROM outbox_parked
                 WHERE parked_at < now() - make_interval(secs => $3)
                 ORDER BY parked_at LIMIT $2)
             RETURNING 1
         ) SELECT GREATEST((SELECT count(*) FROM dead), (SELECT count(*) FROM handled),
                           (SELECT count(*) FROM parked)) AS "deleted!""#,
        retention_secs,
        SWEEP_BATCH,
        parked_retention_secs,
    )
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(deleted).unwrap_or_default())
}
