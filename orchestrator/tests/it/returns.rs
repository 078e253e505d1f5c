//! The return saga end to end: receive the returned items (the `returns` participant), put
//! them back in stock (`inventory`'s `restock`), refund the customer (`payment`'s `refund`,
//! the pivot), and undo the restock and reject the return when the refund is refused.

use std::collections::BTreeMap;

use events::{ReturnItem, ReturnRequested};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{eventually, order, step_statuses, Options, TestSystem};
use crate::{balance, stock};

/// The order and return sagas with the returns participant beside the order saga's.
async fn start() -> TestSystem {
    let mut system = TestSystem::start().await;
    system.start_participant("returns", 0);
    system.wait_for_participants().await;
    system
}

/// `quantity` WIDGETs of `order_id` back from alice, for `refund_cents`.
pub(crate) fn widgets_back(order_id: Uuid, quantity: i32, refund_cents: i64) -> ReturnRequested {
    ReturnRequested {
        return_id: Uuid::new_v4(),
        order_id,
        customer_id: "alice".into(),
        items: vec![ReturnItem {
            sku: "WIDGET".into(),
            quantity,
        }],
        refund_cents,
        currency: "EUR".into(),
    }
}

pub(crate) async fn request(system: &TestSystem, request: &ReturnRequested) {
    let payload = serde_json::to_vec(request).expect("serialise return");
    system
        .publish(
            &system.topics.named("returns"),
            &request.return_id.to_string(),
            &payload,
        )
        .await;
}

/// Places an order of `quantity` WIDGETs for alice and waits for it to complete.
async fn completed_order(system: &TestSystem, quantity: i32) -> Uuid {
    let placed = order("alice", "WIDGET", quantity, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    placed.order_id
}

/// The return saga of `return_id` once it is terminal, as the API shows it.
pub(crate) async fn finished_return(system: &TestSystem, return_id: Uuid) -> Value {
    let sagas = system.schema("orchestrator").await;
    let saga_id: Uuid = eventually("the return saga to start", || async {
        sqlx::query_scalar(
            "SELECT id FROM sagas WHERE definition_name = 'return' AND saga_key = $1::text",
        )
        .bind(return_id)
        .fetch_optional(&sagas)
        .await
        .ok()
        .flatten()
    })
    .await;
    system
        .terminal_at(&format!("return {return_id}"), &format!("/sagas/{saga_id}"))
        .await
}

async fn return_status(system: &TestSystem, return_id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM returns WHERE return_id = $1")
        .bind(return_id)
        .fetch_optional(&system.schema("returns").await)
        .await
        .expect("returns query")
}

async fn restock_status(system: &TestSystem, return_id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM restocks WHERE return_id = $1")
        .bind(return_id)
        .fetch_optional(&system.schema("inventory").await)
        .await
        .expect("restocks query")
}

async fn refunded(system: &TestSystem, return_id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(amount_cents), 0)::bigint FROM return_refunds WHERE return_id = $1",
    )
    .bind(return_id)
    .fetch_one(&system.schema("payment").await)
    .await
    .expect("refunds query")
}

/// Any saga type starts over HTTP: `POST /definitions/return/sagas` with a `ReturnRequested`
/// (its `type` left out) runs the return saga; the same body again is the same saga; what
/// is not the type's trigger message is refused with a 4xx naming why, and nothing is
/// published for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_of_any_type_starts_over_http_once_per_key() {
    let system = start().await;
    let order_id = completed_order(&system, 2).await;
    let back = widgets_back(order_id, 1, 1_000);
    let mut body = serde_json::to_value(&back).expect("json");
    if let Some(fields) = body.as_object_mut() {
        fields.remove("type");
    }
    let body = body.to_string();
    let (status, accepted) = system.post("/definitions/return/sagas", &body).await;
    assert_eq!(status, 202, "{accepted}");
    let key = back.return_id.to_string();
    assert_eq!(accepted["saga_type"], "return");
    assert_eq!(accepted["key"], key);
    let status_url = format!("/definitions/return/sagas/{}", key.replace('-', "%2D"));
    assert_eq!(accepted["status_url"], status_url);
    crate::operate::assert_documented(
        &crate::operate::openapi(),
        "post",
        "/definitions/{saga_type}/sagas",
        202,
        &accepted,
    );
    // A retry (the answer lost, say): the same key, so the same saga.
    let (status, _) = system.post("/definitions/return/sagas", &body).await;
    assert_eq!(status, 202);

    let saga = system.terminal_at("the return saga", &status_url).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(saga["definition_name"], "return");
    assert_eq!(saga["saga_key"], key);
    assert_eq!(saga["trigger"]["type"], "ReturnRequested");
    // The unencoded key finds it too; the second request was a duplicate of the first.
    let (status, same) = system
        .get(&format!("/definitions/return/sagas/{key}"))
        .await;
    assert_eq!((status, &same["saga_id"]), (200, &saga["saga_id"]));
    let sagas = crate::helpers::count(
        &system,
        "orchestrator",
        "SELECT count(*) FROM sagas WHERE definition_name = 'return' AND saga_key = $1::text",
        back.return_id,
    )
    .await;
    assert_eq!(sagas, 1);

    // Refused, each with a JSON error naming why.
    let order_json = serde_json::to_string(&order("alice", "WIDGET", 1, "DE")).expect("json");
    let mut invalid = serde_json::to_value(widgets_back(order_id, 1, 1_000)).expect("json");
    invalid["currency"] = "eur".into();
    let invalid = invalid.to_string();
    let refused: [(&str, &str, u16, &str, &str); 7] = [
        (
            "no such type",
            "/definitions/nope/sagas",
            404,
            "not_found",
            "nope",
        ),
        (
            "another type's message",
            "/definitions/return/sagas",
            422,
            "invalid_trigger",
            "OrderPlaced",
        ),
        (
            "not an object",
            "/definitions/return/sagas",
            422,
            "invalid_trigger",
            "JSON object",
        ),
        (
            "a rule broken",
            "/definitions/return/sagas",
            422,
            "invalid_trigger",
            "currency",
        ),
        (
            "not JSON",
            "/definitions/return/sagas",
            400,
            "invalid_body",
            "",
        ),
        (
            "NUL",
            "/definitions/return/sagas",
            422,
            "invalid_trigger",
            "",
        ),
        (
            "a lone surrogate",
            "/definitions/return/sagas",
            400,
            "invalid_body",
            "",
        ),
    ];
    let bodies = [
        body.as_str(),
        order_json.as_str(),
        "[1, 2]",
        invalid.as_str(),
        "{\"return_id\": ",
        "{\"type\":\"ReturnRequested\",\"return_id\":\"\\u0000\"}",
        "{\"type\":\"ReturnRequested\",\"customer_id\":\"\\ud800\"}",
    ];
    for ((what, path, expected, code, mentions), body) in refused.into_iter().zip(bodies) {
        let (status, error) = system.post(path, body).await;
        assert_eq!(status, expected, "{what}: {error}");
        assert_eq!(error["error"]["code"], code, "{what}: {error}");
        let message = error["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "{what}: {error}");
    }
    let (status, error) = system.get("/definitions/return/sagas/no-such-key").await;
    assert_eq!(
        (status, &error["error"]["code"]),
        (404, &"not_found".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_is_received_restocked_and_refunded() {
    let system = start().await;
    let order_id = completed_order(&system, 3).await;
    let widgets_before = stock(&system, "WIDGET").await;
    let balance_before = balance(&system, "alice").await;

    let back = widgets_back(order_id, 2, 2_000);
    request(&system, &back).await;
    let saga = finished_return(&system, back.return_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(saga["definition_name"], "return");
    assert_eq!(
        step_statuses(&saga),
        ["succeeded", "succeeded", "succeeded"]
    );
    // The API shows a return saga by its key and trigger; order fields are an order saga's.
    assert_eq!(saga["saga_key"], back.return_id.to_string());
    assert_eq!(saga["trigger"]["type"], "ReturnRequested");
    assert_eq!(saga["trigger"]["refund_cents"], 2_000);
    assert!(
        saga.get("order").is_none() && saga.get("order_id").is_none(),
        "{saga}"
    );
    // And as the OpenAPI document says a saga looks.
    crate::operate::assert_documented(
        &crate::operate::openapi(),
        "get",
        "/sagas/{saga_id}",
        200,
        &saga,
    );

    assert_eq!(stock(&system, "WIDGET").await, widgets_before + 2);
    assert_eq!(balance(&system, "alice").await, balance_before + 2_000);
    assert_eq!(
        return_status(&system, back.return_id).await.as_deref(),
        Some("received")
    );
    assert_eq!(
        restock_status(&system, back.return_id).await.as_deref(),
        Some("restocked")
    );
    assert_eq!(refunded(&system, back.return_id).await, 2_000);

    // The order saga's view is what it was: order fields beside the generic ones.
    let (status, order_saga) = system.get(&format!("/orders/{order_id}/saga")).await;
    assert_eq!(status, 200, "{order_saga}");
    assert_eq!(order_saga["order_id"], order_id.to_string());
    assert_eq!(order_saga["order"]["order_id"], order_id.to_string());
    assert_eq!(order_saga["saga_key"], order_id.to_string());
    assert_eq!(order_saga["trigger"]["type"], "OrderPlaced");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refund_undoes_the_restock_and_rejects_the_return() {
    let system = start().await;
    let order_id = completed_order(&system, 2).await;
    // A first return of one of the two takes 16.00 of the 20.00 charged, so 4.00 are left.
    let first = widgets_back(order_id, 1, 1_600);
    request(&system, &first).await;
    let saga = finished_return(&system, first.return_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let widgets_before = stock(&system, "WIDGET").await;
    let balance_before = balance(&system, "alice").await;

    let greedy = widgets_back(order_id, 1, 500);
    request(&system, &greedy).await;
    let saga = finished_return(&system, greedy.return_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    assert_eq!(
        step_statuses(&saga),
        ["compensated", "compensated", "failed"]
    );
    let reason = saga["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("refund failed") && reason.contains("more than the 400 left"),
        "{saga}"
    );
    // Nothing changed hands: the restocked item was taken out again, no money moved.
    assert_eq!(stock(&system, "WIDGET").await, widgets_before);
    assert_eq!(balance(&system, "alice").await, balance_before);
    assert_eq!(
        return_status(&system, greedy.return_id).await.as_deref(),
        Some("rejected")
    );
    assert_eq!(
        restock_status(&system, greedy.return_id).await.as_deref(),
        Some("undone")
    );
    assert_eq!(refunded(&system, greedy.return_id).await, 0);

    // A return of an order never placed is refused before it gets there: the order reserved
    // nothing, so nothing of it goes back in stock.
    let orphan = widgets_back(Uuid::new_v4(), 1, 100);
    request(&system, &orphan).await;
    refused_at_restock(&system, &orphan, "reserved nothing here").await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_return_is_one_saga_and_one_refund() {
    let system = start().await;
    let order_id = completed_order(&system, 2).await;
    let balance_before = balance(&system, "alice").await;
    let back = widgets_back(order_id, 1, 1_000);
    request(&system, &back).await;
    request(&system, &back).await;
    let saga = finished_return(&system, back.return_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    // Once more after it finished: still the one saga.
    request(&system, &back).await;
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    eventually(
        "both repeats to be counted on one line of the saga",
        || async {
            let history = system.history(&saga_id).await;
            let ignored: Vec<&Value> = history
                .iter()
                .filter(|line| {
                    line["decision"] == "ignored"
                        && line["message_type"] == "ReturnRequested"
                        && line["detail"]
                            .as_str()
                            .is_some_and(|d| d.starts_with("duplicate return"))
                })
                .collect();
            (ignored.len() == 1 && ignored[0]["duplicates"] == 2).then_some(())
        },
    )
    .await;
    let sagas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sagas WHERE definition_name = 'return' AND saga_key = $1::text",
    )
    .bind(back.return_id)
    .fetch_one(&system.schema("orchestrator").await)
    .await
    .expect("count sagas");
    assert_eq!(sagas, 1);
    assert_eq!(refunded(&system, back.return_id).await, 1_000);
    assert_eq!(balance(&system, "alice").await, balance_before + 1_000);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_undone_after_a_return_pays_back_only_what_the_return_did_not() {
    // Shipping is down, so the order waits after its charge; a return is refunded meanwhile;
    // then the shipment is rejected and the order saga refunds its charge: only the rest.
    let mut system = TestSystem::start_with(Options {
        without: vec!["shipping"],
        ..Options::default()
    })
    .await;
    system.start_participant("returns", 0);
    system.wait_for_participants().await;
    let balance_before = balance(&system, "alice").await;
    let placed = order("alice", "WIDGET", 2, "AQ");
    system.place(&placed).await;
    let saga_id = system.saga_id_of(placed.order_id).await;
    eventually("the order to be charged", || async {
        let (_, saga) = system.get(&format!("/sagas/{saga_id}")).await;
        (step_statuses(&saga).get(1).map(String::as_str) == Some("succeeded")).then_some(())
    })
    .await;
    let back = widgets_back(placed.order_id, 1, 700);
    request(&system, &back).await;
    let saga = finished_return(&system, back.return_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(
        balance(&system, "alice").await,
        balance_before - 2_000 + 700
    );

    system.start_participant("shipping", 0);
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    // 20.00 charged, 7.00 back through the return, 13.00 through the order's compensation.
    assert_eq!(balance(&system, "alice").await, balance_before);
    system.stop().await;
}

/// Waits for the return saga of `back` and checks that the restock refused it: compensated,
/// the return rejected, nothing restocked, nothing refunded, and the reason names `reason`.
async fn refused_at_restock(system: &TestSystem, back: &ReturnRequested, reason: &str) {
    let saga = finished_return(system, back.return_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    assert_eq!(
        step_statuses(&saga),
        ["compensated", "failed", "pending"],
        "{saga}"
    );
    let failure = saga["failure_reason"].as_str().unwrap_or_default();
    assert!(
        failure.contains("restock failed") && failure.contains(reason),
        "{saga}"
    );
    assert_eq!(
        return_status(system, back.return_id).await.as_deref(),
        Some("rejected")
    );
    assert_eq!(restock_status(system, back.return_id).await, None);
    assert_eq!(refunded(system, back.return_id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_put_back_no_more_than_the_order_took() {
    // Issue 20's example: an order of 2 WIDGETs, two returns of 5 of them at once. Each is
    // refused at its restock, so neither is refunded and stock stays where the order left it.
    let system = start().await;
    let widgets_at_start = stock(&system, "WIDGET").await;
    let balance_at_start = balance(&system, "alice").await;
    let order_id = completed_order(&system, 2).await;
    let greedy = [
        widgets_back(order_id, 5, 1_000),
        widgets_back(order_id, 5, 1_000),
    ];
    for back in &greedy {
        request(&system, back).await;
    }
    for back in &greedy {
        refused_at_restock(&system, back, "5 of WIDGET returned, but only 2").await;
    }
    assert_eq!(stock(&system, "WIDGET").await, widgets_at_start - 2);
    assert_eq!(balance(&system, "alice").await, balance_at_start - 2_000);

    // What the order took comes back, once: then nothing of it is left to return.
    let both = widgets_back(order_id, 2, 1_500);
    request(&system, &both).await;
    let saga = finished_return(&system, both.return_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let again = widgets_back(order_id, 1, 100);
    request(&system, &again).await;
    refused_at_restock(&system, &again, "1 of WIDGET returned, but only 0").await;
    // A SKU the order never had.
    let mut other = widgets_back(order_id, 1, 100);
    other.items[0].sku = "GADGET".into();
    request(&system, &other).await;
    refused_at_restock(&system, &other, "did not take GADGET").await;
    assert_eq!(stock(&system, "WIDGET").await, widgets_at_start);
    assert_eq!(balance(&system, "alice").await, balance_at_start - 500);

    // An order undone (shipping refuses AQ) released its reservation: a return of it is
    // refused, and stock stays where it started.
    let undone = order("alice", "WIDGET", 2, "AQ");
    system.place(&undone).await;
    let saga = system.finished_saga(undone.order_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    let late = widgets_back(undone.order_id, 2, 1_000);
    request(&system, &late).await;
    refused_at_restock(&system, &late, "was undone and its reservation released").await;
    assert_eq!(stock(&system, "WIDGET").await, widgets_at_start);
    assert_eq!(balance(&system, "alice").await, balance_at_start - 500);
    system.stop().await;
}

fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_on_returns_that_are_no_return_are_dead_lettered_with_the_reason() {
    let system = start().await;
    let returns = system.topics.named("returns");
    let valid = widgets_back(Uuid::new_v4(), 1, 100);
    let mut zero_refund = serde_json::to_value(&valid).expect("json");
    zero_refund["refund_cents"] = 0.into();
    let mut no_items = serde_json::to_value(&valid).expect("json");
    no_items["items"] = Value::Array(Vec::new());
    let an_order = serde_json::to_vec(&order("alice", "WIDGET", 1, "DE")).expect("json");
    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"{not json".to_vec(), "invalid ReturnRequested"),
        (
            "not UTF-8",
            vec![0xff, 0xfe, 0x00],
            "invalid ReturnRequested",
        ),
        (
            "an order on returns",
            an_order,
            "expected \"type\": \"ReturnRequested\"",
        ),
        (
            "no refund",
            serde_json::to_vec(&zero_refund).expect("json"),
            "refund_cents",
        ),
        (
            "no items",
            serde_json::to_vec(&no_items).expect("json"),
            "a return needs at least one item",
        ),
    ];
    for (_, payload, _) in &hostile {
        system.publish(&returns, "garbage", payload).await;
    }
    let dead = system
        .read_topic(&system.topics.dead_letters(), hostile.len())
        .await;
    let reasons: BTreeMap<Vec<u8>, String> = dead
        .iter()
        .map(|m| {
            assert_eq!(
                header(m, "dlq.source.topic").as_deref(),
                Some(returns.as_str())
            );
            (
                m.payload().unwrap_or_default().to_vec(),
                header(m, "dlq.reason").unwrap_or_default(),
            )
        })
        .collect();
    for (what, payload, expected) in &hostile {
        let reason = reasons
            .get(payload)
            .unwrap_or_else(|| panic!("{what}: no dead-letter copy"));
        assert!(reason.contains(expected), "{what}: {reason}");
    }
    // The topic goes on: a return after the garbage is a saga (refused: its order was never
    // placed, which is the point of this one).
    request(&system, &valid).await;
    let saga = finished_return(&system, valid.return_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    let sagas: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sagas WHERE definition_name = 'return'")
            .fetch_one(&system.schema("orchestrator").await)
            .await
            .expect("count sagas");
    assert_eq!(sagas, 1, "garbage started no saga");
    system.stop().await;
}
