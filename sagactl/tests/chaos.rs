//! A short chaos run on one host with the payment participant on a database of its own
//! (`sagactl chaos --own-database payment`, issue 23's topology): every invariant must PASS
//! while services are SIGKILLed, crash after commits and get garbage, with the checks reading
//! each service's tables from the database it uses; and the payment's tables must really be in
//! their own database, not in the run's. The services run as processes (this build's binaries,
//! beside `sagactl`: build them first, `cargo build --bins`; `cargo test --workspace` does)
//! against the broker at `KAFKA_BROKERS` (default 127.0.0.1:9092) and PostgreSQL at
//! `TEST_DATABASE_URL` (default postgres://postgres@127.0.0.1:5432), on databases and a topic
//! prefix of the run's own, removed at the end. No broker or PostgreSQL fault: those servers are
//! shared (`scripts/test.sh` runs the server faults in its own chaos phases).

use std::path::Path;
use std::process::{Command, Output};

/// `sagactl chaos` with `args`, from the repository (its scripts and `.run`), on the test's
/// servers and this build's service binaries.
fn chaos(args: &[&str]) -> Output {
    let sagactl = Path::new(env!("CARGO_BIN_EXE_sagactl"));
    let bin_dir = sagactl.parent().expect("sagactl's folder");
    Command::new(sagactl)
        .current_dir(testkit::repository())
        .arg("chaos")
        .arg("--database-server")
        .arg(testkit::server_url())
        .arg("--kafka-brokers")
        .arg(testkit::brokers())
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--sagas-dir")
        .arg(testkit::repository().join("sagas"))
        .args(args)
        .output()
        .expect("running sagactl chaos")
}

/// The one value `sql` selects in `database`.
fn psql(database: &str, sql: &str) -> String {
    let output = Command::new("psql")
        .arg(format!("{}/{database}", testkit::server_url()))
        .args(["-XAtqc", sql])
        .output()
        .expect("running psql");
    assert!(
        output.status.success(),
        "psql {database}: {sql}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// What a kept run leaves, removed when dropped: its databases, topics and logs.
struct Kept {
    id: String,
}

impl Drop for Kept {
    fn drop(&mut self) {
        let id = &self.id;
        for database in [format!("chaos_{id}"), format!("chaos_{id}_payment")] {
            // Not `psql`: a drop must not panic, also while a failed assertion unwinds.
            let _ = Command::new("psql")
                .arg(format!("{}/postgres", testkit::server_url()))
                .args([
                    "-XAtqc",
                    &format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"),
                ])
                .output();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_sagactl"))
            .args(["delete-topics", "--prefix", &format!("chaos-{id}.")])
            .args(["--kafka-brokers", &testkit::brokers()])
            .status();
        let _ = std::fs::remove_dir_all(testkit::repository().join(format!(".run/chaos-{id}")));
    }
}

#[test]
fn a_participant_on_its_own_database_keeps_every_invariant_and_its_tables_there() {
    let output = chaos(&[
        "--own-database",
        "payment",
        "--sagas",
        "400",
        "--rate",
        "20",
        "--kill-every-ms",
        "1500",
        "--crash-after-commit-every",
        "40",
        "--garbage-every-ms",
        "150",
        "--settle-timeout-secs",
        "120",
        // Kept, so that the databases can be looked into; `Kept` removes them.
        "--keep",
    ]);
    let report = String::from_utf8_lossy(&output.stdout);
    let log = String::from_utf8_lossy(&output.stderr);
    // The run's id, from its first line (`chaos run <id>: database ...`).
    let id = log
        .lines()
        .find_map(|line| line.strip_prefix("chaos run ")?.split_once(": database"))
        .map(|(id, _)| id.to_owned())
        .unwrap_or_else(|| panic!("the run made no database:\n{log}"));
    let _kept = Kept { id: id.clone() };
    // The report, for `--nocapture` and a failure.
    println!("{report}");
    assert!(
        output.status.success(),
        "the run failed:\n{report}\n{}",
        log.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    assert!(
        !report.lines().any(|line| line.starts_with("FAIL")),
        "{report}"
    );
    assert!(report.contains(", 0 failed"), "{report}");
    // The report names the payment's database.
    let main = format!("chaos_{id}");
    let own = format!("chaos_{id}_payment");
    assert!(
        report
            .lines()
            .any(|line| line.starts_with("databases") && line.contains(&format!("{own} (payment)"))),
        "{report}"
    );
    // The payment's schema is in its own database only, with the run's charges in it; the
    // others are in the run's.
    let schemas = "SELECT string_agg(nspname, ',' ORDER BY nspname) FROM pg_namespace \
                   WHERE nspname IN ('orchestrator', 'inventory', 'payment', 'returns', 'shipping')";
    assert_eq!(
        psql(&main, schemas),
        "inventory,orchestrator,returns,shipping"
    );
    assert_eq!(psql(&own, schemas), "payment");
    let charges: i64 = psql(&own, "SELECT count(*) FROM payment.payments")
        .parse()
        .expect("a count");
    assert!(charges > 100, "{charges} payments in {own}");
}

/// A name that is none of the definitions' participants is refused before anything is made.
#[test]
fn own_database_names_a_participant() {
    let output = chaos(&["--own-database", "orchestrator"]);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        log.contains("--own-database orchestrator: not a participant of the definitions"),
        "{log}"
    );
}
