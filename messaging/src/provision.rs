//! The admin step of a deployment on PostgreSQL, run with a superuser (or a role with
//! CREATEROLE that owns the database): a login role per service and, in a database, a schema
//! per service owned by its role.
//!
//! Each service then connects as its own role ([`ServiceRole::role`]): not a superuser, no
//! CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS, owning only its own schema, so it migrates
//! that schema with its own rights and cannot read another service's tables. Every service role
//! is a member of the group role [`SERVICE_GROUP`], which has no privileges of its own: it only
//! names the roles that `scripts/postgres.sh`'s pg_hba.conf admits over TLS with a SCRAM
//! password and nothing else.
//!
//! Passwords are random and set as SCRAM-SHA-256 verifiers computed here, so the password
//! itself never reaches the server (its logs, `pg_stat_statements`) nor a command line; each
//! service's is kept in a password file of libpq's format, which sqlx reads from `PGPASSFILE`.
//!
//! Roles exist once per server, schemas once per database: the same roles serve several
//! databases (a database per service) and the step can be run again (it keeps the passwords it
//! is given and hands existing schemas, and what they hold, to their roles).

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::{Error, Result};

/// The group role every service role is a member of; `scripts/postgres.sh`'s pg_hba.conf
/// admits its members only over TLS with a SCRAM password.
pub const SERVICE_GROUP: &str = "saga_services";

/// The prefix of the service roles' names the admin step uses by default: `saga_inventory`.
pub const DEFAULT_ROLE_PREFIX: &str = "saga_";

/// Iterations of the SCRAM-SHA-256 verifiers (PostgreSQL's default, `scram_iterations`).
const SCRAM_ITERATIONS: u32 = 4096;

/// One service's login role.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceRole {
    /// The service: its default schema too.
    pub service: String,
    pub role: String,
    pub password: String,
}

impl std::fmt::Debug for ServiceRole {
    /// Without the password, so a role can be logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceRole")
            .field("service", &self.service)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ServiceRole {
    /// The role's line of a password file (libpq's format, which sqlx reads from
    /// `PGPASSFILE`): for any host, port and database, so the same file serves a service
    /// whose database moves.
    pub fn password_file_line(&self) -> String {
        format!(
            "*:*:*:{}:{}",
            escape_password_field(&self.role),
            escape_password_field(&self.password)
        )
    }
}

/// Creates or updates the login role of each of `services`, named `prefix` + service, with
/// the password `password_of(service)` gives (a new random one when it gives none), and the
/// group role [`SERVICE_GROUP`]. Safe to run from several processes at once.
///
/// # Errors
/// [`Error::Config`] for a name that is not a plain lower-case identifier, or a role of that
/// name that is a superuser (the step never demotes one); [`Error::Database`].
pub async fn create_roles(
    admin: &PgPool,
    prefix: &str,
    services: &[&str],
    mut password_of: impl FnMut(&str) -> Option<String>,
) -> Result<Vec<ServiceRole>> {
    if prefix.is_empty() {
        return Err(Error::Config(
            "the service roles' prefix must not be empty (a role named like a service could be an existing one)".into(),
        ));
    }
    create_role_once(admin, SERVICE_GROUP, "NOLOGIN").await?;
    let mut roles = Vec::with_capacity(services.len());
    for service in services {
        let role = format!("{prefix}{service}");
        check_identifier("service role", &role)?;
        check_identifier("service", service)?;
        create_role_once(admin, &role, "LOGIN").await?;
        let superuser: bool =
            sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
                .bind(&role)
                .fetch_one(admin)
                .await?;
        if superuser {
            return Err(Error::Config(format!(
                "role {role} exists and is a superuser; choose another role prefix"
            )));
        }
        let password = password_of(service).unwrap_or_else(random_password);
        let verifier = scram_verifier(&password);
        // The names were checked as identifiers and the verifier holds only base64, digits and
        // `$:`; the statement cannot take them as parameters.
        sqlx::query(&format!(
            "ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             NOBYPASSRLS INHERIT PASSWORD '{verifier}'"
        ))
        .execute(admin)
        .await?;
        sqlx::query(&format!("GRANT {SERVICE_GROUP} TO {role}"))
            .execute(admin)
            .await?;
        roles.push(ServiceRole {
            service: (*service).to_owned(),
            role,
            password,
        });
    }
    Ok(roles)
}

/// In the database `admin` is connected to: lets each role connect, gives each its service's
/// schema (created when missing; an existing one is handed over with everything in it, as
/// after migrations that ran as a superuser) and creates `extensions` (which a service's
/// migrations name but a service role may not create: `CREATE EXTENSION IF NOT EXISTS` then
/// finds them).
///
/// # Errors
/// [`Error::Config`] for a schema name that is not a plain identifier; [`Error::Database`].
pub async fn create_schemas(
    admin: &PgPool,
    roles: &[ServiceRole],
    extensions: &[&str],
) -> Result<()> {
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(admin)
        .await?;
    for extension in extensions {
        check_identifier("extension", extension)?;
        sqlx::query(&format!("CREATE EXTENSION IF NOT EXISTS {extension}"))
            .execute(admin)
            .await?;
    }
    for ServiceRole { service, role, .. } in roles {
        let schema = service;
        check_identifier("schema", schema)?;
        // A database created by the superuser grants CONNECT to PUBLIC already; one that
        // revoked it still lets the service in.
        sqlx::query(&format!(
            "GRANT CONNECT ON DATABASE \"{}\" TO {role}",
            database.replace('"', "\"\"")
        ))
        .execute(admin)
        .await?;
        sqlx::query(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}"
        ))
        .execute(admin)
        .await?;
        sqlx::query(&format!("ALTER SCHEMA {schema} OWNER TO {role}"))
            .execute(admin)
            .await?;
        sqlx::query(&format!("REVOKE ALL ON SCHEMA {schema} FROM PUBLIC"))
            .execute(admin)
            .await?;
        hand_over(admin, schema, role).await?;
    }
    Ok(())
}

/// Makes `role` the owner of everything in `schema` it does not own yet: tables, views,
/// sequences, types and functions (indexes and a table's own sequences and row type follow
/// their table).
async fn hand_over(admin: &PgPool, schema: &str, role: &str) -> Result<()> {
    // Tables first: a sequence a column owns moves with its table and cannot move alone. An
    // extension's objects (pg_trgm's, when a superuser created it in this schema) stay the
    // extension's.
    let member = |catalog: &str, alias: &str| {
        format!(
            "EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass \
             AND d.objid = {alias}.oid AND d.deptype = 'e')"
        )
    };
    let (type_member, function_member) = (member("pg_type", "t"), member("pg_proc", "p"));
    let member = member("pg_class", "c");
    let statement = format!(
        r#"DO $hand_over$
DECLARE
    object record;
BEGIN
    FOR object IN
        SELECT c.oid::regclass AS name, c.relkind FROM pg_class c
        WHERE c.relnamespace = '{schema}'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND c.relowner <> '{role}'::regrole AND NOT {member}
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO {role}',
            CASE object.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, object.name);
    END LOOP;
    FOR object IN
        SELECT c.oid::regclass AS name FROM pg_class c
        WHERE c.relnamespace = '{schema}'::regnamespace AND c.relkind = 'S'
          AND c.relowner <> '{role}'::regrole AND NOT {member}
    LOOP
        EXECUTE format('ALTER SEQUENCE %s OWNER TO {role}', object.name);
    END LOOP;
    FOR object IN
        SELECT t.oid::regtype AS name FROM pg_type t
        WHERE t.typnamespace = '{schema}'::regnamespace AND t.typtype IN ('e', 'd', 'r')
          AND t.typowner <> '{role}'::regrole AND NOT {type_member}
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO {role}', object.name);
    END LOOP;
    FOR object IN
        SELECT p.oid::regprocedure AS name FROM pg_proc p
        WHERE p.pronamespace = '{schema}'::regnamespace AND p.proowner <> '{role}'::regrole
          AND NOT {function_member}
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO {role}', object.name);
    END LOOP;
END
$hand_over$"#
    );
    sqlx::query(&statement).execute(admin).await?;
    Ok(())
}

/// Drops roles (a test's): each must own nothing any more (its databases dropped first).
///
/// # Errors
/// [`Error::Database`], as when a role still owns objects in some database.
pub async fn drop_roles(admin: &PgPool, roles: &[ServiceRole]) -> Result<()> {
    for ServiceRole { role, .. } in roles {
        check_identifier("service role", role)?;
        sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
            .execute(admin)
            .await?;
    }
    Ok(())
}

/// Writes `role`'s password file to `dir`/<service>.pgpass, readable by its owner only (sqlx,
/// like libpq, ignores a password file others may read), replacing an old one at once. Returns
/// its path, for the service's `PGPASSFILE`.
///
/// # Errors
/// [`Error::File`] naming the file.
pub fn write_password_file(dir: &Path, role: &ServiceRole) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("{}.pgpass", role.service));
    let temporary = dir.join(format!(".{}.pgpass.tmp", role.service));
    let io = |action: &'static str, path: &Path, source: std::io::Error| Error::File {
        action,
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|e| io("creating", &temporary, e))?;
    writeln!(
        file,
        "# {}'s PostgreSQL role, written by the admin step (sagactl provision database).",
        role.service
    )
    .and_then(|()| writeln!(file, "{}", role.password_file_line()))
    .and_then(|()| file.sync_all())
    .map_err(|e| io("writing", &temporary, e))?;
    std::fs::rename(&temporary, &path).map_err(|e| io("replacing", &path, e))?;
    Ok(path)
}

/// The password of `role` in a password file [`write_password_file`] wrote; `None` when the
/// file is missing or has no line for the role.
pub fn read_password_file(path: &Path, role: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let prefix = format!("*:*:*:{}:", escape_password_field(role));
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(unescape_password_field)
        .filter(|password| !password.is_empty())
}

/// A new password: 32 random bytes as hex (no character a password file must escape).
pub fn random_password() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SCRAM-SHA-256 verifier of `password` with a random salt, as PostgreSQL stores it
/// (RFC 5802 and 7677): `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. Given to
/// `ALTER ROLE ... PASSWORD`, the server stores it as it is.
pub fn scram_verifier(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    scram_verifier_with(password, &salt, SCRAM_ITERATIONS)
}

fn scram_verifier_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let salted = hi(password.as_bytes(), salt, iterations);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        BASE64.encode(salt),
        BASE64.encode(stored_key),
        BASE64.encode(server_key)
    )
}

/// PBKDF2 with HMAC-SHA-256 and one block: SCRAM's `Hi`.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut result = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (r, x) in result.iter_mut().zip(u) {
            *r ^= x;
        }
    }
    result
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC accepts keys of every length")
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A password file escapes `:` and `\` with a backslash.
fn escape_password_field(field: &str) -> String {
    field.replace('\\', "\\\\").replace(':', "\\:")
}

fn unescape_password_field(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Creates `role` unless it exists. Roles belong to the whole server and two admin steps (two
/// tests) may create the same one at once: the one that loses the race finds it made.
async fn create_role_once(admin: &PgPool, role: &str, attributes: &str) -> Result<()> {
    check_identifier("role", role)?;
    sqlx::query(&format!(
        "DO $create$ BEGIN CREATE ROLE {role} {attributes}; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $create$"
    ))
    .execute(admin)
    .await?;
    Ok(())
}

fn check_identifier(what: &str, name: &str) -> Result<()> {
    if crate::db::is_identifier(name) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{what} name {name:?} must match [a-z_][a-z0-9_]* (at most 63 characters)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_verifiers_match_rfc_7677s_example() {
        // RFC 7677, section 3: user "user", password "pencil", salt "W22ZaJ0SNY7soEsUEjb6gQ=="
        // and 4096 iterations give these keys (its ClientProof and ServerSignature derive
        // from them).
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let verifier = scram_verifier_with("pencil", &salt, 4096);
        let salted = hi(b"pencil", &salt, 4096);
        let client_key = hmac(&salted, b"Client Key");
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let signature = hmac(&Sha256::digest(client_key), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(
            BASE64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let server_signature = hmac(&hmac(&salted, b"Server Key"), auth_message.as_bytes());
        assert_eq!(
            BASE64.encode(server_signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        assert!(verifier.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
    }

    #[test]
    fn password_file_lines_round_trip() {
        let role = ServiceRole {
            service: "payment".into(),
            role: "saga_payment".into(),
            password: "a:b\\c".into(),
        };
        assert_eq!(role.password_file_line(), "*:*:*:saga_payment:a\\:b\\\\c");
        let dir = std::env::temp_dir().join(format!("pgpass-{}", uuid::Uuid::new_v4()));
        let path = write_password_file(&dir, &role).expect("written");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            read_password_file(&path, "saga_payment").as_deref(),
            Some("a:b\\c")
        );
        assert_eq!(read_password_file(&path, "saga_inventory"), None);
        std::fs::remove_dir_all(&dir).expect("removed");
    }

    #[test]
    fn debug_output_has_no_password() {
        let role = ServiceRole {
            service: "payment".into(),
            role: "saga_payment".into(),
            password: "secret-value".into(),
        };
        assert!(!format!("{role:?}").contains("secret-value"));
    }
}
