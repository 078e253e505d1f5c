//! What a chaos run sets up before its fleet starts, and clears away after it passed: the
//! saga definitions it deploys, its own database, topic prefix and log folder, and (for
//! --kafka-identities) its topics and ACLs.

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
use crate::deployment::Deployment;

/// One run's own place: nothing it creates is shared with another run.
pub(super) struct Setup {
    /// The run's id, in its database's, topics' and log folder's names.
    pub(super) id: String,
    pub(super) deployment: Deployment,
    database: String,
    pub(super) database_url: String,
    pub(super) prefix: String,
    pub(super) topics: Topics,
    pub(super) log_dir: PathBuf,
    /// A connection to the server's `postgres` database, which creates and drops the run's.
    admin: PgPool,
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
        let id = Uuid::new_v4().simple().to_string()[..10].to_owned();
        let database = format!("chaos_{id}");
        let prefix = format!("chaos-{id}.");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", args.database_server))
            .await
            .context("connecting to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await?;
        let database_url = format!("{}/{database}", args.database_server);
        let log_dir = PathBuf::from(format!(".run/chaos-{id}"));
        std::fs::create_dir_all(&log_dir)?;
        eprintln!(
            "chaos run {id}: database {database}, topic prefix {prefix}, logs {}",
            log_dir.display()
        );
        if args.kafka_identities.is_some() {
            provision_kafka(args, &prefix).await?;
        }
        Ok(Self {
            id,
            deployment,
            database,
            database_url,
            topics: Topics::new(prefix.clone()),
            prefix,
            log_dir,
            admin,
        })
    }

    /// The run's own connections to its database (the services have theirs).
    pub(super) async fn connect(&self) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.database_url)
            .await?)
    }

    /// Closes `db` and, unless the run failed or --keep asks to keep them, drops the run's
    /// database and deletes its topics; then fails when the run did.
    pub(super) async fn clean_up(
        self,
        args: &ChaosArgs,
        db: PgPool,
        failed: bool,
    ) -> anyhow::Result<()> {
        db.close().await;
        if !args.keep && !failed {
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .execute(&self.admin)
            .await?;
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
