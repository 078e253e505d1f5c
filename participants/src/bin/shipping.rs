//! The shipping participant.
use clap::Parser;
use participants::shipping::{Shipping, ShippingConfig};
use participants::ParticipantConfig;

#[derive(Parser)]
#[command(
    name = "shipping",
    version,
    about = "Schedules shipments for order sagas."
)]
struct Cli {
    #[command(flatten)]
    config: ParticipantConfig,
    #[command(flatten)]
    shipping: ShippingConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    cli.config
        .metrics_addr
        .get_or_insert(participants::default_metrics_addr(9183));
    let _telemetry = messaging::telemetry::init("shipping");
    let shutdown = messaging::shutdown::on_signals();
    let service = participants::run(Shipping::new(&cli.shipping), cli.config, shutdown.clone());
    messaging::shutdown::bounded(service, shutdown)
        .await
        .map_err(anyhow::Error::msg)
}
