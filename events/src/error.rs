//! Why a message does not satisfy the contract. The text of each variant is what lands in the
//! dead-letter topic, so it names the offending field.

/// A message that cannot be accepted as it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    /// Its text holds the cause's too (what the dead-letter reason and the API's answer have
    /// always said); `messaging::chain` does not print it twice.
    #[error("not valid JSON for this topic: {0}")]
    Malformed(#[source] Malformed),
    #[error("unsupported schema_version {found} (this build understands {supported})")]
    UnsupportedSchemaVersion { found: u16, supported: u16 },
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

/// Why bytes are not the message a topic carries.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    /// serde_json's own error: not JSON, or not this message's shape.
    #[error("{0}")]
    Json(#[source] serde_json::Error),
    /// JSON of this shape whose `type` tag names another message (or none).
    #[error("expected \"type\": \"{expected}\", got {found:?}")]
    OtherType {
        expected: String,
        found: Option<String>,
    },
}

/// Equal when they say the same: serde_json's error has no equality of its own, and what
/// tests compare is what a client or a dead letter is told.
impl PartialEq for Malformed {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Json(a), Self::Json(b)) => a.to_string() == b.to_string(),
            (
                Self::OtherType { expected, found },
                Self::OtherType {
                    expected: other_expected,
                    found: other_found,
                },
            ) => expected == other_expected && found == other_found,
            _ => false,
        }
    }
}

impl Eq for Malformed {}

pub type Result<T, E = ContractError> = std::result::Result<T, E>;

impl ContractError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }
}

impl From<serde_json::Error> for ContractError {
    fn from(error: serde_json::Error) -> Self {
        Self::Malformed(Malformed::Json(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain of causes from `error` on, as `messaging::chain` walks it (events does not
    /// depend on messaging).
    fn causes<'a>(
        error: &'a (dyn std::error::Error + 'static),
    ) -> Vec<&'a (dyn std::error::Error + 'static)> {
        std::iter::successors(Some(error), |e| e.source()).collect()
    }

    #[test]
    fn malformed_json_keeps_serdes_error_as_its_cause() {
        let json = serde_json::from_slice::<serde_json::Value>(b"{").expect_err("not JSON");
        let json_text = json.to_string();
        let error = crate::Envelope::<serde_json::Value>::from_json(b"{").expect_err("not JSON");
        // The text reads as it always did: the dead-letter reason and the API's answer.
        assert_eq!(
            error.to_string(),
            format!("not valid JSON for this topic: {json_text}")
        );
        let found = causes(&error)
            .into_iter()
            .find_map(|cause| cause.downcast_ref::<serde_json::Error>())
            .expect("serde_json's error among the causes");
        assert_eq!(found.to_string(), json_text);
        assert!(found.is_eof());
        // Each cause's text is already in its parent's: a chain that skips those prints
        // serde's text once.
        for pair in causes(&error).windows(2) {
            assert!(pair[0].to_string().contains(&pair[1].to_string()));
        }
    }

    #[test]
    fn another_messages_type_tag_is_malformed_with_its_own_cause() {
        let error = crate::order::expect_type(br#"{"type":"OrderShipped"}"#, "OrderPlaced")
            .expect_err("another message");
        let cause = std::error::Error::source(&error).expect("a cause");
        assert_eq!(
            cause.downcast_ref::<Malformed>(),
            Some(&Malformed::OtherType {
                expected: "OrderPlaced".into(),
                found: Some("OrderShipped".into()),
            })
        );
        assert_eq!(
            error.to_string(),
            r#"not valid JSON for this topic: expected "type": "OrderPlaced", got Some("OrderShipped")"#
        );
    }
}
