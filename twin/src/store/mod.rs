//! Durable storage of things, policies and solutions: journal with group commit, snapshots.
//!
//! # Layout
//! - this file: the [`TwinStore`] trait (what the broker uses; two stores implement it), [`StoreOptions`], the [`Durable`] completion handle;
//! - [`embedded`]: [`EmbeddedStore`], the default store under a data directory: state in
//!   memory, writes, open and recovery, snapshots, close;
//! - [`cluster`]: [`ClusterStore`], several nodes sharing entities through NATS JetStream
//!   (its module docs hold its own model: optimistic concurrency, watching, failing closed);
//! - `writer`: the group-commit writer thread (the rule is documented there and below);
//! - `journal`: journal segment and record format, the reader that tells a torn tail from
//!   corruption; `snapshot`: snapshot files; `codec`: binary encoding of events and entities;
//!   `dir`: the directory lock; [`error`]: [`StoreError`], [`WriteError`].
//!
//! # Model
//! The whole state is held in memory: 64 shards of `RwLock<HashMap<EntityKey, Arc<Entity>>>`
//! plus a thing → policy ID index, so the hot path (authorize, then apply) never reads the
//! disk. **The state must fit in memory**: a document held as a `serde_json::Value` takes a
//! few times the size of its JSON text, so a million 2 KB things need several GB. The disk
//! holds a journal of events and snapshots, and is read only at open.
//!
//! A write ([`TwinStoreExt::write`]) runs entirely under its entity's shard lock: the caller's
//! `decide` sees the current entity and returns events (or refuses); the events go through
//! [`Entity::apply`] — the same transition replay uses, so live state and recovered state
//! cannot disagree; they are encoded and queued to the journal (taking their sequence numbers
//! in queue order); then the new state is published. The caller gets the events, the new
//! entity and a [`Durable`] handle.
//!
//! **Readers may see state whose durability is pending**: a [`TwinStore::get`] right after a
//! write returns the new state before its `fsync`. What must wait is the acknowledgement: a
//! PUBACK, an HTTP 2xx, a bridge ack is sent only once [`Durable`] completes `Ok`. (Deliveries
//! of events may go out earlier; after a crash, an event that was delivered but not acked may
//! be missing from the journal, as in any broker that fans out before fsync. The broker
//! decides which order it needs.)
//!
//! # Durability
//! A write is acknowledged only after its journal records were written and `fdatasync`ed
//! (group commit, below); a new segment's directory entry is synced before any record in it
//! is acknowledged. A crash (kill -9, power loss on a disk that honours flushes) therefore
//! loses nothing acknowledged; unacknowledged writes may or may not survive. Every record
//! carries a CRC32 of its payload and of its header and a sequence number that must be
//! contiguous, so recovery either rebuilds exactly the journalled history or stops with an
//! error naming the file and byte offset; the only thing it drops on its own is a torn final
//! record, with a warning (see `journal`). After any journal I/O error the store is **failed**:
//! every later write returns [`StoreError::Failed`]; reopening recovers the durable state. The
//! data directory is locked (`DATA/LOCK`) against a second store.
//!
//! # Group commit
//! One writer thread owns the journal file. Appenders encode their records on their own thread
//! and queue them; the writer takes everything queued, writes it with one `write_all`, calls
//! `sync_data` once and completes every write of the batch. It waits up to
//! [`StoreOptions::group_commit_delay`] (default 2 ms) for a batch to grow **only when the
//! previous batch held more than one write**, and stops waiting as soon as as many writes are
//! queued as the previous batch held. So a lone sequential writer pays one `fsync` per write
//! and no added delay, and N concurrent writers share one `fsync` per round.
//!
//! # Write amplification
//! Each event is written once, to the journal: a 21-byte header plus a compact binary payload
//! (the value as JSON text), ~100 bytes for a property update. Snapshots rewrite the whole
//! state, so a background snapshot (every [`StoreOptions::snapshot_every_events`] events or
//! [`StoreOptions::snapshot_every`]) is skipped until the journal written since the newest
//! snapshot is at least half that snapshot's size: the bytes written stay under 3× the
//! journal's, whatever the size of the state (a million 2 KB things make a 2 GB snapshot,
//! which must not be rewritten every 100,000 small events). Segments and snapshots covered by
//! a newer snapshot are deleted.
//!
//! # Recovery time
//! Opening reads the newest snapshot (proportional to the state) and replays the journal
//! after it: at most about `snapshot_every_events` events, or half the snapshot's size in
//! journal bytes (the rule above), so replay costs at most about as much as loading the
//! snapshot. Replay decodes each record and applies it in memory (one sequential read per
//! segment, no other I/O). `cargo bench -p twin --bench store` measures a store of 1,000,000
//! events with and without a snapshot.
//!
//! # Why our own journal and snapshot files, not redb or fjall
//! DESIGN.md §9 names redb or fjall "under the journal". We chose to use neither, because the
//! state lives in memory anyway (the authorization hot path must not touch the disk), so what
//! we need from the disk is only (a) an append-only log with group commit and (b) periodic
//! dumps of a map:
//! - **Durability and latency**: redb makes each durable write transaction its own commit
//!   (copy-on-write B-tree pages, `fsync`), one writer at a time; fjall has its own journal
//!   with its own fsync policy. Either way we would still build group commit above it, and
//!   acknowledgements would depend on two layers' fsync behaviour instead of one we test.
//! - **Write amplification**: a 100-byte event costs ~120 bytes in our journal. In redb it
//!   rewrites the B-tree path of the entity (several 4 KiB pages per commit); in an LSM tree
//!   (fjall) it is written to its journal, then to a table, then again at each compaction.
//! - **Recovery time**: a point-in-time dump loads with one sequential read; a database would
//!   open fast but we would then read every entity from it into memory anyway.
//! - **Cost**: the formats are small (headers, CRCs, contiguous sequence numbers) and covered
//!   by torn-tail, flipped-byte and kill -9 tests. If the state ever outgrows memory, the
//!   snapshot files are what should move into fjall or redb; the journal stays.
//!
//! # Limits and backpressure
//! - A write may block while more than [`StoreOptions::max_queued_bytes`] bytes wait for the
//!   writer (the disk is slower than the writers): one `fsync` at most, normally.
//! - A journal record holds at most 64 MiB (documents are limited far below).
//! - [`Durable::wait`] blocks the thread; async code `.await`s the [`Durable`] instead.

pub mod cluster;
pub mod embedded;
pub mod error;

mod codec;
mod dir;
mod journal;
mod snapshot;
mod writer;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::entity::{Entity, EntityKey, EntityKind, Event};

pub use cluster::{ClusterOptions, ClusterStore};
pub use embedded::EmbeddedStore;
pub use error::{StoreError, WriteError};
pub use writer::{BATCH_WRITES_BOUNDS, JournalStats, SYNC_MICROS_BOUNDS};

/// A store of twins (things, policies, solutions). Object-safe: the broker holds an
/// `Arc<dyn TwinStore>`; use [`TwinStoreExt::write`] to write.
pub trait TwinStore: Send + Sync + fmt::Debug {
    /// The current state of an entity (possibly not yet durable, see the module docs).
    fn get(&self, key: &EntityKey) -> Option<Arc<Entity>>;

    /// The `policyId` of a thing, from an index kept up to date by every write (O(1)).
    fn thing_policy_id(&self, thing_id: &str) -> Option<Arc<str>>;

    /// The keys of all entities of one kind, in no particular order.
    fn keys(&self, kind: EntityKind) -> Vec<EntityKey>;

    /// The object-safe form of [`TwinStoreExt::write`]: `decide` is called once, with the
    /// entity's shard locked, and returns the events to append (none: nothing to do).
    fn write_dyn(
        &self,
        key: &EntityKey,
        decide: &mut dyn FnMut(Option<&Entity>) -> Vec<Event>,
    ) -> Result<Written, StoreError>;

    /// Flushes the journal, writes a final snapshot, stops the store's threads and releases
    /// the data directory. Later writes fail with [`StoreError::Closed`]; reads keep
    /// answering from memory. Closing twice is fine.
    fn close(&self) -> Result<(), StoreError>;

    /// Completes once every write made so far (by this process) is durable: a barrier.
    fn durable_so_far(&self) -> Durable;

    /// Moves whenever a policy (or anything a compiled policy depends on) may have changed,
    /// after the new state is visible: while it stays put, a cached policy revision found
    /// current is still current.
    fn policy_generation(&self) -> u64;

    /// Whether other processes (cluster nodes) share this store's entities.
    fn shared(&self) -> bool {
        false
    }

    /// Completes once this store shows everything the shared store held when it was called
    /// (a cluster store's consumer caught up); at once for the embedded store.
    fn caught_up(&self) -> Durable {
        Durable::done()
    }

    /// The embedded journal's group-commit statistics (`None`: no local journal).
    fn journal_stats(&self) -> Option<JournalStats> {
        None
    }

    /// Whether this store can decide now: `Err` with the reason while a cluster store cannot
    /// reach the shared store or has not caught up with it (then it refuses writes, and the
    /// broker refuses every check it cannot prove current: fail closed).
    fn current(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Registers who hears of changes other processes made (a cluster store calls it, in the
    /// shared store's order, after its state shows them). The embedded store has no others.
    fn set_listener(&self, _listener: Arc<dyn ChangeListener>) {}
}

/// Changes made by another node of a cluster, as a cluster store learns them.
pub trait ChangeListener: Send + Sync {
    /// `events` changed `key` from `previous` into `entity` (`None`: absent, deleted) on
    /// another node; this store's state shows it already.
    fn changed(
        &self,
        key: &EntityKey,
        events: &[Event],
        previous: Option<&Arc<Entity>>,
        entity: Option<&Arc<Entity>>,
    );

    /// The store lost track of the shared store and resynchronized: anything derived from
    /// it may be stale (reload solutions, re-check subscriptions).
    fn resynced(&self) {}
}

/// [`TwinStore::write_dyn`] with a decision that can refuse with the caller's own error.
pub trait TwinStoreExt: TwinStore {
    /// Writes one entity: `decide` gets the current entity (`None`: it does not exist) and
    /// returns the events that change it, or refuses with an `E` (nothing changes). The events
    /// must be for `key` and follow each other (`Entity::apply`); the new state is visible at
    /// once, and [`Written::durable`] completes once the events are on disk.
    ///
    /// `decide` runs with the entity's shard locked: keep it short, and never touch the store
    /// from inside it.
    fn write<E>(
        &self,
        key: &EntityKey,
        decide: impl FnOnce(Option<&Entity>) -> Result<Vec<Event>, E>,
    ) -> Result<Written, WriteError<E>> {
        let mut decide = Some(decide);
        let mut rejected = None;
        let written = self.write_dyn(key, &mut |current| match decide.take() {
            Some(decide) => decide(current).unwrap_or_else(|e| {
                rejected = Some(e);
                Vec::new()
            }),
            None => Vec::new(),
        })?;
        match rejected {
            Some(e) => Err(WriteError::Rejected(e)),
            None => Ok(written),
        }
    }
}

impl<S: TwinStore + ?Sized> TwinStoreExt for S {}

/// The result of a write that was applied in memory.
#[derive(Debug)]
#[must_use = "a write may only be acknowledged once `durable` completes"]
pub struct Written {
    /// The events appended, in order (empty: `decide` asked for no change).
    pub events: Vec<Event>,
    /// The entity after the events (`None`: deleted, or never existed).
    pub entity: Option<Arc<Entity>>,
    /// Completes once the events are durable.
    pub durable: Durable,
}

/// Completes `Ok` once a write's journal records are `fsync`ed, or `Err` if the journal
/// failed first. A future (`.await` it from async code) or a blocking [`Durable::wait`].
#[derive(Debug)]
#[must_use = "a write may only be acknowledged once it is durable"]
pub struct Durable {
    /// `None`: nothing to wait for (no events, or already reported).
    receiver: Option<oneshot::Receiver<Result<(), StoreError>>>,
    /// A write this one depends on, waited for first ([`Durable::after`]).
    before: Option<Box<Durable>>,
}

fn writer_gone() -> StoreError {
    StoreError::Failed {
        reason: "the journal writer stopped before the write was durable".into(),
    }
}

impl Durable {
    pub(crate) fn new(receiver: oneshot::Receiver<Result<(), StoreError>>) -> Self {
        Durable {
            receiver: Some(receiver),
            before: None,
        }
    }

    /// Completes once `before` and this write are both durable (`before`'s failure first):
    /// for a write that depends on another entity's (a thing on the policy created for it),
    /// where the store does not already order them (the cluster store appends entities
    /// independently).
    pub fn after(mut self, before: Durable) -> Self {
        self.before = Some(Box::new(match self.before.take() {
            None => before,
            Some(earlier) => before.after(*earlier),
        }));
        self
    }

    /// A handle that completes at once with `error`.
    pub(crate) fn failed(error: StoreError) -> Self {
        let (done, receiver) = oneshot::channel();
        let _ = done.send(Err(error));
        Durable::new(receiver)
    }

    /// A handle with nothing to wait for.
    pub fn done() -> Self {
        Durable::nothing_written()
    }

    /// A handle for a write that appended nothing.
    pub(crate) fn nothing_written() -> Self {
        Durable {
            receiver: None,
            before: None,
        }
    }

    /// Blocks until the write is durable. Must not be called from an async task (tokio's
    /// blocking receive refuses to run inside a runtime); `.await` the `Durable` there.
    pub fn wait(self) -> Result<(), StoreError> {
        if let Some(before) = self.before {
            before.wait()?;
        }
        match self.receiver {
            None => Ok(()),
            Some(receiver) => receiver
                .blocking_recv()
                .unwrap_or_else(|_| Err(writer_gone())),
        }
    }
}

impl Future for Durable {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(before) = self.before.as_mut() {
            let result = std::task::ready!(Pin::new(&mut **before).poll(cx));
            self.before = None;
            if let Err(e) = result {
                self.receiver = None;
                return Poll::Ready(Err(e));
            }
        }
        let Some(receiver) = self.receiver.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(receiver).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.receiver = None;
                Poll::Ready(result.unwrap_or_else(|_| Err(writer_gone())))
            }
        }
    }
}

/// Settings of an [`EmbeddedStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The data directory (created if missing; locked while the store is open).
    pub dir: PathBuf,
    /// The longest the writer waits for a batch to grow, and only when the previous batch
    /// held more than one write (see the module docs). Zero: never wait.
    pub group_commit_delay: Duration,
    /// Take a snapshot in the background after this many events (0: not by count) — if the
    /// journal grew by at least half the newest snapshot's size (see the module docs).
    pub snapshot_every_events: u64,
    /// Take a snapshot in the background this long after the previous one if events arrived
    /// since, under the same size rule (`None`: not by time).
    pub snapshot_every: Option<Duration>,
    /// Start a new journal segment once the current one holds this many bytes (segments are
    /// also started at each snapshot).
    pub segment_max_bytes: u64,
    /// Writers block while this many bytes wait to be written (backpressure).
    pub max_queued_bytes: usize,
}

impl StoreOptions {
    /// Defaults: 2 ms group-commit delay, a snapshot every 100,000 events or 10 minutes,
    /// 64 MiB segments, 64 MiB of queued bytes.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreOptions {
            dir: dir.into(),
            group_commit_delay: Duration::from_millis(2),
            snapshot_every_events: 100_000,
            snapshot_every: Some(Duration::from_secs(600)),
            segment_max_bytes: 64 << 20,
            max_queued_bytes: 64 << 20,
        }
    }
}
