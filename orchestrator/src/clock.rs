//! This instance's own clock. Saga times (deadlines, when a saga started, moved and ended,
//! its history lines) are read from the database's clock instead, the one clock every
//! instance shares; what the instance's clock is still good for is saying how far it is off
//! from that one (`orchestrator_clock_skew_seconds`).
//!
//! `FAULT_CLOCK_SKEW_SECS` shifts it, so that a test can run an instance whose clock is wrong.

use chrono::{DateTime, TimeDelta, Utc};

/// The instance's wall clock, shifted by the injected skew (none outside tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    skew: TimeDelta,
}

impl Clock {
    /// A clock `secs` seconds ahead of the system's (behind when negative).
    pub fn skewed(secs: i64) -> Self {
        Self {
            skew: TimeDelta::try_seconds(secs).unwrap_or_default(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.skew
    }
}
