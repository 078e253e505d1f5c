//! The invariants: what every stored saga looks like ([`check_saga`]), how a saga starts
//! ([`check_start`]) and what one applied decision may change ([`check_transition`]).

use chrono::{DateTime, TimeDelta, Utc};
use events::{Action, Command, Outcome, SagaEvent};
use serde_json::Value;

use super::{commands, events_of, terminal, waiting_on, Cause};
use crate::definitions::trigger_message;
use crate::{Effect, OperatorAction, Saga, SagaDefinition, SagaState, StepStatus};

fn is_undone(status: StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Compensated | StepStatus::CompensationSkipped
    )
}

fn is_compensation(status: StepStatus) -> bool {
    matches!(
        status,
        StepStatus::Compensating
            | StepStatus::Compensated
            | StepStatus::CompensationFailed
            | StepStatus::CompensationSkipped
    )
}

/// The saga's key in its trigger, as the definition's `trigger.key` names it: text as it is, a
/// number in decimal.
fn key_in(trigger: &Value, definition: &SagaDefinition) -> Option<String> {
    match definition.trigger.key.resolve(trigger)? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// A new saga runs its first step, announces itself with its trigger's summary and sends the
/// first step's first command.
///
/// # Panics
/// When the start breaks a rule.
pub fn check_start(saga: &Saga, effects: &[Effect], now: DateTime<Utc>, d: &SagaDefinition) {
    assert_eq!(saga.state, SagaState::Running, "{saga:#?}");
    assert_eq!((saga.created_at, saga.updated_at), (now, now));
    assert_eq!(saga.definition_name, d.name);
    assert_eq!(saga.definition_version, d.version);
    assert_eq!(Some(&saga.key), key_in(&saga.trigger, d).as_ref());
    assert!(saga.failure_reason.is_none() && saga.finished_at.is_none());
    let statuses: Vec<(StepStatus, u32)> =
        saga.steps.iter().map(|s| (s.status, s.attempts)).collect();
    let mut expected = vec![(StepStatus::Pending, 0); d.steps.len()];
    expected[0] = (StepStatus::Running, 1);
    assert_eq!(statuses, expected, "{saga:#?}");
    check_saga(saga, d);
    assert_eq!(effects.len(), 2, "{effects:?}");
    match &effects[0] {
        Effect::Publish(SagaEvent::SagaStarted {
            saga_type,
            key,
            subject,
        }) => {
            assert_eq!((saga_type, key), (&d.name, &saga.key));
            let summary = trigger_message(&d.trigger.message)
                .expect("a loaded definition's trigger message is known")
                .summary;
            for field in summary {
                assert_eq!(subject.get(*field), saga.trigger.get(*field), "{field}");
            }
            assert_eq!(subject.len(), summary.len(), "{subject:?}");
        }
        other => panic!("a saga starts by announcing itself, not {other:?}"),
    }
    match &effects[1] {
        Effect::Send { topic, command } => {
            assert_eq!(
                (command.step.as_str(), command.action, command.attempt),
                (d.steps[0].name.as_str(), Action::Forward, 1),
                "{command:?}"
            );
            check_command(saga, topic, command, d);
        }
        other => panic!("a saga starts with its first step, not {other:?}"),
    }
}

/// A command is its definition's action for its step and direction, to the step's topic, for
/// the saga's type, version and key, and carries exactly what the definition maps of the
/// trigger; it fits the wire.
fn check_command(saga: &Saga, topic: &str, command: &Command, definition: &SagaDefinition) {
    assert_eq!(command.key, saga.key, "{command:?}");
    assert_eq!(command.saga_type, definition.name, "{command:?}");
    assert_eq!(
        i64::from(command.saga_version),
        i64::from(definition.version)
    );
    let step = definition.step(&command.step).expect("a defined step");
    assert_eq!(topic, step.topic, "{command:?}");
    let action = match command.action {
        Action::Forward => Some(&step.forward),
        Action::Compensate => step.compensation.as_ref(),
    }
    .expect("a command of a defined action");
    assert_eq!(command.name, action.name);
    assert_eq!(command.replies.success, action.success);
    assert_eq!(command.replies.failure, action.failure);
    assert_eq!(command.payload.len(), action.payload.fields().count());
    for (field, path) in action.payload.fields() {
        assert_eq!(
            command.payload.get(field),
            path.resolve(&saga.trigger),
            "{field}"
        );
    }
    if let Err(error) = command.validate() {
        panic!("a command off the wire's bounds ({error}): {command:?}");
    }
}

/// The shape every stored saga has.
///
/// # Panics
/// When `saga` breaks it.
pub fn check_saga(saga: &Saga, definition: &SagaDefinition) {
    let names: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
    let defined: Vec<&str> = definition.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, defined);
    assert_eq!(saga.definition_name, definition.name);
    assert_eq!(saga.definition_version, definition.version);
    assert!(saga.created_at <= saga.updated_at);
    check_times(saga, definition);
    for i in 0..saga.steps.len() {
        check_step(saga, i, definition);
    }
    let statuses: Vec<StepStatus> = saga.steps.iter().map(|s| s.status).collect();
    match saga.state {
        SagaState::Running | SagaState::Completed => check_going_forward(saga, &statuses),
        SagaState::Compensating | SagaState::Compensated | SagaState::Failed => {
            check_compensation(saga, &statuses, definition)
        }
    }
    assert_eq!(
        waiting_on(saga).is_none(),
        terminal(saga.state),
        "waits on nothing: {saga:#?}"
    );
}

/// A saga's finish and deadline against its state and its definition's waits.
fn check_times(saga: &Saga, definition: &SagaDefinition) {
    // Terminal ⇔ finished, no deadline; waiting ⇔ a deadline after the last change, no
    // further than the longest wait.
    let ended = terminal(saga.state);
    assert_eq!(ended, saga.finished_at.is_some(), "{saga:#?}");
    assert_eq!(ended, saga.deadline_at.is_none(), "{saga:#?}");
    if let Some(deadline) = saga.deadline_at {
        let wait = deadline - saga.updated_at;
        let longest = definition
            .steps
            .iter()
            .flat_map(|s| [Some(&s.forward), s.compensation.as_ref()])
            .flatten()
            .map(|a| a.retry.max_timeout + a.retry.max_timeout / 4)
            .max()
            .expect("a definition has steps");
        assert!(
            wait > TimeDelta::zero() && wait <= longest,
            "wait {wait}: {saga:#?}"
        );
    }
    if let Some(finished) = saga.finished_at {
        assert!(saga.created_at <= finished && finished <= saga.updated_at);
    }
}

/// The steps of a running or completed saga: done, then (running) one under way and the rest
/// not started.
fn check_going_forward(saga: &Saga, statuses: &[StepStatus]) {
    assert!(saga.failure_reason.is_none(), "{saga:#?}");
    let done = statuses
        .iter()
        .take_while(|&&s| s == StepStatus::Succeeded)
        .count();
    if saga.state == SagaState::Completed {
        assert_eq!(done, statuses.len(), "{saga:#?}");
    } else {
        assert_eq!(statuses[done], StepStatus::Running, "{saga:#?}");
        assert!(
            statuses[done + 1..]
                .iter()
                .all(|&s| s == StepStatus::Pending),
            "{saga:#?}"
        );
    }
}

/// The steps of a saga that failed: the one that failed, the steps below it undone from the
/// top down, as its state says.
fn check_compensation(saga: &Saga, statuses: &[StepStatus], definition: &SagaDefinition) {
    let count = |s: StepStatus| statuses.iter().filter(|&&x| x == s).count();
    assert!(saga.failure_reason.is_some(), "{saga:#?}");
    assert_eq!(count(StepStatus::Running), 0, "{saga:#?}");
    // The step that failed is the last one that started; nothing after it started.
    let failed = statuses
        .iter()
        .rposition(|&s| s != StepStatus::Pending)
        .expect("a step failed");
    assert_ne!(statuses[failed], StepStatus::Succeeded, "{saga:#?}");
    assert!(count(StepStatus::Failed) <= 1, "{saga:#?}");
    // Below it, from the top down: undone steps, at most one compensation under way
    // or stuck, then steps still done. Compensation runs in reverse order.
    let mut phase = 0;
    for &s in statuses[..=failed].iter().rev() {
        let rank = match s {
            StepStatus::Failed => continue,
            s if is_undone(s) => 0,
            StepStatus::Compensating | StepStatus::CompensationFailed => 1,
            StepStatus::Succeeded => 2,
            other => panic!("{other:?} in a compensating saga: {saga:#?}"),
        };
        assert!(rank >= phase, "compensation out of order: {saga:#?}");
        phase = rank;
    }
    let active = count(StepStatus::Compensating) + count(StepStatus::CompensationFailed);
    match saga.state {
        SagaState::Compensating => {
            assert_eq!(count(StepStatus::Compensating), 1, "{saga:#?}");
            assert_eq!(active, 1, "{saga:#?}");
        }
        // A step that cannot be undone, abandoned by an operator: nothing undone.
        SagaState::Failed if count(StepStatus::CompensationFailed) == 0 => {
            assert_eq!(statuses[failed], StepStatus::Failed, "{saga:#?}");
            assert!(!definition.steps[failed].compensable(), "{saga:#?}");
            assert_eq!(active, 0, "{saga:#?}");
            assert!(
                statuses[..failed]
                    .iter()
                    .all(|&s| s == StepStatus::Succeeded),
                "{saga:#?}"
            );
        }
        SagaState::Failed => {
            assert_eq!(count(StepStatus::CompensationFailed), 1, "{saga:#?}");
            assert_eq!(active, 1, "{saga:#?}");
        }
        _ => {
            assert_eq!(active, 0, "{saga:#?}");
            assert_eq!(
                count(StepStatus::Succeeded),
                0,
                "left a step done: {saga:#?}"
            );
        }
    }
}

/// The shape of step `i` of a stored saga.
fn check_step(saga: &Saga, i: usize, definition: &SagaDefinition) {
    let step = &saga.steps[i];
    assert!(
        step.compensation_budget_from <= step.compensation_attempts,
        "{saga:#?}"
    );
    if step.status == StepStatus::Pending {
        assert_eq!(step.attempts, 0, "{saga:#?}");
        assert_eq!(step.compensation_attempts, 0, "{saga:#?}");
        assert!(step.started_at.is_none() && step.finished_at.is_none());
        return;
    }
    assert!(step.attempts >= 1, "{saga:#?}");
    let started = step.started_at.expect("a started step has started_at");
    assert!(saga.created_at <= started && started <= saga.updated_at);
    let defined = &definition.steps[i];
    if defined.compensable() {
        assert!(
            step.attempts <= defined.forward.retry.max_attempts,
            "{saga:#?}"
        );
    }
    // A step is done or undone, never both.
    assert_eq!(
        step.status == StepStatus::Compensated,
        step.compensated_at.is_some(),
        "{saga:#?}"
    );
    if is_compensation(step.status) {
        assert!(defined.compensable(), "{saga:#?}");
        let policy = defined.compensation.as_ref().map(|c| c.retry);
        assert!(step.compensation_attempts >= 1, "{saga:#?}");
        assert!(step.compensation_started_at.is_some());
        assert!(step.finished_at.is_some(), "{saga:#?}");
        let round = step.compensation_attempts - step.compensation_budget_from;
        assert!(policy.is_some_and(|p| round <= p.max_attempts), "{saga:#?}");
        if step.status == StepStatus::Compensating {
            assert!(round >= 1, "{saga:#?}");
        }
    } else {
        assert_eq!(step.compensation_attempts, 0, "{saga:#?}");
        assert!(step.compensation_started_at.is_none());
    }
    match step.status {
        StepStatus::Running => assert!(step.finished_at.is_none()),
        StepStatus::Succeeded => assert!(step.finished_at.is_some()),
        StepStatus::Failed => {
            assert!(step.finished_at.is_some() && step.failure_reason.is_some());
        }
        _ => {}
    }
}

/// Whether one decision may move a step from `from` to `to`.
fn allowed(from: StepStatus, to: StepStatus) -> bool {
    use StepStatus::*;
    from == to
        || matches!(
            (from, to),
            (Pending, Running)
                | (Running, Succeeded | Failed | Compensating)
                | (Succeeded | Failed, Compensating)
                | (Compensating, Compensated | CompensationFailed)
                | (CompensationFailed, Compensating | CompensationSkipped)
        )
}

/// What one applied decision may do to a saga: `old` became `new` with `effects` at `now`,
/// because of `cause`, after the saga sent `sent_before`.
///
/// # Panics
/// When the transition breaks a rule.
pub fn check_transition(
    old: &Saga,
    new: &Saga,
    effects: &[Effect],
    cause: &Cause<'_>,
    sent_before: &[Command],
    now: DateTime<Utc>,
    definition: &SagaDefinition,
) {
    let context = || format!("{old:#?}\n→ {new:#?}\n{effects:?}");
    assert_eq!(new.id, old.id);
    assert_eq!((&new.trigger, &new.key), (&old.trigger, &old.key));
    assert_eq!(new.created_at, old.created_at);
    assert_eq!(new.definition_name, old.definition_name);
    assert_eq!(new.definition_version, old.definition_version);
    // The last change moves forward with the clock.
    assert!(old.updated_at <= now, "{}", context());
    assert_eq!(new.updated_at, now);

    // Completed and compensated are final; failed moves only by an operator's retry or skip,
    // back to compensating (or straight on to compensated), never forward.
    match old.state {
        SagaState::Completed | SagaState::Compensated => {
            panic!("moved a finished saga: {}", context())
        }
        SagaState::Failed => {
            assert!(
                matches!(
                    cause,
                    Cause::Operator(OperatorAction::Retry | OperatorAction::Skip)
                ),
                "{}",
                context()
            );
            assert!(
                matches!(new.state, SagaState::Compensating | SagaState::Compensated),
                "{}",
                context()
            );
        }
        SagaState::Compensating => assert!(
            !matches!(new.state, SagaState::Running | SagaState::Completed),
            "{}",
            context()
        ),
        SagaState::Running => {}
    }
    if let Some(reason) = &old.failure_reason {
        let new_reason = new.failure_reason.as_deref().unwrap_or_default();
        assert!(new_reason.starts_with(reason.as_str()), "{}", context());
    }

    for (a, b) in old.steps.iter().zip(&new.steps) {
        assert!(
            allowed(a.status, b.status),
            "{:?} → {:?}: {}",
            a.status,
            b.status,
            context()
        );
        assert!(b.attempts >= a.attempts && b.attempts <= a.attempts + 1);
        assert!(b.compensation_attempts >= a.compensation_attempts);
        assert!(b.compensation_attempts <= a.compensation_attempts + 1);
        assert!(b.compensation_budget_from >= a.compensation_budget_from);
    }

    check_sends(old, new, effects, cause, sent_before, definition);
    check_events(new, effects, definition);
}

/// At most one command, and it is what the saga now waits for: its current step, in its
/// direction, to the step's topic, with a new attempt number; forward only while nothing was
/// undone, compensations in reverse order.
fn check_sends(
    old: &Saga,
    new: &Saga,
    effects: &[Effect],
    cause: &Cause<'_>,
    sent_before: &[Command],
    definition: &SagaDefinition,
) {
    let context = || format!("{old:#?}\n→ {new:#?}\n{effects:?}");
    let sends: Vec<(&String, &Command)> = commands(effects).collect();
    assert!(sends.len() <= 1, "{}", context());
    // A step's index in the definition, by its wire name.
    let index_of = |s: &str| definition.steps.iter().position(|d| d.name == s);
    for &(topic, command) in &sends {
        let i = index_of(&command.step).expect("a defined step");
        assert_eq!(waiting_on(new), Some((i, command.action)), "{}", context());
        let (attempt, before) = match command.action {
            Action::Forward => (new.steps[i].attempts, old.steps[i].attempts),
            Action::Compensate => (
                new.steps[i].compensation_attempts,
                old.steps[i].compensation_attempts,
            ),
        };
        assert_eq!(command.attempt, attempt, "{}", context());
        assert_eq!(attempt, before + 1, "{}", context());
        check_command(new, topic, command, definition);
        let compensated_before = sent_before
            .iter()
            .filter(|c| c.action == Action::Compensate)
            .map(|c| c.step.as_str());
        match command.action {
            // Forward only while nothing was undone, and only after the steps before it.
            Action::Forward => {
                assert_eq!(compensated_before.count(), 0, "{}", context());
                assert!(
                    new.steps[..i]
                        .iter()
                        .all(|s| s.status == StepStatus::Succeeded),
                    "{}",
                    context()
                );
            }
            // Compensations in reverse order: never a step above one already compensated,
            // and nothing above it still done.
            Action::Compensate => {
                for earlier in compensated_before {
                    assert!(index_of(earlier) >= Some(i), "{}", context());
                }
                assert!(
                    new.steps[i + 1..]
                        .iter()
                        .all(|s| s.status != StepStatus::Succeeded),
                    "{}",
                    context()
                );
            }
        }
    }
    if sends.is_empty() && !terminal(new.state) {
        // Only a refused compensation leaves the saga waiting without sending: the deadline
        // sends the next attempt.
        let refused = matches!(
            cause,
            Cause::Reply(reply)
                if reply.action == Action::Compensate
                    && matches!(reply.outcome, Outcome::Failed { .. })
        );
        assert!(refused, "{}", context());
        assert_eq!(new.state, SagaState::Compensating);
        assert_eq!(waiting_on(new), waiting_on(old), "{}", context());
    }
}

/// An event for each terminal state reached, and only then, naming the saga's subject by the
/// key's field of the trigger and, for a saga that did not complete, why.
fn check_events(new: &Saga, effects: &[Effect], definition: &SagaDefinition) {
    let context = || format!("{new:#?}\n{effects:?}");
    let published: Vec<&SagaEvent> = events_of(effects).collect();
    assert!(published.len() <= 1, "{}", context());
    for event in &published {
        assert_eq!(event.key(), new.key);
        assert_eq!(event.saga_type(), new.definition_name);
        let subject = match event {
            SagaEvent::SagaStarted { .. } => panic!("started twice: {}", context()),
            SagaEvent::SagaCompleted { subject, .. }
            | SagaEvent::SagaCompensated { subject, .. }
            | SagaEvent::SagaFailed { subject, .. } => subject,
        };
        let key = &definition.trigger.key;
        let field = key.segments().last().expect("a key names a field");
        assert_eq!(subject.len(), 1, "{}", context());
        assert_eq!(
            subject.get(field),
            key.resolve(&new.trigger),
            "{}",
            context()
        );
    }
    let expected = match new.state {
        SagaState::Completed => Some("SagaCompleted"),
        SagaState::Compensated => Some("SagaCompensated"),
        SagaState::Failed => Some("SagaFailed"),
        SagaState::Running | SagaState::Compensating => None,
    };
    let got = published.first().map(|e| match e {
        SagaEvent::SagaStarted { .. } => "SagaStarted",
        SagaEvent::SagaCompleted { .. } => "SagaCompleted",
        SagaEvent::SagaCompensated { .. } => "SagaCompensated",
        SagaEvent::SagaFailed { .. } => "SagaFailed",
    });
    assert_eq!(got, expected, "{}", context());
    if let Some(SagaEvent::SagaFailed { reason, .. } | SagaEvent::SagaCompensated { reason, .. }) =
        published.first()
    {
        assert_eq!(Some(reason), new.failure_reason.as_ref(), "{}", context());
    }
}
