//! Records handled set-wise, a batch at a time (one statement for the inbox rows of a batch,
//! one for its ledger rows or sagas), must come out as if each had been handled alone: the
//! records are published while their consumer is down, so that they arrive in one batch.

use events::{Envelope, LineItem, Reply};

use rdkafka::Message;
use saga_core::order_messages::{Command, Reply as OrderReply, StepDone};
use uuid::Uuid;

use crate::helpers::{count, eventually, order, Options, TestSystem};

/// The first `count` replies on the deployment's replies topic: what each answers, and its type.
async fn replies(system: &TestSystem, count: usize) -> Vec<(Option<Uuid>, String)> {
    system
        .read_topic(&system.topics.replies(), count)
        .await
        .iter()
        .map(|m| {
            let reply =
                Envelope::<Reply>::from_json(m.payload().unwrap_or_default()).expect("a reply");
            (reply.causation_id, reply.body.name)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_with_a_redelivery_a_retry_and_a_compensation_of_one_step_acts_once_each() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["inventory"],
        ..Options::default()
    })
    .await;
    let (saga_id, order_id) = (Uuid::new_v4(), Uuid::new_v4());
    let reserve = |attempt| {
        Envelope::new(
            saga_id,
            None,
            chrono::Utc::now(),
            Command::ReserveStock {
                order_id,
                attempt,
                items: vec![LineItem {
                    sku: "WIDGET".into(),
                    quantity: 2,
                    unit_price_cents: 1_000,
                }],
            }
            .wire(),
        )
    };
    let first = reserve(1);
    let retry = reserve(2);
    let release = Envelope::new(
        saga_id,
        None,
        chrono::Utc::now(),
        Command::ReleaseStock {
            order_id,
            attempt: 1,
        }
        .wire(),
    );
    let topic = system.topics.named("inventory.commands");
    let key = order_id.to_string();
    for payload in [
        first.to_json(),
        first.to_json(),
        retry.to_json(),
        release.to_json(),
    ] {
        system.publish(&topic, &key, &payload).await;
    }
    system.start_participant("inventory", 0);
    system.wait_for_participants().await;

    let replies = replies(&system, 3).await;
    let replies: Vec<(Option<Uuid>, &str)> = replies
        .iter()
        .map(|(cause, name)| (*cause, name.as_str()))
        .collect();
    assert_eq!(
        replies,
        [
            (Some(first.message_id), "StockReserved"),
            (Some(retry.message_id), "StockReserved"),
            (Some(release.message_id), "StockReleased"),
        ],
        "each command answered once, in order; the redelivery not at all"
    );
    let db = system.schema("inventory").await;
    let (widgets, status): (i32, String) = sqlx::query_as(
        "SELECT s.available, r.status FROM stock s, reservations r \
         WHERE s.sku = 'WIDGET' AND r.order_id = $1",
    )
    .bind(order_id)
    .fetch_one(&db)
    .await
    .expect("stock and reservation");
    assert_eq!(
        (widgets, status.as_str()),
        (1_000_000, "released"),
        "reserved once, released once"
    );
    let deliveries: i32 = sqlx::query_scalar("SELECT deliveries FROM inbox WHERE message_id = $1")
        .bind(first.message_id)
        .fetch_one(&db)
        .await
        .expect("inbox row");
    assert_eq!(deliveries, 2, "the redelivery was counted");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_answering_a_saga_twice_moves_it_once() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["orchestrator", "inventory"],
        ..Options::default()
    })
    .await;
    let mut orchestrator = system.spawn_orchestrator_process(&[]).await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let sagas = system.schema("orchestrator").await;
    let saga_id: Uuid = eventually("the saga to start", || async {
        sqlx::query_scalar("SELECT id FROM sagas WHERE saga_key = $1::text")
            .bind(placed.order_id)
            .fetch_optional(&sagas)
            .await
            .ok()
            .flatten()
    })
    .await;
    orchestrator.kill().await.expect("stop the orchestrator");

    // The first answer, an answer to a re-sent command, and the first one again.
    let answer = || {
        Envelope::new(
            saga_id,
            None,
            chrono::Utc::now(),
            OrderReply::StockReserved(StepDone {
                order_id: placed.order_id,
                attempt: 1,
            })
            .wire(),
        )
    };
    let (first, second) = (answer(), answer());
    let key = placed.order_id.to_string();
    for reply in [&first, &second, &first] {
        system
            .publish(&system.topics.replies(), &key, &reply.to_json())
            .await;
    }
    let _orchestrator = system.spawn_orchestrator_process(&[]).await;
    system.start_participant("inventory", 0);
    system.wait_for_participants().await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let history = system.history(&saga_id.to_string()).await;
    let decisions: Vec<&str> = history
        .iter()
        .filter(|h| h["message_type"] == "StockReserved")
        .map(|h| h["decision"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        decisions.iter().filter(|d| **d == "applied").count(),
        1,
        "one answer moved the saga, the others were ignored: {history:?}"
    );
    let charges = count(
        &system,
        "payment",
        "SELECT count(*) FROM payments WHERE order_id = $1",
        placed.order_id,
    )
    .await;
    assert_eq!(charges, 1, "the payment was asked for once");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_in_one_batch_take_the_stock_in_turn() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["inventory"],
        ..Options::default()
    })
    .await;
    // One LIMITED in stock, asked for by two orders, with a WIDGET order between them.
    let orders: Vec<Envelope<events::Command>> = [("LIMITED", 1), ("WIDGET", 3), ("LIMITED", 1)]
        .into_iter()
        .map(|(sku, quantity)| {
            let command = Command::ReserveStock {
                order_id: Uuid::new_v4(),
                attempt: 1,
                items: vec![LineItem {
                    sku: sku.into(),
                    quantity,
                    unit_price_cents: 100,
                }],
            }
            .wire();
            Envelope::new(Uuid::new_v4(), None, chrono::Utc::now(), command)
        })
        .collect();
    let topic = system.topics.named("inventory.commands");
    // One key for all three, so that they land in one partition, in this order.
    for command in &orders {
        system.publish(&topic, "one-key", &command.to_json()).await;
    }
    system.start_participant("inventory", 0);
    system.wait_for_participants().await;

    let replies = replies(&system, 3).await;
    let expected: Vec<(Option<Uuid>, String)> = orders
        .iter()
        .zip(["StockReserved", "StockReserved", "StockUnavailable"])
        .map(|(command, reply)| (Some(command.message_id), reply.to_owned()))
        .collect();
    let mut sorted = replies.clone();
    sorted.sort();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        sorted, expected_sorted,
        "the first LIMITED order got it: {replies:?}"
    );
    let db = system.schema("inventory").await;
    let stock: Vec<(String, i32)> = sqlx::query_as(
        "SELECT sku, available FROM stock WHERE sku IN ('LIMITED', 'WIDGET') ORDER BY sku",
    )
    .fetch_all(&db)
    .await
    .expect("stock");
    assert_eq!(
        stock,
        [("LIMITED".to_owned(), 0), ("WIDGET".to_owned(), 999_997)]
    );
    system.stop().await;
}
