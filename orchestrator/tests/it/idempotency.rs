//! `POST /orders` with an `Idempotency-Key`: a retry places no second order, even when the
//! broker did not acknowledge the first try in time. The broker is one of the test's own
//! (it is stopped with SIGSTOP; the shared one never is), started by `scripts/broker.sh` on
//! free ports with its own data directory, and killed and removed when the test ends, passed
//! or failed.

use std::time::Duration;

use orchestrator::config::ApiConfig;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{order, Options, PrivateBroker, TestSystem, CLIENT_TOKEN};

/// `POST /orders` with `key` (none: no header) and `body`, as the shop: status, body and
/// whether the answer says it was replayed.
async fn place(system: &TestSystem, key: Option<&str>, body: &Value) -> (u16, Value, bool) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/orders", system.http))
        .bearer_auth(CLIENT_TOKEN)
        .timeout(Duration::from_secs(60))
        .json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status().as_u16();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        replayed,
    )
}

/// An order body without an order id: the server makes one.
fn new_order() -> Value {
    let mut body = serde_json::to_value(order("alice", "WIDGET", 1, "DE")).expect("json");
    if let Some(fields) = body.as_object_mut() {
        fields.remove("order_id");
        fields.remove("type");
    }
    body
}

async fn sagas_of(system: &TestSystem, order_id: &str) -> i64 {
    let id: Uuid = order_id.parse().expect("an order id");
    crate::helpers::count(
        system,
        "orchestrator",
        "SELECT count(*) FROM sagas WHERE saga_key = $1::uuid::text",
        id,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_order_with_its_idempotency_key_is_one_order_though_the_broker_stalled() {
    let broker = PrivateBroker::start();
    let system = TestSystem::start_with(Options {
        brokers: Some(broker.addr.clone()),
        // No participant: the order's saga starts and waits on its first step.
        without: vec!["inventory", "payment", "shipping"],
        api: ApiConfig {
            order_publish_timeout_ms: 2_000,
            http_request_timeout_ms: 10_000,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;

    // The broker stalls across the producer's timeout: the order is answered 503, naming the
    // order id it was to have. The same order sent meanwhile with its key does not publish
    // too: it is told to come back.
    let key = format!("cart-{}", Uuid::new_v4());
    let body = new_order();
    broker.signal("-STOP");
    let ((status, unavailable, _), (concurrent_status, concurrent, _)) =
        tokio::join!(place(&system, Some(&key), &body), async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            place(&system, Some(&key), &body).await
        });
    broker.signal("-CONT");
    assert_eq!(concurrent_status, 409, "{concurrent}");
    assert_eq!(concurrent["error"]["code"], "idempotency_key_in_use");
    assert_eq!(status, 503, "{unavailable}");
    assert_eq!(unavailable["error"]["code"], "broker_unavailable");
    let stalled_id = unavailable["error"]["order_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // The client sends it again with the same key: the same order id, accepted.
    let (status, accepted, _) = place(&system, Some(&key), &body).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(
        accepted["order_id"],
        json!(stalled_id),
        "{unavailable} then {accepted}"
    );
    system
        .saga_id_of(stalled_id.parse().expect("the 503 names the order id"))
        .await;
    // Whatever the stalled broker wrote late has arrived by now: still one saga.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sagas_of(&system, &stalled_id).await, 1);

    // Once accepted, the same key gets the same answer again, said to be replayed; another
    // body with it is refused, as is a key that is not one.
    let body = new_order();
    let (status, first, _) = place(&system, Some("cart-1"), &body).await;
    assert_eq!(status, 202, "{first}");
    let (status, again, replayed) = place(&system, Some("cart-1"), &body).await;
    assert_eq!((status, &again, replayed), (202, &first, true));
    let mut other = body.clone();
    other["total_cents"] = json!(2_000);
    other["items"][0]["quantity"] = json!(2);
    let (status, refused, _) = place(&system, Some("cart-1"), &other).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "idempotency_key_reused");
    let (status, refused, _) = place(&system, Some(&"k".repeat(256)), &body).await;
    assert_eq!(status, 400, "{refused}");
    let first_id = first["order_id"].as_str().unwrap_or_default().to_owned();
    system.saga_id_of(first_id.parse().expect("uuid")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sagas_of(&system, &first_id).await, 1);

    let total = crate::helpers::count(
        &system,
        "orchestrator",
        "SELECT count(*) FROM sagas WHERE $1::uuid IS NOT NULL",
        Uuid::nil(),
    )
    .await;
    assert_eq!(total, 2, "two orders placed, two sagas");
    system.stop().await;
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_swept_after_their_retention() {
    let system = TestSystem::start_with(Options {
        // Sweeps every 100 ms.
        retention_secs: Some(1),
        without: vec!["inventory", "payment", "shipping"],
        api: ApiConfig {
            idempotency_key_retention_secs: 1,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let (status, first, _) = place(&system, Some("cart-swept"), &new_order()).await;
    assert_eq!(status, 202, "{first}");
    let keys = system.schema("orchestrator").await;
    crate::helpers::eventually("the key to be swept", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM order_idempotency_keys")
            .fetch_one(&keys)
            .await
            .ok()?;
        (left == 0).then_some(())
    })
    .await;
    keys.close().await;
    // Past its retention the key is new again: another order.
    let (status, second, replayed) = place(&system, Some("cart-swept"), &new_order()).await;
    assert_eq!(status, 202, "{second}");
    assert!(!replayed);
    assert_ne!(first["order_id"], second["order_id"]);
    system.stop().await;
}
