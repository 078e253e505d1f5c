//! Whether a service can do its work now, for its `/healthz`.
//!
//! A database can answer `SELECT 1` and still refuse every write: read-only during a failover
//! or on a full disk, shutting down, out of resources, failing I/O. The consume loop sees that
//! first, as the errors it waits out ([`crate::consumer::HandlerError::Unavailable`]), and says
//! so here; `/healthz` then answers "not ready" with the reason until a transaction commits
//! again, so that a probe or an operator sees a service that waits instead of a green one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics;

/// One service's health, shared by its consume loop and its HTTP servers.
#[derive(Debug, Clone, Default)]
pub struct Health {
    database: Arc<Mutex<Option<Unwell>>>,
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
