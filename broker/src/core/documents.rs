//! Whole documents the broker keeps in the twin store besides things and policies (retained
//! messages, persistent sessions, their queued messages): each is replaced whole with a root
//! `created` event, or removed with `deleted`, through the store's one write path (journal,
//! group commit, recovery).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use twin::entity::{Entity, EntityKey, Event, EventAction};
use twin::store::{Durable, StoreError, TwinStore, TwinStoreExt, WriteError};

use crate::core::message::ForwardedProperties;
use crate::mqtt::codec::{TopicName, Utf8Str};

/// Replaces the document `key` with `doc`, or removes it (`None`; nothing happens if there is
/// none). The handle completes once the write is durable.
pub fn put(
    store: &dyn TwinStore,
    key: &EntityKey,
    doc: Option<Value>,
) -> Result<Durable, StoreError> {
    let now = crate::core::now();
    let written = store.write(
        key,
        |current: Option<&Entity>| -> Result<Vec<Event>, std::convert::Infallible> {
            let revision = current.map_or(0, |e| e.revision).saturating_add(1);
            let action = match (&doc, current) {
                (None, None) => return Ok(Vec::new()),
                (None, Some(_)) => EventAction::Deleted,
                (Some(_), _) => EventAction::Created,
            };
            Ok(vec![Event {
                key: key.clone(),
                action,
                path: String::new(),
                value: doc.clone(),
                revision,
                timestamp: now,
            }])
        },
    );
    match written {
        Ok(written) => Ok(written.durable),
        Err(WriteError::Store(e)) => Err(e),
        Err(WriteError::Rejected(never)) => match never {},
    }
}

/// Wall-clock milliseconds since the Unix epoch (what a stored document holds for a time).
pub fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A message's expiry instant as stored wall-clock milliseconds.
pub fn expiry_millis(at: Instant) -> u64 {
    millis(SystemTime::now() + at.saturating_duration_since(Instant::now()))
}

/// The whole seconds, rounded up, left until the stored expiry `millis` (the expiry clock runs
/// in seconds); `None`: it has passed.
pub fn seconds_left(millis: u64) -> Option<u32> {
    let left = (UNIX_EPOCH + Duration::from_millis(millis))
        .duration_since(SystemTime::now())
        .ok()?;
    u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).ok()
}

/// A message's forwarded properties as a stored document (binary data in base64).
pub fn properties_to_doc(p: &ForwardedProperties) -> Value {
    let mut props = Map::new();
    if let Some(utf8) = p.payload_format_utf8 {
        props.insert("payloadFormatUtf8".into(), json!(utf8));
    }
    if let Some(t) = &p.content_type {
        props.insert("contentType".into(), json!(t.as_str()));
    }
    if let Some(t) = &p.response_topic {
        props.insert("responseTopic".into(), json!(t.as_str()));
    }
    if let Some(d) = &p.correlation_data {
        props.insert("correlationData".into(), json!(STANDARD.encode(d)));
    }
    if !p.user_properties.is_empty() {
        let pairs: Vec<Value> = p
            .user_properties
            .iter()
            .map(|(k, v)| json!([k.as_str(), v.as_str()]))
            .collect();
        props.insert("userProperties".into(), Value::Array(pairs));
    }
    Value::Object(props)
}

/// Stored properties back ([`properties_to_doc`]); what cannot be read is left out.
pub fn properties_from_doc(p: &Value) -> ForwardedProperties {
    let text = |name: &str| p.get(name).and_then(Value::as_str);
    ForwardedProperties {
        payload_format_utf8: p.get("payloadFormatUtf8").and_then(Value::as_bool),
        content_type: text("contentType").and_then(|t| t.parse::<Utf8Str>().ok()),
        response_topic: text("responseTopic").and_then(|t| t.parse::<TopicName>().ok()),
        correlation_data: text("correlationData")
            .and_then(|d| STANDARD.decode(d).ok())
            .map(Bytes::from),
        user_properties: p
            .get("userProperties")
            .and_then(Value::as_array)
            .map(|pairs| {
                pairs
                    .iter()
                    .filter_map(|pair| {
                        let k = pair.get(0)?.as_str()?.parse::<Utf8Str>().ok()?;
                        let v = pair.get(1)?.as_str()?.parse::<Utf8Str>().ok()?;
                        Some((k, v))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}
