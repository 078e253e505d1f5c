//! A topic prefix of a test's own, and reading a topic.

use std::time::Duration;

use messaging::config::{GroupProtocol, KafkaConfig, KafkaConnection};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{brokers, cleanup, unique_id};

/// Client settings for the topic prefix `topic_prefix` on the test broker ([`brokers`]), with
/// `partitions` per topic created, replication 1 and timeouts short enough for tests.
pub fn kafka_config(topic_prefix: String, partitions: i32) -> KafkaConfig {
    KafkaConfig {
        connection: KafkaConnection::to(brokers()),
        topic_prefix,
        topic_partitions: partitions,
        topic_replication_factor: 1,
        fetch_wait_max_ms: 100,
        session_timeout_ms: 6_000,
        group_instance_id: None,
        group_protocol: GroupProtocol::default(),
        kafka_debug: None,
        linger_ms: 0,
        consumer_batch_max: 100,
        consumer_stall_ms: 10_000,
    }
}

/// A topic prefix of a test's own (`{label}-{a fresh id}.`) on the test broker. When this is
/// dropped, whether the test passed or not, every topic whose name starts with it is deleted:
/// those the test made and those its services made.
#[derive(Debug)]
pub struct TestTopics {
    prefix: String,
    brokers: String,
}

impl TestTopics {
    pub fn new(label: &str) -> Self {
        Self::on(label, &brokers())
    }

    /// The same on the broker at `brokers` (a test's private one).
    pub fn on(label: &str, brokers: &str) -> Self {
        Self {
            prefix: format!("{label}-{}.", unique_id(12)),
            brokers: brokers.to_owned(),
        }
    }

    /// The prefix, ending with its `.`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `name` under the prefix.
    pub fn named(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Client settings for the prefix ([`kafka_config`]) with `partitions` per topic, on this
    /// prefix's broker.
    pub fn kafka_config(&self, partitions: i32) -> KafkaConfig {
        let mut config = kafka_config(self.prefix.clone(), partitions);
        config.connection.kafka_brokers.clone_from(&self.brokers);
        config
    }
}

impl Drop for TestTopics {
    fn drop(&mut self) {
        let (prefix, brokers) = (self.prefix.clone(), self.brokers.clone());
        cleanup::run(async move {
            let names = match topics_named(&brokers, &prefix) {
                Ok(names) => names,
                Err(e) => {
                    eprintln!("cannot list the topics of {prefix} to delete them: {e}");
                    return;
                }
            };
            if names.is_empty() {
                return;
            }
            let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            match admin {
                Ok(admin) => {
                    if let Err(e) = admin.delete_topics(&names, &AdminOptions::new()).await {
                        eprintln!("deleting the topics of {prefix} failed: {e}");
                    }
                }
                Err(e) => eprintln!("cannot create a Kafka admin client: {e}"),
            }
        });
    }
}

/// The topics on `brokers` whose name starts with `prefix`.
fn topics_named(brokers: &str, prefix: &str) -> Result<Vec<String>, rdkafka::error::KafkaError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|name| name.starts_with(prefix))
        .collect())
}

/// Reads `topic` on the test broker from the beginning of every partition, without a group,
/// until `count` records have arrived (30 s at most between two, or the test fails), then for
/// as long as records keep coming within `linger` (`Duration::ZERO`: not at all), so that a
/// test sees copies that follow. Partition by partition, each in offset order.
///
/// # Panics
/// When the broker cannot be read or `count` records do not arrive.
pub async fn read_from_start(topic: &str, count: usize, linger: Duration) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("reader-{}", unique_id(32)))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut partitions = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        partitions
            .add_partition_offset(topic, partition.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    let mut records = Vec::new();
    while records.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{count} records on {topic} within 30 s; got {}",
                    records.len()
                )
            })
            .expect("receive");
        records.push(message.detach());
    }
    if !linger.is_zero() {
        while let Ok(Ok(message)) = tokio::time::timeout(linger, consumer.recv()).await {
            records.push(message.detach());
        }
    }
    // Closing an assign-only consumer can block for a long time against this broker
    // (rust-rdkafka issue 509); nothing waits on it, so close it off the test's threads.
    std::thread::spawn(move || drop(consumer));
    records
}
