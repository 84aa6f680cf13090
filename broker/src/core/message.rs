//! What travels through the fan-out: a [`Message`] (one per publish, shared by every
//! subscriber it reaches) and a [`Delivery`] (that message for one subscriber).
//!
//! The core's topic space and delivery semantics are MQTT's for every transport (DESIGN.md §3:
//! AMQP routing keys map to MQTT topics), so messages carry the codec's validated string types
//! ([`TopicName`], [`Utf8Str`]) and [`QoS`]; no packet, reason code or connection state.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::mqtt::codec::{QoS, TopicName, Utf8Str};

/// One published message as it travels to subscribers: topic and payload in their own
/// allocations (so a queued message keeps only its own bytes alive). Built only with
/// [`Message::new`].
#[derive(Debug)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Properties forwarded to subscribers (MQTT 5; AMQP maps its own); `None` for most.
    pub properties: Option<Box<ForwardedProperties>>,
    /// From the Message Expiry Interval: dropped, not sent, once passed.
    pub expires_at: Option<Instant>,
    /// The publishing session's [`Session::id`](crate::core::session::Session::id), for No
    /// Local (0: none, e.g. a will or an event).
    pub publisher: u64,
}

/// How a message came to be: everything [`Message::new`] needs besides topic and payload.
#[derive(Debug, Default)]
pub struct Origin {
    pub qos: QoS,
    pub retain: bool,
    pub properties: Option<Box<ForwardedProperties>>,
    /// Message Expiry Interval in seconds.
    pub expiry_seconds: Option<u32>,
    /// The publishing session's ID (0: none).
    pub publisher: u64,
}

impl Message {
    /// The one constructor. `topic` and `payload` must be in their own allocations, not
    /// slices of a read buffer that a queued message would keep alive ([`deep_copy_topic`],
    /// `Bytes::copy_from_slice`).
    pub fn new(topic: TopicName, payload: Bytes, origin: Origin) -> Arc<Message> {
        Arc::new(Message {
            topic,
            payload,
            qos: origin.qos,
            retain: origin.retain,
            properties: origin.properties,
            expires_at: origin
                .expiry_seconds
                .map(|s| Instant::now() + Duration::from_secs(u64::from(s))),
            publisher: origin.publisher,
        })
    }
}

/// The properties the server forwards unchanged with a message (MQTT 5 §3.3.2.3; AMQP maps
/// its own onto them).
#[derive(Debug, Clone, Default)]
pub struct ForwardedProperties {
    pub payload_format_utf8: Option<bool>,
    pub content_type: Option<Utf8Str>,
    pub response_topic: Option<TopicName>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(Utf8Str, Utf8Str)>,
}

impl ForwardedProperties {
    /// Only correlation data (the answer to a command carries the command's).
    pub fn correlation(data: Option<Bytes>) -> Option<Box<Self>> {
        data.map(|correlation| {
            Box::new(ForwardedProperties {
                correlation_data: Some(correlation),
                ..ForwardedProperties::default()
            })
        })
    }
}

/// A string in its own allocation (not a slice of a read buffer).
pub fn deep_copy_utf8(s: &Utf8Str) -> Utf8Str {
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
    /// The sequence number of its journal record, for a QoS 1/2 delivery queued for a
    /// persistent session (`crate::core::sessions`).
    pub stored: Option<u64>,
    /// It was sent before and came back unacknowledged (AMQP `redelivered`).
    pub redelivered: bool,
}

/// What happened to a delivery offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Dropped by a limit (counted in the metrics).
    Dropped,
}
