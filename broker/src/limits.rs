//! Every limit of the MQTT server and what happens when it is reached, in one place (STYLE.md:
//! "Limits and backpressure written down in one place"). The `[mqtt]` table of the config file
//! sets them; `THINGSGATE_MQTT_<FIELD>` environment variables override single fields.
//!
//! | limit | default | when reached |
//! |---|---|---|
//! | `max_connections` | 19,000 | authenticated connections; one more CONNECT is answered at once: v5 CONNACK 0x89 (server busy), 3.1.1 3 (server unavailable), then close |
//! | `max_handshakes` | 512 | sockets that have not finished TLS, CONNECT and authentication (apart from `max_connections`: together they stay below the 20,000 open files); at it, `accept` waits; over half of it taken, a handshake gets at most 2 s instead of `connect_timeout_seconds` (`crate::mqtt::admission`) |
//! | `max_handshakes_per_address` | 128 | handshakes from one source address; one more socket from it is closed at once (a slowloris from one address cannot hold every handshake slot) |
//! | `connect_timeout_seconds` | 10 | a socket that has not completed CONNECT by then is closed |
//! | `max_packet_size` | 1 MiB | a bigger packet is refused from its fixed header, before buffering: v5 DISCONNECT 0x95, then close |
//! | `receive_maximum` | 1,024 | incoming QoS 2 messages not yet released by PUBREL; one more: v5 DISCONNECT 0x93. Also the number of twin writes of one connection waiting for the journal: at it, the connection stops reading until some are durable (TCP backpressure) |
//! | `topic_alias_maximum` | 64 | an incoming alias above it: DISCONNECT 0x94 |
//! | `max_inflight` | 256 | outgoing QoS 1/2 messages awaiting acknowledgement per session (v5: also capped by the client's receive maximum); the rest wait in the queue |
//! | `max_queued_messages` | 1,000 | per session, messages waiting to be sent (online: a slow reader; offline: a persistent session's QoS 1/2 messages). A message arriving at a full queue is **dropped** (newest dropped, never blocking the publisher), counted in `thingsgate_messages_dropped_total{reason="queue_full"}` |
//! | `max_sessions` | 100,000 | per solution, sessions (connected or persistent); a CONNECT that would start one more is refused: v5 0x97 (quota exceeded), 3.1.1 3 (server unavailable) |
//! | `max_retained_messages` | 100,000 | per solution; a retained message on a new topic beyond it is delivered but not kept (`reason="retained_limit"`); replacing or clearing an existing one always works |
//! | `max_session_expiry_seconds` | 7 days | a longer v5 session expiry is lowered (CONNACK says so); a 3.1.1 persistent session also ends after it |
//! | `max_keep_alive_seconds` | 0 (none) | when set, a longer or zero keep-alive is replaced (v5 Server Keep Alive) |
//!
//! Other memory bounds: QoS 0 messages for an offline session are not kept (the specification
//! allows either); a message whose v5 expiry passes while queued is dropped
//! (`reason="expired"`); a message bigger than the client's maximum packet size is not sent to it
//! (`reason="too_large"`). Keep-alive: a client silent for 1.5× its interval is disconnected.
//!
//! Bridges (`crate::bridge`, fixed; docs/bridges.md says what happens at each):
//!
//! | limit | value | when reached |
//! |---|---|---|
//! | connections per solution | 100 (`bridge::config::MAX_CONNECTIONS`) | one more is refused: 409 `connectivity:connections.limit` |
//! | sources, targets per connection | 16 each | the document is refused (400) |
//! | addresses, subjects, header mappings | 64 each | the document is refused (400) |
//! | prefetch of an AMQP source | 100 unless given (1 to 65,535) | the broker delivers no more until messages are settled |
//! | a command waiting for the store | 30 s (`bridge::inbound::COMMAND_TIMEOUT`) | the message is requeued (AMQP nack) or left unacknowledged (MQTT) |
//! | a network call to the external broker | 10 s (`bridge::NETWORK_TIMEOUT`) | the attempt fails; connect again after a backoff (0.2 s doubling to 30 s, ±25 % jitter) |
//! | a target's buffer | 10,000 messages (`bridge::TARGET_BUFFER`) | the oldest is dropped, counted (`reason="bridge_buffer_full"`, status `dropped`) |
//! | subject sets with a memoized client per source | 1,024 | all are released and built again as messages come |

use std::time::Duration;

use serde::Deserialize;

/// Prefix of the variables that override `[mqtt]` fields.
pub const MQTT_ENV_PREFIX: &str = "THINGSGATE_MQTT_";

/// The `[mqtt]` table: listeners, TLS files and the limits above.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// Plain TCP listener addresses (`--mqtt` replaces them).
    pub listen: Vec<String>,
    /// TLS listener address (`--mqtts` replaces it); needs `tls_cert_file` and `tls_key_file`.
    pub tls_listen: Option<String>,
    /// PEM certificate chain, relative to the config file's directory.
    pub tls_cert_file: Option<String>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1), relative to the config file's directory.
    pub tls_key_file: Option<String>,
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    pub connect_timeout_seconds: u64,
    pub max_packet_size: u32,
    pub receive_maximum: u16,
    pub topic_alias_maximum: u16,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    pub max_retained_messages: usize,
    pub max_sessions: usize,
    pub max_session_expiry_seconds: u32,
    pub max_keep_alive_seconds: u16,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            listen: vec!["127.0.0.1:1883".to_owned()],
            tls_listen: None,
            tls_cert_file: None,
            tls_key_file: None,
            max_connections: 19_000,
            max_handshakes: 512,
            max_handshakes_per_address: 128,
            connect_timeout_seconds: 10,
            max_packet_size: 1024 * 1024,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            max_inflight: 256,
            max_queued_messages: 1000,
            max_retained_messages: 100_000,
            max_sessions: 100_000,
            max_session_expiry_seconds: 7 * 24 * 3600,
            max_keep_alive_seconds: 0,
        }
    }
}

/// A bad `[mqtt]` value.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct MqttSettingsError {
    pub field: String,
    pub message: String,
}

impl MqttSettings {
    /// Applies `THINGSGATE_MQTT_<FIELD>` overrides (lists comma-separated); an unknown field is
    /// an error, so a typo is not silently ignored.
    pub fn apply_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), MqttSettingsError> {
        for (var, value) in env {
            let Some(field) = var.strip_prefix(MQTT_ENV_PREFIX) else {
                continue;
            };
            let error = |message: &str| MqttSettingsError {
                field: var.clone(),
                message: message.to_owned(),
            };
            let text = || Some(value.clone()).filter(|v| !v.is_empty());
            match field {
                "LISTEN" => {
                    self.listen = value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "TLS_LISTEN" => self.tls_listen = text(),
                "TLS_CERT_FILE" => self.tls_cert_file = text(),
                "TLS_KEY_FILE" => self.tls_key_file = text(),
                "MAX_CONNECTIONS" => self.max_connections = whole(&var, &value)?,
                "MAX_HANDSHAKES" => self.max_handshakes = whole(&var, &value)?,
                "MAX_HANDSHAKES_PER_ADDRESS" => {
                    self.max_handshakes_per_address = whole(&var, &value)?
                }
                "CONNECT_TIMEOUT_SECONDS" => self.connect_timeout_seconds = whole(&var, &value)?,
                "MAX_PACKET_SIZE" => self.max_packet_size = whole(&var, &value)?,
                "RECEIVE_MAXIMUM" => self.receive_maximum = whole(&var, &value)?,
                "TOPIC_ALIAS_MAXIMUM" => self.topic_alias_maximum = whole(&var, &value)?,
                "MAX_INFLIGHT" => self.max_inflight = whole(&var, &value)?,
                "MAX_QUEUED_MESSAGES" => self.max_queued_messages = whole(&var, &value)?,
                "MAX_RETAINED_MESSAGES" => self.max_retained_messages = whole(&var, &value)?,
                "MAX_SESSIONS" => self.max_sessions = whole(&var, &value)?,
                "MAX_SESSION_EXPIRY_SECONDS" => {
                    self.max_session_expiry_seconds = whole(&var, &value)?
                }
                "MAX_KEEP_ALIVE_SECONDS" => self.max_keep_alive_seconds = whole(&var, &value)?,
                _ => return Err(error("names no field of [mqtt]")),
            }
        }
        self.validate()
    }

    /// Refuses values the server cannot work with.
    pub fn validate(&self) -> Result<(), MqttSettingsError> {
        let error = |field: &str, message: &str| MqttSettingsError {
            field: field.to_owned(),
            message: message.to_owned(),
        };
        if self.max_connections == 0 {
            return Err(error("max_connections", "must be at least 1"));
        }
        if self.max_handshakes == 0 {
            return Err(error("max_handshakes", "must be at least 1"));
        }
        if self.max_handshakes_per_address == 0 {
            return Err(error("max_handshakes_per_address", "must be at least 1"));
        }
        if self.max_packet_size < 64 {
            return Err(error("max_packet_size", "must be at least 64 bytes"));
        }
        if self.receive_maximum == 0 {
            return Err(error("receive_maximum", "must be at least 1"));
        }
        if self.max_inflight == 0 {
            return Err(error("max_inflight", "must be at least 1"));
        }
        if self.max_queued_messages == 0 {
            return Err(error("max_queued_messages", "must be at least 1"));
        }
        if self.connect_timeout_seconds == 0 {
            return Err(error("connect_timeout_seconds", "must be at least 1"));
        }
        if self.tls_listen.is_some()
            && (self.tls_cert_file.is_none() || self.tls_key_file.is_none())
        {
            return Err(error(
                "tls_listen",
                "a TLS listener needs `tls_cert_file` and `tls_key_file`",
            ));
        }
        Ok(())
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }
}

/// A whole number for an environment override, in the field's type.
fn whole<T: TryFrom<u64>>(var: &str, value: &str) -> Result<T, MqttSettingsError> {
    let error = |message: String| MqttSettingsError {
        field: var.to_owned(),
        message,
    };
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| error("not a whole number".to_owned()))?;
    T::try_from(n).map_err(|_| error(format!("{n} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_fields_and_refuses_unknown_ones() {
        let mut s = MqttSettings::default();
        s.apply_env([
            (
                "THINGSGATE_MQTT_MAX_PACKET_SIZE".to_owned(),
                "2048".to_owned(),
            ),
            (
                "THINGSGATE_MQTT_LISTEN".to_owned(),
                "127.0.0.1:0, [::1]:0".to_owned(),
            ),
            ("HOME".to_owned(), "/".to_owned()),
        ])
        .unwrap();
        assert_eq!(s.max_packet_size, 2048);
        assert_eq!(s.listen, ["127.0.0.1:0", "[::1]:0"]);
        let e = s
            .apply_env([("THINGSGATE_MQTT_MAX_PAKET_SIZE".to_owned(), "1".to_owned())])
            .unwrap_err();
        assert!(e.to_string().contains("names no field"), "{e}");
        let e = s
            .apply_env([(
                "THINGSGATE_MQTT_RECEIVE_MAXIMUM".to_owned(),
                "70000".to_owned(),
            )])
            .unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn a_tls_listener_needs_its_files() {
        let s = MqttSettings {
            tls_listen: Some("127.0.0.1:0".to_owned()),
            ..MqttSettings::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("tls_cert_file")
        );
    }
}

/// The limits of the AMQP 0.9.1 listener (`crate::amqp`), fixed (not configurable yet), and what
/// happens at each. Shared with MQTT: `max_connections`, the handshake bounds, the connect
/// timeout, `max_queued_messages` (per queue: a queue is a session), `max_sessions` (queues
/// count), `max_session_expiry_seconds` (a durable queue outlives its connection that long),
/// `receive_maximum` (twin writes of one connection waiting for the journal: reading pauses),
/// and `max_packet_size` as the largest message body.
///
/// | limit | value | when reached |
/// |---|---|---|
/// | frame size | 131,072 bytes (`frame_max` offered in `connection.tune`; a client may ask for less, not below 4,096) | a bigger frame is refused from its 7-byte header, before buffering: `connection.close` 501 FRAME_ERROR |
/// | frame size during the handshake | 16,384 bytes | likewise (a `start-ok` carries a token) |
/// | channels per connection | 2,047 (`channel_max`) | `channel.open` above it: `connection.close` 504 CHANNEL_ERROR |
/// | heartbeat | 60 s offered; the client's `tune-ok` value rules (0: none) | we send a heartbeat after half the interval without output; a client silent for two intervals is disconnected |
/// | queues per connection | 64 | one more `queue.declare`: `channel.close` 406 PRECONDITION_FAILED |
/// | bindings per queue | 64 | one more `queue.bind`: `channel.close` 406 PRECONDITION_FAILED |
/// | consumers per channel | 64 | one more `basic.consume`: `channel.close` 406 PRECONDITION_FAILED |
/// | unacknowledged deliveries per channel | 2,048, also when `basic.qos` asks for more or for 0 (unlimited) | deliveries wait in the queue until acknowledgements make room |
/// | message body | `max_packet_size` (1 MiB) | a larger `body-size` in a content header: `channel.close` 406 PRECONDITION_FAILED, nothing published |
/// | unfinished messages per connection | 2 × `max_packet_size` announced by content headers and not yet complete, all channels together (bodies may interleave across channels) | the content header that would pass it: `channel.close` 406 PRECONDITION_FAILED on its channel, nothing of it buffered; the others go on |
/// | deliveries written per pass | 256 KiB into the write buffer, then it is flushed before more (a queue of large messages never sits in one buffer) | — |
/// | queued messages per queue | `max_queued_messages` (1,000) | the newest message is dropped, counted (`reason="queue_full"`) |
pub mod amqp {
    pub const FRAME_MAX: u32 = 131_072;
    pub const HANDSHAKE_FRAME_MAX: u32 = 16_384;
    pub const CHANNEL_MAX: u16 = 2047;
    pub const HEARTBEAT_SECONDS: u16 = 60;
    pub const MAX_QUEUES: usize = 64;
    pub const MAX_BINDINGS: usize = 64;
    pub const MAX_CONSUMERS: usize = 64;
    pub const MAX_UNACKED: usize = 2048;
}
