//! Codec errors: what went wrong and where, and how the server answers it.

use thiserror::Error;

/// How the specification classifies a decoding error; it decides the v5 DISCONNECT (or CONNACK)
/// reason code and whether the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The bytes cannot be parsed according to the specification (MQTT 5 §1.2 "Malformed Packet").
    Malformed,
    /// The bytes parse but break a rule of the protocol (MQTT 5 §1.2 "Protocol Error").
    Protocol,
    /// The packet is larger than the maximum packet size.
    TooLarge,
    /// A CONNECT with a protocol name or level this server does not speak.
    UnsupportedProtocol,
    /// Encoding a value that does not fit the wire format (a bug or a limit of the caller).
    Encode,
}

/// An error while checking, decoding or encoding a packet. Messages are lowercase and say which
/// packet and which field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    /// Refused from the fixed header, before the packet is buffered.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    #[error("remaining length has more than 4 bytes")]
    RemainingLengthTooLong,
    #[error("remaining length is not encoded in the minimum number of bytes")]
    RemainingLengthNotMinimal,
    #[error("unknown packet type {0}")]
    UnknownPacketType(u8),
    #[error("{packet}: reserved flags must be {expected:04b}, got {got:04b}")]
    ReservedFlags {
        packet: &'static str,
        expected: u8,
        got: u8,
    },
    #[error("{packet}: packet ends inside `{field}`")]
    Truncated {
        packet: &'static str,
        field: &'static str,
    },
    #[error("{packet}: {count} unexpected bytes after the last field")]
    TrailingBytes { packet: &'static str, count: usize },
    #[error("{packet}: `{field}` is not valid utf-8")]
    InvalidUtf8 {
        packet: &'static str,
        field: &'static str,
    },
    #[error("{packet}: `{field}` contains the null character U+0000")]
    NulCharacter {
        packet: &'static str,
        field: &'static str,
    },
    #[error("{packet} topic contains a wildcard `{wildcard}`")]
    WildcardInTopic {
        packet: &'static str,
        wildcard: char,
    },
    #[error("{packet}: invalid topic filter `{filter}`: {reason}")]
    InvalidTopicFilter {
        packet: &'static str,
        filter: String,
        reason: &'static str,
    },
    #[error("{packet}: invalid qos {qos}")]
    InvalidQos { packet: &'static str, qos: u8 },
    #[error("{packet}: packet identifier must not be 0")]
    ZeroPacketId { packet: &'static str },
    #[error("{packet}: invalid reason code 0x{code:02x}")]
    InvalidReasonCode { packet: &'static str, code: u8 },
    #[error("{packet}: unknown property identifier 0x{id:02x}")]
    UnknownProperty { packet: &'static str, id: u8 },
    #[error("{packet}: property `{property}` is not allowed in this packet")]
    PropertyNotAllowed {
        packet: &'static str,
        property: &'static str,
    },
    #[error("{packet}: property `{property}` appears more than once")]
    DuplicateProperty {
        packet: &'static str,
        property: &'static str,
    },
    #[error("{packet}: property `{property}` has the invalid value {value}")]
    InvalidPropertyValue {
        packet: &'static str,
        property: &'static str,
        value: u32,
    },
    /// Any other unparsable packet.
    #[error("{packet}: {reason}")]
    Malformed {
        packet: &'static str,
        reason: &'static str,
    },
    /// Any other breach of a protocol rule.
    #[error("{packet}: {reason}")]
    Protocol {
        packet: &'static str,
        reason: &'static str,
    },
    #[error("connect: unsupported protocol `{name}` level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
    /// Encoding: a string or binary field longer than 65,535 bytes, or a packet longer than
    /// the 268,435,455 bytes a remaining length can express.
    #[error("cannot encode {packet}: `{field}` is too long ({len} bytes)")]
    TooLongToEncode {
        packet: &'static str,
        field: &'static str,
        len: usize,
    },
}

impl CodecError {
    /// The specification's classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::PacketTooLarge { .. } => ErrorKind::TooLarge,
            Self::UnsupportedProtocol { .. } => ErrorKind::UnsupportedProtocol,
            Self::TooLongToEncode { .. } => ErrorKind::Encode,
            Self::Protocol { .. }
            | Self::DuplicateProperty { .. }
            | Self::InvalidPropertyValue { .. }
            | Self::ZeroPacketId { .. }
            | Self::InvalidReasonCode { .. } => ErrorKind::Protocol,
            Self::RemainingLengthTooLong
            | Self::RemainingLengthNotMinimal
            | Self::UnknownPacketType(_)
            | Self::ReservedFlags { .. }
            | Self::Truncated { .. }
            | Self::TrailingBytes { .. }
            | Self::InvalidUtf8 { .. }
            | Self::NulCharacter { .. }
            | Self::WildcardInTopic { .. }
            | Self::InvalidTopicFilter { .. }
            | Self::InvalidQos { .. }
            | Self::UnknownProperty { .. }
            | Self::PropertyNotAllowed { .. }
            | Self::Malformed { .. } => ErrorKind::Malformed,
        }
    }

    /// True for a Malformed Packet, false for a Protocol Error and the others.
    pub fn is_malformed(&self) -> bool {
        self.kind() == ErrorKind::Malformed
    }

    /// The MQTT 5 reason code for the DISCONNECT (or, for a CONNECT, the CONNACK) the server
    /// sends before closing: 0x81 malformed packet, 0x82 protocol error, 0x95 packet too large,
    /// 0x84 unsupported protocol version, 0x83 implementation specific error for encoding.
    pub fn reason_code(&self) -> u8 {
        match self.kind() {
            ErrorKind::Malformed => 0x81,
            ErrorKind::Protocol => 0x82,
            ErrorKind::TooLarge => 0x95,
            ErrorKind::UnsupportedProtocol => 0x84,
            ErrorKind::Encode => 0x83,
        }
    }

    /// The MQTT 3.1.1 CONNACK return code for a refused CONNECT, if the specification asks for
    /// one: 0x01 "unacceptable protocol version". Other errors just close the connection.
    pub fn v4_connack_code(&self) -> Option<u8> {
        match self {
            Self::UnsupportedProtocol { .. } => Some(0x01),
            _ => None,
        }
    }
}
