//! A loop's kept connection (`messaging::db::KeptConnection`): the same session from call to
//! call, out of the pool's places, closed when not kept, replaced when old or broken.

use std::time::Duration;

use messaging::config::DatabaseConfig;
use messaging::db::KeptConnection;
use sqlx::PgPool;
use testkit::{eventually_within, TestDatabase};

/// A pool of `max_connections` on a database of the test's own.
async fn pool(database: &TestDatabase, max_connections: u32) -> PgPool {
    let (pool, _) = messaging::db::open(
        &DatabaseConfig {
            database_url: database.url(),
            database_schema: Some("kept".to_owned()),
            database_max_connections: max_connections,
            ..DatabaseConfig::to("")
        },
        "unused",
        &[],
    )
    .await
    .expect("the pool");
    pool
}

async fn backend_pid(connection: &mut sqlx::PgConnection) -> sqlx::Result<i32> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(connection)
        .await
}

/// Waits until the server has no session `pid` any more (`what` names it in the failure).
async fn session_ended(pool: &PgPool, pid: i32, what: &str) {
    eventually_within(Duration::from_secs(10), what, || async {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(pool)
                .await
                .expect("pg_stat_activity");
        (!exists).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_the_same_session_and_takes_none_of_the_pools_places() {
    let database = TestDatabase::create("kept_same").await;
    let pool = pool(&database, 1).await;
    let mut kept = KeptConnection::default();

    let mut connection = kept.take(&pool).await.expect("a connection");
    let first = backend_pid(&mut connection).await.expect("its pid");
    kept.keep(connection);
    // The pool's one place is free while the loop keeps its connection.
    let mut other = tokio::time::timeout(Duration::from_secs(5), pool.acquire())
        .await
        .expect("the pool hands out a connection while one is kept")
        .expect("a pooled connection");
    assert_ne!(backend_pid(&mut other).await.expect("its pid"), first);
    drop(other);

    let mut again = kept.take(&pool).await.expect("the kept connection");
    assert_eq!(backend_pid(&mut again).await.expect("its pid"), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_not_kept_is_closed_and_the_next_take_opens_another() {
    let database = TestDatabase::create("kept_closed").await;
    let pool = pool(&database, 2).await;
    let mut kept = KeptConnection::default();

    let mut connection = kept.take(&pool).await.expect("a connection");
    let first = backend_pid(&mut connection).await.expect("its pid");
    // In a transaction, as a failed call leaves it: the server ends it with the session.
    sqlx::query("BEGIN")
        .execute(&mut *connection)
        .await
        .expect("begin");
    drop(connection);
    session_ended(&pool, first, "the dropped connection's session to end").await;

    let mut next = kept.take(&pool).await.expect("a new connection");
    assert_ne!(backend_pid(&mut next).await.expect("its pid"), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_is_replaced_once_it_is_old() {
    let database = TestDatabase::create("kept_old").await;
    let pool = pool(&database, 2).await;
    let mut kept = KeptConnection::kept_at_most(Duration::from_millis(200));

    let mut connection = kept.take(&pool).await.expect("a connection");
    let first = backend_pid(&mut connection).await.expect("its pid");
    kept.keep(connection);
    let mut young = kept.take(&pool).await.expect("the kept connection");
    assert_eq!(backend_pid(&mut young).await.expect("its pid"), first);
    kept.keep(young);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut renewed = kept.take(&pool).await.expect("a new connection");
    assert_ne!(backend_pid(&mut renewed).await.expect("its pid"), first);
    session_ended(&pool, first, "the old connection's session to end").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_connection_the_server_ended_fails_one_call_and_the_next_gets_a_new_one() {
    let database = TestDatabase::create("kept_ended").await;
    let pool = pool(&database, 2).await;
    let mut kept = KeptConnection::default();

    let mut connection = kept.take(&pool).await.expect("a connection");
    let first = backend_pid(&mut connection).await.expect("its pid");
    kept.keep(connection);
    // As a database restart or an administrator would end it, while the loop waits.
    let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&pool)
        .await
        .expect("pg_terminate_backend");
    assert!(ended);
    session_ended(&pool, first, "the session to end").await;

    let mut broken = kept.take(&pool).await.expect("the kept connection");
    let error = backend_pid(&mut broken)
        .await
        .expect_err("the ended session cannot answer");
    let classified = messaging::consumer::HandlerError::from(error);
    assert!(
        matches!(
            classified,
            messaging::consumer::HandlerError::Unavailable(_)
        ),
        "an ended session is the database unavailable, not the record's fault: {classified:?}"
    );
    // The loop does not keep a connection whose call failed.
    drop(broken);

    let mut next = kept.take(&pool).await.expect("a new connection");
    assert_ne!(backend_pid(&mut next).await.expect("its pid"), first);
}
