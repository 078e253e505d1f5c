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

mod check;
mod errors;
mod load;
mod model;
mod raw;
mod triggers;

pub use errors::{DefinitionError, Problem, ReplyMeaning};
pub use load::{load_dir, parse, parse_stored};
pub use model::{
    ActionDefinition, FieldPath, PayloadError, PayloadMapping, SagaDefinition, SampleCommand, Step,
    StepKind, Trigger,
};
pub use triggers::{
    trigger_message, AcceptedTrigger, SchemaError, Shape, TriggerMessage, TriggerRefused,
    TRIGGER_MESSAGES,
};

use check::{is_field_name, Checker};
use load::Routes;

/// Topics of the engine itself, which no definition may use as a trigger or command topic.
pub const ENGINE_TOPICS: [&str; 3] = ["saga.replies", "saga.events", "saga.dlq"];

/// The longest wait a retry policy may name: 7 days. Longer ones are surely a mistake, and the
/// bound keeps every deadline (`now` plus a wait) far from overflowing.
pub const MAX_WAIT_MS: u64 = 7 * 24 * 3600 * 1000;

/// The longest saga, step, participant, field or message name.
const MAX_NAME_LEN: usize = 64;

/// The longest topic name before `TOPIC_PREFIX` (Kafka allows 249 with the prefix).
const MAX_TOPIC_LEN: usize = 200;

#[cfg(test)]
mod registered;

#[cfg(test)]
/// `error` and each of its causes, on one line.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(&format!(": {error}"));
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests;
