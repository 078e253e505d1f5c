//! Scale out (issue 23): orchestrator instances share the deadline scanner's work by the
//! partitions their consumers hold, and a saga write refused by its row's version is counted.

use std::collections::BTreeMap;
use std::time::Duration;

use messaging::outbox::{Outbox, OutgoingMessage};
use orchestrator::store::{self, HistoryDecision, HistoryEntry, SagaUpdate, Writer};
use testkit::eventually_within;
use uuid::Uuid;

use crate::helpers::{order, samples, Options, TestSystem};

/// Partitions of `saga.replies` an instance's deadline scanner scans now.
const SCANNED: &str = "saga_deadline_scan_partitions";
/// Overdue sagas an instance's scanner handled, by partition.
const HANDLED: &str = "saga_deadlines_handled_total";
/// Saga writes refused by the row's version, by source.
const REFUSED: &str = "saga_stale_writes_refused_total";

/// Sagas in the test: enough that both of the two partitions get some.
const SAGAS: i64 = 40;

/// The partitions (their labels) an instance handled deadlines of, with how many.
async fn handled(system: &TestSystem, http: &str) -> BTreeMap<String, f64> {
    samples(&system.metrics_of(http).await, HANDLED)
        .into_iter()
        .filter(|(_, count)| *count > 0.0)
        .collect()
}

/// How many sagas have at least `lines` deadline lines in their history written after `since`.
async fn sagas_with_deadlines(
    db: &sqlx::PgPool,
    lines: i64,
    since: chrono::DateTime<chrono::Utc>,
) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT saga_id FROM saga_history
             WHERE decision = 'deadline' AND at > $2
             GROUP BY saga_id HAVING count(*) >= $1) fired",
    )
    .bind(lines)
    .bind(since)
    .fetch_one(db)
    .await
    .expect("count the deadline lines")
}

/// Two orchestrator processes in one group, many sagas whose deadlines fire again and again
/// (no inventory to answer their first step): each instance handles only the deadlines of the
/// `saga.replies` partition its consumer holds (both do work, and no partition's deadlines
/// are handled by both), every deadline is handled once, and when one instance is killed the
/// other takes its partition, and with it those sagas' deadlines, over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_deadlines_by_partition_and_the_survivor_takes_over() {
    let system = TestSystem::start_with(Options {
        without: vec!["orchestrator", "inventory"],
        ..Default::default()
    })
    .await;
    let instance = |id: &'static str| {
        vec![
            ("KAFKA_GROUP_INSTANCE_ID", id),
            ("STEP_TIMEOUT_MS", "300"),
            ("RETRY_MAX_TIMEOUT_MS", "1000"),
            ("STEP_MAX_ATTEMPTS", "1000"),
            ("DEADLINE_SCAN_INTERVAL_MS", "50"),
        ]
    };
    let (mut a, a_http) = system
        .spawn_orchestrator_instance(&instance("orchestrator-a"))
        .await;
    let (mut b, b_http) = system
        .spawn_orchestrator_instance(&instance("orchestrator-b"))
        .await;
    // The test's topics have two partitions: once the group has settled, one each.
    eventually_within(
        Duration::from_secs(30),
        "each instance to scan one of saga.replies' two partitions (saga_deadline_scan_partitions)",
        || async {
            let a = samples(&system.metrics_of(&a_http).await, SCANNED);
            let b = samples(&system.metrics_of(&b_http).await, SCANNED);
            (a.get("") == Some(&1.0) && b.get("") == Some(&1.0)).then_some(())
        },
    )
    .await;

    let db = system.schema("orchestrator").await;
    let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db)
        .await
        .expect("the database's time");
    for _ in 0..SAGAS {
        system.place(&order("alice", "WIDGET", 1, "DE")).await;
    }
    eventually_within(
        Duration::from_secs(60),
        "every saga's deadline to fire three times",
        || async { (sagas_with_deadlines(&db, 3, started).await == SAGAS).then_some(()) },
    )
    .await;

    let by_a = handled(&system, &a_http).await;
    let by_b = handled(&system, &b_http).await;
    assert!(!by_a.is_empty(), "instance a handled no deadline: {by_a:?}");
    assert!(!by_b.is_empty(), "instance b handled no deadline: {by_b:?}");
    let both: Vec<&String> = by_a.keys().filter(|p| by_b.contains_key(*p)).collect();
    assert!(
        both.is_empty(),
        "the deadlines of partitions {both:?} were handled by both instances (a: {by_a:?}, b: \
         {by_b:?})"
    );
    // Each deadline (the time it passed) was handled once.
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT saga_id, detail FROM saga_history WHERE decision = 'deadline'
             GROUP BY saga_id, detail HAVING count(*) > 1) repeated",
    )
    .fetch_one(&db)
    .await
    .expect("count repeated deadlines");
    assert_eq!(twice, 0, "deadlines handled twice");

    // b dies; once its session lapses (6 s) the group gives its partition to a, whose
    // scanner takes those sagas' deadlines over.
    b.kill().await.expect("kill instance b");
    let killed: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db)
        .await
        .expect("the database's time");
    eventually_within(
        Duration::from_secs(60),
        "instance a to handle the deadlines of instance b's partition",
        || async {
            let now = handled(&system, &a_http).await;
            by_b.keys()
                .all(|partition| now.contains_key(partition))
                .then_some(())
        },
    )
    .await;
    eventually_within(
        Duration::from_secs(30),
        "every saga's deadline to fire again after instance b died",
        || async { (sagas_with_deadlines(&db, 2, killed).await == SAGAS).then_some(()) },
    )
    .await;
    assert_eq!(
        samples(&system.metrics_of(&a_http).await, SCANNED).get(""),
        Some(&2.0),
        "instance a scans both partitions"
    );
    a.kill().await.expect("kill instance a");
    db.close().await;
    system.stop().await;
}

/// How many deadline lines the sagas' histories hold.
async fn deadline_lines(db: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM saga_history WHERE decision = 'deadline'")
        .fetch_one(db)
        .await
        .expect("count the deadline lines")
}

/// An orchestrator cut off from the brokers (its broker stopped dead, SIGSTOP) while its
/// database works: once its group session lapses librdkafka revokes its partitions as lost,
/// and its scanner stops scanning their sagas (the group gives them to an instance that can
/// reach the brokers); when the brokers answer again it takes its partitions, and the scan,
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_the_brokers_stops_scanning_until_it_is_back() {
    let broker = crate::helpers::PrivateBroker::start();
    let system = TestSystem::start_with(Options {
        without: vec!["orchestrator", "inventory"],
        brokers: Some(broker.addr.clone()),
        ..Default::default()
    })
    .await;
    let (mut orchestrator, http) = system
        .spawn_orchestrator_instance(&[
            ("KAFKA_BROKERS", broker.addr.as_str()),
            // A dynamic member: a static one whose session lapsed is fenced when it rejoins,
            // which ends the process for its supervisor to restart (ARCHITECTURE.md, "The
            // broker and consumer groups"); this one rejoins in place.
            ("KAFKA_GROUP_INSTANCE_ID", ""),
            ("STEP_TIMEOUT_MS", "300"),
            ("RETRY_MAX_TIMEOUT_MS", "1000"),
            ("STEP_MAX_ATTEMPTS", "1000"),
            ("DEADLINE_SCAN_INTERVAL_MS", "50"),
        ])
        .await;
    let scanned = || async {
        samples(&system.metrics_of(&http).await, SCANNED)
            .get("")
            .copied()
    };
    eventually_within(
        Duration::from_secs(30),
        "the instance to scan both partitions of saga.replies",
        || async { (scanned().await == Some(2.0)).then_some(()) },
    )
    .await;
    let db = system.schema("orchestrator").await;
    for _ in 0..4 {
        system.place(&order("alice", "WIDGET", 1, "DE")).await;
    }
    eventually_within(Duration::from_secs(30), "deadlines to fire", || async {
        (deadline_lines(&db).await >= 8).then_some(())
    })
    .await;

    broker.signal("-STOP");
    // The session lapses after 6 s without an answer from the coordinator.
    eventually_within(
        Duration::from_secs(40),
        "the cut-off instance to scan no partition",
        || async { (scanned().await == Some(0.0)).then_some(()) },
    )
    .await;
    let stopped_at = deadline_lines(&db).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        deadline_lines(&db).await,
        stopped_at,
        "an instance that lost its partitions fired their deadlines"
    );

    broker.signal("-CONT");
    eventually_within(
        Duration::from_secs(60),
        "the instance to take its partitions back",
        || async { (scanned().await == Some(2.0)).then_some(()) },
    )
    .await;
    eventually_within(
        Duration::from_secs(30),
        "deadlines to fire again",
        || async { (deadline_lines(&db).await > stopped_at).then_some(()) },
    )
    .await;
    orchestrator.kill().await.expect("kill the orchestrator");
    db.close().await;
    system.stop().await;
}

/// A write whose saga moved on since the writer read it is refused by the row's version and
/// counted in `saga_stale_writes_refused_total` by who wrote it: one saga through the one-row
/// statement (an operator's action, a deadline), two through the consume loop's set-wise one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_write_its_rows_version_refuses_is_counted_by_source() {
    let system = TestSystem::start().await;
    let mut saga_ids = Vec::new();
    for _ in 0..2 {
        let placed = order("alice", "WIDGET", 1, "DE");
        system.place(&placed).await;
        let saga = system.finished_saga(placed.order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
        saga_ids.push(
            saga["saga_id"]
                .as_str()
                .and_then(|id| id.parse::<Uuid>().ok())
                .expect("the saga's id"),
        );
    }
    let before = samples(&system.get_text("/metrics").await.2, REFUSED);
    let db = system.schema("orchestrator").await;
    let mut sagas = Vec::new();
    for saga_id in &saga_ids {
        sagas.push(
            store::get(&db, *saga_id)
                .await
                .expect("read the saga")
                .expect("the saga"),
        );
    }
    let entry = HistoryEntry {
        at: chrono::Utc::now(),
        message_id: None,
        message_type: "StaleWrite".into(),
        decision: HistoryDecision::Operator,
        detail: Some("a writer that read the saga a version ago".into()),
        state_after: sagas[0].0.state,
    };
    let mut tx = db.begin().await.expect("begin");
    let (first, version) = &sagas[0];
    // The write carries a message in its statement: a refused write queues none of it.
    let mut outbox = Outbox::default();
    outbox.push(OutgoingMessage::new(
        "stale.writes",
        "k",
        b"never sent".to_vec(),
    ));
    let refused = store::update_saga(
        &mut tx,
        first,
        version - 1,
        &entry,
        Writer::Operator,
        &mut outbox,
    )
    .await;
    assert!(
        matches!(refused, Err(orchestrator::Error::VersionConflict { .. })),
        "{refused:?}"
    );
    let queued: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = 'stale.writes'")
            .fetch_one(&mut *tx)
            .await
            .expect("count the outbox");
    assert_eq!(queued, 0, "a refused write queued its message");
    tx.rollback().await.expect("rollback");

    // The consume loop's statement: one of the two read at its version, one a version ago.
    let mut tx = db.begin().await.expect("begin");
    let (second, second_version) = &sagas[1];
    let updates = [
        SagaUpdate {
            saga: first,
            expected_version: *version,
            new_version: version + 1,
        },
        SagaUpdate {
            saga: second,
            expected_version: second_version - 1,
            new_version: *second_version,
        },
    ];
    let refused = store::save_transitions(
        &mut tx,
        &updates,
        &[],
        Writer::Consume,
        &mut Outbox::default(),
    )
    .await;
    assert!(
        matches!(refused, Err(orchestrator::Error::VersionConflict { .. })),
        "{refused:?}"
    );
    tx.rollback().await.expect("rollback");

    let after = samples(&system.get_text("/metrics").await.2, REFUSED);
    let count = |samples: &BTreeMap<String, f64>, source: &str| {
        samples
            .get(&format!("source=\"{source}\""))
            .copied()
            .unwrap_or_default()
    };
    assert_eq!(
        count(&after, "operator") - count(&before, "operator"),
        1.0,
        "{after:?}"
    );
    assert_eq!(
        count(&after, "consume") - count(&before, "consume"),
        1.0,
        "{after:?}"
    );
    // Nothing was written: both sagas are as they were.
    for (saga_id, (_, version)) in saga_ids.iter().zip(&sagas) {
        let (_, now) = store::get(&db, *saga_id)
            .await
            .expect("read the saga")
            .expect("the saga");
        assert_eq!(now, *version, "saga {saga_id} was written");
    }
    db.close().await;
    system.stop().await;
}
