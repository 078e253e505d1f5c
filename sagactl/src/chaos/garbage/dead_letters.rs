//! Reading the dead-letter topic, as the garbage audit needs it: every copy with the source
//! and the reason its consumer gave.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use uuid::Uuid;

use super::GarbageLog;

/// A record of the dead-letter topic, by the headers the consumers put on it.
#[derive(Debug, Clone)]
pub(super) struct DeadLetter {
    /// Topic, partition and offset of the record it copies.
    pub(super) source: Option<(String, i32, i64)>,
    pub(super) reason: String,
    pub(super) consumer: String,
    /// The copy's id (`dlq.id`): a relay that publishes one outbox row again after a crash
    /// sends the same id, which readers of the dead-letter topic drop.
    pub(super) id: String,
}

/// Reads the dead-letter topic from its start, as far as it goes each time it is asked.
pub struct DeadLetterReader {
    consumer: BaseConsumer,
    topic: String,
    /// Next offset to read, per partition.
    next: BTreeMap<i32, i64>,
    pub(super) records: Vec<DeadLetter>,
}

impl DeadLetterReader {
    pub fn new(kafka: &messaging::config::KafkaConnection, topic: String) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = messaging::kafka::connection_settings(kafka)?
            .set("group.id", format!("sagactl-chaos-dlq-{}", Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("creating the dead-letter reader")?;
        Ok(Self {
            consumer,
            topic,
            next: BTreeMap::new(),
            records: Vec::new(),
        })
    }

    /// Reads every partition up to the end it has now (blocking; at most `timeout`).
    pub fn read_to_end(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .context("reading the dead-letter topic's metadata")?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut ends = BTreeMap::new();
        for &partition in &partitions {
            let (_, high) =
                self.consumer
                    .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))?;
            ends.insert(partition, high);
        }
        let mut assignment = TopicPartitionList::new();
        for &partition in &partitions {
            let from = self.next.get(&partition).copied().unwrap_or(0);
            assignment.add_partition_offset(&self.topic, partition, Offset::Offset(from))?;
        }
        self.consumer.assign(&assignment)?;
        let behind = |next: &BTreeMap<i32, i64>| {
            ends.iter()
                .any(|(p, end)| next.get(p).copied().unwrap_or(0) < *end)
        };
        while behind(&self.next) {
            if Instant::now() > deadline {
                anyhow::bail!("could not read {} to its end in time", self.topic);
            }
            let Some(message) = self.consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let message = message?;
            // Read as bytes: anyone who may write to the topic may put any bytes in a header.
            let header = |name: &str| {
                message
                    .headers()
                    .into_iter()
                    .flat_map(messaging::headers::raw)
                    .find(|h| h.name == name.as_bytes())
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            let source = match (
                header("dlq.source.topic"),
                header("dlq.source.partition").and_then(|p| p.parse().ok()),
                header("dlq.source.offset").and_then(|o| o.parse().ok()),
            ) {
                (Some(topic), Some(partition), Some(offset)) => Some((topic, partition, offset)),
                _ => None,
            };
            self.records.push(DeadLetter {
                source,
                reason: header("dlq.reason").unwrap_or_default(),
                consumer: header("dlq.consumer").unwrap_or_default(),
                id: header("dlq.id").unwrap_or_default(),
            });
            self.next.insert(message.partition(), message.offset() + 1);
        }
        Ok(())
    }

    /// Whether every record of `log` has a copy in what was read so far.
    pub fn holds_all(&self, log: &GarbageLog) -> bool {
        let seen: BTreeSet<(&str, i32, i64)> = self
            .records
            .iter()
            .filter_map(|r| r.source.as_ref())
            .map(|(t, p, o)| (t.as_str(), *p, *o))
            .collect();
        log.sent
            .iter()
            .all(|s| seen.contains(&(s.topic.as_str(), s.partition, s.offset)))
    }
}
