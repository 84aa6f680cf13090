//! The CONNECT handshake: read the CONNECT within the connect timeout, turn it into the core's
//! [`Credentials`] and [`SessionRequest`], and answer with the CONNACK the core's decision
//! maps to. Runs boxed (`crate::mqtt::connection::serve`): its large locals live on the heap
//! only while it runs.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::time::timeout;

use crate::core::identity::{API_TOKEN_PROPERTY, JWT_METHOD};
use crate::core::{Attached, Core, Credentials, SessionRequest, assign_client_id};
use crate::mqtt::admission::{Admission, ConnectionSlot, HandshakeSlot};
use crate::mqtt::codec::{self, CodecError, ConnAck, Connect, Packet, Properties, Protocol};
use crate::mqtt::connection::Conn;
use crate::mqtt::outbound::{Outbound, TopicAliases};
use crate::mqtt::reason::ConnectRefusal;
use crate::mqtt::transport::Transport;
use crate::mqtt::will;

/// Reads the CONNECT within the connect timeout and answers it: the connection, ready for its
/// main loop, or `None` (refused, closed or timed out).
pub(crate) async fn open(
    core: &Arc<Core>,
    mut io: Transport,
    peer: SocketAddr,
    slot: HandshakeSlot,
    admission: &Admission,
    done: tokio::sync::mpsc::Sender<()>,
) -> Option<Box<Conn>> {
    let mut rbuf = BytesMut::new();
    let max_packet = core.settings.max_packet_size as usize;
    let connect = timeout(
        admission.handshake_timeout(core.settings.connect_timeout()),
        read_connect(&mut io, &mut rbuf, max_packet),
    )
    .await;
    match connect {
        Ok(Ok(Some(connect))) => {
            let mut shutdown = core.shutdown.clone();
            if *shutdown.borrow_and_update() {
                return None;
            }
            let Some(connection) = admission.connection() else {
                // At `max_connections`: told at once, not left waiting.
                core.metrics.refused("server_busy");
                let code = ConnectRefusal::ServerBusy.code(connect.protocol);
                // Decided: the slot is free before the client reads the answer (so a client
                // told "busy" that tries again at once finds it free).
                drop(slot);
                send_and_close(&mut io, connect.protocol, &connack(false, code)).await;
                return None;
            };
            let conn = accept(core, io, rbuf, peer, connect, connection, done).await;
            // The handshake is over: its slot is free for the next socket.
            drop(slot);
            return conn;
        }
        Ok(Ok(None)) => {}
        Ok(Err(ConnectFailure::Io(e))) => {
            tracing::debug!(%peer, error = %e, "connection closed before CONNECT");
        }
        Ok(Err(ConnectFailure::Codec(e))) => {
            core.metrics.protocol_error("bad_connect");
            tracing::debug!(%peer, error = %e, "refused a bad CONNECT");
            if let Some(code) = e.v4_connack_code() {
                send_and_close(&mut io, Protocol::V311, &connack(false, code)).await;
            } else {
                io.shutdown().await;
            }
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
        }
    }
    None
}

enum ConnectFailure {
    Io(std::io::Error),
    Codec(CodecError),
}

async fn read_connect(
    io: &mut Transport,
    rbuf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<Connect>, ConnectFailure> {
    loop {
        match codec::decode_connect(rbuf, max_packet) {
            Ok(Some(connect)) => return Ok(Some(connect)),
            Ok(None) => {}
            Err(e) => return Err(ConnectFailure::Codec(e)),
        }
        match io.read_into(rbuf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(ConnectFailure::Io(e)),
        }
    }
}

fn connack(session_present: bool, code: u8) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code,
        properties: Properties::default(),
    })
}

/// The CONNECT's credentials as the core takes them: the API token from the MQTT 5 user
/// property `x-cr-api-token` (the core falls back to the user name).
fn credentials<'a>(connect: &'a Connect, client_id: &'a str) -> Credentials<'a> {
    Credentials {
        client_id,
        username: connect.username.as_ref().map(|u| u.as_str()),
        password: connect.password.as_deref(),
        method: connect
            .properties
            .authentication_method
            .as_ref()
            .map(|m| m.as_str()),
        token: connect.properties.authentication_data.as_deref(),
        api_token: connect
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| k.as_str() == API_TOKEN_PROPERTY)
            .map(|(_, v)| v.as_str()),
    }
}

async fn accept(
    core: &Arc<Core>,
    mut io: Transport,
    rbuf: BytesMut,
    peer: SocketAddr,
    connect: Connect,
    slot: ConnectionSlot,
    done: tokio::sync::mpsc::Sender<()>,
) -> Option<Box<Conn>> {
    let protocol = connect.protocol;
    let v5 = protocol == Protocol::V5;
    let refuse = |refusal: ConnectRefusal| connack(false, refusal.code(protocol));
    // The client ID: assigned when empty (3.1.1 only with Clean Session).
    let mut assigned = None;
    let client_id: Arc<str> = if connect.client_id.is_empty() {
        if !v5 && !connect.clean_start {
            send_and_close(&mut io, protocol, &refuse(ConnectRefusal::ClientIdRejected)).await;
            core.metrics.refused("client_id_rejected");
            return None;
        }
        let Some(id) = assign_client_id() else {
            // No randomness, no unguessable client ID: refuse rather than make one up.
            tracing::error!("the system random generator failed; cannot assign a client ID");
            send_and_close(&mut io, protocol, &refuse(ConnectRefusal::ServerError)).await;
            return None;
        };
        assigned = Some(id.clone());
        id.into()
    } else {
        connect.client_id.as_str().into()
    };
    let identity = match core
        .authenticate(&credentials(&connect, &client_id), peer.ip())
        .await
    {
        Ok(identity) => identity,
        Err(refusal) => {
            send_and_close(&mut io, protocol, &refuse(refusal.into())).await;
            return None;
        }
    };
    let jwt_method = identity.jwt_method;
    // Session expiry: v5 from CONNECT, 3.1.1 persistent sessions get the maximum.
    let expiry_seconds = if v5 {
        connect.properties.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        u32::MAX
    };
    let request = SessionRequest {
        clean_start: connect.clean_start,
        expiry_seconds,
        protocol: io.protocol(),
    };
    // Cluster mode: the client ID is taken from whichever node holds it.
    core.claim(&identity).await;
    let Attached {
        client,
        session_present,
        capped_expiry,
        saved,
    } = match core.attach(identity, request) {
        Ok(attached) => attached,
        Err(_) => {
            send_and_close(&mut io, protocol, &refuse(ConnectRefusal::QuotaExceeded)).await;
            return None;
        }
    };
    // A persistent session is acknowledged once its record is durable (a failure is logged
    // by the core: the session then lives in memory only).
    if let Some(saved) = saved {
        let _ = saved.await;
    }

    let settings = &core.settings;
    let mut properties = Properties::default();
    let mut keep_alive = connect.keep_alive;
    if v5 {
        properties.receive_maximum = NonZeroU16::new(settings.receive_maximum);
        properties.maximum_packet_size = NonZeroU32::new(settings.max_packet_size);
        properties.topic_alias_maximum = Some(settings.topic_alias_maximum);
        properties.retain_available = Some(true);
        properties.wildcard_subscription_available = Some(true);
        properties.subscription_identifiers_available = Some(true);
        properties.shared_subscription_available = Some(true);
        if let Some(id) = &assigned {
            properties.assigned_client_identifier = id.parse().ok();
        }
        properties.session_expiry_interval = capped_expiry;
        if jwt_method {
            properties.authentication_method = JWT_METHOD.parse().ok();
        }
        let max = settings.max_keep_alive_seconds;
        if max > 0 && (keep_alive == 0 || keep_alive > max) {
            keep_alive = max;
            properties.server_keep_alive = Some(max);
        }
    }
    let client_receive_max = connect
        .properties
        .receive_maximum
        .map_or(u16::MAX, NonZeroU16::get);
    let mut conn = Box::new(Conn {
        core: core.clone(),
        io,
        rbuf,
        wbuf: BytesMut::new(),
        peer,
        protocol,
        client,
        will: connect.will.as_ref().map(|w| Box::new(will::owned(w))),
        keep_alive,
        max_inflight: settings.max_inflight.min(client_receive_max),
        client_max_packet: connect
            .properties
            .maximum_packet_size
            .map_or(u32::MAX, |n| n.get()),
        aliases: None,
        out_aliases: TopicAliases::new(if v5 {
            connect.properties.topic_alias_maximum.unwrap_or(0).min(64)
        } else {
            0
        }),
        problem_information: connect.properties.request_problem_information != Some(false),
        in_order: Default::default(),
        _slot: slot,
        _done: done,
        keep_alive_deadline: None,
        timer_armed: false,
    });
    // The keep-alive counts from the CONNACK.
    conn.keep_alive_deadline = conn.keep_alive_deadline();
    // The connection's span (`connection::spawn`), if it has one, learns who connected.
    let span = tracing::Span::current();
    span.record(
        "client",
        tracing::field::display(&conn.client.session.client_id),
    );
    span.record("solution", tracing::field::display(&conn.client.space.id));
    conn.outbound().packet(&Packet::ConnAck(ConnAck {
        session_present,
        code: 0,
        properties,
    }));
    tracing::debug!(
        peer = %conn.peer,
        solution = %conn.client.space.id,
        client = %conn.client.session.client_id,
        session_present,
        "connected"
    );
    if session_present {
        let session = conn.client.session.clone();
        let state = session.lock();
        let mut out = Outbound {
            buf: &mut conn.wbuf,
            protocol,
            max_packet_size: conn.client_max_packet,
            metrics: &core.metrics,
            aliases: &mut conn.out_aliases,
        };
        state.resend_inflight(|resend| out.resend(resend));
    }
    // The CONNECT's fields are slices of the first read buffer: let it go before idling.
    drop(connect);
    if conn.rbuf.is_empty() {
        conn.rbuf = BytesMut::new();
    }
    Some(conn)
}

async fn send_and_close(io: &mut Transport, protocol: Protocol, packet: &Packet) {
    let mut out = BytesMut::new();
    if packet.encode(protocol, &mut out).is_ok() {
        let _ = io.write_all(&out).await;
    }
    io.shutdown().await;
}
