//! Data representations of §1.5: the reader over a packet body, the writer, and the validated
//! string types (`Utf8Str`, `TopicName`, `TopicFilter`) that keep slices of the input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::CodecError;
use super::fixed::MAX_REMAINING_LENGTH;

/// A UTF-8 encoded string (§1.5.4): valid UTF-8, no U+0000, at most 65,535 bytes. It is a slice
/// of the received packet, not a copy.
///
/// INVARIANT: the bytes were validated by [`Utf8Str::new`]; fields are private so no other path
/// builds one. `as_str` re-runs `std::str::from_utf8` (no `unsafe` in this workspace), which
/// cannot fail given the invariant and costs about a nanosecond per byte on short topics; the hot
/// path can match on [`Utf8Str::as_bytes`] instead.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Utf8Str(Bytes);

impl Utf8Str {
    /// Validates `bytes` as an MQTT UTF-8 string.
    pub fn new(bytes: Bytes) -> Result<Self, CodecError> {
        Self::validate(bytes, "string", "string")
    }

    fn validate(
        bytes: Bytes,
        packet: &'static str,
        field: &'static str,
    ) -> Result<Self, CodecError> {
        // The length is checked first (in `validate_text`, again): a too-long string is
        // reported as too long whatever its bytes.
        if bytes.len() <= usize::from(u16::MAX) && std::str::from_utf8(&bytes).is_err() {
            return Err(CodecError::InvalidUtf8 { packet, field });
        }
        Self::validate_text(bytes, packet, field)
    }

    /// [`Utf8Str::validate`] for bytes that are UTF-8 already (copied from a `str`).
    fn validate_text(
        bytes: Bytes,
        packet: &'static str,
        field: &'static str,
    ) -> Result<Self, CodecError> {
        if bytes.len() > usize::from(u16::MAX) {
            return Err(CodecError::TooLongToEncode {
                packet,
                field,
                len: bytes.len(),
            });
        }
        if bytes.contains(&0) {
            return Err(CodecError::NulCharacter { packet, field });
        }
        Ok(Self(bytes))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Utf8Str {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Utf8Str {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topic name (§4.7): a [`Utf8Str`] without the wildcards `+` and `#`. It may be empty only in
/// an MQTT 5 PUBLISH that carries a Topic Alias, which the decoder checks.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct TopicName(Utf8Str);

impl TopicName {
    pub fn new(bytes: Bytes) -> Result<Self, CodecError> {
        Self::validate(
            Utf8Str::validate(bytes, "publish", "topic name")?,
            "publish",
        )
    }

    fn validate(s: Utf8Str, packet: &'static str) -> Result<Self, CodecError> {
        if let Some(&w) = s.0.iter().find(|&&b| b == b'+' || b == b'#') {
            return Err(CodecError::WildcardInTopic {
                packet,
                wildcard: char::from(w),
            });
        }
        Ok(Self(s))
    }

    /// Validates `text`, taking it without a copy (the broker's own event topics, once per
    /// event): only the MQTT rules are checked, a `String` being UTF-8 already.
    pub fn from_string(text: String) -> Result<Self, CodecError> {
        Self::validate(
            Utf8Str::validate_text(Bytes::from(text), "publish", "topic name")?,
            "publish",
        )
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_utf8(&self) -> &Utf8Str {
        &self.0
    }
}

impl std::fmt::Debug for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

/// A topic filter (§4.7.1): non-empty; `#` only as a whole last level; `+` only as a whole level.
/// A shared subscription `$share/{group}/{filter}` (§4.8.2) needs a group without wildcards and
/// a non-empty filter; the decoder accepts it in both versions (in 3.1.1 it is an ordinary filter).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter(Utf8Str);

impl TopicFilter {
    pub fn new(bytes: Bytes) -> Result<Self, CodecError> {
        Self::validate(
            Utf8Str::validate(bytes, "subscribe", "topic filter")?,
            "subscribe",
        )
    }

    fn validate(s: Utf8Str, packet: &'static str) -> Result<Self, CodecError> {
        let invalid = |reason| CodecError::InvalidTopicFilter {
            packet,
            filter: s.as_str().to_owned(),
            reason,
        };
        let bytes: &[u8] = s.as_bytes();
        if bytes.is_empty() {
            return Err(invalid("a topic filter must not be empty"));
        }
        let mut filter = bytes;
        if let Some(rest) = bytes.strip_prefix(b"$share/") {
            let Some(slash) = rest.iter().position(|&b| b == b'/') else {
                return Err(invalid(
                    "a shared subscription needs `$share/{group}/{filter}`",
                ));
            };
            let (group, tail) = rest.split_at(slash);
            if group.is_empty() || group.iter().any(|&b| b == b'+' || b == b'#') {
                return Err(invalid(
                    "the share name must be non-empty and without wildcards",
                ));
            }
            filter = tail.get(1..).unwrap_or_default();
            if filter.is_empty() {
                return Err(invalid(
                    "a shared subscription needs a filter after the share name",
                ));
            }
        }
        let mut levels = filter.split(|&b| b == b'/').peekable();
        while let Some(level) = levels.next() {
            let last = levels.peek().is_none();
            if level.contains(&b'#') && (level != b"#" || !last) {
                return Err(invalid("`#` must be a whole level and the last one"));
            }
            if level.contains(&b'+') && level != b"+" {
                return Err(invalid("`+` must be a whole level"));
            }
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_bytes()
    }

    pub fn as_utf8(&self) -> &Utf8Str {
        &self.0
    }

    /// `$share/{group}/…`: No Local must not be set on it (MQTT 5 §3.8.3.1).
    pub fn is_shared(&self) -> bool {
        self.as_bytes().starts_with(b"$share/")
    }
}

impl std::fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

/// Validates a copy of `s` (for literals, configuration and tests; decoding never copies).
impl std::str::FromStr for Utf8Str {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, CodecError> {
        Self::new(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// Validates a copy of `s` (for literals, configuration and tests; decoding never copies).
impl std::str::FromStr for TopicName {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, CodecError> {
        // A `str` is UTF-8: only the MQTT rules are checked (the broker's own event topics
        // come this way, once per event).
        Self::validate(
            Utf8Str::validate_text(
                Bytes::copy_from_slice(s.as_bytes()),
                "publish",
                "topic name",
            )?,
            "publish",
        )
    }
}

/// Validates a copy of `s` (for literals, configuration and tests; decoding never copies).
impl std::str::FromStr for TopicFilter {
    type Err = CodecError;

    fn from_str(s: &str) -> Result<Self, CodecError> {
        Self::new(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// Reads the fields of one packet body; every read checks the length first, so no input panics.
pub(crate) struct Reader {
    pub(crate) buf: Bytes,
    pub(crate) packet: &'static str,
}

impl Reader {
    pub(crate) fn new(buf: Bytes, packet: &'static str) -> Self {
        Self { buf, packet }
    }

    fn truncated(&self, field: &'static str) -> CodecError {
        CodecError::Truncated {
            packet: self.packet,
            field,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        self.buf.try_get_u8().map_err(|_| self.truncated(field))
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        self.buf.try_get_u16().map_err(|_| self.truncated(field))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        self.buf.try_get_u32().map_err(|_| self.truncated(field))
    }

    /// A variable byte integer (§1.5.5), at most 4 bytes and minimally encoded.
    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u32, CodecError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let byte = self.u8(field)?;
            value |= u32::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i > 0 && byte == 0 {
                    return Err(CodecError::Malformed {
                        packet: self.packet,
                        reason: "variable byte integer is not minimally encoded",
                    });
                }
                return Ok(value);
            }
        }
        Err(CodecError::Malformed {
            packet: self.packet,
            reason: "variable byte integer has more than 4 bytes",
        })
    }

    /// `n` bytes as a slice of the input.
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, CodecError> {
        if self.buf.len() < n {
            return Err(self.truncated(field));
        }
        Ok(self.buf.split_to(n))
    }

    /// Binary data (§1.5.6): a two-byte length and that many bytes.
    pub(crate) fn binary(&mut self, field: &'static str) -> Result<Bytes, CodecError> {
        let len = self.u16(field)?;
        self.take(usize::from(len), field)
    }

    pub(crate) fn utf8(&mut self, field: &'static str) -> Result<Utf8Str, CodecError> {
        let bytes = self.binary(field)?;
        Utf8Str::validate(bytes, self.packet, field)
    }

    pub(crate) fn topic_name(&mut self, field: &'static str) -> Result<TopicName, CodecError> {
        let s = self.utf8(field)?;
        TopicName::validate(s, self.packet)
    }

    pub(crate) fn topic_filter(&mut self) -> Result<TopicFilter, CodecError> {
        let s = self.utf8("topic filter")?;
        TopicFilter::validate(s, self.packet)
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn finish(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes {
                packet: self.packet,
                count: self.buf.len(),
            })
        }
    }
}

/// Where an encoder writes: either a byte counter (first pass, to learn the remaining length
/// and property lengths without allocating) or the output buffer (second pass).
pub(crate) trait Sink {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_slice(&mut self, v: &[u8]);

    /// A variable byte integer; the caller has checked `v <= 268,435,455`.
    fn put_varint(&mut self, v: usize) {
        let mut v = v;
        loop {
            let mut byte = u8::try_from(v % 128).unwrap_or_default();
            v /= 128;
            if v > 0 {
                byte |= 0x80;
            }
            self.put_u8(byte);
            if v == 0 {
                break;
            }
        }
    }

    /// A length-prefixed field; `packet`/`field` name it in the error when it is over 65,535.
    fn put_binary(
        &mut self,
        v: &[u8],
        packet: &'static str,
        field: &'static str,
    ) -> Result<(), CodecError> {
        let len = u16::try_from(v.len()).map_err(|_| CodecError::TooLongToEncode {
            packet,
            field,
            len: v.len(),
        })?;
        self.put_u16(len);
        self.put_slice(v);
        Ok(())
    }

    /// A validated string, at most 65,535 bytes by construction.
    fn put_utf8(&mut self, v: &Utf8Str) {
        let len = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.put_u16(len);
        self.put_slice(v.as_bytes());
    }
}

/// Counts bytes for the first encoding pass.
#[derive(Debug, Default)]
pub(crate) struct Counter(pub(crate) usize);

impl Sink for Counter {
    fn put_u8(&mut self, _: u8) {
        self.0 += 1;
    }
    fn put_u16(&mut self, _: u16) {
        self.0 += 2;
    }
    fn put_u32(&mut self, _: u32) {
        self.0 += 4;
    }
    fn put_slice(&mut self, v: &[u8]) {
        self.0 += v.len();
    }
}

impl Sink for BytesMut {
    fn put_u8(&mut self, v: u8) {
        BufMut::put_u8(self, v);
    }
    fn put_u16(&mut self, v: u16) {
        BufMut::put_u16(self, v);
    }
    fn put_u32(&mut self, v: u32) {
        BufMut::put_u32(self, v);
    }
    fn put_slice(&mut self, v: &[u8]) {
        self.extend_from_slice(v);
    }
}

/// Checks a length against the largest remaining length.
pub(crate) fn check_remaining(
    len: usize,
    packet: &'static str,
    field: &'static str,
) -> Result<(), CodecError> {
    if len > MAX_REMAINING_LENGTH {
        return Err(CodecError::TooLongToEncode { packet, field, len });
    }
    Ok(())
}
