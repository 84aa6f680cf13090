//! One AMQP 0.9.1 connection after its handshake: channels, queues, consumers and publisher
//! confirms translated into the core's calls. Nothing here decides:
//!
//! - `basic.publish` (to `amq.topic`, or to the default exchange for answers to a `reply-to`) →
//!   the routing key's MQTT topic ([`mapping`]) → [`Core::publish`]: WRITE checked, twin command
//!   applied, live or plain message fanned out, exactly as an MQTT PUBLISH. With
//!   `confirm.select`, `basic.ack` once the core says it is done (a twin write: once durable),
//!   `basic.nack` when it is denied or failed; the connection stays.
//! - A queue is a core session (its name is the session's client ID): server-named, exclusive,
//!   auto-delete or non-durable queues are clean sessions that end with the connection; a named
//!   durable queue is a persistent session (journaled; it outlives the connection). `queue.bind`
//!   on `amq.topic` is [`Core::subscribe`] with the binding key's MQTT filter; the core's fan-out
//!   judges every delivery into the queue (READ, the view cut).
//! - Consumers drain their queue's session within the channel's prefetch window; `basic.ack` /
//!   `nack` / `reject` complete or requeue the delivery in the session.
//! - `reply-to` naming one of this connection's queues becomes that queue's reply address
//!   ([`Core::reply_address`]): the core sends a command's answer, or a device's answer to a
//!   live message, into that queue alone.
//!
//! One task per connection; it waits on whichever comes first: bytes from the socket, something
//! queued in one of its sessions, a twin write becoming durable, a takeover or revocation,
//! server shutdown, the heartbeat or the token's expiry. No lock is held across an `.await`.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use amq_protocol::protocol::{
    AMQPClass, access, basic, channel, confirm, connection, exchange, queue,
};
use amq_protocol::types::ShortString;
use bytes::{Bytes, BytesMut};

use crate::amqp::codec::{self, ContentHeader, DeliveryMethod, Frame};
use crate::amqp::handshake::{Negotiated, printable};
use crate::amqp::mapping;
use crate::amqp::reply::{self, *};
use crate::core::identity::ReauthRefusal;
use crate::core::message::{Delivery, Origin};
use crate::core::session::{Protocol, Signal};
use crate::core::{
    Client, Core, Outcome, Pending, REPLY_PREFIX, ReplyTo, SessionRequest, Told, Verdict,
};
use crate::limits::amqp as limits;
use crate::mqtt::admission::{Admission, ConnectionSlot, HandshakeSlot};
use crate::mqtt::codec::{QoS, SubscriptionOptions, TopicName};
use crate::mqtt::transport::Transport;

/// Deliveries stop being written into the write buffer for this pass once it holds this much.
const WRITE_BATCH: usize = 256 * 1024;

/// Serves one accepted socket until it closes. The handshake and the ending run boxed, so
/// an idle connection's task holds only the connection and its main loop's small future; not
/// an `async fn`, whose arguments would stay in the task for the connection's whole life
/// (they go into the boxed handshake).
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
        Box::pin(
            async move { crate::amqp::handshake::open(&core, io, peer, slot, &admission).await },
        );
    async move {
        // Held until the connection is over: the server's shutdown waits for every sender.
        let _done = done;
        if let Some(mut conn) = handshake.await {
            let ending = conn.run().await;
            Box::pin(conn.finish(ending)).await;
        }
        metrics.connections_active.dec();
    }
}

/// Why the main loop ended.
#[derive(Debug)]
enum Ending {
    /// The client sent `connection.close` (answered with `close-ok`).
    ClientClosed,
    /// The socket closed or failed, or the heartbeat was missed: nothing more to say.
    Gone,
    /// `connection.close` with this code and text (for the class and method that caused it).
    Close(u16, String, u16, u16),
}

impl Ending {
    fn close(code: u16, text: impl Into<String>) -> Self {
        Ending::Close(code, text.into(), 0, 0)
    }

    fn for_method(code: u16, text: impl Into<String>, class: &AMQPClass) -> Self {
        Ending::Close(
            code,
            text.into(),
            class.get_amqp_class_id(),
            class.get_amqp_method_id(),
        )
    }
}

/// A channel error: `channel.close` with this code and text; the connection stays.
#[derive(Debug)]
struct ChannelError(u16, String);

/// What a method asks of the connection: nothing more, a channel error, or its end.
type Handled = Result<(), Failure>;

#[derive(Debug)]
enum Failure {
    Channel(ChannelError),
    Connection(Ending),
}

impl From<ChannelError> for Failure {
    fn from(e: ChannelError) -> Self {
        Failure::Channel(e)
    }
}

fn channel_error(code: u16, text: impl Into<String>) -> Failure {
    Failure::Channel(ChannelError(code, text.into()))
}

/// A message being received: `basic.publish`, then its content header, then body frames.
#[derive(Debug)]
struct Content {
    routing_key: Box<str>,
    header: Option<ContentHeader>,
    body: BytesMut,
}

/// A delivery sent on a channel and not yet acknowledged.
#[derive(Debug)]
struct Unacked {
    tag: u64,
    queue: Arc<str>,
    consumer: Option<Arc<str>>,
    /// Its identifier in the queue's session (QoS 1); a QoS 0 delivery is gone once sent.
    packet_id: Option<NonZeroU16>,
    /// A QoS 0 (transient) delivery that awaits an acknowledgement: the session forgot it
    /// once sent, so a requeue (`nack`/`reject`, or its channel ending) puts this copy back
    /// at the end of the queue — RabbitMQ requeues transient messages too.
    transient: Option<Box<Delivery>>,
}

/// `queue.declare` of a name this connection cannot take (405, as RabbitMQ answers for an
/// exclusive queue of another connection).
const RESOURCE_LOCKED: u16 = 405;

#[derive(Debug)]
struct Consumer {
    tag: Arc<str>,
    queue: Arc<str>,
    no_ack: bool,
    /// `basic.qos` with `global = false` when it started: its own window (0: none).
    prefetch: u16,
    unacked: usize,
}

#[derive(Debug)]
struct Channel {
    id: u16,
    /// We sent `channel.close` and wait for `close-ok`; everything else is ignored.
    closing: bool,
    /// `confirm.select`: publishes are numbered and confirmed.
    confirm: bool,
    published: u64,
    /// `basic.qos` with `global = true`: the channel's window (0: none).
    prefetch: u16,
    /// `basic.qos` with `global = false`: the window of consumers started from now on.
    consumer_prefetch: u16,
    /// `channel.flow`: deliveries paused when false.
    active: bool,
    next_tag: u64,
    unacked: std::collections::VecDeque<Unacked>,
    consumers: Vec<Consumer>,
    content: Option<Box<Content>>,
}

impl Channel {
    fn new(id: u16) -> Self {
        Channel {
            id,
            closing: false,
            confirm: false,
            published: 0,
            prefetch: 0,
            consumer_prefetch: 0,
            active: true,
            next_tag: 1,
            unacked: std::collections::VecDeque::new(),
            consumers: Vec::new(),
            content: None,
        }
    }
}

/// A queue declared on this connection: a session of the core.
#[derive(Debug)]
struct Queue {
    name: Arc<str>,
    client: Client,
    /// A persistent session (a named durable queue).
    durable: bool,
    /// Its reply address, once a publish named it as `reply-to`.
    reply: Option<TopicName>,
    bindings: usize,
}

/// A publish whose outcome waits for the journal: confirmed (if the channel asked) once done.
#[derive(Debug)]
struct Confirming {
    channel: u16,
    tag: Option<u64>,
    pending: Pending,
}

/// Something the loop must await before it reads on: a queue's or binding's record becoming
/// durable (then the reply goes out), or a fresh token's check.
#[derive(Debug)]
enum Wait {
    Saved {
        pending: Pending,
        channel: u16,
        reply: Vec<u8>,
    },
    Reauthenticate(String),
}

/// The state of an open AMQP connection.
#[derive(Debug)]
pub(crate) struct Conn {
    core: Arc<Core>,
    io: Transport,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// The connection's own session: it publishes, and answers that name no queue land here
    /// (and are dropped, counted).
    client: Client,
    frame_max: u32,
    channel_max: u16,
    /// The negotiated heartbeat interval in seconds (0: none).
    heartbeat: u16,
    /// When bytes last came in and went out ([`clock_ms`]; wrapping).
    last_read: u32,
    last_write: u32,
    channels: Vec<Channel>,
    queues: Vec<Queue>,
    confirming: Vec<Confirming>,
    wait: Option<Box<Wait>>,
    /// When the core's timer raises the link's deadline signal for heartbeats and token
    /// expiry (`arm_timer`); `None`: not registered.
    timer_at: Option<tokio::time::Instant>,
    _slot: ConnectionSlot,
}

/// What ends the main loop's wait.
enum Event {
    Read(std::io::Result<usize>),
    Woken(Woken),
    /// The publish at this index of `confirming` is done.
    Confirmed(usize, Told),
    Timer,
}

/// What woke the loop besides the socket.
enum Woken {
    Queued,
    /// The connection's own link (`None`) or a queue's was kicked.
    Kicked(Option<usize>),
}

impl Conn {
    pub(crate) fn new(
        core: Arc<Core>,
        io: Transport,
        rbuf: BytesMut,
        negotiated: Negotiated,
    ) -> Self {
        let now = clock_ms();
        Conn {
            core,
            io,
            rbuf,
            wbuf: Vec::new(),
            client: negotiated.client,
            frame_max: negotiated.frame_max,
            channel_max: negotiated.channel_max,
            heartbeat: negotiated.heartbeat,
            last_read: now,
            last_write: now,
            channels: Vec::new(),
            queues: Vec::new(),
            confirming: Vec::new(),
            wait: None,
            timer_at: None,
            _slot: negotiated.slot,
        }
    }

    /// The main loop; returns why it ended.
    async fn run(&mut self) -> Ending {
        loop {
            if let Some(wait) = self.wait.take()
                && let Err(ending) = Box::pin(self.settle(*wait)).await
            {
                return ending;
            }
            if let Err(ending) = self.read_frames() {
                return ending;
            }
            let more = self.deliver();
            if !self.wbuf.is_empty() {
                // Polled, not `write_all`'s future: the wait stays small in every task.
                if std::future::poll_fn(|cx| self.poll_write_out(cx))
                    .await
                    .is_err()
                {
                    return Ending::Gone;
                }
                self.last_write = clock_ms();
                self.wbuf.clear();
                // An idle connection holds no write buffer, nor keeps one a burst grew.
                if self.wbuf.capacity() < 1024 || self.wbuf.capacity() > 64 * 1024 {
                    self.wbuf = Vec::new();
                }
            }
            if self.wait.is_some() || more {
                // More to deliver than one pass writes: on once the socket took this much.
                continue;
            }
            self.arm_timer();
            let reading = self.confirming.len() < usize::from(self.core.settings.receive_maximum);
            // One poll function over every source: the wait keeps no future per source in
            // the task (a `select!` kept one each).
            match std::future::poll_fn(|cx| self.poll_event(cx, reading)).await {
                Event::Read(Ok(0) | Err(_)) => return Ending::Gone,
                Event::Read(Ok(_)) => self.last_read = clock_ms(),
                Event::Woken(Woken::Queued) => {}
                Event::Woken(Woken::Kicked(_)) if *self.core.shutdown.borrow() => {
                    return Ending::close(
                        CONNECTION_FORCED,
                        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'",
                    );
                }
                Event::Woken(Woken::Kicked(None)) => return self.kicked(),
                Event::Woken(Woken::Kicked(Some(i))) => self.queue_taken_over(i),
                Event::Confirmed(i, told) => self.confirm(i, &told),
                Event::Timer => {
                    if let Some(ending) = self.on_timer() {
                        return ending;
                    }
                }
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
                // Idle connections hold no read buffer (nor keep one a large message grew).
                self.rbuf = BytesMut::new();
            }
        }
    }

    /// Writes the write buffer out (it is empty once this is ready with `Ok`).
    fn poll_write_out(&mut self, cx: &mut std::task::Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = std::task::ready!(self.io.poll_write(cx, &self.wbuf))?;
            self.wbuf.drain(..n.min(self.wbuf.len()));
        }
        self.io.poll_flush(cx)
    }

    /// Whichever is ready first: input (unless too many publishes wait for their confirm), a
    /// wake-up or kick of a link, the oldest confirm, the timer.
    fn poll_event(&mut self, cx: &mut std::task::Context<'_>, reading: bool) -> Poll<Event> {
        if reading && let Poll::Ready(read) = poll_read(&mut self.io, cx, &mut self.rbuf) {
            return Poll::Ready(Event::Read(read));
        }
        if let Poll::Ready(woken) = poll_woken(cx, &self.client, &self.queues) {
            return Poll::Ready(Event::Woken(woken));
        }
        if !self.confirming.is_empty()
            && let Poll::Ready((i, told)) =
                poll_confirmed(cx, &mut self.confirming, &self.core, &self.client)
        {
            return Poll::Ready(Event::Confirmed(i, told));
        }
        if self.timer_at.is_some() && self.client.link.poll_take(cx, Signal::Deadline).is_ready() {
            self.timer_at = None;
            return Poll::Ready(Event::Timer);
        }
        Poll::Pending
    }

    fn heartbeat(&self) -> Option<Duration> {
        (self.heartbeat > 0).then(|| Duration::from_secs(u64::from(self.heartbeat)))
    }

    /// The earliest of: a heartbeat to send, a heartbeat missed, the token's expiry; `None`
    /// without heartbeats and token.
    fn deadline(&self) -> Option<Instant> {
        let beat = self.heartbeat().map(|beat| {
            let now = Instant::now();
            let send = (beat / 2).saturating_sub(since(self.last_write));
            let missed = (beat * 2).saturating_sub(since(self.last_read));
            now + send.min(missed)
        });
        let expiry = self.client.identity.expires_at().map(|at| {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            Instant::now() + left
        });
        match (beat, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Makes sure the core's timer ([`crate::core::deadlines`]) raises the link's deadline
    /// signal by the next deadline. A registration that fires earlier is kept (it fires, finds
    /// nothing due, and is made again): no registration per pass of the loop.
    fn arm_timer(&mut self) {
        let Some(at) = self.deadline() else {
            return;
        };
        let at = tokio::time::Instant::from_std(at);
        if self.timer_at.is_none_or(|registered| registered > at) {
            self.core.deadlines.register(at, &self.client.link);
            self.timer_at = Some(at);
        }
    }

    fn on_timer(&mut self) -> Option<Ending> {
        if let Some(at) = self.client.identity.expires_at()
            && at <= SystemTime::now()
        {
            return Some(Ending::close(
                CONNECTION_FORCED,
                "CONNECTION_FORCED - token expired",
            ));
        }
        if let Some(beat) = self.heartbeat() {
            if since(self.last_read) >= beat * 2 {
                tracing::debug!("AMQP heartbeat missed");
                self.core.metrics.protocol_error("amqp_heartbeat_missed");
                return Some(Ending::Gone);
            }
            if since(self.last_write) >= beat / 2 {
                codec::write_heartbeat(&mut self.wbuf);
            }
        }
        None
    }

    fn kicked(&self) -> Ending {
        let revoked = self
            .client
            .link
            .revoked
            .load(std::sync::atomic::Ordering::Acquire);
        if revoked {
            Ending::close(CONNECTION_FORCED, "CONNECTION_FORCED - credentials revoked")
        } else {
            Ending::close(
                CONNECTION_FORCED,
                "CONNECTION_FORCED - another connection took over this client ID",
            )
        }
    }

    /// Another connection took queue `i` over (it declared the same name, or an MQTT client
    /// connected with it as client ID): its consumers are cancelled (`basic.cancel`, RabbitMQ's
    /// consumer cancel notification) and the queue is no longer this connection's.
    fn queue_taken_over(&mut self, i: usize) {
        if i >= self.queues.len() {
            return;
        }
        let queue = self.queues.swap_remove(i);
        if queue
            .client
            .link
            .revoked
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // Revoked credentials: the whole connection goes (its own link is kicked too).
            self.client.link.kick();
        }
        self.cancel_consumers_of(&queue.name, true);
        queue.client.space.remove_replies(&queue.client.session);
    }

    /// Removes every consumer of `queue` (telling the client with `basic.cancel` if `notify`);
    /// their unacknowledged deliveries stay acknowledgeable.
    fn cancel_consumers_of(&mut self, queue: &str, notify: bool) {
        for channel in &mut self.channels {
            let id = channel.id;
            channel.consumers.retain(|c| {
                let keep = &*c.queue != queue;
                if !keep && notify {
                    reply::method(
                        &mut self.wbuf,
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                            consumer_tag: ShortString::try_new(&*c.tag).unwrap_or_default(),
                            nowait: true,
                        })),
                    );
                }
                keep
            });
        }
    }

    /// Handles every whole frame in the read buffer (stops early for a [`Wait`]).
    fn read_frames(&mut self) -> Result<(), Ending> {
        while self.wait.is_none() {
            let frame = match codec::decode(&mut self.rbuf, self.frame_max) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.core.metrics.protocol_error("amqp_bad_frame");
                    tracing::debug!(error = %e, "malformed AMQP frame");
                    let name = if e.reply_code() == FRAME_ERROR {
                        "FRAME_ERROR"
                    } else {
                        "SYNTAX_ERROR"
                    };
                    return Err(Ending::close(e.reply_code(), format!("{name} - {e}")));
                }
            };
            self.on_frame(frame)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), Ending> {
        match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Method(0, class) => self.on_connection_method(*class),
            Frame::Method(id, class) => {
                let result = self.on_channel_method(id, &class);
                self.settle_channel(id, result, Some(&class))
            }
            Frame::Header(id, header) => {
                let result = self.on_header(id, *header);
                self.settle_channel(id, result, None)
            }
            Frame::Body(id, body) => {
                let result = self.on_body(id, body);
                self.settle_channel(id, result, None)
            }
        }
    }

    /// A channel error closes the channel (its deliveries requeued, its consumers gone); a
    /// connection error ends the loop.
    fn settle_channel(
        &mut self,
        id: u16,
        result: Handled,
        class: Option<&AMQPClass>,
    ) -> Result<(), Ending> {
        match result {
            Ok(()) => Ok(()),
            Err(Failure::Connection(ending)) => Err(ending),
            Err(Failure::Channel(ChannelError(code, text))) => {
                let (class_id, method_id) = class
                    .map(|c| (c.get_amqp_class_id(), c.get_amqp_method_id()))
                    .unwrap_or((60, 40));
                reply::channel_close(&mut self.wbuf, id, code, &text, class_id, method_id);
                tracing::debug!(channel = id, code, text, "AMQP channel closed");
                self.end_channel(id, true);
                Ok(())
            }
        }
    }

    /// A channel ends: its unacknowledged deliveries go back to their queues, its consumers
    /// go. `closing`: we sent `channel.close` and keep the channel until `close-ok`.
    fn end_channel(&mut self, id: u16, closing: bool) {
        let Some(position) = self.channels.iter().position(|c| c.id == id) else {
            return;
        };
        let channel = match self.channels.get_mut(position) {
            Some(channel) => channel,
            None => return,
        };
        let unacked = std::mem::take(&mut channel.unacked);
        channel.consumers.clear();
        channel.content = None;
        channel.closing = closing;
        if !closing {
            self.channels.swap_remove(position);
        }
        for delivery in unacked {
            self.requeue(&delivery);
        }
    }

    fn requeue(&self, delivery: &Unacked) {
        let Some(queue) = self.queues.iter().find(|q| q.name == delivery.queue) else {
            return;
        };
        if let Some(packet_id) = delivery.packet_id {
            queue.client.session.lock().requeue(packet_id);
            queue.client.link.wake();
        } else if let Some(transient) = &delivery.transient {
            queue
                .client
                .session
                .lock()
                .requeue_delivery((**transient).clone());
            queue.client.link.wake();
        }
    }

    fn on_connection_method(&mut self, class: AMQPClass) -> Result<(), Ending> {
        match class {
            AMQPClass::Connection(connection::AMQPMethod::Close(close)) => {
                tracing::debug!(
                    code = close.reply_code,
                    "AMQP connection closed by the client"
                );
                reply::method(
                    &mut self.wbuf,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Err(Ending::ClientClosed)
            }
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(update)) => {
                match String::from_utf8(update.new_secret.as_bytes().to_vec()) {
                    Ok(token) => {
                        self.wait = Some(Box::new(Wait::Reauthenticate(token)));
                        Ok(())
                    }
                    Err(_) => Err(Ending::close(
                        ACCESS_REFUSED,
                        "ACCESS_REFUSED - the new secret is not a token",
                    )),
                }
            }
            AMQPClass::Connection(
                connection::AMQPMethod::Blocked(_) | connection::AMQPMethod::Unblocked(_),
            ) => Ok(()),
            other => {
                self.core.metrics.protocol_error("amqp_unexpected_method");
                Err(Ending::for_method(
                    COMMAND_INVALID,
                    "COMMAND_INVALID - unexpected method on channel 0",
                    &other,
                ))
            }
        }
    }

    fn channel_index(&self, id: u16) -> Option<usize> {
        self.channels.iter().position(|c| c.id == id)
    }

    fn on_channel_method(&mut self, id: u16, class: &AMQPClass) -> Handled {
        if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = class {
            if id > self.channel_max {
                return Err(Failure::Connection(Ending::for_method(
                    CHANNEL_ERROR,
                    format!(
                        "CHANNEL_ERROR - channel {id} is above channel_max {}",
                        self.channel_max
                    ),
                    class,
                )));
            }
            if self.channel_index(id).is_some() {
                return Err(Failure::Connection(Ending::for_method(
                    CHANNEL_ERROR,
                    "CHANNEL_ERROR - second 'channel.open' seen",
                    class,
                )));
            }
            // Most connections open one channel: room for it alone (a first `push` makes room
            // for four).
            self.channels.reserve_exact(1);
            self.channels.push(Channel::new(id));
            reply::method(
                &mut self.wbuf,
                id,
                AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
            );
            return Ok(());
        }
        let Some(index) = self.channel_index(id) else {
            return Err(Failure::Connection(Ending::for_method(
                CHANNEL_ERROR,
                format!("CHANNEL_ERROR - expected 'channel.open' on channel {id}"),
                class,
            )));
        };
        let closing = self.channels.get(index).is_some_and(|c| c.closing);
        match class {
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                reply::method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                self.end_channel(id, false);
                return Ok(());
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                self.end_channel(id, false);
                return Ok(());
            }
            // After our channel.close, everything but close and close-ok is ignored.
            _ if closing => return Ok(()),
            _ => {}
        }
        if self
            .channels
            .get(index)
            .is_some_and(|c| c.content.is_some())
        {
            return Err(Failure::Connection(Ending::for_method(
                UNEXPECTED_FRAME,
                "UNEXPECTED_FRAME - a method frame in the middle of a message's content",
                class,
            )));
        }
        match class {
            AMQPClass::Channel(channel::AMQPMethod::Flow(flow)) => {
                if let Some(channel) = self.channels.get_mut(index) {
                    channel.active = flow.active;
                }
                reply::method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: flow.active,
                    })),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                reply::method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(method) => self.on_exchange(id, method),
            AMQPClass::Queue(method) => self.on_queue(id, method),
            AMQPClass::Basic(method) => self.on_basic(index, method),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                if let Some(channel) = self.channels.get_mut(index) {
                    channel.confirm = true;
                }
                if !select.nowait {
                    reply::method(
                        &mut self.wbuf,
                        id,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(_) => Err(channel_error(
                NOT_IMPLEMENTED,
                "NOT_IMPLEMENTED - transactions are not supported; use publisher confirms",
            )),
            _ => Err(Failure::Connection(Ending::for_method(
                COMMAND_INVALID,
                "COMMAND_INVALID - a method the server does not expect from a client",
                class,
            ))),
        }
    }

    fn on_exchange(&mut self, id: u16, method: &exchange::AMQPMethod) -> Handled {
        match method {
            exchange::AMQPMethod::Declare(declare) => {
                let name = declare.exchange.as_str();
                let known = name == "amq.topic" || name.is_empty();
                if declare.passive && !known {
                    return Err(channel_error(
                        NOT_FOUND,
                        format!("NOT_FOUND - no exchange {} in vhost '/'", printable(name)),
                    ));
                }
                if !declare.passive {
                    if name.starts_with("amq.") {
                        return Err(channel_error(
                            ACCESS_REFUSED,
                            format!(
                                "ACCESS_REFUSED - exchange name {} contains reserved prefix 'amq.*'",
                                printable(name)
                            ),
                        ));
                    }
                    return Err(channel_error(
                        ACCESS_REFUSED,
                        format!(
                            "ACCESS_REFUSED - exchanges cannot be declared here: messages route through 'amq.topic' (declaring {})",
                            printable(name)
                        ),
                    ));
                }
                if !declare.nowait {
                    reply::method(
                        &mut self.wbuf,
                        id,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
                Ok(())
            }
            _ => Err(channel_error(
                ACCESS_REFUSED,
                "ACCESS_REFUSED - exchanges cannot be deleted or bound here: messages route through 'amq.topic'",
            )),
        }
    }

    fn queue_index(&self, name: &str) -> Option<usize> {
        self.queues.iter().position(|q| &*q.name == name)
    }

    fn no_queue(name: &str) -> Failure {
        channel_error(
            NOT_FOUND,
            format!("NOT_FOUND - no queue {} in vhost '/'", printable(name)),
        )
    }

    fn on_queue(&mut self, id: u16, method: &queue::AMQPMethod) -> Handled {
        match method {
            queue::AMQPMethod::Declare(declare) => self.queue_declare(id, declare),
            queue::AMQPMethod::Bind(bind) => self.queue_bind(id, bind),
            queue::AMQPMethod::Unbind(unbind) => {
                check_topic_exchange(unbind.exchange.as_str())?;
                let index = self
                    .queue_index(unbind.queue.as_str())
                    .ok_or_else(|| Self::no_queue(unbind.queue.as_str()))?;
                let filter =
                    mapping::binding_to_filter(unbind.routing_key.as_str()).map_err(|e| {
                        channel_error(PRECONDITION_FAILED, format!("PRECONDITION_FAILED - {e}"))
                    })?;
                if let Some(queue) = self.queues.get_mut(index)
                    && self.core.unsubscribe(&queue.client, &filter, false)
                {
                    queue.bindings = queue.bindings.saturating_sub(1);
                }
                let mut out = Vec::new();
                reply::method(
                    &mut out,
                    id,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                self.reply_when_saved(index, id, out);
                Ok(())
            }
            queue::AMQPMethod::Purge(purge) => {
                let index = self
                    .queue_index(purge.queue.as_str())
                    .ok_or_else(|| Self::no_queue(purge.queue.as_str()))?;
                let count = self
                    .queues
                    .get(index)
                    .map(|q| q.client.session.lock().purge())
                    .unwrap_or(0);
                if !purge.nowait {
                    reply::method(
                        &mut self.wbuf,
                        id,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: count as u32,
                        })),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Delete(delete) => {
                let name = delete.queue.as_str();
                let Some(index) = self.queue_index(name) else {
                    // RabbitMQ answers delete-ok for a queue that does not exist.
                    if !delete.nowait {
                        reply::method(
                            &mut self.wbuf,
                            id,
                            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                                message_count: 0,
                            })),
                        );
                    }
                    return Ok(());
                };
                let queued = self
                    .queues
                    .get(index)
                    .map(|q| q.client.session.lock().queued_len())
                    .unwrap_or(0);
                let in_use = self
                    .channels
                    .iter()
                    .any(|c| c.consumers.iter().any(|k| &*k.queue == name));
                if (delete.if_unused && in_use) || (delete.if_empty && queued > 0) {
                    return Err(channel_error(
                        PRECONDITION_FAILED,
                        format!(
                            "PRECONDITION_FAILED - queue {} in vhost '/' in use or not empty",
                            printable(name)
                        ),
                    ));
                }
                let queue = self.queues.swap_remove(index);
                self.cancel_consumers_of(&queue.name, false);
                self.end_queue(&queue, true);
                if !delete.nowait {
                    reply::method(
                        &mut self.wbuf,
                        id,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: queued as u32,
                        })),
                    );
                }
                Ok(())
            }
            _ => Err(Failure::Connection(Ending::close(
                COMMAND_INVALID,
                "COMMAND_INVALID - a queue method the server does not expect from a client",
            ))),
        }
    }

    fn queue_declare(&mut self, id: u16, declare: &queue::Declare) -> Handled {
        let requested = declare.queue.as_str();
        if let Some(index) = self.queue_index(requested) {
            let reply = self.declare_ok(index);
            if !declare.nowait {
                reply::method(&mut self.wbuf, id, reply);
            }
            return Ok(());
        }
        if declare.passive {
            // A queue of another connection (or a persistent session left without one).
            let Some(status) = self.core.session_status(&self.client, requested) else {
                return Err(Self::no_queue(requested));
            };
            let (messages, consumers) = (status.queued, u32::from(status.held));
            if !declare.nowait {
                reply::method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                        queue: declare.queue.clone(),
                        message_count: messages as u32,
                        consumer_count: consumers,
                    })),
                );
            }
            return Ok(());
        }
        if requested.starts_with("amq.") {
            return Err(channel_error(
                ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - queue name {} contains reserved prefix 'amq.*'",
                    printable(requested)
                ),
            ));
        }
        let held = self
            .core
            .session_status(&self.client, requested)
            .is_some_and(|status| status.held);
        if held && !requested.is_empty() {
            // Held by another connection (or by an MQTT client with this client ID): RabbitMQ
            // answers a second exclusive declaration so; taking the queue over would cancel
            // the other side's consumers.
            return Err(channel_error(
                RESOURCE_LOCKED,
                format!(
                    "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue {} in vhost '/'",
                    printable(requested)
                ),
            ));
        }
        let name: Arc<str> = if requested.is_empty() {
            let Some(id) = crate::core::assign_client_id() else {
                return Err(channel_error(
                    INTERNAL_ERROR,
                    "INTERNAL_ERROR - no queue name could be generated",
                ));
            };
            Arc::from(format!("amq.gen-{}", id.trim_start_matches("tg-")))
        } else {
            Arc::from(requested)
        };
        let durable = declare.durable && !declare.exclusive && !declare.auto_delete;
        self.adopt(name, durable)?;
        let index = self.queues.len() - 1;
        let reply = self.declare_ok(index);
        if !declare.nowait {
            let mut out = Vec::new();
            reply::method(&mut out, id, reply);
            self.reply_when_saved(index, id, out);
        }
        Ok(())
    }

    /// Attaches this connection to the session of queue `name` (a clean one unless
    /// `durable`; a durable one resumed with its bindings and queued messages).
    fn adopt(&mut self, name: Arc<str>, durable: bool) -> Result<usize, Failure> {
        if self.queues.len() >= limits::MAX_QUEUES {
            return Err(channel_error(
                PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - a connection may use at most {} queues",
                    limits::MAX_QUEUES
                ),
            ));
        }
        let mut identity = self.client.identity.clone();
        identity.client_id = name.clone();
        let attached = self
            .core
            .attach(
                identity,
                SessionRequest {
                    clean_start: !durable,
                    expiry_seconds: if durable { u32::MAX } else { 0 },
                    protocol: Protocol::AmqpQueue,
                },
            )
            .map_err(|_| {
                channel_error(
                    PRECONDITION_FAILED,
                    "PRECONDITION_FAILED - the solution has as many queues and sessions as it may",
                )
            })?;
        let client = attached.client;
        let bindings = {
            let mut state = client.session.lock();
            // What a previous connection of this (durable) queue left unacknowledged goes first.
            state.requeue_inflight();
            state.subscriptions.len()
        };
        self.queues.push(Queue {
            name,
            client,
            durable,
            reply: None,
            bindings,
        });
        Ok(self.queues.len() - 1)
    }

    /// The queue `name` for `basic.get`, `basic.consume` or `queue.bind`: one this connection
    /// declared, or a durable queue no connection holds now (adopted, as RabbitMQ's durable
    /// queues exist apart from their connections). A durable queue another connection holds is
    /// 405 RESOURCE_LOCKED (taking it over is what `queue.declare` does); anything else 404.
    fn queue_for(&mut self, name: &str) -> Result<usize, Failure> {
        if let Some(index) = self.queue_index(name) {
            return Ok(index);
        }
        let Some(status) = self
            .core
            .session_status(&self.client, name)
            .filter(|status| status.persistent)
        else {
            return Err(Self::no_queue(name));
        };
        if status.held {
            return Err(channel_error(
                RESOURCE_LOCKED,
                format!(
                    "RESOURCE_LOCKED - queue {} in vhost '/' is in use by another connection",
                    printable(name)
                ),
            ));
        }
        self.adopt(Arc::from(name), true)
    }

    fn declare_ok(&self, index: usize) -> AMQPClass {
        let (name, messages) = self
            .queues
            .get(index)
            .map(|q| (q.name.clone(), q.client.session.lock().queued_len()))
            .unwrap_or_else(|| (Arc::from(""), 0));
        let consumers = self
            .channels
            .iter()
            .flat_map(|c| &c.consumers)
            .filter(|c| c.queue == name)
            .count();
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
            queue: ShortString::try_new(&*name).unwrap_or_default(),
            message_count: messages as u32,
            consumer_count: consumers as u32,
        }))
    }

    /// Sends `reply` now, or — for a durable queue — once what was written of its session is
    /// durable (a declared queue or binding survives a crash once acknowledged).
    fn reply_when_saved(&mut self, index: usize, channel: u16, reply: Vec<u8>) {
        let pending = self
            .queues
            .get(index)
            .and_then(|q| self.core.session_saved(&q.client));
        match pending {
            Some(pending) => {
                self.wait = Some(Box::new(Wait::Saved {
                    pending,
                    channel,
                    reply,
                }));
            }
            None => self.wbuf.extend_from_slice(&reply),
        }
    }

    fn queue_bind(&mut self, id: u16, bind: &queue::Bind) -> Handled {
        check_topic_exchange(bind.exchange.as_str())?;
        let key = bind.routing_key.as_str();
        let filter = mapping::binding_to_filter(key).map_err(|e| {
            channel_error(PRECONDITION_FAILED, format!("PRECONDITION_FAILED - {e}"))
        })?;
        if crate::mqtt::codec::TopicFilter::new(Bytes::from(filter.clone())).is_err() {
            return Err(channel_error(
                PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - binding key {} is no MQTT topic filter",
                    printable(key)
                ),
            ));
        }
        let index = self.queue_for(bind.queue.as_str())?;
        let Some(queue) = self.queues.get_mut(index) else {
            return Err(Self::no_queue(bind.queue.as_str()));
        };
        let existed = queue
            .client
            .session
            .lock()
            .subscriptions
            .contains_key(filter.as_str());
        // Binding a key the queue has is no new binding (idempotent, as in RabbitMQ).
        if !existed && queue.bindings >= limits::MAX_BINDINGS {
            return Err(channel_error(
                PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - a queue may have at most {} bindings",
                    limits::MAX_BINDINGS
                ),
            ));
        }
        let options = SubscriptionOptions::qos(QoS::AtLeastOnce);
        if self
            .core
            .subscribe(&queue.client, &filter, false, options, None)
            .is_err()
        {
            return Err(channel_error(
                ACCESS_REFUSED,
                format!(
                    "ACCESS_REFUSED - binding {} to exchange 'amq.topic' refused",
                    printable(key)
                ),
            ));
        }
        if !existed {
            queue.bindings += 1;
        }
        if !bind.nowait {
            let mut out = Vec::new();
            reply::method(
                &mut out,
                id,
                AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
            );
            self.reply_when_saved(index, id, out);
        }
        Ok(())
    }

    fn on_basic(&mut self, index: usize, method: &basic::AMQPMethod) -> Handled {
        let id = self.channels.get(index).map_or(0, |c| c.id);
        match method {
            basic::AMQPMethod::Publish(publish) => {
                let exchange = publish.exchange.as_str();
                if !exchange.is_empty() && exchange != "amq.topic" {
                    return Err(channel_error(
                        NOT_FOUND,
                        format!(
                            "NOT_FOUND - no exchange {} in vhost '/'",
                            printable(exchange)
                        ),
                    ));
                }
                if publish.immediate {
                    return Err(Failure::Connection(Ending::close(
                        NOT_IMPLEMENTED,
                        "NOT_IMPLEMENTED - immediate=true",
                    )));
                }
                if let Some(channel) = self.channels.get_mut(index) {
                    channel.content = Some(Box::new(Content {
                        routing_key: publish.routing_key.as_str().into(),
                        header: None,
                        body: BytesMut::new(),
                    }));
                }
                Ok(())
            }
            basic::AMQPMethod::Qos(qos) => {
                if let Some(channel) = self.channels.get_mut(index) {
                    if qos.global {
                        channel.prefetch = qos.prefetch_count;
                    } else {
                        channel.consumer_prefetch = qos.prefetch_count;
                    }
                }
                reply::method(
                    &mut self.wbuf,
                    id,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Consume(consume) => self.consume(index, consume),
            basic::AMQPMethod::Cancel(cancel) => {
                if let Some(channel) = self.channels.get_mut(index) {
                    channel
                        .consumers
                        .retain(|c| &*c.tag != cancel.consumer_tag.as_str());
                }
                if !cancel.nowait {
                    reply::method(
                        &mut self.wbuf,
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: cancel.consumer_tag.clone(),
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(get) => self.get(index, get),
            basic::AMQPMethod::Ack(ack) => {
                for done in self.take_unacked(index, ack.delivery_tag, ack.multiple)? {
                    self.complete(&done);
                }
                Ok(())
            }
            basic::AMQPMethod::Nack(nack) => {
                for done in self.take_unacked(index, nack.delivery_tag, nack.multiple)? {
                    self.refuse(&done, nack.requeue);
                }
                Ok(())
            }
            basic::AMQPMethod::Reject(reject) => {
                for done in self.take_unacked(index, reject.delivery_tag, false)? {
                    self.refuse(&done, reject.requeue);
                }
                Ok(())
            }
            basic::AMQPMethod::Recover(_) | basic::AMQPMethod::RecoverAsync(_) => {
                let unacked = self
                    .channels
                    .get_mut(index)
                    .map(|c| {
                        for consumer in &mut c.consumers {
                            consumer.unacked = 0;
                        }
                        std::mem::take(&mut c.unacked)
                    })
                    .unwrap_or_default();
                for delivery in unacked {
                    self.requeue(&delivery);
                }
                if matches!(method, basic::AMQPMethod::Recover(_)) {
                    reply::method(
                        &mut self.wbuf,
                        id,
                        AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(Failure::Connection(Ending::close(
                COMMAND_INVALID,
                "COMMAND_INVALID - a basic method the server does not expect from a client",
            ))),
        }
    }

    fn consume(&mut self, index: usize, consume: &basic::Consume) -> Handled {
        let queue_name = consume.queue.as_str();
        let index_of_queue = self.queue_for(queue_name)?;
        let queue = self
            .queues
            .get(index_of_queue)
            .ok_or_else(|| Self::no_queue(queue_name))?;
        let queue_name = queue.name.clone();
        let Some(channel) = self.channels.get_mut(index) else {
            return Ok(());
        };
        if channel.consumers.len() >= limits::MAX_CONSUMERS {
            return Err(channel_error(
                PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - a channel may have at most {} consumers",
                    limits::MAX_CONSUMERS
                ),
            ));
        }
        let tag: Arc<str> = if consume.consumer_tag.as_str().is_empty() {
            match crate::core::assign_client_id() {
                Some(id) => Arc::from(format!("amq.ctag-{id}")),
                None => {
                    return Err(channel_error(
                        INTERNAL_ERROR,
                        "INTERNAL_ERROR - no consumer tag could be generated",
                    ));
                }
            }
        } else {
            Arc::from(consume.consumer_tag.as_str())
        };
        if channel.consumers.iter().any(|c| c.tag == tag) {
            return Err(Failure::Connection(Ending::close(
                NOT_ALLOWED,
                format!(
                    "NOT_ALLOWED - attempt to reuse consumer tag {}",
                    printable(&tag)
                ),
            )));
        }
        channel.consumers.push(Consumer {
            tag: tag.clone(),
            queue: queue_name,
            no_ack: consume.no_ack,
            prefetch: channel.consumer_prefetch,
            unacked: 0,
        });
        let id = channel.id;
        if !consume.nowait {
            reply::method(
                &mut self.wbuf,
                id,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: ShortString::try_new(&*tag).unwrap_or_default(),
                })),
            );
        }
        Ok(())
    }

    fn get(&mut self, index: usize, get: &basic::Get) -> Handled {
        let queue_index = self.queue_for(get.queue.as_str())?;
        let Conn {
            channels,
            queues,
            wbuf,
            core,
            frame_max,
            ..
        } = self;
        let (Some(channel), Some(queue)) = (channels.get_mut(index), queues.get(queue_index))
        else {
            return Ok(());
        };
        let now = Instant::now();
        let mut state = queue.client.session.lock();
        let remaining = state.queued_len().saturating_sub(1) as u32;
        let mut sent = None;
        state.drain_at_most(usize::MAX, 1, &core.metrics, |delivery, qos| {
            let Some((exchange, key)) = address(queue, &delivery.message.topic) else {
                core.metrics.dropped("too_large");
                return false;
            };
            let tag = channel.next_tag;
            channel.next_tag += 1;
            codec::write_delivery(
                wbuf,
                channel.id,
                DeliveryMethod::GetOk {
                    message_count: remaining,
                },
                tag,
                delivery.redelivered,
                exchange,
                &key,
                &mapping::outgoing(delivery, now),
                &delivery.message.payload,
                *frame_max,
            );
            let transient =
                (!get.no_ack && qos.packet_id().is_none()).then(|| Box::new(delivery.clone()));
            sent = Some((tag, qos.packet_id(), transient));
            true
        });
        if let Some((tag, packet_id, transient)) = sent {
            core.metrics.messages_delivered.inc();
            if get.no_ack {
                if let Some(packet_id) = packet_id {
                    state.complete(packet_id, QoS::AtLeastOnce);
                }
            } else {
                channel.unacked.push_back(Unacked {
                    tag,
                    queue: queue.name.clone(),
                    consumer: None,
                    packet_id,
                    transient,
                });
            }
        } else {
            reply::method(
                wbuf,
                channel.id,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
        }
        drop(state);
        self.journal_bookkeeping(queue_index);
        Ok(())
    }

    /// The unacknowledged deliveries an `ack`/`nack`/`reject` names (`multiple`: every one up
    /// to the tag; tag 0 with `multiple`: all). An unknown tag is a channel error (406), as in
    /// RabbitMQ.
    fn take_unacked(
        &mut self,
        index: usize,
        tag: u64,
        multiple: bool,
    ) -> Result<Vec<Unacked>, Failure> {
        let Some(channel) = self.channels.get_mut(index) else {
            return Ok(Vec::new());
        };
        let mut taken = Vec::new();
        if multiple {
            while channel
                .unacked
                .front()
                .is_some_and(|u| tag == 0 || u.tag <= tag)
            {
                if let Some(u) = channel.unacked.pop_front() {
                    taken.push(u);
                }
            }
        } else if let Some(i) = channel.unacked.iter().position(|u| u.tag == tag)
            && let Some(u) = channel.unacked.remove(i)
        {
            taken.push(u);
        }
        if taken.is_empty() && !(multiple && tag == 0) {
            return Err(channel_error(
                PRECONDITION_FAILED,
                format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
            ));
        }
        for done in &taken {
            if let Some(consumer) = done
                .consumer
                .as_ref()
                .and_then(|tag| channel.consumers.iter_mut().find(|c| c.tag == *tag))
            {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
        }
        Ok(taken)
    }

    fn complete(&self, done: &Unacked) {
        if let (Some(packet_id), Some(queue)) = (
            done.packet_id,
            self.queues.iter().find(|q| q.name == done.queue),
        ) {
            queue
                .client
                .session
                .lock()
                .complete(packet_id, QoS::AtLeastOnce);
            queue.client.link.wake();
        }
    }

    fn refuse(&self, done: &Unacked, requeue: bool) {
        if requeue {
            self.requeue(done);
        } else {
            self.core.metrics.dropped("rejected");
            self.complete(done);
        }
    }

    fn on_header(&mut self, id: u16, header: ContentHeader) -> Handled {
        let max = self.core.settings.max_packet_size;
        let Some(index) = self.channel_index(id) else {
            return Err(Failure::Connection(Ending::close(
                CHANNEL_ERROR,
                format!("CHANNEL_ERROR - a content header on channel {id}, which is not open"),
            )));
        };
        let Some(channel) = self.channels.get_mut(index) else {
            return Ok(());
        };
        if channel.closing {
            return Ok(());
        }
        let Some(content) = channel.content.as_mut().filter(|c| c.header.is_none()) else {
            return Err(Failure::Connection(Ending::close(
                UNEXPECTED_FRAME,
                "UNEXPECTED_FRAME - a content header without basic.publish",
            )));
        };
        if header.class_id != 60 {
            return Err(Failure::Connection(Ending::close(
                FRAME_ERROR,
                "FRAME_ERROR - a content header of a class other than basic",
            )));
        }
        if header.body_size > u64::from(max) {
            channel.content = None;
            return Err(channel_error(
                PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - message size {} is larger than configured max size {max}",
                    header.body_size
                ),
            ));
        }
        let size = header.body_size;
        content.header = Some(header);
        // Messages may interleave across channels: what is announced and not yet complete
        // is bounded per connection (2,047 channels × 1 MiB would be 2 GiB of buffers).
        let unfinished: u64 = self
            .channels
            .iter()
            .filter_map(|c| c.content.as_ref()?.header.as_ref().map(|h| h.body_size))
            .sum();
        let bound = 2 * u64::from(max);
        if unfinished > bound {
            if let Some(channel) = self.channels.get_mut(index) {
                channel.content = None;
            }
            return Err(channel_error(
                PRECONDITION_FAILED,
                format!(
                    "PRECONDITION_FAILED - unfinished messages on this connection would exceed {bound} bytes"
                ),
            ));
        }
        if size == 0 {
            return self.publish(index);
        }
        Ok(())
    }

    fn on_body(&mut self, id: u16, body: Bytes) -> Handled {
        let Some(index) = self.channel_index(id) else {
            return Err(Failure::Connection(Ending::close(
                CHANNEL_ERROR,
                format!("CHANNEL_ERROR - a content body on channel {id}, which is not open"),
            )));
        };
        let Some(channel) = self.channels.get_mut(index) else {
            return Ok(());
        };
        if channel.closing {
            return Ok(());
        }
        let Some(content) = channel.content.as_mut() else {
            return Err(Failure::Connection(Ending::close(
                UNEXPECTED_FRAME,
                "UNEXPECTED_FRAME - a content body without basic.publish",
            )));
        };
        let Some(size) = content.header.as_ref().map(|h| h.body_size) else {
            return Err(Failure::Connection(Ending::close(
                UNEXPECTED_FRAME,
                "UNEXPECTED_FRAME - a content body before its header",
            )));
        };
        if content.body.is_empty() && body.len() as u64 == size {
            content.body = BytesMut::from(&body[..]);
        } else {
            content.body.extend_from_slice(&body);
        }
        let have = content.body.len() as u64;
        if have > size {
            return Err(Failure::Connection(Ending::close(
                FRAME_ERROR,
                format!("FRAME_ERROR - {have} body bytes for a body of {size}"),
            )));
        }
        if have == size {
            return self.publish(index);
        }
        Ok(())
    }

    /// A whole message arrived on channel `index`: to the core.
    fn publish(&mut self, index: usize) -> Handled {
        let Some(channel) = self.channels.get_mut(index) else {
            return Ok(());
        };
        let Some(content) = channel.content.take() else {
            return Ok(());
        };
        let tag = channel.confirm.then(|| {
            channel.published += 1;
            channel.published
        });
        let id = channel.id;
        self.core.metrics.messages_received.inc();
        let Content {
            routing_key,
            header,
            body,
            ..
        } = *content;
        let properties = header.map(|h| h.properties).unwrap_or_default();
        let topic = match mapping::key_to_topic(&routing_key).parse::<TopicName>() {
            Ok(topic) => topic,
            Err(_) => {
                tracing::debug!("AMQP publish with a routing key that is no MQTT topic");
                self.settle_publish(
                    id,
                    tag,
                    &Told::new(Verdict::BadTopic, "the routing key is no topic name"),
                );
                return Ok(());
            }
        };
        let incoming = mapping::incoming(&properties);
        let reply_topic = incoming
            .reply_to
            .as_deref()
            .and_then(|r| self.reply_topic(r));
        let mut forwarded = incoming.forwarded;
        forwarded.response_topic = reply_topic.clone();
        let reply = ReplyTo {
            wanted: true,
            topic: reply_topic,
            correlation: forwarded.correlation_data.clone(),
        };
        let has_properties = forwarded.content_type.is_some()
            || forwarded.correlation_data.is_some()
            || forwarded.response_topic.is_some()
            || !forwarded.user_properties.is_empty();
        let origin = Origin {
            qos: incoming.qos,
            retain: false,
            properties: has_properties.then(|| Box::new(forwarded)),
            expiry_seconds: incoming.expiry_seconds,
            publisher: self.client.session.id,
        };
        match self
            .core
            .publish(&self.client, &topic, &body, origin, reply)
        {
            Outcome::Now(told) => self.settle_publish(id, tag, &told),
            Outcome::Pending(pending) => self.confirming.push(Confirming {
                channel: id,
                tag,
                pending,
            }),
        }
        Ok(())
    }

    /// The response topic of a `reply-to`: one of this connection's queues → its reply address
    /// (created at first use); anything else → the topic the name maps to (an MQTT device may
    /// answer on it; a command's answer then reaches no queue).
    fn reply_topic(&mut self, reply_to: &str) -> Option<TopicName> {
        if let Some(queue) = self.queues.iter_mut().find(|q| &*q.name == reply_to) {
            if queue.reply.is_none() {
                queue.reply = self.core.reply_address(&queue.client);
            }
            return queue.reply.clone();
        }
        mapping::key_to_topic(reply_to).parse().ok()
    }

    /// Confirms publish `tag` on channel `id` as `told` says (if the channel asked for
    /// confirms): `basic.ack` when accepted, `basic.nack` otherwise.
    fn settle_publish(&mut self, id: u16, tag: Option<u64>, told: &Told) {
        if told.verdict != Verdict::Accepted {
            tracing::debug!(verdict = ?told.verdict, reason = told.reason.as_deref().unwrap_or(""), "AMQP publish not accepted");
        }
        let Some(tag) = tag else {
            return;
        };
        if self.channels.iter().all(|c| c.id != id || c.closing) {
            return;
        }
        codec::write_confirm(&mut self.wbuf, id, tag, told.verdict == Verdict::Accepted);
    }

    fn confirm(&mut self, i: usize, told: &Told) {
        if i < self.confirming.len() {
            // `remove`, not `swap_remove`: the list stays in publish order, so `confirmed` polls
            // (and announces) writes that one journal batch made durable in the order they
            // were made — a thing's events keep their revision order.
            let done = self.confirming.remove(i);
            self.settle_publish(done.channel, done.tag, told);
        }
    }

    /// Fills the write buffer with deliveries: every consumer's queue drained within its
    /// channel's and its own window; answers that reached the connection's own session are
    /// dropped (counted): nobody consumes there.
    /// Returns whether a pass stopped at `WRITE_BATCH` with more to send.
    fn deliver(&mut self) -> bool {
        let mut more = false;
        {
            let metrics = &self.core.metrics;
            let mut state = self.client.session.lock();
            while state.pop_next(metrics).is_some() {
                metrics.dropped("no_reply_queue");
            }
        }
        let now = Instant::now();
        let mut touched = Vec::new();
        let Conn {
            channels,
            queues,
            wbuf,
            core,
            frame_max,
            ..
        } = self;
        for channel in channels.iter_mut() {
            if channel.closing || !channel.active {
                continue;
            }
            let Channel {
                id,
                prefetch,
                next_tag,
                unacked,
                consumers,
                ..
            } = channel;
            for consumer in consumers.iter_mut() {
                let channel_window = window(*prefetch).saturating_sub(unacked.len());
                let own_window = if consumer.no_ack {
                    usize::MAX
                } else {
                    window(consumer.prefetch).saturating_sub(consumer.unacked)
                };
                let budget = channel_window.min(own_window).min(limits::MAX_UNACKED);
                if budget == 0 {
                    continue;
                }
                let Some((queue_index, queue)) = queues
                    .iter()
                    .enumerate()
                    .find(|(_, q)| q.name == consumer.queue)
                else {
                    continue;
                };
                let mut state = queue.client.session.lock();
                if state.generation != queue.client.generation || !state.has_queued() {
                    continue;
                }
                let mut settled = Vec::new();
                // The write buffer grows by what one pass writes: drained in small steps
                // while it holds less than `WRITE_BATCH` (2,048 deliveries of 1 MiB would
                // otherwise be 2 GiB in one buffer).
                let written = std::cell::Cell::new(wbuf.len());
                let mut send = |delivery: &crate::core::message::Delivery,
                                qos: crate::mqtt::codec::QosPid| {
                    let Some((exchange, key)) = address(queue, &delivery.message.topic) else {
                        core.metrics.dropped("too_large");
                        return false;
                    };
                    let tag = *next_tag;
                    *next_tag += 1;
                    codec::write_delivery(
                        wbuf,
                        *id,
                        DeliveryMethod::Deliver {
                            consumer_tag: &consumer.tag,
                        },
                        tag,
                        delivery.redelivered,
                        exchange,
                        &key,
                        &mapping::outgoing(delivery, now),
                        &delivery.message.payload,
                        *frame_max,
                    );
                    if consumer.no_ack {
                        if let Some(packet_id) = qos.packet_id() {
                            settled.push(packet_id);
                        }
                    } else {
                        consumer.unacked += 1;
                        unacked.push_back(Unacked {
                            tag,
                            queue: queue.name.clone(),
                            consumer: Some(consumer.tag.clone()),
                            packet_id: qos.packet_id(),
                            transient: qos
                                .packet_id()
                                .is_none()
                                .then(|| Box::new(delivery.clone())),
                        });
                    }
                    written.set(wbuf.len());
                    true
                };
                let mut sent = 0;
                while sent < budget {
                    if written.get() >= WRITE_BATCH {
                        more |= state.has_queued();
                        break;
                    }
                    let step = (budget - sent).min(8);
                    let n = state.drain_at_most(usize::MAX, step, &core.metrics, &mut send);
                    if n == 0 {
                        break;
                    }
                    sent += n;
                }
                for packet_id in settled {
                    state.complete(packet_id, QoS::AtLeastOnce);
                }
                drop(state);
                core.metrics.messages_delivered.inc_by(sent as u64);
                touched.push(queue_index);
            }
        }
        for index in touched {
            self.journal_bookkeeping(index);
        }
        more
    }

    /// A persistent queue's journal records: deleted for deliveries that left it, packet
    /// identifiers recorded for those sent.
    fn journal_bookkeeping(&self, index: usize) {
        let Some(queue) = self.queues.get(index) else {
            return;
        };
        let (forgotten, sent) = {
            let mut state = queue.client.session.lock();
            match state.journal.as_mut() {
                Some(journal) => (
                    std::mem::take(&mut journal.forgotten),
                    std::mem::take(&mut journal.sent_stored),
                ),
                None => return,
            }
        };
        if !forgotten.is_empty() {
            self.core.forget_delivered(&queue.client, &forgotten);
        }
        if !sent.is_empty() {
            self.core.record_sent(&queue.client, &sent);
        }
    }

    /// Awaits what a method asked to wait for, then sends its reply.
    async fn settle(&mut self, wait: Wait) -> Result<(), Ending> {
        match wait {
            Wait::Saved {
                mut pending,
                channel,
                reply,
            } => {
                let (core, client) = (&self.core, &self.client);
                let told = std::future::poll_fn(|cx| {
                    pending.poll_done(cx, core, &client.space, &client.session)
                })
                .await;
                if told.verdict == Verdict::Accepted {
                    self.wbuf.extend_from_slice(&reply);
                } else {
                    reply::channel_close(
                        &mut self.wbuf,
                        channel,
                        INTERNAL_ERROR,
                        "INTERNAL_ERROR - the queue could not be stored",
                        50,
                        10,
                    );
                    self.end_channel(channel, true);
                }
                Ok(())
            }
            Wait::Reauthenticate(token) => {
                let mut identity = self.client.identity.clone();
                match self.core.reauthenticate(&mut identity, &token).await {
                    Ok(()) => {
                        self.client.identity = identity;
                        reply::method(
                            &mut self.wbuf,
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                                connection::UpdateSecretOk {},
                            )),
                        );
                        Ok(())
                    }
                    Err(ReauthRefusal::Invalid(_) | ReauthRefusal::OtherIdentity) => {
                        Err(Ending::close(
                            ACCESS_REFUSED,
                            "ACCESS_REFUSED - the new secret was refused",
                        ))
                    }
                }
            }
        }
    }

    /// Ends a queue this connection held: a durable one stays (as a persistent session, its
    /// unacknowledged deliveries requeued) unless `delete`; any other ends now.
    fn end_queue(&self, queue: &Queue, delete: bool) {
        queue.client.space.remove_replies(&queue.client.session);
        queue.client.session.lock().requeue_inflight();
        let (ours, expiry) = self.core.detach(&queue.client);
        if !ours {
            return;
        }
        if delete || !queue.durable {
            self.core.expire_session(&queue.client, 0);
        } else {
            self.core.expire_session(&queue.client, expiry);
        }
    }

    /// After the loop: says why (a `connection.close` and a brief wait for `close-ok`), then
    /// lets go of every session.
    async fn finish(mut self: Box<Self>, ending: Ending) {
        match &ending {
            Ending::Close(code, text, class, method) => {
                tracing::debug!(code, text, "closing the AMQP connection");
                reply::connection_close(&mut self.wbuf, *code, text, *class, *method);
            }
            Ending::ClientClosed | Ending::Gone => {}
        }
        // Publishes still waiting for the journal are announced once durable (no confirm), in
        // the order they were made (one task: a thing's events keep their revision order).
        let waiting = std::mem::take(&mut self.confirming);
        if !waiting.is_empty() {
            let (core, space, session) = (
                self.core.clone(),
                self.client.space.clone(),
                self.client.session.clone(),
            );
            tokio::spawn(async move {
                for waiting in waiting {
                    waiting
                        .pending
                        .settle(core.clone(), space.clone(), session.clone())
                        .await;
                }
            });
        }
        // The queues are let go before the last word to the client: one that has its
        // `close-ok` may declare them again at once on another connection (seen as 405
        // RESOURCE_LOCKED under load when they were let go after it).
        for channel in std::mem::take(&mut self.channels) {
            for delivery in channel.unacked {
                self.requeue(&delivery);
            }
        }
        for queue in std::mem::take(&mut self.queues) {
            self.end_queue(&queue, false);
        }
        if !matches!(ending, Ending::Gone) && !self.wbuf.is_empty() {
            let write = tokio::time::timeout(Duration::from_secs(1), self.io.write_all(&self.wbuf));
            if write.await.is_ok_and(|r| r.is_ok()) && matches!(ending, Ending::Close(..)) {
                // The client's close-ok, briefly.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.await_close_ok()).await;
            }
        }
        self.io.shutdown().await;
        let (ours, _) = self.core.detach(&self.client);
        if ours {
            self.core.expire_session(&self.client, 0);
        }
    }

    async fn await_close_ok(&mut self) {
        loop {
            loop {
                match codec::decode(&mut self.rbuf, self.frame_max) {
                    Ok(Some(Frame::Method(0, class)))
                        if matches!(
                            *class,
                            AMQPClass::Connection(
                                connection::AMQPMethod::CloseOk(_)
                                    | connection::AMQPMethod::Close(_)
                            )
                        ) =>
                    {
                        return;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            match self.io.read_into(&mut self.rbuf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

/// Milliseconds on a process-wide clock, wrapping after 49 days: 4 bytes per timestamp of an
/// idle connection instead of an `Instant`'s 16 (only differences under two heartbeat
/// intervals are taken).
fn clock_ms() -> u32 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u32
}

/// How long ago `ms` ([`clock_ms`]) was.
fn since(ms: u32) -> Duration {
    Duration::from_millis(u64::from(clock_ms().wrapping_sub(ms)))
}

/// A prefetch count as a window (0: none, capped by [`limits::MAX_UNACKED`]).
fn window(prefetch: u16) -> usize {
    match prefetch {
        0 => limits::MAX_UNACKED,
        n => usize::from(n).min(limits::MAX_UNACKED),
    }
}

/// Exchange and routing key of a delivery on `topic` into `queue`: an answer that came to the
/// queue's reply address as RabbitMQ's default exchange delivers (`""`, the queue's name);
/// anything else from `amq.topic` with the topic's routing key. `None`: the topic is too
/// long for a routing key.
fn address<'a>(
    queue: &'a Queue,
    topic: &TopicName,
) -> Option<(&'static str, std::borrow::Cow<'a, str>)> {
    if topic.as_str().starts_with(REPLY_PREFIX) {
        return Some(("", std::borrow::Cow::Borrowed(&*queue.name)));
    }
    mapping::delivery_key(topic).map(|key| ("amq.topic", std::borrow::Cow::Owned(key)))
}

/// Bindings exist only on `amq.topic`: the default exchange refuses them (403) and any other
/// exchange does not exist (404), as RabbitMQ answers.
fn check_topic_exchange(name: &str) -> Result<(), Failure> {
    match name {
        "amq.topic" => Ok(()),
        "" => Err(channel_error(
            ACCESS_REFUSED,
            "ACCESS_REFUSED - operation not permitted on the default exchange",
        )),
        other => Err(channel_error(
            NOT_FOUND,
            format!("NOT_FOUND - no exchange {} in vhost '/'", printable(other)),
        )),
    }
}

/// Ready when something was queued in one of the connection's queues, or the link of
/// the connection or of a queue was kicked (takeover, revocation, shutdown). The connection's
/// own session is not waited on: nothing consumes there (`deliver` drops what arrived on its
/// next pass). It polls the links (`Link::poll_take`), so waiting keeps no future per queue.
fn poll_woken(cx: &mut std::task::Context<'_>, client: &Client, queues: &[Queue]) -> Poll<Woken> {
    if client.link.poll_take(cx, Signal::Kicked).is_ready() {
        return Poll::Ready(Woken::Kicked(None));
    }
    for (i, queue) in queues.iter().enumerate() {
        let link = &queue.client.link;
        if link.poll_take(cx, Signal::Kicked).is_ready() {
            return Poll::Ready(Woken::Kicked(Some(i)));
        }
        if link.poll_take(cx, Signal::Queued).is_ready() {
            return Poll::Ready(Woken::Queued);
        }
    }
    Poll::Pending
}

/// Reads what is available into `buf` without a future of its own (TCP: readiness, then a
/// non-blocking read that reserves buffer space only once there is something to read; TLS:
/// `AsyncRead` through a stack buffer), so an idle connection's wait holds no read state.
fn poll_read(
    io: &mut Transport,
    cx: &mut std::task::Context<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    match io {
        Transport::Tcp(stream) => loop {
            std::task::ready!(stream.poll_read_ready(cx))?;
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            match stream.try_read_buf(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Readiness was stale: give the space back before waiting again.
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        },
        Transport::Tls(stream) => {
            let mut chunk = [0u8; 4096];
            let mut read = tokio::io::ReadBuf::new(&mut chunk);
            std::task::ready!(tokio::io::AsyncRead::poll_read(
                Pin::new(&mut **stream),
                cx,
                &mut read
            ))?;
            buf.extend_from_slice(read.filled());
            Poll::Ready(Ok(read.filled().len()))
        }
        Transport::WebSocket(_) => Poll::Ready(Err(std::io::Error::other(
            "AMQP is not served over WebSockets",
        ))),
    }
}

/// The first publish whose write is done (its events announced), and what its publisher is
/// told.
fn poll_confirmed(
    cx: &mut std::task::Context<'_>,
    confirming: &mut [Confirming],
    core: &Core,
    client: &Client,
) -> Poll<(usize, Told)> {
    for (i, entry) in confirming.iter_mut().enumerate() {
        if let Poll::Ready(told) = entry
            .pending
            .poll_done(cx, core, &client.space, &client.session)
        {
            return Poll::Ready((i, told));
        }
        // No write announces its events before every write ahead of it has.
        if !entry.pending.announced() {
            break;
        }
    }
    Poll::Pending
}
