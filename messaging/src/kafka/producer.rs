//! The services' producer: a librdkafka producer whose delivery reports complete futures, polled
//! by a thread of its own that sleeps while nothing happens.
//!
//! rdkafka's `FutureProducer` polls on its thread with a 100 ms timeout in a loop, and each
//! `poll` spins for its last millisecond: it turns the time left into whole milliseconds for
//! librdkafka, so after a 99 ms wait it asks again with 0 ms until the deadline passes. `perf`
//! on an idle inventory showed that thread as most of the process's CPU (40% of its samples in
//! `clock_gettime`), about 0.8% of a core per producer, for every service at rest. This one
//! polls for [`POLL_WAIT`] at a time, so the spin is a thousandth of the time; a delivery
//! report wakes the poll at once all the same, as any event on the queue does.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, ToBytes};
use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, FutureRecord, ProducerContext};
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use crate::access::WatchedContext;

/// How long one `poll` of the producer's thread waits for an event. A delivery report ends the
/// wait at once; the length only bounds the spin at its end (at most a millisecond) and how long
/// the thread outlives the producer's last handle.
const POLL_WAIT: Duration = Duration::from_secs(1);

/// How long [`Producer::send`] waits before trying again when librdkafka's queue is full.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

/// The broker's answer to one record: resolves when librdkafka reports its delivery or failure
/// (`Err` when the producer was dropped before it could).
pub type DeliveryFuture = oneshot::Receiver<OwnedDeliveryResult>;

/// A handle of a service's producer; clones share one librdkafka producer. Derefs to the
/// librdkafka producer for what the `Producer` trait offers (its client, `flush`).
#[derive(Clone)]
pub struct Producer(Arc<Handle>);

/// The last handle's drop tells the polling thread to stop. The thread holds the librdkafka
/// producer itself, so the producer is destroyed there (rdkafka's drop purges what is queued
/// and waits up to 500 ms for the reports), never on the async runtime's thread that dropped
/// the handle.
struct Handle {
    client: Arc<BaseProducer<DeliveryContext>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Deref for Producer {
    type Target = BaseProducer<DeliveryContext>;

    fn deref(&self) -> &Self::Target {
        &self.0.client
    }
}

impl Producer {
    /// Creates the producer `settings` describe, reporting to `context`, and starts its thread.
    pub(crate) fn create(
        settings: &ClientConfig,
        context: WatchedContext,
    ) -> Result<Self, KafkaError> {
        let client: Arc<BaseProducer<DeliveryContext>> =
            Arc::new(settings.create_with_context(DeliveryContext(context))?);
        let stop = Arc::new(AtomicBool::new(false));
        let polled = Arc::clone(&client);
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("producer poll".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    polled.poll(POLL_WAIT);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("producer poll thread: {e}")))?;
        Ok(Self(Arc::new(Handle { client, stop })))
    }

    /// Queues `record`; the future resolves with the broker's answer.
    ///
    /// # Errors
    /// librdkafka's refusal to queue it (its queue full, the producer failed).
    pub fn send_result<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
    ) -> Result<DeliveryFuture, KafkaError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        self.queue(record).map_err(|(e, _)| e)
    }

    /// [`Self::send_result`], giving a record librdkafka cannot queue back with the error.
    #[allow(clippy::result_large_err)] // the record is handed back to be tried again, not boxed
    fn queue<'a, K, P>(
        &self,
        record: FutureRecord<'a, K, P>,
    ) -> Result<DeliveryFuture, (KafkaError, FutureRecord<'a, K, P>)>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let (report, delivery) = oneshot::channel();
        let base = BaseRecord {
            topic: record.topic,
            partition: record.partition,
            payload: record.payload,
            key: record.key,
            timestamp: record.timestamp,
            headers: record.headers,
            delivery_opaque: Box::new(report),
        };
        self.0
            .client
            .send(base)
            .map(|()| delivery)
            .map_err(|(e, base)| {
                let record = FutureRecord {
                    topic: base.topic,
                    partition: base.partition,
                    payload: base.payload,
                    key: base.key,
                    timestamp: base.timestamp,
                    headers: base.headers,
                };
                (e, record)
            })
    }

    /// Sends `record` and waits for the broker's answer, trying again while librdkafka's queue
    /// is full for at most `queue_timeout`.
    ///
    /// # Errors
    /// The delivery's failure, librdkafka's refusal to queue, or [`KafkaError::Canceled`] when
    /// the producer was dropped before it reported.
    pub async fn send<K, P>(
        &self,
        mut record: FutureRecord<'_, K, P>,
        queue_timeout: Duration,
    ) -> Result<Delivery, KafkaError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let give_up = Instant::now() + queue_timeout;
        let delivery = loop {
            match self.queue(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < give_up =>
                {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_RETRY).await;
                }
                Err((e, _)) => return Err(e),
            }
        };
        match delivery.await {
            Ok(Ok(delivered)) => Ok(delivered),
            Ok(Err((e, _))) => Err(e),
            Err(_dropped) => Err(KafkaError::Canceled),
        }
    }
}

/// The producer's context: the service's [`WatchedContext`] (logging, refusals) and delivery
/// reports sent to the record's [`DeliveryFuture`].
pub struct DeliveryContext(WatchedContext);

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<oneshot::Sender<OwnedDeliveryResult>>;

    fn delivery(&self, result: &DeliveryResult<'_>, report: Self::DeliveryOpaque) {
        let owned = match result {
            Ok(message) => Ok(Delivery {
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message.timestamp(),
            }),
            Err((error, message)) => Err((error.clone(), message.detach())),
        };
        // The sender's future may be gone (a wave the relay stopped waiting for): nothing to do.
        let _ = report.send(owned);
    }
}
