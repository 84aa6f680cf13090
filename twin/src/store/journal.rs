//! The journal's on-disk format: segment files of checksummed, sequence-numbered records, and
//! the reader that tells a torn tail (a crash in the middle of the last append) from corruption.
//!
//! # Format
//! A segment `journal-{first_seq:020}.log` holds records with contiguous sequence numbers,
//! the first one being `first_seq`. A record is a 21-byte header and a payload (an event, see
//! [`codec`](super::codec)):
//!
//! ```text
//! offset  0  u8   magic and version (0xD7: record format 1)
//!         1  u32  payload length (≤ 64 MiB)
//!         5  u64  sequence number
//!        13  u32  CRC32 of the payload
//!        17  u32  CRC32 of header bytes 0..17
//!        21  payload
//! ```
//!
//! The header has its own checksum so that a damaged length can never be believed: without it,
//! a flipped bit in an early record's length could make the record seem to run past the end of
//! the file, and the reader would take it for a torn tail and drop every record after it.
//!
//! # Torn tail or corruption
//! Records are only ever appended, and a segment is complete (fsync'd) before the next one is
//! created, so only the final record of the final segment can be torn by a crash. The reader
//! accepts as torn, and truncates away:
//! - a header cut short by the end of the file;
//! - a valid header whose payload is cut short by the end of the file;
//! - a payload checksum mismatch in a record that ends exactly at the end of the file;
//! - an invalid header (bad magic or header checksum) after which no valid header starts
//!   anywhere in the rest of the file (a torn header, or a zero-filled tail).
//!
//! Anything else — a bad checksum with valid records after it, an undecodable payload, a
//! sequence number out of order, an incomplete record in an earlier segment — is corruption:
//! opening stops with an error naming the file and byte offset. Nothing is skipped silently.

use std::path::{Path, PathBuf};

use super::codec::Reader;
use super::error::StoreError;

pub(crate) const RECORD_MAGIC: u8 = 0xD7;
pub(crate) const HEADER_LEN: usize = 21;
/// The largest payload a record may hold (documents are limited far below this).
pub(crate) const MAX_PAYLOAD: usize = 64 << 20;

const SEGMENT_PREFIX: &str = "journal-";
const SEGMENT_SUFFIX: &str = ".log";

pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}")
}

/// The first sequence number named by a segment file name.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A segment file found in the data directory.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub(crate) first_seq: u64,
    pub(crate) path: PathBuf,
}

/// Starts a record in `out`: a header with its length and payload checksum filled in, and
/// the sequence number and header checksum left for [`seal_record`]. Returns where the header
/// starts, or the payload's size (nothing appended) if it could not be encoded or is larger
/// than [`MAX_PAYLOAD`].
pub(crate) fn put_record(
    out: &mut Vec<u8>,
    encode_payload: impl FnOnce(&mut Vec<u8>) -> bool,
) -> Result<usize, usize> {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    let ok = encode_payload(out);
    let payload_len = out.len() - start - HEADER_LEN;
    let fits = u32::try_from(payload_len)
        .ok()
        .filter(|_| ok && payload_len <= MAX_PAYLOAD);
    let (Some(len), Some(header), Some(payload)) = (
        fits,
        out.get(start..start + HEADER_LEN),
        out.get(start + HEADER_LEN..),
    ) else {
        out.truncate(start);
        return Err(payload_len);
    };
    let mut filled = [0u8; HEADER_LEN];
    filled.copy_from_slice(header);
    filled[0] = RECORD_MAGIC;
    filled[1..5].copy_from_slice(&len.to_le_bytes());
    filled[13..17].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    if let Some(slot) = out.get_mut(start..start + HEADER_LEN) {
        slot.copy_from_slice(&filled);
    }
    Ok(start)
}

/// Writes the sequence number and header checksum of the record whose header starts at
/// `start` (as returned by [`put_record`]).
pub(crate) fn seal_record(bytes: &mut [u8], start: usize, seq: u64) {
    let header: Option<&mut [u8; HEADER_LEN]> = bytes
        .get_mut(start..start + HEADER_LEN)
        .and_then(|h| h.try_into().ok());
    if let Some(header) = header {
        header[5..13].copy_from_slice(&seq.to_le_bytes());
        let crc = crc32fast::hash(&header[..17]);
        header[17..21].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A header that passed its checksum.
struct Header {
    len: usize,
    seq: u64,
    payload_crc: u32,
}

fn read_header(bytes: &[u8]) -> Option<Header> {
    let header = bytes.get(..HEADER_LEN)?;
    let mut fields = Reader { bytes: header };
    let magic = fields.u8().ok()?;
    let len = fields.u32().ok()?;
    let seq = fields.u64().ok()?;
    let payload_crc = fields.u32().ok()?;
    let header_crc = fields.u32().ok()?;
    if magic != RECORD_MAGIC || crc32fast::hash(header.get(..17)?) != header_crc {
        return None;
    }
    Some(Header {
        len: usize::try_from(len).ok()?,
        seq,
        payload_crc,
    })
}

/// Whether a valid record header starts anywhere in `bytes`.
fn any_header_in(bytes: &[u8]) -> bool {
    (0..bytes.len()).any(|at| {
        bytes.get(at) == Some(&RECORD_MAGIC) && bytes.get(at..).and_then(read_header).is_some()
    })
}

/// Where and why the tail of the last segment was torn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Torn {
    pub(crate) offset: u64,
    pub(crate) reason: &'static str,
}

/// What [`scan_segment`] found after the last good record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanEnd {
    /// The sequence number the next record must have.
    pub(crate) next_seq: u64,
    /// Set when the last segment ends in a torn record, which must be truncated away.
    pub(crate) torn: Option<Torn>,
}

/// Checks every record of one segment (its whole contents in `bytes`) and hands the valid
/// ones to `visit(offset, seq, payload)` in order. `is_last` says whether a torn tail is
/// possible here (see the module docs).
pub(crate) fn scan_segment(
    segment: &Segment,
    bytes: &[u8],
    is_last: bool,
    mut visit: impl FnMut(u64, u64, &[u8]) -> Result<(), StoreError>,
) -> Result<ScanEnd, StoreError> {
    let mut next_seq = segment.first_seq;
    let mut at = 0usize;
    let corrupt = |at: usize, reason: String| StoreError::CorruptJournal {
        path: segment.path.clone(),
        offset: at as u64,
        reason,
    };
    loop {
        let Some(rest) = bytes.get(at..).filter(|rest| !rest.is_empty()) else {
            return Ok(ScanEnd {
                next_seq,
                torn: None,
            });
        };
        let torn = |reason: &'static str| {
            Ok(ScanEnd {
                next_seq,
                torn: Some(Torn {
                    offset: at as u64,
                    reason,
                }),
            })
        };
        if rest.len() < HEADER_LEN {
            if is_last {
                return torn("the final record's header is cut short");
            }
            return Err(corrupt(
                at,
                "the segment ends inside a record header".into(),
            ));
        }
        let Some(header) = read_header(rest) else {
            if is_last && !any_header_in(rest.get(1..).unwrap_or_default()) {
                return torn("the final record's header is damaged");
            }
            return Err(corrupt(
                at,
                "record header checksum mismatch (valid records follow)".into(),
            ));
        };
        if header.len > MAX_PAYLOAD {
            return Err(corrupt(
                at,
                format!("record length {} exceeds the maximum", header.len),
            ));
        }
        let end = HEADER_LEN + header.len;
        let Some(payload) = rest.get(HEADER_LEN..end) else {
            if is_last {
                return torn("the final record's payload is cut short");
            }
            return Err(corrupt(at, "the segment ends inside a record".into()));
        };
        if crc32fast::hash(payload) != header.payload_crc {
            if is_last && end == rest.len() {
                return torn("the final record's payload checksum does not match");
            }
            return Err(corrupt(at, "record payload checksum mismatch".into()));
        }
        if header.seq != next_seq {
            return Err(corrupt(
                at,
                format!(
                    "sequence number {} where {next_seq} was expected",
                    header.seq
                ),
            ));
        }
        visit(at as u64, header.seq, payload)?;
        next_seq = next_seq.saturating_add(1);
        at += end;
    }
}

/// Lists the journal segments in `dir`, in order of their first sequence number.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<Segment>, StoreError> {
    let mut segments = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("listing", dir, e))?;
        if let Some(first_seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            segments.push(Segment {
                first_seq,
                path: entry.path(),
            });
        }
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment_of(records: &[&[u8]]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (i, payload) in records.iter().enumerate() {
            let start = put_record(&mut bytes, |out| {
                out.extend_from_slice(payload);
                true
            })
            .unwrap();
            seal_record(&mut bytes, start, 10 + i as u64);
        }
        bytes
    }

    fn scan(bytes: &[u8], is_last: bool) -> Result<(Vec<(u64, u64)>, ScanEnd), StoreError> {
        let segment = Segment {
            first_seq: 10,
            path: PathBuf::from("journal-x.log"),
        };
        let mut seen = Vec::new();
        let end = scan_segment(&segment, bytes, is_last, |offset, seq, _| {
            seen.push((offset, seq));
            Ok(())
        })?;
        Ok((seen, end))
    }

    #[test]
    fn segment_names_sort_by_sequence_and_parse_back() {
        assert_eq!(segment_name(42), "journal-00000000000000000042.log");
        assert_eq!(parse_segment_name(&segment_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_name("journal-42.log"), None);
        assert_eq!(parse_segment_name("journal-0000000000000000004x.log"), None);
    }

    #[test]
    fn valid_records_are_read_in_order() {
        let bytes = segment_of(&[b"a", b"bb", b""]);
        let (seen, end) = scan(&bytes, true).unwrap();
        assert_eq!(seen, vec![(0, 10), (22, 11), (45, 12)]);
        assert_eq!(
            end,
            ScanEnd {
                next_seq: 13,
                torn: None
            }
        );
    }

    #[test]
    fn a_zero_filled_tail_is_torn_but_zeros_before_records_are_corruption() {
        let mut bytes = segment_of(&[b"a", b"bb"]);
        bytes.extend_from_slice(&[0; 100]);
        let (_, end) = scan(&bytes, true).unwrap();
        assert_eq!(end.torn.map(|t| t.offset), Some(45));
        let mut zeros_first = vec![0; 30];
        zeros_first.extend_from_slice(&segment_of(&[b"a"]));
        assert!(matches!(
            scan(&zeros_first, true),
            Err(StoreError::CorruptJournal { offset: 0, .. })
        ));
    }

    #[test]
    fn an_incomplete_record_in_an_earlier_segment_is_corruption() {
        let bytes = segment_of(&[b"a", b"bb"]);
        assert!(matches!(
            scan(&bytes[..bytes.len() - 1], false),
            Err(StoreError::CorruptJournal { offset: 22, .. })
        ));
    }
}
