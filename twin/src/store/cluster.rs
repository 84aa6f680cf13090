//! The cluster store (DESIGN.md §6): several Thingsgate nodes share their entities through a
//! NATS JetStream stream, behind the same [`TwinStore`] trait as the embedded store, so the
//! core and the adapters do not know which one they run on.
//!
//! # Layout in JetStream
//! One stream (default `THINGSGATE`, R1 or R3) with one subject per entity:
//! `{STREAM}.{kind}.{id}`, the ID escaped into one token (bytes outside `[A-Za-z0-9-]` as
//! `_HH`). A message is one write: its events and the entity's whole state after them (none:
//! deleted), so the last message of a subject is the entity (`max_msgs_per_subject` keeps a
//! short history). Headers: `Nats-Msg-Id` (node + write number: a resend after a lost ack is
//! deduplicated and answered with the original ack), `Tg-Node` (the writer), and
//! `Nats-Expected-Last-Subject-Sequence`.
//!
//! DESIGN.md names KV buckets for policies and solutions. A KV bucket *is* a stream with one
//! subject per key read by a last-per-subject consumer; we keep every kind in one stream
//! instead, so that every node sees all changes — a policy and the thing moved to it, a
//! solution and its policy — in one total order, through one consumer.
//!
//! # Optimistic concurrency
//! Every node keeps all entities in memory (the hot path never waits for the network to
//! read), each with the stream sequence of the state it holds. A write decides on that state
//! and appends with `Nats-Expected-Last-Subject-Sequence` = that sequence; if another node
//! wrote in between, JetStream refuses the append (error 10071; 10164 on servers ≥ 2.11
//! while another append of the subject is in flight) and nothing is stored. The store then
//! reloads the entity from the stream leader and completes the write's [`Durable`] with
//! [`StoreError::Conflict`]; the broker decides again on the reloaded state. So two nodes
//! racing on one thing never both win, and no acknowledged write is lost.
//!
//! Writes of one entity on one node are pipelined: the state is applied in memory at once
//! (as in the embedded store, readers may see it before it is durable), and each append
//! waits for its predecessor's ack to learn its expected sequence. If an append fails, every
//! write decided on top of it fails too (their expected sequence was never stored).
//!
//! Per entity: `seq` and `base` are the last state known stored (acked, or read from the
//! stream); `state` is `base` plus this node's writes in flight. `epoch` moves whenever
//! `state` is replaced from outside (another node's change, a reload), which detaches writes
//! in flight: their acks then no longer touch the entity.
//!
//! # Durability
//! A write completes `Ok` only after JetStream acked it: on R1 the message is in the server's
//! file store (it survives kill -9 of the server, not power loss within its fsync interval);
//! on R3 it is on a quorum. Every call runs under a timeout and is retried with the same
//! message ID until the write deadline; a write that cannot be stored completes with
//! [`StoreError::Unavailable`], and nothing was acknowledged.
//!
//! # Watching
//! One ordered consumer over `{STREAM}.>` loads every entity at open (last message per
//! subject) and then follows the stream: another node's change replaces the entity here and
//! is handed to the [`ChangeListener`] (events to this node's subscribers, solutions
//! reloaded). The store is **current** only while it is connected and its consumer has seen
//! everything the stream held a moment ago (checked every 250 ms against the stream's last
//! sequence); otherwise [`TwinStore::current`] says why, writes are refused, and the broker
//! refuses checks it cannot prove current (fail closed). The consumer lives on one NATS
//! server, in memory: whenever the connection is made again, and whenever the check finds it
//! stalled, the store creates it again from the last message it handled.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use super::codec::{self, Reader, decode_entity, decode_event, put_entity, put_event};
use super::writer::JournalStats;
use super::{ChangeListener, Durable, StoreError, TwinStore, Written};
use crate::entity::{Entity, EntityKey, EntityKind, Event};

const SHARDS: usize = 64;
/// The message format's version byte.
const FORMAT: u8 = 1;
const NODE_HEADER: &str = "Tg-Node";

/// Settings of a [`ClusterStore`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// NATS server URLs (`nats://host:port`), any of the cluster's servers.
    pub urls: Vec<String>,
    /// The stream's name; also the first token of its subjects. Nodes of one cluster use the
    /// same name; other names are separate clusters on the same NATS.
    pub stream: String,
    /// Replicas of the stream when this node creates it (1, or 3 on a NATS cluster).
    pub replicas: usize,
    /// The timeout of each call to NATS.
    pub call_timeout: Duration,
    /// How long a write is retried (same message ID) before it fails as unavailable.
    pub write_deadline: Duration,
    /// The longest the consumer may lag behind the stream's last sequence before the store
    /// stops being current.
    pub max_lag: Duration,
}

impl ClusterOptions {
    pub fn new(urls: Vec<String>) -> Self {
        ClusterOptions {
            urls,
            stream: "THINGSGATE".to_owned(),
            replicas: 1,
            call_timeout: Duration::from_secs(2),
            write_deadline: Duration::from_secs(20),
            max_lag: Duration::from_secs(1),
        }
    }
}

/// One entity as this node knows it.
#[derive(Debug, Default)]
struct Slot {
    /// What readers see: `base` plus this node's writes in flight.
    state: Option<Arc<Entity>>,
    /// The last state known stored, at stream sequence `seq` (0: never stored).
    base: Option<Arc<Entity>>,
    seq: u64,
    /// Moves whenever `state` is replaced from outside (another node, a reload).
    epoch: u64,
    /// The newest write in flight on this node: (its number, what it will tell its successor).
    tail: Option<(u64, oneshot::Receiver<Result<u64, ()>>)>,
}

#[derive(Debug, Default)]
struct Shard {
    slots: HashMap<EntityKey, Slot, foldhash::fast::RandomState>,
    thing_policies: HashMap<Box<str>, Arc<str>, foldhash::fast::RandomState>,
}

impl Shard {
    fn reindex(&mut self, key: &EntityKey) {
        if key.kind != EntityKind::Thing {
            return;
        }
        let policy_id = self
            .slots
            .get(key)
            .and_then(|s| s.state.as_ref())
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

    /// Replaces the entity from outside (another node's change, a reload): writes in flight
    /// are detached.
    fn replace(&mut self, key: &EntityKey, state: Option<Arc<Entity>>, seq: u64) {
        let slot = self.slots.entry(key.clone()).or_default();
        slot.state = state.clone();
        slot.base = state;
        slot.seq = seq;
        slot.epoch += 1;
        slot.tail = None;
        self.reindex(key);
    }
}

/// Whether the store can decide now, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Current,
    Behind(String),
}

/// Writes in flight, for [`TwinStore::durable_so_far`].
#[derive(Debug, Default)]
struct Outstanding {
    next: u64,
    in_flight: std::collections::BTreeSet<u64>,
}

struct Inner {
    options: ClusterOptions,
    node: String,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    runtime: tokio::runtime::Handle,
    shards: Box<[RwLock<Shard>]>,
    hasher: foldhash::fast::RandomState,
    policy_generation: AtomicU64,
    writes: AtomicU64,
    outstanding: Mutex<Outstanding>,
    /// All writes numbered below this are complete.
    low_water: watch::Sender<u64>,
    health: RwLock<Health>,
    /// The stream sequence of the last message the consumer handled.
    seen: AtomicU64,
    /// Moves when the consumer must be created again, from `seen` + 1: the connection to NATS
    /// was made again (the server may have lost the consumer: an R1 server restarted, or the
    /// server holding it is gone), or the freshness check found it stalled.
    /// (How many times, and why the last time.)
    resume: watch::Sender<(u64, &'static str)>,
    closed: AtomicBool,
    listener: RwLock<Option<Arc<dyn ChangeListener>>>,
    /// First attempts of appends whose expected sequence is known, published in the order
    /// they were written by one task (so one node's writes of different entities reach the
    /// stream in that order: a new policy before the thing that names it).
    submit: tokio::sync::mpsc::UnboundedSender<Submit>,
}

/// A first attempt for the ordered submitter: the publish, and where its ack future goes.
struct Submit {
    subject: String,
    message: jetstream::message::PublishMessage,
    sent: oneshot::Sender<SubmitResult>,
}

type SubmitResult = Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError>;

/// The cluster store: see the module docs.
#[derive(Clone)]
pub struct ClusterStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for ClusterStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterStore")
            .field("stream", &self.inner.options.stream)
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

fn unavailable(reason: impl fmt::Display) -> StoreError {
    StoreError::Unavailable {
        reason: reason.to_string(),
    }
}

/// One token of a subject for an entity ID: bytes outside `[A-Za-z0-9-]` as `_HH`.
pub fn subject_token(id: &str) -> String {
    let mut out = String::with_capacity(id.len() + 8);
    for &b in id.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push('_');
            out.push_str(&format!("{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

fn subject(stream: &str, key: &EntityKey) -> String {
    format!("{stream}.{}.{}", key.kind.as_str(), subject_token(&key.id))
}

/// The entity of a subject made by [`subject`] (`None` for any other subject).
fn key_of_subject(stream: &str, subject: &str) -> Option<EntityKey> {
    let (kind, token) = subject
        .strip_prefix(stream)?
        .strip_prefix('.')?
        .split_once('.')?;
    let kind = EntityKind::parse(kind)?;
    let mut id = Vec::with_capacity(token.len());
    if token != "_" {
        // (`_` alone is the empty ID.)
        let mut bytes = token.bytes();
        while let Some(b) = bytes.next() {
            if b == b'_' {
                let hex = [bytes.next()?, bytes.next()?];
                id.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            } else {
                id.push(b);
            }
        }
    }
    Some(EntityKey::new(kind, String::from_utf8(id).ok()?))
}

/// One stored write: its events and the entity after them.
fn encode(events: &[Event], state: Option<&Entity>) -> Option<Vec<u8>> {
    let mut out = vec![FORMAT];
    out.extend_from_slice(&u32::try_from(events.len()).ok()?.to_le_bytes());
    for event in events {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        if !put_event(&mut out, event) {
            return None;
        }
        let len = u32::try_from(out.len() - at - 4).ok()?;
        out.get_mut(at..at + 4)?.copy_from_slice(&len.to_le_bytes());
    }
    match state {
        None => out.push(0),
        Some(entity) => {
            out.push(1);
            if !put_entity(&mut out, entity) {
                return None;
            }
        }
    }
    Some(out)
}

type Decoded = (Vec<Event>, Option<Entity>);

fn decode(bytes: &[u8]) -> Result<Decoded, codec::DecodeError> {
    let mut r = Reader { bytes };
    let version = r.u8()?;
    if version != FORMAT {
        return Err(format!("unknown message format {version}"));
    }
    let count = r.u32()?;
    let mut events = Vec::new();
    for _ in 0..count {
        let len = usize::try_from(r.u32()?).map_err(|e| e.to_string())?;
        events.push(decode_event(r.take(len)?)?);
    }
    let state = match r.u8()? {
        0 => None,
        1 => Some(decode_entity(r.bytes)?),
        other => return Err(format!("invalid state marker {other}")),
    };
    Ok((events, state))
}

/// Whether a publish error says another writer got there first: 10071 (`WrongLastSequence`)
/// or, on servers ≥ 2.11, 10164 (another append of the subject in flight), which async-nats
/// reports as `Other`.
fn is_conflict(error: &jetstream::context::PublishError) -> bool {
    if error.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            let code = js.error_code().0;
            return code == 10071 || code == 10164;
        }
        source = e.source();
    }
    error.to_string().contains("wrong last sequence")
}

fn node_id() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut hasher);
    Instant::now().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

impl ClusterStore {
    /// Connects, creates the stream if it is missing, loads every entity, and starts following
    /// the stream. Must run inside a tokio runtime (the store's tasks run on it).
    pub async fn open(options: ClusterOptions) -> Result<Self, StoreError> {
        if options.urls.is_empty() {
            return Err(unavailable("no NATS server URL given"));
        }
        let (resume, _) = watch::channel((0u64, ""));
        let reconnected = resume.clone();
        let client = tokio::time::timeout(
            options.call_timeout * 5,
            async_nats::ConnectOptions::new()
                .name("thingsgate")
                .retry_on_initial_connect()
                .event_callback(move |event| {
                    if matches!(event, async_nats::Event::Connected) {
                        reconnected.send_modify(|(n, why)| {
                            *n += 1;
                            *why = "connected to NATS again";
                        });
                    }
                    std::future::ready(())
                })
                .connect(options.urls.clone()),
        )
        .await
        .map_err(|_| {
            unavailable(format!(
                "no NATS server answered at {} within {:?}",
                options.urls.join(","),
                options.call_timeout * 5
            ))
        })?
        .map_err(|e| unavailable(format!("cannot connect to NATS: {e}")))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(options.call_timeout);
        let config = stream::Config {
            name: options.stream.clone(),
            subjects: vec![format!("{}.>", options.stream)],
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            max_messages_per_subject: 8,
            allow_direct: true,
            allow_rollup: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let stream =
            tokio::time::timeout(options.call_timeout * 5, js.get_or_create_stream(config))
                .await
                .map_err(|_| unavailable("JetStream did not answer the stream lookup in time"))?
                .map_err(|e| {
                    unavailable(format!(
                        "cannot create or find the stream `{}` (is JetStream enabled?): {e}",
                        options.stream
                    ))
                })?;
        let shards = (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect();
        let (low_water, _) = watch::channel(0);
        let (submit, mut submitted) = tokio::sync::mpsc::unbounded_channel::<Submit>();
        let submitter = js.clone();
        tokio::spawn(async move {
            while let Some(job) = submitted.recv().await {
                let sent = submitter.send_publish(job.subject, job.message).await;
                let _ = job.sent.send(sent);
            }
        });
        let store = ClusterStore {
            inner: Arc::new(Inner {
                node: node_id(),
                client,
                js,
                stream,
                runtime: tokio::runtime::Handle::current(),
                shards,
                hasher: foldhash::fast::RandomState::default(),
                policy_generation: AtomicU64::new(0),
                writes: AtomicU64::new(0),
                outstanding: Mutex::new(Outstanding::default()),
                low_water,
                health: RwLock::new(Health::Behind("loading".into())),
                seen: AtomicU64::new(0),
                resume,
                closed: AtomicBool::new(false),
                listener: RwLock::new(None),
                submit,
                options,
            }),
        };
        store.load_and_follow().await?;
        Ok(store)
    }

    /// The NATS connection (shared: the broker relays messages between nodes on it).
    pub fn client(&self) -> async_nats::Client {
        self.inner.client.clone()
    }

    /// This node's ID in the stream's `Tg-Node` headers.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The stream sequence of the last message this node's consumer handled.
    pub fn seen(&self) -> u64 {
        self.inner.seen.load(Ordering::Acquire)
    }

    async fn load_and_follow(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut info_stream = inner.stream.clone();
        let last = tokio::time::timeout(inner.options.call_timeout, info_stream.info())
            .await
            .map_err(|_| unavailable("JetStream did not answer the stream info in time"))?
            .map_err(|e| unavailable(format!("stream info: {e}")))?
            .state
            .last_sequence;
        let consumer = tokio::time::timeout(
            inner.options.call_timeout,
            inner.stream.create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", inner.options.stream),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            }),
        )
        .await
        .map_err(|_| unavailable("JetStream did not create the consumer in time"))?
        .map_err(|e| unavailable(format!("cannot create the stream's consumer: {e}")))?;
        let mut messages = tokio::time::timeout(inner.options.call_timeout, consumer.messages())
            .await
            .map_err(|_| unavailable("JetStream did not start the consumer in time"))?
            .map_err(|e| unavailable(format!("cannot read the stream: {e}")))?;
        // Load: until the consumer has passed the last sequence the stream had at the start.
        let mut loaded = 0usize;
        while self.seen() < last {
            let next = tokio::time::timeout(inner.options.call_timeout * 5, messages.next())
                .await
                .map_err(|_| unavailable("the stream stopped delivering while loading"))?;
            match next {
                Some(Ok(message)) => {
                    self.handle(&message, true);
                    loaded += 1;
                }
                Some(Err(e)) => return Err(unavailable(format!("loading the stream: {e}"))),
                None => return Err(unavailable("the stream's consumer ended while loading")),
            }
        }
        tracing::info!(
            stream = %inner.options.stream,
            node = %inner.node,
            entities = loaded,
            last_sequence = last,
            "cluster store loaded"
        );
        *write(&inner.health) = Health::Current;
        let follower = self.clone();
        inner
            .runtime
            .spawn(async move { follower.follow(messages).await });
        let checker = self.clone();
        inner
            .runtime
            .spawn(async move { checker.check_freshness().await });
        Ok(())
    }

    /// Follows the stream with `messages`, handing each message to [`Self::handle`]. The
    /// consumer is created again from the last message handled when the connection was made
    /// again, when it fails or ends, and when the freshness check finds it stalled: the
    /// ordered consumer of async-nats would notice a consumer lost with its server (an R1
    /// server restarted, the server holding it in a cluster killed) only after two missed
    /// idle heartbeats of 15 s, and meanwhile the store could not be current.
    async fn follow(&self, mut messages: consumer::pull::Ordered) {
        let inner = &self.inner;
        let mut resume = inner.resume.subscribe();
        resume.borrow_and_update();
        loop {
            let why = tokio::select! {
                message = messages.next() => match message {
                    Some(Ok(message)) => {
                        if inner.closed.load(Ordering::Acquire) {
                            return;
                        }
                        self.handle(&message, false);
                        continue;
                    }
                    Some(Err(e)) => format!("the stream's consumer failed: {e}"),
                    None => "the stream's consumer ended".to_owned(),
                },
                changed = resume.changed() => match changed {
                    Ok(()) => resume.borrow().1.to_owned(),
                    Err(_) => return,
                },
            };
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            tracing::warn!(reason = %why, "cluster store: following the stream again");
            let mut backoff = Duration::from_millis(50);
            messages = loop {
                let from = self.seen() + 1;
                match self.consume_from(from).await {
                    Ok(messages) => {
                        tracing::info!(from, "cluster store: following the stream from here");
                        break messages;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, from, "cluster store: cannot follow the stream yet");
                        if inner.closed.load(Ordering::Acquire) {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            };
            resume.borrow_and_update();
        }
    }

    /// A new ordered consumer of every message from stream sequence `from`.
    async fn consume_from(&self, from: u64) -> Result<consumer::pull::Ordered, StoreError> {
        let inner = &self.inner;
        let consumer = tokio::time::timeout(
            inner.options.call_timeout,
            inner.stream.create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("{}.>", inner.options.stream),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            }),
        )
        .await
        .map_err(|_| unavailable("JetStream did not create the consumer in time"))?
        .map_err(|e| unavailable(format!("cannot create the stream's consumer: {e}")))?;
        tokio::time::timeout(inner.options.call_timeout, consumer.messages())
            .await
            .map_err(|_| unavailable("JetStream did not start the consumer in time"))?
            .map_err(|e| unavailable(format!("cannot read the stream: {e}")))
    }

    /// Every 250 ms: connected, and the consumer has reached the last sequence the stream
    /// had `max_lag` ago? If it has not, and handled nothing since the last check, it is
    /// stalled: the follower creates it again (at most once per 2 × `max_lag`).
    async fn check_freshness(&self) {
        let inner = &self.inner;
        let mut targets: std::collections::VecDeque<(Instant, u64)> = Default::default();
        let mut stream = inner.stream.clone();
        let mut seen_before = self.seen();
        let mut resumed_at = Instant::now();
        let mut failed_infos = 0u32;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            let now = Instant::now();
            let mut info_failed = false;
            let health = if inner.client.connection_state()
                != async_nats::connection::State::Connected
            {
                targets.clear();
                Health::Behind("not connected to NATS".into())
            } else {
                match tokio::time::timeout(inner.options.call_timeout, stream.info()).await {
                    Ok(Ok(info)) => {
                        targets.push_back((now, info.state.last_sequence));
                        let seen = self.seen();
                        let mut behind = None;
                        while let Some(&(at, target)) = targets.front() {
                            if target <= seen {
                                targets.pop_front();
                            } else if now.duration_since(at) >= inner.options.max_lag {
                                behind = Some(target);
                                break;
                            } else {
                                break;
                            }
                        }
                        if behind.is_some()
                            && seen == seen_before
                            && now.duration_since(resumed_at) >= inner.options.max_lag * 2
                        {
                            resumed_at = now;
                            inner.resume.send_modify(|(n, why)| {
                                *n += 1;
                                *why = "the stream's consumer stalled";
                            });
                        }
                        seen_before = seen;
                        match behind {
                            Some(target) => Health::Behind(format!(
                                "the stream's consumer is at {seen}, the stream was at {target} \
                                 more than {:?} ago",
                                inner.options.max_lag
                            )),
                            None => Health::Current,
                        }
                    }
                    // One slow answer (a server busy catching up) proves nothing; two in a
                    // row (about 4 s without one) mean it cannot be trusted to be current.
                    Ok(Err(e)) => {
                        info_failed = true;
                        if failed_infos > 0 {
                            Health::Behind(format!("stream info: {e}"))
                        } else {
                            read(&inner.health).clone()
                        }
                    }
                    Err(_) => {
                        info_failed = true;
                        if failed_infos > 0 {
                            Health::Behind("JetStream did not answer the stream info".into())
                        } else {
                            read(&inner.health).clone()
                        }
                    }
                }
            };
            failed_infos = if info_failed { failed_infos + 1 } else { 0 };
            let mut current = write(&inner.health);
            if *current != health {
                match &health {
                    Health::Current => tracing::info!("cluster store is current again"),
                    Health::Behind(reason) => {
                        tracing::warn!(reason = %reason, "cluster store is not current")
                    }
                }
                *current = health;
            }
        }
    }

    /// A message of the stream: the entity it carries replaces ours if it is newer and
    /// another node wrote it (ours were applied when written) — or if this node wrote it but
    /// never learnt it was stored (its ack was lost and the write failed at the deadline, so
    /// the entity went back to its last known state and nothing of the write was announced).
    fn handle(&self, message: &jetstream::Message, loading: bool) {
        let Ok(info) = message.info() else {
            tracing::warn!(subject = %message.subject, "cluster store: a message without stream info");
            return;
        };
        let seq = info.stream_sequence;
        self.apply(message, seq, loading);
        // Only now: `caught_up` promises that what it waited for is visible.
        self.inner.seen.fetch_max(seq, Ordering::AcqRel);
    }

    fn apply(&self, message: &jetstream::Message, seq: u64, loading: bool) {
        let inner = &self.inner;
        let own = message
            .headers
            .as_ref()
            .and_then(|h| h.get(NODE_HEADER))
            .is_some_and(|n| n.as_str() == inner.node);
        if own && !self.stored_unbeknownst(&message.subject, seq) {
            // Applied when it was written; its ack moved the entity's sequence.
            return;
        }
        let (events, state) = match decode(&message.payload) {
            Ok(decoded) => decoded,
            Err(e) => {
                tracing::error!(subject = %message.subject, sequence = seq, error = %e, "cluster store: an undecodable message; the entity is left as it was");
                return;
            }
        };
        let Some(key) = events
            .first()
            .map(|e| e.key.clone())
            .or_else(|| state.as_ref().map(|s| s.key.clone()))
        else {
            return;
        };
        let state = state.map(Arc::new);
        let previous = {
            let mut shard = write(inner.shard(&key));
            let known = shard.slots.get(&key).map_or(0, |s| s.seq);
            if seq <= known {
                return;
            }
            // One of ours newer than what we know stored: while a write of the entity is in
            // flight here, its ack (or failure) decides; with none in flight, it was stored
            // unbeknownst to us.
            if own && shard.slots.get(&key).is_none_or(|s| s.tail.is_some()) {
                return;
            }
            let previous = shard.slots.get(&key).and_then(|s| s.state.clone());
            shard.replace(&key, state.clone(), seq);
            previous
        };
        if matches!(key.kind, EntityKind::Policy | EntityKind::Solution) {
            inner.policy_generation.fetch_add(1, Ordering::AcqRel);
        }
        if !loading {
            let listener = read(&inner.listener).clone();
            if let Some(listener) = listener {
                listener.changed(&key, &events, previous.as_ref(), state.as_ref());
            }
        }
    }

    /// Whether a message of ours at `seq` on `subject` was stored without this node knowing:
    /// newer than the entity's last known stored state, with no write of the entity in flight
    /// here (whose ack or failure would decide).
    fn stored_unbeknownst(&self, subject: &str, seq: u64) -> bool {
        let Some(key) = key_of_subject(&self.inner.options.stream, subject) else {
            return false;
        };
        read(self.inner.shard(&key))
            .slots
            .get(&key)
            .is_some_and(|s| seq > s.seq && s.tail.is_none())
    }

    fn health(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        match &*read(&self.inner.health) {
            Health::Current => Ok(()),
            Health::Behind(reason) => Err(unavailable(reason)),
        }
    }
}

impl Inner {
    fn shard(&self, key: &EntityKey) -> &RwLock<Shard> {
        let hash = self.hasher.hash_one((key.kind, key.id.as_str()));
        let index = usize::try_from(hash % SHARDS as u64).unwrap_or(0);
        let Some(shard) = self.shards.get(index) else {
            unreachable!("the index is below the number of shards")
        };
        shard
    }

    fn ticket(&self) -> u64 {
        let mut outstanding = self
            .outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = outstanding.next;
        outstanding.next += 1;
        outstanding.in_flight.insert(n);
        n
    }

    fn done(&self, ticket: u64) {
        let mut outstanding = self
            .outstanding
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        outstanding.in_flight.remove(&ticket);
        let low = outstanding
            .in_flight
            .first()
            .copied()
            .unwrap_or(outstanding.next);
        self.low_water.send_replace(low);
    }

    /// The message of one attempt to append a write.
    fn message(
        &self,
        payload: &Bytes,
        expected: u64,
        id: &str,
    ) -> jetstream::message::PublishMessage {
        jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .expected_last_subject_sequence(expected)
            .message_id(id)
            .header(NODE_HEADER, self.node.as_str())
    }

    /// Appends one write, retrying under the same message ID until the write deadline.
    /// `first`: the first attempt, already handed to the ordered submitter.
    async fn append(
        &self,
        subject: String,
        payload: Bytes,
        expected: u64,
        id: String,
        mut first: Option<oneshot::Receiver<SubmitResult>>,
    ) -> Result<u64, StoreError> {
        let deadline = Instant::now() + self.options.write_deadline;
        let mut backoff = Duration::from_millis(20);
        loop {
            let submitted = first.take();
            let attempt = async {
                match submitted {
                    Some(receiver) => match receiver.await {
                        Ok(sent) => sent?.await,
                        Err(_) => Err(jetstream::context::PublishError::new(
                            PublishErrorKind::BrokenPipe,
                        )),
                    },
                    None => {
                        let message = self.message(&payload, expected, &id);
                        self.js.send_publish(subject.clone(), message).await?.await
                    }
                }
            };
            let failure = match tokio::time::timeout(self.options.call_timeout, attempt).await {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err(e)) if is_conflict(&e) => {
                    return Err(StoreError::Conflict {
                        key: subject.clone(),
                    });
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no ack within {:?}", self.options.call_timeout),
            };
            if Instant::now() + backoff >= deadline || self.closed.load(Ordering::Acquire) {
                return Err(unavailable(format!(
                    "the write to `{subject}` was not acknowledged by JetStream within {:?}: \
                     {failure}",
                    self.options.write_deadline
                )));
            }
            tracing::debug!(subject = %subject, error = %failure, "retrying a cluster write");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// The entity as the stream's leader has it (read-your-writes, unlike a direct get).
    async fn reload(&self, key: &EntityKey) -> Result<(Option<Entity>, u64), StoreError> {
        let subject = subject(&self.options.stream, key);
        let got = tokio::time::timeout(
            self.options.call_timeout,
            self.stream.get_last_raw_message_by_subject(&subject),
        )
        .await
        .map_err(|_| unavailable("JetStream did not answer a reload in time"))?;
        match got {
            Ok(message) => {
                let (_, state) = decode(&message.payload).map_err(|reason| {
                    unavailable(format!("the stored `{key}` is undecodable: {reason}"))
                })?;
                Ok((state, message.sequence))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok((None, 0)),
            Err(e) => Err(unavailable(format!("reloading `{key}`: {e}"))),
        }
    }
}

/// One write on its way to JetStream.
struct Append {
    key: EntityKey,
    subject: String,
    payload: Bytes,
    id: String,
    number: u64,
    epoch: u64,
    /// The sequence to expect: known now, or told by the write before it on this node.
    after: Result<u64, oneshot::Receiver<Result<u64, ()>>>,
    successor: oneshot::Sender<Result<u64, ()>>,
    done: oneshot::Sender<Result<(), StoreError>>,
    ticket: u64,
    state: Option<Arc<Entity>>,
    /// Its first attempt, submitted in write order (when its expected sequence was known).
    first: Option<oneshot::Receiver<SubmitResult>>,
}

impl ClusterStore {
    async fn run(self, append: Append) {
        let inner = &*self.inner;
        let expected = match append.after {
            Ok(seq) => Ok(seq),
            Err(previous) => match previous.await {
                Ok(Ok(seq)) => Ok(seq),
                _ => Err(StoreError::Conflict {
                    key: append.key.to_string(),
                }),
            },
        };
        let result = match expected {
            Ok(expected) => {
                inner
                    .append(
                        append.subject.clone(),
                        append.payload,
                        expected,
                        append.id,
                        append.first,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        let outcome = match result {
            Ok(seq) => {
                let mut shard = write(inner.shard(&append.key));
                if let Some(slot) = shard.slots.get_mut(&append.key)
                    && slot.epoch == append.epoch
                {
                    slot.seq = seq;
                    slot.base = append.state;
                    if slot.tail.as_ref().is_some_and(|(n, _)| *n == append.number) {
                        slot.tail = None;
                    }
                }
                drop(shard);
                let _ = append.successor.send(Ok(seq));
                Ok(())
            }
            Err(error) => {
                // Nothing of this write (or of any write decided on top of it) is stored.
                let reload = matches!(error, StoreError::Conflict { .. });
                let epoch_now = read(inner.shard(&append.key))
                    .slots
                    .get(&append.key)
                    .map(|s| s.epoch);
                if epoch_now == Some(append.epoch) {
                    let reloaded = if reload {
                        inner.reload(&append.key).await.ok()
                    } else {
                        None
                    };
                    let mut shard = write(inner.shard(&append.key));
                    let still = shard.slots.get(&append.key).map(|s| s.epoch) == Some(append.epoch);
                    if still {
                        match reloaded {
                            Some((state, seq)) => {
                                shard.replace(&append.key, state.map(Arc::new), seq)
                            }
                            None => {
                                let (base, seq) = shard
                                    .slots
                                    .get(&append.key)
                                    .map(|s| (s.base.clone(), s.seq))
                                    .unwrap_or_default();
                                shard.replace(&append.key, base, seq);
                            }
                        }
                        if append.key.kind == EntityKind::Policy {
                            inner.policy_generation.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
                let _ = append.successor.send(Err(()));
                Err(error)
            }
        };
        inner.done(append.ticket);
        let _ = append.done.send(outcome);
    }
}

impl TwinStore for ClusterStore {
    fn get(&self, key: &EntityKey) -> Option<Arc<Entity>> {
        read(self.inner.shard(key))
            .slots
            .get(key)
            .and_then(|s| s.state.clone())
    }

    fn thing_policy_id(&self, thing_id: &str) -> Option<Arc<str>> {
        let key = EntityKey::new(EntityKind::Thing, thing_id);
        read(self.inner.shard(&key))
            .thing_policies
            .get(thing_id)
            .cloned()
    }

    fn keys(&self, kind: EntityKind) -> Vec<EntityKey> {
        let mut keys = Vec::new();
        for shard in self.inner.shards.iter() {
            keys.extend(
                read(shard)
                    .slots
                    .iter()
                    .filter(|(key, slot)| key.kind == kind && slot.state.is_some())
                    .map(|(key, _)| key.clone()),
            );
        }
        keys
    }

    fn write_dyn(
        &self,
        key: &EntityKey,
        decide: &mut dyn FnMut(Option<&Entity>) -> Vec<Event>,
    ) -> Result<Written, StoreError> {
        self.health()?;
        let inner = &*self.inner;
        let mut shard = write(inner.shard(key));
        let current = shard.slots.get(key).and_then(|s| s.state.clone());
        let events = decide(current.as_deref());
        if events.is_empty() {
            return Ok(Written {
                events,
                entity: current,
                durable: Durable::nothing_written(),
            });
        }
        let mut state = current.as_deref().cloned();
        for event in &events {
            if event.key != *key {
                return Err(StoreError::ForeignEvent {
                    key: key.to_string(),
                    event_key: event.key.to_string(),
                });
            }
            state = Entity::apply(state, event).map_err(|source| StoreError::Apply {
                key: key.to_string(),
                source,
            })?;
        }
        let payload = encode(&events, state.as_ref()).ok_or_else(|| StoreError::TooLarge {
            key: key.to_string(),
            size: usize::MAX,
            max: u32::MAX as usize,
        })?;
        let state = state.map(Arc::new);
        let number = inner.writes.fetch_add(1, Ordering::AcqRel);
        let (successor, next) = oneshot::channel();
        let slot = shard.slots.entry(key.clone()).or_default();
        let after = match slot.tail.replace((number, next)) {
            Some((_, previous)) => Err(previous),
            None => Ok(slot.seq),
        };
        slot.state = state.clone();
        let epoch = slot.epoch;
        shard.reindex(key);
        drop(shard);
        if key.kind == EntityKind::Policy {
            inner.policy_generation.fetch_add(1, Ordering::AcqRel);
        }
        let (done, receiver) = oneshot::channel();
        let subject = subject(&inner.options.stream, key);
        let payload = Bytes::from(payload);
        let id = format!("{}.{number}", inner.node);
        // Submitted now, in write order (see `Inner::submit`); a write waiting for its
        // predecessor's ack is published once it knows its expected sequence.
        let first = match &after {
            Ok(expected) => {
                let (sent, first) = oneshot::channel();
                let job = Submit {
                    subject: subject.clone(),
                    message: inner.message(&payload, *expected, &id),
                    sent,
                };
                inner.submit.send(job).ok().map(|()| first)
            }
            Err(_) => None,
        };
        let append = Append {
            key: key.clone(),
            subject,
            payload,
            id,
            first,
            number,
            epoch,
            after,
            successor,
            done,
            ticket: inner.ticket(),
            state: state.clone(),
        };
        inner.runtime.spawn(self.clone().run(append));
        Ok(Written {
            events,
            entity: state,
            durable: Durable::new(receiver),
        })
    }

    fn close(&self) -> Result<(), StoreError> {
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }

    fn durable_so_far(&self) -> Durable {
        let target = {
            let outstanding = self
                .inner
                .outstanding
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if outstanding.in_flight.is_empty() {
                return Durable::nothing_written();
            }
            outstanding.next
        };
        let mut low = self.inner.low_water.subscribe();
        let (done, receiver) = oneshot::channel();
        self.inner.runtime.spawn(async move {
            let reached = low.wait_for(|low| *low >= target).await.is_ok();
            let _ = done.send(if reached {
                Ok(())
            } else {
                Err(unavailable("the cluster store stopped"))
            });
        });
        Durable::new(receiver)
    }

    fn policy_generation(&self) -> u64 {
        self.inner.policy_generation.load(Ordering::Acquire)
    }

    fn journal_stats(&self) -> Option<JournalStats> {
        None
    }

    fn current(&self) -> Result<(), StoreError> {
        self.health()
    }

    fn shared(&self) -> bool {
        true
    }

    fn caught_up(&self) -> Durable {
        let store = self.clone();
        let (done, receiver) = oneshot::channel();
        self.inner.runtime.spawn(async move {
            let inner = &store.inner;
            let mut stream = inner.stream.clone();
            let result = match tokio::time::timeout(inner.options.call_timeout, stream.info()).await
            {
                Ok(Ok(info)) => {
                    let target = info.state.last_sequence;
                    let deadline = Instant::now() + inner.options.call_timeout;
                    loop {
                        if store.seen() >= target {
                            break Ok(());
                        }
                        if Instant::now() >= deadline {
                            break Err(unavailable(format!(
                                "the stream's consumer did not reach sequence {target} in time"
                            )));
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Ok(Err(e)) => Err(unavailable(format!("stream info: {e}"))),
                Err(_) => Err(unavailable("JetStream did not answer the stream info")),
            };
            let _ = done.send(result);
        });
        Durable::new(receiver)
    }

    fn set_listener(&self, listener: Arc<dyn ChangeListener>) {
        *write(&self.inner.listener) = Some(listener);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_keep_only_safe_bytes() {
        assert_eq!(subject_token("org.acme:lamp-1"), "org_2Eacme_3Alamp-1");
        assert_eq!(subject_token("a b*>"), "a_20b_2A_3E");
        assert_eq!(subject_token(""), "_");
        // Distinct IDs stay distinct: `_` itself is escaped.
        assert_ne!(subject_token("a_2E"), subject_token("a."));
    }

    #[test]
    fn a_subject_names_its_entity() {
        for (kind, id) in [
            (EntityKind::Thing, "org.acme:lamp-1"),
            (EntityKind::Policy, "a b*>_"),
            (EntityKind::Retained, "acme/ä/x"),
            (EntityKind::Thing, ""),
        ] {
            let key = EntityKey::new(kind, id);
            assert_eq!(key_of_subject("TG", &subject("TG", &key)), Some(key));
        }
        assert_eq!(key_of_subject("TG", "OTHER.thing.a"), None);
        assert_eq!(key_of_subject("TG", "TG.nokind.a"), None);
        assert_eq!(key_of_subject("TG", "TG.thing.a_4"), None);
    }
}
