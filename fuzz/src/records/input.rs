//! What the fuzzer chooses: retry policies and a sequence of operations. Nothing here names a
//! saga type: trigger messages, steps and replies are picked by index among what the loaded
//! definitions hold ([`super::generate`]).

use arbitrary::Arbitrary;
use chrono::TimeDelta;
use saga_core::{OperatorAction, Registry, RetryPolicy};

use super::generate::DEFINITIONS;

#[derive(Debug, Arbitrary)]
pub struct Input {
    pub policies: PolicyInput,
    pub ops: Vec<Op>,
}

/// Retry policies as `RetryConfig::apply` sets them on a definition: a positive timeout, a
/// cap no shorter than it, at least one attempt. Small, so that budgets run out.
#[derive(Debug, Arbitrary)]
pub struct PolicyInput {
    timeout_ms: u16,
    max_timeout_ms: u32,
    forward_attempts: u8,
    compensation_attempts: u8,
}

impl PolicyInput {
    /// Every definition in `sagas/` with these policies: every forward action one, every
    /// compensation the other. A step that cannot be undone keeps no attempt limit
    /// (`u32::MAX`), as its definition says.
    pub fn registry(&self) -> Registry {
        let timeout_ms = 1 + i64::from(self.timeout_ms);
        let max_timeout_ms = timeout_ms.max(i64::from(self.max_timeout_ms % 600_000));
        let policy = |attempts: u8, modulo: u8| RetryPolicy {
            timeout: TimeDelta::milliseconds(timeout_ms),
            max_attempts: 1 + u32::from(attempts % modulo),
            max_timeout: TimeDelta::milliseconds(max_timeout_ms),
        };
        let forward = policy(self.forward_attempts, 8);
        let compensation = policy(self.compensation_attempts, 20);
        let definitions = DEFINITIONS
            .iter()
            .map(|definition| {
                let mut definition = definition.clone();
                for step in &mut definition.steps {
                    step.set_retry(forward, compensation);
                }
                definition
            })
            .collect();
        Registry::new(definitions).expect("the definitions with other retry policies load")
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Topic {
    /// A definition's trigger topic.
    Trigger(u8),
    Replies,
    /// A step's command topic, which the orchestrator writes but does not read.
    Command(u8),
}

#[derive(Debug, Arbitrary)]
pub enum Op {
    /// A record of arbitrary bytes.
    Raw {
        topic: Topic,
        payload: Vec<u8>,
    },
    /// A well-formed trigger message of a definition ([`super::generate::well_formed`]):
    /// its sample, keyed by one of a small set of ids (so duplicates happen, and one id keys
    /// sagas of several types), its other ids from the same set. `misrouted`: on the next
    /// definition's trigger topic instead of its own.
    Trigger {
        saga: u8,
        key: u8,
        ids: Vec<u8>,
        misrouted: bool,
    },
    /// A well-formed trigger message with its fields edited, which its contract may refuse.
    EditedTrigger {
        saga: u8,
        key: u8,
        ids: Vec<u8>,
        edits: Vec<Edit>,
        misrouted: bool,
    },
    /// A participant's answer to a command the saga sent (`back` counts from the latest).
    Answer {
        saga: u8,
        back: u8,
        ok: bool,
        reason: String,
        reuse_message_id: bool,
    },
    /// A reply for any step, direction and attempt, named as a definition names it or
    /// mislabelled.
    Forged {
        saga: u8,
        target: Target,
        reply: ReplyChoice,
        attempt: AttemptChoice,
        reuse_message_id: bool,
    },
    /// An earlier record, delivered again byte for byte.
    Redeliver {
        back: u8,
    },
    /// The deadline scanner's pass over every saga whose deadline passed.
    Scan {
        jitter: u16,
    },
    /// `on_deadline` on one saga, whether or not its deadline passed.
    Deadline {
        saga: u8,
        jitter: u16,
    },
    Operator {
        saga: u8,
        action: ActionInput,
    },
    Advance {
        ms: u32,
    },
    /// The clock moves to one saga's deadline.
    AdvanceToDeadline {
        saga: u8,
    },
}

/// A change to one field of a trigger message (the fields are its sample's, in order, list
/// elements included: [`super::generate::leaves`]).
#[derive(Debug, Arbitrary)]
pub enum Edit {
    Text {
        field: u8,
        text: String,
    },
    Integer {
        field: u8,
        value: i64,
    },
    /// The field removed.
    Remove {
        field: u8,
    },
    /// A list's first element repeated, `times` more.
    Repeat {
        list: u8,
        times: u8,
    },
}

/// Whom a forged reply is for.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Target {
    /// The picked saga, in its own definition's terms.
    Own,
    /// A saga that does not exist.
    UnknownSaga,
    /// The picked saga, with another key than its own.
    WrongKey,
    /// The picked saga, in the next definition's terms (its type, steps and reply names).
    OtherType,
}

/// Which reply a forged one is.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum ReplyChoice {
    /// An answer to what the saga waits on (the first step when it waits on nothing): its
    /// step and direction, saying `succeeded`, named as the definition names that outcome or
    /// (`mislabelled`, or when the definition names no such reply) as it names the other.
    Current { succeeded: bool, mislabelled: bool },
    /// Any reply the definition names ([`super::generate::named_replies`]), by index; one
    /// index more is a reply named for one outcome that says the other.
    Named(u8),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum AttemptChoice {
    Current,
    Previous,
    Next,
    Exact(u32),
}

#[derive(Debug, Arbitrary)]
pub enum ActionInput {
    Retry,
    Skip,
    Abort(String),
}

impl ActionInput {
    pub fn to_action(&self) -> OperatorAction {
        match self {
            Self::Retry => OperatorAction::Retry,
            Self::Skip => OperatorAction::Skip,
            Self::Abort(reason) => OperatorAction::Abort {
                reason: reason.clone(),
            },
        }
    }
}
