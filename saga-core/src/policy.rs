//! Retry policies: how long to wait for a reply and how often to try. Pure data and
//! arithmetic; each action of a saga definition has one.

use chrono::TimeDelta;

/// How one step (or the compensations) is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// How long to wait for the first attempt's reply.
    pub timeout: TimeDelta,
    /// Attempts before giving up (1 = no retries).
    pub max_attempts: u32,
    /// The longest any single wait may grow to.
    pub max_timeout: TimeDelta,
}

impl RetryPolicy {
    /// The wait for `attempt` (1-based): the timeout doubled per earlier attempt, capped at
    /// `max_timeout`, plus up to 25% jitter (`jitter` in `[0, 1)`), so that many sagas retrying
    /// together spread out.
    pub fn wait_for(&self, attempt: u32, jitter: f64) -> TimeDelta {
        let doublings = attempt.saturating_sub(1).min(20);
        let base = self
            .timeout
            .checked_mul(1 << doublings)
            .unwrap_or(self.max_timeout)
            .min(self.max_timeout);
        let extra_ms = (base.num_milliseconds() as f64 * 0.25 * jitter.clamp(0.0, 1.0)) as i64;
        base + TimeDelta::milliseconds(extra_ms)
    }

    pub fn exhausted(&self, attempts: u32) -> bool {
        attempts >= self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_bounded_jitter() {
        let policy = RetryPolicy {
            timeout: TimeDelta::seconds(1),
            max_attempts: 3,
            max_timeout: TimeDelta::seconds(5),
        };
        assert_eq!(policy.wait_for(1, 0.0), TimeDelta::seconds(1));
        assert_eq!(policy.wait_for(2, 0.0), TimeDelta::seconds(2));
        assert_eq!(policy.wait_for(3, 0.0), TimeDelta::seconds(4));
        assert_eq!(policy.wait_for(4, 0.0), TimeDelta::seconds(5));
        assert_eq!(policy.wait_for(40, 0.0), TimeDelta::seconds(5));
        assert_eq!(policy.wait_for(2, 0.999), TimeDelta::milliseconds(2_499));
        assert!(!policy.exhausted(2) && policy.exhausted(3));
    }
}
