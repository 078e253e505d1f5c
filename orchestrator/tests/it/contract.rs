//! The orchestrator's side of the wire contract that only a running system shows: replies are
//! read by their body, whatever their Kafka key and whatever fields they add (the contract's
//! "Keys and partitions" and tolerant reader, `events/contract/asyncapi.json`).

use events::{Action, Envelope, Outcome, Reply};
use uuid::Uuid;

use crate::helpers::{eventually, order, samples, TestSystem};
use crate::hostile::{raw_producer, send_raw};

const KEY_MISMATCHES: &str = "saga_reply_key_mismatches_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_another_or_no_record_key_and_unknown_fields_is_read_by_its_body_and_counted()
{
    let system = TestSystem::start().await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let saga_id: Uuid = saga["saga_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("the saga's id");
    let before = samples(&system.get_text("/metrics").await.2, KEY_MISMATCHES);

    // A participant keyed its replies wrongly (confluent-kafka without murmur2 keys them right
    // but partitions them elsewhere; this one sends no key, or another one) and writes a field
    // of its own: both replies are the saga's, a late answer to a step it has moved past.
    let key = placed.order_id.to_string();
    let reply = |extra: &str| {
        let body = Reply {
            name: "StockReserved".into(),
            saga_type: "order".into(),
            step: "reserve_stock".into(),
            action: Action::Forward,
            attempt: 1,
            key: key.clone(),
            outcome: Outcome::Succeeded,
        };
        let envelope = Envelope::new(saga_id, Some(Uuid::new_v4()), chrono::Utc::now(), body);
        let mut json: serde_json::Value =
            serde_json::from_slice(&envelope.to_json()).expect("JSON");
        json[extra] = serde_json::json!({ "participant": "python", "version": 3 });
        (
            envelope.message_id,
            serde_json::to_vec(&json).expect("JSON"),
        )
    };
    let (unkeyed_id, unkeyed) = reply("implementation");
    let (misfiled_id, misfiled) = reply("warehouse");
    let producer = raw_producer();
    send_raw(&producer, &system.topics.replies(), None, &unkeyed, &[]).await;
    let other_key = Some(&b"not-the-order"[..]);
    send_raw(
        &producer,
        &system.topics.replies(),
        other_key,
        &misfiled,
        &[],
    )
    .await;

    // Read, not dead-lettered: each is on the saga's history (ignored: the step is done).
    for message_id in [unkeyed_id, misfiled_id] {
        let id = message_id.to_string();
        let line = eventually("the reply on the saga's history", || async {
            system
                .history(&saga_id.to_string())
                .await
                .into_iter()
                .find(|h| h["message_id"] == id.as_str())
        })
        .await;
        assert_eq!(line["decision"], "ignored", "{line}");
    }
    let after = samples(&system.get_text("/metrics").await.2, KEY_MISMATCHES);
    for kind in ["missing", "other"] {
        let label = format!("key=\"{kind}\"");
        let counted = after.get(&label).copied().unwrap_or_default()
            - before.get(&label).copied().unwrap_or_default();
        assert!(counted >= 1.0, "{kind}: {before:?} → {after:?}");
    }
    system.stop().await;
}
