//! The embedded store: state in memory, a journal with group commit and snapshots under a data
//! directory (see the [module docs](super) for the reasoning).
//!
//! # Data directory
//! ```text
//! DATA/LOCK                                  exclusive advisory lock while a store is open
//! DATA/journal-{first_seq:020}.log           journal segments (see `journal`)
//! DATA/snapshot-{seq:020}.snap               snapshots (see `snapshot`)
//! DATA/snapshot-{seq:020}.snap.tmp           a snapshot being written (removed at open)
//! ```
//!
//! # Locks
//! A write holds its entity's shard lock (write mode) from `decide` until the new state is
//! published, and takes the journal queue's mutex inside it to get its sequence numbers. A
//! snapshot's cut takes every shard lock in order (read mode), then the queue mutex. Nothing
//! takes two shard locks in another order, so there is no deadlock; and because sequence
//! numbers are handed out under the shard lock, the journal holds each entity's events in the
//! order they were applied.
//!
//! # Snapshots
//! Every `snapshot_every_events` events (or `snapshot_every`), provided the journal grew by
//! at least half the newest snapshot's size, a background thread takes a consistent cut —
//! every shard locked for as long as it takes to note the last queued sequence number S, ask
//! the journal writer to start segment `journal-{S+1}`, and clone the `Arc<Entity>`s — then
//! waits until everything up to S is durable, writes `snapshot-{S}.snap` (temporary file,
//! fsync, rename, directory fsync) and deletes the segments and snapshots it covers.
//! `close()` takes a final one. A failed background snapshot is logged and costs nothing but
//! a longer replay; the journal still holds everything.
//!
//! # Opening
//! Lock, load the newest snapshot, replay the journal records after it through
//! [`Entity::apply`]. A damaged snapshot is an error naming the file — unless an older snapshot
//! (or none) plus a journal that still reaches back far enough can rebuild the same state, in
//! which case that is used with a warning.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::codec::{decode_event, put_event};
use super::dir;
use super::error::StoreError;
use super::journal::{self, MAX_PAYLOAD, Segment, list_segments, put_record, scan_segment};
use super::snapshot;
use super::writer::{Encoded, Journal, JournalStats, Writer, WriterOptions};
use super::{Durable, StoreOptions, TwinStore, Written};
use crate::entity::{Entity, EntityKey, EntityKind, Event};

/// Number of state shards (a power of two well above the number of cores, so writers on
/// different entities rarely meet).
const SHARDS: usize = 64;

/// One shard of the in-memory state.
#[derive(Debug, Default)]
struct Shard {
    entities: HashMap<EntityKey, Arc<Entity>, foldhash::fast::RandomState>,
    /// Thing ID → its `policyId`, for the things of this shard (the authorization hot path
    /// asks for it on every message).
    thing_policies: HashMap<Box<str>, Arc<str>, foldhash::fast::RandomState>,
}

impl Shard {
    /// Makes `entity` (`None`: gone) the state of `key`, and keeps the policy index current.
    fn publish(&mut self, key: &EntityKey, entity: Option<Arc<Entity>>) {
        match entity {
            Some(entity) => match self.entities.get_mut(key) {
                Some(slot) => *slot = entity,
                None => {
                    self.entities.insert(key.clone(), entity);
                }
            },
            None => {
                self.entities.remove(key);
            }
        }
        self.reindex(key);
    }

    /// Brings the policy index up to date with the state of `key` (changed in place or
    /// replaced).
    fn reindex(&mut self, key: &EntityKey) {
        if key.kind != EntityKind::Thing {
            return;
        }
        let policy_id = self
            .entities
            .get(key)
            .and_then(|e| e.doc.get("policyId"))
            .and_then(Value::as_str);
        match policy_id {
            Some(new) => {
                if self.thing_policies.get(key.id.as_str()).map(|p| &**p) != Some(new) {
                    self.thing_policies
                        .insert(key.id.as_str().into(), Arc::from(new));
                }
            }
            None => {
                self.thing_policies.remove(key.id.as_str());
            }
        }
    }

    /// `publish` for an entity rebuilt at open (no other copy of the key is needed).
    fn publish_recovered(&mut self, key: EntityKey, entity: Entity) {
        let entity = Arc::new(entity);
        if key.kind == EntityKind::Thing
            && let Some(policy_id) = entity.doc.get("policyId").and_then(Value::as_str)
        {
            self.thing_policies
                .insert(key.id.as_str().into(), Arc::from(policy_id));
        }
        self.entities.insert(key, entity);
    }
}

// INVARIANT: a shard is only changed by `Shard::publish` (and `publish_recovered` before the
// store is shared), after every check has passed, and nothing in them panics; a lock
// poisoned by a panicking `decide` still guards a consistent shard, so we keep using it.
fn read(shard: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
    shard.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(shard: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
    shard.write().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a snapshot is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotReason {
    /// Count or time: skipped unless the journal grew enough since the newest snapshot.
    Background,
    /// Asked for by [`EmbeddedStore::snapshot`].
    Requested,
    /// The final snapshot of `close()`: also refuses every later write.
    Closing,
}

/// What wakes the snapshot thread.
#[derive(Debug, Default)]
struct Trigger {
    requested: bool,
    stop: bool,
}

/// The state shared by the store handle and its snapshot thread.
#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    shards: Box<[RwLock<Shard>; SHARDS]>,
    journal: Arc<Journal>,
    /// Set by `close` (under every shard lock): later writes are refused.
    closed: AtomicBool,
    /// Policy writes so far ([`EmbeddedStore::policy_generation`]).
    policy_writes: AtomicU64,
    /// Events written since the last snapshot's cut.
    unsnapshotted: AtomicU64,
    /// Journal bytes written since the last snapshot's cut.
    unsnapshotted_bytes: AtomicU64,
    /// Size of the newest snapshot file.
    snapshot_bytes: AtomicU64,
    snapshot_every_events: u64,
    /// Serializes snapshots; holds the sequence number the newest snapshot covers.
    newest_snapshot: Mutex<u64>,
    trigger: Mutex<Trigger>,
    trigger_changed: Condvar,
}

impl Inner {
    fn shard(&self, kind: EntityKind, id: &str) -> &RwLock<Shard> {
        // A fixed hasher: shard choice must not depend on the process (it does not need to
        // resist collisions; the maps inside the shards do).
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one((kind, id));
        #[expect(
            clippy::indexing_slicing,
            reason = "the index is reduced modulo the array's length"
        )]
        &self.shards[(hash % SHARDS as u64) as usize]
    }

    fn request_snapshot(&self) {
        lock(&self.trigger).requested = true;
        self.trigger_changed.notify_one();
    }

    fn count_events(&self, count: usize, bytes: usize) {
        self.unsnapshotted_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let count = count as u64;
        let before = self.unsnapshotted.fetch_add(count, Ordering::Relaxed);
        let every = self.snapshot_every_events;
        if every > 0 && before < every && before + count >= every {
            self.request_snapshot();
        }
    }

    /// Takes a snapshot now (see the module docs). `None`: nothing happened since the newest
    /// snapshot, or (in the background) too little to be worth it.
    fn snapshot(&self, reason: SnapshotReason) -> Result<Option<u64>, StoreError> {
        let mut newest = lock(&self.newest_snapshot);
        if reason == SnapshotReason::Background
            && self.unsnapshotted_bytes.load(Ordering::Relaxed) * 2
                < self.snapshot_bytes.load(Ordering::Relaxed)
        {
            // Less journal than half the newest snapshot: rewriting the whole state now would
            // multiply the bytes written for little shorter replay. Count again from here.
            self.unsnapshotted.store(0, Ordering::Relaxed);
            return Ok(None);
        }
        let (cut, entities) = {
            let shards: Vec<_> = self.shards.iter().map(read).collect();
            if reason == SnapshotReason::Closing {
                self.closed.store(true, Ordering::SeqCst);
            }
            if self.journal.last_seq() == *newest {
                return Ok(None);
            }
            let cut = self.journal.cut()?;
            self.unsnapshotted.store(0, Ordering::Relaxed);
            self.unsnapshotted_bytes.store(0, Ordering::Relaxed);
            let entities: Vec<Arc<Entity>> = shards
                .iter()
                .flat_map(|shard| shard.entities.values().cloned())
                .collect();
            (cut, entities)
        };
        cut.rolled.recv().unwrap_or_else(|_| {
            Err(StoreError::Failed {
                reason: "the journal writer stopped".into(),
            })
        })?;
        let (path, size) = snapshot::write(&self.dir, cut.last_seq, &entities)?;
        *newest = cut.last_seq;
        self.snapshot_bytes.store(size, Ordering::Relaxed);
        tracing::info!(
            snapshot = %path.display(),
            seq = cut.last_seq,
            entities = entities.len(),
            "snapshot written"
        );
        // The writer started `journal-{last_seq + 1}`: every older segment is covered.
        for segment in list_segments(&self.dir)? {
            if segment.first_seq <= cut.last_seq {
                dir::remove_quietly(&segment.path);
            }
        }
        for older in snapshot::list(&self.dir)?.0 {
            if older.seq < cut.last_seq {
                dir::remove_quietly(&older.path);
            }
        }
        Ok(Some(cut.last_seq))
    }
}

/// The snapshot thread: waits for a trigger (count of events, or time) and snapshots.
fn run_snapshots(inner: Arc<Inner>, every: Option<Duration>) {
    loop {
        {
            let deadline = every.map(|every| Instant::now() + every);
            let mut trigger = lock(&inner.trigger);
            loop {
                if trigger.stop {
                    return;
                }
                if trigger.requested {
                    trigger.requested = false;
                    break;
                }
                trigger = match deadline {
                    None => inner
                        .trigger_changed
                        .wait(trigger)
                        .unwrap_or_else(PoisonError::into_inner),
                    Some(deadline) => {
                        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                            break;
                        };
                        inner
                            .trigger_changed
                            .wait_timeout(trigger, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                };
            }
        }
        match inner.snapshot(SnapshotReason::Background) {
            Ok(_) => {}
            Err(StoreError::Closed) => return,
            Err(e) => tracing::error!(
                error = %e,
                "background snapshot failed; the journal still holds every event"
            ),
        }
    }
}

/// The threads and the lock of an open store.
#[derive(Debug)]
struct Running {
    writer: JoinHandle<()>,
    snapshots: JoinHandle<()>,
    /// Holds `DATA/LOCK` until the store is closed or dropped.
    lock: File,
}

/// The default [`TwinStore`]: everything in memory, durable in a data directory.
///
/// Dropping it without [`TwinStore::close`] still writes and syncs everything queued and
/// releases the directory, but takes no final snapshot (the next open replays more).
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// `None` once closed.
    running: Mutex<Option<Running>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("dir", &self.inner.dir)
            .field("last_seq", &self.inner.journal.last_seq())
            .finish_non_exhaustive()
    }
}

/// What recovery rebuilt.
struct Recovered {
    entities: HashMap<EntityKey, Entity>,
    snapshot_seq: u64,
    /// Size of the snapshot file loaded (0: none).
    snapshot_bytes: u64,
    next_seq: u64,
    /// The segment new records go to (created if it does not exist).
    active_segment: PathBuf,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `options.dir`: takes the directory's lock, loads the
    /// newest snapshot and replays the journal after it.
    pub fn open(options: StoreOptions) -> Result<Self, StoreError> {
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io("creating data directory", &dir, e))?;
        let lock_file = dir::lock(&dir)?;
        let started = Instant::now();
        let recovered = recover(&dir)?;
        let active_exists = recovered.active_segment.exists();
        let journal = Arc::new(Journal::new(recovered.next_seq, options.max_queued_bytes));
        let writer = Writer::open(
            journal.clone(),
            WriterOptions {
                group_commit_delay: options.group_commit_delay,
                segment_max_bytes: options.segment_max_bytes,
            },
            &dir,
            recovered.active_segment,
            recovered.next_seq,
        )?;
        if !active_exists {
            dir::sync_dir(&dir)?;
        }
        let entity_count = recovered.entities.len();
        let shards = Box::new(std::array::from_fn(|_| RwLock::default()));
        let inner = Arc::new(Inner {
            dir: dir.clone(),
            shards,
            journal: journal.clone(),
            closed: AtomicBool::new(false),
            policy_writes: AtomicU64::new(0),
            unsnapshotted: AtomicU64::new(0),
            unsnapshotted_bytes: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(recovered.snapshot_bytes),
            snapshot_every_events: options.snapshot_every_events,
            newest_snapshot: Mutex::new(recovered.snapshot_seq),
            trigger: Mutex::new(Trigger::default()),
            trigger_changed: Condvar::new(),
        });
        for (key, entity) in recovered.entities {
            write(inner.shard(key.kind, &key.id)).publish_recovered(key, entity);
        }
        let writer = std::thread::Builder::new()
            .name("thingsgate-journal".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::io("starting the journal writer thread for", &dir, e))?;
        let snapshots = {
            let inner = inner.clone();
            let every = options.snapshot_every;
            std::thread::Builder::new()
                .name("thingsgate-snapshot".into())
                .spawn(move || run_snapshots(inner, every))
        };
        let snapshots = match snapshots {
            Ok(handle) => handle,
            Err(e) => {
                journal.shutdown();
                let _ = writer.join();
                return Err(StoreError::io("starting the snapshot thread for", &dir, e));
            }
        };
        tracing::info!(
            dir = %dir.display(),
            entities = entity_count,
            next_seq = recovered.next_seq,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store opened"
        );
        Ok(EmbeddedStore {
            inner,
            running: Mutex::new(Some(Running {
                writer,
                snapshots,
                lock: lock_file,
            })),
        })
    }

    /// Takes a snapshot now and waits until it is written. `None`: nothing changed since the
    /// newest snapshot.
    pub fn snapshot(&self) -> Result<Option<u64>, StoreError> {
        self.inner.snapshot(SnapshotReason::Requested)
    }

    /// Completes once every write made before this call is durable (or with the journal's
    /// failure): for acknowledging again something whose write may still be on its way.
    /// The sequence number of the last event written (0: none ever).
    pub fn last_seq(&self) -> u64 {
        self.inner.journal.last_seq()
    }

    /// What the journal writer has made durable since the store was opened.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Stops the threads (the writer after writing everything queued) and releases the lock.
    fn stop(&self, running: Running) -> Result<(), StoreError> {
        {
            lock(&self.inner.trigger).stop = true;
            self.inner.trigger_changed.notify_one();
        }
        let _ = running.snapshots.join();
        self.inner.journal.shutdown();
        let joined = running.writer.join();
        drop(running.lock);
        joined.map_err(|_| StoreError::Failed {
            reason: "the journal writer panicked".into(),
        })
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Some(running) = lock(&self.running).take()
            && let Err(e) = self.stop(running)
        {
            tracing::error!(error = %e, "store dropped after a failure");
        }
    }
}

impl EmbeddedStore {
    /// A counter that moves on every policy write (create, change, delete), after the new
    /// state is visible. A compiled policy found current at generation `g` is still current
    /// while the generation reads `g`: caches check it instead of the policy's revision.
    pub fn policy_generation(&self) -> u64 {
        self.inner.policy_writes.load(Ordering::Acquire)
    }
}

impl TwinStore for EmbeddedStore {
    fn get(&self, key: &EntityKey) -> Option<Arc<Entity>> {
        read(self.inner.shard(key.kind, &key.id))
            .entities
            .get(key)
            .cloned()
    }

    fn thing_policy_id(&self, thing_id: &str) -> Option<Arc<str>> {
        read(self.inner.shard(EntityKind::Thing, thing_id))
            .thing_policies
            .get(thing_id)
            .cloned()
    }

    fn keys(&self, kind: EntityKind) -> Vec<EntityKey> {
        let mut keys = Vec::new();
        for shard in self.inner.shards.iter() {
            keys.extend(
                read(shard)
                    .entities
                    .keys()
                    .filter(|key| key.kind == kind)
                    .cloned(),
            );
        }
        keys
    }

    fn write_dyn(
        &self,
        key: &EntityKey,
        decide: &mut dyn FnMut(Option<&Entity>) -> Vec<Event>,
    ) -> Result<Written, StoreError> {
        let inner = &*self.inner;
        let mut shard = write(inner.shard(key.kind, &key.id));
        if inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        if let Some(failure) = inner.journal.failure() {
            return Err(failure);
        }
        let current = shard.entities.get(key);
        let events = decide(current.map(|entity| &**entity));
        if events.is_empty() {
            return Ok(Written {
                events,
                entity: current.cloned(),
                durable: Durable::nothing_written(),
            });
        }
        let too_large = |size| StoreError::TooLarge {
            key: key.to_string(),
            size,
            max: MAX_PAYLOAD,
        };
        let apply_error = |source| StoreError::Apply {
            key: key.to_string(),
            source,
        };
        let mut records = Encoded::default();
        for event in &events {
            if event.key != *key {
                return Err(StoreError::ForeignEvent {
                    key: key.to_string(),
                    event_key: event.key.to_string(),
                });
            }
            let start =
                put_record(&mut records.bytes, |out| put_event(out, event)).map_err(too_large)?;
            records.starts.push(start);
        }
        let bytes = records.bytes.len();
        // The common case, one event on an entity no reader holds: checked, journaled, then
        // changed in place (no copy of the document, no drop of the old one). Otherwise the
        // events are applied to a copy, which replaces the state once journaled.
        let in_place = match (events.as_slice(), shard.entities.get_mut(key)) {
            ([event], Some(slot)) => Arc::get_mut(slot).map(|entity| (event, entity)),
            _ => None,
        };
        let (durable, entity) = if let Some((event, entity)) = in_place {
            let prepared = entity.prepare(event).map_err(apply_error)?;
            let durable = inner.journal.append(records)?;
            if entity.commit(prepared) {
                shard.reindex(key);
                (durable, shard.entities.get(key).cloned())
            } else {
                shard.publish(key, None);
                (durable, None)
            }
        } else {
            let mut state = shard.entities.get(key).map(|entity| Entity::clone(entity));
            for event in &events {
                state = Entity::apply(state, event).map_err(apply_error)?;
            }
            let durable = inner.journal.append(records)?;
            let entity = state.map(Arc::new);
            shard.publish(key, entity.clone());
            (durable, entity)
        };
        if key.kind == EntityKind::Policy {
            // After the new state is visible, still under the shard's lock: whoever reads the
            // new generation finds the new policy.
            inner.policy_writes.fetch_add(1, Ordering::AcqRel);
        }
        drop(shard);
        inner.count_events(events.len(), bytes);
        Ok(Written {
            events,
            entity,
            durable: Durable::new(durable),
        })
    }

    fn durable_so_far(&self) -> Durable {
        match self.inner.journal.barrier() {
            Ok(receiver) => Durable::new(receiver),
            Err(e) => Durable::failed(e),
        }
    }

    fn policy_generation(&self) -> u64 {
        self.inner.policy_writes.load(Ordering::Acquire)
    }

    fn journal_stats(&self) -> Option<JournalStats> {
        Some(self.inner.journal.stats())
    }

    fn close(&self) -> Result<(), StoreError> {
        let Some(running) = lock(&self.running).take() else {
            return Ok(());
        };
        {
            lock(&self.inner.trigger).stop = true;
            self.inner.trigger_changed.notify_one();
        }
        let snapshot = self.inner.snapshot(SnapshotReason::Closing);
        self.inner.closed.store(true, Ordering::SeqCst);
        let stopped = self.stop(running);
        let failure = self.inner.journal.failure();
        snapshot?;
        stopped?;
        failure.map_or(Ok(()), Err)
    }
}

/// Rebuilds the state from the newest usable snapshot and the journal after it, truncates a
/// torn tail, and removes files that are no longer needed.
fn recover(dir: &Path) -> Result<Recovered, StoreError> {
    let (snapshots, unfinished) = snapshot::list(dir)?;
    for path in unfinished {
        dir::remove_quietly(&path);
    }
    let segments = list_segments(dir)?;
    let journal_start = segments.first().map(|s| s.first_seq);
    // Whether the journal still holds every record after `seq`.
    let reaches_back_to = |seq: u64| journal_start.is_some_and(|start| start <= seq + 1);

    let mut base = None;
    let mut damaged: Option<(StoreError, u64)> = None;
    for file in &snapshots {
        if damaged.is_some() && !reaches_back_to(file.seq) {
            break;
        }
        match snapshot::load(file) {
            Ok(entities) => {
                base = Some((file, entities));
                break;
            }
            Err(e) => {
                tracing::warn!(snapshot = %file.path.display(), error = %e, "snapshot unreadable");
                damaged.get_or_insert((e, file.seq));
            }
        }
    }
    let (snapshot_seq, snapshot_bytes, mut entities) = match base {
        Some((file, entities)) => {
            let size = std::fs::metadata(&file.path).map_or(0, |m| m.len());
            (file.seq, size, entities)
        }
        None => match damaged {
            Some((e, _)) if !reaches_back_to(0) => return Err(e),
            _ => (0, 0, HashMap::new()),
        },
    };

    let covered = segments
        .iter()
        .skip(1)
        .take_while(|next| next.first_seq <= snapshot_seq + 1)
        .count();
    let live = segments.get(covered..).unwrap_or_default();
    let next_seq = replay(live, snapshot_seq, &mut entities)?;

    if let Some((e, damaged_seq)) = damaged {
        if next_seq <= damaged_seq {
            // The journal does not reach as far as the damaged snapshot did.
            return Err(e);
        }
        tracing::warn!(
            from = snapshot_seq,
            "recovered from an older snapshot and the journal instead of a damaged snapshot"
        );
    }
    for segment in segments.get(..covered).unwrap_or_default() {
        dir::remove_quietly(&segment.path);
    }
    for older in snapshots.iter().filter(|s| s.seq < snapshot_seq) {
        dir::remove_quietly(&older.path);
    }
    let active_segment = match live.last() {
        Some(last) => last.path.clone(),
        None => dir.join(journal::segment_name(next_seq)),
    };
    Ok(Recovered {
        entities,
        snapshot_seq,
        snapshot_bytes,
        next_seq,
        active_segment,
    })
}

/// Replays the records after `snapshot_seq` from `segments` (the first one must reach back to
/// `snapshot_seq + 1`), truncating a torn tail of the last one. Returns the next sequence
/// number.
fn replay(
    segments: &[Segment],
    snapshot_seq: u64,
    entities: &mut HashMap<EntityKey, Entity>,
) -> Result<u64, StoreError> {
    let first_needed = snapshot_seq + 1;
    let mut expected = match segments.first() {
        Some(first) if first.first_seq > first_needed => {
            return Err(StoreError::JournalGap {
                path: first.path.clone(),
                reason: format!(
                    "the journal starts at sequence number {}, but the state is only known up \
                     to {snapshot_seq}",
                    first.first_seq
                ),
            });
        }
        Some(first) => first.first_seq,
        None => first_needed,
    };
    for (i, segment) in segments.iter().enumerate() {
        if segment.first_seq != expected {
            return Err(StoreError::JournalGap {
                path: segment.path.clone(),
                reason: format!(
                    "the segment starts at sequence number {}, but the previous one ends \
                     before {expected}",
                    segment.first_seq
                ),
            });
        }
        let bytes = std::fs::read(&segment.path)
            .map_err(|e| StoreError::io("reading journal segment", &segment.path, e))?;
        let is_last = i + 1 == segments.len();
        let end = scan_segment(segment, &bytes, is_last, |offset, seq, payload| {
            if seq <= snapshot_seq {
                return Ok(());
            }
            let event = decode_event(payload).map_err(|reason| StoreError::CorruptJournal {
                path: segment.path.clone(),
                offset,
                reason: format!("undecodable record {seq}: {reason}"),
            })?;
            let current = entities.remove(&event.key);
            let next = Entity::apply(current, &event).map_err(|source| StoreError::Replay {
                path: segment.path.clone(),
                offset,
                source,
            })?;
            if let Some(next) = next {
                entities.insert(event.key, next);
            }
            Ok(())
        })?;
        expected = end.next_seq;
        if let Some(torn) = end.torn {
            tracing::warn!(
                file = %segment.path.display(),
                offset = torn.offset,
                reason = torn.reason,
                "truncating a torn record at the end of the journal (a write that was never \
                 acknowledged)"
            );
            truncate(&segment.path, torn.offset)?;
        }
    }
    if expected < first_needed {
        let path = segments
            .last()
            .map_or_else(PathBuf::new, |segment| segment.path.clone());
        return Err(StoreError::JournalGap {
            path,
            reason: format!(
                "the journal ends before sequence number {first_needed}, which a snapshot \
                 already covers"
            ),
        });
    }
    Ok(expected)
}

fn truncate(path: &Path, len: u64) -> Result<(), StoreError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|file| {
            file.set_len(len)?;
            file.sync_all()
        })
        .map_err(|e| StoreError::io("truncating journal segment", path, e))
}
