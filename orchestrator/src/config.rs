//! The orchestrator's settings: flags or environment variables, each with a default.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::TimeDelta;
use clap::{Args, Parser};
use messaging::config::ServiceConfig;

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
    // What every service takes: Kafka, the database, the relay, retention, faults.
    #[command(flatten)]
    pub service: ServiceConfig,
    #[command(flatten)]
    pub retries: RetryConfig,
    #[command(flatten)]
    pub api: ApiConfig,

    /// The folder of saga definitions: every `*.toml` in it is loaded and validated at start.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    pub sagas_dir: PathBuf,

    /// Address of the status HTTP API. It serves HTTPS when `HTTP_TLS_CERT_FILE` and
    /// `HTTP_TLS_KEY_FILE` are set, else plain HTTP, which is refused on an address that is not
    /// loopback unless `HTTP_PLAIN_ALLOWED` is set.
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
    /// effect at once (tokens added, revoked or given other roles without a restart; a file
    /// emptied of tokens revokes them all). A file that cannot be read or parsed keeps the
    /// list before it in force, with an error logged at each reload and
    /// `api_token_reload_failures_total` and `api_tokens_stale` in `/metrics`. 0: read it
    /// only at start-up.
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
    /// Live watch streams one token may hold at once (of `WATCH_MAX_STREAMS`); more are
    /// answered 429, so that one viewer cannot take every stream from the others.
    #[arg(long, env = "WATCH_MAX_STREAMS_PER_TOKEN", default_value_t = 100)]
    pub watch_max_streams_per_token: usize,
    /// The longest a watch stream stays open, in milliseconds; then the server ends it and the
    /// client reconnects (each stream opens with an SSE `retry` of 1 s), getting a fresh
    /// snapshot. Bounds what one stream can hold, and moves streams between instances.
    #[arg(long, env = "WATCH_STREAM_MAX_MS", default_value_t = 10 * 60 * 1000)]
    pub watch_stream_max_ms: u64,
    /// History lines a watch stream's first snapshot sends at most: the latest ones. When the
    /// saga has more, a `history_truncated` event says how to page the rest from
    /// `/sagas/{id}/history`.
    #[arg(long, env = "WATCH_SNAPSHOT_HISTORY_LINES", default_value_t = 500)]
    pub watch_snapshot_history_lines: u32,
    /// How long a client may take to send a request's head (request line and headers), in
    /// milliseconds, counted from the connection's start for its first request and from the
    /// first byte of each later one. A client slower than that (a slowloris) is disconnected.
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_read_timeout_ms: u64,
    /// How long a request may take from its head to its answer (reading its body included), in
    /// milliseconds; past it the request is answered 503 (`timeout`). A watch stream's answer
    /// is its first snapshot; the stream itself is bounded by `WATCH_STREAM_MAX_MS`. Keep it
    /// above `ORDER_PUBLISH_TIMEOUT_MS`.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub http_request_timeout_ms: u64,
    /// How long a kept-alive connection may wait between requests, in milliseconds (no request
    /// in progress and nothing received), and a client may leave its answer unread (its socket
    /// buffer full); then the server closes the connection.
    #[arg(long, env = "HTTP_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub http_idle_timeout_ms: u64,
    /// Connections the API (and, apart, the ops address) holds open at once. A connection
    /// beyond it is closed as soon as it is accepted, never queued. Keep it above
    /// `WATCH_MAX_STREAMS` (each stream holds one) and under the process's open-file limit
    /// less what the database pools and Kafka need.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 4096)]
    pub http_max_connections: u32,
    /// How long `POST /orders` waits for the broker to acknowledge the order, in milliseconds
    /// (the order producer's `message.timeout.ms`); past it the order is answered 503, to be
    /// sent again with the same `Idempotency-Key` or `order_id`.
    #[arg(long, env = "ORDER_PUBLISH_TIMEOUT_MS", default_value_t = 10_000)]
    pub order_publish_timeout_ms: u64,
    /// How long an `Idempotency-Key` of `POST /orders` is remembered, in seconds: within it,
    /// the same key from the same token gets the same order id and the same answer. At most
    /// `ORDER_DEDUP_RETENTION_SECS`.
    #[arg(long, env = "IDEMPOTENCY_KEY_RETENTION_SECS", default_value_t = 24 * 3600)]
    pub idempotency_key_retention_secs: u64,
    /// The API's certificate (PEM, the server's first, then its chain): with
    /// `HTTP_TLS_KEY_FILE`, `HTTP_ADDR` serves HTTPS only, every answer with
    /// `Strict-Transport-Security`. `scripts/pki.sh issue api` makes one from the local CA.
    #[arg(long, env = "HTTP_TLS_CERT_FILE", requires = "http_tls_key_file")]
    pub http_tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "HTTP_TLS_KEY_FILE", requires = "http_tls_cert_file")]
    pub http_tls_key_file: Option<PathBuf>,
    /// Mutual TLS: CA certificates (PEM) one of which must have signed the certificate every
    /// client shows; a client without one is refused in the handshake. For machine clients
    /// (sagactl's `--api-client-cert`); a browser needs the certificate installed. The bearer
    /// token is still needed.
    #[arg(long, env = "HTTP_TLS_CLIENT_CA_FILE", requires = "http_tls_cert_file")]
    pub http_tls_client_ca_file: Option<PathBuf>,
    /// How often, in milliseconds, the TLS files are read again: a renewed certificate (or
    /// client CA) is served to new connections without a restart, once both files read the
    /// same twice 100 ms apart. Files that cannot be used keep the certificate in force, with
    /// an error logged at each reload and `http_tls_reload_failures_total` and
    /// `http_tls_stale` in `/metrics`. 0: read them only at start-up.
    #[arg(long, env = "HTTP_TLS_RELOAD_MS", default_value_t = 5000)]
    pub http_tls_reload_ms: u64,
    /// Serve plain HTTP on an address that is not loopback: for a TLS-terminating proxy or a
    /// container whose port is published on loopback only. Without it, the orchestrator
    /// refuses to start with plain HTTP on such an address: bearer tokens would cross the
    /// network in the clear.
    #[arg(long, env = "HTTP_PLAIN_ALLOWED")]
    pub http_plain_allowed: bool,
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
            watch_max_streams_per_token: 100,
            watch_stream_max_ms: 10 * 60 * 1000,
            watch_snapshot_history_lines: 500,
            http_header_read_timeout_ms: 10_000,
            http_request_timeout_ms: 30_000,
            http_idle_timeout_ms: 60_000,
            http_max_connections: 4096,
            order_publish_timeout_ms: 10_000,
            idempotency_key_retention_secs: 24 * 3600,
            http_tls_cert_file: None,
            http_tls_key_file: None,
            http_tls_client_ca_file: None,
            http_tls_reload_ms: 5000,
            http_plain_allowed: false,
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
            // At start-up a list of no tokens is refused, as no list is: a service that nobody
            // can call is a mistake. A reload to an empty list is not (`reload_tokens`).
            return Ok(Gate::Tokens(Tokens::parse(&text)?.non_empty()?));
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

impl ApiConfig {
    /// The TLS files of the API, when it serves HTTPS; `Err` when it would serve plain HTTP
    /// where that is refused: on an address that is not loopback, unless
    /// `HTTP_PLAIN_ALLOWED`.
    ///
    /// # Errors
    /// [`Error::PlainHttp`], and [`Error::Config`] for a certificate without its key.
    pub fn tls_files(
        &self,
        http_addr: SocketAddr,
    ) -> Result<Option<crate::api::tls::TlsFiles>, Error> {
        match (&self.http_tls_cert_file, &self.http_tls_key_file) {
            (Some(cert), Some(key)) => Ok(Some(crate::api::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.http_tls_client_ca_file.clone(),
            })),
            (None, None) if self.http_tls_client_ca_file.is_some() => Err(Error::Config(
                "HTTP_TLS_CLIENT_CA_FILE needs HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE".into(),
            )),
            (None, None) if http_addr.ip().is_loopback() || self.http_plain_allowed => Ok(None),
            (None, None) => Err(Error::PlainHttp { http_addr }),
            _ => Err(Error::Config(
                "set both HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE, or neither".into(),
            )),
        }
    }

    /// Checks the settings that bound the HTTP server against each other.
    ///
    /// # Errors
    /// [`Error::Config`] naming the setting that is out of bounds.
    pub fn check_limits(&self, order_dedup_retention_secs: u64) -> Result<(), Error> {
        let positive = [
            (
                "HTTP_HEADER_READ_TIMEOUT_MS",
                self.http_header_read_timeout_ms,
            ),
            ("HTTP_REQUEST_TIMEOUT_MS", self.http_request_timeout_ms),
            ("HTTP_IDLE_TIMEOUT_MS", self.http_idle_timeout_ms),
            ("HTTP_MAX_CONNECTIONS", u64::from(self.http_max_connections)),
            ("WATCH_STREAM_MAX_MS", self.watch_stream_max_ms),
            ("ORDER_PUBLISH_TIMEOUT_MS", self.order_publish_timeout_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(Error::Config(format!("{name} must be above 0")));
        }
        // A request cut before the broker answered would be answered 503 while its order may
        // still go out; with the publish timeout inside, the broker's answer is the one given.
        if self.http_request_timeout_ms <= self.order_publish_timeout_ms {
            return Err(Error::Config(
                "HTTP_REQUEST_TIMEOUT_MS must be above ORDER_PUBLISH_TIMEOUT_MS".into(),
            ));
        }
        // A key remembered longer than its order id would let a retry start a second saga.
        if self.idempotency_key_retention_secs > order_dedup_retention_secs {
            return Err(Error::Config(
                "IDEMPOTENCY_KEY_RETENTION_SECS must be at most ORDER_DEDUP_RETENTION_SECS".into(),
            ));
        }
        Ok(())
    }

    pub fn watch_limits(&self) -> crate::api::watch::WatchLimits {
        crate::api::watch::WatchLimits {
            max_streams: self.watch_max_streams,
            max_streams_per_token: self.watch_max_streams_per_token,
            max_lifetime: Duration::from_millis(self.watch_stream_max_ms),
            snapshot_lines: i64::from(self.watch_snapshot_history_lines.max(1)),
        }
    }

    pub fn server_limits(&self) -> crate::api::server::Limits {
        crate::api::server::Limits {
            header_read_timeout: Duration::from_millis(self.http_header_read_timeout_ms),
            request_timeout: Duration::from_millis(self.http_request_timeout_ms),
            idle_timeout: Duration::from_millis(self.http_idle_timeout_ms),
            max_connections: self.http_max_connections,
        }
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
    /// A deadline that passes while the command's participant is still working through the
    /// records queued before it (its consumer group has records left on the saga's partition
    /// and moved within this many milliseconds) waits about as long as the group needs to
    /// reach the end, instead of sending the command again; the same for a reply queued for
    /// the orchestrators. A group that stood still this long counts as gone, and deadlines
    /// count as ever. 0: every deadline counts, and no offsets are read.
    #[arg(long, env = "DEADLINE_BACKLOG_STALL_MS", default_value_t = 30_000)]
    pub deadline_backlog_stall_ms: u64,
    /// The consumer groups of participants whose group is not `{TOPIC_PREFIX}{participant}`
    /// (they set PARTICIPANT_GROUP), as `participant=group` pairs, e.g.
    /// `shipping=acme-shipping`: the groups whose offsets DEADLINE_BACKLOG_STALL_MS reads.
    #[arg(long, env = "PARTICIPANT_GROUPS", value_delimiter = ',')]
    pub participant_groups: Vec<String>,
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
            deadline_backlog_stall_ms: 30_000,
            participant_groups: Vec::new(),
        }
    }
}

/// A per-step retry override (`STEP_TIMEOUT_OVERRIDES_MS`) that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverrideError {
    #[error("step timeout override {0:?} is not step=milliseconds (STEP_TIMEOUT_OVERRIDES_MS)")]
    Malformed(String),
    #[error("participant group {0:?} is not participant=group (PARTICIPANT_GROUPS)")]
    ParticipantGroup(String),
    /// `step=` followed by what is not a number of milliseconds.
    #[error(
        "step timeout override {entry:?} is not step=milliseconds (STEP_TIMEOUT_OVERRIDES_MS)"
    )]
    Milliseconds {
        entry: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("unknown step {0:?} in a timeout override (STEP_TIMEOUT_OVERRIDES_MS)")]
    UnknownStep(String),
}

impl RetryConfig {
    pub fn scan_interval(&self) -> Duration {
        Duration::from_millis(self.deadline_scan_interval_ms)
    }

    pub fn backlog_stall(&self) -> Duration {
        Duration::from_millis(self.deadline_backlog_stall_ms)
    }

    /// `PARTICIPANT_GROUPS`: participant name to consumer group.
    ///
    /// # Errors
    /// [`OverrideError::ParticipantGroup`] naming an entry that is not `participant=group`.
    pub fn participant_groups(&self) -> Result<HashMap<String, String>, OverrideError> {
        self.participant_groups
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|entry| match entry.split_once('=') {
                Some((name, group)) if !name.trim().is_empty() && !group.trim().is_empty() => {
                    Ok((name.trim().to_owned(), group.trim().to_owned()))
                }
                _ => Err(OverrideError::ParticipantGroup(entry.clone())),
            })
            .collect()
    }

    /// `STEP_TIMEOUT_OVERRIDES_MS` as (step, milliseconds).
    fn timeout_overrides(&self) -> Result<Vec<(&str, u64)>, OverrideError> {
        self.step_timeout_overrides_ms
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|entry| {
                let (step, ms) = entry
                    .split_once('=')
                    .ok_or_else(|| OverrideError::Malformed(entry.clone()))?;
                let ms =
                    ms.trim()
                        .parse::<u64>()
                        .map_err(|source| OverrideError::Milliseconds {
                            entry: entry.clone(),
                            source,
                        })?;
                Ok((step.trim(), ms))
            })
            .collect()
    }

    /// Changes `definition`'s retry policies as these settings say.
    ///
    /// # Errors
    /// [`OverrideError::Malformed`] or [`OverrideError::Milliseconds`] naming an override that
    /// is not `step=milliseconds`.
    pub fn apply(&self, definition: &mut SagaDefinition) -> Result<(), OverrideError> {
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
    /// [`OverrideError::UnknownStep`] naming the unknown step, or as [`RetryConfig::apply`].
    pub fn check_overrides(&self, definitions: &[SagaDefinition]) -> Result<(), OverrideError> {
        self.participant_groups()?;
        for (step, _) in self.timeout_overrides()? {
            if !definitions.iter().any(|d| d.step(step).is_some()) {
                return Err(OverrideError::UnknownStep(step.to_owned()));
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

        for (bad, expected) in [
            (
                "charge_payment",
                OverrideError::Malformed("charge_payment".into()),
            ),
            ("ship=5", OverrideError::UnknownStep("ship".into())),
            (
                "charge_payment=soon",
                OverrideError::Milliseconds {
                    entry: "charge_payment=soon".into(),
                    source: "soon".parse::<u64>().expect_err("not a number"),
                },
            ),
        ] {
            let config = RetryConfig {
                step_timeout_overrides_ms: vec![bad.into()],
                ..RetryConfig::default()
            };
            let mut definition = order();
            let refused = config
                .apply(&mut definition)
                .and_then(|()| config.check_overrides(&[definition]));
            assert_eq!(refused, Err(expected), "{bad}");
            let message = refused.expect_err("refused").to_string();
            assert!(message.contains("STEP_TIMEOUT_OVERRIDES_MS"), "{message}");
        }
    }

    /// Plain HTTP is served on loopback, or elsewhere only when allowed; a certificate needs
    /// its key, and a client CA a certificate.
    #[test]
    fn plain_http_off_loopback_is_refused_unless_allowed() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let everywhere: SocketAddr = "0.0.0.0:8080".parse().expect("address");
        let plain = ApiConfig::default();
        assert!(matches!(plain.tls_files(loopback), Ok(None)));
        let refused = plain.tls_files(everywhere).expect_err("refused");
        assert!(matches!(refused, Error::PlainHttp { .. }), "{refused}");
        assert!(
            refused.to_string().contains("HTTP_PLAIN_ALLOWED"),
            "{refused}"
        );
        let allowed = ApiConfig {
            http_plain_allowed: true,
            ..ApiConfig::default()
        };
        assert!(matches!(allowed.tls_files(everywhere), Ok(None)));

        let tls = ApiConfig {
            http_tls_cert_file: Some("api.crt".into()),
            http_tls_key_file: Some("api.key".into()),
            ..ApiConfig::default()
        };
        let files = tls.tls_files(everywhere).expect("HTTPS").expect("files");
        assert_eq!(
            (files.cert.as_path(), files.client_ca),
            (std::path::Path::new("api.crt"), None)
        );
        let half = ApiConfig {
            http_tls_key_file: None,
            ..tls
        };
        assert!(matches!(half.tls_files(loopback), Err(Error::Config(_))));
        let ca_alone = ApiConfig {
            http_tls_client_ca_file: Some("ca.crt".into()),
            ..ApiConfig::default()
        };
        assert!(matches!(
            ca_alone.tls_files(loopback),
            Err(Error::Config(_))
        ));
    }

    /// An override whose milliseconds do not parse keeps the parser's error as its cause,
    /// printed once after the override's own text.
    #[test]
    fn an_override_that_is_no_number_keeps_the_parsers_error() {
        let config = RetryConfig {
            step_timeout_overrides_ms: vec!["charge_payment=99999999999999999999".into()],
            ..RetryConfig::default()
        };
        let refused = config.check_overrides(&[]).expect_err("too large");
        let cause = std::error::Error::source(&refused).expect("the parser's error");
        let parsed = cause
            .downcast_ref::<std::num::ParseIntError>()
            .expect("a ParseIntError");
        assert_eq!(parsed.kind(), &std::num::IntErrorKind::PosOverflow);
        assert_eq!(
            messaging::chain(&refused),
            format!(
                "step timeout override \"charge_payment=99999999999999999999\" is not \
                 step=milliseconds (STEP_TIMEOUT_OVERRIDES_MS): {parsed}"
            )
        );
    }
}

/// Every setting of the orchestrator and of a participant as their command lines know it, so
/// that a change to how the settings are assembled (the shared pipeline settings) shows
/// whether any setting's flag, variable or default moved.
#[cfg(test)]
mod settings {
    use clap::{Args, CommandFactory};

    /// One line per setting: its flag, its environment variable and its default, sorted (the
    /// order of `--help` is not the contract; the names and defaults are).
    fn table(command: &clap::Command) -> Vec<String> {
        let mut lines: Vec<String> = command
            .get_arguments()
            .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
            .map(|arg| {
                let defaults: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                format!(
                    "--{} {} default={:?}",
                    arg.get_long().unwrap_or_default(),
                    arg.get_env()
                        .map(|e| e.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    defaults
                )
            })
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn the_services_settings_keep_their_names_and_defaults() {
        let participant = participant_sdk::ParticipantConfig::augment_args(clap::Command::new("p"));
        let rendered = format!(
            "[orchestrator]\n{}\n[participant]\n{}\n",
            table(&super::Config::command()).join("\n"),
            table(&participant).join("\n")
        );
        assert_eq!(
            rendered,
            include_str!("settings.txt"),
            "a setting's flag, variable or default changed; the rendering is:\n{rendered}"
        );
    }
}
