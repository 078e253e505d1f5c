//! What a chaos run sets up before its fleet starts, and clears away after it passed: the
//! saga definitions it deploys, its own database (and one per --own-database participant),
//! topic prefix and log folder, and (for --kafka-identities) its topics and ACLs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context};
use events::Topics;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::process::Command;
use uuid::Uuid;

use super::args::ChaosArgs;
use super::workload;
use crate::deployment::{Deployment, ORCHESTRATOR};

/// One run's own place: nothing it creates is shared with another run.
pub(super) struct Setup {
    /// The run's id, in its database's, topics' and log folder's names.
    pub(super) id: String,
    pub(super) deployment: Deployment,
    database: String,
    database_url: String,
    /// The participants on a database of their own (--own-database).
    own: Vec<OwnDatabase>,
    pub(super) prefix: String,
    pub(super) topics: Topics,
    pub(super) log_dir: PathBuf,
    /// A connection to the server's `postgres` database, which creates and drops the run's.
    admin: PgPool,
}

/// A participant's database of its own, beside the run's.
struct OwnDatabase {
    service: String,
    database: String,
    url: String,
    /// A connection to its server's `postgres` database, which creates and drops it (the same
    /// server as the run's, or --own-database-server).
    admin: PgPool,
}

/// The run's connections to the databases its services use: the run's own (the orchestrators'
/// and every service's not on a database of its own) and each --own-database participant's.
/// A check reads a service's tables through [`Databases::of`] that service, and joins tables of
/// two services in Rust, not in SQL: they may be in two databases.
pub struct Databases {
    main: PgPool,
    own: BTreeMap<String, PgPool>,
}

impl Databases {
    /// The database `service` (a participant, or the orchestrator) keeps its tables in.
    pub fn of(&self, service: &str) -> &PgPool {
        self.own.get(service).unwrap_or(&self.main)
    }

    /// The orchestrators' database, the run's own.
    pub fn orchestrator(&self) -> &PgPool {
        self.of(ORCHESTRATOR)
    }

    /// Every database of the run, the run's own first.
    pub fn each(&self) -> impl Iterator<Item = &PgPool> {
        std::iter::once(&self.main).chain(self.own.values())
    }

    async fn close(&self) {
        for pool in self.each() {
            pool.close().await;
        }
    }
}

impl Setup {
    /// Reads the definitions, creates the run's database and log folder and, with
    /// --kafka-identities, its topics and ACLs.
    pub(super) async fn create(args: &ChaosArgs) -> anyhow::Result<Self> {
        if args.broker_nodes == 2 {
            bail!("--broker-nodes must be 1 or 3");
        }
        let deployment = Deployment::load(&args.sagas_dir)?;
        for saga in workload::SAGAS {
            deployment.saga(saga)?;
        }
        let own_services = own_database_services(args, &deployment)?;
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let database = format!("chaos_{id}");
        let prefix = format!("chaos-{id}.");
        let admin = connect_admin(&args.database_server).await?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await?;
        let database_url = format!("{}/{database}", args.database_server);
        let own_server = args
            .own_database_server
            .as_deref()
            .unwrap_or(&args.database_server);
        let mut own = Vec::new();
        for service in own_services {
            let admin = connect_admin(own_server).await?;
            let database = format!("{database}_{service}");
            sqlx::query(&format!("CREATE DATABASE {database}"))
                .execute(&admin)
                .await?;
            own.push(OwnDatabase {
                url: format!("{own_server}/{database}"),
                service,
                database,
                admin,
            });
        }
        let log_dir = PathBuf::from(format!(".run/chaos-{id}"));
        std::fs::create_dir_all(&log_dir)?;
        let setup = Self {
            id,
            deployment,
            database,
            database_url,
            own,
            topics: Topics::new(prefix.clone()),
            prefix,
            log_dir,
            admin,
        };
        eprintln!(
            "chaos run {}: database {}, topic prefix {}, logs {}",
            setup.id,
            setup.describe_databases(),
            setup.prefix,
            setup.log_dir.display()
        );
        if args.kafka_identities.is_some() {
            provision_kafka(args, &setup.prefix).await?;
        }
        Ok(setup)
    }

    /// The URL of the database `service` uses (a participant, or the orchestrator): its own
    /// with --own-database, the run's otherwise.
    pub(super) fn database_url(&self, service: &str) -> &str {
        self.own
            .iter()
            .find(|own| own.service == service)
            .map_or(&self.database_url, |own| &own.url)
    }

    /// Whether `service` runs on a database of its own (--own-database).
    pub(super) fn has_own_database(&self, service: &str) -> bool {
        self.own.iter().any(|own| own.service == service)
    }

    /// The run's databases and who uses them, for the log and the report: `chaos_<id>` alone,
    /// or followed by each participant's own (`chaos_<id>_payment (payment) on <server>`).
    pub(super) fn describe_databases(&self) -> String {
        let mut text = self.database.clone();
        for own in &self.own {
            let server = own.url.rsplit_once('/').map_or("", |(server, _)| server);
            text.push_str(&format!(", {} ({}) on {server}", own.database, own.service));
        }
        text
    }

    /// The run's own connections to its databases (the services have theirs).
    pub(super) async fn connect(&self) -> anyhow::Result<Databases> {
        let connect = |url| PgPoolOptions::new().max_connections(2).connect(url);
        let main = connect(&self.database_url).await?;
        let mut own = BTreeMap::new();
        for database in &self.own {
            own.insert(database.service.clone(), connect(&database.url).await?);
        }
        Ok(Databases { main, own })
    }

    /// Closes `db` and, unless the run failed or --keep asks to keep them, drops the run's
    /// databases and deletes its topics; then fails when the run did.
    pub(super) async fn clean_up(
        self,
        args: &ChaosArgs,
        db: Databases,
        failed: bool,
    ) -> anyhow::Result<()> {
        db.close().await;
        if !args.keep && !failed {
            let drop = |database: &str| format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)");
            sqlx::query(&drop(&self.database))
                .execute(&self.admin)
                .await?;
            for own in &self.own {
                sqlx::query(&drop(&own.database))
                    .execute(&own.admin)
                    .await?;
            }
            let admin: AdminClient<DefaultClientContext> =
                messaging::kafka::connection_settings(&args.kafka)?.create()?;
            // The sagas' topics: their triggers, the participants' commands, the engine's.
            let mut names: Vec<String> = self
                .deployment
                .saga_topics()
                .iter()
                .map(|t| self.topics.named(t))
                .collect();
            names.extend(self.topics.engine());
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Err(e) = admin.delete_topics(&names, &AdminOptions::new()).await {
                eprintln!("deleting the run's topics failed: {e}");
            }
        }
        if failed {
            bail!(
                "chaos run {}: invariants violated or sagas unsettled",
                self.id
            );
        }
        Ok(())
    }
}

/// A connection to `server`'s `postgres` database, which creates and drops the run's.
async fn connect_admin(server: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{server}/postgres"))
        .await
        .with_context(|| format!("connecting to PostgreSQL at {server}"))
}

/// The participants --own-database names, each once; an error for a name that is none of the
/// definitions' participants (the orchestrators keep the run's database: the run reads their
/// sagas throughout).
fn own_database_services(args: &ChaosArgs, deployment: &Deployment) -> anyhow::Result<Vec<String>> {
    let mut services: Vec<String> = Vec::new();
    for service in &args.own_database {
        if !deployment.participants.iter().any(|p| &p.name == service) {
            bail!(
                "--own-database {service}: not a participant of the definitions ({})",
                deployment.participant_names()
            );
        }
        if !services.contains(service) {
            services.push(service.clone());
        }
    }
    Ok(services)
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
