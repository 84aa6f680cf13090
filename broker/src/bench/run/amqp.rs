//! The AMQP 0.9.1 side of `bench run --url amqp://HOST:PORT`, on lapin: each device is one
//! connection and channel publishing to `amq.topic`, each subscriber one connection with an
//! exclusive server-named queue bound to `amq.topic` and a consumer on it. The ramp, the closed
//! loop, pacing, the payload stamps, the drain and the report are the run's own (`load`); this
//! module is a child of `load` so that it shares the run's state (`Shared`, `Plan`, `Loop`)
//! without widening its visibility.
//!
//! # What the MQTT options mean here
//! - Topics and filters map as Thingsgate maps them (`crate::amqp::mapping`): MQTT `/` is `.`,
//!   a `.` inside a level is `/`, `+` is `*`, `#` is `#` — for topics without a `.`, exactly
//!   RabbitMQ's MQTT plugin's mapping, so one routing key reaches an MQTT subscriber of the same
//!   topic on either broker.
//! - `--qos 0`: delivery-mode 1, no confirms; subscribers consume with no-ack.
//! - `--qos 1`: `confirm.select` and delivery-mode 2 (QoS 1 at Thingsgate: a twin write is
//!   confirmed once durable); a device's `--inflight` window counts unconfirmed publishes, and a
//!   `basic.nack` is the failure `publish nacked`. Subscribers consume with manual
//!   acknowledgements and a prefetch (see [`prefetch`]), acknowledging with `multiple` every
//!   quarter of it.
//! - Credentials go in PLAIN: `--username` and its password, the solution ID and secret, or a
//!   JWT as the password (the API token as client property `x-cr-api-token`); none at all is
//!   `guest`/`guest`, every AMQP client's default. Client property `client_id` is the device's
//!   (or subscriber's) name: Thingsgate takes it as the client ID.
//!
//! # Cost
//! lapin runs one I/O thread per connection, and every publish is a hand-over to it (frames
//! queued, the thread woken, a promise resolved when written). So a device queues a whole burst
//! (up to [`BURST`] publishes) before it awaits any of them, stamps payload buffers it keeps, and
//! asks for small frames: lapin gives each connection two ring buffers of 32 frames. A
//! subscriber takes what is already delivered in batches (one clock reading and one histogram
//! lock per batch) and acknowledges rarely.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{
    AsyncTcpStream, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    Consumer, ErrorKind, Event, PublisherConfirm,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{
    BURST, DeviceResult, Feedback, Go, LoginPlan, Loop, Plan, STALL, Schedule, Seen, SeenWindow,
    Shared, SubscriberResult, read_event,
};
use crate::amqp::mapping::{key_to_topic, topic_to_key};
use crate::bench::run::client::{self, CONNECT_TIMEOUT, Failure, Stamp, read_binary_stamp};
use crate::bench::run::settings::Rate;
use crate::mqtt::codec::QoS;

/// The exchange devices publish to and subscribers bind to: Thingsgate's one exchange, and the
/// one RabbitMQ's MQTT plugin uses.
const EXCHANGE: &str = "amq.topic";
/// How long a burst of publishes, or an acknowledgement, may take to be written (lapin can wait
/// for ever when the broker goes away).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A QoS 1 subscriber's prefetch, at least…
const MIN_PREFETCH: u16 = 64;
/// …and at most: below Thingsgate's 2,048 unacknowledged deliveries per channel (which it would
/// impose on a larger prefetch anyway).
const MAX_PREFETCH: u16 = 2000;
/// The most deliveries a subscriber takes in one batch.
const BATCH: usize = 1024;
/// How long to wait for the broker's reason when lapin only says that the channel or the
/// connection is closed (it posts the reason as an event, a moment later).
const REASON_WAIT: Duration = Duration::from_millis(500);
/// The frame size a connection asks for: at least AMQP's minimum…
const MIN_FRAME: usize = 4096;
/// …at most Thingsgate's and RabbitMQ's default.
const MAX_FRAME: usize = 131_072;

/// Why an AMQP connection, channel or message failed; the report counts them by
/// [`AmqpFailure::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum AmqpFailure {
    /// A kind MQTT has as well: TCP connect, connect timeout, closed by the broker, socket
    /// errors, and the run's own (unacknowledged at the end, closed loop stalled, unreadable
    /// payload).
    Common(Failure),
    /// The broker refused the login: `connection.close` 403 ACCESS_REFUSED.
    AccessRefused,
    /// The broker closed the connection (`connection.close`) with this code and text.
    ConnectionClosed { code: u16, text: String },
    /// The broker closed the channel (`channel.close`): 404 for an exchange or queue it does not
    /// have, 403 for a binding it refuses, 406 for a limit…
    ChannelClosed { code: u16, text: String },
    /// The channel was closed and the broker's reason did not reach us.
    ChannelGone,
    /// `basic.nack` for a publish.
    Nacked,
    /// The broker ended the subscriber's consumer (`basic.cancel`).
    ConsumerCancelled,
    /// A step did not complete in time (`queue.declare`, `publish`…).
    Timeout(&'static str),
    /// What else lapin reported.
    Client(String),
}

impl AmqpFailure {
    /// The label the report counts under.
    fn kind(&self) -> String {
        match self {
            AmqpFailure::Common(failure) => failure.kind(),
            AmqpFailure::AccessRefused => "access refused (403)".to_owned(),
            AmqpFailure::ConnectionClosed { code, text } => {
                format!("connection closed {code} {text}")
            }
            AmqpFailure::ChannelClosed { code, text } => format!("channel closed {code} {text}"),
            AmqpFailure::ChannelGone => "channel closed (no reason given)".to_owned(),
            AmqpFailure::Nacked => "publish nacked".to_owned(),
            AmqpFailure::ConsumerCancelled => "consumer cancelled by the broker".to_owned(),
            AmqpFailure::Timeout(step) => format!("{step} timeout"),
            AmqpFailure::Client(what) => format!("client error: {what}"),
        }
    }

    /// A failure lapin reports. `connection_open` says whether the connection was still up
    /// (a code alone does not say whether `connection.close` or `channel.close` carried it:
    /// 403 is both RabbitMQ's refused login and a refused binding); `login` that it happened
    /// while logging in.
    fn of(error: &lapin::Error, connection_open: bool, login: bool) -> Self {
        match error.kind() {
            ErrorKind::ProtocolError(e) => {
                let code = e.get_id();
                let text = e.get_message().as_str().to_owned();
                if login && code == 403 {
                    AmqpFailure::AccessRefused
                } else if login || !connection_open {
                    AmqpFailure::ConnectionClosed { code, text }
                } else {
                    AmqpFailure::ChannelClosed { code, text }
                }
            }
            ErrorKind::IOError(e) => match e.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe => AmqpFailure::Common(Failure::Closed),
                kind => AmqpFailure::Common(Failure::Io(kind)),
            },
            ErrorKind::InvalidConnectionState(_) => AmqpFailure::Common(Failure::Closed),
            ErrorKind::InvalidChannelState(..) => AmqpFailure::ChannelGone,
            _ => AmqpFailure::Client(error.to_string()),
        }
    }
}

/// Counts `failure` `times` in the report.
fn fail(shared: &Shared, failure: &AmqpFailure, times: u64) {
    if let AmqpFailure::Common(common) = failure {
        shared.fail(common, times);
        return;
    }
    shared.errors.fetch_add(times, Ordering::Relaxed);
    let mut failures = shared
        .failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    *failures.entry(failure.kind()).or_insert(0) += times;
}

/// The frame size a connection asks for: room for a payload and its envelope in one frame, and
/// no more — lapin keeps 64 frames of buffers per connection (4 MiB each at the usual 128 KiB),
/// mostly idle for a device. Larger messages travel in several body frames.
fn frame_max(payload_size: usize) -> u32 {
    let frame = payload_size
        .saturating_add(1024)
        .next_power_of_two()
        .clamp(MIN_FRAME, MAX_FRAME);
    u32::try_from(frame).unwrap_or(u32::MAX)
}

/// A QoS 1 subscriber's `basic.qos` prefetch: twice what the closed loop keeps in flight
/// (devices × window) — acknowledging every quarter of it then never holds a delivery back —
/// within [`MIN_PREFETCH`] and [`MAX_PREFETCH`].
fn prefetch(devices: usize, inflight: usize) -> u16 {
    let wanted = devices.saturating_mul(inflight).saturating_mul(2);
    u16::try_from(wanted)
        .unwrap_or(MAX_PREFETCH)
        .clamp(MIN_PREFETCH, MAX_PREFETCH)
}

/// PLAIN credentials and client properties of a connection's login.
fn credentials(login: client::Login) -> (AMQPUserInfo, ConnectionProperties) {
    let mut properties = ConnectionProperties::default().with_client_property(
        ShortString::from("client_id"),
        LongString::from(login.client_id.into_bytes()),
    );
    for (name, value) in login.user_properties {
        properties = properties.with_client_property(
            ShortString::from(name),
            LongString::from(value.into_bytes()),
        );
    }
    let userinfo = match (login.username, login.password) {
        // AMQP has no anonymous login: every client's default is guest.
        (None, None) => AMQPUserInfo::default(),
        (username, password) => AMQPUserInfo {
            username: username.unwrap_or_default(),
            password: password
                .map(|p| String::from_utf8_lossy(&p).into_owned())
                .unwrap_or_default(),
        },
    };
    (userinfo, properties)
}

/// The events lapin posts about a connection (among them why a channel or it was closed).
type Events = Pin<Box<dyn Stream<Item = Event> + Send>>;

/// An open connection and its channel.
struct Link {
    connection: Connection,
    channel: Channel,
    /// Where the broker's reason for closing shows up: an operation on a closed channel only
    /// says that it is closed.
    events: Events,
}

impl Link {
    /// TCP from `source`, the AMQP handshake with `login`, a channel: within [`CONNECT_TIMEOUT`].
    async fn open(
        plan: &Plan,
        source: Option<IpAddr>,
        login: client::Login,
    ) -> Result<Link, AmqpFailure> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let late = || AmqpFailure::Common(Failure::ConnectTimeout);
        let stream = tokio::time::timeout_at(deadline, client::open_tcp(plan.target, source))
            .await
            .map_err(|_| late())?
            .map_err(AmqpFailure::Common)?;
        // A burst is written at once by lapin: Nagle would only add latency.
        let _ = stream.set_nodelay(true);
        let (userinfo, properties) = credentials(login);
        let uri = AMQPUri {
            scheme: AMQPScheme::AMQP,
            authority: AMQPAuthority {
                userinfo,
                host: plan.target.ip().to_string(),
                port: plan.target.port(),
            },
            vhost: "/".to_owned(),
            query: AMQPQueryString {
                frame_max: Some(frame_max(plan.payload_size)),
                ..AMQPQueryString::default()
            },
        };
        let runtime =
            lapin::runtime::default_runtime().map_err(|e| AmqpFailure::Client(e.to_string()))?;
        // lapin opens its transport through this (once: it is not asked to retry); it gets the
        // socket opened above from the chosen source address.
        let socket = std::sync::Mutex::new(Some(stream));
        let transport = async move |_: AMQPUri, _| {
            let stream = socket.lock().unwrap_or_else(PoisonError::into_inner).take();
            stream
                .map(|s| AsyncTcpStream::Plain(async_compat::Compat::new(s)))
                .ok_or_else(|| {
                    lapin::Error::from(std::io::Error::from(std::io::ErrorKind::NotConnected))
                })
        };
        let connection = tokio::time::timeout_at(
            deadline,
            Connection::connector(uri, runtime, transport, properties),
        )
        .await
        .map_err(|_| late())?
        .map_err(|e| AmqpFailure::of(&e, false, true))?;
        let events: Events = Box::pin(connection.events_listener());
        let mut link = match tokio::time::timeout_at(deadline, connection.create_channel()).await {
            Ok(Ok(channel)) => Link {
                connection,
                channel,
                events,
            },
            Ok(Err(e)) => return Err(AmqpFailure::of(&e, connection.status().connected(), false)),
            Err(_) => return Err(late()),
        };
        if plan.qos != QoS::AtMostOnce {
            let channel = link.channel.clone();
            let select = channel.confirm_select(ConfirmSelectOptions::default());
            link.step(deadline, "confirm.select", select).await?;
        }
        Ok(link)
    }

    /// Awaits one step of the setup until `deadline`; a failure with the broker's reason.
    async fn step<T>(
        &mut self,
        deadline: Instant,
        what: &'static str,
        step: impl Future<Output = lapin::Result<T>>,
    ) -> Result<T, AmqpFailure> {
        match tokio::time::timeout_at(deadline, step).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.reason(&e).await),
            Err(_) => Err(AmqpFailure::Timeout(what)),
        }
    }

    /// Why `error` happened: the broker's code and text if lapin has them — in `error`, or
    /// posted as an event shortly after an operation found the channel closed.
    async fn reason(&mut self, error: &lapin::Error) -> AmqpFailure {
        if !matches!(error.kind(), ErrorKind::ProtocolError(_)) {
            let until = Instant::now() + REASON_WAIT;
            while let Ok(Some(event)) = tokio::time::timeout_at(until, self.events.next()).await {
                if let Event::Error(e) = event
                    && matches!(e.kind(), ErrorKind::ProtocolError(_))
                {
                    return AmqpFailure::of(&e, self.connection.status().connected(), false);
                }
            }
        }
        AmqpFailure::of(error, self.connection.status().connected(), false)
    }

    /// The broker's reason if it closed something while we were not looking, without waiting.
    fn closed_meanwhile(&mut self) -> Option<AmqpFailure> {
        while let Some(Some(event)) = self.events.next().now_or_never() {
            if let Event::Error(e) = event {
                return Some(AmqpFailure::of(
                    &e,
                    self.connection.status().connected(),
                    false,
                ));
            }
        }
        None
    }

    /// Closes the connection (bounded; the broker cleans up after a vanished client anyway).
    async fn close(self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.connection
                .close(200, ShortString::from("bench run over")),
        )
        .await;
    }
}

/// One AMQP device: connects, waits for the start, publishes (paced or in the closed loop)
/// until the deadline, its share of the count or a stop, waits for its last confirms, closes.
#[expect(
    clippy::too_many_arguments,
    reason = "one task's inputs, the same as the MQTT device's"
)]
pub(super) async fn device(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    the_loop: Arc<Loop>,
    index: usize,
    matching: u64,
    connected: mpsc::UnboundedSender<()>,
    mut go: watch::Receiver<Option<Go>>,
    stop: watch::Receiver<bool>,
) -> DeviceResult {
    let nothing = |at| DeviceResult {
        sent: 0,
        matching,
        stopped_at: at,
    };
    let source = plan.source(plan.subscriber_names.len() + index);
    let attempt = match &plan.login {
        LoginPlan::Tokens { devices, .. } if devices.get(index).is_some_and(Result::is_err) => Err(
            AmqpFailure::Common(Failure::Protocol("no token could be minted".to_owned())),
        ),
        _ => Link::open(&plan, source, plan.login(false, index)).await,
    };
    let mut link = match attempt {
        Ok(link) => {
            shared.devices_connected.fetch_add(1, Ordering::Relaxed);
            link
        }
        Err(failure) => {
            shared.devices_failed.fetch_add(1, Ordering::Relaxed);
            fail(&shared, &failure, 1);
            let _ = connected.send(());
            return nothing(Instant::now());
        }
    };
    let _ = connected.send(());
    drop(connected);
    // Wait for the start; lapin keeps the connection alive (heartbeats) meanwhile.
    let go = loop {
        if let Some(go) = *go.borrow_and_update() {
            break go;
        }
        tokio::select! {
            changed = go.changed() => if changed.is_err() {
                link.close().await;
                return nothing(Instant::now());
            },
            Some(event) = link.events.next() => if let Event::Error(e) = event {
                let failure = AmqpFailure::of(&e, link.connection.status().connected(), false);
                fail(&shared, &failure, 1);
                return nothing(Instant::now());
            },
        }
    };
    if plan.rate == Rate::Idle {
        let held = hold(&mut link, go.deadline, stop).await;
        let stopped_at = Instant::now();
        match held {
            Ok(()) => link.close().await,
            Err(failure) => fail(&shared, &failure, 1),
        }
        return nothing(stopped_at);
    }
    let Some(key) = plan
        .device_topics
        .get(index)
        .and_then(|topic| topic_to_key(topic))
    else {
        // Settings checked every topic's routing key.
        fail(
            &shared,
            &AmqpFailure::Client("no routing key for the topic".to_owned()),
            1,
        );
        link.close().await;
        return nothing(Instant::now());
    };
    let confirms = plan.qos != QoS::AtMostOnce;
    let mut publisher = Publisher {
        shared: &shared,
        the_loop: &the_loop,
        feedback: if matching > 0 {
            shared.feedback.get(index)
        } else {
            None
        },
        link,
        key: ShortString::from(key),
        properties: BasicProperties::default().with_delivery_mode(if confirms { 2 } else { 1 }),
        payloads: Vec::new(),
        stamp: if plan.twin {
            Stamp::JsonNumber
        } else {
            Stamp::Binary
        },
        payload_size: plan.payload_size,
        device: u32::try_from(index).unwrap_or(u32::MAX),
        confirms,
        window: plan.inflight as u64,
        limit: plan.count_of(index),
        sent: 0,
        floor: 0,
        unconfirmed: FuturesUnordered::new(),
    };
    let outcome = publisher
        .publish(plan.rate, go, index, plan.devices, stop)
        .await;
    let stopped_at = Instant::now();
    let sent = publisher.sent;
    match outcome {
        Ok(()) => match publisher.drain(go.drain_deadline).await {
            Ok(()) => {
                let left = publisher.unconfirmed.len() as u64;
                if left > 0 {
                    fail(&shared, &AmqpFailure::Common(Failure::Unacknowledged), left);
                }
                publisher.link.close().await;
            }
            Err(failure) => fail(&shared, &failure, 1),
        },
        Err(failure) => fail(&shared, &failure, 1),
    }
    DeviceResult {
        sent,
        matching,
        stopped_at,
    }
}

/// Holds an idle device's connection until `until` or a stop (`--rate idle`).
async fn hold(
    link: &mut Link,
    until: Instant,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AmqpFailure> {
    while Instant::now() < until && !*stop.borrow() {
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            changed = stop.changed() => if changed.is_err() {
                return Ok(());
            },
            Some(event) = link.events.next() => if let Event::Error(e) = event {
                return Err(AmqpFailure::of(&e, link.connection.status().connected(), false));
            },
        }
    }
    Ok(())
}

/// A device's publishing state.
struct Publisher<'a> {
    shared: &'a Shared,
    the_loop: &'a Loop,
    /// Closed on deliveries: this device's counters (None: no subscriber on its topic).
    feedback: Option<&'a Feedback>,
    link: Link,
    /// The routing key of the device's topic.
    key: ShortString,
    properties: BasicProperties,
    /// One payload per message of a burst, stamped in place and reused (lapin copies a payload
    /// into its frames); as many as the largest burst so far.
    payloads: Vec<Vec<u8>>,
    stamp: Stamp,
    payload_size: usize,
    device: u32,
    /// `--qos 1`: publisher confirms.
    confirms: bool,
    window: u64,
    /// Its share of `--count`.
    limit: u64,
    sent: u64,
    /// Messages counted as delivered or written off (closed loop).
    floor: u64,
    /// Confirms still to come, one per publish written at `--qos 1`.
    unconfirmed: FuturesUnordered<PublisherConfirm>,
}

impl Publisher<'_> {
    /// Messages of this device every subscriber received.
    fn delivered(&self) -> u64 {
        self.feedback.map_or(0, |f| self.the_loop.delivered(f))
    }

    /// How many messages may go now (before pacing): the closed loop's window on deliveries,
    /// and at QoS 1 the window on confirms.
    fn credit(&mut self, closed_loop: bool) -> u64 {
        let mut n = BURST.min(self.limit - self.sent);
        if closed_loop && self.feedback.is_some() {
            self.floor = self.floor.max(self.delivered());
            let in_flight = self.sent.saturating_sub(self.floor);
            n = n.min(self.window.saturating_sub(in_flight));
        }
        if self.confirms {
            n = n.min(self.window.saturating_sub(self.unconfirmed.len() as u64));
        }
        n
    }

    /// Publishes until the deadline, the count or a stop.
    async fn publish(
        &mut self,
        rate: Rate,
        go: Go,
        index: usize,
        devices: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), AmqpFailure> {
        let closed_loop = rate == Rate::Max;
        let mut schedule = Schedule::new(rate, &go, index, devices);
        let mut waiting_since: Option<Instant> = None;
        loop {
            while let Some(Some(confirmed)) = self.unconfirmed.next().now_or_never() {
                self.settle(confirmed).await?;
            }
            let now = Instant::now();
            if now >= go.deadline || self.sent >= self.limit || *stop.borrow() {
                return Ok(());
            }
            let credit = self.credit(closed_loop);
            let n = credit.min(schedule.due(now));
            if n > 0 {
                self.write_burst(n).await?;
                schedule.advance(n);
                waiting_since = None;
                continue;
            }
            // Nothing may go now: wait for a delivery, a confirm, the next due instant, the
            // deadline or a stop.
            let waiting_for_loop = credit == 0 && closed_loop && self.feedback.is_some();
            let since = if waiting_for_loop {
                *waiting_since.get_or_insert(now)
            } else {
                waiting_since = None;
                now
            };
            let mut wake_at = go.deadline;
            if waiting_for_loop {
                wake_at = wake_at.min(since + STALL);
            }
            if credit > 0 {
                wake_at = wake_at.min(schedule.next_due);
            }
            let feedback = self.feedback;
            tokio::select! {
                Some(confirmed) = self.unconfirmed.next(), if !self.unconfirmed.is_empty() => {
                    self.settle(confirmed).await?;
                }
                () = async {
                    match feedback {
                        Some(f) => f.wake.notified().await,
                        None => std::future::pending().await,
                    }
                }, if waiting_for_loop => {}
                () = tokio::time::sleep_until(wake_at) => {
                    if waiting_for_loop && Instant::now() >= since + STALL {
                        self.shared.fail(&Failure::WindowStalled, 1);
                        self.floor = self.sent;
                        waiting_since = None;
                    }
                }
                _ = stop.changed() => {}
            }
        }
    }

    /// Stamps and publishes `n` messages, queued to lapin all at once, and waits until they
    /// are written; at QoS 1 their confirms join [`Publisher::unconfirmed`].
    async fn write_burst(&mut self, n: u64) -> Result<(), AmqpFailure> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        while self.payloads.len() < n {
            self.payloads.push(self.stamp.blank(self.payload_size));
        }
        let now_ns = self.shared.now_ns();
        let first = self.sent;
        for (i, payload) in (1u64..).zip(self.payloads.iter_mut().take(n)) {
            let seq = u32::try_from(first + i).unwrap_or(u32::MAX);
            self.stamp.write(payload, now_ns, self.device, seq);
        }
        let channel = &self.link.channel;
        let publishes = self.payloads.iter().take(n).map(|payload| {
            channel.basic_publish(
                ShortString::from(EXCHANGE),
                self.key.clone(),
                BasicPublishOptions::default(),
                payload,
                self.properties.clone(),
            )
        });
        let Ok(written) = tokio::time::timeout(WRITE_TIMEOUT, join_all(publishes)).await else {
            return Err(AmqpFailure::Timeout("publish"));
        };
        let mut first_error = None;
        let mut count = 0;
        for result in written {
            match result {
                Ok(confirm) => {
                    count += 1;
                    if self.confirms {
                        self.unconfirmed.push(confirm);
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.sent += count;
        self.shared.sent.fetch_add(count, Ordering::Relaxed);
        match first_error {
            Some(e) => Err(self.link.reason(&e).await),
            None => Ok(()),
        }
    }

    /// One confirm: a nack is counted; an error (the channel or connection closed) ends the
    /// device.
    async fn settle(&mut self, confirmed: lapin::Result<Confirmation>) -> Result<(), AmqpFailure> {
        match confirmed {
            Ok(confirmation) => {
                if confirmation.is_nack() {
                    fail(self.shared, &AmqpFailure::Nacked, 1);
                }
                Ok(())
            }
            Err(e) => Err(self.link.reason(&e).await),
        }
    }

    /// Waits for the outstanding confirms until `deadline`.
    async fn drain(&mut self, deadline: Instant) -> Result<(), AmqpFailure> {
        while !self.unconfirmed.is_empty() {
            match tokio::time::timeout_at(deadline, self.unconfirmed.next()).await {
                Ok(Some(confirmed)) => self.settle(confirmed).await?,
                Ok(None) | Err(_) => break,
            }
        }
        if let Some(failure) = self.link.closed_meanwhile() {
            return Err(failure);
        }
        Ok(())
    }
}

/// One AMQP subscriber: connects, declares its queue, binds it to the run's filter, consumes
/// until the run ends.
pub(super) async fn subscriber(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    index: usize,
    ready: oneshot::Sender<bool>,
    mut end: watch::Receiver<bool>,
) -> SubscriberResult {
    let mut result = SubscriberResult::default();
    let failed = |failure: &AmqpFailure| {
        shared.subscribers_failed.fetch_add(1, Ordering::Relaxed);
        fail(&shared, failure, 1);
    };
    if let LoginPlan::Tokens { subscribers, .. } = &plan.login
        && let Some(Err(e)) = subscribers.get(index)
    {
        failed(&AmqpFailure::Common(Failure::Protocol(format!(
            "no token: {e}"
        ))));
        let _ = ready.send(false);
        return result;
    }
    let mut link = match Link::open(&plan, plan.source(index), plan.login(true, index)).await {
        Ok(link) => link,
        Err(failure) => {
            failed(&failure);
            let _ = ready.send(false);
            return result;
        }
    };
    let mut consumer = match subscribe(&mut link, &plan).await {
        Ok(consumer) => consumer,
        Err(failure) => {
            failed(&failure);
            let _ = ready.send(false);
            link.close().await;
            return result;
        }
    };
    shared.subscribers_connected.fetch_add(1, Ordering::Relaxed);
    let _ = ready.send(true);

    let manual_acks = plan.qos != QoS::AtMostOnce;
    let ack_every = u64::from(prefetch(plan.devices, plan.inflight) / 4).max(1);
    let mut unacked = 0u64;
    let mut last_tag = 0;
    let mut receipts = Receipts::new(index, plan.devices);
    'run: loop {
        let mut next = tokio::select! {
            next = consumer.next() => next,
            _ = end.changed() => break,
        };
        let now_ns = shared.now_ns();
        let mut taken = 0;
        loop {
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    receipts.finish_batch(&shared, &mut result, now_ns);
                    let failure = link.reason(&e).await;
                    fail(&shared, &failure, 1);
                    return result;
                }
                None => {
                    receipts.finish_batch(&shared, &mut result, now_ns);
                    fail(&shared, &AmqpFailure::ConsumerCancelled, 1);
                    break 'run;
                }
            };
            let seen = if plan.twin {
                let topic = key_to_topic(delivery.routing_key.as_str());
                read_event(&plan, &topic, &delivery.data)
            } else {
                read_binary_stamp(&delivery.data)
                    .map(|(ns, device, seq)| (ns, device as usize, u64::from(seq)))
            };
            receipts.record(&shared, &mut result, now_ns, seen);
            last_tag = delivery.delivery_tag;
            unacked += 1;
            taken += 1;
            if taken >= BATCH {
                break;
            }
            match consumer.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
        receipts.finish_batch(&shared, &mut result, now_ns);
        if manual_acks && unacked >= ack_every {
            if let Err(failure) = ack(&mut link, last_tag).await {
                fail(&shared, &failure, 1);
                return result;
            }
            unacked = 0;
        }
    }
    if manual_acks && unacked > 0 {
        // Courtesy: the queue goes with the connection anyway.
        let _ = ack(&mut link, last_tag).await;
    }
    link.close().await;
    result
}

/// `basic.ack` with `multiple` up to `tag`.
async fn ack(link: &mut Link, tag: u64) -> Result<(), AmqpFailure> {
    let channel = link.channel.clone();
    let acked = channel.basic_ack(tag, BasicAckOptions { multiple: true });
    link.step(Instant::now() + WRITE_TIMEOUT, "basic.ack", acked)
        .await
}

/// The subscriber's queue (server-named, exclusive), bound to `amq.topic` with the run's
/// filter, and a consumer on it — no-ack at QoS 0; at QoS 1 manual acknowledgements after
/// `basic.qos` with [`prefetch`].
async fn subscribe(link: &mut Link, plan: &Plan) -> Result<Consumer, AmqpFailure> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let Some(binding) = topic_to_key(plan.filter.as_str()) else {
        // Settings checked the filter's binding key.
        return Err(AmqpFailure::Client(
            "no binding key for the filter".to_owned(),
        ));
    };
    // A handle of the link's channel: `Link::step` borrows the link while a step borrows this.
    let channel = link.channel.clone();
    let no_ack = plan.qos == QoS::AtMostOnce;
    if !no_ack {
        let qos = channel.basic_qos(
            prefetch(plan.devices, plan.inflight),
            BasicQosOptions::default(),
        );
        link.step(deadline, "basic.qos", qos).await?;
    }
    let declare = channel.queue_declare(
        ShortString::from(""),
        QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    );
    let queue = link.step(deadline, "queue.declare", declare).await?;
    let bind = channel.queue_bind(
        queue.name().clone(),
        ShortString::from(EXCHANGE),
        ShortString::from(binding),
        QueueBindOptions::default(),
        FieldTable::default(),
    );
    link.step(deadline, "queue.bind", bind).await?;
    let consume = channel.basic_consume(
        queue.name().clone(),
        ShortString::from(""),
        BasicConsumeOptions {
            no_ack,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    );
    link.step(deadline, "basic.consume", consume).await
}

/// A subscriber's bookkeeping of deliveries, as the MQTT subscriber keeps it: duplicates and
/// late messages per device, latencies recorded once per batch, each device whose message
/// arrived woken once per batch (its closed loop).
struct Receipts {
    /// This subscriber's index (its counter in each device's feedback).
    index: usize,
    last_seen: Vec<SeenWindow>,
    /// Devices to wake after this batch, each once.
    touched: Vec<usize>,
    marked: Vec<bool>,
    latencies: Vec<u64>,
    /// New (not duplicate) deliveries in this batch.
    fresh: u64,
}

impl Receipts {
    fn new(index: usize, devices: usize) -> Self {
        Receipts {
            index,
            last_seen: vec![SeenWindow::default(); devices],
            touched: Vec::new(),
            marked: vec![false; devices],
            latencies: Vec::with_capacity(BATCH),
            fresh: 0,
        }
    }

    /// One delivery: what its payload says (sent at ns, device, sequence number or revision),
    /// received at `now_ns`.
    fn record(
        &mut self,
        shared: &Shared,
        result: &mut SubscriberResult,
        now_ns: u64,
        seen: Option<(u64, usize, u64)>,
    ) {
        let Some((sent_ns, device, order)) = seen.filter(|s| s.1 < self.last_seen.len()) else {
            shared.fail(&Failure::UnreadablePayload, 1);
            return;
        };
        match self.last_seen.get_mut(device).map(|w| w.see(order)) {
            Some(Seen::Again) => result.duplicates += 1,
            Some(seen) => {
                if seen == Seen::Late {
                    result.reordered += 1;
                }
                self.fresh += 1;
                self.latencies.push(now_ns.saturating_sub(sent_ns).max(1));
                if let Some(counter) = shared
                    .feedback
                    .get(device)
                    .and_then(|f| f.per_subscriber.get(self.index))
                {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(mark) = self.marked.get_mut(device)
                    && !*mark
                {
                    *mark = true;
                    self.touched.push(device);
                }
            }
            None => {}
        }
    }

    /// Ends a batch: counts, latencies into the histogram, wakes the devices.
    fn finish_batch(&mut self, shared: &Shared, result: &mut SubscriberResult, now_ns: u64) {
        if self.fresh > 0 {
            result.received += self.fresh;
            result.last_delivery_ns = now_ns;
            shared.received.fetch_add(self.fresh, Ordering::Relaxed);
            self.fresh = 0;
            let mut histogram = shared
                .latency
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for latency in self.latencies.drain(..) {
                histogram.record(latency);
            }
        }
        for device in self.touched.drain(..) {
            if let Some(mark) = self.marked.get_mut(device) {
                *mark = false;
            }
            if let Some(f) = shared.feedback.get(device) {
                f.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_under_their_kind() {
        assert_eq!(AmqpFailure::AccessRefused.kind(), "access refused (403)");
        assert_eq!(
            AmqpFailure::ChannelClosed {
                code: 404,
                text: "NOT_FOUND - no exchange".to_owned()
            }
            .kind(),
            "channel closed 404 NOT_FOUND - no exchange"
        );
        assert_eq!(AmqpFailure::Nacked.kind(), "publish nacked");
        assert_eq!(
            AmqpFailure::Common(Failure::TcpConnect(std::io::ErrorKind::ConnectionRefused)).kind(),
            "tcp connect: connection refused"
        );
    }

    #[test]
    fn a_refusal_while_logging_in_is_access_refused_and_later_a_closed_channel() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
        let refused = lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED),
            ShortString::from("ACCESS_REFUSED - Login was refused"),
        )));
        assert_eq!(
            AmqpFailure::of(&refused, false, true),
            AmqpFailure::AccessRefused
        );
        assert_eq!(
            AmqpFailure::of(&refused, true, false),
            AmqpFailure::ChannelClosed {
                code: 403,
                text: "ACCESS_REFUSED - Login was refused".to_owned()
            }
        );
        assert!(matches!(
            AmqpFailure::of(&refused, false, false),
            AmqpFailure::ConnectionClosed { code: 403, .. }
        ));
    }

    #[test]
    fn frames_fit_the_payload_within_amqp_bounds() {
        assert_eq!(frame_max(64), 4096);
        assert_eq!(frame_max(5000), 8192);
        assert_eq!(frame_max(1 << 20), 131_072);
    }

    #[test]
    fn the_prefetch_covers_twice_the_closed_loop_within_bounds() {
        assert_eq!(prefetch(5, 10), 100);
        assert_eq!(prefetch(1, 1), MIN_PREFETCH);
        assert_eq!(prefetch(100, 10), 2000);
        assert_eq!(prefetch(1_000_000, 65_535), MAX_PREFETCH);
    }

    #[test]
    fn no_credentials_log_in_as_guest_and_a_token_is_the_password() {
        let login = |username: Option<&str>, password: Option<&str>| client::Login {
            client_id: "dev-0".to_owned(),
            username: username.map(str::to_owned),
            password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
            user_properties: vec![("x-cr-api-token".to_owned(), "api".to_owned())],
        };
        let (guest, properties) = credentials(login(None, None));
        assert_eq!(
            (guest.username.as_str(), guest.password.as_str()),
            ("guest", "guest")
        );
        let debug = format!("{properties:?}");
        assert!(
            debug.contains("client_id") && debug.contains("x-cr-api-token"),
            "{debug}"
        );
        let (jwt, _) = credentials(login(None, Some("ey.token")));
        assert_eq!(
            (jwt.username.as_str(), jwt.password.as_str()),
            ("", "ey.token")
        );
    }
}
