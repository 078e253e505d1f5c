//! The outbox relay with a destination that does not exist yet: the other destinations' rows
//! go out meanwhile, nothing is parked, and once the topic exists its rows go out with every
//! key's rows in order.

use std::time::Duration;

use messaging::config::{DatabaseConfig, FaultConfig, RelayConfig};
use messaging::relay::Relay;
use rdkafka::Message;
use sqlx::PgPool;
use testkit::{eventually, read_from_start, TestDatabase, TestTopics};
use tokio_util::sync::CancellationToken;

async fn rows_for(pool: &PgPool, topic: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = $1")
        .bind(topic)
        .fetch_one(pool)
        .await
        .expect("count outbox rows")
}

/// Every record of `topic` as (key, payload), partition by partition, each in offset order:
/// `expected` of them, and a little longer, for copies published twice (a probe's copy, a
/// record that outlived its wait): they may follow, and must not come first.
async fn read_all(topic: &str, expected: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    read_from_start(topic, expected, Duration::from_millis(500))
        .await
        .iter()
        .map(|message| {
            (
                message.key().unwrap_or_default().to_vec(),
                message.payload().unwrap_or_default().to_vec(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_holds_up_only_its_own_rows_which_then_go_out_in_order_per_key() {
    // Both removed when the test ends, passed or not.
    let prefix = TestTopics::new("relay-test");
    let database = TestDatabase::create("relay_it").await;
    let (working, missing) = (prefix.named("working"), prefix.named("missing"));
    let config = prefix.kafka_config(2);
    messaging::kafka::ensure_topics(&config, std::slice::from_ref(&working))
        .await
        .expect("create the working topic");
    let schema = "relay".to_owned();
    let (pool, _) = messaging::db::open(
        &DatabaseConfig {
            database_url: database.url(),
            database_schema: Some(schema.clone()),
            database_max_connections: 3,
            ..DatabaseConfig::to("")
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
        (rows_for(&pool, &working).await == 0).then_some(())
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
        (rows_for(&pool, &missing).await == 0).then_some(())
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
    pool.close().await;
}
