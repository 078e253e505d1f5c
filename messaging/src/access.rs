//! How the project's Kafka clients reach a secured cluster, and what they do when it refuses
//! them.
//!
//! Every client (the services' consumers and producers, the API's order publisher, every
//! `sagactl` command, the tests) starts from [`KafkaConnection`]: the bootstrap servers and,
//! optionally, a `client.properties` file of librdkafka properties (`security.protocol`,
//! `sasl.*`, `ssl.*`, or any other), the convention Kafka users know. Secrets stay in that
//! file; nothing secret is passed on a command line.
//!
//! A refusal that retrying cannot fix must stop the service with a reason an operator can act
//! on, not leave it retrying silently: librdkafka reports failed authentication and TLS
//! handshakes through its error callback and keeps reconnecting, and reports a missing ACL as
//! an error of the request. [`AccessWatch`] gathers both: every client built from one
//! connection shares it, and the service's supervisor stops the process when it trips.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;
use tokio::sync::Notify;

use crate::assignment::{Assignment, Owned};
use crate::{Error, Result};

/// The environment variable (and flag) that names the client properties file.
pub const CLIENT_PROPERTIES_SETTING: &str = "KAFKA_CLIENT_PROPERTIES";

/// Properties the engine sets itself because its guarantees rest on them (offsets stored only
/// after the transaction commits, idempotent producers, the Java partitioner, no topic created
/// by a produce). A properties file that sets one is refused rather than silently overridden.
const RESERVED: &[&str] = &[
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "partitioner",
    "allow.auto.create.topics",
    "group.id",
    "group.instance.id",
    "group.protocol",
    "enable.partition.eof",
    "isolation.level",
];

/// How long fresh clients must still be refused after a client first saw its credentials or
/// certificates refused, before the refusal counts: a broker that is restarting can refuse
/// credentials it has not loaded yet for a moment, while a wrong password or an untrusted
/// certificate stays refused.
pub const DEFAULT_REFUSAL_GRACE: Duration = Duration::from_secs(10);

/// Where the Kafka cluster is and with which client properties to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaConnection {
    /// Kafka bootstrap servers, comma separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,

    /// A client.properties file: librdkafka client properties, one `name=value` per line
    /// (`#` or `!` starts a comment), applied to every Kafka client of this process. For a
    /// secured cluster: `security.protocol` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL),
    /// `sasl.mechanism` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), `sasl.username`,
    /// `sasl.password`, `ssl.ca.location` (the CA in PEM), and for mutual TLS
    /// `ssl.certificate.location` and `ssl.key.location`. Keep secrets in this file, readable
    /// by the service only. The engine's own delivery settings (acks, idempotence, offset
    /// storing, partitioner, group) cannot be overridden. Unset: plaintext, no properties.
    #[arg(long, env = "KAFKA_CLIENT_PROPERTIES")]
    pub kafka_client_properties: Option<PathBuf>,

    /// Seen together: who trips it and who waits on it (not a setting).
    #[arg(skip)]
    pub access: AccessWatch,
}

impl Default for KafkaConnection {
    fn default() -> Self {
        Self::to("127.0.0.1:9092")
    }
}

impl KafkaConnection {
    /// A plaintext connection to `brokers`.
    pub fn to(brokers: impl Into<String>) -> Self {
        Self {
            kafka_brokers: brokers.into(),
            kafka_client_properties: None,
            access: AccessWatch::default(),
        }
    }

    /// The same cluster with the properties of `file`.
    pub fn with_properties(mut self, file: impl Into<PathBuf>) -> Self {
        self.kafka_client_properties = Some(file.into());
        self
    }

    /// The settings every client of this connection starts from: the bootstrap servers, then
    /// the properties file's entries. The file is read each time, so a client created later
    /// (a replaced consumer, a renewed producer) picks up rotated credentials.
    ///
    /// # Errors
    /// [`Error::ClientProperties`] when the file cannot be read, a line is not `name=value`,
    /// or it sets a property the engine owns.
    pub fn client_config(&self) -> Result<ClientConfig> {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.kafka_brokers);
        if let Some(file) = &self.kafka_client_properties {
            for (name, value) in read_properties(file)? {
                client.set(name, value);
            }
        }
        Ok(client)
    }

    /// What identity and security this connection uses, for error messages: the file and its
    /// `security.protocol`, `sasl.mechanism`, `sasl.username` and `ssl.*.location` entries,
    /// never a secret.
    pub fn describe(&self) -> String {
        let Some(file) = &self.kafka_client_properties else {
            return format!(
                "KAFKA_BROKERS={} without {CLIENT_PROPERTIES_SETTING} (plaintext, no authentication)",
                self.kafka_brokers
            );
        };
        let shown: Vec<String> = read_properties(file)
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, _)| {
                name == "security.protocol"
                    || name == "sasl.mechanism"
                    || name == "sasl.mechanisms"
                    || name == "sasl.username"
                    || (name.starts_with("ssl.") && name.ends_with(".location"))
            })
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        format!(
            "KAFKA_BROKERS={}, {CLIENT_PROPERTIES_SETTING}={} ({})",
            self.kafka_brokers,
            file.display(),
            shown.join(", ")
        )
    }
}

/// Reads a `client.properties` file: `name=value` (or `name: value`) lines, blank lines and
/// comments (`#`, `!`) skipped, names and values trimmed. Values may hold `=` (a password).
///
/// # Errors
/// [`Error::ClientProperties`] as [`KafkaConnection::client_config`].
pub fn read_properties(file: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(file).map_err(|source| Error::ClientPropertiesUnreadable {
            file: file.to_owned(),
            source,
        })?;
    parse_properties(&text).map_err(|reason| Error::ClientProperties {
        file: file.to_owned(),
        reason,
    })
}

fn parse_properties(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut properties = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some(split) = line.find(['=', ':']) else {
            return Err(format!("line {} is not `name=value`", number + 1));
        };
        let name = line[..split].trim();
        let value = line[split + 1..].trim();
        if name.is_empty() {
            return Err(format!("line {} has no property name", number + 1));
        }
        if name == "bootstrap.servers" {
            return Err(format!(
                "line {} sets bootstrap.servers: set KAFKA_BROKERS (--kafka-brokers) instead",
                number + 1
            ));
        }
        if RESERVED.contains(&name) {
            return Err(format!(
                "line {} sets {name}, which the engine sets itself (its delivery guarantees rest on it)",
                number + 1
            ));
        }
        properties.push((name.to_owned(), value.to_owned()));
    }
    Ok(properties)
}

/// Why a cluster refuses this process, for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// SASL authentication failed (wrong user or password, mechanism not enabled, credential
    /// deleted): librdkafka's `_AUTHENTICATION`.
    Authentication(RefusalCause),
    /// The TLS handshake failed (a certificate not signed by the CA named, a host name that does
    /// not match, a client certificate the broker does not accept).
    Tls(RefusalCause),
    /// The broker refused an operation for lack of an ACL.
    Authorization(RefusalCause),
}

/// What the cluster's refusal was seen as: the client's error, or librdkafka's description
/// when that is all there is (its error callback).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusalCause {
    /// The error of the operation the cluster refused.
    #[error("{0}")]
    Kafka(#[source] KafkaError),
    /// A topic's metadata that carries the refusal's code.
    #[error("topic {topic}: {code}")]
    Topic {
        topic: String,
        #[source]
        code: RDKafkaErrorCode,
    },
    /// librdkafka's words for a refusal its error callback reported.
    #[error("{0}")]
    Reported(String),
}

impl From<&str> for RefusalCause {
    fn from(reason: &str) -> Self {
        Self::Reported(reason.to_owned())
    }
}

/// The text holds the cause's too (what an operator reads in the one line a refused service
/// ends with); [`crate::chain`] does not print it twice.
impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Authentication(reason) => write!(
                f,
                "SASL authentication failed (check sasl.mechanism, sasl.username and sasl.password): {reason}"
            ),
            Self::Tls(reason) => write!(
                f,
                "the TLS handshake failed (check ssl.ca.location, and ssl.certificate.location and ssl.key.location for mutual TLS): {reason}"
            ),
            Self::Authorization(reason) => write!(
                f,
                "the cluster refuses this identity an operation (an ACL is missing; the admin step `sagactl provision kafka` grants the services theirs): {reason}"
            ),
        }
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.cause())
    }
}

impl Refusal {
    /// The refusal a librdkafka error stands for, if it is one; it keeps the error.
    pub fn of(error: &KafkaError) -> Option<Self> {
        let code = error.rdkafka_error_code()?;
        let kind = Self::kind_of(code, &error.to_string())?;
        Some(kind(RefusalCause::Kafka(error.clone())))
    }

    /// The refusal a librdkafka error code stands for, if it is one; `reason` describes it.
    pub fn of_code(code: RDKafkaErrorCode, reason: &str) -> Option<Self> {
        Self::kind_of(code, reason).map(|kind| kind(reason.into()))
    }

    /// The refusal a topic's metadata error stands for, if it is one.
    pub fn of_topic(topic: &str, code: RDKafkaErrorCode) -> Option<Self> {
        let cause = RefusalCause::Topic {
            topic: topic.to_owned(),
            code,
        };
        Self::kind_of(code, &cause.to_string()).map(|kind| kind(cause))
    }

    /// Which refusal `code` (described by `reason`) is, if it is one.
    fn kind_of(code: RDKafkaErrorCode, reason: &str) -> Option<fn(RefusalCause) -> Self> {
        use RDKafkaErrorCode as Code;
        match code {
            Code::Authentication | Code::SaslAuthenticationFailed => Some(Self::Authentication),
            Code::SSL => Some(Self::Tls),
            // Older librdkafka versions report a failed handshake as a transport error.
            Code::BrokerTransportFailure if reason.contains("SSL handshake failed") => {
                Some(Self::Tls)
            }
            Code::TopicAuthorizationFailed
            | Code::GroupAuthorizationFailed
            | Code::ClusterAuthorizationFailed
            | Code::TransactionalIdAuthorizationFailed
            | Code::DelegationTokenAuthorizationFailed => Some(Self::Authorization),
            _ => None,
        }
    }

    /// What the refusal was seen as.
    pub fn cause(&self) -> &RefusalCause {
        match self {
            Self::Authentication(cause) | Self::Tls(cause) | Self::Authorization(cause) => cause,
        }
    }

    fn is_connection_level(&self) -> bool {
        matches!(self, Self::Authentication(_) | Self::Tls(_))
    }
}

/// Shared by every client of one [`KafkaConnection`]: trips when the cluster refuses this
/// process for good, and wakes whoever waits in [`AccessWatch::refused`].
///
/// A missing ACL trips it at once. Failed authentication or TLS only makes it suspicious:
/// librdkafka reports such a failure once per broker connection and then retries quietly, and
/// a broker that is restarting can refuse credentials it has not loaded yet for a moment. So
/// [`AccessWatch::confirm`] probes the cluster with fresh clients, and trips the watch only
/// when they are still refused after the grace period; a probe that gets through clears the
/// suspicion.
#[derive(Clone, Default)]
pub struct AccessWatch(Arc<AccessState>);

#[derive(Default)]
struct AccessState {
    suspicion: Mutex<Option<Suspicion>>,
    refused: Mutex<Option<Refusal>>,
    changed: Notify,
    grace: Mutex<Option<Duration>>,
}

/// Authentication or TLS failures seen since `since`, the latest being `refusal`.
#[derive(Debug, Clone)]
struct Suspicion {
    since: Instant,
    refusal: Refusal,
}

impl fmt::Debug for AccessWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessWatch")
            .field("refused", &self.refusal())
            .finish()
    }
}

impl AccessWatch {
    /// Sets how long authentication or TLS failures must go on before they count
    /// ([`DEFAULT_REFUSAL_GRACE`] unless set).
    pub fn set_grace(&self, grace: Duration) {
        *lock(&self.0.grace) = Some(grace);
    }

    fn grace(&self) -> Duration {
        lock(&self.0.grace).unwrap_or(DEFAULT_REFUSAL_GRACE)
    }

    /// The refusal, once there is one.
    pub fn refusal(&self) -> Option<Refusal> {
        lock(&self.0.refused).clone()
    }

    /// The authentication or TLS failure seen since the cluster last let a probe in, if any.
    pub fn suspicion(&self) -> Option<Refusal> {
        lock(&self.0.suspicion).as_ref().map(|s| s.refusal.clone())
    }

    /// Records what a client saw: an authorization refusal trips the watch, an authentication
    /// or TLS failure makes it suspicious.
    pub fn saw(&self, refusal: Refusal) {
        if !refusal.is_connection_level() {
            self.trip(refusal);
            return;
        }
        {
            let mut suspicion = lock(&self.0.suspicion);
            let since = suspicion.as_ref().map_or_else(Instant::now, |s| s.since);
            *suspicion = Some(Suspicion { since, refusal });
        }
        self.0.changed.notify_waiters();
    }

    fn trip(&self, refusal: Refusal) {
        {
            let mut refused = lock(&self.0.refused);
            if refused.is_some() {
                return;
            }
            tracing::error!(reason = %refusal, "the Kafka cluster refuses this process");
            *refused = Some(refusal);
        }
        self.0.changed.notify_waiters();
    }

    /// Waits until the watch trips; returns why.
    pub async fn refused(&self) -> Refusal {
        loop {
            let changed = self.0.changed.notified();
            if let Some(refusal) = self.refusal() {
                return refusal;
            }
            changed.await;
        }
    }

    /// Waits until the watch trips or becomes suspicious.
    async fn suspicious_or_refused(&self) {
        loop {
            let changed = self.0.changed.notified();
            if self.refusal().is_some() || lock(&self.0.suspicion).is_some() {
                return;
            }
            changed.await;
        }
    }

    /// Runs for the life of a service: whenever a client of `connection` saw its credentials or
    /// certificates refused, probes the cluster once a second with a fresh client until one
    /// gets through (the suspicion is cleared) or the grace period has passed with the probes
    /// still refused (the watch trips). Returns the refusal once the watch has tripped, for
    /// whatever reason.
    pub async fn confirm(connection: &KafkaConnection) -> Refusal {
        let watch = &connection.access;
        loop {
            watch.suspicious_or_refused().await;
            if let Some(refusal) = watch.refusal() {
                return refusal;
            }
            let since = match lock(&watch.0.suspicion).as_ref() {
                Some(s) => s.since,
                None => continue,
            };
            match probe(connection).await {
                Probe::GotThrough => {
                    tracing::info!("a fresh Kafka client got through: the refusal has passed");
                    *lock(&watch.0.suspicion) = None;
                }
                Probe::Refused(refusal) if since.elapsed() >= watch.grace() => watch.trip(refusal),
                Probe::Refused(refusal) => {
                    tracing::warn!(reason = %refusal, "a fresh Kafka client is refused too");
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
                Probe::Inconclusive => {
                    tracing::warn!("probing the Kafka cluster was inconclusive");
                    tokio::time::sleep(PROBE_INTERVAL).await;
                }
            }
        }
    }
}

/// How often [`AccessWatch::confirm`] probes a suspicious cluster.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

enum Probe {
    GotThrough,
    Refused(Refusal),
    /// Neither: the brokers are away, say.
    Inconclusive,
}

/// Asks the cluster for its brokers with a fresh client of `connection` (its own broker
/// connections, so librdkafka reports their refusal afresh).
async fn probe(connection: &KafkaConnection) -> Probe {
    let settings = match crate::kafka::connection_settings(connection) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::warn!(error.message = %crate::Chain(&e), "probing the Kafka cluster failed");
            return Probe::Inconclusive;
        }
    };
    let outcome = tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer as _;
        let own = WatchedContext::default();
        let client: rdkafka::producer::BaseProducer<WatchedContext> =
            match settings.create_with_context(own.clone()) {
                Ok(client) => client,
                Err(_) => return Probe::Inconclusive,
            };
        let answered = client
            .client()
            .fetch_metadata(None, Duration::from_secs(3))
            .is_ok();
        if !answered {
            // Serves the error callback, which files the probe's own refusals; librdkafka may
            // queue them a little after the request gave up.
            for _ in 0..10 {
                client.poll(Duration::from_millis(100));
                if own.access.suspicion().is_some() {
                    break;
                }
            }
        }
        match (answered, own.access.suspicion()) {
            (true, _) => Probe::GotThrough,
            (false, Some(refusal)) => Probe::Refused(refusal),
            (false, None) => Probe::Inconclusive,
        }
    })
    .await;
    outcome.unwrap_or(Probe::Inconclusive)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind: use it.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The client context of every client the project makes: librdkafka's log lines and errors go
/// to `tracing` (a failed SASL handshake or certificate check is explained only there), and
/// refusals to the connection's [`AccessWatch`]. Consumers also turn librdkafka's statistics
/// into the lag gauge ([`crate::metrics::report_lag`]) and, for a pipeline's consumer, into
/// its service's readiness ([`crate::health::Health::consumer_statistics`]); the pipeline's
/// consumer also keeps its [`Assignment`] up to date from the rebalance callbacks.
#[derive(Clone, Debug, Default)]
pub struct WatchedContext {
    pub access: AccessWatch,
    /// Where a consumer reports the partitions it holds; `None` for every other client.
    pub assignment: Option<Assignment>,
    pub health: Option<crate::health::Health>,
}

impl ClientContext for WatchedContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        match code.and_then(|code| Refusal::of_code(code, reason)) {
            Some(refusal) => {
                tracing::warn!(error.message = %error, reason, "the Kafka cluster refused a connection");
                self.access.saw(refusal);
            }
            None => tracing::warn!(target: "librdkafka", "librdkafka error: {error} ({reason})"),
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        crate::metrics::report_lag(&statistics);
        if let Some(health) = &self.health {
            health.consumer_statistics(&statistics);
        }
    }
}

impl ConsumerContext for WatchedContext {
    /// Partitions being revoked, or lost with a session that lapsed, stop counting as held
    /// before librdkafka gives them up, so work shared by partition stops first.
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let (Some(assignment), Rebalance::Revoke(revoked)) = (&self.assignment, rebalance) {
            assignment.revoking(revoked);
        }
    }

    /// After any rebalance the consumer's own assignment is the truth: whole under the eager
    /// protocol and the incremental one alike (empty after a rebalance that failed, which rdkafka
    /// answers by unassigning).
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Some(assignment) = &self.assignment else {
            return;
        };
        match consumer.assignment() {
            Ok(held) => {
                let held = Owned::of_list(&held);
                tracing::info!(partitions = %held, ?rebalance, "the consumer's assignment changed");
                assignment.set(held);
            }
            // Not knowing what is held, hold nothing: the work waits for the next rebalance
            // rather than risk being done by two instances.
            Err(e) => {
                tracing::warn!(error.message = %e, "cannot read the consumer's assignment");
                assignment.clear();
            }
        }
    }
}

/// For the start-up check's metadata client, which produces nothing.
impl rdkafka::producer::ProducerContext for WatchedContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_files_read_like_javas() {
        let text = "# comment\n! also\n\nsecurity.protocol = SASL_SSL\nsasl.password=a=b:c\nssl.ca.location: /ca.pem\n";
        let parsed = parse_properties(text).expect("parses");
        assert_eq!(
            parsed,
            vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.password".into(), "a=b:c".into()),
                ("ssl.ca.location".into(), "/ca.pem".into()),
            ]
        );
    }

    #[test]
    fn properties_the_engine_owns_are_refused_with_the_line() {
        let error = parse_properties("security.protocol=SSL\nenable.auto.offset.store=true\n")
            .expect_err("refused");
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("enable.auto.offset.store"), "{error}");
        assert!(parse_properties("just-a-word\n").is_err());
        assert!(parse_properties("=value\n").is_err());
    }

    #[test]
    fn the_description_shows_the_identity_but_never_a_secret() {
        let dir = std::env::temp_dir().join(format!("props-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("client.properties");
        std::fs::write(
            &file,
            "security.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\nsasl.username=payment\nsasl.password=hunter2\nssl.ca.location=/ca.pem\n",
        )
        .expect("write");
        let described = KafkaConnection::to("b:9093")
            .with_properties(&file)
            .describe();
        assert!(described.contains("sasl.username=payment"), "{described}");
        assert!(described.contains("ssl.ca.location=/ca.pem"), "{described}");
        assert!(!described.contains("hunter2"), "{described}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_authorization_refusal_trips_at_once_and_authentication_only_makes_it_suspicious() {
        let watch = AccessWatch::default();
        watch.saw(Refusal::Authentication("bad password".into()));
        assert_eq!(
            watch.refusal(),
            None,
            "a failed login may be a restarting broker's"
        );
        assert!(matches!(
            watch.suspicion(),
            Some(Refusal::Authentication(_))
        ));

        watch.saw(Refusal::Authorization("no ACL".into()));
        assert!(matches!(watch.refusal(), Some(Refusal::Authorization(_))));
    }

    #[tokio::test]
    async fn a_suspicion_counts_only_when_fresh_clients_are_refused_too() {
        // Nothing listens on port 1 of this machine: the probes are inconclusive, never refused.
        let connection = KafkaConnection::to("127.0.0.1:1");
        connection.access.set_grace(Duration::from_millis(10));
        connection
            .access
            .saw(Refusal::Tls("a broker restarting".into()));
        let confirmed =
            tokio::time::timeout(Duration::from_secs(3), AccessWatch::confirm(&connection)).await;
        assert!(confirmed.is_err(), "a broker that is away is not a refusal");
        assert_eq!(connection.access.refusal(), None);
    }

    /// A refusal keeps the client's error as its cause, and the error a refused service ends
    /// with prints the broker's words once.
    #[test]
    fn a_refusal_keeps_the_clients_error() {
        let kafka = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        let refusal = Refusal::of(&kafka).expect("an authorization refusal");
        let refused = Error::AccessRefused {
            connection: "the producer".into(),
            refusal,
        };
        let found =
            std::iter::successors(Some(&refused as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .find_map(|cause| cause.downcast_ref::<KafkaError>());
        assert_eq!(found, Some(&kafka));
        let text = crate::chain(&refused);
        assert_eq!(text.matches(&kafka.to_string()).count(), 1, "{text}");
        assert!(text.starts_with("the Kafka cluster refuses the producer: the cluster refuses this identity an operation"), "{text}");

        let topic = Refusal::of_topic("saga.commands", RDKafkaErrorCode::TopicAuthorizationFailed)
            .expect("an authorization refusal");
        assert_eq!(
            topic.to_string(),
            Refusal::of_code(
                RDKafkaErrorCode::TopicAuthorizationFailed,
                &format!(
                    "topic saga.commands: {}",
                    RDKafkaErrorCode::TopicAuthorizationFailed
                )
            )
            .expect("the same refusal")
            .to_string(),
            "reads as the text it replaces"
        );
    }

    #[test]
    fn errors_are_sorted_into_refusals() {
        use RDKafkaErrorCode as Code;
        assert!(matches!(
            Refusal::of_code(Code::Authentication, "x"),
            Some(Refusal::Authentication(_))
        ));
        assert!(matches!(
            Refusal::of_code(Code::SSL, "x"),
            Some(Refusal::Tls(_))
        ));
        assert!(matches!(
            Refusal::of_code(Code::TopicAuthorizationFailed, "x"),
            Some(Refusal::Authorization(_))
        ));
        assert_eq!(
            Refusal::of_code(Code::BrokerTransportFailure, "Connection refused"),
            None
        );
        assert_eq!(Refusal::of_code(Code::UnknownTopicOrPartition, "x"), None);
    }
}
