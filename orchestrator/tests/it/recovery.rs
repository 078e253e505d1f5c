//! Crash-proofing: deadlines and retries, compensations that fail, operator actions, and the
//! participant runtime's refusal of a forward command that arrives after its compensation.

use events::{Envelope, LineItem};

use saga_core::order_messages::Command;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{
    count, eventually, fast_retries, order, step_statuses, Options, TestSystem, OPERATOR_NAME,
};

async fn saga_of(system: &TestSystem, order_id: Uuid) -> Option<Value> {
    let (status, body) = system.get(&format!("/orders/{order_id}/saga")).await;
    (status == 200).then_some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_is_down_when_its_command_is_sent_completes_the_saga_after_it_returns() {
    let mut system = TestSystem::start_with(Options {
        retries: fast_retries(),
        without: vec!["payment"],
        ..Default::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    // No payment service: the charge is re-sent on every deadline.
    eventually("the charge to be re-sent", || async {
        let saga = saga_of(&system, placed.order_id).await?;
        (saga["steps"][1]["attempts"].as_u64()? >= 3).then_some(())
    })
    .await;
    system.start_participant("payment", 0);

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let charges = count(
        &system,
        "payment",
        "SELECT count(*) FROM payments WHERE order_id = $1",
        placed.order_id,
    )
    .await;
    assert_eq!(
        charges, 1,
        "every re-sent command is answered from the ledger, charged once"
    );
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();
    let history = system.history(&saga_id).await;
    assert!(
        history.iter().any(|h| h["decision"] == "deadline"),
        "{history:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_fails_twice_then_succeeds_compensates_the_saga() {
    let mut system = TestSystem::start_with(Options {
        retries: fast_retries(),
        without: vec!["inventory"],
        ..Default::default()
    })
    .await;
    system.start_participant("inventory", 2);
    // carol cannot pay, so the reservation must be released; the first two releases fail.
    let placed = order("carol", "WIDGET", 1, "DE");
    system.place(&placed).await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    assert_eq!(step_statuses(&saga), ["compensated", "failed", "pending"]);
    assert_eq!(saga["steps"][0]["compensation_attempts"], 3);
    let held = count(
        &system,
        "inventory",
        "SELECT count(*) FROM reservations WHERE order_id = $1 AND status = 'reserved'",
        placed.order_id,
    )
    .await;
    assert_eq!(held, 0);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_never_succeeds_fails_the_saga_until_an_operator_retries() {
    let mut system = TestSystem::start_with(Options {
        retries: fast_retries(),
        without: vec!["inventory"],
        ..Default::default()
    })
    .await;
    system.start_participant("inventory", u32::MAX);
    let placed = order("carol", "WIDGET", 1, "DE");
    system.place(&placed).await;

    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "failed", "{saga}");
    assert_eq!(saga["steps"][0]["status"], "compensation_failed");
    let reason = saga["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("injected fault"), "{reason}");
    let saga_id = saga["saga_id"].as_str().unwrap_or_default().to_owned();

    let (status, body) = system.post(&format!("/sagas/{saga_id}/retry"), "{}").await;
    assert_eq!(status, 422, "a reason is required: {body}");
    let (status, body) = system
        .post(&format!("/sagas/{saga_id}/retry"), r#"{"reason":"  "}"#)
        .await;
    assert_eq!(status, 400, "{body}");
    // Who acts comes from the token, never from the body.
    let (status, body) = system
        .post(
            &format!("/sagas/{saga_id}/retry"),
            r#"{"operator":"mallory","reason":"x"}"#,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let operator = json!({"reason": "warehouse is back"}).to_string();
    let (status, body) = system
        .post(&format!("/sagas/{saga_id}/abort"), &operator)
        .await;
    assert_eq!(status, 409, "a failed saga cannot be aborted: {body}");
    let (status, _) = system
        .post(&format!("/sagas/{saga_id}/frobnicate"), &operator)
        .await;
    assert_eq!(status, 404);

    // The warehouse comes back; the operator retries.
    system.stop_service("inventory").await;
    system.start_participant("inventory", 0);
    let (status, body) = system
        .post(&format!("/sagas/{saga_id}/retry"), &operator)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "compensating");
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "compensated", "{saga}");
    let history = system.history(&saga_id).await;
    assert!(
        history.iter().any(|h| h["decision"] == "operator"
            && h["detail"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("retry by {OPERATOR_NAME}: warehouse is back"))),
        "{history:?}"
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_command_after_its_compensation_is_refused() {
    let system = TestSystem::start().await;
    let saga_id = Uuid::new_v4();
    let order_id = Uuid::new_v4();
    let inventory = system.topics.named("inventory.commands");
    let key = order_id.to_string();
    // The orchestrator gave up on a reservation it never heard back from and released it; the
    // release overtakes the reservation, which arrives afterwards.
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
    system.publish(&inventory, &key, &release.to_json()).await;
    let reserve = Envelope::new(
        saga_id,
        None,
        chrono::Utc::now(),
        Command::ReserveStock {
            order_id,
            attempt: 1,
            items: vec![LineItem {
                sku: "LIMITED".into(),
                quantity: 1,
                unit_price_cents: 100,
            }],
        }
        .wire(),
    );
    system.publish(&inventory, &key, &reserve.to_json()).await;

    let db = system.schema("inventory").await;
    let (outcome, compensated): (Option<String>, bool) = eventually("the late reservation to be handled", || async {
        let row: Option<(Option<String>, bool)> = sqlx::query_as(
            "SELECT forward_outcome::text, compensated_at IS NOT NULL FROM step_ledger WHERE saga_id = $1",
        )
        .bind(saga_id)
        .fetch_optional(&db)
        .await
        .ok()
        .flatten();
        row.filter(|(outcome, _)| outcome.is_some())
    })
    .await;
    assert!(compensated, "the release left a tombstone");
    assert_eq!(outcome.as_deref(), Some("refused"));
    let reservations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reservations WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&db)
            .await
            .expect("count");
    assert_eq!(reservations, 0, "the late reservation did not act");
    let limited: i32 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = 'LIMITED'")
        .fetch_one(&db)
        .await
        .expect("stock");
    assert_eq!(limited, 1);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_after_committing_a_transition_still_sends_its_command_once() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["orchestrator"],
        ..Options::default()
    })
    .await;
    // This process aborts right after its first committed message, before storing the
    // offset and (nearly always) before its relay has published the command.
    let mut crashing = system
        .spawn_orchestrator_process(&[("FAULT_CRASH_AFTER_COMMIT_EVERY", "1")])
        .await;
    // The fault spares a process's first 3 s.
    tokio::time::sleep(std::time::Duration::from_millis(3_500)).await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let exit = tokio::time::timeout(std::time::Duration::from_secs(30), crashing.wait())
        .await
        .expect("the orchestrator crashes within 30 s")
        .expect("wait for the process");
    assert!(!exit.success(), "the fault aborted the process: {exit}");

    let _restarted = system.spawn_orchestrator_process(&[]).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let sagas = count(
        &system,
        "orchestrator",
        "SELECT count(*) FROM sagas WHERE saga_key = $1::text",
        placed.order_id,
    )
    .await;
    assert_eq!(sagas, 1);
    let reservations = count(
        &system,
        "inventory",
        "SELECT count(*) FROM reservations WHERE order_id = $1",
        placed.order_id,
    )
    .await;
    let charges = count(
        &system,
        "payment",
        "SELECT count(*) FROM payments WHERE order_id = $1",
        placed.order_id,
    )
    .await;
    assert_eq!(
        (reservations, charges),
        (1, 1),
        "each step took effect once"
    );
    // The redelivered order found its saga, so it was recorded as a duplicate, not a start.
    let history = system
        .history(saga["saga_id"].as_str().unwrap_or_default())
        .await;
    let starts = history
        .iter()
        .filter(|h| h["decision"] == "started")
        .count();
    assert_eq!(starts, 1, "{history:?}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_after_its_local_commit_has_no_double_effect() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["inventory"],
        ..Options::default()
    })
    .await;
    system.start_crashing_participant("inventory");
    system.wait_for_participants().await;
    let widgets_before: i32 =
        sqlx::query_scalar("SELECT available FROM stock WHERE sku = 'WIDGET'")
            .fetch_one(&system.schema("inventory").await)
            .await
            .expect("stock");
    // The fault spares a service's first 3 s.
    tokio::time::sleep(std::time::Duration::from_millis(3_500)).await;
    let placed = order("alice", "WIDGET", 2, "DE");
    system.place(&placed).await;
    // Inventory commits the reservation (and its reply, in its outbox), then dies before
    // storing the offset of the ReserveStock it handled.
    let ended = system.wait_for_exit("inventory").await;
    assert!(ended.contains("crashed after a commit"), "{ended}");

    system.start_participant("inventory", 0);
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    let inventory = system.schema("inventory").await;
    let widgets: i32 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = 'WIDGET'")
        .fetch_one(&inventory)
        .await
        .expect("stock");
    assert_eq!(widgets, widgets_before - 2, "the stock was taken once");
    let reservations = count(
        &system,
        "inventory",
        "SELECT count(*) FROM reservations WHERE order_id = $1",
        placed.order_id,
    )
    .await;
    assert_eq!(reservations, 1);
    // The restarted service gets the command again (its offset was never stored) and its
    // inbox absorbs it; the saga may have finished before that, on the reply the dead
    // service had already written to its outbox.
    eventually("the ReserveStock to be delivered again", || async {
        let redelivered: Option<i64> =
            sqlx::query_scalar("SELECT count(*) FROM inbox WHERE deliveries > 1")
                .fetch_one(&inventory)
                .await
                .ok();
        (redelivered == Some(1)).then_some(())
    })
    .await;
    let widgets: i32 = sqlx::query_scalar("SELECT available FROM stock WHERE sku = 'WIDGET'")
        .fetch_one(&inventory)
        .await
        .expect("stock");
    assert_eq!(
        widgets,
        widgets_before - 2,
        "the redelivery took nothing more"
    );
    system.stop().await;
}

/// Deadlines and their due-ness follow one clock, the database's: an orchestrator whose own
/// clock runs ten minutes ahead, beside a normal one, neither fires the other's deadlines at
/// once (which spent a compensation's whole retry budget in a moment) nor writes deadlines ten
/// minutes out. Every saga's compensation retries keep the policy's spacing (1 s, 2 s, 4 s),
/// and no saga waits longer than the longest wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_ten_minutes_ahead_keeps_the_retry_spacing_of_the_policy() {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use orchestrator::config::RetryConfig;

    const SKEW_SECS: i64 = 600;
    let retries = RetryConfig {
        step_timeout_ms: Some(1_000),
        step_max_attempts: Some(100),
        compensation_max_attempts: Some(4),
        retry_max_timeout_ms: Some(4_000),
        deadline_scan_interval_ms: 50,
        ..RetryConfig::default()
    };
    // The waits between a refused compensation and the next attempt: 1 s, 2 s, 4 s; the
    // longest any wait may be: 4 s and its jitter of up to 25%.
    let policy_spacing = Duration::from_secs(1 + 2 + 4);
    let longest_wait_secs = 4.0 * 1.25;
    let mut system = TestSystem::start_with(Options {
        retries,
        without: vec!["inventory"],
        ..Default::default()
    })
    .await;
    system.start_participant("inventory", u32::MAX);
    let skewed = SKEW_SECS.to_string();
    let _ahead = system
        .spawn_orchestrator_process(&[
            ("FAULT_CLOCK_SKEW_SECS", skewed.as_str()),
            ("KAFKA_GROUP_INSTANCE_ID", "orchestrator-ahead"),
            ("STEP_TIMEOUT_MS", "1000"),
            ("STEP_MAX_ATTEMPTS", "100"),
            ("COMPENSATION_MAX_ATTEMPTS", "4"),
            ("RETRY_MAX_TIMEOUT_MS", "4000"),
            ("DEADLINE_SCAN_INTERVAL_MS", "50"),
        ])
        .await;
    // Both orchestrators in the group, each with a partition, before the orders arrive.
    tokio::time::sleep(Duration::from_secs(8)).await;

    // carol cannot pay: each saga releases its reservation, which inventory always refuses.
    let orders: Vec<_> = (0..6).map(|_| order("carol", "WIDGET", 1, "DE")).collect();
    for placed in &orders {
        system.place(placed).await;
    }
    let db = system.schema("orchestrator").await;
    let mut compensating_since: HashMap<String, Instant> = HashMap::new();
    let mut failed_after: HashMap<String, Duration> = HashMap::new();
    let mut longest_deadline_secs = 0.0_f64;
    let until = Instant::now() + Duration::from_secs(60);
    while failed_after.len() < orders.len() && Instant::now() < until {
        let rows: Vec<(String, String, Option<f64>)> = sqlx::query_as(
            "SELECT saga_key, state::text,
                    extract(epoch FROM deadline_at - now())::float8
             FROM sagas",
        )
        .fetch_all(&db)
        .await
        .expect("sagas");
        for (key, state, deadline_in) in rows {
            longest_deadline_secs = longest_deadline_secs.max(deadline_in.unwrap_or_default());
            if state == "compensating" {
                compensating_since
                    .entry(key.clone())
                    .or_insert_with(Instant::now);
            }
            if state == "failed" && !failed_after.contains_key(&key) {
                let since = compensating_since.get(&key).copied();
                failed_after.insert(key, since.map(|s| s.elapsed()).unwrap_or_default());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        failed_after.len(),
        orders.len(),
        "every saga spent its compensation budget within 60 s: {failed_after:?}"
    );
    assert!(
        longest_deadline_secs <= longest_wait_secs,
        "a deadline was {longest_deadline_secs:.1} s out, more than the longest wait \
         ({longest_wait_secs} s)"
    );
    for (key, took) in &failed_after {
        assert!(
            *took + Duration::from_millis(500) >= policy_spacing,
            "saga {key} spent 4 compensation attempts in {took:?}, the policy spaces them over \
             {policy_spacing:?}: {failed_after:?}"
        );
    }
    // The fault was in force: the instance that serves the test's API runs 600 s ahead.
    let (status, _, metrics) = system.get_text("/metrics").await;
    assert_eq!(status, 200);
    let skew: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("orchestrator_clock_skew_seconds "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no orchestrator_clock_skew_seconds in {metrics}"));
    assert!((skew - SKEW_SECS as f64).abs() < 5.0, "skew {skew}");
    system.stop().await;
}

/// A pivot whose command never arrives (its participant gone, the command parked or
/// dead-lettered) is re-sent for ever. Once a wait passed without an answer, an operator can
/// abandon it: the saga is failed with who and why, nothing below it is undone (the pivot may
/// have acted), and a late answer is recorded for the operator to settle by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_pivot_can_be_abandoned_by_an_operator_and_nothing_is_undone() {
    let mut system = TestSystem::start_with(Options {
        retries: orchestrator::config::RetryConfig {
            step_timeout_overrides_ms: vec!["schedule_shipment=3000".into()],
            ..fast_retries()
        },
        without: vec!["shipping"],
        ..Default::default()
    })
    .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga_id = system.saga_id_of(placed.order_id).await;
    let path = format!("/sagas/{saga_id}");
    eventually("the saga to wait on its pivot", || async {
        let (_, saga) = system.get(&path).await;
        (saga["current_step"] == "schedule_shipment").then_some(())
    })
    .await;
    let abort = json!({"reason": "shipping.commands was deleted"}).to_string();
    // Within its first wait the shipment may still be answered.
    let (status, body) = system.post(&format!("{path}/abort"), &abort).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.to_string().contains("cannot be undone"),
        "the refusal says why: {body}"
    );
    eventually("the shipment to be sent again", || async {
        let (_, saga) = system.get(&path).await;
        (saga["steps"][2]["attempts"].as_u64()? >= 2).then_some(())
    })
    .await;

    let (status, saga) = system.post(&format!("{path}/abort"), &abort).await;
    assert_eq!(status, 200, "{saga}");
    assert_eq!(saga["state"], "failed", "{saga}");
    assert_eq!(saga["current_step"], "schedule_shipment", "{saga}");
    assert_eq!(
        step_statuses(&saga),
        ["succeeded", "succeeded", "failed"],
        "nothing undone: {saga}"
    );
    let reason = saga["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("abandoned by operator")
            && reason.contains("shipping.commands was deleted"),
        "{reason}"
    );
    let history = system.history(&saga_id).await;
    let asked = format!("abort by {OPERATOR_NAME}: shipping.commands was deleted");
    let by_operator: Vec<(&Value, &str)> = history
        .iter()
        .filter(|h| h["message_type"] == "OperatorAbort")
        .map(|h| (&h["decision"], h["detail"].as_str().unwrap_or_default()))
        .collect();
    assert!(
        matches!(&by_operator[..], [(refused, first), (applied, second)]
            if *refused == "ignored" && first.starts_with(&format!("{asked}; refused: "))
                && *applied == "operator" && *second == asked),
        "both attempts audited with who and why: {history:?}"
    );

    // Shipping comes back and answers a re-sent command: recorded, the saga stays failed.
    system.start_participant("shipping", 0);
    eventually("the late answer to be recorded", || async {
        let history = system.history(&saga_id).await;
        history
            .iter()
            .any(|h| h["message_type"] == "ShipmentScheduled" && h["decision"] == "ignored")
            .then_some(())
    })
    .await;
    let (_, saga) = system.get(&path).await;
    assert_eq!(saga["state"], "failed", "{saga}");
    let held = count(
        &system,
        "inventory",
        "SELECT count(*) FROM reservations WHERE order_id = $1 AND status = 'reserved'",
        placed.order_id,
    )
    .await;
    let charged = count(
        &system,
        "payment",
        "SELECT count(*) FROM payments WHERE order_id = $1 AND status = 'charged'",
        placed.order_id,
    )
    .await;
    assert_eq!(
        (held, charged),
        (1, 1),
        "nothing below the pivot was undone"
    );
    system.stop().await;
}
