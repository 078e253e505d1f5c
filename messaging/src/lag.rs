//! How far a consumer group has come on a topic, read from outside the group: its committed
//! offset and the end of the log, per partition. The orchestrator reads its participants'
//! groups and its own this way, to tell a participant that is behind from one that is gone
//! when a saga's deadline passes (`orchestrator/src/backlog.rs`).
//!
//! Reading offsets joins nothing: the client never subscribes, so the group's members and
//! their assignment are untouched. On a secured cluster the reading identity needs `Describe`
//! on the group and the topic (scripts/kafka-acls.py grants the orchestrator that on the
//! participants' groups); without it the read fails and the caller knows nothing, as before.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::access::WatchedContext;
use crate::config::KafkaConfig;
use crate::{Error, Result};

/// One partition of a topic, as a group has come through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    /// The group's committed offset (the next record it will handle), `None` when it never
    /// committed one on this partition.
    pub committed: Option<i64>,
    /// The partition's end (its high watermark): the offset the next record written gets.
    pub end: i64,
}

impl Position {
    /// Records written to the partition that the group has not committed past. A group that
    /// never committed counts from the partition's start, which is not known here: 0 then,
    /// and the caller treats "never committed" as knowing nothing.
    pub fn lag(&self) -> i64 {
        self.committed
            .map_or(0, |committed| (self.end - committed).max(0))
    }
}

/// Reads one group's positions. Blocking calls: run them on a blocking thread.
pub struct GroupReader {
    consumer: BaseConsumer<WatchedContext>,
    group: String,
}

impl GroupReader {
    /// A reader of `group`'s offsets, connected as `config` says (its identity on a secured
    /// cluster).
    ///
    /// # Errors
    /// When the client cannot be created (its settings are refused).
    pub fn new(config: &KafkaConfig, group: &str) -> Result<Self> {
        let mut settings = crate::kafka::base(config)?;
        settings
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let consumer = settings
            .create_with_context(crate::kafka::watched(&config.connection))
            .map_err(Error::kafka(format!(
                "creating a reader of group {group}'s offsets ({})",
                config.connection.describe()
            )))?;
        Ok(Self {
            consumer,
            group: group.to_owned(),
        })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Every partition of `topic`: the group's committed offset and the partition's end. Each
    /// request waits at most `timeout`.
    ///
    /// # Errors
    /// When the brokers do not answer, the topic does not exist, or this identity may not
    /// read the group's offsets.
    pub fn positions(&self, topic: &str, timeout: Duration) -> Result<Vec<Position>> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(Error::kafka(format!("reading the metadata of {topic}")))?;
        let partitions = crate::kafka::partition_ids(&metadata, topic)?;
        let mut asked = TopicPartitionList::new();
        for partition in &partitions {
            asked.add_partition(topic, *partition);
        }
        let committed = self
            .consumer
            .committed_offsets(asked, timeout)
            .map_err(Error::kafka(format!(
                "reading group {}'s offsets on {topic}",
                self.group
            )))?;
        partitions
            .into_iter()
            .map(|partition| {
                let (_, end) = self
                    .consumer
                    .fetch_watermarks(topic, partition, timeout)
                    .map_err(Error::kafka(format!(
                        "reading the end of {topic}[{partition}]"
                    )))?;
                let committed = committed
                    .find_partition(topic, partition)
                    .and_then(|found| match found.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
                Ok(Position {
                    partition,
                    committed,
                    end,
                })
            })
            .collect()
    }
}
