//! Cluster mode (DESIGN.md §6): this node's side of sharing one NATS JetStream with others.
//!
//! - The store: [`open_store`] opens `twin`'s [`ClusterStore`] (entities in one stream, see its
//!   module docs), which the core uses through the same trait as the embedded store.
//! - Changes made on other nodes ([`Node`] as the store's [`ChangeListener`]): a thing's or
//!   policy's events go through this node's one fan-out to its own subscribers (each judged in
//!   the thing's policy, cut to the subscriber's view, here); a solution is reloaded into the
//!   registry and applied to its live space (a revoked secret's connections are ended); a
//!   retained message is set or cleared in its space. A policy change needs nothing more: the
//!   store's policy generation moved, so the next check anywhere compiles the new revision.
//! - Messages published here ([`Node`] as the core's [`Relay`]): plain and live messages,
//!   authorized on this node, go on core NATS to every other node, whose fan-out judges them
//!   for its subscribers. Subject `{STREAM}_RELAY.{solution}`; at most once (as core NATS is);
//!   sent in publish order by one task per node.
//!
//! An adapter never sees any of this: it talks to the core, and the core to a store and a
//! relay.

use std::sync::{Arc, Weak};
use std::time::Instant;

use anyhow::Context;
use async_nats::HeaderMap;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use twin::entity::{Entity, EntityKey, EntityKind, Event};
use twin::store::{ChangeListener, ClusterOptions, ClusterStore, TwinStore};

use crate::config::ClusterConfig;
use crate::core::message::{ForwardedProperties, Message, Origin};
use crate::core::policies::PolicyId;
use crate::core::{Core, Relay, dispatch, now};
use crate::mqtt::codec::{QoS, TopicName, Utf8Str};

const NODE_HEADER: &str = "Tg-Node";
/// Messages waiting for the relay task; beyond this they are dropped (counted, logged).
const RELAY_QUEUE: usize = 65_536;

/// Opens the cluster store of `config` (connects, creates the stream if missing, loads it).
pub async fn open_store(config: &ClusterConfig) -> anyhow::Result<ClusterStore> {
    let mut options = ClusterOptions::new(config.urls.clone());
    options.stream = config.stream.clone();
    options.replicas = config.replicas;
    ClusterStore::open(options).await.with_context(|| {
        format!(
            "cannot open the cluster store (stream `{}` at {})",
            config.stream,
            config.urls.join(",")
        )
    })
}

/// This node in the cluster: hears other nodes' changes and messages, relays its own.
#[derive(Debug)]
pub struct Node {
    core: Weak<Core>,
    node: String,
    subject_root: String,
    /// Where claims of client IDs go (`{STREAM}_CLAIM`).
    claim_subject: String,
    client: async_nats::Client,
    outbox: tokio::sync::mpsc::Sender<(String, Bytes)>,
    /// The other nodes heard from lately: node ID → when.
    alive: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    /// When this node began to listen for the others.
    joined: Instant,
}

/// Joins `core` to the cluster of `store`: registers the listener and the relay, subscribes
/// to the other nodes' messages. Call once, inside the runtime.
pub async fn join(
    core: &Arc<Core>,
    store: &ClusterStore,
    config: &ClusterConfig,
) -> anyhow::Result<()> {
    let client = store.client();
    let subject_root = format!("{}_RELAY", config.stream);
    let (outbox, mut outgoing) = tokio::sync::mpsc::channel::<(String, Bytes)>(RELAY_QUEUE);
    let node = Arc::new(Node {
        core: Arc::downgrade(core),
        node: store.node().to_owned(),
        subject_root: subject_root.clone(),
        claim_subject: format!("{}_CLAIM", config.stream),
        client: client.clone(),
        outbox,
        alive: Arc::default(),
        joined: Instant::now(),
    });
    let mut claims = client
        .subscribe(node.claim_subject.clone())
        .await
        .with_context(|| format!("cannot subscribe to `{}` on NATS", node.claim_subject))?;
    let mut incoming = client
        .subscribe(format!("{subject_root}.>"))
        .await
        .with_context(|| format!("cannot subscribe to `{subject_root}.>` on NATS"))?;
    store.set_listener(node.clone());
    if core.relay.set(node.clone()).is_err() {
        anyhow::bail!("the core is already part of a cluster");
    }
    let sender = client.clone();
    let own = node.node.clone();
    tokio::spawn(async move {
        while let Some((subject, payload)) = outgoing.recv().await {
            let mut headers = HeaderMap::new();
            headers.insert(NODE_HEADER, own.as_str());
            if let Err(e) = sender.publish_with_headers(subject, headers, payload).await {
                tracing::warn!(error = %e, "cluster: a message could not be relayed to the other nodes");
            }
        }
    });
    let claimed = node.clone();
    let replier = client.clone();
    tokio::spawn(async move {
        while let Some(message) = claims.next().await {
            let from_here = message
                .headers
                .as_ref()
                .and_then(|h| h.get(NODE_HEADER))
                .is_some_and(|n| n.as_str() == claimed.node);
            if from_here {
                continue;
            }
            let Some(core) = claimed.core.upgrade() else {
                return;
            };
            let Some((solution, client_id)) = std::str::from_utf8(&message.payload)
                .ok()
                .and_then(|text| text.split_once('\n'))
            else {
                continue;
            };
            if !core.release_claimed(solution, client_id) {
                continue;
            }
            tracing::debug!(
                solution,
                client = client_id,
                "cluster: a session was claimed by another node"
            );
            if let Some(reply) = message.reply {
                // The claiming node reads the session once everything written here is stored.
                let _ = core.twins.store.durable_so_far().await;
                let _ = replier
                    .publish(reply, Bytes::from_static(b"released"))
                    .await;
            }
        }
    });
    let receiver = node.clone();
    tokio::spawn(async move {
        while let Some(message) = incoming.next().await {
            let from_here = message
                .headers
                .as_ref()
                .and_then(|h| h.get(NODE_HEADER))
                .is_some_and(|n| n.as_str() == receiver.node);
            if from_here {
                continue;
            }
            let Some(core) = receiver.core.upgrade() else {
                return;
            };
            match decode(message.payload.clone()) {
                Ok(relayed) => deliver(&core, relayed),
                Err(e) => {
                    tracing::warn!(subject = %message.subject, error = e, "cluster: an undecodable relayed message")
                }
            }
        }
    });
    spawn_membership(
        core,
        &client,
        &config.stream,
        node.node.clone(),
        node.alive.clone(),
    )
    .await?;
    tracing::info!(node = %node.node, stream = %config.stream, "joined the cluster");
    Ok(())
}

/// How often a node says it is alive, and how long a node unheard of counts as gone.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
const GONE_AFTER: std::time::Duration = std::time::Duration::from_secs(3);

/// Which node runs the bridges: every node says every second that it is alive (and since
/// when); the longest-running live node runs them, the others none. A node decides only after
/// listening for [`GONE_AFTER`] (so a starting node does not take them over), and a node gone
/// for that long is replaced. During such a change two nodes may both run them for up to a
/// heartbeat, or none for up to [`GONE_AFTER`].
async fn spawn_membership(
    core: &Arc<Core>,
    client: &async_nats::Client,
    stream: &str,
    node: String,
    alive: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
) -> anyhow::Result<()> {
    let subject = format!("{stream}_NODES");
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let me = format!("{started:020} {node}");
    let mut heard = client
        .subscribe(subject.clone())
        .await
        .with_context(|| format!("cannot subscribe to `{subject}` on NATS"))?;
    // Single-node until proven otherwise would start the bridges everywhere: not until
    // the others were heard.
    core.bridges.host_here(false);
    let sender = client.clone();
    let weak = Arc::downgrade(core);
    let joined = Instant::now();
    tokio::spawn(async move {
        let mut seen: std::collections::HashMap<String, Instant> = Default::default();
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let Some(core) = weak.upgrade() else { return };
                    let beat = tokio::time::timeout(
                        HEARTBEAT,
                        sender.publish(subject.clone(), Bytes::from(me.clone())),
                    );
                    let _ = beat.await;
                    let now = Instant::now();
                    seen.retain(|_, at| now.duration_since(*at) < GONE_AFTER);
                    if now.duration_since(joined) >= GONE_AFTER {
                        // Ours is the smallest "started node" of all live nodes?
                        let first = seen.keys().all(|other| *other >= me);
                        core.bridges.host_here(first && core.twins.store.current().is_ok());
                    }
                }
                beat = heard.next() => {
                    let Some(beat) = beat else { return };
                    if let Ok(text) = std::str::from_utf8(&beat.payload)
                        && text != me
                    {
                        let now = Instant::now();
                        seen.insert(text.to_owned(), now);
                        if let Some((_, id)) = text.split_once(' ') {
                            let mut alive =
                                alive.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            alive.retain(|_, at| now.duration_since(*at) < GONE_AFTER);
                            alive.insert(id.to_owned(), now);
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

impl Node {
    fn send(&self, solution: &str, payload: Bytes) {
        let subject = format!(
            "{}.{}",
            self.subject_root,
            twin::store::cluster::subject_token(solution)
        );
        if self.outbox.try_send((subject, payload)).is_err() {
            tracing::warn!(
                solution,
                "cluster: the relay queue is full; a message did not reach the other nodes"
            );
        }
    }
}

/// How long a claim waits for the node the stored session names (which may be gone).
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl Relay for Node {
    fn node(&self) -> &str {
        &self.node
    }

    fn node_alive(&self, node: &str) -> bool {
        // Until it has listened long enough to have heard everyone, a node assumes the others
        // alive (a held session is then locked, not taken twice).
        if self.joined.elapsed() < GONE_AFTER {
            return true;
        }
        self.alive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .is_some_and(|at| at.elapsed() < GONE_AFTER)
    }

    fn claim<'a>(
        &'a self,
        solution: &'a str,
        client_id: &'a str,
        wait: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let payload = Bytes::from(format!("{solution}\n{client_id}"));
            let mut headers = HeaderMap::new();
            headers.insert(NODE_HEADER, self.node.as_str());
            // Bounded even while NATS is unreachable (the client's queue full): a CONNECT
            // never waits longer than this for the other nodes.
            if !wait {
                let publish =
                    self.client
                        .publish_with_headers(self.claim_subject.clone(), headers, payload);
                match tokio::time::timeout(CLAIM_WAIT, publish).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cluster: a client ID could not be claimed from the other nodes")
                    }
                    Err(_) => tracing::warn!(
                        "cluster: a client ID could not be claimed from the other nodes in time"
                    ),
                }
                return false;
            }
            let request = async_nats::Request::new()
                .payload(payload)
                .headers(headers)
                .timeout(Some(CLAIM_WAIT));
            let asked = self
                .client
                .send_request(self.claim_subject.clone(), request);
            match tokio::time::timeout(CLAIM_WAIT * 2, asked).await {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, client = client_id, "cluster: no node handed the session over (gone?)");
                    false
                }
                Err(_) => false,
            }
        })
    }

    fn plain(&self, solution: &str, message: &Message) {
        self.send(solution, encode(solution, message, Kind::Plain));
    }

    fn live(&self, solution: &str, message: &Message, thing: &str, resource: &str) {
        self.send(
            solution,
            encode(solution, message, Kind::Live { thing, resource }),
        );
    }

    fn reply(&self, solution: &str, message: &Message) {
        self.send(solution, encode(solution, message, Kind::Reply));
    }
}

impl ChangeListener for Node {
    fn changed(
        &self,
        key: &EntityKey,
        events: &[Event],
        previous: Option<&Arc<Entity>>,
        entity: Option<&Arc<Entity>>,
    ) {
        let Some(core) = self.core.upgrade() else {
            return;
        };
        match key.kind {
            EntityKind::Thing | EntityKind::Policy => {
                let namespace = key.id.split(':').next().unwrap_or_default();
                let Some(solution) = core
                    .auth
                    .solutions
                    .owner_of_namespace(namespace)
                    .and_then(|id| core.auth.solutions.get(id.as_str()))
                else {
                    return;
                };
                let space = core.spaces.get_or_create(&solution);
                // A deleted thing's events are judged in the policy it named.
                let fallback = previous
                    .and_then(|e| e.doc.get("policyId"))
                    .and_then(serde_json::Value::as_str)
                    .and_then(|id| twin::PolicyId::parse(id).ok())
                    .and_then(|id| core.twins.policies.get(&PolicyId::from(&id)));
                dispatch::publish_events(
                    &core.twins.policies,
                    &space,
                    events,
                    fallback.as_ref(),
                    &*core.twins.store,
                    &core.metrics,
                    now(),
                );
            }
            EntityKind::Solution => match entity {
                Some(entity) => match core.auth.solutions.reload(&entity.doc) {
                    Ok(solution) => core.solution_changed(solution),
                    Err(e) => {
                        tracing::error!(solution = %key.id, error = %e, "cluster: another node stored a solution this node cannot read")
                    }
                },
                None => {
                    tracing::warn!(solution = %key.id, "cluster: a solution was deleted on another node")
                }
            },
            EntityKind::Retained => crate::core::retained::apply_remote(
                &key.id,
                entity.map(|e| &e.doc),
                &core.auth.solutions,
                &core.spaces,
            ),
            EntityKind::Session | EntityKind::Queued => {}
        }
    }
}

/// What a relayed message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind<'a> {
    Plain,
    /// A live message: the thing and its `message:` resource.
    Live {
        thing: &'a str,
        resource: &'a str,
    },
    /// An answer for a reply address.
    Reply,
}

/// A message relayed from another node.
#[derive(Debug)]
struct Relayed {
    solution: String,
    message: Arc<Message>,
    /// A live message: the thing and its `message:` resource.
    live: Option<(String, String)>,
    /// An answer for a reply address.
    reply: bool,
}

fn deliver(core: &Core, relayed: Relayed) {
    let Some(solution) = core.auth.solutions.get(&relayed.solution) else {
        return;
    };
    let space = core.spaces.get_or_create(&solution);
    if relayed.reply {
        core.deliver_reply(&space, relayed.message);
        return;
    }
    match relayed.live {
        None => {
            dispatch::publish(&space, &relayed.message, &core.metrics, &*core.twins.store);
        }
        Some((thing, resource)) => {
            let Ok(thing_id) = twin::ThingId::parse(&thing) else {
                return;
            };
            let Some(policy) = core.twins.policies.of_thing(&thing_id) else {
                return;
            };
            dispatch::publish_live(
                &space,
                relayed.message,
                &policy,
                &resource,
                thing_id.namespace(),
                &*core.twins.store,
                &core.metrics,
                now(),
            );
        }
    }
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.put_slice(s.get(..u32::MAX as usize).unwrap_or(s));
}

fn put_opt(out: &mut BytesMut, s: Option<&[u8]>) {
    match s {
        None => out.put_u8(0),
        Some(s) => {
            out.put_u8(1);
            put_str(out, s);
        }
    }
}

/// `kind, solution, topic, qos, retain, expiry, [thing, resource], properties, payload`.
fn encode(solution: &str, message: &Message, kind: Kind<'_>) -> Bytes {
    let mut out =
        BytesMut::with_capacity(64 + message.topic.as_str().len() + message.payload.len());
    out.put_u8(match kind {
        Kind::Plain => 1,
        Kind::Live { .. } => 2,
        Kind::Reply => 3,
    });
    put_str(&mut out, solution.as_bytes());
    put_str(&mut out, message.topic.as_bytes());
    out.put_u8(message.qos as u8);
    out.put_u8(u8::from(message.retain));
    let expiry = message.expires_at.map(|at| {
        u32::try_from(
            at.saturating_duration_since(Instant::now())
                .as_secs()
                .max(1),
        )
        .unwrap_or(u32::MAX)
    });
    out.put_u32(expiry.unwrap_or(0));
    if let Kind::Live { thing, resource } = kind {
        put_str(&mut out, thing.as_bytes());
        put_str(&mut out, resource.as_bytes());
    }
    match &message.properties {
        None => out.put_u8(0),
        Some(p) => {
            out.put_u8(1);
            out.put_u8(match p.payload_format_utf8 {
                None => 0,
                Some(false) => 1,
                Some(true) => 2,
            });
            put_opt(
                &mut out,
                p.content_type.as_ref().map(|s| s.as_str().as_bytes()),
            );
            put_opt(
                &mut out,
                p.response_topic.as_ref().map(|t| &t.as_bytes()[..]),
            );
            put_opt(&mut out, p.correlation_data.as_deref());
            out.put_u32(u32::try_from(p.user_properties.len()).unwrap_or(0));
            for (k, v) in &p.user_properties {
                put_str(&mut out, k.as_str().as_bytes());
                put_str(&mut out, v.as_str().as_bytes());
            }
        }
    }
    out.put_slice(&message.payload);
    out.freeze()
}

fn take_bytes(input: &mut Bytes) -> Result<Bytes, &'static str> {
    if input.remaining() < 4 {
        return Err("truncated length");
    }
    let len = input.get_u32() as usize;
    if input.remaining() < len {
        return Err("truncated field");
    }
    Ok(input.split_to(len))
}

fn take_string(input: &mut Bytes) -> Result<String, &'static str> {
    String::from_utf8(take_bytes(input)?.to_vec()).map_err(|_| "a text field is not UTF-8")
}

fn take_u8(input: &mut Bytes) -> Result<u8, &'static str> {
    if input.remaining() < 1 {
        return Err("truncated");
    }
    Ok(input.get_u8())
}

fn decode(mut input: Bytes) -> Result<Relayed, &'static str> {
    let kind = take_u8(&mut input)?;
    let solution = take_string(&mut input)?;
    let topic = TopicName::new(take_bytes(&mut input)?).map_err(|_| "not a topic name")?;
    let qos = match take_u8(&mut input)? {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err("not a QoS"),
    };
    let retain = take_u8(&mut input)? != 0;
    if input.remaining() < 4 {
        return Err("truncated expiry");
    }
    let expiry = input.get_u32();
    let live = match kind {
        1 | 3 => None,
        2 => Some((take_string(&mut input)?, take_string(&mut input)?)),
        _ => return Err("unknown kind"),
    };
    let utf8 = |b: Bytes| -> Result<Utf8Str, &'static str> {
        std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("not a UTF-8 string")
    };
    let opt = |input: &mut Bytes| -> Result<Option<Bytes>, &'static str> {
        match take_u8(input)? {
            0 => Ok(None),
            _ => take_bytes(input).map(Some),
        }
    };
    let properties = match take_u8(&mut input)? {
        0 => None,
        _ => {
            let payload_format_utf8 = match take_u8(&mut input)? {
                0 => None,
                1 => Some(false),
                _ => Some(true),
            };
            let content_type = opt(&mut input)?.map(utf8).transpose()?;
            let response_topic = opt(&mut input)?
                .map(|b| TopicName::new(b).map_err(|_| "not a topic name"))
                .transpose()?;
            let correlation_data = opt(&mut input)?;
            if input.remaining() < 4 {
                return Err("truncated user properties");
            }
            let count = input.get_u32();
            let mut user_properties = Vec::new();
            for _ in 0..count {
                let k = utf8(take_bytes(&mut input)?)?;
                let v = utf8(take_bytes(&mut input)?)?;
                user_properties.push((k, v));
            }
            Some(Box::new(ForwardedProperties {
                payload_format_utf8,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            }))
        }
    };
    let message = Message::new(
        topic,
        input,
        Origin {
            qos,
            retain,
            properties,
            expiry_seconds: (expiry > 0).then_some(expiry),
            publisher: 0,
        },
    );
    Ok(Relayed {
        solution,
        message,
        live,
        reply: kind == 3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_message_decodes_to_what_was_sent() {
        let props = ForwardedProperties {
            payload_format_utf8: Some(true),
            content_type: Some(
                "application/json"
                    .parse()
                    .unwrap_or_else(|_| unreachable!()),
            ),
            response_topic: Some("a/b".parse().unwrap_or_else(|_| unreachable!())),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![(
                "k".parse().unwrap_or_else(|_| unreachable!()),
                "v".parse().unwrap_or_else(|_| unreachable!()),
            )],
        };
        let message = Message::new(
            "x/y".parse().unwrap_or_else(|_| unreachable!()),
            Bytes::from_static(b"payload"),
            Origin {
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Some(Box::new(props)),
                expiry_seconds: Some(60),
                publisher: 7,
            },
        );
        let relayed = decode(encode(
            "acme",
            &message,
            Kind::Live {
                thing: "ns:t",
                resource: "/inbox/messages/x",
            },
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(relayed.solution, "acme");
        assert_eq!(relayed.message.topic.as_str(), "x/y");
        assert_eq!(&relayed.message.payload[..], b"payload");
        assert_eq!(relayed.message.qos, QoS::AtLeastOnce);
        assert!(relayed.message.retain);
        assert!(relayed.message.expires_at.is_some());
        assert_eq!(relayed.message.publisher, 0);
        assert_eq!(
            relayed.live,
            Some(("ns:t".into(), "/inbox/messages/x".into()))
        );
        let p = relayed
            .message
            .properties
            .as_deref()
            .unwrap_or_else(|| unreachable!());
        assert_eq!(p.payload_format_utf8, Some(true));
        assert_eq!(
            p.content_type.as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.correlation_data.as_deref(), Some(&b"\x00\x01"[..]));
        assert_eq!(p.user_properties.len(), 1);
        assert!(!relayed.reply);
        let answer =
            decode(encode("acme", &message, Kind::Reply)).unwrap_or_else(|e| panic!("{e}"));
        assert!(answer.reply && answer.live.is_none());
        for cut in 0..20 {
            let mut bytes = encode("acme", &message, Kind::Plain).to_vec();
            bytes.truncate(cut);
            assert!(decode(Bytes::from(bytes)).is_err(), "cut at {cut}");
        }
    }
}
