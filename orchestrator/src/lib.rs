//! The saga orchestrator.
//!
//! - [`saga`]: the saga core (the `saga-core` crate, re-exported under its old path):
//!   definitions (data), the registry of their versions and the pure state machine.
//! - [`catalog`]: the definitions this orchestrator runs, from the files and PostgreSQL.
//! - [`handler`]: turns Kafka records into state machine calls, inside one transaction.
//! - [`deadlines`]: re-sends or gives up on commands whose reply is overdue.
//! - [`store`]: the SQL of the saga tables.
//! - [`api`]: the status HTTP API, the web page and `/metrics`.
//! - [`metrics`]: saga counters and histograms, derived from each committed transition.
//! - [`run`]: wires them to Kafka, PostgreSQL and an HTTP listener until shutdown.

pub mod api;
pub mod auth;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod deadlines;
mod error;
pub mod handler;
pub mod metrics;
pub mod store;

pub use saga_core as saga;

use std::sync::Arc;

use events::Topics;
use messaging::consumer::DeadLetters;
use messaging::pipeline::Pipeline;
use messaging::{db, kafka};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{Error, Result};

/// The schema the orchestrator uses unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "orchestrator";

/// How long an API request waits for one of the API pool's connections before it is answered
/// 503: a flood of readers queues briefly, then is turned away, and never reaches the message
/// path's pool.
const API_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// How often the watch feed looks for changes to watched sagas.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs the orchestrator until `shutdown` is cancelled: migrates its schema, creates missing
/// topics, consumes orders and replies, relays its outbox and serves HTTP on `listener`.
///
/// # Errors
/// Start-up failures (database, migrations, Kafka configuration) and a failed HTTP server.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    // Checked first: a service without its tokens must not start at all.
    let gate = config.api.gate(config.http_addr)?;
    config.api.check_limits(config.order_dedup_retention_secs)?;
    let limits = config.api.server_limits();
    let ops_listener = match config.api.ops_http_addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let (pool, schema) = db::open(&config.database, DEFAULT_SCHEMA, &[&store::MIGRATIONS]).await?;
    let api_pool = db::side_pool(
        &config.database.database_url,
        &schema,
        config.api.api_database_connections,
        API_ACQUIRE_TIMEOUT,
    )?;
    let topics = Topics::new(config.kafka.topic_prefix.clone());
    let clock = clock::Clock::skewed(config.fault_clock_skew_secs);
    let catalog =
        Arc::new(catalog::Catalog::load(&pool, &config.sagas_dir, config.retries.clone()).await?);
    // The definitions name the topics: their triggers (consumed here) and the participants'
    // command topics (written here); the engine's own come from `Topics`.
    let (trigger_topics, command_topics) = catalog.topics();
    let mut consumed_topics: Vec<String> = trigger_topics.iter().map(|t| topics.named(t)).collect();
    consumed_topics.push(topics.replies());
    let mut all_topics = topics.engine();
    all_topics.extend(
        trigger_topics
            .iter()
            .chain(&command_topics)
            .map(|t| topics.named(t)),
    );
    kafka::ensure_topics(&config.kafka, &all_topics).await?;

    let metrics = messaging::metrics::Metrics::install();
    metrics::describe();
    api::describe_metrics();
    let health = messaging::health::Health::default();
    let watch = Arc::new(api::watch::WatchFeed::new(
        api_pool.clone(),
        config.api.watch_limits(),
        WATCH_INTERVAL,
    ));
    let guard = Arc::new(api::guard::Guard::new(gate, &config.api, config.http_addr));
    // Ends with the shutdown; it never fails (a bad file is reported and the old list kept).
    if let (Some(path), every @ 1..) =
        (&config.api.api_tokens_file, config.api.api_tokens_reload_ms)
    {
        tokio::spawn(api::guard::reload_tokens(
            guard.clone(),
            path.clone(),
            std::time::Duration::from_millis(every),
            shutdown.clone(),
        ));
    }
    let state = api::AppState {
        pool: api_pool.clone(),
        orders: Arc::new(api::publisher::OrderPublisher::new(
            &config.kafka,
            &config.faults,
            std::time::Duration::from_millis(config.api.order_publish_timeout_ms),
        )?),
        topics: topics.clone(),
        catalog: catalog.clone(),
        metrics,
        health: health.clone(),
        shutdown: shutdown.clone(),
        guard: guard.clone(),
        watch: watch.clone(),
        stats: Arc::default(),
        request_timeout: limits.request_timeout,
    };
    let watch_feed = tokio::spawn(watch.run(shutdown.clone()));
    let scanner = tokio::spawn(
        deadlines::DeadlineScanner {
            pool: pool.clone(),
            topics: topics.clone(),
            catalog: catalog.clone(),
            interval: config.retries.scan_interval(),
            clock,
            health: health.clone(),
        }
        .run(shutdown.clone()),
    );
    let retention = {
        let pool = pool.clone();
        let retention_secs = config.saga_retention_secs;
        let failed_secs = config.failed_saga_retention_secs;
        let dedup_secs = config.order_dedup_retention_secs;
        let keys_secs = config.api.idempotency_key_retention_secs;
        tokio::spawn(messaging::retention::every(
            "saga retention",
            config.retention.sweep_interval(),
            shutdown.clone(),
            move || {
                let pool = pool.clone();
                async move {
                    let batch = messaging::retention::SWEEP_BATCH;
                    let sagas =
                        store::sweep_finished(&pool, retention_secs, failed_secs, batch).await?;
                    let keys = store::sweep_saga_dedup(&pool, dedup_secs, batch).await?;
                    let idempotency = api::idempotency::sweep(&pool, keys_secs, batch).await?;
                    Ok(sagas + keys + idempotency)
                }
            },
        ))
    };
    let pipeline = Pipeline {
        kafka: config.kafka.clone(),
        relay: config.relay.clone(),
        retention: config.retention.clone(),
        schema,
        group: config
            .group
            .clone()
            .unwrap_or_else(|| format!("{}orchestrator", topics.prefix())),
        topics: consumed_topics,
        dead_letters: DeadLetters {
            topic: topics.dead_letters(),
            consumer: "orchestrator".into(),
        },
        faults: config.faults.clone(),
        health,
    };
    let ops = match ops_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "health and metrics listening");
            // A server of its own, with its own connection cap: probes still get through while
            // the API's connections are all taken.
            Some(api::server::serve(
                "ops",
                listener,
                api::ops_router(state.clone()),
                limits,
                shutdown.clone(),
            ))
        }
        None => None,
    };
    tracing::info!(addr = %listener.local_addr()?, "status API listening");
    let http = api::server::serve(
        "api",
        listener,
        api::router(state),
        limits,
        shutdown.clone(),
    );
    // Whichever part ends first (a failure, or shutdown) stops the others: no process that
    // serves a green /healthz while its consumer, relay or deadline scanner is gone.
    let (consumed, served, ops_served, scanned, swept, fed) = tokio::join!(
        async {
            let consumed = pipeline
                .run(
                    pool.clone(),
                    handler::OrchestratorHandler::new(topics, catalog),
                    shutdown.clone(),
                )
                .await;
            shutdown.cancel();
            consumed
        },
        async {
            let served = http.await.map_err(Error::Http);
            shutdown.cancel();
            served
        },
        async {
            let Some(ops) = ops else { return Ok(()) };
            let served = ops.await.map_err(Error::Http);
            shutdown.cancel();
            served
        },
        supervise("deadline scanner", scanner, &shutdown),
        supervise("saga retention", retention, &shutdown),
        supervise("watch feed", watch_feed, &shutdown),
    );
    api_pool.close().await;
    pool.close().await;
    consumed?;
    scanned?;
    swept?;
    fed?;
    ops_served?;
    served
}

/// Waits for a task that should run until shutdown; if it ends before (a panic), stops the
/// process with the reason.
async fn supervise(
    name: &str,
    task: tokio::task::JoinHandle<()>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let ended = task.await;
    if shutdown.is_cancelled() && ended.is_ok() {
        return Ok(());
    }
    shutdown.cancel();
    let reason = match ended {
        Err(e) => format!("{name} failed: {e}"),
        Ok(()) => format!("{name} stopped on its own"),
    };
    tracing::error!(%reason, "stopping");
    Err(Error::Messaging(messaging::Error::TaskEnded(reason)))
}
