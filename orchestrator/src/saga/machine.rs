//! The saga state machine: `(saga, reply, now) -> decision`.
//!
//! ```text
//! running ──all steps succeeded──▶ completed
//!    │
//!    └─a step failed─▶ compensating ──all undone──▶ compensated
//!                           │
//!                           └─a compensation failed─▶ failed (needs an operator)
//! ```
//!
//! A reply moves the saga only when it answers what the saga is waiting for: the current
//! step, in the current direction (forward or compensating), for the current attempt. Anything
//! else (a duplicate, a reply to an earlier attempt, a reply that arrives after the saga moved
//! on) is [`Decision::Ignored`] with the reason, never a second transition.

use chrono::{DateTime, Utc};
use events::{Action, Command, OrderPlaced, Outcome, Reply, SagaEvent, StepName};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::definition::{compensation_command, forward_command, DEFINITION_VERSION, STEPS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    Running,
    Compensating,
    Completed,
    Compensated,
    /// A compensation could not be completed; an operator has to look.
    Failed,
}

impl SagaState {
    pub const ALL: [Self; 5] = [
        Self::Running,
        Self::Compensating,
        Self::Completed,
        Self::Compensated,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Failed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
}

/// What happened to one step of one saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    pub name: StepName,
    pub status: StepStatus,
    /// Forward commands sent for this step (the current attempt number).
    pub attempts: u32,
    /// Compensation commands sent for this step.
    pub compensation_attempts: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub compensation_started_at: Option<DateTime<Utc>>,
    pub compensated_at: Option<DateTime<Utc>>,
    pub failure_reason: Option<String>,
}

impl StepState {
    fn pending(name: StepName) -> Self {
        Self {
            name,
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            started_at: None,
            finished_at: None,
            compensation_started_at: None,
            compensated_at: None,
            failure_reason: None,
        }
    }
}

/// One order's saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saga {
    pub id: Uuid,
    pub order: OrderPlaced,
    pub state: SagaState,
    pub steps: Vec<StepState>,
    /// Why the saga did not complete: the step that failed and its reason.
    pub failure_reason: Option<String>,
    pub definition_version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Something the saga wants done once its new state is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Send(Command),
    Publish(SagaEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Applied {
        saga: Box<Saga>,
        effects: Vec<Effect>,
    },
    Ignored {
        reason: String,
    },
}

impl Saga {
    /// A new saga for `order`, with its first command.
    pub fn start(id: Uuid, order: OrderPlaced, now: DateTime<Utc>) -> (Self, Vec<Effect>) {
        let mut saga = Self {
            id,
            state: SagaState::Running,
            steps: STEPS.iter().map(|s| StepState::pending(s.name)).collect(),
            failure_reason: None,
            definition_version: DEFINITION_VERSION,
            created_at: now,
            updated_at: now,
            finished_at: None,
            order,
        };
        let started = SagaEvent::SagaStarted {
            order_id: saga.order.order_id,
            customer_id: saga.order.customer_id.clone(),
            total_cents: saga.order.total_cents,
            currency: saga.order.currency.clone(),
        };
        let mut effects = vec![Effect::Publish(started)];
        effects.push(saga.begin_step(0, now));
        (saga, effects)
    }

    /// The index of the step the saga waits on, if it waits on one.
    pub fn current_step(&self) -> Option<usize> {
        let waiting_for = match self.state {
            SagaState::Running => StepStatus::Running,
            SagaState::Compensating => StepStatus::Compensating,
            _ => return None,
        };
        self.steps.iter().position(|s| s.status == waiting_for)
    }

    /// Decides what `reply` does to the saga.
    pub fn on_reply(&self, reply: &Reply, now: DateTime<Utc>) -> Decision {
        let expected_action = match self.state {
            SagaState::Running => Action::Forward,
            SagaState::Compensating => Action::Compensate,
            terminal => {
                return ignored(format!("the saga is already {}", terminal.as_str()));
            }
        };
        let Some(index) = self.current_step() else {
            return ignored(format!(
                "the saga is {} but waits on no step",
                self.state.as_str()
            ));
        };
        let step = &self.steps[index];
        if reply.step() != step.name || reply.action() != expected_action {
            return ignored(format!(
                "{} answers {} ({:?}), but the saga waits on {} ({:?})",
                reply.type_name(),
                reply.step().as_str(),
                reply.action(),
                step.name.as_str(),
                expected_action
            ));
        }
        let current_attempt = match expected_action {
            Action::Forward => step.attempts,
            Action::Compensate => step.compensation_attempts,
        };
        if reply.attempt() != current_attempt {
            return ignored(format!(
                "{} is for attempt {}, but the current attempt is {current_attempt}",
                reply.type_name(),
                reply.attempt()
            ));
        }

        let mut saga = self.clone();
        saga.updated_at = now;
        let effects = match (expected_action, reply.outcome()) {
            (Action::Forward, Outcome::Succeeded) => saga.step_succeeded(index, now),
            (Action::Forward, Outcome::Failed { reason }) => saga.step_failed(index, reason, now),
            (Action::Compensate, Outcome::Succeeded) => saga.compensation_succeeded(index, now),
            (Action::Compensate, Outcome::Failed { reason }) => {
                saga.compensation_failed(index, reason, now)
            }
        };
        Decision::Applied {
            saga: Box::new(saga),
            effects,
        }
    }

    fn begin_step(&mut self, index: usize, now: DateTime<Utc>) -> Effect {
        let step = &mut self.steps[index];
        step.status = StepStatus::Running;
        step.attempts += 1;
        step.started_at.get_or_insert(now);
        Effect::Send(forward_command(step.name, &self.order, step.attempts))
    }

    fn step_succeeded(&mut self, index: usize, now: DateTime<Utc>) -> Vec<Effect> {
        let step = &mut self.steps[index];
        step.status = StepStatus::Succeeded;
        step.finished_at = Some(now);
        if index + 1 < self.steps.len() {
            return vec![self.begin_step(index + 1, now)];
        }
        self.state = SagaState::Completed;
        self.finished_at = Some(now);
        vec![Effect::Publish(SagaEvent::SagaCompleted {
            order_id: self.order.order_id,
        })]
    }

    fn step_failed(&mut self, index: usize, reason: String, now: DateTime<Utc>) -> Vec<Effect> {
        let step = &mut self.steps[index];
        step.status = StepStatus::Failed;
        step.finished_at = Some(now);
        step.failure_reason = Some(reason.clone());
        self.failure_reason = Some(format!("{} failed: {reason}", step.name.as_str()));
        self.state = SagaState::Compensating;
        self.compensate_below(index, now)
    }

    fn compensation_succeeded(&mut self, index: usize, now: DateTime<Utc>) -> Vec<Effect> {
        let step = &mut self.steps[index];
        step.status = StepStatus::Compensated;
        step.compensated_at = Some(now);
        self.compensate_below(index, now)
    }

    fn compensation_failed(
        &mut self,
        index: usize,
        reason: String,
        now: DateTime<Utc>,
    ) -> Vec<Effect> {
        let step = &mut self.steps[index];
        step.status = StepStatus::CompensationFailed;
        step.failure_reason = Some(reason.clone());
        let why = format!("compensation of {} failed: {reason}", step.name.as_str());
        self.failure_reason = Some(match self.failure_reason.take() {
            Some(original) => format!("{original}; then {why}"),
            None => why,
        });
        self.state = SagaState::Failed;
        self.finished_at = Some(now);
        vec![Effect::Publish(SagaEvent::SagaFailed {
            order_id: self.order.order_id,
            reason: self.failure_reason.clone().unwrap_or_default(),
        })]
    }

    /// Starts undoing the nearest succeeded step below `index`, or ends the saga as
    /// compensated when there is none. Compensations run one at a time, in reverse order.
    fn compensate_below(&mut self, index: usize, now: DateTime<Utc>) -> Vec<Effect> {
        let order_id = self.order.order_id;
        for step in self.steps[..index].iter_mut().rev() {
            if step.status != StepStatus::Succeeded {
                continue;
            }
            let next_attempt = step.compensation_attempts + 1;
            if let Some(command) = compensation_command(step.name, order_id, next_attempt) {
                step.status = StepStatus::Compensating;
                step.compensation_attempts = next_attempt;
                step.compensation_started_at.get_or_insert(now);
                return vec![Effect::Send(command)];
            }
        }
        self.state = SagaState::Compensated;
        self.finished_at = Some(now);
        vec![Effect::Publish(SagaEvent::SagaCompensated {
            order_id,
            reason: self.failure_reason.clone().unwrap_or_default(),
        })]
    }
}

fn ignored(reason: String) -> Decision {
    Decision::Ignored { reason }
}
