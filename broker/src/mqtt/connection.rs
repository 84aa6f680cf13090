//! One MQTT connection after its handshake: the main loop and the translation of every packet a
//! client may send into the core's calls, and of the core's answers into packets. Nothing here
//! decides: PUBLISH → [`Core::publish`], SUBSCRIBE → [`Core::subscribe`], the session's queue
//! (filled by the core's fan-out) → PUBLISH packets within the inflight window.
//!
//! One task per connection. Between packets it waits on whichever comes first: bytes from the
//! socket, something queued in its session, the oldest twin write becoming durable, a
//! takeover, server shutdown, the keep-alive deadline (1.5× the interval) or the token's
//! expiry. No lock is held across an `.await`.
//!
//! Memory while idle: the read buffer is released once it is empty after a small read, so an
//! idle connection holds no read buffer (TCP waits for readability before reserving one).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};

use crate::core::identity::{JWT_METHOD, ReauthRefusal};
use crate::core::message::{Origin, deep_copy_topic};
use crate::core::session::{AckOutcome, Signal};
use crate::core::{Client, Core, Outcome, Pending, ReplyTo, Told, Verdict};
use crate::mqtt::admission::{Admission, ConnectionSlot, HandshakeSlot};
use crate::mqtt::codec::{
    self, Auth, CodecError, Disconnect, ErrorKind, Packet, Properties, Protocol, PubResponse,
    Publish, QoS, QosPid, SubAck, Subscribe, TopicName, UnsubAck, Unsubscribe, Will,
};
use crate::mqtt::handshake;
use crate::mqtt::outbound::{Outbound, TopicAliases, forwarded};
use crate::mqtt::reason::{Close, ReasonCode, Violation};
use crate::mqtt::transport::Transport;
use crate::mqtt::will;

/// A read returning fewer bytes than this, leaving the buffer empty, releases the buffer.
const SMALL_READ: usize = 512;

/// A write buffer smaller than this is released once written (acknowledgements, pings): an
/// idle connection holds none.
const SMALL_WRITE: usize = 1024;

/// Serves one accepted socket until it closes.
///
/// The task is a [`Task`]: the handshake, a re-authentication and the ending run as boxed
/// futures (their large locals, the CONNECT and its CONNACK, live on the heap only while they
/// run), and between them the task holds just the boxed connection, whose main loop is a
/// poll function over state kept in the connection. Not an `async fn` or `async` block: their
/// captured arguments would stay in the task for the connection's whole life; here they go
/// into the boxed handshake.
pub fn serve(
    core: Arc<Core>,
    io: Transport,
    peer: SocketAddr,
    slot: HandshakeSlot,
    admission: Arc<Admission>,
    done: tokio::sync::mpsc::Sender<()>,
) -> impl Future<Output = ()> + Send {
    core.metrics.connections_active.inc();
    Task::Handshake(Box::pin(async move {
        let conn = handshake::open(&core, io, peer, slot, &admission, done).await;
        if conn.is_none() {
            core.metrics.connections_active.dec();
        }
        conn
    }))
}

/// The task of one connection: three words (tokio's task around it is then 128 bytes, the
/// smallest its 128-byte alignment allows; a 104-byte `async` block made it 256).
enum Task {
    Handshake(Pin<Box<dyn Future<Output = Option<Box<Conn>>> + Send>>),
    /// The main loop ([`Conn::poll_run`]).
    Running(Box<Conn>),
    /// An AUTH's token being checked; then the main loop again, or the ending.
    Reauthenticating(Pin<Box<dyn Future<Output = Reauthenticated> + Send>>),
    Ending(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

/// The connection after a re-authentication, and why it must end if it must.
type Reauthenticated = (Box<Conn>, Option<Close>);

impl Future for Task {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let next = match &mut *self {
                Task::Handshake(handshake) => {
                    match std::task::ready!(handshake.as_mut().poll(cx)) {
                        Some(conn) => Task::Running(conn),
                        None => Task::Done,
                    }
                }
                Task::Running(conn) => {
                    let step = std::task::ready!(conn.poll_run(cx));
                    let Task::Running(conn) = std::mem::replace(&mut *self, Task::Done) else {
                        return Poll::Ready(());
                    };
                    match step {
                        Step::Close(close) => Task::Ending(Box::pin(conn.finish(close))),
                        Step::Reauthenticate(token) => {
                            Task::Reauthenticating(Box::pin(conn.reauthenticate_all(token)))
                        }
                    }
                }
                Task::Reauthenticating(check) => match std::task::ready!(check.as_mut().poll(cx)) {
                    (conn, None) => Task::Running(conn),
                    (conn, Some(close)) => Task::Ending(Box::pin(conn.finish(close))),
                },
                Task::Ending(ending) => {
                    std::task::ready!(ending.as_mut().poll(cx));
                    Task::Done
                }
                Task::Done => return Poll::Ready(()),
            };
            *self = next;
        }
    }
}

/// The span of one connection: its peer, and its client ID and solution once the handshake
/// knows them.
pub fn span(peer: SocketAddr) -> tracing::Span {
    tracing::debug_span!(
        "connection",
        %peer,
        client = tracing::field::Empty,
        solution = tracing::field::Empty,
    )
}

/// Spawns the task of one connection: inside a span (peer; client ID and solution once
/// known) where debug logging is on. Two task types rather than one with an optional span:
/// an idle connection's task then carries no span when debug is off (measured: a span, even
/// an absent one, in the task's future cost ~220 bytes per idle connection).
pub fn spawn(peer: SocketAddr, task: impl Future<Output = ()> + Send + 'static) {
    if tracing::enabled!(tracing::Level::DEBUG) {
        tokio::spawn(tracing::Instrument::instrument(task, span(peer)));
    } else {
        tokio::spawn(task);
    }
}

/// How a PUBLISH is acknowledged: PUBACK (QoS 1) or PUBREC (QoS 2), and its identifier.
#[derive(Debug, Clone, Copy)]
struct Ack {
    packet_id: NonZeroU16,
    exactly_once: bool,
}

/// What goes out once an [`InOrder`] entry is done.
#[derive(Debug)]
enum Answer {
    /// PUBACK or PUBREC, as the core told.
    Publish(Ack),
    /// A SUBACK or UNSUBACK of a persistent session, once its record is durable.
    Packet(Box<Packet>),
}

/// An acknowledgement in PUBLISH order (MQTT §4.6): it waits for its own write, if it has
/// one, and for every acknowledgement before it.
#[derive(Debug)]
pub(crate) struct InOrder {
    /// The write whose completion tells the publisher how it went.
    pending: Option<Pending>,
    /// Without a write: what the publisher is told.
    told: Told,
    answer: Option<Answer>,
}

/// What the oldest entry tells its publisher once it may be acknowledged (at once for an
/// entry without a write). Every waiting write is driven, not only the oldest: a
/// later one's events go out (and a persistent subscriber's record of them is journaled) as
/// soon as it is durable, while the acknowledgements still leave in order — driving only the
/// oldest made each write behind it wait a journal round of its own (measured: twin QoS 1 to
/// a persistent subscriber at a quarter of the clean figure). Writes complete in journal
/// order, so their events go out in PUBLISH order. Entries stay in the queue until taken.
fn poll_front_done(
    cx: &mut Context<'_>,
    queue: &mut VecDeque<InOrder>,
    core: &Core,
    client: &Client,
) -> Poll<Told> {
    // Front to back, and no write announces its events before every write ahead of it has
    // announced its own (a thing's events in revision order, whatever order the writes'
    // completions are seen in).
    for entry in queue.iter_mut() {
        if let Some(pending) = &mut entry.pending {
            if let Poll::Ready(told) = pending.poll_done(cx, core, &client.space, &client.session) {
                entry.pending = None;
                entry.told = told;
            } else if !pending.announced() {
                break;
            }
        }
    }
    match queue.front_mut() {
        Some(entry) if entry.pending.is_none() => {
            Poll::Ready(std::mem::replace(&mut entry.told, Told::accepted()))
        }
        _ => Poll::Pending,
    }
}

/// Acknowledgements waiting for twin writes, in PUBLISH order; the queue is allocated while
/// it holds any (an empty `VecDeque` inline is 32 bytes of every connection).
#[derive(Debug, Default)]
pub(crate) struct InOrderQueue(Option<Box<InOrderDeque>>);

type InOrderDeque = VecDeque<InOrder>;

impl InOrderQueue {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |queue| queue.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, entry: InOrder) {
        self.0.get_or_insert_default().push_back(entry);
    }

    fn pop_front(&mut self) -> Option<InOrder> {
        let queue = self.0.as_mut()?;
        let entry = queue.pop_front();
        if queue.is_empty() {
            self.0 = None;
        }
        entry
    }

    fn take(&mut self) -> InOrderDeque {
        self.0.take().map(|queue| *queue).unwrap_or_default()
    }
}

/// A client's topic aliases by alias − 1 (a `Vec` in a box: one word in the connection).
type IncomingAliases = Vec<Option<TopicName>>;

/// What makes the main loop's wait return.
enum Step {
    Close(Close),
    /// An AUTH's token to check (awaited: it may re-read the issuers' keys).
    Reauthenticate(Box<str>),
}

/// The state of an accepted connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) core: Arc<Core>,
    pub(crate) io: Transport,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    pub(crate) peer: SocketAddr,
    pub(crate) protocol: Protocol,
    /// Who the connection is and the session it is attached to.
    pub(crate) client: Client,
    pub(crate) will: Option<Box<Will>>,
    /// Seconds (0: none).
    pub(crate) keep_alive: u16,
    /// Outgoing QoS 1/2 messages in flight at most (ours, capped by the client's receive max).
    pub(crate) max_inflight: u16,
    /// The client's maximum packet size.
    pub(crate) client_max_packet: u32,
    /// Incoming topic aliases (MQTT 5), allocated at first use.
    pub(crate) aliases: Option<Box<IncomingAliases>>,
    /// Outgoing topic aliases (MQTT 5, up to the client's Topic Alias Maximum).
    pub(crate) out_aliases: TopicAliases,
    /// v5 Request Problem Information: may reason strings be sent on non-final packets.
    pub(crate) problem_information: bool,
    /// Acknowledgements waiting for twin writes, in PUBLISH order.
    pub(crate) in_order: InOrderQueue,
    /// Its place among `max_connections`.
    pub(crate) _slot: ConnectionSlot,
    /// Held until the connection is over: the server's shutdown waits for every sender.
    pub(crate) _done: tokio::sync::mpsc::Sender<()>,
    /// When the connection ends unless a packet arrives (1.5× the keep-alive).
    pub(crate) keep_alive_deadline: Option<tokio::time::Instant>,
    /// An entry of the core's timer will raise the link's deadline signal by the earlier of
    /// the keep-alive and token deadlines. INVARIANT: stays true only while neither deadline
    /// moves earlier: the keep-alive deadline only moves later, and a re-authentication
    /// (a new token expiry) clears it.
    pub(crate) timer_armed: bool,
}

impl Conn {
    pub(crate) fn outbound(&mut self) -> Outbound<'_> {
        Outbound {
            buf: &mut self.wbuf,
            protocol: self.protocol,
            max_packet_size: self.client_max_packet,
            metrics: &self.core.metrics,
            aliases: &mut self.out_aliases,
        }
    }

    fn v5(&self) -> bool {
        self.protocol == Protocol::V5
    }

    /// Checks an AUTH's token, then handles the packets that came after it (which may hold
    /// the next AUTH); returns the connection and why it must end, if it must.
    async fn reauthenticate_all(mut self: Box<Self>, mut token: Box<str>) -> Reauthenticated {
        loop {
            if let Some(close) = self.reauthenticate(&token).await {
                return (self, Some(close));
            }
            match self.process_input() {
                Some(Step::Close(close)) => return (self, Some(close)),
                Some(Step::Reauthenticate(next)) => token = next,
                None => {
                    if self.rbuf.is_empty() {
                        self.rbuf = BytesMut::new();
                    }
                    return (self, None);
                }
            }
        }
    }

    /// One pass of the main loop until it must wait: queued messages into the write buffer,
    /// the write buffer onto the socket, then whichever is ready first of a kick, input (unless
    /// too many twin writes wait for the journal), something queued, the oldest pending write
    /// done, a deadline. The kick, the wake-up and the deadline are signals of the link (no
    /// `Notified` or `Sleep` future kept); the socket is polled for readiness.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        loop {
            self.drain();
            if let Err(e) = std::task::ready!(self.poll_flush(cx)) {
                tracing::debug!(peer = %self.peer, error = %e, "write failed");
                return Poll::Ready(Step::Close(Close::WriteFailed));
            }
            // Takeover, revocation and server shutdown (`Core::kick_all`) all kick.
            if self.client.link.poll_take(cx, Signal::Kicked).is_ready() {
                return Poll::Ready(Step::Close(self.kicked()));
            }
            // Backpressure: with this many twin writes waiting for the journal, stop reading
            // (the client's TCP window fills) until some are durable.
            let may_read = self.in_order.len() < usize::from(self.core.settings.receive_maximum);
            if may_read && let Poll::Ready(read) = self.io.poll_read_into(cx, &mut self.rbuf) {
                match read {
                    Ok(0) => return Poll::Ready(Step::Close(Close::ClosedByClient)),
                    Ok(n) => {
                        self.keep_alive_deadline = self.keep_alive_deadline();
                        if let Some(step) = self.process_input() {
                            return Poll::Ready(step);
                        }
                        if self.rbuf.is_empty() && n < SMALL_READ {
                            self.rbuf = BytesMut::new();
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "read failed");
                        return Poll::Ready(Step::Close(Close::ReadFailed));
                    }
                }
            }
            if self.client.link.poll_take(cx, Signal::Queued).is_ready() {
                continue;
            }
            if let Some(queue) = self.in_order.0.as_mut()
                && let Poll::Ready(told) = poll_front_done(cx, queue, &self.core, &self.client)
            {
                self.answer_front(&told);
                // The writes completed in the same pass (one journal batch) answer in the
                // same write to the socket: one send per batch, not one per PUBACK.
                while let Some(entry) = self.in_order.0.as_mut().and_then(|q| q.front_mut())
                    && entry.pending.is_none()
                {
                    let told = std::mem::replace(&mut entry.told, Told::accepted());
                    self.answer_front(&told);
                }
                continue;
            }
            return match self.poll_deadlines(cx) {
                Some(close) => Poll::Ready(Step::Close(close)),
                None => Poll::Pending,
            };
        }
    }

    /// Why the link was kicked.
    fn kicked(&self) -> Close {
        if *self.core.shutdown.borrow() {
            Close::ShuttingDown
        } else if self
            .client
            .link
            .revoked
            .load(std::sync::atomic::Ordering::Acquire)
        {
            Close::CredentialsRevoked
        } else {
            Close::TakenOver
        }
    }

    /// The close for a keep-alive or token deadline that has passed; otherwise makes sure the
    /// core's timer raises the link's deadline signal by the earlier of the two.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> Option<Close> {
        if self.client.link.poll_take(cx, Signal::Deadline).is_ready() {
            self.timer_armed = false;
        }
        let token_deadline = self.token_deadline();
        let now = tokio::time::Instant::now();
        if token_deadline.is_some_and(|t| t <= now) {
            return Some(Close::TokenExpired);
        }
        if self.keep_alive_deadline.is_some_and(|k| k <= now) {
            return Some(Close::KeepAliveTimeout);
        }
        let deadline = match (self.keep_alive_deadline, token_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = deadline
            && !self.timer_armed
        {
            self.core.deadlines.register(at, &self.client.link);
            self.timer_armed = true;
        }
        None
    }

    /// Sends what the oldest [`InOrder`] entry, done with `told`, answers, and removes it.
    fn answer_front(&mut self, told: &Told) {
        match self.in_order.pop_front().and_then(|entry| entry.answer) {
            Some(Answer::Publish(ack)) => self.acknowledge(ack, told),
            Some(Answer::Packet(packet)) => {
                self.outbound().packet(&packet);
            }
            None => {}
        }
    }

    pub(crate) fn keep_alive_deadline(&self) -> Option<tokio::time::Instant> {
        let k = Duration::from_secs(u64::from(self.keep_alive));
        (self.keep_alive > 0).then(|| tokio::time::Instant::now() + k + k / 2)
    }

    fn token_deadline(&self) -> Option<tokio::time::Instant> {
        let at = self.client.identity.expires_at()?;
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + left)
    }

    /// Moves queued messages into the write buffer, as far as the inflight window allows.
    fn drain(&mut self) {
        let max_inflight = usize::from(self.max_inflight);
        let session = self.client.session.clone();
        let mut state = session.lock();
        if let Some(journal) = state.journal.as_mut()
            && !journal.forgotten.is_empty()
        {
            // Journaled deliveries that left the session: their records go.
            let forgotten = std::mem::take(&mut journal.forgotten);
            drop(state);
            self.core.forget_delivered(&self.client, &forgotten);
            state = session.lock();
        }
        if state.generation != self.client.generation || !state.has_queued() {
            return;
        }
        let mut out = Outbound {
            buf: &mut self.wbuf,
            protocol: self.protocol,
            max_packet_size: self.client_max_packet,
            metrics: &self.core.metrics,
            aliases: &mut self.out_aliases,
        };
        state.drain(max_inflight, &self.core.metrics, |delivery, qos| {
            out.publish(delivery, qos, false)
        });
        if let Some(journal) = state.journal.as_mut()
            && !journal.sent_stored.is_empty()
        {
            let sent = std::mem::take(&mut journal.sent_stored);
            drop(state);
            self.core.record_sent(&self.client, &sent);
        }
    }

    /// Writes the write buffer out. An emptied buffer is let go unless a busy connection grew
    /// it (then kept up to 64 KiB): an idle connection holds none.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.wbuf.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while !self.wbuf.is_empty() {
            let n = std::task::ready!(self.io.poll_write(cx, &self.wbuf))?;
            self.wbuf.advance(n);
        }
        std::task::ready!(self.io.poll_flush(cx))?;
        self.wbuf.clear();
        if self.wbuf.capacity() < SMALL_WRITE || self.wbuf.capacity() > 64 * 1024 {
            self.wbuf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Decodes and handles every complete packet in the read buffer, up to an AUTH: the packets
    /// after it are handled once its token is checked.
    fn process_input(&mut self) -> Option<Step> {
        let max_packet = self.core.settings.max_packet_size as usize;
        loop {
            match codec::decode(&mut self.rbuf, self.protocol, max_packet) {
                Ok(Some(Packet::Auth(auth))) => return Some(self.on_auth(auth)),
                Ok(Some(packet)) => {
                    if let Some(close) = self.handle(packet) {
                        return Some(Step::Close(close));
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    let close = codec_close(&e);
                    self.core.metrics.protocol_error(close.label());
                    tracing::info!(
                        peer = %self.peer,
                        client = %self.client.session.client_id,
                        error = %e,
                        "closing the connection: bad packet"
                    );
                    return Some(Step::Close(close));
                }
            }
        }
    }

    /// Handles a packet other than AUTH ([`Conn::on_auth`]).
    fn handle(&mut self, packet: Packet) -> Option<Close> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubAck(ack) => {
                self.client
                    .session
                    .lock()
                    .complete(ack.packet_id, QoS::AtLeastOnce);
                None
            }
            Packet::PubRec(rec) => {
                let outcome = self
                    .client
                    .session
                    .lock()
                    .received(rec.packet_id, ReasonCode::is_failure_code(rec.reason));
                if outcome != AckOutcome::Done {
                    let reason = if outcome == AckOutcome::Unknown && self.v5() {
                        ReasonCode::PacketIdentifierNotFound
                    } else {
                        ReasonCode::Success
                    };
                    self.send_response(
                        Packet::PubRel,
                        rec.packet_id,
                        reason,
                        Properties::default(),
                    );
                }
                None
            }
            Packet::PubComp(comp) => {
                self.client
                    .session
                    .lock()
                    .complete(comp.packet_id, QoS::ExactlyOnce);
                None
            }
            Packet::PubRel(rel) => {
                let known = self.core.released(&self.client, rel.packet_id);
                let reason = if !known && self.v5() {
                    ReasonCode::PacketIdentifierNotFound
                } else {
                    ReasonCode::Success
                };
                self.send_response(
                    Packet::PubComp,
                    rel.packet_id,
                    reason,
                    Properties::default(),
                );
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
            Packet::Auth(_) => Some(Close::Protocol(Violation::UnexpectedAuth)),
            Packet::Connect(_) => Some(Close::Protocol(Violation::SecondConnect)),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Some(Close::Protocol(Violation::ServerPacketFromClient))
            }
        }
    }

    fn send_response(
        &mut self,
        kind: fn(PubResponse) -> Packet,
        packet_id: NonZeroU16,
        reason: ReasonCode,
        properties: Properties,
    ) {
        self.outbound().packet(&kind(PubResponse {
            packet_id,
            reason: reason.code(),
            properties,
        }));
    }

    /// PUBACK or PUBREC for what the core told the publisher. 3.1.1 cannot say "denied"
    /// (MQTT-3.3.5-2): its acknowledgement is positive.
    fn acknowledge(&mut self, ack: Ack, told: &Told) {
        let reason = if self.v5() {
            ReasonCode::of_verdict(told.verdict)
        } else {
            ReasonCode::Success
        };
        let mut properties = Properties::default();
        if reason.is_failure()
            && self.problem_information
            && let Some(text) = &told.reason
        {
            properties.reason_string = text.parse().ok();
        }
        let kind = if ack.exactly_once {
            Packet::PubRec
        } else {
            Packet::PubAck
        };
        self.send_response(kind, ack.packet_id, reason, properties);
    }

    fn on_publish(&mut self, publish: Publish) -> Option<Close> {
        self.core.metrics.messages_received.inc();
        if !publish.properties.subscription_identifiers.is_empty() {
            return Some(Close::Protocol(Violation::SubscriptionIdFromClient));
        }
        let topic = match self.resolve_topic(&publish) {
            Ok(topic) => topic,
            Err(close) => return Some(close),
        };
        let ack = match publish.qos {
            QosPid::AtMostOnce => None,
            QosPid::AtLeastOnce(packet_id) => Some(Ack {
                packet_id,
                exactly_once: false,
            }),
            QosPid::ExactlyOnce(packet_id) => Some(Ack {
                packet_id,
                exactly_once: true,
            }),
        };
        // QoS 2: a PUBLISH whose identifier awaits PUBREL is a duplicate; not delivered again.
        if let QosPid::ExactlyOnce(id) = publish.qos {
            let state = self.client.session.lock();
            if state.incoming_qos2.contains(&id) {
                drop(state);
                // Acknowledged as the core says: a twin command's first attempt may still be on
                // its way to the journal.
                match (self.core.duplicate(&topic), ack) {
                    (Outcome::Now(told), Some(ack)) => self.acknowledge(ack, &told),
                    (Outcome::Pending(pending), ack) => self.in_order.push_back(InOrder {
                        pending: Some(pending),
                        told: Told::accepted(),
                        answer: ack.map(Answer::Publish),
                    }),
                    (Outcome::Now(_), None) => {}
                }
                return None;
            }
            if state.incoming_qos2.len() >= usize::from(self.core.settings.receive_maximum) {
                return Some(Close::ReceiveMaximumExceeded);
            }
        }
        // Slices of the read buffer: the core copies them only if it sends an answer.
        let reply = ReplyTo {
            wanted: true,
            topic: self
                .v5()
                .then(|| publish.properties.response_topic.clone())
                .flatten(),
            correlation: publish.properties.correlation_data.clone(),
        };
        let origin = Origin {
            qos: publish.qos.qos(),
            retain: publish.retain,
            properties: forwarded(&publish.properties),
            expiry_seconds: publish.properties.message_expiry_interval,
            publisher: self.client.session.id,
        };
        let outcome = self
            .core
            .publish(&self.client, &topic, &publish.payload, origin, reply);
        match outcome {
            Outcome::Now(told) => {
                let mut journaled = None;
                if let QosPid::ExactlyOnce(id) = publish.qos
                    && (told.verdict == Verdict::Accepted || !self.v5())
                {
                    journaled = self.core.received_exactly_once(&self.client, id);
                }
                if let Some(ack) = ack {
                    match journaled {
                        // The PUBREC once the session's record of the identifier is durable.
                        Some(pending) => self.in_order.push_back(InOrder {
                            pending: Some(pending),
                            told,
                            answer: Some(Answer::Publish(ack)),
                        }),
                        None if self.in_order.is_empty() => self.acknowledge(ack, &told),
                        // Acknowledgements go out in the order the PUBLISHes came (MQTT §4.6).
                        None => self.in_order.push_back(InOrder {
                            pending: None,
                            told,
                            answer: Some(Answer::Publish(ack)),
                        }),
                    }
                }
            }
            Outcome::Pending(pending) => {
                let journaled = match publish.qos {
                    QosPid::ExactlyOnce(id) => self.core.received_exactly_once(&self.client, id),
                    _ => None,
                };
                match journaled {
                    // First the write, then the record of the identifier: the PUBREC after both.
                    Some(recorded) => {
                        self.in_order.push_back(InOrder {
                            pending: Some(pending),
                            told: Told::accepted(),
                            answer: None,
                        });
                        self.in_order.push_back(InOrder {
                            pending: Some(recorded),
                            told: Told::accepted(),
                            answer: ack.map(Answer::Publish),
                        });
                    }
                    None => self.in_order.push_back(InOrder {
                        pending: Some(pending),
                        told: Told::accepted(),
                        answer: ack.map(Answer::Publish),
                    }),
                }
            }
        }
        None
    }

    /// The topic of a PUBLISH, through the v5 topic alias if it uses one.
    fn resolve_topic(&mut self, publish: &Publish) -> Result<TopicName, Close> {
        let Some(alias) = publish.properties.topic_alias else {
            if publish.topic.is_empty() {
                return Err(Close::Protocol(Violation::EmptyTopic));
            }
            return Ok(publish.topic.clone());
        };
        let max = self.core.settings.topic_alias_maximum;
        if alias.get() > max {
            return Err(Close::TopicAliasInvalid);
        }
        let index = usize::from(alias.get() - 1);
        if publish.topic.is_empty() {
            return match self.aliases.as_ref().and_then(|aliases| aliases.get(index)) {
                Some(Some(topic)) => Ok(topic.clone()),
                _ => Err(Close::Protocol(Violation::UnknownTopicAlias)),
            };
        }
        let aliases = self
            .aliases
            .get_or_insert_with(|| Box::new(vec![None; usize::from(max)]));
        if let Some(slot) = aliases.get_mut(index) {
            *slot = Some(deep_copy_topic(&publish.topic));
        }
        Ok(publish.topic.clone())
    }

    fn on_subscribe(&mut self, subscribe: Subscribe) -> Option<Close> {
        let id = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        if subscribe
            .subscriptions
            .iter()
            .any(|sub| sub.filter.is_shared() && sub.options.no_local)
        {
            return Some(Close::Protocol(Violation::NoLocalOnSharedSubscription));
        }
        let codes = subscribe
            .subscriptions
            .iter()
            .map(|sub| {
                let filter = sub.filter.as_str();
                let shared = sub.filter.is_shared();
                match self
                    .core
                    .subscribe(&self.client, filter, shared, sub.options, id)
                {
                    Ok(()) => sub.options.qos as u8,
                    Err(_) if self.v5() => ReasonCode::NotAuthorized.code(),
                    // 3.1.1 has one failure code, 0x80 (§3.9.3).
                    Err(_) => ReasonCode::UnspecifiedError.code(),
                }
            })
            .collect();
        // Retained messages of the new subscriptions wait in the session's queue: they follow
        // the SUBACK (of a persistent session, they may come first: MQTT-3.8.4-?, allowed).
        self.answer_when_saved(Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            codes,
            properties: Properties::default(),
        }));
        None
    }

    /// Sends `packet` (SUBACK, UNSUBACK) at once, or for a persistent session once its changed
    /// record is durable: a subscription acknowledged survives kill -9.
    fn answer_when_saved(&mut self, packet: Packet) {
        match self.core.session_saved(&self.client) {
            Some(pending) => self.in_order.push_back(InOrder {
                pending: Some(pending),
                told: Told::accepted(),
                answer: Some(Answer::Packet(Box::new(packet))),
            }),
            None => {
                self.outbound().packet(&packet);
            }
        }
    }

    fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let codes = unsubscribe
            .filters
            .iter()
            .map(|filter| {
                let existed =
                    self.core
                        .unsubscribe(&self.client, filter.as_str(), filter.is_shared());
                if existed {
                    ReasonCode::Success.code()
                } else {
                    ReasonCode::NoSubscriptionExisted.code()
                }
            })
            .collect();
        self.answer_when_saved(Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            codes,
            properties: Properties::default(),
        }));
    }

    fn on_disconnect(&mut self, disconnect: &Disconnect) -> Close {
        if let Some(expiry) = disconnect.properties.session_expiry_interval
            && self
                .core
                .change_session_expiry(&self.client, expiry)
                .is_err()
        {
            return Close::Protocol(Violation::SessionExpiryAfterZero);
        }
        Close::Disconnected {
            with_will: disconnect.reason == ReasonCode::DisconnectWithWill.code(),
        }
    }

    /// MQTT 5 re-authentication with a fresh token (DESIGN.md §2), decided by the core: the
    /// token to check.
    fn on_auth(&self, auth: Auth) -> Step {
        let method_ok = auth
            .properties
            .authentication_method
            .as_ref()
            .is_some_and(|m| m.as_str() == JWT_METHOD);
        if !self.client.identity.jwt_method
            || !method_ok
            || auth.reason != ReasonCode::ReAuthenticate.code()
        {
            return Step::Close(Close::Protocol(Violation::UnexpectedAuth));
        }
        let token = auth
            .properties
            .authentication_data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok());
        match token {
            Some(token) => Step::Reauthenticate(token.into()),
            None => Step::Close(Close::ReauthWithoutToken),
        }
    }

    /// Checks a re-authentication token through the core; AUTH 0x00 when it holds.
    async fn reauthenticate(&mut self, token: &str) -> Option<Close> {
        match self
            .core
            .reauthenticate(&mut self.client.identity, token)
            .await
        {
            Ok(()) => {}
            Err(ReauthRefusal::Invalid(_)) => return Some(Close::ReauthRefused),
            Err(ReauthRefusal::OtherIdentity) => return Some(Close::ReauthOtherIdentity),
        }
        // The new token may expire before the deadline the timer holds.
        self.timer_armed = false;
        let properties = Properties {
            authentication_method: JWT_METHOD.parse().ok(),
            ..Properties::default()
        };
        self.outbound().packet(&Packet::Auth(Auth {
            reason: ReasonCode::Success.code(),
            properties,
        }));
        tracing::debug!(client = %self.client.session.client_id, "re-authenticated");
        None
    }

    /// Ends the connection: the server's DISCONNECT (v5), the will, the session's fate.
    async fn finish(mut self, close: Close) {
        // Writes still waiting for the journal are announced when durable, though nobody is
        // left to acknowledge them.
        let waiting: Vec<Pending> = self
            .in_order
            .take()
            .into_iter()
            .filter_map(|entry| entry.pending)
            .filter(Pending::has_events)
            .collect();
        if !waiting.is_empty() {
            let core = self.core.clone();
            let space = self.client.space.clone();
            let session = self.client.session.clone();
            tokio::spawn(async move {
                for pending in waiting {
                    pending
                        .settle(core.clone(), space.clone(), session.clone())
                        .await;
                }
            });
        }
        // The session is let go before the socket closes: a client that reconnects as soon as
        // it sees the close finds the session offline (or gone), never still attached.
        let (still_ours, expiry) = self.core.detach(&self.client);
        if let (true, Some(will)) = (close.publishes_will(), self.will.take()) {
            // A new connection may have taken the session between this one's end (the
            // socket closed) and `detach`: the client is back, as with a takeover
            // (MQTT-3.1.3-9) — registering the delayed will now would publish it after the
            // new connection already cancelled pending wills.
            let taken_over = close == Close::TakenOver || !still_ours;
            will::publish_on_close(
                &self.core,
                &self.client,
                *will,
                taken_over,
                still_ours,
                expiry,
            );
        }
        if still_ours {
            self.core.expire_session(&self.client, expiry);
        }
        if let (Some(reason), true) = (close.server_reason(), self.v5()) {
            let properties = Properties {
                reason_string: close.reason_string().and_then(|r| r.parse().ok()),
                ..Properties::default()
            };
            self.outbound().packet(&Packet::Disconnect(Disconnect {
                reason: reason.code(),
                properties,
            }));
        }
        let _ = self.flush().await;
        self.io.shutdown().await;
        tracing::debug!(client = %self.client.session.client_id, reason = close.label(), "disconnected");
        self.core.metrics.connections_active.dec();
    }
}

/// The close for a packet the codec refused.
fn codec_close(e: &CodecError) -> Close {
    match e.kind() {
        ErrorKind::TooLarge => Close::PacketTooLarge,
        ErrorKind::Malformed => Close::Malformed,
        _ => Close::Protocol(Violation::Codec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    pub(crate) fn returned_size<A, B, C, D, E, G, F>(
        _: impl FnOnce(A, B, C, D, E, G) -> F,
    ) -> usize {
        std::mem::size_of::<F>()
    }

    /// What an idle connection holds besides its socket: tokio's task (a 128-byte-aligned cell
    /// of ~104 bytes plus the future: a future over 24 bytes doubles it), the boxed
    /// connection and its session, each within an allocator size class (mimalloc's: 320,
    /// 256). A field added to any of them fails here rather than silently costing every
    /// idle connection a size class (measure with `bench compare --scenarios idle`).
    #[test]
    fn an_idle_connection_holds_a_task_of_three_words_and_a_connection_within_320_bytes() {
        assert!(
            returned_size(serve) <= 24,
            "the connection's task future is {} bytes",
            returned_size(serve)
        );
        let conn = std::mem::size_of::<Conn>();
        assert!(conn <= 320, "`Conn` is {conn} bytes");
        // `Arc<Session>`: two counts before it.
        let session = std::mem::size_of::<crate::core::session::Session>() + 16;
        assert!(session <= 256, "`Arc<Session>` is {session} bytes");
        let amqp = returned_size(crate::amqp::connection::serve);
        assert!(
            amqp <= 152,
            "an AMQP connection's task future is {amqp} bytes (tokio's cell then over 256)"
        );
    }
}
