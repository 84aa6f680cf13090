//! Damaged files: a torn last record is truncated with a warning; anything else stops the open
//! with an error naming the file and byte offset, never a silent loss.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod store_common;

use std::path::{Path, PathBuf};

use store_common::{Logs, all_entities, copy_dir, files, options, set_n};
use twin::Entity;
use twin::store::{EmbeddedStore, StoreError, TwinStore};

const HEADER_LEN: usize = 21;

/// A data directory with `n` records in one segment (no snapshot); returns the segment, the
/// end offset of every record, and the state before the last record.
fn journal_of(dir: &Path, n: u64) -> (PathBuf, Vec<u64>, Vec<Entity>) {
    let store = EmbeddedStore::open(options(dir)).unwrap();
    let segment = files(dir, "journal-").pop().unwrap();
    let mut ends = Vec::new();
    let mut before_last = Vec::new();
    for i in 0..n {
        if i + 1 == n {
            before_last = all_entities(&store);
        }
        set_n(&store, &format!("ns:t{}", i % 2), i)
            .durable
            .wait()
            .unwrap();
        ends.push(std::fs::metadata(&segment).unwrap().len());
    }
    drop(store);
    assert_eq!(files(dir, "journal-"), vec![segment.clone()]);
    (segment, ends, before_last)
}

fn open_capturing(dir: &Path) -> (Result<EmbeddedStore, StoreError>, Vec<String>) {
    let logs = Logs::default();
    let opened = logs.capture(|| EmbeddedStore::open(options(dir)));
    (opened, logs.lines())
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_str().unwrap().to_owned()
}

#[test]
fn a_torn_last_record_is_truncated_at_every_offset_and_only_it_is_lost() {
    let pristine = tempfile::tempdir().unwrap();
    let (segment, ends, before_last) = journal_of(pristine.path(), 3);
    let bytes = std::fs::read(&segment).unwrap();
    let last_start = ends[1];
    for cut in last_start + 1..ends[2] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), dir.path());
        let torn = dir.path().join(file_name(&segment));
        std::fs::write(&torn, &bytes[..cut as usize]).unwrap();

        let (opened, logs) = open_capturing(dir.path());
        let store = opened.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(all_entities(&store), before_last, "cut at {cut}");
        assert_eq!(
            std::fs::metadata(&torn).unwrap().len(),
            last_start,
            "cut at {cut}"
        );
        let warning = logs
            .iter()
            .find(|line| line.starts_with("WARN") && line.contains("torn"))
            .unwrap_or_else(|| panic!("cut at {cut}: no warning in {logs:?}"));
        assert!(warning.contains(&file_name(&segment)), "{warning}");
        assert!(
            warning.contains(&format!("offset={last_start}")),
            "{warning}"
        );

        // The journal goes on from there, and reopens cleanly.
        set_n(&store, "ns:t0", 99).durable.wait().unwrap();
        assert_eq!(store.last_seq(), 3);
        drop(store);
        let (reopened, logs) = open_capturing(dir.path());
        assert_eq!(
            reopened
                .unwrap()
                .get(&store_common::thing("ns:t0"))
                .unwrap()
                .revision,
            2
        );
        assert!(
            !logs.iter().any(|line| line.starts_with("WARN")),
            "{logs:?}"
        );
    }
}

#[test]
fn a_flipped_byte_in_an_earlier_record_stops_the_open_naming_file_and_offset() {
    let pristine = tempfile::tempdir().unwrap();
    let (segment, ends, _) = journal_of(pristine.path(), 3);
    let bytes = std::fs::read(&segment).unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(pristine.path(), dir.path());
    let damaged = dir.path().join(file_name(&segment));
    for (start, end) in [(0, ends[0]), (ends[0], ends[1])] {
        for at in start..end {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut copy = bytes.clone();
                copy[at as usize] ^= flip;
                std::fs::write(&damaged, &copy).unwrap();
                let error = EmbeddedStore::open(options(dir.path()))
                    .map(|_| ())
                    .expect_err(&format!("flip {flip:#x} at byte {at}"));
                assert!(
                    matches!(error, StoreError::CorruptJournal { offset, .. } if offset == start),
                    "flip at byte {at}: {error}"
                );
                let message = error.to_string();
                assert!(message.contains(&file_name(&segment)), "{message}");
                assert!(
                    message.contains(&format!("byte offset {start}")),
                    "{message}"
                );
            }
        }
    }
    // The failed opens changed nothing.
    assert_eq!(std::fs::read(&damaged).unwrap().len(), bytes.len());
}

#[test]
fn a_flipped_byte_in_the_last_record_is_a_torn_tail() {
    let pristine = tempfile::tempdir().unwrap();
    let (segment, ends, before_last) = journal_of(pristine.path(), 3);
    let bytes = std::fs::read(&segment).unwrap();
    for at in ends[1]..ends[2] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), dir.path());
        let mut copy = bytes.clone();
        copy[at as usize] ^= 0x40;
        std::fs::write(dir.path().join(file_name(&segment)), &copy).unwrap();
        let (opened, logs) = open_capturing(dir.path());
        let store = opened.unwrap_or_else(|e| panic!("flip at byte {at}: {e}"));
        assert_eq!(all_entities(&store), before_last, "flip at byte {at}");
        assert!(
            logs.iter()
                .any(|line| line.contains("torn") && line.contains(&format!("offset={}", ends[1]))),
            "flip at byte {at}: {logs:?}"
        );
    }
}

#[test]
fn a_record_with_valid_checksums_that_does_not_decode_is_corruption_even_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (segment, ends, _) = journal_of(dir.path(), 2);
    let mut bytes = std::fs::read(&segment).unwrap();
    // Replace the last record's payload with garbage of the same length and fix both CRCs, as
    // a writer with another format would have.
    let start = ends[0] as usize;
    let payload = start + HEADER_LEN..bytes.len();
    bytes[payload.clone()].fill(0xEE);
    let payload_crc = crc32fast::hash(&bytes[payload]);
    bytes[start + 13..start + 17].copy_from_slice(&payload_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&bytes[start..start + 17]);
    bytes[start + 17..start + 21].copy_from_slice(&header_crc.to_le_bytes());
    std::fs::write(&segment, &bytes).unwrap();
    let error = EmbeddedStore::open(options(dir.path()))
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&error, StoreError::CorruptJournal { offset, reason, .. } if *offset == ends[0] && reason.contains("undecodable")),
        "{error}"
    );
}

#[test]
fn a_missing_segment_is_a_gap_and_an_incomplete_earlier_segment_is_corruption() {
    let pristine = tempfile::tempdir().unwrap();
    {
        let mut opts = options(pristine.path());
        opts.segment_max_bytes = 1; // a new segment for every batch
        let store = EmbeddedStore::open(opts).unwrap();
        for i in 0..4 {
            set_n(&store, "ns:t", i).durable.wait().unwrap();
        }
    }
    let segments = files(pristine.path(), "journal-");
    assert_eq!(segments.len(), 4, "{segments:?}");

    let dir = tempfile::tempdir().unwrap();
    copy_dir(pristine.path(), dir.path());
    std::fs::remove_file(dir.path().join(file_name(&segments[1]))).unwrap();
    let error = EmbeddedStore::open(options(dir.path()))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(error, StoreError::JournalGap { .. }), "{error}");
    assert!(
        error.to_string().contains(&file_name(&segments[2])),
        "{error}"
    );

    let dir = tempfile::tempdir().unwrap();
    copy_dir(pristine.path(), dir.path());
    let second = dir.path().join(file_name(&segments[1]));
    let len = std::fs::metadata(&second).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&second)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let error = EmbeddedStore::open(options(dir.path()))
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(error, StoreError::CorruptJournal { offset: 0, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains(&file_name(&segments[1])),
        "{error}"
    );
}

/// Writes 5 events, closes (snapshot; the covered journal is deleted) and returns the state
/// and the journal segment that existed before the snapshot, kept aside.
fn snapshotted(dir: &Path) -> (Vec<Entity>, PathBuf, Vec<u8>) {
    let store = EmbeddedStore::open(options(dir)).unwrap();
    for i in 0..5 {
        set_n(&store, &format!("ns:t{}", i % 2), i)
            .durable
            .wait()
            .unwrap();
    }
    let segment = files(dir, "journal-").pop().unwrap();
    let journal = std::fs::read(&segment).unwrap();
    let state = all_entities(&store);
    store.close().unwrap();
    assert!(!segment.exists(), "the snapshot covers the old segment");
    (state, segment, journal)
}

#[test]
fn a_damaged_snapshot_stops_the_open_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let _ = snapshotted(dir.path());
    let snapshot = files(dir.path(), "snapshot-").pop().unwrap();
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x08;
    std::fs::write(&snapshot, &bytes).unwrap();
    let error = EmbeddedStore::open(options(dir.path()))
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(error, StoreError::CorruptSnapshot { .. }),
        "{error}"
    );
    assert!(error.to_string().contains(&file_name(&snapshot)), "{error}");
}

#[test]
fn a_damaged_snapshot_is_bypassed_when_the_journal_still_reaches_back() {
    let dir = tempfile::tempdir().unwrap();
    let (state, segment, journal) = snapshotted(dir.path());
    std::fs::write(&segment, journal).unwrap();
    let snapshot = files(dir.path(), "snapshot-").pop().unwrap();
    let mut bytes = std::fs::read(&snapshot).unwrap();
    bytes[40] ^= 0x08;
    std::fs::write(&snapshot, &bytes).unwrap();
    let (opened, logs) = open_capturing(dir.path());
    let store = opened.unwrap();
    assert_eq!(all_entities(&store), state);
    assert!(
        logs.iter()
            .any(|l| l.starts_with("WARN") && l.contains(&file_name(&snapshot))),
        "{logs:?}"
    );
}

#[test]
fn an_unfinished_snapshot_is_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (state, _, _) = snapshotted(dir.path());
    let unfinished = dir.path().join("snapshot-00000000000000000099.snap.tmp");
    std::fs::write(&unfinished, b"half a snapshot").unwrap();
    let store = EmbeddedStore::open(options(dir.path())).unwrap();
    assert_eq!(all_entities(&store), state);
    assert!(!unfinished.exists());
}
