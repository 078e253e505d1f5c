//! The chaos suite's command line: what to run, how hard, and which faults.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use messaging::config::GroupProtocol;

use super::garbage::GarbageKind;
use super::link_faults::LinkFault;

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub(super) kafka: messaging::config::KafkaConnection,
    /// Run each service as its own identity on a secured cluster: a directory of librdkafka
    /// client properties, one `<service>.properties` per service (the orchestrator's and each
    /// participant's, as `BROKER_NODES=3 scripts/broker.sh` writes them in .run/cluster/clients),
    /// given to that service as KAFKA_CLIENT_PROPERTIES. The run's topics and ACLs are then
    /// created first by --kafka-provision-script with the run's own --kafka-client-properties
    /// (the admin identity; it also publishes the orders and the garbage and reads the DLQ);
    /// the services have no right to create topics. Unset: every service gets the run's own
    /// properties and creates its topics.
    #[arg(long)]
    pub(super) kafka_identities: Option<PathBuf>,
    /// The admin step that creates a prefix's topics and ACLs (called with the prefix, and
    /// KAFKA_BROKERS, KAFKA_ADMIN_PROPERTIES, SAGACTL and SAGAS_DIR set), for
    /// --kafka-identities.
    #[arg(long, default_value = "scripts/provision-kafka.sh")]
    pub(super) kafka_provision_script: PathBuf,
    /// PostgreSQL server URL without a database name; the run creates its own database.
    #[arg(
        long,
        env = "CHAOS_DATABASE_SERVER",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub(super) database_server: String,
    /// Run this participant (`payment`, ...) on a database of its own, repeatable: its
    /// instances get that database's URL as DATABASE_URL and migrate their schema there (the
    /// participant runtime's and messaging tables with it), everything else stays on the run's
    /// database, and the checks read each service's tables from the database it uses. The run
    /// creates it (`chaos_<id>_<participant>`, on --own-database-server) and drops it with its
    /// own.
    #[arg(long, value_name = "PARTICIPANT")]
    pub(super) own_database: Vec<String>,
    /// PostgreSQL server URL without a database name for the --own-database databases
    /// (default: --database-server). --network sets it to a second PostgreSQL of the run's own,
    /// on a host of its own (`pg2`).
    #[arg(long)]
    pub(super) own_database_server: Option<String>,
    /// Directory with the orchestrator's and the participants' binaries: one per participant
    /// the saga definitions name, called by its name.
    #[arg(long, default_value = "target/debug")]
    pub(super) bin_dir: PathBuf,
    /// The saga definitions (`*.toml`): the orchestrators run them, and the run starts, kills
    /// and fills with garbage the participants they name, and checks every step they define
    /// against its participant's ledger.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    pub(super) sagas_dir: PathBuf,
    /// Sagas to run.
    #[arg(long, default_value_t = 300)]
    pub(super) sagas: usize,
    /// Orders placed per second.
    #[arg(long, default_value_t = 50.0)]
    pub(super) rate: f64,
    /// Orchestrator instances (one consumer group; they divide the sagas by partition).
    #[arg(long, default_value_t = 2)]
    pub(super) orchestrators: usize,
    /// Percentage of orders built to be compensated.
    #[arg(long, default_value_t = 30)]
    pub(super) failure_percent: u8,
    /// SIGKILL a random service this often, in milliseconds (0: never).
    #[arg(long, default_value_t = 1500)]
    pub(super) kill_every_ms: u64,
    /// How long a killed service stays down before it is restarted, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub(super) down_ms: u64,
    /// Give up when the sagas have not settled this long after the last kill, in seconds.
    #[arg(long, default_value_t = 180)]
    pub(super) settle_timeout_secs: u64,
    /// Also crash every service (abort) right after every N-th message it handles has
    /// committed, before the offset is stored (0: never). Exercises the window between a
    /// handler's commit and its messages reaching Kafka.
    #[arg(long, default_value_t = 0)]
    pub(super) crash_after_commit_every: u64,
    /// SIGKILL the broker this often, in milliseconds, and start it again after
    /// --broker-down-ms (0: never). Needs a broker that --broker-script controls.
    #[arg(long, default_value_t = 0)]
    pub(super) broker_kill_every_ms: u64,
    /// How long a killed broker stays down before it is started again, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub(super) broker_down_ms: u64,
    /// The script that kills (`kill`) and starts (`start`) the broker at $BROKER_ADDR, which
    /// the run sets to the first of --kafka-brokers; with --broker-nodes 3 it kills and starts
    /// one node (`kill-node N`, `start-node N`, with BROKER_NODES=3).
    #[arg(long, default_value = "scripts/broker.sh")]
    pub(super) broker_script: PathBuf,
    /// Nodes of the cluster --broker-kill-every-ms acts on: 1 (the broker, SIGKILLed whole) or
    /// 3 (`BROKER_NODES=3 scripts/broker.sh`'s cluster: one node SIGKILLed at a time, by turns
    /// the leader of the busiest partitions and the active controller, each once every replica
    /// of the run's topics is in sync again; see `broker_nodes.rs`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub(super) broker_nodes: u8,
    /// The three-node cluster's directory (its nodes' quorum state tells the active
    /// controller).
    #[arg(long, env = "KAFKA_CLUSTER_DIR", default_value = ".run/cluster")]
    pub(super) broker_cluster_dir: PathBuf,
    /// With --broker-nodes 3: after this many one-node kills, the next broker fault takes two
    /// of the three nodes down at once (the busiest leader and the controller) for
    /// --broker-two-down-ms: below min.insync.replicas, producers wait; nothing may be lost
    /// (0: never). When the orders are all placed before it came, it comes then, with the
    /// sagas still in flight.
    #[arg(long, default_value_t = 0)]
    pub(super) broker_two_down_after: usize,
    /// How long the two nodes stay down, in milliseconds.
    #[arg(long, default_value_t = 15000)]
    pub(super) broker_two_down_ms: u64,
    /// Stop PostgreSQL this often, in milliseconds, and start it again after --postgres-down-ms
    /// (0: never). Needs a server that --postgres-script controls; every client of that server
    /// loses its connections, not only this run's services.
    #[arg(long, default_value_t = 0)]
    pub(super) postgres_restart_every_ms: u64,
    /// How long a stopped PostgreSQL stays down before it is started again, in milliseconds
    /// (stopping and starting add about half a second).
    #[arg(long, default_value_t = 1500)]
    pub(super) postgres_down_ms: u64,
    /// The script that stops (`stop`: fast, every client disconnected at once) and starts
    /// (`start`) PostgreSQL on $PGPORT, which the run sets to the port of --database-server.
    #[arg(long, default_value = "scripts/postgres.sh")]
    pub(super) postgres_script: PathBuf,
    /// A private PostgreSQL's folder, given to --postgres-script as PG_RUN_DIR (--network sets
    /// it to the run's own server).
    #[arg(long)]
    pub(super) postgres_run_dir: Option<PathBuf>,
    /// Turn PostgreSQL read-only this often, in milliseconds, and writable again after
    /// --postgres-read-only-ms (0: never): every write fails with SQLSTATE 25006, as during a
    /// failover or on a full disk, while connections stay up. Server-wide, through
    /// --postgres-script (`read-only`, `writable`): every client of the server is refused
    /// writes, not only this run's services. A valid trigger must wait, not be dead-lettered.
    #[arg(long, default_value_t = 0)]
    pub(super) postgres_read_only_every_ms: u64,
    /// How long PostgreSQL stays read-only each time, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub(super) postgres_read_only_ms: u64,
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
    pub(super) garbage_every_ms: u64,
    /// Which garbage to publish, comma separated (default: every kind).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(super) garbage_kinds: Vec<GarbageKind>,
    /// Consumer-group protocol of every service (KAFKA_GROUP_PROTOCOL).
    #[arg(long, env = "KAFKA_GROUP_PROTOCOL", value_enum, default_value_t = GroupProtocol::default())]
    pub(super) group_protocol: GroupProtocol,
    /// Dynamic group membership for the classic protocol too: no KAFKA_GROUP_INSTANCE_ID, so a
    /// restarted service joins as a new member (classic groups run static by default).
    #[arg(long)]
    pub(super) dynamic_membership: bool,
    /// Delete one command topic the saga definitions name (chosen at random per run) this
    /// often, in milliseconds, while the orders are placed, and create it again after
    /// --topic-down-ms (0: never). The commands on it when it goes are lost with it and sent
    /// again by the step deadlines, which the run shortens to 3 s (at most 10 s) meanwhile;
    /// garbage is not sent to that topic (`topic_faults.rs`).
    #[arg(long, default_value_t = 0)]
    pub(super) topic_delete_every_ms: u64,
    /// How long a deleted topic stays away before it is created again, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub(super) topic_down_ms: u64,
    /// Run on network hosts: every broker node, PostgreSQL and every service instance in a
    /// Linux network namespace of its own, joined by a bridge with addresses that exist only
    /// on this machine (`10.231.<--network-subnet>.0/24`); the run starts a PostgreSQL and a
    /// three-node cluster of its own there (--database-server, --kafka-brokers,
    /// --kafka-client-properties and --kafka-identities are then the run's), and this process,
    /// the load generator, reaches them through the bridge. Needs root. The hosts are removed
    /// at the end, also when the run fails (`network/stack.rs`).
    #[arg(long)]
    pub(super) network: bool,
    /// The third byte of the network's addresses (0: the first of 100-250 no interface of this
    /// machine uses).
    #[arg(long, default_value_t = 0)]
    pub(super) network_subnet: u8,
    /// Instances of each participant (one consumer group per participant; they divide its
    /// partitions). More than one needs --network (each instance on its own host, with its own
    /// metrics port).
    #[arg(long, default_value_t = 1)]
    pub(super) participant_instances: usize,
    /// With --network: put a link fault on the network this often, in milliseconds, each
    /// healed after --link-fault-ms before the next is due (0: never). See --link-faults.
    #[arg(long, default_value_t = 0)]
    pub(super) link_fault_every_ms: u64,
    /// How long each link fault lasts, in milliseconds.
    #[arg(long, default_value_t = 15000)]
    pub(super) link_fault_ms: u64,
    /// Which link faults to put, comma separated, in a shuffled round each (default: every
    /// kind; see `link_faults.rs`).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub(super) link_faults: Vec<LinkFault>,
    /// With link faults: every saga must have finished within this many seconds of the last
    /// heal (or of the last order, if later).
    #[arg(long, default_value_t = 90)]
    pub(super) caught_up_within_secs: u64,
    /// The seed of the run's random choices (which process is killed, which link fault comes
    /// next, its target, delay and loss): a failing run's report prints it, and the same seed
    /// makes the same choices again (their timing still depends on the machine). Default:
    /// random.
    #[arg(long)]
    pub(super) seed: Option<u64>,
    /// Run a process with its clock off: `NAME=SECONDS` (positive ahead, negative behind), NAME
    /// one of the run's processes (`orchestrator-1`, `inventory-2`, ...); repeat for more. The
    /// process's wall clock is shifted as a wrong host clock would be: every read of it (its
    /// timestamps, its TLS certificate checks, its log lines) and every wait until a wall-clock
    /// time, by a library preloaded into it (`sagactl/clock-shift/clock_shift.c`); its monotonic
    /// clocks, and so its timers, run at the right pace (README, "On network hosts").
    #[arg(long, value_parser = parse_clock_skew)]
    pub(super) clock_skew: Vec<(String, i64)>,
    /// Keep the run's database and topics for inspection (a failed run always keeps them).
    #[arg(long)]
    pub(super) keep: bool,
}

impl ChaosArgs {
    /// The garbage kinds to publish: --garbage-kinds, or every kind.
    pub(super) fn garbage_kinds(&self) -> Vec<GarbageKind> {
        chosen_or_all(&self.garbage_kinds)
    }

    /// The link faults to put: --link-faults, or every kind.
    pub(super) fn link_faults(&self) -> Vec<LinkFault> {
        chosen_or_all(&self.link_faults)
    }
}

/// `NAME=SECONDS` of --clock-skew.
fn parse_clock_skew(value: &str) -> Result<(String, i64), String> {
    let (name, secs) = value
        .split_once('=')
        .ok_or_else(|| format!("`{value}`: expected NAME=SECONDS"))?;
    let secs = secs
        .parse()
        .map_err(|e| format!("`{secs}`: seconds, positive or negative: {e}"))?;
    Ok((name.to_owned(), secs))
}

/// `chosen`, or every value of the enum when none was.
fn chosen_or_all<T: ValueEnum + Clone>(chosen: &[T]) -> Vec<T> {
    if chosen.is_empty() {
        T::value_variants().to_vec()
    } else {
        chosen.to_vec()
    }
}

/// The name a clap value enum has on the command line and in environment variables.
pub(crate) fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}
