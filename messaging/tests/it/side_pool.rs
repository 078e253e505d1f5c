//! A side pool's sessions (the orchestrator API's) have the main pool's bounds: a transaction
//! whose client was cut off in the middle lets its row locks go within a call deadline, so the
//! work that waits for those rows (the consume loop, for a saga row) goes on.

use std::time::Duration;

use messaging::config::DatabaseConfig;
use testkit::{eventually_within, CutProxy, TestDatabase};

const SCHEMA: &str = "side_pool";
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_side_pool_transaction_cut_off_in_the_middle_lets_its_locks_go() {
    let database = TestDatabase::create("side_pool").await;
    let (direct, _) = messaging::db::open(
        &DatabaseConfig {
            database_url: database.url(),
            database_schema: Some(SCHEMA.to_owned()),
            database_max_connections: 2,
            ..DatabaseConfig::to("")
        },
        "unused",
        &[],
    )
    .await
    .expect("the direct pool");
    sqlx::raw_sql("CREATE TABLE rows (id int PRIMARY KEY); INSERT INTO rows VALUES (1)")
        .execute(&direct)
        .await
        .expect("a row to lock");
    let (proxy, proxied_url) = CutProxy::to_database(&database.url()).await;
    let side = messaging::db::side_pool(
        &proxied_url,
        SCHEMA,
        1,
        (Duration::from_secs(3), CALL_TIMEOUT),
    )
    .expect("the side pool");

    let mut tx = side.begin().await.expect("begin on the side pool");
    sqlx::query("SELECT id FROM rows WHERE id = 1 FOR UPDATE")
        .execute(&mut *tx)
        .await
        .expect("lock the row");
    proxy.cut();
    // The row is locked now; within a few call deadlines the server ends the silent session.
    eventually_within(
        Duration::from_secs(10),
        "the cut-off transaction's lock to go",
        || async {
            sqlx::query("SELECT id FROM rows WHERE id = 1 FOR UPDATE NOWAIT")
                .execute(&direct)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    // Its connection is not given back (the link stays cut); the test ends with it.
    std::mem::forget(tx);
}
