//! The load generator: open loop (a fixed rate) or closed loop (a fixed number of sagas in
//! flight), with a chosen share of orders that fail at a random step and are compensated.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use events::{Address, Envelope, LineItem, OrderPlaced, SagaEvent, Topics};
use rand::Rng;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

use crate::budget;
use crate::work::{self, Page};

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    kafka: messaging::config::KafkaConnection,
    /// Topic prefix of the deployment under test.
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    /// How many orders to place.
    #[arg(long, default_value_t = 100)]
    orders: usize,
    /// Open loop: orders per second. Without it, the load is a closed loop of `--in-flight`.
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: sagas in flight at once.
    #[arg(long, default_value_t = 1)]
    in_flight: usize,
    /// Percentage of orders built to fail (spread over stock, payment and shipping).
    #[arg(long, default_value_t = 0)]
    failure_percent: u8,
    /// Which step the failing orders fail at: any (stock, payment and shipping in equal
    /// parts), or only one of them.
    #[arg(long, value_enum, default_value_t = FailAt::Any)]
    fail_at: FailAt,
    /// Give up on sagas that have not finished this many seconds after the last order.
    #[arg(long, default_value_t = 60)]
    settle_timeout_secs: u64,
    /// fetch.wait.max.ms of the consumer that watches saga.events.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX_MS", default_value_t = 500)]
    fetch_wait_max_ms: u32,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Sagas finishing in the first seconds are left out of the sustained rate.
    #[arg(long, default_value_t = 5.0)]
    warmup_secs: f64,
    /// A process to account for, as NAME=PID (repeat): the CPU seconds per saga of it and every
    /// process below it (PostgreSQL's backends under the postmaster), and its peak memory
    /// (Linux /proc).
    #[arg(long = "process", value_parser = parse_named::<u32>)]
    processes: Vec<(String, u32)>,
    /// A service's /metrics page, as NAME=URL (repeat; one per instance when a service runs
    /// several): its outbox backlog and consumer lag at the end, its hop means and the work it
    /// did during the run (records consumed per partition, rows published, deadlines fired)
    /// are reported. A NAME ending in `-N` is instance N of the service before it.
    #[arg(long = "metrics", value_parser = parse_named::<String>)]
    metrics: Vec<(String, String)>,
    /// Count SQL statements and transactions per saga in this database (resets its
    /// `pg_stat_statements` and `pg_stat_database` counters at the start).
    #[arg(long)]
    sql_stats: Option<String>,
    /// The broker's log directory: with it, the bytes each topic of the prefix stored are
    /// reported per saga (records per saga are reported whenever the prefix is set).
    #[arg(long)]
    kafka_log_dir: Option<PathBuf>,
    /// Delete the prefix's topics at the end (a benchmark's own deployment): a broker that
    /// keeps every run's partitions spends ever more CPU on them.
    #[arg(long)]
    delete_topics: bool,
    /// Spread the orders over this many customers and SKUs of the load's own, which it adds to
    /// the deployment's database (`--database-url`) before the first order, instead of the demo
    /// data's two customers and two SKUs: concurrent sagas then seldom wait for each other's
    /// stock row or account, as in a shop with many products and buyers. 0: the demo data.
    #[arg(long, default_value_t = 0)]
    spread: u32,
    /// The deployment's database (inventory's and payment's tables), for `--spread`.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
}

pub(crate) fn parse_named<T: std::str::FromStr>(text: &str) -> Result<(String, T), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    let value = value
        .parse()
        .map_err(|_| format!("cannot read the value of {text:?}"))?;
    Ok((name.to_owned(), value))
}

#[derive(Debug, Serialize)]
struct Report {
    orders: usize,
    finished: usize,
    completed: usize,
    compensated: usize,
    failed: usize,
    unfinished: usize,
    mode: String,
    elapsed_secs: f64,
    finished_per_sec: f64,
    completed_per_sec: f64,
    /// Completed sagas per second between the end of the warm-up and the last finish.
    sustained_completed_per_sec: f64,
    latency_ms: Percentiles,
    processes: Vec<ProcessUsage>,
    sql: Option<budget::SqlBudget>,
    kafka: Vec<budget::TopicVolume>,
    /// Outbox rows not yet published and records not yet consumed, per service, at the end.
    backlog_at_end: Vec<Backlog>,
    /// What each process with a /metrics page did during the run, and its part of its
    /// service's work.
    work: Vec<work::InstanceWork>,
}

#[derive(Debug, Serialize)]
struct ProcessUsage {
    name: String,
    pid: u32,
    cpu_secs: f64,
    cpu_ms_per_saga: f64,
    peak_rss_mb: f64,
}

#[derive(Debug, Serialize)]
struct Backlog {
    name: String,
    outbox_rows: f64,
    consumer_lag: f64,
    /// Mean time from receiving a record to committing its transaction, over the run.
    mean_handle_ms: f64,
    /// Where a hop into and out of this service goes, as means over the run (the histograms'
    /// growth from the start to the end): the producer's
    /// timestamp to this consumer receiving the record (the broker's part), receiving to
    /// committing (`mean_handle_ms`), the outbox row's write to the relay claiming it, and
    /// handing it to the producer to the broker's acknowledgement.
    mean_delivery_ms: f64,
    mean_pickup_ms: f64,
    mean_publish_ms: f64,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// What the watcher learned about each order.
#[derive(Default)]
struct Tally {
    sent_at: HashMap<Uuid, Instant>,
    latencies: Vec<Duration>,
    /// When each saga finished, for the sustained rate.
    finished_at: Vec<(Instant, bool)>,
    completed: usize,
    compensated: usize,
    failed: usize,
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    if args.orders == 0 || args.in_flight == 0 {
        bail!("--orders and --in-flight must be at least 1");
    }
    if args.failure_percent > 100 {
        bail!("--failure-percent is a percentage");
    }
    if args.spread > 0 {
        let Some(url) = &args.database_url else {
            bail!("--spread adds its customers and SKUs to the deployment's database: give --database-url (DATABASE_URL)");
        };
        seed_spread(url, args.spread).await?;
    }
    let topics = Topics::new(args.topic_prefix.clone());
    let producer: FutureProducer = messaging::kafka::producer_settings(&args.kafka, 0)?
        .create()
        .context("creating producer")?;
    let watcher = watch_from_end(&args, &topics.saga_events()).await?;
    let sql_counters = match &args.sql_stats {
        Some(url) => Some(budget::SqlCounters::start(url).await?),
        None => None,
    };
    let cpu = budget::CpuMeter::start(&args.processes, "sagactl load");
    let pages_at_start = metrics_at_start(&args.metrics).await;

    let tally = Arc::new(Mutex::new(Tally::default()));
    let in_flight = Arc::new(Semaphore::new(args.in_flight));
    let watch = tokio::spawn(watch_events(
        watcher,
        Arc::clone(&tally),
        Arc::clone(&in_flight),
        args.orders,
    ));

    let started = Instant::now();
    send_orders(&args, &producer, &topics, &tally, &in_flight).await?;
    let settled = tokio::time::timeout(Duration::from_secs(args.settle_timeout_secs), watch).await;
    let elapsed = started.elapsed();
    if settled.is_err() {
        eprintln!(
            "not every saga finished within {} s of the last order",
            args.settle_timeout_secs
        );
    }
    let tally = tally.lock().await;
    let mut report = report(&args, &tally, elapsed, started);
    report
        .processes
        .extend(usage_per_saga(&cpu, report.finished));
    measure_costs(&args, sql_counters, &pages_at_start, &mut report).await?;
    print_report(&report);
    if args.delete_topics {
        budget::delete_topics(&args.kafka, &args.topic_prefix).await?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if report.unfinished > 0 {
        bail!("{} sagas did not finish", report.unfinished);
    }
    Ok(())
}

/// Sends `--orders` orders, at `--rate` or keeping `--in-flight` sagas open (the watcher
/// gives a permit back as each finishes), noting when each went in `tally`; returns once the
/// broker has acknowledged them all.
async fn send_orders(
    args: &LoadArgs,
    producer: &FutureProducer,
    topics: &Topics,
    tally: &Mutex<Tally>,
    in_flight: &Semaphore,
) -> anyhow::Result<()> {
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let mut next_send = Instant::now();
    let mut last_progress = Instant::now();
    let mut publishing = Vec::with_capacity(args.orders);
    for sent in 0..args.orders {
        match interval {
            Some(interval) => {
                tokio::time::sleep_until(next_send.into()).await;
                next_send += interval;
            }
            None => in_flight
                .acquire()
                .await
                .context("semaphore closed")?
                .forget(),
        }
        let order = spread_order(args.failure_percent, args.fail_at, args.spread);
        tally
            .lock()
            .await
            .sent_at
            .insert(order.order_id, Instant::now());
        // Publishing does not wait for the broker's acknowledgement before the next order:
        // awaiting each one in turn capped the load at one order per produce round trip.
        let (producer, topics) = (producer.clone(), topics.clone());
        publishing.push(tokio::spawn(async move {
            publish_order(&producer, &topics, &order).await
        }));
        if last_progress.elapsed() >= Duration::from_secs(1) {
            let finished = tally.lock().await.latencies.len();
            eprintln!("sent {}/{}, finished {finished}", sent + 1, args.orders);
            last_progress = Instant::now();
        }
    }
    for published in publishing {
        published.await.context("publishing task")??;
    }
    Ok(())
}

/// What each process used since `meter` started, per saga of the `finished` ones.
fn usage_per_saga(meter: &budget::CpuMeter, finished: usize) -> Vec<ProcessUsage> {
    meter
        .used()
        .into_iter()
        .map(|used| ProcessUsage {
            cpu_ms_per_saga: used.ms_each(finished),
            peak_rss_mb: budget::peak_rss_kb(used.pid).unwrap_or(0.0) / 1024.0,
            name: used.name,
            pid: used.pid,
            cpu_secs: used.cpu_secs,
        })
        .collect()
}

/// Each `--metrics` page before the run, to subtract from the same page at the end; an
/// unreadable page counts from zero (the process's whole life).
async fn metrics_at_start(metrics: &[(String, String)]) -> Vec<Page> {
    let mut pages = Vec::with_capacity(metrics.len());
    for (_, url) in metrics {
        pages.push(Page::fetch(url).await.unwrap_or_else(|e| {
            eprintln!("{e:#}; its counters are taken from the start of its process");
            Page::default()
        }));
    }
    pages
}

/// Adds to `report` what the run cost besides CPU: the SQL statements (`--sql-stats`), the
/// bytes on the run's topics, and each service's backlog at the end and work during the run
/// (`--metrics`, less `pages_at_start`).
async fn measure_costs(
    args: &LoadArgs,
    sql_counters: Option<budget::SqlCounters>,
    pages_at_start: &[Page],
    report: &mut Report,
) -> anyhow::Result<()> {
    if let Some(counters) = sql_counters {
        report.sql = Some(counters.finish(report.finished).await?);
    }
    report.kafka = budget::kafka_volume(
        &args.kafka,
        &args.topic_prefix,
        args.kafka_log_dir.as_deref(),
        report.finished,
    )?;
    if !args.metrics.is_empty() {
        // The gauges are sampled every second (outbox) and committed offsets move every
        // second; let both catch up with the end of the run.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
    let mut runs = Vec::with_capacity(args.metrics.len());
    for ((name, url), start) in args.metrics.iter().zip(pages_at_start) {
        match Page::fetch(url).await {
            Ok(end) => {
                let during = end.since(start);
                report.backlog_at_end.push(backlog(name, &end, &during));
                runs.push((name.clone(), end, during));
            }
            Err(e) => eprintln!("{e:#}"),
        }
    }
    report.work = work::instance_work(&runs);
    Ok(())
}

/// Publishes `order` to the deployment's `orders` topic, keyed by order id, as a client does.
/// Each order starts its own trace; every command and reply of its saga joins it.
pub(crate) async fn publish_order(
    producer: &FutureProducer,
    topics: &Topics,
    order: &OrderPlaced,
) -> anyhow::Result<()> {
    let traceparent = messaging::telemetry::new_traceparent();
    let trigger = TriggerRecord {
        message: OrderPlaced::TYPE_NAME,
        key: &order.order_id.to_string(),
        payload: &serde_json::to_vec(order)?,
        traceparent: Some(&traceparent),
    };
    trigger.publish(producer, &topics.orders()).await
}

/// A record that starts a saga, as a client publishes it.
pub(crate) struct TriggerRecord<'a> {
    /// The message's type, for errors.
    pub message: &'a str,
    /// The record's key: the saga's key, as its definition reads it from the message.
    pub key: &'a str,
    pub payload: &'a [u8],
    /// The trace the saga joins, when the client starts one (a `traceparent` header).
    pub traceparent: Option<&'a str>,
}

impl TriggerRecord<'_> {
    /// Publishes the record to `topic` (with the prefix) and waits for the broker's ack.
    pub(crate) async fn publish(
        &self,
        producer: &FutureProducer,
        topic: &str,
    ) -> anyhow::Result<()> {
        let mut record = FutureRecord::to(topic).key(self.key).payload(self.payload);
        if let Some(traceparent) = self.traceparent {
            record = record.headers(messaging::kafka::record_headers([(
                "traceparent",
                traceparent,
            )]));
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("publishing {} to {topic}", self.message))?;
        Ok(())
    }
}

/// A consumer positioned at the current end of every partition of `topic`, so it sees exactly
/// the events of the orders placed after this call.
async fn watch_from_end(args: &LoadArgs, topic: &str) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = messaging::kafka::connection_settings(&args.kafka)?
        .set("group.id", format!("sagactl-load-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", args.fetch_wait_max_ms.to_string())
        .create()
        .context("creating consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("reading topic metadata")?;
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (_, high) = consumer
            .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
            .context("reading watermarks")?;
        assignment.add_partition_offset(topic, partition.id(), Offset::Offset(high))?;
    }
    if assignment.count() == 0 {
        bail!("topic {topic} has no partitions; is the orchestrator running with this prefix?");
    }
    consumer
        .assign(&assignment)
        .context("assigning partitions")?;
    Ok(consumer)
}

async fn watch_events(
    consumer: StreamConsumer,
    tally: Arc<Mutex<Tally>>,
    in_flight: Arc<Semaphore>,
    expected: usize,
) {
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(e) => {
                eprintln!("receiving saga events failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(Ok(envelope)) = message.payload().map(Envelope::<SagaEvent>::from_json) else {
            continue;
        };
        let mut tally = tally.lock().await;
        let completed = matches!(envelope.body, SagaEvent::SagaCompleted { .. });
        let outcome = match &envelope.body {
            SagaEvent::SagaStarted { .. } => continue,
            SagaEvent::SagaCompleted { .. } => &mut tally.completed,
            SagaEvent::SagaCompensated { .. } => &mut tally.compensated,
            SagaEvent::SagaFailed { .. } => &mut tally.failed,
        };
        *outcome += 1;
        // The load places orders, so a saga's key is its order id; another saga type's key
        // is no order of this run.
        let order_id = Uuid::parse_str(envelope.body.key()).ok();
        if let Some(sent) = order_id.and_then(|id| tally.sent_at.remove(&id)) {
            tally.latencies.push(sent.elapsed());
            tally.finished_at.push((Instant::now(), completed));
            in_flight.add_permits(1);
        }
        if tally.latencies.len() >= expected {
            // Closing an assign-only consumer can block for a long time against some brokers
            // (rust-rdkafka issue 509); the report does not need to wait for it.
            std::thread::spawn(move || drop(consumer));
            return;
        }
    }
}

/// Publishes `request` to the deployment's `returns` topic, keyed by return id.
pub(crate) async fn publish_return(
    producer: &FutureProducer,
    topics: &Topics,
    request: &events::ReturnRequested,
) -> anyhow::Result<()> {
    let trigger = TriggerRecord {
        message: events::ReturnRequested::TYPE_NAME,
        key: &request.return_id.to_string(),
        payload: &serde_json::to_vec(request)?,
        traceparent: None,
    };
    trigger.publish(producer, &topics.named("returns")).await
}

/// The step a failing order is built to fail at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FailAt {
    /// Stock, payment and shipping in equal parts.
    Any,
    /// An unknown SKU: refused at once, nothing to compensate.
    Stock,
    /// A declined payment: the stock reservation is released.
    Payment,
    /// A denied destination: the payment is refunded and the reservation released.
    Shipping,
}

/// An order of one item from the demo data; `failure_percent` of them are built to be
/// compensated (unknown stock, a declined payment, or a denied destination, in equal parts).
pub(crate) fn random_order(failure_percent: u8) -> OrderPlaced {
    random_order_failing_at(failure_percent, FailAt::Any)
}

/// Like [`random_order`], with the failing orders failing at `fail_at`.
pub(crate) fn random_order_failing_at(failure_percent: u8, fail_at: FailAt) -> OrderPlaced {
    spread_order(failure_percent, fail_at, 0)
}

/// Like [`random_order_failing_at`]; with `spread` > 0 every order's customer and SKU are one
/// of the `spread` of the load's own ([`seed_spread`]), picked at random: a declined payment
/// is a customer of the poor kind, the other failures fail as with the demo data.
pub(crate) fn spread_order(failure_percent: u8, fail_at: FailAt, spread: u32) -> OrderPlaced {
    let mut rng = rand::thread_rng();
    // None: an order built to complete; Some(0, 1, 2): to fail at stock, payment, shipping.
    let failing_step = (rng.gen_range(0..100) < failure_percent).then(|| match fail_at {
        FailAt::Any => rng.gen_range(0..3),
        FailAt::Stock => 0,
        FailAt::Payment => 1,
        FailAt::Shipping => 2,
    });
    let alice_or_bob = rng.gen_bool(0.5);
    // The demo data's customer and SKU, whether the customer cannot pay, whether the SKU is
    // stocked, and the destination.
    let (customer, poor, sku, stocked, country) = match failing_step {
        Some(0) => ("alice", false, "SOLDOUT", false, "DE"),
        Some(1) => ("carol", true, "WIDGET", true, "DE"),
        Some(_) => ("bob", false, "GADGET", true, "AQ"),
        None if alice_or_bob => ("alice", false, "WIDGET", true, "DE"),
        None => ("bob", false, "GADGET", true, "FR"),
    };
    let (customer, sku) = match spread {
        0 => (customer.to_owned(), sku.to_owned()),
        n => {
            let kind = if poor {
                spread_poor_customer
            } else {
                spread_customer
            };
            let sku = if stocked {
                spread_sku(rng.gen_range(0..n))
            } else {
                sku.to_owned()
            };
            (kind(rng.gen_range(0..n)), sku)
        }
    };
    OrderPlaced {
        order_id: Uuid::new_v4(),
        customer_id: customer,
        items: vec![LineItem {
            sku,
            quantity: 1,
            unit_price_cents: ORDER_CENTS,
        }],
        total_cents: ORDER_CENTS,
        currency: "EUR".into(),
        shipping_address: Address {
            country: country.into(),
            city: "Berlin".into(),
            line1: "Unter den Linden 1".into(),
            postal_code: "10117".into(),
        },
    }
}

/// What every order of the load costs (one item).
const ORDER_CENTS: i64 = 1_000;

/// A spread customer who can pay for every order of any run.
fn spread_customer(index: u32) -> String {
    format!("spread-customer-{index}")
}

/// A spread customer whose balance is below one order's total: the payment is declined.
fn spread_poor_customer(index: u32) -> String {
    format!("spread-poor-{index}")
}

/// A spread SKU with stock for every order of any run.
fn spread_sku(index: u32) -> String {
    format!("SPREAD-{index}")
}

/// Adds the `spread` customers (each also of the poor kind) and SKUs to the deployment's
/// database, as the demo data's migrations add theirs; ones already there are kept.
async fn seed_spread(database_url: &str, spread: u32) -> anyhow::Result<()> {
    let db = sqlx::PgPool::connect(database_url)
        .await
        .context("connecting to --database-url to add the spread's customers and SKUs")?;
    let names = |name: fn(u32) -> String| -> Vec<String> { (0..spread).map(name).collect() };
    sqlx::query(
        "INSERT INTO inventory.stock (sku, available) \
         SELECT sku, 100000000 FROM unnest($1::text[]) AS sku ON CONFLICT (sku) DO NOTHING",
    )
    .bind(names(spread_sku))
    .execute(&db)
    .await
    .context("adding the spread's SKUs to inventory.stock")?;
    sqlx::query(
        "INSERT INTO payment.accounts (customer_id, balance_cents, currency) \
         SELECT customer, balance, 'EUR' \
         FROM unnest($1::text[], $2::bigint[]) AS a (customer, balance) \
         ON CONFLICT (customer_id) DO NOTHING",
    )
    .bind(
        names(spread_customer)
            .into_iter()
            .chain(names(spread_poor_customer))
            .collect::<Vec<_>>(),
    )
    .bind(
        std::iter::repeat_n(100_000_000_000_i64, spread as usize)
            .chain(std::iter::repeat_n(ORDER_CENTS / 2, spread as usize))
            .collect::<Vec<_>>(),
    )
    .execute(&db)
    .await
    .context("adding the spread's customers to payment.accounts")?;
    db.close().await;
    Ok(())
}

/// The sums of the `outbox_backlog` and `kafka_consumer_lag` gauges on a service's page at the
/// `end`, and the means of its hop histograms in milliseconds over what they recorded
/// `during` the run.
fn backlog(name: &str, end: &Page, during: &Page) -> Backlog {
    let mean_ms = |histogram: &str| {
        let count = during.sum(&format!("{histogram}_count"));
        if count > 0.0 {
            during.sum(&format!("{histogram}_sum")) * 1_000.0 / count
        } else {
            0.0
        }
    };
    Backlog {
        name: name.to_owned(),
        outbox_rows: end.sum("outbox_backlog"),
        consumer_lag: end.sum("kafka_consumer_lag"),
        mean_handle_ms: mean_ms("message_handle_duration_seconds"),
        mean_delivery_ms: mean_ms("kafka_record_delivery_seconds"),
        mean_pickup_ms: mean_ms("outbox_pickup_seconds"),
        mean_publish_ms: mean_ms("outbox_publish_seconds"),
    }
}

/// The `q` quantile (0 to 1, nearest rank) of `sorted`, in milliseconds; 0 when empty.
pub(crate) fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1_000.0
}

fn report(args: &LoadArgs, tally: &Tally, elapsed: Duration, started: Instant) -> Report {
    let mut latencies = tally.latencies.clone();
    latencies.sort();
    let at = |q: f64| percentile_ms(&latencies, q);
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    Report {
        orders: args.orders,
        finished: latencies.len(),
        completed: tally.completed,
        compensated: tally.compensated,
        failed: tally.failed,
        unfinished: args.orders.saturating_sub(latencies.len()),
        mode: match args.rate {
            Some(rate) => format!("open loop, {rate} orders/s"),
            None => format!("closed loop, {} in flight", args.in_flight),
        },
        elapsed_secs: secs,
        finished_per_sec: latencies.len() as f64 / secs,
        completed_per_sec: tally.completed as f64 / secs,
        sustained_completed_per_sec: sustained_rate(tally, started, args.warmup_secs),
        processes: Vec::new(),
        sql: None,
        kafka: Vec::new(),
        backlog_at_end: Vec::new(),
        work: Vec::new(),
        latency_ms: Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        },
    }
}

/// Completed sagas per second from the end of the warm-up to the last finish; over the whole
/// run when it was shorter than twice the warm-up.
fn sustained_rate(tally: &Tally, started: Instant, warmup_secs: f64) -> f64 {
    let Some(last) = tally.finished_at.iter().map(|(at, _)| *at).max() else {
        return 0.0;
    };
    let run_secs = (last - started).as_secs_f64();
    let warmup = if run_secs > 2.0 * warmup_secs {
        Duration::from_secs_f64(warmup_secs)
    } else {
        Duration::ZERO
    };
    let from = started + warmup;
    let completed = tally
        .finished_at
        .iter()
        .filter(|(at, completed)| *completed && *at >= from)
        .count();
    completed as f64 / (last - from).as_secs_f64().max(f64::EPSILON)
}

fn print_report(r: &Report) {
    println!("mode              {}", r.mode);
    println!(
        "orders            {} (finished {}, unfinished {})",
        r.orders, r.finished, r.unfinished
    );
    println!(
        "outcomes          completed {}, compensated {}, failed {}",
        r.completed, r.compensated, r.failed
    );
    println!("elapsed           {:.2} s", r.elapsed_secs);
    println!(
        "throughput        {:.1} finished/s, {:.1} completed/s",
        r.finished_per_sec, r.completed_per_sec
    );
    println!(
        "sustained         {:.1} completed/s after warm-up",
        r.sustained_completed_per_sec
    );
    let l = &r.latency_ms;
    println!(
        "latency (ms)      p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    for p in &r.processes {
        println!(
            "process           {:<15} cpu {:>7.2} s  {:>6.2} ms/saga  peak rss {:>6.1} MB",
            p.name, p.cpu_secs, p.cpu_ms_per_saga, p.peak_rss_mb
        );
    }
    if let Some(sql) = &r.sql {
        println!(
            "sql               {:.1} transactions/saga, {:.1} statements/saga",
            sql.transactions_per_saga, sql.statements_per_saga
        );
        for s in &sql.top_statements {
            println!(
                "  {:>6.2}/saga  {:>6.3} ms  {}",
                s.calls_per_saga,
                s.mean_ms,
                s.query.chars().take(110).collect::<String>()
            );
        }
    }
    for t in &r.kafka {
        println!(
            "kafka             {:<40} {:>5.2} records/saga  {:>7.0} bytes/saga",
            t.topic, t.records_per_saga, t.bytes_per_saga
        );
    }
    for b in &r.backlog_at_end {
        println!(
            "backlog at end    {:<15} outbox {:>6}  consumer lag {:>6}",
            b.name, b.outbox_rows, b.consumer_lag
        );
    }
    for b in &r.backlog_at_end {
        println!(
            "hop means (ms)    {:<15} delivered {:>6.2}  handled {:>6.2}  picked up {:>6.2}  acked {:>6.2}",
            b.name, b.mean_delivery_ms, b.mean_handle_ms, b.mean_pickup_ms, b.mean_publish_ms
        );
    }
    work::print(&r.work);
}

#[cfg(test)]
mod tests {
    use super::{random_order_failing_at, spread_order, FailAt};

    #[test]
    fn failing_orders_fail_at_the_chosen_step() {
        for _ in 0..50 {
            let order = random_order_failing_at(100, FailAt::Payment);
            assert_eq!(order.customer_id, "carol", "declined: carol has 5.00");
            assert_eq!(order.items[0].sku, "WIDGET");
            assert_eq!(order.shipping_address.country, "DE");
            let order = random_order_failing_at(100, FailAt::Shipping);
            assert_eq!(order.shipping_address.country, "AQ");
            let order = random_order_failing_at(100, FailAt::Stock);
            assert_eq!(order.items[0].sku, "SOLDOUT");
            let order = random_order_failing_at(0, FailAt::Payment);
            assert_ne!(order.customer_id, "carol");
            assert!(order.validate().is_ok());
        }
    }

    #[test]
    fn spread_orders_use_the_spread_customers_and_skus() {
        let mut customers = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let order = spread_order(0, FailAt::Any, 8);
            assert!(order.customer_id.starts_with("spread-customer-"));
            assert!(order.items[0].sku.starts_with("SPREAD-"));
            assert!(order.validate().is_ok());
            customers.insert(order.customer_id);
            let declined = spread_order(100, FailAt::Payment, 8);
            assert!(declined.customer_id.starts_with("spread-poor-"));
            let denied = spread_order(100, FailAt::Shipping, 8);
            assert_eq!(denied.shipping_address.country, "AQ");
            assert!(denied.items[0].sku.starts_with("SPREAD-"));
        }
        assert_eq!(customers.len(), 8, "every spread customer gets orders");
    }
}
