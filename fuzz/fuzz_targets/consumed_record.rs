//! A consumed record as every consume loop reads it (`kafka_record`, under
//! `messaging::consumer::to_record`: the headers read as bytes, the record copied out, the trace
//! context taken from its headers), with any key, payload and headers: names and values of any
//! bytes (not UTF-8, NUL, empty, null, long), any number of them. Then the payload goes through
//! the decoders the handlers run on it: the trigger messages', the reply envelope's and the
//! command envelope's; and the record's dead-letter copy is made, with the payload as the
//! rejection's reason. Nothing may panic, the record keeps its bytes, a trace header is taken
//! only when the record carries it, as text within its bounds, and the dead-letter copy keeps
//! within its own.
//!
//! (Joining the trace, OpenTelemetry's parsing of an accepted header, is `messaging`'s and not
//! built here: this crate stays clear of the services' plumbing.)
#![no_main]

use arbitrary::Arbitrary;
use events::{Command, Envelope, Reply};
use kafka_record::dead_letter::{
    dead_letter_copy, DEAD_LETTER_MAX_KEY, DEAD_LETTER_MAX_PAYLOAD, DEAD_LETTER_MAX_REASON_HEADER,
};
use kafka_record::{acceptable_trace_header, to_record, trace_headers, TRACE_HEADERS};
use libfuzzer_sys::fuzz_target;
use rdkafka::message::{OwnedMessage, Timestamp};
use saga_core::definitions::TRIGGER_MESSAGES;

#[derive(Debug, Arbitrary)]
struct Input {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(HeaderName, Option<Vec<u8>>)>,
}

/// Mostly any bytes, but often a name the engine reads, so that their values get exercised.
#[derive(Debug, Arbitrary)]
enum HeaderName {
    Traceparent,
    Tracestate,
    Any(Vec<u8>),
}

impl HeaderName {
    fn bytes(&self) -> &[u8] {
        match self {
            HeaderName::Traceparent => b"traceparent",
            HeaderName::Tracestate => b"tracestate",
            HeaderName::Any(bytes) => bytes,
        }
    }
}

/// What librdkafka hands a consumer of a header name: the bytes up to the first NUL.
fn as_read(name: &[u8]) -> &[u8] {
    name.split(|b| *b == 0).next().unwrap_or_default()
}

fuzz_target!(|input: Input| {
    let Input {
        key,
        payload,
        headers,
    } = input;
    let Ok(owned) = kafka_record::headers::with_any_bytes(
        headers
            .iter()
            .map(|(name, value)| (name.bytes(), value.as_deref())),
    ) else {
        return;
    };
    let message = OwnedMessage::new(
        payload.clone(),
        key.clone(),
        "orders".to_owned(),
        Timestamp::NotAvailable,
        0,
        0,
        Some(owned),
    );

    let read: Vec<_> = kafka_record::headers::raw(message_headers(&message))
        .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(read.len(), headers.len(), "every header is read");
    for ((name, value), (sent_name, sent_value)) in read.iter().zip(&headers) {
        assert_eq!(name.as_slice(), as_read(sent_name.bytes()));
        assert_eq!(value, sent_value);
    }

    for (name, value) in trace_headers(&message) {
        assert!(
            TRACE_HEADERS.contains(&name.as_str()),
            "{name} is no trace header"
        );
        assert!(acceptable_trace_header(&name, &value));
        assert!(
            read.iter()
                .any(|(n, v)| n == name.as_bytes() && v.as_deref() == Some(value.as_bytes())),
            "{name} taken from no header of the record"
        );
    }

    let record = to_record(&message);
    assert_eq!(record.key, key);
    assert_eq!(record.payload, payload.unwrap_or_default());

    let reason = String::from_utf8_lossy(&record.payload);
    let copy = dead_letter_copy(&record, "fuzz", &reason);
    let original_bytes = |part: &str| copy.headers.get(&format!("dlq.{part}.original_bytes"));
    assert_cut(
        &copy.payload,
        &record.payload,
        DEAD_LETTER_MAX_PAYLOAD,
        original_bytes("payload"),
    );
    match (&copy.key, &record.key) {
        (Some(copy_key), Some(key)) => {
            assert_cut(copy_key, key, DEAD_LETTER_MAX_KEY, original_bytes("key"));
        }
        (None, None) => assert_eq!(original_bytes("key"), None),
        _ => panic!("the copy has a key exactly when the record has one"),
    }
    for (name, value) in &copy.headers {
        assert!(
            !value.chars().any(|c| c.is_control() && c != '\t'),
            "{name} holds a control character"
        );
    }
    assert!(copy.headers["dlq.reason"].chars().count() <= DEAD_LETTER_MAX_REASON_HEADER);
    assert_eq!(copy.headers["dlq.source.topic"], "orders");

    for known in TRIGGER_MESSAGES.iter() {
        let _ = (known.decode)(&record.payload);
    }
    if let Ok(envelope) = Envelope::<Reply>::from_json(&record.payload) {
        let _ = envelope.body.validate();
    }
    let _ = Envelope::<Command>::from_json(&record.payload);
});

/// `copy` is `original` cut to `max` bytes, and `original_bytes` (the copy's header) gives the
/// original's length exactly when it was cut.
fn assert_cut(copy: &[u8], original: &[u8], max: usize, original_bytes: Option<&String>) {
    assert_eq!(copy, &original[..original.len().min(max)]);
    let cut = (original.len() > max).then(|| original.len().to_string());
    assert_eq!(original_bytes, cut.as_ref());
}

fn message_headers(message: &OwnedMessage) -> &rdkafka::message::OwnedHeaders {
    use rdkafka::Message;
    message
        .headers()
        .expect("the record was built with headers")
}
