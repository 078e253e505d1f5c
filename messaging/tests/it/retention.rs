//! Retention sweeps run in one instance of a service at a time (`retention::Lease`), and move
//! to another instance when that one stops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use messaging::config::{DatabaseConfig, FaultConfig, RelayConfig, RetentionConfig, ServiceConfig};
use messaging::service::Service;
use testkit::{eventually, TestDatabase};
use tokio_util::sync::CancellationToken;

/// One instance of the service `sweeper` on `database`, sweeping every 50 ms with a sweep
/// that only counts its runs in `runs`. Returns its shutdown token and its task.
async fn instance(
    database: &TestDatabase,
    runs: Arc<AtomicU64>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), messaging::Error>>,
) {
    let config = ServiceConfig {
        kafka: testkit::kafka_config("sweeper-unused.".into(), 1),
        database: DatabaseConfig {
            database_max_connections: 2,
            ..DatabaseConfig::to(database.url())
        },
        relay: RelayConfig::default(),
        retention: RetentionConfig {
            retention_sweep_interval_ms: 50,
            ..RetentionConfig::default()
        },
        faults: FaultConfig::default(),
    };
    let shutdown = CancellationToken::new();
    let mut service = Service::<messaging::Error>::open("sweeper", &config, &[], shutdown.clone())
        .await
        .expect("open the service");
    service.sweep("test sweep", move |_pool| {
        let runs = Arc::clone(&runs);
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(0)
        }
    });
    (shutdown, tokio::spawn(service.run()))
}

/// Two instances of one service, each with the same sweep every 50 ms: only one of them sweeps
/// (the other's sweep never runs) while both are up, and when that one stops the other sweeps
/// from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_runs_in_one_instance_at_a_time_and_moves_when_it_stops() {
    // Dropped when the test ends, passed or not.
    let database = TestDatabase::create("sweep_lease").await;
    let runs = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let first = instance(&database, Arc::clone(&runs[0])).await;
    let second = instance(&database, Arc::clone(&runs[1])).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counted = [
        runs[0].load(Ordering::SeqCst),
        runs[1].load(Ordering::SeqCst),
    ];
    // About 40 rounds each in 2 s: the holder swept in (nearly) all of its own.
    assert!(
        counted.iter().any(|&n| n >= 10),
        "nobody swept regularly: {counted:?}"
    );
    assert!(
        counted.contains(&0),
        "both instances swept the same tables: {counted:?} sweeps"
    );
    let (holder, (stop_holder, holder_task), other, (stop_other, other_task)) = if counted[0] > 0 {
        (0, first, 1, second)
    } else {
        (1, second, 0, first)
    };
    stop_holder.cancel();
    holder_task
        .await
        .expect("the task")
        .expect("the holder stops cleanly");
    let stopped_at = runs[holder].load(Ordering::SeqCst);
    // It gave the lease back: the other takes the sweep over at its next round, long before
    // the lease (10 s at least) would have lapsed.
    tokio::time::timeout(
        Duration::from_secs(5),
        eventually("the other instance to sweep", || async {
            (runs[other].load(Ordering::SeqCst) >= 5).then_some(())
        }),
    )
    .await
    .expect("the other instance took the sweep over within 5 s");
    assert_eq!(
        runs[holder].load(Ordering::SeqCst),
        stopped_at,
        "a stopped instance swept"
    );
    stop_other.cancel();
    other_task
        .await
        .expect("the task")
        .expect("the other stops cleanly");
}
