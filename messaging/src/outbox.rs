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
/// commits: one multi-row `INSERT` and one `NOTIFY` for a whole batch of records, instead of
/// a statement per message.
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

    /// Writes the queued messages to the outbox in `tx`, in the order they were queued; the
    /// buffer is empty afterwards. `wake` says how the relay learns of them.
    ///
    /// # Errors
    /// Database errors; the caller's transaction should then be rolled back and retried.
    pub async fn write(&mut self, tx: &mut PgConnection, wake: Wake) -> sqlx::Result<()> {
        if self.messages.is_empty() {
            return Ok(());
        }
        let messages = std::mem::take(&mut self.messages);
        let mut topics = Vec::with_capacity(messages.len());
        let mut keys = Vec::with_capacity(messages.len());
        let mut payloads = Vec::with_capacity(messages.len());
        let mut headers = Vec::with_capacity(messages.len());
        for message in messages {
            headers.push(serde_json::Value::Object(
                message
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect(),
            ));
            topics.push(message.topic);
            keys.push(message.key);
            payloads.push(message.payload);
        }
        // `WITH ORDINALITY` keeps the queue's order in the ids, which is the publishing order.
        // The clock time, not the transaction's start: this is the last statement before the
        // commit, so the relay's `outbox_pickup_seconds` measures the commit and its wake-up.
        const INSERT: &str =
            "INSERT INTO outbox (topic, message_key, payload, headers, created_at) \
             SELECT topic, message_key, payload, headers, clock_timestamp() \
             FROM UNNEST($1::text[], $2::bytea[], $3::bytea[], $4::jsonb[]) \
                  WITH ORDINALITY AS m(topic, message_key, payload, headers, n) \
             ORDER BY n";
        let notify;
        let statement = match wake {
            Wake::InProcess => INSERT,
            Wake::Notify => {
                notify =
                    format!("WITH queued AS ({INSERT}) SELECT pg_notify($5, current_schema())");
                notify.as_str()
            }
        };
        let mut query = sqlx::query(statement)
            .bind(topics)
            .bind(keys)
            .bind(payloads)
            .bind(headers);
        if matches!(wake, Wake::Notify) {
            query = query.bind(NOTIFY_CHANNEL);
        }
        query.execute(tx).await?;
        Ok(())
    }
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
