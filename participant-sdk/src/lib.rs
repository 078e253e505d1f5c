//! The participant SDK: what a participant author writes, and the one entry point that runs it.
//!
//! A participant is its business logic, one [`Step`] impl per saga step it serves, plus its
//! migrations, described by a [`Participant`] and run by [`main`] (a binary) or [`run`] (a test):
//!
//! ```ignore
//! use participant_sdk::{NoSettings, Participant};
//!
//! fn main() -> Result<(), messaging::Report> {
//!     participant_sdk::main("Reserves and releases stock.", |_: NoSettings| {
//!         Participant::new("inventory", &MIGRATIONS).step(ReserveStock)
//!     })
//! }
//! ```
//!
//! The runtime (the private `runtime` module) does everything else, the same for every
//! participant: decoding commands and dead-lettering what it cannot read (a payload that does
//! not fit the step's typed request among them), inbox dedup, the step ledger (one forward
//! outcome per saga key and step, answered again on a repeat; compensation tombstones; a
//! forward command after its compensation refused; a compensation of a step never done here
//! succeeds doing nothing), replies through the outbox with the names the command carried,
//! batching, fault injection, metrics and graceful shutdown.
//!
//! Everything public is at the crate root (`participant_sdk::Step`, `participant_sdk::main`,
//! ...); the modules only sort the code.

mod config;
mod runtime;
mod sdk;

pub use config::{ParticipantConfig, STEP_LEDGER_RETENTION_SECS};
pub use runtime::{reply_envelope, LedgerOutcome, RUNTIME_MIGRATIONS};
pub use sdk::{main, run, NoSettings, Participant, Readiness, Request, Step, StepError};

/// `127.0.0.1:port`, where a participant binary serves `/metrics` unless `METRICS_ADDR` says
/// otherwise.
pub fn default_metrics_addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
