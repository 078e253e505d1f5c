//! The deadline scanner: finds sagas whose reply is overdue and lets the state machine decide
//! (send the command again with the next attempt, or give up on the step).
//!
//! Deadlines live in the `sagas` table, so they survive restarts: a new orchestrator picks up
//! every overdue saga on its first scan. Several instances can scan at once: rows are claimed
//! with `FOR UPDATE SKIP LOCKED`, and every update checks the saga's version.

use std::time::Duration;

use events::Topics;
use rand::Rng;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use messaging::outbox::{Outbox, Wake};
use tracing::Instrument;

use crate::catalog::Catalog;
use crate::handler::{commit_decision, definition_of, join_saga_trace};
use crate::store::{self, HistoryDecision, HistoryEntry};
use crate::Result;

/// Sagas handled per scan transaction.
const BATCH: i64 = 64;
/// How often this instance's clock is compared with the database's.
const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(60);
/// A skew beyond which the comparison is logged as a warning.
const CLOCK_SKEW_WARN_SECS: f64 = 1.0;

pub struct DeadlineScanner {
    pub pool: PgPool,
    pub topics: Topics,
    pub catalog: std::sync::Arc<Catalog>,
    pub interval: Duration,
    /// This instance's clock, only compared with the database's
    /// ([`crate::metrics::CLOCK_SKEW`]): deadlines are written and found due on the
    /// database's.
    pub clock: crate::clock::Clock,
    /// Told when a scan fails (the database refuses it: read-only, say, while no record
    /// arrives to tell the consume loop) and when one works again, for `/healthz`.
    pub health: messaging::health::Health,
    /// The longest wait for one scan (`DATABASE_CALL_TIMEOUT_MS`): a scan the database does
    /// not answer is abandoned and counts as failed, and the stop does not wait for it.
    pub call_timeout: Duration,
}

impl DeadlineScanner {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut clock_checked: Option<std::time::Instant> = None;
        loop {
            if clock_checked.is_none_or(|at| at.elapsed() >= CLOCK_CHECK_EVERY) {
                clock_checked = Some(std::time::Instant::now());
                let checked = tokio::time::timeout(self.call_timeout, self.check_clock());
                tokio::select! {
                    _ = checked => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            let scan = tokio::time::timeout(self.call_timeout, self.fire_due());
            let scanned = tokio::select! {
                scanned = scan => scanned.unwrap_or_else(|_| {
                    let limit = self.call_timeout;
                    Err(messaging::Error::from(messaging::db::DeadlineExceeded { limit }).into())
                }),
                _ = shutdown.cancelled() => return,
            };
            match scanned {
                Ok(fired) => {
                    self.health.database_well();
                    if fired >= BATCH {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(error.message = %messaging::Chain(&e), "deadline scan failed; retrying");
                    self.health.database_unwell(&format!(
                        "the deadline scan failed: {}",
                        messaging::chain(&e)
                    ));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Says how far this instance's clock is from the database's (a gauge, and a warning
    /// beyond a second). Nothing depends on it: a skewed instance reckons no deadline wrong.
    async fn check_clock(&self) {
        match store::database_now(&self.pool).await {
            Ok(database) => {
                let skew = (self.clock.now() - database).num_milliseconds() as f64 / 1000.0;
                crate::metrics::clock_skew(skew);
                if skew.abs() > CLOCK_SKEW_WARN_SECS {
                    tracing::warn!(
                        skew_secs = skew,
                        "this instance's clock is off from the database's; saga deadlines and \
                         times follow the database's"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error.message = %messaging::Chain(&e), "cannot read the database's clock")
            }
        }
    }

    /// Handles one batch of overdue sagas (due by the database's clock) in one transaction;
    /// returns how many it handled.
    async fn fire_due(&self) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let store::Locked { sagas: due, now } = store::lock_due(&mut tx, BATCH).await?;
        let mut outbox = Outbox::default();
        for (saga, version) in &due {
            // A saga was locked, so its statement read the database's time.
            let Some(now) = now else { break };
            let definition = match definition_of(&self.catalog, &mut tx, saga).await? {
                Ok(definition) => definition,
                // Nothing could move this saga: parked, so that it stops no other deadline.
                Err(e) => {
                    store::park_unreadable(&mut tx, saga.id, &e).await?;
                    continue;
                }
            };
            let jitter = rand::thread_rng().gen_range(0.0..1.0);
            let decision = saga.on_deadline(now, jitter, &definition);
            let entry = HistoryEntry {
                at: now,
                message_id: None,
                message_type: "Deadline".into(),
                decision: HistoryDecision::Deadline,
                detail: saga.deadline_at.map(|d| format!("deadline {d} passed")),
                // Set to the state the decision leaves (`commit_decision`).
                state_after: saga.state,
            };
            let span = tracing::info_span!("deadline", saga_id = %saga.id);
            join_saga_trace(&mut tx, &span, saga.id).await?;
            commit_decision(
                &self.topics,
                &mut tx,
                &mut outbox,
                saga,
                *version,
                decision,
                entry,
            )
            .instrument(span)
            .await?;
        }
        outbox.write(&mut tx, Wake::Notify).await?;
        tx.commit().await?;
        Ok(i64::try_from(due.len()).unwrap_or(BATCH))
    }
}
