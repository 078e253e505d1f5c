//! The end of a chaos run's faults: waiting for every saga to settle and for the garbage to
//! reach the dead-letter topic, then stopping the fleet.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use super::args::ChaosArgs;
use super::faults::FaultLog;
use super::fleet::Fleet;
use super::garbage::DeadLetterReader;
use super::setup::{Databases, Setup};

/// How the run ended.
pub(super) struct Settled {
    /// Whether every saga the workload started finished before the deadline.
    pub(super) settled: bool,
    /// From the last fault until then.
    pub(super) time: Duration,
    /// Processes that died by themselves meanwhile (injected crashes), restarted.
    pub(super) crashes: u32,
    /// The dead-letter topic as far as it was read (with garbage).
    pub(super) dead_letters: Option<DeadLetterReader>,
    /// Which services listen for outbox notifications (after PostgreSQL restarts).
    pub(super) listening: Option<Listening>,
}

/// The outbox relays that listen for notifications at the end of the run.
pub(super) struct Listening {
    /// How many sessions of the run's databases LISTEN.
    pub(super) count: i64,
    /// In a network run, the instances none of them comes from.
    pub(super) silent: Vec<String>,
}

/// Waits, at most --settle-timeout-secs from now, until every saga of `saga_keys` has
/// finished, restarting what crashes meanwhile, and then for the garbage's copies.
pub(super) async fn settle(
    args: &ChaosArgs,
    setup: &Setup,
    db: &Databases,
    fleet: &mut Fleet,
    saga_keys: &[Uuid],
    faults: &FaultLog,
) -> anyhow::Result<Settled> {
    let last_kill = Instant::now();
    let settle_deadline = last_kill + Duration::from_secs(args.settle_timeout_secs);
    let mut database_down = false;
    let mut crashes = 0;
    let settled = loop {
        crashes += fleet.revive().await?;
        // The run's own pool rides out a PostgreSQL restart like the services do.
        match settle_progress(db.orchestrator(), saga_keys).await {
            Ok((sagas, unfinished)) => {
                database_down = false;
                if sagas >= i64::try_from(saga_keys.len())? && unfinished == 0 {
                    break true;
                }
                if Instant::now() > settle_deadline {
                    eprintln!(
                        "not settled: {sagas} orders and returns have a saga, {unfinished} sagas unfinished"
                    );
                    break false;
                }
            }
            Err(e) => {
                if !database_down {
                    eprintln!("database unavailable ({e}); retrying");
                }
                database_down = true;
                if Instant::now() > settle_deadline {
                    break false;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let time = last_kill.elapsed();
    // The garbage's copies may trail the sagas (a participant's topic can lag behind): wait for
    // every one to reach the dead-letter topic, at most until the settle deadline.
    let dead_letters = match &faults.garbage {
        Some(log) => {
            let mut reader = DeadLetterReader::new(&args.kafka, setup.topics.dead_letters())?;
            loop {
                if let Err(e) =
                    tokio::task::block_in_place(|| reader.read_to_end(Duration::from_secs(30)))
                {
                    eprintln!("reading the dead-letter topic: {e}");
                }
                if reader.holds_all(log) {
                    break;
                }
                if Instant::now() > settle_deadline {
                    eprintln!("not every garbage record reached the dead-letter topic in time");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(reader)
        }
        None => None,
    };
    // After PostgreSQL restarts, every service's outbox relay must be listening for NOTIFY
    // again (one that polls instead adds up to the poll interval to every hop).
    let listening = if faults.postgres.lengths.is_empty() {
        None
    } else {
        Some(relays_listening(db, fleet).await)
    };
    Ok(Settled {
        settled,
        time,
        crashes,
        dead_letters,
        listening,
    })
}

/// Stops the fleet once the relays had a moment to drain the last events, and waits until
/// PostgreSQL answers (every database of the run), so that the books can be checked.
pub(super) async fn stop(fleet: &mut Fleet, db: &Databases) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.stop_all().await;
    for pool in db.each() {
        wait_for_database(pool).await?;
    }
    Ok(())
}

/// How many of `order_ids` have a saga, and how many sagas are not finished.
async fn settle_progress(db: &PgPool, order_ids: &[Uuid]) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE saga_key = ANY($1::uuid[]::text[])), \
                count(*) FILTER (WHERE state NOT IN ('completed', 'compensated', 'failed')) \
         FROM orchestrator.sagas",
    )
    .bind(order_ids)
    .fetch_one(db)
    .await
}

/// The connections of the run's databases that LISTEN for outbox notifications (one per
/// service instance, in the database its service uses), once there are as many as instances
/// or after 10 s.
async fn relays_listening(db: &Databases, fleet: &Fleet) -> Listening {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut from: Vec<String> = Vec::new();
        for pool in db.each() {
            let listening: Vec<String> = sqlx::query_scalar(
                "SELECT coalesce(host(client_addr), 'local') FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'LISTEN %'",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            from.extend(listening);
        }
        if from.len() >= fleet.len() || Instant::now() > deadline {
            return Listening {
                count: i64::try_from(from.len()).unwrap_or(i64::MAX),
                silent: fleet.not_from(&from),
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until PostgreSQL answers again (after a restart it may still be starting).
async fn wait_for_database(db: &PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match sqlx::query("SELECT 1").execute(db).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("PostgreSQL did not come back")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
