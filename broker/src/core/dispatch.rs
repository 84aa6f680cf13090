//! The one fan-out (DESIGN.md §4): plain messages, twin events and live messages alike go
//! through [`fan_out`], which finds the subscribed sessions of the solution's topic tree and
//! asks [`Judged::judge`] — the one place a delivery is decided — whether each may have it and
//! in which form:
//! - a plain message: unrestricted READ on `topic:/<levels>` in the solution policy;
//! - a twin event: partial READ at the event's path in the thing's (or policy's) policy, the
//!   value cut to the subscriber's view (nothing visible: not delivered);
//! - a live message: unrestricted READ on its `message:` resource in the thing's policy.
//!
//! Each check runs under the subscriber's session lock with that session's memoized view, at
//! the moment of the offer: a policy change reaches the next delivery.
//!
//! Overlapping subscriptions of one session give one delivery, at the highest QoS granted among
//! them, carrying every matching subscription identifier (MQTT 5 §3.3.4 allows this for both
//! versions). A shared subscription group (`$share/{group}/{filter}`) gives one delivery to one
//! member, chosen round-robin among the members whose subjects may read it.

use std::cell::OnceCell;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use policy::{Enforcer, Mode, Permission, ResourceType, Timestamp};
use serde_json::Value;
use twin::authz::{cut_event_to_view, cut_policy_to_view};
use twin::entity::{EntityKind, Event};
use twin::path::ThingPath;
use twin::protocol::mqtt::{write_event_payload, write_event_topic};
use twin::store::TwinStore;

use crate::core::message::{Delivery, Message, Offer, Origin};
use crate::core::policies::{Policies, PolicyRef};
use crate::core::session::{Session, SessionState};
use crate::core::sessions;
use crate::core::space::{SolutionSpace, Subscriber, Usage};
use crate::core::topics;
use crate::metrics::Metrics;
use crate::mqtt::codec::{QoS, RetainHandling, TopicName};

/// One session's share of a routed message, merged over its matching subscriptions.
#[derive(Debug)]
struct Target {
    /// The highest QoS granted among the matching subscriptions, capped by the message's.
    qos: QoS,
    retain_as_published: bool,
    subscription_ids: Vec<NonZeroU32>,
    /// A retained message sent because of a new subscription: its retain flag stays set.
    retained_on_subscribe: bool,
}

struct Candidate {
    session: Arc<Session>,
    target: Target,
}

/// Where QoS 1/2 deliveries to persistent sessions are journaled before they are queued (none:
/// retained messages sent on subscribe, already stored), and whether one was: the publisher's
/// acknowledgement then waits for the journal.
struct Journal<'a> {
    store: Option<&'a dyn TwinStore>,
    wrote: bool,
}

impl<'a> Journal<'a> {
    fn to(store: &'a dyn TwinStore) -> Self {
        Journal {
            store: Some(store),
            wrote: false,
        }
    }
}

/// What is being fanned out, and what a subscriber needs to have it.
enum Judged<'a> {
    /// A plain message, judged in the solution policy.
    Plain {
        message: &'a Arc<Message>,
        policy: Arc<Enforcer>,
    },
    /// A twin event, judged in its entity's policy; payloads written on demand.
    Event {
        event: &'a Event,
        kind: ResourceType,
        policy: PolicyRef,
        namespace: &'a str,
        topic: TopicName,
        /// The event with its whole value, built at the first delivery that may see it all.
        full: Option<Arc<Message>>,
        /// The event's path, parsed only if some delivery has to be cut.
        thing_path: OnceCell<Option<ThingPath>>,
    },
    /// A live message, judged in the thing's policy.
    Live {
        message: Arc<Message>,
        policy: &'a PolicyRef,
        resource: &'a str,
        namespace: &'a str,
    },
}

impl Judged<'_> {
    /// The one decision of a delivery: whether this session's subjects may have it (checked
    /// on the session's memoized view of the deciding policy) and in which form.
    fn judge(
        &mut self,
        state: &mut SessionState,
        target: Target,
        now: Timestamp,
    ) -> Option<Delivery> {
        let message = match self {
            Judged::Plain { message, policy } => {
                state.refresh_view(policy, now);
                if !state.view().check(
                    ResourceType::Topic,
                    message.topic.as_str(),
                    Permission::Read,
                    Mode::Unrestricted,
                ) {
                    return None;
                }
                // MQTT-3.3.1-9: the retain flag is cleared on normal delivery unless the
                // subscription asked for Retain As Published.
                let retain =
                    target.retained_on_subscribe || (message.retain && target.retain_as_published);
                return Some(Delivery {
                    message: (*message).clone(),
                    qos: target.qos,
                    retain,
                    subscription_ids: target.subscription_ids,
                    stored: None,
                    redelivered: false,
                });
            }
            Judged::Event {
                event,
                kind,
                policy,
                namespace,
                topic,
                full,
                thing_path,
            } => {
                let view = state.policy_view(policy, namespace, now);
                let path = if event.path.is_empty() {
                    "/"
                } else {
                    &event.path
                };
                if !view.check(*kind, path, Permission::Read, Mode::Partial) {
                    return None;
                }
                let whole = view.check(*kind, path, Permission::Read, Mode::Unrestricted);
                if whole || event.value.is_none() {
                    full.get_or_insert_with(|| {
                        event_message(topic.clone(), event, event.value.as_ref())
                    })
                    .clone()
                } else {
                    let value = event.value.as_ref()?;
                    let parsed = thing_path.get_or_init(|| ThingPath::parse(&event.path).ok());
                    let cut = match (*kind, parsed) {
                        (ResourceType::Thing, Some(p)) => cut_event_to_view(view, p, value)?,
                        _ => cut_policy_to_view(view, path, value)?,
                    };
                    event_message(topic.clone(), event, Some(&cut))
                }
            }
            Judged::Live {
                message,
                policy,
                resource,
                namespace,
            } => {
                let view = state.policy_view(policy, namespace, now);
                if !view.check(
                    ResourceType::Message,
                    resource,
                    Permission::Read,
                    Mode::Unrestricted,
                ) {
                    return None;
                }
                message.clone()
            }
        };
        Some(Delivery {
            message,
            qos: target.qos,
            retain: false,
            subscription_ids: target.subscription_ids,
            stored: None,
            redelivered: false,
        })
    }
}

/// The bytes reserved for an event's envelope besides its path (twice: `topic` and `path`).
const ENVELOPE_CAPACITY: usize = 256;

fn event_message(topic: TopicName, event: &Event, value: Option<&Value>) -> Arc<Message> {
    // Room for the envelope of a small change at once (growing from empty took five
    // reallocations per event).
    let mut payload = String::with_capacity(ENVELOPE_CAPACITY + 2 * event.path.len());
    let _ = write_event_payload(&mut payload, event, value);
    Message::new(
        topic,
        Bytes::from(payload),
        Origin {
            qos: QoS::AtLeastOnce,
            ..Origin::default()
        },
    )
}

/// Offers `judged` on `topic` to every subscribed session of `space` (no one twice; one member
/// per shared group), each judged at once. Returns how many sessions queued it.
#[allow(clippy::too_many_arguments)] // the route, the judgement, and where it is kept
fn fan_out(
    space: &SolutionSpace,
    topic: &str,
    publisher: u64,
    max_qos: QoS,
    judged: &mut Judged<'_>,
    journal: &mut Journal<'_>,
    metrics: &Metrics,
    now: Timestamp,
) -> usize {
    // Fail closed: a cluster node that cannot prove its policies current delivers nothing.
    if let Some(store) = journal.store
        && let Err(e) = store.current()
    {
        tracing::debug!(topic, error = %e, "not delivered: the store is not current");
        return 0;
    }
    let started = sampled().then(std::time::Instant::now);
    let queued = route(space, topic, publisher, max_qos, |session, target| {
        offer(space, session, judged, journal, target, metrics, now)
    });
    if let Some(started) = started {
        metrics
            .dispatch_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    queued
}

/// Whether this fan-out is timed: one in 64 per thread (timing each would cost a lock of the
/// histogram per message).
fn sampled() -> bool {
    thread_local! {
        static COUNT: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    COUNT.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n % 64 == 1
    })
}

/// Judges one delivery for `session` under its lock and queues it if allowed (journaled first
/// for a persistent session); denials are counted and logged. Whether the session took it.
fn offer(
    space: &SolutionSpace,
    session: &Session,
    judged: &mut Judged<'_>,
    journal: &mut Journal<'_>,
    target: Target,
    metrics: &Metrics,
    now: Timestamp,
) -> bool {
    let mut state = session.lock();
    match judged.judge(&mut state, target, now) {
        Some(mut delivery) => {
            Usage::add(&space.usage.allowed, 1);
            if let Some(store) = journal.store
                && delivery.qos != QoS::AtMostOnce
                && Session::has_room(&state)
                && let Some(bookkeeping) = state.journal.as_mut()
            {
                let seq = bookkeeping.next_stored;
                bookkeeping.next_stored = seq.saturating_add(1);
                match sessions::store_delivery(
                    store,
                    space.id.as_str(),
                    &session.client_id,
                    seq,
                    &delivery,
                ) {
                    Ok(()) => {
                        delivery.stored = Some(seq);
                        journal.wrote = true;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, solution = %space.id, "a queued message could not be journaled")
                    }
                }
            }
            let bytes = delivery.message.payload.len() as u64;
            let queued = session.enqueue(state, delivery, metrics) == Offer::Queued;
            if queued {
                Usage::add(&space.usage.messages_out, 1);
                Usage::add(&space.usage.bytes_out, bytes);
                match judged {
                    Judged::Plain { .. } => metrics.core_out.plain.inc(),
                    Judged::Event { .. } => metrics.core_out.event.inc(),
                    Judged::Live { .. } => metrics.core_out.live.inc(),
                };
            }
            queued
        }
        None => {
            drop(state);
            space.denied(metrics, "delivery");
            tracing::debug!(
                solution = %space.id,
                client = %session.client_id,
                "delivery denied by policy"
            );
            false
        }
    }
}

/// Finds the sessions subscribed to `topic` and calls `offer` once per session (overlapping
/// subscriptions merged), and for each shared group with its members in turn from the
/// round-robin cursor until one takes it. Returns how many took it.
fn route(
    space: &SolutionSpace,
    topic: &str,
    publisher: u64,
    max_qos: QoS,
    mut offer: impl FnMut(&Arc<Session>, Target) -> bool,
) -> usize {
    let mut matches: Vec<Candidate> = Vec::new();
    let mut shared: Vec<Subscriber> = Vec::new();
    space.tree_read().for_each_match(topic, |sub| {
        if sub.share.is_some() {
            shared.push(sub.clone());
            return;
        }
        if sub.options.no_local && sub.session.id == publisher {
            return;
        }
        matches.push(Candidate {
            session: sub.session.clone(),
            target: Target {
                qos: sub.options.qos.min(max_qos),
                retain_as_published: sub.options.retain_as_published,
                subscription_ids: sub.id.into_iter().collect(),
                retained_on_subscribe: false,
            },
        });
    });
    // Overlapping subscriptions of one session become one delivery: sorted by session, then
    // merged with their neighbours (n log n, where a search per match would be n²).
    matches.sort_unstable_by_key(|c| c.session.id);
    let mut queued = 0;
    let mut matches = matches.into_iter().peekable();
    while let Some(mut c) = matches.next() {
        while let Some(next) = matches.next_if(|n| n.session.id == c.session.id) {
            c.target.qos = c.target.qos.max(next.target.qos);
            c.target.retain_as_published |= next.target.retain_as_published;
            c.target
                .subscription_ids
                .extend(next.target.subscription_ids);
        }
        queued += usize::from(offer(&c.session, c.target));
    }
    if shared.is_empty() {
        return queued;
    }
    shared.sort_by(|a, b| a.share.cmp(&b.share));
    let cursor = space.share_cursor.fetch_add(1, Ordering::Relaxed);
    let mut rest = shared.as_slice();
    while let Some(first) = rest.first() {
        let len = rest.iter().take_while(|s| s.share == first.share).count();
        let (group, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        for i in 0..group.len() {
            let Some(member) = group.get((cursor + i) % group.len()) else {
                continue;
            };
            let target = Target {
                qos: member.options.qos.min(max_qos),
                retain_as_published: false,
                subscription_ids: member.id.into_iter().collect(),
                retained_on_subscribe: false,
            };
            if offer(&member.session, target) {
                queued += 1;
                break;
            }
        }
    }
    queued
}

/// Offers an authorized plain message to every subscriber of `space` (keeping it, if
/// retained, is `crate::core::retained`'s); a QoS 1/2 delivery to a persistent session is
/// journaled in `store` first. Whether it journaled one (the publisher's acknowledgement then
/// waits until the journal is durable).
pub fn publish(
    space: &SolutionSpace,
    message: &Arc<Message>,
    metrics: &Metrics,
    store: &dyn TwinStore,
) -> bool {
    let mut judged = Judged::Plain {
        message,
        policy: space.policy(),
    };
    let mut journal = Journal::to(store);
    fan_out(
        space,
        message.topic.as_str(),
        message.publisher,
        message.qos,
        &mut judged,
        &mut journal,
        metrics,
        crate::core::now(),
    );
    journal.wrote
}

/// Publishes durable events to the subscribers of their topics. An event is judged in its
/// entity's current policy, or in `fallback` when the entity no longer names one (a deleted
/// thing). Whether one was journaled for a persistent session (see [`publish`]).
pub fn publish_events(
    policies: &Policies,
    space: &SolutionSpace,
    events: &[Event],
    fallback: Option<&PolicyRef>,
    store: &dyn TwinStore,
    metrics: &Metrics,
    now: Timestamp,
) -> bool {
    let mut journal = Journal::to(store);
    for event in events {
        let mut topic = String::with_capacity(64 + event.path.len());
        if write_event_topic(&mut topic, event).is_err() {
            continue;
        }
        let (kind, policy) = match event.key.kind {
            EntityKind::Thing => (ResourceType::Thing, policies.of_stored_thing(&event.key.id)),
            EntityKind::Policy => (
                ResourceType::Policy,
                policies.of_stored_policy(&event.key.id),
            ),
            _ => continue,
        };
        let Some(policy) = policy.or_else(|| fallback.cloned()) else {
            continue;
        };
        let Ok(topic) = TopicName::from_string(topic) else {
            continue;
        };
        let mut judged = Judged::Event {
            event,
            kind,
            policy,
            namespace: event.key.id.split(':').next().unwrap_or_default(),
            topic: topic.clone(),
            full: None,
            thing_path: OnceCell::new(),
        };
        fan_out(
            space,
            topic.as_str(),
            0,
            QoS::AtLeastOnce,
            &mut judged,
            &mut journal,
            metrics,
            now,
        );
    }
    journal.wrote
}

/// Routes a live message whose sender was authorized: each receiver needs unrestricted READ on
/// `message:{resource}` in `policy`, the thing's policy. Never kept for the thing; like any
/// QoS 1/2 delivery journaled for a persistent session. Whether one was (see [`publish`]).
#[allow(clippy::too_many_arguments)]
pub fn publish_live(
    space: &SolutionSpace,
    message: Arc<Message>,
    policy: &PolicyRef,
    resource: &str,
    namespace: &str,
    store: &dyn TwinStore,
    metrics: &Metrics,
    now: Timestamp,
) -> bool {
    let topic = message.topic.clone();
    let (publisher, qos) = (message.publisher, message.qos);
    let mut judged = Judged::Live {
        message,
        policy,
        resource,
        namespace,
    };
    let mut journal = Journal::to(store);
    fan_out(
        space,
        topic.as_str(),
        publisher,
        qos,
        &mut judged,
        &mut journal,
        metrics,
        now,
    );
    journal.wrote
}

/// Sends the retained messages matching a new subscription (MQTT §3.3.1.3, v5 Retain
/// Handling), each judged like any delivery. `existed`: the session already had this filter.
pub fn deliver_retained(
    space: &SolutionSpace,
    sub: &Subscriber,
    filter: &str,
    existed: bool,
    metrics: &Metrics,
) {
    if sub.share.is_some() {
        // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
        return;
    }
    match sub.options.retain_handling {
        RetainHandling::Never => return,
        RetainHandling::OnNewSubscribe if existed => return,
        _ => {}
    }
    let now_instant = std::time::Instant::now();
    let mut expired = false;
    let matching: Vec<Arc<Message>> = space
        .retained_read()
        .iter()
        .filter(|(topic, _)| topics::matches(filter, topic))
        .filter(|(_, m)| {
            let live = m.expires_at.is_none_or(|at| at > now_instant);
            expired |= !live;
            live
        })
        .map(|(_, m)| m.clone())
        .collect();
    if expired {
        // A retained message whose expiry passed is gone (MQTT 5 §3.3.2.3.3).
        space
            .retained_write()
            .retain(|_, m| m.expires_at.is_none_or(|at| at > now_instant));
    }
    if matching.is_empty() {
        return;
    }
    let policy = space.policy();
    let now = crate::core::now();
    for message in &matching {
        let mut judged = Judged::Plain {
            message,
            policy: policy.clone(),
        };
        let target = Target {
            qos: sub.options.qos.min(message.qos),
            retain_as_published: true,
            subscription_ids: sub.id.into_iter().collect(),
            retained_on_subscribe: true,
        };
        let mut journal = Journal {
            store: None,
            wrote: false,
        };
        offer(
            space,
            &sub.session,
            &mut judged,
            &mut journal,
            target,
            metrics,
            now,
        );
    }
}
