//! The inbox when two instances handle one record at once, as when a partition moves from an
//! instance cut off from the database (issue 23, fault 2): its transaction may still be open
//! on the server, or even commit (the COMMIT sent, its answer lost), while the new owner
//! handles the same records. The new owner's inbox insert waits for that transaction and is
//! then absorbed (the record counts as handled) or goes on (the record is new): never a unique
//! violation, which the consume loop would take for a record to dead-letter.

use std::time::Duration;

use messaging::inbox::keep_first_deliveries;
use sqlx::{Connection, PgPool};
use testkit::TestDatabase;
use uuid::Uuid;

/// The schema `inbox` with the messaging tables; sessions bounded by `call_timeout`
/// (`DATABASE_CALL_TIMEOUT_MS`: [`messaging::db::session_settings`]).
async fn inbox_pool(database: &TestDatabase, call_timeout: Duration) -> PgPool {
    let pool = messaging::db::connect_with_deadline(&database.url(), "inbox", 3, call_timeout)
        .await
        .expect("database");
    messaging::db::migrate(&pool, "inbox", &[])
        .await
        .expect("migrate");
    pool
}

/// The fresh ones among `ids`, in a transaction of `tx`'s.
async fn first_deliveries(tx: &mut sqlx::PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<Uuid>> {
    let items: Vec<(Uuid, tracing::Span)> =
        ids.iter().map(|id| (*id, tracing::Span::none())).collect();
    let fresh = keep_first_deliveries(tx, items, |(id, span)| (*id, span)).await?;
    Ok(fresh.into_iter().map(|(id, _)| id).collect())
}

/// The other instance's transaction, open on the server, has the record; ours inserts it too,
/// concurrently, and returns only once that one ended: `end` commits or rolls it back.
async fn handled_concurrently(pool: &PgPool, commit_first: bool) -> Vec<Uuid> {
    let id = Uuid::new_v4();
    let mut first = pool.acquire().await.expect("connection");
    let mut first_tx = first.begin().await.expect("begin");
    assert_eq!(
        first_deliveries(&mut first_tx, &[id]).await.expect("first"),
        [id]
    );
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut connection = pool.acquire().await.expect("connection");
            let mut tx = connection.begin().await.expect("begin");
            let fresh = first_deliveries(&mut tx, &[id]).await;
            tx.commit().await.expect("commit");
            fresh
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second insert waits for the first"
    );
    if commit_first {
        first_tx.commit().await.expect("commit");
    } else {
        first_tx.rollback().await.expect("rollback");
    }
    second
        .await
        .expect("task")
        .expect("no error (no unique violation) in the second transaction")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_another_instance_handles_at_once_is_absorbed_or_handled_never_refused() {
    let database = TestDatabase::create("inbox_it").await;
    let pool = inbox_pool(&database, Duration::from_secs(10)).await;
    assert!(
        handled_concurrently(&pool, true).await.is_empty(),
        "the other committed: a redelivery, absorbed"
    );
    assert_eq!(
        handled_concurrently(&pool, false).await.len(),
        1,
        "the other rolled back: the record is new"
    );
}

/// The other instance was cut off inside its transaction: the server ends its session once
/// it has idled in the transaction for a call's deadline, and ours goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_client_went_silent_ends_and_lets_the_new_owner_handle_the_record() {
    let database = TestDatabase::create("inbox_it").await;
    let call_timeout = Duration::from_millis(500);
    let pool = inbox_pool(&database, call_timeout).await;
    let id = Uuid::new_v4();
    let mut silent = pool.acquire().await.expect("connection");
    let mut silent_tx = silent.begin().await.expect("begin");
    assert_eq!(
        first_deliveries(&mut silent_tx, &[id])
            .await
            .expect("first"),
        [id]
    );
    // The silent one sends nothing more; the new owner's insert waits for it, then goes on.
    let mut connection = pool.acquire().await.expect("connection");
    let mut tx = connection.begin().await.expect("begin");
    let fresh = tokio::time::timeout(call_timeout * 10, first_deliveries(&mut tx, &[id]))
        .await
        .expect("the server ended the silent transaction within a few deadlines")
        .expect("no error");
    tx.commit().await.expect("commit");
    assert_eq!(
        fresh,
        [id],
        "the silent transaction was rolled back: the record is new"
    );
    assert!(
        silent_tx.commit().await.is_err(),
        "the silent transaction's session was ended"
    );
}
