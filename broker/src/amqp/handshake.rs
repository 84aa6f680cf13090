//! The AMQP connection handshake (specification §2.2.4): protocol header → `connection.start`
//! (mechanisms PLAIN and AMQPLAIN) → `start-ok` credentials → [`Core::authenticate`] →
//! `tune` / `tune-ok` → `open` (vhost `/`) → `open-ok`, the connection attached to the core.
//! Runs boxed: its locals live on the heap only while it runs.
//!
//! Credentials map to DESIGN.md §2 as over MQTT: user name = solution ID and password = a
//! solution secret; or a JWT as password with the solution from its claim, or from the API
//! token as user name or as client property `x-cr-api-token`. The client property `client_id`,
//! if given, is the connection's client ID (the `iot-things:<solution>:<clientId>` subject of
//! a secret); otherwise one is assigned. A refusal is `connection.close` 403 ACCESS_REFUSED with
//! RabbitMQ's neutral text, counted and rate-limited by the core like an MQTT refusal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::BytesMut;
use tokio::time::timeout;

use crate::amqp::codec::{self, FRAME_MIN_SIZE, Frame, PROTOCOL_HEADER};
use crate::amqp::connection::Conn;
use crate::amqp::reply;
use crate::core::identity::API_TOKEN_PROPERTY;
use crate::core::session::Protocol;
use crate::core::{Core, Credentials, SessionRequest, assign_client_id};
use crate::limits::amqp as limits;
use crate::mqtt::admission::{Admission, HandshakeSlot};
use crate::mqtt::transport::Transport;

/// What a refused login is told (RabbitMQ's words: nothing about why).
fn refused(mechanism: &str) -> String {
    let mechanism = if mechanism == "AMQPLAIN" {
        "AMQPLAIN"
    } else {
        "PLAIN"
    };
    format!(
        "ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
    )
}

/// Runs the handshake within the connect timeout: the connection, ready for its main loop, or
/// `None` (refused, closed or timed out; the client was told where the protocol allows).
pub(crate) async fn open(
    core: &Arc<Core>,
    mut io: Transport,
    peer: SocketAddr,
    slot: HandshakeSlot,
    admission: &Admission,
) -> Option<Box<Conn>> {
    let mut rbuf = BytesMut::new();
    let limit = admission.handshake_timeout(core.settings.connect_timeout());
    let result = timeout(limit, negotiate(core, &mut io, &mut rbuf, peer, admission)).await;
    match result {
        Ok(Ok(negotiated)) => {
            drop(slot);
            Some(Box::new(Conn::new(core.clone(), io, rbuf, negotiated)))
        }
        Ok(Err(Failure::Closed)) => None,
        Ok(Err(Failure::Refuse(code, text, class, method))) => {
            let mut out = Vec::new();
            reply::connection_close(&mut out, code, &text, class, method);
            let _ = timeout(Duration::from_secs(1), io.write_all(&out)).await;
            // The client's close-ok (or its hanging up), briefly; then the socket goes.
            let _ = timeout(Duration::from_secs(1), read_frame(&mut io, &mut rbuf)).await;
            io.shutdown().await;
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "AMQP handshake not done within the connect timeout");
            None
        }
    }
}

/// What the handshake settled.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub client: crate::core::Client,
    pub frame_max: u32,
    pub channel_max: u16,
    /// Seconds (0: none).
    pub heartbeat: u16,
    pub slot: crate::mqtt::admission::ConnectionSlot,
}

enum Failure {
    /// The peer went away or spoke something else (it was answered if the protocol says so).
    Closed,
    /// `connection.close` with this code and text for this class and method, then the end.
    Refuse(u16, String, u16, u16),
}

async fn negotiate(
    core: &Arc<Core>,
    io: &mut Transport,
    rbuf: &mut BytesMut,
    peer: SocketAddr,
    admission: &Admission,
) -> Result<Negotiated, Failure> {
    // The protocol header.
    while rbuf.len() < PROTOCOL_HEADER.len() {
        match io.read_into(rbuf).await {
            Ok(0) | Err(_) => return Err(Failure::Closed),
            Ok(_) => {}
        }
    }
    if rbuf.get(..8) != Some(&PROTOCOL_HEADER[..]) {
        // Specification §4.2.2: answer with the header we speak, then close.
        core.metrics.protocol_error("amqp_bad_protocol_header");
        let _ = io.write_all(PROTOCOL_HEADER).await;
        io.shutdown().await;
        return Err(Failure::Closed);
    }
    let _ = rbuf.split_to(8);
    let mut out = Vec::new();
    reply::method(&mut out, 0, start());
    io.write_all(&out).await.map_err(|_| Failure::Closed)?;

    // connection.start-ok: the credentials.
    let start_ok = match read_frame(io, rbuf).await? {
        Frame::Method(0, class) => match *class {
            AMQPClass::Connection(connection::AMQPMethod::StartOk(ok)) => ok,
            _ => return Err(unexpected("expected connection.start-ok")),
        },
        _ => return Err(unexpected("expected connection.start-ok")),
    };
    let Some((username, password)) = login(&start_ok) else {
        core.metrics.refused("bad_sasl_response");
        return Err(Failure::Refuse(
            403,
            refused(start_ok.mechanism.as_str()),
            10,
            11,
        ));
    };
    let api_token = property_text(&start_ok.client_properties, API_TOKEN_PROPERTY);
    let client_id = match property_text(&start_ok.client_properties, "client_id") {
        Some(id) if !id.is_empty() => id,
        _ => assign_client_id().ok_or(Failure::Refuse(
            541,
            "INTERNAL_ERROR - no client ID could be assigned".to_owned(),
            10,
            11,
        ))?,
    };
    let credentials = Credentials {
        client_id: &client_id,
        username: Some(username.as_str()).filter(|u| !u.is_empty()),
        password: Some(password.as_slice()).filter(|p| !p.is_empty()),
        method: None,
        token: None,
        api_token: api_token.as_deref(),
    };
    let identity = match core.authenticate(&credentials, peer.ip()).await {
        Ok(identity) => identity,
        Err(_) => {
            return Err(Failure::Refuse(
                403,
                refused(start_ok.mechanism.as_str()),
                10,
                11,
            ));
        }
    };
    let Some(slot) = admission.connection() else {
        core.metrics.refused("server_busy");
        return Err(Failure::Refuse(
            530,
            "NOT_ALLOWED - the server has as many connections as it accepts".to_owned(),
            10,
            11,
        ));
    };

    // connection.tune / tune-ok.
    out.clear();
    reply::method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: limits::CHANNEL_MAX,
            frame_max: limits::FRAME_MAX,
            heartbeat: limits::HEARTBEAT_SECONDS,
        })),
    );
    io.write_all(&out).await.map_err(|_| Failure::Closed)?;
    let tune_ok = match read_frame(io, rbuf).await? {
        Frame::Method(0, class) => match *class {
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(ok)) => ok,
            _ => return Err(unexpected("expected connection.tune-ok")),
        },
        _ => return Err(unexpected("expected connection.tune-ok")),
    };
    let frame_max = match tune_ok.frame_max {
        0 => limits::FRAME_MAX,
        n => n.clamp(FRAME_MIN_SIZE, limits::FRAME_MAX),
    };
    let channel_max = match tune_ok.channel_max {
        0 => limits::CHANNEL_MAX,
        n => n.min(limits::CHANNEL_MAX),
    };
    let heartbeat = tune_ok.heartbeat;

    // connection.open (vhost `/`).
    let open = match read_frame(io, rbuf).await? {
        Frame::Method(0, class) => match *class {
            AMQPClass::Connection(connection::AMQPMethod::Open(open)) => open,
            _ => return Err(unexpected("expected connection.open")),
        },
        _ => return Err(unexpected("expected connection.open")),
    };
    if open.virtual_host.as_str() != "/" {
        return Err(Failure::Refuse(
            530,
            format!(
                "NOT_ALLOWED - vhost {} not found (Thingsgate has one: /)",
                printable(open.virtual_host.as_str())
            ),
            10,
            40,
        ));
    }
    if let Some(at) = identity.expires_at()
        && at <= std::time::SystemTime::now()
    {
        return Err(Failure::Refuse(
            403,
            refused(start_ok.mechanism.as_str()),
            10,
            40,
        ));
    }
    core.claim(&identity).await;
    let attached = core
        .attach(
            identity,
            SessionRequest {
                clean_start: true,
                expiry_seconds: 0,
                protocol: Protocol::Amqp,
            },
        )
        .map_err(|_| {
            Failure::Refuse(
                530,
                "NOT_ALLOWED - the solution has as many sessions as it may".to_owned(),
                10,
                40,
            )
        })?;
    out.clear();
    reply::method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
    );
    if io.write_all(&out).await.is_err() {
        let client = attached.client;
        core.detach(&client);
        core.expire_session(&client, 0);
        return Err(Failure::Closed);
    }
    tracing::debug!(
        %peer,
        solution = %attached.client.space.id,
        client = %attached.client.session.client_id,
        "AMQP connection open"
    );
    Ok(Negotiated {
        client: attached.client,
        frame_max,
        channel_max,
        heartbeat,
        slot,
    })
}

fn unexpected(what: &str) -> Failure {
    Failure::Refuse(503, format!("COMMAND_INVALID - {what}"), 10, 0)
}

/// The next frame of the handshake (frames of at most [`FRAME_MIN_SIZE`]… up to 16 KiB: a
/// `start-ok` carries a token).
async fn read_frame(io: &mut Transport, rbuf: &mut BytesMut) -> Result<Frame, Failure> {
    loop {
        match codec::decode(rbuf, limits::HANDSHAKE_FRAME_MAX) {
            Ok(Some(Frame::Heartbeat)) => continue,
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => {
                return Err(Failure::Refuse(
                    e.reply_code(),
                    format!("FRAME_ERROR - {e}"),
                    0,
                    0,
                ));
            }
        }
        match io.read_into(rbuf).await {
            Ok(0) | Err(_) => return Err(Failure::Closed),
            Ok(_) => {}
        }
    }
}

/// `connection.start`: our capabilities as RabbitMQ names them, so clients enable what we do.
fn start() -> AMQPClass {
    let mut capabilities = FieldTable::default();
    for (name, on) in [
        ("publisher_confirms", true),
        ("basic.nack", true),
        ("consumer_cancel_notify", true),
        ("authentication_failure_close", true),
        ("per_consumer_qos", true),
        ("connection.blocked", false),
        ("exchange_exchange_bindings", false),
        ("direct_reply_to", false),
    ] {
        capabilities.insert(ShortString::from(name), AMQPValue::Boolean(on));
    }
    let mut properties = FieldTable::default();
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    for (name, value) in [
        ("product", "Thingsgate"),
        ("version", env!("CARGO_PKG_VERSION")),
        ("platform", "Rust"),
        (
            "information",
            "AMQP 0.9.1 devices and applications on the Thingsgate core",
        ),
    ] {
        properties.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    }
    AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
        version_major: 0,
        version_minor: 9,
        server_properties: properties,
        mechanisms: LongString::from(b"PLAIN AMQPLAIN".to_vec()),
        locales: LongString::from(b"en_US".to_vec()),
    }))
}

/// User name and password of a `start-ok` (PLAIN: `authzid NUL user NUL password`; AMQPLAIN: a
/// field table without its length with `LOGIN` and `PASSWORD`).
fn login(start_ok: &connection::StartOk) -> Option<(String, Vec<u8>)> {
    let response = start_ok.response.as_bytes();
    match start_ok.mechanism.as_str() {
        "PLAIN" => {
            let mut parts = response.splitn(3, |&b| b == 0);
            let _authzid = parts.next()?;
            let user = parts.next()?;
            let password = parts.next()?;
            Some((String::from_utf8(user.to_vec()).ok()?, password.to_vec()))
        }
        "AMQPLAIN" => {
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
            let user = property_text(&table, "LOGIN")?;
            let password = property_text(&table, "PASSWORD")?;
            Some((user, password.into_bytes()))
        }
        _ => None,
    }
}

/// A text value of a field table (long or short string).
fn property_text(table: &FieldTable, name: &str) -> Option<String> {
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A client-chosen name in a reply text: at most 64 characters, control characters escaped.
pub(crate) fn printable(name: &str) -> String {
    let mut text: String = name.chars().take(64).flat_map(char::escape_debug).collect();
    if name.chars().count() > 64 {
        text.push('…');
    }
    format!("'{text}'")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn start_ok(mechanism: &str, response: Vec<u8>) -> connection::StartOk {
        connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: mechanism.into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        }
    }

    #[test]
    fn plain_and_amqplain_give_user_and_password() {
        let plain = start_ok("PLAIN", b"\0acme\0s3cret".to_vec());
        assert_eq!(
            login(&plain).unwrap(),
            ("acme".to_owned(), b"s3cret".to_vec())
        );
        let mut table = FieldTable::default();
        table.insert(
            "LOGIN".into(),
            AMQPValue::LongString(b"acme".to_vec().into()),
        );
        table.insert(
            "PASSWORD".into(),
            AMQPValue::LongString(b"pw".to_vec().into()),
        );
        let (encoded, _) =
            amq_protocol::types::generation::gen_field_table(&table)(Vec::new().into())
                .unwrap()
                .into_inner();
        // Without the 4-byte length, as AMQPLAIN sends it.
        let amqplain = start_ok("AMQPLAIN", encoded[4..].to_vec());
        assert_eq!(
            login(&amqplain).unwrap(),
            ("acme".to_owned(), b"pw".to_vec())
        );
        assert!(login(&start_ok("EXTERNAL", Vec::new())).is_none());
        assert!(login(&start_ok("PLAIN", b"no-separators".to_vec())).is_none());
    }

    #[test]
    fn client_chosen_names_are_escaped_and_cut() {
        assert_eq!(printable("a\nb"), "'a\\nb'");
        assert!(printable(&"x".repeat(100)).ends_with("…'"));
    }
}
