//! The participant SDK ([`sdk`]: a typed [`sdk::Step`] per saga step, a [`sdk::Participant`]
//! naming its steps and migrations, one generic [`sdk::main`]) and the services that do the
//! order saga's steps ([`inventory`], [`payment`], [`shipping`]) and the return saga's
//! ([`returns`], and `inventory` and `payment` again). Each service runs as its
//! own process (`src/bin/*.rs`) with its own schema.
//!
//! A service only says how to do and undo its steps inside a transaction; the runtime does the
//! rest: decoding, dedup, idempotency per (saga key, step), refusing a forward command that
//! comes after its compensation, replying through the outbox with the names the command
//! carries, dead-lettering what it cannot read.

pub mod config;
pub mod inventory;
pub mod payment;
pub mod returns;
mod runtime;
pub mod sdk;
pub mod shipping;

pub use config::ParticipantConfig;
pub use runtime::{LedgerOutcome, RUNTIME_MIGRATIONS};

/// `127.0.0.1:port`, where a participant binary serves `/metrics` unless `METRICS_ADDR` says
/// otherwise.
pub fn default_metrics_addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
