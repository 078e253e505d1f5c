//! Settings shared by every participant binary.

use clap::Args;
use messaging::config::ServiceConfig;

#[derive(Debug, Clone, Args)]
pub struct ParticipantConfig {
    // What every service takes: Kafka, the database, the relay, retention, faults.
    #[command(flatten)]
    pub service: ServiceConfig,

    /// Consumer group of this service (default: `{TOPIC_PREFIX}{service}`).
    #[arg(long, env = "PARTICIPANT_GROUP")]
    pub group: Option<String>,

    /// The topic this participant's commands arrive on, without `TOPIC_PREFIX` (default:
    /// `{participant}.commands`); the saga definitions name the same topic for its steps.
    #[arg(long, env = "COMMAND_TOPIC")]
    pub command_topic: Option<String>,

    /// Where to serve `/metrics` (Prometheus text), `/healthz` and the probes `/livez` and
    /// `/readyz` (the port a liveness and a readiness probe use). Each binary has its own
    /// default (inventory 127.0.0.1:9181, payment :9182, shipping :9183); unset in tests.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Fault injection for chaos tests: refuse this many compensation commands (replying with
    /// the failure reply the command names, e.g. `CompensationFailed`) before doing them. 0 in
    /// production.
    #[arg(long, env = "FAULT_COMPENSATION_FAILURES", default_value_t = 0)]
    pub fault_compensation_failures: u32,

    /// Step ledger entries nothing has touched for this long are deleted (every command for
    /// an entry's step touches it, a repeated one too). An entry is what stops a repeated
    /// command from acting twice, so keep this at least as long as anything can send a step's
    /// command again: the orchestrator's `ORDER_DEDUP_RETENTION_SECS` (a replayed trigger then
    /// starts no second saga) and `FAILED_SAGA_RETENTION_SECS`, and the command topics'
    /// retention. The default, 35 days, is longer than each of their defaults.
    #[arg(long, env = "STEP_LEDGER_RETENTION_SECS", default_value_t = STEP_LEDGER_RETENTION_SECS)]
    pub step_ledger_retention_secs: u64,
}

/// The default of [`ParticipantConfig::step_ledger_retention_secs`].
pub const STEP_LEDGER_RETENTION_SECS: u64 = 35 * 24 * 3600;
