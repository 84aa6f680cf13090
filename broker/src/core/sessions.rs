//! Persistent sessions survive a restart — their identity, subscriptions, expiry, and the plain
//! QoS 1/2 messages queued for them: each session with a nonzero expiry interval is an
//! entity of the store (`EntityKind::Session`, ID `{solutionId}/{clientId}`), written when it
//! attaches, when its subscriptions change and when its connection ends (with the time it
//! ended, so that the expiry counts down across a restart), and deleted when it ends. At
//! start-up each is put back into its solution's space, offline, with its subscriptions in the
//! topic tree and its expiry timer running for what is left of it.
//!
//! A plain QoS 1/2 message queued for a persistent session is a `Queued` entity
//! (`{solutionId}/{clientId}/{seq}`), written before it is queued; the publisher's
//! acknowledgement waits until it is durable (`crate::core::dispatch::publish` says whether it
//! wrote one). Its record is deleted once the message leaves the session (acknowledged by the
//! subscriber, refused, expired) — not awaited: after a crash such a message may come again
//! (at least once). When a journaled delivery is sent, its packet identifier is added to its
//! record (not awaited), so that after a restart it is sent again under that identifier with
//! DUP (MQTT-4.4.0-1). The QoS 2 identifiers a session received and has not seen PUBREL for
//! are part of the session record; the PUBREC waits until it is durable, so a DUP resend after
//! a restart is recognised. Events and live messages queued for an offline session are not
//! journaled.
//!
//! The journal write is not awaited before SUBACK/CONNACK: a subscription acknowledged within
//! one group commit of a crash may be lost (the client learns it from `session present` or by
//! subscribing again).

use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use twin::entity::{Entity, EntityKey, EntityKind, Event, EventAction};
use twin::store::{Durable, TwinStore, TwinStoreExt};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;

use crate::auth::solution::Solutions;
use crate::core::documents;
use crate::core::message::{Delivery, Message, Origin};
use crate::core::session::{Session, SubscriptionRecord};
use crate::core::space::{SolutionSpace, Spaces, Subscriber, tree_filter};
use crate::mqtt::codec::{QoS, RetainHandling, SubscriptionOptions};

fn key(solution: &str, client_id: &str) -> EntityKey {
    EntityKey::new(EntityKind::Session, format!("{solution}/{client_id}"))
}

fn queued_key(solution: &str, client_id: &str, seq: u64) -> EntityKey {
    EntityKey::new(
        EntityKind::Queued,
        format!("{solution}/{client_id}/{seq:020}"),
    )
}

/// Writes `delivery`, about to be queued for the persistent session `client_id`, as record
/// `seq`.
pub fn store_delivery(
    store: &dyn TwinStore,
    solution: &str,
    client_id: &str,
    seq: u64,
    delivery: &Delivery,
) -> Result<(), String> {
    let message = &delivery.message;
    let expires = message.expires_at.map(documents::expiry_millis);
    let mut doc = json!({
        "topic": message.topic.as_str(),
        "payload": STANDARD.encode(&message.payload),
        "qos": delivery.qos as u8,
        "retain": delivery.retain,
        "subscriptionIds": delivery.subscription_ids.iter().map(|id| id.get()).collect::<Vec<_>>(),
        "expiresAtMillis": expires,
    });
    if let (Some(p), Some(fields)) = (&message.properties, doc.as_object_mut()) {
        fields.insert("properties".into(), documents::properties_to_doc(p));
    }
    documents::put(store, &queued_key(solution, client_id, seq), Some(doc))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Records the packet identifiers journaled deliveries were sent under (not awaited: lost in a
/// crash, the delivery is sent again under a new identifier).
pub fn record_sent(
    store: &dyn TwinStore,
    solution: &str,
    client_id: &str,
    sent: &[(u64, NonZeroU16)],
) {
    let now = crate::core::now();
    for &(seq, packet_id) in sent {
        let key = queued_key(solution, client_id, seq);
        let _ = store.write(
            &key,
            |current: Option<&Entity>| -> Result<Vec<Event>, std::convert::Infallible> {
                Ok(current
                    .map(|e| Event {
                        key: key.clone(),
                        action: EventAction::Modified,
                        path: "/packetId".to_owned(),
                        value: Some(json!(packet_id.get())),
                        revision: e.revision.saturating_add(1),
                        timestamp: now,
                    })
                    .into_iter()
                    .collect())
            },
        );
    }
}

/// Deletes the records of deliveries that left the session.
pub fn forget(store: &dyn TwinStore, solution: &str, client_id: &str, seqs: &[u64]) {
    for &seq in seqs {
        delete(store, &queued_key(solution, client_id, seq));
    }
}

/// Deletes the entity `key`, if there is one. A failed write means the journal failed (the
/// store logs it and refuses every write after it); the record is dealt with at the next start.
fn delete(store: &dyn TwinStore, key: &EntityKey) {
    let _ = documents::put(store, key, None);
}

fn queued_delivery(doc: &Value, seq: u64) -> Option<Delivery> {
    let topic = doc.get("topic")?.as_str()?.parse().ok()?;
    let payload = STANDARD.decode(doc.get("payload")?.as_str()?).ok()?;
    let qos = match doc.get("qos")?.as_u64()? {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtMostOnce,
    };
    let expiry_seconds = match doc.get("expiresAtMillis").and_then(Value::as_u64) {
        None => None,
        Some(millis) => Some(documents::seconds_left(millis)?),
    };
    let message = Message::new(
        topic,
        Bytes::from(payload),
        Origin {
            qos,
            expiry_seconds,
            properties: doc
                .get("properties")
                .map(|p| Box::new(documents::properties_from_doc(p))),
            ..Origin::default()
        },
    );
    Some(Delivery {
        message,
        qos,
        retain: doc.get("retain").and_then(Value::as_bool).unwrap_or(false),
        subscription_ids: doc
            .get("subscriptionIds")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| u32::try_from(id.as_u64()?).ok().and_then(NonZeroU32::new))
                    .collect()
            })
            .unwrap_or_default(),
        stored: Some(seq),
        redelivered: false,
    })
}

/// Writes `session` of `space` (a persistent one) as it is now; `ended`: when its connection
/// ended (`None`: attached). Completes once durable. A failed write is logged: the session then
/// lives in memory only.
pub fn save(
    store: &dyn TwinStore,
    space: &SolutionSpace,
    session: &Session,
    ended: Option<SystemTime>,
    node: Option<&str>,
) -> Option<Durable> {
    let doc = {
        let mut state = session.lock();
        state.journal.get_or_insert_with(Box::default);
        let subscriptions: Vec<Value> = state
            .subscriptions
            .iter()
            .map(|(filter, record)| {
                json!({
                    "filter": &**filter,
                    "qos": record.options.qos as u8,
                    "noLocal": record.options.no_local,
                    "retainAsPublished": record.options.retain_as_published,
                    "retainHandling": record.options.retain_handling as u8,
                    "id": record.id.map(NonZeroU32::get),
                })
            })
            .collect();
        json!({
            "solutionId": space.id.as_str(),
            "clientId": &*session.client_id,
            "subjects": &*state.subjects().clone(),
            "expiryInterval": state.expiry_interval,
            "subscriptions": subscriptions,
            "incomingQos2": state.incoming_qos2.iter().map(|id| id.get()).collect::<Vec<_>>(),
            "endedAtMillis": ended.map(documents::millis),
            "node": node,
        })
    };
    match documents::put(
        store,
        &key(space.id.as_str(), &session.client_id),
        Some(doc),
    ) {
        Ok(durable) => Some(durable),
        Err(e) => {
            tracing::error!(error = %e, solution = %space.id, "a persistent session could not be stored");
            None
        }
    }
}

/// Deletes the stored session `client_id` of `space`, if `session` was stored.
pub fn remove(store: &dyn TwinStore, space: &SolutionSpace, session: &Session) {
    {
        let mut state = session.lock();
        if state.journal.take().is_none() {
            return;
        }
    }
    delete_stored(store, space, &session.client_id);
}

/// Deletes the record of session `client_id` of `space` and its queued deliveries.
fn delete_stored(store: &dyn TwinStore, space: &SolutionSpace, client_id: &str) {
    // `{solution}/{client}/{seq}`: the rest after the prefix is the sequence number alone (a
    // client ID may hold `/`: `a/b`'s records are not `a`'s).
    let prefix = format!("{}/{}/", space.id, client_id);
    for queued in store.keys(EntityKind::Queued) {
        if queued
            .id
            .strip_prefix(&prefix)
            .is_some_and(|seq| !seq.contains('/'))
        {
            delete(store, &queued);
        }
    }
    delete(store, &key(space.id.as_str(), client_id));
}

fn options(doc: &Value) -> Option<(Box<str>, SubscriptionRecord)> {
    let filter: Box<str> = doc.get("filter")?.as_str()?.into();
    let qos = match doc.get("qos")?.as_u64()? {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let retain_handling = match doc.get("retainHandling").and_then(Value::as_u64) {
        Some(1) => RetainHandling::OnNewSubscribe,
        Some(2) => RetainHandling::Never,
        _ => RetainHandling::OnSubscribe,
    };
    let options = SubscriptionOptions {
        qos,
        no_local: doc.get("noLocal").and_then(Value::as_bool).unwrap_or(false),
        retain_as_published: doc
            .get("retainAsPublished")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        retain_handling,
    };
    let id = doc
        .get("id")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .and_then(NonZeroU32::new);
    Some((filter, SubscriptionRecord { options, id }))
}

/// A stored session to restore, with the seconds of expiry it has left (`None`: it expired
/// while the server was down, or cannot be read).
struct Stored {
    solution: String,
    client_id: Arc<str>,
    subjects: Arc<[String]>,
    expiry: u32,
    left: u32,
    subscriptions: Vec<(Box<str>, SubscriptionRecord)>,
    incoming_qos2: Vec<NonZeroU16>,
}

fn stored(doc: &Value, now: SystemTime) -> Option<Stored> {
    let expiry = u32::try_from(doc.get("expiryInterval")?.as_u64()?).ok()?;
    let left = match doc.get("endedAtMillis").and_then(Value::as_u64) {
        // Attached when the server stopped: its countdown starts now.
        None => expiry,
        Some(_) if expiry == u32::MAX => expiry,
        Some(ended) => {
            let ended = UNIX_EPOCH + Duration::from_millis(ended);
            let gone = now.duration_since(ended).unwrap_or_default().as_secs();
            u32::try_from(u64::from(expiry).checked_sub(gone)?).ok()?
        }
    };
    if left == 0 {
        return None;
    }
    Some(Stored {
        solution: doc.get("solutionId")?.as_str()?.to_owned(),
        client_id: doc.get("clientId")?.as_str()?.into(),
        subjects: doc
            .get("subjects")?
            .as_array()?
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect::<Vec<_>>()
            .into(),
        expiry,
        left,
        subscriptions: doc
            .get("subscriptions")?
            .as_array()?
            .iter()
            .filter_map(options)
            .collect(),
        incoming_qos2: doc
            .get("incomingQos2")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| u16::try_from(id.as_u64()?).ok().and_then(NonZeroU16::new))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// A session put back at start-up, whose expiry timer the caller starts.
#[derive(Debug)]
pub struct Restored {
    pub space: Arc<SolutionSpace>,
    pub session: Arc<Session>,
    /// Seconds left before it expires (`u32::MAX`: never).
    pub left: u32,
}

/// Puts every stored session back into its solution's space (offline); expired ones are
/// deleted. `max_queued`: the queue bound of each.
pub fn restore(
    store: &dyn TwinStore,
    solutions: &Solutions,
    spaces: &Spaces,
    max_queued: usize,
) -> Vec<Restored> {
    let now = SystemTime::now();
    let mut restored = Vec::new();
    for key in store.keys(EntityKind::Session) {
        match revive(store, &key, solutions, spaces, max_queued, now) {
            Some(r) => restored.push(r),
            None => delete(store, &key),
        }
    }
    restore_queued(store, &restored, None);
    restored
}

/// Cluster mode: the stored session `client_id` of `space`, left by a connection on another
/// node, put into this node's space with its subscriptions and queued deliveries (`None`:
/// none stored, or expired).
pub fn adopt(
    store: &dyn TwinStore,
    solutions: &Solutions,
    spaces: &Spaces,
    space: &SolutionSpace,
    client_id: &str,
    max_queued: usize,
) -> Option<Restored> {
    let key = key(space.id.as_str(), client_id);
    let restored = revive(
        store,
        &key,
        solutions,
        spaces,
        max_queued,
        SystemTime::now(),
    )?;
    let prefix = format!("{}/{}/", space.id, client_id);
    restore_queued(store, std::slice::from_ref(&restored), Some(&prefix));
    Some(restored)
}

/// Cluster mode: deletes the stored session `client_id` of `space` and its queued deliveries
/// (a clean start on this node of a session another node left).
pub fn forget_stored(store: &dyn TwinStore, space: &SolutionSpace, client_id: &str) {
    if store.get(&key(space.id.as_str(), client_id)).is_some() {
        delete_stored(store, space, client_id);
    }
}

/// The stored session `key` put back into its space, offline (`None`: unreadable, expired or
/// of an unknown solution).
fn revive(
    store: &dyn TwinStore,
    key: &EntityKey,
    solutions: &Solutions,
    spaces: &Spaces,
    max_queued: usize,
    now: SystemTime,
) -> Option<Restored> {
    let entity = store.get(key)?;
    let s = stored(&entity.doc, now)?;
    let solution = solutions.get(&s.solution)?;
    let space = spaces.get_or_create(&solution);
    let view = space
        .policy()
        .for_subjects(&s.subjects, None, crate::core::now());
    let session = Arc::new(Session::new(
        s.client_id.clone(),
        s.subjects,
        view,
        s.expiry,
        max_queued,
    ));
    {
        let mut state = session.lock();
        state.journal.get_or_insert_with(Box::default);
        state.incoming_qos2 = s.incoming_qos2;
        let mut tree = space.tree_write();
        for (filter, record) in s.subscriptions {
            let shared = filter.starts_with("$share/");
            tree.insert(
                tree_filter(&filter),
                Subscriber {
                    session: session.clone(),
                    options: record.options,
                    id: record.id,
                    share: shared.then(|| Arc::from(&*filter)),
                },
            );
            state.subscriptions.insert(filter, record);
        }
    }
    space.sessions().insert(s.client_id, session.clone());
    Some(Restored {
        space,
        session,
        left: s.left,
    })
}

/// Queues the journaled deliveries of the restored sessions again, in sequence order; records
/// of sessions that are gone (or unreadable ones) are deleted.
fn restore_queued(store: &dyn TwinStore, restored: &[Restored], only: Option<&str>) {
    let mut keys = store.keys(EntityKind::Queued);
    // Only one session's records (the others belong to sessions held elsewhere).
    if let Some(prefix) = only {
        keys.retain(|key| key.id.starts_with(prefix));
    }
    // IDs end in a zero-padded sequence number: sorted IDs are in queue order per session.
    keys.sort_by(|a, b| a.id.cmp(&b.id));
    for key in keys {
        let owner = key.id.rsplit_once('/').and_then(|(owner, seq)| {
            let seq: u64 = seq.parse().ok()?;
            let (solution, client) = owner.split_once('/')?;
            let found = restored
                .iter()
                .find(|r| r.space.id.as_str() == solution && &*r.session.client_id == client)?;
            Some((found, seq))
        });
        let delivery = owner.and_then(|(found, seq)| {
            let entity = store.get(&key)?;
            let packet_id = entity
                .doc
                .get("packetId")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .and_then(std::num::NonZeroU16::new);
            Some((found, queued_delivery(&entity.doc, seq)?, packet_id))
        });
        match delivery {
            Some((found, delivery, packet_id)) => {
                found.session.lock().restore_queued(delivery, packet_id)
            }
            None => delete(store, &key),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use twin::entity::EntityKind;
    use twin::store::{EmbeddedStore, StoreOptions, TwinStore};

    use super::{remove, save, store_delivery};
    use crate::auth::secret::Digest;
    use crate::auth::solution::{Solution, SolutionId, default_policy};
    use crate::core::message::{Delivery, Message, Origin};
    use crate::core::session::Session;
    use crate::core::space::SolutionSpace;
    use crate::mqtt::codec::QoS;

    #[test]
    fn ending_a_session_deletes_its_records_and_no_other_clients() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(StoreOptions::new(dir.path())).unwrap();
        let id = SolutionId::parse("acme").unwrap();
        let space = SolutionSpace::new(Arc::new(Solution {
            id: id.clone(),
            api_token_digest: Digest::of("token"),
            secrets: Vec::new(),
            namespaces: Vec::new(),
            policy: default_policy(&id).unwrap(),
            connections: Vec::new(),
        }));
        let session = |client: &str| {
            let subjects: Arc<[String]> = vec!["iot-things:acme".to_owned()].into();
            let view = space
                .policy()
                .for_subjects(&subjects, None, crate::core::now());
            Arc::new(Session::new(client.into(), subjects, view, 60, 10))
        };
        let delivery = Delivery {
            message: Message::new("t".parse().unwrap(), "x".into(), Origin::default()),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Vec::new(),
            stored: None,
            redelivered: false,
        };
        // Client IDs may hold `/`: `a/b` is not a part of `a`.
        let (a, ab) = (session("a"), session("a/b"));
        for s in [&a, &ab] {
            save(&store, &space, s, None, None);
            store_delivery(&store, "acme", &s.client_id, 1, &delivery).unwrap();
        }
        remove(&store, &space, &a);
        let left: Vec<String> = store
            .keys(EntityKind::Queued)
            .into_iter()
            .chain(store.keys(EntityKind::Session))
            .map(|k| k.id)
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().all(|k| k.starts_with("acme/a/b")), "{left:?}");
    }
}
