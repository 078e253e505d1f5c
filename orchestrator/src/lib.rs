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
pub mod backlog;
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
use messaging::service::Service;
use messaging::{db, kafka};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{CorruptColumn, Error, Result};

/// The schema the orchestrator uses unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "orchestrator";

/// How long an API request waits for one of the API pool's connections before it is answered
/// 503: a flood of readers queues briefly, then is turned away, and never reaches the message
/// path's pool.
const API_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// How often the watch feed looks for changes to watched sagas.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs the orchestrator until `shutdown` is cancelled: migrates its schema, creates missing
/// topics, consumes orders and replies, relays its outbox and serves HTTP on `listener`. Its
/// parts run under one supervisor ([`messaging::service`]): whichever fails first stops the
/// others, so no process serves a green `/healthz` while its consumer, relay or deadline
/// scanner is gone, and its error is the one returned.
///
/// # Errors
/// Start-up failures (database, migrations, Kafka configuration) and the first part that
/// failed (the pipeline, an HTTP server, a background task).
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    // Checked first: a service without its tokens must not start at all.
    let gate = config.api.gate(config.http_addr)?;
    config.api.check_limits(config.order_dedup_retention_secs)?;
    // And one that would serve tokens in the clear, or whose certificate cannot be used.
    let tls = match config.api.tls_files(config.http_addr)? {
        Some(files) => Some(Arc::new(api::tls::Tls::load(files)?)),
        None => None,
    };
    let ops_listener = match config.api.ops_http_addr {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let mut service = Service::open(
        DEFAULT_SCHEMA,
        &config.service,
        &[&store::MIGRATIONS],
        shutdown,
    )
    .await?;
    let api_pool = db::side_pool(
        &config.service.database.database_url,
        service.schema(),
        config.api.api_database_connections,
        (API_ACQUIRE_TIMEOUT, config.service.database.call_timeout()),
    )?;
    let topics = Topics::new(config.service.kafka.topic_prefix.clone());
    let catalog = Arc::new(
        catalog::Catalog::load(service.pool(), &config.sagas_dir, config.retries.clone()).await?,
    );
    let consumed_topics = ensure_topics(&config, &topics, &catalog).await?;

    let state = app_state(&config, gate, api_pool.clone(), &topics, &catalog, &service)?;
    let pipeline = service.pipeline(
        config.group.as_deref(),
        consumed_topics,
        topics.dead_letters(),
    );
    run_background(&mut service, &config, &state, &pipeline, tls.as_ref());
    service.consume(pipeline, handler::OrchestratorHandler::new(topics, catalog));
    serve_http(&mut service, &config, listener, ops_listener, state, tls)?;
    let ended = service.run().await;
    api_pool.close().await;
    ended
}

/// Creates the topics the orchestrator uses where missing, and returns those it consumes. The
/// definitions name the topics: their triggers (consumed here) and the participants' command
/// topics (written here); the engine's own come from `Topics`.
async fn ensure_topics(
    config: &Config,
    topics: &Topics,
    catalog: &catalog::Catalog,
) -> Result<Vec<String>> {
    let (trigger_topics, command_topics) = catalog.topics();
    let mut consumed: Vec<String> = trigger_topics.iter().map(|t| topics.named(t)).collect();
    consumed.push(topics.replies());
    let mut all = topics.engine();
    all.extend(
        trigger_topics
            .iter()
            .chain(&command_topics)
            .map(|t| topics.named(t)),
    );
    kafka::ensure_topics(&config.service.kafka, &all).await?;
    Ok(consumed)
}

/// What the HTTP API works with: its pool, the order publisher, the token guard, the watch
/// feed, the metrics (installed here) and the service's health and shutdown.
fn app_state(
    config: &Config,
    gate: config::Gate,
    api_pool: PgPool,
    topics: &Topics,
    catalog: &Arc<catalog::Catalog>,
    service: &Service<Error>,
) -> Result<api::AppState> {
    let metrics = messaging::metrics::Metrics::install();
    metrics::describe();
    api::describe_metrics();
    let watch = Arc::new(api::watch::WatchFeed::new(
        api_pool.clone(),
        config.api.watch_limits(),
        WATCH_INTERVAL,
    ));
    let guard = Arc::new(api::guard::Guard::new(gate, &config.api, config.http_addr));
    Ok(api::AppState {
        pool: api_pool,
        orders: Arc::new(api::publisher::OrderPublisher::new(
            &config.service.kafka,
            &config.service.faults,
            std::time::Duration::from_millis(config.api.order_publish_timeout_ms),
        )?),
        topics: topics.clone(),
        catalog: catalog.clone(),
        metrics,
        health: service.health().clone(),
        shutdown: service.shutdown().clone(),
        guard,
        watch,
        stats: Arc::default(),
        request_timeout: config.api.server_limits().request_timeout,
    })
}

/// The orchestrator's own background work: the watch feed, the token file's and the TLS
/// files' reloads, the deadline scanner (which scans the sagas of the partitions `pipeline`'s
/// consumer holds) and the saga tables' retention.
fn run_background(
    service: &mut Service<Error>,
    config: &Config,
    state: &api::AppState,
    pipeline: &messaging::pipeline::Pipeline,
    tls: Option<&Arc<api::tls::Tls>>,
) {
    let shutdown = service.shutdown().clone();
    service.spawn_infallible("watch feed", state.watch.clone().run(shutdown.clone()));
    // It never fails: a bad file is reported and the old list kept.
    if let (Some(path), every @ 1..) =
        (&config.api.api_tokens_file, config.api.api_tokens_reload_ms)
    {
        service.spawn_infallible(
            "token reload",
            api::guard::reload_tokens(
                state.guard.clone(),
                path.clone(),
                std::time::Duration::from_millis(every),
                shutdown.clone(),
            ),
        );
    }
    // Never fails either: files that cannot be used keep the certificate in force.
    if let (Some(tls), every @ 1..) = (tls, config.api.http_tls_reload_ms) {
        service.spawn_infallible(
            "TLS reload",
            tls.clone()
                .reload(std::time::Duration::from_millis(every), shutdown.clone()),
        );
    }
    let backlogs = backlog::Backlogs::new(config.retries.backlog_stall());
    // Checked when the catalog loaded (`RetryConfig::check_overrides`), before anything ran.
    let participants = config.retries.participant_groups().unwrap_or_default();
    let scanner = deadlines::DeadlineScanner {
        pool: service.pool().clone(),
        topics: state.topics.clone(),
        catalog: state.catalog.clone(),
        interval: config.retries.scan_interval(),
        clock: clock::Clock::skewed(config.fault_clock_skew_secs),
        health: service.health().clone(),
        call_timeout: config.service.database.call_timeout(),
        ownership: deadlines::Ownership::new(
            pipeline.assignment.subscribe(),
            state.topics.replies(),
            config.service.kafka.clone(),
        ),
        backlogs: backlogs.clone(),
        groups: deadlines::GroupNames {
            orchestrator: pipeline.group.clone(),
            topic_prefix: config.service.kafka.topic_prefix.clone(),
            participants,
        },
    };
    service.spawn_infallible(
        "backlog reader",
        backlogs.read(config.service.kafka.clone(), shutdown.clone()),
    );
    service.spawn_infallible("deadline scanner", scanner.run(shutdown));
    let retention_secs = config.saga_retention_secs;
    let failed_secs = config.failed_saga_retention_secs;
    let dedup_secs = config.order_dedup_retention_secs;
    let keys_secs = config.api.idempotency_key_retention_secs;
    service.sweep("saga retention", move |pool| async move {
        let batch = messaging::retention::SWEEP_BATCH;
        let sagas = store::sweep_finished(&pool, retention_secs, failed_secs, batch).await?;
        let keys = store::sweep_saga_dedup(&pool, dedup_secs, batch).await?;
        let idempotency = api::idempotency::sweep(&pool, keys_secs, batch).await?;
        Ok(sagas + keys + idempotency)
    });
}

/// Serves the API on `listener` (over TLS with `tls`), and health and metrics on
/// `ops_listener` when there is one (plain HTTP: no token and no saga data passes there).
fn serve_http(
    service: &mut Service<Error>,
    config: &Config,
    listener: TcpListener,
    ops_listener: Option<TcpListener>,
    state: api::AppState,
    tls: Option<Arc<api::tls::Tls>>,
) -> Result<()> {
    let limits = config.api.server_limits();
    let shutdown = service.shutdown().clone();
    if let Some(ops) = ops_listener {
        tracing::info!(addr = %ops.local_addr()?, "health and metrics listening");
        // A server of its own, with its own connection cap: probes still get through while
        // the API's connections are all taken.
        let app = api::ops_router(state.clone());
        let served = api::server::serve("ops", ops, app, limits, None, shutdown.clone());
        service.spawn(
            "ops server",
            async move { served.await.map_err(Error::Http) },
        );
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %listener.local_addr()?, scheme, "status API listening");
    let served = api::server::serve("api", listener, api::router(state), limits, tls, shutdown);
    service.spawn(
        "API server",
        async move { served.await.map_err(Error::Http) },
    );
    Ok(())
}
