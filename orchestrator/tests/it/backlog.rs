//! A participant that is behind is not one that is gone: deadlines that pass while it works
//! through a backlog wait for it instead of queueing copies of their commands behind the
//! first (`orchestrator/src/backlog.rs`).

use std::convert::Infallible;
use std::time::Duration;

use orchestrator::config::RetryConfig;
use participant_sdk::{Participant, Request, Step, StepError};
use serde::de::IgnoredAny;
use sqlx::migrate::Migrator;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::helpers::{eventually, order, Options, TestSystem};

static NO_TABLES: Migrator = sqlx::migrate!("tests/it/slow");

/// How long the slow inventory takes per reservation.
const PER_RESERVATION: Duration = Duration::from_millis(50);

/// An inventory that reserves everything, slowly: a participant with a backlog.
struct SlowReservations;

impl Step for SlowReservations {
    const STEP: &'static str = "reserve_stock";
    type Forward = IgnoredAny;
    type Compensation = IgnoredAny;
    type Failure = Infallible;

    async fn forward_all(
        &self,
        _tx: &mut PgConnection,
        requests: &[Request<'_, IgnoredAny>],
    ) -> Result<Vec<Result<(), Infallible>>, StepError> {
        let count = u32::try_from(requests.len()).unwrap_or(u32::MAX);
        tokio::time::sleep(PER_RESERVATION * count).await;
        Ok(requests.iter().map(|_| Ok(())).collect())
    }

    async fn compensate(
        &self,
        _tx: &mut PgConnection,
        _request: Request<'_, IgnoredAny>,
    ) -> Result<Result<(), Infallible>, StepError> {
        Ok(Ok(()))
    }
}

/// The forward attempts the orchestrator made of `reserve_stock` for the sagas of `orders`.
async fn reservation_attempts(system: &TestSystem, orders: &[Uuid]) -> i64 {
    let keys: Vec<String> = orders.iter().map(Uuid::to_string).collect();
    let pool = system.schema("orchestrator").await;
    sqlx::query_scalar(
        "SELECT coalesce(sum((step->>'attempts')::bigint), 0)::bigint \
         FROM sagas, jsonb_array_elements(steps) AS step \
         WHERE saga_key = ANY($1) AND step->>'name' = 'reserve_stock'",
    )
    .bind(&keys)
    .fetch_one(&pool)
    .await
    .expect("count the attempts")
}

async fn place_all(system: &TestSystem, count: usize) -> Vec<Uuid> {
    let mut placed = Vec::with_capacity(count);
    for _ in 0..count {
        let order = order("alice", "WIDGET", 1, "DE");
        system.place(&order).await;
        placed.push(order.order_id);
    }
    placed
}

async fn all_completed(system: &TestSystem, orders: &[Uuid]) {
    for order_id in orders {
        let saga = system.finished_saga(*order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_wait_for_a_participant_working_through_a_backlog() {
    // A 2 s first wait, doubling to 4 s; the slow inventory needs 10 s for the 200 orders.
    let mut system = TestSystem::start_with(Options {
        retries: RetryConfig {
            step_timeout_ms: Some(2_000),
            retry_max_timeout_ms: Some(4_000),
            step_max_attempts: Some(100),
            deadline_scan_interval_ms: 50,
            ..RetryConfig::default()
        },
        without: vec!["inventory"],
        ..Options::default()
    })
    .await;
    let slow_inventory = || Participant::new("inventory", &NO_TABLES).step(SlowReservations);

    // A few sagas whose deadlines pass while the inventory is away: their commands are sent
    // again (nothing moves: the participant may be gone), and the orchestrator starts reading
    // the inventory's progress. Then it comes, and catches up.
    let early = place_all(&system, 5).await;
    eventually("a deadline passed while the inventory was away", || async {
        (reservation_attempts(&system, &early).await > 5).then_some(())
    })
    .await;
    system.start_custom_participant_configured(slow_inventory(), |config| {
        config.service.kafka.consumer_batch_max = 4;
    });
    all_completed(&system, &early).await;

    // The backlog: 200 orders at once, 10 s of work at the inventory, while every deadline
    // after the 40th saga passes before the inventory reaches its command.
    let backlog = place_all(&system, 200).await;
    all_completed(&system, &backlog).await;
    let attempts = reservation_attempts(&system, &backlog).await;
    // Each re-send would be one more record for the inventory to get through: without the
    // backlog reading, this run made hundreds.
    assert!(
        attempts <= 210,
        "{attempts} reservation attempts for 200 sagas: deadlines sent commands again while \
         the inventory was working towards them"
    );
    let metrics = system.metrics_of(&system.http).await;
    let postponed = metrics
        .lines()
        .find_map(|line| line.strip_prefix("saga_deadlines_postponed_total "))
        .and_then(|n| n.trim().parse::<f64>().ok())
        .unwrap_or_default();
    assert!(postponed >= 100.0, "postponed {postponed}:\n{metrics}");
    system.stop().await;
}
