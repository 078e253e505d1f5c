//! The outbox relay: publishes outbox rows in id order and deletes them only after the broker
//! acknowledged every one of them.
//!
//! Rows are claimed with `FOR UPDATE SKIP LOCKED` inside the transaction that later deletes
//! them, so several relays (several instances of one service) never publish the same row at
//! the same time, and a relay that dies mid-batch leaves its rows for the next one. A batch that
//! fails part-way is published again in full: consumers dedupe by message id, and the
//! orchestrator fences replies by attempt, so a repeat has no second effect.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::RelayConfig;
use crate::outbox::NOTIFY_CHANNEL;
use crate::{kafka, telemetry};
use crate::{Error, Result};

pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    schema: String,
    config: RelayConfig,
}

type OutboxRow = (i64, String, Option<String>, Vec<u8>, serde_json::Value);

impl Relay {
    pub fn new(pool: PgPool, producer: FutureProducer, schema: &str, config: RelayConfig) -> Self {
        Self {
            pool,
            producer,
            schema: schema.to_owned(),
            config,
        }
    }

    /// Publishes until `stop` is cancelled, then drains what is left (bounded by the
    /// producer's message timeout) and flushes the producer.
    pub async fn run(self, stop: CancellationToken) {
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
    async fn publish_batch(&self) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT id, topic, message_key, payload, headers FROM outbox \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.config.outbox_batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        // Enqueue the whole batch first, then wait for the acknowledgements, so the producer
        // can put many rows in one request.
        let mut deliveries = Vec::with_capacity(rows.len());
        for (_, topic, key, payload, headers) in &rows {
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
            if let Some(key) = key {
                record = record.key(key);
            }
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| Error::kafka(format!("enqueueing to {topic}"))(e))?;
            deliveries.push((delivery, span));
        }
        for (delivery, _span) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(Error::kafka("publishing outbox row")(e)),
                Err(_cancelled) => {
                    return Err(Error::Config("producer dropped a delivery report".into()))
                }
            }
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.0).collect();
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        ::metrics::counter!(crate::metrics::OUTBOX_PUBLISHED).increment(ids.len() as u64);
        Ok(i64::try_from(ids.len()).unwrap_or(i64::MAX))
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
