//! The payment participant.
use clap::Parser;
use participants::payment::Payment;
use participants::ParticipantConfig;

#[derive(Parser)]
#[command(
    name = "payment",
    version,
    about = "Charges and refunds customers for order sagas."
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
        .get_or_insert(participants::default_metrics_addr(9182));
    let _telemetry = messaging::telemetry::init("payment");
    let shutdown = messaging::shutdown::on_signals();
    let service = participants::run(Payment, cli.config, shutdown.clone());
    messaging::shutdown::bounded(service, shutdown)
        .await
        .map_err(anyhow::Error::msg)
}
