//! A consumed record as every consume loop reads it (`messaging::consumer::to_record`, which
//! reads the headers as bytes and takes the trace context from them), with any key, payload and
//! headers: names and values of any bytes (not UTF-8, NUL, empty, null, long), any number of
//! them. Then the payload goes through the decoders the handlers run on it: the trigger
//! messages', the reply envelope's and the command envelope's. Nothing may panic, the record
//! keeps its bytes, and a trace header is taken only when the record carries it, as text
//! within its bounds.
#![no_main]

use arbitrary::Arbitrary;
use events::{Command, Envelope, Reply};
use libfuzzer_sys::fuzz_target;
use messaging::consumer::{to_record, trace_headers};
use messaging::telemetry::{acceptable_trace_header, TRACE_HEADERS};
use saga_core::definitions::TRIGGER_MESSAGES;
use rdkafka::message::{OwnedMessage, Timestamp};

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
    let Ok(owned) = messaging::headers::with_any_bytes(
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

    let read: Vec<_> = messaging::headers::raw(message_headers(&message))
        .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(read.len(), headers.len(), "every header is read");
    for ((name, value), (sent_name, sent_value)) in read.iter().zip(&headers) {
        assert_eq!(name.as_slice(), as_read(sent_name.bytes()));
        assert_eq!(value, sent_value);
    }

    for (name, value) in trace_headers(&message) {
        assert!(TRACE_HEADERS.contains(&name.as_str()), "{name} is no trace header");
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

    for known in TRIGGER_MESSAGES.iter() {
        let _ = (known.decode)(&record.payload);
    }
    if let Ok(envelope) = Envelope::<Reply>::from_json(&record.payload) {
        let _ = envelope.body.validate();
    }
    let _ = Envelope::<Command>::from_json(&record.payload);
});

fn message_headers(message: &OwnedMessage) -> &rdkafka::message::OwnedHeaders {
    use rdkafka::Message;
    message.headers().expect("the record was built with headers")
}
