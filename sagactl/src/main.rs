//! `sagactl`: a command-line client of the saga engine.
//!
//! - `sagactl load` publishes `OrderPlaced` events to Kafka, as outside clients do, and
//!   measures each saga's end-to-end latency (order published → terminal event on
//!   `saga.events`) in the same process, so both ends read one clock.
//! - `sagactl chaos` runs the services as processes, kills them at random while sagas run, and
//!   checks the books afterwards.

mod chaos;
mod load;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sagactl",
    version,
    about = "Command-line client of the saga engine."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish orders and report throughput and end-to-end latency.
    Load(load::LoadArgs),
    /// Run sagas while killing services at random, then check that nothing was lost or done
    /// twice.
    Chaos(chaos::ChaosArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    messaging::telemetry::init();
    match cli.command {
        Command::Load(args) => load::run(args).await,
        Command::Chaos(args) => chaos::run(args).await,
    }
}
