//! Support for the twin tests (`tests/twin_revocation.rs`, `tests/twin_durability.rs`,
//! `tests/twin_random.rs`).
//!
//! # Layout
//! - [`TwinClient`]: an MQTT client on the broker's codec whose socket is read by its own task,
//!   so that several commands can be in flight, every acknowledgement is matched to its PUBLISH
//!   by packet identifier, and the instant each packet arrived is recorded where it was read
//!   (the revocation test measures with these instants). Deliveries are acknowledged at once.
//! - Topics and payloads of the compact twin form ([`thing_command`], [`policy_command`],
//!   [`SeenEvent`]).
//! - [`Oracle`]: a naive evaluator of DESIGN.md §1 rules 1–6 for `thing:` resources (no trie, no
//!   precomputation; every question walks every entry). It is what the randomized test predicts
//!   the server with, and every answer it gives is recorded as a policy test vector
//!   ([`Vectors`]) that `thingsgate policy test` then runs through the policy crate
//!   (`policy::vectors::run_vector`: `Enforcer::compile`, `for_subjects`, `check_key`,
//!   `partial_view`): so each expectation is the policy crate's decision too. (This crate has no
//!   dependency on `policy`, and the tests may not add one; the real binary is the way in.)
//! - [`Rng`]: SplitMix64, for reproducible random tests without a dependency.
//!
//! Every network wait is bounded by [`NET_TIMEOUT`] (something that must come) or by the
//! duration a caller passes (something that must not).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use broker::mqtt::codec::{
    Connect, Packet, Properties, Protocol, PubResponse, Publish, QoS, QosPid, Subscribe,
    Subscription, SubscriptionOptions, TopicFilter, TopicName, decode,
};
use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::broker::Solution;
pub use crate::raw::NET_TIMEOUT;
use crate::raw::{connect_packet, with_login};

/// The namespace every twin test's solution owns.
pub const NS: &str = "org.acme";

// --- the client ------------------------------------------------------------------------------

/// An acknowledgement of a PUBLISH (PUBACK), with the instant it was read off the socket.
#[derive(Debug, Clone)]
pub struct Ack {
    pub reason: u8,
    pub reason_string: Option<String>,
    pub at: Instant,
}

/// A PUBLISH the server delivered, with the instant it was read off the socket.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub at: Instant,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub correlation: Option<Bytes>,
}

impl Delivered {
    /// The payload as JSON (panics with the payload if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "delivery on `{}` is not JSON ({e}): {}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// What the reader task hands to waiters.
#[derive(Debug, Default)]
struct Waiting {
    acks: HashMap<u16, oneshot::Sender<Ack>>,
    subacks: HashMap<u16, oneshot::Sender<Vec<u8>>>,
    /// The connection ended: nothing more will be answered.
    closed: bool,
}

/// A PUBLISH at QoS 1 waiting for its PUBACK.
#[derive(Debug)]
pub struct PendingAck {
    pub packet_id: u16,
    rx: oneshot::Receiver<Ack>,
    /// The PUBACK once taken off the channel.
    got: Option<Ack>,
}

impl PendingAck {
    /// The PUBACK; panics if the connection closes first or after [`NET_TIMEOUT`].
    pub async fn wait(mut self) -> Ack {
        self.wait_mut().await
    }

    /// [`PendingAck::wait`], keeping the PUBACK for [`PendingAck::arrived`].
    pub async fn wait_mut(&mut self) -> Ack {
        if let Some(ack) = &self.got {
            return ack.clone();
        }
        let id = self.packet_id;
        let ack = match tokio::time::timeout(NET_TIMEOUT, &mut self.rx).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(_)) => panic!("the connection closed before the PUBACK of packet {id}"),
            Err(_) => panic!("no PUBACK for packet {id} within {NET_TIMEOUT:?}"),
        };
        self.got = Some(ack.clone());
        ack
    }

    /// The PUBACK if it arrives within `limit` (which may be longer than [`NET_TIMEOUT`]);
    /// `None` if it does not, or if the connection closes first. Kept for
    /// [`PendingAck::arrived`].
    pub async fn wait_within(&mut self, limit: Duration) -> Option<Ack> {
        if self.got.is_none() {
            self.got = tokio::time::timeout(limit, &mut self.rx).await.ok()?.ok();
        }
        self.got.clone()
    }

    /// The PUBACK if it has arrived by now (after the connection ended: whether it ever did).
    pub fn arrived(&mut self) -> Option<Ack> {
        if self.got.is_none() {
            self.got = self.rx.try_recv().ok();
        }
        self.got.clone()
    }
}

/// One MQTT connection of a secret client (user name = solution ID, password = secret) whose
/// socket is read by a task: acknowledgements are matched by packet identifier, deliveries are
/// acknowledged at once and queued for the test with the instant they arrived.
#[derive(Debug)]
pub struct TwinClient {
    pub client_id: String,
    pub protocol: Protocol,
    out: mpsc::UnboundedSender<Packet>,
    waiting: Arc<Mutex<Waiting>>,
    deliveries: mpsc::UnboundedReceiver<Delivered>,
    /// Deliveries taken off the channel while looking for something else, oldest first.
    stash: std::collections::VecDeque<Delivered>,
    next_id: u16,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl Drop for TwinClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

fn response(id: NonZeroU16) -> PubResponse {
    PubResponse {
        packet_id: id,
        reason: 0,
        properties: Properties::default(),
    }
}

fn topic_name(topic: &str) -> TopicName {
    TopicName::new(Bytes::copy_from_slice(topic.as_bytes())).expect("valid topic name")
}

impl TwinClient {
    /// Connects `client_id` of `solution` with clean start; panics unless the CONNACK is 0.
    pub async fn connect(
        addr: SocketAddr,
        protocol: Protocol,
        client_id: &str,
        solution: &Solution,
    ) -> Self {
        let connect = with_login(
            connect_packet(protocol, client_id),
            Some(&solution.id),
            Some(&solution.secret),
        );
        Self::connect_with(addr, connect).await
    }

    /// Connects with `connect`; panics unless the CONNACK is 0.
    pub async fn connect_with(addr: SocketAddr, connect: Connect) -> Self {
        let protocol = connect.protocol;
        let client_id = connect.client_id.as_str().to_owned();
        let mut stream = tokio::time::timeout(NET_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("TCP connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let mut out = BytesMut::new();
        Packet::Connect(Box::new(connect))
            .encode(protocol, &mut out)
            .expect("CONNECT encodes");
        tokio::time::timeout(NET_TIMEOUT, stream.write_all(&out))
            .await
            .expect("CONNECT write timed out")
            .expect("CONNECT written");
        let mut buf = BytesMut::with_capacity(8192);
        let deadline = tokio::time::Instant::now() + NET_TIMEOUT;
        let connack = loop {
            match decode(&mut buf, protocol, usize::MAX >> 4) {
                Ok(Some(Packet::ConnAck(ack))) => break ack,
                Ok(Some(other)) => panic!("`{client_id}`: expected CONNACK, got {other:?}"),
                Ok(None) => {}
                Err(e) => panic!("`{client_id}`: undecodable CONNACK: {e}"),
            }
            match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
                Err(_) => panic!("`{client_id}`: no CONNACK within {NET_TIMEOUT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => panic!("`{client_id}`: closed before CONNACK"),
                Ok(Ok(_)) => {}
            }
        };
        assert_eq!(
            connack.code, 0,
            "CONNECT of `{client_id}` refused: {connack:?}"
        );
        let (mut read_half, mut write_half) = stream.into_split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Packet>();
        let writer = tokio::spawn(async move {
            let mut bytes = BytesMut::new();
            while let Some(packet) = out_rx.recv().await {
                bytes.clear();
                if packet.encode(protocol, &mut bytes).is_err() {
                    break;
                }
                if write_half.write_all(&bytes).await.is_err() {
                    break;
                }
            }
        });
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let (deliver_tx, deliveries) = mpsc::unbounded_channel();
        let reader_waiting = Arc::clone(&waiting);
        let acker = out_tx.clone();
        let reader = tokio::spawn(async move {
            'read: loop {
                loop {
                    let packet = match decode(&mut buf, protocol, usize::MAX >> 4) {
                        Ok(Some(packet)) => packet,
                        Ok(None) => break,
                        Err(_) => break 'read,
                    };
                    let at = Instant::now();
                    match packet {
                        Packet::PubAck(ack) => {
                            let sender = lock(&reader_waiting).acks.remove(&ack.packet_id.get());
                            if let Some(sender) = sender {
                                let _ = sender.send(Ack {
                                    reason: ack.reason,
                                    reason_string: ack
                                        .properties
                                        .reason_string
                                        .as_ref()
                                        .map(|s| s.as_str().to_owned()),
                                    at,
                                });
                            }
                        }
                        Packet::SubAck(ack) => {
                            let sender = lock(&reader_waiting).subacks.remove(&ack.packet_id.get());
                            if let Some(sender) = sender {
                                let _ = sender.send(ack.codes);
                            }
                        }
                        Packet::Publish(publish) => {
                            let qos = match publish.qos {
                                QosPid::AtMostOnce => QoS::AtMostOnce,
                                QosPid::AtLeastOnce(id) => {
                                    let _ = acker.send(Packet::PubAck(response(id)));
                                    QoS::AtLeastOnce
                                }
                                QosPid::ExactlyOnce(id) => {
                                    let _ = acker.send(Packet::PubRec(response(id)));
                                    QoS::ExactlyOnce
                                }
                            };
                            let _ = deliver_tx.send(Delivered {
                                at,
                                topic: publish.topic.as_str().to_owned(),
                                payload: publish.payload.clone(),
                                qos,
                                correlation: publish.properties.correlation_data.clone(),
                            });
                        }
                        Packet::PubRel(rel) => {
                            let _ = acker.send(Packet::PubComp(response(rel.packet_id)));
                        }
                        Packet::Disconnect(_) => break 'read,
                        _ => {}
                    }
                }
                match read_half.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let mut waiting = lock(&reader_waiting);
            waiting.closed = true;
            waiting.acks.clear();
            waiting.subacks.clear();
        });
        TwinClient {
            client_id,
            protocol,
            out: out_tx,
            waiting,
            deliveries,
            stash: std::collections::VecDeque::new(),
            next_id: 1,
            reader,
            writer,
        }
    }

    fn allocate(&mut self) -> NonZeroU16 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if let Some(id) = NonZeroU16::new(id) {
                let waiting = lock(&self.waiting);
                if !waiting.acks.contains_key(&id.get()) && !waiting.subacks.contains_key(&id.get())
                {
                    return id;
                }
            }
        }
    }

    fn send(&self, packet: Packet) {
        assert!(
            self.out.send(packet).is_ok(),
            "`{}`: the connection's writer has ended",
            self.client_id
        );
    }

    /// Sends a PUBLISH at QoS 1 with `properties`; its PUBACK comes through the result.
    pub fn send_qos1_with(
        &mut self,
        topic: &str,
        payload: &[u8],
        properties: Properties,
    ) -> PendingAck {
        let id = self.allocate();
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            assert!(
                !waiting.closed,
                "`{}`: the connection closed",
                self.client_id
            );
            waiting.acks.insert(id.get(), tx);
        }
        self.send(Packet::Publish(Publish {
            dup: false,
            qos: QosPid::AtLeastOnce(id),
            retain: false,
            topic: topic_name(topic),
            payload: Bytes::copy_from_slice(payload),
            properties,
        }));
        PendingAck {
            packet_id: id.get(),
            rx,
            got: None,
        }
    }

    /// Sends a PUBLISH at QoS 1; its PUBACK comes through the result.
    pub fn send_qos1(&mut self, topic: &str, payload: &[u8]) -> PendingAck {
        self.send_qos1_with(topic, payload, Properties::default())
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) -> Ack {
        self.send_qos1(topic, payload).wait().await
    }

    /// Subscribes to one filter at `qos`; the SUBACK's code.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> u8 {
        let id = self.allocate();
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).subacks.insert(id.get(), tx);
        self.send(Packet::Subscribe(Subscribe {
            packet_id: id,
            subscriptions: vec![Subscription {
                filter: TopicFilter::new(Bytes::copy_from_slice(filter.as_bytes()))
                    .expect("valid filter"),
                options: SubscriptionOptions::qos(qos),
            }],
            properties: Properties::default(),
        }));
        let codes = match tokio::time::timeout(NET_TIMEOUT, rx).await {
            Ok(Ok(codes)) => codes,
            Ok(Err(_)) => panic!("`{}`: closed before SUBACK", self.client_id),
            Err(_) => panic!("`{}`: no SUBACK within {NET_TIMEOUT:?}", self.client_id),
        };
        assert_eq!(codes.len(), 1, "SUBACK {codes:?}");
        codes[0]
    }

    /// Subscribes and asserts that `qos` was granted.
    pub async fn subscribe_ok(&mut self, filter: &str, qos: QoS) {
        let code = self.subscribe(filter, qos).await;
        assert_eq!(
            code, qos as u8,
            "`{}`: SUBSCRIBE `{filter}` refused",
            self.client_id
        );
    }

    /// The next delivery (stashed ones first), or `None` after `limit`. Panics if the
    /// connection closed.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Delivered> {
        if let Some(d) = self.stash.pop_front() {
            return Some(d);
        }
        match tokio::time::timeout(limit, self.deliveries.recv()).await {
            Ok(Some(d)) => Some(d),
            Ok(None) => panic!("`{}`: the connection closed", self.client_id),
            Err(_) => None,
        }
    }

    /// The first delivery whose topic satisfies `wanted`, within `limit`; the others met on the
    /// way are kept (in order) for later calls.
    pub async fn next_matching(
        &mut self,
        limit: Duration,
        wanted: impl Fn(&Delivered) -> bool,
    ) -> Option<Delivered> {
        if let Some(i) = self.stash.iter().position(&wanted) {
            return self.stash.remove(i);
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.deliveries.recv()).await {
                Ok(Some(d)) if wanted(&d) => return Some(d),
                Ok(Some(d)) => self.stash.push_back(d),
                Ok(None) => panic!("`{}`: the connection closed", self.client_id),
                Err(_) => return None,
            }
        }
    }

    /// Everything delivered until nothing more arrives for `quiet` (at most `limit` in all).
    pub async fn drain_until_quiet(&mut self, quiet: Duration, limit: Duration) -> Vec<Delivered> {
        let mut out: Vec<Delivered> = self.stash.drain(..).collect();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return out;
            }
            match tokio::time::timeout(quiet.min(left), self.deliveries.recv()).await {
                Ok(Some(d)) => out.push(d),
                Ok(None) => panic!("`{}`: the connection closed", self.client_id),
                Err(_) => return out,
            }
        }
    }

    /// Retrieves thing `thing` at the root with the field selector `fields` (e.g.
    /// `attributes,_revision`) through the Ditto envelope on `ditto/commands`, answered on an
    /// MQTT 5 Response Topic; the response envelope. Needs MQTT 5.
    pub async fn retrieve_fields(&mut self, thing: &str, fields: &str) -> Value {
        assert_eq!(self.protocol, Protocol::V5, "a Response Topic needs MQTT 5");
        let (ns, name) = thing.split_once(':').expect("a thing ID ns:name");
        let correlation = format!("retrieve-{thing}-{}", self.next_id);
        let envelope = json!({
            "topic": format!("{ns}/{name}/things/twin/commands/retrieve"),
            "path": "/",
            "fields": fields,
            "headers": {"correlation-id": correlation},
        });
        let reply_topic = format!("e2e/replies/{}", self.client_id);
        let properties = Properties {
            response_topic: Some(topic_name(&reply_topic)),
            correlation_data: Some(Bytes::from(correlation.clone())),
            ..Properties::default()
        };
        let ack = self
            .send_qos1_with(
                "ditto/commands",
                envelope.to_string().as_bytes(),
                properties,
            )
            .wait()
            .await;
        assert_eq!(ack.reason, 0, "retrieve of {thing}: {ack:?}");
        let wanted = Some(Bytes::from(correlation));
        self.next_matching(NET_TIMEOUT, |d| {
            d.topic == reply_topic && d.correlation == wanted
        })
        .await
        .unwrap_or_else(|| panic!("no answer to the retrieve of {thing} within {NET_TIMEOUT:?}"))
        .json()
    }

    /// Whether the reader has seen the connection end.
    pub fn is_closed(&self) -> bool {
        lock(&self.waiting).closed
    }
}

// --- topics and payloads ---------------------------------------------------------------------

/// `{ns}/{name}/things/twin/commands/{action}{path}` for thing `ns:name` (`path` `""` or `/…`).
pub fn thing_command(thing: &str, action: &str, path: &str) -> String {
    let (ns, name) = thing.split_once(':').expect("a thing ID ns:name");
    let path = if path == "/" { "" } else { path };
    format!("{ns}/{name}/things/twin/commands/{action}{path}")
}

/// `{ns}/{name}/policies/commands/{action}{path}` for policy `ns:name`.
pub fn policy_command(policy: &str, action: &str, path: &str) -> String {
    let (ns, name) = policy.split_once(':').expect("a policy ID ns:name");
    let path = if path == "/" { "" } else { path };
    format!("{ns}/{name}/policies/commands/{action}{path}")
}

/// The MQTT topic of a thing event: `{ns}/{name}/things/twin/events/{action}{path}`.
pub fn event_topic(thing: &str, action: &str, path: &str) -> String {
    let (ns, name) = thing.split_once(':').expect("a thing ID ns:name");
    let path = if path == "/" { "" } else { path };
    format!("{ns}/{name}/things/twin/events/{action}{path}")
}

/// Whether a delivery is a thing event.
pub fn is_event(d: &Delivered) -> bool {
    d.topic.contains("/things/twin/events/")
}

/// A thing event as delivered: MQTT topic and the envelope's `path`, `value` and `revision`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeenEvent {
    pub topic: String,
    pub path: String,
    /// `None`: the envelope has no `value` (a delete).
    pub value: Option<Value>,
    pub revision: u64,
}

impl SeenEvent {
    /// Parses an event delivery; panics (with the payload) if it is not an event envelope.
    pub fn parse(d: &Delivered) -> Self {
        let doc = d.json();
        SeenEvent {
            topic: d.topic.clone(),
            path: doc
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("event without `path`: {doc}"))
                .to_owned(),
            value: doc.get("value").cloned(),
            revision: doc
                .get("revision")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("event without `revision`: {doc}")),
        }
    }
}

/// The subjects of a secret client: `iot-things:<solution>:<client>` and `iot-things:<solution>`.
pub fn client_subjects(solution: &Solution, client_id: &str) -> Vec<String> {
    vec![
        client_subject(solution, client_id),
        solution_subject(solution),
    ]
}

/// `iot-things:<solution>:<client>`.
pub fn client_subject(solution: &Solution, client_id: &str) -> String {
    format!("iot-things:{}:{client_id}", solution.id)
}

/// `iot-things:<solution>`: every secret client of the solution has it.
pub fn solution_subject(solution: &Solution) -> String {
    format!("iot-things:{}", solution.id)
}

/// The median, minimum and maximum of `samples` (sorted in place); `None` when empty.
pub fn min_median_max(samples: &mut [Duration]) -> Option<(Duration, Duration, Duration)> {
    samples.sort();
    let first = *samples.first()?;
    let last = *samples.last()?;
    Some((first, samples[samples.len() / 2], last))
}

// --- the oracle -------------------------------------------------------------------------------

/// READ or WRITE (the permissions a thing command or delivery needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    Read,
    Write,
}

impl Perm {
    pub fn name(self) -> &'static str {
        match self {
            Perm::Read => "READ",
            Perm::Write => "WRITE",
        }
    }
}

/// A set of READ/WRITE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
}

impl Perms {
    pub const RW: Perms = Perms {
        read: true,
        write: true,
    };
    pub const NONE: Perms = Perms {
        read: false,
        write: false,
    };

    pub fn has(self, p: Perm) -> bool {
        match p {
            Perm::Read => self.read,
            Perm::Write => self.write,
        }
    }

    pub fn names(self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.read {
            out.push("READ");
        }
        if self.write {
            out.push("WRITE");
        }
        out
    }
}

/// Unrestricted (changes) or partial (retrieves, deliveries), as DESIGN.md §1 rules 4 and 5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Unrestricted,
    Partial,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Unrestricted => "unrestricted",
            Mode::Partial => "partial",
        }
    }
}

/// One `thing:` resource of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// `/` or `/a/b` (plain segments: no `~`, no empty ones).
    pub path: String,
    pub grant: Perms,
    pub revoke: Perms,
}

/// One policy entry: its subjects and `thing:` resources; `policy_admin` adds unrestricted
/// READ and WRITE on `policy:/` (which never applies to `thing:`, rule 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub label: String,
    pub subjects: Vec<String>,
    pub resources: Vec<Resource>,
    pub policy_admin: bool,
}

/// A thing policy as the tests build it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingPolicy {
    pub id: String,
    pub entries: Vec<Entry>,
}

impl ThingPolicy {
    /// Its Ditto JSON.
    pub fn to_json(&self) -> Value {
        let mut entries = Map::new();
        for entry in &self.entries {
            let subjects: Map<String, Value> = entry
                .subjects
                .iter()
                .map(|s| (s.clone(), json!({"type": "e2e"})))
                .collect();
            let mut resources = Map::new();
            if entry.policy_admin {
                resources.insert(
                    "policy:/".to_owned(),
                    json!({"grant": ["READ", "WRITE"], "revoke": []}),
                );
            }
            for r in &entry.resources {
                resources.insert(
                    format!("thing:{}", r.path),
                    json!({"grant": r.grant.names(), "revoke": r.revoke.names()}),
                );
            }
            entries.insert(
                entry.label.clone(),
                json!({"subjects": subjects, "resources": resources}),
            );
        }
        json!({"policyId": self.id, "entries": entries})
    }
}

/// Splits `/a/b` into segments (empty ones ignored, as rule 7 says).
pub fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn join(segments: &[String]) -> String {
    if segments.is_empty() {
        "/".to_owned()
    } else {
        segments.iter().fold(String::new(), |acc, s| acc + "/" + s)
    }
}

/// `{s1: {s2: … value}}`.
fn wrap(segments: &[String], value: Value) -> Value {
    segments.iter().rev().fold(value, |inner, key| {
        let mut map = Map::new();
        map.insert(key.clone(), inner);
        Value::Object(map)
    })
}

/// One grant/revoke list held by one subject of S for one resource.
struct Statement<'p> {
    subject: &'p str,
    resource: Vec<String>,
    grant: Perms,
    revoke: Perms,
}

fn is_prefix(resource: &[String], path: &[String]) -> bool {
    resource.len() <= path.len() && resource.iter().zip(path).all(|(a, b)| a == b)
}

/// The fields a retrieve at the root returns whenever S has partial READ on `thing:/`.
pub const THING_RESPONSE_FIELDS: [&str; 5] = [
    "thingId",
    "_namespace",
    "_revision",
    "_modified",
    "_created",
];

/// Policy test vectors (the format of `../shared/test-vectors/README.md`): every answer the
/// oracle gave, to be run through the policy crate by `thingsgate policy test`.
#[derive(Debug, Default)]
pub struct Vectors {
    lines: Vec<String>,
    seen: HashSet<String>,
}

impl Vectors {
    fn push(&mut self, vector: Value) {
        let line = vector.to_string();
        if self.seen.insert(line.clone()) {
            self.lines.push(line);
        }
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Runs every vector with `thingsgate policy test` (the policy crate's `run_vectors`) and
    /// panics with the failures if the policy crate decides any of them otherwise.
    pub fn assert_policy_crate_agrees(&self, dir: &std::path::Path, name: &str) {
        let file = dir.join(format!("{name}.jsonl"));
        std::fs::write(&file, self.lines.join("\n") + "\n").expect("vector file written");
        let out = crate::thingsgate(&["policy", "test", file.to_str().expect("UTF-8 path")]);
        let text = crate::stdout(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "the policy crate decides some of the oracle's {} answers otherwise ({}):\n{text}\n{}",
            self.lines.len(),
            file.display(),
            crate::stderr(&out)
        );
        assert!(
            text.contains(&format!("{} passed, 0 failed", self.lines.len())),
            "unexpected `policy test` summary: {text}"
        );
    }
}

/// DESIGN.md §1 rules 1–6 for `thing:` resources, asked by one subject set S, read off the
/// statements of the policy almost word for word (the shape of `policy/tests/reference/`).
/// Every answer is recorded in `vectors`.
#[derive(Debug)]
pub struct Oracle<'a> {
    pub policy: &'a ThingPolicy,
    pub subjects: &'a [String],
}

impl<'a> Oracle<'a> {
    pub fn new(policy: &'a ThingPolicy, subjects: &'a [String]) -> Self {
        Oracle { policy, subjects }
    }

    fn statements(&self) -> Vec<Statement<'a>> {
        let mut out = Vec::new();
        for entry in &self.policy.entries {
            for subject in &entry.subjects {
                if !self.subjects.iter().any(|s| s == subject) {
                    continue;
                }
                for r in &entry.resources {
                    out.push(Statement {
                        subject,
                        resource: segments(&r.path),
                        grant: r.grant,
                        revoke: r.revoke,
                    });
                }
            }
        }
        out
    }

    /// Rules 2 and 3: the deepest grant at or above is strictly deeper than every revoke there.
    fn allowed_among(statements: &[Statement], path: &[String], p: Perm) -> bool {
        let above = || statements.iter().filter(|s| is_prefix(&s.resource, path));
        let grant = above()
            .filter(|s| s.grant.has(p))
            .map(|s| s.resource.len())
            .max();
        let revoke = above()
            .filter(|s| s.revoke.has(p))
            .map(|s| s.resource.len())
            .max();
        match (grant, revoke) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(g), Some(r)) => g > r,
        }
    }

    /// Rule 2 at `path`.
    pub fn allowed(&self, path: &[String], p: Perm) -> bool {
        Self::allowed_among(&self.statements(), path, p)
    }

    /// Rules 4 (unrestricted) and 5 (partial), recorded.
    pub fn check(&self, path: &str, p: Perm, mode: Mode, vectors: &mut Vectors) -> bool {
        let segs = segments(path);
        let statements = self.statements();
        let allowed = Self::allowed_among(&statements, &segs, p);
        let below = || {
            statements
                .iter()
                .filter(|s| s.resource.len() > segs.len() && is_prefix(&segs, &s.resource))
        };
        let result = match mode {
            Mode::Unrestricted => allowed && !below().any(|s| s.revoke.has(p)),
            Mode::Partial => {
                allowed
                    || below().any(|granting| {
                        granting.grant.has(p)
                            && !statements.iter().any(|revoking| {
                                revoking.subject == granting.subject
                                    && revoking.resource == granting.resource
                                    && revoking.revoke.has(p)
                            })
                    })
            }
        };
        vectors.push(json!({
            "kind": "check",
            "mode": mode.name(),
            "subjects": self.subjects,
            "resource": format!("thing:{}", join(&segs)),
            "permission": p.name(),
            "expect": result,
            "policy": self.policy.to_json(),
        }));
        result
    }

    /// Rule 6 (not recorded; see [`Oracle::view`]).
    fn view_at(
        &self,
        statements: &[Statement],
        path: &mut Vec<String>,
        value: &Value,
    ) -> Option<Value> {
        let allowed = Self::allowed_among(statements, path, Perm::Read);
        match value {
            Value::Object(map) => {
                let mut kept = Map::new();
                for (key, inner) in map {
                    path.push(key.clone());
                    if let Some(seen) = self.view_at(statements, path, inner) {
                        kept.insert(key.clone(), seen);
                    }
                    path.pop();
                }
                (allowed || !kept.is_empty()).then_some(Value::Object(kept))
            }
            Value::Array(items) => {
                let kept: Vec<Value> = items
                    .iter()
                    .filter_map(|item| self.view_at(statements, path, item))
                    .collect();
                (allowed || !kept.is_empty()).then_some(Value::Array(kept))
            }
            scalar => allowed.then(|| scalar.clone()),
        }
    }

    /// Rule 6: the part of `value` (found at `path`) that READ lets S see; `None`: nothing.
    /// Recorded as a `view` vector plus, since a vector writes "nothing" as `{}`, a probe of
    /// rule 2 at `path` (a key no policy names is kept iff READ is allowed there) that tells
    /// `None` from an empty object.
    pub fn view(&self, path: &str, value: &Value, vectors: &mut Vectors) -> Option<Value> {
        let segs = segments(path);
        let statements = self.statements();
        let mut walk = segs.clone();
        let result = self.view_at(&statements, &mut walk, value);
        let wrapped = wrap(&segs, value.clone());
        let resource = format!("thing:{}", join(&segs));
        vectors.push(json!({
            "kind": "view",
            "layer": "enforcer",
            "subjects": self.subjects,
            "resource": resource,
            "permission": "READ",
            "thing": wrapped,
            "expect_view": result.clone().unwrap_or_else(|| json!({})),
            "policy": self.policy.to_json(),
        }));
        let allowed = Self::allowed_among(&statements, &segs, Perm::Read);
        let probe = json!({"__probe__": 1});
        let wrapped_probe = wrap(&segs, probe.clone());
        vectors.push(json!({
            "kind": "view",
            "layer": "enforcer",
            "subjects": self.subjects,
            "resource": resource,
            "permission": "READ",
            "thing": wrapped_probe,
            "expect_view": if allowed { probe } else { json!({}) },
            "policy": self.policy.to_json(),
        }));
        result
    }

    /// A retrieve's answer at the root: the view plus [`THING_RESPONSE_FIELDS`] whenever S has
    /// partial READ on `thing:/` (rule 6, last sentence).
    pub fn view_with_fields(&self, value: &Value, vectors: &mut Vectors) -> Option<Value> {
        let view = self.view("/", value, vectors);
        let Some(source) = value.as_object() else {
            return view;
        };
        if !self.check("/", Perm::Read, Mode::Partial, vectors) {
            return view;
        }
        let mut out = match view {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        for field in THING_RESPONSE_FIELDS {
            if let Some(v) = source.get(field) {
                out.insert(field.to_owned(), v.clone());
            }
        }
        Some(Value::Object(out))
    }
}

// --- thing documents (the model the random test keeps) ----------------------------------------

/// The value at `path` in `doc`.
pub fn value_at<'v>(doc: &'v Value, path: &str) -> Option<&'v Value> {
    segments(path)
        .iter()
        .try_fold(doc, |v, s| v.as_object()?.get(s))
}

/// Sets `value` at `path` (not the root), creating missing parents as objects.
pub fn set_at(doc: &mut Value, path: &str, value: Value) {
    let segs = segments(path);
    let Some((last, parents)) = segs.split_last() else {
        *doc = value;
        return;
    };
    let mut current = doc;
    for s in parents {
        if !current.is_object() {
            *current = Value::Object(Map::new());
        }
        current = current
            .as_object_mut()
            .expect("an object")
            .entry(s.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !current.is_object() {
        *current = Value::Object(Map::new());
    }
    current
        .as_object_mut()
        .expect("an object")
        .insert(last.clone(), value);
}

/// Removes the value at `path`; whether there was one.
pub fn remove_at(doc: &mut Value, path: &str) -> bool {
    let segs = segments(path);
    let Some((last, parents)) = segs.split_last() else {
        return false;
    };
    let mut current = doc;
    for s in parents {
        match current.get_mut(s.as_str()) {
            Some(v) => current = v,
            None => return false,
        }
    }
    current
        .as_object_mut()
        .is_some_and(|m| m.remove(last.as_str()).is_some())
}

/// RFC 7396.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The leaves a merge patch touches below `base` (DESIGN.md §1 rule 4 per leaf; an empty
/// object is a leaf at its own path).
pub fn merge_leaves(base: &str, patch: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(segments(base), patch)];
    while let Some((path, value)) = stack.pop() {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map.iter().rev() {
                    let mut p = path.clone();
                    p.push(key.clone());
                    stack.push((p, child));
                }
            }
            _ => out.push(join(&path)),
        }
    }
    out
}

// --- randomness --------------------------------------------------------------------------------

/// SplitMix64: small, fast, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[self.below(items.len())]
    }

    /// `k` distinct items (fewer if there are not enough), in random order.
    pub fn pick_distinct<T: Clone>(&mut self, items: &[T], k: usize) -> Vec<T> {
        let mut pool: Vec<T> = items.to_vec();
        let mut out = Vec::new();
        while out.len() < k && !pool.is_empty() {
            let i = self.below(pool.len());
            out.push(pool.swap_remove(i));
        }
        out
    }
}

/// Counts by name, printed sorted.
#[derive(Debug, Default)]
pub struct Tally(pub BTreeMap<&'static str, usize>);

impl Tally {
    pub fn add(&mut self, what: &'static str, n: usize) {
        *self.0.entry(what).or_default() += n;
    }

    pub fn get(&self, what: &str) -> usize {
        self.0.get(what).copied().unwrap_or_default()
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}", parts.join(" "))
    }
}
