//! What one saga costs the machine, for `sagactl load`: CPU per process tree (the broker and
//! PostgreSQL included), SQL statements and transactions (`pg_stat_statements`,
//! `pg_stat_database`), and Kafka records and bytes per topic.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use sqlx::{Connection, PgConnection};

/// Linux reports CPU time in clock ticks of 1/100 s (USER_HZ) on every architecture we run.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// CPU seconds used so far by `pid` and every process below it: the living ones' own time plus
/// what their reaped children used. PostgreSQL runs a process per connection under the
/// postmaster, so accounting for the postmaster alone would miss nearly all of its work.
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut cpu: HashMap<u32, f64> = HashMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((parent, ticks)) = stat_fields(id) {
            children.entry(parent).or_default().push(id);
            cpu.insert(id, ticks);
        }
    }
    let mut total = *cpu.get(&pid)?;
    let mut stack = children.get(&pid).cloned().unwrap_or_default();
    while let Some(child) = stack.pop() {
        total += cpu.get(&child).copied().unwrap_or(0.0);
        stack.extend(children.get(&child).into_iter().flatten());
    }
    Some(total / CLOCK_TICKS_PER_SEC)
}

/// The CPU time the measured processes (`--process NAME=PID`), and the sagactl command itself,
/// which shares the machine too, had used when the measurement started.
pub struct CpuMeter {
    processes: Vec<(String, u32)>,
    before: Vec<f64>,
}

/// What one process tree used since its [`CpuMeter`] started.
pub struct CpuUsed {
    pub name: String,
    pub pid: u32,
    pub cpu_secs: f64,
}

impl CpuUsed {
    /// The CPU milliseconds each of `operations` (sagas, round trips, commits) cost.
    pub fn ms_each(&self, operations: usize) -> f64 {
        self.cpu_secs * 1_000.0 / operations.max(1) as f64
    }
}

impl CpuMeter {
    /// Starts measuring `measured` and this process, named `own_name`.
    pub fn start(measured: &[(String, u32)], own_name: &str) -> Self {
        let processes: Vec<(String, u32)> = measured
            .iter()
            .cloned()
            .chain([(own_name.to_owned(), std::process::id())])
            .collect();
        let before = processes
            .iter()
            .map(|(_, pid)| tree_cpu_seconds(*pid).unwrap_or(0.0))
            .collect();
        Self { processes, before }
    }

    /// What each process tree used since the start. A process gone by now reads as 0 in all,
    /// so its figure is what it had used at the start, negated (as `sagactl load` always
    /// reported it).
    pub fn used(&self) -> Vec<CpuUsed> {
        self.processes
            .iter()
            .zip(&self.before)
            .map(|((name, pid), before)| CpuUsed {
                name: name.clone(),
                pid: *pid,
                cpu_secs: tree_cpu_seconds(*pid).unwrap_or(0.0) - before,
            })
            .collect()
    }
}

/// The parent of `pid` and its user + system + reaped children's clock ticks.
fn stat_fields(pid: u32) -> Option<(u32, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are space separated.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let parent = fields.get(1)?.parse().ok()?;
    let ticks = (11..=14)
        .map(|i| fields.get(i).and_then(|f| f.parse::<f64>().ok()))
        .sum::<Option<f64>>()?;
    Some((parent, ticks))
}

/// The peak resident set size of `pid` (VmHWM) in KiB.
pub fn peak_rss_kb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// PostgreSQL's counters for one database, read at the start and the end of a run.
pub struct SqlCounters {
    connection: PgConnection,
}

#[derive(Debug, Serialize)]
pub struct SqlBudget {
    pub transactions_per_saga: f64,
    pub statements_per_saga: f64,
    /// The statements run most often, with their calls per saga and mean time.
    pub top_statements: Vec<StatementCost>,
}

#[derive(Debug, Serialize)]
pub struct StatementCost {
    pub query: String,
    pub calls_per_saga: f64,
    pub mean_ms: f64,
}

impl SqlCounters {
    /// Connects to `database_url` and zeroes `pg_stat_statements` and the database's
    /// transaction counters.
    pub async fn start(database_url: &str) -> anyhow::Result<Self> {
        let mut connection = PgConnection::connect(database_url)
            .await
            .context("connecting to read pg_stat_statements")?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&mut connection)
            .await
            .context("pg_stat_statements must be in shared_preload_libraries")?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&mut connection)
            .await?;
        sqlx::query("SELECT pg_stat_reset()")
            .execute(&mut connection)
            .await?;
        Ok(Self { connection })
    }

    /// What the database did since [`SqlCounters::start`], per finished saga.
    pub async fn finish(mut self, sagas: usize) -> anyhow::Result<SqlBudget> {
        let per_saga = 1.0 / sagas.max(1) as f64;
        // The cumulative statistics reach shared memory at most once a second per backend.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (commits, rollbacks): (i64, i64) = sqlx::query_as(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut self.connection)
        .await?;
        let statements: Vec<(String, i64, f64)> = sqlx::query_as(
            "SELECT query, calls, mean_exec_time FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND query NOT LIKE '%pg_stat%' \
             ORDER BY calls DESC",
        )
        .fetch_all(&mut self.connection)
        .await?;
        let calls: i64 = statements.iter().map(|s| s.1).sum();
        Ok(SqlBudget {
            // The counters include this connection's own two transactions.
            transactions_per_saga: (commits + rollbacks - 2).max(0) as f64 * per_saga,
            statements_per_saga: calls as f64 * per_saga,
            top_statements: statements
                .into_iter()
                .take(12)
                .map(|(query, calls, mean_ms)| StatementCost {
                    query: query.split_whitespace().collect::<Vec<_>>().join(" "),
                    calls_per_saga: calls as f64 * per_saga,
                    mean_ms,
                })
                .collect(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct TopicVolume {
    pub topic: String,
    pub records_per_saga: f64,
    /// On the broker's disk: record batches with their headers, as Kafka stores them.
    pub bytes_per_saga: f64,
}

/// Records (high watermarks) and stored bytes of every topic named `prefix*`, per saga. Meant
/// for a fresh prefix, whose topics hold exactly the run's records.
pub fn kafka_volume(
    kafka: &messaging::config::KafkaConnection,
    prefix: &str,
    log_dir: Option<&Path>,
    sagas: usize,
) -> anyhow::Result<Vec<TopicVolume>> {
    let per_saga = 1.0 / sagas.max(1) as f64;
    let consumer: BaseConsumer = messaging::kafka::connection_settings(kafka)?
        .create()
        .context("creating a metadata client")?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .context("reading topic metadata")?;
    let mut volumes = Vec::new();
    for topic in metadata.topics() {
        if prefix.is_empty() || !topic.name().starts_with(prefix) {
            continue;
        }
        let mut records = 0;
        for partition in topic.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic.name(), partition.id(), Duration::from_secs(10))
                .context("reading watermarks")?;
            records += high - low;
        }
        let bytes = log_dir.map_or(0, |dir| stored_bytes(dir, topic.name()));
        volumes.push(TopicVolume {
            topic: topic.name().to_owned(),
            records_per_saga: records as f64 * per_saga,
            bytes_per_saga: bytes as f64 * per_saga,
        });
    }
    volumes.sort_by(|a, b| a.topic.cmp(&b.topic));
    Ok(volumes)
}

/// Deletes every topic named `prefix*` (nothing when the prefix is empty).
pub async fn delete_topics(
    kafka: &messaging::config::KafkaConnection,
    prefix: &str,
) -> anyhow::Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = messaging::kafka::connection_settings(kafka)?
        .create()
        .context("creating an admin client")?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .context("reading topic metadata")?;
    let names: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| name.starts_with(prefix))
        .collect();
    if !names.is_empty() {
        admin
            .delete_topics(&names, &AdminOptions::new())
            .await
            .context("deleting the run's topics")?;
    }
    Ok(())
}

/// Sizes of the `.log` segments of every partition directory (`TOPIC-N`) of `topic`.
fn stored_bytes(log_dir: &Path, topic: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(log_dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|name| name.rsplit_once('-'))
                .is_some_and(|(name, n)| name == topic && n.parse::<u32>().is_ok())
        })
        .flat_map(|dir| {
            std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter(|file| file.path().extension().is_some_and(|e| e == "log"))
        .filter_map(|file| file.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spins until this process has used `seconds` more CPU than it had: wall time alone would
    /// give less on a machine the other tests keep busy.
    fn burn_cpu(seconds: f64) {
        let own = || tree_cpu_seconds(std::process::id()).expect("this process's /proc");
        let from = own();
        let mut spins = 0u64;
        while own() - from < seconds {
            for _ in 0..100_000 {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        }
    }

    #[test]
    fn the_meter_counts_what_its_processes_used_since_it_started_and_not_before() {
        burn_cpu(0.3);
        let meter = CpuMeter::start(&[], "test");
        burn_cpu(0.2);
        let used = meter.used();
        assert_eq!(used.len(), 1);
        assert_eq!(
            (used[0].name.as_str(), used[0].pid),
            ("test", std::process::id())
        );
        // Other tests' threads may add to it, never take away; the 0.3 s before are left out.
        let total = tree_cpu_seconds(std::process::id()).unwrap_or(0.0);
        assert!(used[0].cpu_secs >= 0.2, "{} s", used[0].cpu_secs);
        assert!(total >= used[0].cpu_secs + 0.3, "{total} s in all");
    }
}
