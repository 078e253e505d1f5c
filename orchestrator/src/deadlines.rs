//! The deadline scanner: finds sagas whose reply is overdue and lets the state machine decide
//! (send the command again with the next attempt, or give up on the step).
//!
//! Deadlines live in the `sagas` table, so they survive restarts: a new orchestrator picks up
//! every overdue saga on its first scan. Several instances can scan at once: rows are claimed
//! with `FOR UPDATE SKIP LOCKED`, and every update checks the saga's version.

use std::time::Duration;

use chrono::Utc;
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

pub struct DeadlineScanner {
    pub pool: PgPool,
    pub topics: Topics,
    pub catalog: std::sync::Arc<Catalog>,
    pub interval: Duration,
}

impl DeadlineScanner {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            match self.fire_due().await {
                Ok(fired) if fired >= BATCH => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error.message = %e, "deadline scan failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Handles one batch of overdue sagas in one transaction; returns how many it handled.
    async fn fire_due(&self) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let now = Utc::now();
        let due = store::lock_due(&mut tx, now, BATCH).await?;
        let mut outbox = Outbox::default();
        for (saga, version) in &due {
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
