//! What this machine can do at most, measured the way the engine uses it, so the engine's
//! numbers can be read as a fraction of it:
//!
//! - `sagactl ceiling broker`: produce → consume round trips through the broker, with the
//!   services' own client settings (`messaging::kafka`) and no database. A saga needs seven
//!   such hops; the report divides by seven.
//! - `sagactl ceiling postgres`: small committed transactions (one insert each) per second
//!   on the server, from several connections at once.
//!
//! With `--process NAME=PID` each also reports the CPU a round trip (the one-at-a-time phase)
//! or a commit costs that process tree (the broker's JVM, the postmaster and its backends) and
//! sagactl itself: what the parts of one unbatched hop cost before the engine adds anything.

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
    /// A process to account for, as NAME=PID (repeat): the CPU it and every process below it
    /// used, per round trip of the one-at-a-time phase (Linux /proc). sagactl's own CPU is
    /// reported too.
    #[arg(long = "process", value_parser = crate::load::parse_named::<u32>)]
    processes: Vec<(String, u32)>,
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
    /// A process to account for, as NAME=PID (repeat): the CPU it and every process below it
    /// used, per commit (Linux /proc). sagactl's own CPU is reported too.
    #[arg(long = "process", value_parser = crate::load::parse_named::<u32>)]
    processes: Vec<(String, u32)>,
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

/// The CPU one process tree used per operation (round trip, commit) of a phase.
#[derive(Debug, Serialize)]
struct CpuEach {
    name: String,
    cpu_ms: f64,
}

fn cpu_each(meter: &crate::budget::CpuMeter, operations: usize) -> Vec<CpuEach> {
    meter
        .used()
        .into_iter()
        .map(|used| CpuEach {
            cpu_ms: used.ms_each(operations),
            name: used.name,
        })
        .collect()
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
    /// CPU per round trip of the one-at-a-time phase (`--process`, and sagactl's producer and
    /// consumer).
    cpu_per_round_trip: Vec<CpuEach>,
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
    let trips = RoundTrips {
        producer,
        topic: topic.clone(),
        payload: vec![b'x'; args.payload_bytes],
        sent_at: Arc::default(),
        window: Arc::new(Semaphore::new(0)),
        received: Arc::default(),
    };
    let reader = trips.spawn_reader(consumer);

    trips.warm_up().await?;
    eprintln!("latency floor: {} round trips, one at a time", args.samples);
    let meter = crate::budget::CpuMeter::start(&args.processes, "sagactl ceiling");
    let hops = trips.one_at_a_time(args.samples).await?;
    let cpu_per_round_trip = cpu_each(&meter, hops.len());
    let floor: Vec<Duration> = hops.chunks(7).map(|c| c.iter().sum()).collect();
    eprintln!(
        "throughput: {} s with {} in flight",
        args.secs, args.in_flight
    );
    let rate = trips
        .throughput(Duration::from_secs(args.secs), args.in_flight)
        .await?;
    reader.abort();
    let report = BrokerReport {
        round_trips_per_sec: rate,
        sagas_per_sec_bound: rate / HOPS_PER_SAGA,
        in_flight: args.in_flight,
        hop_latency_ms: latency_ms(hops),
        saga_latency_floor_ms: latency_ms(floor),
        cpu_per_round_trip,
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

/// Round trips through one topic: a message produced, then consumed. Each message's key is
/// its id; the reader looks up when it was sent, and gives a permit of `window` back.
struct RoundTrips {
    producer: messaging::kafka::Producer,
    topic: String,
    payload: Vec<u8>,
    sent_at: Arc<Mutex<HashMap<String, Instant>>>,
    window: Arc<Semaphore>,
    /// When each came back, and how long its trip took.
    received: Arc<Mutex<Vec<(Instant, Duration)>>>,
}

impl RoundTrips {
    /// Reads the messages that come back, until aborted.
    fn spawn_reader(&self, consumer: messaging::kafka::Consumer) -> tokio::task::JoinHandle<()> {
        let sent_at = Arc::clone(&self.sent_at);
        let window = Arc::clone(&self.window);
        let received = Arc::clone(&self.received);
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
    }

    /// Sends one message keyed `key`; the future owns what it needs, so that it can be
    /// spawned.
    fn send(&self, key: String) -> impl std::future::Future<Output = anyhow::Result<()>> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let payload = self.payload.clone();
        let sent_at = Arc::clone(&self.sent_at);
        async move {
            sent_at.lock().await.insert(key.clone(), Instant::now());
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map(|_| ())
                .context("producing")
        }
    }

    /// Waits until the consumer has its partitions and reads.
    async fn warm_up(&self) -> anyhow::Result<()> {
        eprintln!("waiting for the consumer's assignment...");
        let ready = Instant::now();
        loop {
            self.send(format!("warm-{}", Uuid::new_v4())).await?;
            if tokio::time::timeout(Duration::from_secs(1), self.window.acquire())
                .await
                .is_ok_and(|p| p.map(|p| p.forget()).is_ok())
            {
                return Ok(());
            }
            if ready.elapsed() > Duration::from_secs(60) {
                bail!("the consumer never received a message");
            }
        }
    }

    /// `samples` round trips, one at a time: how long each took.
    async fn one_at_a_time(&self, samples: usize) -> anyhow::Result<Vec<Duration>> {
        self.received.lock().await.clear();
        for i in 0..samples {
            self.send(format!("lat-{i}")).await?;
            self.window.acquire().await?.forget();
        }
        Ok(self
            .received
            .lock()
            .await
            .drain(..)
            .map(|(_, d)| d)
            .collect())
    }

    /// Round trips for `length` with `in_flight` of them under way: how many per second came
    /// back.
    async fn throughput(&self, length: Duration, in_flight: usize) -> anyhow::Result<f64> {
        self.window.add_permits(in_flight);
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed() < length {
            self.window.acquire().await?.forget();
            let producer_send = self.send(format!("tp-{n}"));
            tokio::spawn(async move {
                if let Err(e) = producer_send.await {
                    eprintln!("{e:#}");
                }
            });
            n += 1;
        }
        let done = self.received.lock().await.len();
        Ok(done as f64 / started.elapsed().as_secs_f64())
    }
}

#[derive(Debug, Serialize)]
struct PostgresReport {
    commits_per_sec: f64,
    connections: u32,
    commit_latency_ms: Latency,
    /// CPU per commit (`--process`, and sagactl's client).
    cpu_per_commit: Vec<CpuEach>,
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
    let meter = crate::budget::CpuMeter::start(&args.processes, "sagactl ceiling");
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
    let cpu_per_commit = cpu_each(&meter, latencies.len());
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await?;
    let report = PostgresReport {
        commits_per_sec: latencies.len() as f64 / elapsed,
        connections: args.connections,
        cpu_per_commit,
        commit_latency_ms: latency_ms(latencies),
        synchronous_commit,
    };
    write_json(args.json.as_deref(), &report)
}
