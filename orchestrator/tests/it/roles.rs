//! The whole system with each service connected as its own PostgreSQL role over TLS
//! (verify-full), made by the admin step (`messaging::provision`, what `sagactl provision
//! database` runs), and one participant on a database of its own.

use std::collections::BTreeMap;

use messaging::provision;
use uuid::Uuid;

use crate::helpers::{order, Options, TestSystem};
use crate::returns::{finished_return, request, widgets_back};
use crate::{balance, stock};

fn with_roles(without: Vec<&'static str>) -> Options {
    Options {
        service_roles: true,
        own_databases: vec!["payment"],
        without,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_saga_types_complete_with_every_service_its_own_role_over_tls_and_payment_on_its_own_database(
) {
    let mut system = TestSystem::start_with(with_roles(Vec::new())).await;
    system.start_participant("returns", 0);
    system.wait_for_participants().await;
    let widgets_before = stock(&system, "WIDGET").await;
    let balance_before = balance(&system, "alice").await;

    let placed = order("alice", "WIDGET", 3, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(stock(&system, "WIDGET").await, widgets_before - 3);
    assert_eq!(balance(&system, "alice").await, balance_before - 3_000);

    let back = widgets_back(placed.order_id, 2, 2_000);
    request(&system, &back).await;
    let saga = finished_return(&system, back.return_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    assert_eq!(stock(&system, "WIDGET").await, widgets_before - 1);
    assert_eq!(balance(&system, "alice").await, balance_before - 1_000);

    // Every service's connections: its own role, over TLS, in its database.
    let admin = system.schema("pg_catalog").await;
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT a.usename::text, a.datname::text, s.ssl \
         FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
         WHERE a.usename = ANY($1)",
    )
    .bind(
        system
            .running_services()
            .iter()
            .map(|s| system.service_role(s).expect("a role").role.clone())
            .collect::<Vec<_>>(),
    )
    .fetch_all(&admin)
    .await
    .expect("the services' connections");
    let mut seen: BTreeMap<String, (String, bool)> = BTreeMap::new();
    for (user, database, tls) in rows {
        assert!(tls, "{user} connected to {database} without TLS");
        let previous = seen.insert(user.clone(), (database.clone(), tls));
        if let Some((other, _)) = previous {
            assert_eq!(other, database, "{user} uses one database");
        }
    }
    let mut expected = BTreeMap::new();
    for service in system.running_services() {
        let role = system.service_role(service).expect("a role");
        let database = seen
            .get(&role.role)
            .unwrap_or_else(|| panic!("{service} is connected as {}", role.role))
            .0
            .clone();
        expected.insert(service, database);
    }
    let main_database = expected["orchestrator"].clone();
    for (service, database) in &expected {
        if *service == "payment" {
            assert_eq!(*database, format!("{main_database}_payment"));
        } else {
            assert_eq!(*database, main_database, "{service}");
        }
    }
    // The main database holds no payment schema; payment's holds only its own.
    let payment_in_main: bool = sqlx::query_scalar("SELECT to_regnamespace('payment') IS NOT NULL")
        .fetch_one(&system.schema("orchestrator").await)
        .await
        .expect("schema lookup");
    assert!(!payment_in_main);
    let schemas_by_payment: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspowner = $1::regrole")
            .bind(&system.service_role("payment").expect("payment's role").role)
            .fetch_all(&system.schema("payment").await)
            .await
            .expect("payment's schemas");
    assert_eq!(schemas_by_payment, ["payment"]);
    admin.close().await;
    system.stop().await;
}

/// The orchestrator binary as a deployment runs it: its role's password from the password file
/// PGPASSFILE names, TLS verified against `sslrootcert`; a wrong password or CA stops it at
/// start, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrator_binary_logs_in_with_pgpassfile_and_stops_on_a_wrong_password_or_ca() {
    let mut system = TestSystem::start_with(with_roles(vec!["orchestrator"])).await;
    let dir = std::env::temp_dir().join(format!("pgpass-{}", Uuid::new_v4()));
    let role = system
        .service_role("orchestrator")
        .expect("orchestrator's role")
        .clone();
    let right = provision::write_password_file(&dir.join("right"), &role).expect("file");
    let wrong = provision::write_password_file(
        &dir.join("wrong"),
        &provision::ServiceRole {
            password: provision::random_password(),
            ..role.clone()
        },
    )
    .expect("file");
    let url = system.service_url("orchestrator").expect("URL");
    assert!(!url.contains(&role.password), "no password in the URL");

    let (succeeded, output) = system
        .orchestrator_process_output(&[
            ("DATABASE_URL", &url),
            ("PGPASSFILE", &wrong.display().to_string()),
        ])
        .await;
    assert!(!succeeded, "a wrong password stops the start: {output}");
    assert!(
        output.contains("password authentication failed") && output.contains("PGPASSFILE"),
        "{output}"
    );

    let other_ca = testkit::pki::OtherCa::new();
    let untrusted = url.replace(
        &url[url.find("sslrootcert=").expect("sslrootcert")..],
        &format!("sslrootcert={}", other_ca.ca().display()),
    );
    let (succeeded, output) = system
        .orchestrator_process_output(&[
            ("DATABASE_URL", &untrusted),
            ("PGPASSFILE", &right.display().to_string()),
        ])
        .await;
    assert!(
        !succeeded,
        "an untrusted server certificate stops the start: {output}"
    );
    assert!(output.contains("sslrootcert"), "{output}");

    let mut child = system
        .spawn_orchestrator_process(&[
            ("DATABASE_URL", &url),
            ("PGPASSFILE", &right.display().to_string()),
        ])
        .await;
    let placed = order("alice", "WIDGET", 1, "DE");
    system.place(&placed).await;
    let saga = system.finished_saga(placed.order_id).await;
    assert_eq!(saga["state"], "completed", "{saga}");
    child.kill().await.expect("stop the orchestrator");
    let _ = std::fs::remove_dir_all(&dir);
    system.stop().await;
}
