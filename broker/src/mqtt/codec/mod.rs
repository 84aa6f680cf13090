//! The MQTT 3.1.1 and 5.0 codec: bytes ⇄ packets, server side first.
//!
//! Our own rather than rumqttc's `mqttbytes` because that one allocates a `String` per PUBLISH
//! topic, reads passwords as UTF-8 (they are binary) and skips the checks a server owes the
//! specification (reserved flags, protocol name and level, wildcards in topic names, …).
//!
//! # Layout
//! - [`check`] (`fixed.rs`): the fixed header, and the maximum packet size enforced from it
//!   before the body is buffered (STYLE.md "Check sizes before buffering").
//! - [`decode`] / [`decode_connect`]: split one frame off a `BytesMut` and parse it; topics,
//!   payloads and passwords are `Bytes` slices of that frame, never copies.
//! - `packets.rs`: each packet's body, both versions; `properties.rs`: MQTT 5 properties;
//!   `wire.rs`: the data representations of §1.5 and the validated string types.
//! - [`Packet::encode`]: every packet, both versions, in two passes (count, then write) so the
//!   remaining length is exact without a scratch buffer.
//! - `error.rs`: [`CodecError`], its Malformed/Protocol classification and reason codes.
//!
//! The protocol version of a connection comes from its CONNECT: decode the first packet with
//! [`decode_connect`], then the rest with [`decode`] and `connect.protocol`. Only "MQTT" level 4
//! (3.1.1) and level 5 are accepted; "MQIsdp" level 3 (MQTT 3.1) is refused with
//! [`CodecError::UnsupportedProtocol`], which maps to CONNACK 0x01 (3.1.1) or 0x84 (5.0).

mod error;
mod fixed;
mod packets;
mod properties;
mod wire;

#[cfg(test)]
mod tests;

use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};

pub use error::{CodecError, ErrorKind};
pub use fixed::{FixedHeader, MAX_REMAINING_LENGTH, PacketType, check};
pub use properties::{Properties, PropertyContext};
pub use wire::{TopicFilter, TopicName, Utf8Str};

/// The protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1, protocol level 4.
    V311,
    /// MQTT 5.0, protocol level 5.
    V5,
}

impl Protocol {
    /// The protocol level byte of a CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Self::V311 => 4,
            Self::V5 => 5,
        }
    }
}

/// A quality of service level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub(crate) fn from_bits(bits: u8, packet: &'static str) -> Result<Self, CodecError> {
        match bits {
            0 => Ok(Self::AtMostOnce),
            1 => Ok(Self::AtLeastOnce),
            2 => Ok(Self::ExactlyOnce),
            qos => Err(CodecError::InvalidQos { packet, qos }),
        }
    }
}

/// A PUBLISH's QoS with its packet identifier: QoS 0 has none, QoS 1 and 2 have a non-zero one,
/// so an inconsistent pair cannot be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosPid {
    AtMostOnce,
    AtLeastOnce(NonZeroU16),
    ExactlyOnce(NonZeroU16),
}

impl QosPid {
    pub fn qos(self) -> QoS {
        match self {
            Self::AtMostOnce => QoS::AtMostOnce,
            Self::AtLeastOnce(_) => QoS::AtLeastOnce,
            Self::ExactlyOnce(_) => QoS::ExactlyOnce,
        }
    }

    pub fn packet_id(self) -> Option<NonZeroU16> {
        match self {
            Self::AtMostOnce => None,
            Self::AtLeastOnce(id) | Self::ExactlyOnce(id) => Some(id),
        }
    }
}

/// CONNECT (§3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// From the protocol name and level; decides how every later packet is read.
    pub protocol: Protocol,
    /// Clean Session (3.1.1) / Clean Start (5.0).
    pub clean_start: bool,
    /// Seconds; 0 turns keep-alive off.
    pub keep_alive: u16,
    /// May be empty; whether that is acceptable is the server's decision (CONNACK 0x02 / 0x85).
    pub client_id: Utf8Str,
    pub will: Option<Will>,
    pub username: Option<Utf8Str>,
    /// Binary data: MQTT passwords need not be UTF-8.
    pub password: Option<Bytes>,
    pub properties: Properties,
}

/// The will message of a CONNECT (§3.1.2.5, §3.1.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (MQTT 5), e.g. the will delay interval.
    pub properties: Properties,
}

/// CONNACK (§3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// The 3.1.1 return code (0–5) or the 5.0 reason code.
    pub code: u8,
    pub properties: Properties,
}

/// PUBLISH (§3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QosPid,
    pub retain: bool,
    /// Empty only in MQTT 5 with a Topic Alias property.
    pub topic: TopicName,
    pub payload: Bytes,
    pub properties: Properties,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4–§3.7): a packet identifier and, in 5.0, a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubResponse {
    pub packet_id: NonZeroU16,
    /// Always 0 in 3.1.1.
    pub reason: u8,
    pub properties: Properties,
}

/// Retain Handling of a subscription (MQTT 5 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainHandling {
    /// 0: send retained messages at subscribe time.
    OnSubscribe = 0,
    /// 1: only if the subscription did not exist yet.
    OnNewSubscribe = 1,
    /// 2: never.
    Never = 2,
}

/// The subscription options byte; in 3.1.1 only `qos` is on the wire, the rest stay default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubscriptionOptions {
    /// Options with only a maximum QoS, as 3.1.1 knows them.
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::OnSubscribe,
        }
    }
}

/// One topic filter of a SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: TopicFilter,
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE (§3.8): at least one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: NonZeroU16,
    pub subscriptions: Vec<Subscription>,
    pub properties: Properties,
}

/// SUBACK (§3.9): one return/reason code per subscription, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: NonZeroU16,
    pub codes: Vec<u8>,
    pub properties: Properties,
}

/// UNSUBSCRIBE (§3.10): at least one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: NonZeroU16,
    pub filters: Vec<TopicFilter>,
    pub properties: Properties,
}

/// UNSUBACK (§3.11): in 5.0 one reason code per filter; in 3.1.1 none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: NonZeroU16,
    pub codes: Vec<u8>,
    pub properties: Properties,
}

/// DISCONNECT (§3.14); reason and properties are MQTT 5 only (0 and empty in 3.1.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub reason: u8,
    pub properties: Properties,
}

/// AUTH (MQTT 5 §3.15).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// 0x00 success, 0x18 continue authentication, 0x19 re-authenticate.
    pub reason: u8,
    pub properties: Properties,
}

/// Any control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Boxed: with two property blocks it is twice the size of the other variants.
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubRel(PubResponse),
    PubComp(PubResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

/// Splits the next packet off `buf` and parses it for a connection speaking `protocol`.
/// `Ok(None)`: more bytes are needed (the buffer is left as is, with capacity reserved for the
/// frame once its size is known and accepted). A packet over `max_packet_size` bytes is refused
/// from its fixed header. A CONNECT is always read with the version it announces.
pub fn decode(
    buf: &mut BytesMut,
    protocol: Protocol,
    max_packet_size: usize,
) -> Result<Option<Packet>, CodecError> {
    let Some((header, body)) = split_frame(buf, max_packet_size)? else {
        return Ok(None);
    };
    packets::decode_body(header, body, protocol).map(Some)
}

/// Decodes the first packet of a connection, which must be a CONNECT; its `protocol` is then
/// the version for [`decode`].
pub fn decode_connect(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Connect>, CodecError> {
    if let Some(&first) = buf.first()
        && first >> 4 != PacketType::Connect as u8
    {
        return Err(CodecError::Protocol {
            packet: "connect",
            reason: "the first packet of a connection must be connect",
        });
    }
    let Some((header, body)) = split_frame(buf, max_packet_size)? else {
        return Ok(None);
    };
    packets::decode_connect_body(header, body).map(Some)
}

fn split_frame(
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<(FixedHeader, Bytes)>, CodecError> {
    let Some(header) = check(buf, max_packet_size)? else {
        return Ok(None);
    };
    if buf.len() < header.frame_len() {
        buf.reserve(header.frame_len() - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(header.frame_len()).freeze();
    let body = frame.split_off(header.header_len);
    Ok(Some((header, body)))
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Self::Connect(_) => PacketType::Connect,
            Self::ConnAck(_) => PacketType::ConnAck,
            Self::Publish(_) => PacketType::Publish,
            Self::PubAck(_) => PacketType::PubAck,
            Self::PubRec(_) => PacketType::PubRec,
            Self::PubRel(_) => PacketType::PubRel,
            Self::PubComp(_) => PacketType::PubComp,
            Self::Subscribe(_) => PacketType::Subscribe,
            Self::SubAck(_) => PacketType::SubAck,
            Self::Unsubscribe(_) => PacketType::Unsubscribe,
            Self::UnsubAck(_) => PacketType::UnsubAck,
            Self::PingReq => PacketType::PingReq,
            Self::PingResp => PacketType::PingResp,
            Self::Disconnect(_) => PacketType::Disconnect,
            Self::Auth(_) => PacketType::Auth,
        }
    }

    /// Appends the packet, encoded for `protocol`, to `buf` and returns its size in bytes. A
    /// CONNECT uses its own `protocol` field. Fields MQTT 3.1.1 lacks (reasons, properties) are
    /// not written for it. Fails only for values the wire cannot carry (binary data over
    /// 65,535 bytes, packets over 268,435,455 bytes, AUTH in 3.1.1); nothing is written then.
    pub fn encode(&self, protocol: Protocol, buf: &mut BytesMut) -> Result<usize, CodecError> {
        packets::encode(self, protocol, buf)
    }
}
