//! MQTT's codes as types: the reason codes of MQTT 5 (one numbering shared by every packet that
//! carries one, §2.4), the CONNACK refusals with their 3.1.1 return codes, and why a connection
//! closes. The codec carries the bytes; the connection chooses with these.

use crate::core::{Refusal, Verdict};
use crate::mqtt::codec::Protocol;

/// An MQTT 5 reason code (the ones this server sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReasonCode {
    Success = 0x00,
    /// DISCONNECT from a client: publish the will anyway.
    DisconnectWithWill = 0x04,
    /// UNSUBACK: the session had no such subscription.
    NoSubscriptionExisted = 0x11,
    /// AUTH from a client: re-authenticate.
    ReAuthenticate = 0x19,
    UnspecifiedError = 0x80,
    MalformedPacket = 0x81,
    ProtocolError = 0x82,
    ClientIdentifierNotValid = 0x85,
    BadUserNameOrPassword = 0x86,
    NotAuthorized = 0x87,
    ServerBusy = 0x89,
    BadAuthenticationMethod = 0x8C,
    ServerShuttingDown = 0x8B,
    KeepAliveTimeout = 0x8D,
    SessionTakenOver = 0x8E,
    TopicNameInvalid = 0x90,
    PacketIdentifierNotFound = 0x92,
    ReceiveMaximumExceeded = 0x93,
    TopicAliasInvalid = 0x94,
    PacketTooLarge = 0x95,
    QuotaExceeded = 0x97,
    PayloadFormatInvalid = 0x99,
    ConnectionRateExceeded = 0x9F,
}

impl ReasonCode {
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Whether the code says the request failed (MQTT 5: 0x80 and above).
    pub const fn is_failure(self) -> bool {
        Self::is_failure_code(self.code())
    }

    /// Whether a code a client sent says failure.
    pub const fn is_failure_code(code: u8) -> bool {
        code >= 0x80
    }

    /// The PUBACK/PUBREC reason for what the core told the publisher.
    pub fn of_verdict(verdict: Verdict) -> Self {
        match verdict {
            Verdict::Accepted => ReasonCode::Success,
            Verdict::NotAuthorized => ReasonCode::NotAuthorized,
            Verdict::Failed => ReasonCode::UnspecifiedError,
            Verdict::BadTopic => ReasonCode::TopicNameInvalid,
            Verdict::BadPayload => ReasonCode::PayloadFormatInvalid,
        }
    }
}

/// Why a CONNECT is refused, as CONNACK says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    ClientIdRejected,
    BadCredentials,
    NotAuthorized,
    BadAuthenticationMethod,
    RateLimited,
    /// The solution's session bound is reached.
    QuotaExceeded,
    /// The server's connection bound is reached.
    ServerBusy,
    /// The server cannot serve it (no random client ID could be made).
    ServerError,
}

impl ConnectRefusal {
    /// The CONNACK return code (3.1.1) or reason code (5.0).
    pub fn code(self, protocol: Protocol) -> u8 {
        let v5 = match self {
            ConnectRefusal::ClientIdRejected => ReasonCode::ClientIdentifierNotValid,
            ConnectRefusal::BadCredentials => ReasonCode::BadUserNameOrPassword,
            ConnectRefusal::NotAuthorized => ReasonCode::NotAuthorized,
            ConnectRefusal::BadAuthenticationMethod => ReasonCode::BadAuthenticationMethod,
            ConnectRefusal::RateLimited => ReasonCode::ConnectionRateExceeded,
            ConnectRefusal::QuotaExceeded => ReasonCode::QuotaExceeded,
            ConnectRefusal::ServerBusy => ReasonCode::ServerBusy,
            ConnectRefusal::ServerError => ReasonCode::UnspecifiedError,
        };
        match protocol {
            Protocol::V5 => v5.code(),
            // 3.1.1 §3.2.2.3: 2 identifier rejected, 3 server unavailable, 4 bad user name or
            // password, 5 not authorized.
            Protocol::V311 => match self {
                ConnectRefusal::ClientIdRejected => 2,
                ConnectRefusal::QuotaExceeded
                | ConnectRefusal::ServerBusy
                | ConnectRefusal::ServerError => 3,
                ConnectRefusal::BadCredentials => 4,
                ConnectRefusal::NotAuthorized
                | ConnectRefusal::BadAuthenticationMethod
                | ConnectRefusal::RateLimited => 5,
            },
        }
    }
}

impl From<Refusal> for ConnectRefusal {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::BadCredentials(_) => ConnectRefusal::BadCredentials,
            Refusal::NotAuthorized(_) => ConnectRefusal::NotAuthorized,
            Refusal::BadAuthenticationMethod => ConnectRefusal::BadAuthenticationMethod,
            Refusal::RateLimited => ConnectRefusal::RateLimited,
            Refusal::BadClientId => ConnectRefusal::ClientIdRejected,
        }
    }
}

/// A client broke the protocol (the connection closes; v5 DISCONNECT 0x82).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Any other protocol error the codec found.
    Codec,
    SecondConnect,
    ServerPacketFromClient,
    NoLocalOnSharedSubscription,
    /// MQTT-3.3.4-6: only the server puts subscription identifiers on a PUBLISH.
    SubscriptionIdFromClient,
    EmptyTopic,
    UnknownTopicAlias,
    /// MQTT-3.14.2-2: a session expiry set on DISCONNECT after CONNECT said 0.
    SessionExpiryAfterZero,
    /// AUTH without a `jwt` CONNECT, or with another method or reason.
    UnexpectedAuth,
}

/// Why a connection ends: what the server tells a v5 client, whether the will is published,
/// and the label for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client sent DISCONNECT (0x04: "with will message").
    Disconnected {
        with_will: bool,
    },
    ClosedByClient,
    ReadFailed,
    WriteFailed,
    Malformed,
    PacketTooLarge,
    Protocol(Violation),
    ReceiveMaximumExceeded,
    TopicAliasInvalid,
    TakenOver,
    /// The solution secret it connected with was revoked.
    CredentialsRevoked,
    ShuttingDown,
    KeepAliveTimeout,
    TokenExpired,
    ReauthWithoutToken,
    ReauthRefused,
    ReauthOtherIdentity,
}

impl Close {
    /// The v5 DISCONNECT reason the server sends, if it sends one.
    pub fn server_reason(self) -> Option<ReasonCode> {
        Some(match self {
            Close::Disconnected { .. }
            | Close::ClosedByClient
            | Close::ReadFailed
            | Close::WriteFailed => return None,
            Close::Malformed => ReasonCode::MalformedPacket,
            Close::PacketTooLarge => ReasonCode::PacketTooLarge,
            Close::Protocol(_) => ReasonCode::ProtocolError,
            Close::ReceiveMaximumExceeded => ReasonCode::ReceiveMaximumExceeded,
            Close::TopicAliasInvalid => ReasonCode::TopicAliasInvalid,
            Close::TakenOver => ReasonCode::SessionTakenOver,
            Close::ShuttingDown => ReasonCode::ServerShuttingDown,
            Close::KeepAliveTimeout => ReasonCode::KeepAliveTimeout,
            Close::TokenExpired
            | Close::CredentialsRevoked
            | Close::ReauthWithoutToken
            | Close::ReauthRefused
            | Close::ReauthOtherIdentity => ReasonCode::NotAuthorized,
        })
    }

    /// Whether the will is published: always, but after a normal DISCONNECT.
    pub fn publishes_will(self) -> bool {
        match self {
            Close::Disconnected { with_will } => with_will,
            _ => true,
        }
    }

    /// The reason string of the server's DISCONNECT, where one helps the client.
    pub fn reason_string(self) -> Option<&'static str> {
        match self {
            Close::TokenExpired => Some("token expired"),
            Close::CredentialsRevoked => Some("credentials revoked"),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Close::Disconnected { .. } => "disconnect",
            Close::ClosedByClient => "closed_by_client",
            Close::ReadFailed => "read_failed",
            Close::WriteFailed => "write_failed",
            Close::Malformed => "malformed_packet",
            Close::PacketTooLarge => "packet_too_large",
            Close::Protocol(violation) => match violation {
                Violation::Codec => "protocol_error",
                Violation::SecondConnect => "second_connect",
                Violation::ServerPacketFromClient => "server_packet_from_client",
                Violation::NoLocalOnSharedSubscription => "no_local_on_shared_subscription",
                Violation::SubscriptionIdFromClient => "subscription_id_from_client",
                Violation::EmptyTopic => "empty_topic",
                Violation::UnknownTopicAlias => "unknown_topic_alias",
                Violation::SessionExpiryAfterZero => "session_expiry_after_zero",
                Violation::UnexpectedAuth => "unexpected_auth",
            },
            Close::ReceiveMaximumExceeded => "receive_maximum_exceeded",
            Close::TopicAliasInvalid => "topic_alias_invalid",
            Close::TakenOver => "session_taken_over",
            Close::CredentialsRevoked => "credentials_revoked",
            Close::ShuttingDown => "server_shutting_down",
            Close::KeepAliveTimeout => "keep_alive_timeout",
            Close::TokenExpired => "token_expired",
            Close::ReauthWithoutToken => "reauth_without_token",
            Close::ReauthRefused => "reauth_refused",
            Close::ReauthOtherIdentity => "reauth_other_identity",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ConnectRefusal, ReasonCode};
    use crate::mqtt::codec::Protocol;

    #[test]
    fn connack_refusals_have_their_code_in_each_protocol_version() {
        let cases = [
            (ConnectRefusal::ClientIdRejected, 2, 0x85),
            (ConnectRefusal::BadCredentials, 4, 0x86),
            (ConnectRefusal::NotAuthorized, 5, 0x87),
            (ConnectRefusal::BadAuthenticationMethod, 5, 0x8C),
            (ConnectRefusal::RateLimited, 5, 0x9F),
            (ConnectRefusal::QuotaExceeded, 3, 0x97),
            (ConnectRefusal::ServerBusy, 3, 0x89),
            (ConnectRefusal::ServerError, 3, 0x80),
        ];
        for (refusal, v3, v5) in cases {
            assert_eq!(refusal.code(Protocol::V311), v3, "{refusal:?}");
            assert_eq!(refusal.code(Protocol::V5), v5, "{refusal:?}");
        }
    }

    #[test]
    fn failure_codes_start_at_0x80() {
        assert!(!ReasonCode::NoSubscriptionExisted.is_failure());
        assert!(ReasonCode::UnspecifiedError.is_failure());
        assert!(ReasonCode::NotAuthorized.is_failure());
    }
}
