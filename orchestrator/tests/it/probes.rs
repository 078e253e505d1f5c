//! `/livez` and `/readyz` on the orchestrator's operations address and on a participant's
//! metrics port: ready only once the consumer has joined its group and while the database
//! answers; live all along.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{eventually, Options, TestSystem};

/// A probe's status and its error message (empty when it has none); 0 when nothing answers.
async fn probe(client: &reqwest::Client, addr: SocketAddr, path: &str) -> (u16, String) {
    match client.get(format!("http://{addr}{path}")).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or_default();
            (status, message.to_owned())
        }
        Err(_) => (0, String::new()),
    }
}

/// Lets new sessions into the test's own database, or refuses them and ends its sessions (the
/// database is down for its services; the server and every other database go on).
async fn set_database_reachable(database: &str, reachable: bool) {
    crate::helpers::alter_database(database, &format!("WITH ALLOW_CONNECTIONS {reachable}")).await;
}

/// The orchestrator (a process of its own, from its start) and a participant: `/readyz` says
/// 503 with the reason until the database has answered and the consumer has reported its
/// group's assignment, then 200; 503 while the
/// database refuses connections, 200 again once it takes them; `/livez` answers 200 whenever
/// the process serves HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_group_and_the_database_while_livez_stays_200() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["orchestrator", "inventory", "payment", "shipping"],
        ..Options::default()
    })
    .await;
    let client = reqwest::Client::new();
    let ops = testkit::free_addr();
    let (mut command, _) = system.orchestrator_command(&[("OPS_HTTP_ADDR", &ops.to_string())]);
    let _orchestrator = command.spawn().expect("start the orchestrator binary");

    // From its first answer: not ready (nothing joined yet), then ready.
    let began = Instant::now();
    let mut answers: Vec<(u16, String)> = Vec::new();
    while began.elapsed() < Duration::from_secs(90) {
        let answer = probe(&client, ops, "/readyz").await;
        if answer.0 != 0 {
            let (live, _) = probe(&client, ops, "/livez").await;
            assert_eq!(live, 200, "a serving process is live ({answer:?})");
            answers.push(answer.clone());
        }
        if answer.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = answers.first().cloned().unwrap_or_default();
    assert_eq!(first.0, 503, "not ready at first: {answers:?}");
    assert!(
        first.1.contains("not ready") && first.1.contains("yet"),
        "the reason: {answers:?}"
    );
    // Before its consumer reported an assignment (librdkafka's statistics: joined or not), the
    // orchestrator is not ready for that reason; the join itself is `messaging::health`'s test.
    assert!(
        answers
            .iter()
            .any(|(status, reason)| *status == 503 && reason.contains("consumer")),
        "not ready until the consumer reports: {answers:?}"
    );
    assert_eq!(
        answers.last().map(|a| a.0),
        Some(200),
        "ready once joined: {answers:?}"
    );

    let participant = testkit::free_addr();
    system.start_participant_serving_metrics("inventory", participant);
    for addr in [ops, participant] {
        eventually("/readyz to answer 200", || async {
            (probe(&client, addr, "/readyz").await.0 == 200).then_some(())
        })
        .await;
    }

    let database = system
        .database_url()
        .rsplit('/')
        .next()
        .expect("a database name")
        .to_owned();
    set_database_reachable(&database, false).await;
    for addr in [ops, participant] {
        let message = eventually("/readyz to say the database does not answer", || async {
            let (status, message) = probe(&client, addr, "/readyz").await;
            (status == 503 && message.contains("database")).then_some(message)
        })
        .await;
        assert_eq!(
            probe(&client, addr, "/livez").await.0,
            200,
            "live while not ready: {message}"
        );
    }
    set_database_reachable(&database, true).await;
    for addr in [ops, participant] {
        eventually("/readyz to answer 200 again", || async {
            (probe(&client, addr, "/readyz").await.0 == 200).then_some(())
        })
        .await;
    }
    system.stop().await;
}

/// A participant whose metrics port is taken stops with the cause, instead of running on
/// with no probes (or with another process answering them in its name).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_whose_metrics_port_is_taken_stops_with_the_cause() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["shipping"],
        ..Options::default()
    })
    .await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let addr = taken.local_addr().expect("its address");
    system.start_participant_serving_metrics("shipping", addr);
    let ended = tokio::time::timeout(Duration::from_secs(60), system.wait_for_exit("shipping"))
        .await
        .expect("the participant stops within a minute");
    assert!(ended.contains("metrics server"), "{ended}");
    drop(taken);
    system.stop().await;
}
