//! Hostile input and faults that once stopped the engine for good or made it act twice: records
//! the dead-letter path could not store, rows the broker refuses, a fatal producer error,
//! unreadable saga rows, orders replayed after their saga was swept, and the numbering of saga
//! events.

use std::collections::BTreeMap;
use std::time::Duration;

use events::{Envelope, LineItem, Outcome, Reply, SagaEvent};

use messaging::config::FaultConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use saga_core::order_messages::{Command, Reply as OrderReply, StepDone};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{brokers, eventually, order, Options, TestSystem};

/// A producer that sends what a Java client may: records up to its 1 MiB request size, keys
/// and headers of any bytes.
pub(crate) fn raw_producer() -> FutureProducer {
    messaging::kafka::producer_settings(&messaging::config::KafkaConnection::to(brokers()), 0)
        .expect("the producer settings")
        .set("message.max.bytes", "1100000")
        .create()
        .expect("producer")
}

/// Publishes a record and returns where it landed: (partition, offset).
pub(crate) async fn send_raw(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: &[(&[u8], Option<&[u8]>)],
) -> (i32, i64) {
    let headers = messaging::headers::with_any_bytes(headers.iter().copied()).expect("headers");
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .payload(payload)
        .headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    let delivery = producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("publish");
    (delivery.partition, delivery.offset)
}

fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    messaging::headers::raw(message.headers()?)
        .find(|h| h.name == name.as_bytes())
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The dead-letter copies, by the source partition and offset they name.
fn by_source(dead: &[OwnedMessage]) -> BTreeMap<(i32, i64), &OwnedMessage> {
    dead.iter()
        .map(|m| {
            let partition = header(m, "dlq.source.partition").and_then(|p| p.parse().ok());
            let offset = header(m, "dlq.source.offset").and_then(|o| o.parse().ok());
            ((partition.unwrap_or(-1), offset.unwrap_or(-1)), m)
        })
        .collect()
}

/// What a hostile record is, its key and its payload.
type HostileRecord<'a> = (&'a str, Option<&'a [u8]>, &'a [u8]);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_any_bytes_are_dead_lettered_and_the_next_order_completes() {
    let system = TestSystem::start().await;
    let producer = raw_producer();
    let orders = system.topics.orders();
    let valid = serde_json::to_vec(&order("alice", "WIDGET", 1, "DE")).expect("JSON");
    let mut cancelled: Value = serde_json::from_slice(&valid).expect("JSON");
    cancelled["type"] = "OrderCancelled".into();
    let cancelled = serde_json::to_vec(&cancelled).expect("JSON");
    let huge = vec![b'x'; 1_040_000];
    let hostile: Vec<HostileRecord> = vec![
        ("NUL in the key", Some(b"order\0id"), b"{not json"),
        ("invalid UTF-8 key", Some(b"\xff\xfe\xfd"), b"{not json"),
        (
            "NUL in the reason",
            Some(b"k"),
            b"{\"order_id\":\"\\u0000\"}",
        ),
        ("NUL bytes", None, b"\0\0\0\0"),
        ("empty", Some(b"k"), b""),
        ("another type", Some(b"k"), &cancelled),
        ("larger than our producer sends", Some(b"k"), &huge),
    ];
    let mut sent = Vec::new();
    for (what, key, payload) in &hostile {
        sent.push((
            *what,
            send_raw(&producer, &orders, *key, payload, &[]).await,
        ));
    }
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");

    let dead = system
        .read_topic(&system.topics.dead_letters(), hostile.len())
        .await;
    let dead = by_source(&dead);
    for (what, source) in &sent {
        let copy = dead
            .get(source)
            .unwrap_or_else(|| panic!("{what}: no dead-letter copy of {source:?}"));
        assert!(
            header(copy, "dlq.reason").is_some_and(|r| !r.is_empty()),
            "{what}"
        );
    }
    let big = dead[&sent[6].1];
    assert_eq!(
        header(big, "dlq.payload.original_bytes").as_deref(),
        Some("1040000")
    );
    assert!(big.payload().map_or(0, <[u8]>::len) < 1_000_000);
    assert_eq!(
        dead[&sent[1].1].key(),
        Some(&b"\xff\xfe\xfd"[..]),
        "the key's bytes kept"
    );
    assert!(
        header(dead[&sent[5].1], "dlq.reason").is_some_and(|r| r.contains("OrderCancelled")),
        "a record of another type does not start a saga"
    );
    system.stop().await;
}

/// Header names and values a client of another language may send: bytes that are not UTF-8
/// (`c3 28` once crashed every consumer that met it, on every start), NUL, empty, null, and
/// large; trace headers that are not text.
fn hostile_headers(large: &[u8]) -> Vec<(&[u8], Option<&[u8]>)> {
    vec![
        (b"\xc3\x28", Some(b"a name that is not UTF-8")),
        (b"\xff\xfe\xfd", Some(b"\xc3\x28")),
        (b"traceparent", Some(b"\xff\xfe")),
        (b"tracestate", Some(b"\0\0")),
        (b"nul\0inside", None),
        (b"", Some(b"")),
        (large, Some(large)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_any_bytes_on_any_consumed_topic_stop_no_service() {
    let mut system = TestSystem::start().await;
    // The return saga's own participant too, so every command topic has its consumer.
    system.start_participant("returns", 0);
    system.wait_for_participants().await;
    let producer = raw_producer();
    let large = vec![0xc3u8; 64 * 1024];
    let headers = hostile_headers(&large);
    // Every topic a service of the deployment consumes: the trigger topics, the replies and
    // each participant's commands.
    let engine_only = [system.topics.saga_events(), system.topics.dead_letters()];
    let consumed: Vec<String> = crate::helpers::all_topics(&system.topics)
        .into_iter()
        .filter(|t| !engine_only.contains(t))
        .collect();
    let mut sent = Vec::new();
    for topic in &consumed {
        let at = send_raw(&producer, topic, Some(b"k"), b"{not json", &headers).await;
        sent.push((topic.as_str(), at));
    }
    // A good order with the same headers is an order like any other.
    let placed = order("alice", "WIDGET", 1, "DE");
    let payload = serde_json::to_vec(&placed).expect("JSON");
    let key = placed.order_id.to_string();
    send_raw(
        &producer,
        &system.topics.orders(),
        Some(key.as_bytes()),
        &payload,
        &headers,
    )
    .await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");

    let dead = system
        .read_topic(&system.topics.dead_letters(), sent.len())
        .await;
    for (topic, (partition, offset)) in sent {
        assert!(
            dead.iter().any(|m| {
                header(m, "dlq.source.topic").as_deref() == Some(topic)
                    && header(m, "dlq.source.partition") == Some(partition.to_string())
                    && header(m, "dlq.source.offset") == Some(offset.to_string())
            }),
            "no dead-letter copy of {topic}/{partition}@{offset}"
        );
    }
    let next = order("bob", "WIDGET", 1, "DE");
    system.place(&next).await;
    let saga = system.finished_saga(next.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(
        system.ended_services(),
        Vec::<&str>::new(),
        "a service died"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_tracestate_is_not_copied_into_the_sagas_messages() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    // As long as W3C Trace Context allows: 32 members of 256-character values (8 KiB), which
    // the OpenTelemetry propagator accepts as valid.
    let tracestate = (0..32)
        .map(|n| format!("vendor{n}={}", "a".repeat(256)))
        .collect::<Vec<_>>()
        .join(",");
    let payload = serde_json::to_vec(&placed).expect("JSON");
    send_raw(
        &raw_producer(),
        &system.topics.orders(),
        Some(placed.order_id.to_string().as_bytes()),
        &payload,
        &[
            (
                b"traceparent",
                Some(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
            (b"tracestate", Some(tracestate.as_bytes())),
        ],
    )
    .await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let command = system
        .read_topic(&system.topics.named("inventory.commands"), 1)
        .await
        .remove(0);
    assert!(
        header(&command, "tracestate").is_none_or(|t| t.len() <= 512),
        "tracestate copied into the saga's commands"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_messages_that_do_not_fit_are_dead_lettered_with_the_reason() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let saga_id: Uuid = saga["saga_id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("uuid");
    let order_id = Uuid::new_v4();
    // A reply to the saga that carries another saga's key.
    let foreign_key = OrderReply::StockReserved(StepDone {
        order_id: Uuid::new_v4(),
        attempt: 1,
    })
    .wire();
    // A command for a step the inventory does not serve.
    let unserved = Command::RefundPayment {
        order_id,
        attempt: 1,
    }
    .wire();
    // A command whose payload lacks what its step's request needs.
    let mut misfit = Command::ReserveStock {
        order_id,
        attempt: 1,
        items: Vec::new(),
    }
    .wire();
    misfit.payload.remove("items");
    // Commands whose payload values are out of bounds: a negative quantity to "reserve"
    // (which would add stock) and a negative charge (which would pay the customer).
    let take_back = Command::ReserveStock {
        order_id: Uuid::new_v4(),
        attempt: 1,
        items: vec![LineItem {
            sku: "WIDGET".into(),
            quantity: -50,
            unit_price_cents: 100,
        }],
    }
    .wire();
    let pay_out = Command::ChargePayment {
        order_id: Uuid::new_v4(),
        attempt: 1,
        customer_id: "alice".into(),
        amount_cents: -1_000_000,
        currency: "EUR".into(),
    }
    .wire();
    let widgets = crate::stock(&system, "WIDGET").await;
    let alices = crate::balance(&system, "alice").await;
    let inventory = system.topics.named("inventory.commands");
    let payment = system.topics.named("payment.commands");
    let replies = system.topics.replies();
    let records = [
        (
            &replies,
            Envelope::new(saga_id, None, chrono::Utc::now(), foreign_key).to_json(),
            "key",
        ),
        (
            &inventory,
            Envelope::new(saga_id, None, chrono::Utc::now(), unserved).to_json(),
            "which inventory does not serve",
        ),
        (
            &inventory,
            Envelope::new(saga_id, None, chrono::Utc::now(), misfit).to_json(),
            "missing field `items`",
        ),
        (
            &inventory,
            Envelope::new(Uuid::new_v4(), None, chrono::Utc::now(), take_back).to_json(),
            "items[].quantity",
        ),
        (
            &payment,
            Envelope::new(Uuid::new_v4(), None, chrono::Utc::now(), pay_out).to_json(),
            "cents must be between 0 and",
        ),
    ];
    let producer = raw_producer();
    let mut sent = Vec::new();
    for (topic, payload, reason) in &records {
        let at = send_raw(&producer, topic, Some(b"k"), payload, &[]).await;
        sent.push((topic.as_str(), at, *reason));
    }
    let dead = system
        .read_topic(&system.topics.dead_letters(), records.len())
        .await;
    for (topic, (partition, offset), reason) in sent {
        let copy = dead
            .iter()
            .find(|m| {
                header(m, "dlq.source.topic").as_deref() == Some(topic)
                    && header(m, "dlq.source.partition") == Some(partition.to_string())
                    && header(m, "dlq.source.offset") == Some(offset.to_string())
            })
            .unwrap_or_else(|| panic!("no dead-letter copy of {topic}/{partition}@{offset}"));
        let why = header(copy, "dlq.reason").unwrap_or_default();
        assert!(why.contains(reason), "{reason:?} not in {why:?}");
    }
    let again = system.finished_saga(placed.order_id).await;
    assert_eq!(again["state"], "completed", "{again}");
    assert_eq!(
        again["version"], saga["version"],
        "the foreign reply moved nothing"
    );
    assert_eq!(
        crate::stock(&system, "WIDGET").await,
        widgets,
        "no stock added"
    );
    assert_eq!(
        crate::balance(&system, "alice").await,
        alices,
        "nothing paid out"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_broker_refuses_is_parked_and_the_rows_behind_it_go_out() {
    let system = TestSystem::start().await;
    let orchestrator = system.schema("orchestrator").await;
    sqlx::query("INSERT INTO outbox (topic, message_key, payload) VALUES ($1, 'k', $2)")
        .bind(system.topics.saga_events())
        .bind(vec![b'x'; 2_000_000])
        .execute(&orchestrator)
        .await
        .expect("insert a row too large to publish");
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let (error,): (String,) = sqlx::query_as("SELECT error FROM outbox_parked")
        .fetch_one(&orchestrator)
        .await
        .expect("the refused row is parked");
    assert!(error.contains("too large"), "{error}");

    // The ways a user reached it: an operator's reason that ends up in a saga event. A body
    // that large is refused whole; a reason over its own bound by name.
    let saga_id = saga["saga_id"].as_str().expect("saga id");
    let huge = serde_json::json!({"reason": "x".repeat(100_000)}).to_string();
    let (status, body) = system.post(&format!("/sagas/{saga_id}/abort"), &huge).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "body_too_large", "{body}");
    let long = serde_json::json!({"reason": "x".repeat(2_001)}).to_string();
    let (status, body) = system.post(&format!("/sagas/{saga_id}/abort"), &long).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("reason")),
        "{body}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_the_order_api_replace_a_producer_that_failed_fatally() {
    let system = TestSystem::start_with(Options {
        orchestrator_faults: FaultConfig {
            producer_fatal_after: 1,
            ..FaultConfig::default()
        },
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        let placed = order("alice", "WIDGET", 1, "DE");
        system.place(&placed).await;
        let saga = system.finished_saga(placed.order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
    }
    // `POST /orders` has a producer of its own, which fails fatally after its first order:
    // every order is still accepted, and its saga completes.
    for _ in 0..3 {
        let placed = order("alice", "WIDGET", 1, "DE");
        let body = serde_json::to_string(&placed).expect("order JSON");
        let (status, accepted) = system.post("/orders", &body).await;
        assert_eq!(status, 202, "{accepted}");
        let saga = system.finished_saga(placed.order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_saga_row_is_parked_and_stops_no_other_saga() {
    let mut system = TestSystem::start_with(Options {
        retries: crate::helpers::fast_retries(),
        without: vec!["payment"],
        ..Options::default()
    })
    .await;
    let stuck = order("alice", "WIDGET", 1, "DE");
    system.place(&stuck).await;
    let orchestrator = system.schema("orchestrator").await;
    eventually("the charge to be sent", || async {
        let (status, saga) = system
            .get(&format!("/orders/{}/saga", stuck.order_id))
            .await;
        (status == 200 && saga["steps"][1]["attempts"].as_u64()? >= 1).then_some(())
    })
    .await;
    sqlx::query("UPDATE sagas SET steps = '{\"not\": \"steps\"}' WHERE saga_key = $1::text")
        .bind(stuck.order_id)
        .execute(&orchestrator)
        .await
        .expect("corrupt the row");
    system.start_participant("payment", 0);
    // Its deadline and its reply both meet the unreadable row; neither may block the others.
    for _ in 0..3 {
        let placed = order("bob", "WIDGET", 1, "DE");
        system.place(&placed).await;
        let saga = system.finished_saga(placed.order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
    }
    let (state, reason): (String, Option<String>) =
        sqlx::query_as("SELECT state::text, failure_reason FROM sagas WHERE saga_key = $1::text")
            .bind(stuck.order_id)
            .fetch_one(&orchestrator)
            .await
            .expect("the corrupt saga");
    assert_eq!(state, "failed");
    assert!(reason.is_some_and(|r| r.contains("unreadable")));

    // The status API still shows it, and every page that lists it, without its unreadable
    // steps and with why; no operator action can move it.
    let (status, parked) = system
        .get(&format!("/orders/{}/saga", stuck.order_id))
        .await;
    assert_eq!(status, 200, "{parked}");
    assert_eq!(parked["state"], "failed", "{parked}");
    assert_eq!(parked["steps"], serde_json::json!([]), "{parked}");
    assert!(
        parked["failure_reason"]
            .as_str()
            .is_some_and(|r| r.contains("unreadable")),
        "{parked}"
    );
    let (status, list) = system.get("/sagas?state=failed").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["sagas"][0]["saga_id"], parked["saga_id"], "{list}");
    let (status, all) = system.get("/sagas?limit=10").await;
    assert_eq!(status, 200, "{all}");
    let saga_id = parked["saga_id"].as_str().unwrap_or_default();
    let (status, body) = system
        .post(&format!("/sagas/{saga_id}/retry"), r#"{"reason": "try"}"#)
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("steps")),
        "{body}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_published_again_after_its_saga_was_swept_starts_no_second_saga() {
    let system = TestSystem::start_with(Options {
        retention_secs: Some(1),
        ..Options::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 2, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let path = format!("/orders/{}/saga", placed.order_id);
    eventually("the saga to be swept", || async {
        (system.get(&path).await.0 == 404).then_some(())
    })
    .await;
    let inventory = system.schema("inventory").await;
    let stock = || async {
        sqlx::query_scalar::<_, i32>("SELECT available FROM stock WHERE sku = 'WIDGET'")
            .fetch_one(&inventory)
            .await
            .expect("stock")
    };
    let before = stock().await;

    // The same order again, then a marker with the same key (same partition, read after it).
    system.place(&placed).await;
    let marker = system.place_marker_behind(placed.order_id).await;
    system.finished_saga(marker.order_id).await;
    assert_eq!(system.get(&path).await.0, 404, "a second saga started");
    assert_eq!(stock().await, before, "stock reserved twice");

    // A participant asked again for the same order by another saga answers what it answered
    // the first saga and acts no second time.
    let other_saga = Uuid::new_v4();
    let command = Envelope::new(
        other_saga,
        None,
        chrono::Utc::now(),
        Command::ReserveStock {
            order_id: placed.order_id,
            attempt: 1,
            items: vec![LineItem {
                sku: "WIDGET".into(),
                quantity: 2,
                unit_price_cents: 1_000,
            }],
        }
        .wire(),
    );
    system
        .publish(
            &system.topics.named("inventory.commands"),
            &placed.order_id.to_string(),
            &command.to_json(),
        )
        .await;
    let replies = system.read_topic(&system.topics.replies(), 7).await;
    let answer = replies
        .iter()
        .filter_map(|m| Envelope::<Reply>::from_json(m.payload()?).ok())
        .find(|r| r.saga_id == other_saga)
        .expect("a reply to the second saga");
    assert!(
        answer.body.name == "StockReserved" && answer.body.outcome == Outcome::Succeeded,
        "{answer:?}"
    );
    assert_eq!(stock().await, before, "stock reserved for the order twice");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_events_carry_a_sequence_that_grows_per_saga() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    system.finished_saga(placed.order_id).await;
    let events = system.read_topic(&system.topics.saga_events(), 2).await;
    let sequences: Vec<(String, Option<u64>)> = events
        .iter()
        .filter_map(|m| Envelope::<SagaEvent>::from_json(m.payload()?).ok())
        .map(|e| {
            (
                format!("{:?}", e.body).chars().take(12).collect(),
                e.sequence,
            )
        })
        .collect();
    assert_eq!(sequences.len(), 2, "{sequences:?}");
    assert_eq!(
        sequences[0].1,
        Some(0),
        "SagaStarted is the first: {sequences:?}"
    );
    assert!(
        sequences[1].1.is_some_and(|n| n > 0),
        "SagaCompleted comes after: {sequences:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_whose_pipeline_fails_stops_whole() {
    let mut system = TestSystem::start_with(Options {
        orchestrator_faults: FaultConfig {
            crash_after_commit_every: 1,
            crash_in_process: true,
            ..FaultConfig::default()
        },
        ..Options::default()
    })
    .await;
    // The fault spares a consumer's first 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    system.place(&order("alice", "WIDGET", 1, "DE")).await;
    let why = system.wait_for_exit("orchestrator").await;
    assert!(why.contains("crashed after a commit"), "{why}");
    let health = reqwest::get(format!("{}/healthz", system.http)).await;
    assert!(
        health.is_err(),
        "the HTTP server stopped with the pipeline: {health:?}"
    );
    system.stop().await;
}

/// Makes the test's own database read-only (as during a failover or on a full disk) or
/// writable again: the setting applies to new sessions, so every session of that database is
/// ended and the services' pools reconnect into it.
async fn set_read_only(database: &str, read_only: bool) {
    let setting = if read_only { "on" } else { "off" };
    crate::helpers::alter_database(
        database,
        &format!("SET default_transaction_read_only = {setting}"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_placed_while_the_database_is_read_only_waits_for_it_and_completes() {
    let system = TestSystem::start().await;
    let orchestrator = system.schema("orchestrator").await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&orchestrator)
        .await
        .expect("database name");
    orchestrator.close().await;
    set_read_only(&database, true).await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    // Not ready while it waits, with the reason. (The sessions ended to make the setting
    // take are a reason of their own for a moment: the first 503 may name them.)
    eventually(
        "/healthz to say not ready: the database is read-only",
        || async {
            let (status, body) = system.get("/healthz").await;
            let message = body["error"]["message"].as_str().unwrap_or_default();
            (status == 503 && message.contains("read-only")).then_some(())
        },
    )
    .await;
    // Long enough for every retry a record's own failure gets to run out many times over.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    set_read_only(&database, false).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    eventually("/healthz to say ready again", || async {
        (system.get("/healthz").await.0 == 200).then_some(())
    })
    .await;
    for service in system.running_services() {
        let pool = system.schema(service).await;
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_lettered")
            .fetch_one(&pool)
            .await
            .expect("dead letters");
        assert_eq!(dead, 0, "{service} dead-lettered a record of a valid order");
    }
    system.stop().await;
}

/// The orchestrator's outbox rows waiting for `topic` (its backlog on `/metrics` is the same
/// count, sampled).
async fn outbox_rows_for(orchestrator: &sqlx::PgPool, topic: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = $1")
        .bind(topic)
        .fetch_one(orchestrator)
        .await
        .expect("count outbox rows")
}

async fn delete_topic(topic: &str) {
    delete_topic_on(&brokers(), topic).await;
}

async fn delete_topic_on(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let deleted = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete topic");
    for result in deleted {
        result.unwrap_or_else(|(topic, code)| panic!("deleting {topic}: {code}"));
    }
}

/// One destination that refuses records (its topic deleted) holds up only the sagas whose
/// commands go there: the relay once failed its whole batch on the produce error and claimed
/// the same rows again for ever, so every saga on every topic waited. When the topic is back
/// the waiting sagas finish, each once, and nothing was parked or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_command_topic_holds_up_only_the_sagas_that_send_there() {
    let system = TestSystem::start_with(Options {
        retries: crate::helpers::fast_retries(),
        ..Options::default()
    })
    .await;
    let orchestrator = system.schema("orchestrator").await;
    let shipping = system.topics.named("shipping.commands");
    // The shipping participant has joined its topic before the topic goes away.
    let warm_up = order("alice", "WIDGET", 1, "DE");
    system.place(&warm_up).await;
    assert_eq!(
        system.finished_saga(warm_up.order_id).await["state"],
        "completed"
    );
    delete_topic(&shipping).await;

    let waiting: Vec<_> = (0..4).map(|_| order("alice", "WIDGET", 1, "DE")).collect();
    for placed in &waiting {
        system.place(placed).await;
    }
    // Their shipment commands are the oldest rows of the outbox now.
    eventually("shipment commands in the outbox", || async {
        (outbox_rows_for(&orchestrator, &shipping).await >= 4).then_some(())
    })
    .await;
    // Declined payments never reach shipping: these sagas compensate meanwhile.
    let declined: Vec<_> = (0..4).map(|_| order("carol", "WIDGET", 1, "DE")).collect();
    for placed in &declined {
        system.place(placed).await;
    }
    for placed in &declined {
        let saga = system.finished_saga(placed.order_id).await;
        assert_eq!(saga["state"], "compensated", "{saga}");
    }
    // The backlog per destination is on /metrics while the destination fails.
    let metrics = eventually("the shipping backlog on /metrics", || async {
        let (status, _, text) = system.get_text("/metrics").await;
        (status == 200
            && text.lines().any(|line| {
                line.starts_with("outbox_topic_backlog{")
                    && line.contains(&format!("topic=\"{shipping}\""))
                    && !line.ends_with(" 0")
            }))
        .then_some(text)
    })
    .await;
    assert!(
        metrics.lines().any(|line| line.starts_with(&format!(
            "outbox_destination_failing{{topic=\"{shipping}\"}} 1"
        ))),
        "{metrics}"
    );
    for placed in &waiting {
        let (status, saga) = system
            .get(&format!("/orders/{}/saga", placed.order_id))
            .await;
        assert_eq!(status, 200, "{saga}");
        assert_eq!(saga["state"], "running", "{saga}");
    }

    // The topic comes back (empty: what was on it before is gone); the waiting sagas finish,
    // each with one shipment, and the relay neither parked nor left anything.
    messaging::kafka::ensure_topics(
        &crate::helpers::kafka_config(system.topics.prefix().to_owned(), 2),
        std::slice::from_ref(&shipping),
    )
    .await
    .expect("create the topic again");
    for placed in &waiting {
        let saga = system.finished_saga(placed.order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
        let shipments = crate::helpers::count(
            &system,
            "shipping",
            "SELECT count(*) FROM shipments WHERE order_id = $1",
            placed.order_id,
        )
        .await;
        assert_eq!(shipments, 1, "order {}", placed.order_id);
    }
    eventually("the outbox to drain", || async {
        (outbox_rows_for(&orchestrator, &shipping).await == 0).then_some(())
    })
    .await;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_parked")
        .fetch_one(&orchestrator)
        .await
        .expect("count parked rows");
    assert_eq!(parked, 0, "a missing topic parks nothing");
    system.stop().await;
}

/// Replays of one order (a client's retries, a topic read again) are counted on one history
/// line of its saga instead of a line each: the history, and every watch snapshot of it, stays
/// as long as the saga's own steps make it, whatever the number of replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_of_one_order_are_counted_on_one_history_line() {
    const REPLAYS: usize = 500;
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    let lines_before = system.history(&saga_id).await.len();

    futures_util::future::join_all((0..REPLAYS).map(|_| system.place(&placed))).await;
    // A marker with the same key lands behind the replays in their partition: once its saga
    // exists, every replay has been handled.
    let marker = system.place_marker_behind(placed.order_id).await;
    system.saga_id_of(marker.order_id).await;

    let history = system.history(&saga_id).await;
    let repeats: Vec<&Value> = history
        .iter()
        .filter(|line| line["decision"] == "ignored" && line["message_type"] == "OrderPlaced")
        .collect();
    assert!(
        history.len() <= lines_before + 1,
        "{REPLAYS} replays grew the history from {lines_before} to {} lines",
        history.len()
    );
    let [line] = repeats[..] else {
        panic!("one line notes the replays: {repeats:?}")
    };
    assert_eq!(line["duplicates"], REPLAYS, "{line}");
    assert!(
        line["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("duplicate order")),
        "the first replay's record: {line}"
    );
    assert!(
        line["last_duplicate_at"].as_str() >= line["at"].as_str(),
        "{line}"
    );
    let (status, view) = system.get(&format!("/sagas/{saga_id}")).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["duplicates"]["count"], REPLAYS, "{view}");
    assert_eq!(
        view["state"], "completed",
        "the replays moved nothing: {view}"
    );
    let (_, by_order) = system
        .get(&format!("/orders/{}/saga", placed.order_id))
        .await;
    assert_eq!(by_order["duplicates"], view["duplicates"]);
    system.stop().await;
}

/// A topic deleted and created again after broker restarts once left its consumer reading
/// nothing for good, without an error: librdkafka 2.12 took the new topic's metadata (leader
/// epoch 0) for outdated against the old topic's epoch, which each restart had moved on, and
/// kept fetching the old topic id. The consume loop now sees records waiting that it does not
/// get and replaces its consumer. The broker is the test's own: it is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stuck_on_a_topic_created_again_is_replaced_and_reads_it() {
    let mut broker = crate::helpers::PrivateBroker::start();
    let system = TestSystem::start_with(Options {
        retries: crate::helpers::fast_retries(),
        brokers: Some(broker.addr.clone()),
        consumer_stall_ms: Some(1_000),
        ..Options::default()
    })
    .await;
    let shipping = system.topics.named("shipping.commands");
    let warm_up = order("alice", "WIDGET", 1, "DE");
    system.place(&warm_up).await;
    assert_eq!(
        system.finished_saga(warm_up.order_id).await["state"],
        "completed"
    );
    // Each restart moves the partitions' leader epochs on.
    for _ in 0..2 {
        broker.restart();
        let again = order("alice", "WIDGET", 1, "DE");
        system.place(&again).await;
        assert_eq!(
            system.finished_saga(again.order_id).await["state"],
            "completed"
        );
    }
    delete_topic_on(&broker.addr, &shipping).await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut kafka = crate::helpers::kafka_config(system.topics.prefix().to_owned(), 2);
    kafka.connection.kafka_brokers.clone_from(&broker.addr);
    messaging::kafka::ensure_topics(&kafka, std::slice::from_ref(&shipping))
        .await
        .expect("create the topic again");
    let placed: Vec<_> = (0..3).map(|_| order("alice", "WIDGET", 1, "DE")).collect();
    for one in &placed {
        system.place(one).await;
    }
    for one in &placed {
        let saga = system.finished_saga(one.order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
    }
    system.stop().await;
}
