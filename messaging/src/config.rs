//! Settings every service shares, read from flags or environment variables with documented
//! defaults. Each binary flattens these into its own `clap` parser, so `--help` lists them all.

use std::time::Duration;

use clap::{Args, ValueEnum};

pub use crate::access::KafkaConnection;

/// What every service's set-up takes from its settings, the same flags and variables for the
/// orchestrator and every participant: Kafka, its database, its outbox relay, the retention of
/// the messaging tables and fault injection. Each service flattens it into its own settings
/// (next to what only it has, its consumer group's variable among them), and
/// [`crate::service::Service::open`] builds the service from it.
#[derive(Debug, Clone, Args)]
pub struct ServiceConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub relay: RelayConfig,
    #[command(flatten)]
    pub retention: RetentionConfig,
    #[command(flatten)]
    pub faults: FaultConfig,
}

/// How to reach Kafka and how to name and create topics.
#[derive(Debug, Clone, Args)]
pub struct KafkaConfig {
    #[command(flatten)]
    pub connection: KafkaConnection,

    /// Prefix of every topic name, so several deployments can share one broker.
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Partitions of the topics this service creates at start-up if they are missing.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 4)]
    pub topic_partitions: i32,

    /// Replication factor of the topics this service creates; -1: the cluster's
    /// `default.replication.factor` (1 on the one-node broker, 3 on the three-node cluster).
    #[arg(long, env = "TOPIC_REPLICATION_FACTOR", default_value_t = -1, allow_negative_numbers = true)]
    pub topic_replication_factor: i32,

    /// Longest time the broker may hold a fetch request waiting for data (fetch.wait.max.ms).
    /// Kafka answers a fetch as soon as data arrives, so this only sets how often an idle
    /// consumer asks again: at 500 the broker at rest spends half what it did at 100, with the
    /// same saga latency (BENCHMARKS.md, "At rest"). The Nisshi stand-in holds every fetch for
    /// part of it; 25 suits it.
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX_MS", default_value_t = 500)]
    pub fetch_wait_max_ms: u32,

    /// Consumer group session timeout: how soon a crashed member's partitions move (classic
    /// protocol; with `consumer` the broker's group.consumer.session.timeout.ms decides).
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,

    /// Consumer-group protocol: `classic` (the members rebalance among themselves, stopping
    /// all of them) or `consumer` (KIP-848, Kafka 4: the broker assigns partitions and moves
    /// only those that change owner).
    #[arg(long, env = "KAFKA_GROUP_PROTOCOL", value_enum, default_value_t = GroupProtocol::default())]
    pub group_protocol: GroupProtocol,

    /// Static group membership (group.instance.id): a stable id unique to this instance. A
    /// restarted instance with the same id takes its partitions back at once instead of after
    /// the session timeout; a stopped one keeps them until the timeout. Unset: dynamic
    /// membership.
    #[arg(long, env = "KAFKA_GROUP_INSTANCE_ID")]
    pub group_instance_id: Option<String>,

    /// librdkafka debug contexts to log (its `debug` setting, e.g. `cgrp,consumer` for group
    /// membership and fetching). Unset: none.
    #[arg(long, env = "KAFKA_DEBUG")]
    pub kafka_debug: Option<String>,

    /// Most records handled in one database transaction. The consumer takes what has already
    /// arrived, up to this many, and commits them together; 1 means one transaction per
    /// record.
    #[arg(long, env = "CONSUMER_BATCH_MAX", default_value_t = 100)]
    pub consumer_batch_max: usize,

    /// After this long without a record, in milliseconds, the consume loop asks the broker
    /// whether its partitions hold records it should have read; stuck so on two checks in a
    /// row, the consumer is replaced by a new one (librdkafka can stop fetching a topic that
    /// was deleted and created again without a word). Its topics' other partitions are
    /// checked too: one its group leaves unread on three checks in a row replaces it as well
    /// (a KIP-848 member can be left with part of its share). 0: never.
    #[arg(long, env = "KAFKA_CONSUMER_STALL_MS", default_value_t = 10_000)]
    pub consumer_stall_ms: u64,

    /// How long the producer waits to batch messages (linger.ms). 0: a lone record goes out at
    /// once (unloaded sagas p50 16.5 ms instead of 27 ms at 1), while under load librdkafka
    /// still batches what queued up meanwhile (the same 271 sagas/s at 128 in flight).
    #[arg(long, env = "KAFKA_LINGER_MS", default_value_t = 0)]
    pub linger_ms: u32,
}

/// Kafka's consumer-group protocols (librdkafka's `group.protocol`).
///
/// `classic` with static membership is the default: in the chaos suite (Kafka 4.1, librdkafka
/// 2.12) a SIGKILLed service restarted under its instance id took its partitions back at once,
/// while a KIP-848 group refuses that restart until the dead member's session has expired
/// (UNRELEASED_INSTANCE_ID) and otherwise waits out the session before moving partitions:
/// sagas stalled about 10 s per kill (BENCHMARKS.md, "Consumer-group protocol").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum GroupProtocol {
    #[default]
    Classic,
    Consumer,
}

/// Where the service keeps its state.
#[derive(Debug, Clone, Args)]
pub struct DatabaseConfig {
    /// PostgreSQL connection URL: postgres://ROLE@HOST:PORT/DATABASE?PARAMETERS. TLS:
    /// `sslmode` = disable, allow, prefer (the default: TLS when the server offers it,
    /// unverified), require (TLS, unverified), verify-ca (the server's certificate must be
    /// signed by the CA in `sslrootcert`) or verify-full (verify-ca, and the certificate must
    /// name HOST: use this one); `sslrootcert=FILE`, the CA's certificate (PEM); `sslcert=FILE`
    /// and `sslkey=FILE`, a client certificate and its key (PEM, for a server that asks for
    /// one). The password: rather than in the URL (which the environment and logs may show),
    /// in a password file named by the environment variable PGPASSFILE (libpq's format, lines
    /// `host:port:database:role:password`, `*` for any; mode 600, or it is ignored), read when
    /// the URL has none; the admin step `sagactl provision database` creates each service's
    /// role and writes its file. The libpq variables PGSSLMODE, PGSSLROOTCERT,
    /// PGSSLCERT and PGSSLKEY fill in what the URL leaves out. A wrong password, an untrusted
    /// server certificate or a role the server refuses stops the service at start with the
    /// setting to check.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/sagas"
    )]
    pub database_url: String,

    /// Schema that holds this service's tables (default: the service's name). Services never
    /// read each other's schemas.
    #[arg(long, env = "DATABASE_SCHEMA")]
    pub database_schema: Option<String>,

    /// Size of the connection pool. The consume loop, the relay, the outbox sampler and the
    /// orchestrator's deadline scanner each keep one more connection of their own, out of it.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,

    /// Longest wait for one database call, in milliseconds: getting a connection and running
    /// a handler's transaction to its commit, a probe of the database. A call that runs out
    /// counts as the database being unavailable, and its connection is closed rather than put
    /// back in the pool. The server also ends a session of the service that stays idle inside
    /// a transaction this long (`idle_in_transaction_session_timeout`), so a transaction whose
    /// client was cut off releases its locks. A few seconds more than the longest normal
    /// transaction.
    #[arg(
        long,
        env = "DATABASE_CALL_TIMEOUT_MS",
        default_value_t = DATABASE_CALL_TIMEOUT_MS,
        value_parser = clap::value_parser!(u64).range(100..=3_600_000)
    )]
    pub database_call_timeout_ms: u64,

    /// After the database has been unavailable this long, in milliseconds, the consume loop
    /// gives up its partitions (leaves the consumer group, without storing the offsets of the
    /// batch it could not finish) so that the other instances of the service take its work
    /// over; it joins the group again once the database answers. 0: never give up.
    #[arg(
        long,
        env = "DATABASE_GIVE_UP_AFTER_MS",
        default_value_t = DATABASE_GIVE_UP_AFTER_MS
    )]
    pub database_give_up_after_ms: u64,
}

/// `DATABASE_CALL_TIMEOUT_MS`'s default: the longest normal transaction (a full batch of 100
/// records takes well under a second) and a margin for a loaded server.
pub const DATABASE_CALL_TIMEOUT_MS: u64 = 10_000;

/// `DATABASE_GIVE_UP_AFTER_MS`'s default: longer than a PostgreSQL restart (a few seconds), so
/// that a restart moves no partitions, and longer than one call's deadline, so that one slow
/// call does not either.
pub const DATABASE_GIVE_UP_AFTER_MS: u64 = 15_000;

/// Fault injection for the chaos suite. Everything is off by default.
#[derive(Debug, Clone, Default, Args)]
pub struct FaultConfig {
    /// Crash the process (abort, no clean-up) right after every N-th handled message has
    /// committed, before its offset is stored and usually before the relay publishes what it
    /// wrote; never in the first 3 s of a process's life. 0: never.
    #[arg(long, env = "FAULT_CRASH_AFTER_COMMIT_EVERY", default_value_t = 0)]
    pub crash_after_commit_every: u64,

    /// For services run as tasks inside a test process: instead of aborting the process, the
    /// service stops dead (its consumer returns without storing the offset, its relay is
    /// dropped without draining). Not a command-line setting.
    #[arg(skip)]
    pub crash_in_process: bool,

    /// Make the outbox relay's producer fail fatally, as an idempotent producer does when the
    /// broker loses track of its sequence, once it has published this many rows (once per
    /// process). The relay must replace the producer and go on. 0: never.
    #[arg(long, env = "FAULT_PRODUCER_FATAL_AFTER", default_value_t = 0)]
    pub producer_fatal_after: u64,
}

/// How long handled-message ids are kept, and how often old rows are swept.
#[derive(Debug, Clone, Args)]
pub struct RetentionConfig {
    /// Inbox rows (ids of handled messages) older than this are deleted. Keep it longer than
    /// any redelivery can take (the topics' retention); a message redelivered after its row is
    /// gone is still absorbed by the saga's fencing and the participants' step ledger.
    #[arg(long, env = "INBOX_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub inbox_retention_secs: u64,

    /// Outbox rows the broker refused for good (`outbox_parked`, kept whole with the broker's
    /// reason for an operator to look at) are deleted this long after they were parked.
    #[arg(long, env = "OUTBOX_PARKED_RETENTION_SECS", default_value_t = 30 * 24 * 3600)]
    pub outbox_parked_retention_secs: u64,

    /// How often the retention sweep runs, in milliseconds.
    #[arg(long, env = "RETENTION_SWEEP_INTERVAL_MS", default_value_t = 60_000)]
    pub retention_sweep_interval_ms: u64,
}

impl RetentionConfig {
    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.retention_sweep_interval_ms)
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            inbox_retention_secs: 7 * 24 * 3600,
            outbox_parked_retention_secs: 30 * 24 * 3600,
            retention_sweep_interval_ms: 60_000,
        }
    }
}

/// How the outbox relay publishes.
#[derive(Debug, Clone, Args)]
pub struct RelayConfig {
    /// Most outbox rows published per relay transaction.
    #[arg(long, env = "OUTBOX_BATCH_SIZE", default_value_t = 256)]
    pub outbox_batch_size: i64,

    /// How often the relay looks at the outbox when no notification woke it, in milliseconds.
    #[arg(long, env = "OUTBOX_POLL_INTERVAL_MS", default_value_t = 500)]
    pub outbox_poll_interval_ms: u64,

    /// Most bytes (payload, key and headers) of outbox rows the relay holds in memory in one
    /// batch; the first row of a batch goes whatever its size. 4 MiB holds a full batch of
    /// 16 KiB rows; a run of dead-letter copies (up to 900 KiB each) goes a few at a time.
    #[arg(long, env = "OUTBOX_BATCH_MAX_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub outbox_batch_max_bytes: i64,

    /// How long the relay waits for the broker to acknowledge a batch's records, in
    /// milliseconds, and at most a quarter of it after the broker acknowledged the batch's
    /// other records. A destination (topic) whose records are not acknowledged by then counts
    /// as failing, like one that answers with an error: its rows wait and are tried again with
    /// backoff, while the batches of the other destinations go on.
    #[arg(
        long,
        env = "OUTBOX_ACK_WAIT_MS",
        default_value_t = 2_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000)
    )]
    pub outbox_ack_wait_ms: u64,

    /// The longest wait between two tries of a failing destination, in milliseconds (the
    /// first comes within 100 ms, each later one within twice the one before). Both waits are
    /// between 1 ms and an hour.
    #[arg(
        long,
        env = "OUTBOX_DESTINATION_BACKOFF_MAX_MS",
        default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000)
    )]
    pub outbox_destination_backoff_max_ms: u64,

    /// `/readyz` answers 503 while the outbox's oldest row has waited longer than this, in
    /// milliseconds: the relay is not draining it (the broker refuses or does not answer).
    #[arg(long, env = "READY_OUTBOX_MAX_AGE_MS", default_value_t = 60_000)]
    pub ready_outbox_max_age_ms: u64,
}

impl RelayConfig {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.outbox_poll_interval_ms)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.outbox_ack_wait_ms)
    }

    pub fn destination_backoff_max(&self) -> Duration {
        Duration::from_millis(self.outbox_destination_backoff_max_ms)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            outbox_batch_size: 256,
            outbox_poll_interval_ms: 500,
            outbox_batch_max_bytes: 4 * 1024 * 1024,
            outbox_ack_wait_ms: 2_000,
            outbox_destination_backoff_max_ms: 5_000,
            ready_outbox_max_age_ms: 60_000,
        }
    }
}

impl DatabaseConfig {
    /// Settings for `url` with the defaults of everything else.
    pub fn to(url: impl Into<String>) -> Self {
        Self {
            database_url: url.into(),
            database_schema: None,
            database_max_connections: 8,
            database_call_timeout_ms: DATABASE_CALL_TIMEOUT_MS,
            database_give_up_after_ms: DATABASE_GIVE_UP_AFTER_MS,
        }
    }

    /// The schema to use: the configured one, or `default`.
    pub fn schema_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.database_schema.as_deref().unwrap_or(default)
    }

    /// `DATABASE_CALL_TIMEOUT_MS`.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.database_call_timeout_ms)
    }

    /// `DATABASE_GIVE_UP_AFTER_MS`; `None` for never.
    pub fn give_up_after(&self) -> Option<Duration> {
        (self.database_give_up_after_ms > 0)
            .then(|| Duration::from_millis(self.database_give_up_after_ms))
    }
}
