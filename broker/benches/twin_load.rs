#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! End-to-end load of the real `thingsgate serve` (release build) over loopback: 100 devices
//! publishing to one wildcard subscriber, authorized twin updates side by side with plain
//! topics, QoS 0 and QoS 1.
//!
//! `cargo bench -p broker --bench twin_load` — starts the binary on port 0 with a fresh data
//! dir and solution `bench` (namespace `org.acme`, default solution policy), connects 100
//! devices with the solution secret (client IDs `dev-0`…`dev-99`, MQTT 3.1.1, TCP_NODELAY),
//! each creates its thing `org.acme/dev-N` (compact create, PUBACK awaited; the thing gets the
//! inline default policy, which grants the solution's subjects, so the subscriber may read
//! everything and no event is cut). Then one run per entry of `TWIN_LOAD_RUNS`, each with a
//! fresh subscriber connection subscribed at the run's QoS:
//! - `twin-Q`: every device publishes `org.acme/dev-N/things/twin/commands/modify/features/
//!   temp/properties/value` at QoS `Q`; the subscriber (`org.acme/+/things/twin/events/#`)
//!   gets the `modified` events, whose envelope `value` is what the device sent;
//! - `plain-Q`: the same traffic on `devices/dev-N/temp`, subscriber `devices/#`.
//!
//! The payload is the send instant, in nanoseconds since a start instant shared by every task
//! of this process, as a JSON number; the subscriber takes it from the event's `value` (or the
//! plain payload) and computes the end-to-end latency. A twin change is announced (and, at
//! QoS 1, acknowledged) only once its journal batch is `fdatasync`ed, so twin latencies include
//! the group commit.
//!
//! # How fast devices publish
//! Every device publishes at full speed for `TWIN_LOAD_SECONDS` (default 5), or at
//! `TWIN_LOAD_RATE` messages/s if set, in one of two modes:
//! - **end to end** (default): a device may have at most `TWIN_LOAD_WINDOW` (default 10)
//!   messages the subscriber has not received yet, and at QoS 1 also at most that many
//!   unacknowledged PUBLISHes. 100 × 10 messages in flight never exceed the subscriber's queue
//!   (`max_queued_messages`, 1,000), so nothing is dropped and the figure is the broker's
//!   highest delivered rate, with the latency of 1,000 messages in flight.
//! - **open** (runs named `open-…`): QoS 0 writes bursts of 10 PUBLISHes as fast as the socket
//!   takes them, QoS 1 keeps the window of unacknowledged PUBLISHes only. Publishers then
//!   outrun the single subscriber: its queue overflows and the broker drops the newest
//!   messages (by design, counted), and at QoS 0 the kernel's socket buffers (`tcp_rmem` up to
//!   32 MiB per connection here) hold millions of messages the broker reads long after the
//!   devices stopped. The run waits until the broker has read every PUBLISH (its
//!   `messages_received` counter) and says how long that took.
//!
//! Printed per run: messages sent, how long until the broker had read them all, delivered to
//! the subscriber (lost, dropped by a limit per `thingsgate_messages_dropped_total`, denied),
//! delivered messages/s within the publishing window, p50/p99/max latency, broker CPU (utime +
//! stime from `/proc/PID/stat`) as cores and as delivered messages per broker core-second, and
//! this process's own CPU (the load generator shares the machine).
//!
//! Environment: `TWIN_LOAD_PERSISTENT_SUBSCRIBER=1` (the subscriber keeps a persistent session:
//! its QoS 1 deliveries are journaled), `TWIN_LOAD_SECONDS` (default 5), `TWIN_LOAD_DEVICES` (default 100),
//! `TWIN_LOAD_WINDOW` (default 10), `TWIN_LOAD_RATE` (messages/s per device; default: full
//! speed), `TWIN_LOAD_RUNS` (default `twin-0,plain-0,twin-1,plain-1,open-twin-1,open-plain-1`;
//! `open-twin-0` and `open-plain-0` on request: they take minutes). `THINGSGATE_MQTT_…`
//! variables reach the broker (e.g. `THINGSGATE_MQTT_MAX_QUEUED_MESSAGES`). Everything is
//! bounded in time; the broker is killed at the end (and on a panic).

mod support;

use support::{cpu_seconds, create_solution, serve, utf8};

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use broker::mqtt::codec::{
    self, ConnAck, Connect, Packet, Properties, Protocol, PubResponse, Publish, QoS, QosPid,
    SubAck, Subscribe, Subscription, SubscriptionOptions, TopicName,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, Semaphore};

const MAX_PACKET: usize = 1 << 20;
const READ_ROOM: usize = 64 * 1024;
/// PUBLISHes encoded per socket write at most (full speed).
const BURST: usize = 10;
/// How long the subscriber waits for the last messages after the devices stopped.
const DRAIN_QUIET: Duration = Duration::from_millis(500);
const DRAIN_MAX: Duration = Duration::from_secs(15);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The sum of every sample of the counter family `name` on the broker's `/metrics`.
fn metric_total(http: SocketAddr, name: &str) -> u64 {
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn encode(packet: &Packet, buf: &mut BytesMut) {
    packet.encode(Protocol::V311, buf).unwrap();
}

/// Reads what the socket has into `buf` (at least 64 KiB of room, so that a busy reader is
/// not held to tiny reads); false at the end of the stream.
async fn read_more(read: &mut OwnedReadHalf, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < READ_ROOM {
        buf.reserve(READ_ROOM);
    }
    read.read_buf(buf).await.unwrap() > 0
}

/// Reads until one whole packet is decoded.
async fn next_packet(read: &mut OwnedReadHalf, buf: &mut BytesMut) -> Packet {
    loop {
        if let Some(p) = codec::decode(buf, Protocol::V311, MAX_PACKET).unwrap() {
            return p;
        }
        assert!(
            read_more(read, buf).await,
            "the broker closed the connection"
        );
    }
}

/// One client connection, split so that a device can write while it reads its PUBACKs.
struct Client {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    rbuf: BytesMut,
}

async fn connect(addr: SocketAddr, client_id: &str, secret: &str) -> Client {
    connect_with(addr, client_id, secret, true).await
}

/// `clean_start: false`: a persistent session (3.1.1 Clean Session 0).
async fn connect_with(
    addr: SocketAddr,
    client_id: &str,
    secret: &str,
    clean_start: bool,
) -> Client {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (read, mut write) = stream.into_split();
    let mut buf = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(Connect {
            protocol: Protocol::V311,
            clean_start,
            keep_alive: 0,
            client_id: utf8(client_id),
            will: None,
            username: Some(utf8("bench")),
            password: Some(Bytes::copy_from_slice(secret.as_bytes())),
            properties: Properties::default(),
        })),
        &mut buf,
    );
    write.write_all(&buf).await.unwrap();
    let mut client = Client {
        read,
        write,
        rbuf: BytesMut::with_capacity(4096),
    };
    match next_packet(&mut client.read, &mut client.rbuf).await {
        Packet::ConnAck(ConnAck { code: 0, .. }) => client,
        other => panic!("{client_id}: unexpected answer to CONNECT: {other:?}"),
    }
}

/// PUBLISH `payload` on `topic` at QoS 1 and wait for its PUBACK.
async fn publish_acked(client: &mut Client, topic: &str, payload: &[u8]) {
    let mut buf = BytesMut::new();
    let id = NonZeroU16::new(1).unwrap();
    encode(
        &Packet::Publish(Publish {
            dup: false,
            qos: QosPid::AtLeastOnce(id),
            retain: false,
            topic: topic.parse().unwrap(),
            payload: Bytes::copy_from_slice(payload),
            properties: Properties::default(),
        }),
        &mut buf,
    );
    client.write.write_all(&buf).await.unwrap();
    match next_packet(&mut client.read, &mut client.rbuf).await {
        Packet::PubAck(ack) if ack.packet_id == id => {}
        other => panic!("unexpected answer to `{topic}`: {other:?}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Twin,
    Plain,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Twin => "twin",
            Kind::Plain => "plain",
        }
    }

    fn topic(self, device: usize) -> String {
        match self {
            Kind::Twin => format!(
                "org.acme/dev-{device}/things/twin/commands/modify/features/temp/properties/value"
            ),
            Kind::Plain => format!("devices/dev-{device}/temp"),
        }
    }

    fn filter(self) -> &'static str {
        match self {
            Kind::Twin => "org.acme/+/things/twin/events/#",
            Kind::Plain => "devices/#",
        }
    }

    /// The send instant carried by a delivered payload.
    fn sent_at(self, payload: &[u8]) -> Option<u64> {
        let number = match self {
            // The event envelope: `{"topic":…,"headers":{},"path":…,"value":N,"revision":…}`.
            Kind::Twin => {
                const KEY: &[u8] = br#""value":"#;
                let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
                &payload[at..]
            }
            Kind::Plain => payload,
        };
        let digits = number.iter().take_while(|b| b.is_ascii_digit()).count();
        std::str::from_utf8(&number[..digits]).ok()?.parse().ok()
    }
}

/// The device number in a delivered topic (`org.acme/dev-N/…`, `devices/dev-N/temp`).
fn device_of(topic: &str) -> Option<usize> {
    topic.split('/').nth(1)?.strip_prefix("dev-")?.parse().ok()
}

/// What the subscriber saw in one run.
struct Received {
    /// Latencies (ns) of every delivered message.
    latencies: Vec<u64>,
    /// Delivered within the publishing window.
    in_window: u64,
    /// Payloads without a readable send instant.
    unreadable: u64,
}

/// Reads deliveries (acknowledging QoS 1 ones, giving each device a credit back in the end to
/// end mode) until the devices have stopped and nothing arrived for [`DRAIN_QUIET`], or
/// [`DRAIN_MAX`] after they stopped.
async fn subscribe_and_read(
    mut client: Client,
    kind: Kind,
    start: Instant,
    window_end: Arc<AtomicU64>,
    credits: Option<Arc<Vec<Semaphore>>>,
    stopped: Arc<Notify>,
) -> Received {
    let mut received = Received {
        latencies: Vec::with_capacity(1 << 20),
        in_window: 0,
        unreadable: 0,
    };
    let mut wbuf = BytesMut::with_capacity(4096);
    let mut stop_at: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        let deadline = match stop_at {
            Some(at) => (last + DRAIN_QUIET)
                .min(at + DRAIN_MAX)
                .max(at + DRAIN_QUIET),
            None => Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            more = read_more(&mut client.read, &mut client.rbuf) => {
                assert!(more, "the broker closed the subscriber's connection");
            }
            () = stopped.notified(), if stop_at.is_none() => {
                stop_at = Some(Instant::now());
                continue;
            }
            () = tokio::time::sleep_until(deadline.into()) => break,
        }
        let now = start.elapsed().as_nanos() as u64;
        let window_end = window_end.load(Ordering::Relaxed);
        while let Some(packet) =
            codec::decode(&mut client.rbuf, Protocol::V311, MAX_PACKET).unwrap()
        {
            let Packet::Publish(publish) = packet else {
                panic!("unexpected packet for the subscriber: {packet:?}");
            };
            match kind.sent_at(&publish.payload) {
                Some(sent) => {
                    received.latencies.push(now.saturating_sub(sent));
                    if now <= window_end {
                        received.in_window += 1;
                    }
                }
                None => received.unreadable += 1,
            }
            if let Some(credits) = &credits {
                let device = device_of(publish.topic.as_str()).expect("a device's topic");
                credits[device].add_permits(1);
            }
            if let Some(packet_id) = publish.qos.packet_id() {
                encode(
                    &Packet::PubAck(PubResponse {
                        packet_id,
                        reason: 0,
                        properties: Properties::default(),
                    }),
                    &mut wbuf,
                );
            }
        }
        if !wbuf.is_empty() {
            client.write.write_all(&wbuf).await.unwrap();
            wbuf.clear();
        }
        last = Instant::now();
    }
    received
}

/// How the devices of a run publish.
#[derive(Debug, Clone, Copy)]
struct Load {
    qos: QoS,
    /// Open loop (see the module docs), else end to end.
    open: bool,
    /// Messages a device may have in flight (see the module docs).
    window: usize,
    /// Messages per second per device; `None`: full speed.
    rate: Option<f64>,
    seconds: u64,
}

impl Load {
    fn describe(&self) -> String {
        let speed = match self.rate {
            Some(rate) => format!("{rate:.0} msg/s per device"),
            None => "full speed".to_owned(),
        };
        match (self.open, self.qos) {
            (false, _) => format!("{speed}, end to end, window {}", self.window),
            (true, QoS::AtMostOnce) => format!("{speed}, open loop"),
            (true, _) => format!("{speed}, open loop, PUBACK window {}", self.window),
        }
    }
}

/// Takes one slot of `slots`, waiting at most until `deadline`.
async fn take(slots: &Semaphore, deadline: Instant) -> bool {
    match tokio::time::timeout_at(deadline.into(), slots.acquire()).await {
        Ok(Ok(slot)) => {
            slot.forget();
            true
        }
        _ => false,
    }
}

/// Takes up to `n` more slots of every semaphore in `slots` without waiting; how many.
fn take_more(slots: &[&Semaphore], n: usize) -> usize {
    let mut taken = 0;
    while taken < n {
        let mut permits = Vec::with_capacity(slots.len());
        for s in slots {
            match s.try_acquire() {
                Ok(p) => permits.push(p),
                Err(_) => return taken,
            }
        }
        permits
            .into_iter()
            .for_each(tokio::sync::SemaphorePermit::forget);
        taken += 1;
    }
    taken
}

/// Publishes on `topic` until `deadline` as `load` says (`credits`: this device's end-to-end
/// window, given back by the subscriber; device `index` starts at its share of the period so
/// that paced devices do not publish in step); returns the client and how many messages it
/// sent (at QoS 1: all of them acknowledged).
async fn device_load(
    client: Client,
    topic: TopicName,
    index: usize,
    load: Load,
    credits: Option<Arc<Vec<Semaphore>>>,
    start: Instant,
    deadline: Instant,
) -> (Client, u64) {
    let credits = credits.as_deref().map(|c| &c[index]);
    let period = load.rate.map(|rate| Duration::from_secs_f64(1.0 / rate));
    let offset = period.map_or(Duration::ZERO, |p| p * (index as u32 % 100) / 100);
    let mut next_send = Instant::now() + offset;
    let burst = if period.is_some() { 1 } else { BURST };
    let mut wbuf = BytesMut::with_capacity(BURST * 128);
    let publish = |wbuf: &mut BytesMut, qos: QosPid| {
        let sent = start.elapsed().as_nanos() as u64;
        encode(
            &Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.clone(),
                payload: Bytes::from(sent.to_string()),
                properties: Properties::default(),
            }),
            wbuf,
        );
    };
    let Client {
        mut read,
        mut write,
        mut rbuf,
    } = client;
    if load.qos == QoS::AtMostOnce {
        let mut sent = 0;
        loop {
            if let Some(credits) = credits
                && !take(credits, deadline).await
            {
                break;
            }
            if !pace(period, &mut next_send, deadline).await {
                break;
            }
            let n = match credits {
                Some(credits) => 1 + take_more(&[credits], burst - 1),
                None => burst,
            };
            wbuf.clear();
            for _ in 0..n {
                publish(&mut wbuf, QosPid::AtMostOnce);
            }
            write.write_all(&wbuf).await.unwrap();
            sent += n as u64;
        }
        return (Client { read, write, rbuf }, sent);
    }
    // QoS 1: a window of unacknowledged PUBLISHes; the reader gives a slot back per PUBACK.
    let acks = Semaphore::new(load.window);
    let done = Notify::new();
    let sent = AtomicU64::new(0);
    let writer = async {
        let mut next_id: u16 = 1;
        let mut slots = vec![&acks];
        slots.extend(credits);
        'publishing: loop {
            for s in &slots {
                if !take(s, deadline).await {
                    break 'publishing;
                }
            }
            if !pace(period, &mut next_send, deadline).await {
                break;
            }
            let n = 1 + take_more(&slots, burst - 1);
            wbuf.clear();
            for _ in 0..n {
                publish(
                    &mut wbuf,
                    QosPid::AtLeastOnce(NonZeroU16::new(next_id).unwrap()),
                );
                next_id = next_id.checked_add(1).unwrap_or(1);
            }
            write.write_all(&wbuf).await.unwrap();
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        done.notify_one();
    };
    let reader = async {
        let mut acked = 0u64;
        let mut writer_done = false;
        loop {
            while let Some(packet) = codec::decode(&mut rbuf, Protocol::V311, MAX_PACKET).unwrap() {
                match packet {
                    Packet::PubAck(_) => {
                        acked += 1;
                        acks.add_permits(1);
                    }
                    other => panic!("unexpected packet for a device: {other:?}"),
                }
            }
            if writer_done && acked >= sent.load(Ordering::Relaxed) {
                return;
            }
            tokio::select! {
                more = read_more(&mut read, &mut rbuf) => {
                    assert!(more, "the broker closed a device's connection");
                }
                () = done.notified(), if !writer_done => writer_done = true,
            }
        }
    };
    tokio::join!(writer, reader);
    let sent = sent.load(Ordering::Relaxed);
    (Client { read, write, rbuf }, sent)
}

/// Waits for the next send instant of a paced device (`period`: none at full speed); false
/// once past `deadline`.
async fn pace(period: Option<Duration>, next_send: &mut Instant, deadline: Instant) -> bool {
    if let Some(period) = period {
        tokio::time::sleep_until((*next_send).into()).await;
        *next_send += period;
    }
    Instant::now() < deadline
}

struct Broker {
    mqtt: SocketAddr,
    http: SocketAddr,
    pid: String,
    secret: String,
}

impl Broker {
    fn counter(&self, name: &str) -> u64 {
        metric_total(self.http, name)
    }

    /// Waits (polling `/metrics`, at most `limit`) until the broker has read `count` PUBLISHes.
    /// At QoS 0 a device's write completes once the bytes are in the kernel's socket buffers,
    /// which can hold many messages the broker has not read yet.
    async fn caught_up(&self, count: u64, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if self.counter("thingsgate_messages_received_total") >= count {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

/// One run: a fresh subscriber, every device publishing for `load.seconds`, one line printed
/// (unless `quiet`).
async fn run(
    broker: &Broker,
    devices: Vec<Client>,
    kind: Kind,
    load: Load,
    quiet: bool,
) -> Vec<Client> {
    let qos = load.qos;
    // `TWIN_LOAD_PERSISTENT_SUBSCRIBER=1`: the subscriber keeps a persistent session, so
    // every QoS 1 delivery to it is journaled before the publisher's PUBACK.
    let persistent = std::env::var("TWIN_LOAD_PERSISTENT_SUBSCRIBER").is_ok_and(|v| v == "1");
    let mut subscriber = connect_with(
        broker.mqtt,
        &format!("sub-{}-{}", kind.name(), qos as u8),
        &broker.secret,
        !persistent,
    )
    .await;
    let mut buf = BytesMut::new();
    encode(
        &Packet::Subscribe(Subscribe {
            packet_id: NonZeroU16::new(1).unwrap(),
            subscriptions: vec![Subscription {
                filter: kind.filter().parse().unwrap(),
                options: SubscriptionOptions::qos(qos),
            }],
            properties: Properties::default(),
        }),
        &mut buf,
    );
    subscriber.write.write_all(&buf).await.unwrap();
    match next_packet(&mut subscriber.read, &mut subscriber.rbuf).await {
        Packet::SubAck(SubAck { codes, .. }) if codes == [qos as u8] => {}
        other => panic!("unexpected answer to SUBSCRIBE: {other:?}"),
    }

    let start = Instant::now();
    let window_end = Arc::new(AtomicU64::new(u64::MAX));
    let stopped = Arc::new(Notify::new());
    let credits = (!load.open).then(|| {
        Arc::new(
            (0..devices.len())
                .map(|_| Semaphore::new(load.window))
                .collect::<Vec<_>>(),
        )
    });
    let reader = tokio::spawn(subscribe_and_read(
        subscriber,
        kind,
        start,
        window_end.clone(),
        credits.clone(),
        stopped.clone(),
    ));
    let received_before = broker.counter("thingsgate_messages_received_total");
    let dropped_before = broker.counter("thingsgate_messages_dropped_total");
    let denied_before = broker.counter("thingsgate_messages_denied_total");
    let broker_cpu = cpu_seconds(&broker.pid);
    let own_cpu = cpu_seconds("self");
    let t0 = Instant::now();
    let duration = Duration::from_secs(load.seconds);
    let deadline = t0 + duration;
    window_end.store((deadline - start).as_nanos() as u64, Ordering::Relaxed);
    let tasks: Vec<_> = devices
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let topic: TopicName = kind.topic(i).parse().unwrap();
            let credits = credits.clone();
            tokio::spawn(device_load(
                client, topic, i, load, credits, start, deadline,
            ))
        })
        .collect();
    let mut devices = Vec::with_capacity(tasks.len());
    let mut sent = 0;
    for task in tasks {
        let (client, n) = tokio::time::timeout(duration + Duration::from_secs(60), task)
            .await
            .expect("a device did not finish in time (PUBACKs missing?)")
            .unwrap();
        devices.push(client);
        sent += n;
    }
    let publishing = t0.elapsed();
    let limit = Duration::from_secs(60 + 30 * load.seconds);
    let caught_up = broker.caught_up(received_before + sent, limit).await;
    assert!(
        caught_up,
        "the broker did not read every PUBLISH within {limit:?}"
    );
    let ingest = t0.elapsed();
    stopped.notify_one();
    let received = tokio::time::timeout(DRAIN_MAX + Duration::from_secs(5), reader)
        .await
        .expect("the subscriber did not finish in time")
        .unwrap();
    let broker_cpu = cpu_seconds(&broker.pid) - broker_cpu;
    let own_cpu = cpu_seconds("self") - own_cpu;
    let elapsed = t0.elapsed().as_secs_f64();
    let dropped = broker.counter("thingsgate_messages_dropped_total") - dropped_before;
    let denied = broker.counter("thingsgate_messages_denied_total") - denied_before;
    if quiet {
        return devices;
    }

    let mut latencies = received.latencies;
    latencies.sort_unstable();
    let delivered = latencies.len() as u64;
    assert!(
        delivered > 0,
        "{} QoS {}: nothing delivered (were the things created?)",
        kind.name(),
        qos as u8
    );
    let percentile = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1e6
    };
    println!(
        "twin_load/{}{}/qos{}: {} devices, {} s, {}: sent {sent} ({:.0}/s; all read by the \
         broker {:.1} s after the start), delivered {delivered} = {:.0} msg/s within the {} s, \
         lost {} (broker dropped {dropped}, denied {denied}); latency p50 {:.2} ms p99 {:.2} ms \
         max {:.2} ms; broker CPU {:.2} cores over {elapsed:.1} s = {:.0} delivered msg per \
         broker core-second; load generator CPU {:.2} cores",
        if load.open { "open-" } else { "" },
        kind.name(),
        qos as u8,
        devices.len(),
        load.seconds,
        load.describe(),
        sent as f64 / publishing.as_secs_f64(),
        ingest.as_secs_f64(),
        received.in_window as f64 / duration.as_secs_f64(),
        load.seconds,
        sent.saturating_sub(delivered),
        percentile(0.50),
        percentile(0.99),
        percentile(1.0),
        broker_cpu / elapsed,
        delivered as f64 / broker_cpu,
        own_cpu / elapsed,
    );
    if received.unreadable > 0 {
        println!(
            "  ({} deliveries carried no send instant)",
            received.unreadable
        );
    }
    devices
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("twin_load: benchmark");
        return;
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let seconds = env_u64("TWIN_LOAD_SECONDS", 5);
    let device_count = env_u64("TWIN_LOAD_DEVICES", 100) as usize;
    let window = env_u64("TWIN_LOAD_WINDOW", 10) as usize;
    let rate = Some(env_u64("TWIN_LOAD_RATE", 0) as f64).filter(|&r| r > 0.0);
    let load = |open, qos, seconds| Load {
        qos,
        open,
        window,
        rate,
        seconds,
    };
    let runs: Vec<(Kind, Load)> = std::env::var("TWIN_LOAD_RUNS")
        .unwrap_or_else(|_| "twin-0,plain-0,twin-1,plain-1,open-twin-1,open-plain-1".to_owned())
        .split(',')
        .map(|run| {
            let run = run.trim();
            let (open, name) = match run.strip_prefix("open-") {
                Some(name) => (true, name),
                None => (false, run),
            };
            let (kind, qos) = match name {
                "twin-0" => (Kind::Twin, QoS::AtMostOnce),
                "twin-1" => (Kind::Twin, QoS::AtLeastOnce),
                "plain-0" => (Kind::Plain, QoS::AtMostOnce),
                "plain-1" => (Kind::Plain, QoS::AtLeastOnce),
                _ => panic!(
                    "TWIN_LOAD_RUNS: unknown run `{run}` ([open-]twin-0, twin-1, plain-0, plain-1)"
                ),
            };
            (kind, load(open, qos, seconds))
        })
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_str = data.to_str().unwrap();
    let secret = create_solution(data_str, "org.acme");
    let (server, addresses) = serve(&[
        "--data",
        data_str,
        "--mqtt",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    let pid = server.0.id().to_string();
    let (mqtt, http) = (addresses.get("mqtt"), addresses.get("http"));
    let broker = Broker {
        mqtt: *mqtt.expect("the server printed its MQTT address"),
        http: *http.expect("the server printed its HTTP address"),
        pid,
        secret,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let setup = async {
            let mut devices = Vec::with_capacity(device_count);
            for i in 0..device_count {
                devices.push(connect(broker.mqtt, &format!("dev-{i}"), &broker.secret).await);
            }
            let creates: Vec<_> = devices
                .into_iter()
                .enumerate()
                .map(|(i, mut client)| {
                    tokio::spawn(async move {
                        publish_acked(
                            &mut client,
                            &format!("org.acme/dev-{i}/things/twin/commands/create"),
                            br#"{"features":{"temp":{"properties":{"value":0}}}}"#,
                        )
                        .await;
                        client
                    })
                })
                .collect();
            let mut devices = Vec::with_capacity(device_count);
            for create in creates {
                devices.push(create.await.unwrap());
            }
            devices
        };
        let mut devices = tokio::time::timeout(Duration::from_secs(60), setup)
            .await
            .expect("connecting the devices and creating their things took over 60 s");
        // Warm-up (not printed): views compiled, buffers grown, the journal's first segment.
        for kind in [Kind::Twin, Kind::Plain] {
            devices = run(
                &broker,
                devices,
                kind,
                load(false, QoS::AtMostOnce, 1),
                true,
            )
            .await;
        }
        for (kind, load) in runs {
            devices = run(&broker, devices, kind, load, false).await;
        }
        drop(devices);
    });
    drop(server);
}
