//! Group commit: many appenders, one writer thread, one `fsync` per batch.
//!
//! Appenders encode their records themselves (outside any lock but their entity's shard
//! lock), then, under the queue's mutex, get consecutive sequence numbers, seal the record
//! headers, copy the bytes onto the queue and leave a completion sender. The queue is a
//! mutex-protected buffer rather than a channel of messages because sequence numbers must
//! reach the file in the order they were handed out: assigning them and queueing the bytes in
//! one critical section guarantees it, and lets the writer take a whole batch by swapping one
//! buffer.
//!
//! # The group-commit rule
//! The writer thread sleeps until something is queued, then takes *everything* queued (the
//! natural batch: whatever arrived during the previous `fsync`), writes it with one
//! `write_all`, calls `sync_data` once and completes every waiter of the batch. Before taking
//! a batch it may wait to let it grow, but only when the **previous batch held more than one
//! write** (concurrent writers are active): then it waits until as many writes are queued as
//! the previous batch held, or until `group_commit_delay` has passed, whichever comes first. A
//! lone sequential writer therefore never pays an added delay, and concurrent writers pay at
//! most `group_commit_delay`, usually far less (the wait ends as soon as they are all back).
//!
//! # Failure
//! The first I/O error fails the journal for good: the batch and everything queued are
//! completed with [`StoreError::Failed`], and every later append is refused with it. We never
//! retry an `fsync` (after a failed `fsync` Linux may have dropped the dirty pages; a retry
//! could report success for data that is gone). Reopening the store recovers exactly what was
//! made durable.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::dir;
use super::error::StoreError;
use super::journal::{seal_record, segment_name};

/// Completes one write: `Ok` once its records are on disk.
pub(crate) type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// The shared queue between appenders and the writer thread.
#[derive(Debug)]
pub(crate) struct Journal {
    queue: Mutex<Queue>,
    /// Wakes the writer: a write arrived (see `Queue::wake_at`), a roll or shutdown was asked.
    work: Condvar,
    /// Wakes appenders that wait for room in the queue.
    room: Condvar,
    /// Appenders wait while this many bytes are queued (backpressure when the disk is slower
    /// than the writers).
    max_queued_bytes: usize,
    /// Mirrors `Queue::failed.is_some()`, so writers can check without taking the mutex.
    has_failed: AtomicBool,
    /// Counters of what the writer made durable (for metrics and benchmarks).
    batches: AtomicU64,
    writes: AtomicU64,
    bytes: AtomicU64,
    /// How long each batch's write and `fsync` took, and how many writes it held.
    sync_micros: Buckets,
    batch_writes: Buckets,
}

/// Upper bounds of the `fsync` latency buckets, in microseconds.
pub const SYNC_MICROS_BOUNDS: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];
/// Upper bounds of the batch-size buckets, in writes.
pub const BATCH_WRITES_BOUNDS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024];

/// A histogram of counts by upper bound (the last slot: above every bound), with its sum.
#[derive(Debug, Default)]
struct Buckets {
    counts: [AtomicU64; 11],
    sum: AtomicU64,
}

impl Buckets {
    fn observe(&self, bounds: &[u64; 10], value: u64) {
        let slot = bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(bounds.len());
        if let Some(count) = self.counts.get(slot) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ([u64; 11], u64) {
        let mut counts = [0; 11];
        for (out, count) in counts.iter_mut().zip(&self.counts) {
            *out = count.load(Ordering::Relaxed);
        }
        (counts, self.sum.load(Ordering::Relaxed))
    }
}

/// What the journal writer has made durable since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Batches written, each with one `fsync`.
    pub batches: u64,
    /// Writes (calls that appended events) completed.
    pub writes: u64,
    pub bytes: u64,
    /// Batches by how long their write and `fsync` took: counts per bucket of
    /// [`SYNC_MICROS_BOUNDS`] (the last: longer), and the sum in microseconds.
    pub sync_micros: ([u64; 11], u64),
    /// Batches by how many writes they held ([`BATCH_WRITES_BOUNDS`]), and the sum.
    pub batch_writes: ([u64; 11], u64),
}

#[derive(Debug)]
struct Queue {
    bytes: Vec<u8>,
    waiters: Vec<Waiter>,
    /// The sequence number the next record gets.
    next_seq: u64,
    roll: Option<Roll>,
    shutdown: bool,
    failed: Option<Arc<str>>,
    /// The writer sleeps and wants to be woken once this many writes are queued; 0 while it is
    /// busy (it looks at the queue again before sleeping), so appenders skip the wake-up call.
    wake_at: usize,
}

/// A request to start a new segment after the first `at` queued bytes (whose last record
/// has sequence number `last_seq`).
#[derive(Debug)]
struct Roll {
    at: usize,
    last_seq: u64,
    done: SyncSender<Result<(), StoreError>>,
}

/// Records encoded by an appender, headers not yet sealed.
#[derive(Debug, Default)]
pub(crate) struct Encoded {
    pub(crate) bytes: Vec<u8>,
    /// Where each record's header starts in `bytes`.
    pub(crate) starts: Vec<usize>,
}

/// A consistent cut of the journal (see [`Journal::cut`]).
#[derive(Debug)]
pub(crate) struct Cut {
    /// The last sequence number queued before the cut.
    pub(crate) last_seq: u64,
    /// Answers once every record up to `last_seq` is durable and later records go to a new
    /// segment `journal-{last_seq + 1}`.
    pub(crate) rolled: Receiver<Result<(), StoreError>>,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // INVARIANT: no code panics while holding the queue lock with the queue half-updated, so
    // a poisoned lock still guards a consistent queue.
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

fn failed(reason: &Arc<str>) -> StoreError {
    StoreError::Failed {
        reason: reason.clone(),
    }
}

impl Journal {
    pub(crate) fn new(next_seq: u64, max_queued_bytes: usize) -> Self {
        Journal {
            queue: Mutex::new(Queue {
                bytes: Vec::new(),
                waiters: Vec::new(),
                next_seq,
                roll: None,
                shutdown: false,
                failed: None,
                wake_at: 0,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            max_queued_bytes,
            has_failed: AtomicBool::new(false),
            batches: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sync_micros: Buckets::default(),
            batch_writes: Buckets::default(),
        }
    }

    pub(crate) fn stats(&self) -> JournalStats {
        JournalStats {
            batches: self.batches.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            sync_micros: self.sync_micros.snapshot(),
            batch_writes: self.batch_writes.snapshot(),
        }
    }

    /// The reason the journal failed, if it did.
    pub(crate) fn failure(&self) -> Option<StoreError> {
        if !self.has_failed.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.queue).failed.as_ref().map(failed)
    }

    /// Queues `records` (non-empty) under consecutive sequence numbers; the returned receiver
    /// completes once they are durable. Blocks while the queue is over its byte limit.
    pub(crate) fn append(
        &self,
        mut records: Encoded,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let mut queue = lock(&self.queue);
        loop {
            if let Some(reason) = &queue.failed {
                return Err(failed(reason));
            }
            if queue.shutdown {
                return Err(StoreError::Closed);
            }
            if queue.bytes.len() < self.max_queued_bytes {
                break;
            }
            queue = self
                .room
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        for &start in &records.starts {
            seal_record(&mut records.bytes, start, queue.next_seq);
            queue.next_seq = queue.next_seq.saturating_add(1);
        }
        queue.bytes.extend_from_slice(&records.bytes);
        let (done, durable) = oneshot::channel();
        queue.waiters.push(done);
        if queue.wake_at != 0 && queue.waiters.len() >= queue.wake_at {
            self.work.notify_one();
        }
        Ok(durable)
    }

    /// A waiter that completes once everything queued before it is durable (it adds no record;
    /// waiters complete in queue order, batch after batch).
    pub(crate) fn barrier(&self) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let mut queue = lock(&self.queue);
        if let Some(reason) = &queue.failed {
            return Err(failed(reason));
        }
        if queue.shutdown {
            return Err(StoreError::Closed);
        }
        let (done, durable) = oneshot::channel();
        queue.waiters.push(done);
        if queue.wake_at != 0 && queue.waiters.len() >= queue.wake_at {
            self.work.notify_one();
        }
        Ok(durable)
    }

    /// The sequence number of the last record queued (0: none yet).
    pub(crate) fn last_seq(&self) -> u64 {
        lock(&self.queue).next_seq.saturating_sub(1)
    }

    /// Marks a cut after everything queued so far. The caller must keep appenders out while it
    /// calls this (it holds every shard lock), so that the cut is consistent with the state.
    pub(crate) fn cut(&self) -> Result<Cut, StoreError> {
        let mut queue = lock(&self.queue);
        if let Some(reason) = &queue.failed {
            return Err(failed(reason));
        }
        if queue.shutdown {
            return Err(StoreError::Closed);
        }
        let (done, rolled) = sync_channel(1);
        let last_seq = queue.next_seq.saturating_sub(1);
        let at = queue.bytes.len();
        if let Some(earlier) = queue.roll.replace(Roll { at, last_seq, done }) {
            // Snapshots are serialized and wait for their roll, so this does not happen; if it
            // did, refusing the earlier cut is safe (its snapshot is simply not written).
            let _ = earlier.done.send(Err(StoreError::Failed {
                reason: "a journal roll was superseded".into(),
            }));
        }
        self.work.notify_one();
        Ok(Cut { last_seq, rolled })
    }

    /// Asks the writer to write what is queued and stop. New appends are refused.
    pub(crate) fn shutdown(&self) {
        lock(&self.queue).shutdown = true;
        self.work.notify_one();
        self.room.notify_all();
    }

    /// Fails the journal: completes everything queued with the error, refuses later appends.
    fn fail(&self, reason: Arc<str>, batch: &mut Vec<Waiter>, roll: Option<Roll>) {
        tracing::error!(%reason, "journal failed; the store accepts no more writes");
        let (queued, pending_roll) = {
            let mut queue = lock(&self.queue);
            queue.failed.get_or_insert_with(|| reason.clone());
            self.has_failed.store(true, Ordering::Release);
            queue.bytes = Vec::new();
            (std::mem::take(&mut queue.waiters), queue.roll.take())
        };
        self.room.notify_all();
        for waiter in batch.drain(..).chain(queued) {
            let _ = waiter.send(Err(failed(&reason)));
        }
        for roll in roll.into_iter().chain(pending_roll) {
            let _ = roll.done.send(Err(failed(&reason)));
        }
    }
}

/// Tuning of the writer thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterOptions {
    pub(crate) group_commit_delay: Duration,
    /// A segment that reached this size is followed by a new one before the next batch.
    pub(crate) segment_max_bytes: u64,
}

/// The writer thread's state: it alone owns the segment file.
#[derive(Debug)]
pub(crate) struct Writer {
    journal: Arc<Journal>,
    options: WriterOptions,
    dir: PathBuf,
    file: File,
    path: PathBuf,
    /// Bytes in the current segment.
    segment_len: u64,
    /// The sequence number of the next record the writer will write.
    next_seq: u64,
    /// Bytes written but not yet `fsync`ed.
    dirty: bool,
    /// How many writes the previous batch held (drives the group-commit wait).
    previous_batch: usize,
}

/// What the writer took from the queue at once.
struct Batch {
    waiters: Vec<Waiter>,
    roll: Option<Roll>,
    /// The queue's next sequence number when the batch was taken.
    end_seq: u64,
}

impl Writer {
    /// Opens the active segment `path` (appending after its `segment_len` bytes), whose next
    /// record gets `next_seq`.
    pub(crate) fn open(
        journal: Arc<Journal>,
        options: WriterOptions,
        dir: &Path,
        path: PathBuf,
        next_seq: u64,
    ) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("opening journal segment", &path, e))?;
        let segment_len = file
            .metadata()
            .map_err(|e| StoreError::io("reading journal segment", &path, e))?
            .len();
        Ok(Writer {
            journal,
            options,
            dir: dir.to_path_buf(),
            file,
            path,
            segment_len,
            next_seq,
            dirty: false,
            previous_batch: 0,
        })
    }

    /// The writer thread's loop: runs until shutdown (after writing everything queued) or the
    /// first I/O error.
    pub(crate) fn run(mut self) {
        let journal = self.journal.clone();
        // Should this thread end any other way (a bug), appenders must not queue forever.
        let _guard = FailOnExit(journal.clone());
        let mut bytes = Vec::new();
        let mut waiters = Vec::new();
        while let Some(mut batch) = self.take(&mut bytes, &mut waiters) {
            let roll_at = batch.roll.as_ref().map(|r| (r.at, r.last_seq));
            let started = Instant::now();
            match self.commit(&bytes, roll_at, batch.end_seq) {
                Ok(()) => {
                    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    journal.sync_micros.observe(&SYNC_MICROS_BOUNDS, micros);
                    journal
                        .batch_writes
                        .observe(&BATCH_WRITES_BOUNDS, batch.waiters.len() as u64);
                    journal.batches.fetch_add(1, Ordering::Relaxed);
                    journal
                        .writes
                        .fetch_add(batch.waiters.len() as u64, Ordering::Relaxed);
                    journal
                        .bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    for waiter in batch.waiters.drain(..) {
                        // The receiver may be gone (nobody waits); that is fine.
                        let _ = waiter.send(Ok(()));
                    }
                    if let Some(roll) = batch.roll {
                        let _ = roll.done.send(Ok(()));
                    }
                }
                Err(e) => {
                    journal.fail(e.to_string().into(), &mut batch.waiters, batch.roll);
                    return;
                }
            }
            bytes.clear();
            waiters = batch.waiters;
        }
    }

    /// Waits for work and takes it (see the group-commit rule); `None` once shut down and
    /// drained. `bytes` and `spare` are empty buffers to swap in (their capacity is reused).
    fn take(&mut self, bytes: &mut Vec<u8>, spare: &mut Vec<Waiter>) -> Option<Batch> {
        let journal = &*self.journal;
        let mut queue = lock(&journal.queue);
        while queue.waiters.is_empty() && queue.roll.is_none() {
            if queue.shutdown || queue.failed.is_some() {
                return None;
            }
            queue.wake_at = 1;
            queue = journal
                .work
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if self.previous_batch > 1 && !self.options.group_commit_delay.is_zero() {
            let deadline = Instant::now() + self.options.group_commit_delay;
            while queue.waiters.len() < self.previous_batch
                && queue.roll.is_none()
                && !queue.shutdown
            {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                queue.wake_at = self.previous_batch;
                queue = journal
                    .work
                    .wait_timeout(queue, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        queue.wake_at = 0;
        let was_full = queue.bytes.len() >= journal.max_queued_bytes;
        std::mem::swap(bytes, &mut queue.bytes);
        let mut waiters = std::mem::take(spare);
        std::mem::swap(&mut waiters, &mut queue.waiters);
        let batch = Batch {
            waiters,
            roll: queue.roll.take(),
            end_seq: queue.next_seq,
        };
        drop(queue);
        if was_full {
            journal.room.notify_all();
        }
        self.previous_batch = batch.waiters.len();
        Some(batch)
    }

    /// Writes one batch and makes it durable; with a roll at `(at, last_seq)`, the bytes
    /// before `at` end the current segment and the rest start `journal-{last_seq + 1}`.
    fn commit(
        &mut self,
        bytes: &[u8],
        roll_at: Option<(usize, u64)>,
        end_seq: u64,
    ) -> Result<(), StoreError> {
        match roll_at {
            Some((at, last_seq)) => {
                let (before, after) = bytes.split_at_checked(at).unwrap_or((bytes, &[]));
                self.write(before)?;
                if self.segment_len > 0 {
                    self.start_segment(last_seq.saturating_add(1))?;
                }
                self.write(after)?;
            }
            None => {
                if self.segment_len >= self.options.segment_max_bytes && !bytes.is_empty() {
                    self.start_segment(self.next_seq)?;
                }
                self.write(bytes)?;
            }
        }
        self.sync()?;
        self.next_seq = end_seq;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(bytes)
            .map_err(|e| StoreError::io("writing journal segment", &self.path, e))?;
        self.segment_len += bytes.len() as u64;
        self.dirty = true;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if self.dirty {
            self.file
                .sync_data()
                .map_err(|e| StoreError::io("syncing journal segment", &self.path, e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Ends the current segment (durably) and starts `journal-{first_seq}`, whose directory
    /// entry is made durable before any record in it is acknowledged.
    fn start_segment(&mut self, first_seq: u64) -> Result<(), StoreError> {
        self.sync()?;
        let path = self.dir.join(segment_name(first_seq));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("creating journal segment", &path, e))?;
        dir::sync_dir(&self.dir)?;
        tracing::debug!(segment = %path.display(), "journal segment started");
        self.file = file;
        self.path = path;
        self.segment_len = 0;
        Ok(())
    }
}

/// Fails the journal when the writer thread ends without a clean shutdown.
struct FailOnExit(Arc<Journal>);

impl Drop for FailOnExit {
    fn drop(&mut self) {
        let clean = {
            let queue = lock(&self.0.queue);
            (queue.shutdown && queue.waiters.is_empty()) || queue.failed.is_some()
        };
        if !clean {
            self.0
                .fail("the journal writer stopped".into(), &mut Vec::new(), None);
        }
    }
}
