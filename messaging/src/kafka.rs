//! Kafka client settings and topic creation.
//!
//! The settings work on Apache Kafka and on the Nisshi stand-in alike: no Kafka transactions
//! (the outbox makes them unnecessary), idempotent producers, manual offset storing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;

use crate::config::{GroupProtocol, KafkaConfig};
use crate::metrics::LagReporter;
use crate::{Error, Result};

/// The longest wait between attempts to reach a broker that is away. librdkafka's default
/// (10 s) left the services idle for up to 10 s after a restarted broker was back (the chaos
/// suite's broker kills measured it); a one-node cluster has no other broker to turn to.
const RECONNECT_BACKOFF_MAX_MS: &str = "1000";

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS);
    if let Some(contexts) = &config.kafka_debug {
        client.set("debug", contexts);
    }
    client
}

/// Kafka record headers carrying `headers`.
pub fn record_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> OwnedHeaders {
    headers
        .into_iter()
        .fold(OwnedHeaders::new(), |kafka, (key, value)| {
            kafka.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// The partitioner Java clients use by default (murmur2 of the key, random for a record
/// without one), so that a record keyed by an order id lands on the same partition index
/// whichever client published it: an `OrderPlaced` from a Java or Go service and the engine's
/// own commands and replies for that order meet on one partition number, which the range
/// assignor hands to one consumer. librdkafka's own default (`consistent_random`, CRC32) would
/// scatter them.
pub const PARTITIONER: &str = "murmur2_random";

/// Settings every producer of the project shares, the services' and the tools': idempotent
/// (no duplicates or reordering from its own retries), acks from all in-sync replicas, the
/// Java partitioner, `linger_ms` of batching, and no topic created by producing to it.
pub fn producer_settings(brokers: &str, linger_ms: u32) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", PARTITIONER)
        .set("linger.ms", linger_ms.to_string())
        // A record for a topic that does not exist fails (and the relay holds that topic's
        // rows back) rather than asking a broker that allows it to create the topic: a
        // deleted command topic created again by a produce would get the broker's default
        // partition count, not TOPIC_PARTITIONS, and one saga's messages would no longer
        // share a partition number. The project's broker refuses anyway
        // (auto.create.topics.enable=false); this keeps it so on any broker.
        .set("allow.auto.create.topics", "false");
    client
}

/// The services' producer: [`producer_settings`], giving up on a record after 30 s (the relay
/// then tries its row again).
///
/// # Errors
/// [`Error::Kafka`] when librdkafka refuses the configuration.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer> {
    producer_settings(&config.kafka_brokers, config.linger_ms)
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(Error::kafka("creating producer"))
}

/// A fresh producer when `producer` failed fatally (an idempotent producer that lost its
/// sequence, say: every later send of it fails), else `None`.
///
/// # Errors
/// [`Error::Kafka`] when the new producer cannot be created.
pub fn renewed_if_fatal(
    failed: &FutureProducer,
    config: &KafkaConfig,
) -> Result<Option<FutureProducer>> {
    let Some(fatal) = failed.client().fatal_error() else {
        return Ok(None);
    };
    tracing::error!(error.code = ?fatal.0, error.message = %fatal.1, "the producer failed fatally; creating a new one");
    producer(config).map(Some)
}

/// Raises a fatal error in `producer` the way librdkafka does when an idempotent producer
/// loses its sequence (fault injection: `FAULT_PRODUCER_FATAL_AFTER`).
#[allow(unsafe_code)]
pub fn inject_fatal_error(producer: &FutureProducer) {
    tracing::error!("fault injection: the producer fails fatally");
    // SAFETY: the handle is the live producer's own (it outlives the call), and the reason is
    // a NUL-terminated static string; librdkafka copies both values.
    unsafe {
        rdkafka::bindings::rd_kafka_test_fatal_error(
            producer.client().native_ptr(),
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
            c"fault injection".as_ptr(),
        );
    }
}

/// A consumer in `group` that never commits an offset the application has not stored:
/// `enable.auto.offset.store=false`, and the consume loop stores an offset only after the
/// record's database transaction committed. The range assignor (the client's in the classic
/// protocol, the broker's in KIP-848's) gives one member the same partition number of every
/// topic it reads, so the orders and replies of one order (keyed by order id) reach the same
/// member.
///
/// # Errors
/// [`Error::Kafka`] when librdkafka refuses the configuration.
pub fn consumer(config: &KafkaConfig, group: &str) -> Result<StreamConsumer<LagReporter>> {
    let mut client = base(config);
    if let Some(instance) = &config.group_instance_id {
        client.set("group.instance.id", instance);
    }
    match config.group_protocol {
        GroupProtocol::Classic => client
            .set("group.protocol", "classic")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (config.session_timeout_ms / 4).max(100).to_string(),
            ),
        // Session and heartbeat are the broker's group.consumer.* settings here.
        GroupProtocol::Consumer => client
            .set("group.protocol", "consumer")
            .set("group.remote.assignor", "range"),
    };
    client
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        // Feeds the consumer-lag gauge.
        .set("statistics.interval.ms", "1000")
        .create_with_context(LagReporter)
        .map_err(Error::kafka(format!("creating consumer for group {group}")))
}

/// Creates the topics that are missing, as a deployment with auto-creation disabled needs.
/// Topics that exist already are left as they are; a name given twice is asked for once
/// (librdkafka crashes on a request that names a topic twice).
///
/// # Errors
/// [`Error::CreateTopic`] for a topic the broker would not create.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = base(config)
        .create()
        .map_err(Error::kafka("creating admin client"))?;
    let unique: std::collections::BTreeSet<&String> = topics.iter().collect();
    let new_topics: Vec<NewTopic<'_>> = unique
        .into_iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.topic_partitions,
                TopicReplication::Fixed(config.topic_replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(Error::kafka("creating topics"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}
