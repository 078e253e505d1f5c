//! The transactional outbox: messages are written here in the handler's transaction and
//! published later by the [relay](crate::relay).

use std::collections::BTreeMap;

use sqlx::PgConnection;

use crate::telemetry;

/// The `NOTIFY` channel that wakes the relay of the schema in `search_path`.
pub(crate) const NOTIFY_CHANNEL: &str = "outbox";

/// A message waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub topic: String,
    /// Bytes, not text: a dead-letter copy keeps whatever key its record had.
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl OutgoingMessage {
    pub fn new(topic: impl Into<String>, key: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            topic: topic.into(),
            key: Some(key.into().into_bytes()),
            payload,
            headers: BTreeMap::new(),
        }
    }
}

/// The messages one transaction sends, written to the outbox together just before it
/// commits: one call of the database function `outbox_enqueue` (one multi-row `INSERT`, one
/// `NOTIFY` when asked) for a whole batch of records, instead of a statement per message;
/// alone ([`Outbox::write`]) or inside the handler's own last statement ([`Outbox::take`]).
#[derive(Debug, Default)]
pub struct Outbox {
    messages: Vec<OutgoingMessage>,
}

impl Outbox {
    /// Queues `message`. It carries the trace context of the span it was queued in, unless it
    /// names one.
    pub fn push(&mut self, mut message: OutgoingMessage) {
        if !message.headers.contains_key("traceparent") {
            telemetry::inject(&tracing::Span::current(), &mut message.headers);
        }
        self.messages.push(message);
    }

    /// Moves `other`'s messages behind this one's.
    pub fn append(&mut self, other: &mut Outbox) {
        self.messages.append(&mut other.messages);
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Takes the queued messages, in the order they were queued, as the columns of the
    /// database function `outbox_enqueue` (messaging migration 7); the buffer is empty
    /// afterwards. A handler that calls the function in its own last statement saves the
    /// transaction the round trip of [`Outbox::write`].
    pub fn take(&mut self) -> Queued {
        let messages = std::mem::take(&mut self.messages);
        let mut queued = Queued {
            topics: Vec::with_capacity(messages.len()),
            keys: Vec::with_capacity(messages.len()),
            payloads: Vec::with_capacity(messages.len()),
            headers: Vec::with_capacity(messages.len()),
        };
        for message in messages {
            queued.headers.push(serde_json::Value::Object(
                message
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect(),
            ));
            queued.topics.push(message.topic);
            queued.keys.push(message.key);
            queued.payloads.push(message.payload);
        }
        queued
    }

    /// Writes the queued messages to the outbox in `tx`, in the order they were queued; the
    /// buffer is empty afterwards. `wake` says how the relay learns of them.
    ///
    /// # Errors
    /// Database errors; the caller's transaction should then be rolled back and retried.
    pub async fn write(&mut self, tx: &mut PgConnection, wake: Wake) -> sqlx::Result<()> {
        if self.messages.is_empty() {
            return Ok(());
        }
        let queued = self.take();
        sqlx::query!(
            "SELECT outbox_enqueue($1, $2, $3, $4, $5)",
            &queued.topics,
            &queued.keys as &[Option<Vec<u8>>],
            &queued.payloads,
            &queued.headers,
            wake.channel(),
        )
        .fetch_one(tx)
        .await?;
        Ok(())
    }
}

/// Messages taken from an [`Outbox`], column by column: the arguments of the database function
/// `outbox_enqueue(topics, keys, payloads, headers, notify_channel)`, which writes them to the
/// outbox in this order.
#[derive(Debug, Default)]
pub struct Queued {
    pub topics: Vec<String>,
    /// Bytes, not text: a dead-letter copy keeps whatever key its record had.
    pub keys: Vec<Option<Vec<u8>>>,
    pub payloads: Vec<Vec<u8>>,
    pub headers: Vec<serde_json::Value>,
}

/// How the relay learns of rows written to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The writer wakes its own process's relay after the commit (the consume loop does). A
    /// `NOTIFY` as well would wake that relay a second time for nothing: an empty claim
    /// transaction per commit, which at 100 sagas/s cost more than the handling itself.
    InProcess,
    /// PostgreSQL's `NOTIFY` at commit, heard by every relay of the schema (for writers
    /// outside the consume loop: the HTTP API, the deadline scanner).
    Notify,
}

impl Wake {
    /// The `notify_channel` argument of `outbox_enqueue`.
    pub fn channel(self) -> Option<&'static str> {
        match self {
            Self::InProcess => None,
            Self::Notify => Some(NOTIFY_CHANNEL),
        }
    }
}
