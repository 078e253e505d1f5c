//! The trace context among a record's headers, taken only within its bounds.

use std::collections::BTreeMap;

use rdkafka::Message;

use crate::headers::{self, HeaderList};

/// The Kafka/outbox headers that carry trace context.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Longest `tracestate` taken from a record. W3C Trace Context lets a platform drop a
/// `tracestate` longer than 512 characters; a longer one would otherwise be copied into every
/// message of the saga and could make them too large to publish.
const MAX_TRACESTATE: usize = 512;
/// Longest `traceparent` taken (version 00 has 55 characters; later versions may add fields).
const MAX_TRACEPARENT: usize = 128;

/// Whether a trace header from outside (a Kafka header, an HTTP header) is worth carrying on:
/// printable ASCII within the length limits. Others are dropped, and the work starts a trace
/// of its own.
pub fn acceptable_trace_header(name: &str, value: &str) -> bool {
    let max = match name {
        "traceparent" => MAX_TRACEPARENT,
        "tracestate" => MAX_TRACESTATE,
        _ => return false,
    };
    value.len() <= max && value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// The trace context among a record's headers. Headers are read as bytes ([`headers::raw`]):
/// any name and value a producer sent is read without a panic, and what is not a usable trace
/// header is passed over, as Kafka consumers pass over headers they do not know.
pub fn trace_headers<M: Message>(message: &M) -> BTreeMap<String, String>
where
    M::Headers: HeaderList,
{
    let mut found = BTreeMap::new();
    for header in message.headers().into_iter().flat_map(headers::raw) {
        let Some(name) = TRACE_HEADERS
            .iter()
            .find(|known| known.as_bytes() == header.name)
        else {
            continue;
        };
        if let Some(value) = header.text() {
            if acceptable_trace_header(name, value) {
                found.insert((*name).to_owned(), value.to_owned());
            }
        }
    }
    found
}
