//! Graceful shutdown: SIGINT or SIGTERM cancel one token that every loop watches.

use tokio_util::sync::CancellationToken;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight work");
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error.message = %e, "cannot listen for SIGTERM; only SIGINT stops");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// How long in-flight work may take after a shutdown signal before the process gives up on it.
pub const GRACE_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `service` to completion, but no longer than [`GRACE_PERIOD`] after `token` is
/// cancelled, so a stop request always ends the process in bounded time.
///
/// # Errors
/// The service's own error, or a message saying it did not stop within the grace period.
pub async fn bounded<F, E>(service: F, token: CancellationToken) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(service);
    tokio::select! {
        result = &mut service => return result.map_err(|e| e.to_string()),
        _ = token.cancelled() => {}
    }
    match tokio::time::timeout(GRACE_PERIOD, service).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "in-flight work did not finish within {} s of the stop signal",
            GRACE_PERIOD.as_secs()
        )),
    }
}
