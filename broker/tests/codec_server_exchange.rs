//! The codec through the public API, as the connection loop will use it: the first packet is
//! read with `decode_connect`, later ones with `decode` and the version the CONNECT announced,
//! and answers are encoded into one output buffer.

use std::num::NonZeroU16;

use broker::mqtt::codec::{
    CodecError, ConnAck, ErrorKind, Packet, Properties, Protocol, PubResponse, QosPid, SubAck,
    decode, decode_connect,
};
use bytes::BytesMut;

const MAX: usize = 1024;

#[test]
fn a_v5_client_connects_publishes_at_qos_1_and_subscribes_over_one_byte_stream() {
    let mut input = BytesMut::new();
    // CONNECT v5, clean start, keep alive 30, no properties, client id "d1".
    input.extend_from_slice(&[
        0x10, 0x0F, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x1E, 0x00, 0x00, 0x02,
        b'd', b'1',
    ]);
    // PUBLISH QoS 1, topic "t/1", packet id 7, no properties, payload "21.5".
    input.extend_from_slice(&[
        0x32, 0x0C, 0x00, 0x03, b't', b'/', b'1', 0x00, 0x07, 0x00, b'2', b'1', b'.', b'5',
    ]);
    // SUBSCRIBE packet id 8, no properties, "t/#" at QoS 1; the last byte arrives later.
    input.extend_from_slice(&[0x82, 0x09, 0x00, 0x08, 0x00, 0x00, 0x03, b't', b'/', b'#']);

    let connect = decode_connect(&mut input, MAX).unwrap().unwrap();
    assert_eq!(connect.protocol, Protocol::V5);
    assert_eq!(connect.client_id.as_str(), "d1");
    let v = connect.protocol;

    let Some(Packet::Publish(publish)) = decode(&mut input, v, MAX).unwrap() else {
        panic!("expected a publish");
    };
    assert_eq!(publish.topic.as_str(), "t/1");
    assert_eq!(&publish.payload[..], b"21.5");
    assert_eq!(
        publish.qos,
        QosPid::AtLeastOnce(NonZeroU16::new(7).unwrap())
    );

    assert_eq!(decode(&mut input, v, MAX).unwrap(), None);
    input.extend_from_slice(&[0x01]);
    let Some(Packet::Subscribe(subscribe)) = decode(&mut input, v, MAX).unwrap() else {
        panic!("expected a subscribe");
    };
    assert_eq!(subscribe.subscriptions[0].filter.as_str(), "t/#");

    let mut output = BytesMut::new();
    let answers = [
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: 0,
            properties: Properties::default(),
        }),
        Packet::PubAck(PubResponse {
            packet_id: NonZeroU16::new(7).unwrap(),
            reason: 0,
            properties: Properties::default(),
        }),
        Packet::SubAck(SubAck {
            packet_id: NonZeroU16::new(8).unwrap(),
            codes: vec![0x01],
            properties: Properties::default(),
        }),
    ];
    for answer in &answers {
        answer.encode(v, &mut output).unwrap();
    }
    assert_eq!(
        &output[..],
        &[
            0x20, 0x03, 0x00, 0x00, 0x00, 0x40, 0x02, 0x00, 0x07, 0x90, 0x04, 0x00, 0x08, 0x00,
            0x01
        ]
    );
}

#[test]
fn a_malformed_packet_maps_to_the_v5_disconnect_reason_code() {
    let mut input = BytesMut::from(&[0x80, 0x02, 0x00, 0x01][..]);
    let err = decode(&mut input, Protocol::V5, MAX).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Malformed);
    assert_eq!(err.reason_code(), 0x81);
    let disconnect = Packet::Disconnect(broker::mqtt::codec::Disconnect {
        reason: err.reason_code(),
        properties: Properties::default(),
    });
    let mut output = BytesMut::new();
    disconnect.encode(Protocol::V5, &mut output).unwrap();
    assert_eq!(&output[..], &[0xE0, 0x01, 0x81]);
}

#[test]
fn a_client_announcing_a_packet_over_the_maximum_is_refused_before_it_is_buffered() {
    let mut input = BytesMut::from(&[0x30, 0x80, 0x80, 0x80, 0x01][..]);
    assert_eq!(
        decode(&mut input, Protocol::V311, MAX),
        Err(CodecError::PacketTooLarge {
            size: 2_097_157,
            max: MAX
        })
    );
}
