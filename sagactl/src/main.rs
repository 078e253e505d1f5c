//! `sagactl`: a command-line client of the saga engine.
//!
//! - `sagactl load` publishes `OrderPlaced` events to Kafka, as outside clients do, and
//!   measures each saga's end-to-end latency (order published → terminal event on
//!   `saga.events`) in the same process, so both ends read one clock.
//! - `sagactl chaos` runs the services as processes, kills them at random while sagas run, and
//!   checks the books afterwards.
//! - `sagactl ceiling broker|postgres` measures what the machine can do at most.
//! - `sagactl watchers` keeps many watch streams and emulated operations pages open against
//!   the HTTP API, to run beside `sagactl load`.
//! - `sagactl provision database`: the admin step that gives each service its own PostgreSQL
//!   role and schema.
//! - `sagactl generate`: the AsyncAPI channels and the compose services from the definitions.
//! - `sagactl start <saga_type>`: start a saga of any type from its trigger message.
//! - `sagactl order`, `return`, `watch`, `list`, `retry`, `skip`, `abort`: the operator's
//!   commands.

mod budget;
mod ceiling;
mod chaos;
mod conformance;
mod deployment;
mod generate;
mod load;
mod ops;
mod provision;
mod provision_kafka;
mod sse;
mod start;
mod watchers;
mod work;

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
    /// Start a saga of any type: publish its trigger message (JSON from --file or standard
    /// input, checked by the message's own rules) to the topic its newest definition names;
    /// prints the saga's key.
    Start(start::StartArgs),
    /// Place an order (or N random orders) on Kafka, optionally watching its saga.
    Order(ops::OrderArgs),
    /// Request a return of items of an order on Kafka (topic `returns`); prints its return id.
    Return(ops::ReturnArgs),
    /// Follow one saga (by saga or order id) live until it ends.
    Watch(ops::WatchArgs),
    /// List sagas, newest first, with filters.
    List(ops::ListArgs),
    /// Retry a failed saga's compensation, or a step that is waiting.
    Retry(ops::OperatorArgs),
    /// Mark a failed compensation as done by hand, and move on.
    Skip(ops::OperatorArgs),
    /// Stop a running saga and compensate what it did.
    Abort(ops::OperatorArgs),
    /// Publish orders and report throughput and end-to-end latency.
    Load(load::LoadArgs),
    /// Keep many watch streams and operations pages open on the HTTP API, and report what
    /// they saw (run beside `load` to measure what watchers cost).
    Watchers(watchers::WatchersArgs),
    /// Measure what the broker and PostgreSQL can do at most on this machine.
    #[command(subcommand)]
    Ceiling(ceiling::Ceiling),
    /// Run sagas while killing services at random, then check that nothing was lost or done
    /// twice.
    Chaos(Box<chaos::ChaosArgs>),
    /// The admin steps of a deployment: each service's PostgreSQL role and schema, and a
    /// secured Kafka cluster's topics and ACLs.
    #[command(subcommand)]
    Provision(provision::Provision),
    /// Delete every topic whose name starts with a prefix (a test run's, say).
    DeleteTopics(DeleteTopicsArgs),
    /// Write what follows from the saga definitions (sagas/*.toml) into the AsyncAPI document
    /// and the compose files; with --check, fail naming each file that differs instead.
    Generate(generate::GenerateArgs),
    /// Drive a running participant (in any language) through the message contract by its
    /// topics alone, and print PASS/FAIL per rule; non-zero exit status on any FAIL.
    Conformance(Box<conformance::ConformanceArgs>),
}

#[derive(clap::Args)]
struct DeleteTopicsArgs {
    /// The prefix; it must not be empty.
    #[arg(long)]
    prefix: String,
    #[command(flatten)]
    kafka: messaging::config::KafkaConnection,
}

/// Ends with the error that stopped the command, printed once with its causes.
#[tokio::main]
async fn main() -> Result<(), messaging::Report> {
    let cli = Cli::parse();
    let _telemetry = messaging::telemetry::init_tool("sagactl");
    Ok(run(cli.command).await?)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Start(args) => start::run(args).await,
        Command::Order(args) => ops::order(args).await,
        Command::Return(args) => ops::request_return(args).await,
        Command::Watch(args) => ops::watch(args).await,
        Command::List(args) => ops::list(args).await,
        Command::Retry(args) => ops::operate("retry", args).await,
        Command::Skip(args) => ops::operate("skip", args).await,
        Command::Abort(args) => ops::operate("abort", args).await,
        Command::Load(args) => load::run(args).await,
        Command::Watchers(args) => watchers::run(args).await,
        Command::Ceiling(which) => ceiling::run(which).await,
        Command::Chaos(args) => chaos::run(*args).await,
        Command::Provision(which) => provision::run(which).await,
        Command::Generate(args) => generate::run(args),
        Command::Conformance(args) => conformance::run(*args).await,
        Command::DeleteTopics(args) => {
            anyhow::ensure!(!args.prefix.is_empty(), "--prefix must not be empty");
            budget::delete_topics(&args.kafka, &args.prefix).await
        }
    }
}
