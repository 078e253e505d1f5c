//! Kafka and PostgreSQL plumbing shared by the orchestrator and the participants.
//!
//! The pieces, in the order a message meets them:
//! - [`consumer`]: the at-least-once consume loop. It hands each record to a [`consumer::Handler`]
//!   inside one database transaction, sends what the handler rejects to the dead-letter topic,
//!   and stores the record's offset only after that transaction committed.
//! - [`inbox`]: the dedup table a handler writes a message id to, in the same transaction.
//! - [`outbox`]: where a handler writes the messages it wants to send, in the same transaction.
//! - [`relay`]: publishes the outbox with an idempotent producer and deletes rows only after
//!   the broker acknowledged them.
//! - [`retention`]: deletes inbox rows once they are older than any redelivery.
//! - [`headers`]: record headers read as bytes, whatever a producer put in them (from
//!   `kafka-record`, which also reads the record, its trace headers and its dead-letter copy).
//! - [`assignment`], [`partitioner`]: the partitions the consumer holds now, and the
//!   partition a key lands on, for work shared between instances by partition (the
//!   orchestrator's deadline scanner).
//! - [`kafka`], [`access`], [`db`]: client settings (a secured cluster's too), topic creation,
//!   pools, schemas and migrations.
//! - [`provision`]: the admin step that gives each service its own PostgreSQL role and schema.
//! - [`config`], [`telemetry`], [`metrics`], [`shutdown`]: the one way every binary loads
//!   settings, logs, traces, counts and stops.
//! - [`service`], [`supervisor`]: the one way every service assembles its parts (pipeline,
//!   sweeps, servers) and runs them: the first that fails stops them all, with its reason.
//! - [`Error`], [`chain`], [`Report`]: typed errors that keep their causes, printed once.
//!
//! No handler talks to Kafka directly: everything it sends goes through the outbox.

pub mod access;
pub mod assignment;
pub mod backoff;
pub mod config;
pub mod consumer;
pub mod db;
mod error;
pub mod health;
pub mod inbox;
pub mod kafka;
pub mod lag;
pub mod metrics;
pub mod outbox;
pub mod partitioner;
pub mod pipeline;
pub mod provision;
pub mod relay;
pub mod retention;
pub mod service;
pub mod shutdown;
pub mod stall;
pub mod supervisor;
pub mod telemetry;

pub use error::{chain, BoxError, Chain, Error, Report, Result};
/// Record headers read as bytes: [`kafka_record::headers`], a crate of its own so that the
/// fuzz crate reads records without the plumbing.
pub use kafka_record::headers;
