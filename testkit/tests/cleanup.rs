//! What a test makes with the kit is removed when the test fails too: before the kit, the
//! relay's test (its schema and topics), the partitioner's and start-up tests (a topic, a
//! database) and `sagactl provision`'s test (its database) removed theirs only at the end of a
//! passing run, so every failure left them on the shared servers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use testkit::{brokers, eventually_within, TestDatabase, TestTopics};

/// Whether the topic `name` exists on the test broker.
fn topic_exists(name: &str) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("a client");
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    metadata.topics().iter().any(|t| t.name() == name)
}

#[test]
fn a_failing_test_still_removes_its_database_and_its_topics() {
    let made: Arc<Mutex<Option<(String, String)>>> = Arc::default();
    let seen = made.clone();
    // A test that makes a database and a topic, then fails: its runtime and its guards unwind.
    let failed = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let database = TestDatabase::create("kit_cleanup").await;
            let topics = TestTopics::new("kit-cleanup");
            let topic = topics.named("orders");
            messaging::kafka::ensure_topics(&topics.kafka_config(1), std::slice::from_ref(&topic))
                .await
                .expect("create the topic");
            *seen.lock().expect("lock") = Some((database.name().to_owned(), topic));
            panic!("the test fails with its database and topic made");
        });
    })
    .join();
    assert!(failed.is_err(), "the test failed");
    let (database, topic) = made.lock().expect("lock").clone().expect("it made both");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let admin = testkit::admin("postgres").await;
        let left: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&database)
                .fetch_one(&admin)
                .await
                .expect("the databases");
        admin.close().await;
        assert!(!left, "{database} was dropped");
        // A deleted topic leaves the broker's metadata shortly after.
        eventually_within(
            Duration::from_secs(30),
            "the topic to be deleted",
            || async { (!topic_exists(&topic)).then_some(()) },
        )
        .await;
    });
}
