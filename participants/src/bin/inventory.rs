//! The inventory participant.
use clap::Parser;
use participants::inventory::Inventory;
use participants::ParticipantConfig;

#[derive(Parser)]
#[command(
    name = "inventory",
    version,
    about = "Reserves and releases stock for order sagas."
)]
struct Cli {
    #[command(flatten)]
    config: ParticipantConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    cli.config
        .metrics_addr
        .get_or_insert(participants::default_metrics_addr(9181));
    let _telemetry = messaging::telemetry::init("inventory");
    let shutdown = messaging::shutdown::on_signals();
    let service = participants::run(Inventory, cli.config, shutdown.clone());
    messaging::shutdown::bounded(service, shutdown)
        .await
        .map_err(anyhow::Error::msg)
}
