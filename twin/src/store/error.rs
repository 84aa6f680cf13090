//! What can go wrong in the store, with the file and byte offset wherever there is one.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::entity::ApplyEventError;

/// An error of the store itself (not of the caller's decision).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another store (in this or another process) holds the directory's lock.
    #[error(
        "data directory `{dir}` is in use by another Thingsgate store (lock file `{lock}` is held)"
    )]
    InUse { dir: PathBuf, lock: PathBuf },

    #[error("{action} `{path}`: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A journal record that is neither valid nor a torn tail.
    #[error("journal `{path}` is corrupt at byte offset {offset}: {reason}")]
    CorruptJournal {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// The journal segments do not form one contiguous run of sequence numbers.
    #[error("journal is not contiguous at `{path}`: {reason}")]
    JournalGap { path: PathBuf, reason: String },

    #[error("snapshot `{path}` is corrupt at byte offset {offset}: {reason}")]
    CorruptSnapshot {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// A valid record whose event does not fit the state rebuilt so far.
    #[error("replaying journal `{path}` at byte offset {offset}: {source}")]
    Replay {
        path: PathBuf,
        offset: u64,
        #[source]
        source: ApplyEventError,
    },

    /// The journal writer met an I/O error (or stopped); the store accepts no more writes and
    /// must be reopened, which recovers exactly what was made durable.
    #[error("the store has failed and accepts no more writes: {reason}")]
    Failed { reason: Arc<str> },

    #[error("the store is closed")]
    Closed,

    /// The caller's events do not apply to the entity they were decided on: a bug in the
    /// caller, refused with nothing changed.
    #[error("events decided for `{key}` do not apply: {source}")]
    Apply {
        key: String,
        #[source]
        source: ApplyEventError,
    },

    /// The caller decided an event for another entity than the one it was given.
    #[error("an event for `{event_key}` was decided while writing `{key}`")]
    ForeignEvent { key: String, event_key: String },

    /// Cluster store: another node changed the entity since this node decided the write, which
    /// was therefore not stored. The entity has been reloaded: decide again.
    #[error("`{key}` was changed by another node; the write was not stored (decide again)")]
    Conflict { key: String },

    /// Cluster store: the shared store cannot be reached (or this node has not caught up with
    /// it), so nothing is written or acknowledged.
    #[error("the cluster store is unavailable: {reason}")]
    Unavailable { reason: String },

    /// An event too large for one journal record.
    #[error(
        "an event for `{key}` encodes to {size} bytes, more than the {max} a journal record holds"
    )]
    TooLarge {
        key: String,
        size: usize,
        max: usize,
    },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// The outcome of a write whose decision can refuse it (see
/// [`TwinStoreExt::write`](super::TwinStoreExt::write)).
#[derive(Debug, thiserror::Error)]
pub enum WriteError<E> {
    /// The decision refused the write (e.g. a Ditto error); nothing changed.
    #[error("{0}")]
    Rejected(E),
    #[error(transparent)]
    Store(#[from] StoreError),
}
