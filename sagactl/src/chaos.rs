//! The chaos suite: runs the orchestrator and the three participants as separate OS processes,
//! places orders while SIGKILLing and restarting random services, waits for every saga to
//! settle, then checks from the services' own tables that nothing was lost or done twice.
//! It can SIGKILL and restart the broker too, and reports how long the failures stalled the
//! sagas (the time a group needs to move a dead member's partitions shows there).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use events::Topics;
use messaging::config::GroupProtocol;
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::load::{publish_order, random_order};

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    /// Kafka bootstrap servers (the broker must be running).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// PostgreSQL server URL without a database name; the run creates its own database.
    #[arg(
        long,
        env = "CHAOS_DATABASE_SERVER",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    database_server: String,
    /// Directory with the orchestrator, inventory, payment and shipping binaries.
    #[arg(long, default_value = "target/debug")]
    bin_dir: PathBuf,
    /// Sagas to run.
    #[arg(long, default_value_t = 300)]
    sagas: usize,
    /// Orders placed per second.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Orchestrator instances (one consumer group; they divide the sagas by partition).
    #[arg(long, default_value_t = 2)]
    orchestrators: usize,
    /// Percentage of orders built to be compensated.
    #[arg(long, default_value_t = 30)]
    failure_percent: u8,
    /// SIGKILL a random service this often, in milliseconds (0: never).
    #[arg(long, default_value_t = 1500)]
    kill_every_ms: u64,
    /// How long a killed service stays down before it is restarted, in milliseconds.
    #[arg(long, default_value_t = 300)]
    down_ms: u64,
    /// Give up when the sagas have not settled this long after the last kill, in seconds.
    #[arg(long, default_value_t = 180)]
    settle_timeout_secs: u64,
    /// Also crash every service (abort) right after every N-th message it handles has
    /// committed, before the offset is stored (0: never). Exercises the window between a
    /// handler's commit and its messages reaching Kafka.
    #[arg(long, default_value_t = 0)]
    crash_after_commit_every: u64,
    /// SIGKILL the broker this often, in milliseconds, and start it again after
    /// --broker-down-ms (0: never). Needs a broker that --broker-script controls.
    #[arg(long, default_value_t = 0)]
    broker_kill_every_ms: u64,
    /// How long a killed broker stays down before it is started again, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    broker_down_ms: u64,
    /// The script that kills (`kill`) and starts (`start`) the broker at $BROKER_ADDR, which
    /// the run sets to the first of --brokers.
    #[arg(long, default_value = "scripts/broker.sh")]
    broker_script: PathBuf,
    /// Consumer-group protocol of every service (KAFKA_GROUP_PROTOCOL).
    #[arg(long, env = "KAFKA_GROUP_PROTOCOL", value_enum, default_value_t = GroupProtocol::default())]
    group_protocol: GroupProtocol,
    /// Dynamic group membership for the classic protocol too: no KAFKA_GROUP_INSTANCE_ID, so a
    /// restarted service joins as a new member (classic groups run static by default).
    #[arg(long)]
    dynamic_membership: bool,
    /// Keep the run's database and topics for inspection (a failed run always keeps them).
    #[arg(long)]
    keep: bool,
}

/// One process of the fleet: its name in reports, its binary, and its own settings.
struct Instance {
    name: String,
    binary: &'static str,
    env: Vec<(String, String)>,
}

struct Fleet {
    bin_dir: PathBuf,
    /// Settings every process gets.
    env: Vec<(String, String)>,
    instances: Vec<Instance>,
    children: BTreeMap<String, Child>,
    kills: BTreeMap<String, u32>,
    log_dir: PathBuf,
}

impl Fleet {
    async fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let instance = &self.instances[index];
        let binary = self.bin_dir.join(instance.binary);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{}.log", instance.name)))?;
        let child = Command::new(&binary)
            .envs(
                self.env
                    .iter()
                    .chain(&instance.env)
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.children.insert(instance.name.clone(), child);
        Ok(())
    }

    async fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        let name = self.instances[index].name.clone();
        if let Some(mut child) = self.children.remove(&name) {
            child.start_kill()?;
            child.wait().await?;
            *self.kills.entry(name).or_default() += 1;
        }
        Ok(())
    }

    /// Restarts every service that exited by itself (a crash, not one of our kills).
    async fn revive(&mut self) -> anyhow::Result<u32> {
        let mut revived = 0;
        for index in 0..self.instances.len() {
            let name = &self.instances[index].name;
            let exited = match self.children.get_mut(name) {
                Some(child) => child.try_wait()?.is_some(),
                None => true,
            };
            if exited {
                eprintln!("{name} had exited; restarting it");
                self.start(index).await?;
                revived += 1;
            }
        }
        Ok(revived)
    }

    async fn stop_all(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.children) {
            if let Some(pid) = child.id() {
                // SIGTERM first: the graceful path is part of what a run exercises.
                let _ = std::process::Command::new("kill")
                    .arg(pid.to_string())
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let database = format!("chaos_{id}");
    let prefix = format!("chaos-{id}.");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{}/postgres", args.database_server))
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&admin)
        .await?;
    let database_url = format!("{}/{database}", args.database_server);
    let log_dir = PathBuf::from(format!(".run/chaos-{id}"));
    std::fs::create_dir_all(&log_dir)?;
    eprintln!(
        "chaos run {id}: database {database}, topic prefix {prefix}, logs {}",
        log_dir.display()
    );

    // Orchestrators share one consumer group and divide the partitions between them.
    let mut instances = Vec::new();
    for n in 1..=args.orchestrators.max(1) {
        let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        instances.push(Instance {
            name: format!("orchestrator-{n}"),
            binary: "orchestrator",
            env: vec![("HTTP_ADDR".into(), format!("127.0.0.1:{http_port}"))],
        });
    }
    for participant in ["inventory", "payment", "shipping"] {
        instances.push(Instance {
            name: participant.into(),
            binary: participant,
            env: Vec::new(),
        });
    }
    // Static membership lets a restarted member of a classic group take its partitions back at
    // once. KIP-848 groups refuse a restarted member whose instance id the broker still holds
    // (until the dead one's session expires) with a fatal error, so they run dynamic.
    if !args.dynamic_membership && args.group_protocol == GroupProtocol::Classic {
        for instance in &mut instances {
            instance
                .env
                .push(("KAFKA_GROUP_INSTANCE_ID".into(), instance.name.clone()));
        }
    }
    let mut fleet = Fleet {
        bin_dir: args.bin_dir.clone(),
        env: vec![
            ("KAFKA_BROKERS".into(), args.brokers.clone()),
            ("TOPIC_PREFIX".into(), prefix.clone()),
            ("DATABASE_URL".into(), database_url.clone()),
            ("DATABASE_MAX_CONNECTIONS".into(), "4".into()),
            ("KAFKA_SESSION_TIMEOUT_MS".into(), "6000".into()),
            (
                "KAFKA_GROUP_PROTOCOL".into(),
                value_name(args.group_protocol),
            ),
            (
                "FAULT_CRASH_AFTER_COMMIT_EVERY".into(),
                args.crash_after_commit_every.to_string(),
            ),
        ],
        instances,
        children: BTreeMap::new(),
        kills: BTreeMap::new(),
        log_dir,
    };
    for index in 0..fleet.instances.len() {
        fleet.start(index).await?;
    }
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    wait_until_migrated(&db).await?;
    let initial = Snapshot::take(&db).await?;

    let topics = Topics::new(prefix.clone());
    let producer: FutureProducer =
        messaging::kafka::producer_settings(&args.brokers, 0).create()?;
    let broker_faults = (args.broker_kill_every_ms > 0).then(|| {
        BrokerFaults::spawn(
            &args.broker_script,
            args.brokers.split(',').next().unwrap_or_default(),
            Duration::from_millis(args.broker_kill_every_ms),
            Duration::from_millis(args.broker_down_ms),
        )
    });
    let placing_from = db_now(&db).await?;
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.01));
    let kill_every = (args.kill_every_ms > 0).then(|| Duration::from_millis(args.kill_every_ms));
    let mut next_kill = kill_every.map(|k| Instant::now() + k);
    let mut order_ids = Vec::with_capacity(args.sagas);
    let mut restarts = 0u32;
    // Processes that died by themselves (injected crashes), restarted by `revive`.
    let mut crashes = 0u32;
    for placed in 0..args.sagas {
        let order = random_order(args.failure_percent);
        // One order in ten is published twice: clients retry, and the engine must absorb it.
        for _ in 0..if placed % 10 == 0 { 2 } else { 1 } {
            publish_order(&producer, &topics, &order).await?;
        }
        order_ids.push(order.order_id);
        if let (Some(at), Some(every)) = (next_kill, kill_every) {
            if Instant::now() >= at {
                let victim = rand::thread_rng().gen_range(0..fleet.instances.len());
                fleet.kill(victim).await?;
                tokio::time::sleep(Duration::from_millis(
                    rand::thread_rng().gen_range(0..=args.down_ms),
                ))
                .await;
                fleet.start(victim).await?;
                restarts += 1;
                next_kill = Some(Instant::now() + every);
            }
        }
        crashes += fleet.revive().await?;
        if placed % 100 == 99 {
            eprintln!(
                "placed {}/{} orders, kills so far {:?}",
                placed + 1,
                args.sagas,
                fleet.kills
            );
        }
        tokio::time::sleep(interval).await;
    }
    let placing_until = db_now(&db).await?;
    let broker_kills = match broker_faults {
        Some(faults) => faults.stop().await?,
        None => 0,
    };
    let last_kill = Instant::now();
    eprintln!(
        "all {} orders placed in {:.1} s; waiting for the sagas to settle",
        args.sagas,
        started.elapsed().as_secs_f64()
    );

    let settle_deadline = last_kill + Duration::from_secs(args.settle_timeout_secs);
    let settled = loop {
        crashes += fleet.revive().await?;
        let (sagas, unfinished): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state NOT IN ('completed', 'compensated', 'failed')) \
             FROM orchestrator.sagas",
        )
        .fetch_one(&db)
        .await?;
        if sagas >= i64::try_from(args.sagas)? && unfinished == 0 {
            break true;
        }
        if Instant::now() > settle_deadline {
            eprintln!("not settled: {sagas} sagas exist, {unfinished} unfinished");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let settle_time = last_kill.elapsed();
    // Let the relays drain the last events before the books are checked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.stop_all().await;

    let checks = check_invariants(&db, &initial, &order_ids).await?;
    let duplicates = Duplicates::count(&db).await?;
    let stalls = Stalls::measure(&db, placing_from, placing_until).await?;
    println!("chaos run {id}");
    println!("sagas run          {}", args.sagas);
    println!("group protocol     {}", value_name(args.group_protocol));
    println!("kills              {:?}", fleet.kills);
    println!("broker kills       {broker_kills}");
    println!("restarts           {restarts} after kills, {crashes} after crashes");
    println!(
        "settled            {settled} ({:.1} s after the last kill)",
        settle_time.as_secs_f64()
    );
    println!("outcomes           {}", checks.outcomes);
    println!(
        "duplicates         {} duplicate orders absorbed, {} replies ignored by fencing, {} messages redelivered into an inbox",
        duplicates.orders, duplicates.ignored_replies, duplicates.redelivered
    );
    println!(
        "saga duration      p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (placed to finished)",
        stalls.saga_p50_ms, stalls.saga_p99_ms, stalls.saga_max_ms
    );
    println!(
        "longest stall      {} (the longest a service handled nothing while orders were placed)",
        stalls
            .longest_gap_secs
            .iter()
            .map(|(service, secs)| format!("{service} {secs:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut failed = !settled;
    let mut passes = 0;
    for (name, passed, detail) in &checks.results {
        println!(
            "{:<6} {name}: {detail}",
            if *passed { "PASS" } else { "FAIL" }
        );
        failed |= !passed;
        passes += usize::from(*passed);
    }
    println!(
        "chaos: {passes} passed, {} failed",
        checks.results.len() - passes
    );
    db.close().await;
    if !args.keep && !failed {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
            .execute(&admin)
            .await?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .create()?;
        let names = topics.all();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if let Err(e) = admin.delete_topics(&names, &AdminOptions::new()).await {
            eprintln!("deleting the run's topics failed: {e}");
        }
    }
    if failed {
        bail!("chaos run {id}: invariants violated or sagas unsettled");
    }
    Ok(())
}

async fn wait_until_migrated(db: &PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready: Option<bool> = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM inventory.stock) AND EXISTS (SELECT 1 FROM payment.accounts) \
             AND to_regclass('shipping.shipments') IS NOT NULL AND to_regclass('orchestrator.sagas') IS NOT NULL",
        )
        .fetch_one(db)
        .await
        .ok();
        if ready == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the services did not create their tables within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stock per SKU and balance per customer.
struct Snapshot {
    stock: BTreeMap<String, i64>,
    balances: BTreeMap<String, i64>,
}

impl Snapshot {
    async fn take(db: &PgPool) -> anyhow::Result<Self> {
        let stock: Vec<(String, i64)> =
            sqlx::query_as("SELECT sku, available::bigint FROM inventory.stock")
                .fetch_all(db)
                .await?;
        let balances: Vec<(String, i64)> =
            sqlx::query_as("SELECT customer_id, balance_cents FROM payment.accounts")
                .fetch_all(db)
                .await?;
        Ok(Self {
            stock: stock.into_iter().collect(),
            balances: balances.into_iter().collect(),
        })
    }
}

struct Checks {
    outcomes: String,
    results: Vec<(&'static str, bool, String)>,
}

async fn count(db: &PgPool, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(db).await?)
}

async fn check_invariants(
    db: &PgPool,
    initial: &Snapshot,
    order_ids: &[Uuid],
) -> anyhow::Result<Checks> {
    let mut results = Vec::new();
    let by_state: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM orchestrator.sagas GROUP BY state ORDER BY state",
    )
    .fetch_all(db)
    .await?;
    let outcomes = by_state
        .iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", ");

    let missing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM UNNEST($1::uuid[]) AS placed (order_id) \
         WHERE NOT EXISTS (SELECT 1 FROM orchestrator.sagas s WHERE s.order_id = placed.order_id)",
    )
    .bind(order_ids)
    .fetch_one(db)
    .await?;
    let total = count(db, "SELECT count(*) FROM orchestrator.sagas").await?;
    results.push((
        "one saga per order, none lost",
        missing == 0 && total == i64::try_from(order_ids.len())?,
        format!(
            "{} orders placed, {total} sagas, {missing} orders without a saga",
            order_ids.len()
        ),
    ));
    let unfinished = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas WHERE state NOT IN ('completed', 'compensated', 'failed')",
    )
    .await?;
    let failed_without_reason = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas WHERE state = 'failed' AND failure_reason IS NULL",
    )
    .await?;
    results.push((
        "every saga terminal",
        unfinished == 0 && failed_without_reason == 0,
        format!("{unfinished} not terminal, {failed_without_reason} failed without a reason"),
    ));

    let completed_wrong = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas s WHERE s.state = 'completed' AND NOT ( \
           (SELECT count(*) FROM inventory.reservations r WHERE r.order_id = s.order_id AND r.status = 'reserved') = 1 \
           AND (SELECT count(*) FROM payment.payments p WHERE p.order_id = s.order_id AND p.status = 'charged' \
                AND p.amount_cents = (s.order_data->>'total_cents')::bigint) = 1 \
           AND (SELECT count(*) FROM shipping.shipments h WHERE h.order_id = s.order_id) = 1)",
    )
    .await?;
    results.push((
        "completed: one reservation, one charge of the total, one shipment",
        completed_wrong == 0,
        format!("{completed_wrong} completed sagas break it"),
    ));
    let compensated_wrong = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas s WHERE s.state = 'compensated' AND ( \
           EXISTS (SELECT 1 FROM inventory.reservations r WHERE r.order_id = s.order_id AND r.status = 'reserved') \
           OR EXISTS (SELECT 1 FROM payment.payments p WHERE p.order_id = s.order_id AND p.status = 'charged') \
           OR EXISTS (SELECT 1 FROM shipping.shipments h WHERE h.order_id = s.order_id))",
    )
    .await?;
    results.push((
        "compensated: no reservation held, no net charge, no shipment",
        compensated_wrong == 0,
        format!("{compensated_wrong} compensated sagas break it"),
    ));

    let held: Vec<(String, i64)> = sqlx::query_as(
        "SELECT l.sku, sum(l.quantity)::bigint FROM inventory.reservation_lines l \
         JOIN inventory.reservations r USING (order_id) WHERE r.status = 'reserved' GROUP BY l.sku",
    )
    .fetch_all(db)
    .await?;
    let held: BTreeMap<String, i64> = held.into_iter().collect();
    let now = Snapshot::take(db).await?;
    let stock_broken: Vec<String> = initial
        .stock
        .iter()
        .filter(|(sku, before)| {
            now.stock.get(*sku).copied().unwrap_or(0) + held.get(*sku).copied().unwrap_or(0)
                != **before
        })
        .map(|(sku, _)| sku.clone())
        .collect();
    results.push((
        "stock conserved: initial = current + reserved, per SKU",
        stock_broken.is_empty(),
        format!(
            "{} SKUs checked, broken: {stock_broken:?}",
            initial.stock.len()
        ),
    ));
    let charged: Vec<(String, i64)> = sqlx::query_as(
        "SELECT customer_id, sum(amount_cents)::bigint FROM payment.payments WHERE status = 'charged' GROUP BY customer_id",
    )
    .fetch_all(db)
    .await?;
    let charged: BTreeMap<String, i64> = charged.into_iter().collect();
    let money_broken: Vec<String> = initial
        .balances
        .iter()
        .filter(|(c, before)| {
            now.balances.get(*c).copied().unwrap_or(0) + charged.get(*c).copied().unwrap_or(0)
                != **before
        })
        .map(|(c, _)| c.clone())
        .collect();
    results.push((
        "money conserved: initial = balance + net charges, per customer",
        money_broken.is_empty(),
        format!(
            "{} customers checked, broken: {money_broken:?}",
            initial.balances.len()
        ),
    ));
    let applied_twice = count(
        db,
        "SELECT count(*) FROM (SELECT message_id FROM orchestrator.saga_history \
         WHERE decision = 'applied' GROUP BY message_id HAVING count(*) > 1) twice",
    )
    .await?;
    let steps_twice = count(
        db,
        "SELECT (SELECT count(*) FROM (SELECT order_id FROM inventory.reservations GROUP BY order_id HAVING count(*) > 1) a) \
              + (SELECT count(*) FROM (SELECT order_id FROM payment.payments GROUP BY order_id HAVING count(*) > 1) b) \
              + (SELECT count(*) FROM (SELECT order_id FROM shipping.shipments GROUP BY order_id HAVING count(*) > 1) c)",
    )
    .await?;
    results.push((
        "no message applied twice",
        applied_twice == 0 && steps_twice == 0,
        format!("{applied_twice} replies applied twice, {steps_twice} steps done twice"),
    ));
    Ok(Checks { outcomes, results })
}

struct Duplicates {
    orders: i64,
    ignored_replies: i64,
    redelivered: i64,
}

impl Duplicates {
    async fn count(db: &PgPool) -> anyhow::Result<Self> {
        let orders = count(
            db,
            "SELECT count(*) FROM orchestrator.saga_history WHERE message_type = 'OrderPlaced' AND decision = 'ignored'",
        )
        .await?;
        let ignored_replies = count(
            db,
            "SELECT count(*) FROM orchestrator.saga_history WHERE message_type <> 'OrderPlaced' AND decision = 'ignored'",
        )
        .await?;
        // Every inbox row counts its deliveries; all but the first were absorbed.
        let redelivered = count(
            db,
            "SELECT (SELECT coalesce(sum(deliveries - 1), 0) FROM orchestrator.inbox) \
                  + (SELECT coalesce(sum(deliveries - 1), 0) FROM inventory.inbox) \
                  + (SELECT coalesce(sum(deliveries - 1), 0) FROM payment.inbox) \
                  + (SELECT coalesce(sum(deliveries - 1), 0) FROM shipping.inbox)",
        )
        .await?;
        Ok(Self {
            orders,
            ignored_replies,
            redelivered,
        })
    }
}

/// The name a clap value enum has on the command line and in environment variables.
fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

async fn db_now(db: &PgPool) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(db).await?)
}

/// Kills and restarts the broker in the background while orders are placed.
struct BrokerFaults {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<u32>>,
}

impl BrokerFaults {
    fn spawn(script: &std::path::Path, address: &str, every: Duration, down: Duration) -> Self {
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let (script, address) = (script.to_owned(), address.to_owned());
        let task = tokio::spawn(async move {
            let mut kills = 0;
            loop {
                // A stop ends the wait at once; a kill in progress finishes with the restart.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopping.changed() => return Ok(kills),
                }
                eprintln!("killing the broker (SIGKILL)");
                broker_control(&script, &address, "kill").await?;
                kills += 1;
                tokio::time::sleep(down).await;
                broker_control(&script, &address, "start").await?;
            }
        });
        Self { stop, task }
    }

    /// Stops killing; returns once the broker is up again, with the number of kills.
    async fn stop(self) -> anyhow::Result<u32> {
        // The task may have ended with an error already; its result says so.
        let _ = self.stop.send(true);
        self.task.await?
    }
}

/// Runs `script action` for the broker at `address`.
async fn broker_control(
    script: &std::path::Path,
    address: &str,
    action: &str,
) -> anyhow::Result<()> {
    let status = Command::new(script)
        .arg(action)
        .env("BROKER_ADDR", address)
        .stdout(Stdio::null())
        .status()
        .await
        .with_context(|| format!("running {} {action}", script.display()))?;
    if !status.success() {
        bail!("{} {action} failed: {status}", script.display());
    }
    Ok(())
}

/// How much the failures slowed the sagas down.
struct Stalls {
    saga_p50_ms: f64,
    saga_p99_ms: f64,
    saga_max_ms: f64,
    /// Per service: the longest time between two messages it handled (or the start or end of
    /// placing orders) while orders were being placed, so messages were waiting for it.
    longest_gap_secs: Vec<(&'static str, f64)>,
}

impl Stalls {
    async fn measure(
        db: &PgPool,
        from: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Self> {
        let (saga_p50_ms, saga_p99_ms, saga_max_ms): (f64, f64, f64) = sqlx::query_as(
            "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0), \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0), \
                    coalesce(max(ms), 0) \
             FROM (SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 AS ms \
                   FROM orchestrator.sagas WHERE finished_at IS NOT NULL) d",
        )
        .fetch_one(db)
        .await?;
        let mut longest_gap_secs = Vec::new();
        for service in ["orchestrator", "inventory", "payment", "shipping"] {
            let gap: f64 = sqlx::query_scalar(&format!(
                "SELECT coalesce(max(gap), 0) FROM ( \
                   SELECT extract(epoch FROM at - lag(at) OVER (ORDER BY at))::float8 AS gap \
                   FROM (SELECT received_at AS at FROM {service}.inbox WHERE received_at BETWEEN $1 AND $2 \
                         UNION ALL SELECT $1 UNION ALL SELECT $2) handled) g"
            ))
            .bind(from)
            .bind(until)
            .fetch_one(db)
            .await?;
            longest_gap_secs.push((service, gap));
        }
        Ok(Self {
            saga_p50_ms,
            saga_p99_ms,
            saga_max_ms,
            longest_gap_secs,
        })
    }
}
