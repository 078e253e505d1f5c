//! The orchestrator's saga metrics, derived from each committed transition (old saga → new
//! saga) so that the state machine stays free of I/O.
//!
//! Counters are bumped inside the handler's transaction, before it commits; a transaction
//! that rolls back (a version conflict, a lost connection) and is retried counts twice. Such
//! retries are rare and show in `handler_errors_total`.

use chrono::{DateTime, Utc};
use events::{Action, Command};

use crate::saga::{Saga, StepStatus};

pub const SAGAS_STARTED: &str = "sagas_started_total";
/// Sagas that reached a terminal state, by `state` (completed, compensated, failed).
pub const SAGAS_FINISHED: &str = "sagas_finished_total";
/// From the order to the terminal state, by `state`.
pub const SAGA_SECONDS: &str = "saga_duration_seconds";
/// From a step's first command to its answer, by `step`, `action` (do, undo) and `outcome`.
pub const STEP_SECONDS: &str = "saga_step_duration_seconds";
/// Commands sent again because their deadline passed, by `step` and `action`.
pub const STEP_RETRIES: &str = "saga_step_retries_total";
/// Operator actions applied, by `action`.
pub const OPERATOR_ACTIONS: &str = "saga_operator_actions_total";
/// How far this instance's clock is ahead of the database's (behind when negative).
pub const CLOCK_SKEW: &str = "orchestrator_clock_skew_seconds";
/// Saga writes the row's version refused (another writer moved the saga since it was read),
/// by `source`: `consume`, `deadline`, `operator`. Every writer locks the row first, so this
/// stays 0 unless that fence fails; the version is the second one.
pub const STALE_WRITES_REFUSED: &str = "saga_stale_writes_refused_total";
/// Overdue sagas this instance's deadline scanner handled, by `partition` (of `saga.replies`,
/// which the scanner shares by: [`crate::deadlines`]).
pub const DEADLINES_HANDLED: &str = "saga_deadlines_handled_total";
/// Overdue sagas whose command was still on its way (its participant, or the orchestrators,
/// working through a backlog), so their deadline waited instead of sending again
/// ([`crate::backlog`]).
pub const DEADLINES_POSTPONED: &str = "saga_deadlines_postponed_total";
/// How many partitions of `saga.replies` this instance's deadline scanner scans now (those its
/// consumer holds).
pub const DEADLINE_SCAN_PARTITIONS: &str = "saga_deadline_scan_partitions";

/// Replies applied although their Kafka record key was not their body's `key`, by `key`:
/// `missing` (no record key) or `other` (another key). The contract keys every reply by its
/// body's `key` (AsyncAPI, "Keys and partitions"); the orchestrator reads the body, so such a
/// reply still moves its saga, but a participant that keys them so may put a saga's replies in
/// several partitions, out of order. Counted when the reply is decoded, before the inbox drops a
/// repeat.
pub const REPLY_KEY_MISMATCHES: &str = "saga_reply_key_mismatches_total";

pub fn describe() {
    metrics::describe_counter!(SAGAS_STARTED, "Sagas started.");
    metrics::describe_counter!(SAGAS_FINISHED, "Sagas that reached a terminal state.");
    metrics::describe_histogram!(
        SAGA_SECONDS,
        metrics::Unit::Seconds,
        "Time from the order to the saga's terminal state."
    );
    metrics::describe_histogram!(
        STEP_SECONDS,
        metrics::Unit::Seconds,
        "Time from a step's first command to its answer."
    );
    metrics::describe_counter!(
        STEP_RETRIES,
        "Commands re-sent after their deadline passed."
    );
    metrics::describe_counter!(OPERATOR_ACTIONS, "Operator actions applied.");
    metrics::describe_counter!(
        STALE_WRITES_REFUSED,
        "Saga writes refused by the row's version (another writer moved the saga first), by \
         source."
    );
    // Shown at 0 from the start, so that a report reads "none refused" rather than nothing.
    for writer in [
        crate::store::Writer::Consume,
        crate::store::Writer::Deadline,
        crate::store::Writer::Operator,
    ] {
        metrics::counter!(STALE_WRITES_REFUSED, "source" => writer.as_str()).increment(0);
    }
    metrics::describe_counter!(
        DEADLINES_POSTPONED,
        "Overdue sagas whose command or reply was still queued behind a moving backlog, so \
         their deadline waited instead of sending again."
    );
    metrics::counter!(DEADLINES_POSTPONED).increment(0);
    metrics::describe_counter!(
        REPLY_KEY_MISMATCHES,
        "Replies whose Kafka record key was missing or not their body's key (applied all the \
         same), by key: missing, other."
    );
    for key in ["missing", "other"] {
        metrics::counter!(REPLY_KEY_MISMATCHES, "key" => key).increment(0);
    }
    metrics::describe_counter!(
        DEADLINES_HANDLED,
        "Overdue sagas this instance's deadline scanner handled, by partition of saga.replies."
    );
    metrics::describe_gauge!(
        DEADLINE_SCAN_PARTITIONS,
        "Partitions of saga.replies whose sagas this instance's deadline scanner scans."
    );
    metrics::describe_gauge!(
        CLOCK_SKEW,
        metrics::Unit::Seconds,
        "How far this instance's clock is ahead of the database's; saga deadlines and times \
         follow the database's whatever it is."
    );
}

/// `count` writes of `writer` refused by the saga row's version.
pub fn stale_writes_refused(writer: crate::store::Writer, count: u64) {
    tracing::warn!(
        source = writer.as_str(),
        count,
        "saga writes refused: the row moved on since it was read"
    );
    metrics::counter!(STALE_WRITES_REFUSED, "source" => writer.as_str()).increment(count);
}

/// A reply keyed otherwise than by its body's `key`: `record_key` is the record's Kafka key.
pub fn reply_key_mismatch(record_key: Option<&[u8]>, body_key: &str, reply: &str) {
    let kind = if record_key.is_none() {
        "missing"
    } else {
        "other"
    };
    tracing::warn!(
        key = kind,
        body_key,
        reply,
        "a reply's record key is not its body's key; applied by its body"
    );
    metrics::counter!(REPLY_KEY_MISMATCHES, "key" => kind).increment(1);
}

pub fn clock_skew(seconds: f64) {
    metrics::gauge!(CLOCK_SKEW).set(seconds);
}

pub fn saga_started() {
    metrics::counter!(SAGAS_STARTED).increment(1);
}

/// Records what changed between `before` and `after`, and the re-sent commands in `sent`.
pub fn transition<'a>(before: &Saga, after: &Saga, sent: impl Iterator<Item = &'a Command>) {
    for (old, new) in before.steps.iter().zip(&after.steps) {
        let step = new.name.as_str();
        if old.status == StepStatus::Running && new.status != StepStatus::Running {
            let outcome = if new.status == StepStatus::Succeeded {
                "succeeded"
            } else {
                "failed"
            };
            observe_step(step, "do", outcome, new.started_at, new.finished_at);
        }
        if old.status == StepStatus::Compensating && new.status != StepStatus::Compensating {
            let outcome = if new.status == StepStatus::Compensated {
                "succeeded"
            } else {
                "failed"
            };
            observe_step(
                step,
                "undo",
                outcome,
                new.compensation_started_at,
                new.compensated_at.or(Some(after.updated_at)),
            );
        }
    }
    for command in sent.filter(|c| c.attempt > 1) {
        metrics::counter!(
            STEP_RETRIES,
            "step" => command.step.clone(),
            "action" => match command.action {
                Action::Forward => "do",
                Action::Compensate => "undo",
            }
        )
        .increment(1);
    }
    if after.state.is_terminal() && !before.state.is_terminal() {
        let state = after.state.as_str();
        metrics::counter!(SAGAS_FINISHED, "state" => state).increment(1);
        if let Some(finished) = after.finished_at {
            metrics::histogram!(SAGA_SECONDS, "state" => state)
                .record(seconds_between(after.created_at, finished));
        }
    }
}

fn observe_step(
    step: &str,
    action: &'static str,
    outcome: &'static str,
    started: Option<DateTime<Utc>>,
    finished: Option<DateTime<Utc>>,
) {
    if let (Some(started), Some(finished)) = (started, finished) {
        metrics::histogram!(STEP_SECONDS, "step" => step.to_owned(), "action" => action, "outcome" => outcome)
            .record(seconds_between(started, finished));
    }
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6
}
