//! Server-Sent Events, as `GET /sagas/{id}/watch` sends them, read from a body that arrives in
//! chunks of any size: what `sagactl watch` prints and what `sagactl watchers` counts.

/// The name given to a block of comments only (the server's keep-alive).
pub const KEEP_ALIVE: &str = "keep-alive";
/// An event larger than this ends the stream as an error (a saga's events are a few KB).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// One event: its `event:` name (`message` when it has none, [`KEEP_ALIVE`] for comments
/// only) and its `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub data: String,
}

/// Splits a Server-Sent Events body into events, whatever the chunks' boundaries.
#[derive(Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    /// How much of `buffer` has been searched for an event's end already.
    searched: usize,
}

impl SseParser {
    /// Takes the next bytes of the body and returns the events they complete. A block with
    /// neither data nor comments is no event (as a browser sees it).
    ///
    /// # Errors
    /// A message when more than 1 MiB arrives without an event's end.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        // Line ends may be \r\n; events end at a blank line.
        self.buffer.extend(bytes.iter().filter(|b| **b != b'\r'));
        let mut events = Vec::new();
        loop {
            let from = self.searched.saturating_sub(1);
            let Some(at) = self.buffer[from..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| p + from)
            else {
                self.searched = self.buffer.len();
                break;
            };
            let block: Vec<u8> = self.buffer.drain(..at + 2).collect();
            self.searched = 0;
            if let Some(event) = parse_block(&block) {
                events.push(event);
            }
        }
        if self.buffer.len() > MAX_EVENT_BYTES {
            return Err(format!(
                "an event longer than {MAX_EVENT_BYTES} bytes without its end"
            ));
        }
        Ok(events)
    }
}

fn parse_block(block: &[u8]) -> Option<SseEvent> {
    let text = String::from_utf8_lossy(block);
    let mut name = None;
    let mut data: Option<Vec<&str>> = None;
    let mut comment = false;
    for line in text.lines() {
        if line.starts_with(':') {
            comment = true;
            continue;
        }
        // `field: value`, or a field alone with an empty value.
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = Some(value.to_owned()),
            "data" => data.get_or_insert_with(Vec::new).push(value),
            _ => {}
        }
    }
    match data {
        Some(lines) => Some(SseEvent {
            name: name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "message".into()),
            data: lines.join("\n"),
        }),
        None if comment && name.is_none() => Some(SseEvent {
            name: KEEP_ALIVE.into(),
            data: String::new(),
        }),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn events_are_found_across_chunk_boundaries() {
        let body = b"event: saga\ndata: {\"a\":1}\n\nevent: history\ndata: {}\n\n:\n\nevent: end\ndata: {\"state\":\"completed\"}\n\n";
        for split in 0..body.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&body[..split]).unwrap_or_default();
            events.extend(parser.feed(&body[split..]).unwrap_or_default());
            assert_eq!(
                names(&events),
                ["saga", "history", KEEP_ALIVE, "end"],
                "split at {split}"
            );
            assert_eq!(events[0].data, "{\"a\":1}", "split at {split}");
        }
    }

    #[test]
    fn byte_by_byte_with_crlf_and_data_over_two_lines() {
        let body = b"event: saga\r\ndata: x\r\n\r\ndata: y\r\ndata: z\r\n\r\n";
        let mut parser = SseParser::default();
        let events: Vec<SseEvent> = body
            .iter()
            .flat_map(|b| parser.feed(&[*b]).unwrap_or_default())
            .collect();
        assert_eq!(names(&events), ["saga", "message"]);
        assert_eq!(events[1].data, "y\nz");
    }

    #[test]
    fn an_event_without_data_is_no_event() {
        assert_eq!(parse_block(b"event: saga\n\n"), None);
        assert_eq!(
            parse_block(b": ping\n\n").map(|e| e.name).as_deref(),
            Some(KEEP_ALIVE)
        );
        assert_eq!(
            parse_block(b": note\nevent: error\ndata: {}\n\n")
                .map(|e| e.name)
                .as_deref(),
            Some("error")
        );
    }

    #[test]
    fn parses_an_event_and_joins_multi_line_data_under_the_default_name() {
        assert_eq!(
            parse_block(b"event: saga\ndata: {\"a\":1}\n\n"),
            Some(SseEvent {
                name: "saga".into(),
                data: "{\"a\":1}".into()
            })
        );
        assert_eq!(
            parse_block(b": keep-alive\ndata: one\ndata: two\n\n"),
            Some(SseEvent {
                name: "message".into(),
                data: "one\ntwo".into()
            })
        );
    }

    #[test]
    fn an_endless_event_is_refused() {
        let mut parser = SseParser::default();
        let chunk = vec![b'x'; 64 * 1024];
        let mut refused = false;
        for _ in 0..20 {
            if parser.feed(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
    }
}
