//! A participant instance cut off from PostgreSQL but not from the broker (issue 23, fault 2):
//! it gives its partitions up after `DATABASE_GIVE_UP_AFTER_MS`, the other instance of the
//! service takes its work over, and it joins the group again once the link heals. The link is
//! cut by the test kit's proxy (`testkit::CutProxy`), which stops forwarding while keeping the
//! sockets open, as a partition that drops packets does: nothing fails, calls just get no
//! answer.
//!
//! Which instance charged an order is told by a trigger of the test's own on the payment
//! service's `payments` table, from the session's `application_name` (each instance's URL
//! names it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use testkit::{eventually_within, CutProxy};
use uuid::Uuid;

use crate::helpers::{order, Options, TestSystem};

/// The instances' `DATABASE_CALL_TIMEOUT_MS` and `DATABASE_GIVE_UP_AFTER_MS`: shorter than the
/// defaults (10 s and 15 s), so that the test takes seconds; the takeover takes as long again
/// as this give-up with the defaults.
const CALL_TIMEOUT_MS: u64 = 1_500;
const GIVE_UP_AFTER_MS: u64 = 4_000;

/// The takeover comes within this after the cut: the give-up, the group's rebalance (a few
/// seconds) and the first commands handled, with room for a loaded machine. Without giving up,
/// the cut-off instance keeps its partitions for librdkafka's max.poll.interval.ms (300 s), or
/// for ever while one of its statements hangs.
const TAKEOVER_BOUND: Duration = Duration::from_secs(30);

/// The instance through the proxy, and the direct one.
const CUT_OFF: &str = "payment_cut_off";
const DIRECT: &str = "payment_direct";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_its_database_gives_its_partitions_to_the_other_and_rejoins() {
    let mut system = TestSystem::start_with(Options {
        without: vec!["payment"],
        ..Default::default()
    })
    .await;
    let database_url = system.database_url().to_owned();
    let options: PgConnectOptions = database_url.parse().expect("the test database's URL");
    let upstream: SocketAddr = format!("{}:{}", options.get_host(), options.get_port())
        .parse()
        .expect("the server's address");
    let database = options.get_database().expect("a database").to_owned();
    let proxy = CutProxy::start(upstream).await;
    let urls = [
        (
            CUT_OFF,
            format!(
                "postgres://{}@{}/{database}?application_name={CUT_OFF}",
                options.get_username(),
                proxy.addr()
            ),
        ),
        (DIRECT, format!("{database_url}?application_name={DIRECT}")),
    ];
    for (_, url) in urls {
        system.start_participant_configured("payment", |config| {
            let database = &mut config.service.database;
            database.database_url = url;
            database.database_call_timeout_ms = CALL_TIMEOUT_MS;
            database.database_give_up_after_ms = GIVE_UP_AFTER_MS;
        });
    }
    system.wait_for_participants().await;
    let payment = system.schema("payment").await;
    note_who_charges(&payment).await;
    let mut placed = Vec::new();

    // Both instances have a partition (two per topic, range assignment): each charges orders.
    let started = Instant::now();
    while chargers(&payment, &placed).await != [CUT_OFF, DIRECT] {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "both instances charge orders within 60 s: {:?}",
            chargers(&payment, &placed).await
        );
        place_orders(&system, 6, &mut placed).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Cut: the orders placed from now on are all charged by the direct instance, those of the
    // cut-off instance's partition once it has given it up.
    proxy.cut();
    let cut_at = Instant::now();
    let mut during_cut = Vec::new();
    place_orders(&system, 16, &mut during_cut).await;
    let takeover = eventually_within(
        TAKEOVER_BOUND,
        "the direct instance to charge every order placed during the cut",
        || async {
            let charged = charged(&payment, &during_cut).await;
            (charged == during_cut.len()).then(|| cut_at.elapsed())
        },
    )
    .await;
    println!(
        "takeover: every order placed at the cut charged {} ms after it (give-up after {} ms, \
         calls bounded by {} ms)",
        takeover.as_millis(),
        GIVE_UP_AFTER_MS,
        CALL_TIMEOUT_MS
    );
    assert_eq!(
        chargers(&payment, &during_cut).await,
        [DIRECT],
        "only the instance that reaches the database charged during the cut"
    );
    placed.extend(&during_cut);

    // Heal: the cut-off instance joins the group again and takes a partition back.
    proxy.heal();
    let healed_at = Instant::now();
    let mut after_heal = Vec::new();
    while !chargers(&payment, &after_heal)
        .await
        .contains(&CUT_OFF.to_owned())
    {
        assert!(
            healed_at.elapsed() < Duration::from_secs(60),
            "the instance that was cut off charges orders again within 60 s of the heal"
        );
        place_orders(&system, 4, &mut after_heal).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "rejoined: the instance that was cut off charged again {} ms after the heal",
        healed_at.elapsed().as_millis()
    );
    placed.extend(&after_heal);

    // Every order completed, charged exactly once, nothing dead-lettered (a batch the cut-off
    // instance had in hand, handled again by the other, is absorbed, not refused).
    for order_id in &placed {
        let saga = system.finished_saga(*order_id).await;
        assert_eq!(saga["state"], "completed", "{saga}");
    }
    let charges: Vec<i64> = sqlx::query_scalar(
        "SELECT count(p.order_id) FROM UNNEST($1::uuid[]) AS o(id)
         LEFT JOIN payments p ON p.order_id = o.id GROUP BY o.id",
    )
    .bind(&placed)
    .fetch_all(&payment)
    .await
    .expect("charges");
    assert!(charges.iter().all(|n| *n == 1), "{charges:?}");
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM charged_by")
        .fetch_one(&payment)
        .await
        .expect("notes");
    assert_eq!(
        usize::try_from(notes).unwrap_or_default(),
        placed.len(),
        "one charge per order, by one instance"
    );
    let dead_lettered: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_lettered")
        .fetch_one(&payment)
        .await
        .expect("dead letters");
    assert_eq!(dead_lettered, 0, "nothing dead-lettered");

    // A graceful stop during an outage: nothing waits for the database for ever.
    proxy.cut();
    let mut last = Vec::new();
    place_orders(&system, 4, &mut last).await;
    tokio::time::sleep(Duration::from_millis(CALL_TIMEOUT_MS)).await;
    let stopping = Instant::now();
    payment.close().await;
    system.stop().await;
    println!(
        "stopped during a cut in {} ms",
        stopping.elapsed().as_millis()
    );
    drop(proxy);
}

/// Records, for each `payments` row inserted, the `application_name` of the session that
/// inserted it: the instance that charged the order.
async fn note_who_charges(payment: &PgPool) {
    for statement in [
        "CREATE TABLE charged_by (order_id uuid NOT NULL, instance text NOT NULL)",
        "CREATE FUNCTION note_charger() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO charged_by VALUES (NEW.order_id, current_setting('application_name'));
             RETURN NEW;
         END $$",
        "CREATE TRIGGER note_charger AFTER INSERT ON payments
         FOR EACH ROW EXECUTE FUNCTION note_charger()",
    ] {
        sqlx::query(statement)
            .execute(payment)
            .await
            .expect("the test's trigger");
    }
}

/// Places `count` orders (fresh ids, so they spread over the partitions), adding them to
/// `placed`.
async fn place_orders(system: &TestSystem, count: usize, placed: &mut Vec<Uuid>) {
    for _ in 0..count {
        let order = order("alice", "WIDGET", 1, "DE");
        system.place(&order).await;
        placed.push(order.order_id);
    }
}

/// The instances that charged any of `orders`, each once, in name order.
async fn chargers(payment: &PgPool, orders: &[Uuid]) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT DISTINCT instance FROM charged_by WHERE order_id = ANY($1) ORDER BY instance",
    )
    .bind(orders)
    .fetch_all(payment)
    .await
    .expect("chargers")
}

/// How many of `orders` were charged.
async fn charged(payment: &PgPool, orders: &[Uuid]) -> usize {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT order_id) FROM charged_by WHERE order_id = ANY($1)",
    )
    .bind(orders)
    .fetch_one(payment)
    .await
    .expect("charged");
    usize::try_from(count).unwrap_or_default()
}
