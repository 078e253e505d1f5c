//! Garbage for the chaos suite: hostile records published to every topic the services consume
//! while sagas run, and the audit of the dead-letter topic afterwards: every garbage record
//! must be set aside there exactly once, and nothing else may be. The topics, and the valid
//! messages the garbage is made from, come from the saga definitions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::ValueEnum;
use events::{Action, Envelope, Reply, Topics};
use orchestrator::saga::definitions::{trigger_message, SagaDefinition};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

use crate::deployment::{Deployment, ORCHESTRATOR};

/// What a garbage record is made of. Each is built so that no consumer may act on it: all of
/// them belong in the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum GarbageKind {
    /// Raw NUL bytes in the key and in the payload.
    NulBytes,
    /// A well-formed message with an escaped NUL (`\u0000`) in a string, which PostgreSQL's
    /// text and jsonb cannot hold.
    NulInJson,
    /// Invalid UTF-8 in the key and inside a JSON string.
    InvalidUtf8,
    /// The first half of a valid message.
    TruncatedJson,
    /// A valid message whose `type` is `OrderCancelled` (on a trigger topic: its trigger).
    /// Commands and replies are generic, named by the saga definitions, so there the message
    /// is also of a kind nobody knows: a command for a step `cancel_order` that no participant
    /// serves, a reply with the outcome `cancelled`.
    UnknownType,
    /// A valid message without its `type`.
    MissingType,
    /// A valid envelope with `schema_version` 999 (on a trigger topic: the trigger in an
    /// envelope).
    FutureSchema,
    /// A valid message of another topic: another saga type's trigger (a reply when there is
    /// one saga type) on a trigger topic, another participant's command on a command topic, a
    /// command on `saga.replies`.
    WrongMessage,
    /// A zero-length payload.
    EmptyPayload,
    /// No payload at all (a tombstone).
    NullPayload,
    /// No key.
    NoKey,
    /// A key with a NUL byte.
    NulKey,
    /// A 200 KB `tracestate` header beside a valid `traceparent`.
    HugeHeader,
    /// Header names and values of any bytes, as a client of another language may send them:
    /// names that are not UTF-8 (`c3 28` once crashed every consumer that met it), with NUL,
    /// empty and 64 KiB long; null values; trace headers that are not text.
    AnyBytesHeaders,
    /// A 1,040,000-byte payload: more than librdkafka's default `message.max.bytes`
    /// (1,000,000), less than the broker's (1,048,588).
    HugePayload,
}

impl GarbageKind {
    pub fn name(self) -> String {
        crate::chaos::value_name(self)
    }
}

/// Size of the [`GarbageKind::HugePayload`] record's value.
const HUGE_PAYLOAD_BYTES: usize = 1_040_000;
/// Size of the [`GarbageKind::HugeHeader`] record's `tracestate`.
const HUGE_HEADER_BYTES: usize = 200 * 1024;

/// A consumed topic, which the garbage visits in turn.
#[derive(Debug, Clone)]
pub enum Target {
    /// A saga type's trigger topic.
    Trigger(Arc<SagaDefinition>),
    /// A participant's command topic; the valid message there is the forward command of its
    /// first step in `saga`.
    Commands {
        participant: String,
        topic: String,
        saga: Arc<SagaDefinition>,
        step: usize,
    },
    Replies,
}

impl Target {
    /// Every topic the services consume: each saga type's trigger topic, each participant's
    /// command topic, and the replies.
    pub fn all(deployment: &Deployment) -> Vec<Self> {
        let mut targets: Vec<Self> = deployment.sagas().cloned().map(Self::Trigger).collect();
        for participant in &deployment.participants {
            let first_step = deployment.sagas().find_map(|saga| {
                let step = saga
                    .steps
                    .iter()
                    .position(|s| s.participant == participant.name)?;
                Some((Arc::clone(saga), step))
            });
            if let Some((saga, step)) = first_step {
                targets.push(Self::Commands {
                    participant: participant.name.clone(),
                    topic: participant.topic.clone(),
                    saga,
                    step,
                });
            }
        }
        targets.push(Self::Replies);
        targets
    }

    fn topic(&self, topics: &Topics) -> String {
        match self {
            Self::Trigger(saga) => topics.named(&saga.trigger.topic),
            Self::Commands { topic, .. } => topics.named(topic),
            Self::Replies => topics.replies(),
        }
    }

    /// The consumer group that reads the topic in a chaos run.
    fn group(&self, prefix: &str) -> String {
        match self {
            Self::Trigger(_) | Self::Replies => format!("{prefix}{ORCHESTRATOR}"),
            Self::Commands { participant, .. } => format!("{prefix}{participant}"),
        }
    }
}

/// One hostile record, before it is sent.
struct Hostile {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    /// Name and value of each header, bytes as sent (`None`: a null value).
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// A valid trigger of `saga` whose key is `key`: its trigger message's sample, keyed.
fn trigger(saga: &SagaDefinition, key: Uuid) -> Value {
    let mut message = trigger_message(&saga.trigger.message)
        .and_then(|m| m.sample().ok())
        .unwrap_or_default();
    let segments: Vec<&str> = saga.trigger.key.segments().collect();
    if let Some((last, parents)) = segments.split_last() {
        let parent = parents
            .iter()
            .try_fold(&mut message, |value, segment| value.get_mut(*segment));
        if let Some(Value::Object(fields)) = parent {
            fields.insert((*last).to_owned(), key.to_string().into());
        }
    }
    message
}

/// The forward command of step `step` of `saga` for the saga keyed `key`, as the saga sends
/// it, in an envelope of `saga_id`. (The registry built every command of the definition when
/// it loaded it; should this one fail all the same, the record is garbage of another kind.)
fn command(saga: &SagaDefinition, step: usize, key: Uuid, saga_id: Uuid) -> Value {
    let Some(definition) = saga.steps.get(step) else {
        return json!({ "note": "no such step" });
    };
    match definition
        .forward
        .command(saga, definition, Action::Forward, &trigger(saga, key), 1)
    {
        Ok(command) => envelope(saga_id, command),
        Err(e) => json!({ "note": format!("no command: {e}") }),
    }
}

/// The command on the first participant's topic, for the targets that carry no command.
fn any_command(targets: &[Target], key: Uuid, saga_id: Uuid) -> Value {
    targets
        .iter()
        .find_map(|t| match t {
            Target::Commands { saga, step, .. } => Some(command(saga, *step, key, saga_id)),
            _ => None,
        })
        .unwrap_or_default()
}

fn envelope(saga_id: Uuid, body: impl Serialize) -> Value {
    serde_json::to_value(Envelope::new(saga_id, None, Utc::now(), body)).unwrap_or_default()
}

/// A message `targets[at]`'s consumer would accept.
fn valid(targets: &[Target], at: usize, key: Uuid, saga_id: Uuid) -> Value {
    match &targets[at] {
        Target::Trigger(saga) => trigger(saga, key),
        Target::Commands { saga, step, .. } => command(saga, *step, key, saga_id),
        Target::Replies => {
            let command = any_command(targets, key, saga_id);
            match serde_json::from_value::<Envelope<events::Command>>(command) {
                Ok(command) => envelope(saga_id, Reply::succeeded(&command.body)),
                Err(_) => Value::Null,
            }
        }
    }
}

/// A message of another topic than `targets[at]`'s.
fn wrong(targets: &[Target], at: usize, key: Uuid, saga_id: Uuid) -> Value {
    let same_kind = |t: &Target| {
        matches!(
            (&targets[at], t),
            (Target::Trigger(_), Target::Trigger(_))
                | (Target::Commands { .. }, Target::Commands { .. })
        )
    };
    // The next target of the same kind, going round.
    let other = (1..targets.len())
        .map(|n| (at + n) % targets.len())
        .find(|&i| same_kind(&targets[i]));
    match (&targets[at], other) {
        (Target::Replies, _) => any_command(targets, key, saga_id),
        (_, Some(other)) => valid(targets, other, key, saga_id),
        (Target::Trigger(_), None) => {
            let replies = targets.iter().position(|t| matches!(t, Target::Replies));
            replies.map_or(Value::Null, |r| valid(targets, r, key, saga_id))
        }
        (Target::Commands { .. }, None) => {
            let trigger = targets.iter().position(|t| matches!(t, Target::Trigger(_)));
            trigger.map_or(Value::Null, |t| valid(targets, t, key, saga_id))
        }
    }
}

/// Puts a NUL in the middle of the first string in `value` that is not a UUID nor a `type`
/// (so that the message still decodes as far as the step's fields).
fn put_nul(value: &mut Value) -> bool {
    match value {
        Value::String(text) if Uuid::parse_str(text).is_err() => {
            let at = text
                .chars()
                .take(text.chars().count() / 2)
                .map(char::len_utf8)
                .sum();
            text.insert(at, '\0');
            true
        }
        Value::Object(fields) => fields
            .iter_mut()
            .filter(|(name, _)| *name != "type")
            .any(|(_, field)| put_nul(field)),
        Value::Array(items) => items.iter_mut().any(put_nul),
        _ => false,
    }
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Builds the garbage record of `kind` for `targets[at]`, about the saga keyed `key` (and
/// `saga_id` where it has an envelope).
fn build(kind: GarbageKind, targets: &[Target], at: usize, key: Uuid, saga_id: Uuid) -> Hostile {
    let target = &targets[at];
    let mut valid = valid(targets, at, key, saga_id);
    let type_name = valid["type"].as_str().unwrap_or_default().to_owned();
    let note = |note: &str| to_bytes(&json!({ "type": type_name, "note": note }));
    let mut hostile = Hostile {
        key: Some(key.to_string().into_bytes()),
        payload: None,
        headers: Vec::new(),
    };
    hostile.payload = Some(match kind {
        GarbageKind::NulBytes => {
            hostile.key = Some(format!("\0{key}\0").into_bytes());
            format!("{{\"type\":\"{type_name}\",\"key\":\"\0\0\0\"}}\0").into_bytes()
        }
        GarbageKind::NulInJson => {
            match target {
                Target::Trigger(_) => {
                    put_nul(&mut valid);
                }
                Target::Commands { .. } => {
                    put_nul(&mut valid["payload"]);
                }
                Target::Replies => {
                    // (Reply::failed takes the NUL out of a reason: set it by hand.)
                    valid["outcome"] = "failed".into();
                    valid["reason"] = "out of\0stock".into();
                }
            }
            to_bytes(&valid)
        }
        GarbageKind::InvalidUtf8 => {
            // (The key as text: its 16 raw bytes may hold a NUL, which is another kind.)
            hostile.key = Some([&[0xff, 0xfe][..], key.to_string().as_bytes()].concat());
            // Two bytes that are no UTF-8 at the start of the first string value.
            let mut bytes = to_bytes(&valid);
            let at = bytes
                .windows(3)
                .position(|w| w == b"\":\"")
                .map_or(0, |i| i + 3);
            bytes.splice(at..at, [0xc3, 0x28]);
            bytes
        }
        GarbageKind::TruncatedJson => {
            let bytes = to_bytes(&valid);
            bytes[..bytes.len() / 2].to_vec()
        }
        GarbageKind::UnknownType => {
            valid["type"] = "OrderCancelled".into();
            match target {
                Target::Trigger(_) => {}
                Target::Commands { .. } => valid["step"] = "cancel_order".into(),
                Target::Replies => valid["outcome"] = "cancelled".into(),
            }
            to_bytes(&valid)
        }
        GarbageKind::MissingType => {
            if let Some(map) = valid.as_object_mut() {
                map.remove("type");
            }
            to_bytes(&valid)
        }
        GarbageKind::FutureSchema => {
            let mut future = match target {
                // An enveloped trigger: the message is the envelope's payload.
                Target::Trigger(_) => {
                    envelope(saga_id, json!({ "type": type_name, "payload": valid }))
                }
                _ => valid,
            };
            future["schema_version"] = 999.into();
            to_bytes(&future)
        }
        GarbageKind::WrongMessage => to_bytes(&wrong(targets, at, key, saga_id)),
        GarbageKind::EmptyPayload => Vec::new(),
        GarbageKind::NullPayload => {
            hostile.payload = None;
            return hostile;
        }
        GarbageKind::NoKey => {
            hostile.key = None;
            note("a record without a key")
        }
        GarbageKind::NulKey => {
            hostile.key = Some(format!("{key}\0").into_bytes());
            note("a key with a NUL byte")
        }
        GarbageKind::HugeHeader => {
            let traceparent = messaging::telemetry::new_traceparent();
            let mut tracestate = b"garbage=".to_vec();
            tracestate.resize(HUGE_HEADER_BYTES, b'x');
            hostile.headers = vec![
                (b"traceparent".to_vec(), Some(traceparent.into_bytes())),
                (b"tracestate".to_vec(), Some(tracestate)),
            ];
            note("a 200 KB tracestate header")
        }
        GarbageKind::AnyBytesHeaders => {
            let long_name = vec![0xc3; 64 * 1024];
            hostile.headers = vec![
                (vec![0xc3, 0x28], Some(b"a name that is not UTF-8".to_vec())),
                (vec![0xff, 0xfe, 0xfd], Some(vec![0xc3, 0x28])),
                (b"traceparent".to_vec(), Some(vec![0xff, 0xfe])),
                (b"tracestate".to_vec(), Some(b"\0\0".to_vec())),
                (b"nul\0inside".to_vec(), None),
                (Vec::new(), Some(Vec::new())),
                (long_name, Some(vec![0; 1024])),
            ];
            note("headers of any bytes")
        }
        GarbageKind::HugePayload => {
            let mut bytes = format!("{{\"type\":\"{type_name}\",\"padding\":\"").into_bytes();
            bytes.resize(HUGE_PAYLOAD_BYTES - 2, b'x');
            bytes.extend_from_slice(b"\"}");
            bytes
        }
    });
    hostile
}

/// One garbage record the broker acknowledged.
#[derive(Debug, Clone)]
pub struct Sent {
    pub kind: GarbageKind,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    target: Target,
    /// The saga key and saga id the record names, to find whatever a consumer did with it.
    key: Uuid,
    saga_id: Uuid,
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

/// A record of the dead-letter topic, by the headers the consumers put on it.
#[derive(Debug, Clone)]
struct DeadLetter {
    /// Topic, partition and offset of the record it copies.
    source: Option<(String, i32, i64)>,
    reason: String,
    consumer: String,
    /// The copy's id (`dlq.id`): a relay that publishes one outbox row again after a crash
    /// sends the same id, which readers of the dead-letter topic drop.
    id: String,
}

/// Reads the dead-letter topic from its start, as far as it goes each time it is asked.
pub struct DeadLetterReader {
    consumer: BaseConsumer,
    topic: String,
    /// Next offset to read, per partition.
    next: BTreeMap<i32, i64>,
    records: Vec<DeadLetter>,
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

/// The garbage invariant, with a line per kind.
pub struct Audit {
    pub passed: bool,
    pub detail: String,
    pub per_kind: Vec<String>,
    /// Per saga type, the keys of garbage records on its trigger topic that started a saga
    /// (left out of the saga invariants).
    garbage_sagas: BTreeMap<String, Vec<Uuid>>,
}

impl Audit {
    /// The keys of the sagas of type `saga` that garbage records started.
    pub fn garbage_sagas(&self, saga: &str) -> &[Uuid] {
        self.garbage_sagas.get(saga).map_or(&[], Vec::as_slice)
    }
}

#[derive(Default)]
struct KindCount {
    sent: u32,
    once: u32,
    /// One copy (one `dlq.id`) published more than once, by a relay that crashed between the
    /// broker's acknowledgement and deleting the row: at-least-once publishing, which readers
    /// undo by the id. Reported, not a failure.
    republished: u32,
    /// Copied more than once under different ids: a record dead-lettered again (a failure).
    redelivered: u32,
    /// No copy: its consumer group never committed past it, its copy is still in an outbox,
    /// or it was consumed and is gone (handled as if valid, or lost).
    not_consumed: u32,
    in_outbox: u32,
    consumed_no_copy: u32,
    started_saga: u32,
    acted_on: u32,
    unconfirmed: u32,
}

impl KindCount {
    fn ok(&self) -> bool {
        self.once == self.sent && self.unconfirmed == 0
    }
}

/// Checks the dead-letter topic against the garbage log, and finds out what happened to
/// every record without exactly one copy there.
pub async fn audit(
    log: &GarbageLog,
    reader: &DeadLetterReader,
    db: &PgPool,
    kafka: &messaging::config::KafkaConnection,
    prefix: &str,
    deployment: &Deployment,
) -> anyhow::Result<Audit> {
    let mut copies: HashMap<(&str, i32, i64), Vec<&DeadLetter>> = HashMap::new();
    let mut foreign: Vec<&DeadLetter> = Vec::new();
    let garbage: BTreeSet<(&str, i32, i64)> = log
        .sent
        .iter()
        .map(|s| (s.topic.as_str(), s.partition, s.offset))
        .collect();
    for record in &reader.records {
        match &record.source {
            Some((t, p, o)) if garbage.contains(&(t.as_str(), *p, *o)) => {
                copies.entry((t.as_str(), *p, *o)).or_default().push(record);
            }
            _ => foreign.push(record),
        }
    }

    // Where the missing ones are: dead-letter rows not yet published, group positions.
    let mut in_outbox = BTreeSet::new();
    for schema in deployment.services() {
        let rows: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(&format!(
            "SELECT headers->>'dlq.source.topic', headers->>'dlq.source.partition', \
                 headers->>'dlq.source.offset' FROM {schema}.outbox WHERE topic = $1"
        ))
        .bind(Topics::new(prefix).dead_letters())
        .fetch_all(db)
        .await?;
        for row in rows {
            if let (Some(t), Some(p), Some(o)) = row {
                if let (Ok(p), Ok(o)) = (p.parse::<i32>(), o.parse::<i64>()) {
                    in_outbox.insert((t, p, o));
                }
            }
        }
    }
    let committed = tokio::task::block_in_place(|| committed_offsets(log, kafka, prefix))?;
    let keys: Vec<Uuid> = log.sent.iter().map(|s| s.key).collect();
    let saga_ids: Vec<Uuid> = log.sent.iter().map(|s| s.saga_id).collect();
    let started: BTreeSet<(String, Uuid)> = sqlx::query_as(&format!(
        "SELECT definition_name, saga_key::uuid FROM {ORCHESTRATOR}.sagas \
         WHERE saga_key = ANY($1::uuid[]::text[])"
    ))
    .bind(&keys)
    .fetch_all(db)
    .await?
    .into_iter()
    .collect();
    let acted_on_sql = deployment
        .participants
        .iter()
        .map(|p| {
            format!(
                "SELECT saga_id FROM {}.step_ledger WHERE saga_id = ANY($1)",
                p.name
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ");
    let acted_on: BTreeSet<Uuid> = sqlx::query_scalar(&acted_on_sql)
        .bind(&saga_ids)
        .fetch_all(db)
        .await?
        .into_iter()
        .collect();

    let mut kinds: BTreeMap<GarbageKind, KindCount> = BTreeMap::new();
    let mut garbage_sagas: BTreeMap<String, Vec<Uuid>> = BTreeMap::new();
    for s in &log.sent {
        let count = kinds.entry(s.kind).or_default();
        count.sent += 1;
        let at = (s.topic.as_str(), s.partition, s.offset);
        match copies.get(&at).map(Vec::as_slice) {
            Some([_]) => count.once += 1,
            Some(several) if several.len() > 1 => {
                if several
                    .iter()
                    .all(|c| !c.id.is_empty() && c.id == several[0].id)
                {
                    count.once += 1;
                    count.republished += 1;
                } else {
                    count.redelivered += 1;
                }
            }
            _ => {
                let position = committed.get(&(s.topic.clone(), s.partition));
                if in_outbox.contains(&(s.topic.clone(), s.partition, s.offset)) {
                    count.in_outbox += 1;
                } else if position.is_none_or(|next| *next <= s.offset) {
                    count.not_consumed += 1;
                } else {
                    count.consumed_no_copy += 1;
                }
            }
        }
        // A garbage record on a trigger topic names the key of a saga of that type.
        if let Target::Trigger(saga) = &s.target {
            if started.contains(&(saga.name.clone(), s.key)) {
                count.started_saga += 1;
                garbage_sagas
                    .entry(saga.name.clone())
                    .or_default()
                    .push(s.key);
            }
        }
        if acted_on.contains(&s.saga_id) {
            count.acted_on += 1;
        }
    }
    for (kind, _, _) in &log.unconfirmed {
        let count = kinds.entry(*kind).or_default();
        count.sent += 1;
        count.unconfirmed += 1;
    }

    let mut per_kind = Vec::new();
    let mut failing = Vec::new();
    let total = |f: fn(&KindCount) -> u32| kinds.values().map(f).sum::<u32>();
    for (kind, c) in &kinds {
        let mut parts = vec![format!("{} sent, {} in the DLQ once", c.sent, c.once)];
        let mut add = |n: u32, what: &str| {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        };
        add(
            c.redelivered,
            "copied twice or more (dead-lettered again on redelivery)",
        );
        add(
            c.republished,
            "of those published again by a relay after a crash (one dlq.id; readers drop the repeat)",
        );
        add(
            c.not_consumed,
            "missing: their consumer group never committed past them",
        );
        add(c.in_outbox, "missing: copy still in an outbox");
        add(c.consumed_no_copy, "missing: consumed, no copy anywhere");
        add(c.started_saga, "started a saga");
        add(c.acted_on, "acted on by a participant");
        add(c.unconfirmed, "not acknowledged by the broker");
        if !c.ok() {
            failing.push(kind.name());
        }
        per_kind.push(format!(
            "{:<4} {:<15} {}",
            if c.ok() { "ok" } else { "BAD" },
            kind.name(),
            parts.join(", ")
        ));
    }
    let foreign_detail = foreign
        .iter()
        .take(3)
        .map(|r| {
            format!(
                "{} from {:?}: {}",
                r.consumer,
                r.source,
                r.reason.chars().take(120).collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let passed = failing.is_empty() && foreign.is_empty();
    let detail = format!(
        "{} garbage records sent ({} kinds, {} topics): {} in the DLQ exactly once ({} of those \
         copies published again by a relay, same dlq.id), {} copied more than once, {} missing, \
         {} started a saga, {} acted on, {} unacknowledged; {} other records in the DLQ{}{}",
        total(|c| c.sent),
        kinds.len(),
        log.sent
            .iter()
            .map(|s| s.topic.as_str())
            .collect::<BTreeSet<_>>()
            .len(),
        total(|c| c.once),
        total(|c| c.republished),
        total(|c| c.redelivered),
        total(|c| c.not_consumed + c.in_outbox + c.consumed_no_copy),
        total(|c| c.started_saga),
        total(|c| c.acted_on),
        total(|c| c.unconfirmed),
        foreign.len(),
        if foreign.is_empty() {
            String::new()
        } else {
            format!(" ({foreign_detail})")
        },
        if failing.is_empty() {
            String::new()
        } else {
            format!("; failing kinds: {}", failing.join(", "))
        },
    );
    Ok(Audit {
        passed,
        detail,
        per_kind,
        garbage_sagas,
    })
}

/// The next offset each consuming group will read, per (topic, partition) that got garbage.
fn committed_offsets(
    log: &GarbageLog,
    kafka: &messaging::config::KafkaConnection,
    prefix: &str,
) -> anyhow::Result<HashMap<(String, i32), i64>> {
    let mut by_group: BTreeMap<String, TopicPartitionList> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for s in &log.sent {
        if seen.insert((s.topic.clone(), s.partition)) {
            by_group
                .entry(s.target.group(prefix))
                .or_default()
                .add_partition(&s.topic, s.partition);
        }
    }
    let mut positions = HashMap::new();
    for (group, partitions) in by_group {
        let consumer: BaseConsumer = messaging::kafka::connection_settings(kafka)?
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()?;
        let committed = consumer
            .committed_offsets(partitions, Duration::from_secs(10))
            .with_context(|| format!("reading the offsets of group {group}"))?;
        for element in committed.elements() {
            if let Offset::Offset(next) = element.offset() {
                positions.insert((element.topic().to_owned(), element.partition()), next);
            }
        }
    }
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<Target> {
        Target::all(&crate::deployment::tests::repository())
    }

    fn bytes(kind: GarbageKind, targets: &[Target], at: usize) -> Vec<u8> {
        build(kind, targets, at, Uuid::new_v4(), Uuid::new_v4())
            .payload
            .unwrap_or_default()
    }

    #[test]
    fn every_consumed_topic_is_a_target() {
        let topics = Topics::new("");
        let names: Vec<String> = targets().iter().map(|t| t.topic(&topics)).collect();
        assert_eq!(
            names,
            [
                "orders",
                "returns",
                "inventory.commands",
                "payment.commands",
                "returns.commands",
                "shipping.commands",
                "saga.replies"
            ]
        );
    }

    #[test]
    fn the_valid_messages_are_valid() {
        let targets = targets();
        for at in 0..targets.len() {
            let payload = to_bytes(&valid(&targets, at, Uuid::new_v4(), Uuid::new_v4()));
            assert!(accepted(&targets[at], &payload), "{:?}", targets[at]);
        }
    }

    /// Whether the consumer of `target` would take `payload` as its own message.
    fn accepted(target: &Target, payload: &[u8]) -> bool {
        match target {
            Target::Trigger(saga) => {
                trigger_message(&saga.trigger.message).is_some_and(|m| (m.decode)(payload).is_ok())
            }
            Target::Commands {
                participant, saga, ..
            } => Envelope::<events::Command>::from_json(payload).is_ok_and(|e| {
                saga.step(&e.body.step)
                    .is_some_and(|s| &s.participant == participant)
            }),
            Target::Replies => Envelope::<Reply>::from_json(payload).is_ok(),
        }
    }

    #[test]
    fn nothing_built_is_a_valid_message() {
        let targets = targets();
        for kind in GarbageKind::value_variants() {
            for (at, target) in targets.iter().enumerate() {
                let payload = bytes(*kind, &targets, at);
                // Whether the contract refuses a wrong or missing `type` on an order is for the
                // chaos run to show (the record then starts a saga); an escaped NUL is valid
                // JSON that only the database refuses.
                let contract = matches!(target, Target::Trigger(saga) if saga.trigger.message == "OrderPlaced")
                    && matches!(kind, GarbageKind::UnknownType | GarbageKind::MissingType);
                // A return's decoder checks its type, so nothing of it is left to the run.
                let nul = *kind == GarbageKind::NulInJson;
                assert!(
                    !accepted(target, &payload) || contract || nul,
                    "{kind:?} on {target:?} decodes as a valid message"
                );
            }
        }
    }

    #[test]
    fn the_huge_ones_have_their_size() {
        let targets = targets();
        let replies = targets.len() - 1;
        assert_eq!(
            bytes(GarbageKind::HugePayload, &targets, replies).len(),
            HUGE_PAYLOAD_BYTES
        );
        let header = build(
            GarbageKind::HugeHeader,
            &targets,
            0,
            Uuid::nil(),
            Uuid::nil(),
        );
        assert_eq!(
            header.headers[1].1.as_ref().map(Vec::len),
            Some(HUGE_HEADER_BYTES)
        );
    }

    #[test]
    fn invalid_utf8_is_invalid() {
        let targets = targets();
        for at in 0..targets.len() {
            assert!(std::str::from_utf8(&bytes(GarbageKind::InvalidUtf8, &targets, at)).is_err());
        }
    }
}
