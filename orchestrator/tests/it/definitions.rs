//! Saga definitions as data: versions that running sagas keep across an upgrade, and a start
//! refused when a definition is invalid or a stored version was changed.

use std::path::{Path, PathBuf};

use events::OrderPlaced;
use participant_sdk::Participant;
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{eventually, order, participants_of, step_statuses, Options, TestSystem};

const ORDER_SAGA: &str = include_str!("../../../sagas/order.toml");

/// A folder of its own holding `files` (name, text), for `SAGAS_DIR`.
fn definitions_folder(files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sagas-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create the definitions folder");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write a definition");
    }
    dir
}

/// Version 2 of the order saga: it charges the payment before it reserves the stock.
fn order_saga_v2() -> String {
    let v1 = ORDER_SAGA.replacen("version = 1", "version = 2", 1);
    let start = v1.find("[[steps]]").expect("steps");
    let (head, steps) = v1.split_at(start);
    let parts: Vec<&str> = steps
        .split("[[steps]]")
        .filter(|s| !s.trim().is_empty())
        .collect();
    let [reserve, charge, ship] = parts[..] else {
        panic!("the order saga has three steps")
    };
    format!("{head}[[steps]]{charge}[[steps]]{reserve}[[steps]]{ship}")
}

fn steps_of(saga: &Value) -> Vec<String> {
    saga["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn dir_text(dir: &Path) -> &str {
    dir.to_str().expect("a UTF-8 temp path")
}

/// A deployment whose orchestrator (a process) ran `sagas/order.toml` (v1) with the payment
/// service down until every order of `v1_orders` waited on `charge_payment`, was killed, and
/// now runs the definition `v2` alone (v1's file is gone); `before_restart` starts what v2
/// needs first. Payment is back. Returns the deployment, the new orchestrator and the two
/// definition folders.
async fn upgraded_with_sagas_in_flight(
    v1_orders: &[OrderPlaced],
    v2: &str,
    before_restart: impl FnOnce(&mut TestSystem),
) -> (TestSystem, tokio::process::Child, [PathBuf; 2]) {
    let mut system = TestSystem::start_with(Options {
        without: vec!["orchestrator", "payment"],
        ..Options::default()
    })
    .await;
    let v1 = definitions_folder(&[("order.toml", ORDER_SAGA)]);
    let mut before = system
        .spawn_orchestrator_process(&[("SAGAS_DIR", dir_text(&v1))])
        .await;
    for placed in v1_orders {
        system.place(placed).await;
        let saga_id = system.saga_id_of(placed.order_id).await;
        eventually("the v1 saga to wait on charge_payment", || async {
            let (_, saga) = system.get(&format!("/sagas/{saga_id}")).await;
            (saga["current_step"] == "charge_payment").then_some(())
        })
        .await;
    }
    before.kill().await.expect("stop the v1 orchestrator");
    let v2 = definitions_folder(&[("order.toml", v2)]);
    before_restart(&mut system);
    let after = system
        .spawn_orchestrator_process(&[("SAGAS_DIR", dir_text(&v2))])
        .await;
    system.start_participant("payment", 0);
    (system, after, [v1, v2])
}

/// Waits for `placed`'s saga to end and checks its state, definition version, steps and their
/// statuses.
async fn assert_finished(
    system: &TestSystem,
    placed: &OrderPlaced,
    state: &str,
    version: i64,
    steps: &[&str],
    statuses: &[&str],
) {
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], state, "{saga}");
    assert_eq!(
        (
            saga["definition_name"].as_str(),
            saga["definition_version"].as_i64()
        ),
        (Some("order"), Some(version)),
        "{saga}"
    );
    assert_eq!(steps_of(&saga), steps, "{saga}");
    assert_eq!(step_statuses(&saga), statuses, "{saga}");
}

const V1_STEPS: [&str; 3] = ["reserve_stock", "charge_payment", "schedule_shipment"];

/// The rolling upgrade: sagas started on v1 wait on the payment service while the
/// orchestrator stops; v2 (another step order) is deployed with v1's file gone; the restarted
/// orchestrator finishes the v1 sagas on v1 (one completes, one compensates the stock v1
/// reserved first), and starts new sagas on v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_finish_on_the_version_they_started_on_across_an_upgrade() {
    // alice can pay; carol cannot (5.00 EUR for a 10.00 EUR order).
    let v1_orders = [
        order("alice", "WIDGET", 1, "DE"),
        order("carol", "WIDGET", 1, "DE"),
    ];
    let (system, _orchestrator, dirs) =
        upgraded_with_sagas_in_flight(&v1_orders, &order_saga_v2(), |_| {}).await;
    let [paid, declined] = &v1_orders;
    let done = ["succeeded"; 3];
    assert_finished(&system, paid, "completed", 1, &V1_STEPS, &done).await;
    let undone = ["compensated", "failed", "pending"];
    assert_finished(&system, declined, "compensated", 1, &V1_STEPS, &undone).await;

    // New sagas run v2: payment first, so a declined payment leaves no stock to release.
    let paid = order("alice", "WIDGET", 1, "DE");
    let declined = order("carol", "WIDGET", 1, "DE");
    system.place(&paid).await;
    system.place(&declined).await;
    let v2_steps = ["charge_payment", "reserve_stock", "schedule_shipment"];
    assert_finished(&system, &paid, "completed", 2, &v2_steps, &done).await;
    let undone = ["failed", "pending", "pending"];
    assert_finished(&system, &declined, "compensated", 2, &v2_steps, &undone).await;

    // Both versions are listed; v2 is the one new sagas start on.
    let (status, body) = system.get("/definitions").await;
    assert_eq!(status, 200, "{body}");
    let listed: Vec<(i64, bool)> = body["definitions"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|d| d["name"] == "order")
                .map(|d| (d["version"].as_i64().unwrap_or(0), d["newest"] == true))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(listed, [(1, false), (2, true)], "{body}");
    assert_eq!(body["definitions"][1]["steps"][0]["name"], "charge_payment");
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    system.stop().await;
}

/// The walkthrough "Add a step" (README.md), as a rolling upgrade: order sagas started on v1
/// wait on the payment service while the orchestrator stops; v2 inserts `loyalty_points` (a
/// new participant written with the SDK, `loyalty.rs`) before the shipment; the loyalty
/// participant starts and the orchestrator restarts on v2. The v1 sagas finish on v1's three
/// steps (one completes, one compensates, one is compensated by its shipment) and award no
/// points; new sagas run v2's four steps: the points are awarded, and taken back when the
/// shipment is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_inserted_by_a_new_version_runs_for_new_sagas_only() {
    // alice can pay; carol cannot; AQ is on the shipping deny-list.
    let v1_orders = [
        order("alice", "WIDGET", 1, "DE"),
        order("carol", "WIDGET", 1, "DE"),
        order("alice", "WIDGET", 1, "AQ"),
    ];
    let (system, _orchestrator, dirs) =
        upgraded_with_sagas_in_flight(&v1_orders, include_str!("loyalty/order.toml"), |system| {
            system.start_custom_participant(crate::loyalty::participant());
        })
        .await;
    let [paid, declined, rejected] = &v1_orders;
    assert_finished(&system, paid, "completed", 1, &V1_STEPS, &["succeeded"; 3]).await;
    let undone = ["compensated", "failed", "pending"];
    assert_finished(&system, declined, "compensated", 1, &V1_STEPS, &undone).await;
    let undone = ["compensated", "compensated", "failed"];
    assert_finished(&system, rejected, "compensated", 1, &V1_STEPS, &undone).await;
    assert_eq!(points(&system).await, 0, "no v1 saga awards points");

    let v2_steps = [
        "reserve_stock",
        "charge_payment",
        "loyalty_points",
        "schedule_shipment",
    ];
    let happy = order("alice", "WIDGET", 1, "DE");
    system.place(&happy).await;
    assert_finished(
        &system,
        &happy,
        "completed",
        2,
        &v2_steps,
        &["succeeded"; 4],
    )
    .await;
    assert_eq!(points(&system).await, happy.total_cents, "a point per cent");

    let rejected = order("alice", "WIDGET", 1, "AQ");
    system.place(&rejected).await;
    let undone = ["compensated", "compensated", "compensated", "failed"];
    assert_finished(&system, &rejected, "compensated", 2, &v2_steps, &undone).await;
    assert_eq!(
        points(&system).await,
        happy.total_cents,
        "the rejected order's points are gone"
    );
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    system.stop().await;
}

/// Every point the loyalty participant holds.
async fn points(system: &TestSystem) -> i64 {
    let pool = system.schema("loyalty").await;
    let total: Option<i64> = sqlx::query_scalar("SELECT sum(points)::bigint FROM points_awarded")
        .fetch_one(&pool)
        .await
        .expect("read the points");
    total.unwrap_or(0)
}

/// A definition file that breaks a rule stops the start with the file and field; so does a
/// file that changes a stored version without raising it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_silently_changed_definition_stops_the_start() {
    let mut system = TestSystem::start_with(Options {
        without: participants_of("order")
            .iter()
            .map(Participant::name)
            .collect(),
        ..Options::default()
    })
    .await;
    // The in-process orchestrator stored the repository's order saga, version 1.
    let (status, body) = system.get("/definitions").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["definitions"][0]["version"], 1, "{body}");

    for (change, expected) in [
        (
            ("timeout_ms = 30_000", "timeout_ms = 0"),
            "order.toml: steps[0].forward.retry.timeout_ms: must be at least 1 ms",
        ),
        (
            ("max_attempts = 8", "max_attempts = 9"),
            "saga order version 1 is stored with other content",
        ),
    ] {
        let (from, to) = change;
        let dir = definitions_folder(&[("order.toml", &ORDER_SAGA.replacen(from, to, 1))]);
        let (ok, text) = system
            .orchestrator_process_output(&[("SAGAS_DIR", dir_text(&dir))])
            .await;
        assert!(!ok && text.contains(expected), "{to}: {text}");
        let _ = std::fs::remove_dir_all(dir);
    }
    // The same content with other comments and layout is the same version: it starts.
    let recommented = ORDER_SAGA.replace("# ", "#  ").replace(" = ", "   =   ");
    let same = definitions_folder(&[("order.toml", &recommented)]);
    let mut started = system
        .spawn_orchestrator_process(&[("SAGAS_DIR", dir_text(&same))])
        .await;
    started.kill().await.expect("stop it");
    let _ = std::fs::remove_dir_all(same);
    system.stop().await;
}

/// Orchestrators starting together against a fresh database each register the definitions
/// (`saga_definitions`) at once: one inserts each version, the others must read back what it
/// stored, never fail because their statement's snapshot predates its commit. Two start-ups
/// side by side, each on a fresh schema, 20 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrators_starting_together_on_a_fresh_database_all_start() {
    use messaging::config::DatabaseConfig;
    use orchestrator::catalog::Catalog;
    use orchestrator::config::RetryConfig;

    let system = TestSystem::start_with(Options {
        without: vec!["orchestrator", "inventory", "payment", "shipping"],
        ..Options::default()
    })
    .await;
    let open = |schema: String| {
        let database = DatabaseConfig {
            database_url: system.database_url().to_owned(),
            database_schema: Some(schema),
            database_max_connections: 1,
            ..DatabaseConfig::to("")
        };
        async move {
            messaging::db::open(
                &database,
                orchestrator::DEFAULT_SCHEMA,
                &[&orchestrator::store::MIGRATIONS],
            )
            .await
            .expect("open and migrate the schema")
            .0
        }
    };
    let load = |pool: sqlx::PgPool| async move {
        let loaded = Catalog::load(&pool, &crate::helpers::sagas_dir(), RetryConfig::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        pool.close().await;
        loaded
    };
    for round in 0..20 {
        let schema = format!("orchestrator_round_{round}");
        // Both past their migrations (which sqlx serialises), so that their registrations
        // meet, as two start-ups' do whenever the schema is already migrated.
        let (a, b) = tokio::join!(open(schema.clone()), open(schema));
        let (first, second) = tokio::join!(load(a), load(b));
        assert!(
            first.is_ok() && second.is_ok(),
            "round {round}: both start: {first:?}, {second:?}"
        );
    }
    system.stop().await;
}
