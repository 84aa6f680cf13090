//! One client connection: socket ⇄ packets, CONNECT and authentication, the session it attaches
//! to, keep-alive, token expiry, takeover, and the handling of every packet a client may send.
//!
//! One task per connection. Between packets it waits on whichever comes first: bytes from the
//! socket, something queued in its session, a takeover, server shutdown, the keep-alive
//! deadline (1.5× the interval) or the token's expiry. No lock is held across an `.await`.
//!
//! Memory while idle: the read buffer is released once it is empty after a small read, so an
//! idle connection holds no read buffer (TCP waits for readability before reserving one).

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use policy::{Mode, Permission, ResourceType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout};

use crate::core::identity::{Identity, JWT_METHOD};
use crate::mqtt::codec::{
    self, Auth, CodecError, ConnAck, Connect, Disconnect, ErrorKind, Packet, Properties, Protocol,
    PubResponse, Publish, QoS, QosPid, SubAck, Subscribe, TopicName, UnsubAck, Unsubscribe, Will,
};
use crate::core::dispatch;
use crate::mqtt::server::Broker;
use crate::core::session::{
    AckOutcome, ForwardedProperties, Link, Message, Outbound, Session, SubscriptionRecord,
    TopicAliases, deep_copy_topic,
};
use crate::core::space::{SolutionSpace, Subscriber, tree_filter};

use super::twin_topics::{self, PendingWrite, PublishOutcome};

/// Client IDs longer than this are refused (3.1.1: CONNACK 2; 5.0: 0x85).
const MAX_CLIENT_ID_LEN: usize = 256;

/// A read returning fewer bytes than this, leaving the buffer empty, releases the buffer.
const SMALL_READ: usize = 512;

/// The socket: plain TCP or TLS.
#[derive(Debug)]
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Transport {
    /// Reads what is available into `buf` (0: the peer closed). Cancel-safe. TCP waits for
    /// readability before reserving buffer space, so an idle connection holds none.
    async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Tcp(stream) => loop {
                stream.readable().await?;
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
                match stream.try_read_buf(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Readiness was stale: give the space back before waiting again.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            },
            Transport::Tls(stream) => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
                stream.read_buf(buf).await
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Tcp(stream) => stream.write_all(data).await,
            Transport::Tls(stream) => {
                stream.write_all(data).await?;
                stream.flush().await
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Transport::Tcp(stream) => stream.shutdown().await,
            Transport::Tls(stream) => stream.shutdown().await,
        };
    }
}

/// Why a connection ends, and what that means for the will and the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Close {
    /// The v5 DISCONNECT reason the server sends, if it sends one.
    server_reason: Option<u8>,
    /// Publish the will (everything but a normal DISCONNECT from the client).
    will: bool,
    /// A short label for logs and metrics.
    label: &'static str,
}

impl Close {
    const fn server(reason: u8, label: &'static str) -> Self {
        Close {
            server_reason: Some(reason),
            will: true,
            label,
        }
    }

    const fn silent(label: &'static str) -> Self {
        Close {
            server_reason: None,
            will: true,
            label,
        }
    }

    fn codec(e: &CodecError) -> Self {
        match e.kind() {
            ErrorKind::TooLarge => Close::server(0x95, "packet_too_large"),
            ErrorKind::Malformed => Close::server(0x81, "malformed_packet"),
            _ => Close::server(0x82, "protocol_error"),
        }
    }
}

/// Serves one accepted socket until it closes.
///
/// The handshake and the ending run as boxed futures: their large locals (the CONNECT, its
/// CONNACK) then live on the heap only while they run, and the task of an idle connection
/// holds just the connection and its small main-loop future.
pub async fn serve(broker: Arc<Broker>, io: Transport, peer: SocketAddr) {
    broker.metrics.connections_active.inc();
    if let Some(mut conn) = Box::pin(open(&broker, io, peer)).await {
        let close = conn.run().await;
        Box::pin((*conn).finish(close)).await;
    }
    broker.metrics.connections_active.dec();
}

/// Reads the CONNECT within the connect timeout and answers it.
async fn open(broker: &Arc<Broker>, mut io: Transport, peer: SocketAddr) -> Option<Box<Conn>> {
    let mut rbuf = BytesMut::new();
    let max_packet = broker.settings.max_packet_size as usize;
    let connect = timeout(
        broker.settings.connect_timeout(),
        read_connect(&mut io, &mut rbuf, max_packet),
    )
    .await;
    match connect {
        Ok(Ok(Some(connect))) => {
            let mut shutdown = broker.shutdown.clone();
            if !*shutdown.borrow_and_update() {
                return accept(broker, io, rbuf, peer, connect).await;
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(ConnectFailure::Io(e))) => {
            tracing::debug!(%peer, error = %e, "connection closed before CONNECT");
        }
        Ok(Err(ConnectFailure::Codec(e))) => {
            broker.metrics.protocol_error("bad_connect");
            tracing::debug!(%peer, error = %e, "refused a bad CONNECT");
            if let Some(code) = e.v4_connack_code() {
                let mut out = BytesMut::new();
                let ack = Packet::ConnAck(ConnAck {
                    session_present: false,
                    code,
                    properties: Properties::default(),
                });
                if ack.encode(Protocol::V311, &mut out).is_ok() {
                    let _ = io.write_all(&out).await;
                }
            }
            io.shutdown().await;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
        }
    }
    None
}

enum ConnectFailure {
    Io(io::Error),
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

/// The state of an accepted connection.
pub(super) struct Conn {
    pub(super) broker: Arc<Broker>,
    pub(super) io: Transport,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) peer: SocketAddr,
    pub(super) protocol: Protocol,
    pub(super) space: Arc<SolutionSpace>,
    pub(super) session: Arc<Session>,
    pub(super) link: Arc<Link>,
    /// The session generation this connection attached as.
    pub(super) generation: u64,
    /// Solution, token expiry and method; its subjects moved to `subjects`.
    pub(super) identity: Identity,
    /// The connection's subjects (the same `Arc` as its session's).
    pub(super) subjects: Arc<[String]>,
    pub(super) will: Option<Box<Will>>,
    pub(super) keep_alive: Option<Duration>,
    /// Outgoing QoS 1/2 messages in flight at most (ours, capped by the client's receive max).
    pub(super) max_inflight: usize,
    /// The client's maximum packet size.
    pub(super) client_max_packet: u32,
    /// Incoming topic aliases (MQTT 5), allocated at first use.
    pub(super) aliases: Vec<Option<TopicName>>,
    /// Outgoing topic aliases (MQTT 5, up to the client's Topic Alias Maximum).
    pub(super) out_aliases: TopicAliases,
    /// v5 Request Problem Information: may reason strings be sent on non-final packets.
    pub(super) problem_information: bool,
    /// Twin writes waiting for the journal, in PUBLISH order: each one's acknowledgement,
    /// events and reply go out once it is durable (and acknowledgements that arrive behind
    /// one wait their turn).
    pub(super) pending: std::collections::VecDeque<PendingWrite>,
}

pub(super) fn now_timestamp() -> policy::Timestamp {
    dispatch::now()
}

async fn accept(
    broker: &Arc<Broker>,
    mut io: Transport,
    rbuf: BytesMut,
    peer: SocketAddr,
    connect: Connect,
) -> Option<Box<Conn>> {
    let protocol = connect.protocol;
    let v5 = protocol == Protocol::V5;
    let refuse = |code: u8| {
        Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        })
    };
    // The client ID: assigned when empty (3.1.1 only with Clean Session).
    let mut assigned = None;
    let client_id: Arc<str> = if connect.client_id.is_empty() {
        if !v5 && !connect.clean_start {
            send_and_close(&mut io, protocol, &refuse(2)).await;
            broker.metrics.refused("client_id_rejected");
            return None;
        }
        let Ok(bytes) = crate::auth::secret::random_bytes::<8>() else {
            // No randomness, no unguessable client ID: refuse rather than make one up.
            tracing::error!("the system random generator failed; cannot assign a client ID");
            send_and_close(&mut io, protocol, &refuse(if v5 { 0x80 } else { 3 })).await;
            return None;
        };
        let id = format!("tg-{}", crate::auth::secret::hex(&bytes));
        assigned = Some(id.clone());
        id.into()
    } else {
        connect.client_id.as_str().into()
    };
    if client_id.len() > MAX_CLIENT_ID_LEN {
        send_and_close(&mut io, protocol, &refuse(if v5 { 0x85 } else { 2 })).await;
        broker.metrics.refused("client_id_rejected");
        return None;
    }
    let mut identity = match broker
        .auth
        .authenticate(&connect, &client_id, peer.ip())
        .await
    {
        Ok(identity) => identity,
        Err(refusal) => {
            broker.metrics.refused(refusal.label());
            tracing::debug!(%peer, reason = refusal.label(), "CONNECT refused");
            send_and_close(&mut io, protocol, &refuse(refusal.connack_code(protocol))).await;
            return None;
        }
    };
    if identity
        .expires_at
        .is_some_and(|at| at <= SystemTime::now())
    {
        send_and_close(&mut io, protocol, &refuse(if v5 { 0x87 } else { 5 })).await;
        broker.metrics.refused("expired");
        return None;
    }
    broker.metrics.connects_accepted.inc();
    let settings = &broker.settings;
    let space = broker.spaces.get_or_create(&identity.solution);
    // One copy of the subjects per connection, shared with its session.
    let subjects: Arc<[String]> = std::mem::take(&mut identity.subjects).into_vec().into();
    let view = space
        .policy()
        .for_subjects(&subjects, None, now_timestamp());

    // Session expiry: v5 from CONNECT (capped), 3.1.1 persistent sessions get the maximum.
    let requested_expiry = if v5 {
        connect.properties.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        u32::MAX
    };
    let expiry = requested_expiry.min(settings.max_session_expiry_seconds);

    // A bound on sessions per solution (the check and the insert below are not atomic: a few
    // concurrent CONNECTs may pass it together, which the bound tolerates).
    let over_limit = {
        let sessions = space.sessions();
        !sessions.contains_key(&*client_id) && sessions.len() >= settings.max_sessions
    };
    if over_limit {
        broker.metrics.refused("session_limit");
        tracing::warn!(solution = %space.id, limit = settings.max_sessions, "session limit reached");
        send_and_close(&mut io, protocol, &refuse(if v5 { 0x97 } else { 3 })).await;
        return None;
    }
    let link = Arc::new(Link::default());
    let (session, session_present, generation) = {
        let mut sessions = space.sessions();
        space.cancel_pending_will(&client_id);
        let existing = sessions.get(&*client_id).cloned();
        let mut resumed = None;
        if let Some(old) = existing {
            let kicked = old.lock().link.take();
            if let Some(kicked) = kicked {
                kicked.kick.notify_one();
                broker.metrics.sessions_taken_over.inc();
            }
            if connect.clean_start {
                sessions.remove(&*client_id);
                space.unsubscribe_all(&old);
                old.lock().clear();
            } else {
                resumed = Some(old);
            }
        }
        let present = resumed.is_some();
        let session = resumed.unwrap_or_else(|| {
            Arc::new(Session::new(
                client_id.clone(),
                subjects.clone(),
                view.clone(),
                expiry,
                settings.max_queued_messages,
            ))
        });
        let generation = {
            let mut state = session.lock();
            state.generation += 1;
            state.link = Some(link.clone());
            state.expiry_interval = expiry;
            state.set_subjects(subjects.clone(), view);
            state.generation
        };
        sessions.insert(client_id.clone(), session.clone());
        (session, present, generation)
    };

    let mut properties = Properties::default();
    let mut keep_alive = connect.keep_alive;
    if v5 {
        properties.receive_maximum = NonZeroU16::new(settings.receive_maximum);
        properties.maximum_packet_size = std::num::NonZeroU32::new(settings.max_packet_size);
        properties.topic_alias_maximum = Some(settings.topic_alias_maximum);
        properties.retain_available = Some(true);
        properties.wildcard_subscription_available = Some(true);
        properties.subscription_identifiers_available = Some(true);
        properties.shared_subscription_available = Some(true);
        if let Some(id) = &assigned {
            properties.assigned_client_identifier = id.parse().ok();
        }
        if expiry != requested_expiry {
            properties.session_expiry_interval = Some(expiry);
        }
        if identity.jwt_method {
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
        .map_or(usize::from(u16::MAX), |n| usize::from(n.get()));
    let mut conn = Conn {
        broker: broker.clone(),
        io,
        rbuf,
        wbuf: BytesMut::new(),
        peer,
        protocol,
        space,
        session,
        link,
        generation,
        will: connect.will.as_ref().map(|w| Box::new(owned_will(w))),
        keep_alive: (keep_alive > 0).then(|| Duration::from_secs(u64::from(keep_alive))),
        max_inflight: usize::from(settings.max_inflight).min(client_receive_max),
        client_max_packet: connect
            .properties
            .maximum_packet_size
            .map_or(u32::MAX, |n| n.get()),
        aliases: Vec::new(),
        out_aliases: TopicAliases::new(if v5 {
            connect.properties.topic_alias_maximum.unwrap_or(0).min(64)
        } else {
            0
        }),
        problem_information: connect.properties.request_problem_information != Some(false),
        pending: std::collections::VecDeque::new(),
        identity,
        subjects: subjects.clone(),
    };
    conn.outbound().packet(&Packet::ConnAck(ConnAck {
        session_present,
        code: 0,
        properties,
    }));
    tracing::debug!(
        peer = %conn.peer,
        solution = %conn.space.id,
        client = %conn.session.client_id,
        session_present,
        "connected"
    );
    if session_present {
        let mut out = Outbound {
            buf: &mut conn.wbuf,
            protocol,
            max_packet_size: conn.client_max_packet,
            metrics: &broker.metrics,
            aliases: &mut conn.out_aliases,
        };
        let mut state = conn.session.lock();
        state.resend_inflight(&mut out);
    }
    // The CONNECT's fields are slices of the first read buffer: let it go before idling.
    drop(connect);
    if conn.rbuf.is_empty() {
        conn.rbuf = BytesMut::new();
    }
    Some(Box::new(conn))
}

async fn send_and_close(io: &mut Transport, protocol: Protocol, packet: &Packet) {
    let mut out = BytesMut::new();
    if packet.encode(protocol, &mut out).is_ok() {
        let _ = io.write_all(&out).await;
    }
    io.shutdown().await;
}

impl Conn {
    pub(super) fn outbound(&mut self) -> Outbound<'_> {
        Outbound {
            buf: &mut self.wbuf,
            protocol: self.protocol,
            max_packet_size: self.client_max_packet,
            metrics: &self.broker.metrics,
            aliases: &mut self.out_aliases,
        }
    }

    /// The connection's main loop; returns why it ended.
    async fn run(&mut self) -> Close {
        let mut shutdown = self.broker.shutdown.clone();
        let mut keep_alive_deadline = self.keep_alive_deadline();
        loop {
            self.drain();
            if let Err(e) = self.flush().await {
                tracing::debug!(peer = %self.peer, error = %e, "write failed");
                return Close::silent("write_failed");
            }
            // One timer for both deadlines (a smaller future per idle connection).
            let token_deadline = self.token_deadline();
            let deadline = match (keep_alive_deadline, token_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let session = self.session.clone();
            let link = self.link.clone();
            tokio::select! {
                biased;
                _ = link.kick.notified() => {
                    return Close::server(0x8E, "session_taken_over");
                }
                _ = shutdown.changed() => {
                    return Close::server(0x8B, "server_shutting_down");
                }
                // Backpressure: with this many twin writes waiting for the journal, stop reading
                // (the client's TCP window fills) until some are durable.
                read = self.io.read_into(&mut self.rbuf), if self.pending.len() < usize::from(self.broker.settings.receive_maximum) => {
                    match read {
                        Ok(0) => return Close::silent("closed_by_client"),
                        Ok(n) => {
                            keep_alive_deadline = self.keep_alive_deadline();
                            if let Some(close) = self.process_input() {
                                return close;
                            }
                            if self.rbuf.is_empty() && n < SMALL_READ {
                                self.rbuf = BytesMut::new();
                            }
                        }
                        Err(e) => {
                            tracing::debug!(peer = %self.peer, error = %e, "read failed");
                            return Close::silent("read_failed");
                        }
                    }
                }
                _ = session.wake.notified() => {}
                done = twin_topics::front_durable(&mut self.pending), if !self.pending.is_empty() => {
                    self.complete_front(done);
                }
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    if token_deadline.is_some_and(|t| t <= tokio::time::Instant::now()) {
                        return Close::server(0x87, "token_expired");
                    }
                    if keep_alive_deadline.is_some_and(|k| k <= tokio::time::Instant::now()) {
                        return Close::server(0x8D, "keep_alive_timeout");
                    }
                }
            }
        }
    }

    fn keep_alive_deadline(&self) -> Option<tokio::time::Instant> {
        self.keep_alive
            .map(|k| tokio::time::Instant::now() + k + k / 2)
    }

    fn token_deadline(&self) -> Option<tokio::time::Instant> {
        let at = self.identity.expires_at?;
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + left)
    }

    /// Moves queued messages into the write buffer, as far as the inflight window allows.
    fn drain(&mut self) {
        let max_inflight = self.max_inflight;
        let session = self.session.clone();
        let mut state = session.lock();
        if state.generation != self.generation || !state.has_queued() {
            return;
        }
        let mut out = Outbound {
            buf: &mut self.wbuf,
            protocol: self.protocol,
            max_packet_size: self.client_max_packet,
            metrics: &self.broker.metrics,
            aliases: &mut self.out_aliases,
        };
        state.drain_into(&mut out, max_inflight);
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        if self.wbuf.capacity() > 64 * 1024 {
            self.wbuf = BytesMut::new();
        }
        Ok(())
    }

    /// Decodes and handles every complete packet in the read buffer.
    fn process_input(&mut self) -> Option<Close> {
        let max_packet = self.broker.settings.max_packet_size as usize;
        loop {
            match codec::decode(&mut self.rbuf, self.protocol, max_packet) {
                Ok(Some(packet)) => {
                    if let Some(close) = self.handle(packet) {
                        return Some(close);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    let close = Close::codec(&e);
                    self.broker.metrics.protocol_error(close.label);
                    tracing::info!(
                        peer = %self.peer,
                        client = %self.session.client_id,
                        error = %e,
                        "closing the connection: bad packet"
                    );
                    return Some(close);
                }
            }
        }
    }

    fn handle(&mut self, packet: Packet) -> Option<Close> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubAck(ack) => {
                self.session
                    .lock()
                    .complete(ack.packet_id, QoS::AtLeastOnce);
                None
            }
            Packet::PubRec(rec) => {
                let outcome = self.session.lock().received(rec.packet_id, rec.reason);
                if outcome != AckOutcome::Done {
                    let reason = if outcome == AckOutcome::Unknown && self.protocol == Protocol::V5
                    {
                        0x92
                    } else {
                        0
                    };
                    self.outbound().packet(&Packet::PubRel(PubResponse {
                        packet_id: rec.packet_id,
                        reason,
                        properties: Properties::default(),
                    }));
                }
                None
            }
            Packet::PubComp(comp) => {
                self.session
                    .lock()
                    .complete(comp.packet_id, QoS::ExactlyOnce);
                None
            }
            Packet::PubRel(rel) => {
                let known = {
                    let mut state = self.session.lock();
                    let before = state.incoming_qos2.len();
                    state.incoming_qos2.retain(|&id| id != rel.packet_id);
                    state.incoming_qos2.len() != before
                };
                let reason = if !known && self.protocol == Protocol::V5 {
                    0x92
                } else {
                    0
                };
                self.outbound().packet(&Packet::PubComp(PubResponse {
                    packet_id: rel.packet_id,
                    reason,
                    properties: Properties::default(),
                }));
                None
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => {
                self.on_unsubscribe(unsubscribe);
                None
            }
            Packet::PingReq => {
                self.outbound().packet(&Packet::PingResp);
                None
            }
            Packet::Disconnect(disconnect) => Some(self.on_disconnect(&disconnect)),
            Packet::Auth(auth) => self.on_auth(auth),
            Packet::Connect(_) => Some(Close::server(0x82, "second_connect")),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Some(Close::server(0x82, "server_packet_from_client"))
            }
        }
    }

    pub(super) fn denied_reason(&self, message: &str) -> Properties {
        let mut properties = Properties::default();
        if self.protocol == Protocol::V5 && self.problem_information {
            properties.reason_string = message.parse().ok();
        }
        properties
    }

    fn on_publish(&mut self, publish: Publish) -> Option<Close> {
        self.broker.metrics.messages_received.inc();
        if !publish.properties.subscription_identifiers.is_empty() {
            // MQTT-3.3.4-6: only the server puts subscription identifiers on a PUBLISH.
            return Some(Close::server(0x82, "subscription_id_from_client"));
        }
        let topic = match self.resolve_topic(&publish) {
            Ok(topic) => topic,
            Err(close) => return Some(close),
        };
        // QoS 2: a PUBLISH whose identifier awaits PUBREL is a duplicate; not delivered again.
        if let QosPid::ExactlyOnce(id) = publish.qos {
            let state = self.session.lock();
            if state.incoming_qos2.contains(&id) {
                drop(state);
                self.ack(Packet::PubRec, id, 0, Properties::default());
                return None;
            }
            if state.incoming_qos2.len() >= usize::from(self.broker.settings.receive_maximum) {
                return Some(Close::server(0x93, "receive_maximum_exceeded"));
            }
        }
        let outcome = if twin::protocol::mqtt::is_twin_topic(topic.as_str()) {
            self.twin_publish(&publish, &topic)
        } else {
            self.plain_publish(&publish, &topic)
        };
        let ack = match publish.qos {
            QosPid::AtMostOnce => None,
            QosPid::AtLeastOnce(id) => Some((Packet::PubAck as fn(PubResponse) -> Packet, id)),
            QosPid::ExactlyOnce(id) => Some((Packet::PubRec as fn(PubResponse) -> Packet, id)),
        };
        match outcome {
            PublishOutcome::Now { code, reason } => {
                // 3.1.1 cannot say "denied" (MQTT-3.3.5-2): the acknowledgement is positive.
                let code = if self.protocol == Protocol::V311 {
                    0
                } else {
                    code
                };
                if let QosPid::ExactlyOnce(id) = publish.qos
                    && code < 0x80
                {
                    self.session.lock().incoming_qos2.push(id);
                }
                let properties = match reason {
                    Some(reason) if code >= 0x80 => self.denied_reason(&reason),
                    _ => Properties::default(),
                };
                if let Some((kind, id)) = ack {
                    if self.pending.is_empty() {
                        self.ack(kind, id, code, properties);
                    } else {
                        // Acknowledgements go out in the order the PUBLISHes came (MQTT §4.6).
                        self.pending
                            .push_back(PendingWrite::ack_only(kind, id, code, properties));
                    }
                }
            }
            PublishOutcome::WhenDurable(mut pending) => {
                if let QosPid::ExactlyOnce(id) = publish.qos {
                    self.session.lock().incoming_qos2.push(id);
                }
                pending.ack = ack;
                self.pending.push_back(*pending);
            }
        }
        None
    }

    /// A plain topic: WRITE on `topic:/<levels>` in the solution policy, then fan-out.
    fn plain_publish(&mut self, publish: &Publish, topic: &TopicName) -> PublishOutcome {
        let allowed = {
            let policy = self.space.policy();
            let mut state = self.session.lock();
            state.refresh_view(&policy, now_timestamp());
            state.view().check(
                ResourceType::Topic,
                topic.as_str(),
                Permission::Write,
                Mode::Unrestricted,
            )
        };
        if !allowed {
            self.broker
                .metrics
                .denied(self.space.id.as_str(), "publish");
            tracing::debug!(
                solution = %self.space.id,
                client = %self.session.client_id,
                topic = topic.as_str(),
                subjects = ?&self.subjects[..],
                "publish denied"
            );
            return PublishOutcome::Now {
                code: 0x87,
                reason: Some("not authorized to publish to this topic".to_owned()),
            };
        }
        let expires_at = publish
            .properties
            .message_expiry_interval
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
        let message = Arc::new(Message {
            topic: deep_copy_topic(topic),
            payload: Bytes::copy_from_slice(&publish.payload),
            qos: publish.qos.qos(),
            retain: publish.retain,
            properties: ForwardedProperties::from_publish(&publish.properties),
            expires_at,
            publisher: self.session.id,
        });
        dispatch::publish(&self.space, message, &self.broker.metrics);
        PublishOutcome::Now {
            code: 0,
            reason: None,
        }
    }

    pub(super) fn ack(
        &mut self,
        kind: fn(PubResponse) -> Packet,
        packet_id: NonZeroU16,
        reason: u8,
        properties: Properties,
    ) {
        self.outbound().packet(&kind(PubResponse {
            packet_id,
            reason,
            properties,
        }));
    }

    /// The topic of a PUBLISH, through the v5 topic alias if it uses one.
    fn resolve_topic(&mut self, publish: &Publish) -> Result<TopicName, Close> {
        let Some(alias) = publish.properties.topic_alias else {
            if publish.topic.is_empty() {
                return Err(Close::server(0x82, "empty_topic"));
            }
            return Ok(publish.topic.clone());
        };
        let max = self.broker.settings.topic_alias_maximum;
        if alias.get() > max {
            return Err(Close::server(0x94, "topic_alias_invalid"));
        }
        let index = usize::from(alias.get() - 1);
        if publish.topic.is_empty() {
            return match self.aliases.get(index) {
                Some(Some(topic)) => Ok(topic.clone()),
                _ => Err(Close::server(0x82, "unknown_topic_alias")),
            };
        }
        if self.aliases.is_empty() {
            self.aliases = vec![None; usize::from(max)];
        }
        if let Some(slot) = self.aliases.get_mut(index) {
            *slot = Some(deep_copy_topic(&publish.topic));
        }
        Ok(publish.topic.clone())
    }

    fn on_subscribe(&mut self, subscribe: Subscribe) -> Option<Close> {
        let v5 = self.protocol == Protocol::V5;
        let id = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        let mut codes = Vec::with_capacity(subscribe.subscriptions.len());
        let mut granted = Vec::new();
        let policy = self.space.policy();
        for sub in &subscribe.subscriptions {
            let filter = sub.filter.as_str();
            let shared = sub.filter.is_shared();
            if shared && sub.options.no_local {
                return Some(Close::server(0x82, "no_local_on_shared_subscription"));
            }
            let inner = tree_filter(filter);
            let refused = if is_twin_filter(inner) {
                // Each event and message is checked on delivery against its thing's policy;
                // the filter only has to stay inside the solution's namespaces.
                !crate::core::twins::twin_filter_allowed(inner, &self.identity.solution.namespaces)
            } else if self.names_foreign_twin_space(inner) {
                true
            } else {
                let mut state = self.session.lock();
                state.refresh_view(&policy, now_timestamp());
                let prefix = inner.split('/').take_while(|l| *l != "+" && *l != "#");
                !state.view().check_segments(
                    ResourceType::Topic,
                    prefix,
                    Permission::Read,
                    Mode::Partial,
                )
            };
            if refused {
                self.broker
                    .metrics
                    .denied(self.space.id.as_str(), "subscribe");
                tracing::debug!(
                    solution = %self.space.id,
                    client = %self.session.client_id,
                    filter,
                    "subscription denied"
                );
                codes.push(if v5 { 0x87 } else { 0x80 });
                continue;
            }
            let subscriber = Subscriber {
                session: self.session.clone(),
                options: sub.options,
                id,
                share: shared.then(|| Arc::from(filter)),
            };
            let existed = self
                .session
                .lock()
                .subscriptions
                .insert(
                    filter.into(),
                    SubscriptionRecord {
                        options: sub.options,
                        id,
                    },
                )
                .is_some();
            {
                let mut tree = self.space.tree_write();
                let session = &self.session;
                let share = &subscriber.share;
                tree.remove(inner, |s| {
                    Arc::ptr_eq(&s.session, session) && s.share == *share
                });
                tree.insert(inner, subscriber.clone());
            }
            codes.push(sub.options.qos as u8);
            granted.push((subscriber, inner.to_owned(), existed));
        }
        self.outbound().packet(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            codes,
            properties: Properties::default(),
        }));
        for (subscriber, filter, existed) in granted {
            dispatch::deliver_retained(
                &self.space,
                &self.session,
                &subscriber,
                &filter,
                existed,
                &self.broker.metrics,
            );
        }
        None
    }

    /// A filter that reaches into the twin topic space (`org.acme/#`, `org.acme/+/+/…`) of a
    /// namespace another solution owns: refused like a twin filter naming it (DESIGN.md §4),
    /// although this solution's own tree could never hold such a topic.
    fn names_foreign_twin_space(&self, filter: &str) -> bool {
        let mut levels = filter.split('/');
        let Some(first) = levels.next() else {
            return false;
        };
        let reaches_twin_level = matches!(
            (levels.next(), levels.next()),
            (Some("#"), _) | (Some(_), Some("#" | "+" | "things" | "policies"))
        );
        reaches_twin_level
            && !self.identity.solution.namespaces.iter().any(|n| n == first)
            && self
                .broker
                .auth
                .solutions
                .owner_of_namespace(first)
                .is_some_and(|owner| owner != self.identity.solution.id)
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut codes = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            let existed = self
                .session
                .lock()
                .subscriptions
                .remove(filter.as_str())
                .is_some();
            let share: Option<Arc<str>> = filter.is_shared().then(|| Arc::from(filter.as_str()));
            let session = &self.session;
            self.space
                .tree_write()
                .remove(tree_filter(filter.as_str()), |s| {
                    Arc::ptr_eq(&s.session, session) && s.share == share
                });
            codes.push(if existed { 0x00 } else { 0x11 });
        }
        self.outbound().packet(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            codes,
            properties: Properties::default(),
        }));
    }

    fn on_disconnect(&mut self, disconnect: &Disconnect) -> Close {
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            let mut state = self.session.lock();
            if state.expiry_interval == 0 && expiry != 0 {
                // MQTT-3.14.2-2.
                return Close::server(0x82, "session_expiry_after_zero");
            }
            state.expiry_interval = expiry.min(self.broker.settings.max_session_expiry_seconds);
        }
        Close {
            server_reason: None,
            // 0x04: "disconnect with will message".
            will: disconnect.reason == 0x04,
            label: "disconnect",
        }
    }

    /// MQTT 5 re-authentication with a fresh token (DESIGN.md §2): same solution and the same
    /// subjects; the connection then lives until the new token's expiry.
    fn on_auth(&mut self, auth: Auth) -> Option<Close> {
        let method_ok = auth
            .properties
            .authentication_method
            .as_ref()
            .is_some_and(|m| m.as_str() == JWT_METHOD);
        if !self.identity.jwt_method || !method_ok || auth.reason != 0x19 {
            return Some(Close::server(0x82, "unexpected_auth"));
        }
        let token = auth
            .properties
            .authentication_data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok());
        let Some(token) = token else {
            return Some(Close::server(0x87, "reauth_without_token"));
        };
        let jwt = match self.broker.auth.issuers.validate(token, SystemTime::now()) {
            Ok(jwt) => jwt,
            Err(refusal) => {
                self.broker.metrics.refused(refusal.as_str());
                tracing::debug!(client = %self.session.client_id, reason = refusal.as_str(), "re-authentication refused");
                return Some(Close::server(0x87, "reauth_refused"));
            }
        };
        let same_solution = jwt
            .solution
            .as_deref()
            .is_none_or(|s| s == self.space.id.as_str());
        let mut old: Vec<&str> = self.subjects.iter().map(String::as_str).collect();
        let mut new: Vec<&str> = jwt.subjects.iter().map(String::as_str).collect();
        old.sort_unstable();
        new.sort_unstable();
        if !same_solution || old != new {
            return Some(Close::server(0x87, "reauth_other_identity"));
        }
        self.identity.expires_at = Some(jwt.expires_at);
        let properties = Properties {
            authentication_method: JWT_METHOD.parse().ok(),
            ..Properties::default()
        };
        self.outbound().packet(&Packet::Auth(Auth {
            reason: 0x00,
            properties,
        }));
        tracing::debug!(client = %self.session.client_id, "re-authenticated");
        None
    }

    /// Ends the connection: the server's DISCONNECT (v5), the will, the session's fate.
    async fn finish(mut self, close: Close) {
        self.settle_pending();
        // The session is let go before the socket closes: a client that reconnects as soon as
        // it sees the close finds the session offline (or gone), never still attached.
        let taken_over = close.label == "session_taken_over";
        let (still_ours, expiry) = {
            let mut state = self.session.lock();
            let ours = state.generation == self.generation;
            if ours {
                state.link = None;
            }
            (ours, state.expiry_interval)
        };
        if let (true, Some(will)) = (close.will, self.will.take()) {
            let delay = will.properties.will_delay_interval.unwrap_or(0);
            if delay == 0 {
                self.publish_will(&will);
            } else if !taken_over {
                // A takeover is a new connection for this client ID within the delay: the will
                // is not sent (MQTT-3.1.3-9). Otherwise it waits for the delay or the end of
                // the session, whichever comes first, unless a new connection cancels it.
                let delay = if still_ours { delay.min(expiry) } else { delay };
                let token = self.space.register_pending_will(&self.session.client_id);
                let space = self.space.clone();
                let broker = self.broker.clone();
                let subjects = self.subjects.clone();
                let client_id = self.session.client_id.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                    if space.claim_pending_will(&client_id, token) {
                        publish_will(&broker, &space, &client_id, &subjects, &will);
                    }
                });
            }
        }
        if still_ours {
            if expiry == 0 {
                self.space.end_session(&self.session);
            } else if expiry != u32::MAX {
                let space = self.space.clone();
                let session = self.session.clone();
                let generation = self.generation;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
                    let expired = {
                        let state = session.lock();
                        state.generation == generation && state.link.is_none()
                    };
                    if expired {
                        space.end_session(&session);
                    }
                });
            }
        }
        let v5 = self.protocol == Protocol::V5;
        if let (Some(reason), true) = (close.server_reason, v5) {
            let mut properties = Properties::default();
            if close.label == "token_expired" {
                properties.reason_string = "token expired".parse().ok();
            }
            self.outbound()
                .packet(&Packet::Disconnect(Disconnect { reason, properties }));
        }
        let _ = self.flush().await;
        self.io.shutdown().await;
        tracing::debug!(client = %self.session.client_id, reason = close.label, "disconnected");
    }

    fn publish_will(&self, will: &Will) {
        publish_will(
            &self.broker,
            &self.space,
            &self.session.client_id,
            &self.subjects,
            will,
        );
    }
}

/// A will in its own allocations (not slices of the CONNECT's read buffer).
fn owned_will(will: &Will) -> Will {
    let mut properties = will.properties.clone();
    if let Some(forwarded) = ForwardedProperties::from_publish(&will.properties) {
        properties.content_type = forwarded.content_type;
        properties.response_topic = forwarded.response_topic;
        properties.correlation_data = forwarded.correlation_data;
        properties.user_properties = forwarded.user_properties;
    }
    Will {
        topic: deep_copy_topic(&will.topic),
        payload: Bytes::copy_from_slice(&will.payload),
        qos: will.qos,
        retain: will.retain,
        properties,
    }
}

/// Publishes a will message, authorized like a PUBLISH of its connection's subjects.
fn publish_will(
    broker: &Broker,
    space: &SolutionSpace,
    client_id: &str,
    subjects: &[String],
    will: &Will,
) {
    let view = space.policy().for_subjects(subjects, None, now_timestamp());
    let topic = will.topic.as_str();
    if twin::protocol::mqtt::is_twin_topic(topic)
        || !view.check(
            ResourceType::Topic,
            topic,
            Permission::Write,
            Mode::Unrestricted,
        )
    {
        broker.metrics.denied(space.id.as_str(), "publish");
        tracing::debug!(solution = %space.id, client = client_id, topic, "will denied");
        return;
    }
    let expires_at = will
        .properties
        .message_expiry_interval
        .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
    let message = Arc::new(Message {
        topic: deep_copy_topic(&will.topic),
        payload: Bytes::copy_from_slice(&will.payload),
        qos: will.qos,
        retain: will.retain,
        properties: ForwardedProperties::from_publish(&will.properties),
        expires_at,
        publisher: 0,
    });
    dispatch::publish(space, message, &broker.metrics);
}

/// A filter in the twin topic space (DESIGN.md §3): first level `ditto`, or third level
/// `things` or `policies`.
fn is_twin_filter(filter: &str) -> bool {
    let mut levels = filter.split('/');
    let first = levels.next();
    let third = levels.nth(1);
    first == Some("ditto") || matches!(third, Some("things" | "policies"))
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}

#[cfg(test)]
mod tests {
    use super::is_twin_filter;

    #[test]
    fn twin_filters_are_recognised() {
        assert!(is_twin_filter("org.acme/lamp/things/twin/events/#"));
        assert!(is_twin_filter("+/+/things/#"));
        assert!(is_twin_filter("org.acme/p/policies/commands/#"));
        assert!(is_twin_filter("ditto/#"));
        assert!(!is_twin_filter("#"));
        assert!(!is_twin_filter("sensors/+/temp"));
        assert!(!is_twin_filter("a/things"));
    }
}
