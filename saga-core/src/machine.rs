//! The saga state machine: `(saga, reply, now) -> decision`.
//!
//! ```text
//! running ──all steps succeeded──▶ completed
//!    │  │
//!    │  └─an operator abandons a step that cannot be undone and never answered─▶ failed
//!    │                                                  (nothing undone; settled by hand)
//!    └─a step failed─▶ compensating ──all undone──▶ compensated
//!                           │
//!                           └─a compensation failed─▶ failed (needs an operator)
//! ```
//!
//! A reply moves the saga only when it answers what the saga is waiting for: the current
//! step, in the current direction (forward or compensating), for the current attempt. Anything
//! else (a duplicate, a reply to an earlier attempt, a reply that arrives after the saga moved
//! on) is [`Decision::Ignored`] with the reason, never a second transition.
//!
//! Every command sent arms the saga's deadline. When it passes ([`Saga::on_deadline`]), the
//! command is sent again with the next attempt number (the participant answers a repeated
//! step from its ledger instead of acting twice). A forward step that runs out of attempts
//! failed with its outcome unknown, so it is compensated too, before the steps below it; a step
//! without compensation (the last, the saga's pivot) is retried until it answers instead.
//! Compensations retry, with growing waits, until their budget is spent; then the saga is
//! `failed` and waits for an operator ([`Saga::on_operator`]: retry, skip or abort). A step
//! that cannot be undone and is never answered (its command parked, dead-lettered, its
//! participant gone) would be re-sent for ever: once a wait has passed without an answer an
//! operator may abandon it (`abort`), which leaves the saga `failed` without undoing anything,
//! since the step may have acted.

use chrono::{DateTime, TimeDelta, Utc};
use events::{Action, Command, Outcome, Reply, SagaEvent};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::definitions::{trigger_message, ActionDefinition, PayloadError, SagaDefinition};

/// A saga's state (the orchestrator stores it by [`SagaState::as_str`] in PostgreSQL's
/// `saga_state`).
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
    /// An operator chose to leave this step as it is.
    CompensationSkipped,
}

impl StepStatus {
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Compensating,
        Self::Compensated,
        Self::CompensationFailed,
        Self::CompensationSkipped,
    ];
}

/// What happened to one step of one saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    pub status: StepStatus,
    /// Forward commands sent for this step (the current attempt number).
    pub attempts: u32,
    /// Compensation commands sent for this step.
    pub compensation_attempts: u32,
    /// `compensation_attempts` when the current retry budget began (an operator's retry
    /// grants a fresh budget).
    #[serde(default)]
    pub compensation_budget_from: u32,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub compensation_started_at: Option<DateTime<Utc>>,
    pub compensated_at: Option<DateTime<Utc>>,
    pub failure_reason: Option<String>,
}

impl StepState {
    fn pending(name: String) -> Self {
        Self {
            name,
            status: StepStatus::Pending,
            attempts: 0,
            compensation_attempts: 0,
            compensation_budget_from: 0,
            started_at: None,
            finished_at: None,
            compensation_started_at: None,
            compensated_at: None,
            failure_reason: None,
        }
    }
}

/// One saga: of one type (its definition), started by one trigger message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saga {
    pub id: Uuid,
    /// The message that started it, as JSON (the order saga: an `OrderPlaced`). Every
    /// command's payload is mapped from it.
    pub trigger: Value,
    /// The trigger's value at the definition's `trigger.key`, as text (the order saga: the
    /// order id): one saga per saga type and key, and what its commands and replies carry.
    pub key: String,
    pub state: SagaState,
    pub steps: Vec<StepState>,
    /// Why the saga did not complete: the step that failed and its reason.
    pub failure_reason: Option<String>,
    /// The definition the saga started on, and runs to its end on.
    pub definition_name: String,
    pub definition_version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// When the saga stops waiting for the reply to its last command.
    pub deadline_at: Option<DateTime<Utc>>,
}

/// What an operator can do to a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorAction {
    /// A `failed` saga: try the stuck compensation again, with a fresh retry budget.
    Retry,
    /// A `failed` saga: leave the stuck step as it is and go on compensating the ones below.
    Skip,
    /// A `running` saga: stop, and compensate what was done. At a step that cannot be undone
    /// (the pivot, or one after it) whose command went unanswered past its first wait, the
    /// step is abandoned instead: the saga is `failed`, nothing is undone, and the operator
    /// settles by hand whatever the step may have done ([`Saga::on_operator`]).
    Abort { reason: String },
}

impl OperatorAction {
    /// The state a saga must be in for the action to apply; in any other, it is refused (and
    /// the API document says so per action: `x-saga-state`, which the page reads).
    pub fn applies_in(&self) -> SagaState {
        match self {
            Self::Retry | Self::Skip => SagaState::Failed,
            Self::Abort { .. } => SagaState::Running,
        }
    }
}

/// Something the saga wants done once its new state is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A command for the participant on `topic` (without the deployment's prefix).
    Send {
        topic: String,
        command: Command,
    },
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
    /// A new saga of `definition` for `trigger` (the trigger message as JSON, checked by its
    /// contract), with its first command.
    ///
    /// # Errors
    /// When `trigger` has no usable key at the definition's `trigger.key`.
    pub fn start(
        id: Uuid,
        trigger: Value,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Result<(Self, Vec<Effect>), PayloadError> {
        let key = definition.trigger.key_of(&trigger)?;
        let mut saga = Self {
            id,
            state: SagaState::Running,
            steps: definition
                .steps
                .iter()
                .map(|s| StepState::pending(s.name.clone()))
                .collect(),
            failure_reason: None,
            definition_name: definition.name.clone(),
            definition_version: definition.version,
            created_at: now,
            updated_at: now,
            finished_at: None,
            deadline_at: None,
            trigger,
            key,
        };
        let started = SagaEvent::SagaStarted {
            saga_type: saga.definition_name.clone(),
            key: saga.key.clone(),
            subject: trigger_message(&definition.trigger.message)
                .map(|m| m.summary_of(&saga.trigger))
                .unwrap_or_default(),
        };
        let mut effects = vec![Effect::Publish(started)];
        effects.extend(saga.send_forward(0, now, 0.0, definition));
        Ok((saga, effects))
    }

    /// What the saga's events other than `SagaStarted` say of its subject: the key's field of
    /// the trigger, under its name (the order saga: `order_id`).
    fn key_subject(&self, definition: &SagaDefinition) -> Map<String, Value> {
        let key = &definition.trigger.key;
        key.segments()
            .last()
            .zip(key.resolve(&self.trigger))
            .map(|(name, value)| (name.to_owned(), value.clone()))
            .into_iter()
            .collect()
    }

    /// Whether `definition` is the one this saga runs on (same name, version and steps).
    pub fn runs_on(&self, definition: &SagaDefinition) -> bool {
        self.definition_name == definition.name
            && self.definition_version == definition.version
            && self.steps.len() == definition.steps.len()
            && self
                .steps
                .iter()
                .zip(&definition.steps)
                .all(|(state, step)| state.name == step.name)
    }

    /// The reason a decision is refused when the caller passes another definition than the
    /// saga's own (a caller's bug; never a panic on a step index).
    fn foreign(&self, definition: &SagaDefinition) -> Option<Decision> {
        (!self.runs_on(definition)).then(|| {
            ignored(format!(
                "the saga runs on {} v{}, not on {} v{}",
                self.definition_name, self.definition_version, definition.name, definition.version
            ))
        })
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

    /// The step an operator looks at: the one the saga waits on, or for a failed saga the
    /// compensation that could not be completed.
    pub fn step_in_focus(&self) -> Option<&str> {
        let index = match self.state {
            // The stuck compensation, or the step an operator abandoned.
            SagaState::Failed => self
                .steps
                .iter()
                .position(|s| s.status == StepStatus::CompensationFailed)
                .or_else(|| {
                    self.steps
                        .iter()
                        .position(|s| s.status == StepStatus::Failed)
                }),
            _ => self.current_step(),
        };
        index.map(|i| self.steps[i].name.as_str())
    }

    /// Decides what `reply` does to the saga.
    pub fn on_reply(
        &self,
        reply: &Reply,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Decision {
        let (index, direction, outcome) = match self.answered_by(reply, definition) {
            Ok(answer) => answer,
            Err(refused) => return refused,
        };
        let mut saga = self.clone();
        saga.updated_at = now;
        let effects = match (direction, outcome) {
            (Action::Forward, Outcome::Succeeded) => saga.step_succeeded(index, now, definition),
            (Action::Forward, Outcome::Failed { reason }) => {
                saga.step_failed(index, reason, now, definition)
            }
            (Action::Compensate, Outcome::Succeeded) => {
                saga.compensation_succeeded(index, now, definition)
            }
            (Action::Compensate, Outcome::Failed { reason }) => {
                saga.compensation_refused(index, reason, now, definition)
            }
        };
        applied(saga, effects)
    }

    /// What `reply` answers: the index of the step the saga waits on, the direction it waits
    /// in and the reply's outcome; or the decision to ignore it, with why. A reply answers
    /// only the step and direction the saga waits on, with that action's success or failure
    /// reply (as the definition names them), for one of the current attempts.
    fn answered_by(
        &self,
        reply: &Reply,
        definition: &SagaDefinition,
    ) -> Result<(usize, Action, Outcome), Decision> {
        if let Some(refused) = self.foreign(definition) {
            return Err(refused);
        }
        let expected_action = match self.state {
            SagaState::Running => Action::Forward,
            SagaState::Compensating => Action::Compensate,
            terminal => {
                return Err(ignored(format!(
                    "the saga is already {}",
                    terminal.as_str()
                )));
            }
        };
        let Some(index) = self.current_step() else {
            return Err(ignored(format!(
                "the saga is {} but waits on no step",
                self.state.as_str()
            )));
        };
        let step = &self.steps[index];
        if reply.saga_type != definition.name {
            return Err(ignored(format!(
                "{} answers a {} saga, but this saga is {}",
                reply.name, reply.saga_type, definition.name
            )));
        }
        if reply.step != step.name || reply.action != expected_action {
            return Err(ignored(format!(
                "{} answers {} ({:?}), but the saga waits on {} ({:?})",
                reply.name, reply.step, reply.action, step.name, expected_action
            )));
        }
        // What the reply means is the definition's to say.
        let step_definition = &definition.steps[index];
        let Some(action) = (match expected_action {
            Action::Forward => Some(&step_definition.forward),
            Action::Compensate => step_definition.compensation.as_ref(),
        }) else {
            return Err(ignored(format!("{} has no compensation", step.name)));
        };
        let outcome = outcome_of(reply, action)?;
        // Any attempt of the current step and direction is an answer: the participant's ledger
        // answers every attempt of one step alike, so an earlier attempt's reply that arrives
        // late says what the latest would say. (Waiting for the latest attempt's own reply
        // livelocked sagas whose replies were slower than the longest wait.) Compensation
        // attempts before an operator's retry belong to an earlier round and stay ignored.
        let (first_attempt, current_attempt) = match expected_action {
            Action::Forward => (1, step.attempts),
            Action::Compensate => (
                step.compensation_budget_from + 1,
                step.compensation_attempts,
            ),
        };
        if !(first_attempt..=current_attempt).contains(&reply.attempt) {
            return Err(ignored(format!(
                "{} is for attempt {}, but the current attempts are {first_attempt} to {current_attempt}",
                reply.name, reply.attempt
            )));
        }
        Ok((index, expected_action, outcome))
    }

    /// The step whose deadline has passed at `now`, or why a deadline decision does not apply
    /// (another definition's saga, no deadline or not yet passed, no step waited on).
    fn waiting_past_deadline(
        &self,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Result<usize, Decision> {
        if let Some(refused) = self.foreign(definition) {
            return Err(refused);
        }
        match self.deadline_at {
            None => return Err(ignored("the saga has no deadline".into())),
            Some(deadline) if deadline > now => {
                return Err(ignored(format!("the deadline {deadline} has not passed")))
            }
            Some(_) => {}
        }
        self.current_step().ok_or_else(|| {
            ignored(format!(
                "the saga is {} and waits on no step",
                self.state.as_str()
            ))
        })
    }

    /// Decides what the passing of the saga's deadline does: send the command again with the
    /// next attempt, or give up on the step. `jitter` in `[0, 1)` spreads the next wait.
    pub fn on_deadline(
        &self,
        now: DateTime<Utc>,
        jitter: f64,
        definition: &SagaDefinition,
    ) -> Decision {
        let index = match self.waiting_past_deadline(now, definition) {
            Ok(index) => index,
            Err(refused) => return refused,
        };
        let mut saga = self.clone();
        saga.updated_at = now;
        let step = &saga.steps[index];
        let step_definition = &definition.steps[index];
        let effects = if saga.state == SagaState::Running {
            // A step that cannot be undone is never given up on: its outcome unknown, it may
            // have acted, and nothing could take that back. It is retried (at the longest
            // wait) until its participant answers; its definition gives it no attempt limit.
            if step_definition.forward.retry.exhausted(step.attempts)
                && step_definition.compensable()
            {
                let reason = format!("no reply after {} attempts; outcome unknown", step.attempts);
                saga.step_timed_out(index, reason, now, definition)
            } else {
                saga.send_forward(index, now, jitter, definition)
            }
        } else {
            let round = step.compensation_attempts - step.compensation_budget_from;
            let exhausted = step_definition
                .compensation
                .as_ref()
                .is_none_or(|c| c.retry.exhausted(round));
            if exhausted {
                let last = step
                    .failure_reason
                    .clone()
                    .unwrap_or_else(|| "no reply".into());
                let reason = format!("did not succeed after {round} attempts (last: {last})");
                saga.fail(index, &reason, now, definition)
            } else {
                saga.send_compensation(index, now, jitter, definition)
            }
        };
        applied(saga, effects)
    }

    /// The deadline passed, but the command is known to be still on its way: its participant
    /// is working through records queued before it (or its reply through those queued for
    /// the orchestrator). Waits `wait` longer, with no new attempt: sending the command again
    /// would only queue a copy behind the first, which the participant reaches later, and
    /// under a backlog every such copy deepens it. The attempts and the step stay as they are.
    pub fn postpone_deadline(
        &self,
        now: DateTime<Utc>,
        wait: TimeDelta,
        definition: &SagaDefinition,
    ) -> Decision {
        if let Err(refused) = self.waiting_past_deadline(now, definition) {
            return refused;
        }
        let mut saga = self.clone();
        saga.updated_at = now;
        saga.deadline_at = Some(now + wait.max(TimeDelta::zero()));
        applied(saga, Vec::new())
    }

    /// Decides what an operator's action does. Ignored (with the reason) when the action does
    /// not fit the saga's state.
    pub fn on_operator(
        &self,
        action: &OperatorAction,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Decision {
        if let Some(refused) = self.foreign(definition) {
            return refused;
        }
        let mut saga = self.clone();
        saga.updated_at = now;
        let stuck = self
            .steps
            .iter()
            .position(|s| s.status == StepStatus::CompensationFailed);
        if self.state != action.applies_in() {
            return ignored(match action {
                OperatorAction::Abort { .. } => format!(
                    "only a running saga can be aborted; this one is {}",
                    self.state.as_str()
                ),
                OperatorAction::Retry | OperatorAction::Skip => stuck_only(self.state),
            });
        }
        let effects = match (action, stuck) {
            (OperatorAction::Retry, Some(index)) => {
                saga.state = SagaState::Compensating;
                saga.finished_at = None;
                let step = &mut saga.steps[index];
                step.compensation_budget_from = step.compensation_attempts;
                saga.send_compensation(index, now, 0.0, definition)
            }
            (OperatorAction::Skip, Some(index)) => {
                saga.state = SagaState::Compensating;
                saga.finished_at = None;
                saga.steps[index].status = StepStatus::CompensationSkipped;
                saga.compensate_below(index, now, definition)
            }
            (OperatorAction::Abort { reason }, _) => {
                let Some(index) = self.current_step() else {
                    return ignored("the saga waits on no step".into());
                };
                if !definition.steps[index].compensable() {
                    // Its command may have acted, and nothing could take that back: the steps
                    // below it are never undone on the strength of a guess. But a command
                    // that never arrives (parked by the relay, dead-lettered by its
                    // participant, its participant gone) is re-sent for ever; once one full
                    // wait has passed without an answer the operator may abandon the step,
                    // leaving the saga `failed` for them to settle.
                    let step = &self.steps[index];
                    if step.attempts < ABANDON_AFTER_ATTEMPTS {
                        return ignored(format!(
                            "{} cannot be undone and its command may still be answered; it can \
                             be abandoned (the saga left failed, nothing undone) once its first \
                             wait has passed without a reply",
                            step.name
                        ));
                    }
                    saga.abandon(index, reason, now, definition)
                } else {
                    saga.step_timed_out(
                        index,
                        format!("aborted by operator: {reason}"),
                        now,
                        definition,
                    )
                }
            }
            (OperatorAction::Retry | OperatorAction::Skip, None) => {
                return ignored(stuck_only(self.state))
            }
        };
        applied(saga, effects)
    }

    fn send_forward(
        &mut self,
        index: usize,
        now: DateTime<Utc>,
        jitter: f64,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let step_definition = &definition.steps[index];
        let step = &mut self.steps[index];
        step.status = StepStatus::Running;
        step.attempts += 1;
        step.started_at.get_or_insert(now);
        let jitter = if step.attempts == 1 {
            spread(self.id, index)
        } else {
            jitter
        };
        let attempts = step.attempts;
        self.deadline_at = Some(now + step_definition.forward.retry.wait_for(attempts, jitter));
        self.send(index, definition, Action::Forward, attempts, now)
    }

    /// The command of step `index` in `direction` for `attempt`, to the step's topic. Should the
    /// definition not make a command of this saga's trigger (the registry builds every command
    /// of a definition when it loads it, so it should not happen), the saga is `failed` with
    /// the reason rather than waiting forever for a reply to a command it never sent.
    fn send(
        &mut self,
        index: usize,
        definition: &SagaDefinition,
        direction: Action,
        attempt: u32,
        now: DateTime<Utc>,
    ) -> Vec<Effect> {
        let step = &definition.steps[index];
        let action = match direction {
            Action::Forward => Some(&step.forward),
            Action::Compensate => step.compensation.as_ref(),
        };
        let Some(action) = action else {
            return self.fail(
                index,
                "cannot be sent: the step has no compensation",
                now,
                definition,
            );
        };
        let command = action.command(definition, step, direction, &self.trigger, attempt);
        match command {
            Ok(command) => vec![Effect::Send {
                topic: step.topic.clone(),
                command,
            }],
            Err(error) => self.fail(index, &format!("cannot be sent: {error}"), now, definition),
        }
    }

    /// Sends the next compensation attempt of a step (nothing for a step without one).
    fn send_compensation(
        &mut self,
        index: usize,
        now: DateTime<Utc>,
        jitter: f64,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let step_definition = &definition.steps[index];
        let Some(compensation) = &step_definition.compensation else {
            return Vec::new();
        };
        let step = &mut self.steps[index];
        step.status = StepStatus::Compensating;
        step.compensation_attempts += 1;
        step.compensation_started_at.get_or_insert(now);
        let round = step.compensation_attempts - step.compensation_budget_from;
        let jitter = if round == 1 {
            spread(self.id, index)
        } else {
            jitter
        };
        let attempts = step.compensation_attempts;
        self.deadline_at = Some(now + compensation.retry.wait_for(round, jitter));
        self.send(index, definition, Action::Compensate, attempts, now)
    }

    fn step_succeeded(
        &mut self,
        index: usize,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let step = &mut self.steps[index];
        step.status = StepStatus::Succeeded;
        step.finished_at = Some(now);
        if index + 1 < self.steps.len() {
            return self.send_forward(index + 1, now, 0.0, definition);
        }
        self.finish(SagaState::Completed, now);
        vec![Effect::Publish(SagaEvent::SagaCompleted {
            saga_type: self.definition_name.clone(),
            key: self.key.clone(),
            subject: self.key_subject(definition),
        })]
    }

    /// The participant refused the step: it changed nothing, so only the steps below it are
    /// undone.
    fn step_failed(
        &mut self,
        index: usize,
        reason: String,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        self.mark_failed(index, reason, now);
        self.compensate_below(index, now, definition)
    }

    /// The step ended without an answer (timed out, or aborted): it may have acted, so it is
    /// undone too when it can be. Its participant compensates "nothing" harmlessly and refuses
    /// the forward command if it arrives later.
    fn step_timed_out(
        &mut self,
        index: usize,
        reason: String,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        self.mark_failed(index, reason, now);
        if definition.steps[index].compensable() {
            self.send_compensation(index, now, 0.0, definition)
        } else {
            self.compensate_below(index, now, definition)
        }
    }

    fn mark_failed(&mut self, index: usize, reason: String, now: DateTime<Utc>) {
        let step = &mut self.steps[index];
        step.status = StepStatus::Failed;
        step.finished_at = Some(now);
        self.failure_reason
            .get_or_insert_with(|| format!("{} failed: {reason}", step.name));
        step.failure_reason = Some(reason);
        self.state = SagaState::Compensating;
    }

    fn compensation_succeeded(
        &mut self,
        index: usize,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let step = &mut self.steps[index];
        step.status = StepStatus::Compensated;
        step.compensated_at = Some(now);
        self.compensate_below(index, now, definition)
    }

    /// The participant could not undo the step this time: wait, then try again (the deadline
    /// sends the next attempt), until the budget is spent.
    fn compensation_refused(
        &mut self,
        index: usize,
        reason: String,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let Some(compensation) = &definition.steps[index].compensation else {
            return Vec::new();
        };
        let step = &mut self.steps[index];
        let round = step.compensation_attempts - step.compensation_budget_from;
        if compensation.retry.exhausted(round) {
            let why = format!("failed after {round} attempts: {reason}");
            return self.fail(index, &why, now, definition);
        }
        step.failure_reason = Some(reason);
        self.deadline_at = Some(now + compensation.retry.wait_for(round, 0.0));
        Vec::new()
    }

    /// An operator gives up on step `index`, which cannot be undone and never answered: it may
    /// or may not have acted, so nothing is undone, neither it nor the steps below it. The
    /// saga is `failed`, with why, for the operator to settle by hand; a late reply is still
    /// recorded in its history (ignored), and says what the step did.
    fn abandon(
        &mut self,
        index: usize,
        reason: &str,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let step = &mut self.steps[index];
        let why = format!(
            "abandoned by operator after {} unanswered attempts: {reason}; its outcome is \
             unknown and nothing was undone",
            step.attempts
        );
        step.status = StepStatus::Failed;
        step.finished_at = Some(now);
        self.failure_reason
            .get_or_insert_with(|| format!("{} {why}", step.name));
        step.failure_reason = Some(why);
        self.end_failed(now, definition)
    }

    /// Gives up on compensating `index`: the saga is `failed` until an operator acts.
    fn fail(
        &mut self,
        index: usize,
        why: &str,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let step = &mut self.steps[index];
        step.status = StepStatus::CompensationFailed;
        let why = format!("compensation of {} {why}", step.name);
        step.failure_reason = Some(why.clone());
        self.failure_reason = Some(match self.failure_reason.take() {
            Some(original) => format!("{original}; then {why}"),
            None => why,
        });
        self.end_failed(now, definition)
    }

    /// Ends the saga `failed`, for an operator, and says so on `saga.events` with its reason.
    fn end_failed(&mut self, now: DateTime<Utc>, definition: &SagaDefinition) -> Vec<Effect> {
        self.finish(SagaState::Failed, now);
        vec![Effect::Publish(SagaEvent::SagaFailed {
            saga_type: self.definition_name.clone(),
            key: self.key.clone(),
            subject: self.key_subject(definition),
            reason: self.failure_reason.clone().unwrap_or_default(),
        })]
    }

    /// Ends the saga in a terminal `state`: nothing more to wait for.
    fn finish(&mut self, state: SagaState, now: DateTime<Utc>) {
        self.state = state;
        self.finished_at = Some(now);
        self.deadline_at = None;
    }

    /// Starts undoing the nearest succeeded step below `index`, or ends the saga as
    /// compensated when there is none. Compensations run one at a time, in reverse order.
    fn compensate_below(
        &mut self,
        index: usize,
        now: DateTime<Utc>,
        definition: &SagaDefinition,
    ) -> Vec<Effect> {
        let next = (0..index).rev().find(|&i| {
            self.steps[i].status == StepStatus::Succeeded && definition.steps[i].compensable()
        });
        if let Some(i) = next {
            return self.send_compensation(i, now, 0.0, definition);
        }
        self.finish(SagaState::Compensated, now);
        vec![Effect::Publish(SagaEvent::SagaCompensated {
            saga_type: self.definition_name.clone(),
            key: self.key.clone(),
            subject: self.key_subject(definition),
            reason: self.failure_reason.clone().unwrap_or_default(),
        })]
    }
}

/// The attempts a step that cannot be undone must have had before an operator may abandon it:
/// its first wait passed without an answer, so the deadline sent it again.
pub const ABANDON_AFTER_ATTEMPTS: u32 = 2;

fn applied(saga: Saga, effects: Vec<Effect>) -> Decision {
    Decision::Applied {
        saga: Box::new(saga),
        effects,
    }
}

/// Why a retry or a skip does not apply to a saga in `state`.
fn stuck_only(state: SagaState) -> String {
    format!(
        "retry and skip apply to a failed saga with a stuck compensation; this one is {}",
        state.as_str()
    )
}

/// The outcome of `reply` when it is `action`'s success or failure reply (as the definition
/// names them), else the decision to ignore it.
fn outcome_of(reply: &Reply, action: &ActionDefinition) -> Result<Outcome, Decision> {
    match &reply.outcome {
        outcome @ Outcome::Succeeded if reply.name == action.success => Ok(outcome.clone()),
        outcome @ Outcome::Failed { .. } if action.failure.as_deref() == Some(&reply.name) => {
            Ok(outcome.clone())
        }
        _ => Err(ignored(format!(
            "{} ({}) is neither {}'s success ({}) nor its failure ({})",
            reply.name,
            match reply.outcome {
                Outcome::Succeeded => "succeeded",
                Outcome::Failed { .. } => "failed",
            },
            action.name,
            action.success,
            action.failure.as_deref().unwrap_or("none")
        ))),
    }
}

fn ignored(reason: String) -> Decision {
    Decision::Ignored { reason }
}

/// The jitter of a step's first wait: a fraction in `[0, 1)` that differs from saga to saga
/// and step to step but is always the same for one of them, so that sagas started in one burst
/// do not all time out and re-send in one burst, and the machine stays a pure function.
/// (Re-sends get their jitter from the caller, as `on_deadline`'s argument.)
fn spread(saga_id: Uuid, step: usize) -> f64 {
    // splitmix64's finaliser: every input bit moves about half of the output bits.
    let (high, low) = saga_id.as_u64_pair();
    let mut x = high ^ low.rotate_left(17) ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    // The top 53 bits make an f64 in [0, 1) exactly.
    (x >> 11) as f64 / (1u64 << 53) as f64
}
