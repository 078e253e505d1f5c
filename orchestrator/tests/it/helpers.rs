//! A whole deployment per test: the orchestrator and the order saga's participants as tasks in
//! this process, talking to the real PostgreSQL and the real broker over the network. Each test
//! gets its own database and its own topic prefix, and removes both when it ends (the test kit's
//! `TestDatabase` and `TestTopics`). Which participants a saga has, and its topics, come from
//! the repository's saga definitions (`sagas/`); the participants themselves from the test
//! kit's registry (`testkit::participants`).
//!
//! Environment: `KAFKA_BROKERS` (default 127.0.0.1:9092) and `TEST_DATABASE_URL`, a server URL
//! without a database name (default postgres://postgres@127.0.0.1:5432).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::LazyLock;
use std::time::Duration;

use events::{Address, LineItem, OrderPlaced, Topics};
use messaging::config::{DatabaseConfig, FaultConfig, RelayConfig, RetentionConfig, ServiceConfig};
use messaging::provision::{self, ServiceRole};
use orchestrator::auth::{token_line, Role};
use orchestrator::config::{ApiConfig, RetryConfig};
use orchestrator::saga::{Registry, SagaDefinition};
use participant_sdk::{Participant, ParticipantConfig};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use testkit::{Services, TestDatabase, TestRoles, TestTopics};
use uuid::Uuid;

pub use testkit::{brokers, eventually, kafka_config, sagas_dir, server_url};

/// What a test changes about its deployment.
#[derive(Default)]
pub struct Options {
    pub retries: RetryConfig,
    /// Participants not started at first (a test starts them with `start_participant`).
    pub without: Vec<&'static str>,
    /// Sweep finished sagas and inbox rows older than this many seconds, every 100 ms.
    pub retention_secs: Option<u64>,
    /// With `retention_secs`: sweep failed sagas, parked outbox rows and the participants'
    /// step ledger entries older than this many seconds too.
    pub everything_retention_secs: Option<u64>,
    /// Fault injection for the orchestrator.
    pub orchestrator_faults: FaultConfig,
    /// The API's settings; the test tokens ([`token_list`]) unless they name other access.
    pub api: ApiConfig,
    /// The services' broker, when not the shared one ([`brokers`]): a test's private broker.
    pub brokers: Option<String>,
    /// The orchestrator's clock runs this many seconds ahead (`FAULT_CLOCK_SKEW_SECS`).
    pub clock_skew_secs: i64,
    /// Every service's `KAFKA_CONSUMER_STALL_MS`, when not the default.
    pub consumer_stall_ms: Option<u64>,
    /// Every service of the repository (the orchestrator and each participant of the test
    /// kit's registry, `testkit::participants`) connects as its own role over TLS (verify-full
    /// against the server's CA, [`testkit::server_ca`]), with the password the admin step made:
    /// the admin step (`messaging::provision`) runs first with roles named for this test, which
    /// are dropped at the end ([`testkit::TestRoles`]). Otherwise every service connects as the
    /// superuser of [`server_url`].
    pub service_roles: bool,
    /// With `service_roles`: these services each get a database of their own (database per
    /// service) instead of a schema in the test's database.
    pub own_databases: Vec<&'static str>,
    /// The CA the test's HTTP client trusts, for an API served over TLS (`api` names its
    /// certificate): the client then calls `https://127.0.0.1:port`.
    pub tls_ca: Option<PathBuf>,
    /// The client certificate and key the test's HTTP client shows (mutual TLS).
    pub tls_identity: Option<(PathBuf, PathBuf)>,
}

/// `ALTER DATABASE database <change>` on a test's own database, then every session of it
/// ended (as the superuser, from `postgres`), so that its services' pools reconnect under the
/// change: a setting taken by new sessions, or new connections refused.
pub async fn alter_database(database: &str, change: &str) {
    let admin = PgPool::connect(&format!("{}/postgres", server_url()))
        .await
        .expect("admin connection");
    sqlx::query(&format!("ALTER DATABASE \"{database}\" {change}"))
        .execute(&admin)
        .await
        .expect("alter database");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .execute(&admin)
    .await
    .expect("end the database's sessions");
    admin.close().await;
}

/// The test's HTTP client: trusting `ca` only, when given, and showing `identity`.
fn http_client(ca: Option<&PathBuf>, identity: Option<&(PathBuf, PathBuf)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).expect("the CA file");
        builder = builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("PEM"));
    }
    if let Some((cert, key)) = identity {
        let identity = reqwest::Identity::from_pkcs8_pem(
            &std::fs::read(cert).expect("the client certificate"),
            &std::fs::read(key).expect("the client key"),
        )
        .expect("a certificate and a PKCS#8 key");
        builder = builder.identity(identity);
    }
    builder.build().expect("the HTTP client")
}

/// The roles and databases of a deployment with `Options::service_roles`. Its fields drop in
/// their order: the services' own databases, then the roles, which own what was in them.
struct ServiceRoles {
    /// The databases of the services in `Options::own_databases`.
    _own_databases: Vec<TestDatabase>,
    roles: TestRoles,
    /// The database each service uses, by service.
    databases: HashMap<String, String>,
}

impl ServiceRoles {
    /// Runs the admin step for this test: a role per service of the repository, and the
    /// schemas in `database`, or in a database of its own for each of `own_databases`.
    async fn provision(database: &str, own_databases: &[&str]) -> Self {
        let mut services = vec!["orchestrator"];
        let participants = testkit::participants::all(&testkit::participants::Settings::default());
        services.extend(participants.iter().map(Participant::name));
        let admin = testkit::admin("postgres").await;
        let roles = TestRoles::create(&admin, &services).await;
        admin.close().await;
        let mut databases = HashMap::new();
        let mut own = Vec::new();
        for role in roles.all() {
            let mut of_service = database.to_owned();
            if own_databases.contains(&role.service.as_str()) {
                let created =
                    TestDatabase::create_named(format!("{database}_{}", role.service)).await;
                of_service = created.name().to_owned();
                own.push(created);
            }
            let pool = testkit::admin(&of_service).await;
            let extensions: &[&str] = if role.service == "orchestrator" {
                orchestrator::store::EXTENSIONS
            } else {
                &[]
            };
            provision::create_schemas(&pool, std::slice::from_ref(role), extensions)
                .await
                .expect("the admin step creates the schema");
            pool.close().await;
            databases.insert(role.service.clone(), of_service);
        }
        Self {
            _own_databases: own,
            roles,
            databases,
        }
    }

    /// `service`'s URL: its role, verify-full against the CA, its database; with the password
    /// when `with_password` (in-process services share one environment, so not PGPASSFILE).
    fn url(&self, service: &str, with_password: bool) -> Option<String> {
        self.roles.role(service)?;
        let database = &self.databases[service];
        Some(if with_password {
            self.roles.url(service, database)
        } else {
            self.roles.url_without_password(service, database)
        })
    }
}

/// The definitions of [`sagas_dir`], read and checked once, as the orchestrator does.
static DEFINITIONS: LazyLock<Registry> = LazyLock::new(|| {
    orchestrator::saga::definitions::load_dir(&sagas_dir())
        .and_then(Registry::new)
        .unwrap_or_else(|e| panic!("the repository's saga definitions do not load: {e}"))
});

/// The newest definition of the repository's saga type `name`.
pub fn definition(name: &str) -> &'static SagaDefinition {
    DEFINITIONS
        .newest(name)
        .unwrap_or_else(|| panic!("no saga {name} in {}", sagas_dir().display()))
}

/// The participants the steps of the saga type `saga` name, each once, in the order of its
/// steps. Fails the test when one is not in the registry or does not serve its step.
pub fn participants_of(saga: &str) -> Vec<Participant> {
    let definition = definition(saga);
    let mut participants: Vec<Participant> = Vec::new();
    for step in &definition.steps {
        if participants.iter().any(|p| p.name() == step.participant) {
            continue;
        }
        let participant = testkit::participants::named(&step.participant);
        assert!(
            participant.step_names().contains(&step.name.as_str()),
            "{} names {} for step {}, which it does not serve (it serves {:?})",
            definition.file,
            step.participant,
            step.name,
            participant.step_names()
        );
        participants.push(participant);
    }
    participants
}

/// Short deadlines, so tests of retries take seconds: 300 ms for the first reply, doubling to
/// at most 1 s; 3 compensation attempts.
pub fn fast_retries() -> RetryConfig {
    RetryConfig {
        step_timeout_ms: Some(300),
        step_max_attempts: Some(100),
        compensation_max_attempts: Some(3),
        retry_max_timeout_ms: Some(1_000),
        deadline_scan_interval_ms: 50,
        ..RetryConfig::default()
    }
}

/// The tokens every test deployment accepts, one per role.
pub const VIEWER_TOKEN: &str = "test-viewer-token";
pub const CLIENT_TOKEN: &str = "test-client-token";
pub const OPERATOR_TOKEN: &str = "test-operator-token";
/// The operator token's name: what operator actions record as the operator.
pub const OPERATOR_NAME: &str = "ops-alice";

/// The token list of a test deployment.
pub fn token_list() -> String {
    [
        token_line("dashboards", &[Role::Viewer], VIEWER_TOKEN),
        token_line("shop", &[Role::Client], CLIENT_TOKEN),
        token_line(OPERATOR_NAME, &[Role::Operator], OPERATOR_TOKEN),
    ]
    .join("\n")
}

/// Every topic of a deployment of the repository's sagas: the engine's, and each saga's trigger
/// topic and its steps' command topics, each once.
pub fn all_topics(topics: &Topics) -> Vec<String> {
    let (triggers, commands) = DEFINITIONS.topics();
    let mut all = topics.engine();
    all.extend(triggers.iter().chain(&commands).map(|t| topics.named(t)));
    all
}

pub struct TestSystem {
    pub http: String,
    pub topics: Topics,
    /// Stopped (the shutdown token cancelled) before what follows is removed.
    services: Services,
    participant: ParticipantConfig,
    producer: FutureProducer,
    client: reqwest::Client,
    // The clean-up, in this order: the topics, the test's database, then (with
    // `Options::service_roles`) the services' own databases and the roles.
    _prefix: TestTopics,
    database_url: String,
    _database: TestDatabase,
    roles: Option<ServiceRoles>,
}

impl TestSystem {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        std::mem::forget(messaging::telemetry::init("saga-tests"));
        let kafka_topics = TestTopics::new("test");
        let database = TestDatabase::create("saga_test").await;
        let roles = if options.service_roles {
            Some(ServiceRoles::provision(database.name(), &options.own_databases).await)
        } else {
            None
        };

        let mut kafka = kafka_topics.kafka_config(2);
        if let Some(stall_ms) = options.consumer_stall_ms {
            kafka.consumer_stall_ms = stall_ms;
        }
        if let Some(brokers) = &options.brokers {
            kafka.connection.kafka_brokers.clone_from(brokers);
        }
        let topics = Topics::new(kafka.topic_prefix.clone());
        messaging::kafka::ensure_topics(&kafka, &all_topics(&topics))
            .await
            .expect("create test topics");
        let database_config = DatabaseConfig {
            database_url: database.url(),
            database_schema: None,
            database_max_connections: 2,
            ..DatabaseConfig::to("")
        };
        let retention = match options.retention_secs {
            Some(secs) => RetentionConfig {
                inbox_retention_secs: secs,
                outbox_parked_retention_secs: options
                    .everything_retention_secs
                    .unwrap_or(30 * 24 * 3600),
                retention_sweep_interval_ms: 100,
            },
            None => RetentionConfig::default(),
        };
        let participant = ParticipantConfig {
            service: ServiceConfig {
                kafka: kafka.clone(),
                database: database_config.clone(),
                relay: RelayConfig::default(),
                retention: retention.clone(),
                faults: FaultConfig::default(),
            },
            group: None,
            command_topic: None,
            metrics_addr: None,
            fault_compensation_failures: 0,
            step_ledger_retention_secs: options
                .everything_retention_secs
                .unwrap_or(participant_sdk::STEP_LEDGER_RETENTION_SECS),
        };

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = if options.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        let http = format!("{scheme}://{}", listener.local_addr().expect("local addr"));
        let service_connection = kafka.connection.clone();
        let orchestrator_database = DatabaseConfig {
            database_url: roles
                .as_ref()
                .and_then(|roles| roles.url("orchestrator", true))
                .unwrap_or_else(|| database.url()),
            ..database_config
        };
        let config = orchestrator::Config {
            service: ServiceConfig {
                kafka,
                database: orchestrator_database,
                relay: RelayConfig::default(),
                retention,
                faults: options.orchestrator_faults,
            },
            saga_retention_secs: options.retention_secs.unwrap_or(7 * 24 * 3600),
            failed_saga_retention_secs: options.everything_retention_secs.unwrap_or(30 * 24 * 3600),
            order_dedup_retention_secs: 8 * 24 * 3600,
            retries: options.retries,
            sagas_dir: sagas_dir(),
            http_addr: listener.local_addr().expect("local addr"),
            group: None,
            fault_clock_skew_secs: options.clock_skew_secs,
            api: {
                let mut api = options.api;
                if api.api_tokens.is_none()
                    && api.api_tokens_file.is_none()
                    && !api.api_open_on_loopback
                {
                    api.api_tokens = Some(token_list());
                }
                api
            },
        };
        let mut services = Services::new();
        if !options.without.contains(&"orchestrator") {
            services.start("orchestrator", |stop| {
                orchestrator::run(config, listener, stop)
            });
        }

        let producer: FutureProducer = messaging::kafka::producer_settings(&service_connection, 0)
            .expect("the producer settings")
            .create()
            .expect("producer");
        let mut system = Self {
            http,
            topics,
            services,
            participant,
            producer,
            client: http_client(options.tls_ca.as_ref(), options.tls_identity.as_ref()),
            _prefix: kafka_topics,
            database_url: database.url(),
            _database: database,
            roles,
        };
        // A default deployment runs the order saga; a test starts the return saga's own
        // participant when it needs it.
        for participant in participants_of("order") {
            if !options.without.contains(&participant.name()) {
                let config = system.participant.clone();
                system.run_participant(participant, config);
            }
        }
        system.wait_until_healthy().await;
        system
    }

    /// Starts the repository's participant `name`; it refuses its first `compensation_faults`
    /// compensations.
    pub fn start_participant(&mut self, name: &str, compensation_faults: u32) {
        self.start_participant_with(
            testkit::participants::named(name),
            compensation_faults,
            FaultConfig::default(),
        );
    }

    /// Starts a participant that stops dead right after its first message committed (once it
    /// is 3 s old): a crash between its commit and its offset store, inside this process.
    pub fn start_crashing_participant(&mut self, name: &str) {
        let faults = FaultConfig {
            crash_after_commit_every: 1,
            crash_in_process: true,
            ..FaultConfig::default()
        };
        self.start_participant_with(testkit::participants::named(name), 0, faults);
    }

    fn start_participant_with(
        &mut self,
        participant: Participant,
        compensation_faults: u32,
        faults: FaultConfig,
    ) {
        let mut config = ParticipantConfig {
            metrics_addr: None,
            fault_compensation_failures: compensation_faults,
            ..self.participant.clone()
        };
        config.service.faults = faults;
        self.run_participant(participant, config);
    }

    /// Starts the repository's participant `name` with this deployment's settings as `edit`
    /// changes them (another instance of a running one, say: same name, same group).
    pub fn start_participant_configured(
        &mut self,
        name: &str,
        edit: impl FnOnce(&mut ParticipantConfig),
    ) {
        let mut config = self.participant.clone();
        edit(&mut config);
        self.services
            .start_participant(testkit::participants::named(name), config);
    }

    /// Starts the repository's participant `name` with its `/metrics`, `/healthz`, `/livez`
    /// and `/readyz` on `metrics_addr`.
    pub fn start_participant_serving_metrics(&mut self, name: &str, metrics_addr: SocketAddr) {
        self.start_participant_configured(name, |config| config.metrics_addr = Some(metrics_addr));
    }

    /// Starts a participant of the test's own (written with the SDK), with this deployment's
    /// settings.
    pub fn start_custom_participant(&mut self, participant: Participant) {
        self.start_custom_participant_configured(participant, |_| {});
    }

    /// [`TestSystem::start_custom_participant`], with this deployment's settings as `edit`
    /// changes them.
    pub fn start_custom_participant_configured(
        &mut self,
        participant: Participant,
        edit: impl FnOnce(&mut ParticipantConfig),
    ) {
        let mut config = self.participant.clone();
        edit(&mut config);
        self.run_participant(participant, config);
    }

    fn run_participant(&mut self, participant: Participant, mut config: ParticipantConfig) {
        let name = participant.name();
        if let Some(url) = self.roles.as_ref().and_then(|roles| roles.url(name, true)) {
            config.service.database.database_url = url;
        }
        self.services.start_participant(participant, config);
    }

    /// The URL of the test's database.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// With `Options::service_roles`: `service`'s role, made by the admin step.
    pub fn service_role(&self, service: &str) -> Option<&ServiceRole> {
        self.roles.as_ref()?.roles.role(service)
    }

    /// With `Options::service_roles`: `service`'s URL as a deployment gives it, its role over
    /// TLS (verify-full) without the password, which comes from a password file.
    pub fn service_url(&self, service: &str) -> Option<String> {
        self.roles.as_ref()?.url(service, false)
    }

    /// The superuser's URL of the database `service` keeps its schema in.
    fn service_database_url(&self, service: &str) -> String {
        match self
            .roles
            .as_ref()
            .and_then(|roles| roles.databases.get(service))
        {
            Some(database) => format!("{}/{database}", server_url()),
            None => self.database_url.clone(),
        }
    }

    /// The services running now, by name: each one's schema too, as a test deployment names
    /// no schema.
    pub fn running_services(&self) -> Vec<&'static str> {
        self.services.names()
    }

    /// The services that ended by themselves (a crash) while the test ran.
    pub fn ended_services(&self) -> Vec<&'static str> {
        self.services.ended()
    }

    /// Waits until a service ends by itself (a crash) and returns why it ended.
    pub async fn wait_for_exit(&mut self, name: &str) -> String {
        self.services.wait_for_exit(name).await
    }

    /// Stops one service gracefully and waits for it.
    pub async fn stop_service(&mut self, name: &str) {
        self.services.stop(name).await;
    }

    /// Waits for the orchestrator's API and for the started participants to be ready.
    async fn wait_until_healthy(&self) {
        if self.services.contains("orchestrator") {
            self.wait_for_api().await;
        }
        self.wait_for_participants().await;
    }

    /// The orchestrator binary with this deployment's settings and `env` on top (a name with
    /// an empty value removed), its API on a free port (returned).
    pub fn orchestrator_command(&self, env: &[(&str, &str)]) -> (tokio::process::Command, u16) {
        let port = testkit::free_port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"));
        command
            .env("KAFKA_BROKERS", brokers())
            .env("TOPIC_PREFIX", self.topics.prefix())
            .env("DATABASE_URL", &self.database_url)
            .env("DATABASE_MAX_CONNECTIONS", "2")
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("KAFKA_GROUP_INSTANCE_ID", "orchestrator-under-test")
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("API_TOKENS", token_list())
            .env("SAGAS_DIR", sagas_dir())
            .envs(env.iter().copied())
            .kill_on_drop(true);
        // An empty value removes the setting (static membership, say).
        for (name, _) in env.iter().filter(|(_, value)| value.is_empty()) {
            command.env_remove(name);
        }
        (command, port)
    }

    /// Starts the orchestrator binary as a process of its own, with `env` on top of this
    /// deployment's settings, points the test's HTTP client at it and waits for its API. It
    /// uses static group membership, so a restarted process takes its partitions back at once.
    pub async fn spawn_orchestrator_process(
        &mut self,
        env: &[(&str, &str)],
    ) -> tokio::process::Child {
        let (child, http) = self.spawn_orchestrator_instance(env).await;
        self.http = http;
        child
    }

    /// Starts one more orchestrator process like [`Self::spawn_orchestrator_process`], beside
    /// any others (give each its own `KAFKA_GROUP_INSTANCE_ID` in `env`), and waits for its
    /// API; the test's HTTP client stays where it points. Returns the process and its API's
    /// base URL.
    pub async fn spawn_orchestrator_instance(
        &self,
        env: &[(&str, &str)],
    ) -> (tokio::process::Child, String) {
        let (mut command, port) = self.orchestrator_command(env);
        let child = command.spawn().expect("start the orchestrator binary");
        let http = format!("http://127.0.0.1:{port}");
        eventually("the orchestrator instance to answer /healthz", || async {
            match self
                .client
                .get(format!("{http}/healthz"))
                .bearer_auth(VIEWER_TOKEN)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        })
        .await;
        (child, http)
    }

    /// The `/metrics` text of the orchestrator whose API is at `http`.
    pub async fn metrics_of(&self, http: &str) -> String {
        let response = self
            .client
            .get(format!("{http}/metrics"))
            .bearer_auth(VIEWER_TOKEN)
            .send()
            .await
            .expect("GET /metrics");
        assert!(response.status().is_success(), "{}", response.status());
        response.text().await.expect("the metrics' text")
    }

    /// Starts the orchestrator binary like [`Self::spawn_orchestrator_process`] and expects it
    /// to stop on its own within 30 s: returns whether it succeeded and what it printed.
    pub async fn orchestrator_process_output(&self, env: &[(&str, &str)]) -> (bool, String) {
        let (mut command, _) = self.orchestrator_command(env);
        let child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the orchestrator binary");
        let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("the orchestrator stops within 30 s")
            .expect("wait");
        let text = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        (output.status.success(), text)
    }

    async fn wait_for_api(&self) {
        eventually("the orchestrator to answer /healthz", || async {
            match self
                .request_as("GET", "/healthz", Some(VIEWER_TOKEN), None)
                .await
            {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        })
        .await;
    }

    /// Waits until every running participant is ready: all its migrations are in, the demo
    /// data among them, so orders placed from now on find their stock and accounts.
    pub async fn wait_for_participants(&self) {
        for (name, readiness) in self.services.readiness() {
            let db = self.schema(name).await;
            let what = format!("{name} to apply all its migrations");
            eventually(&what, || async {
                readiness.is_ready(&db).await.ok()?.then_some(())
            })
            .await;
            db.close().await;
        }
    }

    /// A pool on the test database (the service's own, when it has one) with `schema` as
    /// search path, to check a service's tables; as the superuser.
    pub async fn schema(&self, schema: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(1)
            .connect_with(
                self.service_database_url(schema)
                    .parse::<sqlx::postgres::PgConnectOptions>()
                    .expect("url")
                    .options([("search_path", schema)]),
            )
            .await
            .expect("connect to test database")
    }

    /// Publishes raw bytes to `topic`, as an outside client would.
    pub async fn publish(&self, topic: &str, key: &str, payload: &[u8]) {
        self.publish_with_headers(topic, key, payload, &[]).await;
    }

    pub async fn publish_with_headers(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) {
        let headers = messaging::kafka::record_headers(headers.iter().copied());
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("publish");
    }

    /// Places `order` as a client inside trace `traceparent` would.
    pub async fn place_traced(&self, order: &OrderPlaced, traceparent: &str) {
        let payload = serde_json::to_vec(order).expect("serialise order");
        self.publish_with_headers(
            &self.topics.orders(),
            &order.order_id.to_string(),
            &payload,
            &[("traceparent", traceparent)],
        )
        .await;
    }

    /// Publishes a new order keyed by `order_id`, so that it lands behind every record of that
    /// order in its partition: once the marker's saga exists, they have all been handled.
    pub async fn place_marker_behind(&self, order_id: Uuid) -> OrderPlaced {
        let marker = order("bob", "GADGET", 1, "DE");
        let payload = serde_json::to_vec(&marker).expect("serialise order");
        self.publish(&self.topics.orders(), &order_id.to_string(), &payload)
            .await;
        marker
    }

    pub async fn place(&self, order: &OrderPlaced) {
        let payload = serde_json::to_vec(order).expect("serialise order");
        self.publish(&self.topics.orders(), &order.order_id.to_string(), &payload)
            .await;
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.get_response(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A GET whose body is not JSON: status, content type and text.
    pub async fn get_text(&self, path: &str) -> (u16, String, String) {
        let response = self.get_response(path).await;
        let status = response.status().as_u16();
        let content_type = content_type(&response);
        (
            status,
            content_type,
            response.text().await.unwrap_or_default(),
        )
    }

    /// A GET whose body the caller reads itself (a stream of Server-Sent Events, say), as a
    /// viewer.
    pub async fn get_response(&self, path: &str) -> reqwest::Response {
        self.request_as("GET", path, Some(VIEWER_TOKEN), None)
            .await
            .expect("HTTP request")
    }

    /// A POST of a JSON body with the token its route needs: a client's for `/orders` and
    /// `/definitions/{saga_type}/sagas`, an operator's otherwise.
    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let starts_a_saga = path.starts_with("/definitions/") && path.ends_with("/sagas");
        let token = if path == "/orders" || starts_a_saga {
            CLIENT_TOKEN
        } else {
            OPERATOR_TOKEN
        };
        let response = self
            .request_as("POST", path, Some(token), Some(body))
            .await
            .expect("HTTP request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A request with `token` (none: no `Authorization` header) and, when given, a JSON body.
    pub async fn request_as(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> reqwest::Result<reqwest::Response> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.client.request(method, format!("{}{path}", self.http));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        request.send().await
    }

    /// The id of `order_id`'s saga, once the orchestrator has started it.
    pub async fn saga_id_of(&self, order_id: Uuid) -> String {
        eventually("the saga to exist", || async {
            let (status, saga) = self.get(&format!("/orders/{order_id}/saga")).await;
            (status == 200).then(|| saga["saga_id"].as_str().unwrap_or_default().to_owned())
        })
        .await
    }

    /// Reads `topic` from the beginning of every partition, without a group, until `count`
    /// records have arrived (or 30 s pass, which fails the test).
    pub async fn read_topic(&self, topic: &str, count: usize) -> Vec<OwnedMessage> {
        testkit::read_from_start(topic, count, Duration::ZERO).await
    }

    /// Waits until the order's saga is in a terminal state and returns its body.
    pub async fn finished_saga(&self, order_id: Uuid) -> Value {
        self.terminal_at(
            &format!("the saga of order {order_id}"),
            &format!("/orders/{order_id}/saga"),
        )
        .await
    }

    /// The saga the API shows at `path` once it is completed, compensated or failed; `what`
    /// names it when it never is.
    pub async fn terminal_at(&self, what: &str, path: &str) -> Value {
        eventually(&format!("{what} to finish"), || async {
            let (status, body) = self.get(path).await;
            let state = body["state"].as_str().unwrap_or_default();
            (status == 200 && matches!(state, "completed" | "compensated" | "failed"))
                .then_some(body)
        })
        .await
    }

    pub async fn history(&self, saga_id: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/sagas/{saga_id}/history")).await;
        assert_eq!(status, 200, "{body}");
        body["history"].as_array().cloned().unwrap_or_default()
    }

    /// Stops every service, then drops the database and the topics (as the fields go: a test
    /// that fails before `stop` has its services' shutdown token cancelled first, by the
    /// `services` field, then the same removed).
    pub async fn stop(mut self) {
        self.services.stop_all().await;
    }
}

/// The response's `content-type`, or "" without one.
pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// An order from the demo data: `customer` buys `quantity` of `sku` at 10.00 EUR each, shipped
/// to `country`.
pub fn order(customer: &str, sku: &str, quantity: i32, country: &str) -> OrderPlaced {
    OrderPlaced {
        order_id: Uuid::new_v4(),
        customer_id: customer.into(),
        items: vec![LineItem {
            sku: sku.into(),
            quantity,
            unit_price_cents: 1_000,
        }],
        total_cents: i64::from(quantity) * 1_000,
        currency: "EUR".into(),
        shipping_address: Address {
            country: country.into(),
            city: "Berlin".into(),
            line1: "Unter den Linden 1".into(),
            postal_code: "10117".into(),
        },
    }
}

/// The status of each step, in order.
pub fn step_statuses(saga: &Value) -> Vec<String> {
    saga["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| s["status"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The number `sql` counts for `order_id` in `schema`.
pub async fn count(system: &TestSystem, schema: &str, sql: &str, order_id: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(order_id)
        .fetch_one(&system.schema(schema).await)
        .await
        .expect("count query")
}

/// Reads a response to its end (a watch stream ends with its saga) onto `text`; fails the test
/// if that takes over 60 s.
pub async fn read_to_end(response: &mut reqwest::Response, text: &mut String) {
    let reading = async {
        while let Some(chunk) = response.chunk().await.expect("stream") {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the stream ends when the saga does");
}

/// A Kafka broker of this test alone.
pub struct PrivateBroker {
    pub addr: String,
    dir: PathBuf,
    pid: Option<String>,
}

impl PrivateBroker {
    /// Starts one on two free neighbouring ports (broker, controller), as `scripts/broker.sh`
    /// does the shared one; its jars are installed in the checkout (`broker.sh install`, once).
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("saga-private-broker-{}", Uuid::new_v4()));
        let port = testkit::free_port_pair();
        let mut broker = Self {
            addr: format!("127.0.0.1:{port}"),
            dir,
            pid: None,
        };
        broker.launch();
        broker
    }

    /// SIGKILLs it and starts it again on the same ports and data, as a crashed broker comes
    /// back (each restart moves its partitions' leader epochs on).
    pub fn restart(&mut self) {
        self.signal("-KILL");
        self.wait_gone();
        self.launch();
    }

    fn launch(&mut self) {
        let broker = self;
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker.sh");
        let output = Command::new(script)
            .arg("start")
            .env("BROKER_ADDR", &broker.addr)
            .env("BROKER_RUN_DIR", &broker.dir)
            .env("KAFKA_HEAP_MAX", "384m")
            .output()
            .expect("run scripts/broker.sh");
        broker.pid = std::fs::read_to_string(broker.dir.join("broker.pid"))
            .ok()
            .map(|pid| pid.trim().to_owned());
        assert!(
            output.status.success() && broker.pid.is_some(),
            "the private broker did not start: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Waits (5 s at most) until its process is gone.
    fn wait_gone(&self) {
        let Some(pid) = &self.pid else { return };
        for _ in 0..100 {
            let alive = Command::new("kill")
                .args(["-0", pid])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, signal: &str) {
        if let Some(pid) = &self.pid {
            let sent = Command::new("kill").args([signal, pid]).status();
            assert!(sent.is_ok_and(|s| s.success()), "kill {signal} {pid}");
        }
    }
}

impl Drop for PrivateBroker {
    /// Killed (resumed first, should it be stopped) and its data removed, also when the test
    /// failed.
    fn drop(&mut self) {
        if let Some(pid) = &self.pid {
            let _ = Command::new("kill").args(["-CONT", pid]).status();
            let _ = Command::new("kill").args(["-KILL", pid]).status();
            // Gone before its directory is.
            self.wait_gone();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The samples of the metric `name` in a `/metrics` text, each with its labels as written
/// (`partition="0"`, none: ""), summed per label set.
pub fn samples(metrics: &str, name: &str) -> std::collections::BTreeMap<String, f64> {
    let mut found = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(labelled) => match labelled.split_once("} ") {
                Some((labels, value)) => (labels.to_owned(), value),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => (String::new(), value),
                None => continue,
            },
        };
        if let Ok(value) = value.trim().parse::<f64>() {
            *found.entry(labels).or_insert(0.0) += value;
        }
    }
    found
}
