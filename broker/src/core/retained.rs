//! Retained messages survive a restart: each one is an entity of the store
//! (`EntityKind::Retained`, ID `{solutionId}/{topic}`), written through the same journal as
//! twins — set (or replaced) with a root `created` event, cleared with `deleted` — under the
//! solution's retained-map lock, so the journal holds them in the order the map changed. The
//! publisher's acknowledgement waits for the write to be durable. At start-up every stored
//! retained message is put back into its solution's space; one whose expiry passed meanwhile is
//! dropped then.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use twin::entity::{EntityKey, EntityKind};
use twin::store::{Durable, TwinStore};

use crate::auth::solution::Solutions;
use crate::core::documents;
use crate::core::message::{Message, Origin};
use crate::core::space::Spaces;
use crate::mqtt::codec::{QoS, TopicName};

fn key(solution: &str, topic: &str) -> EntityKey {
    EntityKey::new(EntityKind::Retained, format!("{solution}/{topic}"))
}

/// Why a retained message could not be written to the journal.
#[derive(Debug, thiserror::Error)]
#[error("the retained message could not be stored: {0}")]
pub struct RetainError(String);

/// Writes `message` as the retained message of its topic in `solution` (an empty payload
/// clears it). The returned handle completes once the write is durable.
pub fn store(
    store: &dyn TwinStore,
    solution: &str,
    message: &Message,
) -> Result<Durable, RetainError> {
    let doc = (!message.payload.is_empty()).then(|| to_doc(solution, message));
    documents::put(store, &key(solution, message.topic.as_str()), doc)
        .map_err(|e| RetainError(e.to_string()))
}

fn to_doc(solution: &str, message: &Message) -> Value {
    let mut doc = Map::new();
    doc.insert("solutionId".into(), json!(solution));
    doc.insert("topic".into(), json!(message.topic.as_str()));
    doc.insert("payload".into(), json!(STANDARD.encode(&message.payload)));
    doc.insert("qos".into(), json!(message.qos as u8));
    if let Some(at) = message.expires_at {
        doc.insert(
            "expiresAtMillis".into(),
            json!(documents::expiry_millis(at)),
        );
    }
    if let Some(p) = &message.properties {
        doc.insert("properties".into(), documents::properties_to_doc(p));
    }
    Value::Object(doc)
}

/// A stored retained message back as a message (`None`: unreadable, or expired).
fn from_doc(doc: &Value) -> Option<(String, Arc<Message>)> {
    let solution = doc.get("solutionId")?.as_str()?.to_owned();
    let topic: TopicName = doc.get("topic")?.as_str()?.parse().ok()?;
    let payload = STANDARD.decode(doc.get("payload")?.as_str()?).ok()?;
    let qos = match doc.get("qos")?.as_u64()? {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let expiry_seconds = match doc.get("expiresAtMillis").and_then(Value::as_u64) {
        None => None,
        Some(millis) => Some(documents::seconds_left(millis)?),
    };
    let properties = doc
        .get("properties")
        .map(|p| Box::new(documents::properties_from_doc(p)));
    let message = Message::new(
        topic,
        Bytes::from(payload),
        Origin {
            qos,
            retain: true,
            properties,
            expiry_seconds,
            publisher: 0,
        },
    );
    Some((solution, message))
}

/// Puts every stored retained message back into its solution's space; returns how many.
pub fn restore(store: &dyn TwinStore, solutions: &Solutions, spaces: &Spaces) -> usize {
    let mut restored = 0;
    for key in store.keys(EntityKind::Retained) {
        let Some(entity) = store.get(&key) else {
            continue;
        };
        let Some((solution_id, message)) = from_doc(&entity.doc) else {
            continue;
        };
        let Some(solution) = solutions.get(&solution_id) else {
            continue;
        };
        let space = spaces.get_or_create(&solution);
        space
            .retained_write()
            .insert(message.topic.as_str().into(), message);
        restored += 1;
    }
    restored
}

/// Cluster mode: another node set (`entity`) or cleared (`None`) the retained message stored
/// as `id` (`{solutionId}/{topic}`); this node's space follows.
pub fn apply_remote(id: &str, entity: Option<&Value>, solutions: &Solutions, spaces: &Spaces) {
    let Some((solution_id, topic)) = id.split_once('/') else {
        return;
    };
    let Some(solution) = solutions.get(solution_id) else {
        return;
    };
    let space = spaces.get_or_create(&solution);
    match entity.and_then(from_doc) {
        Some((_, message)) => {
            space
                .retained_write()
                .insert(message.topic.as_str().into(), message);
        }
        None => {
            space.retained_write().remove(topic);
        }
    }
}
