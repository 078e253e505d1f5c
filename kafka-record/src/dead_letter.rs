//! The dead-letter copy of a record: what it keeps of the record, and the headers that say why,
//! where from and who, bounded so that the copy can always be stored and sent.

use std::collections::BTreeMap;

use crate::Record;

/// Largest payload copied to the dead-letter topic. A record can be as large as the broker
/// takes (a Java client sends up to 1 MiB), more than this service's producer sends, and the
/// copy adds headers; the rest is cut off and `dlq.payload.original_bytes` says how much there
/// was.
pub const DEAD_LETTER_MAX_PAYLOAD: usize = 900 * 1024;
/// Largest key copied to the dead-letter topic.
pub const DEAD_LETTER_MAX_KEY: usize = 16 * 1024;
/// Longest rejection reason written to a header, in characters.
pub const DEAD_LETTER_MAX_REASON: usize = 2_000;
/// Longest `dlq.reason` header, in characters: [`DEAD_LETTER_MAX_REASON`] characters of the
/// reason, each control character among them escaped (`\u{9f}`, six, at the longest), and `...`
/// when it was cut.
pub const DEAD_LETTER_MAX_REASON_HEADER: usize = DEAD_LETTER_MAX_REASON * 6 + 3;
/// Longest source topic name written to a header, in characters (Kafka allows 249).
const DEAD_LETTER_MAX_TOPIC: usize = 256;

/// What the dead-letter topic gets of a rejected record; the consume loop sends it through the
/// outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCopy {
    /// The record's key, cut to [`DEAD_LETTER_MAX_KEY`].
    pub key: Option<Vec<u8>>,
    /// The record's payload, cut to [`DEAD_LETTER_MAX_PAYLOAD`].
    pub payload: Vec<u8>,
    /// `dlq.*`: why, where from, who and when; and how large the key and payload were when
    /// they were cut.
    pub headers: BTreeMap<String, String>,
}

/// The dead-letter copy of `record`, rejected by `consumer` for `reason`: its key and payload
/// (cut to the limits above), and headers saying why, where from and who. It can always be
/// stored and published, whatever bytes the record held: keys are stored as bytes, and header
/// text has no NUL.
pub fn dead_letter_copy(record: &Record, consumer: &str, reason: &str) -> DeadLetterCopy {
    let mut headers = BTreeMap::new();
    let mut payload = record.payload.as_slice();
    if payload.len() > DEAD_LETTER_MAX_PAYLOAD {
        headers.insert(
            "dlq.payload.original_bytes".to_owned(),
            payload.len().to_string(),
        );
        payload = &payload[..DEAD_LETTER_MAX_PAYLOAD];
    }
    let key = record.key.as_deref().map(|key| {
        if key.len() > DEAD_LETTER_MAX_KEY {
            headers.insert("dlq.key.original_bytes".to_owned(), key.len().to_string());
            &key[..DEAD_LETTER_MAX_KEY]
        } else {
            key
        }
    });
    for (name, value) in [
        // Readers drop a copy a relay published again after a crash by this id.
        ("dlq.id", uuid::Uuid::new_v4().to_string()),
        ("dlq.reason", header_text(reason, DEAD_LETTER_MAX_REASON)),
        (
            "dlq.source.topic",
            header_text(&record.topic, DEAD_LETTER_MAX_TOPIC),
        ),
        ("dlq.source.partition", record.partition.to_string()),
        ("dlq.source.offset", record.offset.to_string()),
        ("dlq.consumer", consumer.to_owned()),
        ("dlq.failed_at", chrono::Utc::now().to_rfc3339()),
    ] {
        headers.insert(name.to_owned(), value);
    }
    DeadLetterCopy {
        key: key.map(<[u8]>::to_vec),
        payload: payload.to_vec(),
        headers,
    }
}

/// `text` fit for a header stored as JSON text: NUL (which PostgreSQL refuses in text) and
/// other control characters escaped, at most `max_chars` characters.
fn header_text(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars));
    for (n, c) in text.chars().enumerate() {
        if n == max_chars {
            out.push_str("...");
            break;
        }
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_copy_fits_any_producer_and_any_text_column() {
        let hostile = Record {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: Some(vec![0; 100_000]),
            payload: vec![b'x'; 2_000_000],
            span: tracing::Span::none(),
        };
        let copy = dead_letter_copy(
            &hostile,
            "test",
            &format!("reason with NUL \0 and {}", "y".repeat(10_000)),
        );
        assert_eq!(copy.payload.len(), DEAD_LETTER_MAX_PAYLOAD);
        assert_eq!(copy.key.as_ref().map(Vec::len), Some(DEAD_LETTER_MAX_KEY));
        assert_eq!(copy.headers["dlq.payload.original_bytes"], "2000000");
        assert_eq!(copy.headers["dlq.key.original_bytes"], "100000");
        let reason = &copy.headers["dlq.reason"];
        assert!(
            !reason.contains('\0') && reason.contains("\\u{0}"),
            "{reason}"
        );
        assert!(
            reason.chars().count() < 2_100,
            "cut to about 2,000 characters"
        );
    }

    #[test]
    fn a_reason_of_control_characters_is_escaped_within_its_bound() {
        let record = Record {
            topic: "t\u{9f}\n".into(),
            partition: 0,
            offset: 1,
            key: None,
            payload: Vec::new(),
            span: tracing::Span::none(),
        };
        let copy = dead_letter_copy(&record, "test", &"\u{9f}".repeat(3_000));
        let reason = &copy.headers["dlq.reason"];
        assert_eq!(reason.chars().count(), DEAD_LETTER_MAX_REASON_HEADER);
        assert_eq!(copy.headers["dlq.source.topic"], "t\\u{9f}\\n");
        for value in copy.headers.values() {
            assert!(
                !value.chars().any(|c| c.is_control() && c != '\t'),
                "{value:?}"
            );
        }
    }
}
