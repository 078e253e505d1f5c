//! The envelope around every message the system itself produces (commands, replies, saga
//! events): identity for deduplication, the saga it belongs to, what caused it, and the version
//! of the schema it was written with.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{ContractError, Result};

/// The schema version this build writes and reads. Version 2 made commands and replies generic
/// (named by the saga definitions, not by closed enums). Version 1 is refused like any version
/// this build does not know: no fleet speaking it was ever deployed, so there is nothing to stay
/// compatible with; a rolling upgrade from it would drain the topics first.
pub const SCHEMA_VERSION: u16 = 2;

/// `{"message_id", "saga_id", "causation_id", "schema_version", "occurred_at", "sequence", "type",
/// "payload"}`: the body's `type`/`payload` pair sits beside the envelope fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Unique per message; consumers record it to ignore redeliveries.
    pub message_id: Uuid,
    pub saga_id: Uuid,
    /// The message whose handling produced this one; `None` when the cause was the client's
    /// `OrderPlaced`, which has no message id of its own.
    pub causation_id: Option<Uuid>,
    pub schema_version: u16,
    pub occurred_at: DateTime<Utc>,
    /// Saga events only: the saga's version when the event was written. It grows with every
    /// event of one saga (not by one), so a reader of `saga.events` can order one saga's events
    /// and drop repeats even when several relays published them out of order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    #[serde(flatten)]
    pub body: T,
}

impl<T> Envelope<T> {
    /// Wraps `body` in a fresh envelope with a new message id.
    pub fn new(
        saga_id: Uuid,
        causation_id: Option<Uuid>,
        occurred_at: DateTime<Utc>,
        body: T,
    ) -> Self {
        Self {
            message_id: Uuid::new_v4(),
            saga_id,
            causation_id,
            schema_version: SCHEMA_VERSION,
            occurred_at,
            sequence: None,
            body,
        }
    }

    /// The same envelope with the saga's `sequence` number.
    #[must_use]
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = Some(sequence);
        self
    }
}

impl<T: Serialize> Envelope<T> {
    /// The JSON bytes that go on the wire.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string map keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl<T: DeserializeOwned> Envelope<T> {
    /// Parses an envelope and refuses schema versions this build does not know.
    ///
    /// # Errors
    /// [`ContractError::Malformed`] for bytes that are not this kind of message,
    /// [`ContractError::UnsupportedSchemaVersion`] for a version from the future.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let envelope: Self = serde_json::from_slice(bytes)?;
        if envelope.schema_version != SCHEMA_VERSION {
            return Err(ContractError::UnsupportedSchemaVersion {
                found: envelope.schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(envelope)
    }
}
