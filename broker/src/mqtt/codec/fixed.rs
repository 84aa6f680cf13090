//! The fixed header (§2.1 in both versions): packet type, flags and the remaining length, checked
//! before anything else is buffered.

use super::error::CodecError;

/// The largest remaining length four variable-length bytes can carry (§2.2.3 / §1.5.5).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The control packet types (§2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    /// MQTT 5 only; the decoder refuses it on a 3.1.1 connection.
    Auth = 15,
}

impl PacketType {
    fn from_nibble(n: u8) -> Result<Self, CodecError> {
        Ok(match n {
            1 => Self::Connect,
            2 => Self::ConnAck,
            3 => Self::Publish,
            4 => Self::PubAck,
            5 => Self::PubRec,
            6 => Self::PubRel,
            7 => Self::PubComp,
            8 => Self::Subscribe,
            9 => Self::SubAck,
            10 => Self::Unsubscribe,
            11 => Self::UnsubAck,
            12 => Self::PingReq,
            13 => Self::PingResp,
            14 => Self::Disconnect,
            15 => Self::Auth,
            other => return Err(CodecError::UnknownPacketType(other)),
        })
    }

    /// The lowercase name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::ConnAck => "connack",
            Self::Publish => "publish",
            Self::PubAck => "puback",
            Self::PubRec => "pubrec",
            Self::PubRel => "pubrel",
            Self::PubComp => "pubcomp",
            Self::Subscribe => "subscribe",
            Self::SubAck => "suback",
            Self::Unsubscribe => "unsubscribe",
            Self::UnsubAck => "unsuback",
            Self::PingReq => "pingreq",
            Self::PingResp => "pingresp",
            Self::Disconnect => "disconnect",
            Self::Auth => "auth",
        }
    }

    /// The flags every packet but PUBLISH must carry (§2.1.3, table 2.2).
    fn required_flags(self) -> Option<u8> {
        match self {
            Self::Publish => None,
            Self::PubRel | Self::Subscribe | Self::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }
}

/// A parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    pub packet_type: PacketType,
    /// The low nibble of the first byte; only PUBLISH gives it meaning (DUP, QoS, RETAIN).
    pub flags: u8,
    /// Bytes taken by the fixed header itself: 1 + the length of the remaining length (1..=4).
    pub header_len: usize,
    pub remaining_len: usize,
}

impl FixedHeader {
    /// The whole packet's size in bytes, as MQTT 5's Maximum Packet Size counts it.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// Parses the fixed header at the start of `buf` and refuses a packet larger than
/// `max_packet_size` bytes from the header alone, before the rest is buffered. `Ok(None)` means
/// the header itself is incomplete; the caller then needs `frame_len()` bytes in all.
///
/// The size check also runs on an incomplete remaining length: `30 ff ff` already promises at
/// least 16,384 + 16,383 bytes, so a tiny maximum refuses it without waiting for the last byte.
pub fn check(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = PacketType::from_nibble(first >> 4)?;
    let flags = first & 0x0f;
    if let Some(expected) = packet_type.required_flags()
        && flags != expected
    {
        return Err(CodecError::ReservedFlags {
            packet: packet_type.name(),
            expected,
            got: flags,
        });
    }
    let mut value: usize = 0;
    let mut multiplier: usize = 1;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            // The next byte is at least 1 (a continuation byte followed by 0 is not minimal).
            let at_least = if i == 0 { 0 } else { value + multiplier };
            if 1 + i + at_least > max_packet_size {
                return Err(CodecError::PacketTooLarge {
                    size: 1 + i + at_least,
                    max: max_packet_size,
                });
            }
            return Ok(None);
        };
        value += usize::from(byte & 0x7f) * multiplier;
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(CodecError::RemainingLengthNotMinimal);
            }
            let header = FixedHeader {
                packet_type,
                flags,
                header_len: 2 + i,
                remaining_len: value,
            };
            if header.frame_len() > max_packet_size {
                return Err(CodecError::PacketTooLarge {
                    size: header.frame_len(),
                    max: max_packet_size,
                });
            }
            return Ok(Some(header));
        }
        multiplier *= 128;
    }
    Err(CodecError::RemainingLengthTooLong)
}

/// Bytes a variable byte integer takes (§1.5.5); `None` above 268,435,455.
pub(crate) fn varint_len(value: usize) -> Option<usize> {
    match value {
        0..=127 => Some(1),
        128..=16_383 => Some(2),
        16_384..=2_097_151 => Some(3),
        2_097_152..=MAX_REMAINING_LENGTH => Some(4),
        _ => None,
    }
}
