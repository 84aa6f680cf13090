//! Fuzzes the MQTT 3.1.1 / 5.0 codec (`broker::mqtt::codec`).
//!
//! The input is read as a byte stream three times: as the first bytes of a connection
//! (`decode_connect`, then `decode` with the CONNECT's protocol for the rest), and as a stream of
//! packets for an MQTT 3.1.1 and for an MQTT 5.0 connection (`decode` until `Ok(None)` or an
//! error). Property: no input may make any of this panic, and for every decoded packet `p`:
//! - `decode` consumed at least one byte;
//! - `p.encode(protocol)` succeeds (a decoded packet is one the wire can carry) and returns the
//!   number of bytes it appended;
//! - decoding those bytes with the same protocol yields exactly one packet, equal to `p`, and
//!   consumes them all;
//! - encoding that packet again gives the same bytes.
//!
//! The re-encoded bytes are compared with themselves, never with the input: the input may be a
//! legitimately different spelling of the same packet (MQTT 5 long forms of acknowledgements,
//! property order, …).
#![no_main]

use broker::mqtt::codec::{Packet, Protocol, check, decode, decode_connect};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// The maximum packet size for the fuzzed input.
const MAX_PACKET_SIZE: usize = 64 * 1024;
/// Re-encoded packets are decoded without a size limit (the wire's own limit).
const NO_LIMIT: usize = usize::MAX;
/// Bounds the work per input.
const MAX_PACKETS: usize = 256;

fuzz_target!(|data: &[u8]| {
    // `check` alone, on the raw input.
    let _ = check(data, MAX_PACKET_SIZE);

    // The first bytes of a connection: a CONNECT, then packets of its protocol.
    let mut buf = BytesMut::from(data);
    if let Ok(Some(connect)) = decode_connect(&mut buf, MAX_PACKET_SIZE) {
        let protocol = connect.protocol;
        round_trip(&Packet::Connect(Box::new(connect)), protocol);
        decode_stream(&mut buf, protocol);
    }

    for protocol in [Protocol::V311, Protocol::V5] {
        let mut buf = BytesMut::from(data);
        decode_stream(&mut buf, protocol);
    }
});

fn decode_stream(buf: &mut BytesMut, protocol: Protocol) {
    for _ in 0..MAX_PACKETS {
        let before = buf.len();
        match decode(buf, protocol, MAX_PACKET_SIZE) {
            Ok(Some(packet)) => {
                assert!(
                    buf.len() < before,
                    "decode returned {packet:?} without consuming any byte"
                );
                round_trip(&packet, protocol);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) must leave the buffer as is");
                return;
            }
            Err(_) => return,
        }
    }
}

fn round_trip(packet: &Packet, protocol: Protocol) {
    let mut encoded = BytesMut::new();
    let size = match packet.encode(protocol, &mut encoded) {
        Ok(size) => size,
        Err(e) => panic!("a decoded packet does not encode ({protocol:?}): {e}\n{packet:?}"),
    };
    assert_eq!(size, encoded.len(), "encode's size differs from the bytes written");
    let bytes = encoded.clone().freeze();

    let mut buf = encoded;
    let again = match decode(&mut buf, protocol, NO_LIMIT) {
        Ok(Some(p)) => p,
        Ok(None) => panic!(
            "re-encoded packet is incomplete ({protocol:?}): {packet:?}\nbytes: {:02x?}",
            &bytes[..]
        ),
        Err(e) => panic!(
            "re-encoded packet does not decode ({protocol:?}): {e}\n{packet:?}\nbytes: {:02x?}",
            &bytes[..]
        ),
    };
    assert!(
        buf.is_empty(),
        "re-encoded packet left {} bytes undecoded ({protocol:?}): {packet:?}\nbytes: {:02x?}",
        buf.len(),
        &bytes[..]
    );
    assert_eq!(
        &again,
        packet,
        "encode → decode changed the packet ({protocol:?}); bytes: {:02x?}",
        &bytes[..]
    );

    let mut twice = BytesMut::new();
    again
        .encode(protocol, &mut twice)
        .expect("an equal packet encodes too");
    assert_eq!(&twice[..], &bytes[..], "equal packets encode differently");
}
