//! MQTT 5 properties (§2.2.2): every identifier of table 2-4 with its type, the packets it may
//! appear in, and the values the specification allows.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::Bytes;

use super::QoS;
use super::error::CodecError;
use super::wire::{Counter, Reader, Sink, TopicName, Utf8Str, check_remaining};

/// Which packet (or the will in a CONNECT) a property block belongs to: it decides which
/// identifiers are allowed (§2.2.2.2, table 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    /// PUBACK, PUBREC, PUBREL and PUBCOMP.
    PubResponse,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

/// The properties of one packet. Absent properties are `None` or empty; in MQTT 3.1.1 every
/// packet has `Properties::default()`. Values whose zero the specification forbids are
/// `NonZero*`, yes/no bytes are `bool`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    /// 0x01; `true` means the payload is UTF-8.
    pub payload_format_utf8: Option<bool>,
    /// 0x02, seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03.
    pub content_type: Option<Utf8Str>,
    /// 0x08; a topic name, so wildcards are refused.
    pub response_topic: Option<TopicName>,
    /// 0x09.
    pub correlation_data: Option<Bytes>,
    /// 0x0B; one in SUBSCRIBE, possibly several in a PUBLISH from the server (§3.3.2.3.8).
    pub subscription_identifiers: Vec<NonZeroU32>,
    /// 0x11, seconds.
    pub session_expiry_interval: Option<u32>,
    /// 0x12.
    pub assigned_client_identifier: Option<Utf8Str>,
    /// 0x13, seconds.
    pub server_keep_alive: Option<u16>,
    /// 0x15.
    pub authentication_method: Option<Utf8Str>,
    /// 0x16.
    pub authentication_data: Option<Bytes>,
    /// 0x17.
    pub request_problem_information: Option<bool>,
    /// 0x18, seconds.
    pub will_delay_interval: Option<u32>,
    /// 0x19.
    pub request_response_information: Option<bool>,
    /// 0x1A.
    pub response_information: Option<Utf8Str>,
    /// 0x1C.
    pub server_reference: Option<Utf8Str>,
    /// 0x1F.
    pub reason_string: Option<Utf8Str>,
    /// 0x21.
    pub receive_maximum: Option<NonZeroU16>,
    /// 0x22.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23.
    pub topic_alias: Option<NonZeroU16>,
    /// 0x24; only 0 or 1 (§3.2.2.3.4).
    pub maximum_qos: Option<QoS>,
    /// 0x25.
    pub retain_available: Option<bool>,
    /// 0x26, repeatable, order kept.
    pub user_properties: Vec<(Utf8Str, Utf8Str)>,
    /// 0x27.
    pub maximum_packet_size: Option<NonZeroU32>,
    /// 0x28.
    pub wildcard_subscription_available: Option<bool>,
    /// 0x29.
    pub subscription_identifiers_available: Option<bool>,
    /// 0x2A.
    pub shared_subscription_available: Option<bool>,
}

fn property_name(id: u8) -> Option<&'static str> {
    Some(match id {
        0x01 => "payload format indicator",
        0x02 => "message expiry interval",
        0x03 => "content type",
        0x08 => "response topic",
        0x09 => "correlation data",
        0x0B => "subscription identifier",
        0x11 => "session expiry interval",
        0x12 => "assigned client identifier",
        0x13 => "server keep alive",
        0x15 => "authentication method",
        0x16 => "authentication data",
        0x17 => "request problem information",
        0x18 => "will delay interval",
        0x19 => "request response information",
        0x1A => "response information",
        0x1C => "server reference",
        0x1F => "reason string",
        0x21 => "receive maximum",
        0x22 => "topic alias maximum",
        0x23 => "topic alias",
        0x24 => "maximum qos",
        0x25 => "retain available",
        0x26 => "user property",
        0x27 => "maximum packet size",
        0x28 => "wildcard subscription available",
        0x29 => "subscription identifier available",
        0x2A => "shared subscription available",
        _ => return None,
    })
}

/// Table 2-4: may property `id` appear in `ctx`?
fn allowed(id: u8, ctx: PropertyContext) -> bool {
    use PropertyContext as C;
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(ctx, C::Publish | C::Will),
        0x0B => matches!(ctx, C::Publish | C::Subscribe),
        0x11 => matches!(ctx, C::Connect | C::ConnAck | C::Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => ctx == C::ConnAck,
        0x15 | 0x16 => matches!(ctx, C::Connect | C::ConnAck | C::Auth),
        0x17 | 0x19 => ctx == C::Connect,
        0x18 => ctx == C::Will,
        0x1C => matches!(ctx, C::ConnAck | C::Disconnect),
        0x1F => matches!(
            ctx,
            C::ConnAck | C::PubResponse | C::SubAck | C::UnsubAck | C::Disconnect | C::Auth
        ),
        0x21 | 0x22 | 0x27 => matches!(ctx, C::Connect | C::ConnAck),
        0x23 => ctx == C::Publish,
        0x26 => true,
        _ => false,
    }
}

/// Sets `slot` once; a second occurrence is a Protocol Error (§2.2.2.2).
fn set_once<T>(
    slot: &mut Option<T>,
    value: T,
    packet: &'static str,
    property: &'static str,
) -> Result<(), CodecError> {
    if slot.is_some() {
        return Err(CodecError::DuplicateProperty { packet, property });
    }
    *slot = Some(value);
    Ok(())
}

impl Properties {
    /// True when no property is set; the v5 short forms of PUBACK & co. need it.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Reads the property length and the properties from `r`.
    pub(crate) fn read(r: &mut Reader, ctx: PropertyContext) -> Result<Self, CodecError> {
        let packet = r.packet;
        let len = usize::try_from(r.varint("property length")?).unwrap_or(usize::MAX);
        let block = r.take(len, "properties")?;
        let mut r = Reader::new(block, packet);
        let mut p = Self::default();
        while r.remaining() > 0 {
            let id = u8::try_from(r.varint("property identifier")?).map_err(|_| {
                CodecError::Malformed {
                    packet,
                    reason: "property identifier is larger than one byte",
                }
            })?;
            let Some(name) = property_name(id) else {
                return Err(CodecError::UnknownProperty { packet, id });
            };
            if !allowed(id, ctx) {
                return Err(CodecError::PropertyNotAllowed {
                    packet,
                    property: name,
                });
            }
            let invalid = |value: u32| CodecError::InvalidPropertyValue {
                packet,
                property: name,
                value,
            };
            let flag = |r: &mut Reader| -> Result<bool, CodecError> {
                match r.u8(name)? {
                    0 => Ok(false),
                    1 => Ok(true),
                    v => Err(invalid(u32::from(v))),
                }
            };
            match id {
                0x01 => set_once(&mut p.payload_format_utf8, flag(&mut r)?, packet, name)?,
                0x02 => set_once(&mut p.message_expiry_interval, r.u32(name)?, packet, name)?,
                0x03 => set_once(&mut p.content_type, r.utf8(name)?, packet, name)?,
                0x08 => set_once(&mut p.response_topic, r.topic_name(name)?, packet, name)?,
                0x09 => set_once(&mut p.correlation_data, r.binary(name)?, packet, name)?,
                0x0B => {
                    let v = r.varint(name)?;
                    let v = NonZeroU32::new(v).ok_or_else(|| invalid(0))?;
                    if ctx != PropertyContext::Publish && !p.subscription_identifiers.is_empty() {
                        return Err(CodecError::DuplicateProperty {
                            packet,
                            property: name,
                        });
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => set_once(&mut p.session_expiry_interval, r.u32(name)?, packet, name)?,
                0x12 => set_once(
                    &mut p.assigned_client_identifier,
                    r.utf8(name)?,
                    packet,
                    name,
                )?,
                0x13 => set_once(&mut p.server_keep_alive, r.u16(name)?, packet, name)?,
                0x15 => set_once(&mut p.authentication_method, r.utf8(name)?, packet, name)?,
                0x16 => set_once(&mut p.authentication_data, r.binary(name)?, packet, name)?,
                0x17 => set_once(
                    &mut p.request_problem_information,
                    flag(&mut r)?,
                    packet,
                    name,
                )?,
                0x18 => set_once(&mut p.will_delay_interval, r.u32(name)?, packet, name)?,
                0x19 => set_once(
                    &mut p.request_response_information,
                    flag(&mut r)?,
                    packet,
                    name,
                )?,
                0x1A => set_once(&mut p.response_information, r.utf8(name)?, packet, name)?,
                0x1C => set_once(&mut p.server_reference, r.utf8(name)?, packet, name)?,
                0x1F => set_once(&mut p.reason_string, r.utf8(name)?, packet, name)?,
                0x21 => {
                    let v = NonZeroU16::new(r.u16(name)?).ok_or_else(|| invalid(0))?;
                    set_once(&mut p.receive_maximum, v, packet, name)?;
                }
                0x22 => set_once(&mut p.topic_alias_maximum, r.u16(name)?, packet, name)?,
                0x23 => {
                    let v = NonZeroU16::new(r.u16(name)?).ok_or_else(|| invalid(0))?;
                    set_once(&mut p.topic_alias, v, packet, name)?;
                }
                0x24 => {
                    let qos = match r.u8(name)? {
                        0 => QoS::AtMostOnce,
                        1 => QoS::AtLeastOnce,
                        v => return Err(invalid(u32::from(v))),
                    };
                    set_once(&mut p.maximum_qos, qos, packet, name)?;
                }
                0x25 => set_once(&mut p.retain_available, flag(&mut r)?, packet, name)?,
                0x26 => {
                    let key = r.utf8("user property name")?;
                    let value = r.utf8("user property value")?;
                    p.user_properties.push((key, value));
                }
                0x27 => {
                    let v = NonZeroU32::new(r.u32(name)?).ok_or_else(|| invalid(0))?;
                    set_once(&mut p.maximum_packet_size, v, packet, name)?;
                }
                0x28 => set_once(
                    &mut p.wildcard_subscription_available,
                    flag(&mut r)?,
                    packet,
                    name,
                )?,
                0x29 => set_once(
                    &mut p.subscription_identifiers_available,
                    flag(&mut r)?,
                    packet,
                    name,
                )?,
                0x2A => set_once(
                    &mut p.shared_subscription_available,
                    flag(&mut r)?,
                    packet,
                    name,
                )?,
                _ => return Err(CodecError::UnknownProperty { packet, id }),
            }
        }
        Ok(p)
    }

    /// Writes the property length and the properties.
    pub(crate) fn write<S: Sink>(&self, s: &mut S, packet: &'static str) -> Result<(), CodecError> {
        let mut counter = Counter::default();
        self.write_items(&mut counter, packet)?;
        check_remaining(counter.0, packet, "properties")?;
        s.put_varint(counter.0);
        self.write_items(s, packet)
    }

    fn write_items<S: Sink>(&self, s: &mut S, packet: &'static str) -> Result<(), CodecError> {
        fn byte<S: Sink>(s: &mut S, id: u8, v: Option<u8>) {
            if let Some(v) = v {
                s.put_u8(id);
                s.put_u8(v);
            }
        }
        fn two<S: Sink>(s: &mut S, id: u8, v: Option<u16>) {
            if let Some(v) = v {
                s.put_u8(id);
                s.put_u16(v);
            }
        }
        fn four<S: Sink>(s: &mut S, id: u8, v: Option<u32>) {
            if let Some(v) = v {
                s.put_u8(id);
                s.put_u32(v);
            }
        }
        fn string<S: Sink>(s: &mut S, id: u8, v: Option<&Utf8Str>) {
            if let Some(v) = v {
                s.put_u8(id);
                s.put_utf8(v);
            }
        }
        let binary = |s: &mut S, id: u8, v: Option<&Bytes>, field| -> Result<(), CodecError> {
            if let Some(v) = v {
                s.put_u8(id);
                s.put_binary(v, packet, field)?;
            }
            Ok(())
        };
        byte(s, 0x01, self.payload_format_utf8.map(u8::from));
        four(s, 0x02, self.message_expiry_interval);
        string(s, 0x03, self.content_type.as_ref());
        if let Some(t) = &self.response_topic {
            s.put_u8(0x08);
            s.put_utf8(t.as_utf8());
        }
        binary(s, 0x09, self.correlation_data.as_ref(), "correlation data")?;
        for id in &self.subscription_identifiers {
            let v = usize::try_from(id.get()).unwrap_or(usize::MAX);
            check_remaining(v, packet, "subscription identifier")?;
            s.put_u8(0x0B);
            s.put_varint(v);
        }
        four(s, 0x11, self.session_expiry_interval);
        string(s, 0x12, self.assigned_client_identifier.as_ref());
        two(s, 0x13, self.server_keep_alive);
        string(s, 0x15, self.authentication_method.as_ref());
        binary(
            s,
            0x16,
            self.authentication_data.as_ref(),
            "authentication data",
        )?;
        byte(s, 0x17, self.request_problem_information.map(u8::from));
        four(s, 0x18, self.will_delay_interval);
        byte(s, 0x19, self.request_response_information.map(u8::from));
        string(s, 0x1A, self.response_information.as_ref());
        string(s, 0x1C, self.server_reference.as_ref());
        string(s, 0x1F, self.reason_string.as_ref());
        two(s, 0x21, self.receive_maximum.map(NonZeroU16::get));
        two(s, 0x22, self.topic_alias_maximum);
        two(s, 0x23, self.topic_alias.map(NonZeroU16::get));
        byte(s, 0x24, self.maximum_qos.map(|q| q as u8));
        byte(s, 0x25, self.retain_available.map(u8::from));
        for (k, v) in &self.user_properties {
            s.put_u8(0x26);
            s.put_utf8(k);
            s.put_utf8(v);
        }
        four(s, 0x27, self.maximum_packet_size.map(NonZeroU32::get));
        byte(s, 0x28, self.wildcard_subscription_available.map(u8::from));
        byte(
            s,
            0x29,
            self.subscription_identifiers_available.map(u8::from),
        );
        byte(s, 0x2A, self.shared_subscription_available.map(u8::from));
        Ok(())
    }
}
