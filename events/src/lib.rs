//! The wire contract of the saga engine: every message that crosses Kafka, its JSON shape,
//! and the topics it travels on.
//!
//! This crate does no I/O. Services depend on it to agree on bytes; the golden files in
//! `events/golden/` pin the exact JSON of each message type.

mod envelope;
mod error;
mod messages;
mod order;
mod returns;
mod topics;
mod triggers;
mod values;

#[cfg(feature = "schemas")]
pub mod schemas;

pub use envelope::{Envelope, SCHEMA_VERSION};

/// The JSON Schema the contract's schemas refer to (`common.schema.json#/$defs/...`).
pub const COMMON_SCHEMA: &str = include_str!("../contract/schemas/common.schema.json");
pub use error::{ContractError, Malformed, Result};
pub use messages::{
    is_key, is_name, Action, Command, Outcome, Reply, ReplyNames, SagaEvent, MAX_KEY_LEN,
    MAX_NAME_LEN, MAX_REASON_LEN,
};
pub use order::{Address, LineItem, OrderPlaced};
pub use returns::{ReturnItem, ReturnRequested};
pub use topics::Topics;
pub use triggers::{SagaTrigger, SAGA_TRIGGERS};
pub use values::{Cents, Currency, Line};
