//! A service's message pipeline: the consume loop and the outbox relay, started together and
//! stopped in the order that loses nothing.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::assignment::Assignment;
use crate::config::{FaultConfig, KafkaConfig, RelayConfig, RetentionConfig};
use crate::consumer::{self, ConsumeSettings, DeadLetters, Deadlines, Ended, Handler};
use crate::health::Health;
use crate::relay::Relay;
use crate::{kafka, metrics, retention, Result};

/// How often the outbox backlog gauges are refreshed.
const OUTBOX_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What one service consumes and how.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub kafka: KafkaConfig,
    pub relay: RelayConfig,
    pub retention: RetentionConfig,
    /// The schema whose outbox the relay publishes.
    pub schema: String,
    pub group: String,
    pub topics: Vec<String>,
    pub dead_letters: DeadLetters,
    pub faults: FaultConfig,
    /// Where the consume loop says whether the database works, for `/healthz`.
    pub health: Health,
    /// How long the consume loop waits for the database, and when it gives up its partitions.
    pub deadlines: Deadlines,
    /// The partitions its consumer holds, kept up to date for work shared by partition.
    pub assignment: Assignment,
}

impl Pipeline {
    /// Runs until `shutdown` is cancelled. Shutdown order: the consumer finishes the record in
    /// hand and commits its offsets; then the relay publishes what that work wrote to the
    /// outbox, flushes the producer, and stops.
    ///
    /// # Errors
    /// Kafka errors while creating clients or subscribing; the cluster refusing the service;
    /// the relay ending before it was told to; what ends the consume loop.
    pub async fn run<H: Handler>(
        self,
        pool: PgPool,
        handler: H,
        shutdown: CancellationToken,
    ) -> Result<()> {
        // The consumer wakes the relay itself after each commit, which is sooner than the
        // commit's NOTIFY reaches the relay through PostgreSQL.
        let outbox_written = Arc::new(Notify::new());
        let mut outbox = self.start_outbox_side(&pool, &outbox_written)?;
        let settings = ConsumeSettings {
            topics: &self.topics,
            dead_letters: &self.dead_letters,
            batch_max: self.kafka.consumer_batch_max,
            faults: &self.faults,
            outbox_written: &outbox_written,
            health: &self.health,
            stall_after: std::time::Duration::from_millis(self.kafka.consumer_stall_ms),
            deadlines: self.deadlines,
        };
        // The relay runs until told to stop; if it ends before (a panic), the consumer would
        // go on filling an outbox nobody publishes: stop the whole pipeline instead.
        let consumed = tokio::select! {
            consumed = self.consume(&pool, &handler, settings, &shutdown) => consumed,
            // The cluster refuses this service for good (credentials, certificates, an ACL):
            // stop with the reason. What is in the outbox stays there for the next start.
            refusal = crate::access::AccessWatch::confirm(&self.kafka.connection) => {
                outbox.abort();
                return Err(crate::Error::AccessRefused {
                    connection: self.kafka.connection.describe(),
                    refusal,
                });
            }
            ended = &mut outbox.relay => {
                outbox.abort();
                let task = "outbox relay";
                return Err(match ended {
                    Err(source) => crate::Error::TaskFailed { task, source },
                    Ok(()) => crate::Error::TaskStopped { task },
                });
            }
        };
        if matches!(consumed, Err(crate::Error::InjectedCrash)) {
            // A crash does not drain anything.
            outbox.abort();
            return consumed;
        }
        outbox.drain().await;
        consumed
    }

    /// Starts the relay, the inbox retention and the outbox sampler, which stop only when
    /// told to, after the consumer.
    fn start_outbox_side(&self, pool: &PgPool, outbox_written: &Arc<Notify>) -> Result<OutboxSide> {
        let stop = CancellationToken::new();
        let relay = tokio::spawn(
            Relay::new(
                pool.clone(),
                self.kafka.clone(),
                &self.schema,
                self.relay.clone(),
                self.faults.clone(),
            )?
            .woken_by(Arc::clone(outbox_written))
            .with_call_timeout(self.deadlines.call)
            .run(stop.clone()),
        );
        let retention = {
            let pool = pool.clone();
            let config = self.retention.clone();
            let what = "inbox retention";
            let lease = retention::Lease::new(pool.clone(), what, config.sweep_interval());
            tokio::spawn(retention::every(
                what,
                config.sweep_interval(),
                stop.clone(),
                lease,
                move || {
                    let pool = pool.clone();
                    let config = config.clone();
                    async move { retention::sweep_inbox(&pool, &config).await }
                },
            ))
        };
        let sampler = tokio::spawn(metrics::sample_outbox(
            pool.clone(),
            self.health.clone(),
            OUTBOX_SAMPLE_INTERVAL,
            stop.clone(),
        ));
        Ok(OutboxSide {
            stop,
            relay,
            helpers: [retention, sampler],
        })
    }

    /// Runs the consume loop until shutdown. A stuck consumer is replaced by a new one (its
    /// offsets are the group's; the inbox absorbs what it reads again); one that gave up its
    /// partitions (the database unavailable too long) is replaced once the database answers
    /// again, joining the group anew; anything else ends the pipeline.
    async fn consume<H: Handler>(
        &self,
        pool: &PgPool,
        handler: &H,
        settings: ConsumeSettings<'_>,
        shutdown: &CancellationToken,
    ) -> Result<()> {
        loop {
            let consumer = kafka::consumer_reporting(
                &self.kafka,
                &self.group,
                &self.assignment,
                &self.health,
            )?;
            let ended =
                consumer::run(consumer, pool.clone(), handler, settings, shutdown.clone()).await;
            // Whatever ended it, the consumer is gone and holds nothing (its replacement
            // reports its own partitions once it has them).
            self.assignment.clear();
            match ended {
                Err(crate::Error::ConsumerStuck(why)) => {
                    tracing::error!(reason = %why, "the consumer is stuck; replacing it");
                    ::metrics::counter!(metrics::CONSUMERS_REPLACED).increment(1);
                }
                Ok(Ended::GaveUp { outage_since }) => {
                    let (deadlines, health) = (self.deadlines, &self.health);
                    if !consumer::wait_for_database(pool, deadlines, health, outage_since, shutdown)
                        .await
                    {
                        return Ok(());
                    }
                }
                Ok(Ended::ShutDown) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The relay and the tasks beside it (inbox retention, outbox sampler), with the token that
/// stops them.
struct OutboxSide {
    stop: CancellationToken,
    relay: JoinHandle<()>,
    helpers: [JoinHandle<()>; 2],
}

impl OutboxSide {
    /// Stops everything at once, draining nothing.
    fn abort(&self) {
        self.relay.abort();
        for helper in &self.helpers {
            helper.abort();
        }
    }

    /// Lets the relay publish what is in the outbox, flush and stop; the others too.
    async fn drain(self) {
        self.stop.cancel();
        for helper in self.helpers {
            let _ = helper.await;
        }
        if let Err(e) = self.relay.await {
            tracing::error!(error.message = %crate::Chain(&e), "outbox relay task ended abnormally");
        }
    }
}
