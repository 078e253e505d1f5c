//! What this machine can do at most, measured the way the engine uses it, so the engine's
//! numbers can be read as a fraction of it:
//!
//! - `sagactl ceiling broker`: produce → consume round trips through the broker, with the
//!   services' own client settings (`messaging::kafka`) and no database. A saga needs seven
//!   such hops; the report divides by seven.
//! - `sagactl ceiling postgres`: small committed transactions (one insert each) per second
//!   on the server, from several connections at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use messaging::config::KafkaConfig;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;
use rdkafka::Message;
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

/// Hops of one saga: order, then a command and a reply per step.
const HOPS_PER_SAGA: f64 = 7.0;

#[derive(Debug, Subcommand)]
pub enum Ceiling {
    /// Produce → consume round trips per second, and the round-trip latency floor.
    Broker(BrokerArgs),
    /// Small committed transactions per second.
    Postgres(PostgresArgs),
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    #[command(flatten)]
    kafka: KafkaConfig,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Messages in flight during the throughput phase.
    #[arg(long, default_value_t = 512)]
    in_flight: usize,
    /// Round trips, one at a time, for the latency floor.
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Payload bytes (a command envelope is about 400).
    #[arg(long, default_value_t = 400)]
    payload_bytes: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct PostgresArgs {
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Connections committing at once.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    #[arg(long, default_value_t = 20)]
    secs: u64,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn latency_ms(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let at = |q: f64| crate::load::percentile_ms(&samples, q);
    Latency {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn write_json(path: Option<&std::path::Path>, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    println!("{text}");
    if let Some(path) = path {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub async fn run(ceiling: Ceiling) -> anyhow::Result<()> {
    match ceiling {
        Ceiling::Broker(args) => broker(args).await,
        Ceiling::Postgres(args) => postgres(args).await,
    }
}

#[derive(Debug, Serialize)]
struct BrokerReport {
    round_trips_per_sec: f64,
    sagas_per_sec_bound: f64,
    in_flight: usize,
    hop_latency_ms: Latency,
    saga_latency_floor_ms: Latency,
    fetch_wait_max_ms: u32,
    linger_ms: u32,
}

async fn broker(args: BrokerArgs) -> anyhow::Result<()> {
    let topic = format!(
        "{}ceiling-{}",
        args.kafka.topic_prefix,
        Uuid::new_v4().simple()
    );
    messaging::kafka::ensure_topics(&args.kafka, std::slice::from_ref(&topic)).await?;
    let producer = messaging::kafka::producer(&args.kafka)?;
    let consumer = messaging::kafka::consumer(&args.kafka, &format!("{topic}-group"))?;
    consumer.subscribe(&[topic.as_str()])?;
    let payload = vec![b'x'; args.payload_bytes];

    // Each message's key is its id; the consumer looks up when it was sent.
    let sent_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let window = Arc::new(Semaphore::new(0));
    let received: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
    let reader = {
        let sent_at = Arc::clone(&sent_at);
        let window = Arc::clone(&window);
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok(message) = consumer.recv().await else {
                    continue;
                };
                let now = Instant::now();
                let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                if let Some(sent) = sent_at.lock().await.remove(&key) {
                    received.lock().await.push((now, now - sent));
                    window.add_permits(1);
                }
            }
        })
    };
    let send = |key: String| {
        let producer = producer.clone();
        let topic = topic.clone();
        let payload = payload.clone();
        let sent_at = Arc::clone(&sent_at);
        async move {
            sent_at.lock().await.insert(key.clone(), Instant::now());
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .context("producing")
        }
    };

    // Wait until the consumer has its partitions and reads.
    eprintln!("waiting for the consumer's assignment...");
    let ready = Instant::now();
    loop {
        send(format!("warm-{}", Uuid::new_v4())).await?;
        if tokio::time::timeout(Duration::from_secs(1), window.acquire())
            .await
            .is_ok_and(|p| p.map(|p| p.forget()).is_ok())
        {
            break;
        }
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("the consumer never received a message");
        }
    }

    eprintln!("latency floor: {} round trips, one at a time", args.samples);
    received.lock().await.clear();
    for i in 0..args.samples {
        send(format!("lat-{i}")).await?;
        window.acquire().await?.forget();
    }
    let hops: Vec<Duration> = received.lock().await.drain(..).map(|(_, d)| d).collect();
    let floor: Vec<Duration> = hops.chunks(7).map(|c| c.iter().sum()).collect();

    eprintln!(
        "throughput: {} s with {} in flight",
        args.secs, args.in_flight
    );
    window.add_permits(args.in_flight);
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(args.secs) {
        window.acquire().await?.forget();
        let producer_send = send(format!("tp-{n}"));
        tokio::spawn(async move {
            if let Err(e) = producer_send.await {
                eprintln!("{e:#}");
            }
        });
        n += 1;
    }
    let done = received.lock().await.len();
    let rate = done as f64 / started.elapsed().as_secs_f64();
    reader.abort();
    let report = BrokerReport {
        round_trips_per_sec: rate,
        sagas_per_sec_bound: rate / HOPS_PER_SAGA,
        in_flight: args.in_flight,
        hop_latency_ms: latency_ms(hops),
        saga_latency_floor_ms: latency_ms(floor),
        fetch_wait_max_ms: args.kafka.fetch_wait_max_ms,
        linger_ms: args.kafka.linger_ms,
    };
    write_json(args.json.as_deref(), &report)?;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        messaging::kafka::connection_settings(&args.kafka.connection)?.create()?;
    let _ = admin
        .delete_topics(&[topic.as_str()], &rdkafka::admin::AdminOptions::new())
        .await;
    Ok(())
}

#[derive(Debug, Serialize)]
struct PostgresReport {
    commits_per_sec: f64,
    connections: u32,
    commit_latency_ms: Latency,
    synchronous_commit: String,
}

async fn postgres(args: PostgresArgs) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.connections)
        .connect(&args.database_url)
        .await
        .context("connecting")?;
    let table = format!("sagactl_ceiling_{}", Uuid::new_v4().simple());
    sqlx::query(&format!(
        "CREATE TABLE {table} (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), body text)"
    ))
    .execute(&pool)
    .await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let insert = format!("INSERT INTO {table} (body) VALUES ($1)");
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let pool = pool.clone();
        let insert = insert.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                // One statement outside a transaction block: its own committed transaction.
                sqlx::query(&insert)
                    .bind("a small row, as an inbox or outbox row is")
                    .execute(&pool)
                    .await?;
                latencies.push(started.elapsed());
            }
            Ok::<_, sqlx::Error>(latencies)
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await?;
    let report = PostgresReport {
        commits_per_sec: latencies.len() as f64 / elapsed,
        connections: args.connections,
        commit_latency_ms: latency_ms(latencies),
        synchronous_commit,
    };
    write_json(args.json.as_deref(), &report)
}
