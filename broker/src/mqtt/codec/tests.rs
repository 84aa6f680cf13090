//! Golden bytes written by hand from the byte layouts of the OASIS MQTT 3.1.1 and 5.0
//! specifications, error cases, and property tests (round trips, truncation, random bytes).

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};

use super::wire::Sink;
use super::*;

const MAX: usize = MAX_REMAINING_LENGTH + 5;

fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).unwrap()
}

fn s(v: &str) -> Utf8Str {
    v.parse().unwrap()
}

fn topic(v: &str) -> TopicName {
    v.parse().unwrap()
}

fn filter(v: &str) -> TopicFilter {
    v.parse().unwrap()
}

fn decode_all(bytes: &[u8], protocol: Protocol) -> Result<Packet, CodecError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, protocol, MAX)?.expect("a whole packet");
    assert!(buf.is_empty(), "decode left {} bytes", buf.len());
    Ok(packet)
}

fn encode_vec(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let n = packet.encode(protocol, &mut buf).unwrap();
    assert_eq!(n, buf.len());
    buf.to_vec()
}

/// Decodes `bytes` to `packet` and encodes `packet` back to `bytes`.
fn golden(bytes: &[u8], protocol: Protocol, packet: Packet) {
    assert_eq!(decode_all(bytes, protocol).unwrap(), packet);
    assert_eq!(encode_vec(&packet, protocol), bytes);
}

fn decode_err(bytes: &[u8], protocol: Protocol) -> CodecError {
    decode_all(bytes, protocol).unwrap_err()
}

fn response(id: u16, reason: u8) -> PubResponse {
    PubResponse {
        packet_id: pid(id),
        reason,
        properties: Properties::default(),
    }
}

use Protocol::{V5, V311};

// ---------------------------------------------------------------- fixed header

#[test]
fn remaining_length_examples_of_section_2_2_3_are_read_and_written() {
    let cases: &[(usize, &[u8])] = &[
        (0, &[0x00]),
        (127, &[0x7F]),
        (128, &[0x80, 0x01]),
        (16_383, &[0xFF, 0x7F]),
        (16_384, &[0x80, 0x80, 0x01]),
        (2_097_151, &[0xFF, 0xFF, 0x7F]),
        (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
        (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
    ];
    for &(value, encoded) in cases {
        let mut header = vec![0x30];
        header.extend_from_slice(encoded);
        let h = check(&header, MAX).unwrap().unwrap();
        assert_eq!(h.remaining_len, value);
        assert_eq!(h.header_len, 1 + encoded.len());
        assert_eq!(h.packet_type, PacketType::Publish);
        let mut out = BytesMut::new();
        out.put_varint(value);
        assert_eq!(&out[..], encoded, "{value}");
    }
}

#[test]
fn remaining_length_with_a_fifth_byte_is_malformed() {
    let err = check(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], MAX).unwrap_err();
    assert_eq!(err.to_string(), "remaining length has more than 4 bytes");
    assert!(err.is_malformed());
    assert_eq!(err.reason_code(), 0x81);
}

#[test]
fn remaining_length_that_is_not_minimal_is_malformed() {
    assert_eq!(
        check(&[0x30, 0x80, 0x00], MAX).unwrap_err(),
        CodecError::RemainingLengthNotMinimal
    );
}

#[test]
fn oversize_packet_is_refused_from_the_fixed_header_alone() {
    let err = check(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], 1 << 20).unwrap_err();
    assert_eq!(
        err,
        CodecError::PacketTooLarge {
            size: 268_435_460,
            max: 1 << 20
        }
    );
    assert_eq!(err.reason_code(), 0x95);
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    assert!(matches!(
        decode(&mut buf, V5, 1 << 20),
        Err(CodecError::PacketTooLarge { .. })
    ));
    assert!(
        buf.capacity() < 1024,
        "nothing was buffered for the oversize packet"
    );
}

#[test]
fn oversize_packet_is_refused_before_its_remaining_length_is_complete() {
    // 0xFF 0xFF promise at least 127 + 127·128 + 16,384 bytes.
    assert!(matches!(
        check(&[0x30, 0xFF, 0xFF], 1024),
        Err(CodecError::PacketTooLarge { .. })
    ));
    assert_eq!(check(&[0x30, 0xFF, 0xFF], MAX), Ok(None));
}

#[test]
fn packet_exactly_at_the_maximum_size_is_accepted() {
    assert!(check(&[0xC0, 0x00], 2).unwrap().is_some());
    assert!(check(&[0xC0, 0x00], 1).is_err());
}

#[test]
fn packet_types_0_is_refused() {
    assert_eq!(
        check(&[0x00, 0x00], MAX).unwrap_err(),
        CodecError::UnknownPacketType(0)
    );
}

#[test]
fn subscribe_with_reserved_flags_0000_is_refused_with_a_precise_message() {
    let err = check(&[0x80, 0x00], MAX).unwrap_err();
    assert_eq!(
        err.to_string(),
        "subscribe: reserved flags must be 0010, got 0000"
    );
    assert!(err.is_malformed());
}

#[test]
fn pubrel_and_unsubscribe_need_flags_0010_and_others_0000() {
    assert!(check(&[0x60, 0x02], MAX).is_err());
    assert!(check(&[0xA0, 0x02], MAX).is_err());
    assert!(check(&[0x41, 0x02], MAX).is_err());
    assert!(check(&[0xC1, 0x00], MAX).is_err());
    assert!(check(&[0x62, 0x02], MAX).unwrap().is_some());
}

// ---------------------------------------------------------------- connect

#[test]
fn connect_v311_with_will_user_name_and_binary_password_matches_the_spec_layout() {
    // §3.1.2.10 variable header (protocol name, level 4, flags 0xCE, keep alive 10), then the
    // payload in §3.1.3 order: client id, will topic, will message, user name, password.
    let bytes = [
        0x10, 0x1D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xCE, 0x00, 0x0A, 0x00, 0x02, b'c',
        b'1', 0x00, 0x01, b'w', 0x00, 0x03, b'b', b'y', b'e', 0x00, 0x01, b'u', 0x00, 0x02, 0xFF,
        0x00,
    ];
    golden(
        &bytes,
        V311,
        Packet::Connect(Box::new(Connect {
            protocol: V311,
            clean_start: true,
            keep_alive: 10,
            client_id: s("c1"),
            will: Some(Will {
                topic: topic("w"),
                payload: Bytes::from_static(b"bye"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties::default(),
            }),
            username: Some(s("u")),
            password: Some(Bytes::from_static(&[0xFF, 0x00])),
            properties: Properties::default(),
        })),
    );
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode_connect(&mut buf, MAX).unwrap().unwrap().protocol,
        V311
    );
}

fn connect_v5() -> Connect {
    Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 10,
        client_id: s("c1"),
        will: None,
        username: Some(s("u")),
        password: Some(Bytes::from_static(b"p")),
        properties: Properties {
            session_expiry_interval: Some(10),
            ..Properties::default()
        },
    }
}

#[test]
fn connect_v5_with_session_expiry_matches_the_spec_layout() {
    // §3.1.2.11 example: flags 0xC2, keep alive 10, properties length 5, session expiry 10.
    let bytes = [
        0x10, 0x1A, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0xC2, 0x00, 0x0A, 0x05, 0x11, 0x00,
        0x00, 0x00, 0x0A, 0x00, 0x02, b'c', b'1', 0x00, 0x01, b'u', 0x00, 0x01, b'p',
    ];
    golden(&bytes, V5, Packet::Connect(Box::new(connect_v5())));
    // The version comes from the CONNECT, whatever the caller assumed.
    assert_eq!(
        decode_all(&bytes, V311).unwrap(),
        Packet::Connect(Box::new(connect_v5()))
    );
}

#[test]
fn connect_v311_password_without_user_name_is_a_protocol_error_but_v5_allows_it() {
    let v4 = [
        0x10, 0x0F, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x42, 0x00, 0x0A, 0x00, 0x00, 0x00,
        0x01, b'p',
    ];
    let err = decode_err(&v4, V311);
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert_eq!(
        err.to_string(),
        "connect: password flag set without the user name flag"
    );
    let v5 = [
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x42, 0x00, 0x0A, 0x00, 0x00, 0x00,
        0x00, 0x01, b'p',
    ];
    let Packet::Connect(c) = decode_all(&v5, V5).unwrap() else {
        panic!()
    };
    assert_eq!(
        (c.username, c.password),
        (None, Some(Bytes::from_static(b"p")))
    );
}

#[test]
fn connect_with_reserved_flag_set_is_malformed() {
    let bytes = [
        0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x03, 0x00, 0x0A, 0x00, 0x00,
    ];
    let err = decode_err(&bytes, V311);
    assert_eq!(err.to_string(), "connect: reserved connect flag must be 0");
    assert!(err.is_malformed());
}

#[test]
fn connect_with_will_qos_but_no_will_flag_is_malformed() {
    let bytes = [
        0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x0A, 0x00, 0x0A, 0x00, 0x00,
    ];
    assert!(decode_err(&bytes, V311).is_malformed());
}

#[test]
fn connect_with_will_qos_3_is_malformed() {
    let bytes = [
        0x10, 0x11, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x1E, 0x00, 0x0A, 0x00, 0x00, 0x00,
        0x01, b'w', 0x00, 0x00,
    ];
    assert_eq!(
        decode_err(&bytes, V311),
        CodecError::InvalidQos {
            packet: "connect",
            qos: 3
        }
    );
}

#[test]
fn connect_with_mqisdp_level_3_is_an_unsupported_protocol_answered_by_connack_1() {
    let bytes = [
        0x10, 0x0E, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x0A, 0x00,
        0x00,
    ];
    let mut buf = BytesMut::from(&bytes[..]);
    let err = decode_connect(&mut buf, MAX).unwrap_err();
    assert_eq!(
        err.to_string(),
        "connect: unsupported protocol `MQIsdp` level 3"
    );
    assert_eq!(err.v4_connack_code(), Some(0x01));
    assert_eq!(err.reason_code(), 0x84);
}

#[test]
fn first_packet_other_than_connect_is_a_protocol_error() {
    let mut buf = BytesMut::from(&[0xC0, 0x00][..]);
    assert_eq!(
        decode_connect(&mut buf, MAX).unwrap_err().kind(),
        ErrorKind::Protocol
    );
}

#[test]
fn connect_v5_with_a_duplicate_property_is_a_protocol_error() {
    let bytes = [
        0x10, 0x16, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x0A, 0x0A, 0x11, 0x00,
        0x00, 0x00, 0x0A, 0x11, 0x00, 0x00, 0x00, 0x0B, 0x00, 0x00,
    ];
    let err = decode_err(&bytes, V5);
    assert_eq!(
        err.to_string(),
        "connect: property `session expiry interval` appears more than once"
    );
    assert_eq!(err.reason_code(), 0x82);
}

#[test]
fn connect_v5_with_a_property_not_allowed_in_connect_is_malformed() {
    let bytes = [
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x0A, 0x03, 0x23, 0x00,
        0x01, 0x00, 0x00,
    ];
    let err = decode_err(&bytes, V5);
    assert_eq!(
        err.to_string(),
        "connect: property `topic alias` is not allowed in this packet"
    );
    assert_eq!(err.reason_code(), 0x81);
}

#[test]
fn connect_v5_with_receive_maximum_0_is_a_protocol_error() {
    let bytes = [
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x0A, 0x03, 0x21, 0x00,
        0x00, 0x00, 0x00,
    ];
    assert_eq!(decode_err(&bytes, V5).kind(), ErrorKind::Protocol);
}

#[test]
fn connect_v5_with_will_properties_round_trips() {
    let mut c = connect_v5();
    c.will = Some(Will {
        topic: topic("dead/c1"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::ExactlyOnce,
        retain: true,
        properties: Properties {
            will_delay_interval: Some(30),
            payload_format_utf8: Some(true),
            ..Properties::default()
        },
    });
    let packet = Packet::Connect(Box::new(c));
    assert_eq!(decode_all(&encode_vec(&packet, V5), V5).unwrap(), packet);
}

// ---------------------------------------------------------------- connack

#[test]
fn connack_v311_golden_bytes() {
    let p = |session_present, code| {
        Packet::ConnAck(ConnAck {
            session_present,
            code,
            properties: Properties::default(),
        })
    };
    golden(&[0x20, 0x02, 0x01, 0x00], V311, p(true, 0));
    golden(&[0x20, 0x02, 0x00, 0x05], V311, p(false, 5));
    assert_eq!(
        decode_err(&[0x20, 0x02, 0x00, 0x06], V311).kind(),
        ErrorKind::Protocol
    );
    assert!(decode_err(&[0x20, 0x02, 0x02, 0x00], V311).is_malformed());
}

#[test]
fn connack_v5_golden_bytes_with_and_without_properties() {
    golden(
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        V5,
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: 0,
            properties: Properties::default(),
        }),
    );
    golden(
        &[0x20, 0x08, 0x00, 0x00, 0x05, 0x22, 0x00, 0x0A, 0x24, 0x01],
        V5,
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: 0,
            properties: Properties {
                topic_alias_maximum: Some(10),
                maximum_qos: Some(QoS::AtLeastOnce),
                ..Properties::default()
            },
        }),
    );
}

// ---------------------------------------------------------------- publish

#[test]
fn publish_v311_qos1_and_qos0_retained_golden_bytes() {
    golden(
        &[
            0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
        ],
        V311,
        Packet::Publish(Publish {
            dup: false,
            qos: QosPid::AtLeastOnce(pid(10)),
            retain: false,
            topic: topic("a/b"),
            payload: Bytes::from_static(b"hi"),
            properties: Properties::default(),
        }),
    );
    golden(
        &[0x31, 0x05, 0x00, 0x01, b'a', b'h', b'i'],
        V311,
        Packet::Publish(Publish {
            dup: false,
            qos: QosPid::AtMostOnce,
            retain: true,
            topic: topic("a"),
            payload: Bytes::from_static(b"hi"),
            properties: Properties::default(),
        }),
    );
    golden(
        &[0x3C, 0x05, 0x00, 0x01, b'a', 0x00, 0x07],
        V311,
        Packet::Publish(Publish {
            dup: true,
            qos: QosPid::ExactlyOnce(pid(7)),
            retain: false,
            topic: topic("a"),
            payload: Bytes::new(),
            properties: Properties::default(),
        }),
    );
}

#[test]
fn publish_v5_with_payload_format_and_with_a_topic_alias_instead_of_a_topic() {
    golden(
        &[0x30, 0x08, 0x00, 0x01, b'a', 0x02, 0x01, 0x01, b'h', b'i'],
        V5,
        Packet::Publish(Publish {
            dup: false,
            qos: QosPid::AtMostOnce,
            retain: false,
            topic: topic("a"),
            payload: Bytes::from_static(b"hi"),
            properties: Properties {
                payload_format_utf8: Some(true),
                ..Properties::default()
            },
        }),
    );
    golden(
        &[0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05, b'x'],
        V5,
        Packet::Publish(Publish {
            dup: false,
            qos: QosPid::AtMostOnce,
            retain: false,
            topic: TopicName::default(),
            payload: Bytes::from_static(b"x"),
            properties: Properties {
                topic_alias: NonZeroU16::new(5),
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn publish_topic_with_a_wildcard_is_refused() {
    let err = decode_err(&[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'+'], V311);
    assert_eq!(err.to_string(), "publish topic contains a wildcard `+`");
    let err = decode_err(&[0x30, 0x03, 0x00, 0x01, b'#'], V5);
    assert_eq!(err.to_string(), "publish topic contains a wildcard `#`");
}

#[test]
fn publish_with_qos_3_is_malformed() {
    let err = decode_err(&[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01], V311);
    assert_eq!(err.to_string(), "publish: invalid qos 3");
    assert!(err.is_malformed());
}

#[test]
fn publish_with_packet_id_0_or_empty_topic_or_dup_at_qos_0_is_refused() {
    assert_eq!(
        decode_err(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], V311),
        CodecError::ZeroPacketId { packet: "publish" }
    );
    assert_eq!(
        decode_err(&[0x30, 0x02, 0x00, 0x00], V311).kind(),
        ErrorKind::Protocol
    );
    assert_eq!(
        decode_err(&[0x30, 0x03, 0x00, 0x00, 0x00], V5).kind(),
        ErrorKind::Protocol
    );
    assert_eq!(
        decode_err(&[0x38, 0x03, 0x00, 0x01, b'a'], V311).kind(),
        ErrorKind::Protocol
    );
}

#[test]
fn publish_topic_with_invalid_utf8_or_nul_is_malformed() {
    assert!(matches!(
        decode_err(&[0x30, 0x03, 0x00, 0x01, 0xFF], V311),
        CodecError::InvalidUtf8 { .. }
    ));
    assert!(matches!(
        decode_err(&[0x30, 0x03, 0x00, 0x01, 0x00], V311),
        CodecError::NulCharacter { .. }
    ));
}

#[test]
fn publish_payload_and_topic_are_slices_of_the_input_not_copies() {
    let mut buf = BytesMut::from(&[0x30, 0x07, 0x00, 0x01, b'a', b'h', b'e', b'l', b'o'][..]);
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Some(Packet::Publish(p)) = decode(&mut buf, V311, MAX).unwrap() else {
        panic!()
    };
    for ptr in [
        p.payload.as_ptr() as usize,
        p.topic.as_bytes().as_ptr() as usize,
    ] {
        assert!((start..end).contains(&ptr));
    }
    assert_eq!(p.topic.as_str(), "a");
}

#[test]
fn publish_v5_subscription_identifiers_may_repeat_but_subscribe_allows_one() {
    let publish = [0x30, 0x08, 0x00, 0x01, b'a', 0x04, 0x0B, 0x01, 0x0B, 0x02];
    let Packet::Publish(p) = decode_all(&publish, V5).unwrap() else {
        panic!()
    };
    assert_eq!(p.properties.subscription_identifiers.len(), 2);
    let subscribe = [
        0x82, 0x0B, 0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00,
    ];
    assert!(matches!(
        decode_err(&subscribe, V5),
        CodecError::DuplicateProperty { .. }
    ));
}

// ---------------------------------------------------------------- acknowledgements

#[test]
fn puback_pubrec_pubrel_pubcomp_v311_golden_bytes() {
    golden(
        &[0x40, 0x02, 0x00, 0x0A],
        V311,
        Packet::PubAck(response(10, 0)),
    );
    golden(
        &[0x50, 0x02, 0x00, 0x0A],
        V311,
        Packet::PubRec(response(10, 0)),
    );
    golden(
        &[0x62, 0x02, 0x00, 0x0A],
        V311,
        Packet::PubRel(response(10, 0)),
    );
    golden(
        &[0x70, 0x02, 0x00, 0x0A],
        V311,
        Packet::PubComp(response(10, 0)),
    );
    assert!(decode_err(&[0x40, 0x03, 0x00, 0x0A, 0x00], V311).is_malformed());
}

#[test]
fn puback_v5_short_forms_and_reason_string_golden_bytes() {
    golden(
        &[0x40, 0x02, 0x00, 0x0A],
        V5,
        Packet::PubAck(response(10, 0)),
    );
    golden(
        &[0x40, 0x03, 0x00, 0x0A, 0x10],
        V5,
        Packet::PubAck(response(10, 0x10)),
    );
    golden(
        &[0x62, 0x03, 0x00, 0x0A, 0x92],
        V5,
        Packet::PubRel(response(10, 0x92)),
    );
    let mut denied = response(10, 0x87);
    denied.properties.reason_string = Some(s(""));
    golden(
        &[0x40, 0x07, 0x00, 0x0A, 0x87, 0x03, 0x1F, 0x00, 0x00],
        V5,
        Packet::PubAck(denied),
    );
    // The 4-byte form with an empty property block decodes to the same packet.
    assert_eq!(
        decode_all(&[0x50, 0x04, 0x00, 0x0A, 0x00, 0x00], V5).unwrap(),
        Packet::PubRec(response(10, 0))
    );
    assert_eq!(
        decode_err(&[0x70, 0x03, 0x00, 0x0A, 0x87], V5),
        CodecError::InvalidReasonCode {
            packet: "pubcomp",
            code: 0x87
        }
    );
}

// ---------------------------------------------------------------- subscribe

#[test]
fn subscribe_v311_two_filters_golden_bytes_of_section_3_8_3() {
    golden(
        &[
            0x82, 0x0E, 0x00, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x01, 0x00, 0x03, b'c', b'/',
            b'd', 0x02,
        ],
        V311,
        Packet::Subscribe(Subscribe {
            packet_id: pid(10),
            subscriptions: vec![
                Subscription {
                    filter: filter("a/b"),
                    options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                },
                Subscription {
                    filter: filter("c/d"),
                    options: SubscriptionOptions::qos(QoS::ExactlyOnce),
                },
            ],
            properties: Properties::default(),
        }),
    );
}

#[test]
fn subscribe_v5_with_subscription_identifier_and_options_golden_bytes() {
    golden(
        &[
            0x82, 0x0B, 0x00, 0x0A, 0x02, 0x0B, 0x05, 0x00, 0x03, b'a', b'/', b'#', 0x2D,
        ],
        V5,
        Packet::Subscribe(Subscribe {
            packet_id: pid(10),
            subscriptions: vec![Subscription {
                filter: filter("a/#"),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::Never,
                },
            }],
            properties: Properties {
                subscription_identifiers: vec![NonZeroU32::new(5).unwrap()],
                ..Properties::default()
            },
        }),
    );
}

#[test]
fn subscribe_without_filters_is_a_protocol_error() {
    let err = decode_err(&[0x82, 0x02, 0x00, 0x01], V311);
    assert_eq!(
        err.to_string(),
        "subscribe: at least one topic filter is required"
    );
    assert_eq!(err.kind(), ErrorKind::Protocol);
}

#[test]
fn subscribe_with_requested_qos_3_or_reserved_bits_is_malformed() {
    assert!(decode_err(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03], V311).is_malformed());
    assert!(decode_err(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04], V311).is_malformed());
    assert!(decode_err(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40], V5).is_malformed());
    assert_eq!(
        decode_err(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30], V5).kind(),
        ErrorKind::Protocol
    );
}

#[test]
fn topic_filters_follow_the_wildcard_rules() {
    for ok in [
        "#",
        "+",
        "a/#",
        "a/+/b",
        "+/+",
        "/",
        "a//b",
        "$share/g/a/#",
        "$SYS/#",
    ] {
        assert!(ok.parse::<TopicFilter>().is_ok(), "{ok}");
    }
    for bad in [
        "",
        "a/#/b",
        "a#",
        "a/b#",
        "a+",
        "a/+b/c",
        "$share/g",
        "$share//a",
        "$share/g+/a",
        "$share/g/",
    ] {
        assert!(bad.parse::<TopicFilter>().is_err(), "{bad}");
    }
    let err = decode_err(
        &[0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'#', b'/', 0x00],
        V311,
    );
    assert_eq!(
        err.to_string(),
        "subscribe: invalid topic filter `a#/`: `#` must be a whole level and the last one"
    );
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let mut bytes = vec![0x82, 0x10, 0x00, 0x01, 0x00, 0x00, 0x0A];
    bytes.extend_from_slice(b"$share/g/a");
    bytes.push(0x04);
    assert_eq!(decode_err(&bytes, V5).kind(), ErrorKind::Protocol);
}

#[test]
fn suback_golden_bytes_in_both_versions() {
    golden(
        &[0x90, 0x05, 0x00, 0x0A, 0x00, 0x02, 0x80],
        V311,
        Packet::SubAck(SubAck {
            packet_id: pid(10),
            codes: vec![0x00, 0x02, 0x80],
            properties: Properties::default(),
        }),
    );
    golden(
        &[0x90, 0x05, 0x00, 0x0A, 0x00, 0x01, 0x87],
        V5,
        Packet::SubAck(SubAck {
            packet_id: pid(10),
            codes: vec![0x01, 0x87],
            properties: Properties::default(),
        }),
    );
    assert!(decode_all(&[0x90, 0x03, 0x00, 0x0A, 0x87], V311).is_err());
}

// ---------------------------------------------------------------- unsubscribe

#[test]
fn unsubscribe_and_unsuback_golden_bytes_in_both_versions() {
    golden(
        &[
            0xA2, 0x0A, 0x00, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, b'c',
        ],
        V311,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(10),
            filters: vec![filter("a/b"), filter("c")],
            properties: Properties::default(),
        }),
    );
    golden(
        &[0xA2, 0x06, 0x00, 0x0A, 0x00, 0x00, 0x01, b'c'],
        V5,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(10),
            filters: vec![filter("c")],
            properties: Properties::default(),
        }),
    );
    golden(
        &[0xB0, 0x02, 0x00, 0x0A],
        V311,
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(10),
            codes: vec![],
            properties: Properties::default(),
        }),
    );
    golden(
        &[0xB0, 0x05, 0x00, 0x0A, 0x00, 0x00, 0x11],
        V5,
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(10),
            codes: vec![0x00, 0x11],
            properties: Properties::default(),
        }),
    );
    assert_eq!(
        decode_err(&[0xA2, 0x02, 0x00, 0x0A], V311).kind(),
        ErrorKind::Protocol
    );
}

// ---------------------------------------------------------------- ping, disconnect, auth

#[test]
fn pingreq_pingresp_and_v311_disconnect_are_two_bytes() {
    golden(&[0xC0, 0x00], V311, Packet::PingReq);
    golden(&[0xD0, 0x00], V5, Packet::PingResp);
    golden(
        &[0xE0, 0x00],
        V311,
        Packet::Disconnect(Disconnect::default()),
    );
    assert!(decode_err(&[0xC0, 0x01, 0x00], V311).is_malformed());
    assert!(decode_err(&[0xE0, 0x01, 0x00], V311).is_malformed());
}

#[test]
fn disconnect_v5_with_reason_and_server_reference_golden_bytes() {
    golden(&[0xE0, 0x00], V5, Packet::Disconnect(Disconnect::default()));
    golden(
        &[0xE0, 0x01, 0x8E],
        V5,
        Packet::Disconnect(Disconnect {
            reason: 0x8E,
            properties: Properties::default(),
        }),
    );
    golden(
        &[0xE0, 0x07, 0x9C, 0x05, 0x1C, 0x00, 0x02, b'h', b'2'],
        V5,
        Packet::Disconnect(Disconnect {
            reason: 0x9C,
            properties: Properties {
                server_reference: Some(s("h2")),
                ..Properties::default()
            },
        }),
    );
    assert!(matches!(
        decode_err(&[0xE0, 0x01, 0x01], V5),
        CodecError::InvalidReasonCode { .. }
    ));
}

#[test]
fn auth_v5_golden_bytes_and_auth_is_refused_in_v311() {
    golden(&[0xF0, 0x00], V5, Packet::Auth(Auth::default()));
    golden(
        &[
            0xF0, 0x0C, 0x18, 0x0A, 0x15, 0x00, 0x03, b'j', b'w', b't', 0x16, 0x00, 0x01, b'A',
        ],
        V5,
        Packet::Auth(Auth {
            reason: 0x18,
            properties: Properties {
                authentication_method: Some(s("jwt")),
                authentication_data: Some(Bytes::from_static(b"A")),
                ..Properties::default()
            },
        }),
    );
    assert!(decode_err(&[0xF0, 0x00], V311).is_malformed());
    assert!(
        Packet::Auth(Auth::default())
            .encode(V311, &mut BytesMut::new())
            .is_err()
    );
}

// ---------------------------------------------------------------- buffering

#[test]
fn two_packets_in_one_buffer_decode_one_after_the_other() {
    let mut buf = BytesMut::from(&[0xC0, 0x00, 0x40, 0x02, 0x00][..]);
    assert_eq!(decode(&mut buf, V311, MAX).unwrap(), Some(Packet::PingReq));
    assert_eq!(decode(&mut buf, V311, MAX).unwrap(), None);
    assert_eq!(buf.len(), 3, "an incomplete packet stays in the buffer");
    buf.extend_from_slice(&[0x0A]);
    assert_eq!(
        decode(&mut buf, V311, MAX).unwrap(),
        Some(Packet::PubAck(response(10, 0)))
    );
    assert!(buf.is_empty());
}

#[test]
fn encoding_a_binary_field_over_65535_bytes_fails_and_writes_nothing() {
    let mut c = connect_v5();
    c.password = Some(Bytes::from(vec![0u8; 70_000]));
    let mut buf = BytesMut::new();
    let err = Packet::Connect(Box::new(c))
        .encode(V5, &mut buf)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot encode connect: `password` is too long (70000 bytes)"
    );
    assert!(buf.is_empty());
}

/// Every golden packet above, for the truncation and round-trip checks.
fn golden_corpus() -> Vec<(Protocol, Vec<u8>)> {
    let mut out = Vec::new();
    for p in sample_packets() {
        for v in [V311, V5] {
            if matches!(p, Packet::Auth(_)) && v == V311 {
                continue;
            }
            out.push((v, encode_vec(&p, v)));
        }
    }
    out
}

fn sample_packets() -> Vec<Packet> {
    let mut c = connect_v5();
    c.will = Some(Will {
        topic: topic("w"),
        payload: Bytes::from_static(b"bye"),
        qos: QoS::AtLeastOnce,
        retain: true,
        properties: Properties::default(),
    });
    vec![
        Packet::Connect(Box::new(c)),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: Properties::default(),
        }),
        Packet::Publish(Publish {
            dup: false,
            qos: QosPid::ExactlyOnce(pid(3)),
            retain: true,
            topic: topic("a/b"),
            payload: Bytes::from_static(b"payload"),
            properties: Properties::default(),
        }),
        Packet::PubRel(response(1, 0)),
        Packet::Subscribe(Subscribe {
            packet_id: pid(2),
            subscriptions: vec![Subscription {
                filter: filter("a/+/#"),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
            properties: Properties::default(),
        }),
        Packet::SubAck(SubAck {
            packet_id: pid(2),
            codes: vec![1],
            properties: Properties::default(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(4),
            filters: vec![filter("x")],
            properties: Properties::default(),
        }),
        Packet::PingReq,
        Packet::Disconnect(Disconnect::default()),
        Packet::Auth(Auth {
            reason: 0x19,
            properties: Properties {
                authentication_method: Some(s("jwt")),
                ..Properties::default()
            },
        }),
    ]
}

#[test]
fn truncated_input_at_every_length_needs_more_bytes_and_never_panics() {
    for (v, bytes) in golden_corpus() {
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            assert_eq!(
                decode(&mut buf, v, MAX),
                Ok(None),
                "{bytes:02x?} cut at {n}"
            );
            assert_eq!(buf.len(), n);
        }
    }
}

#[test]
fn a_body_shorter_than_its_fields_is_an_error_never_a_panic() {
    for (v, bytes) in golden_corpus() {
        let header = check(&bytes, MAX).unwrap().unwrap();
        let body = &bytes[header.header_len..];
        for n in 0..body.len() {
            let mut frame = vec![bytes[0], u8::try_from(n).unwrap()];
            frame.extend_from_slice(&body[..n]);
            let mut buf = BytesMut::from(&frame[..]);
            // Some prefixes are valid shorter packets (e.g. a PUBLISH with less payload).
            let _ = decode(&mut buf, v, MAX);
        }
    }
}

// ---------------------------------------------------------------- property tests

mod prop {
    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;

    use super::*;

    fn utf8() -> impl Strategy<Value = Utf8Str> {
        "[a-zA-Z0-9 é/_-]{0,12}".prop_map(|v| s(&v))
    }

    fn topic_name() -> impl Strategy<Value = TopicName> {
        "[a-z0-9]{1,5}(/[a-z0-9]{0,5}){0,3}".prop_map(|v| topic(&v))
    }

    fn topic_filter() -> impl Strategy<Value = TopicFilter> {
        prop_oneof![
            topic_name().prop_map(|t| filter(t.as_str())),
            topic_name().prop_map(|t| filter(&format!("{}/#", t.as_str()))),
            topic_name().prop_map(|t| filter(&format!("+/{}/+", t.as_str()))),
            Just(filter("#")),
            topic_name().prop_map(|t| filter(&format!("$share/g/{}", t.as_str()))),
        ]
    }

    fn binary() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..20).prop_map(Bytes::from)
    }

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce)
        ]
    }

    fn nz16() -> impl Strategy<Value = NonZeroU16> {
        (1..=u16::MAX).prop_map(pid)
    }

    fn nz32() -> impl Strategy<Value = NonZeroU32> {
        (1..=268_435_455u32).prop_map(|v| NonZeroU32::new(v).unwrap())
    }

    fn user() -> impl Strategy<Value = Vec<(Utf8Str, Utf8Str)>> {
        vec((utf8(), utf8()), 0..3)
    }

    /// Properties valid in `ctx`, a few of each type.
    fn props(ctx: PropertyContext) -> BoxedStrategy<Properties> {
        use PropertyContext as C;
        match ctx {
            C::Publish | C::Will => (
                option::of(any::<bool>()),
                option::of(any::<u32>()),
                option::of(utf8()),
                option::of(topic_name()),
                option::of(binary()),
                vec(nz32(), 0..3),
                option::of(nz16()),
                user(),
                option::of(any::<u32>()),
            )
                .prop_map(
                    move |(pf, exp, ct, rt, cd, ids, alias, up, delay)| Properties {
                        payload_format_utf8: pf,
                        message_expiry_interval: exp,
                        content_type: ct,
                        response_topic: rt,
                        correlation_data: cd,
                        subscription_identifiers: if ctx == C::Publish { ids } else { vec![] },
                        topic_alias: if ctx == C::Publish { alias } else { None },
                        will_delay_interval: if ctx == C::Will { delay } else { None },
                        user_properties: up,
                        ..Properties::default()
                    },
                )
                .boxed(),
            C::Connect => (
                option::of(any::<u32>()),
                option::of(nz16()),
                option::of(any::<u16>()),
                option::of(nz32()),
                option::of(any::<bool>()),
                option::of(any::<bool>()),
                option::of((utf8(), option::of(binary()))),
                user(),
            )
                .prop_map(|(se, rm, tam, mps, rpi, rri, auth, up)| Properties {
                    session_expiry_interval: se,
                    receive_maximum: rm,
                    topic_alias_maximum: tam,
                    maximum_packet_size: mps,
                    request_problem_information: rpi,
                    request_response_information: rri,
                    authentication_method: auth.as_ref().map(|a| a.0.clone()),
                    authentication_data: auth.and_then(|a| a.1),
                    user_properties: up,
                    ..Properties::default()
                })
                .boxed(),
            C::ConnAck => (
                (
                    option::of(any::<u32>()),
                    option::of(utf8()),
                    option::of(any::<u16>()),
                    option::of(nz16()),
                    option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
                    option::of(any::<bool>()),
                ),
                (
                    option::of(any::<bool>()),
                    option::of(any::<bool>()),
                    option::of(any::<bool>()),
                    option::of(utf8()),
                    option::of(utf8()),
                    option::of(utf8()),
                    user(),
                ),
            )
                .prop_map(
                    |((se, aci, ska, rm, mq, ra), (wsa, sia, ssa, ri, sr, rs, up))| Properties {
                        session_expiry_interval: se,
                        assigned_client_identifier: aci,
                        server_keep_alive: ska,
                        receive_maximum: rm,
                        maximum_qos: mq,
                        retain_available: ra,
                        wildcard_subscription_available: wsa,
                        subscription_identifiers_available: sia,
                        shared_subscription_available: ssa,
                        response_information: ri,
                        server_reference: sr,
                        reason_string: rs,
                        user_properties: up,
                        ..Properties::default()
                    },
                )
                .boxed(),
            C::Subscribe => (option::of(nz32()), user())
                .prop_map(|(id, up)| Properties {
                    subscription_identifiers: id.into_iter().collect(),
                    user_properties: up,
                    ..Properties::default()
                })
                .boxed(),
            C::Unsubscribe => user()
                .prop_map(|up| Properties {
                    user_properties: up,
                    ..Properties::default()
                })
                .boxed(),
            C::PubResponse | C::SubAck | C::UnsubAck => (option::of(utf8()), user())
                .prop_map(|(rs, up)| Properties {
                    reason_string: rs,
                    user_properties: up,
                    ..Properties::default()
                })
                .boxed(),
            C::Disconnect => (
                option::of(any::<u32>()),
                option::of(utf8()),
                option::of(utf8()),
                user(),
            )
                .prop_map(|(se, sr, rs, up)| Properties {
                    session_expiry_interval: se,
                    server_reference: sr,
                    reason_string: rs,
                    user_properties: up,
                    ..Properties::default()
                })
                .boxed(),
            C::Auth => (
                option::of(utf8()),
                option::of(binary()),
                option::of(utf8()),
                user(),
            )
                .prop_map(|(am, ad, rs, up)| Properties {
                    authentication_method: am,
                    authentication_data: ad,
                    reason_string: rs,
                    user_properties: up,
                    ..Properties::default()
                })
                .boxed(),
        }
    }

    fn code(valid: &'static [u8]) -> impl Strategy<Value = u8> {
        proptest::sample::select(valid)
    }

    /// Packets valid in `v`: properties, reasons and options only where `v` carries them.
    fn packet(v: Protocol) -> BoxedStrategy<Packet> {
        use PropertyContext as C;
        let v5 = v == V5;
        let p = move |ctx| {
            if v5 {
                props(ctx)
            } else {
                Just(Properties::default()).boxed()
            }
        };
        let will = (topic_name(), binary(), qos(), any::<bool>(), p(C::Will)).prop_map(
            |(topic, payload, qos, retain, properties)| Will {
                topic,
                payload,
                qos,
                retain,
                properties,
            },
        );
        let connect = (
            any::<bool>(),
            any::<u16>(),
            utf8(),
            option::of(will),
            option::of(utf8()),
            option::of(binary()),
            p(C::Connect),
        )
            .prop_map(
                move |(
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                )| {
                    // 3.1.1 refuses a password without a user name.
                    let password = if v5 || username.is_some() {
                        password
                    } else {
                        None
                    };
                    Packet::Connect(Box::new(Connect {
                        protocol: v,
                        clean_start,
                        keep_alive,
                        client_id,
                        will,
                        username,
                        password,
                        properties,
                    }))
                },
            );
        let connack = (
            any::<bool>(),
            if v5 {
                code(&[0x00, 0x80, 0x85, 0x86, 0x87, 0x9F])
            } else {
                code(&[0, 1, 2, 3, 4, 5])
            },
            p(C::ConnAck),
        )
            .prop_map(|(session_present, code, properties)| {
                Packet::ConnAck(ConnAck {
                    session_present,
                    code,
                    properties,
                })
            });
        let qos_pid = prop_oneof![
            Just(QosPid::AtMostOnce),
            nz16().prop_map(QosPid::AtLeastOnce),
            nz16().prop_map(QosPid::ExactlyOnce)
        ];
        let publish = (
            any::<bool>(),
            qos_pid,
            any::<bool>(),
            topic_name(),
            binary(),
            p(C::Publish),
        )
            .prop_map(|(dup, qos, retain, topic, payload, properties)| {
                Packet::Publish(Publish {
                    dup: dup && qos != QosPid::AtMostOnce,
                    qos,
                    retain,
                    topic,
                    payload,
                    properties,
                })
            });
        let pub_response = (
            0..4u8,
            nz16(),
            code(&[0x00, 0x10, 0x80, 0x87, 0x92]),
            p(C::PubResponse),
        )
            .prop_map(move |(kind, packet_id, code, properties)| {
                let reason = match (v5, kind, code) {
                    (false, ..) => 0,
                    (true, 0 | 1, 0x92) => 0x10,
                    (true, 2 | 3, 0x10 | 0x80 | 0x87) => 0x92,
                    (true, _, c) => c,
                };
                let r = PubResponse {
                    packet_id,
                    reason,
                    properties,
                };
                match kind {
                    0 => Packet::PubAck(r),
                    1 => Packet::PubRec(r),
                    2 => Packet::PubRel(r),
                    _ => Packet::PubComp(r),
                }
            });
        let options =
            (qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(move |(qos, nl, rap, rh)| {
                if !v5 {
                    return SubscriptionOptions::qos(qos);
                }
                SubscriptionOptions {
                    qos,
                    no_local: nl,
                    retain_as_published: rap,
                    retain_handling: match rh {
                        0 => RetainHandling::OnSubscribe,
                        1 => RetainHandling::OnNewSubscribe,
                        _ => RetainHandling::Never,
                    },
                }
            });
        let subscribe = (
            nz16(),
            vec((topic_filter(), options), 1..4),
            p(C::Subscribe),
        )
            .prop_map(|(packet_id, subs, properties)| {
                Packet::Subscribe(Subscribe {
                    packet_id,
                    subscriptions: subs
                        .into_iter()
                        .map(|(filter, mut options)| {
                            options.no_local &= !filter.is_shared();
                            Subscription { filter, options }
                        })
                        .collect(),
                    properties,
                })
            });
        let suback_codes: &'static [u8] = if v5 {
            &[0, 1, 2, 0x80, 0x87, 0x8F, 0xA2]
        } else {
            &[0, 1, 2, 0x80]
        };
        let suback = (nz16(), vec(code(suback_codes), 1..4), p(C::SubAck)).prop_map(
            |(packet_id, codes, properties)| {
                Packet::SubAck(SubAck {
                    packet_id,
                    codes,
                    properties,
                })
            },
        );
        let unsubscribe = (nz16(), vec(topic_filter(), 1..4), p(C::Unsubscribe)).prop_map(
            |(packet_id, filters, properties)| {
                Packet::Unsubscribe(Unsubscribe {
                    packet_id,
                    filters,
                    properties,
                })
            },
        );
        let unsuback = (nz16(), vec(code(&[0x00, 0x11, 0x87]), 0..4), p(C::UnsubAck)).prop_map(
            move |(packet_id, codes, properties)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id,
                    codes: if v5 { codes } else { vec![] },
                    properties,
                })
            },
        );
        let disconnect = (code(&[0x00, 0x04, 0x81, 0x8E, 0x9C]), p(C::Disconnect)).prop_map(
            move |(reason, properties)| {
                Packet::Disconnect(Disconnect {
                    reason: if v5 { reason } else { 0 },
                    properties,
                })
            },
        );
        let auth = (code(&[0x00, 0x18, 0x19]), p(C::Auth))
            .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }));
        let common = prop_oneof![
            connect,
            connack,
            publish,
            pub_response,
            subscribe,
            suback,
            unsubscribe,
            unsuback,
            Just(Packet::PingReq),
            Just(Packet::PingResp),
            disconnect,
        ];
        if v5 {
            prop_oneof![common, auth].boxed()
        } else {
            common.boxed()
        }
    }

    fn version() -> impl Strategy<Value = Protocol> {
        prop_oneof![Just(V311), Just(V5)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn every_packet_decodes_to_what_was_encoded(
            (v, packet) in version().prop_flat_map(|v| (Just(v), packet(v)))
        ) {
            let bytes = encode_vec(&packet, v);
            prop_assert_eq!(decode_all(&bytes, v), Ok(packet));
        }

        #[test]
        fn every_encoded_packet_cut_short_needs_more_bytes(
            (v, packet, cut) in version().prop_flat_map(|v| (Just(v), packet(v), any::<proptest::sample::Index>()))
        ) {
            let bytes = encode_vec(&packet, v);
            let n = cut.index(bytes.len());
            let mut buf = BytesMut::from(&bytes[..n]);
            prop_assert_eq!(decode(&mut buf, v, MAX), Ok(None));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..64), max in 0usize..100) {
            for v in [V311, V5] {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(_)) = decode(&mut buf, v, max) {}
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_connect(&mut buf, MAX);
        }

        #[test]
        fn random_bodies_behind_a_valid_fixed_header_never_panic(
            first in proptest::sample::select(vec![0x10u8, 0x20, 0x30, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70,
                                               0x82, 0x90, 0xA2, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0]),
            body in vec(any::<u8>(), 0..100),
        ) {
            let mut frame = vec![first, u8::try_from(body.len()).unwrap()];
            frame.extend_from_slice(&body);
            for v in [V311, V5] {
                let mut buf = BytesMut::from(&frame[..]);
                let _ = decode(&mut buf, v, MAX);
            }
        }
    }
}
