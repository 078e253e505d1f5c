//! Step deadlines and retry policies. Pure data and arithmetic: the state machine asks a
//! policy how long to wait for a reply and how often to try.

use chrono::TimeDelta;
use events::StepName;

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

/// The retry policies of one saga definition: one per forward step, one for compensations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    pub reserve_stock: RetryPolicy,
    pub charge_payment: RetryPolicy,
    pub schedule_shipment: RetryPolicy,
    /// Compensations retry until they succeed; after this many attempts the saga is `failed`
    /// and waits for an operator.
    pub compensation: RetryPolicy,
}

impl Policies {
    pub fn forward(&self, step: StepName) -> &RetryPolicy {
        match step {
            StepName::ReserveStock => &self.reserve_stock,
            StepName::ChargePayment => &self.charge_payment,
            StepName::ScheduleShipment => &self.schedule_shipment,
        }
    }
}

impl Default for Policies {
    /// 30 s for the first reply, doubling to at most 5 min; 8 forward attempts (about half an
    /// hour), 20 for each compensation. Kafka and the outboxes lose nothing, so a deadline
    /// mostly covers a participant that is down; waits shorter than the worst queueing delay
    /// only add re-sends that are fenced off.
    fn default() -> Self {
        let forward = RetryPolicy {
            timeout: TimeDelta::seconds(30),
            max_attempts: 8,
            max_timeout: TimeDelta::minutes(5),
        };
        Self {
            reserve_stock: forward,
            charge_payment: forward,
            schedule_shipment: forward,
            compensation: RetryPolicy {
                max_attempts: 20,
                ..forward
            },
        }
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
