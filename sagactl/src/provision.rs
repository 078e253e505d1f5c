//! `sagactl provision database`: the admin step of a deployment on PostgreSQL, run with a
//! superuser. It creates a login role per service (the orchestrator and every participant the
//! saga definitions name), each with a random password kept in a password file, and in a
//! database each service's schema owned by its role ([`messaging::provision`]).

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use messaging::provision;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::deployment::{Deployment, ORCHESTRATOR};

#[derive(clap::Subcommand)]
pub enum Provision {
    /// Create (or update) a login role per service and, in a database (created when missing),
    /// each service's schema owned by its role; write each role's password file. Run it again
    /// with another --database and --service for a service that has a database of its own.
    Database(DatabaseArgs),
    /// The admin step of a secured Kafka cluster: create a deployment's topics with the admin
    /// identity and write the ACLs each identity needs (scripts/provision-kafka.sh applies them).
    Kafka(crate::provision_kafka::ProvisionKafkaArgs),
}

#[derive(clap::Args)]
pub struct DatabaseArgs {
    /// The server, as a superuser (or a role with CREATEROLE and CREATEDB), without a database
    /// name.
    #[arg(
        long,
        env = "DATABASE_SERVER",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    server: String,
    /// The database the services' schemas go in; created when missing.
    #[arg(long, default_value = "sagas")]
    database: String,
    /// Only this service (repeat for several). Default: every service of the saga definitions.
    #[arg(long = "service")]
    services: Vec<String>,
    /// The saga definitions, which name the participants.
    #[arg(long, env = "SAGAS_DIR", default_value = "sagas")]
    sagas_dir: PathBuf,
    /// The roles are named this prefix and the service: saga_inventory.
    #[arg(long, default_value = provision::DEFAULT_ROLE_PREFIX)]
    role_prefix: String,
    /// Where each role's password file goes, as <dir>/<service>.pgpass (mode 600; a service's
    /// PGPASSFILE). A role whose file exists keeps its password; delete the file to have a new
    /// one made.
    #[arg(long, default_value = ".run/pg")]
    secrets_dir: PathBuf,
}

pub async fn run(which: Provision) -> anyhow::Result<()> {
    match which {
        Provision::Database(args) => database(args).await,
        Provision::Kafka(args) => crate::provision_kafka::run(args).await,
    }
}

async fn database(args: DatabaseArgs) -> anyhow::Result<()> {
    let deployment = Deployment::load(&args.sagas_dir)?;
    let services = chosen_services(&args, &deployment)?;
    let server = PgConnectOptions::from_str(&args.server).context("--server does not parse")?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.clone().database("postgres"))
        .await
        .context("connecting to the server as its administrator (--server)")?;
    ensure_database(&admin, &args.database).await?;
    // The files first: should setting a password fail, the next run sets the one on file.
    let passwords = password_files(&args, &services)?;
    let roles = provision::create_roles(&admin, &args.role_prefix, &services, |service| {
        passwords.get(service).cloned()
    })
    .await
    .context("creating the service roles")?;
    admin.close().await;
    let database = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.database(&args.database))
        .await
        .with_context(|| format!("connecting to database {}", args.database))?;
    let extensions: &[&str] = if services.contains(&ORCHESTRATOR) {
        orchestrator_schema::EXTENSIONS
    } else {
        &[]
    };
    provision::create_schemas(&database, &roles, extensions)
        .await
        .with_context(|| format!("creating the schemas in database {}", args.database))?;
    database.close().await;
    for role in &roles {
        let file = args.secrets_dir.join(format!("{}.pgpass", role.service));
        println!(
            "{}\trole {}\tschema {}.{}\tPGPASSFILE={}",
            role.service,
            role.role,
            args.database,
            role.service,
            file.display()
        );
    }
    Ok(())
}

/// The services `--service` names (each one the definitions have), or all of them.
fn chosen_services<'a>(
    args: &'a DatabaseArgs,
    deployment: &'a Deployment,
) -> anyhow::Result<Vec<&'a str>> {
    let known: Vec<&str> = deployment.services().collect();
    if args.services.is_empty() {
        return Ok(known);
    }
    for service in &args.services {
        anyhow::ensure!(
            known.contains(&service.as_str()),
            "the saga definitions in {} have no service {service} (they have: {})",
            args.sagas_dir.display(),
            known.join(", ")
        );
    }
    Ok(args.services.iter().map(String::as_str).collect())
}

/// Creates database `name` unless it exists.
async fn ensure_database(admin: &PgPool, name: &str) -> anyhow::Result<()> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(admin)
            .await?;
    if !exists {
        sqlx::query(&format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "\"\"")
        ))
        .execute(admin)
        .await
        .with_context(|| format!("creating database {name}"))?;
    }
    Ok(())
}

/// Each service's password: the one in its password file under `--secrets-dir`, or a new one
/// written there.
fn password_files(
    args: &DatabaseArgs,
    services: &[&str],
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut passwords = std::collections::HashMap::new();
    for service in services {
        let role = provision::ServiceRole {
            service: (*service).to_owned(),
            role: format!("{}{service}", args.role_prefix),
            password: String::new(),
        };
        let file = args.secrets_dir.join(format!("{service}.pgpass"));
        let password = provision::read_password_file(&file, &role.role)
            .unwrap_or_else(provision::random_password);
        provision::write_password_file(
            &args.secrets_dir,
            &provision::ServiceRole {
                password: password.clone(),
                ..role
            },
        )?;
        passwords.insert((*service).to_owned(), password);
    }
    Ok(passwords)
}
