//! Validating one definition: the rules of [`super`] and the module documentation, field by
//! field, each failure naming the field.

use std::collections::HashMap;

use chrono::TimeDelta;

use super::{
    raw, trigger_message, ActionDefinition, DefinitionError, FieldPath, PayloadMapping, Problem,
    ReplyMeaning, Routes, SagaDefinition, Shape, Step, StepKind, Trigger, ENGINE_TOPICS,
    MAX_NAME_LEN, MAX_TOPIC_LEN, MAX_WAIT_MS,
};
use crate::policy::RetryPolicy;

/// Validates one file, remembering what it has seen (names, commands, replies, topics).
pub(super) struct Checker<'a> {
    file: &'a str,
    actions: HashMap<String, String>,
    replies: HashMap<String, (ReplyMeaning, String)>,
    routes: Routes,
}

impl<'a> Checker<'a> {
    pub(super) fn new(file: &'a str) -> Self {
        Self {
            file,
            actions: HashMap::new(),
            replies: HashMap::new(),
            routes: Routes::default(),
        }
    }

    fn invalid(&self, field: impl Into<String>, problem: Problem) -> DefinitionError {
        DefinitionError::Invalid {
            file: self.file.to_owned(),
            field: field.into(),
            problem: Box::new(problem),
        }
    }

    pub(super) fn saga(mut self, raw: raw::Saga) -> Result<SagaDefinition, DefinitionError> {
        // Serialising these plain structs cannot fail; the error arm is for completeness.
        let canonical = serde_json::to_string(&raw).map_err(|error| DefinitionError::Stored {
            file: self.file.to_owned(),
            error,
        })?;
        let version = i32::try_from(raw.version)
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| {
                self.invalid(
                    "version",
                    Problem::VersionOutOfRange {
                        version: raw.version,
                    },
                )
            })?;
        self.name("name", &raw.name)?;
        let (trigger, shape) = self.trigger(raw.trigger)?;
        if raw.steps.is_empty() {
            return Err(self.invalid("steps", Problem::NoSteps));
        }
        for (i, step) in raw.steps.iter().enumerate() {
            let field = format!("steps[{i}].name");
            self.name(&field, &step.name)?;
            if let Some(first) = raw.steps[..i].iter().position(|s| s.name == step.name) {
                return Err(self.invalid(
                    field,
                    Problem::DuplicateStep {
                        name: step.name.clone(),
                        first,
                    },
                ));
            }
        }
        let pivot = match &raw.pivot {
            None => None,
            Some(name) => Some(raw.steps.iter().position(|s| &s.name == name).ok_or_else(
                || self.invalid("pivot", Problem::UnknownStep { name: name.clone() }),
            )?),
        };
        let steps = raw
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, step)| {
                let kind = match pivot {
                    Some(p) if i == p => StepKind::Pivot,
                    Some(p) if i > p => StepKind::Retriable,
                    _ => StepKind::Compensable,
                };
                self.step(i, step, kind, raw.pivot.as_deref(), &trigger, shape)
            })
            .collect::<Result<_, _>>()?;
        Ok(SagaDefinition {
            name: raw.name,
            version,
            file: self.file.to_owned(),
            trigger,
            steps,
            canonical,
        })
    }

    fn trigger(&self, raw: raw::Trigger) -> Result<(Trigger, &'static Shape), DefinitionError> {
        self.topic("trigger.topic", &raw.topic)?;
        let message = trigger_message(&raw.message).ok_or_else(|| {
            self.invalid(
                "trigger.message",
                Problem::UnknownTriggerMessage {
                    message: raw.message.clone(),
                },
            )
        })?;
        let shape = message.shape().map_err(|error| {
            self.invalid(
                "trigger.message",
                Problem::TriggerSchema {
                    message: raw.message.clone(),
                    error: error.clone(),
                },
            )
        })?;
        let (key, key_shape) = self.path("trigger.key", &raw.key, &raw.message, shape)?;
        if !key_shape.is_scalar() {
            return Err(self.invalid("trigger.key", Problem::KeyNotScalar { path: raw.key }));
        }
        let trigger = Trigger {
            topic: raw.topic,
            message: raw.message,
            key,
        };
        Ok((trigger, shape))
    }

    fn step(
        &mut self,
        i: usize,
        raw: raw::Step,
        kind: StepKind,
        pivot: Option<&str>,
        trigger: &Trigger,
        shape: &'static Shape,
    ) -> Result<Step, DefinitionError> {
        let at = |field: &str| format!("steps[{i}].{field}");
        self.route(i, &raw, trigger)?;
        self.placed(i, &raw, kind, pivot)?;
        let forward = self.action(
            &at("forward"),
            raw.forward,
            &raw.name,
            kind,
            false,
            trigger,
            shape,
        )?;
        let compensation = match raw.compensation {
            Some(action) => Some(self.action(
                &at("compensation"),
                action,
                &raw.name,
                kind,
                true,
                trigger,
                shape,
            )?),
            None => None,
        };
        Ok(Step {
            name: raw.name,
            participant: raw.participant,
            topic: raw.topic,
            kind,
            forward,
            compensation,
        })
    }

    /// Checks step `i`'s participant and command topic, and notes that the participant reads
    /// that topic.
    fn route(
        &mut self,
        i: usize,
        raw: &raw::Step,
        trigger: &Trigger,
    ) -> Result<(), DefinitionError> {
        let at = |field: &str| format!("steps[{i}].{field}");
        self.name(&at("participant"), &raw.participant)?;
        self.topic(&at("topic"), &raw.topic)?;
        if raw.topic == trigger.topic {
            return Err(self.invalid(
                at("topic"),
                Problem::CommandTopicIsTrigger {
                    topic: raw.topic.clone(),
                },
            ));
        }
        let place = at("topic");
        self.routes
            .add(&raw.participant, &raw.topic, place)
            .map_err(|problem| self.invalid(at("topic"), problem))
    }

    /// Checks that step `i` has what its place before, at or after the pivot allows (a
    /// compensation, a forward failure): a compensation when it is before the pivot, and
    /// none at or after it.
    fn placed(
        &self,
        i: usize,
        raw: &raw::Step,
        kind: StepKind,
        pivot: Option<&str>,
    ) -> Result<(), DefinitionError> {
        let at = |field: &str| format!("steps[{i}].{field}");
        let pivot_name = || pivot.unwrap_or_default().to_owned();
        if kind == StepKind::Retriable && raw.forward.failure.is_some() {
            return Err(self.invalid(
                at("forward.failure"),
                Problem::FailureAfterPivot {
                    step: raw.name.clone(),
                    pivot: pivot_name(),
                },
            ));
        }
        // Whether the step may have a compensation is checked first: a step in the wrong place
        // is the mistake to report, not what follows from it (a missing max_attempts, say).
        match (kind, &raw.compensation) {
            (StepKind::Compensable, Some(_)) | (StepKind::Pivot | StepKind::Retriable, None) => {
                Ok(())
            }
            (StepKind::Compensable, None) => Err(self.invalid(
                at("compensation"),
                Problem::MissingCompensation {
                    step: raw.name.clone(),
                    pivot: pivot.map(str::to_owned),
                },
            )),
            (StepKind::Pivot, Some(_)) => Err(self.invalid(
                at("compensation"),
                Problem::CompensatedPivot {
                    step: raw.name.clone(),
                },
            )),
            (StepKind::Retriable, Some(_)) => Err(self.invalid(
                at("compensation"),
                Problem::CompensationAfterPivot {
                    step: raw.name.clone(),
                    pivot: pivot_name(),
                },
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn action(
        &mut self,
        at: &str,
        raw: raw::Action,
        step: &str,
        kind: StepKind,
        compensation: bool,
        trigger: &Trigger,
        shape: &'static Shape,
    ) -> Result<ActionDefinition, DefinitionError> {
        let field = format!("{at}.action");
        self.message_name(&field, &raw.action)?;
        if let Some(other) = self.actions.get(&raw.action) {
            return Err(self.invalid(
                field,
                Problem::DuplicateAction {
                    action: raw.action,
                    other: other.clone(),
                },
            ));
        }
        self.actions.insert(raw.action.clone(), field);

        let mut fields = Vec::with_capacity(raw.payload.len());
        for (name, path) in raw.payload {
            let field = format!("{at}.payload.{name}");
            if !is_field_name(&name) {
                return Err(self.invalid(field, Problem::InvalidFieldName { name }));
            }
            let (path, _) = self.path(&field, &path, &trigger.message, shape)?;
            fields.push((name, path));
        }

        let (success_meaning, failure_meaning) = if compensation {
            (
                ReplyMeaning::CompensationSuccess,
                ReplyMeaning::CompensationFailure,
            )
        } else {
            (ReplyMeaning::ForwardSuccess, ReplyMeaning::ForwardFailure)
        };
        self.reply(&format!("{at}.success"), &raw.success, success_meaning)?;
        if let Some(failure) = &raw.failure {
            self.reply(&format!("{at}.failure"), failure, failure_meaning)?;
        }

        let gives_up = compensation || kind == StepKind::Compensable;
        let retry = self.retry(&format!("{at}.retry"), &raw.retry, step, gives_up)?;
        Ok(ActionDefinition {
            name: raw.action,
            payload: PayloadMapping { fields },
            success: raw.success,
            failure: raw.failure,
            retry,
        })
    }

    fn reply(
        &mut self,
        field: &str,
        reply: &str,
        meaning: ReplyMeaning,
    ) -> Result<(), DefinitionError> {
        self.message_name(field, reply)?;
        match self.replies.get(reply) {
            Some((other_meaning, other)) if *other_meaning != meaning => Err(self.invalid(
                field,
                Problem::ConflictingReply {
                    reply: reply.to_owned(),
                    meaning: *other_meaning,
                    other: other.clone(),
                },
            )),
            Some(_) => Ok(()),
            None => {
                self.replies
                    .insert(reply.to_owned(), (meaning, field.to_owned()));
                Ok(())
            }
        }
    }

    /// `gives_up`: whether the action has a retry budget (`max_attempts`), or is retried until
    /// it answers.
    fn retry(
        &self,
        at: &str,
        raw: &raw::Retry,
        step: &str,
        gives_up: bool,
    ) -> Result<RetryPolicy, DefinitionError> {
        for (name, ms) in [
            ("timeout_ms", raw.timeout_ms),
            ("max_timeout_ms", raw.max_timeout_ms),
        ] {
            if ms == 0 {
                return Err(self.invalid(format!("{at}.{name}"), Problem::ZeroTimeout));
            }
            if ms > MAX_WAIT_MS {
                return Err(self.invalid(format!("{at}.{name}"), Problem::TimeoutTooLong { ms }));
            }
        }
        if raw.max_timeout_ms < raw.timeout_ms {
            return Err(self.invalid(
                format!("{at}.max_timeout_ms"),
                Problem::MaxTimeoutBelowTimeout {
                    timeout_ms: raw.timeout_ms,
                    max_timeout_ms: raw.max_timeout_ms,
                },
            ));
        }
        let field = format!("{at}.max_attempts");
        let max_attempts = match (gives_up, raw.max_attempts) {
            (true, None) => return Err(self.invalid(field, Problem::MissingAttempts)),
            (true, Some(0)) => return Err(self.invalid(field, Problem::ZeroAttempts)),
            (true, Some(n)) => n,
            (false, None) => u32::MAX,
            (false, Some(_)) => {
                return Err(self.invalid(
                    field,
                    Problem::AttemptsNotApplicable {
                        step: step.to_owned(),
                    },
                ))
            }
        };
        // Both at most MAX_WAIT_MS, so far inside an i64.
        let millis = |ms: u64| TimeDelta::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX));
        Ok(RetryPolicy {
            timeout: millis(raw.timeout_ms),
            max_attempts,
            max_timeout: millis(raw.max_timeout_ms),
        })
    }

    /// Parses `text` as a path and checks it against the trigger message's shape; returns the
    /// path and the shape it points at.
    fn path(
        &self,
        field: &str,
        text: &str,
        message: &str,
        shape: &'static Shape,
    ) -> Result<(FieldPath, &'static Shape), DefinitionError> {
        let path = FieldPath::parse(text).ok_or_else(|| {
            self.invalid(
                field,
                Problem::PathSyntax {
                    path: text.to_owned(),
                },
            )
        })?;
        let mut at = shape;
        for segment in path.segments() {
            at = at.field(segment).ok_or_else(|| {
                self.invalid(
                    field,
                    Problem::UnknownField {
                        path: text.to_owned(),
                        message: message.to_owned(),
                        segment: segment.to_owned(),
                    },
                )
            })?;
        }
        Ok((path, at))
    }

    fn name(&self, field: &str, name: &str) -> Result<(), DefinitionError> {
        let mut chars = name.chars();
        let ok = name.len() <= MAX_NAME_LEN
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(())
        } else {
            Err(self.invalid(
                field,
                Problem::InvalidName {
                    name: name.to_owned(),
                },
            ))
        }
    }

    fn message_name(&self, field: &str, name: &str) -> Result<(), DefinitionError> {
        let mut chars = name.chars();
        let ok = name.len() <= MAX_NAME_LEN
            && chars.next().is_some_and(|c| c.is_ascii_uppercase())
            && chars.all(|c| c.is_ascii_alphanumeric());
        if ok {
            Ok(())
        } else {
            Err(self.invalid(
                field,
                Problem::InvalidMessageName {
                    name: name.to_owned(),
                },
            ))
        }
    }

    fn topic(&self, field: &str, topic: &str) -> Result<(), DefinitionError> {
        let ok = !topic.is_empty()
            && topic.len() <= MAX_TOPIC_LEN
            && topic != "."
            && topic != ".."
            && topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(self.invalid(
                field,
                Problem::InvalidTopic {
                    topic: topic.to_owned(),
                },
            ));
        }
        if ENGINE_TOPICS.contains(&topic) {
            return Err(self.invalid(
                field,
                Problem::EngineTopic {
                    topic: topic.to_owned(),
                },
            ));
        }
        Ok(())
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_NAME_LEN`] characters: a payload field or a path
/// segment.
pub(super) fn is_field_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
