//! One topic space with MQTT (DESIGN.md §3): routing keys ⇄ MQTT topics and binding keys ⇄
//! filters, RabbitMQ's MQTT-plugin mapping made lossless, and AMQP basic properties ⇄ the
//! MQTT 5 properties the core forwards.
//!
//! MQTT `/` ⇄ AMQP `.`, `+` ⇄ `*`, `#` ⇄ `#`; a `.` inside an MQTT level is written `/` on the
//! AMQP side (RabbitMQ would split the level there, breaking every namespace):
//! `org.acme/lamp-1/things/twin/commands/modify` ⇄ `org/acme.lamp-1.things.twin.commands.modify`.
//! Both directions swap the same two characters per level, so the mapping is a bijection —
//! but for one case: an MQTT topic level that is a literal `*` becomes the routing-key word `*`,
//! which reads back as the wildcard `+` (a publish with it is refused as no topic name).

use std::time::Instant;

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::Bytes;

use crate::core::message::{Delivery, ForwardedProperties};
use crate::mqtt::codec::{QoS, TopicName, Utf8Str};

/// The MQTT topic (or filter) of an AMQP routing (or binding) key.
pub fn key_to_topic(key: &str) -> String {
    let mut topic = String::with_capacity(key.len());
    for (i, level) in key.split('.').enumerate() {
        if i > 0 {
            topic.push('/');
        }
        if level == "*" {
            topic.push('+');
        } else {
            topic.extend(level.chars().map(|c| if c == '/' { '.' } else { c }));
        }
    }
    topic
}

/// The AMQP routing (or binding) key of an MQTT topic (or filter); `None` if it is longer than
/// an AMQP short string (255 bytes).
pub fn topic_to_key(topic: &str) -> Option<String> {
    if topic.len() > 255 {
        return None;
    }
    let mut key = String::with_capacity(topic.len());
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            key.push('.');
        }
        if level == "+" {
            key.push('*');
        } else {
            key.extend(level.chars().map(|c| if c == '.' { '/' } else { c }));
        }
    }
    Some(key)
}

/// Why a binding key has no MQTT filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindingKeyError {
    #[error("`#` may only be the last word of a binding key here (MQTT's multi-level wildcard)")]
    HashNotLast,
    #[error("`*` and `#` must be whole words of a binding key")]
    PartialWildcard,
}

/// The MQTT filter of a binding key: like [`key_to_topic`], refusing what MQTT cannot say
/// (`#` before the last word, wildcards inside a word).
pub fn binding_to_filter(key: &str) -> Result<String, BindingKeyError> {
    let words: Vec<&str> = key.split('.').collect();
    for (i, word) in words.iter().enumerate() {
        if *word == "#" && i + 1 != words.len() {
            return Err(BindingKeyError::HashNotLast);
        }
        if word.len() > 1 && (word.contains('#') || word.contains('*')) {
            return Err(BindingKeyError::PartialWildcard);
        }
    }
    Ok(key_to_topic(key))
}

/// What an AMQP publish's properties mean for the core.
#[derive(Debug, Default)]
pub struct Incoming {
    /// `delivery-mode` 2 (persistent): QoS 1; otherwise QoS 0.
    pub qos: QoS,
    /// `expiration` (milliseconds) rounded up to seconds.
    pub expiry_seconds: Option<u32>,
    /// `content-type`, `correlation-id` and `headers` as MQTT 5 properties (the response topic
    /// is the adapter's to fill in: it knows its queues' reply addresses).
    pub forwarded: ForwardedProperties,
    /// `reply-to`, as given.
    pub reply_to: Option<String>,
}

/// An AMQP publish's properties for the core: QoS, expiry, forwarded properties.
pub fn incoming(properties: &AMQPProperties) -> Incoming {
    let qos = if *properties.delivery_mode() == Some(2) {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let expiry_seconds = properties
        .expiration()
        .as_ref()
        .and_then(|ms| ms.as_str().trim().parse::<u64>().ok())
        .map(|ms| u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX));
    let mut forwarded = ForwardedProperties {
        content_type: properties
            .content_type()
            .as_ref()
            .and_then(|c| c.as_str().parse::<Utf8Str>().ok()),
        correlation_data: properties
            .correlation_id()
            .as_ref()
            .map(|c| Bytes::copy_from_slice(c.as_str().as_bytes())),
        ..ForwardedProperties::default()
    };
    if let Some(headers) = properties.headers() {
        for (name, value) in headers.inner() {
            let Some(text) = header_text(value) else {
                continue;
            };
            if let (Ok(k), Ok(v)) = (name.as_str().parse::<Utf8Str>(), text.parse::<Utf8Str>()) {
                forwarded.user_properties.push((k, v));
            }
        }
    }
    Incoming {
        qos,
        expiry_seconds,
        forwarded,
        reply_to: properties
            .reply_to()
            .as_ref()
            .map(|r| r.as_str().to_owned())
            .filter(|r| !r.is_empty()),
    }
}

/// A header value as the text of an MQTT 5 user property (strings, numbers, booleans; tables,
/// arrays and byte arrays are not carried).
pub(crate) fn header_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// The basic properties of a delivery: `delivery-mode` 2 for QoS 1, `content-type`,
/// `correlation-id`, `headers` from user properties, `reply-to` from the response topic (as a
/// routing key: an answer published to the default exchange with it reaches the requester),
/// `expiration` from the time left.
pub fn outgoing(delivery: &Delivery, now: Instant) -> AMQPProperties {
    let mut properties = AMQPProperties::default();
    if delivery.qos != QoS::AtMostOnce {
        properties = properties.with_delivery_mode(2);
    }
    if let Some(at) = delivery.message.expires_at {
        let ms = at.saturating_duration_since(now).as_millis().max(1);
        properties = properties.with_expiration(ShortString::from(ms.to_string()));
    }
    let Some(forwarded) = delivery.message.properties.as_deref() else {
        return properties;
    };
    if let Some(content_type) = &forwarded.content_type
        && let Ok(value) = ShortString::try_new(content_type.as_str())
    {
        properties = properties.with_content_type(value);
    }
    if let Some(correlation) = &forwarded.correlation_data
        && let Ok(value) = ShortString::try_new(String::from_utf8_lossy(correlation))
    {
        properties = properties.with_correlation_id(value);
    }
    if let Some(topic) = &forwarded.response_topic
        && let Some(value) = topic_to_key(topic.as_str()).and_then(|k| ShortString::try_new(k).ok())
    {
        properties = properties.with_reply_to(value);
    }
    if !forwarded.user_properties.is_empty() {
        let mut headers = FieldTable::default();
        for (name, value) in &forwarded.user_properties {
            if let Ok(name) = ShortString::try_new(name.as_str()) {
                headers.insert(
                    name,
                    AMQPValue::LongString(LongString::from(value.as_str().as_bytes().to_vec())),
                );
            }
        }
        properties = properties.with_headers(headers);
    }
    properties
}

/// The routing key of a delivery on a topic (`None`: the topic cannot be one, over 255 bytes).
pub fn delivery_key(topic: &TopicName) -> Option<String> {
    topic_to_key(topic.as_str())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_design_example_maps_both_ways() {
        let topic = "org.acme/lamp-1/things/twin/commands/modify";
        let key = "org/acme.lamp-1.things.twin.commands.modify";
        assert_eq!(topic_to_key(topic).unwrap(), key);
        assert_eq!(key_to_topic(key), topic);
        // Without dots: exactly RabbitMQ's mapping.
        assert_eq!(topic_to_key("sensors/+/temp").unwrap(), "sensors.*.temp");
        assert_eq!(key_to_topic("sensors.*.#"), "sensors/+/#");
    }

    #[test]
    fn binding_keys_mqtt_cannot_say_are_refused() {
        assert_eq!(
            binding_to_filter("a.#.b"),
            Err(BindingKeyError::HashNotLast)
        );
        assert_eq!(
            binding_to_filter("a.b*"),
            Err(BindingKeyError::PartialWildcard)
        );
        assert_eq!(
            binding_to_filter("org/acme.*.things.#").unwrap(),
            "org.acme/+/things/#"
        );
    }

    proptest! {
        #[test]
        fn topics_survive_the_round_trip(levels in proptest::collection::vec("[a-z./+#-]{0,6}", 1..6)) {
            let topic = levels.join("/");
            if let Some(key) = topic_to_key(&topic) {
                prop_assert_eq!(key_to_topic(&key), topic);
            }
        }
    }
}
