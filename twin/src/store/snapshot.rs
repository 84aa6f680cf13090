//! Snapshot files: every entity as of one journal sequence number.
//!
//! # Format
//! `snapshot-{seq:020}.snap`, written as `….snap.tmp`, `fsync`ed, renamed, and the directory
//! `fsync`ed — so a snapshot file under its final name is always complete.
//!
//! ```text
//! header   magic "TGSNAP\0\x01" (8) ‖ seq u64 ‖ entity count u64 ‖ CRC32 of the previous 24 bytes
//! entity   length u32 ‖ CRC32 of the entity bytes u32 ‖ entity bytes (see codec)   × count
//! trailer  magic "TGSNEND\x01" (8) ‖ entity count u64 ‖ CRC32 of the previous 16 bytes
//! ```
//!
//! A damaged snapshot is never partly believed: any mismatch is an error naming the file and
//! the byte offset.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec::{Reader, decode_entity, put_entity};
use super::dir;
use super::error::StoreError;
use crate::entity::{Entity, EntityKey};

const MAGIC: &[u8; 8] = b"TGSNAP\0\x01";
const END_MAGIC: &[u8; 8] = b"TGSNEND\x01";
const HEADER_LEN: usize = 28;
const TRAILER_LEN: usize = 20;
/// The smallest encoded entity plus its length and checksum (bounds the count a file can hold).
const MIN_ENTRY_LEN: usize = 8 + 1 + 8 + 8 + 8 + 4 + 4 + 2;

const PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".snap";
pub(crate) const TMP_SUFFIX: &str = ".snap.tmp";

pub(crate) fn file_name(seq: u64) -> String {
    format!("{PREFIX}{seq:020}{SUFFIX}")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A snapshot file found in the data directory.
#[derive(Debug, Clone)]
pub(crate) struct SnapshotFile {
    pub(crate) seq: u64,
    pub(crate) path: PathBuf,
}

/// The snapshots in `dir`, newest first, and the unfinished temporary files.
pub(crate) fn list(dir: &Path) -> Result<(Vec<SnapshotFile>, Vec<PathBuf>), StoreError> {
    let mut snapshots = Vec::new();
    let mut unfinished = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("listing", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = parse_file_name(name) {
            snapshots.push(SnapshotFile {
                seq,
                path: entry.path(),
            });
        } else if name.starts_with(PREFIX) && name.ends_with(TMP_SUFFIX) {
            unfinished.push(entry.path());
        }
    }
    snapshots.sort_by_key(|s| std::cmp::Reverse(s.seq));
    Ok((snapshots, unfinished))
}

fn checksummed<const N: usize>(magic: &[u8; 8], a: u64, b: Option<u64>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(N);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&a.to_le_bytes());
    if let Some(b) = b {
        bytes.extend_from_slice(&b.to_le_bytes());
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Writes the snapshot of `entities` as of sequence number `seq` into `dir`, durably; returns
/// its path and size.
pub(crate) fn write(
    dir: &Path,
    seq: u64,
    entities: &[Arc<Entity>],
) -> Result<(PathBuf, u64), StoreError> {
    let path = dir.join(file_name(seq));
    let tmp = dir.join(format!("{PREFIX}{seq:020}{TMP_SUFFIX}"));
    let io = |action: &'static str| {
        let tmp = tmp.clone();
        move |e| StoreError::io(action, tmp, e)
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .map_err(io("creating snapshot"))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let count = entities.len() as u64;
    out.write_all(&checksummed::<HEADER_LEN>(MAGIC, seq, Some(count)))
        .map_err(io("writing snapshot"))?;
    let mut entry = Vec::new();
    for entity in entities {
        entry.clear();
        if !put_entity(&mut entry, entity) {
            return Err(StoreError::TooLarge {
                key: entity.key.to_string(),
                size: entry.len(),
                max: u32::MAX as usize,
            });
        }
        let len = u32::try_from(entry.len()).map_err(|_| StoreError::TooLarge {
            key: entity.key.to_string(),
            size: entry.len(),
            max: u32::MAX as usize,
        })?;
        out.write_all(&len.to_le_bytes())
            .and_then(|()| out.write_all(&crc32fast::hash(&entry).to_le_bytes()))
            .and_then(|()| out.write_all(&entry))
            .map_err(io("writing snapshot"))?;
    }
    out.write_all(&checksummed::<TRAILER_LEN>(END_MAGIC, count, None))
        .map_err(io("writing snapshot"))?;
    let file = out
        .into_inner()
        .map_err(|e| StoreError::io("writing snapshot", &tmp, e.into_error()))?;
    file.sync_all().map_err(io("syncing snapshot"))?;
    let size = file.metadata().map_err(io("reading snapshot"))?.len();
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io("renaming snapshot"))?;
    dir::sync_dir(dir)?;
    Ok((path, size))
}

/// Reads and checks a whole snapshot.
pub(crate) fn load(file: &SnapshotFile) -> Result<HashMap<EntityKey, Entity>, StoreError> {
    let path = &file.path;
    let bytes = std::fs::read(path).map_err(|e| StoreError::io("reading snapshot", path, e))?;
    let corrupt = |offset: usize, reason: String| StoreError::CorruptSnapshot {
        path: path.clone(),
        offset: offset as u64,
        reason,
    };
    let mut r = Reader { bytes: &bytes };
    let (header, count) = r
        .take(HEADER_LEN)
        .ok()
        .and_then(|header| {
            let mut fields = Reader { bytes: header };
            let magic = fields.take(8).ok()?;
            let seq = fields.u64().ok()?;
            let count = fields.u64().ok()?;
            let ok = magic == MAGIC && checksummed::<HEADER_LEN>(MAGIC, seq, Some(count)) == header;
            Some((ok.then_some(seq), count))
        })
        .ok_or_else(|| corrupt(0, "the file is shorter than a snapshot header".into()))?;
    match header {
        Some(seq) if seq == file.seq => {}
        Some(seq) => {
            return Err(corrupt(
                0,
                format!(
                    "the header says sequence number {seq}, the file name {}",
                    file.seq
                ),
            ));
        }
        None => return Err(corrupt(0, "bad magic or header checksum".into())),
    }
    let count = usize::try_from(count).map_err(|e| corrupt(0, e.to_string()))?;
    let mut entities = HashMap::with_capacity(count.min(bytes.len() / MIN_ENTRY_LEN));
    for _ in 0..count {
        let offset = bytes.len() - r.bytes.len();
        let entry = (|| {
            let len = usize::try_from(r.u32()?).map_err(|e| e.to_string())?;
            let crc = r.u32()?;
            let entry = r.take(len)?;
            if crc32fast::hash(entry) != crc {
                return Err("entity checksum mismatch".to_owned());
            }
            decode_entity(entry)
        })()
        .map_err(|reason| corrupt(offset, reason))?;
        if let Some(twice) = entities.insert(entry.key.clone(), entry) {
            return Err(corrupt(offset, format!("`{}` appears twice", twice.key)));
        }
    }
    let offset = bytes.len() - r.bytes.len();
    if r.bytes != checksummed::<TRAILER_LEN>(END_MAGIC, count as u64, None) {
        return Err(corrupt(
            offset,
            "missing or damaged trailer (the file is truncated or has extra bytes)".into(),
        ));
    }
    Ok(entities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::EntityKind;
    use policy::Timestamp;
    use serde_json::json;

    fn entity(id: &str, revision: u64) -> Arc<Entity> {
        Arc::new(Entity {
            key: EntityKey::new(EntityKind::Thing, id),
            doc: json!({"thingId": id, "attributes": {"n": revision}}),
            revision,
            created: Timestamp::from_unix_millis(1),
            modified: Timestamp::from_unix_millis(revision as i64),
            size: None,
        })
    }

    #[test]
    fn a_snapshot_reads_back_and_every_damaged_byte_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let entities = vec![entity("a:x", 3), entity("a:y", 9)];
        let (path, size) = write(dir.path(), 42, &entities).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        assert!(path.exists());
        let file = SnapshotFile {
            seq: 42,
            path: path.clone(),
        };
        let loaded = load(&file).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[&entities[1].key], *entities[1]);

        let pristine = std::fs::read(&path).unwrap();
        for at in 0..pristine.len() {
            let mut damaged = pristine.clone();
            damaged[at] ^= 0x10;
            std::fs::write(&path, &damaged).unwrap();
            let error = load(&file).unwrap_err().to_string();
            assert!(
                error.contains("snapshot-00000000000000000042.snap"),
                "{error}"
            );
        }
        for len in 0..pristine.len() {
            std::fs::write(&path, &pristine[..len]).unwrap();
            assert!(load(&file).is_err(), "truncated to {len} bytes");
        }
    }
}
