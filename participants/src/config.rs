//! Settings shared by every participant binary.

use clap::Args;
use messaging::config::{DatabaseConfig, KafkaConfig, RelayConfig};

#[derive(Debug, Clone, Args)]
pub struct ParticipantConfig {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub relay: RelayConfig,

    /// Consumer group of this service (default: `{TOPIC_PREFIX}{service}`).
    #[arg(long, env = "PARTICIPANT_GROUP")]
    pub group: Option<String>,
}
