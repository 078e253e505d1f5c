//! Errors of the plumbing, with the context an operator needs to find the cause, and the one
//! way an error is printed with its causes ([`chain`], [`Chain`], [`Report`]).
//!
//! Each error's text says only its own layer's part; its causes are its `source()` chain. The
//! chain is printed once, by the binaries' `main` ([`Report`]) and by the log lines that print
//! an error ([`Chain`]). Where an error's text goes on the wire (a dead-letter reason), it is
//! the chain's text too, so it reads as the message did when each layer embedded its cause.

use rdkafka::error::KafkaError;

/// Any error, as the cause of one of this workspace's typed errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `error` and its causes on one line, joined by `": "`. A library error that prints its
/// cause in its own text too (sqlx's, rdkafka's, some of std's) is not followed by that
/// cause again: a cause whose text the line already holds is passed over.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !part.is_empty() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// Prints an error with its causes ([`chain`]), for a log field:
/// `tracing::warn!(error.message = %Chain(&e), ...)`.
#[derive(Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&chain(self.0))
    }
}

/// What a binary's `main` returns: any error, printed with its causes on one line when the
/// process ends with it (`Error: ` and the [`chain`], as `main` prints an error's `Debug`).
pub struct Report(BoxError);

impl<E: Into<BoxError>> From<E> for Report {
    fn from(error: E) -> Self {
        Self(error.into())
    }
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&chain(self.0.as_ref()))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&chain(self.0.as_ref()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The service could not log in to PostgreSQL; `hint` names the setting to check. Its text
    /// holds the server's answer too (what an operator acts on, and what the role tests read);
    /// [`chain`] does not print it twice.
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
    #[error("migrating schema `{schema}` failed")]
    Migrate {
        schema: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("kafka error ({context})")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    /// The cluster's metadata gives no partitions for a topic (it is missing, or its
    /// metadata carries an error code).
    #[error("the cluster gives no partitions for topic `{topic}`{}", match code {
        Some(code) => format!(": {code}"),
        None => String::new(),
    })]
    PartitionCount {
        topic: String,
        code: Option<rdkafka::types::RDKafkaErrorCode>,
    },
    #[error("creating topic `{topic}` failed")]
    CreateTopic {
        topic: String,
        #[source]
        code: rdkafka::types::RDKafkaErrorCode,
    },
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
        #[source]
        refusal: crate::access::Refusal,
    },
    /// Topics the service needs do not exist and its identity may not create them.
    #[error("topics {topics:?} do not exist and {connection} may not create them; create them with the admin step (`sagactl provision kafka`)")]
    TopicsMissing {
        topics: Vec<String>,
        connection: String,
        #[source]
        code: rdkafka::types::RDKafkaErrorCode,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid configuration: DATABASE_URL does not parse")]
    DatabaseUrl(#[source] sqlx::Error),
    /// The password file `PGPASSFILE` names cannot be used (sqlx would silently ignore it).
    #[error("invalid configuration: the password file PGPASSFILE={file}")]
    PasswordFile {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The Kafka client properties file (`KAFKA_CLIENT_PROPERTIES`) cannot be read.
    #[error("the Kafka client properties in {} (KAFKA_CLIENT_PROPERTIES): cannot read it", file.display())]
    ClientPropertiesUnreadable {
        file: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o error")]
    Io(#[from] std::io::Error),
    /// A file could not be written: `action` is what was being done to it.
    #[error("{action} {}", path.display())]
    File {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A task that runs for the life of the process failed (it panicked, or was aborted).
    #[error("{task} failed")]
    TaskFailed {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A task that runs for the life of the process ended before it was told to stop.
    #[error("{task} stopped on its own")]
    TaskStopped { task: &'static str },
    #[error("fault injection: crashed after a commit")]
    InjectedCrash,
    /// A database call ran out of time ([`crate::db::DeadlineExceeded`]).
    #[error("database call")]
    Deadline(#[from] crate::db::DeadlineExceeded),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer that says only its own part, and one that prints its cause in its text too
    /// (as sqlx's and rdkafka's errors do).
    #[derive(Debug, thiserror::Error)]
    enum Layer {
        #[error("handling the record")]
        Own(#[source] std::io::Error),
        #[error("library error: {0}")]
        Embeds(#[source] std::io::Error),
    }

    fn io() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    #[test]
    fn a_chain_prints_every_cause_once() {
        assert_eq!(
            chain(&Layer::Own(io())),
            "handling the record: disk on fire"
        );
        assert_eq!(chain(&Layer::Embeds(io())), "library error: disk on fire");
        let outer = Error::Migrate {
            schema: "payment".into(),
            source: sqlx::migrate::MigrateError::VersionMissing(7),
        };
        let text = chain(&outer);
        assert_eq!(
            text,
            format!(
                "migrating schema `payment` failed: {}",
                sqlx::migrate::MigrateError::VersionMissing(7)
            )
        );
        assert_eq!(Chain(&outer).to_string(), text);
        // What `main` prints: the same line.
        assert_eq!(format!("{:?}", Report::from(outer)), text);
    }

    #[test]
    fn a_wrapped_error_keeps_its_cause() {
        let error = Error::PasswordFile {
            file: "/nowhere".into(),
            source: io(),
        };
        let cause = std::error::Error::source(&error).expect("a cause");
        assert!(cause.downcast_ref::<std::io::Error>().is_some());
        assert_eq!(
            chain(&error),
            "invalid configuration: the password file PGPASSFILE=/nowhere: disk on fire"
        );
    }
}
