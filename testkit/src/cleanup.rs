//! Clean-up that must run when a test ends, also when it failed: from `Drop`, which may run
//! inside the test's runtime (a test that returned) or outside any (a test that panicked and
//! unwound past its runtime), so it gets a thread and a runtime of its own.

use std::future::Future;

use sqlx::PgPool;

use crate::server_url;

/// Runs `cleanup` to its end on a thread and runtime of its own. Failures are the clean-up's
/// to report (on stderr): a test must not fail, nor panic twice, for what it leaves behind.
pub(crate) fn run<F>(cleanup: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let thread = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(cleanup),
            Err(e) => eprintln!("no runtime for a test's clean-up: {e}"),
        }
    });
    let _ = thread.join();
}

/// Runs `cleanup` ([`run`]) with a pool on the test server's `postgres` database as its
/// superuser; `what` says what could not be removed when the server cannot be reached.
pub(crate) fn as_admin<F, Fut>(what: String, cleanup: F)
where
    F: FnOnce(PgPool) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    run(async move {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{}/postgres", server_url()))
            .await;
        match admin {
            Ok(admin) => {
                cleanup(admin.clone()).await;
                admin.close().await;
            }
            Err(e) => eprintln!("cannot reach PostgreSQL to remove {what}: {e}"),
        }
    });
}
