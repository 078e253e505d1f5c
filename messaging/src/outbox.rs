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

/// Adds `message` to the outbox in the current transaction and wakes the relay when that
/// transaction commits.
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
/// The message carries the trace context of the span it was written in, unless it names one.
pub async fn enqueue(tx: &mut PgConnection, message: &OutgoingMessage) -> sqlx::Result<()> {
    let mut traced;
    let headers = if message.headers.contains_key("traceparent") {
        &message.headers
    } else {
        traced = message.headers.clone();
        telemetry::inject(&tracing::Span::current(), &mut traced);
        &traced
    };
    let headers = serde_json::Value::Object(
        headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    );
    // PostgreSQL folds identical notifications of one transaction into one, so a handler that
    // enqueues several messages still wakes the relay once.
    sqlx::query(
        "WITH queued AS ( \
             INSERT INTO outbox (topic, message_key, payload, headers) VALUES ($1, $2, $3, $4) \
         ) SELECT pg_notify($5, current_schema())",
    )
    .bind(&message.topic)
    .bind(&message.key)
    .bind(&message.payload)
    .bind(headers)
    .bind(NOTIFY_CHANNEL)
    .execute(tx)
    .await?;
    Ok(())
}
