//! The chaos suite: runs the orchestrator and the participants as separate OS processes, places
//! orders and returns of them while SIGKILLing and restarting random services, waits for every
//! saga to settle, then checks from the services' own tables that nothing was lost or done twice.
//! It can SIGKILL and restart the broker too, restart PostgreSQL, and mix garbage into every
//! consumed topic (then checking the dead-letter topic and the throughput, `garbage.rs`), and
//! reports how long the failures stalled the sagas (the time a group needs to move a dead
//! member's partitions shows there). The services, their topics and the steps each ledger
//! answers for come from the saga definitions (`deployment.rs`); the generic invariant, each
//! saga's steps against the participants' ledgers, is `ledgers.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use events::Topics;
use messaging::config::GroupProtocol;
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureProducer;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::broker_nodes::{NodeFaults, NodeOutages};
use crate::deployment::{Deployment, ORCHESTRATOR};
use crate::garbage::{DeadLetterReader, GarbageFaults, GarbageKind, Target};
use crate::load::{publish_order, publish_return, random_order};
use crate::topic_faults::TopicFaults;

/// The saga types the run's workload starts (orders, and returns of them); the definitions
/// must have both.
const WORKLOAD_SAGAS: [&str; 2] = ["order", "return"];

/// Every how many orders a return of an earlier one is requested.
const RETURN_EVERY: usize = 4;
/// How many orders back the returned one was placed (so that most are finished by then).
const RETURN_LAG: usize = 8;

/// A return of `order`: one item of it, one more than it took for one return in five (refused
/// at the restock), and asking more than its charge (so refused at the refund) for one return in
/// three. A SOLDOUT order's item comes back as a WIDGET, which it did not take either.
fn return_of(order: &events::OrderPlaced, n: usize) -> events::ReturnRequested {
    let (sku, took) = match order.items.first() {
        Some(item) if item.sku != "SOLDOUT" => (item.sku.as_str(), item.quantity),
        _ => ("WIDGET", 1),
    };
    events::ReturnRequested {
        return_id: Uuid::new_v4(),
        order_id: order.order_id,
        customer_id: order.customer_id.clone(),
        items: vec![events::ReturnItem {
            sku: sku.into(),
            quantity: if n % 5 == 1 { took + 1 } else { 1 },
        }],
        refund_cents: if n % 3 == 2 {
            order.total_cents + 1
        } else {
            order.total_cents / 2
        },
        currency: order.currency.clone(),
    }
}

/// Which of `placed` (every order so far) the `n`-th return names: mostly the one placed
/// RETURN_LAG before the latest; one in five the latest of those built to be undone after they
/// reserved stock (declined at payment: carol; refused at shipping: AQ; as
/// `load::random_order_failing_at` builds them), so returns meet released
/// reservations (or reach one before its release); one in seven the order the return before it
/// named, so several returns of one order add up.
fn returned_order(placed: &[events::OrderPlaced], n: usize) -> &events::OrderPlaced {
    let lagged = placed.len().saturating_sub(RETURN_LAG + 1);
    let earlier = placed.len().saturating_sub(RETURN_EVERY);
    if n % 7 == 6 && earlier > RETURN_LAG {
        return returned_order(&placed[..earlier], n - 1);
    }
    let undone_after_reserving = |order: &&events::OrderPlaced| {
        order.customer_id == "carol" || order.shipping_address.country == "AQ"
    };
    if n % 5 == 3 {
        if let Some(undone) = placed[..=lagged].iter().rev().find(undone_after_reserving) {
            return undone;
        }
    }
    &placed[lagged]
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    kafka: messaging::config::KafkaConnection,
    /// Run each service as its own identity on a secured cluster: a directory of librdkafka
    /// client properties, one `<service>.properties` per service (the orchestrator's and each
    /// participant's, as `BROKER_NODES=3 scripts/broker.sh` writes them in .run/cluster/clients),
    /// given to that service as KAFKA_CLIENT_PROPERTIES. The run's topics and ACLs are then
    /// created first by --kafka-provision-script with the run's own --kafka-client-properties
    /// (the admin identity; it also publishes the orders and the garbage and reads the DLQ);
    /// the services have no right to create topics. Unset: every service gets the run's own
    /// properties and creates its topics.
    #[arg(long)]
    kafka_identities: Option<PathBuf>,
    /// The admin step that creates a prefix's topics and ACLs (called with the prefix, and
    /// KAFKA_BROKERS, KAFKA_ADMIN_PROPERTIES, SAGACTL and SAGAS_DIR set), for
    /// --kafka-identities.
    #[arg(long, default_value = "scripts/provision-kafka.sh")]
    kafka_provision_script: PathBuf,
    /// PostgreSQL server URL without a database name; the run creates its own database.
    #[arg(
        long,
        env = "CHAOS_DATABASE_SERVER",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    database_server: String,
    /// Directory with the orchestrator's and the participants' binaries: one per participant
    /// the saga definitions name, called by its name.
    #[arg(long, default_value = "target/debug")]
    bin_dir: PathBuf,
    /// The saga definitions (`*.toml`): the orchestrators run them, and the run starts, kills
    /// and fills with garbage the participants they name, and checks every step they define
    /// against its participant's ledger.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    sagas_dir: PathBuf,
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
    /// the run sets to the first of --kafka-brokers; with --broker-nodes 3 it kills and starts
    /// one node (`kill-node N`, `start-node N`, with BROKER_NODES=3).
    #[arg(long, default_value = "scripts/broker.sh")]
    broker_script: PathBuf,
    /// Nodes of the cluster --broker-kill-every-ms acts on: 1 (the broker, SIGKILLed whole) or
    /// 3 (`BROKER_NODES=3 scripts/broker.sh`'s cluster: one node SIGKILLed at a time, by turns
    /// the leader of the busiest partitions and the active controller, each once every replica
    /// of the run's topics is in sync again; see `broker_nodes.rs`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    broker_nodes: u8,
    /// The three-node cluster's directory (its nodes' quorum state tells the active
    /// controller).
    #[arg(long, env = "KAFKA_CLUSTER_DIR", default_value = ".run/cluster")]
    broker_cluster_dir: PathBuf,
    /// With --broker-nodes 3: after this many one-node kills, the next broker fault takes two
    /// of the three nodes down at once (the busiest leader and the controller) for
    /// --broker-two-down-ms: below min.insync.replicas, producers wait; nothing may be lost
    /// (0: never). When the orders are all placed before it came, it comes then, with the
    /// sagas still in flight.
    #[arg(long, default_value_t = 0)]
    broker_two_down_after: usize,
    /// How long the two nodes stay down, in milliseconds.
    #[arg(long, default_value_t = 15000)]
    broker_two_down_ms: u64,
    /// Stop PostgreSQL this often, in milliseconds, and start it again after --postgres-down-ms
    /// (0: never). Needs a server that --postgres-script controls; every client of that server
    /// loses its connections, not only this run's services.
    #[arg(long, default_value_t = 0)]
    postgres_restart_every_ms: u64,
    /// How long a stopped PostgreSQL stays down before it is started again, in milliseconds
    /// (stopping and starting add about half a second).
    #[arg(long, default_value_t = 1500)]
    postgres_down_ms: u64,
    /// The script that stops (`stop`: fast, every client disconnected at once) and starts
    /// (`start`) PostgreSQL on $PGPORT, which the run sets to the port of --database-server.
    #[arg(long, default_value = "scripts/postgres.sh")]
    postgres_script: PathBuf,
    /// Turn PostgreSQL read-only this often, in milliseconds, and writable again after
    /// --postgres-read-only-ms (0: never): every write fails with SQLSTATE 25006, as during a
    /// failover or on a full disk, while connections stay up. Server-wide, through
    /// --postgres-script (`read-only`, `writable`): every client of the server is refused
    /// writes, not only this run's services. A valid trigger must wait, not be dead-lettered.
    #[arg(long, default_value_t = 0)]
    postgres_read_only_every_ms: u64,
    /// How long PostgreSQL stays read-only each time, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    postgres_read_only_ms: u64,
    /// Publish a hostile record this often, in milliseconds, in the second half of the run
    /// (0: never).
    ///
    /// The records go round-robin to every topic the services consume (each saga type's
    /// trigger topic and each participant's command topic, from the saga definitions, and
    /// saga.replies), and are all unusable (see --garbage-kinds). At the end the run reads
    /// saga.dlq to its end and checks that each garbage record is there exactly once (by the
    /// dlq.source.* headers) and nothing else is, and says for each kind what happened to those
    /// that are not: never consumed, copy stuck in an outbox, started a saga, copied twice.
    ///
    /// Throughput: the orders are placed in two halves, open loop at the same --rate (orders go
    /// out on time even while the broker is down) and under the same faults, the first without
    /// garbage (the baseline), the second with it. The broker and PostgreSQL fault schedules
    /// start over at the half, so each half has its outages at the same times from its start;
    /// service kills and crashes are random in both. A half's throughput is 90% of its sagas
    /// divided by the time from its first order until 90% of them had finished: a stall the
    /// garbage causes (a wedged consumer or relay) counts in full, even after the half, while
    /// the last tenth, where one saga waiting out a step deadline would decide, is left out.
    /// The check passes when 90% of the garbage half's sagas finished and its throughput is
    /// at least half the baseline's. Below the fleet's capacity both halves run at about
    /// --rate, and what the check catches is garbage that stalls the flow; with --rate above
    /// capacity it compares capacities. Broker kills need to be rarer than once per half plus
    /// the outage (the broker is back in 6-10 s, its clients up to 10 s later), or the fleet
    /// gets too little done between them for a rate to mean anything.
    #[arg(long, default_value_t = 0)]
    garbage_every_ms: u64,
    /// Which garbage to publish, comma separated (default: every kind).
    #[arg(long, value_enum, value_delimiter = ',')]
    garbage_kinds: Vec<GarbageKind>,
    /// Consumer-group protocol of every service (KAFKA_GROUP_PROTOCOL).
    #[arg(long, env = "KAFKA_GROUP_PROTOCOL", value_enum, default_value_t = GroupProtocol::default())]
    group_protocol: GroupProtocol,
    /// Dynamic group membership for the classic protocol too: no KAFKA_GROUP_INSTANCE_ID, so a
    /// restarted service joins as a new member (classic groups run static by default).
    #[arg(long)]
    dynamic_membership: bool,
    /// Delete one command topic the saga definitions name (chosen at random per run) this
    /// often, in milliseconds, while the orders are placed, and create it again after
    /// --topic-down-ms (0: never). The commands on it when it goes are lost with it and sent
    /// again by the step deadlines, which the run shortens to 3 s (at most 10 s) meanwhile;
    /// garbage is not sent to that topic (`topic_faults.rs`).
    #[arg(long, default_value_t = 0)]
    topic_delete_every_ms: u64,
    /// How long a deleted topic stays away before it is created again, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    topic_down_ms: u64,
    /// Keep the run's database and topics for inspection (a failed run always keeps them).
    #[arg(long)]
    keep: bool,
}

/// One process of the fleet: its name in reports, its binary, and its own settings.
struct Instance {
    name: String,
    binary: String,
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
        let binary = self.bin_dir.join(&instance.binary);
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
    if args.broker_nodes == 2 {
        bail!("--broker-nodes must be 1 or 3");
    }
    let deployment = Deployment::load(&args.sagas_dir)?;
    for saga in WORKLOAD_SAGAS {
        deployment.saga(saga)?;
    }
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
            name: format!("{ORCHESTRATOR}-{n}"),
            binary: ORCHESTRATOR.into(),
            // The chaos run reads the tables, not the API: open, on loopback only.
            env: vec![
                (
                    "SAGAS_DIR".into(),
                    args.sagas_dir.to_string_lossy().into_owned(),
                ),
                ("HTTP_ADDR".into(), format!("127.0.0.1:{http_port}")),
                ("API_OPEN_ON_LOOPBACK".into(), "true".into()),
                ("API_DATABASE_CONNECTIONS".into(), "1".into()),
            ],
        });
    }
    for participant in &deployment.participants {
        instances.push(Instance {
            name: participant.name.clone(),
            binary: participant.name.clone(),
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
    let mut fleet_env: Vec<(String, String)> = Vec::new();
    match &args.kafka_identities {
        // Each service as itself: the orchestrators share the orchestrator's identity.
        Some(dir) => {
            provision_kafka(&args, &prefix).await?;
            for instance in &mut instances {
                let properties = dir.join(format!("{}.properties", instance.binary));
                if !properties.is_file() {
                    bail!(
                        "--kafka-identities: no client properties for {} at {}",
                        instance.binary,
                        properties.display()
                    );
                }
                instance.env.push((
                    messaging::access::CLIENT_PROPERTIES_SETTING.into(),
                    properties.display().to_string(),
                ));
            }
        }
        None => {
            if let Some(properties) = &args.kafka.kafka_client_properties {
                fleet_env.push((
                    messaging::access::CLIENT_PROPERTIES_SETTING.into(),
                    properties.display().to_string(),
                ));
            }
        }
    }
    let mut fleet = Fleet {
        bin_dir: args.bin_dir.clone(),
        env: vec![
            ("KAFKA_BROKERS".into(), args.kafka.kafka_brokers.clone()),
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
        ]
        .into_iter()
        .chain(fleet_env)
        .collect(),
        instances,
        children: BTreeMap::new(),
        kills: BTreeMap::new(),
        log_dir,
    };
    let deleted_topic = deleted_topic(&args, &deployment, &mut fleet);
    for index in 0..fleet.instances.len() {
        fleet.start(index).await?;
    }
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    wait_until_migrated(&db, &deployment).await?;
    let initial = Snapshot::take(&db).await?;

    let topics = Topics::new(prefix.clone());
    let producer: FutureProducer = messaging::kafka::producer_settings(&args.kafka, 0)?.create()?;
    // One saga through every service before the clock starts, so that the first half of the
    // run does not pay for the consumers' first group joins.
    let warmup = random_order(0);
    publish_order(&producer, &topics, &warmup).await?;
    wait_until_finished(&db, warmup.order_id).await;
    let mut broker_faults = spawn_broker_faults(&args);
    let mut node_faults = spawn_node_faults(&args, &prefix)?;
    let mut node_outages = NodeOutages::default();
    let mut postgres_faults = spawn_postgres_faults(&args)?;
    let mut read_only_faults = spawn_read_only_faults(&args)?;
    let topic_faults = spawn_topic_faults(&args, &topics, deleted_topic.as_deref())?;
    let mut broker_outages = Outages::default();
    let mut postgres_outages = Outages::default();
    let mut read_only_outages = Outages::default();
    let garbage_kinds = if args.garbage_kinds.is_empty() {
        GarbageKind::value_variants().to_vec()
    } else {
        args.garbage_kinds.clone()
    };
    // With garbage, the first half of the orders is the baseline and the second half runs with
    // garbage; the throughput check compares the two.
    let baseline_orders = if args.garbage_every_ms > 0 {
        args.sagas / 2
    } else {
        args.sagas
    };
    let mut garbage: Option<GarbageFaults> = None;
    let placing_from = chrono::Utc::now();
    let mut garbage_from = None;
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.01));
    let kill_every = (args.kill_every_ms > 0).then(|| Duration::from_millis(args.kill_every_ms));
    let mut next_kill = kill_every.map(|k| Instant::now() + k);
    let mut order_ids = Vec::with_capacity(args.sagas + 1);
    // When each order and return was published (its first copy): the broker fault windows'
    // latencies count from here, so a trigger held in the producer during an outage counts.
    let mut placed_at: Vec<(Uuid, chrono::DateTime<chrono::Utc>)> =
        Vec::with_capacity(args.sagas * 2);
    order_ids.push(warmup.order_id);
    // Returns of earlier orders go out beside the orders, one for every RETURN_EVERY of them.
    let mut placed_orders = Vec::with_capacity(args.sagas);
    let mut return_ids = Vec::with_capacity(args.sagas / RETURN_EVERY + 1);
    let mut publishing = Vec::with_capacity(args.sagas);
    let mut restarts = 0u32;
    // Processes that died by themselves (injected crashes), restarted by `revive`.
    let mut crashes = 0u32;
    for placed in 0..args.sagas {
        if placed == baseline_orders && args.garbage_every_ms > 0 {
            // Both halves get the same server faults: their schedules start over here (once an
            // outage in progress has ended), so each half sees its broker kills and PostgreSQL
            // restarts at the same times from its start.
            if let Some(faults) = broker_faults.take() {
                broker_outages.add(faults.stop().await?);
                broker_faults = spawn_broker_faults(&args);
            }
            if let Some(faults) = node_faults.take() {
                node_outages.add(faults.stop().await?);
                node_faults = spawn_node_faults(&args, &prefix)?;
            }
            if let Some(faults) = postgres_faults.take() {
                postgres_outages.add(faults.stop().await?);
                postgres_faults = spawn_postgres_faults(&args)?;
            }
            if let Some(faults) = read_only_faults.take() {
                read_only_outages.add(faults.stop().await?);
                read_only_faults = spawn_read_only_faults(&args)?;
            }
            eprintln!(
                "baseline done ({placed} orders); publishing garbage every {} ms from now",
                args.garbage_every_ms
            );
            garbage_from = Some(chrono::Utc::now());
            garbage = Some(GarbageFaults::spawn(
                crate::garbage::producer(&args.kafka)?,
                topics.clone(),
                garbage_targets(&deployment, deleted_topic.as_deref()),
                garbage_kinds.clone(),
                Duration::from_millis(args.garbage_every_ms),
            ));
        }
        let order = random_order(args.failure_percent);
        // One order in ten is published twice: clients retry, and the engine must absorb it.
        // Open loop: orders go out at --rate whether or not the broker is up (the producer
        // queues them meanwhile), so both halves of a run last as long and get the same faults.
        for _ in 0..if placed % 10 == 0 { 2 } else { 1 } {
            let (producer, topics, order) = (producer.clone(), topics.clone(), order.clone());
            publishing.push(tokio::spawn(async move {
                publish_order(&producer, &topics, &order).await
            }));
        }
        order_ids.push(order.order_id);
        placed_at.push((order.order_id, chrono::Utc::now()));
        placed_orders.push(order);
        if placed % RETURN_EVERY == RETURN_EVERY - 1 && placed >= RETURN_LAG {
            let n = return_ids.len();
            let request = return_of(returned_order(&placed_orders, n), n);
            // Like orders, one return in ten is requested twice.
            for _ in 0..if return_ids.len() % 10 == 0 { 2 } else { 1 } {
                let (producer, topics, request) =
                    (producer.clone(), topics.clone(), request.clone());
                publishing.push(tokio::spawn(async move {
                    publish_return(&producer, &topics, &request).await
                }));
            }
            return_ids.push(request.return_id);
            placed_at.push((request.return_id, chrono::Utc::now()));
        }
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
    let placing_until = chrono::Utc::now();
    // The servers come back before the garbage stops: a send in flight waits for the broker.
    if let Some(faults) = broker_faults {
        broker_outages.add(faults.stop().await?);
    }
    if let Some(faults) = node_faults {
        node_outages.add(faults.stop().await?);
    }
    if let Some(faults) = postgres_faults {
        postgres_outages.add(faults.stop().await?);
    }
    if let Some(faults) = read_only_faults {
        read_only_outages.add(faults.stop().await?);
    }
    let topic_outages = match topic_faults {
        Some(faults) => Some(faults.stop().await?),
        None => None,
    };
    let garbage = match garbage {
        Some(garbage) => Some(garbage.stop().await?),
        None => None,
    };
    for published in publishing {
        published.await??;
    }
    let last_kill = Instant::now();
    eprintln!(
        "all {} orders placed in {:.1} s; waiting for the sagas to settle",
        args.sagas,
        started.elapsed().as_secs_f64()
    );

    let settle_deadline = last_kill + Duration::from_secs(args.settle_timeout_secs);
    let mut database_down = false;
    let saga_keys: Vec<Uuid> = order_ids.iter().chain(&return_ids).copied().collect();
    let settled = loop {
        crashes += fleet.revive().await?;
        // The run's own pool rides out a PostgreSQL restart like the services do.
        match settle_progress(&db, &saga_keys).await {
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
    let settle_time = last_kill.elapsed();
    // The garbage's copies may trail the sagas (a participant's topic can lag behind): wait for
    // every one to reach the dead-letter topic, at most until the settle deadline.
    let mut dead_letters = match &garbage {
        Some(log) => {
            let mut reader = DeadLetterReader::new(&args.kafka, topics.dead_letters())?;
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
    let listening = if postgres_outages.lengths.is_empty() {
        None
    } else {
        Some(relays_listening(&db, fleet.instances.len()).await)
    };
    // Let the relays drain the last events before the books are checked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.stop_all().await;
    wait_for_database(&db).await?;

    let audit = match (&garbage, &mut dead_letters) {
        (Some(log), Some(reader)) => {
            // What the services published while they stopped.
            tokio::task::block_in_place(|| reader.read_to_end(Duration::from_secs(60)))?;
            Some(crate::garbage::audit(log, reader, &db, &args.kafka, &prefix, &deployment).await?)
        }
        _ => None,
    };
    let [order_saga, return_saga] = WORKLOAD_SAGAS;
    let garbage_sagas = |saga| audit.as_ref().map_or(&[][..], |a| a.garbage_sagas(saga));
    let mut checks = check_invariants(&db, &initial, &order_ids, garbage_sagas(order_saga)).await?;
    checks
        .results
        .extend(check_returns(&db, &return_ids, garbage_sagas(return_saga)).await?);
    let ledgers = crate::ledgers::check(&db, &deployment).await?;
    checks.results.push((
        "each saga's steps agree with the participants' ledgers (every saga type, every step)",
        ledgers.passed(),
        ledgers.describe(),
    ));
    let duplicates = Duplicates::count(&db, &deployment).await?;
    let stalls = Stalls::measure(&db, &deployment, placing_from, placing_until).await?;
    let timeline = Throughput::timeline(&db, &order_ids, placing_from).await?;
    let mut fault_windows = Vec::new();
    for fault in &node_outages.faults {
        fault_windows.push((
            fault,
            FaultWindow::measure(
                &db,
                &deployment,
                &placed_at,
                &[(fault.killed_at, fault.back_at)],
                (placing_from, placing_until),
                true,
            )
            .await?,
        ));
    }
    let mut nodes_down = Vec::new();
    for down in [1, 2] {
        let windows = node_outages.windows(down);
        if !windows.is_empty() {
            nodes_down.push((
                down,
                FaultWindow::measure(
                    &db,
                    &deployment,
                    &placed_at,
                    &windows,
                    (placing_from, placing_until),
                    true,
                )
                .await?,
            ));
        }
    }
    // The same measures for the sagas that met no broker fault, to compare with.
    let unfaulted = if node_outages.faults.is_empty() {
        None
    } else {
        let all: Vec<_> = node_outages
            .faults
            .iter()
            .map(|f| (f.killed_at, f.back_at))
            .collect();
        Some(
            FaultWindow::measure(
                &db,
                &deployment,
                &placed_at,
                &all,
                (placing_from, placing_until),
                false,
            )
            .await?,
        )
    };
    if let Some(listening) = listening {
        checks.results.push((
            "every outbox relay LISTENs again after the PostgreSQL restarts",
            listening >= i64::try_from(fleet.instances.len())?,
            format!(
                "{listening} of {} services listen for outbox notifications after {} restarts",
                fleet.instances.len(),
                postgres_outages.lengths.len()
            ),
        ));
    }
    if let Some(check) = empty_dlq_check(&args, &topics, &topic_outages, garbage.is_some()) {
        checks.results.push(check);
    }
    if let (Some(audit), Some(garbage_from)) = (&audit, garbage_from) {
        checks.results.push((
            "garbage: every record in the DLQ exactly once, nothing else there",
            audit.passed,
            audit.detail.clone(),
        ));
        let now = chrono::Utc::now();
        let baseline =
            Throughput::phase(&db, &order_ids[1..=baseline_orders], placing_from, now).await?;
        let with_garbage =
            Throughput::phase(&db, &order_ids[baseline_orders + 1..], garbage_from, now).await?;
        let ratio = with_garbage.rate / baseline.rate.max(f64::MIN_POSITIVE);
        checks.results.push((
            "throughput with garbage at least half the baseline",
            with_garbage.reached && ratio >= 0.5,
            format!(
                "baseline {}, with garbage {}: {ratio:.2} of the baseline; offered {:.1}/s",
                baseline.describe(),
                with_garbage.describe(),
                args.rate
            ),
        ));
    }
    println!("chaos run {id}");
    println!(
        "sagas run          {} orders (and one warm-up saga before them), {} returns of them",
        args.sagas,
        return_ids.len()
    );
    println!("group protocol     {}", value_name(args.group_protocol));
    println!("kills              {:?}", fleet.kills);
    println!("broker kills       {}", broker_outages.describe());
    if args.broker_nodes == 3 {
        println!("broker node faults {}", node_outages.summary());
        for (fault, window) in &fault_windows {
            println!("  {}; {}", fault.describe(), window.describe());
        }
        for (down, window) in &nodes_down {
            println!(
                "{:<18} {}",
                if *down == 1 {
                    "one node down"
                } else {
                    "two nodes down"
                },
                window.describe()
            );
        }
        if let Some(window) = &unfaulted {
            println!("{:<18} {}", "no node down", window.describe());
        }
    }
    println!("postgres restarts  {}", postgres_outages.describe());
    println!("postgres read-only {}", read_only_outages.describe());
    if let Some(outages) = &topic_outages {
        println!("topic deletions    {}", outages.describe());
    }
    if let Some(log) = &garbage {
        println!(
            "garbage            {} records ({} kinds) from {:.1} s on, every {} ms",
            log.sent.len() + log.unconfirmed.len(),
            garbage_kinds.len(),
            garbage_from
                .map(|at| (at - placing_from).num_milliseconds() as f64 / 1000.0)
                .unwrap_or_default(),
            args.garbage_every_ms
        );
    }
    println!("restarts           {restarts} after kills, {crashes} after crashes");
    println!(
        "settled            {settled} ({:.1} s after the last kill)",
        settle_time.as_secs_f64()
    );
    println!("outcomes           {}", checks.outcomes);
    println!(
        "duplicates         {} duplicate orders and returns absorbed, {} replies ignored by fencing, {} messages redelivered into an inbox",
        duplicates.triggers, duplicates.ignored_replies, duplicates.redelivered
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
    println!(
        "finished per s     {} (per {} s from the first order; offered {:.1}/s)",
        timeline.join(" "),
        Throughput::BUCKET_SECS,
        args.rate
    );
    if let Some(audit) = &audit {
        for line in &audit.per_kind {
            println!("garbage kind       {line}");
        }
    }
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
        let admin: AdminClient<DefaultClientContext> =
            messaging::kafka::connection_settings(&args.kafka)?.create()?;
        // The sagas' topics: their triggers, the participants' commands, the engine's.
        let mut names: Vec<String> = deployment
            .saga_topics()
            .iter()
            .map(|t| topics.named(t))
            .collect();
        names.extend(topics.engine());
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

/// The admin step for the run's prefix (--kafka-identities): its topics (with the cluster's
/// replication) and every identity's ACLs, created with the run's own (admin) properties.
async fn provision_kafka(args: &ChaosArgs, prefix: &str) -> anyhow::Result<()> {
    let Some(admin) = &args.kafka.kafka_client_properties else {
        bail!("--kafka-identities needs --kafka-client-properties: the admin identity that creates the run's topics and ACLs");
    };
    let began = Instant::now();
    let output = Command::new(&args.kafka_provision_script)
        .arg(prefix)
        .env("KAFKA_BROKERS", &args.kafka.kafka_brokers)
        .env("KAFKA_ADMIN_PROPERTIES", admin)
        .env("SAGACTL", std::env::current_exe()?)
        .env("SAGAS_DIR", &args.sagas_dir)
        .stdout(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", args.kafka_provision_script.display()))?;
    if !output.status.success() {
        bail!(
            "{} {prefix} failed ({}): {}",
            args.kafka_provision_script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    eprintln!(
        "provisioned the run's topics and ACLs in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}

/// SIGKILLs the broker every --broker-kill-every-ms, if set (one broker; three nodes:
/// [`spawn_node_faults`]).
fn spawn_broker_faults(args: &ChaosArgs) -> Option<ServerFaults> {
    (args.broker_kill_every_ms > 0 && args.broker_nodes == 1).then(|| {
        ServerFaults::spawn(
            "the broker (SIGKILL)",
            Control {
                script: args.broker_script.clone(),
                env: vec![(
                    "BROKER_ADDR".into(),
                    args.kafka
                        .kafka_brokers
                        .split(',')
                        .next()
                        .unwrap_or_default()
                        .into(),
                )],
                down_action: "kill",
                up_action: "start",
            },
            Duration::from_millis(args.broker_kill_every_ms),
            Duration::from_millis(args.broker_down_ms),
        )
    })
}

/// SIGKILLs one node of the three-node cluster at a time (and two once) every
/// --broker-kill-every-ms, if set with --broker-nodes 3.
fn spawn_node_faults(args: &ChaosArgs, prefix: &str) -> anyhow::Result<Option<NodeFaults>> {
    if args.broker_kill_every_ms == 0 || args.broker_nodes != 3 {
        return Ok(None);
    }
    NodeFaults::spawn(
        crate::broker_nodes::Plan {
            script: args.broker_script.clone(),
            every: Duration::from_millis(args.broker_kill_every_ms),
            down: Duration::from_millis(args.broker_down_ms),
            two_down_after: args.broker_two_down_after,
            two_down: Duration::from_millis(args.broker_two_down_ms),
            cluster_dir: args.broker_cluster_dir.clone(),
            topic_prefix: prefix.to_owned(),
        },
        &args.kafka,
    )
    .map(Some)
}

/// Stops and starts PostgreSQL every --postgres-restart-every-ms, if set.
fn spawn_postgres_faults(args: &ChaosArgs) -> anyhow::Result<Option<ServerFaults>> {
    let fault = PostgresFault {
        what: "PostgreSQL (fast stop)",
        down_action: "stop",
        up_action: "start",
    };
    fault.spawn(args, args.postgres_restart_every_ms, args.postgres_down_ms)
}

/// Turns PostgreSQL read-only and writable again every --postgres-read-only-every-ms, if set.
fn spawn_read_only_faults(args: &ChaosArgs) -> anyhow::Result<Option<ServerFaults>> {
    let fault = PostgresFault {
        what: "PostgreSQL (read-only)",
        down_action: "read-only",
        up_action: "writable",
    };
    fault.spawn(
        args,
        args.postgres_read_only_every_ms,
        args.postgres_read_only_ms,
    )
}

/// A fault of the PostgreSQL server that --postgres-script brings about and undoes.
struct PostgresFault {
    what: &'static str,
    down_action: &'static str,
    up_action: &'static str,
}

impl PostgresFault {
    /// Runs the fault every `every_ms` for `down_ms` (never when `every_ms` is 0).
    fn spawn(
        self,
        args: &ChaosArgs,
        every_ms: u64,
        down_ms: u64,
    ) -> anyhow::Result<Option<ServerFaults>> {
        if every_ms == 0 {
            return Ok(None);
        }
        let port = PgConnectOptions::from_str(&args.database_server)?.get_port();
        Ok(Some(ServerFaults::spawn(
            self.what,
            Control {
                script: args.postgres_script.clone(),
                env: vec![("PGPORT".into(), port.to_string())],
                down_action: self.down_action,
                up_action: self.up_action,
            },
            Duration::from_millis(every_ms),
            Duration::from_millis(down_ms),
        )))
    }
}

/// The command topic --topic-delete-every-ms deletes (without the prefix), chosen for this run;
/// while it is, the services get the shorter step deadlines the fault needs.
fn deleted_topic(args: &ChaosArgs, deployment: &Deployment, fleet: &mut Fleet) -> Option<String> {
    if args.topic_delete_every_ms == 0 {
        return None;
    }
    let topic = crate::topic_faults::choose(deployment)?;
    fleet.env.extend(crate::topic_faults::service_env());
    Some(topic)
}

/// Deletes `topic` every --topic-delete-every-ms and creates it again after --topic-down-ms.
fn spawn_topic_faults(
    args: &ChaosArgs,
    topics: &Topics,
    topic: Option<&str>,
) -> anyhow::Result<Option<TopicFaults>> {
    let Some(topic) = topic else {
        return Ok(None);
    };
    TopicFaults::spawn(
        &args.kafka,
        topics.named(topic),
        Duration::from_millis(args.topic_delete_every_ms),
        Duration::from_millis(args.topic_down_ms),
    )
    .map(Some)
}

/// Without garbage every record the run sends is valid, so the dead-letter topic must stay
/// empty whatever the faults: a trigger or command dead-lettered because its topic was deleted
/// or PostgreSQL was read-only would show there. (With garbage, the garbage audit checks that
/// it holds nothing else.)
fn empty_dlq_check(
    args: &ChaosArgs,
    topics: &Topics,
    topic_outages: &Option<crate::topic_faults::TopicOutages>,
    garbage: bool,
) -> Option<(&'static str, bool, String)> {
    if garbage {
        return None;
    }
    let check = "no garbage sent: nothing reached the dead-letter topic";
    let faults = match topic_outages {
        Some(outages) => format!(
            " after {} deletions of {}",
            outages.lengths.len(),
            outages.topic
        ),
        None => String::new(),
    };
    Some(
        match crate::topic_faults::records_in(&args.kafka, &topics.dead_letters()) {
            Ok(records) => (
                check,
                records == 0,
                format!("{records} records in {}{faults}", topics.dead_letters()),
            ),
            Err(e) => (check, false, format!("cannot count them: {e:#}")),
        },
    )
}

/// Where garbage goes: every consumed topic but the one the topic fault deletes.
fn garbage_targets(deployment: &Deployment, deleted_topic: Option<&str>) -> Vec<Target> {
    match deleted_topic {
        Some(topic) => crate::topic_faults::spare(Target::all(deployment), topic),
        None => Target::all(deployment),
    }
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

/// How many connections of the run's database LISTEN for outbox notifications (one per
/// service), once there are `expected` or after 10 s.
async fn relays_listening(db: &PgPool, expected: usize) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN %'",
        )
        .fetch_one(db)
        .await
        .unwrap_or(0);
        if usize::try_from(listening).is_ok_and(|n| n >= expected) || Instant::now() > deadline {
            return listening;
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

/// Waits (at most a minute) until the saga of `order_id` has finished.
async fn wait_until_finished(db: &PgPool, order_id: Uuid) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let finished: Option<bool> = sqlx::query_scalar(
            "SELECT finished_at IS NOT NULL FROM orchestrator.sagas \
             WHERE definition_name = 'order' AND saga_key = $1::text",
        )
        .bind(order_id)
        .fetch_optional(db)
        .await
        .ok()
        .flatten();
        if finished == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the warm-up saga did not finish within a minute; going on");
}

/// Waits until every service has created its tables, and the demo stock and accounts the
/// business checks start from are in.
async fn wait_until_migrated(db: &PgPool, deployment: &Deployment) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let tables: String =
        std::iter::once(format!("to_regclass('{ORCHESTRATOR}.sagas') IS NOT NULL"))
            .chain(
                deployment
                    .participants
                    .iter()
                    .map(|p| format!("to_regclass('{}.step_ledger') IS NOT NULL", p.name)),
            )
            .collect::<Vec<_>>()
            .join(" AND ");
    let sql = format!(
        "SELECT {tables} AND EXISTS (SELECT 1 FROM inventory.stock) \
         AND EXISTS (SELECT 1 FROM payment.accounts) \
         AND to_regclass('shipping.shipments') IS NOT NULL \
         AND to_regclass('returns.return_lines') IS NOT NULL"
    );
    loop {
        // (Before the services' migrations, the query fails on a missing table.)
        let ready: Option<bool> = sqlx::query_scalar(&sql).fetch_one(db).await.ok();
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

/// `garbage_orders`: orders of garbage records that started a saga (the garbage check counts
/// them; here they are neither placed orders nor strays).
async fn check_invariants(
    db: &PgPool,
    initial: &Snapshot,
    order_ids: &[Uuid],
    garbage_orders: &[Uuid],
) -> anyhow::Result<Checks> {
    let mut results = Vec::new();
    let by_state: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state::text, count(*) FROM orchestrator.sagas GROUP BY state ORDER BY state::text",
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
         WHERE NOT EXISTS (SELECT 1 FROM orchestrator.sagas s \
                           WHERE s.definition_name = 'order' AND s.saga_key = placed.order_id::text)",
    )
    .bind(order_ids)
    .fetch_one(db)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator.sagas \
             WHERE definition_name = 'order' AND NOT saga_key = ANY($1::uuid[]::text[])",
    )
    .bind(garbage_orders)
    .fetch_one(db)
    .await?;
    results.push((
        "one saga per order, none lost",
        missing == 0 && total == i64::try_from(order_ids.len())?,
        format!(
            "{} orders placed, {total} sagas, {missing} orders without a saga{}",
            order_ids.len(),
            if garbage_orders.is_empty() {
                String::new()
            } else {
                format!(
                    " (and {} sagas started by garbage records: see the garbage check)",
                    garbage_orders.len()
                )
            }
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
        "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'order' AND s.state = 'completed' AND NOT ( \
           (SELECT count(*) FROM inventory.reservations r WHERE r.order_id::text = s.saga_key AND r.status = 'reserved') = 1 \
           AND (SELECT count(*) FROM payment.payments p WHERE p.order_id::text = s.saga_key AND p.status = 'charged' \
                AND p.amount_cents = (s.order_data->>'total_cents')::bigint) = 1 \
           AND (SELECT count(*) FROM shipping.shipments h WHERE h.order_id::text = s.saga_key) = 1)",
    )
    .await?;
    results.push((
        "completed: one reservation, one charge of the total, one shipment",
        completed_wrong == 0,
        format!("{completed_wrong} completed sagas break it"),
    ));
    let compensated_wrong = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'order' AND s.state = 'compensated' AND ( \
           EXISTS (SELECT 1 FROM inventory.reservations r WHERE r.order_id::text = s.saga_key AND r.status = 'reserved') \
           OR EXISTS (SELECT 1 FROM payment.payments p WHERE p.order_id::text = s.saga_key AND p.status = 'charged') \
           OR EXISTS (SELECT 1 FROM shipping.shipments h WHERE h.order_id::text = s.saga_key))",
    )
    .await?;
    results.push((
        "compensated: no reservation held, no net charge, no shipment",
        compensated_wrong == 0,
        format!("{compensated_wrong} compensated sagas break it"),
    ));

    let now = Snapshot::take(db).await?;
    results.push(stock_conserved(db, &initial.stock, &now.stock).await?);
    // A charge still standing counts less what its returns refunded; a charge paid back (its
    // order saga undone) counts nothing, its returns' refunds included (the order's refund paid
    // back only the rest).
    let charged: Vec<(String, i64)> = sqlx::query_as(
        "SELECT p.customer_id, sum(p.amount_cents - (SELECT coalesce(sum(r.amount_cents), 0) \
                                                     FROM payment.return_refunds r \
                                                     WHERE r.order_id = p.order_id))::bigint \
         FROM payment.payments p WHERE p.status = 'charged' GROUP BY p.customer_id",
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
        "money conserved: initial = balance + net charges (charges less their returns' refunds), per customer",
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

/// Stock conservation across orders and their returns, per SKU. What an order keeps of a SKU
/// is what it reserved, less what its release gave back, less what its returns put back and
/// did not undo; it is never below 0, and 0 once the reservation is released (an order undone
/// keeps nothing, whatever its returns did). Stock moves only by orders and returns, so per SKU
/// `current = initial − Σ what each order keeps (+ restocks naming no order, from before
/// inventory migration 1003)`: never above where it started, however many returns, over-returns
/// and returns of undone orders came. A standing restock of a SKU its order did not take breaks
/// it too.
async fn stock_conserved(
    db: &PgPool,
    initial: &BTreeMap<String, i64>,
    now: &BTreeMap<String, i64>,
) -> anyhow::Result<(&'static str, bool, String)> {
    // Per SKU: what orders keep, how many (order, SKU) keep less than 0 or, released, not 0.
    let kept: Vec<(String, i64, i64)> = sqlx::query_as(
        "WITH back AS (SELECT r.order_id, l.sku, sum(l.quantity) AS quantity \
                       FROM inventory.restocks r JOIN inventory.restock_lines l USING (return_id) \
                       WHERE r.status = 'restocked' AND r.order_id IS NOT NULL GROUP BY 1, 2), \
              kept AS (SELECT l.sku, s.status, \
                              l.quantity - l.released - coalesce(b.quantity, 0) AS kept \
                       FROM inventory.reservation_lines l \
                       JOIN inventory.reservations s USING (order_id) \
                       LEFT JOIN back b USING (order_id, sku)) \
         SELECT sku, sum(kept)::bigint, \
                count(*) FILTER (WHERE kept < 0 OR (status = 'released' AND kept <> 0)) \
         FROM kept GROUP BY sku",
    )
    .fetch_all(db)
    .await?;
    let beyond_order = count(
        db,
        "SELECT count(*) FROM inventory.restocks r JOIN inventory.restock_lines l USING (return_id) \
         WHERE r.status = 'restocked' AND r.order_id IS NOT NULL AND NOT EXISTS ( \
             SELECT 1 FROM inventory.reservation_lines o \
             WHERE o.order_id = r.order_id AND o.sku = l.sku)",
    )
    .await?;
    let unbound: Vec<(String, i64)> = sqlx::query_as(
        "SELECT l.sku, sum(l.quantity)::bigint FROM inventory.restocks r \
         JOIN inventory.restock_lines l USING (return_id) \
         WHERE r.status = 'restocked' AND r.order_id IS NULL GROUP BY l.sku",
    )
    .fetch_all(db)
    .await?;
    let unbound: BTreeMap<String, i64> = unbound.into_iter().collect();
    let over_kept: i64 = kept.iter().map(|(_, _, bad)| bad).sum();
    let kept: BTreeMap<String, i64> = kept.into_iter().map(|(sku, k, _)| (sku, k)).collect();
    let broken: Vec<String> = initial
        .iter()
        .filter(|(sku, before)| {
            let expected = **before - kept.get(*sku).copied().unwrap_or(0)
                + unbound.get(*sku).copied().unwrap_or(0);
            now.get(*sku).copied().unwrap_or(0) != expected
        })
        .map(|(sku, _)| sku.clone())
        .collect();
    Ok((
        "stock conserved: current = initial − what orders keep (reserved − released − returned, ≥ 0, 0 once released), per SKU",
        broken.is_empty() && over_kept == 0 && beyond_order == 0,
        format!(
            "{} SKUs checked, broken: {broken:?}; {over_kept} (order, SKU) returned beyond what was taken or kept after a release; {beyond_order} restocked lines of a SKU the order did not take",
            initial.len()
        ),
    ))
}

/// The return sagas' invariants: one saga per return; what a completed and a compensated one
/// left in the services' tables; no order refunded beyond its charge. `garbage_returns`: return
/// ids of garbage records that started a saga (the garbage check counts them).
async fn check_returns(
    db: &PgPool,
    return_ids: &[Uuid],
    garbage_returns: &[Uuid],
) -> anyhow::Result<Vec<(&'static str, bool, String)>> {
    let mut results = Vec::new();
    let missing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM UNNEST($1::uuid[]) AS requested (return_id) \
         WHERE NOT EXISTS (SELECT 1 FROM orchestrator.sagas s \
                           WHERE s.definition_name = 'return' \
                             AND s.saga_key = requested.return_id::text)",
    )
    .bind(return_ids)
    .fetch_one(db)
    .await?;
    let total: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orchestrator.sagas \
         WHERE definition_name = 'return' AND NOT saga_key = ANY($1::uuid[]::text[])",
    )
    .bind(garbage_returns)
    .fetch_one(db)
    .await?;
    results.push((
        "one saga per return, none lost",
        missing == 0 && total == i64::try_from(return_ids.len())?,
        format!(
            "{} returns requested, {total} return sagas, {missing} returns without a saga",
            return_ids.len()
        ),
    ));
    let completed_wrong = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'return' AND s.state = 'completed' AND NOT ( \
           (SELECT count(*) FROM returns.returns t WHERE t.return_id::text = s.saga_key AND t.status = 'received') = 1 \
           AND (SELECT count(*) FROM inventory.restocks r WHERE r.return_id::text = s.saga_key AND r.status = 'restocked') = 1 \
           AND (SELECT count(*) FROM payment.return_refunds f WHERE f.return_id::text = s.saga_key \
                AND f.amount_cents = (s.order_data->>'refund_cents')::bigint) = 1)",
    )
    .await?;
    results.push((
        "completed returns: received, restocked, refunded once in full",
        completed_wrong == 0,
        format!("{completed_wrong} completed return sagas break it"),
    ));
    let compensated_wrong = count(
        db,
        "SELECT count(*) FROM orchestrator.sagas s WHERE s.definition_name = 'return' AND s.state = 'compensated' AND ( \
           EXISTS (SELECT 1 FROM returns.returns t WHERE t.return_id::text = s.saga_key AND t.status = 'received') \
           OR EXISTS (SELECT 1 FROM inventory.restocks r WHERE r.return_id::text = s.saga_key AND r.status = 'restocked') \
           OR EXISTS (SELECT 1 FROM payment.return_refunds f WHERE f.return_id::text = s.saga_key))",
    )
    .await?;
    results.push((
        "compensated returns: not received, nothing restocked, nothing refunded",
        compensated_wrong == 0,
        format!("{compensated_wrong} compensated return sagas break it"),
    ));
    let over_refunded = count(
        db,
        "SELECT count(*) FROM payment.payments p \
         WHERE (SELECT coalesce(sum(r.amount_cents), 0) FROM payment.return_refunds r \
                WHERE r.order_id = p.order_id) > p.amount_cents",
    )
    .await?;
    let refunds_without_charge = count(
        db,
        "SELECT count(*) FROM payment.return_refunds r \
         WHERE NOT EXISTS (SELECT 1 FROM payment.payments p WHERE p.order_id = r.order_id)",
    )
    .await?;
    results.push((
        "no order refunded beyond its charge",
        over_refunded == 0 && refunds_without_charge == 0,
        format!(
            "{over_refunded} orders refunded more than charged, {refunds_without_charge} refunds without a charge"
        ),
    ));
    Ok(results)
}

struct Duplicates {
    /// Repeated orders and returns (a saga's history counts them on one line: `duplicates`).
    triggers: i64,
    ignored_replies: i64,
    redelivered: i64,
}

impl Duplicates {
    async fn count(db: &PgPool, deployment: &Deployment) -> anyhow::Result<Self> {
        let (triggers, ignored_replies): (i64, i64) = sqlx::query_as(&format!(
            "SELECT coalesce(sum(coalesce(duplicates, 1)) FILTER (WHERE message_type = ANY($1)), 0)::bigint, \
                    count(*) FILTER (WHERE NOT message_type = ANY($1)) \
             FROM {ORCHESTRATOR}.saga_history WHERE decision = 'ignored'"
        ))
        .bind(deployment.trigger_messages())
        .fetch_one(db)
        .await?;
        // Every inbox row counts its deliveries; all but the first were absorbed.
        let redelivered = count(
            db,
            &format!(
                "SELECT 0 {}",
                deployment
                    .services()
                    .map(|s| format!("+ (SELECT coalesce(sum(deliveries - 1), 0) FROM {s}.inbox)"))
                    .collect::<String>()
            ),
        )
        .await?;
        Ok(Self {
            triggers,
            ignored_replies,
            redelivered,
        })
    }
}

/// The name a clap value enum has on the command line and in environment variables.
pub(crate) fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// How a server is taken down and brought back: `script down_action` and `script up_action`,
/// with `env`.
struct Control {
    script: PathBuf,
    env: Vec<(String, String)>,
    down_action: &'static str,
    up_action: &'static str,
}

impl Control {
    async fn run(&self, action: &str) -> anyhow::Result<()> {
        let status = Command::new(&self.script)
            .arg(action)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .status()
            .await
            .with_context(|| format!("running {} {action}", self.script.display()))?;
        if !status.success() {
            bail!("{} {action} failed: {status}", self.script.display());
        }
        Ok(())
    }
}

/// A server's outages: how many, and how long each lasted from the moment it was taken down
/// until its start had returned.
#[derive(Debug, Default)]
struct Outages {
    lengths: Vec<Duration>,
    /// How long the script took to take the server down, and to start it.
    stopping: Vec<Duration>,
    starting: Vec<Duration>,
}

impl Outages {
    fn add(&mut self, more: Outages) {
        self.lengths.extend(more.lengths);
        self.stopping.extend(more.stopping);
        self.starting.extend(more.starting);
    }

    fn describe(&self) -> String {
        let Some(longest) = self.lengths.iter().max() else {
            return "0".into();
        };
        let mean = |times: &[Duration]| {
            times.iter().sum::<Duration>().as_secs_f64() / times.len().max(1) as f64
        };
        format!(
            "{} (down {:.1} s on average, {:.1} s at most; taking it down {:.1} s, starting it {:.1} s on average)",
            self.lengths.len(),
            mean(&self.lengths),
            longest.as_secs_f64(),
            mean(&self.stopping),
            mean(&self.starting),
        )
    }
}

/// Takes a server (the broker, PostgreSQL) down and up again in the background while orders
/// are placed.
struct ServerFaults {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<Outages>>,
}

impl ServerFaults {
    fn spawn(what: &'static str, control: Control, every: Duration, down: Duration) -> Self {
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut outages = Outages::default();
            loop {
                // A stop ends the wait at once; an outage in progress finishes with the start.
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopping.changed() => return Ok(outages),
                }
                eprintln!("taking down {what}");
                let began = Instant::now();
                control.run(control.down_action).await?;
                outages.stopping.push(began.elapsed());
                tokio::time::sleep(down).await;
                let starting = Instant::now();
                control.run(control.up_action).await?;
                outages.starting.push(starting.elapsed());
                outages.lengths.push(began.elapsed());
            }
        });
        Self { stop, task }
    }

    /// Stops the faults; returns once the server is up again, with its outages.
    async fn stop(self) -> anyhow::Result<Outages> {
        // The task may have ended with an error already; its result says so.
        let _ = self.stop.send(true);
        self.task.await?
    }
}

/// Sagas finished per second: of one phase of the run, and over time.
struct Throughput {
    sagas: usize,
    finished: i64,
    /// Whether [`Self::SHARE`] of the phase's sagas finished.
    reached: bool,
    /// From the phase's first order until that share had finished (or the end of the run).
    secs: f64,
    rate: f64,
}

impl Throughput {
    const BUCKET_SECS: i64 = 5;
    /// The share of a phase's sagas whose finishing times its throughput: the last ones are
    /// left out, so that one saga waiting out a step deadline does not decide it.
    const SHARE: f64 = 0.9;

    /// The throughput of the sagas of `order_ids`, placed from `from` on: [`Self::SHARE`] of
    /// them over the time from `from` until that many had finished, or, when fewer finished,
    /// those over the time until `now`.
    async fn phase(
        db: &PgPool,
        order_ids: &[Uuid],
        from: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Self> {
        let share = ((order_ids.len() as f64 * Self::SHARE).ceil() as i64).max(1);
        let finished: i64 = sqlx::query_scalar(
            "SELECT count(finished_at) FROM orchestrator.sagas WHERE saga_key = ANY($1::uuid[]::text[])",
        )
        .bind(order_ids)
        .fetch_one(db)
        .await?;
        let at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT finished_at FROM orchestrator.sagas \
             WHERE saga_key = ANY($1::uuid[]::text[]) AND finished_at IS NOT NULL \
             ORDER BY finished_at OFFSET $2 LIMIT 1",
        )
        .bind(order_ids)
        .bind(share - 1)
        .fetch_optional(db)
        .await?;
        let until = at.unwrap_or(now);
        let secs = (until - from).num_milliseconds().max(1) as f64 / 1000.0;
        let counted = if at.is_some() { share } else { finished };
        Ok(Self {
            sagas: order_ids.len(),
            finished,
            reached: at.is_some(),
            secs,
            rate: counted as f64 / secs,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{:.1}/s ({} of {} sagas finished; {:.1} s from its first order until {})",
            self.rate,
            self.finished,
            self.sagas,
            self.secs,
            if self.reached {
                format!("{:.0}% had finished", Self::SHARE * 100.0)
            } else {
                "the end of the run".into()
            }
        )
    }

    /// Sagas of `order_ids` finished per second, in buckets of [`Self::BUCKET_SECS`] from
    /// `from` on.
    async fn timeline(
        db: &PgPool,
        order_ids: &[Uuid],
        from: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<Vec<String>> {
        let buckets: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT greatest(floor(extract(epoch FROM finished_at - $2) / $3), 0)::int AS bucket, \
                    count(*) \
             FROM orchestrator.sagas WHERE saga_key = ANY($1::uuid[]::text[]) AND finished_at IS NOT NULL \
             GROUP BY bucket ORDER BY bucket",
        )
        .bind(order_ids)
        .bind(from)
        .bind(Self::BUCKET_SECS as f64)
        .fetch_all(db)
        .await?;
        let counts: BTreeMap<i32, i64> = buckets.into_iter().collect();
        let last = counts.keys().last().copied().unwrap_or(0);
        Ok((0..=last)
            .map(|bucket| {
                let n = counts.get(&bucket).copied().unwrap_or(0);
                format!("{:.1}", n as f64 / Self::BUCKET_SECS as f64)
            })
            .collect())
    }
}

/// How the sagas fared while broker nodes were down: those in flight at some time in the
/// windows (published before a window's end, finished after its start), timed from their
/// publication to their finish, and the longest any service handled nothing in a window.
struct FaultWindow {
    sagas: i64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The service that waited longest, and how long (a gap between two messages it handled
    /// that overlaps a window).
    longest_stall: Option<(String, f64)>,
}

impl FaultWindow {
    async fn measure(
        db: &PgPool,
        deployment: &Deployment,
        placed_at: &[(Uuid, chrono::DateTime<chrono::Utc>)],
        windows: &[(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)],
        (from, until): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>),
        inside: bool,
    ) -> anyhow::Result<Self> {
        let keys: Vec<String> = placed_at.iter().map(|(id, _)| id.to_string()).collect();
        let at: Vec<chrono::DateTime<chrono::Utc>> = placed_at.iter().map(|(_, at)| *at).collect();
        let starts: Vec<chrono::DateTime<chrono::Utc>> = windows.iter().map(|w| w.0).collect();
        let ends: Vec<chrono::DateTime<chrono::Utc>> = windows.iter().map(|w| w.1).collect();
        let (sagas, p50_ms, p99_ms, max_ms): (i64, f64, f64, f64) = sqlx::query_as(
            "WITH placed AS (SELECT * FROM unnest($1::text[], $2::timestamptz[]) AS p(key, at)), \
                  windows AS (SELECT * FROM unnest($3::timestamptz[], $4::timestamptz[]) AS w(since, until)), \
                  timed AS (SELECT extract(epoch FROM s.finished_at - p.at)::float8 * 1000 AS ms \
                            FROM placed p JOIN orchestrator.sagas s ON s.saga_key = p.key \
                            WHERE s.finished_at IS NOT NULL AND EXISTS \
                              (SELECT 1 FROM windows w WHERE p.at <= w.until AND s.finished_at >= w.since) = $5) \
             SELECT count(*), \
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), 0), \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), 0), \
                    coalesce(max(ms), 0) FROM timed",
        )
        .bind(&keys)
        .bind(&at)
        .bind(&starts)
        .bind(&ends)
        .bind(inside)
        .fetch_one(db)
        .await?;
        // Outside the windows (the baseline): no stall to measure.
        if !inside {
            return Ok(Self {
                sagas,
                p50_ms,
                p99_ms,
                max_ms,
                longest_stall: None,
            });
        }
        let mut longest_stall: Option<(String, f64)> = None;
        for service in deployment.services() {
            let gap: f64 = sqlx::query_scalar(&format!(
                "WITH windows AS (SELECT * FROM unnest($3::timestamptz[], $4::timestamptz[]) AS w(since, until)) \
                 SELECT coalesce(max(extract(epoch FROM at - previous)::float8), 0) FROM ( \
                   SELECT at, lag(at) OVER (ORDER BY at) AS previous \
                   FROM (SELECT received_at AS at FROM {service}.inbox WHERE received_at BETWEEN $1 AND $2 \
                         UNION ALL SELECT $1 UNION ALL SELECT $2) handled) g \
                 WHERE EXISTS (SELECT 1 FROM windows w WHERE g.previous <= w.until AND g.at >= w.since)"
            ))
            .bind(from)
            .bind(until)
            .bind(&starts)
            .bind(&ends)
            .fetch_one(db)
            .await?;
            if longest_stall
                .as_ref()
                .is_none_or(|(_, longest)| gap > *longest)
            {
                longest_stall = Some((service.to_owned(), gap));
            }
        }
        Ok(Self {
            sagas,
            p50_ms,
            p99_ms,
            max_ms,
            longest_stall,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} sagas in flight: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (published to finished); longest stall {}",
            self.sagas,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.longest_stall
                .as_ref()
                .map(|(service, secs)| format!("{secs:.1} s ({service})"))
                .unwrap_or_else(|| "-".into())
        )
    }
}

/// How much the failures slowed the sagas down.
struct Stalls {
    saga_p50_ms: f64,
    saga_p99_ms: f64,
    saga_max_ms: f64,
    /// Per service: the longest time between two messages it handled (or the start or end of
    /// placing orders) while orders were being placed, so messages were waiting for it.
    longest_gap_secs: Vec<(String, f64)>,
}

impl Stalls {
    async fn measure(
        db: &PgPool,
        deployment: &Deployment,
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
        for service in deployment.services() {
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
            longest_gap_secs.push((service.to_owned(), gap));
        }
        Ok(Self {
            saga_p50_ms,
            saga_p99_ms,
            saga_max_ms,
            longest_gap_secs,
        })
    }
}
