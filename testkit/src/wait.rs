//! Waiting for what the services under test do.

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 50 ms until it returns a value, for at most 60 seconds; `what` names
/// what the test waited for when it never comes.
///
/// # Panics
/// When 60 seconds pass first.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(Duration::from_secs(60), what, check).await
}

/// [`eventually`] with a limit of `limit`.
///
/// # Panics
/// When `limit` passes first.
pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
