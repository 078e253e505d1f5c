//! `sagactl chaos --clock-skew`'s library (`clock-shift/clock_shift.c`, preloaded) runs a
//! process with its wall clock off the way a host whose clock is wrong would: a Kafka client
//! ten minutes behind or ahead stamps its records ten minutes off, and still starts, publishes
//! and waits at the right pace.
//!
//! libfaketime, used before, moved only the clock's reads, not the deadlines librdkafka
//! computes from them: under it the same `sagactl order` took 91 s to fail ten minutes
//! behind and still hung after 120 s ten minutes ahead (and this test with libfaketime in the
//! library's place hung until killed).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};
use testkit::{brokers, TestTopics};

const LIBRARY: &str = concat!(env!("OUT_DIR"), "/libclock_shift.so");

#[tokio::test]
async fn a_kafka_client_with_its_clock_off_stamps_its_records_off_and_waits_at_the_right_pace() {
    for skew in [-600_i64, 600] {
        let topics = TestTopics::new("clock-shift");
        let orders = topics.named("orders");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .expect("admin client");
        let created = admin
            .create_topics(
                &[NewTopic::new(&orders, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create the orders topic");
        for result in created {
            result.unwrap_or_else(|(topic, code)| panic!("creating {topic}: {code}"));
        }

        let started = Instant::now();
        let placing = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagactl"))
            .args(["order", "--kafka-brokers", &brokers()])
            .args(["--topic-prefix", topics.prefix()])
            .env("LD_PRELOAD", LIBRARY)
            .env("CLOCK_SHIFT_SECS", skew.to_string())
            .kill_on_drop(true)
            .output();
        // Under libfaketime, ten minutes ahead, it never ended.
        let placed = tokio::time::timeout(Duration::from_secs(60), placing)
            .await
            .unwrap_or_else(|_| panic!("sagactl order {skew:+} s still running after 60 s"))
            .expect("run sagactl order");
        let took = started.elapsed();
        assert!(
            placed.status.success(),
            "sagactl order {skew:+} s: {}",
            String::from_utf8_lossy(&placed.stderr)
        );
        // Unskewed it takes well under a second; the message timeout is 30 s.
        assert!(took < Duration::from_secs(15), "{skew:+} s took {took:?}");

        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", topics.named("reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&orders]).expect("subscribe");
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("the order within 30 s")
            .expect("a record");
        let stamped_ms = record.timestamp().to_millis().expect("a create time");
        let now_ms = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_millis(),
        )
        .expect("milliseconds fit");
        let off_secs = (stamped_ms - now_ms) as f64 / 1000.0;
        assert!(
            (off_secs - skew as f64).abs() < 60.0,
            "a client {skew:+} s off stamped its record {off_secs:+.1} s off"
        );
    }
}
