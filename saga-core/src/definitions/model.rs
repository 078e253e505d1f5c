//! The validated definition: a saga type, its trigger, its steps and their actions.

use std::fmt;

use events::{Action, Command, ReplyNames};
use serde_json::{Map, Value};

use super::{is_field_name, trigger_message, DefinitionError, Problem};
use crate::policy::RetryPolicy;

/// One saga type, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaDefinition {
    pub name: String,
    /// At least 1. Sagas run to their end on the version they started with.
    pub version: i32,
    /// The file it was read from, for messages (`stored order v1` when read back from the
    /// database).
    pub file: String,
    pub trigger: Trigger,
    /// In the order they run; never empty.
    pub steps: Vec<Step>,
    /// The definition as JSON, without the file's comments and layout: what the engine stores,
    /// and what [`Self::digest`] hashes, so that a comment changes no version.
    pub canonical: String,
}

impl SagaDefinition {
    /// The index of the pivot, if the saga has one.
    pub fn pivot(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.kind == StepKind::Pivot)
    }

    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Every command of the definition, each built once (attempt 1) from its trigger message's
    /// sample (the first example of its schema): each step's forward action, then its
    /// compensation. The registry checks each against the wire when it loads a definition;
    /// the generator writes each as the command's golden example.
    ///
    /// # Errors
    /// [`DefinitionError::Invalid`] naming the trigger message when it has no sample, or the
    /// action whose command cannot be built from it.
    pub fn sample_commands(&self) -> Result<Vec<SampleCommand<'_>>, DefinitionError> {
        let invalid = |field: String, detail: String| DefinitionError::Invalid {
            file: self.file.clone(),
            field,
            problem: Box::new(Problem::NotOnTheWire { detail }),
        };
        let sample = trigger_message(&self.trigger.message)
            .and_then(|m| m.sample().ok())
            .ok_or_else(|| {
                invalid(
                    "trigger.message".into(),
                    format!("no sample of {}", self.trigger.message),
                )
            })?;
        let mut commands = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let actions = [(Action::Forward, "forward", Some(&step.forward))]
                .into_iter()
                .chain([(
                    Action::Compensate,
                    "compensation",
                    step.compensation.as_ref(),
                )]);
            for (direction, at, action) in actions {
                let Some(action) = action else { continue };
                let field = format!("steps[{i}].{at}");
                let command = action
                    .command(self, step, direction, &sample, 1)
                    .map_err(|e| invalid(field.clone(), e.to_string()))?;
                commands.push(SampleCommand {
                    step: i,
                    action,
                    field,
                    command,
                });
            }
        }
        Ok(commands)
    }

    /// `sha256:` and the hex SHA-256 of [`Self::canonical`]: one version, one content.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let hash = Sha256::digest(self.canonical.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// A command of a definition built from its trigger message's sample
/// ([`SagaDefinition::sample_commands`]).
#[derive(Debug, Clone)]
pub struct SampleCommand<'a> {
    /// The index of its step.
    pub step: usize,
    /// The action it does (the step's forward action or its compensation).
    pub action: &'a ActionDefinition,
    /// Where the definition names it, e.g. `steps[0].forward`.
    pub field: String,
    pub command: Command,
}

/// The message that starts a saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Without `TOPIC_PREFIX`.
    pub topic: String,
    /// The message type, one of [`TRIGGER_MESSAGES`].
    pub message: String,
    /// The field that identifies the saga's subject (and keys its records).
    pub key: FieldPath,
}

impl Trigger {
    /// The saga's key in `message` (the trigger message as JSON), as text: the value at
    /// [`Trigger::key`], text as it is and a number in decimal.
    ///
    /// # Errors
    /// [`PayloadError::Missing`] when `message` has no value there, [`PayloadError::KeyNotScalar`]
    /// when it is not text or a number.
    pub fn key_of(&self, message: &Value) -> Result<String, PayloadError> {
        let path = || self.key.to_string();
        match self.key.resolve(message) {
            None => Err(PayloadError::Missing { path: path() }),
            Some(Value::String(text)) => Ok(text.clone()),
            Some(Value::Number(number)) => Ok(number.to_string()),
            Some(other) => Err(PayloadError::KeyNotScalar {
                path: path(),
                found: match other {
                    Value::Null => "null",
                    Value::Bool(_) => "a boolean",
                    Value::Array(_) => "a list",
                    _ => "an object",
                },
            }),
        }
    }
}

/// Where a step stands relative to the pivot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Before the pivot (or in a saga without one): undone when a later step fails.
    Compensable,
    /// Cannot be undone; once it succeeds, the saga goes forward only.
    Pivot,
    /// After the pivot: cannot be undone, cannot fail, retried until it succeeds.
    Retriable,
}

/// One step: its participant, what it does and how it is undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub participant: String,
    /// The participant's command topic, without `TOPIC_PREFIX`.
    pub topic: String,
    pub kind: StepKind,
    pub forward: ActionDefinition,
    /// `Some` exactly when the step is [`StepKind::Compensable`].
    pub compensation: Option<ActionDefinition>,
}

impl Step {
    /// Whether the step can be undone.
    pub fn compensable(&self) -> bool {
        self.kind == StepKind::Compensable
    }

    /// Gives the step these retry policies (the compensation's only if it has one). A forward
    /// action that is never given up on keeps no attempt limit.
    pub fn set_retry(&mut self, forward: RetryPolicy, compensation: RetryPolicy) {
        let unlimited = self.forward.retry.max_attempts == u32::MAX;
        self.forward.retry = RetryPolicy {
            max_attempts: if unlimited {
                u32::MAX
            } else {
                forward.max_attempts
            },
            ..forward
        };
        if let Some(action) = &mut self.compensation {
            action.retry = compensation;
        }
    }
}

/// A command sent to the participant, and what its replies mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionDefinition {
    /// The command's type name, e.g. `ReserveStock`.
    pub name: String,
    pub payload: PayloadMapping,
    /// The reply that says it was done.
    pub success: String,
    /// The reply that says it was not: a business refusal for a forward action (the step
    /// failed, the ones before it are compensated), "could not undo it this time" for a
    /// compensation (it is retried). `None` when the participant never refuses.
    pub failure: Option<String>,
    /// For the pivot's and the retriable steps' forward actions `max_attempts` is `u32::MAX`:
    /// they are retried until they answer.
    pub retry: RetryPolicy,
}

impl ActionDefinition {
    /// The command for `attempt` of this action, which is `direction` of `step` in `saga`, for
    /// `trigger` (the trigger message as JSON): the step's and saga's names, the saga's key,
    /// the replies that answer it and the mapped payload.
    ///
    /// # Errors
    /// When the trigger lacks a mapped field or a usable key, or the command would break the
    /// wire's bounds (the registry builds every command of a definition when it loads it, so
    /// this does not happen to a loaded one).
    pub fn command(
        &self,
        saga: &SagaDefinition,
        step: &Step,
        direction: Action,
        trigger: &Value,
        attempt: u32,
    ) -> Result<Command, PayloadError> {
        let command = Command {
            name: self.name.clone(),
            saga_type: saga.name.clone(),
            // A definition's version is at least 1; 0 is refused just below.
            saga_version: u32::try_from(saga.version).unwrap_or(0),
            step: step.name.clone(),
            action: direction,
            attempt,
            key: saga.trigger.key_of(trigger)?,
            replies: ReplyNames {
                success: self.success.clone(),
                failure: self.failure.clone(),
            },
            payload: self.payload(trigger)?,
        };
        command
            .validate()
            .map_err(|error| PayloadError::NotOnTheWire {
                action: self.name.clone(),
                error: error.to_string(),
            })?;
        Ok(command)
    }

    /// The command's payload for `trigger` (the trigger message as JSON): the mapped fields.
    ///
    /// # Errors
    /// [`PayloadError::Missing`] when the trigger lacks a mapped field.
    pub fn payload(&self, trigger: &Value) -> Result<Map<String, Value>, PayloadError> {
        self.payload.apply(trigger)
    }
}

/// Payload fields and where in the trigger message each comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PayloadMapping {
    pub(super) fields: Vec<(String, FieldPath)>,
}

impl PayloadMapping {
    /// The fields, by name.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &FieldPath)> {
        self.fields.iter().map(|(name, path)| (name.as_str(), path))
    }

    /// Copies each mapped value of `trigger` (whatever it is: text, number, object, list,
    /// `null`) into a field of its own.
    ///
    /// # Errors
    /// [`PayloadError::Missing`] naming the first path (by field name) `trigger` does not have.
    pub fn apply(&self, trigger: &Value) -> Result<Map<String, Value>, PayloadError> {
        self.fields
            .iter()
            .map(|(name, path)| {
                let value = path.resolve(trigger).ok_or_else(|| PayloadError::Missing {
                    path: path.to_string(),
                })?;
                Ok((name.clone(), value.clone()))
            })
            .collect()
    }
}

/// Why a payload could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("the trigger message has no value at {path}")]
    Missing { path: String },
    #[error("the saga's key at {path} is {found}, not text or a number")]
    KeyNotScalar { path: String, found: &'static str },
    #[error("the {action} command does not fit the wire: {error}")]
    NotOnTheWire { action: String, error: String },
}

/// A field path into the trigger message: `$` (the message) followed by one or more
/// `.field` segments, each `[A-Za-z_][A-Za-z0-9_]*`. No indexes, wildcards or expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<String>,
}

impl FieldPath {
    /// `None` when `text` is not a field path.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("$.")?;
        let segments: Vec<String> = rest.split('.').map(str::to_owned).collect();
        segments
            .iter()
            .all(|s| is_field_name(s))
            .then_some(Self { segments })
    }

    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().map(String::as_str)
    }

    /// The value at this path in `message`, if there is one.
    pub fn resolve<'a>(&self, message: &'a Value) -> Option<&'a Value> {
        self.segments
            .iter()
            .try_fold(message, |value, segment| value.as_object()?.get(segment))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        for segment in &self.segments {
            write!(f, ".{segment}")?;
        }
        Ok(())
    }
}
