//! The orchestrator's settings: flags or environment variables, each with a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::TimeDelta;
use clap::{Args, Parser};
use messaging::config::{DatabaseConfig, FaultConfig, KafkaConfig, RelayConfig, RetentionConfig};

use crate::auth::Tokens;
use crate::saga::{Policies, RetryPolicy};
use crate::Error;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Drives order sagas over Kafka and serves their status over HTTP."
)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub relay: RelayConfig,
    #[command(flatten)]
    pub retention: RetentionConfig,
    #[command(flatten)]
    pub retries: RetryConfig,
    #[command(flatten)]
    pub faults: FaultConfig,
    #[command(flatten)]
    pub api: ApiConfig,

    /// Address of the status HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Completed and compensated sagas (and their history) older than this are deleted.
    /// Failed sagas are kept until an operator moves them.
    #[arg(long, env = "SAGA_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub saga_retention_secs: u64,

    /// How long an order id is remembered after its order arrived, so that the same order
    /// published again (a client's retry, a replayed topic) never starts a second saga, even
    /// after its saga was deleted. Keep it at least the `orders` topic's retention (Kafka's
    /// default is 7 days).
    #[arg(long, env = "ORDER_DEDUP_RETENTION_SECS", default_value_t = 8 * 24 * 3600)]
    pub order_dedup_retention_secs: u64,

    /// Consumer group of the orchestrators (default: `{TOPIC_PREFIX}orchestrator`). Instances in
    /// one group share the orders and replies between them by partition.
    #[arg(long, env = "ORCHESTRATOR_GROUP")]
    pub group: Option<String>,
}

/// Who may use the HTTP API, and how much of the service it may take.
#[derive(Debug, Clone, Args)]
pub struct ApiConfig {
    /// A file of bearer tokens, one `NAME ROLES sha256:HEX` per line, where ROLES is a
    /// comma-separated subset of viewer, client and operator, and HEX is the token's SHA-256
    /// (`printf %s "$token" | sha256sum`). The service refuses to start without tokens unless
    /// `--api-open-on-loopback` is given.
    #[arg(long, env = "API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,
    /// The same list inline, lines separated by `;`.
    #[arg(long, env = "API_TOKENS", hide_env_values = true)]
    pub api_tokens: Option<String>,
    /// Serve the API without tokens (every caller may do everything, as `loopback`). Refused
    /// unless the API listens on a loopback address.
    #[arg(long, env = "API_OPEN_ON_LOOPBACK")]
    pub api_open_on_loopback: bool,
    /// Also serve `/healthz` and `/metrics` here, without a token, for probes and Prometheus.
    /// On the API's own address they need a viewer's token.
    #[arg(long, env = "OPS_HTTP_ADDR")]
    pub ops_http_addr: Option<SocketAddr>,
    /// Browser origins besides the API's own allowed to call it (comma-separated, e.g.
    /// `https://ops.example.com`). A request with any other `Origin` is refused.
    #[arg(long, env = "API_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub api_allowed_origins: Vec<String>,
    /// Host names the API answers to (comma-separated). Default: when it listens on loopback,
    /// only `localhost`, `127.0.0.1` and `[::1]` (a page elsewhere cannot rebind a name of its
    /// own to this machine); otherwise any.
    #[arg(long, env = "API_ALLOWED_HOSTS", value_delimiter = ',')]
    pub api_allowed_hosts: Vec<String>,
    /// Connections of the API's own pool. The message path has its own
    /// (`DATABASE_MAX_CONNECTIONS`), so readers of the API can never take its connections.
    #[arg(long, env = "API_DATABASE_CONNECTIONS", default_value_t = 3)]
    pub api_database_connections: u32,
    /// Live watch streams (`/sagas/{id}/watch`) served at once; more are answered 429.
    #[arg(long, env = "WATCH_MAX_STREAMS", default_value_t = 2000)]
    pub watch_max_streams: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            api_tokens_file: None,
            api_tokens: None,
            api_open_on_loopback: false,
            ops_http_addr: None,
            api_allowed_origins: Vec::new(),
            api_allowed_hosts: Vec::new(),
            api_database_connections: 3,
            watch_max_streams: 2000,
        }
    }
}

/// How the API tells callers apart.
#[derive(Debug, Clone)]
pub enum Gate {
    /// Bearer tokens from the configured list.
    Tokens(Tokens),
    /// No tokens: everyone who reaches the loopback address may do everything.
    OpenOnLoopback,
}

impl ApiConfig {
    /// The gate these settings describe, for an API listening on `http_addr`.
    ///
    /// # Errors
    /// [`Error::TokenFile`], [`Error::TokenList`], and [`Error::NoTokens`] when neither tokens
    /// nor an open API on loopback were configured.
    pub fn gate(&self, http_addr: SocketAddr) -> Result<Gate, Error> {
        let text = match (&self.api_tokens_file, &self.api_tokens) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "set API_TOKENS_FILE or API_TOKENS, not both".into(),
                ))
            }
            (Some(path), None) => {
                std::fs::read_to_string(path).map_err(|source| Error::TokenFile {
                    path: path.clone(),
                    source,
                })?
            }
            (None, Some(inline)) => inline.clone(),
            (None, None) => String::new(),
        };
        if self.api_tokens_file.is_some() || self.api_tokens.is_some() {
            return Ok(Gate::Tokens(Tokens::parse(&text)?));
        }
        if self.api_open_on_loopback && http_addr.ip().is_loopback() {
            return Ok(Gate::OpenOnLoopback);
        }
        Err(Error::NoTokens {
            http_addr,
            open_requested: self.api_open_on_loopback,
        })
    }
}

/// Step deadlines and retries. Each wait doubles per attempt (with up to 25% jitter), capped
/// at `--retry-max-timeout-ms`.
#[derive(Debug, Clone, Args)]
pub struct RetryConfig {
    /// How long to wait for a step's first reply, in milliseconds.
    #[arg(long, env = "STEP_TIMEOUT_MS", default_value_t = 30_000)]
    pub step_timeout_ms: u64,
    /// Per-step overrides of the first wait, e.g. `charge_payment=10000,reserve_stock=2000`.
    #[arg(long, env = "STEP_TIMEOUT_OVERRIDES_MS", value_delimiter = ',')]
    pub step_timeout_overrides_ms: Vec<String>,
    /// Attempts of a forward step before it counts as failed (its outcome unknown). A step
    /// without compensation (the last) is retried until it answers.
    #[arg(long, env = "STEP_MAX_ATTEMPTS", default_value_t = 8)]
    pub step_max_attempts: u32,
    /// Attempts of a compensation before the saga is `failed` and needs an operator.
    #[arg(long, env = "COMPENSATION_MAX_ATTEMPTS", default_value_t = 20)]
    pub compensation_max_attempts: u32,
    /// The longest single wait, in milliseconds.
    #[arg(long, env = "RETRY_MAX_TIMEOUT_MS", default_value_t = 300_000)]
    pub retry_max_timeout_ms: u64,
    /// How often overdue sagas are looked for, in milliseconds.
    #[arg(long, env = "DEADLINE_SCAN_INTERVAL_MS", default_value_t = 200)]
    pub deadline_scan_interval_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            step_timeout_ms: 30_000,
            step_timeout_overrides_ms: Vec::new(),
            step_max_attempts: 8,
            compensation_max_attempts: 20,
            retry_max_timeout_ms: 300_000,
            deadline_scan_interval_ms: 200,
        }
    }
}

impl RetryConfig {
    pub fn scan_interval(&self) -> Duration {
        Duration::from_millis(self.deadline_scan_interval_ms)
    }

    /// The policies these settings describe.
    ///
    /// # Errors
    /// A message naming the override that is not `step=milliseconds` for a known step.
    pub fn policies(&self) -> Result<Policies, String> {
        let millis = |ms: u64| TimeDelta::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX));
        let policy = |timeout_ms: u64, max_attempts: u32| RetryPolicy {
            timeout: millis(timeout_ms),
            max_attempts: max_attempts.max(1),
            max_timeout: millis(self.retry_max_timeout_ms.max(timeout_ms)),
        };
        let forward = policy(self.step_timeout_ms, self.step_max_attempts);
        let mut policies = Policies {
            reserve_stock: forward,
            charge_payment: forward,
            schedule_shipment: forward,
            compensation: policy(self.step_timeout_ms, self.compensation_max_attempts),
        };
        for entry in self
            .step_timeout_overrides_ms
            .iter()
            .filter(|e| !e.trim().is_empty())
        {
            let parsed = entry
                .split_once('=')
                .and_then(|(step, ms)| Some((step.trim(), ms.trim().parse::<u64>().ok()?)));
            let Some((step, ms)) = parsed else {
                return Err(format!(
                    "step timeout override {entry:?} is not step=milliseconds"
                ));
            };
            let slot = match step {
                "reserve_stock" => &mut policies.reserve_stock,
                "charge_payment" => &mut policies.charge_payment,
                "schedule_shipment" => &mut policies.schedule_shipment,
                other => return Err(format!("unknown step {other:?} in a timeout override")),
            };
            *slot = policy(ms, self.step_max_attempts);
        }
        Ok(policies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_change_one_step_and_bad_ones_are_named() {
        let config = RetryConfig {
            step_timeout_overrides_ms: vec!["charge_payment=9000".into()],
            ..RetryConfig::default()
        };
        let policies = config.policies().expect("valid");
        assert_eq!(policies.charge_payment.timeout, TimeDelta::seconds(9));
        assert_eq!(policies.reserve_stock.timeout, TimeDelta::seconds(30));
        assert_eq!(policies.compensation.max_attempts, 20);
        for bad in ["charge_payment", "ship=5", "charge_payment=soon"] {
            let config = RetryConfig {
                step_timeout_overrides_ms: vec![bad.into()],
                ..RetryConfig::default()
            };
            assert!(config.policies().is_err(), "{bad}");
        }
    }
}
