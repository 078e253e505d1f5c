//! End-to-end tests: the orchestrator and the three participants against the real broker and
//! the real PostgreSQL. See `helpers` for how each test gets its own deployment.

mod access;
mod backlog;
mod batches;
mod contract;
mod cutoff;
mod definitions;
mod helpers;
mod hostile;
mod idempotency;
mod loyalty;
mod operate;
mod probes;
mod recovery;
mod returns;
mod roles;
mod scale;
mod tls;
mod typed;

use events::Envelope;
use helpers::{order, step_statuses, TestSystem};
use rdkafka::message::Headers;
use rdkafka::Message;
use saga_core::order_messages::{Reply, StepDone};
use uuid::Uuid;

async fn stock(system: &TestSystem, sku: &str) -> i32 {
    sqlx::query_scalar("SELECT available FROM stock WHERE sku = $1")
        .bind(sku)
        .fetch_one(&system.schema("inventory").await)
        .await
        .expect("stock row")
}

async fn balance(system: &TestSystem, customer: &str) -> i64 {
    sqlx::query_scalar("SELECT balance_cents FROM accounts WHERE customer_id = $1")
        .bind(customer)
        .fetch_one(&system.schema("payment").await)
        .await
        .expect("account row")
}

async fn payment_status(system: &TestSystem, order_id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&system.schema("payment").await)
        .await
        .expect("payments query")
}

async fn reservation_status(system: &TestSystem, order_id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&system.schema("inventory").await)
        .await
        .expect("reservations query")
}

async fn shipments(system: &TestSystem, order_id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM shipments WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&system.schema("shipping").await)
        .await
        .expect("shipments query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_with_stock_taken_payment_captured_and_shipment_scheduled() {
    let system = TestSystem::start().await;
    let widgets_before = stock(&system, "WIDGET").await;
    let balance_before = balance(&system, "alice").await;
    let placed = order("alice", "WIDGET", 3, "DE");
    system.place(&placed).await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(
        step_statuses(&saga),
        ["succeeded", "succeeded", "succeeded"]
    );
    assert_eq!(saga["failure_reason"], serde_json::Value::Null);
    assert_eq!(stock(&system, "WIDGET").await, widgets_before - 3);
    assert_eq!(
        reservation_status(&system, placed.order_id)
            .await
            .as_deref(),
        Some("reserved")
    );
    assert_eq!(balance(&system, "alice").await, balance_before - 3_000);
    assert_eq!(
        payment_status(&system, placed.order_id).await.as_deref(),
        Some("charged")
    );
    assert_eq!(shipments(&system, placed.order_id).await, 1);

    let saga_id = saga["saga_id"].as_str().unwrap_or_default();
    let (status, by_id) = system.get(&format!("/sagas/{saga_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        by_id, saga,
        "GET /sagas/{{id}} and GET /orders/{{id}}/saga agree"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_unavailable_ends_compensated_with_nothing_charged() {
    let system = TestSystem::start().await;
    let balance_before = balance(&system, "alice").await;
    let placed = order("alice", "SOLDOUT", 1, "DE");
    system.place(&placed).await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    assert_eq!(step_statuses(&saga), ["failed", "pending", "pending"]);
    let reason = saga["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("insufficient stock for SOLDOUT"),
        "{reason}"
    );
    assert_eq!(payment_status(&system, placed.order_id).await, None);
    assert_eq!(balance(&system, "alice").await, balance_before);
    assert_eq!(stock(&system, "SOLDOUT").await, 0);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_declined_ends_compensated_with_stock_released() {
    let system = TestSystem::start().await;
    let widgets_before = stock(&system, "WIDGET").await;
    // carol has 5.00 EUR; the order costs 10.00 EUR.
    let placed = order("carol", "WIDGET", 1, "DE");
    system.place(&placed).await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    assert_eq!(step_statuses(&saga), ["compensated", "failed", "pending"]);
    let reason = saga["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("insufficient funds"), "{reason}");
    assert_eq!(stock(&system, "WIDGET").await, widgets_before);
    assert_eq!(
        reservation_status(&system, placed.order_id)
            .await
            .as_deref(),
        Some("released")
    );
    assert_eq!(payment_status(&system, placed.order_id).await, None);
    assert_eq!(balance(&system, "carol").await, 500);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_rejected_ends_compensated_with_payment_refunded_and_stock_released() {
    let system = TestSystem::start().await;
    let widgets_before = stock(&system, "WIDGET").await;
    let balance_before = balance(&system, "bob").await;
    let placed = order("bob", "WIDGET", 2, "AQ");
    system.place(&placed).await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    assert_eq!(
        step_statuses(&saga),
        ["compensated", "compensated", "failed"]
    );
    let reason = saga["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("AQ is on the deny-list"), "{reason}");
    assert_eq!(
        payment_status(&system, placed.order_id).await.as_deref(),
        Some("refunded")
    );
    assert_eq!(balance(&system, "bob").await, balance_before);
    assert_eq!(
        reservation_status(&system, placed.order_id)
            .await
            .as_deref(),
        Some("released")
    );
    assert_eq!(stock(&system, "WIDGET").await, widgets_before);
    assert_eq!(shipments(&system, placed.order_id).await, 0);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_published_twice_yields_one_saga_and_one_charge() {
    let system = TestSystem::start().await;
    let balance_before = balance(&system, "alice").await;
    let placed = order("alice", "GADGET", 1, "DE");
    system.place(&placed).await;
    system.place(&placed).await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    // The second copy is recorded on the existing saga and changes nothing.
    helpers::eventually("the duplicate order to be recorded", || async {
        let history = system.history(&saga_id).await;
        history
            .iter()
            .any(|h| h["message_type"] == "OrderPlaced" && h["decision"] == "ignored")
            .then_some(())
    })
    .await;
    let sagas: i64 = sqlx::query_scalar("SELECT count(*) FROM sagas WHERE saga_key = $1::text")
        .bind(placed.order_id)
        .fetch_one(&system.schema("orchestrator").await)
        .await
        .expect("count sagas");
    assert_eq!(sagas, 1);
    let charges: i64 = sqlx::query_scalar("SELECT count(*) FROM payments WHERE order_id = $1")
        .bind(placed.order_id)
        .fetch_one(&system.schema("payment").await)
        .await
        .expect("count payments");
    assert_eq!(charges, 1);
    assert_eq!(balance(&system, "alice").await, balance_before - 1_000);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_reply_does_not_move_the_saga_twice() {
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed");
    let saga_id: Uuid = saga["saga_id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("uuid");

    // A participant that answers twice: the same reply again under a new message id, and that
    // copy delivered twice (same message id).
    let reply = Envelope::new(
        saga_id,
        None,
        chrono::Utc::now(),
        Reply::StockReserved(StepDone {
            order_id: placed.order_id,
            attempt: 1,
        })
        .wire(),
    );
    let bytes = reply.to_json();
    let key = placed.order_id.to_string();
    system.publish(&system.topics.replies(), &key, &bytes).await;
    system.publish(&system.topics.replies(), &key, &bytes).await;

    let message_id = reply.message_id.to_string();
    let recorded = helpers::eventually("the duplicate reply to be recorded", || async {
        let history = system.history(&saga_id.to_string()).await;
        let matching: Vec<_> = history
            .into_iter()
            .filter(|h| h["message_id"] == message_id.as_str())
            .collect();
        (!matching.is_empty()).then_some(matching)
    })
    .await;
    // Publish a later order and wait for it, so the second copy has surely been consumed.
    let later = order("alice", "WIDGET", 1, "DE");
    system.place(&later).await;
    system.finished_saga(later.order_id).await;
    let history = system.history(&saga_id.to_string()).await;
    let copies = history
        .iter()
        .filter(|h| h["message_id"] == message_id.as_str())
        .count();
    assert_eq!(
        copies, 1,
        "the inbox absorbs the second delivery: {history:?}"
    );
    assert_eq!(recorded[0]["decision"], "ignored");
    let (_, after) = system.get(&format!("/sagas/{saga_id}")).await;
    assert_eq!(after["state"], "completed");
    assert_eq!(
        after["updated_at"], saga["updated_at"],
        "the saga did not move"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_message_goes_to_the_dead_letter_topic_and_the_next_order_completes() {
    let system = TestSystem::start().await;
    system
        .publish(&system.topics.orders(), "garbage", b"{this is not an order")
        .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");

    let message = system
        .read_topic(&system.topics.dead_letters(), 1)
        .await
        .remove(0);
    assert_eq!(
        message.payload(),
        Some(&b"{this is not an order"[..]),
        "original bytes kept"
    );
    let headers = message.headers().expect("dead letters carry headers");
    let header = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let reason = header("dlq.reason").unwrap_or_default();
    assert!(reason.contains("invalid OrderPlaced"), "{reason}");
    assert_eq!(header("dlq.source.topic"), Some(system.topics.orders()));
    // The consumer group whose offsets passed it (what a replay feeds it to), not the name
    // of the service: the contract's DeadLetter headers.
    let group = format!("{}orchestrator", system.topics.prefix());
    assert_eq!(header("dlq.consumer"), Some(group));
    // Every dlq.* header it carries is one the contract declares.
    let contract: serde_json::Value =
        serde_json::from_str(include_str!("../../../events/contract/asyncapi.json"))
            .expect("the AsyncAPI document");
    let declared = &contract["components"]["messages"]["DeadLetter"]["headers"]["properties"];
    for h in headers.iter().filter(|h| h.key.starts_with("dlq.")) {
        assert!(
            declared.get(h.key).is_some(),
            "{} is not declared in AsyncAPI",
            h.key
        );
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_answers_400_404_and_422_with_json_errors() {
    let system = TestSystem::start().await;
    let unknown = Uuid::new_v4();
    for (path, expected) in [
        ("/sagas/not-a-uuid".to_owned(), 400),
        (format!("/sagas/{unknown}"), 404),
        (format!("/sagas/{unknown}/history"), 404),
        (format!("/orders/{unknown}/saga"), 404),
        ("/orders/42/saga".to_owned(), 400),
        ("/sagas?state=bogus".to_owned(), 400),
        ("/sagas?limit=0".to_owned(), 400),
        ("/sagas?limit=many".to_owned(), 400),
        ("/no/such/route".to_owned(), 404),
    ] {
        let (status, body) = system.get(&path).await;
        assert_eq!(status, expected, "GET {path}: {body}");
        assert!(
            body["error"]["message"].is_string(),
            "GET {path} has a JSON error: {body}"
        );
    }
    let (status, body) = system.post("/orders", "{not json").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].is_string());
    let mut bad_total = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
    bad_total["total_cents"] = 1.into();
    let (status, body) = system.post("/orders", &bad_total.to_string()).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_order");

    // A valid order placed over HTTP goes through Kafka and completes.
    let mut good = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
    if let Some(fields) = good.as_object_mut() {
        fields.remove("order_id");
    }
    let (status, accepted) = system.post("/orders", &good.to_string()).await;
    assert_eq!(status, 202, "{accepted}");
    let order_id: Uuid = accepted["order_id"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .expect("uuid");
    assert_eq!(accepted["status_url"], format!("/orders/{order_id}/saga"));
    let saga = system.finished_saga(order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let (status, listed) = system.get("/sagas?state=completed&limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(listed["sagas"][0]["order_id"], order_id.to_string());
    let (_, none) = system.get("/sagas?state=failed").await;
    assert_eq!(none["sagas"].as_array().map(Vec::len), Some(0));
    system.stop().await;
}

/// A record keyed by an order id lands on the partition index a Java client's default
/// partitioner (murmur2) picks, so that an `OrderPlaced` from any Kafka client and the engine's
/// own records for that order meet on one partition number; and `messaging::partitioner`,
/// which the deadline scanners share the sagas by, finds the same partition without a
/// producer. The expected partitions were computed with
/// `Utils.toPositive(Utils.murmur2(key)) % 4` from kafka-clients 4.1.1.
#[tokio::test]
async fn records_keyed_by_order_id_land_where_a_java_client_puts_them() {
    let java_partitions = [
        ("7f1d2c3b-4a5e-4f60-8a71-9b0c1d2e3f40", 3),
        ("00000000-0000-4000-8000-000000000001", 2),
        ("0b6f9a52-1c1e-4d0e-9b7a-2a7c5e0d9f11", 3),
        ("e8a4c1d2-3b4c-4d5e-8f60-718293a4b5c6", 0),
        ("5c1e7b2a-9d3f-4e6a-b1c2-d3e4f5a6b7c8", 1),
        ("91d2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b", 3),
    ];
    // Its topic is deleted when the test ends, passed or not.
    let prefix = testkit::TestTopics::new("partitioner");
    let config = prefix.kafka_config(4);
    let topic = prefix.named("orders");
    messaging::kafka::ensure_topics(&config, std::slice::from_ref(&topic))
        .await
        .expect("create topic");
    let producer = messaging::kafka::producer(&config).expect("producer");
    let sent_to = |key: &'static str| {
        let (producer, topic) = (&producer, &topic);
        async move {
            producer
                .send(
                    rdkafka::producer::FutureRecord::to(topic)
                        .key(key)
                        .payload("{}"),
                    std::time::Duration::from_secs(10),
                )
                .await
                .expect("delivered")
                .partition
        }
    };
    let ours = |key: &str| {
        messaging::partitioner::partition_of(messaging::partitioner::key_hash(key.as_bytes()), 4)
    };
    for (key, expected) in java_partitions {
        assert_eq!(sent_to(key).await, expected, "partition of key {key}");
        assert_eq!(
            ours(key),
            expected,
            "the partitioner's partition of key {key}"
        );
    }
    // Keys of every length modulo 4 (murmur2 mixes the last one to three bytes apart): the
    // partitioner agrees with the producer's on each.
    for key in [
        "a",
        "ab",
        "abc",
        "abcd",
        "order-1",
        "order-12",
        "order-123",
        "order-1234",
    ] {
        assert_eq!(
            ours(key),
            sent_to(key).await,
            "the partitioner's partition of key {key:?}"
        );
    }
}

/// Several instances of a service starting at once on a fresh database all come up: creating
/// the schema and migrating it is serialised, so none fails on a duplicate schema name.
#[tokio::test]
async fn instances_starting_at_once_all_create_and_migrate_their_schema() {
    // Dropped when the test ends, passed or not.
    let database = testkit::TestDatabase::create("startup").await;
    let config = messaging::config::DatabaseConfig {
        database_url: database.url(),
        database_schema: None,
        database_max_connections: 1,
        ..messaging::config::DatabaseConfig::to("")
    };
    let mut starts = tokio::task::JoinSet::new();
    let instances = 16;
    let together = std::sync::Arc::new(tokio::sync::Barrier::new(instances));
    for _ in 0..instances {
        let (config, together) = (config.clone(), together.clone());
        starts.spawn(async move {
            together.wait().await;
            messaging::db::open(&config, "orchestrator", &[&orchestrator::store::MIGRATIONS])
                .await
                .map(|(pool, _)| pool)
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = starts.join_next().await {
        match joined.expect("task") {
            Ok(pool) => pool.close().await,
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "instances failed to start: {failures:?}"
    );
}
