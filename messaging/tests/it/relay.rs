//! The outbox relay with a destination that does not exist yet: the other destinations' rows
//! go out meanwhile, nothing is parked, and once the topic exists its rows go out with every
//! key's rows in order.

use std::time::Duration;

use messaging::config::{DatabaseConfig, FaultConfig, GroupProtocol, KafkaConfig, RelayConfig};
use messaging::relay::Relay;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn kafka(prefix: &str) -> KafkaConfig {
    KafkaConfig {
        connection: messaging::config::KafkaConnection::to(brokers()),
        topic_prefix: prefix.to_owned(),
        topic_partitions: 2,
        topic_replication_factor: 1,
        fetch_wait_max_ms: 100,
        session_timeout_ms: 6_000,
        group_protocol: GroupProtocol::default(),
        group_instance_id: None,
        kafka_debug: None,
        consumer_batch_max: 100,
        consumer_stall_ms: 10_000,
        linger_ms: 0,
    }
}

async fn rows_for(pool: &PgPool, topic: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = $1")
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("count outbox rows")
}

/// Polls `check` every 50 ms until it holds, for at most 30 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every record of `topic` as (key, payload), partition by partition, each in offset order.
async fn read_all(topic: &str, expected: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut partitions = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        partitions
            .add_partition_offset(topic, partition.id(), Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&partitions).expect("assign");
    let mut records = Vec::new();
    while records.len() < expected {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("{expected} records on {topic}; got {}", records.len()))
            .expect("receive");
        records.push((
            message.key().unwrap_or_default().to_vec(),
            message.payload().unwrap_or_default().to_vec(),
        ));
    }
    // A little longer, for copies published twice (a probe's copy, a record that outlived
    // its wait): they may follow, and must not come first.
    while let Ok(Ok(message)) =
        tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
    {
        records.push((
            message.key().unwrap_or_default().to_vec(),
            message.payload().unwrap_or_default().to_vec(),
        ));
    }
    std::thread::spawn(move || drop(consumer));
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_holds_up_only_its_own_rows_which_then_go_out_in_order_per_key() {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let prefix = format!("relay-test-{id}.");
    let (working, missing) = (format!("{prefix}working"), format!("{prefix}missing"));
    let config = kafka(&prefix);
    messaging::kafka::ensure_topics(&config, std::slice::from_ref(&working))
        .await
        .expect("create the working topic");
    let server = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let schema = format!("relay_it_{id}");
    let (pool, _) = messaging::db::open(
        &DatabaseConfig {
            database_url: format!("{server}/postgres"),
            database_schema: Some(schema.clone()),
            database_max_connections: 3,
        },
        "unused",
        &[],
    )
    .await
    .expect("database");
    // Interleaved: three keys' rows for the missing topic (the lowest rows of the outbox) and
    // rows for the working one.
    let mut expected_missing = Vec::new();
    for n in 0..30 {
        let key = format!("k{}", n % 3);
        let (topic, payload) = if n % 2 == 0 {
            (&missing, format!("{key}-{n:02}"))
        } else {
            (&working, format!("w-{n:02}"))
        };
        if topic == &missing {
            expected_missing.push((key.clone(), payload.clone()));
        }
        sqlx::query("INSERT INTO outbox (topic, message_key, payload) VALUES ($1, $2, $3)")
            .bind(topic)
            .bind(key.as_bytes())
            .bind(payload.as_bytes())
            .execute(&pool)
            .await
            .expect("insert an outbox row");
    }
    let stop = CancellationToken::new();
    let relay = Relay::new(
        pool.clone(),
        config.clone(),
        &schema,
        RelayConfig::default(),
        FaultConfig::default(),
    )
    .expect("relay");
    let relay = tokio::spawn(relay.run(stop.clone()));

    eventually("the working topic's rows to go out", || async {
        rows_for(&pool, &working).await == 0
    })
    .await;
    assert_eq!(
        rows_for(&pool, &missing).await,
        15,
        "the missing topic's rows wait"
    );
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_parked")
        .fetch_one(&pool)
        .await
        .expect("count parked rows");
    assert_eq!(parked, 0, "a missing topic parks nothing");

    messaging::kafka::ensure_topics(&config, std::slice::from_ref(&missing))
        .await
        .expect("create the missing topic");
    eventually("the missing topic's rows to go out", || async {
        rows_for(&pool, &missing).await == 0
    })
    .await;
    let records = read_all(&missing, 15).await;
    // Every row is there; per key, the first copy of each row comes in the rows' order, and no
    // row comes before the first copy of the row ahead of it.
    for key in ["k0", "k1", "k2"] {
        let expected: Vec<&str> = expected_missing
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, p)| p.as_str())
            .collect();
        let mut firsts: Vec<String> = Vec::new();
        for (k, payload) in &records {
            let payload = String::from_utf8_lossy(payload).into_owned();
            if k.as_slice() == key.as_bytes() && !firsts.contains(&payload) {
                firsts.push(payload);
            }
        }
        assert_eq!(firsts, expected, "key {key}: {records:?}");
    }

    stop.cancel();
    relay.await.expect("relay task");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let _ = admin
        .delete_topics(&[&working, &missing], &AdminOptions::new())
        .await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .expect("drop schema");
}
