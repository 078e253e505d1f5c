//! Saga definitions as data: one TOML file per saga type under `sagas/` (issue 13). The format
//! and the path syntax are documented in `sagas/README.md`.
//!
//! [`parse`] reads one file into a [`SagaDefinition`] and validates it; [`load_dir`] reads
//! every `*.toml` of a folder and checks them against each other. Every error names the file,
//! and a validation error also the field ([`DefinitionError::Invalid`]). A definition is
//! stored in PostgreSQL in its canonical form ([`SagaDefinition::canonical`], read back by
//! [`parse_stored`]) so that sagas can finish on a version no file holds any more.
//!
//! The rules around the pivot (the step that cannot be undone):
//! - the steps before it are compensable: each has a compensation;
//! - the pivot has no compensation; it may fail (a business failure), and then the steps
//!   before it are compensated;
//! - the steps after it (retriable) have no compensation and no business failure: nothing
//!   before them can be undone any more, so they are retried until they succeed;
//! - a forward action that is never given up on (the pivot's and the retriable steps') takes no
//!   `max_attempts`; every other action (and every compensation) must have one;
//! - without a pivot every step is compensable.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::TimeDelta;
use events::{Action, Command, ReplyNames};
use serde_json::{Map, Value};

use super::policy::RetryPolicy;

/// Topics of the engine itself, which no definition may use as a trigger or command topic.
pub const ENGINE_TOPICS: [&str; 3] = ["saga.replies", "saga.events", "saga.dlq"];

/// The longest wait a retry policy may name: 7 days. Longer ones are surely a mistake, and the
/// bound keeps every deadline (`now` plus a wait) far from overflowing.
pub const MAX_WAIT_MS: u64 = 7 * 24 * 3600 * 1000;

/// The longest saga, step, participant, field or message name.
const MAX_NAME_LEN: usize = 64;

/// The longest topic name before `TOPIC_PREFIX` (Kafka allows 249 with the prefix).
const MAX_TOPIC_LEN: usize = 200;

// ---------------------------------------------------------------------------------------------
// The validated definition.

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

    /// `sha256:` and the hex SHA-256 of [`Self::canonical`]: one version, one content.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let hash = Sha256::digest(self.canonical.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
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
    fields: Vec<(String, FieldPath)>,
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

// ---------------------------------------------------------------------------------------------
// What trigger messages look like, for checking paths at load time.

/// The shape of a trigger message's field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Text,
    Integer,
    Object(&'static [(&'static str, Shape)]),
    List(&'static Shape),
}

impl Shape {
    fn is_scalar(self) -> bool {
        matches!(self, Self::Text | Self::Integer)
    }

    fn field(self, name: &str) -> Option<Shape> {
        match self {
            Self::Object(fields) => fields.iter().find(|(n, _)| *n == name).map(|(_, s)| *s),
            _ => None,
        }
    }
}

const LINE_ITEM: Shape = Shape::Object(&[
    ("sku", Shape::Text),
    ("quantity", Shape::Integer),
    ("unit_price_cents", Shape::Integer),
]);

const ADDRESS: Shape = Shape::Object(&[
    ("country", Shape::Text),
    ("city", Shape::Text),
    ("line1", Shape::Text),
    ("postal_code", Shape::Text),
]);

/// `events::OrderPlaced` as JSON (its `type` tag aside); a test keeps the two in step.
const ORDER_PLACED: Shape = Shape::Object(&[
    ("order_id", Shape::Text),
    ("customer_id", Shape::Text),
    ("items", Shape::List(&LINE_ITEM)),
    ("total_cents", Shape::Integer),
    ("currency", Shape::Text),
    ("shipping_address", ADDRESS),
]);

const RETURN_ITEM: Shape = Shape::Object(&[("sku", Shape::Text), ("quantity", Shape::Integer)]);

/// `events::ReturnRequested` as JSON (its `type` tag aside); a test keeps the two in step.
const RETURN_REQUESTED: Shape = Shape::Object(&[
    ("return_id", Shape::Text),
    ("order_id", Shape::Text),
    ("customer_id", Shape::Text),
    ("items", Shape::List(&RETURN_ITEM)),
    ("refund_cents", Shape::Integer),
    ("currency", Shape::Text),
]);

/// A message that can start a saga: everything the engine knows of it, in one place. A new
/// trigger message is a type in `events` (with its validation) and one entry here.
#[derive(Debug, Clone, Copy)]
pub struct TriggerMessage {
    /// Its `type` on the wire.
    pub name: &'static str,
    /// Its fields as JSON (the `type` tag aside), for checking paths at load time.
    pub shape: Shape,
    /// Reads a record's bytes as this message, checked by its contract rules, and returns it
    /// as JSON (as the typed message writes itself, `type` tag included): what a saga keeps
    /// as its trigger.
    pub decode: fn(&[u8]) -> Result<Value, events::ContractError>,
    /// The fields `SagaStarted` copies from the message, for whoever follows `saga.events`.
    pub summary: &'static [&'static str],
    /// A message with every field of [`Self::shape`], for building each command of a
    /// definition once at load time.
    pub sample: fn() -> Value,
}

impl TriggerMessage {
    /// The `SagaStarted` subject of `trigger`: the [`Self::summary`] fields it has.
    pub fn summary_of(&self, trigger: &Value) -> Map<String, Value> {
        self.summary
            .iter()
            .filter_map(|field| Some(((*field).to_owned(), trigger.get(field)?.clone())))
            .collect()
    }
}

/// `decode` of [`TRIGGER_MESSAGES`]: a typed message's check, then the message as JSON.
fn decoded<T: serde::Serialize>(
    message: Result<T, events::ContractError>,
) -> Result<Value, events::ContractError> {
    let message = message?;
    serde_json::to_value(&message).map_err(|e| events::ContractError::Malformed(e.to_string()))
}

/// The messages a saga can be triggered by.
pub const TRIGGER_MESSAGES: [TriggerMessage; 2] = [
    TriggerMessage {
        name: events::OrderPlaced::TYPE_NAME,
        shape: ORDER_PLACED,
        decode: |bytes| decoded(events::OrderPlaced::from_json(bytes)),
        summary: &["order_id", "customer_id", "total_cents", "currency"],
        sample: || {
            serde_json::json!({
                "type": events::OrderPlaced::TYPE_NAME,
                "order_id": "00000000-0000-4000-8000-000000000001",
                "customer_id": "c",
                "items": [{ "sku": "s", "quantity": 1, "unit_price_cents": 1 }],
                "total_cents": 1,
                "currency": "EUR",
                "shipping_address": { "country": "DE", "city": "c", "line1": "l", "postal_code": "p" }
            })
        },
    },
    TriggerMessage {
        name: events::ReturnRequested::TYPE_NAME,
        shape: RETURN_REQUESTED,
        decode: |bytes| decoded(events::ReturnRequested::from_json(bytes)),
        summary: &[
            "return_id",
            "order_id",
            "customer_id",
            "refund_cents",
            "currency",
        ],
        sample: || {
            serde_json::json!({
                "type": events::ReturnRequested::TYPE_NAME,
                "return_id": "00000000-0000-4000-8000-000000000002",
                "order_id": "00000000-0000-4000-8000-000000000001",
                "customer_id": "c",
                "items": [{ "sku": "s", "quantity": 1 }],
                "refund_cents": 1,
                "currency": "EUR"
            })
        },
    },
];

/// The trigger message named `message`, if there is one.
pub fn trigger_message(message: &str) -> Option<&'static TriggerMessage> {
    TRIGGER_MESSAGES.iter().find(|m| m.name == message)
}

fn trigger_shape(message: &str) -> Option<Shape> {
    trigger_message(message).map(|m| m.shape)
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why the definitions could not be loaded. Each names the file (or folder); validation errors
/// also the field, as a path like `steps[1].forward.retry.timeout_ms`.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read the saga definitions in {}: {error}", dir.display())]
    ReadDir { dir: PathBuf, error: std::io::Error },
    #[error("cannot read {file}: {error}")]
    ReadFile { file: String, error: std::io::Error },
    #[error("{} holds no saga definition (no *.toml file)", dir.display())]
    NoDefinitions { dir: PathBuf },
    /// Not TOML, or not this format: a missing or unknown field, a wrong type. toml's message
    /// names the field and shows the line.
    #[error("{file}: {error}")]
    Syntax {
        file: String,
        error: Box<toml::de::Error>,
    },
    /// A stored definition that does not read back (the database row was changed by hand).
    #[error("{file}: {error}")]
    Stored {
        file: String,
        error: serde_json::Error,
    },
    #[error("{file}: {field}: {problem}")]
    Invalid {
        file: String,
        field: String,
        problem: Box<Problem>,
    },
}

impl DefinitionError {
    /// The file the error is about (`None` for a folder).
    pub fn file(&self) -> Option<&str> {
        match self {
            Self::ReadFile { file, .. }
            | Self::Syntax { file, .. }
            | Self::Stored { file, .. }
            | Self::Invalid { file, .. } => Some(file),
            Self::ReadDir { .. } | Self::NoDefinitions { .. } => None,
        }
    }

    /// The field a validation error is about.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Invalid { problem, .. } => Some(problem.as_ref()),
            _ => None,
        }
    }
}

/// What is wrong with a field (the file and field are in [`DefinitionError::Invalid`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("does not fit the wire: {detail}")]
    NotOnTheWire { detail: String },
    #[error("must be between 1 and {}, got {version}", i32::MAX)]
    VersionOutOfRange { version: i64 },
    #[error("{name:?} is not a name: lower_snake_case, a letter first, at most {MAX_NAME_LEN} characters")]
    InvalidName { name: String },
    #[error("{name:?} is not a message name: UpperCamelCase letters and digits, at most {MAX_NAME_LEN} characters")]
    InvalidMessageName { name: String },
    #[error("{name:?} is not a field name: letters, digits and _, not a digit first, at most {MAX_NAME_LEN} characters")]
    InvalidFieldName { name: String },
    #[error("{topic:?} is not a topic name: 1 to {MAX_TOPIC_LEN} characters of a-z A-Z 0-9 . _ -, not \".\" or \"..\"")]
    InvalidTopic { topic: String },
    #[error("{topic:?} is one of the engine's own topics")]
    EngineTopic { topic: String },
    #[error("{topic:?} is the saga's trigger topic")]
    CommandTopicIsTrigger { topic: String },
    #[error("unknown trigger message {message:?}; known: {}", known_triggers())]
    UnknownTriggerMessage { message: String },
    #[error("{path:?} is not a field path: write $.field or $.field.subfield (no indexes, wildcards or expressions)")]
    PathSyntax { path: String },
    #[error("{path:?}: {message} has no field {segment:?} there")]
    UnknownField {
        path: String,
        message: String,
        segment: String,
    },
    #[error("{path:?} is an object or a list; the key must be a text or number field")]
    KeyNotScalar { path: String },
    #[error("a saga needs at least one step")]
    NoSteps,
    #[error("step {name:?} is already steps[{first}]")]
    DuplicateStep { name: String, first: usize },
    #[error("no step is named {name:?}")]
    UnknownStep { name: String },
    #[error("step {step} {}, so it must be undoable: it needs a compensation", match pivot {
        Some(pivot) => format!("comes before the pivot {pivot}"),
        None => "is in a saga without a pivot".to_owned(),
    })]
    MissingCompensation { step: String, pivot: Option<String> },
    #[error("step {step} is the pivot, which cannot be undone: it takes no compensation")]
    CompensatedPivot { step: String },
    #[error(
        "step {step} comes after the pivot {pivot} and is never undone: it takes no compensation"
    )]
    CompensationAfterPivot { step: String, pivot: String },
    #[error("step {step} comes after the pivot {pivot}: nothing before it can be undone any more, so it cannot fail (it is retried until it succeeds); remove its failure reply")]
    FailureAfterPivot { step: String, pivot: String },
    #[error("must be at least 1 ms")]
    ZeroTimeout,
    #[error("{ms} ms is longer than the longest wait, {MAX_WAIT_MS} ms (7 days)")]
    TimeoutTooLong { ms: u64 },
    #[error("{max_timeout_ms} ms is shorter than timeout_ms ({timeout_ms} ms)")]
    MaxTimeoutBelowTimeout {
        timeout_ms: u64,
        max_timeout_ms: u64,
    },
    #[error("must be at least 1")]
    ZeroAttempts,
    #[error(
        "missing: a step that can be undone, and every compensation, gives up after max_attempts"
    )]
    MissingAttempts,
    #[error(
        "step {step} cannot be undone, so it is retried until it answers: remove max_attempts"
    )]
    AttemptsNotApplicable { step: String },
    #[error("command {action} is already sent at {other}")]
    DuplicateAction { action: String, other: String },
    #[error("reply {reply} already means {meaning} at {other}")]
    ConflictingReply {
        reply: String,
        meaning: ReplyMeaning,
        other: String,
    },
    #[error("participant {participant} already receives its commands on {other_topic:?} ({other}); a participant has one command topic")]
    ParticipantTopicConflict {
        participant: String,
        other_topic: String,
        other: String,
    },
    #[error("topic {topic:?} is already the command topic of participant {other_participant} ({other}); a command topic has one participant")]
    TopicParticipantConflict {
        topic: String,
        other_participant: String,
        other: String,
    },
    #[error("saga {name} version {version} is also defined in {other_file}")]
    DuplicateVersion {
        name: String,
        version: i32,
        other_file: String,
    },
    #[error("step {step} is already a step of saga {other_saga} ({other_file}); a step name belongs to one saga type (participants route by it, and key their step ledger by it)")]
    StepOfAnotherSaga {
        step: String,
        other_saga: String,
        other_file: String,
    },
    #[error("{message} on {topic:?}: that topic already starts saga {other_saga} ({other_file}); a trigger topic starts one saga type")]
    SharedTrigger {
        topic: String,
        message: String,
        other_saga: String,
        other_file: String,
    },
}

/// What a reply says, in which direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMeaning {
    ForwardSuccess,
    ForwardFailure,
    CompensationSuccess,
    CompensationFailure,
}

impl fmt::Display for ReplyMeaning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ForwardSuccess => "a step's success",
            Self::ForwardFailure => "a step's business failure",
            Self::CompensationSuccess => "a compensation's success",
            Self::CompensationFailure => "a compensation's failure",
        })
    }
}

fn known_triggers() -> String {
    TRIGGER_MESSAGES
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// The file format, as serde reads it.

mod raw {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Saga {
        pub name: String,
        pub version: i64,
        pub pivot: Option<String>,
        pub trigger: Trigger,
        #[serde(default)]
        pub steps: Vec<Step>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Trigger {
        pub topic: String,
        pub message: String,
        pub key: String,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Step {
        pub name: String,
        pub participant: String,
        pub topic: String,
        pub forward: Action,
        pub compensation: Option<Action>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Action {
        pub action: String,
        #[serde(default)]
        pub payload: BTreeMap<String, String>,
        pub success: String,
        pub failure: Option<String>,
        pub retry: Retry,
    }

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Retry {
        pub timeout_ms: u64,
        pub max_attempts: Option<u32>,
        pub max_timeout_ms: u64,
    }
}

// ---------------------------------------------------------------------------------------------
// Loading and validating.

/// Reads every `*.toml` file of `dir` (not its subfolders; other files, like a README, are
/// skipped), validates each, and checks them against each other: one definition per saga name
/// and version, one saga type per trigger, one command topic per participant. Sorted by name,
/// then version.
///
/// # Errors
/// The first problem found, naming the file and field.
pub fn load_dir(dir: &Path) -> Result<Vec<SagaDefinition>, DefinitionError> {
    let read_dir = |error| DefinitionError::ReadDir {
        dir: dir.to_owned(),
        error,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let path = entry.map_err(read_dir)?.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(DefinitionError::NoDefinitions {
            dir: dir.to_owned(),
        });
    }
    files.sort();
    let mut definitions = Vec::with_capacity(files.len());
    for path in files {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|error| DefinitionError::ReadFile {
            file: file.clone(),
            error,
        })?;
        definitions.push(parse(&file, &text)?);
    }
    check_together(&definitions)?;
    definitions.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
    Ok(definitions)
}

/// The checks across files, in file order: each definition against the ones before it.
fn check_together(definitions: &[SagaDefinition]) -> Result<(), DefinitionError> {
    let mut routes = Routes::default();
    for (i, definition) in definitions.iter().enumerate() {
        let invalid = |field: &str, problem| DefinitionError::Invalid {
            file: definition.file.clone(),
            field: field.to_owned(),
            problem: Box::new(problem),
        };
        for earlier in &definitions[..i] {
            if earlier.name == definition.name && earlier.version == definition.version {
                return Err(invalid(
                    "version",
                    Problem::DuplicateVersion {
                        name: definition.name.clone(),
                        version: definition.version,
                        other_file: earlier.file.clone(),
                    },
                ));
            }
            // One saga type per trigger topic (whatever the message): a record on it starts
            // that type's saga or is dead-lettered, never a guess between two.
            if earlier.name != definition.name && earlier.trigger.topic == definition.trigger.topic
            {
                return Err(invalid(
                    "trigger",
                    Problem::SharedTrigger {
                        topic: definition.trigger.topic.clone(),
                        message: definition.trigger.message.clone(),
                        other_saga: earlier.name.clone(),
                        other_file: earlier.file.clone(),
                    },
                ));
            }
        }
        for (j, step) in definition.steps.iter().enumerate() {
            let place = format!("{} steps[{j}].topic", definition.file);
            routes
                .add(&step.participant, &step.topic, place)
                .map_err(|problem| invalid(&format!("steps[{j}].topic"), problem))?;
        }
        for (j, step) in definition.steps.iter().enumerate() {
            // A participant routes a command by its step name alone, and its step ledger is
            // keyed by (saga key, step): a step name shared by two saga types would let one
            // type's saga be answered from the other's ledger row when their keys meet.
            let other = definitions[..i].iter().find(|earlier| {
                earlier.name != definition.name && earlier.step(&step.name).is_some()
            });
            if let Some(earlier) = other {
                return Err(invalid(
                    &format!("steps[{j}].name"),
                    Problem::StepOfAnotherSaga {
                        step: step.name.clone(),
                        other_saga: earlier.name.clone(),
                        other_file: earlier.file.clone(),
                    },
                ));
            }
        }
    }
    Ok(())
}

/// Which participant receives commands on which topic, and where that was said first.
#[derive(Default)]
struct Routes {
    topic_of: HashMap<String, (String, String)>,
    participant_of: HashMap<String, (String, String)>,
}

impl Routes {
    fn add(&mut self, participant: &str, topic: &str, place: String) -> Result<(), Problem> {
        if let Some((other_topic, other)) = self.topic_of.get(participant) {
            if other_topic != topic {
                return Err(Problem::ParticipantTopicConflict {
                    participant: participant.to_owned(),
                    other_topic: other_topic.clone(),
                    other: other.clone(),
                });
            }
        }
        if let Some((other_participant, other)) = self.participant_of.get(topic) {
            if other_participant != participant {
                return Err(Problem::TopicParticipantConflict {
                    topic: topic.to_owned(),
                    other_participant: other_participant.clone(),
                    other: other.clone(),
                });
            }
        }
        self.topic_of
            .entry(participant.to_owned())
            .or_insert_with(|| (topic.to_owned(), place.clone()));
        self.participant_of
            .entry(topic.to_owned())
            .or_insert_with(|| (participant.to_owned(), place));
        Ok(())
    }
}

/// Reads and validates one definition; `file` names it in errors.
///
/// # Errors
/// [`DefinitionError::Syntax`] when the text is not TOML of this format (toml's message names
/// the field and line), [`DefinitionError::Invalid`] naming the first field that breaks a rule.
pub fn parse(file: &str, text: &str) -> Result<SagaDefinition, DefinitionError> {
    let raw: raw::Saga = toml::from_str(text).map_err(|error| DefinitionError::Syntax {
        file: file.to_owned(),
        error: Box::new(error),
    })?;
    Checker::new(file).saga(raw)
}

/// Reads a definition back from its canonical form ([`SagaDefinition::canonical`]), as the
/// engine stored it; `label` names it in errors. Validated like a file.
///
/// # Errors
/// [`DefinitionError::Stored`] when `canonical` is not the format, otherwise as [`parse`].
pub fn parse_stored(label: &str, canonical: &str) -> Result<SagaDefinition, DefinitionError> {
    let raw: raw::Saga =
        serde_json::from_str(canonical).map_err(|error| DefinitionError::Stored {
            file: label.to_owned(),
            error,
        })?;
    Checker::new(label).saga(raw)
}

/// Validates one file, remembering what it has seen (names, commands, replies, topics).
struct Checker<'a> {
    file: &'a str,
    actions: HashMap<String, String>,
    replies: HashMap<String, (ReplyMeaning, String)>,
    routes: Routes,
}

impl<'a> Checker<'a> {
    fn new(file: &'a str) -> Self {
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

    fn saga(mut self, raw: raw::Saga) -> Result<SagaDefinition, DefinitionError> {
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

    fn trigger(&self, raw: raw::Trigger) -> Result<(Trigger, Shape), DefinitionError> {
        self.topic("trigger.topic", &raw.topic)?;
        let shape = trigger_shape(&raw.message).ok_or_else(|| {
            self.invalid(
                "trigger.message",
                Problem::UnknownTriggerMessage {
                    message: raw.message.clone(),
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
        shape: Shape,
    ) -> Result<Step, DefinitionError> {
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
            .map_err(|problem| self.invalid(at("topic"), problem))?;

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
        let compensation = match (kind, raw.compensation) {
            (StepKind::Compensable, Some(action)) => Some(action),
            (StepKind::Compensable, None) => {
                return Err(self.invalid(
                    at("compensation"),
                    Problem::MissingCompensation {
                        step: raw.name,
                        pivot: pivot.map(str::to_owned),
                    },
                ))
            }
            (StepKind::Pivot, Some(_)) => {
                return Err(self.invalid(
                    at("compensation"),
                    Problem::CompensatedPivot { step: raw.name },
                ))
            }
            (StepKind::Retriable, Some(_)) => {
                return Err(self.invalid(
                    at("compensation"),
                    Problem::CompensationAfterPivot {
                        step: raw.name,
                        pivot: pivot_name(),
                    },
                ))
            }
            (StepKind::Pivot | StepKind::Retriable, None) => None,
        };
        let forward = self.action(
            &at("forward"),
            raw.forward,
            &raw.name,
            kind,
            false,
            trigger,
            shape,
        )?;
        let compensation = match compensation {
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

    #[allow(clippy::too_many_arguments)]
    fn action(
        &mut self,
        at: &str,
        raw: raw::Action,
        step: &str,
        kind: StepKind,
        compensation: bool,
        trigger: &Trigger,
        shape: Shape,
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
        shape: Shape,
    ) -> Result<(FieldPath, Shape), DefinitionError> {
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
fn is_field_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_LEN
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests;
