//! Each service's own PostgreSQL role over TLS (`messaging::provision`, `db::connect`) against
//! the real server as `scripts/postgres.sh` configures it: its certificate from the local CA,
//! the members of `saga_services` admitted only over TLS with a SCRAM password.
//!
//! Roles belong to the whole server, so each test makes its own, named with a prefix of its
//! own, in a database of its own, and drops both at the end. The CA is `TEST_DATABASE_CA`, or
//! else the file the server itself trusts (`ssl_ca_file`, which `scripts/postgres.sh` sets to
//! the CA that signed the server's certificate).

use std::path::PathBuf;
use std::time::Duration;

use messaging::provision::{self, ServiceRole};
use messaging::Error;
use sqlx::PgPool;
use testkit::pki::{issue, OtherCa};
use testkit::{TestDatabase, TestRoles};

/// A database and the roles of `services` for one test; removed when dropped (the database
/// first: the roles own what is in it).
struct Fixture {
    database: TestDatabase,
    roles: TestRoles,
    ca: String,
}

impl Fixture {
    async fn new(services: &[&str]) -> Self {
        let database = TestDatabase::create("roles_test").await;
        let admin = admin("postgres").await;
        let roles = TestRoles::create(&admin, services).await;
        admin.close().await;
        let in_database = database.admin().await;
        provision::create_schemas(&in_database, roles.all(), &[])
            .await
            .expect("create the schemas");
        in_database.close().await;
        Self {
            ca: roles.ca().to_owned(),
            database,
            roles,
        }
    }

    fn role(&self, service: &str) -> &ServiceRole {
        self.roles.role(service).expect("a role of that service")
    }

    /// `service`'s URL with `password` and the TLS `parameters`.
    fn url_with(&self, service: &str, password: &str, parameters: &str) -> String {
        self.roles
            .url_with(service, self.database.name(), Some(password), parameters)
    }

    /// `service`'s URL as a deployment gives it: verify-full against the server's CA.
    fn url(&self, service: &str) -> String {
        self.roles.url(service, self.database.name())
    }
}

async fn admin(database: &str) -> PgPool {
    testkit::admin(database).await
}

/// `db::connect` as the service would at start: it must end by itself, quickly, either way
/// (a refusal is not retried).
async fn connect(url: &str, schema: &str) -> Result<PgPool, Error> {
    tokio::time::timeout(
        Duration::from_secs(15),
        messaging::db::connect(url, schema, 2),
    )
    .await
    .expect("db::connect ends within 15 s instead of retrying")
}

#[tokio::test]
async fn verify_full_with_the_servers_ca_connects_and_another_ca_or_password_is_refused_at_start() {
    let fixture = Fixture::new(&["payment"]).await;

    let pool = connect(&fixture.url("payment"), "payment")
        .await
        .expect("payment connects with verify-full and the server's CA");
    let (user, tls): (String, bool) = sqlx::query_as(
        "SELECT current_user::text, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&pool)
    .await
    .expect("who and how");
    assert_eq!(user, fixture.role("payment").role);
    assert!(tls, "the connection uses TLS");
    pool.close().await;

    let other = OtherCa::new();
    let password = fixture.role("payment").password.clone();
    let untrusted = fixture.url_with(
        "payment",
        &password,
        &format!("sslmode=verify-full&sslrootcert={}", other.ca().display()),
    );
    let error = connect(&untrusted, "payment")
        .await
        .expect_err("a server certificate from another CA is refused");
    let text = error.to_string();
    assert!(matches!(error, Error::Connect { .. }), "{text}");
    assert!(text.contains("sslrootcert"), "names the setting: {text}");

    let wrong_password = fixture.url_with(
        "payment",
        "not-the-password",
        &format!("sslmode=verify-full&sslrootcert={}", fixture.ca),
    );
    let error = connect(&wrong_password, "payment").await.expect_err(
        "a wrong password is refused (the server must run with scripts/postgres.sh's \
             pg_hba.conf: `scripts/postgres.sh start` reloads it)",
    );
    let text = error.to_string();
    assert!(matches!(error, Error::Connect { .. }), "{text}");
    assert!(
        text.contains("password authentication failed") && text.contains("PGPASSFILE"),
        "names the password's settings: {text}"
    );
    assert!(
        !text.contains("not-the-password"),
        "no password in errors: {text}"
    );
}

#[tokio::test]
async fn a_service_role_uses_only_its_own_schema_is_no_superuser_and_needs_tls() {
    let fixture = Fixture::new(&["inventory", "payment"]).await;
    let payment = connect(&fixture.url("payment"), "payment")
        .await
        .expect("payment connects");
    sqlx::query("CREATE TABLE accounts (customer_id text PRIMARY KEY, balance_cents bigint)")
        .execute(&payment)
        .await
        .expect("payment creates a table in its own schema");
    sqlx::query("INSERT INTO accounts VALUES ('alice', 100)")
        .execute(&payment)
        .await
        .expect("and writes it");

    let inventory = connect(&fixture.url("inventory"), "inventory")
        .await
        .expect("inventory connects");
    for statement in [
        "SELECT balance_cents FROM payment.accounts",
        "UPDATE payment.accounts SET balance_cents = 0",
        "CREATE TABLE payment.stolen (x int)",
        "CREATE SCHEMA elsewhere",
    ] {
        let error = sqlx::query(statement)
            .execute(&inventory)
            .await
            .expect_err("inventory may not touch payment's schema nor make schemas");
        let code = error
            .as_database_error()
            .and_then(|e| e.code().map(|c| c.into_owned()));
        assert_eq!(
            code.as_deref(),
            Some("42501"),
            "{statement}: permission denied, not {error}"
        );
    }
    // Nor can it take over payment's schema through its own: it may not create schemas.
    let error = connect(&fixture.url("inventory"), "payment")
        .await
        .expect_err("inventory cannot use payment's schema");
    assert!(matches!(error, Error::SchemaNotWritable { .. }), "{error}");
    inventory.close().await;
    payment.close().await;

    // No member of the service group, this test's or any other deployment's, has a right
    // beyond logging in.
    let admin = admin("postgres").await;
    let privileged: Vec<String> = sqlx::query_scalar(
        "SELECT r.rolname::text FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
         WHERE m.roleid = $1::regrole \
           AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls)",
    )
    .bind(provision::SERVICE_GROUP)
    .fetch_all(&admin)
    .await
    .expect("the group's members");
    assert_eq!(privileged, Vec::<String>::new());
    for role in fixture.roles.all() {
        let member: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_auth_members \
                            WHERE member = r.oid AND roleid = $2::regrole) \
               AND NOT rolsuper FROM pg_roles r WHERE rolname = $1",
        )
        .bind(&role.role)
        .bind(provision::SERVICE_GROUP)
        .fetch_one(&admin)
        .await
        .expect("the role");
        assert!(
            member,
            "{} is a non-superuser member of the group",
            role.role
        );
    }
    admin.close().await;

    // Without TLS the right password does not get in.
    let password = fixture.role("payment").password.clone();
    for mode in ["disable", "allow"] {
        let plain = fixture.url_with("payment", &password, &format!("sslmode={mode}"));
        let error = connect(&plain, "payment").await.expect_err(
            "a service role without TLS is refused (the server must run with \
                 scripts/postgres.sh's pg_hba.conf: `scripts/postgres.sh start` reloads it)",
        );
        let text = error.to_string();
        assert!(matches!(error, Error::Connect { .. }), "{text}");
        assert!(
            text.contains("pg_hba.conf") && text.contains("sslmode"),
            "says why and what to set: {text}"
        );
    }
}

#[tokio::test]
async fn a_role_without_create_on_the_database_opens_its_schema_and_is_told_of_a_missing_one() {
    let fixture = Fixture::new(&["payment"]).await;
    let admin = fixture.database.admin().await;
    let may_create: bool =
        sqlx::query_scalar("SELECT has_database_privilege($1, current_database(), 'CREATE')")
            .bind(&fixture.role("payment").role)
            .fetch_one(&admin)
            .await
            .expect("privilege");
    admin.close().await;
    assert!(!may_create, "the service role may not create schemas");

    // Its schema, made by the admin step, opens, and migrations run in it with its own rights.
    let config = messaging::config::DatabaseConfig {
        database_url: fixture.url("payment"),
        database_schema: None,
        database_max_connections: 2,
        ..messaging::config::DatabaseConfig::to("")
    };
    let (pool, schema) = messaging::db::open(&config, "payment", &[])
        .await
        .expect("the service opens and migrates its own schema");
    assert_eq!(schema, "payment");
    assert!(messaging::db::is_migrated(&pool, &[])
        .await
        .expect("migration history"));
    pool.close().await;

    // A schema the admin step did not make is an error that says what to run.
    let error = connect(&fixture.url("payment"), "payment_elsewhere")
        .await
        .expect_err("a missing schema the role may not create");
    let text = error.to_string();
    assert!(matches!(error, Error::SchemaMissing { .. }), "{text}");
    assert!(text.contains("sagactl provision database"), "{text}");
}

#[tokio::test]
async fn the_admin_step_hands_a_schema_migrated_by_a_superuser_to_the_service_role() {
    let fixture = Fixture::new(&["payment"]).await;
    let admin = fixture.database.admin().await;
    // What migrations run by the superuser (before the roles existed) left behind.
    sqlx::raw_sql(
        "ALTER SCHEMA payment OWNER TO postgres;
         CREATE TABLE payment.ledger (id bigserial PRIMARY KEY, state text);
         CREATE TYPE payment.outcome AS ENUM ('charged', 'refused');
         CREATE VIEW payment.recent AS SELECT * FROM payment.ledger;
         CREATE FUNCTION payment.touch() RETURNS trigger LANGUAGE plpgsql
             AS $$ BEGIN RETURN NEW; END $$;",
    )
    .execute(&admin)
    .await
    .expect("objects owned by the superuser");
    provision::create_schemas(&admin, fixture.roles.all(), &[])
        .await
        .expect("the admin step runs again");
    let foreign: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'payment'::regnamespace \
             AND relowner <> $1::regrole \
         UNION ALL SELECT typname::text FROM pg_type WHERE typnamespace = 'payment'::regnamespace \
             AND typowner <> $1::regrole \
         UNION ALL SELECT proname::text FROM pg_proc WHERE pronamespace = 'payment'::regnamespace \
             AND proowner <> $1::regrole \
         UNION ALL SELECT nspname::text FROM pg_namespace WHERE nspname = 'payment' \
             AND nspowner <> $1::regrole",
    )
    .bind(&fixture.role("payment").role)
    .fetch_all(&admin)
    .await
    .expect("owners");
    admin.close().await;
    assert_eq!(
        foreign,
        Vec::<String>::new(),
        "everything is the role's now"
    );

    // And the service migrates and writes it with its own rights.
    let payment = connect(&fixture.url("payment"), "payment")
        .await
        .expect("payment connects");
    sqlx::raw_sql(
        "ALTER TABLE ledger ADD COLUMN outcome outcome;
         INSERT INTO ledger (state, outcome) VALUES ('done', 'charged');
         CREATE OR REPLACE VIEW recent AS SELECT * FROM ledger;
         DROP FUNCTION touch();",
    )
    .execute(&payment)
    .await
    .expect("the role changes what it now owns");
    payment.close().await;
}

/// The local CA's folder (`scripts/pki.sh`, `TEST_PKI_DIR` or the repository's `.run/pki`),
/// checked to be the CA the server trusts: the test issues client certificates with it.
fn server_pki(ca: &str) -> PathBuf {
    let dir = std::env::var("TEST_PKI_DIR")
        .map_or_else(|_| testkit::repository().join(".run/pki"), PathBuf::from);
    let ours = std::fs::read(dir.join("ca.crt")).unwrap_or_default();
    let servers = std::fs::read(ca).expect("the server's CA");
    assert_eq!(
        ours,
        servers,
        "the server trusts another CA than {}: run scripts/postgres.sh start from this checkout \
         (it installs this CA's certificate with a reload), or set TEST_PKI_DIR",
        dir.display()
    );
    dir
}

#[tokio::test]
async fn a_client_certificate_from_the_ca_is_accepted_and_one_from_another_ca_refused() {
    let fixture = Fixture::new(&["payment"]).await;
    let pki = server_pki(&fixture.ca);
    let name = fixture.role("payment").role.clone();
    let (cert, key) = issue(&pki, &name);
    let password = fixture.role("payment").password.clone();
    let with_certificate = |cert: &PathBuf, key: &PathBuf| {
        fixture.url_with(
            "payment",
            &password,
            &format!(
                "sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
                fixture.ca,
                cert.display(),
                key.display()
            ),
        )
    };
    let pool = connect(&with_certificate(&cert, &key), "payment")
        .await
        .expect("a client certificate from the server's CA is accepted");
    let presented: Option<String> =
        sqlx::query_scalar("SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("the connection's client certificate");
    assert_eq!(presented, Some(format!("/CN={name}")));
    pool.close().await;

    let other = OtherCa::new();
    let (foreign_cert, foreign_key) = other.issue(&name);
    let error = connect(&with_certificate(&foreign_cert, &foreign_key), "payment")
        .await
        .expect_err("the server refuses a client certificate it cannot verify");
    let text = error.to_string();
    assert!(matches!(error, Error::Connect { .. }), "{text}");
    assert!(text.contains("sslcert"), "{text}");
    for file in [cert, key] {
        let _ = std::fs::remove_file(&file);
    }
    let _ = std::fs::remove_file(pki.join(format!("{name}.p12")));
}
