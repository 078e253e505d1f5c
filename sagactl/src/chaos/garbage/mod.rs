//! Garbage for the chaos suite: hostile records published to every topic the services consume
//! while sagas run, and the audit of the dead-letter topic afterwards: every garbage record
//! must be set aside there exactly once, and nothing else may be. The topics, and the valid
//! messages the garbage is made from, come from the saga definitions.
//!
//! `records.rs` builds the records, `send.rs` publishes them on a schedule, `dead_letters.rs`
//! reads the dead-letter topic, and `audit.rs` checks one against the other.

mod audit;
mod dead_letters;
mod records;
mod send;

use std::sync::Arc;

use clap::ValueEnum;
use events::Topics;
use saga_core::definitions::SagaDefinition;

pub use audit::{audit, Audit};
pub use dead_letters::DeadLetterReader;
pub use send::{producer, GarbageFaults, GarbageLog};

use crate::deployment::{Deployment, ORCHESTRATOR};

/// What a garbage record is made of. Each is built so that no consumer may act on it: all of
/// them belong in the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum GarbageKind {
    /// Raw NUL bytes in the key and in the payload.
    NulBytes,
    /// A well-formed message with an escaped NUL (`\u0000`) in a string, which PostgreSQL's
    /// text and jsonb cannot hold.
    NulInJson,
    /// Invalid UTF-8 in the key and inside a JSON string.
    InvalidUtf8,
    /// The first half of a valid message.
    TruncatedJson,
    /// A valid message whose `type` is `OrderCancelled` (on a trigger topic: its trigger).
    /// Commands and replies are generic, named by the saga definitions, so there the message
    /// is also of a kind nobody knows: a command for a step `cancel_order` that no participant
    /// serves, a reply with the outcome `cancelled`.
    UnknownType,
    /// A valid message without its `type`.
    MissingType,
    /// A valid envelope with `schema_version` 999 (on a trigger topic: the trigger in an
    /// envelope).
    FutureSchema,
    /// A valid message of another topic: another saga type's trigger (a reply when there is
    /// one saga type) on a trigger topic, another participant's command on a command topic, a
    /// command on `saga.replies`.
    WrongMessage,
    /// A zero-length payload.
    EmptyPayload,
    /// No payload at all (a tombstone).
    NullPayload,
    /// No key.
    NoKey,
    /// A key with a NUL byte.
    NulKey,
    /// A 200 KB `tracestate` header beside a valid `traceparent`.
    HugeHeader,
    /// Header names and values of any bytes, as a client of another language may send them:
    /// names that are not UTF-8 (`c3 28` once crashed every consumer that met it), with NUL,
    /// empty and 64 KiB long; null values; trace headers that are not text.
    AnyBytesHeaders,
    /// A 1,040,000-byte payload: more than librdkafka's default `message.max.bytes`
    /// (1,000,000), less than the broker's (1,048,588).
    HugePayload,
}

impl GarbageKind {
    pub fn name(self) -> String {
        super::args::value_name(self)
    }
}

/// A consumed topic, which the garbage visits in turn.
#[derive(Debug, Clone)]
pub enum Target {
    /// A saga type's trigger topic.
    Trigger(Arc<SagaDefinition>),
    /// A participant's command topic; the valid message there is the forward command of its
    /// first step in `saga`.
    Commands {
        participant: String,
        topic: String,
        saga: Arc<SagaDefinition>,
        step: usize,
    },
    Replies,
}

impl Target {
    /// Every topic the services consume: each saga type's trigger topic, each participant's
    /// command topic, and the replies.
    pub fn all(deployment: &Deployment) -> Vec<Self> {
        let mut targets: Vec<Self> = deployment.sagas().cloned().map(Self::Trigger).collect();
        for participant in &deployment.participants {
            let first_step = deployment.sagas().find_map(|saga| {
                let step = saga
                    .steps
                    .iter()
                    .position(|s| s.participant == participant.name)?;
                Some((Arc::clone(saga), step))
            });
            if let Some((saga, step)) = first_step {
                targets.push(Self::Commands {
                    participant: participant.name.clone(),
                    topic: participant.topic.clone(),
                    saga,
                    step,
                });
            }
        }
        targets.push(Self::Replies);
        targets
    }

    fn topic(&self, topics: &Topics) -> String {
        match self {
            Self::Trigger(saga) => topics.named(&saga.trigger.topic),
            Self::Commands { topic, .. } => topics.named(topic),
            Self::Replies => topics.replies(),
        }
    }

    /// The consumer group that reads the topic in a chaos run.
    fn group(&self, prefix: &str) -> String {
        match self {
            Self::Trigger(_) | Self::Replies => format!("{prefix}{ORCHESTRATOR}"),
            Self::Commands { participant, .. } => format!("{prefix}{participant}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The targets of the repository's definitions.
    pub(super) fn targets() -> Vec<Target> {
        Target::all(&crate::deployment::tests::repository())
    }

    #[test]
    fn every_consumed_topic_is_a_target() {
        let topics = Topics::new("");
        let names: Vec<String> = targets().iter().map(|t| t.topic(&topics)).collect();
        assert_eq!(
            names,
            [
                "orders",
                "returns",
                "inventory.commands",
                "payment.commands",
                "returns.commands",
                "shipping.commands",
                "saga.replies"
            ]
        );
    }
}
