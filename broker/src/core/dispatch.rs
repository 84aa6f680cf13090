//! The hot path of plain topics (DESIGN.md §3, §4): an authorized PUBLISH → retained store →
//! matching subscriptions → one delivery per subscriber session, each checked against that
//! subscriber's view of the solution policy (unrestricted READ on `topic:/<levels>`).
//!
//! Overlapping subscriptions of one session give one delivery, at the highest QoS granted among
//! them, carrying every matching subscription identifier (MQTT 5 §3.3.4 allows this for both
//! versions). A shared subscription group (`$share/{group}/{filter}`) gives one delivery to one
//! member, chosen round-robin among the members whose subjects may read the topic.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use policy::{Enforcer, Timestamp};

use crate::mqtt::codec::{QoS, RetainHandling};
use crate::metrics::Metrics;
use crate::core::session::{Delivery, Message, Offer, Session};
use crate::core::space::{SolutionSpace, Subscriber};
use crate::core::topics;

/// The wall clock as the policy crate takes it.
pub fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_unix_millis(millis)
}

/// One session's share of a routed message, merged over its matching subscriptions.
#[derive(Debug)]
pub struct Target {
    /// The highest QoS granted among the matching subscriptions, capped by the message's.
    pub qos: QoS,
    pub retain_as_published: bool,
    pub subscription_ids: Vec<NonZeroU32>,
}

struct Candidate {
    session: Arc<Session>,
    target: Target,
}

/// Finds the sessions subscribed to `topic` in `space` and calls `offer` once per session
/// (overlapping subscriptions merged), and for each shared group with its members in turn
/// from the round-robin cursor until one accepts. `offer` decides (checks, builds, queues) and
/// says whether the session took it. Returns how many did.
pub fn route(
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
            };
            if offer(&member.session, target) {
                queued += 1;
                break;
            }
        }
    }
    queued
}

/// Publishes an authorized message in `space`: keeps it if retained, then offers it to every
/// matching subscriber, each checked on READ of the topic. Returns how many sessions queued it.
pub fn publish(space: &SolutionSpace, message: Arc<Message>, metrics: &Metrics) -> usize {
    if message.retain {
        let mut retained = space.retained_write();
        if message.payload.is_empty() {
            retained.remove(message.topic.as_str());
        } else if retained.len() < space.max_retained
            || retained.contains_key(message.topic.as_str())
        {
            retained.insert(message.topic.as_str().into(), message.clone());
        } else {
            metrics.dropped("retained_limit");
        }
    }
    let policy = space.policy();
    let now = now();
    route(
        space,
        message.topic.as_str(),
        message.publisher,
        message.qos,
        |session, target| {
            let delivery = Delivery {
                qos: target.qos,
                // MQTT-3.3.1-9: the retain flag is cleared on normal delivery unless the
                // subscription asked for Retain As Published.
                retain: message.retain && target.retain_as_published,
                subscription_ids: target.subscription_ids,
                message: message.clone(),
            };
            offer(space, session, delivery, &policy, now, metrics)
        },
    )
}

fn offer(
    space: &SolutionSpace,
    session: &Session,
    delivery: Delivery,
    policy: &Arc<Enforcer>,
    now: Timestamp,
    metrics: &Metrics,
) -> bool {
    let outcome = session.offer(delivery, policy, now, metrics);
    note_offer(space, session, outcome, metrics)
}

/// Counts and logs a denied delivery; whether the session took it.
pub fn note_offer(
    space: &SolutionSpace,
    session: &Session,
    outcome: Offer,
    metrics: &Metrics,
) -> bool {
    match outcome {
        Offer::Queued => true,
        Offer::Denied => {
            metrics.denied(space.id.as_str(), "delivery");
            tracing::debug!(
                solution = %space.id,
                client = %session.client_id,
                "delivery denied by policy"
            );
            false
        }
        Offer::Dropped => false,
    }
}

/// Sends the retained messages matching a new subscription (MQTT §3.3.1.3, v5 Retain
/// Handling), each checked like any delivery. `existed`: the session already had this filter.
pub fn deliver_retained(
    space: &SolutionSpace,
    session: &Session,
    sub: &Subscriber,
    filter: &str,
    existed: bool,
    metrics: &Metrics,
) {
    if sub.share.is_some() {
        // MQTT-4.8.2-? : retained messages are not sent for shared subscriptions.
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
    let now = now();
    for message in matching {
        let delivery = Delivery {
            qos: sub.options.qos.min(message.qos),
            retain: true,
            subscription_ids: sub.id.into_iter().collect(),
            message,
        };
        offer(space, session, delivery, &policy, now, metrics);
    }
}
