//! A consumed Kafka record read as bytes, whatever a producer put in it.
//!
//! Everything here is pure: no runtime, no TLS, no database, no OpenTelemetry. That is why it
//! is a crate of its own: the fuzz crate builds it (with sanitizers) without the services'
//! plumbing, and `messaging`'s consume loop builds on it.
//! - [`headers`]: a record's headers through librdkafka's C API, names and values as bytes
//!   (rdkafka's own reader panics on a name that is not UTF-8); the crate's one use of
//!   `unsafe`.
//! - [`Record`], [`to_record`]: the record copied out of the consumer's buffer, with the span
//!   it is handled in.
//! - [`trace`]: the trace headers among a record's headers, taken only within their bounds.
//! - [`dead_letter`]: the dead-letter copy of a record, bounded so that it can always be
//!   stored and sent.

pub mod dead_letter;
pub mod headers;
mod record;
pub mod trace;

pub use record::{to_record, Record};
pub use trace::{acceptable_trace_header, trace_headers, TRACE_HEADERS};
