//! The hot path of plain topics (DESIGN.md §3, §4): an authorized PUBLISH → retained store →
//! matching subscriptions → one delivery per subscriber session, each checked against that
//! subscriber's view of the solution policy (unrestricted READ on `topic:/<levels>`).
//!
//! Overlapping subscriptions of one session give one delivery, at the highest QoS granted among
//! them, carrying every matching subscription identifier (MQTT 5 §3.3.4 allows this for both
//! versions). A shared subscription group (`$share/{group}/{filter}`) gives one delivery to one
//! member, chosen round-robin among the members whose subjects may read the topic.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use policy::{Enforcer, Timestamp};

use crate::codec::{QoS, RetainHandling};
use crate::metrics::Metrics;
use crate::session::{Delivery, Message, Offer, Session};
use crate::space::{SolutionSpace, Subscriber};
use crate::topics;

/// The wall clock as the policy crate takes it.
pub fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_unix_millis(millis)
}

/// One session's share of a message: merged over its matching subscriptions.
struct Target {
    session: Arc<Session>,
    qos: QoS,
    retain_as_published: bool,
    ids: Vec<std::num::NonZeroU32>,
}

/// Publishes an authorized message in `space`: keeps it if retained, then offers it to every
/// matching subscriber. Returns how many sessions queued it.
pub fn publish(space: &SolutionSpace, message: Arc<Message>, metrics: &Metrics) -> usize {
    if message.retain {
        let mut retained = space.retained_write();
        if message.payload.is_empty() {
            retained.remove(message.topic.as_str());
        } else {
            retained.insert(message.topic.as_str().into(), message.clone());
        }
    }
    let mut targets: Vec<Target> = Vec::new();
    let mut shared: Vec<Subscriber> = Vec::new();
    space
        .tree_read()
        .for_each_match(message.topic.as_str(), |sub| {
            if sub.share.is_some() {
                shared.push(sub.clone());
                return;
            }
            if sub.options.no_local && sub.session.id == message.publisher {
                return;
            }
            let qos = sub.options.qos.min(message.qos);
            match targets
                .iter_mut()
                .find(|t| Arc::ptr_eq(&t.session, &sub.session))
            {
                Some(t) => {
                    t.qos = t.qos.max(qos);
                    t.retain_as_published |= sub.options.retain_as_published;
                    t.ids.extend(sub.id);
                }
                None => targets.push(Target {
                    session: sub.session.clone(),
                    qos,
                    retain_as_published: sub.options.retain_as_published,
                    ids: sub.id.into_iter().collect(),
                }),
            }
        });
    let policy = space.policy();
    let now = now();
    let mut queued = 0;
    for t in targets {
        let delivery = Delivery {
            qos: t.qos,
            // MQTT-3.3.1-9: the retain flag is cleared on normal delivery unless the
            // subscription asked for Retain As Published.
            retain: message.retain && t.retain_as_published,
            subscription_ids: t.ids,
            message: message.clone(),
        };
        queued += usize::from(offer(space, &t.session, delivery, &policy, now, metrics));
    }
    if !shared.is_empty() {
        queued += publish_shared(space, &message, shared, &policy, now, metrics);
    }
    queued
}

fn offer(
    space: &SolutionSpace,
    session: &Session,
    delivery: Delivery,
    policy: &Arc<Enforcer>,
    now: Timestamp,
    metrics: &Metrics,
) -> bool {
    match session.offer(delivery, policy, now, metrics) {
        Offer::Queued => true,
        Offer::Denied => {
            metrics.denied(space.id.as_str(), "delivery");
            tracing::debug!(
                solution = %space.id,
                client = %session.client_id,
                "delivery denied by the solution policy (no READ on the topic)"
            );
            false
        }
        Offer::Dropped => false,
    }
}

/// One delivery per share group: members in filter order, starting at the round-robin cursor,
/// the first one that accepts it.
fn publish_shared(
    space: &SolutionSpace,
    message: &Arc<Message>,
    mut shared: Vec<Subscriber>,
    policy: &Arc<Enforcer>,
    now: Timestamp,
    metrics: &Metrics,
) -> usize {
    shared.sort_by(|a, b| a.share.cmp(&b.share));
    let cursor = space.share_cursor.fetch_add(1, Ordering::Relaxed);
    let mut queued = 0;
    let mut rest = shared.as_slice();
    while let Some(first) = rest.first() {
        let len = rest
            .iter()
            .take_while(|s| s.share == first.share)
            .count()
            .max(1);
        let (group, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        for i in 0..group.len() {
            let Some(member) = group.get((cursor + i) % group.len()) else {
                continue;
            };
            let delivery = Delivery {
                qos: member.options.qos.min(message.qos),
                retain: false,
                subscription_ids: member.id.into_iter().collect(),
                message: message.clone(),
            };
            if offer(space, &member.session, delivery, policy, now, metrics) {
                queued += 1;
                break;
            }
        }
    }
    queued
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
