//! The producer behind `POST /orders`, replaced when it fails fatally.
//!
//! An idempotent producer that loses its sequence fails every later send; without a new one,
//! every order after that would be answered 503 while `/healthz` stays green. The relay
//! replaces its producer the same way (`messaging::kafka::renewed_if_fatal`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use messaging::access::Refusal;
use messaging::config::{FaultConfig, KafkaConfig};
use messaging::kafka;
use messaging::kafka::Producer;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use tokio::sync::RwLock;

pub struct OrderPublisher {
    kafka: KafkaConfig,
    /// `ORDER_PUBLISH_TIMEOUT_MS`: how long a send may wait for the broker's acknowledgement
    /// (its queue too) before the order is answered 503 (the client tries again).
    timeout: Duration,
    current: RwLock<Producer>,
    /// `FAULT_PRODUCER_FATAL_AFTER`: the producer fails fatally once this many records went
    /// out (0: never).
    fatal_after: u64,
    published: AtomicU64,
    fatal_injected: AtomicBool,
}

impl OrderPublisher {
    /// # Errors
    /// [`messaging::Error::Kafka`] when librdkafka refuses the configuration.
    pub fn new(
        kafka: &KafkaConfig,
        faults: &FaultConfig,
        timeout: Duration,
    ) -> messaging::Result<Self> {
        Ok(Self {
            current: RwLock::new(order_producer(kafka, timeout)?),
            kafka: kafka.clone(),
            timeout,
            fatal_after: faults.producer_fatal_after,
            published: AtomicU64::new(0),
            fatal_injected: AtomicBool::new(false),
        })
    }

    /// Sends one record and waits for the broker. When the producer failed fatally, a new one
    /// replaces it and sends the record once more: a trigger is keyed by its subject, and the
    /// orchestrator starts one saga per subject, so a record that made it the first time too
    /// starts nothing twice.
    ///
    /// # Errors
    /// The send's error when the record did not go out.
    pub async fn send(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(), KafkaError> {
        let producer = self.current.read().await.clone();
        self.inject_fault(&producer);
        let first = send_with(
            &producer,
            topic,
            key,
            payload,
            headers.clone(),
            self.timeout,
        )
        .await;
        let Err(error) = first else {
            self.published.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        // An order the cluster's ACLs refuse: the orchestrator's identity lacks a grant, which
        // no retry fixes. The access watch stops the service with the reason.
        if let Some(refusal @ Refusal::Authorization(_)) = Refusal::of(&error) {
            self.kafka.connection.access.saw(refusal);
            return Err(error);
        }
        let renewed = {
            let mut current = self.current.write().await;
            match renewed_if_fatal(&current, &self.kafka, self.timeout) {
                Ok(Some(fresh)) => {
                    *current = fresh.clone();
                    Some(fresh)
                }
                // Another request replaced it already.
                Ok(None) if !same_producer(&current, &producer) => Some(current.clone()),
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(error.message = %messaging::Chain(&e), "replacing the order producer failed");
                    None
                }
            }
        };
        match renewed {
            Some(fresh) => send_with(&fresh, topic, key, payload, headers, self.timeout).await,
            None => Err(error),
        }
    }

    fn inject_fault(&self, producer: &Producer) {
        if self.fatal_after > 0
            && self.published.load(Ordering::Relaxed) >= self.fatal_after
            && !self.fatal_injected.swap(true, Ordering::Relaxed)
        {
            kafka::inject_fatal_error(producer);
        }
    }
}

/// The services' producer settings, giving up on a record after `timeout`
/// (`message.timeout.ms`): a client waits for the broker's acknowledgement at most that long.
fn order_producer(kafka: &KafkaConfig, timeout: Duration) -> messaging::Result<Producer> {
    kafka::producer_with_timeout(kafka, timeout)
}

/// A fresh producer when `producer` failed fatally, else `None` (as
/// `messaging::kafka::renewed_if_fatal`, with this producer's timeout).
fn renewed_if_fatal(
    failed: &Producer,
    kafka: &KafkaConfig,
    timeout: Duration,
) -> messaging::Result<Option<Producer>> {
    use rdkafka::producer::Producer;
    let Some(fatal) = failed.client().fatal_error() else {
        return Ok(None);
    };
    tracing::error!(error.code = ?fatal.0, error.message = %fatal.1, "the order producer failed fatally; creating a new one");
    order_producer(kafka, timeout).map(Some)
}

async fn send_with(
    producer: &Producer,
    topic: &str,
    key: &str,
    payload: &[u8],
    headers: OwnedHeaders,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .headers(headers);
    producer.send(record, timeout).await.map(|_| ())
}

/// Whether `a` and `b` are handles of one librdkafka producer.
fn same_producer(a: &Producer, b: &Producer) -> bool {
    use rdkafka::producer::Producer;
    std::ptr::eq(a.client().native_ptr(), b.client().native_ptr())
}
