//! The reference model: what an event does to a saga, restated from the rules `machine.rs`
//! documents (its module comment and `sagas/README.md`), without its code.
//!
//! [`expect`] answers two questions for a saga, an event and the saga's definition: does the
//! event move the saga at all (`None` when the machine must ignore it), and if so, to what:
//! the saga's state, every step's status and attempt counts, the one command sent (its step,
//! direction and attempt), the terminal event published, and when the saga's new deadline may
//! fall. [`Next::check`] holds an applied decision against that answer.

use std::ops::RangeInclusive;

use chrono::{DateTime, TimeDelta, Utc};
use events::{Action, Outcome, Reply, SagaEvent};

use super::{commands, events_of, waiting_on, Cause};
use crate::{
    Effect, OperatorAction, RetryPolicy, Saga, SagaDefinition, SagaState, StepState, StepStatus,
};

/// The attempts a step that cannot be undone must have had before an operator may abandon it:
/// its first wait passed without an answer, so the deadline sent it again. (Restated here, not
/// taken from the machine, so that a change to the machine's rule shows.)
const ABANDON_AFTER_ATTEMPTS: u32 = 2;

/// What the model keeps of one step: its status and its three counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub status: StepStatus,
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub compensation_budget_from: u32,
}

impl Counts {
    fn of(step: &StepState) -> Self {
        Self {
            status: step.status,
            attempts: step.attempts,
            compensation_attempts: step.compensation_attempts,
            compensation_budget_from: step.compensation_budget_from,
        }
    }

    /// The compensation attempts since the last operator's retry.
    fn round(&self) -> u32 {
        self.compensation_attempts - self.compensation_budget_from
    }
}

/// The command the model expects: step index, direction and attempt number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub step: usize,
    pub action: Action,
    pub attempt: u32,
}

/// Where the saga's deadline falls after the event, relative to the event's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deadline {
    /// A terminal saga waits for nothing.
    None,
    /// Between the two waits, both included (a wait with up to a quarter of jitter).
    Within(RangeInclusive<TimeDelta>),
}

/// What an event that applies makes of a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    pub state: SagaState,
    pub steps: Vec<Counts>,
    pub command: Option<Sent>,
    /// The terminal state announced on `saga.events`, if the saga reached one.
    pub end: Option<SagaState>,
    pub deadline: Deadline,
}

/// Whether the event moves the saga: [`expect`] has an answer.
pub fn applies(saga: &Saga, cause: &Cause<'_>, now: DateTime<Utc>, d: &SagaDefinition) -> bool {
    expect(saga, cause, now, d).is_some()
}

/// What `cause` at `now` makes of `saga` (which runs on `definition`), or `None` when the
/// machine must ignore it:
///
/// - a reply moves a running or compensating saga only when it is of the saga's type, for the
///   step it waits on, in its direction, named as the definition names the outcome it reports,
///   from an attempt of the current round (forward: any attempt so far; compensating: those
///   since the last operator's retry);
/// - a deadline moves a waiting saga once it passed;
/// - an operator's retry or skip moves a failed saga with a stuck compensation; an abort a
///   running saga, at once at a step that can be undone, at one that cannot only after a wait
///   passed without an answer (and then the step is abandoned, nothing undone).
pub fn expect(
    saga: &Saga,
    cause: &Cause<'_>,
    now: DateTime<Utc>,
    definition: &SagaDefinition,
) -> Option<Next> {
    if !runs_on(saga, definition) {
        return None;
    }
    let mut plan = Plan::new(saga, definition);
    match cause {
        Cause::Reply(reply) => on_reply(&mut plan, saga, reply)?,
        Cause::Deadline => on_deadline(&mut plan, saga, now)?,
        Cause::Operator(action) => on_operator(&mut plan, saga, action)?,
    }
    Some(plan.next)
}

/// [`expect`] of a reply: `None` when it does not fit what the saga waits on.
fn on_reply(plan: &mut Plan<'_>, saga: &Saga, reply: &Reply) -> Option<()> {
    let definition = plan.definition;
    let (i, action) = waiting_on(saga)?;
    let defined = &definition.steps[i];
    let answers = match action {
        Action::Forward => Some(&defined.forward),
        Action::Compensate => defined.compensation.as_ref(),
    }?;
    let succeeded = matches!(reply.outcome, Outcome::Succeeded);
    // Named as the definition names the outcome the reply reports.
    let named = if succeeded {
        reply.name == answers.success
    } else {
        answers.failure.as_ref() == Some(&reply.name)
    };
    let step = plan.next.steps[i];
    let round = match action {
        Action::Forward => 1..=step.attempts,
        Action::Compensate => step.compensation_budget_from + 1..=step.compensation_attempts,
    };
    let fits = reply.saga_type == definition.name
        && reply.step == saga.steps[i].name
        && reply.action == action
        && named
        && round.contains(&reply.attempt);
    if !fits {
        return None;
    }
    match (action, succeeded) {
        (Action::Forward, true) => {
            plan.next.steps[i].status = StepStatus::Succeeded;
            if i + 1 < definition.steps.len() {
                plan.send_forward(i + 1);
            } else {
                plan.end(SagaState::Completed);
            }
        }
        // Refused: the step changed nothing, only the steps below it are undone.
        (Action::Forward, false) => {
            plan.fail(i);
            plan.compensate_below(i);
        }
        (Action::Compensate, true) => {
            plan.next.steps[i].status = StepStatus::Compensated;
            plan.compensate_below(i);
        }
        // Not undone this time: the deadline sends the next attempt, until the budget
        // is spent.
        (Action::Compensate, false) => {
            let policy = answers.retry;
            if step.round() >= policy.max_attempts {
                plan.stuck(i);
            } else {
                let wait = base_wait(&policy, step.round());
                plan.next.deadline = Deadline::Within(wait..=wait);
            }
        }
    }
    Some(())
}

/// [`expect`] of a deadline: `None` before it passed, or when the saga waits on nothing.
fn on_deadline(plan: &mut Plan<'_>, saga: &Saga, now: DateTime<Utc>) -> Option<()> {
    let definition = plan.definition;
    saga.deadline_at.filter(|deadline| *deadline <= now)?;
    let (i, action) = waiting_on(saga)?;
    let defined = &definition.steps[i];
    let step = plan.next.steps[i];
    match action {
        // Out of attempts, outcome unknown: undone too, if it can be. A step that
        // cannot be undone is retried until it answers.
        Action::Forward => {
            if defined.compensable() && step.attempts >= defined.forward.retry.max_attempts {
                plan.fail(i);
                plan.send_compensation(i);
            } else {
                plan.send_forward(i);
            }
        }
        Action::Compensate => {
            let exhausted = defined
                .compensation
                .as_ref()
                .is_none_or(|c| step.round() >= c.retry.max_attempts);
            if exhausted {
                plan.stuck(i);
            } else {
                plan.send_compensation(i);
            }
        }
    }
    Some(())
}

/// [`expect`] of an operator's action: `None` when the saga's state does not allow it.
fn on_operator(plan: &mut Plan<'_>, saga: &Saga, action: &OperatorAction) -> Option<()> {
    let definition = plan.definition;
    match action {
        OperatorAction::Retry => {
            let j = stuck(saga)?;
            let step = &mut plan.next.steps[j];
            step.compensation_budget_from = step.compensation_attempts;
            plan.next.state = SagaState::Compensating;
            plan.send_compensation(j);
        }
        OperatorAction::Skip => {
            let j = stuck(saga)?;
            plan.next.steps[j].status = StepStatus::CompensationSkipped;
            plan.next.state = SagaState::Compensating;
            plan.compensate_below(j);
        }
        OperatorAction::Abort { .. } => {
            if saga.state != SagaState::Running {
                return None;
            }
            let (i, _) = waiting_on(saga)?;
            if definition.steps[i].compensable() {
                plan.fail(i);
                plan.send_compensation(i);
            } else if saga.steps[i].attempts >= ABANDON_AFTER_ATTEMPTS {
                // Abandoned: it may have acted, so nothing is undone, neither it nor below.
                plan.next.steps[i].status = StepStatus::Failed;
                plan.end(SagaState::Failed);
            } else {
                return None;
            }
        }
    }
    Some(())
}

/// Whether `definition` is the one `saga` runs on: its name, version and steps.
fn runs_on(saga: &Saga, definition: &SagaDefinition) -> bool {
    saga.definition_name == definition.name
        && saga.definition_version == definition.version
        && saga.steps.len() == definition.steps.len()
        && saga
            .steps
            .iter()
            .zip(&definition.steps)
            .all(|(state, step)| state.name == step.name)
}

/// The stuck compensation of a failed saga (none when an operator abandoned a step).
fn stuck(saga: &Saga) -> Option<usize> {
    if saga.state != SagaState::Failed {
        return None;
    }
    saga.steps
        .iter()
        .position(|s| s.status == StepStatus::CompensationFailed)
}

/// The wait for the `round`th attempt of an action, before jitter: its timeout, doubled per
/// earlier attempt, never longer than its cap.
fn base_wait(policy: &RetryPolicy, round: u32) -> TimeDelta {
    let doublings = round.saturating_sub(1).min(20);
    let doubled = (0..doublings).try_fold(policy.timeout, |wait, _| wait.checked_add(&wait));
    doubled.map_or(policy.max_timeout, |wait| wait.min(policy.max_timeout))
}

/// A wait with up to a quarter more for jitter.
fn jittered(policy: &RetryPolicy, round: u32) -> Deadline {
    let base = base_wait(policy, round);
    let extra = TimeDelta::milliseconds(base.num_milliseconds() / 4);
    Deadline::Within(base..=base + extra)
}

/// The model's next saga, built step by step from the old one.
struct Plan<'a> {
    definition: &'a SagaDefinition,
    next: Next,
}

impl<'a> Plan<'a> {
    fn new(saga: &Saga, definition: &'a SagaDefinition) -> Self {
        Self {
            definition,
            next: Next {
                state: saga.state,
                steps: saga.steps.iter().map(Counts::of).collect(),
                command: None,
                end: None,
                // Kept when nothing is sent: only a refused compensation, which sets its own.
                deadline: Deadline::None,
            },
        }
    }

    fn send_forward(&mut self, i: usize) {
        let step = &mut self.next.steps[i];
        step.status = StepStatus::Running;
        step.attempts += 1;
        let attempt = step.attempts;
        self.next.deadline = jittered(&self.definition.steps[i].forward.retry, attempt);
        self.next.command = Some(Sent {
            step: i,
            action: Action::Forward,
            attempt,
        });
    }

    fn send_compensation(&mut self, i: usize) {
        let Some(compensation) = &self.definition.steps[i].compensation else {
            panic!("the model compensates only steps that can be undone");
        };
        let step = &mut self.next.steps[i];
        step.status = StepStatus::Compensating;
        step.compensation_attempts += 1;
        let (attempt, round) = (step.compensation_attempts, step.round());
        self.next.deadline = jittered(&compensation.retry, round);
        self.next.command = Some(Sent {
            step: i,
            action: Action::Compensate,
            attempt,
        });
    }

    /// Step `i` failed (refused, out of attempts, aborted): the saga compensates.
    fn fail(&mut self, i: usize) {
        self.next.steps[i].status = StepStatus::Failed;
        self.next.state = SagaState::Compensating;
    }

    /// The compensation of step `i` is spent: the saga waits for an operator.
    fn stuck(&mut self, i: usize) {
        self.next.steps[i].status = StepStatus::CompensationFailed;
        self.end(SagaState::Failed);
    }

    /// Undoes the nearest step below `i` that is done and can be undone; with none left the
    /// saga is compensated. One compensation at a time, in reverse order.
    fn compensate_below(&mut self, i: usize) {
        let below = (0..i).rev().find(|&j| {
            self.next.steps[j].status == StepStatus::Succeeded
                && self.definition.steps[j].compensable()
        });
        match below {
            Some(j) => self.send_compensation(j),
            None => self.end(SagaState::Compensated),
        }
    }

    fn end(&mut self, state: SagaState) {
        self.next.state = state;
        self.next.end = Some(state);
        self.next.command = None;
        self.next.deadline = Deadline::None;
    }
}

impl Next {
    /// Holds the machine's applied decision (`new`, `effects`, from `old` at `now`) against the
    /// model's answer.
    pub fn check(
        &self,
        old: &Saga,
        new: &Saga,
        effects: &[Effect],
        definition: &SagaDefinition,
        now: DateTime<Utc>,
    ) {
        let context = || format!("expected {self:#?}\n{old:#?}\n→ {new:#?}\n{effects:?}");
        assert_eq!(new.state, self.state, "state: {}", context());
        let steps: Vec<Counts> = new.steps.iter().map(Counts::of).collect();
        assert_eq!(steps, self.steps, "steps: {}", context());

        let sent: Vec<Sent> = commands(effects)
            .map(|(_, command)| Sent {
                step: definition
                    .steps
                    .iter()
                    .position(|s| s.name == command.step)
                    .unwrap_or(usize::MAX),
                action: command.action,
                attempt: command.attempt,
            })
            .collect();
        assert_eq!(sent, Vec::from_iter(self.command), "command: {}", context());

        let ended: Vec<SagaState> = events_of(effects)
            .map(|event| match event {
                SagaEvent::SagaStarted { .. } => panic!("started again: {}", context()),
                SagaEvent::SagaCompleted { .. } => SagaState::Completed,
                SagaEvent::SagaCompensated { .. } => SagaState::Compensated,
                SagaEvent::SagaFailed { .. } => SagaState::Failed,
            })
            .collect();
        assert_eq!(ended, Vec::from_iter(self.end), "event: {}", context());

        match (&self.deadline, new.deadline_at) {
            (Deadline::None, None) => {}
            (Deadline::Within(waits), Some(deadline)) => {
                assert!(waits.contains(&(deadline - now)), "deadline: {}", context());
            }
            _ => panic!("deadline: {}", context()),
        }
    }
}
