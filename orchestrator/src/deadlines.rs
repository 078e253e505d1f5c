//! The deadline scanner: finds sagas whose reply is overdue and lets the state machine decide
//! (send the command again with the next attempt, or give up on the step).
//!
//! Deadlines live in the `sagas` table, so they survive restarts: a new orchestrator picks up
//! every overdue saga on its first scan.
//!
//! **The work is shared by partition**, as the consume loop shares the replies: an instance
//! scans only the sagas whose partition of `saga.replies` its consumer holds now (a saga's
//! `key_hash`, the producers' murmur2 of its key, modulo that topic's partition count, read
//! from the cluster's metadata after every rebalance and every few minutes). The replies
//! topic decides because a reply is the other thing that moves a running saga: the instance
//! that takes a saga's replies also fires its deadlines, whatever partition count the trigger
//! topics have. The consumer's rebalance callbacks keep the assignment
//! ([`messaging::assignment`]): partitions being revoked, or lost when this instance was cut
//! off from the brokers long enough for its session to lapse, leave the share before
//! librdkafka gives them up, and a consumer that ended holds none. During a rebalance a
//! partition may have no scanner for a moment; its deadlines then fire a little late, never
//! twice. Sagas stored before the split (no `key_hash`) are every instance's, as before.
//!
//! The split saves the work; it is not what keeps a saga from being decided twice. Rows are
//! claimed with `FOR UPDATE SKIP LOCKED` and every update checks the saga's version (a
//! refused write is counted: [`crate::metrics::STALE_WRITES_REFUSED`]), so an instance that
//! still scans a partition it has just lost cannot undo what the new owner decided.

use std::time::{Duration, Instant};

use events::Topics;
use messaging::assignment::Owned;
use messaging::config::KafkaConfig;
use rand::Rng;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use messaging::db::KeptConnection;
use tracing::Instrument;

use crate::backlog::Backlogs;
use crate::catalog::Catalog;
use crate::handler::{commit_decision, definition_of, join_saga_trace};
use crate::saga::{Saga, SagaDefinition, SagaState};
use crate::store::{self, HistoryDecision, HistoryEntry, Share};
use crate::Result;

/// Sagas handled per scan transaction.
const BATCH: i64 = 64;
/// How often this instance's clock is compared with the database's.
const CLOCK_CHECK_EVERY: Duration = Duration::from_secs(60);
/// A skew beyond which the comparison is logged as a warning.
const CLOCK_SKEW_WARN_SECS: f64 = 1.0;
/// How often the partition count of the topic the scanner shares by is read again when no
/// rebalance said so (a topic given more partitions rebalances the group anyway).
const PARTITION_COUNT_EVERY: Duration = Duration::from_secs(300);

/// Which sagas this instance scans: those of the partitions of `topic` its consumer holds.
pub struct Ownership {
    /// The consumer's assignment ([`messaging::pipeline::Pipeline::assignment`]).
    assignment: watch::Receiver<Owned>,
    /// The topic the work is shared by: `saga.replies`.
    topic: String,
    /// Where the topic's partition count is read.
    kafka: KafkaConfig,
    /// The partition count last read, and when.
    partitions: Option<(i32, Instant)>,
}

impl Ownership {
    /// The share of the consumer whose assignment `assignment` follows, by `topic`'s
    /// partitions (their count read through `kafka`).
    pub fn new(assignment: watch::Receiver<Owned>, topic: String, kafka: KafkaConfig) -> Self {
        Self {
            assignment,
            topic,
            kafka,
            partitions: None,
        }
    }

    /// The share to scan now: `None` while the consumer holds no partition of the topic, or
    /// its partition count was never read (the brokers unreachable since the start).
    async fn share(&mut self) -> Option<Share> {
        let rebalanced = self.assignment.has_changed().unwrap_or(false);
        let owned = self
            .assignment
            .borrow_and_update()
            .partitions_of(&self.topic);
        let count_stale = self
            .partitions
            .is_none_or(|(_, at)| at.elapsed() >= PARTITION_COUNT_EVERY);
        if !owned.is_empty() && (rebalanced || count_stale) {
            match messaging::kafka::partition_count(&self.kafka, &self.topic).await {
                Ok(count) => {
                    if self.partitions.map(|(known, _)| known) != Some(count) {
                        tracing::info!(topic = %self.topic, partitions = count, "the deadline scanner shares by this topic's partitions");
                    }
                    self.partitions = Some((count, Instant::now()));
                }
                // The count last read stays (a partition count only grows); without one, no
                // scan until it can be read.
                Err(e) => {
                    tracing::warn!(error.message = %messaging::Chain(&e), topic = %self.topic, "cannot read the partition count; the deadline scanner keeps the last one")
                }
            }
        }
        if rebalanced {
            tracing::info!(partitions = ?owned, topic = %self.topic, "the deadline scanner's share changed");
        }
        let scanned = match self.partitions {
            Some(_) => owned.len(),
            None => 0,
        };
        metrics::gauge!(crate::metrics::DEADLINE_SCAN_PARTITIONS).set(scanned as f64);
        let (partitions, _) = self.partitions?;
        (!owned.is_empty()).then_some(Share { partitions, owned })
    }
}

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
    /// The sagas it scans (module header).
    pub ownership: Ownership,
    /// Whether a due saga's command (or reply) is still on its way ([`crate::backlog`]).
    pub backlogs: Backlogs,
    /// Whose offsets tell that.
    pub groups: GroupNames,
}

/// The consumer groups whose progress a due saga waits on: its step's participant's on the
/// command topic, and the orchestrators' own on `saga.replies`.
pub struct GroupNames {
    /// The orchestrators' group.
    pub orchestrator: String,
    pub topic_prefix: String,
    /// `PARTICIPANT_GROUPS`: participants whose group is not the default.
    pub participants: std::collections::HashMap<String, String>,
}

impl GroupNames {
    fn participant(&self, name: &str) -> String {
        self.participants
            .get(name)
            .cloned()
            .unwrap_or_else(|| messaging::kafka::service_group(&self.topic_prefix, name))
    }
}

impl DeadlineScanner {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut clock_checked: Option<std::time::Instant> = None;
        // A scan every interval: the connection stays with the scanner between scans.
        let mut connection = KeptConnection::default();
        loop {
            if clock_checked.is_none_or(|at| at.elapsed() >= CLOCK_CHECK_EVERY) {
                clock_checked = Some(std::time::Instant::now());
                let checked = tokio::time::timeout(self.call_timeout, self.check_clock());
                tokio::select! {
                    _ = checked => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            let share = tokio::select! {
                share = self.ownership.share() => share,
                _ = shutdown.cancelled() => return,
            };
            let Some(share) = share else {
                // Nothing held: look again after an interval.
                tokio::select! {
                    _ = tokio::time::sleep(self.interval) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            };
            let scan =
                tokio::time::timeout(self.call_timeout, self.fire_due(&share, &mut connection));
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

    /// When `saga`'s command is still on its way ([`crate::backlog`]): how much longer to wait
    /// for it (at most the step's longest wait), and why.
    fn on_its_way(&self, saga: &Saga, definition: &SagaDefinition) -> Option<(Duration, String)> {
        let index = saga.current_step()?;
        let step = definition.steps.get(index)?;
        let action = match saga.state {
            SagaState::Compensating => step.compensation.as_ref()?,
            _ => &step.forward,
        };
        let hash = messaging::partitioner::key_hash(saga.key.as_bytes());
        let commands = self.topics.named(&step.topic);
        let replies = self.topics.replies();
        let participant = self.groups.participant(&step.participant);
        let waits = [
            (commands, participant, "its participant"),
            (
                replies,
                self.groups.orchestrator.clone(),
                "the orchestrators",
            ),
        ];
        let (topic, group, whose, behind) = waits
            .into_iter()
            .filter_map(|(topic, group, whose)| {
                let behind = self.backlogs.behind(&topic, &group, hash)?;
                Some((topic, group, whose, behind))
            })
            .max_by_key(|(.., behind)| behind.eta)?;
        let longest = action.retry.max_timeout.to_std().unwrap_or(Duration::MAX);
        let wait = behind.eta.min(longest);
        Some((
            wait,
            format!(
                "{whose} (group {group}) have {} records left on this saga's partition of {topic} \
                 and move ({:.0} a second)",
                behind.records, behind.per_second
            ),
        ))
    }

    /// Handles one batch of the overdue sagas of `share` (due by the database's clock) in one
    /// transaction, on `kept`'s connection (kept again when it commits); returns how many it
    /// handled.
    async fn fire_due(&self, share: &Share, kept: &mut KeptConnection) -> Result<i64> {
        let mut connection = kept.take(&self.pool).await?;
        let mut tx = sqlx::Connection::begin(&mut *connection).await?;
        let store::Locked { sagas: due, now } = store::lock_due(&mut tx, share, BATCH).await?;
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
            let passed = saga.deadline_at.map(|d| format!("deadline {d} passed"));
            let (decision, detail) = match self.on_its_way(saga, &definition) {
                Some((wait, why)) => {
                    metrics::counter!(crate::metrics::DEADLINES_POSTPONED).increment(1);
                    let wait_delta =
                        chrono::TimeDelta::from_std(wait).unwrap_or(chrono::TimeDelta::MAX);
                    let detail = format!(
                        "{}; waiting {:.1} s more, not sending again: {why}",
                        passed.unwrap_or_default(),
                        wait.as_secs_f64()
                    );
                    (
                        saga.postpone_deadline(now, wait_delta, &definition),
                        Some(detail),
                    )
                }
                None => {
                    let jitter = rand::thread_rng().gen_range(0.0..1.0);
                    (saga.on_deadline(now, jitter, &definition), passed)
                }
            };
            let entry = HistoryEntry {
                at: now,
                message_id: None,
                message_type: "Deadline".into(),
                decision: HistoryDecision::Deadline,
                detail,
                // Set to the state the decision leaves (`commit_decision`).
                state_after: saga.state,
            };
            let span = tracing::info_span!("deadline", saga_id = %saga.id);
            join_saga_trace(&mut tx, &span, saga.id).await?;
            commit_decision(&self.topics, &mut tx, saga, *version, decision, entry)
                .instrument(span)
                .await?;
        }
        tx.commit().await?;
        kept.keep(connection);
        for (saga, _) in &due {
            let hash = messaging::partitioner::key_hash(saga.key.as_bytes());
            let partition = messaging::partitioner::partition_of(hash, share.partitions);
            metrics::counter!(crate::metrics::DEADLINES_HANDLED, "partition" => partition.to_string())
                .increment(1);
        }
        Ok(i64::try_from(due.len()).unwrap_or(BATCH))
    }
}
