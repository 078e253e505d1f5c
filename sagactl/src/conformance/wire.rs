//! The kit's two ends on the broker: a producer that sends commands and odd records to the
//! participant's command topic, and a reader that keeps every record arriving on `saga.replies`
//! and `saga.dlq` from the moment the kit started (their ends then), so that a check can ask
//! what came back for a key or a record it sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use events::{Command, Envelope};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use uuid::Uuid;

/// Where a record the kit read came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Reply,
    DeadLetter,
}

/// A record read from `saga.replies` or `saga.dlq`, as bytes.
#[derive(Debug, Clone)]
pub struct Seen {
    pub stream: Stream,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// Name and value of each header, bytes as they came.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub payload: Option<Vec<u8>>,
}

impl Seen {
    /// The first header named `name`, as text (lossy: a participant may write any bytes).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name.as_bytes())
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The value as JSON, when it is.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(self.payload.as_deref()?).ok()
    }

    /// A reply's body field `name` as text.
    pub fn field(&self, name: &str) -> Option<String> {
        self.json()?.get(name)?.as_str().map(str::to_owned)
    }

    /// For a dead letter: the topic, partition and offset of the record it copies.
    pub fn source(&self) -> Option<(String, i32, i64)> {
        Some((
            self.header("dlq.source.topic")?,
            self.header("dlq.source.partition")?.parse().ok()?,
            self.header("dlq.source.offset")?.parse().ok()?,
        ))
    }
}

/// Where a sent record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A command the kit sent: what it said and where it went.
#[derive(Debug, Clone)]
pub struct SentCommand {
    /// Which check sent it, for the report.
    pub label: String,
    pub envelope: Envelope<Command>,
    /// The trace id of the `traceparent` it carried.
    pub trace_id: String,
    /// The record's value as sent, so that a redelivery sends the very same bytes.
    pub bytes: Vec<u8>,
    pub traceparent: String,
    pub landed: Landed,
}

impl SentCommand {
    pub fn message_id(&self) -> Uuid {
        self.envelope.message_id
    }

    pub fn key(&self) -> &str {
        &self.envelope.body.key
    }

    /// One line for a FAIL's report: what was sent.
    pub fn describe(&self) -> String {
        let c = &self.envelope.body;
        format!(
            "{}: sent {} ({} of {}, attempt {}, key {}, message_id {}) to {}[{}]@{}",
            self.label,
            c.name,
            c.action.as_str(),
            c.step,
            c.attempt,
            c.key,
            self.envelope.message_id,
            self.landed.topic,
            self.landed.partition,
            self.landed.offset
        )
    }
}

/// An odd record the kit sent, with what it is meant to show.
#[derive(Debug, Clone)]
pub struct SentRecord {
    pub label: String,
    pub landed: Landed,
}

/// The kit's connection to the deployment's broker.
pub struct Probe {
    producer: FutureProducer,
    pub command_topic: String,
    /// `saga.replies`' partition count, which a reply's partition is checked against.
    pub reply_partitions: i32,
    /// The command topic's partition count.
    pub command_partitions: i32,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// Starts reading `replies_topic` and `dead_letter_topic` from their ends now.
    pub fn open(
        kafka: &messaging::config::KafkaConnection,
        producer: FutureProducer,
        command_topic: String,
        replies_topic: String,
        dead_letter_topic: String,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = messaging::kafka::connection_settings(kafka)?
            .set(
                "group.id",
                format!("sagactl-conformance-{}", Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .context("creating the conformance kit's reader")?;
        let mut assignment = TopicPartitionList::new();
        let mut reply_partitions = 0;
        for topic in [&replies_topic, &dead_letter_topic] {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .with_context(|| format!("reading the metadata of {topic}"))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            anyhow::ensure!(
                !partitions.is_empty(),
                "{topic} does not exist (is the participant running with this TOPIC_PREFIX?)"
            );
            if topic == &replies_topic {
                reply_partitions = i32::try_from(partitions.len())?;
            }
            for partition in partitions {
                let (_, high) = consumer
                    .fetch_watermarks(topic, partition, Duration::from_secs(10))
                    .with_context(|| format!("reading the end of {topic}[{partition}]"))?;
                assignment.add_partition_offset(topic, partition, Offset::Offset(high))?;
            }
        }
        consumer.assign(&assignment)?;
        let command_partitions = consumer
            .fetch_metadata(Some(&command_topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of {command_topic}"))?
            .topics()
            .iter()
            .map(|t| t.partitions().len())
            .sum::<usize>();
        anyhow::ensure!(
            command_partitions > 0,
            "{command_topic} does not exist (is the participant running with this TOPIC_PREFIX?)"
        );
        let command_partitions = i32::try_from(command_partitions)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (seen, stop, replies) = (seen.clone(), stop.clone(), replies_topic.clone());
            std::thread::spawn(move || read(&consumer, &replies, &seen, &stop))
        };
        Ok(Self {
            producer,
            command_topic,
            reply_partitions,
            command_partitions,
            seen,
            stop,
            reader: Some(reader),
        })
    }

    /// Fresh keys (UUIDs), one landing on each partition of the command topic.
    pub fn key_per_partition(&self) -> Vec<String> {
        let partitions = self.command_partitions.max(1);
        let mut keys: Vec<Option<String>> = vec![None; usize::try_from(partitions).unwrap_or(1)];
        while keys.iter().any(Option::is_none) {
            let key = Uuid::new_v4().to_string();
            let partition = messaging::partitioner::partition_of(
                messaging::partitioner::key_hash(key.as_bytes()),
                partitions,
            );
            if let Some(slot @ None) = usize::try_from(partition)
                .ok()
                .and_then(|p| keys.get_mut(p))
            {
                *slot = Some(key);
            }
        }
        keys.into_iter().flatten().collect()
    }

    /// Everything read so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits until `done` holds for what was read, at most `timeout`; whether it did.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Seen]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.seen()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `command` in a fresh envelope of `saga_id` with a `traceparent` of a new trace,
    /// keyed by its key, as the orchestrator does.
    pub async fn send_command(
        &self,
        label: &str,
        saga_id: Uuid,
        command: Command,
    ) -> anyhow::Result<SentCommand> {
        let envelope = Envelope::new(saga_id, Some(Uuid::new_v4()), chrono::Utc::now(), command);
        let bytes = serde_json::to_vec(&envelope)?;
        let traceparent = messaging::telemetry::new_traceparent();
        let trace_id = traceparent.split('-').nth(1).unwrap_or_default().to_owned();
        let headers = messaging::kafka::record_headers([("traceparent", traceparent.as_str())]);
        let landed = self
            .send(envelope.body.key.as_bytes(), &bytes, headers)
            .await?;
        Ok(SentCommand {
            label: label.to_owned(),
            envelope,
            trace_id,
            bytes,
            traceparent,
            landed,
        })
    }

    /// Sends `sent` again, the same bytes and `traceparent` (a redelivery).
    pub async fn redeliver(&self, sent: &SentCommand) -> anyhow::Result<Landed> {
        let headers =
            messaging::kafka::record_headers([("traceparent", sent.traceparent.as_str())]);
        self.send(sent.key().as_bytes(), &sent.bytes, headers).await
    }

    /// Sends any bytes as key, value and headers (`None`: no key or a null value).
    pub async fn send_raw(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> anyhow::Result<Landed> {
        let headers = messaging::headers::with_any_bytes(
            headers
                .iter()
                .map(|(name, value)| (name.as_slice(), value.as_deref())),
        )?;
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.command_topic).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.deliver(record).await
    }

    async fn send(
        &self,
        key: &[u8],
        bytes: &[u8],
        headers: OwnedHeaders,
    ) -> anyhow::Result<Landed> {
        let record = FutureRecord::to(&self.command_topic)
            .key(key)
            .payload(bytes)
            .headers(headers);
        self.deliver(record).await
    }

    async fn deliver(&self, record: FutureRecord<'_, [u8], [u8]>) -> anyhow::Result<Landed> {
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("publishing to {}", self.command_topic))?;
        Ok(Landed {
            topic: self.command_topic.clone(),
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The reader's loop: every record into `seen` until `stop`.
fn read(consumer: &BaseConsumer, replies: &str, seen: &Mutex<Vec<Seen>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let record = Seen {
            stream: if message.topic() == replies {
                Stream::Reply
            } else {
                Stream::DeadLetter
            },
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            headers: message
                .headers()
                .into_iter()
                .flat_map(messaging::headers::raw)
                .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
                .collect(),
            payload: message.payload().map(<[u8]>::to_vec),
        };
        if let Ok(mut seen) = seen.lock() {
            seen.push(record);
        }
    }
}
