//! The orchestrator's settings: flags or environment variables, each with a default.

use std::net::SocketAddr;

use clap::Parser;
use messaging::config::{DatabaseConfig, KafkaConfig, RelayConfig};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "orchestrator",
    version,
    about = "Drives order sagas over Kafka and serves their status over HTTP."
)]
pub struct Config {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub relay: RelayConfig,

    /// Address of the status HTTP API.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Consumer group of the orchestrators (default: `{TOPIC_PREFIX}orchestrator`). Instances in
    /// one group share the orders and replies between them by partition.
    #[arg(long, env = "ORCHESTRATOR_GROUP")]
    pub group: Option<String>,
}
