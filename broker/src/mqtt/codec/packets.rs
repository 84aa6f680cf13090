//! Packet bodies (§3 of both specifications): decoding and encoding, one function pair per
//! packet, the version passed in.

use std::num::NonZeroU16;

use bytes::{Bytes, BytesMut};

use super::error::CodecError;
use super::fixed::{FixedHeader, PacketType, varint_len};
use super::properties::{Properties, PropertyContext as Ctx};
use super::wire::{Counter, Reader, Sink, check_remaining};
use super::{
    Auth, ConnAck, Connect, Disconnect, Packet, Protocol, PubResponse, Publish, QoS, QosPid,
    RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe,
    Will,
};

/// MQTT 5 reason codes each packet may carry (the tables of §3.2.2.2, §3.4.2.1, …).
const CONNACK_V4: &[u8] = &[0, 1, 2, 3, 4, 5];
const CONNACK_V5: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_V5: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_V5: &[u8] = &[0x00, 0x92];
const SUBACK_V4: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const SUBACK_V5: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_V5: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_V5: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_V5: &[u8] = &[0x00, 0x18, 0x19];

fn reason(code: u8, valid: &[u8], packet: &'static str) -> Result<u8, CodecError> {
    if valid.contains(&code) {
        Ok(code)
    } else {
        Err(CodecError::InvalidReasonCode { packet, code })
    }
}

fn packet_id(r: &mut Reader) -> Result<NonZeroU16, CodecError> {
    let packet = r.packet;
    NonZeroU16::new(r.u16("packet identifier")?).ok_or(CodecError::ZeroPacketId { packet })
}

pub(crate) fn decode_connect_body(header: FixedHeader, body: Bytes) -> Result<Connect, CodecError> {
    let packet = header.packet_type.name();
    let mut r = Reader::new(body, packet);
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    let protocol = match (name.as_ref(), level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        _ => {
            return Err(CodecError::UnsupportedProtocol {
                name: String::from_utf8_lossy(&name).into_owned(),
                level,
            });
        }
    };
    let v5 = protocol == Protocol::V5;
    let flags = r.u8("connect flags")?;
    if flags & 0b0000_0001 != 0 {
        return Err(CodecError::Malformed {
            packet,
            reason: "reserved connect flag must be 0",
        });
    }
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = QoS::from_bits((flags >> 3) & 0b11, packet)?;
    let will_retain = flags & 0b0010_0000 != 0;
    let password_flag = flags & 0b0100_0000 != 0;
    let username_flag = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(CodecError::Malformed {
            packet,
            reason: "will qos and will retain must be 0 when the will flag is 0",
        });
    }
    if !v5 && password_flag && !username_flag {
        return Err(CodecError::Protocol {
            packet,
            reason: "password flag set without the user name flag",
        });
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if v5 {
        let p = Properties::read(&mut r, Ctx::Connect)?;
        if p.authentication_data.is_some() && p.authentication_method.is_none() {
            return Err(CodecError::Protocol {
                packet,
                reason: "authentication data without an authentication method",
            });
        }
        p
    } else {
        Properties::default()
    };
    let client_id = r.utf8("client identifier")?;
    let will = if will_flag {
        let properties = if v5 {
            Properties::read(&mut r, Ctx::Will)?
        } else {
            Properties::default()
        };
        let topic = r.topic_name("will topic")?;
        if topic.is_empty() {
            return Err(CodecError::Malformed {
                packet,
                reason: "will topic must not be empty",
            });
        }
        let payload = r.binary("will payload")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.utf8("user name")?)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary("password")?)
    } else {
        None
    };
    r.finish()?;
    Ok(Connect {
        protocol,
        clean_start: flags & 0b0000_0010 != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

pub(crate) fn decode_body(
    header: FixedHeader,
    body: Bytes,
    protocol: Protocol,
) -> Result<Packet, CodecError> {
    let ty = header.packet_type;
    let packet = ty.name();
    let v5 = protocol == Protocol::V5;
    let mut r = Reader::new(body, packet);
    let props = |r: &mut Reader, ctx| {
        if v5 {
            Properties::read(r, ctx)
        } else {
            Ok(Properties::default())
        }
    };
    let decoded = match ty {
        PacketType::Connect => {
            return decode_connect_body(header, r.rest()).map(|c| Packet::Connect(Box::new(c)));
        }
        PacketType::ConnAck => {
            let flags = r.u8("connect acknowledge flags")?;
            if flags & 0b1111_1110 != 0 {
                return Err(CodecError::Malformed {
                    packet,
                    reason: "reserved connect acknowledge flags must be 0",
                });
            }
            let code = r.u8("reason code")?;
            let code = reason(code, if v5 { CONNACK_V5 } else { CONNACK_V4 }, packet)?;
            Packet::ConnAck(ConnAck {
                session_present: flags & 1 != 0,
                code,
                properties: props(&mut r, Ctx::ConnAck)?,
            })
        }
        PacketType::Publish => Packet::Publish(decode_publish(header.flags, &mut r, v5)?),
        PacketType::PubAck | PacketType::PubRec | PacketType::PubRel | PacketType::PubComp => {
            let packet_id = packet_id(&mut r)?;
            let valid = if matches!(ty, PacketType::PubAck | PacketType::PubRec) {
                PUBACK_V5
            } else {
                PUBREL_V5
            };
            let (code, properties) = if v5 && r.remaining() > 0 {
                let code = reason(r.u8("reason code")?, valid, packet)?;
                let properties = if r.remaining() > 0 {
                    Properties::read(&mut r, Ctx::PubResponse)?
                } else {
                    Properties::default()
                };
                (code, properties)
            } else {
                (0, Properties::default())
            };
            let p = PubResponse {
                packet_id,
                reason: code,
                properties,
            };
            match ty {
                PacketType::PubAck => Packet::PubAck(p),
                PacketType::PubRec => Packet::PubRec(p),
                PacketType::PubRel => Packet::PubRel(p),
                _ => Packet::PubComp(p),
            }
        }
        PacketType::Subscribe => {
            let packet_id = packet_id(&mut r)?;
            let properties = props(&mut r, Ctx::Subscribe)?;
            let mut subscriptions = Vec::new();
            while r.remaining() > 0 {
                let filter = r.topic_filter()?;
                let options = decode_options(r.u8("subscription options")?, v5, packet)?;
                if options.no_local && filter.is_shared() {
                    return Err(CodecError::Protocol {
                        packet,
                        reason: "no local must not be set on a shared subscription",
                    });
                }
                subscriptions.push(Subscription { filter, options });
            }
            if subscriptions.is_empty() {
                return Err(CodecError::Protocol {
                    packet,
                    reason: "at least one topic filter is required",
                });
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions,
                properties,
            })
        }
        PacketType::SubAck => {
            let packet_id = packet_id(&mut r)?;
            let properties = props(&mut r, Ctx::SubAck)?;
            let valid = if v5 { SUBACK_V5 } else { SUBACK_V4 };
            let codes = r
                .rest()
                .iter()
                .map(|&c| reason(c, valid, packet))
                .collect::<Result<Vec<_>, _>>()?;
            if codes.is_empty() {
                return Err(CodecError::Protocol {
                    packet,
                    reason: "at least one return code is required",
                });
            }
            Packet::SubAck(SubAck {
                packet_id,
                codes,
                properties,
            })
        }
        PacketType::Unsubscribe => {
            let packet_id = packet_id(&mut r)?;
            let properties = props(&mut r, Ctx::Unsubscribe)?;
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                filters.push(r.topic_filter()?);
            }
            if filters.is_empty() {
                return Err(CodecError::Protocol {
                    packet,
                    reason: "at least one topic filter is required",
                });
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        }
        PacketType::UnsubAck => {
            let packet_id = packet_id(&mut r)?;
            let properties = props(&mut r, Ctx::UnsubAck)?;
            let codes = if v5 {
                r.rest()
                    .iter()
                    .map(|&c| reason(c, UNSUBACK_V5, packet))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                codes,
                properties,
            })
        }
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => {
            let (reason, properties) =
                reason_and_properties(&mut r, v5, DISCONNECT_V5, Ctx::Disconnect)?;
            Packet::Disconnect(Disconnect { reason, properties })
        }
        PacketType::Auth => {
            if !v5 {
                return Err(CodecError::UnknownPacketType(15));
            }
            let (reason, properties) = reason_and_properties(&mut r, v5, AUTH_V5, Ctx::Auth)?;
            Packet::Auth(Auth { reason, properties })
        }
    };
    r.finish()?;
    Ok(decoded)
}

/// DISCONNECT and AUTH: both may stop after the reason code, or omit everything (§3.14.2.1).
fn reason_and_properties(
    r: &mut Reader,
    v5: bool,
    valid: &[u8],
    ctx: Ctx,
) -> Result<(u8, Properties), CodecError> {
    if !v5 || r.remaining() == 0 {
        return Ok((0, Properties::default()));
    }
    let code = reason(r.u8("reason code")?, valid, r.packet)?;
    let properties = if r.remaining() > 0 {
        Properties::read(r, ctx)?
    } else {
        Properties::default()
    };
    Ok((code, properties))
}

fn decode_publish(flags: u8, r: &mut Reader, v5: bool) -> Result<Publish, CodecError> {
    let packet = r.packet;
    let qos = QoS::from_bits((flags >> 1) & 0b11, packet)?;
    let dup = flags & 0b1000 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(CodecError::Protocol {
            packet,
            reason: "dup must be 0 for a qos 0 message",
        });
    }
    let topic = r.topic_name("topic name")?;
    let qos = match qos {
        QoS::AtMostOnce => QosPid::AtMostOnce,
        QoS::AtLeastOnce => QosPid::AtLeastOnce(packet_id(r)?),
        QoS::ExactlyOnce => QosPid::ExactlyOnce(packet_id(r)?),
    };
    let properties = if v5 {
        Properties::read(r, Ctx::Publish)?
    } else {
        Properties::default()
    };
    if topic.is_empty() && properties.topic_alias.is_none() {
        return Err(CodecError::Protocol {
            packet,
            reason: "topic name must not be empty without a topic alias",
        });
    }
    Ok(Publish {
        dup,
        qos,
        retain: flags & 1 != 0,
        topic,
        payload: r.rest(),
        properties,
    })
}

fn decode_options(
    byte: u8,
    v5: bool,
    packet: &'static str,
) -> Result<SubscriptionOptions, CodecError> {
    let qos = QoS::from_bits(byte & 0b11, packet)?;
    if !v5 {
        if byte & 0b1111_1100 != 0 {
            return Err(CodecError::Malformed {
                packet,
                reason: "reserved bits of the requested qos byte must be 0",
            });
        }
        return Ok(SubscriptionOptions::qos(qos));
    }
    if byte & 0b1100_0000 != 0 {
        return Err(CodecError::Malformed {
            packet,
            reason: "reserved bits of the subscription options must be 0",
        });
    }
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => RetainHandling::OnSubscribe,
        1 => RetainHandling::OnNewSubscribe,
        2 => RetainHandling::Never,
        _ => {
            return Err(CodecError::Protocol {
                packet,
                reason: "retain handling must not be 3",
            });
        }
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0b0100 != 0,
        retain_as_published: byte & 0b1000 != 0,
        retain_handling,
    })
}

fn encode_options(o: &SubscriptionOptions, v5: bool) -> u8 {
    let qos = o.qos as u8;
    if !v5 {
        return qos;
    }
    qos | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling as u8) << 4)
}

pub(crate) fn encode(
    p: &Packet,
    protocol: Protocol,
    buf: &mut BytesMut,
) -> Result<usize, CodecError> {
    let ty = p.packet_type();
    let packet = ty.name();
    let protocol = match p {
        Packet::Connect(c) => c.protocol,
        Packet::Auth(_) if protocol == Protocol::V311 => {
            return Err(CodecError::Protocol {
                packet,
                reason: "auth exists only in mqtt 5",
            });
        }
        _ => protocol,
    };
    let mut counter = Counter::default();
    write_body(p, protocol, &mut counter)?;
    let len = counter.0;
    check_remaining(len, packet, "remaining length")?;
    let header_len = 1 + varint_len(len).unwrap_or(4);
    buf.reserve(header_len + len);
    let flags = match p {
        Packet::Publish(p) => {
            (u8::from(p.dup) << 3) | ((p.qos.qos() as u8) << 1) | u8::from(p.retain)
        }
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    Sink::put_u8(buf, ((ty as u8) << 4) | flags);
    buf.put_varint(len);
    write_body(p, protocol, buf)?;
    Ok(header_len + len)
}

fn write_body<S: Sink>(p: &Packet, protocol: Protocol, s: &mut S) -> Result<(), CodecError> {
    let v5 = protocol == Protocol::V5;
    let packet = p.packet_type().name();
    match p {
        Packet::Connect(c) => {
            s.put_binary(b"MQTT", packet, "protocol name")?;
            s.put_u8(protocol.level());
            let mut flags = u8::from(c.clean_start) << 1;
            if let Some(w) = &c.will {
                flags |= 0b100 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
            }
            flags |= u8::from(c.password.is_some()) << 6;
            flags |= u8::from(c.username.is_some()) << 7;
            s.put_u8(flags);
            s.put_u16(c.keep_alive);
            if v5 {
                c.properties.write(s, packet)?;
            }
            s.put_utf8(&c.client_id);
            if let Some(w) = &c.will {
                if v5 {
                    w.properties.write(s, packet)?;
                }
                s.put_utf8(w.topic.as_utf8());
                s.put_binary(&w.payload, packet, "will payload")?;
            }
            if let Some(u) = &c.username {
                s.put_utf8(u);
            }
            if let Some(pw) = &c.password {
                s.put_binary(pw, packet, "password")?;
            }
        }
        Packet::ConnAck(c) => {
            s.put_u8(u8::from(c.session_present));
            s.put_u8(c.code);
            if v5 {
                c.properties.write(s, packet)?;
            }
        }
        Packet::Publish(p) => {
            s.put_utf8(p.topic.as_utf8());
            if let Some(id) = p.qos.packet_id() {
                s.put_u16(id.get());
            }
            if v5 {
                p.properties.write(s, packet)?;
            }
            s.put_slice(&p.payload);
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            s.put_u16(r.packet_id.get());
            if v5 && (r.reason != 0 || !r.properties.is_empty()) {
                s.put_u8(r.reason);
                if !r.properties.is_empty() {
                    r.properties.write(s, packet)?;
                }
            }
        }
        Packet::Subscribe(sub) => {
            s.put_u16(sub.packet_id.get());
            if v5 {
                sub.properties.write(s, packet)?;
            }
            for one in &sub.subscriptions {
                s.put_utf8(one.filter.as_utf8());
                s.put_u8(encode_options(&one.options, v5));
            }
        }
        Packet::SubAck(a) => {
            s.put_u16(a.packet_id.get());
            if v5 {
                a.properties.write(s, packet)?;
            }
            s.put_slice(&a.codes);
        }
        Packet::Unsubscribe(u) => {
            s.put_u16(u.packet_id.get());
            if v5 {
                u.properties.write(s, packet)?;
            }
            for f in &u.filters {
                s.put_utf8(f.as_utf8());
            }
        }
        Packet::UnsubAck(a) => {
            s.put_u16(a.packet_id.get());
            if v5 {
                a.properties.write(s, packet)?;
                s.put_slice(&a.codes);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(Disconnect { reason, properties })
        | Packet::Auth(Auth { reason, properties }) => {
            if v5 && (*reason != 0 || !properties.is_empty()) {
                s.put_u8(*reason);
                if !properties.is_empty() {
                    properties.write(s, packet)?;
                }
            }
        }
    }
    Ok(())
}
