//! Errors of the plumbing, with the context an operator needs to find the cause.

use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The service could not log in to PostgreSQL; `hint` names the setting to check.
    #[error("cannot connect to PostgreSQL as role `{role}`: {hint}: {source}")]
    Connect {
        role: String,
        hint: String,
        #[source]
        source: sqlx::Error,
    },
    /// The service's schema is missing and its role may not create it.
    #[error(
        "schema `{schema}` does not exist and role `{role}` may not create it: run the admin \
         step first (`sagactl provision database`, README.md \"Roles, TLS and passwords\"), \
         which creates it owned by the service's role"
    )]
    SchemaMissing {
        schema: String,
        role: String,
        #[source]
        source: sqlx::Error,
    },
    /// The service's schema exists but its role may not create tables in it.
    #[error(
        "role `{role}` may not create tables in schema `{schema}` (it is neither the owner nor \
         granted USAGE and CREATE): run the admin step `sagactl provision database`, which \
         hands each service's schema to its role"
    )]
    SchemaNotWritable { schema: String, role: String },
    #[error("migrating schema `{schema}` failed: {source}")]
    Migrate {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("kafka error ({context}): {source}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    #[error("creating topic `{topic}` failed: {reason}")]
    CreateTopic { topic: String, reason: String },
    /// The Kafka client properties file (`KAFKA_CLIENT_PROPERTIES`) cannot be used.
    #[error("the Kafka client properties in {} (KAFKA_CLIENT_PROPERTIES): {reason}", file.display())]
    ClientProperties {
        file: std::path::PathBuf,
        reason: String,
    },
    /// The Kafka cluster refuses this process for good: its credentials, its certificates, or
    /// an ACL it needs.
    #[error("the Kafka cluster refuses {connection}: {refusal}")]
    AccessRefused {
        connection: String,
        refusal: crate::access::Refusal,
    },
    /// Topics the service needs do not exist and its identity may not create them.
    #[error("topics {topics:?} do not exist and {connection} may not create them ({reason}); create them with the admin step (`sagactl provision kafka`)")]
    TopicsMissing {
        topics: Vec<String>,
        connection: String,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A part of the process that runs for the life of the process ended early.
    #[error("{0}")]
    TaskEnded(String),
    #[error("fault injection: crashed after a commit")]
    InjectedCrash,
    /// The consumer received nothing while its partitions held records for it (see
    /// [`crate::stall`]): the pipeline replaces it.
    #[error("the consumer is stuck: {0}")]
    ConsumerStuck(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> Self {
        let context = context.into();
        move |source| Self::Kafka { context, source }
    }
}
