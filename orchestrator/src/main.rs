use clap::Parser;
use orchestrator::Config;

/// Ends with the error that stopped the orchestrator, printed once with its causes.
#[tokio::main]
async fn main() -> Result<(), messaging::Report> {
    let config = Config::parse();
    let _telemetry = messaging::telemetry::init("orchestrator");
    let shutdown = messaging::shutdown::on_signals();
    let listener = tokio::net::TcpListener::bind(config.http_addr).await?;
    messaging::shutdown::bounded(
        orchestrator::run(config, listener, shutdown.clone()),
        shutdown,
    )
    .await?;
    tracing::info!("orchestrator stopped");
    Ok(())
}
