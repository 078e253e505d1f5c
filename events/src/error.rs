//! Why a message does not satisfy the contract. The text of each variant is what lands in the
//! dead-letter topic, so it names the offending field.

/// A message that cannot be accepted as it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    #[error("not valid JSON for this topic: {0}")]
    Malformed(String),
    #[error("unsupported schema_version {found} (this build understands {supported})")]
    UnsupportedSchemaVersion { found: u16, supported: u16 },
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

pub type Result<T, E = ContractError> = std::result::Result<T, E>;

impl ContractError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }
}
