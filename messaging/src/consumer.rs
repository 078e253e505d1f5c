//! The at-least-once consume loop.
//!
//! For each record: begin a transaction, let the [`Handler`] do its work in it (inbox row,
//! state change, outbox rows), commit, and only then store the record's offset for the next
//! automatic commit. A crash anywhere before the store means the record is delivered again and
//! the inbox absorbs it. A record the handler rejects goes to the dead-letter topic (through the
//! outbox) with the reason and its original bytes, and the loop moves on. A passing failure
//! (database down, version conflict) is retried with backoff, never skipped.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::Message;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::FaultConfig;
use crate::metrics::{self, LagReporter};
use crate::outbox::{self, OutgoingMessage};
use crate::telemetry;
use crate::{Error, Result};

/// Fault injection never crashes a process younger than this, so that every life commits some
/// offsets (they are committed every second) and a crash loop still makes progress.
const FAULT_MIN_LIFETIME: Duration = Duration::from_secs(3);

/// One consumed record, detached from the consumer's buffer.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// The span the record is handled in, a child of the trace context in its headers.
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

fn trace_headers(message: &impl Message) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            if telemetry::TRACE_HEADERS.contains(&header.key) {
                if let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) {
                    found.insert(header.key.to_owned(), value.to_owned());
                }
            }
        }
    }
    found
}

/// Why a handler did not handle a record.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The record can never be handled (malformed, unknown, against the contract): it goes to
    /// the dead-letter topic with this reason.
    #[error("rejected: {0}")]
    Reject(String),
    /// Handling failed for a reason that may pass; the record is retried.
    #[error("retryable: {0}")]
    Retry(String),
}

impl From<sqlx::Error> for HandlerError {
    /// Data and constraint errors (SQLSTATE classes 22 and 23) come from the record itself and
    /// would fail forever, so they reject it; anything else (connection, serialization
    /// conflicts) is worth another try.
    fn from(e: sqlx::Error) -> Self {
        let deterministic = e
            .as_database_error()
            .and_then(|db| db.code())
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23"));
        if deterministic {
            Self::Reject(format!("database refused the message: {e}"))
        } else {
            Self::Retry(e.to_string())
        }
    }
}

/// The application's part of consuming: what to do with one record, inside the transaction
/// the loop opened. Everything the handler wants to send goes through [`outbox::enqueue`].
pub trait Handler: Send + Sync {
    fn handle(
        &self,
        tx: &mut PgConnection,
        record: &Record,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Where rejected records go, and who rejected them.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    pub topic: String,
    /// Name of the consuming service, written to the `dlq.consumer` header.
    pub consumer: String,
}

/// What a consume loop reads and how.
#[derive(Debug, Clone, Copy)]
pub struct ConsumeSettings<'a> {
    pub topics: &'a [String],
    pub dead_letters: &'a DeadLetters,
    /// Most records handled in one transaction.
    pub batch_max: usize,
    pub faults: &'a FaultConfig,
}

/// Consumes `settings.topics` until `shutdown` is cancelled, finishing the batch in hand, then
/// commits the stored offsets before leaving the group.
///
/// # Errors
/// [`Error::Kafka`] when the subscription fails or the consumer fails fatally.
pub async fn run<H: Handler>(
    consumer: StreamConsumer<LagReporter>,
    pool: PgPool,
    handler: H,
    settings: ConsumeSettings<'_>,
    shutdown: CancellationToken,
) -> Result<()> {
    let ConsumeSettings {
        topics,
        dead_letters,
        batch_max,
        faults,
    } = settings;
    let mut handled: u64 = 0;
    let started = std::time::Instant::now();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(Error::kafka(format!("subscribing to {topics:?}")))?;
    let batch_max = batch_max.max(1);
    loop {
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => received,
        };
        let first = match received {
            Ok(message) => message,
            // A fatal error (e.g. a static member whose instance id the group still holds)
            // leaves the consumer unusable for good: stop, so that the process exits and its
            // supervisor starts a fresh one, instead of a service that looks alive and reads
            // nothing.
            Err(e @ KafkaError::MessageConsumptionFatal(_)) => {
                return Err(Error::Kafka {
                    context: "consumer failed fatally".into(),
                    source: e,
                });
            }
            // Anything else (broker down, transport failure) is librdkafka telling us what it
            // is recovering from by itself. No pause here: errors, rebalances and messages
            // share one queue, and a consumer that slept after each error fell ever further
            // behind the errors a down broker produces, so it never reached the assignment
            // waiting behind them and read nothing again after the broker came back (the
            // chaos suite's broker kills found this).
            Err(e) => {
                tracing::warn!(error.message = %e, "kafka receive failed; librdkafka retries");
                continue;
            }
        };
        // Take whatever else has already arrived, without waiting for more.
        let mut batch = vec![to_record(&first)];
        drop(first);
        while batch.len() < batch_max {
            match consumer.recv().now_or_never() {
                Some(Ok(message)) => batch.push(to_record(&message)),
                Some(Err(e)) => {
                    tracing::warn!(error.message = %e, "kafka receive failed");
                    break;
                }
                None => break,
            }
        }
        if !process_batch(&pool, &handler, &batch, dead_letters, &shutdown).await {
            // Shut down while a record was still failing: leave the offsets unstored so the
            // next owner of the partition handles the records again.
            break;
        }
        let before = handled;
        handled += batch.len() as u64;
        let every = faults.crash_after_commit_every;
        if every > 0 && before / every != handled / every && started.elapsed() >= FAULT_MIN_LIFETIME
        {
            tracing::error!(
                records = batch.len(),
                "fault injection: crashing after commit"
            );
            if !faults.crash_in_process {
                std::process::abort();
            }
            // In-process services (tests) stop dead instead: no offset stored, no commit. The
            // group is left at once, as the broker would notice a dead process's session end,
            // so the record's partition moves to the next owner and is delivered again.
            consumer.unsubscribe();
            return Err(Error::InjectedCrash);
        }
        for record in &batch {
            // librdkafka stores `offset + 1` itself, the next record to read. (Passing
            // `offset + 1` here skipped a record at every restart; the chaos suite caught it.)
            if let Err(e) = consumer.store_offset(&record.topic, record.partition, record.offset) {
                // The partition was revoked meanwhile; its next owner re-reads the record and
                // the inbox absorbs it.
                tracing::warn!(error.message = %e, topic = %record.topic, partition = record.partition, offset = record.offset, "could not store offset");
            }
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(error.message = %e, "committing offsets on shutdown failed"),
    }
    consumer.unsubscribe();
    Ok(())
}

/// Copies a record out of the consumer's buffer, with the span it will be handled in.
fn to_record(message: &impl Message) -> Record {
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
    telemetry::extract(&span, &trace_headers(message));
    Record {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        span,
    }
}

/// Handles `batch` in one transaction: one commit for all its records, in order, so the
/// records of one saga (one partition) keep their order. If any record fails, the whole
/// transaction is rolled back and the records are handled one at a time instead, so a
/// rejected record is dead-lettered alone and a passing failure is retried alone. Returns
/// `false` only when told to shut down while a record kept failing.
async fn process_batch<H: Handler>(
    pool: &PgPool,
    handler: &H,
    batch: &[Record],
    dead_letters: &DeadLetters,
    shutdown: &CancellationToken,
) -> bool {
    if let [record] = batch {
        return process(pool, handler, record, dead_letters, shutdown)
            .instrument(record.span.clone())
            .await;
    }
    let received = std::time::Instant::now();
    let together = async {
        let mut tx = pool.begin().await?;
        for record in batch {
            handler
                .handle(&mut tx, record)
                .instrument(record.span.clone())
                .await?;
        }
        tx.commit().await?;
        Ok::<_, HandlerError>(())
    }
    .instrument(tracing::info_span!("db.transaction", records = batch.len()))
    .await;
    match together {
        Ok(()) => {
            let elapsed = received.elapsed().as_secs_f64();
            for record in batch {
                count_handled(record, "handled", elapsed);
            }
            true
        }
        Err(e) => {
            tracing::debug!(error.message = %e, records = batch.len(), "batch failed; handling its records one by one");
            for record in batch {
                let done = process(pool, handler, record, dead_letters, shutdown)
                    .instrument(record.span.clone())
                    .await;
                if !done {
                    return false;
                }
            }
            true
        }
    }
}

fn count_handled(record: &Record, outcome: &'static str, seconds: f64) {
    ::metrics::counter!(metrics::MESSAGES_CONSUMED, "topic" => record.topic.clone(), "outcome" => outcome)
        .increment(1);
    ::metrics::histogram!(metrics::HANDLE_SECONDS, "topic" => record.topic.clone()).record(seconds);
}

/// Handles `record` until it is committed or dead-lettered. Returns `false` only when told to
/// shut down while the record kept failing.
async fn process<H: Handler>(
    pool: &PgPool,
    handler: &H,
    record: &Record,
    dead_letters: &DeadLetters,
    shutdown: &CancellationToken,
) -> bool {
    let received = std::time::Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    let mut rejection: Option<String> = None;
    loop {
        let attempt = match &rejection {
            None => handle_once(pool, handler, record).await,
            Some(reason) => dead_letter(pool, record, dead_letters, reason).await,
        };
        match attempt {
            Ok(()) => {
                let outcome = if rejection.is_some() {
                    ::metrics::counter!(metrics::DEAD_LETTERS, "topic" => record.topic.clone())
                        .increment(1);
                    "dead_lettered"
                } else {
                    "handled"
                };
                count_handled(record, outcome, received.elapsed().as_secs_f64());
                return true;
            }
            Err(HandlerError::Reject(reason)) if rejection.is_none() => {
                ::metrics::counter!(metrics::HANDLER_ERRORS, "kind" => "reject").increment(1);
                tracing::warn!(reason = %reason, "message rejected; sending it to the dead-letter topic");
                rejection = Some(reason);
                continue;
            }
            Err(e) => {
                ::metrics::counter!(metrics::HANDLER_ERRORS, "kind" => "retry").increment(1);
                tracing::warn!(error.message = %e, "handling failed; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => return false,
        }
    }
}

async fn handle_once<H: Handler>(
    pool: &PgPool,
    handler: &H,
    record: &Record,
) -> Result<(), HandlerError> {
    async {
        let mut tx = pool.begin().await?;
        // On error, dropping the transaction rolls back whatever the handler wrote.
        handler.handle(&mut tx, record).await?;
        tx.commit().await?;
        Ok(())
    }
    .instrument(tracing::info_span!("db.transaction", records = 1))
    .await
}

async fn dead_letter(
    pool: &PgPool,
    record: &Record,
    dead_letters: &DeadLetters,
    reason: &str,
) -> Result<(), HandlerError> {
    let mut message = OutgoingMessage {
        topic: dead_letters.topic.clone(),
        key: record
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: record.payload.clone(),
        headers: Default::default(),
    };
    for (name, value) in [
        ("dlq.reason", reason.to_owned()),
        ("dlq.source.topic", record.topic.clone()),
        ("dlq.source.partition", record.partition.to_string()),
        ("dlq.source.offset", record.offset.to_string()),
        ("dlq.consumer", dead_letters.consumer.clone()),
        ("dlq.failed_at", chrono::Utc::now().to_rfc3339()),
    ] {
        message.headers.insert(name.to_owned(), value);
    }
    let mut tx = pool.begin().await?;
    outbox::enqueue(&mut tx, &message).await?;
    tx.commit().await?;
    Ok(())
}
