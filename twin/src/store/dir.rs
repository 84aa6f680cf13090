//! The data directory: its lock, and making its entries durable.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use super::error::StoreError;

pub(crate) const LOCK_FILE: &str = "LOCK";

/// Takes the exclusive advisory lock on `DIR/LOCK`, held as long as the returned file is open
/// (the operating system releases it if the process dies, so a crash never leaves the
/// directory locked).
pub(crate) fn lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io("opening lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::InUse {
            dir: dir.to_path_buf(),
            lock: path,
        }),
        Err(TryLockError::Error(e)) => Err(StoreError::io("locking", &path, e)),
    }
}

/// Makes the creation, renaming and removal of entries of `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("syncing directory", dir, e))
}

/// Removes a file that is no longer needed; a failure is only logged (the file stays
/// harmless: it is covered by a newer snapshot, or is an unfinished temporary file).
pub(crate) fn remove_quietly(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(file = %path.display(), "removed"),
        Err(e) => tracing::warn!(file = %path.display(), error = %e, "could not remove"),
    }
}
