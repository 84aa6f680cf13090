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
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use tokio::time::sleep_until;

use crate::core::identity::{JWT_METHOD, ReauthRefusal};
use crate::core::message::{Origin, deep_copy_topic};
use crate::core::session::AckOutcome;
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

/// Serves one accepted socket until it closes.
///
/// The handshake and the ending run as boxed futures: their large locals (the CONNECT, its
/// CONNACK) then live on the heap only while they run, and the task of an idle connection
/// holds just the connection and its small main-loop future. Not an `async fn`: its
/// arguments would stay in the task for the connection's whole life (~130 bytes per idle
/// connection); they go into the boxed handshake instead.
pub fn serve(
    core: Arc<Core>,
    io: Transport,
    peer: SocketAddr,
    slot: HandshakeSlot,
    admission: Arc<Admission>,
    done: tokio::sync::mpsc::Sender<()>,
) -> impl Future<Output = ()> + Send {
    let metrics = core.metrics.clone();
    metrics.connections_active.inc();
    let handshake =
        Box::pin(async move { handshake::open(&core, io, peer, slot, &admission).await });
    async move {
        // Held until the connection is over: the server's shutdown waits for every sender.
        let _done = done;
        if let Some(mut conn) = handshake.await {
            let close = conn.run().await;
            Box::pin((*conn).finish(close)).await;
        }
        metrics.connections_active.dec();
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

/// Completes with what the oldest entry tells its publisher once it may be acknowledged (at
/// once for an entry without a write). Every waiting write is driven, not only the oldest: a
/// later one's events go out (and a persistent subscriber's record of them is journaled) as
/// soon as it is durable, while the acknowledgements still leave in order — driving only the
/// oldest made each write behind it wait a journal round of its own (measured: twin QoS 1 to
/// a persistent subscriber at a quarter of the clean figure). Writes complete in journal
/// order, so their events go out in PUBLISH order. Cancel-safe: entries stay in the queue.
fn front_done<'a>(
    queue: &'a mut VecDeque<InOrder>,
    core: &'a Core,
    client: &'a Client,
) -> impl Future<Output = Told> + 'a {
    std::future::poll_fn(move |cx| {
        // Front to back, and no write announces its events before every write ahead of it
        // has announced its own (a thing's events in revision order, whatever order the
        // writes' completions are seen in).
        for entry in queue.iter_mut() {
            if let Some(pending) = &mut entry.pending {
                if let Poll::Ready(told) =
                    pending.poll_done(cx, core, &client.space, &client.session)
                {
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
    })
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
    pub(crate) keep_alive: Option<Duration>,
    /// Outgoing QoS 1/2 messages in flight at most (ours, capped by the client's receive max).
    pub(crate) max_inflight: usize,
    /// The client's maximum packet size.
    pub(crate) client_max_packet: u32,
    /// Incoming topic aliases (MQTT 5), allocated at first use.
    pub(crate) aliases: Vec<Option<TopicName>>,
    /// Outgoing topic aliases (MQTT 5, up to the client's Topic Alias Maximum).
    pub(crate) out_aliases: TopicAliases,
    /// v5 Request Problem Information: may reason strings be sent on non-final packets.
    pub(crate) problem_information: bool,
    /// Acknowledgements waiting for twin writes, in PUBLISH order.
    pub(crate) in_order: VecDeque<InOrder>,
    /// Its place among `max_connections`.
    pub(crate) _slot: ConnectionSlot,
    /// The token of an AUTH (re-authentication) to check before the next packet is read: its
    /// check may have to re-read the issuers' keys, which is awaited.
    pub(crate) reauth: Option<Box<str>>,
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

    /// The connection's main loop; returns why it ended.
    async fn run(&mut self) -> Close {
        let mut keep_alive_deadline = self.keep_alive_deadline();
        loop {
            self.drain();
            if let Err(e) = self.flush().await {
                tracing::debug!(peer = %self.peer, error = %e, "write failed");
                return Close::WriteFailed;
            }
            // One timer for both deadlines (a smaller future per idle connection).
            let token_deadline = self.token_deadline();
            let deadline = match (keep_alive_deadline, token_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let session = self.client.session.clone();
            let link = self.client.link.clone();
            // Backpressure: with this many twin writes waiting for the journal, stop reading
            // (the client's TCP window fills) until some are durable.
            let may_read = self.in_order.len() < usize::from(self.core.settings.receive_maximum);
            tokio::select! {
                biased;
                // Takeover, revocation and server shutdown (`Core::kick_all`) all kick.
                _ = link.kick.notified() => {
                    return if *self.core.shutdown.borrow() {
                        Close::ShuttingDown
                    } else if link.revoked.load(std::sync::atomic::Ordering::Acquire) {
                        Close::CredentialsRevoked
                    } else {
                        Close::TakenOver
                    };
                }
                read = self.io.read_into(&mut self.rbuf), if may_read => {
                    match read {
                        Ok(0) => return Close::ClosedByClient,
                        Ok(n) => {
                            keep_alive_deadline = self.keep_alive_deadline();
                            loop {
                                if let Some(close) = self.process_input() {
                                    return close;
                                }
                                let Some(token) = self.reauth.take() else { break };
                                // Boxed: a key re-read's state is large and rare; it must not
                                // size the task of every (idle) connection.
                                if let Some(close) = Box::pin(self.reauthenticate(&token)).await {
                                    return close;
                                }
                            }
                            if self.rbuf.is_empty() && n < SMALL_READ {
                                self.rbuf = BytesMut::new();
                            }
                        }
                        Err(e) => {
                            tracing::debug!(peer = %self.peer, error = %e, "read failed");
                            return Close::ReadFailed;
                        }
                    }
                }
                _ = session.wake.notified() => {}
                told = front_done(&mut self.in_order, &self.core, &self.client), if !self.in_order.is_empty() => {
                    self.answer_front(&told);
                    // The writes completed in the same pass (one journal batch) answer in the
                    // same write to the socket: one send per batch, not one per PUBACK.
                    while let Some(entry) = self.in_order.front_mut()
                        && entry.pending.is_none()
                    {
                        let told = std::mem::replace(&mut entry.told, Told::accepted());
                        self.answer_front(&told);
                    }
                }
                _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {
                    if token_deadline.is_some_and(|t| t <= tokio::time::Instant::now()) {
                        return Close::TokenExpired;
                    }
                    if keep_alive_deadline.is_some_and(|k| k <= tokio::time::Instant::now()) {
                        return Close::KeepAliveTimeout;
                    }
                }
            }
        }
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

    fn keep_alive_deadline(&self) -> Option<tokio::time::Instant> {
        self.keep_alive
            .map(|k| tokio::time::Instant::now() + k + k / 2)
    }

    fn token_deadline(&self) -> Option<tokio::time::Instant> {
        let at = self.client.identity.expires_at?;
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(tokio::time::Instant::now() + left)
    }

    /// Moves queued messages into the write buffer, as far as the inflight window allows.
    fn drain(&mut self) {
        let max_inflight = self.max_inflight;
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
        let max_packet = self.core.settings.max_packet_size as usize;
        loop {
            match codec::decode(&mut self.rbuf, self.protocol, max_packet) {
                Ok(Some(packet)) => {
                    if let Some(close) = self.handle(packet) {
                        return Some(close);
                    }
                    if self.reauth.is_some() {
                        // The next packets are handled once the token is checked.
                        return None;
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
                    return Some(close);
                }
            }
        }
    }

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
            Packet::Auth(auth) => self.on_auth(auth),
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
            return match self.aliases.get(index) {
                Some(Some(topic)) => Ok(topic.clone()),
                _ => Err(Close::Protocol(Violation::UnknownTopicAlias)),
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

    /// MQTT 5 re-authentication with a fresh token (DESIGN.md §2), decided by the core.
    fn on_auth(&mut self, auth: Auth) -> Option<Close> {
        let method_ok = auth
            .properties
            .authentication_method
            .as_ref()
            .is_some_and(|m| m.as_str() == JWT_METHOD);
        if !self.client.identity.jwt_method
            || !method_ok
            || auth.reason != ReasonCode::ReAuthenticate.code()
        {
            return Some(Close::Protocol(Violation::UnexpectedAuth));
        }
        let token = auth
            .properties
            .authentication_data
            .as_deref()
            .and_then(|d| std::str::from_utf8(d).ok());
        let Some(token) = token else {
            return Some(Close::ReauthWithoutToken);
        };
        self.reauth = Some(token.into());
        None
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
        let waiting: Vec<Pending> = std::mem::take(&mut self.in_order)
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

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365)
}
