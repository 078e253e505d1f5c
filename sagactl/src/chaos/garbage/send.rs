//! Publishing the garbage: one record every so often, round the targets and the kinds, in the
//! background while the sagas run; what the broker acknowledged is the log the audit checks.

use std::time::Duration;

use events::Topics;
use rdkafka::producer::{FutureProducer, FutureRecord};
use uuid::Uuid;

use super::records::build;
use super::{GarbageKind, Target};

/// One garbage record the broker acknowledged.
#[derive(Debug, Clone)]
pub struct Sent {
    pub kind: GarbageKind,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub(super) target: Target,
    /// The saga key and saga id the record names, to find whatever a consumer did with it.
    pub(super) key: Uuid,
    pub(super) saga_id: Uuid,
}

/// What the garbage task published.
#[derive(Debug, Default)]
pub struct GarbageLog {
    pub sent: Vec<Sent>,
    /// Records the broker did not acknowledge: kind, topic, error.
    pub unconfirmed: Vec<(GarbageKind, String, String)>,
}

/// Publishes garbage in the background, one record every `every`, until stopped.
pub struct GarbageFaults {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<GarbageLog>,
}

/// A producer for garbage. Like a Java client's, it sends records up to 1 MiB
/// (`max.request.size`), so it can publish what librdkafka's default would refuse.
pub fn producer(kafka: &messaging::config::KafkaConnection) -> anyhow::Result<FutureProducer> {
    Ok(messaging::kafka::producer_settings(kafka, 0)?
        .set("message.max.bytes", "1048576")
        .set("message.timeout.ms", "60000")
        .create()?)
}

impl GarbageFaults {
    pub fn spawn(
        producer: FutureProducer,
        topics: Topics,
        targets: Vec<Target>,
        kinds: Vec<GarbageKind>,
        every: Duration,
    ) -> Self {
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut log = GarbageLog::default();
            if kinds.is_empty() || targets.is_empty() {
                return log;
            }
            // Record n goes to target n % targets, with the kinds rotating per round, so every
            // kind reaches every topic within targets × kinds records and neighbours differ in
            // both.
            for n in 0usize.. {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopping.changed() => break,
                }
                let at = n % targets.len();
                let kind = kinds[(n / targets.len() + at) % kinds.len()];
                let (key, saga_id) = (Uuid::new_v4(), Uuid::new_v4());
                let hostile = build(kind, &targets, at, key, saga_id);
                let topic = targets[at].topic(&topics);
                let mut record = FutureRecord::<[u8], [u8]>::to(&topic);
                if let Some(key) = &hostile.key {
                    record = record.key(key.as_slice());
                }
                if let Some(payload) = &hostile.payload {
                    record = record.payload(payload.as_slice());
                }
                if !hostile.headers.is_empty() {
                    match messaging::headers::with_any_bytes(
                        hostile
                            .headers
                            .iter()
                            .map(|(name, value)| (name.as_slice(), value.as_deref())),
                    ) {
                        Ok(headers) => record = record.headers(headers),
                        Err(e) => {
                            log.unconfirmed.push((kind, topic, e.to_string()));
                            continue;
                        }
                    }
                }
                match producer.send(record, Duration::from_secs(60)).await {
                    Ok(delivery) => log.sent.push(Sent {
                        kind,
                        topic,
                        partition: delivery.partition,
                        offset: delivery.offset,
                        target: targets[at].clone(),
                        key,
                        saga_id,
                    }),
                    Err((e, _)) => {
                        eprintln!("garbage {} to {topic} not acknowledged: {e}", kind.name());
                        log.unconfirmed.push((kind, topic, e.to_string()));
                    }
                }
            }
            log
        });
        Self { stop, task }
    }

    /// Stops publishing; returns what was published.
    pub async fn stop(self) -> anyhow::Result<GarbageLog> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
    }
}
