//! Prometheus metrics: one recorder per process, rendered as the text format at `/metrics`.
//!
//! Code records through the `metrics` macros (`counter!`, `histogram!`, `gauge!`); this module
//! installs the recorder, names the histograms' buckets, samples what no code path sees
//! (outbox backlog, consumer lag) and serves the page. The names every service shares are the
//! constants below; the orchestrator adds its saga metrics in its handler.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rdkafka::statistics::Statistics;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::KeptConnection;
use crate::health::Health;
use crate::{Error, Result};

/// Records consumed, by topic, partition and what became of them (`handled`, `dead_lettered`).
pub const MESSAGES_CONSUMED: &str = "messages_consumed_total";
/// Time from receiving a record to committing its transaction.
pub const HANDLE_SECONDS: &str = "message_handle_duration_seconds";
/// Time from the producer handing a record to its client (the record's timestamp) to a
/// consumer receiving it: the broker's part of a hop.
pub const RECORD_DELIVERY_SECONDS: &str = "kafka_record_delivery_seconds";
/// Time from writing an outbox row (the last statement before its transaction commits) to
/// the relay claiming it: the commit and the relay's wake-up.
pub const OUTBOX_PICKUP_SECONDS: &str = "outbox_pickup_seconds";
/// Time from the relay handing a row to the producer to the broker's acknowledgement.
pub const OUTBOX_PUBLISH_SECONDS: &str = "outbox_publish_seconds";
/// Handler failures, by kind (`retry`, `reject`).
pub const HANDLER_ERRORS: &str = "handler_errors_total";
/// Records sent to the dead-letter topic.
pub const DEAD_LETTERS: &str = "dead_letters_total";
/// Outbox rows published and acknowledged.
pub const OUTBOX_PUBLISHED: &str = "outbox_published_total";
pub const OUTBOX_PARKED: &str = "outbox_parked_total";
/// Outbox rows not yet published.
pub const OUTBOX_BACKLOG: &str = "outbox_backlog";
/// Age of the oldest unpublished outbox row (0 when empty).
pub const OUTBOX_OLDEST_AGE: &str = "outbox_oldest_age_seconds";
/// Outbox rows not yet published, per destination topic.
pub const OUTBOX_TOPIC_BACKLOG: &str = "outbox_topic_backlog";
/// Age of the oldest unpublished outbox row per destination topic (0 once it has none).
pub const OUTBOX_TOPIC_OLDEST_AGE: &str = "outbox_topic_oldest_age_seconds";
/// 1 while the relay holds a destination topic's rows back because it fails, else 0.
pub const OUTBOX_DESTINATION_FAILING: &str = "outbox_destination_failing";
/// Times a destination topic started failing (a run of failed tries counts once).
pub const OUTBOX_DESTINATION_FAILURES: &str = "outbox_destination_failures_total";
/// Records behind the partition's end, per topic and partition, from librdkafka statistics.
pub const CONSUMER_LAG: &str = "kafka_consumer_lag";
/// Consumers replaced because they read nothing while their partitions held records.
pub const CONSUMERS_REPLACED: &str = "kafka_consumers_replaced_total";
/// 1 while the consume loop waits for a database that is unreachable or unwell, else 0.
pub const DATABASE_UNWELL: &str = "database_unwell";
/// Times the consume loop gave up its partitions because the database was unavailable too long
/// (`DATABASE_GIVE_UP_AFTER_MS`).
pub const PARTITIONS_GIVEN_UP: &str = "kafka_partitions_given_up_total";
/// 1 while the consume loop is out of its group, having given up its partitions, else 0.
pub const PARTITIONS_OUT: &str = "kafka_consumer_out_of_group";

/// Seconds: 0.25 ms to 60 s, dense where a healthy hop lands.
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];

/// The process's metrics page.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the process-wide recorder the first time; later calls (several services in
    /// one test process) share it.
    pub fn install() -> Self {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE.get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder was installed first; this handle then renders
            // nothing, which the services never do.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        });
        Self {
            handle: handle.clone(),
        }
    }

    /// The page in Prometheus text format.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    pub async fn response(&self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            self.render(),
        )
            .into_response()
    }

    /// Serves `/metrics`, `/healthz`, `/livez` and `/readyz` on `addr` until `shutdown`, for
    /// services that have no other HTTP server. `/healthz` and `/readyz` answer 503 with the
    /// reason while `health` says the service is not ready ([`crate::health`]).
    ///
    /// # Errors
    /// [`Error::Io`] when the address cannot be bound.
    pub async fn serve(
        self,
        addr: SocketAddr,
        health: Health,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "metrics listening");
        let app = Router::new()
            .route(
                "/metrics",
                get(move || {
                    let metrics = self.clone();
                    async move { metrics.response().await }
                }),
            )
            .route("/livez", get(|| async { live_response() }))
            .route("/readyz", {
                let health = health.clone();
                get(move || async move { ready_response(&health) })
            })
            .route(
                "/healthz",
                get(move || async move { health_response(&health) }),
            );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(Error::Io)
    }
}

/// `/livez`'s answer: 200 `{"status": "ok"}` from a process that runs and serves HTTP.
pub fn live_response() -> axum::response::Response {
    probe_response(Ok(()))
}

/// `/readyz`'s answer: as [`health_response`], after [`Health::readiness`].
pub fn ready_response(health: &Health) -> axum::response::Response {
    probe_response(health.readiness())
}

/// `/healthz`'s answer: 200 `{"status": "ok"}`, or 503 with the reason in the JSON error body
/// every HTTP error of the project has.
pub fn health_response(health: &Health) -> axum::response::Response {
    probe_response(health.ready())
}

fn probe_response(ready: Result<(), crate::health::NotReady>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match ready {
        Ok(()) => axum::Json(serde_json::json!({ "status": "ok" })).into_response(),
        Err(not_ready) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "error": {
                "code": "unavailable",
                "message": format!(
                    "not ready for {} s: {}",
                    not_ready.for_how_long.as_secs(),
                    not_ready.reason
                ),
            }})),
        )
            .into_response(),
    }
}

fn describe() {
    metrics::describe_counter!(
        crate::retention::SWEEPS_RUN,
        "Retention sweeps this instance ran (it held the sweep's lease), by sweep."
    );
    metrics::describe_counter!(
        CONSUMERS_REPLACED,
        "Kafka consumers replaced by a new one because they received nothing while their partitions held records to read (librdkafka stuck on a topic created again)."
    );
    metrics::describe_gauge!(
        DATABASE_UNWELL,
        "1 while the consumer waits for a database that is unreachable, read-only, shutting down or otherwise unwell (not ready), else 0."
    );
    metrics::describe_counter!(
        PARTITIONS_GIVEN_UP,
        "Times the consumer left its group, giving its partitions to the other instances, because the database was unavailable longer than DATABASE_GIVE_UP_AFTER_MS."
    );
    metrics::describe_gauge!(
        PARTITIONS_OUT,
        "1 while the consumer is out of its group after giving up its partitions, waiting for the database, else 0."
    );
    metrics::describe_counter!(
        MESSAGES_CONSUMED,
        "Kafka records consumed, by topic, partition and outcome."
    );
    metrics::describe_histogram!(
        HANDLE_SECONDS,
        metrics::Unit::Seconds,
        "Time from receiving a record to committing its transaction."
    );
    metrics::describe_histogram!(
        RECORD_DELIVERY_SECONDS,
        metrics::Unit::Seconds,
        "Time from a record's producer timestamp to this consumer receiving it."
    );
    metrics::describe_histogram!(
        OUTBOX_PICKUP_SECONDS,
        metrics::Unit::Seconds,
        "Time from writing an outbox row to the relay claiming it."
    );
    metrics::describe_histogram!(
        OUTBOX_PUBLISH_SECONDS,
        metrics::Unit::Seconds,
        "Time from handing an outbox row to the producer to the broker's acknowledgement."
    );
    metrics::describe_counter!(HANDLER_ERRORS, "Handler failures, by kind.");
    metrics::describe_counter!(DEAD_LETTERS, "Records sent to the dead-letter topic.");
    metrics::describe_counter!(OUTBOX_PUBLISHED, "Outbox rows published and acknowledged.");
    metrics::describe_counter!(
        OUTBOX_PARKED,
        "Outbox rows the broker refused for good, moved to outbox_parked."
    );
    metrics::describe_gauge!(OUTBOX_BACKLOG, "Outbox rows not yet published.");
    metrics::describe_gauge!(
        OUTBOX_OLDEST_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest unpublished outbox row."
    );
    metrics::describe_gauge!(
        OUTBOX_TOPIC_BACKLOG,
        "Outbox rows not yet published, per destination topic."
    );
    metrics::describe_gauge!(
        OUTBOX_TOPIC_OLDEST_AGE,
        metrics::Unit::Seconds,
        "Age of the oldest unpublished outbox row, per destination topic."
    );
    metrics::describe_gauge!(
        OUTBOX_DESTINATION_FAILING,
        "1 while the outbox relay holds a destination topic's rows back because it fails."
    );
    metrics::describe_counter!(
        OUTBOX_DESTINATION_FAILURES,
        "Times an outbox destination topic started failing."
    );
    metrics::describe_gauge!(
        CONSUMER_LAG,
        "Records between the committed position and the end of each partition."
    );
}

/// Samples the outbox backlog of `schema` every `every` until `stop`: in total and per
/// destination topic (a topic that drained reads 0 rather than keeping its last value).
pub async fn sample_outbox(pool: PgPool, health: Health, every: Duration, stop: CancellationToken) {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut kept = KeptConnection::default();
    loop {
        let sample = async {
            let mut connection = kept.take(&pool).await?;
            let topics = sqlx::query!(
                r#"SELECT topic AS "topic!", count(*) AS "backlog!",
                      extract(epoch FROM now() - min(created_at))::float8 AS "oldest_age!"
               FROM outbox GROUP BY topic"#,
            )
            .fetch_all(&mut *connection)
            .await?;
            kept.keep(connection);
            Ok::<_, sqlx::Error>(topics)
        };
        // The stop must not wait for a database that does not answer.
        let sampled = tokio::select! {
            sampled = sample => sampled,
            _ = stop.cancelled() => return,
        };
        match sampled {
            Ok(topics) => {
                let mut backlog = 0;
                let mut oldest: f64 = 0.0;
                let mut drained = std::mem::take(&mut seen);
                for sample in topics {
                    backlog += sample.backlog;
                    let age = sample.oldest_age.max(0.0);
                    oldest = oldest.max(age);
                    metrics::gauge!(OUTBOX_TOPIC_BACKLOG, "topic" => sample.topic.clone())
                        .set(sample.backlog as f64);
                    metrics::gauge!(OUTBOX_TOPIC_OLDEST_AGE, "topic" => sample.topic.clone())
                        .set(age);
                    drained.remove(&sample.topic);
                    seen.insert(sample.topic);
                }
                for topic in drained {
                    metrics::gauge!(OUTBOX_TOPIC_BACKLOG, "topic" => topic.clone()).set(0.0);
                    metrics::gauge!(OUTBOX_TOPIC_OLDEST_AGE, "topic" => topic).set(0.0);
                }
                metrics::gauge!(OUTBOX_BACKLOG).set(backlog as f64);
                // No age when the outbox is empty.
                metrics::gauge!(OUTBOX_OLDEST_AGE).set(oldest);
                health.outbox_sampled(Ok(oldest));
            }
            Err(e) => {
                tracing::debug!(error.message = %crate::Chain(&e), "sampling the outbox failed");
                health.outbox_sampled(Err(crate::chain(&e)));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Turns librdkafka's periodic statistics of a consumer into the lag gauge.
pub fn report_lag(statistics: &Statistics) {
    for (topic, stats) in &statistics.topics {
        for (partition, p) in &stats.partitions {
            // -1 (unknown) for partitions this member does not consume.
            if *partition < 0 || p.consumer_lag < 0 {
                continue;
            }
            metrics::gauge!(
                CONSUMER_LAG,
                "topic" => topic.clone(),
                "partition" => partition.to_string()
            )
            .set(p.consumer_lag as f64);
        }
    }
}
