//! `sagactl`'s standard output is its answer, and nothing else: scripts and tests read the id
//! `sagactl order` prints. Its logs go to standard error. (A librdkafka warning logged to
//! stdout while a fresh cluster loaded a coordinator once became part of an order id, and the
//! test that placed the order waited 90 s for a saga of that "id".) Runs against the broker at
//! `KAFKA_BROKERS` (default 127.0.0.1:9092), on topics of a prefix of its own, deleted at the end.

use std::path::Path;
use std::process::{Command, Output};

fn sagactl(args: &[&str], client_properties: &Path) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(args)
        .args(["--kafka-brokers", &testkit::brokers()])
        .env("SAGAS_DIR", testkit::sagas_dir())
        .env("KAFKA_CLIENT_PROPERTIES", client_properties)
        .env("RUST_LOG", "debug")
        .output()
        .expect("running sagactl");
    assert!(
        output.status.success(),
        "sagactl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn sagactl_order_prints_the_order_id_alone_and_logs_to_stderr() {
    let prefix = format!("stdout-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // librdkafka's debug log of its connections: plenty of lines that would land in stdout
    // if logs went there.
    let properties = std::env::temp_dir().join(format!("{prefix}.properties"));
    std::fs::write(&properties, "debug=broker,metadata\n").expect("writing the properties");
    sagactl(
        &["provision", "kafka", "--topic-prefix", &prefix],
        &properties,
    );

    let placed = sagactl(&["order", "--topic-prefix", &prefix], &properties);
    let stdout = String::from_utf8(placed.stdout).expect("UTF-8 on stdout");
    let stderr = String::from_utf8_lossy(&placed.stderr);
    sagactl(&["delete-topics", "--prefix", &prefix], &properties);
    let _ = std::fs::remove_file(&properties);

    let id = stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stdout is not one line: {stdout:?}"));
    assert!(
        uuid::Uuid::parse_str(id).is_ok(),
        "stdout is not an order id: {stdout:?}"
    );
    assert!(
        stderr.contains("librdkafka"),
        "no librdkafka log on stderr: {stderr:?}"
    );
}
