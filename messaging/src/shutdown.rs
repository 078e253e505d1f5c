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

/// Why [`bounded`] ended a service with an error.
#[derive(Debug, thiserror::Error)]
pub enum Stopped<E: std::error::Error + 'static> {
    /// The service failed; its error, with its causes.
    #[error(transparent)]
    Failed(E),
    /// The service was still running this long after the stop signal.
    #[error("in-flight work did not finish within {} s of the stop signal", .0.as_secs())]
    GraceExceeded(std::time::Duration),
}

/// Runs `service` to completion, but no longer than [`GRACE_PERIOD`] after `token` is
/// cancelled, so a stop request always ends the process in bounded time.
///
/// # Errors
/// [`Stopped::Failed`] with the service's own error, or [`Stopped::GraceExceeded`].
pub async fn bounded<F, E>(service: F, token: CancellationToken) -> Result<(), Stopped<E>>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
{
    tokio::pin!(service);
    tokio::select! {
        result = &mut service => return result.map_err(Stopped::Failed),
        _ = token.cancelled() => {}
    }
    match tokio::time::timeout(GRACE_PERIOD, service).await {
        Ok(result) => result.map_err(Stopped::Failed),
        Err(_) => Err(Stopped::GraceExceeded(GRACE_PERIOD)),
    }
}
