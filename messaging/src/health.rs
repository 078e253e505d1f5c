//! Whether a service can do its work now, for its probes.
//!
//! A database can answer `SELECT 1` and still refuse every write: read-only during a failover
//! or on a full disk, shutting down, out of resources, failing I/O. The consume loop sees that
//! first, as the errors it waits out ([`crate::consumer::HandlerError::Unavailable`]), and says
//! so here; `/healthz` then answers "not ready" with the reason until a transaction commits
//! again, so that a probe or an operator sees a service that waits instead of a green one.
//!
//! Three probes read it, on the orchestrator's `OPS_HTTP_ADDR` and every participant's metrics
//! port (`METRICS_ADDR`):
//! - `/livez`: the process runs and serves HTTP; nothing else. A liveness probe restarts a
//!   process that fails it, and a database or broker outage is not cured by a restart.
//! - `/readyz` ([`Health::readiness`]): the service can do its work now. The database answers
//!   (the outbox sampler's query, every second, answered within the last
//!   [`READINESS_STALE_AFTER`]) and is not failing the consume loop; the outbox drains (its
//!   oldest row waits less than `READY_OUTBOX_MAX_AGE_MS`); the consumer has reported within
//!   [`READINESS_STALE_AFTER`] (librdkafka's statistics, every second), has joined its group
//!   (an assignment was made to it, with partitions or none: an instance beyond the partition
//!   count is ready to take over) and reaches a broker. For a readiness probe, and for a load
//!   balancer in front of the orchestrator's API.
//! - `/healthz`, as before the two: only whether the consume loop finds the database failing.
//!   Narrower than `/readyz` (a service that has not joined its group, or whose broker is gone,
//!   is healthy there), wider than `/livez`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics;

/// One service's health, shared by its consume loop and its HTTP servers.
#[derive(Debug, Clone, Default)]
pub struct Health {
    database: Arc<Mutex<Option<Unwell>>>,
    readiness: Arc<Mutex<Readiness>>,
}

/// How old the latest word of the outbox sampler or of the consumer may be for `/readyz`: both
/// report every second; a few missed seconds are a busy process, this many a stuck one.
pub const READINESS_STALE_AFTER: Duration = Duration::from_secs(15);

/// The default of `READY_OUTBOX_MAX_AGE_MS`.
pub const DEFAULT_OUTBOX_MAX_AGE: Duration = Duration::from_secs(60);

/// What `/readyz` reads besides the database's health.
#[derive(Debug, Clone)]
struct Readiness {
    /// Since when the process runs: until the first words arrive, how long it has waited.
    started: Instant,
    /// The outbox sampler's latest query: when, and the oldest row's age (seconds) or why the
    /// query failed.
    outbox: Option<(Instant, Result<f64, String>)>,
    /// The consumer's latest statistics.
    consumer: Option<ConsumerSeen>,
    /// `READY_OUTBOX_MAX_AGE_MS`.
    outbox_max_age: Duration,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            outbox: None,
            consumer: None,
            outbox_max_age: DEFAULT_OUTBOX_MAX_AGE,
        }
    }
}

/// What the consumer's latest statistics said.
#[derive(Debug, Clone)]
struct ConsumerSeen {
    at: Instant,
    /// An assignment was made to this consumer (sticky: a later rebalance does not undo it).
    joined: bool,
    /// Its group's join state then, for the reason.
    join_state: String,
    /// Brokers it is connected to.
    brokers_up: usize,
}

#[derive(Debug, Clone)]
struct Unwell {
    since: Instant,
    reason: String,
    /// When the consume loop gave up its partitions, if it did.
    gave_up: Option<Instant>,
}

/// Why a service is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady {
    pub reason: String,
    /// How long it has been so.
    pub for_how_long: Duration,
}

impl Health {
    /// The database failed in a way that says nothing about the message in hand.
    pub fn database_unwell(&self, reason: &str) {
        let mut database = self.lock();
        match database.as_mut() {
            Some(unwell) => reason.clone_into(&mut unwell.reason),
            None => {
                tracing::error!(reason, "database unwell: waiting for it, not ready");
                *database = Some(Unwell {
                    since: Instant::now(),
                    reason: reason.to_owned(),
                    gave_up: None,
                });
            }
        }
        ::metrics::gauge!(metrics::DATABASE_UNWELL).set(1.0);
    }

    /// The consume loop gave up its partitions, the database unwell too long: it is out of its
    /// consumer group until the database works again.
    pub fn gave_up_partitions(&self) {
        let mut database = self.lock();
        let unwell = database.get_or_insert_with(|| Unwell {
            since: Instant::now(),
            reason: "unavailable".to_owned(),
            gave_up: None,
        });
        unwell.gave_up = Some(Instant::now());
        ::metrics::gauge!(metrics::PARTITIONS_OUT).set(1.0);
    }

    /// A transaction committed, or the database answered again: the database works (and a
    /// consume loop that gave up its partitions joins its group again).
    pub fn database_well(&self) {
        let mut database = self.lock();
        if let Some(unwell) = database.take() {
            tracing::warn!(
                after_ms = unwell.since.elapsed().as_millis() as u64,
                "database works again: ready"
            );
            ::metrics::gauge!(metrics::DATABASE_UNWELL).set(0.0);
            if unwell.gave_up.is_some() {
                ::metrics::gauge!(metrics::PARTITIONS_OUT).set(0.0);
            }
        }
    }

    /// `Err` with the reason while the service waits for its database.
    pub fn ready(&self) -> Result<(), NotReady> {
        match self.lock().as_ref() {
            None => Ok(()),
            Some(unwell) => Err(NotReady {
                reason: match unwell.gave_up {
                    None => format!("database unwell: {}", unwell.reason),
                    Some(at) => format!(
                        "database unwell: {}; gave up its partitions to the other instances {} s \
                         ago (DATABASE_GIVE_UP_AFTER_MS), joins its group again when the \
                         database answers",
                        unwell.reason,
                        at.elapsed().as_secs()
                    ),
                },
                for_how_long: unwell.since.elapsed(),
            }),
        }
    }

    /// A health whose outbox counts as not draining once its oldest row waits `outbox_max_age`
    /// (`READY_OUTBOX_MAX_AGE_MS`).
    pub fn new(outbox_max_age: Duration) -> Self {
        let health = Self::default();
        health.probes().outbox_max_age = outbox_max_age;
        health
    }

    /// The outbox sampler's query answered (the oldest row's age in seconds, 0 when empty) or
    /// failed.
    pub fn outbox_sampled(&self, oldest_age: Result<f64, String>) {
        self.probes().outbox = Some((Instant::now(), oldest_age));
    }

    /// A new consumer was made (at start, or to replace a stuck one): it has joined nothing.
    pub fn consumer_created(&self) {
        self.probes().consumer = None;
    }

    /// The consumer's periodic statistics (librdkafka's, every second).
    pub fn consumer_statistics(&self, statistics: &rdkafka::Statistics) {
        let (joined_now, join_state) = statistics.cgrp.as_ref().map_or((false, ""), |group| {
            (
                group.join_state == "steady" || group.rebalance_cnt > 0,
                group.join_state.as_str(),
            )
        });
        let brokers_up = statistics
            .brokers
            .values()
            .filter(|broker| broker.state == "UP")
            .count();
        let mut readiness = self.probes();
        let joined = joined_now || readiness.consumer.as_ref().is_some_and(|seen| seen.joined);
        readiness.consumer = Some(ConsumerSeen {
            at: Instant::now(),
            joined,
            join_state: join_state.to_owned(),
            brokers_up,
        });
    }

    /// `Err` with the first reason the service cannot do its work now (see the module's
    /// documentation): what `/readyz` answers.
    pub fn readiness(&self) -> Result<(), NotReady> {
        self.ready()?;
        let readiness = self.probes().clone();
        let waited = readiness.started.elapsed();
        let not_ready = |reason: String, for_how_long: Duration| {
            Err(NotReady {
                reason,
                for_how_long,
            })
        };
        match &readiness.outbox {
            None => return not_ready("the database has not answered yet".into(), waited),
            Some((at, _)) if at.elapsed() > READINESS_STALE_AFTER => {
                return not_ready(
                    "the database has not answered the outbox sampler lately".into(),
                    at.elapsed(),
                )
            }
            Some((at, Err(why))) => {
                return not_ready(format!("the database does not answer: {why}"), at.elapsed())
            }
            Some((_, Ok(age))) if *age > readiness.outbox_max_age.as_secs_f64() => {
                return not_ready(
                    format!(
                        "the outbox is not draining: its oldest row waits for {age:.0} s \
                         (READY_OUTBOX_MAX_AGE_MS)"
                    ),
                    Duration::from_secs_f64(*age - readiness.outbox_max_age.as_secs_f64()),
                )
            }
            Some(_) => {}
        }
        match &readiness.consumer {
            None => not_ready("the consumer has not reported yet".into(), waited),
            Some(seen) if seen.at.elapsed() > READINESS_STALE_AFTER => not_ready(
                "the consumer has not reported lately".into(),
                seen.at.elapsed(),
            ),
            Some(seen) if !seen.joined => not_ready(
                format!(
                    "the consumer has not joined its group yet (join state {:?})",
                    seen.join_state
                ),
                waited,
            ),
            Some(seen) if seen.brokers_up == 0 => not_ready(
                "no Kafka broker answers the consumer".into(),
                Duration::ZERO,
            ),
            Some(_) => Ok(()),
        }
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, Readiness> {
        // Plain data: a panic while holding the lock leaves it usable.
        self.readiness
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Unwell>> {
        // A panic while holding this lock leaves a valid `Option`: take it as it is.
        self.database
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// librdkafka's statistics of a consumer whose group is in `join_state` after `rebalances`,
    /// with one broker in `broker_state`.
    fn statistics(join_state: &str, rebalances: i64, broker_state: &str) -> rdkafka::Statistics {
        let broker = rdkafka::statistics::Broker {
            state: broker_state.into(),
            ..Default::default()
        };
        rdkafka::Statistics {
            brokers: [("b1".to_owned(), broker)].into_iter().collect(),
            cgrp: Some(rdkafka::statistics::ConsumerGroup {
                state: "up".into(),
                join_state: join_state.into(),
                rebalance_cnt: rebalances,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ready_once_the_database_answers_the_consumer_joined_and_a_broker_is_up() {
        let health = Health::new(Duration::from_secs(60));
        let reason = |health: &Health| health.readiness().expect_err("not ready").reason;
        assert!(reason(&health).contains("database has not answered yet"));
        health.outbox_sampled(Ok(0.0));
        assert!(reason(&health).contains("consumer has not reported yet"));
        health.consumer_statistics(&statistics("wait-join", 0, "UP"));
        assert!(reason(&health).contains("not joined its group yet"));
        health.consumer_statistics(&statistics("steady", 1, "UP"));
        assert_eq!(health.readiness(), Ok(()));
        // Joined stays joined through a later rebalance.
        health.consumer_statistics(&statistics("wait-sync", 1, "UP"));
        assert_eq!(health.readiness(), Ok(()));

        health.consumer_statistics(&statistics("steady", 1, "DOWN"));
        assert!(reason(&health).contains("no Kafka broker"));
        health.consumer_statistics(&statistics("steady", 1, "UP"));
        health.outbox_sampled(Ok(61.0));
        assert!(reason(&health).contains("outbox is not draining"));
        health.outbox_sampled(Err("connection refused".into()));
        assert!(reason(&health).contains("does not answer: connection refused"));
        health.outbox_sampled(Ok(1.0));
        health.database_unwell("read-only");
        assert!(reason(&health).contains("read-only"));
        health.database_well();
        assert_eq!(health.readiness(), Ok(()));

        // A new consumer (one replaced as stuck) joins afresh.
        health.consumer_created();
        assert!(reason(&health).contains("consumer has not reported yet"));
    }

    #[test]
    fn unwell_until_well_again_with_the_latest_reason() {
        let health = Health::default();
        assert_eq!(health.ready(), Ok(()));
        health.database_unwell("read-only");
        health.database_unwell("still read-only");
        let not_ready = health.ready().expect_err("not ready");
        assert!(
            not_ready.reason.contains("still read-only"),
            "{not_ready:?}"
        );
        health.clone().database_well();
        assert_eq!(health.ready(), Ok(()));
    }

    #[test]
    fn a_service_that_gave_up_its_partitions_says_so_until_the_database_works() {
        let health = Health::default();
        health.database_unwell("the database did not answer within 10000 ms");
        health.gave_up_partitions();
        let not_ready = health.ready().expect_err("not ready");
        assert!(
            not_ready.reason.contains("did not answer")
                && not_ready.reason.contains("gave up its partitions"),
            "{not_ready:?}"
        );
        health.database_well();
        assert_eq!(health.ready(), Ok(()));
    }
}
