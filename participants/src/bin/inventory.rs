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
    let cli = Cli::parse();
    messaging::telemetry::init();
    participants::run(Inventory, cli.config, messaging::shutdown::on_signals()).await?;
    Ok(())
}
