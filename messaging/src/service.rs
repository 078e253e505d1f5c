//! The service builder: what the orchestrator and every participant run the same way, under
//! one [`Supervisor`].
//!
//! A service opens its pool and makes a [`Service`] from the settings every service shares
//! ([`ServiceConfig`], [`Service::open`]), and adds its parts: its message [`Pipeline`]
//! ([`Service::pipeline`] builds it from those settings with the shared defaults, and
//! [`Service::consume`] runs it: consumer with its stall check, relay, inbox retention, outbox
//! sampler), its own retention sweeps ([`Service::sweep`]), `/metrics` and `/healthz`
//! ([`Service::serve_metrics`]) and whatever else it runs ([`Service::spawn`]: the
//! orchestrator's HTTP servers, its deadline scanner). [`Service::run`] then waits: the first
//! part that fails stops the others through the shutdown token, as a stop signal does, and the
//! pool is closed once every part has ended.

use std::future::Future;
use std::net::SocketAddr;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use crate::config::ServiceConfig;
use crate::consumer::{DeadLetters, Handler};
use crate::health::Health;
use crate::pipeline::Pipeline;
use crate::supervisor::Supervisor;

/// The longest wait for the pool's connections at the stop ([`Service::run`]): a healthy
/// database closes them in milliseconds.
const POOL_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A service being assembled, then run (see the module header).
pub struct Service<E> {
    name: &'static str,
    config: ServiceConfig,
    pool: PgPool,
    schema: String,
    health: Health,
    supervisor: Supervisor<E>,
}

impl<E> Service<E>
where
    E: std::error::Error + From<crate::Error> + Send + 'static,
{
    /// Opens the service `name` (its default schema, its consumer group's default name and its
    /// dead letters' signature) with `config`: its pool on `DATABASE_URL` in its schema
    /// (`DATABASE_SCHEMA`, default `name`), migrated with the messaging tables and `layers`
    /// ([`crate::db::open`]). It runs until `shutdown` is cancelled.
    ///
    /// # Errors
    /// The database's ([`crate::db::open`]): unreachable, refused, not migrated.
    pub async fn open(
        name: &'static str,
        config: &ServiceConfig,
        layers: &[&sqlx::migrate::Migrator],
        shutdown: CancellationToken,
    ) -> crate::Result<Self> {
        let (pool, schema) = crate::db::open(&config.database, name, layers).await?;
        Ok(Self {
            name,
            config: config.clone(),
            pool,
            schema,
            health: Health::new(std::time::Duration::from_millis(
                config.relay.ready_outbox_max_age_ms,
            )),
            supervisor: Supervisor::new(shutdown),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema its pool works in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Whether the database works, as the consume loop finds it, for `/healthz`.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The token every part watches.
    pub fn shutdown(&self) -> &CancellationToken {
        self.supervisor.shutdown()
    }

    /// The service's pipeline, from its settings: it consumes `topics` in `group` (default
    /// `{TOPIC_PREFIX}{service}`), dead-letters to `dead_letter_topic` signed with that group
    /// (`dlq.consumer`: the contract's DeadLetter headers), relays the outbox of its schema.
    pub fn pipeline(
        &self,
        group: Option<&str>,
        topics: Vec<String>,
        dead_letter_topic: String,
    ) -> Pipeline {
        let config = &self.config;
        let group = group.map_or_else(
            || crate::kafka::service_group(&config.kafka.topic_prefix, self.name),
            str::to_owned,
        );
        Pipeline {
            kafka: config.kafka.clone(),
            relay: config.relay.clone(),
            retention: config.retention.clone(),
            schema: self.schema.clone(),
            // The group, not the service's name: one name may run in several groups (two
            // deployments on one cluster, a replay), and a replay feeds the record back to the
            // group whose offsets passed it.
            dead_letters: DeadLetters {
                topic: dead_letter_topic,
                consumer: group.clone(),
            },
            group,
            topics,
            faults: config.faults.clone(),
            health: self.health.clone(),
            deadlines: crate::consumer::Deadlines::of(&config.database),
            assignment: crate::assignment::Assignment::default(),
        }
    }

    /// Runs `pipeline` with `handler` until shutdown.
    pub fn consume<H: Handler + 'static>(&mut self, pipeline: Pipeline, handler: H) {
        let pool = self.pool.clone();
        let shutdown = self.shutdown().clone();
        self.supervisor.spawn("message pipeline", async move {
            Ok(pipeline.run(pool, handler, shutdown).await?)
        });
    }

    /// Runs `sweep` on the service's pool every `RETENTION_SWEEP_INTERVAL_MS` (and again at
    /// once after a full batch: [`crate::retention::every`]) until shutdown, in one instance of
    /// the service at a time (the one holding the sweep's lease, [`crate::retention::Lease`]);
    /// `what` names it in the logs, the lease and the metrics.
    pub fn sweep<F, Fut>(&mut self, what: &'static str, sweep: F)
    where
        F: Fn(PgPool) -> Fut + Send + 'static,
        Fut: Future<Output = sqlx::Result<u64>> + Send + 'static,
    {
        let interval = self.config.retention.sweep_interval();
        let pool = self.pool.clone();
        let stop = self.shutdown().clone();
        let lease = crate::retention::Lease::new(pool.clone(), what, interval);
        self.supervisor.spawn_infallible(
            what,
            crate::retention::every(what, interval, stop, lease, move || sweep(pool.clone())),
        );
    }

    /// Serves `/metrics`, `/healthz` and the probes on `addr` until shutdown. A port that
    /// cannot be bound (taken, say) stops the service with the cause.
    pub fn serve_metrics(&mut self, addr: SocketAddr) {
        let metrics = crate::metrics::Metrics::install();
        let health = self.health.clone();
        let stop = self.shutdown().clone();
        self.supervisor.spawn_infallible("metrics server", async move {
            // A service whose probes cannot be served would look dead to its supervisor, or
            // (the port another's) be mistaken for that other: it stops, with the cause.
            if let Err(e) = metrics.serve(addr, health, stop).await {
                tracing::error!(error.message = %crate::Chain(&e), %addr, "cannot serve /metrics and the probes");
            }
        });
    }

    /// Runs `task` as `name` until shutdown: an error, a panic or an end before shutdown
    /// stops the service.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        self.supervisor.spawn(name, task);
    }

    /// Runs `task`, which cannot fail, as `name` until shutdown: a panic or an end before
    /// shutdown stops the service.
    pub fn spawn_infallible<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.supervisor.spawn_infallible(name, task);
    }

    /// Runs every part until shutdown or the first failure, then closes the pool, waiting at
    /// most [`POOL_CLOSE_WAIT`] (or `DATABASE_CALL_TIMEOUT_MS` when shorter) for its
    /// connections: every part has ended, so a connection still out is one whose call was
    /// abandoned while the database did not answer, still being tested by sqlx (a ping that
    /// waits as long as the lost answers), and the stop must not wait for it.
    ///
    /// # Errors
    /// The first part's failure ([`Supervisor::wait`]).
    pub async fn run(self) -> Result<(), E> {
        let ended = self.supervisor.wait().await;
        let limit = self.config.database.call_timeout().min(POOL_CLOSE_WAIT);
        if tokio::time::timeout(limit, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(
                limit_ms = limit.as_millis() as u64,
                "the database did not answer while closing the pool; leaving its connections"
            );
        }
        ended
    }
}
