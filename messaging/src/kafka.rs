//! Kafka client settings and topic creation.
//!
//! The settings work on Apache Kafka and on the Nisshi stand-in alike: no Kafka transactions
//! (the outbox makes them unnecessary), idempotent producers, manual offset storing.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::ClientConfig;

use crate::access::{KafkaConnection, Refusal, WatchedContext};
use crate::config::{GroupProtocol, KafkaConfig};
use crate::health::Health;
use crate::{Error, Result};

/// The longest wait between attempts to reach a broker that is away. librdkafka's default
/// (10 s) left the services idle for up to 10 s after a restarted broker was back (the chaos
/// suite's broker kills measured it); a one-node cluster has no other broker to turn to.
const RECONNECT_BACKOFF_MAX_MS: &str = "1000";

/// What every client of a service starts from: [`KafkaConnection::client_config`] (the brokers
/// and the client properties file) and the reconnect backoff.
pub(crate) fn base(config: &KafkaConfig) -> Result<ClientConfig> {
    Ok(with_debug(connection_settings(&config.connection)?, config))
}

/// `client` with the librdkafka debug contexts `KAFKA_DEBUG` names, if any.
fn with_debug(mut client: ClientConfig, config: &KafkaConfig) -> ClientConfig {
    if let Some(contexts) = &config.kafka_debug {
        client.set("debug", contexts);
    }
    client
}

/// [`Error::Kafka`] for a client that could not be created, naming the connection. The
/// description reads the properties file, so it is made only when creation failed.
fn creating(
    what: &str,
    connection: &KafkaConnection,
) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    let what = what.to_owned();
    let connection = connection.clone();
    move |source| Error::Kafka {
        context: format!("creating {what} ({})", connection.describe()),
        source,
    }
}

/// The settings of any client of `connection`, a tool's too: its brokers, its client
/// properties, and a reconnect backoff fit for a cluster that restarts.
///
/// # Errors
/// [`Error::ClientProperties`] when the properties file cannot be used.
pub fn connection_settings(connection: &KafkaConnection) -> Result<ClientConfig> {
    let mut client = connection.client_config()?;
    client.set("reconnect.backoff.max.ms", RECONNECT_BACKOFF_MAX_MS);
    Ok(client)
}

/// The consumer group of the service `name` under `topic_prefix` when it is not configured:
/// what the orchestrator reads a participant's progress from (and the ACL plan grants) too.
pub fn service_group(topic_prefix: &str, name: &str) -> String {
    format!("{topic_prefix}{name}")
}

mod producer;
pub use producer::{DeliveryContext, DeliveryFuture, Producer};

/// A service's consumer (a [`StreamConsumer`] through `Deref`) whose drop waits at most
/// [`CONSUMER_CLOSE_WAIT`] for librdkafka to close it.
///
/// rdkafka's own drop closes the consumer and polls until librdkafka says it is closed, with
/// no bound. Closing leaves the group, and a cluster that refuses the process (its credential
/// deleted while it ran) once kept that loop going past the test's 180 s: the access watch had
/// tripped, the pipeline returned, and dropping its consumer never ended, so the process stayed
/// up holding nothing. Here the close runs on a thread of its own; a close that takes longer is
/// left to finish there, or with the process.
pub struct Consumer(Option<StreamConsumer<WatchedContext>>);

/// How long dropping a [`Consumer`] waits for its close (leaving the group): a leave answered in
/// time hands its partitions over at once; one not answered is covered by the group's session.
pub const CONSUMER_CLOSE_WAIT: Duration = Duration::from_secs(10);

impl std::ops::Deref for Consumer {
    type Target = StreamConsumer<WatchedContext>;

    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("a consumer is present until it is dropped")
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else {
            return;
        };
        let (closed, wait) = std::sync::mpsc::channel();
        let closing = std::thread::Builder::new()
            .name("consumer-close".into())
            .spawn(move || {
                drop(consumer);
                let _ = closed.send(());
            });
        match closing {
            Ok(_) => {
                if wait.recv_timeout(CONSUMER_CLOSE_WAIT).is_err() {
                    tracing::warn!(
                        wait_ms = CONSUMER_CLOSE_WAIT.as_millis() as u64,
                        "the consumer did not close in time; leaving it to close in the background"
                    );
                }
            }
            // No thread to close it on: the consumer went with the closure, dropped here.
            Err(e) => {
                tracing::warn!(error.message = %e, "closing the consumer on a thread of its own failed")
            }
        }
    }
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
///
/// # Errors
/// [`Error::ClientProperties`] when the connection's properties file cannot be used.
pub fn producer_settings(connection: &KafkaConnection, linger_ms: u32) -> Result<ClientConfig> {
    let mut client = connection_settings(connection)?;
    client
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
    Ok(client)
}

/// The services' producer: [`producer_settings`], giving up on a record after 30 s (the relay
/// then tries its row again).
///
/// # Errors
/// [`Error::Kafka`] when librdkafka refuses the configuration.
pub fn producer(config: &KafkaConfig) -> Result<Producer> {
    producer_with_timeout(config, Duration::from_secs(30))
}

/// [`producer`] giving up on a record after `message_timeout` (`message.timeout.ms`).
///
/// # Errors
/// [`Error::Kafka`] when librdkafka refuses the configuration, [`Error::ClientProperties`]
/// when the properties file cannot be used.
pub fn producer_with_timeout(config: &KafkaConfig, message_timeout: Duration) -> Result<Producer> {
    let mut settings = with_debug(
        producer_settings(&config.connection, config.linger_ms)?,
        config,
    );
    settings.set(
        "message.timeout.ms",
        message_timeout.as_millis().max(1).to_string(),
    );
    Producer::create(&settings, watched(&config.connection))
        .map_err(creating("producer", &config.connection))
}

pub(crate) fn watched(connection: &KafkaConnection) -> WatchedContext {
    WatchedContext {
        access: connection.access.clone(),
        assignment: None,
        health: None,
    }
}

/// A fresh producer when `producer` failed fatally (an idempotent producer that lost its
/// sequence, say: every later send of it fails), else `None`.
///
/// # Errors
/// [`Error::Kafka`] when the new producer cannot be created.
pub fn renewed_if_fatal(failed: &Producer, config: &KafkaConfig) -> Result<Option<Producer>> {
    let Some(fatal) = failed.client().fatal_error() else {
        return Ok(None);
    };
    tracing::error!(error.code = ?fatal.0, error.message = %fatal.1, "the producer failed fatally; creating a new one");
    producer(config).map(Some)
}

/// Raises a fatal error in `producer` the way librdkafka does when an idempotent producer
/// loses its sequence (fault injection: `FAULT_PRODUCER_FATAL_AFTER`).
#[allow(unsafe_code)]
pub fn inject_fatal_error(producer: &Producer) {
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
pub fn consumer(config: &KafkaConfig, group: &str) -> Result<Consumer> {
    consumer_with_context(config, group, watched(&config.connection))
}

/// [`consumer`], a pipeline's: it keeps `assignment` up to date with the partitions it holds
/// (the rebalance callbacks: [`crate::assignment`]), and its statistics tell `health` whether
/// it joined its group and reaches a broker (a service's `/readyz`).
///
/// # Errors
/// As [`consumer`].
pub fn consumer_reporting(
    config: &KafkaConfig,
    group: &str,
    assignment: &crate::assignment::Assignment,
    health: &Health,
) -> Result<Consumer> {
    health.consumer_created();
    let context = WatchedContext {
        assignment: Some(assignment.clone()),
        health: Some(health.clone()),
        ..watched(&config.connection)
    };
    consumer_with_context(config, group, context)
}

fn consumer_with_context(
    config: &KafkaConfig,
    group: &str,
    context: WatchedContext,
) -> Result<Consumer> {
    let mut client = base(config)?;
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
        // Feeds the consumer-lag gauge and the readiness.
        .set("statistics.interval.ms", "1000")
        .create_with_context(context)
        .map(|consumer| Consumer(Some(consumer)))
        .map_err(creating(
            &format!("consumer for group {group}"),
            &config.connection,
        ))
}

/// How long the start-up check waits for the cluster's metadata. A check that got no answer in
/// that time while its client saw its credentials or certificates refused stops the service
/// with that refusal (the grace [`crate::access::AccessWatch::confirm`] gives a running service
/// is as long).
const METADATA_TIMEOUT: Duration = crate::access::DEFAULT_REFUSAL_GRACE;

/// Makes sure `topics` exist, as a deployment with auto-creation disabled needs: the topics
/// the cluster already has are left as they are, and only missing ones are created, so a
/// service whose identity may not create topics (a secured cluster, where the admin step
/// `sagactl provision kafka` made them) starts without asking. A name given twice is asked
/// for once (librdkafka crashes on a request that names a topic twice).
///
/// It also checks the connection, so that a service the cluster refuses stops at start with
/// the reason: credentials or certificates refused for the grace period
/// ([`crate::access::DEFAULT_REFUSAL_GRACE`]), or a topic its identity may not see.
///
/// # Errors
/// [`Error::AccessRefused`] as above; [`Error::TopicsMissing`] when topics are missing and may
/// not be created; [`Error::CreateTopic`] for a topic the broker would not create;
/// [`Error::Kafka`] when the cluster cannot be reached.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> Result<()> {
    let connection = &config.connection;
    let unique: Vec<String> = topics
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .cloned()
        .collect();
    let probe = {
        let settings = base(config)?;
        let context = watched(connection);
        let description = connection.describe();
        tokio::task::spawn_blocking(move || {
            missing_topics(settings, context, &unique, &description)
        })
    };
    let checked = probe.await.map_err(|source| Error::TaskFailed {
        task: "the topic check",
        source,
    })?;
    let missing = match checked {
        Ok(missing) => missing,
        Err(e) => {
            return Err(match connection.access.suspicion() {
                Some(refusal) => Error::AccessRefused {
                    connection: connection.describe(),
                    refusal,
                },
                None => e,
            })
        }
    };
    if missing.is_empty() {
        return Ok(());
    }
    // Only now: a service whose topics exist (the usual start) opens no admin connections.
    let admin: AdminClient<WatchedContext> = base(config)?
        .create_with_context(watched(connection))
        .map_err(creating("admin client", connection))?;
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
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
            Err((
                _,
                code @ (RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed),
            )) => {
                return Err(Error::TopicsMissing {
                    topics: missing.clone(),
                    connection: connection.describe(),
                    code,
                })
            }
            Err((topic, code)) => return Err(Error::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// The topics of `wanted` the cluster does not have, asked one by one with a client of its
/// own (librdkafka's metadata call blocks). A topic this identity may not even see
/// (TOPIC_AUTHORIZATION_FAILED in the metadata) is a refusal: the service could not use it.
fn missing_topics(
    settings: ClientConfig,
    context: WatchedContext,
    wanted: &[String],
    connection: &str,
) -> Result<Vec<String>> {
    // A producer, because polling it serves librdkafka's error callback, through which
    // refused credentials and certificates reach the access watch; nothing is produced.
    let client: BaseProducer<WatchedContext> =
        settings
            .create_with_context(context)
            .map_err(Error::kafka(format!(
                "creating a metadata client ({connection})"
            )))?;
    let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
    let mut missing = Vec::new();
    for name in wanted {
        let metadata = loop {
            client.poll(Duration::ZERO);
            match client
                .client()
                .fetch_metadata(Some(name), Duration::from_secs(1))
            {
                Ok(metadata) => break metadata,
                Err(_) if std::time::Instant::now() < deadline => {
                    client.poll(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(Error::Kafka {
                        context: format!("reading the metadata of {name} ({connection})"),
                        source: e,
                    })
                }
            }
        };
        let Some(found) = metadata.topics().first() else {
            missing.push(name.clone());
            continue;
        };
        let Some(code) = found.error().map(RDKafkaErrorCode::from) else {
            continue;
        };
        if matches!(
            code,
            RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
        ) {
            missing.push(name.clone());
        } else if let Some(refusal) = Refusal::of_topic(name, code) {
            return Err(Error::AccessRefused {
                connection: connection.to_owned(),
                refusal,
            });
        }
        // Anything else (a leader election, say): the topic exists.
    }
    Ok(missing)
}

/// The partitions `metadata` (asked for `topic` alone) gives `topic`.
///
/// # Errors
/// [`Error::PartitionCount`] when it gives none (the topic unknown, or refused).
pub(crate) fn partition_ids(
    metadata: &rdkafka::metadata::Metadata,
    topic: &str,
) -> Result<Vec<i32>> {
    match metadata.topics().first() {
        Some(found) if found.error().is_none() && !found.partitions().is_empty() => {
            Ok(found.partitions().iter().map(|p| p.id()).collect())
        }
        found => Err(Error::PartitionCount {
            topic: topic.to_owned(),
            code: found
                .and_then(|found| found.error())
                .map(RDKafkaErrorCode::from),
        }),
    }
}

/// How many partitions `topic` has, as the cluster's metadata says (a client of its own, for
/// at most 5 s).
///
/// # Errors
/// [`Error::Kafka`] when the cluster does not answer; [`Error::PartitionCount`] when it gives
/// no partitions for the topic (unknown, or refused).
pub async fn partition_count(config: &KafkaConfig, topic: &str) -> Result<i32> {
    let settings = base(config)?;
    let context = watched(&config.connection);
    let description = config.connection.describe();
    let topic = topic.to_owned();
    let asked = tokio::task::spawn_blocking(move || {
        let client: BaseProducer<WatchedContext> =
            settings
                .create_with_context(context)
                .map_err(Error::kafka(format!(
                    "creating a metadata client ({description})"
                )))?;
        let metadata = client
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .map_err(Error::kafka(format!(
                "reading the metadata of {topic} ({description})"
            )))?;
        let partitions = partition_ids(&metadata, &topic)?;
        Ok(i32::try_from(partitions.len()).unwrap_or(i32::MAX))
    })
    .await
    .map_err(|source| Error::TaskFailed {
        task: "the partition count",
        source,
    })?;
    asked
}
