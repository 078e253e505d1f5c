//! Connection pools, per-service schemas and migrations.
//!
//! Every service keeps its tables in a schema of its own, and its connections have that schema
//! as their `search_path`, so SQL names tables without a schema and one database can hold a
//! whole deployment (or one integration test) without services seeing each other's tables.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseConfig;
use crate::{Error, Result};

/// The runtime tables every service has: inbox and outbox.
pub static MESSAGING_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/messaging");

/// Opens a pool whose connections use `schema`, creating the schema if it is missing.
///
/// # Errors
/// [`Error::Config`] for a schema name that is not a plain lower-case identifier,
/// [`Error::Database`] when PostgreSQL cannot be reached.
pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<PgPool> {
    if !is_identifier(schema) {
        return Err(Error::Config(format!(
            "schema name {schema:?} must match [a-z_][a-z0-9_]*"
        )));
    }
    let options = PgConnectOptions::from_str(url)?;
    let bootstrap = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    // Instances starting at once would race on the schema's catalog row (one fails with a
    // duplicate key in pg_namespace): a lock per schema name, held until the commit,
    // serialises them. Migrations are serialised by sqlx's own lock.
    let mut tx = bootstrap.begin().await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        format!("saga-engine schema {schema}")
    )
    .execute(&mut *tx)
    .await?;
    // The name was checked above, so it can be spliced into the statement.
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    bootstrap.close().await;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.options([("search_path", schema)]))
        .await?;
    Ok(pool)
}

/// A further pool on a schema that [`open`] has already prepared, with its own size and a
/// short wait for a connection, for work that must not take the main pool's connections (an
/// HTTP API). Connects on first use.
///
/// # Errors
/// [`Error::Database`] for a URL that does not parse.
pub fn side_pool(
    url: &str,
    schema: &str,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with(options.options([("search_path", schema)])))
}

/// Opens the service's pool on its schema (the configured one, or `default_schema`) and brings
/// the schema up to date with the messaging tables and `layers`. Returns the pool and the
/// schema's name.
///
/// # Errors
/// As [`connect`] and [`migrate`].
pub async fn open(
    config: &DatabaseConfig,
    default_schema: &str,
    layers: &[&Migrator],
) -> Result<(PgPool, String)> {
    let schema = config.schema_or(default_schema).to_owned();
    let pool = connect(
        &config.database_url,
        &schema,
        config.database_max_connections,
    )
    .await?;
    migrate(&pool, &schema, layers).await?;
    Ok((pool, schema))
}

/// Applies the messaging tables and then `layers` (each a `sqlx::migrate!` set) to the pool's
/// schema. Versions must not collide across layers: messaging uses 1–99, the participant
/// runtime 100–999, each service 1000 and up.
///
/// # Errors
/// [`Error::Migrate`] when a migration fails or the applied history does not match.
pub async fn migrate(pool: &PgPool, schema: &str, layers: &[&Migrator]) -> Result<()> {
    let migrator = Migrator::new(Layers(layered(layers)))
        .await
        .map_err(|source| Error::Migrate {
            schema: schema.to_owned(),
            source,
        })?;
    migrator.run(pool).await.map_err(|source| Error::Migrate {
        schema: schema.to_owned(),
        source,
    })
}

/// Whether the pool's schema has every migration [`migrate`] applies with `layers` (the
/// messaging tables' and `layers`'): a service migrates before it does anything else, so this
/// says it has its tables and the data its migrations bring. `false` while the schema or its
/// migration history does not exist yet.
///
/// # Errors
/// [`Error::Database`] when the schema cannot be read.
pub async fn is_migrated(pool: &PgPool, layers: &[&Migrator]) -> Result<bool> {
    // sqlx keeps its history in the schema it migrates, the first of the search path.
    let has_history: bool =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?;
    if !has_history {
        return Ok(false);
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?;
    Ok(layered(layers)
        .iter()
        .all(|migration| applied.contains(&migration.version)))
}

/// The messaging tables' migrations and `layers`', by version.
fn layered(layers: &[&Migrator]) -> Vec<Migration> {
    let mut migrations: Vec<Migration> = MESSAGING_MIGRATIONS.iter().cloned().collect();
    for layer in layers {
        migrations.extend(layer.iter().cloned());
    }
    migrations.sort_by_key(|m| m.version);
    migrations
}

/// Migrations gathered from several directories, handed to sqlx as one source.
#[derive(Debug)]
struct Layers(Vec<Migration>);

impl<'s> MigrationSource<'s> for Layers {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<Vec<Migration>, BoxDynError>> + Send + 's>>
    {
        Box::pin(async move { Ok(self.0) })
    }
}

fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
        && name.len() <= 63
}

/// One array parameter of a set-wise statement (`UNNEST($1::uuid[], ...)`): `field` of each of
/// `items`, in order.
pub fn column<'a, T, U>(items: &'a [T], field: impl FnMut(&'a T) -> U) -> Vec<U> {
    items.iter().map(field).collect()
}

#[cfg(test)]
mod tests {
    use super::is_identifier;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(is_identifier("inventory"));
        assert!(is_identifier("t_1f2e_orchestrator"));
        assert!(!is_identifier("Inventory"));
        assert!(!is_identifier("1abc"));
        assert!(!is_identifier("a;drop table x"));
        assert!(!is_identifier(""));
    }
}
