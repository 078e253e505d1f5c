//! Connection pools, per-service schemas and migrations.
//!
//! Every service keeps its tables in a schema of its own, and its connections have that schema
//! as their `search_path`, so SQL names tables without a schema and one database can hold a
//! whole deployment (or one integration test) without services seeing each other's tables.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};

use crate::config::DatabaseConfig;
use crate::{Error, Result};

/// A database call that did not finish within its deadline (`DATABASE_CALL_TIMEOUT_MS`): the
/// link to the database may be cut (packets dropped: no error comes, only silence), or the
/// server too loaded to answer. The consume loop waits it out as an unavailable database.
#[derive(Debug, thiserror::Error)]
#[error("the database did not answer within {} ms", limit.as_millis())]
pub struct DeadlineExceeded {
    pub limit: Duration,
}

/// The runtime tables every service has: inbox and outbox.
pub static MESSAGING_MIGRATIONS: Migrator = sqlx::migrate!("../migrations/messaging");

/// Opens a pool whose connections use `schema`, creating the schema if it is missing.
///
/// A service's role normally finds its schema made (and owned by it) by the admin step
/// ([`crate::provision`]); then nothing here needs the right to create schemas in the
/// database. A missing schema is created only when the role may (a superuser, or a role with
/// CREATE on the database, as in development).
///
/// # Errors
/// [`Error::Config`] for a schema name that is not a plain lower-case identifier, a URL that
/// does not parse or an unusable `PGPASSFILE`; [`Error::Connect`] when PostgreSQL refuses the
/// connection (a wrong password, an untrusted certificate, a role refused without TLS), naming
/// the setting to check; [`Error::SchemaMissing`] and [`Error::SchemaNotWritable`] when the
/// admin step has not given the role its schema; [`Error::Database`] otherwise.
pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<PgPool> {
    connect_with_deadline(
        url,
        schema,
        max_connections,
        Duration::from_millis(crate::config::DATABASE_CALL_TIMEOUT_MS),
    )
    .await
}

/// [`connect`], with `call_timeout` (`DATABASE_CALL_TIMEOUT_MS`) as the longest wait for a
/// connection and as the server's bound on the sessions' silences ([`session_settings`]).
///
/// # Errors
/// As [`connect`].
pub async fn connect_with_deadline(
    url: &str,
    schema: &str,
    max_connections: u32,
    call_timeout: Duration,
) -> Result<PgPool> {
    if !is_identifier(schema) {
        return Err(Error::Config(format!(
            "schema name {schema:?} must match [a-z_][a-z0-9_]*"
        )));
    }
    if !url_has_password(url) {
        check_password_file()?;
    }
    let options = PgConnectOptions::from_str(url).map_err(Error::DatabaseUrl)?;
    let role = options.get_username().to_owned();
    // Every start-up failure to log in stops the service here with the setting to check;
    // sqlx's pool retries only a refused TCP connection (a server starting up).
    let bootstrap = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .map_err(|source| Error::Connect {
            hint: connect_hint(&source, &options),
            role: role.clone(),
            source,
        })?;
    prepare_schema(&bootstrap, schema, &role).await?;
    bootstrap.close().await;
    let mut settings = vec![("search_path", schema.to_owned())];
    settings.extend(session_settings(call_timeout));
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(call_timeout)
        .connect_with(options.options(settings))
        .await?;
    Ok(pool)
}

/// How long a loop keeps one connection ([`KeptConnection`]) before it closes it and takes
/// another: connections still turn over, so that a pooler or a load balancer in front of the
/// database moves a busy loop to another server in time (a failover breaks the connection,
/// and the loop takes a new one at once). Not much shorter: every new session costs the
/// server a process and its first statements a parse and plan, which at rest, with a minute,
/// cost PostgreSQL as much as the round trips saved (BENCHMARKS.md, "Loops keep their
/// connection").
pub const KEPT_AT_MOST: Duration = Duration::from_secs(600);

/// A connection a loop keeps from one call to the next, out of the pool. sqlx tests a pooled
/// connection with a round trip (a `Sync`, which `pg_stat_statements` does not show) when the
/// pool hands it out and again when it comes back: for a loop that runs transaction after
/// transaction (the consume loop, the relay) that was two round trips more for every
/// transaction of every hop. Such a loop takes a connection from the pool once and detaches it
/// (the pool may open another in its place, so a kept connection never starves the pool's
/// other users), keeps it while its calls end well, and closes it after one that did not: the
/// next call takes a fresh one from the pool.
pub struct KeptConnection {
    kept: Option<Kept>,
    /// [`KEPT_AT_MOST`], but for tests.
    at_most: Duration,
}

impl Default for KeptConnection {
    fn default() -> Self {
        Self::kept_at_most(KEPT_AT_MOST)
    }
}

/// A connection a loop took from the pool, with when it took it.
pub struct Kept {
    connection: PgConnection,
    taken: Instant,
}

impl KeptConnection {
    /// One whose connections are replaced once they are `at_most` old, instead of
    /// [`KEPT_AT_MOST`].
    pub fn kept_at_most(at_most: Duration) -> Self {
        Self {
            kept: None,
            at_most,
        }
    }

    /// The connection kept after the last call, unless it is older than this one's limit
    /// ([`KEPT_AT_MOST`]); else one from `pool` (the caller bounds the wait).
    ///
    /// # Errors
    /// The pool's: no connection could be opened.
    pub async fn take(&mut self, pool: &PgPool) -> std::result::Result<Kept, sqlx::Error> {
        match self.kept.take() {
            Some(kept) if kept.taken.elapsed() < self.at_most => Ok(kept),
            // An old one is closed by dropping it (it is idle: the server ends the session).
            _ => Ok(Kept {
                connection: pool.acquire().await?.detach(),
                taken: Instant::now(),
            }),
        }
    }

    /// Keeps `connection`, whose call ended well (committed or never began a transaction),
    /// for the next call. A connection not kept is closed when it is dropped, and the server
    /// rolls back what it left open.
    pub fn keep(&mut self, connection: Kept) {
        self.kept = Some(connection);
    }
}

impl std::ops::Deref for Kept {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.connection
    }
}

impl std::ops::DerefMut for Kept {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.connection
    }
}

/// What the server is told about each of the service's sessions, so that a session whose
/// client was cut off (a network partition: no reset, no FIN, packets dropped) ends in bounded
/// time instead of holding its locks until the operating system gives up on the connection
/// (hours: Linux's default keepalive starts after two) — locks that the instance taking over
/// the work would wait for:
/// - `idle_in_transaction_session_timeout`: a transaction idle longer than a call may last is
///   one its client has abandoned (the call's deadline passed). The relay, which waits for the
///   broker inside its transaction, lifts it for its own ([`crate::relay`]).
/// - TCP keepalives and `tcp_user_timeout` on the server's socket: an idle session, or one
///   whose answer is not acknowledged, ends about a call's deadline after its client fell
///   silent.
///
/// sqlx 0.8 has no way to set socket options on the client's side (`net::connect_tcp` makes
/// the socket and sets only TCP_NODELAY): there the deadlines of the calls
/// ([`crate::consumer`], [`crate::relay`]) bound every wait instead.
pub fn session_settings(call_timeout: Duration) -> Vec<(&'static str, String)> {
    let ms = call_timeout.as_millis().max(1);
    let keepalive_secs = call_timeout.as_secs().div_ceil(3).max(1);
    vec![
        ("idle_in_transaction_session_timeout", ms.to_string()),
        ("tcp_user_timeout", ms.to_string()),
        ("tcp_keepalives_idle", keepalive_secs.to_string()),
        ("tcp_keepalives_interval", keepalive_secs.to_string()),
        ("tcp_keepalives_count", "2".to_owned()),
    ]
}

/// Makes sure `schema` exists and `role` (the pool's) may create tables in it.
async fn prepare_schema(pool: &PgPool, schema: &str, role: &str) -> Result<()> {
    // `CREATE SCHEMA IF NOT EXISTS` checks the right to create schemas in the database before
    // it looks for the schema, so it is not run when the schema is there.
    let writable = sqlx::query_scalar!(
        r#"SELECT has_schema_privilege(oid, 'USAGE') AND has_schema_privilege(oid, 'CREATE') AS "writable!"
           FROM pg_namespace WHERE nspname = $1"#,
        schema
    )
    .fetch_optional(pool)
    .await?;
    match writable {
        Some(true) => return Ok(()),
        Some(false) => {
            return Err(Error::SchemaNotWritable {
                schema: schema.to_owned(),
                role: role.to_owned(),
            })
        }
        None => {}
    }
    // Instances starting at once would race on the schema's catalog row (one fails with a
    // duplicate key in pg_namespace): a lock per schema name, held until the commit,
    // serialises them. Migrations are serialised by sqlx's own lock.
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        format!("saga-engine schema {schema}")
    )
    .execute(&mut *tx)
    .await?;
    // The name was checked by the caller, so it can be spliced into the statement.
    match sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await
    {
        Ok(_) => {}
        // insufficient_privilege: the role may not create schemas in this database.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            return Err(Error::SchemaMissing {
                schema: schema.to_owned(),
                role: role.to_owned(),
                source: sqlx::Error::Database(e),
            });
        }
        Err(e) => return Err(e.into()),
    }
    tx.commit().await?;
    Ok(())
}

/// What to check when PostgreSQL refused a connection, by the kind of refusal.
fn connect_hint(error: &sqlx::Error, options: &PgConnectOptions) -> String {
    let tls = || {
        format!(
            "the server's TLS certificate was not accepted (sslmode {}): check DATABASE_URL's \
             sslrootcert (or PGSSLROOTCERT), the file of the CA that signed the server's \
             certificate; with verify-full the certificate must also name the host {} that \
             DATABASE_URL connects to; and sslcert/sslkey when the server refused the client's \
             certificate",
            ssl_mode_name(options.get_ssl_mode()),
            options.get_host()
        )
    };
    match error {
        sqlx::Error::Tls(_) => tls(),
        // rustls' handshake failures (an unknown issuer, a name mismatch, a refused client
        // certificate) reach sqlx as I/O errors of the TLS stream.
        sqlx::Error::Io(e) if is_tls_failure(e) => tls(),
        // sqlx reads the TLS files when it connects.
        sqlx::Error::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            "a file DATABASE_URL names cannot be read: its sslrootcert, sslcert or sslkey (or \
             PGSSLROOTCERT, PGSSLCERT, PGSSLKEY)"
                .to_owned()
        }
        sqlx::Error::Database(e) => match e.code().as_deref() {
            // invalid_password
            Some("28P01") => format!(
                "password authentication failed: the password comes from DATABASE_URL or else \
                 from the password file PGPASSFILE names ({}), a line \
                 `host:port:database:role:password` for role `{}` in a file of mode 600 (the \
                 admin step `sagactl provision database` writes one per service)",
                std::env::var("PGPASSFILE").map_or_else(
                    |_| "unset: ~/.pgpass".to_owned(),
                    |path| format!("PGPASSFILE={path}")
                ),
                options.get_username()
            ),
            // invalid_authorization_specification: no pg_hba.conf line lets the role in.
            Some("28000") => format!(
                "the server does not let role `{}` in this way (pg_hba.conf): check DATABASE_URL's \
                 role, database and sslmode (a service role must use TLS: sslmode=verify-full \
                 with sslrootcert)",
                options.get_username()
            ),
            // invalid_catalog_name
            Some("3D000") => "the database DATABASE_URL names does not exist: create it with the \
                 admin step (`sagactl provision database`)"
                .to_owned(),
            _ => "check DATABASE_URL".to_owned(),
        },
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => format!(
            "the server at DATABASE_URL's host {} port {} does not answer",
            options.get_host(),
            options.get_port()
        ),
        _ => "check DATABASE_URL".to_owned(),
    }
}

fn ssl_mode_name(mode: sqlx::postgres::PgSslMode) -> &'static str {
    use sqlx::postgres::PgSslMode;
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

fn is_tls_failure(error: &std::io::Error) -> bool {
    let text = error.to_string().to_lowercase();
    [
        "certificate",
        "tls",
        "handshake",
        "alert",
        "peer sent",
        "unknownissuer",
    ]
    .iter()
    .any(|word| text.contains(word))
}

/// Whether `url` carries a password (`postgres://role:password@host`); one in the URL wins
/// over the password file.
fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
        || url.contains("password=")
}

/// sqlx (like libpq) silently ignores a password file it cannot read or that others may read,
/// and the server then says only that the password was wrong: such a `PGPASSFILE` stops the
/// start with its own reason instead.
fn check_password_file() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PGPASSFILE") else {
        return Ok(());
    };
    let shown = std::path::Path::new(&path).display().to_string();
    let metadata = std::fs::metadata(&path).map_err(|source| Error::PasswordFile {
        file: shown.clone(),
        source,
    })?;
    let mode = metadata.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::Config(format!(
            "the password file PGPASSFILE={shown} may be read by others (mode {:o}); it must be \
             mode 600 or it is ignored",
            mode & 0o777
        )));
    }
    std::fs::File::open(&path).map_err(|source| Error::PasswordFile {
        file: shown.clone(),
        source,
    })?;
    Ok(())
}

/// A further pool on a schema that [`open`] has already prepared, with its own size and a
/// short wait for a connection (`acquire_timeout`, at most `call_timeout`), for work that must
/// not take the main pool's connections (an HTTP API). Connects on first use.
///
/// Its sessions have the main pool's bounds ([`session_settings`] of `call_timeout`,
/// `DATABASE_CALL_TIMEOUT_MS`): a transaction of the API whose client was cut off, or that
/// its caller abandoned, ends within a call deadline instead of holding its row locks (a saga
/// row the consume loop then waits for) until the operating system gives up on the
/// connection.
///
/// # Errors
/// [`Error::Database`] for a URL that does not parse.
pub fn side_pool(
    url: &str,
    schema: &str,
    max_connections: u32,
    (acquire_timeout, call_timeout): (Duration, Duration),
) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?;
    let mut settings = vec![("search_path", schema.to_owned())];
    settings.extend(session_settings(call_timeout));
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout.min(call_timeout))
        .connect_lazy_with(options.options(settings)))
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
    let pool = connect_with_deadline(
        &config.database_url,
        &schema,
        config.database_max_connections,
        config.call_timeout(),
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

pub(crate) fn is_identifier(name: &str) -> bool {
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
