//! `sagactl provision database` against the real PostgreSQL (`TEST_DATABASE_URL`, a server URL
//! without a database name): the roles of every service the saga definitions name, their
//! schemas, the orchestrator's extension and the password files; run again, it keeps the
//! passwords. The roles are named with a prefix of this test's and dropped at the end.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use testkit::{admin, server_url, TestDatabase};

fn provision(database: &str, prefix: &str, secrets: &Path) -> String {
    let sagas = testkit::sagas_dir();
    let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(["provision", "database", "--server", &server_url()])
        .args(["--database", database, "--role-prefix", prefix])
        .arg("--secrets-dir")
        .arg(secrets)
        .arg("--sagas-dir")
        .arg(sagas)
        .output()
        .expect("run sagactl");
    assert!(
        output.status.success(),
        "sagactl provision database: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

#[tokio::test]
async fn provision_database_gives_every_service_of_the_definitions_a_role_and_its_schema() {
    let id = testkit::unique_id(10);
    // Made by sagactl; dropped when the test ends, passed or not.
    let database = TestDatabase::adopt(format!("provision_test_{id}"));
    let prefix = format!("t{id}_");
    let secrets = std::env::temp_dir().join(format!("provision-{id}"));

    let printed = provision(database.name(), &prefix, &secrets);
    let services: Vec<&str> = printed
        .lines()
        .map(|line| line.split('\t').next().unwrap_or_default())
        .collect();
    // The orchestrator and every participant `sagas/*.toml` names.
    assert_eq!(
        services,
        [
            "orchestrator",
            "inventory",
            "payment",
            "returns",
            "shipping"
        ]
    );
    let mut passwords = Vec::new();
    for service in &services {
        let file = secrets.join(format!("{service}.pgpass"));
        let mode = std::fs::metadata(&file)
            .expect("a password file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{service}'s file is its owner's only");
        passwords.push(std::fs::read_to_string(&file).expect("read"));
    }

    let in_database = database.admin().await;
    let owners: Vec<(String, String)> = sqlx::query_as(
        "SELECT nspname::text, nspowner::regrole::text FROM pg_namespace \
         WHERE nspowner::regrole::text LIKE $1 ORDER BY 1",
    )
    .bind(format!("{prefix}%"))
    .fetch_all(&in_database)
    .await
    .expect("schemas");
    let mut expected: Vec<(String, String)> = services
        .iter()
        .map(|s| ((*s).to_owned(), format!("{prefix}{s}")))
        .collect();
    expected.sort();
    assert_eq!(owners, expected, "each schema owned by its service's role");
    let trigrams: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm')")
            .fetch_one(&in_database)
            .await
            .expect("extensions");
    assert!(trigrams, "the orchestrator's migrations find pg_trgm");
    in_database.close().await;

    let admin = admin("postgres").await;
    let privileged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_roles WHERE rolname LIKE $1 \
           AND (rolsuper OR rolcreatedb OR rolcreaterole OR rolreplication OR rolbypassrls \
                OR NOT rolcanlogin)",
    )
    .bind(format!("{prefix}%"))
    .fetch_one(&admin)
    .await
    .expect("roles");
    assert_eq!(privileged, 0, "login roles without any other right");

    // Again: the same roles, schemas and passwords.
    let again = provision(database.name(), &prefix, &secrets);
    assert_eq!(again, printed);
    for (service, before) in services.iter().zip(&passwords) {
        let now = std::fs::read_to_string(secrets.join(format!("{service}.pgpass"))).expect("read");
        assert_eq!(&now, before, "{service} keeps its password");
    }

    // The roles own what is in the database: it goes first.
    drop(database);
    for service in &services {
        sqlx::query(&format!("DROP ROLE {prefix}{service}"))
            .execute(&admin)
            .await
            .expect("drop the role");
    }
    admin.close().await;
    let _ = std::fs::remove_dir_all(&secrets);
}
