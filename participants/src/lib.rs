//! The example domain's participants, built on the participant SDK (`participant_sdk`): the
//! services that do the order saga's steps ([`inventory`], [`payment`], [`shipping`]) and the
//! return saga's ([`returns`], and `inventory` and `payment` again). Each is a library module
//! (its steps and its [`participant_sdk::Participant`], which the end-to-end tests run
//! in-process) and runs as its own process (`src/bin/*.rs`) with its own schema.
//!
//! A service only says how to do and undo its steps inside a transaction; the SDK's runtime does
//! the rest: decoding, dedup, idempotency per (saga key, step), refusing a forward command that
//! comes after its compensation, replying through the outbox with the names the command
//! carries, dead-lettering what it cannot read.

pub mod inventory;
pub mod payment;
pub mod returns;
pub mod shipping;
