//! The outbox relay's LISTEN session through a link that fails the way a network does
//! ([`CutProxy`]): a listener whose connection went silent for good (the server ended the
//! session and its reset was lost) listens again within a bounded time, and a first LISTEN
//! on such a connection neither stalls the relay nor keeps it from listening. The poll is an
//! hour, so a row goes out within the tests' bounds only when a notification wakes the relay
//! (or when it starts listening and looks once).

use std::time::Duration;

use messaging::config::{DatabaseConfig, FaultConfig, RelayConfig};
use messaging::relay::Relay;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use testkit::{eventually_within, CutProxy, TestDatabase, TestTopics};
use tokio_util::sync::CancellationToken;

/// The deadline of the relay's database calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// A deaf listener is found within two call deadlines, and listening again takes one more:
/// this leaves room for a loaded machine, and is far below the poll.
const LISTENS_AGAIN_WITHIN: Duration = Duration::from_secs(12);

const SCHEMA: &str = "relay_listen";

/// The relay's settings: a poll that never comes within a test.
fn relay_config() -> RelayConfig {
    RelayConfig {
        outbox_poll_interval_ms: 3_600_000,
        ..RelayConfig::default()
    }
}

/// Writes one outbox row for `topic` and notifies the relays, as a service's commit does.
async fn write_row(direct: &PgPool, topic: &str, payload: &str) {
    let mut tx = direct.begin().await.expect("begin");
    sqlx::query("INSERT INTO outbox (topic, message_key, payload) VALUES ($1, 'k', $2)")
        .bind(topic)
        .bind(payload.as_bytes())
        .execute(&mut *tx)
        .await
        .expect("insert an outbox row");
    sqlx::query("SELECT pg_notify('outbox', $1)")
        .bind(SCHEMA)
        .execute(&mut *tx)
        .await
        .expect("notify");
    tx.commit().await.expect("commit");
}

async fn waiting_rows(direct: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(direct)
        .await
        .expect("count outbox rows")
}

/// Waits until the relay published every row, at most `limit`.
async fn published_within(direct: &PgPool, limit: Duration, what: &str) {
    eventually_within(limit, what, || async {
        (waiting_rows(direct).await == 0).then_some(())
    })
    .await;
}

/// The test's database, its schema's tables made through a direct pool; a proxy to the server;
/// and the URL of the database through the proxy.
struct Setup {
    _database: TestDatabase,
    direct: PgPool,
    proxy: CutProxy,
    proxied_url: String,
    topics: TestTopics,
    topic: String,
}

async fn setup(label: &str) -> Setup {
    let topics = TestTopics::new(label);
    let database = TestDatabase::create(label).await;
    let topic = topics.named("out");
    messaging::kafka::ensure_topics(&topics.kafka_config(1), std::slice::from_ref(&topic))
        .await
        .expect("create the topic");
    let (direct, _) = messaging::db::open(&database_config(database.url()), "unused", &[])
        .await
        .expect("the direct pool");
    let (proxy, proxied_url) = CutProxy::to_database(&database.url()).await;
    Setup {
        _database: database,
        direct,
        proxy,
        proxied_url,
        topics,
        topic,
    }
}

fn database_config(url: String) -> DatabaseConfig {
    DatabaseConfig {
        database_url: url,
        database_schema: Some(SCHEMA.to_owned()),
        database_max_connections: 3,
        database_call_timeout_ms: u64::try_from(CALL_TIMEOUT.as_millis()).unwrap_or(u64::MAX),
        ..DatabaseConfig::to("")
    }
}

fn relay(setup: &Setup, pool: PgPool) -> Relay {
    Relay::new(
        pool,
        setup.topics.kafka_config(1),
        SCHEMA,
        relay_config(),
        FaultConfig::default(),
    )
    .expect("relay")
    .with_call_timeout(CALL_TIMEOUT)
}

/// Whether a session of the test's database LISTENs, its last statement a `LISTEN` (what the
/// chaos run's check counts).
async fn listening_sessions(direct: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_one(direct)
    .await
    .expect("count the listening sessions")
}

/// A row written and notified now goes out promptly (the relay listens), and the relay stops.
async fn a_notified_row_goes_out_and_the_relay_stops(
    setup: &Setup,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<()>,
) {
    write_row(&setup.direct, &setup.topic, "notified").await;
    published_within(
        &setup.direct,
        Duration::from_secs(5),
        "the notified row to go out",
    )
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the relay stops")
        .expect("relay task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_connection_went_silent_for_good_listens_again() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let setup = setup("relay_listen_deaf").await;
    let (pool, _) = messaging::db::open(&database_config(setup.proxied_url.clone()), "unused", &[])
        .await
        .expect("the relay's pool, through the proxy");
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay(&setup, pool.clone()).run(stop.clone()));
    eventually_within(LISTENS_AGAIN_WITHIN, "the relay to listen", || async {
        (listening_sessions(&setup.direct).await == 1).then_some(())
    })
    .await;
    write_row(&setup.direct, &setup.topic, "before").await;
    published_within(
        &setup.direct,
        Duration::from_secs(5),
        "the notified row to go out",
    )
    .await;

    // Every connection through the proxy, the listener's among them, goes silent for good:
    // what a client sees when the server ended its sessions during a partition and the resets
    // were lost (or PostgreSQL restarted meanwhile).
    setup.proxy.strand();
    write_row(&setup.direct, &setup.topic, "while deaf").await;
    published_within(
        &setup.direct,
        LISTENS_AGAIN_WITHIN,
        "the relay to listen again and publish the row it was not told about",
    )
    .await;
    // And it hears the next notification.
    a_notified_row_goes_out_and_the_relay_stops(&setup, stop, running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_listen_on_a_silent_connection_is_bounded() {
    let setup = setup("relay_listen_first").await;
    // A pool that hands out its idle connection without testing it first, so the first LISTEN
    // goes on the connection that is silent.
    let options: PgConnectOptions = setup.proxied_url.parse().expect("the proxied URL");
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CALL_TIMEOUT)
        .test_before_acquire(false)
        .connect_with(options.options([("search_path", SCHEMA)]))
        .await
        .expect("the relay's pool, through the proxy");
    drop(
        pool.acquire()
            .await
            .expect("a connection, left idle in the pool"),
    );
    setup.proxy.strand();
    write_row(&setup.direct, &setup.topic, "waiting").await;

    let stop = CancellationToken::new();
    let running = tokio::spawn(relay(&setup, pool.clone()).run(stop.clone()));
    published_within(
        &setup.direct,
        LISTENS_AGAIN_WITHIN,
        "the relay to publish the waiting row despite its first LISTEN",
    )
    .await;
    eventually_within(LISTENS_AGAIN_WITHIN, "the relay to listen", || async {
        (listening_sessions(&setup.direct).await >= 1).then_some(())
    })
    .await;
    a_notified_row_goes_out_and_the_relay_stops(&setup, stop, running).await;
}

/// A row nobody announced (written by a process that crashed before waking its relay, or
/// without a `NOTIFY`) goes out at the next poll, through the poll's first look at whether
/// any row waits. The relay listens all along here, so only the poll can find the row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unannounced_row_goes_out_at_the_poll() {
    let setup = setup("relay_listen_poll").await;
    let relay = Relay::new(
        setup.direct.clone(),
        setup.topics.kafka_config(1),
        SCHEMA,
        RelayConfig {
            outbox_poll_interval_ms: 300,
            ..RelayConfig::default()
        },
        FaultConfig::default(),
    )
    .expect("relay")
    .with_call_timeout(CALL_TIMEOUT);
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone()));
    eventually_within(LISTENS_AGAIN_WITHIN, "the relay to listen", || async {
        (listening_sessions(&setup.direct).await == 1).then_some(())
    })
    .await;
    // Several polls find nothing first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sqlx::query("INSERT INTO outbox (topic, message_key, payload) VALUES ($1, 'k', 'quiet')")
        .bind(&setup.topic)
        .execute(&setup.direct)
        .await
        .expect("insert an outbox row without a notification");
    published_within(
        &setup.direct,
        Duration::from_secs(5),
        "the poll to find the unannounced row",
    )
    .await;
    a_notified_row_goes_out_and_the_relay_stops(&setup, stop, running).await;
}
