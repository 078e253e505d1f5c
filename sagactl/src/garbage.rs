//! Garbage for the chaos suite: hostile records published to every topic the services consume
//! while sagas run, and the audit of the dead-letter topic afterwards: every garbage record
//! must be set aside there exactly once, and nothing else may be.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::ValueEnum;
use events::{
    Action, Address, Command, Envelope, LineItem, OrderPlaced, Reply, ReplyNames, ReturnItem,
    ReturnRequested, Topics,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

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
    /// A valid message whose `type` is `OrderCancelled` (on `orders`: an `OrderPlaced`). Commands
    /// and replies are generic, named by the saga definitions, so there the message is also
    /// of a kind nobody knows: a command for a step `cancel_order` that no participant serves,
    /// a reply with the outcome `cancelled`.
    UnknownType,
    /// A valid message without its `type`.
    MissingType,
    /// A valid envelope with `schema_version` 999 (on `orders`: an order in an envelope).
    FutureSchema,
    /// A valid message of another topic: a command on `saga.replies`, another participant's
    /// command, a reply on `orders`.
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

/// A participant of the order saga and the step it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Participant {
    name: &'static str,
    step: &'static str,
}

const INVENTORY: Participant = Participant {
    name: "inventory",
    step: "reserve_stock",
};
const PAYMENT: Participant = Participant {
    name: "payment",
    step: "charge_payment",
};
const SHIPPING: Participant = Participant {
    name: "shipping",
    step: "schedule_shipment",
};

/// The return saga's own participant (its other steps are inventory's and payment's).
const RETURNS: Participant = Participant {
    name: "returns",
    step: "receive_return",
};

/// The consumed topics, in the order the garbage visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Orders,
    /// The return saga's trigger topic.
    Returns,
    Commands(Participant),
    Replies,
}

const TARGETS: [Target; 7] = [
    Target::Orders,
    Target::Returns,
    Target::Commands(INVENTORY),
    Target::Commands(PAYMENT),
    Target::Commands(SHIPPING),
    Target::Commands(RETURNS),
    Target::Replies,
];

impl Target {
    fn topic(self, topics: &Topics) -> String {
        match self {
            Self::Orders => topics.orders(),
            Self::Returns => topics.named("returns"),
            Self::Commands(participant) => topics.named(&format!("{}.commands", participant.name)),
            Self::Replies => topics.replies(),
        }
    }

    /// The consumer group that reads the topic in a chaos run.
    fn group(self, prefix: &str) -> String {
        match self {
            Self::Orders | Self::Returns | Self::Replies => format!("{prefix}orchestrator"),
            Self::Commands(participant) => format!("{prefix}{}", participant.name),
        }
    }
}

/// One hostile record, before it is sent.
struct Hostile {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(&'static str, Vec<u8>)>,
}

fn order(order_id: Uuid) -> OrderPlaced {
    OrderPlaced {
        order_id,
        customer_id: "alice".into(),
        items: vec![LineItem {
            sku: "WIDGET".into(),
            quantity: 1,
            unit_price_cents: 1_000,
        }],
        total_cents: 1_000,
        currency: "EUR".into(),
        shipping_address: Address {
            country: "DE".into(),
            city: "Berlin".into(),
            line1: "Unter den Linden 1".into(),
            postal_code: "10117".into(),
        },
    }
}

/// A return of one WIDGET of an order, whose return id is `return_id`.
fn return_request(return_id: Uuid) -> ReturnRequested {
    ReturnRequested {
        return_id,
        order_id: Uuid::new_v4(),
        customer_id: "alice".into(),
        items: vec![ReturnItem {
            sku: "WIDGET".into(),
            quantity: 1,
        }],
        refund_cents: 1_000,
        currency: "EUR".into(),
    }
}

/// The forward command of `participant`'s step for `order_id`, as its saga sends it (the
/// return saga's `receive_return` with `order_id` as the return id).
fn command_for(participant: Participant, order_id: Uuid) -> Command {
    let order = order(order_id);
    let (name, success, failure, payload) = match participant.name {
        "inventory" => (
            "ReserveStock",
            "StockReserved",
            "StockUnavailable",
            json!({ "order_id": order_id, "items": order.items }),
        ),
        "payment" => (
            "ChargePayment",
            "PaymentCharged",
            "PaymentDeclined",
            json!({
                "order_id": order_id,
                "customer_id": order.customer_id,
                "amount_cents": order.total_cents,
                "currency": order.currency,
            }),
        ),
        "returns" => {
            let request = return_request(order_id);
            (
                "ReceiveReturn",
                "ReturnReceived",
                "ReturnRefused",
                json!({
                    "return_id": request.return_id,
                    "order_id": request.order_id,
                    "customer_id": request.customer_id,
                    "items": request.items,
                    "refund_cents": request.refund_cents,
                    "currency": request.currency,
                }),
            )
        }
        _ => (
            "ScheduleShipment",
            "ShipmentScheduled",
            "ShipmentRejected",
            json!({
                "order_id": order_id,
                "address": order.shipping_address,
                "items": order.items,
            }),
        ),
    };
    Command {
        name: name.into(),
        saga_type: if participant == RETURNS {
            "return"
        } else {
            "order"
        }
        .into(),
        saga_version: 1,
        step: participant.step.into(),
        action: Action::Forward,
        attempt: 1,
        key: order_id.to_string(),
        replies: ReplyNames {
            success: success.into(),
            failure: Some(failure.into()),
        },
        payload: match payload {
            Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        },
    }
}

fn envelope(saga_id: Uuid, body: impl Serialize) -> Value {
    serde_json::to_value(Envelope::new(saga_id, None, Utc::now(), body)).unwrap_or_default()
}

/// A message the target's consumer would accept.
fn valid(target: Target, order_id: Uuid, saga_id: Uuid) -> Value {
    match target {
        Target::Orders => serde_json::to_value(order(order_id)).unwrap_or_default(),
        Target::Returns => serde_json::to_value(return_request(order_id)).unwrap_or_default(),
        Target::Commands(participant) => envelope(saga_id, command_for(participant, order_id)),
        Target::Replies => envelope(saga_id, Reply::succeeded(&command_for(INVENTORY, order_id))),
    }
}

fn type_name(target: Target, order_id: Uuid) -> String {
    valid(target, order_id, Uuid::nil())["type"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn to_bytes(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Builds the garbage record of `kind` for `target`, about `order_id` (and `saga_id` where it
/// has an envelope).
fn build(kind: GarbageKind, target: Target, order_id: Uuid, saga_id: Uuid) -> Hostile {
    let key = Some(order_id.to_string().into_bytes());
    let type_name = type_name(target, order_id);
    let note = |note: &str| to_bytes(&json!({ "type": type_name, "note": note }));
    let mut valid = valid(target, order_id, saga_id);
    let mut hostile = Hostile {
        key,
        payload: None,
        headers: Vec::new(),
    };
    hostile.payload = Some(match kind {
        GarbageKind::NulBytes => {
            hostile.key = Some(format!("\0{order_id}\0").into_bytes());
            format!("{{\"type\":\"{type_name}\",\"order_id\":\"\0\0\0\"}}\0").into_bytes()
        }
        GarbageKind::NulInJson => {
            match target {
                Target::Orders | Target::Returns => valid["customer_id"] = "ali\0ce".into(),
                Target::Commands(INVENTORY) => {
                    valid["payload"]["items"][0]["sku"] = "WID\0GET".into();
                }
                Target::Commands(PAYMENT) | Target::Commands(RETURNS) => {
                    valid["payload"]["customer_id"] = "ali\0ce".into();
                }
                Target::Commands(_) => {
                    valid["payload"]["address"]["city"] = "Ber\0lin".into();
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
            // (The order id as text: its 16 raw bytes may hold a NUL, which is another kind.)
            hostile.key = Some([&[0xff, 0xfe][..], order_id.to_string().as_bytes()].concat());
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
                Target::Orders | Target::Returns => {}
                Target::Commands(_) => valid["step"] = "cancel_order".into(),
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
                // An enveloped order (or return): the message is the envelope's payload.
                Target::Orders | Target::Returns => {
                    envelope(saga_id, json!({ "type": type_name, "payload": valid }))
                }
                _ => valid,
            };
            future["schema_version"] = 999.into();
            to_bytes(&future)
        }
        GarbageKind::WrongMessage => to_bytes(&match target {
            Target::Orders => {
                envelope(saga_id, Reply::succeeded(&command_for(INVENTORY, order_id)))
            }
            // An order on the returns topic: a valid trigger, of the wrong saga.
            Target::Returns => serde_json::to_value(order(order_id)).unwrap_or_default(),
            Target::Commands(INVENTORY) => envelope(saga_id, command_for(PAYMENT, order_id)),
            Target::Commands(PAYMENT) => envelope(saga_id, command_for(SHIPPING, order_id)),
            Target::Commands(RETURNS) => envelope(saga_id, command_for(INVENTORY, order_id)),
            Target::Commands(_) | Target::Replies => {
                envelope(saga_id, command_for(INVENTORY, order_id))
            }
        }),
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
            hostile.key = Some(format!("{order_id}\0").into_bytes());
            note("a key with a NUL byte")
        }
        GarbageKind::HugeHeader => {
            let traceparent = messaging::telemetry::new_traceparent();
            let mut tracestate = b"garbage=".to_vec();
            tracestate.resize(HUGE_HEADER_BYTES, b'x');
            hostile.headers = vec![
                ("traceparent", traceparent.into_bytes()),
                ("tracestate", tracestate),
            ];
            note("a 200 KB tracestate header")
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
    /// The order and saga the record names, to find whatever a consumer did with it.
    order_id: Uuid,
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
pub fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    Ok(messaging::kafka::producer_settings(brokers, 0)
        .set("message.max.bytes", "1048576")
        .set("message.timeout.ms", "60000")
        .create()?)
}

impl GarbageFaults {
    pub fn spawn(
        producer: FutureProducer,
        topics: Topics,
        kinds: Vec<GarbageKind>,
        every: Duration,
    ) -> Self {
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut log = GarbageLog::default();
            if kinds.is_empty() {
                return log;
            }
            // Record n goes to topic n % 5, with the kinds rotating per round, so every kind
            // reaches every topic within 5 × kinds records and neighbours differ in both.
            for n in 0usize.. {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopping.changed() => break,
                }
                let target = TARGETS[n % TARGETS.len()];
                let kind = kinds[(n / TARGETS.len() + n % TARGETS.len()) % kinds.len()];
                let (order_id, saga_id) = (Uuid::new_v4(), Uuid::new_v4());
                let hostile = build(kind, target, order_id, saga_id);
                let topic = target.topic(&topics);
                let mut record = FutureRecord::<[u8], [u8]>::to(&topic);
                if let Some(key) = &hostile.key {
                    record = record.key(key.as_slice());
                }
                if let Some(payload) = &hostile.payload {
                    record = record.payload(payload.as_slice());
                }
                if !hostile.headers.is_empty() {
                    record = record.headers(hostile.headers.iter().fold(
                        OwnedHeaders::new(),
                        |headers, (key, value)| {
                            headers.insert(Header {
                                key,
                                value: Some(value.as_slice()),
                            })
                        },
                    ));
                }
                match producer.send(record, Duration::from_secs(60)).await {
                    Ok(delivery) => log.sent.push(Sent {
                        kind,
                        topic,
                        partition: delivery.partition,
                        offset: delivery.offset,
                        target,
                        order_id,
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
    pub fn new(brokers: &str, topic: String) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
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
            let header = |name: &str| {
                message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
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
    /// Order ids of garbage records that started a saga (left out of the saga invariants).
    pub garbage_orders: Vec<Uuid>,
    /// Return ids of garbage records on `returns` that started a saga (likewise).
    pub garbage_returns: Vec<Uuid>,
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
    brokers: &str,
    prefix: &str,
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
    for schema in [
        "orchestrator",
        "inventory",
        "payment",
        "shipping",
        "returns",
    ] {
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
    let committed = tokio::task::block_in_place(|| committed_offsets(log, brokers, prefix))?;
    let order_ids: Vec<Uuid> = log.sent.iter().map(|s| s.order_id).collect();
    let saga_ids: Vec<Uuid> = log.sent.iter().map(|s| s.saga_id).collect();
    let started: BTreeSet<Uuid> = sqlx::query_scalar(
        "SELECT saga_key::uuid FROM orchestrator.sagas \
             WHERE definition_name = 'order' AND saga_key = ANY($1::uuid[]::text[])",
    )
    .bind(&order_ids)
    .fetch_all(db)
    .await?
    .into_iter()
    .collect();
    // A garbage record on `returns` names its return id where one on `orders` names its order.
    let started_returns: BTreeSet<Uuid> = sqlx::query_scalar(
        "SELECT saga_key::uuid FROM orchestrator.sagas \
             WHERE definition_name = 'return' AND saga_key = ANY($1::uuid[]::text[])",
    )
    .bind(&order_ids)
    .fetch_all(db)
    .await?
    .into_iter()
    .collect();
    let acted_on: BTreeSet<Uuid> = sqlx::query_scalar(
        "SELECT saga_id FROM inventory.step_ledger WHERE saga_id = ANY($1) \
         UNION SELECT saga_id FROM payment.step_ledger WHERE saga_id = ANY($1) \
         UNION SELECT saga_id FROM shipping.step_ledger WHERE saga_id = ANY($1) \
         UNION SELECT saga_id FROM returns.step_ledger WHERE saga_id = ANY($1)",
    )
    .bind(&saga_ids)
    .fetch_all(db)
    .await?
    .into_iter()
    .collect();

    let mut kinds: BTreeMap<GarbageKind, KindCount> = BTreeMap::new();
    let mut garbage_orders = Vec::new();
    let mut garbage_returns = Vec::new();
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
        if s.target == Target::Orders && started.contains(&s.order_id) {
            count.started_saga += 1;
            garbage_orders.push(s.order_id);
        }
        if s.target == Target::Returns && started_returns.contains(&s.order_id) {
            count.started_saga += 1;
            garbage_returns.push(s.order_id);
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
        garbage_orders,
        garbage_returns,
    })
}

/// The next offset each consuming group will read, per (topic, partition) that got garbage.
fn committed_offsets(
    log: &GarbageLog,
    brokers: &str,
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
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
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

    fn bytes(kind: GarbageKind, target: Target) -> Vec<u8> {
        build(kind, target, Uuid::new_v4(), Uuid::new_v4())
            .payload
            .unwrap_or_default()
    }

    #[test]
    fn nothing_built_is_a_valid_message() {
        for kind in GarbageKind::value_variants() {
            for target in TARGETS {
                let payload = bytes(*kind, target);
                let accepted = match target {
                    Target::Orders => OrderPlaced::from_json(&payload).is_ok(),
                    Target::Returns => ReturnRequested::from_json(&payload).is_ok(),
                    Target::Commands(participant) => Envelope::<Command>::from_json(&payload)
                        .is_ok_and(|e| e.body.step == participant.step),
                    Target::Replies => Envelope::<Reply>::from_json(&payload).is_ok(),
                };
                // Whether the contract refuses a wrong or missing `type` on an order is for the
                // chaos run to show (the record then starts a saga); an escaped NUL is valid
                // JSON that only the database refuses.
                let contract = target == Target::Orders
                    && matches!(kind, GarbageKind::UnknownType | GarbageKind::MissingType);
                // A return's decoder checks its type, so nothing of it is left to the run.
                let nul = *kind == GarbageKind::NulInJson;
                assert!(
                    !accepted || contract || nul,
                    "{kind:?} on {target:?} decodes as a valid message"
                );
            }
        }
    }

    #[test]
    fn the_huge_ones_have_their_size() {
        assert_eq!(
            bytes(GarbageKind::HugePayload, Target::Replies).len(),
            HUGE_PAYLOAD_BYTES
        );
        let header = build(
            GarbageKind::HugeHeader,
            Target::Orders,
            Uuid::nil(),
            Uuid::nil(),
        );
        assert_eq!(header.headers[1].1.len(), HUGE_HEADER_BYTES);
    }

    #[test]
    fn invalid_utf8_is_invalid() {
        for target in TARGETS {
            assert!(std::str::from_utf8(&bytes(GarbageKind::InvalidUtf8, target)).is_err());
        }
    }
}
