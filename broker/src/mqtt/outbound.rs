//! Packets on their way to one client: encoded into the connection's write buffer within the
//! client's maximum packet size, with topic aliases where the client allows them. Also the
//! other direction of the forwarded properties: what a PUBLISH brings in ([`forwarded`]).

use std::collections::HashMap;
use std::num::NonZeroU16;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::core::message::{Delivery, ForwardedProperties, deep_copy_topic, deep_copy_utf8};
use crate::core::session::Resend;
use crate::metrics::Metrics;
use crate::mqtt::codec::{Packet, Properties, Protocol, PubResponse, Publish, QosPid, TopicName};

/// Topic aliases the server assigned on one connection (MQTT 5 §3.3.2.3.4): the first PUBLISH
/// on a topic carries topic and alias, later ones only the alias. Aliases are given out until
/// the client's Topic Alias Maximum is reached and never reassigned; the map is allocated only
/// when a client allows aliases and a message is sent.
#[derive(Debug, Default)]
pub struct TopicAliases {
    /// The client's Topic Alias Maximum (0: none).
    pub max: u16,
    /// Boxed: an empty `HashMap` inline is 48 bytes of every connection.
    map: Option<Box<AliasMap>>,
}

type AliasMap = HashMap<Box<str>, NonZeroU16>;

impl TopicAliases {
    pub fn new(max: u16) -> Self {
        TopicAliases { max, map: None }
    }

    /// The alias for `topic` and whether the topic must still be sent with it.
    fn alias(&mut self, topic: &str) -> Option<(NonZeroU16, bool)> {
        if self.max == 0 {
            return None;
        }
        let map = self.map.get_or_insert_default();
        if let Some(&alias) = map.get(topic) {
            return Some((alias, false));
        }
        if map.len() >= usize::from(self.max) {
            return None;
        }
        let alias = NonZeroU16::new(u16::try_from(map.len() + 1).ok()?)?;
        map.insert(topic.into(), alias);
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

    /// Appends a PUBLISH for `delivery` (`dup`: a retransmission).
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

impl Outbound<'_> {
    /// Sends again what a resumed session had in flight.
    pub fn resend(&mut self, resend: Resend<'_>) {
        match resend {
            Resend::Publish(delivery, qos) => {
                self.publish(delivery, qos, true);
            }
            Resend::Release(packet_id) => {
                self.packet(&Packet::PubRel(PubResponse {
                    packet_id,
                    reason: 0,
                    properties: Properties::default(),
                }));
            }
        }
    }
}

/// The forwarded part of a PUBLISH's (or will's) properties `p`, in its own allocations, or
/// `None` when there is nothing to forward.
pub fn forwarded(p: &Properties) -> Option<Box<ForwardedProperties>> {
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
