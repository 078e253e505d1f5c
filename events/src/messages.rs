//! Commands (orchestrator → participant), replies (participant → orchestrator) and saga
//! lifecycle events (orchestrator → anyone).
//!
//! Commands and replies are generic: the saga definition (`sagas/*.toml`) names the step, the
//! action and the replies, and supplies the payload; the engine knows no step by name. A
//! command carries the names of the replies that answer it, so a participant needs to know
//! only its own steps and their payloads. Every command and reply carries the saga's key and
//! the `attempt` it belongs to, so that the orchestrator can fence off replies to attempts it no
//! longer waits for.
//!
//! Decoding enforces every bound ([`Command`] and [`Reply`] deserialize through a check), so a
//! hostile record is refused with the field it breaks, never half-accepted.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{ContractError, Result};

/// The longest saga type, step, command or reply name: the same bound as the saga
/// definitions' names.
pub const MAX_NAME_LEN: usize = 64;

/// The longest saga key, in bytes. A key is a trigger message's field (an order id, say);
/// participants store it in their step ledger.
pub const MAX_KEY_LEN: usize = 256;

/// The longest failure reason a reply may carry, in bytes. Reasons are stored in the saga and
/// its history and sent on in saga events, so they are bounded like every stored text.
pub const MAX_REASON_LEN: usize = 2_000;

/// Whether `text` is a name on the wire: 1 to [`MAX_NAME_LEN`] characters of `A-Z a-z 0-9 _`.
pub fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_NAME_LEN
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `text` is a saga key on the wire: 1 to [`MAX_KEY_LEN`] bytes without control
/// characters (NUL among them, which PostgreSQL's text refuses).
pub fn is_key(text: &str) -> bool {
    !text.is_empty() && text.len() <= MAX_KEY_LEN && !text.chars().any(char::is_control)
}

fn check_name(field: &'static str, text: &str) -> Result<()> {
    if is_name(text) {
        Ok(())
    } else {
        Err(ContractError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _"),
        ))
    }
}

fn check_key(text: &str) -> Result<()> {
    if is_key(text) {
        Ok(())
    } else {
        Err(ContractError::invalid(
            "key",
            format!("must be 1 to {MAX_KEY_LEN} bytes without control characters"),
        ))
    }
}

fn check_attempt(attempt: u32) -> Result<()> {
    if attempt >= 1 {
        Ok(())
    } else {
        Err(ContractError::invalid("attempt", "must be at least 1"))
    }
}

/// Whether a command does a step or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Forward,
    Compensate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::Compensate => "compensate",
        }
    }
}

/// The replies that answer a command, copied from the saga definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyNames {
    /// Sent when the participant did what it was asked.
    pub success: String,
    /// Sent when it refused (a forward action) or could not undo the step this time (a
    /// compensation); `None` when the definition expects no refusal.
    pub failure: Option<String>,
}

/// What a participant is asked to do: `{"type": action name, "saga_type", "saga_version",
/// "step", "action", "attempt", "key", "replies": {"success", "failure"}, "payload": {...}}`
/// beside the envelope's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::Command")]
pub struct Command {
    /// The action's name in the definition, e.g. `ReserveStock`.
    #[serde(rename = "type")]
    pub name: String,
    /// The saga definition's name, e.g. `order`.
    pub saga_type: String,
    pub saga_version: u32,
    /// The step as the definition names it, e.g. `reserve_stock`.
    pub step: String,
    pub action: Action,
    /// 1 for the first command of a step (or of its compensation), one more for each re-send.
    pub attempt: u32,
    /// The saga's key: the trigger message's value at the definition's `trigger.key` (the
    /// order saga: the order id), as text.
    pub key: String,
    pub replies: ReplyNames,
    /// The definition's payload mapping applied to the trigger message. Its size is bounded by
    /// the record's (the consumer's fetch limit), its depth by the JSON parser's recursion
    /// limit.
    pub payload: Map<String, Value>,
}

impl Command {
    /// Checks what the types cannot: names, key and attempt within their bounds.
    ///
    /// # Errors
    /// `InvalidField` naming the first field out of bounds.
    pub fn validate(&self) -> Result<()> {
        check_name("type", &self.name)?;
        check_name("saga_type", &self.saga_type)?;
        if self.saga_version == 0 {
            return Err(ContractError::invalid("saga_version", "must be at least 1"));
        }
        check_name("step", &self.step)?;
        check_attempt(self.attempt)?;
        check_key(&self.key)?;
        check_name("replies.success", &self.replies.success)?;
        if let Some(failure) = &self.replies.failure {
            check_name("replies.failure", failure)?;
        }
        Ok(())
    }
}

/// How a step or compensation ended, as the participant reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed { reason: String },
}

/// A participant's answer to a command: `{"type": reply name, "saga_type", "step", "action",
/// "attempt", "key", "outcome": "succeeded"|"failed", "reason"}` beside the envelope's fields;
/// `reason` only when it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "wire::Reply", into = "wire::Reply")]
pub struct Reply {
    /// The reply name the command gave for this outcome.
    pub name: String,
    pub saga_type: String,
    pub step: String,
    pub action: Action,
    pub attempt: u32,
    pub key: String,
    pub outcome: Outcome,
}

impl Reply {
    /// The reply that says `command` was done.
    pub fn succeeded(command: &Command) -> Self {
        Self::answering(command, command.replies.success.clone(), Outcome::Succeeded)
    }

    /// The reply that says `command` was refused (a forward action) or could not be carried
    /// out (a compensation), with `reason` cut to [`MAX_REASON_LEN`] bytes and without NUL, so
    /// that it is always a valid reply. `None` when the command names no failure reply.
    pub fn failed(command: &Command, reason: &str) -> Option<Self> {
        let name = command.replies.failure.clone()?;
        let reason = bounded_reason(reason);
        Some(Self::answering(command, name, Outcome::Failed { reason }))
    }

    fn answering(command: &Command, name: String, outcome: Outcome) -> Self {
        Self {
            name,
            saga_type: command.saga_type.clone(),
            step: command.step.clone(),
            action: command.action,
            attempt: command.attempt,
            key: command.key.clone(),
            outcome,
        }
    }

    /// Checks what the types cannot: names, key and attempt within their bounds, and a
    /// failure reason of at most [`MAX_REASON_LEN`] bytes without NUL (PostgreSQL's text
    /// refuses it).
    ///
    /// # Errors
    /// `InvalidField` naming the first field out of bounds.
    pub fn validate(&self) -> Result<()> {
        check_name("type", &self.name)?;
        check_name("saga_type", &self.saga_type)?;
        check_name("step", &self.step)?;
        check_attempt(self.attempt)?;
        check_key(&self.key)?;
        if let Outcome::Failed { reason } = &self.outcome {
            if reason.len() > MAX_REASON_LEN {
                return Err(ContractError::invalid(
                    "reason",
                    format!("must be at most {MAX_REASON_LEN} bytes"),
                ));
            }
            if reason.contains('\0') {
                return Err(ContractError::invalid("reason", "must not contain NUL"));
            }
        }
        Ok(())
    }
}

/// `reason` without NUL and cut to at most [`MAX_REASON_LEN`] bytes at a character boundary.
fn bounded_reason(reason: &str) -> String {
    let mut bounded = reason.replace('\0', "\u{fffd}");
    if bounded.len() > MAX_REASON_LEN {
        let mut end = MAX_REASON_LEN;
        while !bounded.is_char_boundary(end) {
            end -= 1;
        }
        bounded.truncate(end);
    }
    bounded
}

/// The shapes as they are on the wire, checked on the way in.
mod wire {
    use super::{Action, Map, ReplyNames, Value};
    use serde::{Deserialize, Serialize};

    #[derive(Deserialize)]
    pub(super) struct Command {
        #[serde(rename = "type")]
        name: String,
        saga_type: String,
        saga_version: u32,
        step: String,
        action: Action,
        attempt: u32,
        key: String,
        replies: ReplyNames,
        payload: Map<String, Value>,
    }

    impl TryFrom<Command> for super::Command {
        type Error = crate::ContractError;

        fn try_from(wire: Command) -> crate::Result<Self> {
            let command = Self {
                name: wire.name,
                saga_type: wire.saga_type,
                saga_version: wire.saga_version,
                step: wire.step,
                action: wire.action,
                attempt: wire.attempt,
                key: wire.key,
                replies: wire.replies,
                payload: wire.payload,
            };
            command.validate()?;
            Ok(command)
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Outcome {
        Succeeded,
        Failed,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct Reply {
        #[serde(rename = "type")]
        name: String,
        saga_type: String,
        step: String,
        action: Action,
        attempt: u32,
        key: String,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    }

    impl TryFrom<Reply> for super::Reply {
        type Error = crate::ContractError;

        fn try_from(wire: Reply) -> crate::Result<Self> {
            let outcome = match (wire.outcome, wire.reason) {
                (Outcome::Succeeded, None) => super::Outcome::Succeeded,
                (Outcome::Failed, Some(reason)) => super::Outcome::Failed { reason },
                (Outcome::Succeeded, Some(_)) => {
                    return Err(crate::ContractError::invalid(
                        "reason",
                        "only a failed reply has a reason",
                    ))
                }
                (Outcome::Failed, None) => {
                    return Err(crate::ContractError::invalid(
                        "reason",
                        "a failed reply needs one",
                    ))
                }
            };
            let reply = Self {
                name: wire.name,
                saga_type: wire.saga_type,
                step: wire.step,
                action: wire.action,
                attempt: wire.attempt,
                key: wire.key,
                outcome,
            };
            reply.validate()?;
            Ok(reply)
        }
    }

    impl From<super::Reply> for Reply {
        fn from(reply: super::Reply) -> Self {
            let (outcome, reason) = match reply.outcome {
                super::Outcome::Succeeded => (Outcome::Succeeded, None),
                super::Outcome::Failed { reason } => (Outcome::Failed, Some(reason)),
            };
            Self {
                name: reply.name,
                saga_type: reply.saga_type,
                step: reply.step,
                action: reply.action,
                attempt: reply.attempt,
                key: reply.key,
                outcome,
                reason,
            }
        }
    }
}

/// A saga's lifecycle, published on `saga.events` for anyone who wants to follow along.
///
/// Every event names the saga's type and key, and carries `subject`: fields of the trigger
/// message, written beside them (flattened), so an order saga's events still say `order_id`
/// (and `SagaStarted` the customer, total and currency) as they always did. Which fields is the
/// trigger message's to say (its entry in [`crate::SAGA_TRIGGERS`]): `SagaStarted` a summary
/// of the message, the others the key's field alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload")]
pub enum SagaEvent {
    SagaStarted {
        /// Empty in an event written before saga types had names.
        #[serde(default)]
        saga_type: String,
        #[serde(default)]
        key: String,
        #[serde(flatten)]
        subject: Map<String, Value>,
    },
    SagaCompleted {
        #[serde(default)]
        saga_type: String,
        #[serde(default)]
        key: String,
        #[serde(flatten)]
        subject: Map<String, Value>,
    },
    SagaCompensated {
        #[serde(default)]
        saga_type: String,
        #[serde(default)]
        key: String,
        reason: String,
        #[serde(flatten)]
        subject: Map<String, Value>,
    },
    SagaFailed {
        #[serde(default)]
        saga_type: String,
        #[serde(default)]
        key: String,
        reason: String,
        #[serde(flatten)]
        subject: Map<String, Value>,
    },
}

impl SagaEvent {
    /// The key of the saga the event is about (the order saga: the order id).
    pub fn key(&self) -> &str {
        match self {
            Self::SagaStarted { key, .. }
            | Self::SagaCompleted { key, .. }
            | Self::SagaCompensated { key, .. }
            | Self::SagaFailed { key, .. } => key,
        }
    }

    /// The type of the saga the event is about.
    pub fn saga_type(&self) -> &str {
        match self {
            Self::SagaStarted { saga_type, .. }
            | Self::SagaCompleted { saga_type, .. }
            | Self::SagaCompensated { saga_type, .. }
            | Self::SagaFailed { saga_type, .. } => saga_type,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> Command {
        Command {
            name: "ReleaseStock".into(),
            saga_type: "order".into(),
            saga_version: 1,
            step: "reserve_stock".into(),
            action: Action::Compensate,
            attempt: 2,
            key: "7f1d2c3b-4a5e-4f60-8a71-9b0c1d2e3f40".into(),
            replies: ReplyNames {
                success: "StockReleased".into(),
                failure: Some("CompensationFailed".into()),
            },
            payload: Map::new(),
        }
    }

    #[test]
    fn a_failure_reason_is_bounded_to_stay_a_valid_reply() {
        let long = format!("{}é", "x".repeat(MAX_REASON_LEN - 1));
        let reply = Reply::failed(&command(), &format!("a\0b{long}")).expect("has a failure");
        assert_eq!(reply.validate(), Ok(()));
        let Outcome::Failed { reason } = &reply.outcome else {
            panic!("failed")
        };
        assert!(reason.len() <= MAX_REASON_LEN && reason.starts_with("a\u{fffd}b"));
        assert_eq!(reply.name, "CompensationFailed");
        assert_eq!((reply.attempt, reply.action), (2, Action::Compensate));
    }

    #[test]
    fn a_command_without_a_failure_reply_cannot_fail() {
        let mut command = command();
        command.replies.failure = None;
        assert_eq!(Reply::failed(&command, "no"), None);
        assert_eq!(Reply::succeeded(&command).name, "StockReleased");
    }

    #[test]
    fn names_and_keys_are_bounded() {
        assert!(is_name("reserve_stock") && is_name("ReserveStock") && is_name("a1"));
        assert!(!is_name("") && !is_name("reserve-stock") && !is_name(&"a".repeat(65)));
        assert!(is_key("42") && !is_key("") && !is_key("a\0b") && !is_key(&"k".repeat(257)));
        let mut bad = command();
        bad.step = "a b".into();
        assert!(matches!(
            bad.validate(),
            Err(ContractError::InvalidField { field: "step", .. })
        ));
        let mut bad = command();
        bad.attempt = 0;
        assert!(bad.validate().is_err());
    }

    /// A number of a trigger's subject (any JSON number a producer wrote) reads back as the
    /// same value after the engine wrote it again: serde_json's parser rounds exactly
    /// (`float_roundtrip`), where its default could land one unit in the last place away and
    /// change the value between the trigger and its saga's events (found by the
    /// `envelope_saga_event` fuzzer, with this record).
    #[test]
    fn a_subjects_number_survives_being_written_again() {
        let written = br#"{"message_id": "c1d2e3f4-a5b6-4c7d-8e9f-a0b1c2d3e4f5",
            "saga_id": "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3", "schema_version": 2,
            "occurred_at": "2026-11-26T12:00:00Z", "type": "SagaStarted",
            "payload": {"customer_id":
                -747777777777777777777777777777777777777777777777777777777777777799}}"#;
        let event = crate::Envelope::<SagaEvent>::from_json(written).expect("an event");
        let again = crate::Envelope::<SagaEvent>::from_json(&event.to_json()).expect("decodes");
        assert_eq!(again, event);
    }
}
