//! A consumed record copied out of the consumer's buffer.

use rdkafka::Message;

/// One consumed record, detached from the consumer's buffer.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The span the record is handled in (the consume loop makes it a child of the trace
    /// context in the record's headers).
    pub span: tracing::Span,
}

impl Record {
    /// Names the saga, step and message this record is about on its span, so that every log
    /// line and trace span of its handling carries them.
    pub fn describe(&self, saga_id: uuid::Uuid, step: &str, message_id: uuid::Uuid) {
        self.span
            .record("saga_id", tracing::field::display(saga_id))
            .record("step", step)
            .record("message_id", tracing::field::display(message_id));
    }
}

/// Copies a record out of the consumer's buffer, with the span it will be handled in. Every
/// part of it (key, payload) may hold any bytes.
///
/// The span has no parent yet: joining the trace in the record's headers
/// ([`crate::trace_headers`]) takes the OpenTelemetry layer, which this crate does not link.
/// `messaging::consumer::to_record` does both; a consume loop calls that one.
pub fn to_record<M: Message>(message: &M) -> Record {
    // Handlers fill in the saga, step and message id once they have decoded the record.
    let span = tracing::info_span!(
        "handle",
        otel.kind = "consumer",
        topic = %message.topic(),
        partition = message.partition(),
        offset = message.offset(),
        saga_id = tracing::field::Empty,
        step = tracing::field::Empty,
        message_id = tracing::field::Empty,
    );
    Record {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        span,
    }
}
