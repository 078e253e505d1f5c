//! Hostile input and faults that once stopped the engine for good or made it act twice: records
//! the dead-letter path could not store, rows the broker refuses, a fatal producer error,
//! unreadable saga rows, orders replayed after their saga was swept, and the numbering of saga
//! events.

use std::collections::BTreeMap;
use std::time::Duration;

use events::{Envelope, LineItem, Outcome, Reply, SagaEvent};

use crate::order_messages::{Command, Reply as OrderReply, StepDone};
use messaging::config::FaultConfig;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{brokers, eventually, order, Options, TestSystem};

/// A producer that sends what a Java client may: records up to its 1 MiB request size, keys
/// and headers of any bytes.
fn raw_producer() -> FutureProducer {
    messaging::kafka::producer_settings(&brokers(), 0)
        .set("message.max.bytes", "1100000")
        .create()
        .expect("producer")
}

/// Publishes a record and returns where it landed: (partition, offset).
async fn send_raw(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: &[(&str, &[u8])],
) -> (i32, i64) {
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: Some(*value),
        });
    }
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .payload(payload)
        .headers(owned);
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
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
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
                "traceparent",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("tracestate", tracestate.as_bytes()),
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
    let marker = order("bob", "GADGET", 1, "DE");
    let payload = serde_json::to_vec(&marker).expect("JSON");
    system
        .publish(
            &system.topics.orders(),
            &placed.order_id.to_string(),
            &payload,
        )
        .await;
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
    let marker = order("bob", "GADGET", 1, "DE");
    let payload = serde_json::to_vec(&marker).expect("JSON");
    system
        .publish(
            &system.topics.orders(),
            &placed.order_id.to_string(),
            &payload,
        )
        .await;
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
