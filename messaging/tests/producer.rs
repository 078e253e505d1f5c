//! The services' producer against the real broker (`KAFKA_BROKERS`): its futures resolve with
//! the broker's answers, and its polling thread ends once the last handle is gone. A test binary
//! of its own: it counts the process's producer threads, which another test's producers would
//! change.

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use testkit::TestTopics;

/// How many threads of this process are producer polling threads.
fn polling_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("list this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() == "producer poll")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_answered_and_the_polling_thread_ends_with_the_last_handle() {
    let prefix = TestTopics::new("producer-test");
    let topic = prefix.named("out");
    let config = prefix.kafka_config(2);
    messaging::kafka::ensure_topics(&config, std::slice::from_ref(&topic))
        .await
        .expect("create the topic");
    let before = polling_threads();

    let producer = messaging::kafka::producer(&config).expect("producer");
    let handle = producer.clone();
    // A new thread names itself once it runs.
    threads_become(before + 1, "the producer's polling thread to start").await;

    // A delivery is answered by the broker, through the polling thread, at its offset.
    let first = producer
        .send(
            FutureRecord::to(&topic).key("k").payload("one"),
            Duration::from_secs(5),
        )
        .await
        .expect("first record delivered");
    let second = handle
        .send_result(FutureRecord::to(&topic).key("k").payload("two"))
        .expect("queued")
        .await
        .expect("answered")
        .expect("second record delivered");
    assert_eq!(second.partition, first.partition, "one key, one partition");
    assert_eq!(second.offset, first.offset + 1);

    // A record larger than librdkafka takes (message.max.bytes, 1 MB by default) comes back at
    // once, with its reason.
    let too_big = vec![0u8; 4 * 1024 * 1024];
    let refused = producer
        .send(
            FutureRecord::to(&topic).key("k").payload(&too_big),
            Duration::from_secs(5),
        )
        .await;
    assert!(
        matches!(refused, Err(KafkaError::MessageProduction(_))),
        "{refused:?}"
    );

    drop(producer);
    assert_eq!(
        polling_threads(),
        before + 1,
        "one thread for both handles, one still alive"
    );
    drop(handle);
    threads_become(
        before,
        "the polling thread to end with its producer's last handle",
    )
    .await;
}

/// Waits until `expected` producer polling threads run, for 5 s at most.
async fn threads_become(expected: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while polling_threads() != expected {
        assert!(Instant::now() < deadline, "waited 5 s for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
