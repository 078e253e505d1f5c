//! Record headers as what they are on the wire: a name and a value of any bytes.
//!
//! Kafka puts no rule on a header's name or value, and clients of other languages send what
//! they like. rdkafka 0.39 reads a name as `&str` and panics on one that is not UTF-8
//! (`BorrowedHeaders::try_get`, which `Headers::get` and `iter` call): one such record killed
//! the service that consumed it, and killed it again on every start, since its offset was
//! never stored. So the engine reads headers only through [`raw`], which asks librdkafka for
//! the bytes and never decodes them, and [`with_any_bytes`] writes such headers for the tests,
//! the fuzzers and the chaos suite's garbage, which the safe API cannot.
//!
//! A name with a NUL byte reaches librdkafka's API only up to that byte (librdkafka hands names
//! out as C strings); nothing here depends on the rest of it.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr};
use std::marker::PhantomData;

use rdkafka::bindings as rdsys;
use rdkafka::message::{BorrowedHeaders, Headers, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;

/// One header of a record, borrowed from the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader<'a> {
    pub name: &'a [u8],
    /// `None` for a header sent with a null value.
    pub value: Option<&'a [u8]>,
}

impl RawHeader<'_> {
    /// The value as text, when it is valid UTF-8.
    pub fn text(&self) -> Option<&str> {
        self.value.and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// librdkafka's header list behind a `&BorrowedHeaders`. rdkafka hands out that reference as
/// the list's own address (a zero-sized type placed there), and every `Headers` method it has
/// reads the list through it; so does this.
fn native(headers: &BorrowedHeaders) -> *const rdsys::rd_kafka_headers_t {
    (headers as *const BorrowedHeaders).cast()
}

/// The header lists [`raw`] reads: a consumed record's, and one built here.
pub trait HeaderList {
    fn borrowed(&self) -> &BorrowedHeaders;
}

impl HeaderList for BorrowedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self
    }
}

impl HeaderList for OwnedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self.as_borrowed()
    }
}

/// Every header of a record, in the order they were sent, whatever bytes they hold.
pub fn raw(headers: &(impl HeaderList + ?Sized)) -> RawHeaders<'_> {
    let headers = headers.borrowed();
    RawHeaders {
        list: native(headers),
        count: headers.count(),
        next: 0,
        _headers: PhantomData,
    }
}

/// The iterator [`raw`] returns.
pub struct RawHeaders<'a> {
    list: *const rdsys::rd_kafka_headers_t,
    count: usize,
    next: usize,
    _headers: PhantomData<&'a BorrowedHeaders>,
}

impl<'a> Iterator for RawHeaders<'a> {
    type Item = RawHeader<'a>;

    fn next(&mut self) -> Option<RawHeader<'a>> {
        while self.next < self.count {
            let index = self.next;
            self.next += 1;
            let mut name: *const c_char = std::ptr::null();
            let mut value: *const c_void = std::ptr::null();
            let mut size = 0usize;
            // SAFETY: `list` is the live header list of the `&'a BorrowedHeaders` this iterator
            // borrows, `index` is below its count, and librdkafka writes the three pointers.
            let err = unsafe {
                rdsys::rd_kafka_header_get_all(self.list, index, &mut name, &mut value, &mut size)
            };
            if RDKafkaErrorCode::from(err) != RDKafkaErrorCode::NoError || name.is_null() {
                continue;
            }
            // SAFETY: librdkafka keeps each name NUL-terminated and each value `size` bytes
            // long, owned by the list, for as long as the list lives ('a).
            let header = unsafe {
                RawHeader {
                    name: CStr::from_ptr(name).to_bytes(),
                    value: (!value.is_null())
                        .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
                }
            };
            return Some(header);
        }
        None
    }
}

/// Headers librdkafka would not add (it refuses only a read-only list, which a new one is not).
#[derive(Debug, thiserror::Error)]
#[error("librdkafka refused a header: {0}")]
pub struct AddHeaderError(RDKafkaErrorCode);

/// Headers with names and values of any bytes (NUL, invalid UTF-8, any length), as a client of
/// another language may send them: for the tests, the fuzzers and the chaos suite's garbage.
///
/// # Errors
/// [`AddHeaderError`] when librdkafka refuses to add one.
pub fn with_any_bytes<'h>(
    headers: impl IntoIterator<Item = (&'h [u8], Option<&'h [u8]>)>,
) -> Result<OwnedHeaders, AddHeaderError> {
    let owned = OwnedHeaders::new();
    let list = native(owned.as_borrowed()).cast_mut();
    for (name, value) in headers {
        let (value_ptr, value_len) = match value {
            Some(v) => (v.as_ptr().cast::<c_void>(), v.len()),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `list` is the header list `owned` owns, writable since nothing else has it;
        // librdkafka copies the name and value, whose lengths are given.
        let err = unsafe {
            rdsys::rd_kafka_header_add(
                list,
                name.as_ptr().cast::<c_char>(),
                isize::try_from(name.len()).unwrap_or(isize::MAX),
                value_ptr,
                isize::try_from(value_len).unwrap_or(isize::MAX),
            )
        };
        let code = RDKafkaErrorCode::from(err);
        if code != RDKafkaErrorCode::NoError {
            return Err(AddHeaderError(code));
        }
    }
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(headers: &OwnedHeaders) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        raw(headers)
            .map(|h| (h.name.to_vec(), h.value.map(<[u8]>::to_vec)))
            .collect()
    }

    #[test]
    fn names_and_values_of_any_bytes_are_read_back_without_a_panic() {
        let huge = vec![0xffu8; 100_000];
        let sent: Vec<(&[u8], Option<&[u8]>)> = vec![
            (b"\xc3\x28", Some(b"invalid UTF-8 name")),
            (b"traceparent", Some(b"\xff\xfe")),
            (b"", None),
            (&huge, Some(&huge)),
            (b"plain", Some(b"")),
        ];
        let headers = with_any_bytes(sent.iter().copied()).expect("headers");
        let read = read(&headers);
        assert_eq!(read.len(), sent.len());
        for ((name, value), (sent_name, sent_value)) in read.iter().zip(&sent) {
            assert_eq!(name.as_slice(), *sent_name);
            assert_eq!(value.as_deref(), *sent_value);
        }
    }

    #[test]
    fn a_name_is_read_up_to_its_first_nul() {
        let headers = with_any_bytes([(&b"trace\0parent"[..], Some(&b"x"[..]))]).expect("headers");
        assert_eq!(
            read(&headers),
            vec![(b"trace".to_vec(), Some(b"x".to_vec()))]
        );
    }

    #[test]
    fn the_crate_s_own_reader_panics_on_such_a_name() {
        // Why this module exists: if rdkafka stops panicking here, `raw` may be retired.
        let headers = with_any_bytes([(&b"\xc3\x28"[..], None)]).expect("headers");
        let panicked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| headers.iter().count()))
                .is_err();
        assert!(panicked, "rdkafka's Headers::iter now reads any name");
    }
}
