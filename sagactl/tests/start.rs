//! `sagactl start <saga_type>` end to end: a saga of every type of the repository's
//! definitions, started from its trigger message (one from standard input, one from a file),
//! completes. The services run as processes (this build's binaries, beside `sagactl`: build
//! them first, `cargo build --bins`; `cargo test --workspace` does) against the broker at
//! `KAFKA_BROKERS` (default 127.0.0.1:9092) and PostgreSQL at `TEST_DATABASE_URL` (default
//! postgres://postgres@127.0.0.1:5432), on a database and a topic prefix of the test's own,
//! both removed at the end.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

/// How long a saga may take, services' start-up included, on a machine others share.
const WAIT: Duration = Duration::from_secs(120);

fn psql(sql: &str) {
    let status = Command::new("psql")
        .arg(format!("{}/postgres", testkit::server_url()))
        .args(["-qc", sql])
        .status()
        .expect("running psql");
    assert!(status.success(), "psql: {sql}");
}

/// `sagactl` with `args` against the test's broker and prefix, `stdin` on its standard input.
fn sagactl(args: &[&str], prefix: &str, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(args)
        .env("KAFKA_BROKERS", testkit::brokers())
        .env("TOPIC_PREFIX", prefix)
        .env("SAGAS_DIR", testkit::repository().join("sagas"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running sagactl");
    child
        .stdin
        .take()
        .expect("its standard input")
        .write_all(stdin.as_bytes())
        .expect("writing to sagactl");
    let output = child.wait_with_output().expect("sagactl ends");
    assert!(
        output.status.success(),
        "sagactl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The deployment's services as processes; killed, and their database and topics removed,
/// when dropped.
struct Deployment {
    prefix: String,
    database: String,
    logs: PathBuf,
    children: Vec<(String, Child)>,
    api: String,
}

impl Deployment {
    fn start(services: &[String]) -> Self {
        Self::start_with(services, &[])
    }

    /// [`Deployment::start`] with `env` on top of every service's settings; the API is
    /// `https://` when `env` names a certificate (`HTTP_TLS_CERT_FILE`).
    fn start_with(services: &[String], env: &[(&str, &str)]) -> Self {
        let id = Uuid::new_v4().simple().to_string();
        let prefix = format!("start-{}.", &id[..8]);
        let database = format!("start_{id}");
        psql(&format!("CREATE DATABASE {database}"));
        let logs = std::env::temp_dir().join(format!("sagactl-start-{id}"));
        std::fs::create_dir_all(&logs).expect("a folder for the logs");
        let http = testkit::free_addr();
        let mut deployment = Self {
            prefix,
            database,
            logs,
            children: Vec::new(),
            api: if env.iter().any(|(name, _)| *name == "HTTP_TLS_CERT_FILE") {
                format!("https://{http}")
            } else {
                format!("http://{http}")
            },
        };
        // The topics first, so no service races another to create one.
        sagactl(&["provision", "kafka"], &deployment.prefix, "");
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_sagactl"))
            .parent()
            .expect("the binaries' directory");
        for name in services {
            let binary = bin_dir.join(name);
            assert!(
                binary.exists(),
                "{} missing: build the services first (cargo build --bins)",
                binary.display()
            );
            let log = std::fs::File::create(deployment.logs.join(format!("{name}.log")))
                .expect("a log file");
            let child = Command::new(&binary)
                .env("KAFKA_BROKERS", testkit::brokers())
                .env("TOPIC_PREFIX", &deployment.prefix)
                .env(
                    "DATABASE_URL",
                    format!("{}/{}", testkit::server_url(), deployment.database),
                )
                .env("SAGAS_DIR", testkit::repository().join("sagas"))
                .env("HTTP_ADDR", http.to_string())
                .env("API_OPEN_ON_LOOPBACK", "true")
                .env("METRICS_ADDR", "127.0.0.1:0")
                // Small pools, as the other end-to-end tests' services have: they run beside
                // this one within PostgreSQL's 100 connections.
                .env("DATABASE_MAX_CONNECTIONS", "2")
                .env_remove("OPS_HTTP_ADDR")
                .env_remove("KAFKA_CLIENT_PROPERTIES")
                .envs(env.iter().copied())
                .stdout(log.try_clone().expect("the log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            deployment.children.push((name.clone(), child));
        }
        deployment
    }

    /// Every service's log, for a failure's message.
    fn logs(&self) -> String {
        let mut text = String::new();
        for (name, _) in &self.children {
            let log =
                std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            text.push_str(&format!("--- {name} (last lines)\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// Fails when a service has exited.
    fn check_running(&mut self) {
        let mut ended = Vec::new();
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                ended.push(format!("{name} exited with {status}"));
            }
        }
        assert!(ended.is_empty(), "{ended:?}\n{}", self.logs());
    }

    /// Waits for the saga of `saga_type` with `key` to end, and returns its state.
    async fn finished(&mut self, saga_type: &str, key: &str) -> String {
        let http = reqwest::Client::new();
        let url = format!("{}/definitions/{saga_type}/sagas/{key}", self.api);
        let began = Instant::now();
        let mut last = String::from("no answer");
        while began.elapsed() < WAIT {
            self.check_running();
            if let Ok(response) = http.get(&url).send().await {
                let status = response.status();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let state = body["state"].as_str().unwrap_or_default();
                if ["completed", "compensated", "failed"].contains(&state) {
                    return state.to_owned();
                }
                last = format!("{status}: {body}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "the {saga_type} saga {key} did not end in {WAIT:?}; last answer {last}\n{}",
            self.logs()
        );
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new(env!("CARGO_BIN_EXE_sagactl"))
            .args(["delete-topics", "--prefix", &self.prefix])
            .env("KAFKA_BROKERS", testkit::brokers())
            .output();
        let _ = Command::new("psql")
            .arg(format!("{}/postgres", testkit::server_url()))
            .args([
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database),
            ])
            .status();
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// A golden trigger message with `ids` replaced, its `type` left out (`start` puts it in).
fn golden(message: &str, ids: &[(&str, &str)]) -> String {
    let path = testkit::repository().join(format!("events/golden/{message}.json"));
    let text = std::fs::read_to_string(&path).expect("a golden file");
    let mut value: Value = serde_json::from_str(&text).expect("golden JSON");
    let fields = value.as_object_mut().expect("an object");
    fields.remove("type");
    for (field, id) in ids {
        fields.insert((*field).to_owned(), Value::String((*id).to_owned()));
    }
    value.to_string()
}

#[tokio::test]
async fn a_saga_of_each_type_started_with_sagactl_start_completes() {
    let definitions = saga_core::definitions::load_dir(&testkit::repository().join("sagas"))
        .expect("sagas/ loads");
    let types: BTreeSet<&str> = definitions.iter().map(|d| d.name.as_str()).collect();
    // A saga type added to sagas/ needs its trigger here (the return refunds the order).
    assert_eq!(
        types,
        BTreeSet::from(["order", "return"]),
        "a trigger message per saga type"
    );
    let mut services = vec!["orchestrator".to_owned()];
    for step in definitions.iter().flat_map(|d| &d.steps) {
        if !services.contains(&step.participant) {
            services.push(step.participant.clone());
        }
    }
    let mut deployment = Deployment::start(&services);

    // The order from standard input.
    let order_id = Uuid::new_v4().to_string();
    let order = golden("OrderPlaced", &[("order_id", &order_id)]);
    let started = sagactl(&["start", "order"], &deployment.prefix, &order);
    assert_eq!(
        String::from_utf8_lossy(&started.stdout),
        format!("{order_id}\n")
    );
    assert_eq!(deployment.finished("order", &order_id).await, "completed");

    // A return of it from a file.
    let return_id = Uuid::new_v4().to_string();
    let request = golden(
        "ReturnRequested",
        &[("return_id", &return_id), ("order_id", &order_id)],
    );
    let file = deployment.logs.join("return.json");
    std::fs::write(&file, request).expect("writing the return");
    let file = file.display().to_string();
    let started = sagactl(
        &["start", "return", "--file", &file],
        &deployment.prefix,
        "",
    );
    assert_eq!(
        String::from_utf8_lossy(&started.stdout),
        format!("{return_id}\n")
    );
    assert_eq!(deployment.finished("return", &return_id).await, "completed");
}

/// `sagactl list` against the API over HTTPS: with the local CA (`SAGA_API_CA_FILE`) it reads
/// the sagas; without it, it refuses the server's certificate.
#[tokio::test]
async fn sagactl_reads_an_https_api_with_the_ca_it_is_given() {
    let pki = std::env::temp_dir().join(format!("sagactl-pki-{}", Uuid::new_v4()));
    let (cert, key) = testkit::pki::issue(&pki, "api");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let ca = pki.join("ca.crt").display().to_string();
    let mut deployment = Deployment::start_with(
        &["orchestrator".to_owned()],
        &[("HTTP_TLS_CERT_FILE", &cert), ("HTTP_TLS_KEY_FILE", &key)],
    );
    assert!(deployment.api.starts_with("https://"), "{}", deployment.api);
    let api = deployment.api.clone();
    let list = |with_ca: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sagactl"));
        command
            .args(["list", "--json"])
            .env("SAGA_API", &api)
            .env_remove("SAGA_API_TOKEN");
        if with_ca {
            command.env("SAGA_API_CA_FILE", &ca);
        } else {
            command.env_remove("SAGA_API_CA_FILE");
        }
        command.output().expect("running sagactl")
    };
    let began = Instant::now();
    let listed = loop {
        let output = list(true);
        if output.status.success() || began.elapsed() > WAIT {
            break output;
        }
        deployment.check_running();
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        listed.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&listed.stderr),
        deployment.logs()
    );
    let body: Value = serde_json::from_slice(&listed.stdout).expect("the API's JSON");
    assert!(body["sagas"].is_array(), "{body}");

    let refused = list(false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "trusted without the CA: {stderr}"
    );
    assert!(stderr.contains("certificate"), "{stderr}");
    let _ = std::fs::remove_dir_all(&pki);
}

#[test]
fn a_trigger_its_rules_refuse_is_not_published() {
    // No broker is needed: the message is refused before sagactl connects to one.
    let output = Command::new(env!("CARGO_BIN_EXE_sagactl"))
        .args(["start", "order", "--kafka-brokers", "127.0.0.1:1"])
        .env("SAGAS_DIR", testkit::repository().join("sagas"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            let order =
                golden("OrderPlaced", &[]).replace("\"total_cents\":7499", "\"total_cents\":1");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(order.as_bytes())?;
            child.wait_with_output()
        })
        .expect("running sagactl");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(output.stdout.is_empty(), "{:?}", output.stdout);
    assert!(stderr.contains("total_cents"), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
}
