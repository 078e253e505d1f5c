//! The orchestrator's settings: flags or environment variables, each with a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::TimeDelta;
use clap::{Args, Parser};
use messaging::config::{DatabaseConfig, FaultConfig, KafkaConfig, RelayConfig, RetentionConfig};

use crate::auth::Tokens;
use crate::saga::{RetryPolicy, SagaDefinition};
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

    /// The folder of saga definitions: every `*.toml` in it is loaded and validated at start.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    pub sagas_dir: PathBuf,

    /// Address of the status HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Completed and compensated sagas (and their history) are deleted this long after they
    /// finished.
    #[arg(long, env = "SAGA_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub saga_retention_secs: u64,

    /// Failed sagas (and their history) are deleted this long after they failed, unless an
    /// operator moved them on before: longer than the others, as they wait for an operator.
    /// Keep the participants' `STEP_LEDGER_RETENTION_SECS` at least as long.
    #[arg(long, env = "FAILED_SAGA_RETENTION_SECS", default_value_t = 30 * 24 * 3600)]
    pub failed_saga_retention_secs: u64,

    /// How long an order id is remembered after its order arrived, so that the same order
    /// published again (a client's retry, a replayed topic) never starts a second saga, even
    /// after its saga was deleted. Keep it at least the `orders` topic's retention (Kafka's
    /// default is 7 days).
    #[arg(long, env = "ORDER_DEDUP_RETENTION_SECS", default_value_t = 8 * 24 * 3600)]
    pub order_dedup_retention_secs: u64,

    /// Fault injection, for tests only: this instance's clock reads this many seconds ahead
    /// (behind when negative) of the system's. Saga times come from the database's clock, so
    /// it changes nothing but `orchestrator_clock_skew_seconds`.
    #[arg(
        long,
        env = "FAULT_CLOCK_SKEW_SECS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub fault_clock_skew_secs: i64,

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
    /// How often, in milliseconds, `API_TOKENS_FILE` is read again: a changed list takes
    /// effect at once (tokens added, revoked or given other roles without a restart); a file
    /// that cannot be read or parsed is logged and the list before it kept. 0: read it only
    /// at start-up.
    #[arg(long, env = "API_TOKENS_RELOAD_MS", default_value_t = 5000)]
    pub api_tokens_reload_ms: u64,
    /// The same list inline, lines separated by `;`.
    #[arg(long, env = "API_TOKENS", hide_env_values = true)]
    pub api_tokens: Option<String>,
    /// Requests per second each token may make, sustained (a burst may reach
    /// `API_RATE_LIMIT_BURST`); past it, requests are answered 429 with `Retry-After`, so one
    /// client's loop cannot take the API from everyone else. 0: no limit. An API open on
    /// loopback (no tokens) has none.
    #[arg(long, env = "API_RATE_LIMIT_PER_SEC", default_value_t = 100)]
    pub api_rate_limit_per_sec: u32,
    /// Requests one token may make at once before its rate applies.
    #[arg(long, env = "API_RATE_LIMIT_BURST", default_value_t = 200)]
    pub api_rate_limit_burst: u32,
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
            api_tokens_reload_ms: 5000,
            api_rate_limit_per_sec: 100,
            api_rate_limit_burst: 200,
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
            (Some(path), None) => read_token_file(path)?,
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

/// The text of the token file at `path`.
///
/// # Errors
/// [`Error::TokenFile`] when it cannot be read.
pub fn read_token_file(path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::TokenFile {
        path: path.to_owned(),
        source,
    })
}

/// Deployment-wide changes to the retry policies of the saga definitions (each action's
/// `retry` in `sagas/*.toml`): unset, a definition's own values hold. Each wait doubles per
/// attempt (with up to 25% jitter), capped at the longest wait.
#[derive(Debug, Clone, Args)]
pub struct RetryConfig {
    /// The first wait for every step's and compensation's reply, in milliseconds [default: each
    /// action's `retry.timeout_ms`].
    #[arg(long, env = "STEP_TIMEOUT_MS")]
    pub step_timeout_ms: Option<u64>,
    /// Per-step first waits of forward actions, e.g. `charge_payment=10000,reserve_stock=2000`.
    #[arg(long, env = "STEP_TIMEOUT_OVERRIDES_MS", value_delimiter = ',')]
    pub step_timeout_overrides_ms: Vec<String>,
    /// Attempts of a forward step that can be undone before it counts as failed (its outcome
    /// unknown) [default: each action's `retry.max_attempts`]. Steps that cannot be undone are
    /// retried until they answer.
    #[arg(long, env = "STEP_MAX_ATTEMPTS")]
    pub step_max_attempts: Option<u32>,
    /// Attempts of a compensation before the saga is `failed` and needs an operator [default:
    /// each compensation's `retry.max_attempts`].
    #[arg(long, env = "COMPENSATION_MAX_ATTEMPTS")]
    pub compensation_max_attempts: Option<u32>,
    /// The longest single wait, in milliseconds [default: each action's
    /// `retry.max_timeout_ms`].
    #[arg(long, env = "RETRY_MAX_TIMEOUT_MS")]
    pub retry_max_timeout_ms: Option<u64>,
    /// How often overdue sagas are looked for, in milliseconds.
    #[arg(long, env = "DEADLINE_SCAN_INTERVAL_MS", default_value_t = 200)]
    pub deadline_scan_interval_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            step_timeout_ms: None,
            step_timeout_overrides_ms: Vec::new(),
            step_max_attempts: None,
            compensation_max_attempts: None,
            retry_max_timeout_ms: None,
            deadline_scan_interval_ms: 200,
        }
    }
}

impl RetryConfig {
    pub fn scan_interval(&self) -> Duration {
        Duration::from_millis(self.deadline_scan_interval_ms)
    }

    /// `STEP_TIMEOUT_OVERRIDES_MS` as (step, milliseconds).
    fn timeout_overrides(&self) -> Result<Vec<(&str, u64)>, String> {
        self.step_timeout_overrides_ms
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|entry| {
                entry
                    .split_once('=')
                    .and_then(|(step, ms)| Some((step.trim(), ms.trim().parse::<u64>().ok()?)))
                    .ok_or_else(|| {
                        format!("step timeout override {entry:?} is not step=milliseconds")
                    })
            })
            .collect()
    }

    /// Changes `definition`'s retry policies as these settings say.
    ///
    /// # Errors
    /// A message naming an override that is not `step=milliseconds`.
    pub fn apply(&self, definition: &mut SagaDefinition) -> Result<(), String> {
        let overrides = self.timeout_overrides()?;
        let millis = |ms: u64| TimeDelta::milliseconds(i64::try_from(ms).unwrap_or(i64::MAX));
        let adjust = |policy: &mut RetryPolicy, timeout_ms: Option<u64>, attempts: Option<u32>| {
            if let Some(ms) = timeout_ms {
                policy.timeout = millis(ms);
            }
            // A policy without a limit (a step that cannot be undone) keeps none.
            if let Some(n) = attempts.filter(|_| policy.max_attempts != u32::MAX) {
                policy.max_attempts = n.max(1);
            }
            if let Some(ms) = self.retry_max_timeout_ms {
                policy.max_timeout = millis(ms);
            }
            policy.max_timeout = policy.max_timeout.max(policy.timeout);
        };
        for step in &mut definition.steps {
            let timeout = overrides
                .iter()
                .find(|(name, _)| *name == step.name)
                .map(|(_, ms)| *ms)
                .or(self.step_timeout_ms);
            adjust(&mut step.forward.retry, timeout, self.step_max_attempts);
            if let Some(compensation) = &mut step.compensation {
                adjust(
                    &mut compensation.retry,
                    self.step_timeout_ms,
                    self.compensation_max_attempts,
                );
            }
        }
        Ok(())
    }

    /// Checks that every per-step override names a step of one of `definitions`.
    ///
    /// # Errors
    /// A message naming the unknown step.
    pub fn check_overrides(&self, definitions: &[SagaDefinition]) -> Result<(), String> {
        for (step, _) in self.timeout_overrides()? {
            if !definitions.iter().any(|d| d.step(step).is_some()) {
                return Err(format!("unknown step {step:?} in a timeout override"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_change_the_definitions_policies_and_bad_overrides_are_named() {
        let order = || {
            crate::saga::definitions::parse("order.toml", include_str!("../../sagas/order.toml"))
                .expect("the order saga parses")
        };
        let mut untouched = order();
        RetryConfig::default()
            .apply(&mut untouched)
            .expect("no settings");
        assert_eq!(untouched, order());

        let config = RetryConfig {
            step_timeout_overrides_ms: vec!["charge_payment=9000".into()],
            compensation_max_attempts: Some(3),
            step_max_attempts: Some(2),
            ..RetryConfig::default()
        };
        let mut changed = order();
        config.apply(&mut changed).expect("valid");
        let [reserve, charge, ship] = &changed.steps[..] else {
            panic!("three steps")
        };
        assert_eq!(charge.forward.retry.timeout, TimeDelta::seconds(9));
        assert_eq!(reserve.forward.retry.timeout, TimeDelta::seconds(30));
        assert_eq!(reserve.forward.retry.max_attempts, 2);
        assert_eq!(
            ship.forward.retry.max_attempts,
            u32::MAX,
            "the pivot keeps no limit"
        );
        let compensation = reserve.compensation.as_ref().expect("compensable");
        assert_eq!(compensation.retry.max_attempts, 3);
        assert!(config.check_overrides(&[changed]).is_ok());

        for bad in ["charge_payment", "ship=5", "charge_payment=soon"] {
            let config = RetryConfig {
                step_timeout_overrides_ms: vec![bad.into()],
                ..RetryConfig::default()
            };
            let mut definition = order();
            let refused = config
                .apply(&mut definition)
                .and_then(|()| config.check_overrides(&[definition]));
            assert!(refused.is_err(), "{bad}");
        }
    }
}
