//! One client's session (MQTT §4.1; the sink every delivery of the fan-out goes into): what outlives a network connection — subscriptions,
//! messages waiting to be sent, QoS 1/2 messages awaiting acknowledgement, QoS 2 packet
//! identifiers awaiting PUBREL — and the subjects whose policy view decides each delivery.
//!
//! A session is shared: publishers (any connection's task) push deliveries into its queue, its
//! connection (if one is attached) drains the queue into the socket. The state sits behind a
//! `std::sync::Mutex` that is never held across an `.await`; the [`Link`] of the attached
//! connection tells it that there is something to send. The queue is bounded (`crate::limits`).

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU16;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::task::AtomicWaker;
use policy::{Enforcer, SubjectView, Timestamp};

use crate::core::message::{Delivery, Offer};
use crate::core::policies::{PolicyId, PolicyRef};
use crate::core::space::tree_filter;
use crate::core::topics;
use crate::metrics::Metrics;
use crate::mqtt::codec::{QoS, QosPid, SubscriptionOptions};

/// A subscription as the session remembers it (to answer UNSUBSCRIBE, to remove it from the
/// tree when the session ends, and to tell the QoS of an answer on a response topic).
#[derive(Debug, Clone)]
pub struct SubscriptionRecord {
    pub options: SubscriptionOptions,
    /// Its MQTT 5 subscription identifier (kept to restore the subscription after a restart).
    pub id: Option<std::num::NonZeroU32>,
}

/// A sent QoS 1/2 message awaiting its acknowledgement.
#[derive(Debug)]
struct Inflight {
    packet_id: NonZeroU16,
    delivery: Delivery,
    /// QoS 2 only: PUBREC arrived and PUBREL was sent; waiting for PUBCOMP.
    released: bool,
}

/// The handle of the connection currently attached to a session, and the one way its task
/// is woken: a kick (takeover, revocation, shutdown), something queued in the session, or one
/// of its deadlines ([`crate::core::deadlines`]). One waker for all three: a connection waits
/// by polling the link, with no `Notified` or `Sleep` future of its own kept in its task
/// (each sized every idle connection: two `Notify` and a timer were ~300 bytes of it).
#[derive(Debug)]
pub struct Link {
    /// [`Signal`] bits raised and not yet taken by the attached task.
    signals: AtomicU8,
    waker: AtomicWaker,
    /// Set before the kick of a revocation.
    pub revoked: std::sync::atomic::AtomicBool,
    /// How the client is connected (for metrics).
    pub protocol: Protocol,
    /// The number of the solution secret it connected with (0: none).
    pub secret: u32,
}

/// What a [`Link`] tells its task; a bit each, raised until taken (like a `Notify` permit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Signal {
    /// Another connection took the session over, the server shuts down, or the credentials
    /// were revoked (`revoked` set first).
    Kicked = 1,
    /// Something was queued in the session.
    Queued = 2,
    /// A deadline the task registered has come.
    Deadline = 4,
}

/// The ways a client holds a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum Protocol {
    #[default]
    Mqtt,
    MqttWebSocket,
    /// A request or stream of the HTTP API.
    Http,
    /// An AMQP 0.9.1 connection.
    Amqp,
    /// A queue an AMQP connection declared (a session of its own).
    AmqpQueue,
    /// A bridge connection's source or target (`crate::bridge`).
    Bridge,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::MqttWebSocket => "mqtt-ws",
            Protocol::Http => "http",
            Protocol::Amqp => "amqp",
            Protocol::AmqpQueue => "amqp-queue",
            Protocol::Bridge => "bridge",
        }
    }
}

impl Link {
    pub fn new(protocol: Protocol, secret: Option<u32>) -> Self {
        Link {
            signals: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            revoked: std::sync::atomic::AtomicBool::new(false),
            protocol,
            secret: secret.unwrap_or(0),
        }
    }

    /// Tells the attached task to end (takeover, revocation, shutdown).
    pub fn kick(&self) {
        self.raise(Signal::Kicked);
    }

    /// Tells the attached task that something was queued in its session.
    pub fn wake(&self) {
        self.raise(Signal::Queued);
    }

    /// Raises `signal` and wakes the task waiting on the link, if any.
    pub fn raise(&self, signal: Signal) {
        if let Some(waker) = self.raise_quietly(signal) {
            waker.wake();
        }
    }

    /// Raises `signal` and returns the waker to wake, so that the caller can wake it after
    /// letting go of a lock.
    #[must_use]
    fn raise_quietly(&self, signal: Signal) -> Option<std::task::Waker> {
        self.signals.fetch_or(signal as u8, Ordering::AcqRel);
        self.waker.take()
    }

    /// Ready once `signal` was raised since it was last taken; takes it. The task polling it is
    /// woken by the next raise of any signal: one task polls a link.
    pub fn poll_take(&self, cx: &mut Context<'_>, signal: Signal) -> Poll<()> {
        let bit = signal as u8;
        // Registered before looking: a raise after the look wakes this task.
        self.waker.register(cx.waker());
        if self.signals.load(Ordering::Acquire) & bit != 0
            && self.signals.fetch_and(!bit, Ordering::AcqRel) & bit != 0
        {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Completes once something was queued in the session.
    pub async fn woken(&self) {
        std::future::poll_fn(|cx| self.poll_take(cx, Signal::Queued)).await;
    }
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
    pub subscriptions: Subscriptions,
    queue: VecDeque<Delivery>,
    inflight: VecDeque<Inflight>,
    next_packet_id: u16,
    /// The identifiers in `inflight` increase from front to back (`allocate_packet_id`).
    inflight_ordered: bool,
    /// QoS 2 packet identifiers received and acknowledged with PUBREC, awaiting PUBREL.
    pub incoming_qos2: Vec<NonZeroU16>,
    /// Seconds the session outlives its connection (0: it ends with it; `u32::MAX`: never).
    pub expiry_interval: u32,
    /// The journal's bookkeeping when the journal holds this session
    /// (`crate::core::sessions`); out of line, since most sessions end with their connection
    /// and an idle connection's session should stay small.
    pub journal: Option<Box<Journaled>>,
    max_queued: u32,
}

/// A session's subscriptions by filter, the map allocated at the first: an empty `HashMap`
/// inline is 48 bytes of every session, and most devices never subscribe.
#[derive(Debug, Default)]
pub struct Subscriptions(Option<Box<SubscriptionMap>>);

type SubscriptionMap = HashMap<Box<str>, SubscriptionRecord>;

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |map| map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        self.0.as_ref().is_some_and(|map| map.contains_key(filter))
    }

    /// Adds or replaces the subscription of `filter`; returns the one it replaced.
    pub fn insert(
        &mut self,
        filter: Box<str>,
        record: SubscriptionRecord,
    ) -> Option<SubscriptionRecord> {
        self.0.get_or_insert_default().insert(filter, record)
    }

    pub fn remove(&mut self, filter: &str) -> Option<SubscriptionRecord> {
        let map = self.0.as_mut()?;
        let removed = map.remove(filter);
        if map.is_empty() {
            self.0 = None;
        }
        removed
    }

    pub fn clear(&mut self) {
        self.0 = None;
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Box<str>, &SubscriptionRecord)> {
        self.0.iter().flat_map(|map| map.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &Box<str>> {
        self.iter().map(|(filter, _)| filter)
    }
}

/// A client's session.
#[derive(Debug)]
pub struct Session {
    /// Unique in the process (No Local compares it).
    pub id: u64,
    pub client_id: Arc<str>,
    state: Mutex<SessionState>,
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
                subscriptions: Subscriptions::default(),
                queue: VecDeque::new(),
                inflight: VecDeque::new(),
                next_packet_id: 1,
                inflight_ordered: true,
                incoming_qos2: Vec::new(),
                expiry_interval,
                journal: None,
                max_queued: u32::try_from(max_queued).unwrap_or(u32::MAX),
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        // Every change to the state is a few field updates with no panic in between: a
        // poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a QoS 1/2 delivery would be queued now (online, or QoS ≥ 1; room in the queue):
    /// worth journaling first.
    pub fn has_room(state: &SessionState) -> bool {
        state.queue.len() < state.max_queued as usize
    }

    /// Whether the session has any subscription.
    pub fn has_subscriptions(&self) -> bool {
        !self.lock().subscriptions.is_empty()
    }

    /// The QoS of the session's subscription matching `topic`, if any.
    pub fn subscribed_qos(&self, topic: &str) -> Option<QoS> {
        let state = self.lock();
        state
            .subscriptions
            .iter()
            .filter(|(filter, _)| topics::matches(tree_filter(filter), topic))
            .map(|(_, record)| record.options.qos)
            .max()
    }

    /// Queues a delivery the caller has judged (under this lock) if there is room, then wakes
    /// the attached connection. QoS 0 is not kept for an offline session (MQTT §3.1.2.4 allows
    /// it); a full queue drops the newest message (`crate::limits`).
    pub fn enqueue(
        &self,
        mut state: MutexGuard<'_, SessionState>,
        delivery: Delivery,
        metrics: &Metrics,
    ) -> Offer {
        if state.link.is_none() && delivery.qos == QoS::AtMostOnce {
            return Offer::Dropped;
        }
        if state.queue.len() >= state.max_queued as usize {
            metrics.dropped("queue_full");
            return Offer::Dropped;
        }
        state.queue.push_back(delivery);
        let waker = state
            .link
            .as_ref()
            .and_then(|link| link.raise_quietly(Signal::Queued));
        // Woken after the lock is let go: the woken task takes it first thing.
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Offer::Queued
    }
}

/// A session's views of thing and policy policies, one per policy ID: rebuilt when the policy's
/// revision (its compiled `Enforcer`) changes, a matched subject expires, or the namespace
/// asked about differs. Bounded: cleared when it reaches [`PolicyViews::MAX`] entries.
///
/// The map is allocated at first use: most sessions (plain topics, an idle connection) never
/// meet a thing policy, and an empty `HashMap` inline is 48 bytes of every session.
#[derive(Debug, Default)]
pub struct PolicyViews {
    map: Option<Box<ViewsByPolicy>>,
}

/// Per policy ID: the namespace a view was built for, and the view.
type ViewsByPolicy = HashMap<PolicyId, (Box<str>, SubjectView)>;

impl PolicyViews {
    pub const MAX: usize = 4096;

    /// The view of `enforcer` (policy `policy_id`) for `subjects`, for a thing in `namespace`.
    pub fn get(
        &mut self,
        policy_id: &PolicyId,
        enforcer: &Arc<Enforcer>,
        namespace: &str,
        subjects: &[String],
        now: Timestamp,
    ) -> &SubjectView {
        let map = self.map.get_or_insert_with(Box::default);
        if map.len() >= Self::MAX && !map.contains_key(policy_id) {
            map.clear();
        }
        let build = || {
            (
                Box::<str>::from(namespace),
                enforcer.for_subjects(subjects, Some(namespace), now),
            )
        };
        let slot = map.entry(policy_id.clone()).or_insert_with(build);
        let fresh = Arc::ptr_eq(slot.1.enforcer(), enforcer)
            && &*slot.0 == namespace
            && slot.1.is_valid_at(now);
        if !fresh {
            *slot = build();
        }
        &slot.1
    }
}

/// One message to send again when a session is resumed.
#[derive(Debug)]
pub enum Resend<'a> {
    /// Not acknowledged: the PUBLISH again, with DUP.
    Publish(&'a Delivery, QosPid),
    /// QoS 2, PUBREC received: the PUBREL again.
    Release(NonZeroU16),
}

/// A persistent session's journal bookkeeping.
#[derive(Debug)]
pub struct Journaled {
    /// The sequence number the next journaled delivery of this session gets.
    pub next_stored: u64,
    /// Journaled deliveries that left the session (acknowledged, refused, expired): their
    /// records are deleted by the connection's next drain.
    pub forgotten: Vec<u64>,
    /// Journaled deliveries sent since the last drain, with their packet identifiers: recorded
    /// so that after a restart they are sent again under the same identifiers (MQTT-4.4.0-1).
    pub sent_stored: Vec<(u64, NonZeroU16)>,
}

impl Default for Journaled {
    fn default() -> Self {
        Journaled {
            next_stored: 1,
            forgotten: Vec::new(),
            sent_stored: Vec::new(),
        }
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
        policy: &PolicyRef,
        namespace: &str,
        now: Timestamp,
    ) -> &SubjectView {
        self.policy_views
            .get(&policy.id, &policy.enforcer, namespace, &self.subjects, now)
    }

    /// Rebuilds the view if the policy revision changed or a matched subject expired.
    pub fn refresh_view(&mut self, policy: &Arc<Enforcer>, now: Timestamp) {
        if !Arc::ptr_eq(self.view.enforcer(), policy) || !self.view.is_valid_at(now) {
            self.view = policy.for_subjects(&self.subjects, None, now);
        }
    }

    /// Puts a journaled delivery back at start-up (in sequence order): in flight under its
    /// packet identifier if it had been sent (it is sent again with DUP on resume), else queued.
    pub fn restore_queued(&mut self, delivery: Delivery, packet_id: Option<NonZeroU16>) {
        if let Some(seq) = delivery.stored {
            let journal = self.journal.get_or_insert_with(Box::default);
            journal.next_stored = journal.next_stored.max(seq.saturating_add(1));
        }
        match packet_id {
            Some(packet_id) if !self.inflight.iter().any(|e| e.packet_id == packet_id) => {
                // Restored in journal order, which need not be the order the identifiers were
                // allocated in (a requeued delivery is sent again later under a new one).
                if let Some(back) = self.inflight.back() {
                    let step = packet_id.get().wrapping_sub(back.packet_id.get());
                    if step == 0 || step >= 0x8000 {
                        self.inflight_ordered = false;
                    }
                }
                self.next_packet_id = packet_id.get().checked_add(1).unwrap_or(1);
                self.inflight.push_back(Inflight {
                    packet_id,
                    delivery,
                    released: false,
                });
            }
            _ => self.queue.push_back(delivery),
        }
    }

    /// A journaled delivery (`stored`) left the session: its record is to be deleted.
    fn forget(&mut self, stored: Option<u64>) {
        if let (Some(seq), Some(journal)) = (stored, self.journal.as_mut()) {
            journal.forgotten.push(seq);
        }
    }

    /// Whether the journal holds this session.
    pub fn persisted(&self) -> bool {
        self.journal.is_some()
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

    /// Hands every message that may be sent now to `send`: queued messages while fewer than
    /// `max_inflight` QoS 1/2 messages await acknowledgement, each with the packet identifier
    /// it is sent under. `send` returns false when the message cannot reach this client (too
    /// large for it): as if delivered (MQTT-3.1.2-25). Returns how many were sent.
    pub fn drain(
        &mut self,
        max_inflight: usize,
        metrics: &Metrics,
        send: impl FnMut(&Delivery, QosPid) -> bool,
    ) -> usize {
        self.drain_at_most(max_inflight, usize::MAX, metrics, send)
    }

    /// [`SessionState::drain`], sending at most `limit` messages (QoS 0 included): for an
    /// adapter whose window counts every unacknowledged delivery (AMQP prefetch).
    pub fn drain_at_most(
        &mut self,
        max_inflight: usize,
        limit: usize,
        metrics: &Metrics,
        mut send: impl FnMut(&Delivery, QosPid) -> bool,
    ) -> usize {
        let mut sent = 0;
        while self.inflight.len() < max_inflight && sent < limit {
            let Some(delivery) = self.queue.pop_front() else {
                break;
            };
            let now = Instant::now();
            if delivery.message.expires_at.is_some_and(|at| at <= now) {
                metrics.dropped("expired");
                self.forget(delivery.stored);
                continue;
            }
            let qos = match delivery.qos {
                QoS::AtMostOnce => QosPid::AtMostOnce,
                QoS::AtLeastOnce => QosPid::AtLeastOnce(self.allocate_packet_id()),
                QoS::ExactlyOnce => QosPid::ExactlyOnce(self.allocate_packet_id()),
            };
            if !send(&delivery, qos) {
                self.forget(delivery.stored);
                continue;
            }
            sent += 1;
            if let Some(packet_id) = qos.packet_id() {
                if let (Some(seq), Some(journal)) = (delivery.stored, self.journal.as_mut()) {
                    journal.sent_stored.push((seq, packet_id));
                }
                self.inflight.push_back(Inflight {
                    packet_id,
                    delivery,
                    released: false,
                });
            }
        }
        sent
    }

    /// The next queued delivery that has not expired, for an adapter without an
    /// acknowledgement window (an HTTP request's answer, an SSE stream): it leaves the session.
    pub fn pop_next(&mut self, metrics: &Metrics) -> Option<Delivery> {
        let now = Instant::now();
        while let Some(delivery) = self.queue.pop_front() {
            if delivery.message.expires_at.is_some_and(|at| at <= now) {
                metrics.dropped("expired");
                self.forget(delivery.stored);
                continue;
            }
            self.forget(delivery.stored);
            return Some(delivery);
        }
        None
    }

    /// What was in flight when the previous connection ended, to send again (MQTT §4.4), in
    /// order: PUBLISH with DUP for unacknowledged messages, PUBREL for QoS 2 messages the
    /// client already received.
    pub fn resend_inflight(&self, mut resend: impl FnMut(Resend<'_>)) {
        for entry in &self.inflight {
            if entry.released {
                resend(Resend::Release(entry.packet_id));
            } else {
                let qos = match entry.delivery.qos {
                    QoS::ExactlyOnce => QosPid::ExactlyOnce(entry.packet_id),
                    _ => QosPid::AtLeastOnce(entry.packet_id),
                };
                resend(Resend::Publish(&entry.delivery, qos));
            }
        }
    }

    /// The next free packet identifier, counting up from the last one (wrapping, skipping 0).
    ///
    /// Identifiers allocated here enter `inflight` at the back in the order they were
    /// allocated, so from front to back they increase (wrapping) and lie within the span from
    /// the front's to the back's: a candidate outside that span is free without looking at
    /// the entries — the usual case (a window of 2,048 AMQP deliveries made a linear scan per
    /// delivery 15% of a consumer's CPU). Inside the span, or when a restart restored entries
    /// out of that order (`inflight_ordered`), the entries are scanned.
    fn allocate_packet_id(&mut self) -> NonZeroU16 {
        if self.inflight.is_empty() {
            self.inflight_ordered = true;
        }
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if let Some(id) = NonZeroU16::new(id)
                && !self.in_flight(id)
            {
                return id;
            }
        }
    }

    /// Whether `id` is the identifier of a message in flight.
    fn in_flight(&self, id: NonZeroU16) -> bool {
        let (Some(front), Some(back)) = (self.inflight.front(), self.inflight.back()) else {
            return false;
        };
        let start = front.packet_id.get();
        let within = id.get().wrapping_sub(start) <= back.packet_id.get().wrapping_sub(start);
        (within || !self.inflight_ordered) && self.inflight.iter().any(|e| e.packet_id == id)
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) from the client.
    pub fn complete(&mut self, packet_id: NonZeroU16, qos: QoS) -> AckOutcome {
        let position = self.inflight.iter().position(|e| {
            e.packet_id == packet_id
                && e.delivery.qos == qos
                && (qos == QoS::AtLeastOnce || e.released)
        });
        match position.and_then(|i| self.inflight.remove(i)) {
            Some(done) => {
                self.forget(done.delivery.stored);
                AckOutcome::Done
            }
            None => AckOutcome::Unknown,
        }
    }

    /// A delivery sent under `packet_id` was refused by its receiver with a request to try
    /// again (AMQP `basic.reject`/`basic.nack` with requeue): it goes back to the front of the
    /// queue. Whether it was in flight.
    pub fn requeue(&mut self, packet_id: NonZeroU16) -> bool {
        let Some(i) = self.inflight.iter().position(|e| e.packet_id == packet_id) else {
            return false;
        };
        match self.inflight.remove(i) {
            Some(mut entry) => {
                entry.delivery.redelivered = true;
                self.queue.push_front(entry.delivery);
                true
            }
            None => false,
        }
    }

    /// Everything in flight goes back to the front of the queue, in order (the consumer that
    /// had it went away without acknowledging: AMQP requeues unacknowledged deliveries).
    pub fn requeue_inflight(&mut self) {
        while let Some(mut entry) = self.inflight.pop_back() {
            entry.delivery.redelivered = true;
            self.queue.push_front(entry.delivery);
        }
    }

    /// A delivery the session no longer held (sent at QoS 0) comes back unacknowledged: to the
    /// front of the queue, marked redelivered (AMQP requeues transient messages too).
    pub fn requeue_delivery(&mut self, mut delivery: Delivery) {
        delivery.redelivered = true;
        self.queue.push_front(delivery);
    }

    /// How many messages wait in the queue (not in flight).
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Drops what waits in the queue (not what is in flight); how many (AMQP `queue.purge`).
    pub fn purge(&mut self) -> usize {
        let purged = std::mem::take(&mut self.queue);
        for delivery in &purged {
            self.forget(delivery.stored);
        }
        purged.len()
    }

    /// PUBREC from the client; a failure (`failed`) ends the exchange.
    pub fn received(&mut self, packet_id: NonZeroU16, failed: bool) -> AckOutcome {
        let Some(i) = self
            .inflight
            .iter()
            .position(|e| e.packet_id == packet_id && e.delivery.qos == QoS::ExactlyOnce)
        else {
            return AckOutcome::Unknown;
        };
        if failed {
            if let Some(done) = self.inflight.remove(i) {
                self.forget(done.delivery.stored);
            }
            return AckOutcome::Done;
        }
        if let Some(e) = self.inflight.get_mut(i) {
            e.released = true;
        }
        AckOutcome::SendPubRel
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use policy::{Enforcer, Mode, Permission, ResourceType, Timestamp};
    use serde_json::json;

    use super::PolicyViews;
    use crate::core::policies::PolicyId;

    fn enforcer(subject: &str) -> Arc<Enforcer> {
        let policy =
            policy::policy_from_value(&json!({"policyId": "org.acme:p", "entries": {"e": {
                "subjects": {subject: {"type": "t"}},
                "resources": {"thing:/": {"grant": ["READ"], "revoke": []}}
            }}}))
            .unwrap();
        Arc::new(Enforcer::compile(&policy))
    }

    /// The identifier allocation's shortcut agrees with a plain scan: random sends, random
    /// acknowledgements (any order), requeues and a restart's restored entries out of order.
    #[test]
    fn allocated_packet_identifiers_are_never_in_flight() {
        use std::collections::HashSet;

        use super::{Delivery, QoS, Session};
        use crate::core::message::{Message, Origin};
        use crate::metrics::Metrics;

        let metrics = Metrics::default();
        let enforcer = enforcer("s:a");
        let view = enforcer.for_subjects(&["s:a".to_owned()], None, Timestamp::from_unix_millis(0));
        let session = Session::new(
            "c".into(),
            Arc::from(vec!["s:a".to_owned()]),
            view,
            0,
            100_000,
        );
        let delivery = Delivery {
            message: Message::new("t".parse().unwrap(), bytes::Bytes::new(), Origin::default()),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Vec::new(),
            stored: None,
            redelivered: false,
        };
        let mut state = session.lock();
        state.link = Some(Arc::new(super::Link::new(super::Protocol::Mqtt, None)));
        // A restart restored three entries out of allocation order (300 lies outside the
        // span from the front's 100 to the back's 200).
        for id in [100u16, 300, 200] {
            state.restore_queued(delivery.clone(), std::num::NonZeroU16::new(id));
        }
        let mut seed = 7u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut in_flight: HashSet<u16> = [100u16, 300, 200].into();
        // Past 300 before anything is acknowledged.
        for _ in 0..150 {
            state.queue.push_back(delivery.clone());
            state.drain(usize::MAX, &metrics, |_, qos| {
                let id = qos.packet_id().unwrap().get();
                assert!(in_flight.insert(id), "{id} is in flight already");
                true
            });
        }
        for round in 0..100_000u32 {
            match next() % 4 {
                0 | 1 => {
                    state.queue.push_back(delivery.clone());
                    state.drain(usize::MAX, &metrics, |_, qos| {
                        let id = qos.packet_id().unwrap().get();
                        assert!(
                            in_flight.insert(id),
                            "round {round}: {id} is in flight already"
                        );
                        true
                    });
                }
                2 if !in_flight.is_empty() => {
                    let pick = *in_flight
                        .iter()
                        .nth((next() % in_flight.len() as u64) as usize)
                        .unwrap();
                    in_flight.remove(&pick);
                    let id = std::num::NonZeroU16::new(pick).unwrap();
                    assert_eq!(
                        state.complete(id, QoS::AtLeastOnce),
                        super::AckOutcome::Done
                    );
                }
                3 if !in_flight.is_empty() && next() % 8 == 0 => {
                    let pick = *in_flight.iter().next().unwrap();
                    in_flight.remove(&pick);
                    assert!(state.requeue(std::num::NonZeroU16::new(pick).unwrap()));
                    state.queue.clear();
                }
                _ => {}
            }
            // Keep the window large but below the identifier space.
            while in_flight.len() > 3_000 {
                let pick = *in_flight.iter().next().unwrap();
                in_flight.remove(&pick);
                state.complete(std::num::NonZeroU16::new(pick).unwrap(), QoS::AtLeastOnce);
            }
        }
    }

    #[test]
    fn a_memoized_view_follows_a_new_policy_revision() {
        let mut views = PolicyViews::default();
        let id = PolicyId::from(&twin::PolicyId::parse("org.acme:p").unwrap());
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
