//! Why definitions could not be loaded: the error, and each rule a definition can break.

use std::fmt;
use std::path::PathBuf;

use super::{SchemaError, MAX_NAME_LEN, MAX_TOPIC_LEN, MAX_WAIT_MS, TRIGGER_MESSAGES};

/// Why the definitions could not be loaded. Each names the file (or folder); validation errors
/// also the field, as a path like `steps[1].forward.retry.timeout_ms`.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read the saga definitions in {}", dir.display())]
    ReadDir {
        dir: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("cannot read {file}")]
    ReadFile {
        file: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{} holds no saga definition (no *.toml file)", dir.display())]
    NoDefinitions { dir: PathBuf },
    /// Not TOML, or not this format: a missing or unknown field, a wrong type. toml's message
    /// (the source) names the field and shows the line.
    #[error("{file}: not a saga definition")]
    Syntax {
        file: String,
        #[source]
        error: Box<toml::de::Error>,
    },
    /// A stored definition that does not read back (the database row was changed by hand).
    #[error("{file}: the stored definition does not read back")]
    Stored {
        file: String,
        #[source]
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
    #[error("the schema of {message} cannot be read")]
    TriggerSchema {
        message: String,
        #[source]
        error: SchemaError,
    },
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

pub(super) fn known_triggers() -> String {
    TRIGGER_MESSAGES
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}
