//! Retention: no runtime table grows without bound. Handled-message ids (the inbox) and the
//! marks of dead-lettered records older than `INBOX_RETENTION_SECS`, and parked outbox rows
//! older than `OUTBOX_PARKED_RETENTION_SECS`, are deleted in small batches, so the sweep never
//! holds long locks; a sweep that filled any batch runs again at once, so each table is swept
//! as fast as it can fill.
//!
//! **One instance at a time.** Every instance of a service runs the same sweeps over the same
//! tables; each sweep runs only in the instance that holds its lease (`retention_leases`, one
//! row per sweep in the service's schema: the holder and until when). The holder renews it
//! before every sweep; another instance takes it over once it has lapsed (the holder stopped,
//! crashed or lost the database), after at most [`Lease::length`], or at once when the holder
//! stopped gracefully and gave it back. Leases rather than a split by partition: these tables
//! (inbox, dead-letter marks, parked rows, finished sagas, dedup keys, idempotency keys, the
//! step ledger) are swept by age, and most have no key to split them by; one instance keeps
//! up with any of them (5,000 rows a statement, again at once while a batch was full), and two
//! deleting the same oldest rows at once only waited on each other's row locks. A sweep is an
//! idempotent delete by age, so the moment two instances might overlap (a holder paused past
//! its lease) costs only a wasted statement, never a wrong row.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::RetentionConfig;

/// How long a stopping sweep waits to give its lease back.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Rows deleted per statement.
pub const SWEEP_BATCH: i64 = 5_000;

/// Sweeps run by this instance (it held the sweep's lease), by `sweep`.
pub const SWEEPS_RUN: &str = "retention_sweeps_total";

/// The shortest lease: a sweep that takes a few seconds on a busy database does not lose it
/// to another instance halfway, even with a short sweep interval.
const LEASE_MIN: Duration = Duration::from_secs(10);

/// One sweep's lease: whoever holds it is the one instance that runs the sweep (module
/// header).
#[derive(Clone, Debug)]
pub struct Lease {
    pool: PgPool,
    sweep: String,
    /// This instance, for this sweep: a fresh id per process.
    holder: Uuid,
    length: Duration,
}

impl Lease {
    /// The lease of the sweep `sweep` (its name, unique in the service's schema), run every
    /// `interval`: it lasts three intervals, at least [`LEASE_MIN`].
    pub fn new(pool: PgPool, sweep: &str, interval: Duration) -> Self {
        Self {
            pool,
            sweep: sweep.to_owned(),
            holder: Uuid::new_v4(),
            length: (interval * 3).max(LEASE_MIN),
        }
    }

    /// How long the lease lasts after each renewal: how long the sweep can go unswept after
    /// its holder stopped without giving it back.
    pub fn length(&self) -> Duration {
        self.length
    }

    /// Takes or renews the lease; whether this instance holds it now. One statement, on the
    /// database's clock: a lease whose holder is this instance or that has lapsed becomes this
    /// instance's until now plus its length.
    ///
    /// # Errors
    /// Database errors.
    pub async fn claim(&self) -> sqlx::Result<bool> {
        let length_secs = self.length.as_secs_f64();
        let held = sqlx::query_scalar!(
            "INSERT INTO retention_leases (sweep, holder, expires_at)
             VALUES ($1, $2, now() + make_interval(secs => $3))
             ON CONFLICT (sweep) DO UPDATE
             SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE retention_leases.holder = excluded.holder
                OR retention_leases.expires_at < now()
             RETURNING holder",
            self.sweep,
            self.holder,
            length_secs,
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(held.is_some())
    }

    /// Gives the lease back if this instance holds it, so that another takes the sweep over at
    /// once. A failure is only logged: the lease then lapses by itself.
    pub async fn release(&self) {
        let released = sqlx::query!(
            "DELETE FROM retention_leases WHERE sweep = $1 AND holder = $2",
            self.sweep,
            self.holder,
        )
        .execute(&self.pool)
        .await;
        if let Err(e) = released {
            tracing::warn!(error.message = %crate::Chain(&e), sweep = %self.sweep, "cannot give the sweep's lease back; it lapses by itself");
        }
    }
}

/// Runs `sweep` every `interval` until `stop`, while this instance holds `lease` (renewed
/// before each sweep; given back at the end); a sweep that deleted a full batch runs again at
/// once. `sweep` returns how many rows it deleted.
pub async fn every<F, Fut>(
    what: &str,
    interval: Duration,
    stop: CancellationToken,
    lease: Lease,
    mut sweep: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<u64>>,
{
    let mut holding = false;
    loop {
        // The stop must not wait for a database that does not answer: a claim or a sweep cut
        // short by it is rolled back and done again at the next start.
        let claimed = tokio::select! {
            claimed = lease.claim() => claimed,
            _ = stop.cancelled() => break,
        };
        match claimed {
            Ok(held) => {
                if held != holding {
                    tracing::info!(
                        held,
                        "{what}: {}",
                        if held {
                            "this instance sweeps now"
                        } else {
                            "another instance sweeps now"
                        }
                    );
                }
                holding = held;
            }
            Err(e) => {
                tracing::warn!(error.message = %crate::Chain(&e), "{what}: cannot take the sweep's lease; retrying later");
                holding = false;
            }
        }
        if holding {
            ::metrics::counter!(SWEEPS_RUN, "sweep" => what.to_owned()).increment(1);
            let swept = tokio::select! {
                swept = sweep() => swept,
                _ = stop.cancelled() => break,
            };
            match swept {
                Ok(deleted) if deleted >= SWEEP_BATCH as u64 => {
                    if stop.is_cancelled() {
                        break;
                    }
                    continue;
                }
                Ok(deleted) if deleted > 0 => tracing::info!(deleted, "{what}: swept"),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error.message = %crate::Chain(&e), "{what}: sweep failed; retrying later")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => break,
        }
    }
    if holding {
        // Bounded too: a lease not given back lapses by itself.
        let _ = tokio::time::timeout(RELEASE_WAIT, lease.release()).await;
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
