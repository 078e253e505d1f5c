//! The wire contract of the saga engine: every message that crosses Kafka, its JSON shape,
//! and the topics it travels on.
//!
//! This crate does no I/O. Services depend on it to agree on bytes; the golden files in
//! `events/golden/` pin the exact JSON of each message type.

mod envelope;
mod error;
mod messages;
mod order;
mod topics;

pub use envelope::{Envelope, SCHEMA_VERSION};
pub use error::{ContractError, Result};
pub use messages::{
    Action, Command, CompensationFailed, Outcome, Reply, SagaEvent, StepDone, StepName, StepRefused,
};
pub use order::{Address, LineItem, OrderPlaced};
pub use topics::{Participant, Topics};
