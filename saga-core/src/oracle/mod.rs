//! The reference oracle of the saga machine's rules: one restatement of them, shared by the
//! property tests (`saga/proptests.rs`) and the fuzz target `orchestrator_records` (which
//! enables this crate's `oracle` feature).
//!
//! It is written from the rules `machine.rs` documents, not from its code, and never calls the
//! machine to decide what the machine should do (it reads a saga's fields, never its methods):
//!
//! - [`model`] says which event moves a saga and to what: the next state, every step's status
//!   and attempt counts, the command sent, the event published and where the deadline falls;
//! - [`shape`] holds the invariants every stored saga, every start and every transition keep
//!   (done or undone, never both; compensation in reverse order; no forward command after a
//!   compensation; terminal states stay terminal; commands carry what the definition maps).
//!
//! A harness calls [`check_start`] on every new saga and [`check_decision`] on every decision
//! of the machine, with the commands the saga sent before it.

pub mod model;
pub mod shape;

use chrono::{DateTime, Utc};
use events::{Action, Command, Reply, SagaEvent};

use super::{Decision, Effect, OperatorAction, Saga, SagaDefinition, SagaState, StepStatus};

pub use model::{applies, expect, Next};
pub use shape::{check_saga, check_start};

/// What moved (or tried to move) a saga.
#[derive(Debug, Clone, Copy)]
pub enum Cause<'a> {
    Reply(&'a Reply),
    Deadline,
    Operator(&'a OperatorAction),
}

/// Holds one decision of the machine for `old` (which runs on `definition`) against the rules:
/// ignored exactly when the model says the event does not apply; when applied, the new saga
/// and its effects are what the model expects, and keep every invariant of [`shape`].
/// `sent_before` is every command the saga sent before, in order.
///
/// # Panics
/// When the decision breaks a rule, with the saga before and after.
pub fn check_decision(
    old: &Saga,
    decision: &Decision,
    cause: &Cause<'_>,
    now: DateTime<Utc>,
    definition: &SagaDefinition,
    sent_before: &[Command],
) {
    let expected = expect(old, cause, now, definition);
    match (decision, expected) {
        (Decision::Ignored { .. }, None) => {}
        (Decision::Ignored { reason }, Some(next)) => panic!(
            "ignored ({reason}), though it is what the saga waits for ({cause:?}), \
             expected {next:#?}: {old:#?}"
        ),
        (Decision::Applied { saga, effects }, None) => panic!(
            "applied, though it is not what the saga waits for ({cause:?}): {old:#?}\n→ \
             {saga:#?}\n{effects:?}"
        ),
        (Decision::Applied { saga, effects }, Some(next)) => {
            shape::check_saga(saga, definition);
            shape::check_transition(old, saga, effects, cause, sent_before, now, definition);
            next.check(old, saga, effects, definition, now);
        }
    }
}

/// The step a saga waits on and in which direction: the running step of a running saga, the
/// compensating step of a compensating one; none for a saga in a terminal state.
pub fn waiting_on(saga: &Saga) -> Option<(usize, Action)> {
    let (status, action) = match saga.state {
        SagaState::Running => (StepStatus::Running, Action::Forward),
        SagaState::Compensating => (StepStatus::Compensating, Action::Compensate),
        SagaState::Completed | SagaState::Compensated | SagaState::Failed => return None,
    };
    saga.steps
        .iter()
        .position(|s| s.status == status)
        .map(|i| (i, action))
}

/// Whether a saga in `state` has ended (an operator may still move a failed one).
fn terminal(state: SagaState) -> bool {
    matches!(
        state,
        SagaState::Completed | SagaState::Compensated | SagaState::Failed
    )
}

/// The commands among `effects`, with their topics.
fn commands(effects: &[Effect]) -> impl Iterator<Item = (&String, &Command)> {
    effects.iter().filter_map(|e| match e {
        Effect::Send { topic, command } => Some((topic, command)),
        Effect::Publish(_) => None,
    })
}

/// The events among `effects`.
fn events_of(effects: &[Effect]) -> impl Iterator<Item = &SagaEvent> {
    effects.iter().filter_map(|e| match e {
        Effect::Publish(event) => Some(event),
        Effect::Send { .. } => None,
    })
}
