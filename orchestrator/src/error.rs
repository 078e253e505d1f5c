//! Errors of the orchestrator library. Each says its own layer's part; its causes are its
//! `source()` chain, printed once with [`messaging::chain`] (logs, `main`, and the texts that
//! leave the process: a dead-letter reason, a parked saga's reason, an HTTP error body).

use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Messaging(#[from] messaging::Error),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("saga {saga_id} was changed concurrently (expected version {expected})")]
    VersionConflict { saga_id: Uuid, expected: i64 },
    #[error("saga {saga_id} has an unreadable {column}")]
    CorruptRow {
        saga_id: Uuid,
        column: &'static str,
        #[source]
        source: CorruptColumn,
    },
    #[error("invalid saga definition")]
    Definition(#[from] crate::saga::definitions::DefinitionError),
    #[error("{file}: saga {name} version {version} is stored with other content; a changed definition needs a new version (running sagas keep the one they started on)")]
    DefinitionChanged {
        file: String,
        name: String,
        version: i32,
    },
    #[error("saga definition {name} v{version} is not stored")]
    UnknownDefinition { name: String, version: i32 },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    RetryOverride(#[from] crate::config::OverrideError),
    /// A message the engine made could not be encoded as JSON.
    #[error("encoding a message")]
    Encode(#[source] serde_json::Error),
    /// The OpenAPI document built into the binary could not be completed with this
    /// deployment's saga types and steps ([`crate::api::openapi_for`]).
    #[error("invalid configuration: openapi.json")]
    OpenApi(#[source] serde_json::Error),
    #[error("cannot read the API token file {}", path.display())]
    TokenFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid API token list")]
    TokenList(#[from] crate::auth::TokenListError),
    #[error(
        "no API tokens configured (API_TOKENS_FILE or API_TOKENS){}",
        if *open_requested {
            format!("; API_OPEN_ON_LOOPBACK is refused because the API listens on {http_addr}, not on loopback")
        } else {
            "; to run without them on loopback, set API_OPEN_ON_LOOPBACK=true".to_owned()
        }
    )]
    NoTokens {
        http_addr: std::net::SocketAddr,
        open_requested: bool,
    },
    #[error("the API would serve plain HTTP on {http_addr}, which is not loopback: bearer tokens would cross the network in the clear; set HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE, or HTTP_PLAIN_ALLOWED=true behind a TLS-terminating proxy")]
    PlainHttp { http_addr: std::net::SocketAddr },
    #[error("the API's TLS")]
    Tls(#[from] crate::api::tls::TlsError),
    #[error("HTTP server failed")]
    Http(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a column of a saga row does not read back.
#[derive(Debug, thiserror::Error)]
pub enum CorruptColumn {
    #[error("the trigger message is not a JSON object")]
    NotAnObject,
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl From<Error> for messaging::consumer::HandlerError {
    /// A concurrent update is worth another try; a row this build cannot read or a bad setting
    /// fails the same way every time, so the record goes to the dead-letter topic instead of
    /// blocking its partition. The error is kept as the cause.
    fn from(e: Error) -> Self {
        match e {
            Error::Database(db) | Error::Messaging(messaging::Error::Database(db)) => db.into(),
            Error::VersionConflict { .. } => Self::retry(e),
            other => Self::reject(other),
        }
    }
}
