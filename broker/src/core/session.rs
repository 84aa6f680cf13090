//! One client's session (MQTT §4.1): what outlives a network connection — subscriptions,
//! messages waiting to be sent, QoS 1/2 messages awaiting acknowledgement, QoS 2 packet
//! identifiers awaiting PUBREL — and the subjects whose policy view decides each delivery.
//!
//! A session is shared: publishers (any connection's task) push deliveries into its queue, its
//! connection (if one is attached) drains the queue into the socket. The state sits behind a
//! `std::sync::Mutex` that is never held across an `.await`; `wake` tells the attached
//! connection that there is something to send. The queue is bounded (`crate::limits`).

use std::collections::{HashMap, VecDeque};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use policy::{Enforcer, Mode, Permission, ResourceType, SubjectView, Timestamp};
use tokio::sync::Notify;

use crate::mqtt::codec::{
    Packet, Properties, Protocol, PubResponse, Publish, QoS, QosPid, SubscriptionOptions,
    TopicName, Utf8Str,
};
use crate::metrics::Metrics;

/// One published message as it travels to subscribers: topic and payload copied out of the
/// publisher's read buffer (so a queued message keeps only its own bytes alive).
#[derive(Debug)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties forwarded to subscribers; `None` for most messages.
    pub properties: Option<Box<ForwardedProperties>>,
    /// From the v5 Message Expiry Interval: dropped, not sent, once passed.
    pub expires_at: Option<Instant>,
    /// The publishing session's [`Session::id`], for No Local (0: none, e.g. a will).
    pub publisher: u64,
}

/// The PUBLISH properties the server forwards unchanged (MQTT 5 §3.3.2.3).
#[derive(Debug, Clone, Default)]
pub struct ForwardedProperties {
    pub payload_format_utf8: Option<bool>,
    pub content_type: Option<Utf8Str>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(Utf8Str, Utf8Str)>,
}

impl ForwardedProperties {
    /// The forwarded part of `p`, or `None` when there is nothing to forward.
    pub fn from_publish(p: &Properties) -> Option<Box<Self>> {
        if p.payload_format_utf8.is_none()
            && p.content_type.is_none()
            && p.response_topic.is_none()
            && p.correlation_data.is_none()
            && p.user_properties.is_empty()
        {
            return None;
        }
        Some(Box::new(ForwardedProperties {
            payload_format_utf8: p.payload_format_utf8,
            content_type: p.content_type.as_ref().map(deep_copy_utf8),
            response_topic: p.response_topic.as_ref().map(deep_copy_topic),
            correlation_data: p.correlation_data.as_deref().map(Bytes::copy_from_slice),
            user_properties: p
                .user_properties
                .iter()
                .map(|(k, v)| (deep_copy_utf8(k), deep_copy_utf8(v)))
                .collect(),
        }))
    }
}

fn deep_copy_utf8(s: &Utf8Str) -> Utf8Str {
    s.as_str().parse().unwrap_or_else(|_| s.clone())
}

/// A topic name in its own allocation (not a slice of a read buffer).
pub fn deep_copy_topic(t: &TopicName) -> TopicName {
    TopicName::new(Bytes::copy_from_slice(t.as_bytes())).unwrap_or_else(|_| t.clone())
}

/// A message on its way to one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// The QoS it is sent with: the message's, capped by the subscription's.
    pub qos: QoS,
    pub retain: bool,
    /// Identifiers of the matching subscriptions (MQTT 5), usually none or one.
    pub subscription_ids: Vec<NonZeroU32>,
}

/// What happened to a delivery offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// The subscriber's subjects may not READ the topic.
    Denied,
    /// Dropped by a limit (counted in the metrics).
    Dropped,
}

/// A subscription as the session remembers it (to answer UNSUBSCRIBE and to rebuild).
#[derive(Debug, Clone)]
pub struct SubscriptionRecord {
    pub options: SubscriptionOptions,
    pub id: Option<NonZeroU32>,
}

/// A sent QoS 1/2 message awaiting its acknowledgement.
#[derive(Debug)]
struct Inflight {
    packet_id: NonZeroU16,
    delivery: Delivery,
    /// QoS 2 only: PUBREC arrived and PUBREL was sent; waiting for PUBCOMP.
    released: bool,
}

/// The handle of the connection currently attached to a session.
#[derive(Debug, Default)]
pub struct Link {
    /// Notified when another connection takes the session over (or the server shuts down).
    pub kick: Notify,
}

/// The mutable part of a session.
#[derive(Debug)]
pub struct SessionState {
    /// Increases on every attach: a task that remembers an older value knows its connection
    /// has been replaced (takeover) and must leave the session alone.
    pub generation: u64,
    pub link: Option<Arc<Link>>,
    /// The connection's subjects and their view of the solution policy, for deliveries.
    subjects: Arc<[String]>,
    view: SubjectView,
    /// The same subjects' views of thing policies (twin commands, events, live messages).
    pub policy_views: PolicyViews,
    pub subscriptions: HashMap<Box<str>, SubscriptionRecord>,
    queue: VecDeque<Delivery>,
    inflight: VecDeque<Inflight>,
    next_packet_id: u16,
    /// QoS 2 packet identifiers received and acknowledged with PUBREC, awaiting PUBREL.
    pub incoming_qos2: Vec<NonZeroU16>,
    /// Seconds the session outlives its connection (0: it ends with it; `u32::MAX`: never).
    pub expiry_interval: u32,
    max_queued: usize,
}

/// A client's session.
#[derive(Debug)]
pub struct Session {
    /// Unique in the process (No Local compares it).
    pub id: u64,
    pub client_id: Arc<str>,
    state: Mutex<SessionState>,
    /// Something was queued for the attached connection.
    pub wake: Notify,
}

static NEXT_SESSION_ID: AtomicU64 = AtomicU64::new(1);

impl Session {
    pub fn new(
        client_id: Arc<str>,
        subjects: Arc<[String]>,
        view: SubjectView,
        expiry_interval: u32,
        max_queued: usize,
    ) -> Self {
        Session {
            id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
            client_id,
            state: Mutex::new(SessionState {
                generation: 0,
                link: None,
                subjects,
                view,
                policy_views: PolicyViews::default(),
                subscriptions: HashMap::new(),
                queue: VecDeque::new(),
                inflight: VecDeque::new(),
                next_packet_id: 1,
                incoming_qos2: Vec::new(),
                expiry_interval,
                max_queued,
            }),
            wake: Notify::new(),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        // Every change to the state is a few field updates with no panic in between: a
        // poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Offers a delivery: checked against the session's subjects (unrestricted READ on
    /// `topic:/<levels>`), then queued if the queue has room. `policy` is the solution
    /// policy's current revision; the view is rebuilt when it changed or a subject expired.
    pub fn offer(
        &self,
        delivery: Delivery,
        policy: &Arc<Enforcer>,
        now: Timestamp,
        metrics: &Metrics,
    ) -> Offer {
        self.offer_with(metrics, |state| {
            state.refresh_view(policy, now);
            state
                .view
                .check(
                    ResourceType::Topic,
                    delivery.message.topic.as_str(),
                    Permission::Read,
                    Mode::Unrestricted,
                )
                .then_some(delivery)
        })
    }

    /// Offers what `decide` makes of this session (`None`: the session may not have it, e.g.
    /// its subjects cannot READ it), under the session's lock; queued if there is room.
    pub fn offer_with(
        &self,
        metrics: &Metrics,
        decide: impl FnOnce(&mut SessionState) -> Option<Delivery>,
    ) -> Offer {
        let mut state = self.lock();
        let Some(delivery) = decide(&mut state) else {
            return Offer::Denied;
        };
        if state.link.is_none() && delivery.qos == QoS::AtMostOnce {
            // QoS 0 messages are not kept for an offline session (MQTT §3.1.2.4 allows it).
            return Offer::Dropped;
        }
        if state.queue.len() >= state.max_queued {
            metrics.dropped("queue_full");
            return Offer::Dropped;
        }
        state.queue.push_back(delivery);
        let online = state.link.is_some();
        drop(state);
        if online {
            self.wake.notify_one();
        }
        Offer::Queued
    }
}

/// A session's views of thing and policy policies, one per policy ID: rebuilt when the policy's
/// revision (its compiled `Enforcer`) changes, a matched subject expires, or the namespace
/// asked about differs. Bounded: cleared when it reaches [`PolicyViews::MAX`] entries.
#[derive(Debug, Default)]
pub struct PolicyViews {
    map: HashMap<Arc<str>, (Box<str>, SubjectView)>,
}

impl PolicyViews {
    pub const MAX: usize = 4096;

    /// The view of `enforcer` (policy `policy_id`) for `subjects`, for a thing in `namespace`.
    pub fn get(
        &mut self,
        policy_id: &Arc<str>,
        enforcer: &Arc<Enforcer>,
        namespace: &str,
        subjects: &[String],
        now: Timestamp,
    ) -> &SubjectView {
        if self.map.len() >= Self::MAX && !self.map.contains_key(policy_id) {
            self.map.clear();
        }
        let build = || {
            (
                Box::<str>::from(namespace),
                enforcer.for_subjects(subjects, Some(namespace), now),
            )
        };
        let slot = self.map.entry(policy_id.clone()).or_insert_with(build);
        let fresh = Arc::ptr_eq(slot.1.enforcer(), enforcer)
            && &*slot.0 == namespace
            && slot.1.is_valid_at(now);
        if !fresh {
            *slot = build();
        }
        &slot.1
    }
}

/// What the connection must do with a client's acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Matched an inflight message (which may free room for queued ones).
    Done,
    /// PUBREC matched: send PUBREL.
    SendPubRel,
    /// No inflight message has this identifier (v5 PUBREL/PUBCOMP reason 0x92).
    Unknown,
}

impl SessionState {
    pub fn subjects(&self) -> &Arc<[String]> {
        &self.subjects
    }

    pub fn view(&self) -> &SubjectView {
        &self.view
    }

    /// Replaces the subjects (a new connection resumed the session, or re-authenticated).
    pub fn set_subjects(&mut self, subjects: Arc<[String]>, view: SubjectView) {
        self.subjects = subjects;
        self.view = view;
        self.policy_views = PolicyViews::default();
    }

    /// The view of a thing (or policy) policy for this session's subjects.
    pub fn policy_view(
        &mut self,
        policy_id: &Arc<str>,
        enforcer: &Arc<Enforcer>,
        namespace: &str,
        now: Timestamp,
    ) -> &SubjectView {
        self.policy_views
            .get(policy_id, enforcer, namespace, &self.subjects, now)
    }

    /// Rebuilds the view if the policy revision changed or a matched subject expired.
    pub fn refresh_view(&mut self, policy: &Arc<Enforcer>, now: Timestamp) {
        if !Arc::ptr_eq(self.view.enforcer(), policy) || !self.view.is_valid_at(now) {
            self.view = policy.for_subjects(&self.subjects, None, now);
        }
    }

    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Drops what is queued and in flight (Clean Start on a resumed session is handled by
    /// creating a new session instead; this is for session end).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.inflight.clear();
        self.incoming_qos2.clear();
        self.subscriptions.clear();
    }

    /// Encodes every message that may be sent now into `out`: queued messages while fewer than
    /// `max_inflight` QoS 1/2 messages await acknowledgement. Returns how many were sent.
    pub fn drain_into(&mut self, out: &mut Outbound<'_>, max_inflight: usize) -> usize {
        let mut sent = 0;
        while self.inflight.len() < max_inflight {
            let Some(delivery) = self.queue.pop_front() else {
                break;
            };
            let now = Instant::now();
            if delivery.message.expires_at.is_some_and(|at| at <= now) {
                out.metrics.dropped("expired");
                continue;
            }
            let qos = match delivery.qos {
                QoS::AtMostOnce => QosPid::AtMostOnce,
                QoS::AtLeastOnce => QosPid::AtLeastOnce(self.allocate_packet_id()),
                QoS::ExactlyOnce => QosPid::ExactlyOnce(self.allocate_packet_id()),
            };
            if !out.publish(&delivery, qos, false) {
                // Too large for this client: as if it had been delivered (MQTT-3.1.2-25).
                continue;
            }
            sent += 1;
            if let Some(packet_id) = qos.packet_id() {
                self.inflight.push_back(Inflight {
                    packet_id,
                    delivery,
                    released: false,
                });
            }
        }
        sent
    }

    /// Re-sends what was in flight when the previous connection ended (MQTT §4.4): PUBLISH with
    /// DUP for unacknowledged messages, PUBREL for QoS 2 messages already received.
    pub fn resend_inflight(&mut self, out: &mut Outbound<'_>) {
        for entry in &self.inflight {
            if entry.released {
                out.packet(&Packet::PubRel(PubResponse {
                    packet_id: entry.packet_id,
                    reason: 0,
                    properties: Properties::default(),
                }));
            } else {
                let qos = match entry.delivery.qos {
                    QoS::ExactlyOnce => QosPid::ExactlyOnce(entry.packet_id),
                    _ => QosPid::AtLeastOnce(entry.packet_id),
                };
                out.publish(&entry.delivery, qos, true);
            }
        }
    }

    fn allocate_packet_id(&mut self) -> NonZeroU16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if let Some(id) = NonZeroU16::new(id)
                && !self.inflight.iter().any(|e| e.packet_id == id)
            {
                return id;
            }
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client.
    pub fn complete(&mut self, packet_id: NonZeroU16, qos: QoS) -> AckOutcome {
        let position = self.inflight.iter().position(|e| {
            e.packet_id == packet_id
                && e.delivery.qos == qos
                && (qos == QoS::AtLeastOnce || e.released)
        });
        match position {
            Some(i) => {
                self.inflight.remove(i);
                AckOutcome::Done
            }
            None => AckOutcome::Unknown,
        }
    }

    /// PUBREC from the client; a failure reason (≥ 0x80) ends the exchange.
    pub fn received(&mut self, packet_id: NonZeroU16, reason: u8) -> AckOutcome {
        let Some(i) = self
            .inflight
            .iter()
            .position(|e| e.packet_id == packet_id && e.delivery.qos == QoS::ExactlyOnce)
        else {
            return AckOutcome::Unknown;
        };
        if reason >= 0x80 {
            self.inflight.remove(i);
            return AckOutcome::Done;
        }
        if let Some(e) = self.inflight.get_mut(i) {
            e.released = true;
        }
        AckOutcome::SendPubRel
    }
}

/// Topic aliases the server assigned on one connection (MQTT 5 §3.3.2.3.4): the first PUBLISH
/// on a topic carries topic and alias, later ones only the alias. Aliases are given out until
/// the client's Topic Alias Maximum is reached and never reassigned; the map is allocated only
/// when a client allows aliases and a message is sent.
#[derive(Debug, Default)]
pub struct TopicAliases {
    /// The client's Topic Alias Maximum (0: none).
    pub max: u16,
    map: HashMap<Box<str>, NonZeroU16>,
}

impl TopicAliases {
    pub fn new(max: u16) -> Self {
        TopicAliases {
            max,
            map: HashMap::new(),
        }
    }

    /// The alias for `topic` and whether the topic must still be sent with it.
    fn alias(&mut self, topic: &str) -> Option<(NonZeroU16, bool)> {
        if let Some(&alias) = self.map.get(topic) {
            return Some((alias, false));
        }
        if self.map.len() >= usize::from(self.max) {
            return None;
        }
        let alias = NonZeroU16::new(u16::try_from(self.map.len() + 1).ok()?)?;
        self.map.insert(topic.into(), alias);
        Some((alias, true))
    }
}

/// Encodes packets for one connection into its write buffer, honouring the client's maximum
/// packet size and using topic aliases where the client allows them.
#[derive(Debug)]
pub struct Outbound<'a> {
    pub buf: &'a mut BytesMut,
    pub protocol: Protocol,
    /// The client's Maximum Packet Size (v5), or `u32::MAX`.
    pub max_packet_size: u32,
    pub metrics: &'a Metrics,
    pub aliases: &'a mut TopicAliases,
}

impl Outbound<'_> {
    /// Appends `packet`; false (and nothing written) if it cannot be encoded or is too large.
    pub fn packet(&mut self, packet: &Packet) -> bool {
        let start = self.buf.len();
        match packet.encode(self.protocol, self.buf) {
            Ok(size) if size <= self.max_packet_size as usize => true,
            Ok(_) => {
                self.buf.truncate(start);
                self.metrics.dropped("too_large");
                false
            }
            Err(_) => {
                self.buf.truncate(start);
                self.metrics.dropped("unencodable");
                false
            }
        }
    }

    /// Appends a PUBLISH for `delivery`.
    pub fn publish(&mut self, delivery: &Delivery, qos: QosPid, dup: bool) -> bool {
        let message = &delivery.message;
        let mut properties = Properties::default();
        if self.protocol == Protocol::V5 {
            if let Some(forwarded) = &message.properties {
                properties.payload_format_utf8 = forwarded.payload_format_utf8;
                properties.content_type = forwarded.content_type.clone();
                properties.response_topic = forwarded.response_topic.clone();
                properties.correlation_data = forwarded.correlation_data.clone();
                properties.user_properties = forwarded.user_properties.clone();
            }
            if let Some(at) = message.expires_at {
                let left = at.saturating_duration_since(Instant::now());
                let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                properties.message_expiry_interval =
                    Some(u32::try_from(seconds.max(1)).unwrap_or(u32::MAX));
            }
            properties.subscription_identifiers = delivery.subscription_ids.clone();
        }
        let mut topic = message.topic.clone();
        // A retransmission (DUP) is sent with its full topic: the alias may be new to this
        // network connection.
        if self.protocol == Protocol::V5
            && self.aliases.max > 0
            && !dup
            && let Some((alias, first)) = self.aliases.alias(message.topic.as_str())
        {
            properties.topic_alias = Some(alias);
            if !first {
                topic = TopicName::default();
            }
        }
        let ok = self.packet(&Packet::Publish(Publish {
            dup,
            qos,
            retain: delivery.retain,
            topic,
            payload: message.payload.clone(),
            properties,
        }));
        if ok {
            self.metrics.messages_delivered.inc();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use policy::{Enforcer, Mode, Permission, ResourceType, Timestamp};
    use serde_json::json;

    use super::PolicyViews;

    fn enforcer(subject: &str) -> Arc<Enforcer> {
        let policy =
            policy::policy_from_value(&json!({"policyId": "org.acme:p", "entries": {"e": {
                "subjects": {subject: {"type": "t"}},
                "resources": {"thing:/": {"grant": ["READ"], "revoke": []}}
            }}}))
            .unwrap();
        Arc::new(Enforcer::compile(&policy))
    }

    #[test]
    fn a_memoized_view_follows_a_new_policy_revision() {
        let mut views = PolicyViews::default();
        let id: Arc<str> = "org.acme:p".into();
        let subjects = ["s:a".to_owned()];
        let now = Timestamp::from_unix_millis(0);
        let first = enforcer("s:a");
        let read = |v: &policy::SubjectView| {
            v.check(ResourceType::Thing, "/x", Permission::Read, Mode::Partial)
        };
        assert!(read(views.get(&id, &first, "org.acme", &subjects, now)));
        // The same revision again: the memo answers.
        assert!(read(views.get(&id, &first, "org.acme", &subjects, now)));
        // A new revision that no longer names the subject: the view is rebuilt at once.
        let revoked = enforcer("s:b");
        assert!(!read(views.get(&id, &revoked, "org.acme", &subjects, now)));
    }
}
