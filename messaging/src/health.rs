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
                });
            }
        }
        ::metrics::gauge!(metrics::DATABASE_UNWELL).set(1.0);
    }

    /// A transaction committed: the database works.
    pub fn database_well(&self) {
        let mut database = self.lock();
        if let Some(unwell) = database.take() {
            tracing::warn!(
                after_ms = unwell.since.elapsed().as_millis() as u64,
                "database works again: ready"
            );
            ::metrics::gauge!(metrics::DATABASE_UNWELL).set(0.0);
        }
    }

    /// `Err` with the reason while the service waits for its database.
    pub fn ready(&self) -> Result<(), NotReady> {
        match self.lock().as_ref() {
            None => Ok(()),
            Some(unwell) => Err(NotReady {
                reason: format!("database unwell: {}", unwell.reason),
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
}
