//! The outbox relay: publishes outbox rows in id order and deletes them only after the broker
//! acknowledged every one of them.
//!
//! Rows are claimed with `FOR UPDATE SKIP LOCKED` inside the transaction that later deletes
//! them, so several relays (several instances of one service) never publish the same row at
//! the same time, and a relay that dies mid-batch leaves its rows for the next one. A batch that
//! fails part-way is published again in full: consumers dedupe by message id, and the
//! orchestrator fences replies by step and direction, so a repeat has no second effect. A row
//! the broker refuses for good (too large, invalid) is moved to `outbox_parked` instead of
//! holding up every row behind it, and a producer that failed fatally is replaced.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{FaultConfig, KafkaConfig, RelayConfig};
use crate::outbox::NOTIFY_CHANNEL;
use crate::{kafka, telemetry};
use crate::{Error, Result};

pub struct Relay {
    pool: PgPool,
    kafka: KafkaConfig,
    producer: FutureProducer,
    schema: String,
    config: RelayConfig,
    faults: FaultConfig,
    /// Rows published by this relay so far (for fault injection).
    published: u64,
    fatal_error_injected: bool,
    /// Notified by this process's consumer after each commit.
    outbox_written: Arc<Notify>,
}

/// An outbox row claimed for publishing.
struct OutboxRow {
    id: i64,
    topic: String,
    message_key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Relay {
    /// A relay for the outbox of `schema`, with a producer of its own.
    ///
    /// # Errors
    /// [`Error::Kafka`] when the producer cannot be created.
    pub fn new(
        pool: PgPool,
        kafka: KafkaConfig,
        schema: &str,
        config: RelayConfig,
        faults: FaultConfig,
    ) -> Result<Self> {
        Ok(Self {
            pool,
            producer: kafka::producer(&kafka)?,
            kafka,
            schema: schema.to_owned(),
            config,
            faults,
            published: 0,
            fatal_error_injected: false,
            outbox_written: Arc::new(Notify::new()),
        })
    }

    /// Also wakes up when `outbox_written` is notified (by a writer in this process), besides
    /// the outbox's `NOTIFY` and the poll.
    pub fn woken_by(mut self, outbox_written: Arc<Notify>) -> Self {
        self.outbox_written = outbox_written;
        self
    }

    /// Publishes until `stop` is cancelled, then drains what is left (bounded by the
    /// producer's message timeout) and flushes the producer.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut listener = match self.listen().await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot LISTEN for outbox notifications; polling until it can");
                None
            }
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let stopping = stop.is_cancelled();
            match self.publish_batch().await {
                Ok(published) if published >= self.config.outbox_batch_size => continue,
                Ok(_) => backoff.reset(),
                Err(e) => {
                    tracing::warn!(error.message = %e, schema = %self.schema, "outbox relay failed; retrying");
                    if stopping {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = stop.cancelled() => {}
                    }
                    continue;
                }
            }
            if stopping {
                break;
            }
            self.wait_for_work(&mut listener, &stop).await;
        }
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error.message = %e, "flushing producer on shutdown failed");
        }
    }

    async fn listen(&self) -> sqlx::Result<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok(listener)
    }

    /// Returns when a notification for this schema arrives, the poll interval passes, or the
    /// relay is told to stop.
    ///
    /// A listener that failed is replaced by a new one in the next wait: after a PostgreSQL
    /// restart its connection is gone (sqlx does not reconnect after every kind of error, e.g.
    /// a connection reset). Dropping it for good, as this once did, left the relay polling
    /// forever, so after one database restart every hop waited for the poll interval. The
    /// wait in which it failed, and any wait in which listening again fails, is a plain poll,
    /// so a failing listener cannot spin the loop.
    async fn wait_for_work(&self, listener: &mut Option<PgListener>, stop: &CancellationToken) {
        let poll = tokio::time::sleep(self.config.poll_interval());
        tokio::pin!(poll);
        let mut listening = true;
        loop {
            let notified = async {
                if !listening {
                    return std::future::pending().await;
                }
                if listener.is_none() {
                    // Cancelled by the poll when PostgreSQL is still away; tried again next time.
                    *listener = Some(self.listen().await?);
                    tracing::info!(schema = %self.schema, "listening for outbox notifications again");
                }
                match listener.as_mut() {
                    Some(l) => l.recv().await.map(|n| n.payload() == self.schema),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut poll => return,
                _ = stop.cancelled() => return,
                _ = self.outbox_written.notified() => return,
                result = notified => match result {
                    Ok(true) => return,
                    Ok(false) => continue,
                    Err(e) => {
                        if listener.take().is_some() {
                            tracing::warn!(error.message = %e, "outbox listener failed; polling until it listens again");
                        } else {
                            tracing::debug!(error.message = %e, "cannot LISTEN for outbox notifications yet");
                        }
                        listening = false;
                    }
                },
            }
        }
    }

    /// Publishes up to one batch and returns how many rows it published.
    async fn publish_batch(&mut self) -> Result<i64> {
        self.inject_fatal_error();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query_as!(
            OutboxRow,
            "SELECT id, topic, message_key, payload, headers, created_at FROM outbox
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
            self.config.outbox_batch_size,
        )
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let claimed = chrono::Utc::now();
        for row in &rows {
            let waited = (claimed - row.created_at).to_std().unwrap_or_default();
            ::metrics::histogram!(crate::metrics::OUTBOX_PICKUP_SECONDS)
                .record(waited.as_secs_f64());
        }
        let enqueued = std::time::Instant::now();
        // Enqueue the whole batch first, then wait for the acknowledgements, so the producer
        // can put many rows in one request.
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut refused: Vec<(i64, String)> = Vec::new();
        for OutboxRow {
            id,
            topic,
            message_key,
            payload,
            headers,
            ..
        } in &rows
        {
            // One span per message, in the trace of the work that wrote it; the consumer's
            // span becomes its child.
            let mut headers = to_header_map(headers);
            let span = tracing::info_span!("publish", otel.kind = "producer", topic = %topic);
            telemetry::extract(&span, &headers);
            telemetry::inject(&span, &mut headers);
            let mut record =
                FutureRecord::to(topic)
                    .payload(payload)
                    .headers(kafka::record_headers(
                        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    ));
            if let Some(key) = message_key {
                record = record.key(key);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push((*id, delivery, span)),
                Err((e, _)) if refused_for_good(&e) => refused.push((*id, e.to_string())),
                Err((e, _)) => return Err(self.failed(e, format!("enqueueing to {topic}"))),
            }
        }
        for (id, delivery, _span) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => ::metrics::histogram!(crate::metrics::OUTBOX_PUBLISH_SECONDS)
                    .record(enqueued.elapsed().as_secs_f64()),
                Ok(Err((e, _))) if refused_for_good(&e) => refused.push((id, e.to_string())),
                Ok(Err((e, _))) => return Err(self.failed(e, "publishing outbox row".into())),
                Err(_cancelled) => {
                    return Err(Error::Config("producer dropped a delivery report".into()))
                }
            }
        }
        for (id, error) in &refused {
            // Retrying cannot help, and the rows behind it must go out: keep it aside, whole,
            // with the broker's reason, for an operator.
            tracing::error!(outbox_id = id, error.message = %error, schema = %self.schema, "the broker refuses an outbox row for good; parked in outbox_parked");
            sqlx::query!(
                "INSERT INTO outbox_parked (id, topic, message_key, payload, headers, created_at, error)
                 SELECT id, topic, message_key, payload, headers, created_at, $2 FROM outbox WHERE id = $1",
                id,
                error,
            )
            .execute(&mut *tx)
            .await?;
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", &ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        ::metrics::counter!(crate::metrics::OUTBOX_PUBLISHED)
            .increment((ids.len() - refused.len()) as u64);
        ::metrics::counter!(crate::metrics::OUTBOX_PARKED).increment(refused.len() as u64);
        self.published += ids.len() as u64;
        Ok(i64::try_from(ids.len()).unwrap_or(i64::MAX))
    }

    /// The error of a failed publish; when the producer failed fatally (an idempotent
    /// producer that lost its sequence, say), a fresh producer replaces it for the next try.
    fn failed(&mut self, e: KafkaError, context: String) -> Error {
        match kafka::renewed_if_fatal(&self.producer, &self.kafka) {
            Ok(Some(producer)) => self.producer = producer,
            Ok(None) => {}
            Err(e) => return e,
        }
        Error::kafka(context)(e)
    }
}

/// Whether the broker (or the client, before sending) refuses this record whatever happens:
/// too large, malformed, or a topic name that cannot exist. Everything else (timeouts, a
/// broker away, leadership moving) passes.
fn refused_for_good(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as Code;
    matches!(
        e.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::InvalidTopic
                | Code::MessageBatchTooLarge
                | Code::TopicAuthorizationFailed
        )
    )
}

impl Relay {
    /// `FAULT_PRODUCER_FATAL_AFTER`: raises a fatal error in the producer the way librdkafka
    /// does for an idempotent producer that lost its sequence.
    fn inject_fatal_error(&mut self) {
        let after = self.faults.producer_fatal_after;
        if after == 0 || self.fatal_error_injected || self.published < after {
            return;
        }
        self.fatal_error_injected = true;
        kafka::inject_fatal_error(&self.producer);
    }
}

fn to_header_map(headers: &serde_json::Value) -> BTreeMap<String, String> {
    headers
        .as_object()
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}
