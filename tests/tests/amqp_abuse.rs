//! The AMQP 0.9.1 listener under abuse and at its limits, over raw sockets: 500 malformed
//! connections (wrong protocol headers, garbage, oversized frames, bad frame ends, unknown frame
//! types, garbled methods, content out of place, unopened channels, truncated frames, slow
//! handshakes) leave the broker serving lapin and a twin intact; each reply code the
//! specification promises is read from the wire. Then every limit of `broker::limits` that
//! applies to AMQP (the `limits::amqp` table and the `[mqtt]` limits it shares), one test each.
//!
//! The raw client below encodes methods with `amq-protocol` (the codec under lapin and the
//! broker) but frames bytes itself, so it can send what no client library would. Every wait is
//! bounded: [`STEP`] for what must come, [`QUIET`] for what must not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, queue};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use e2e::amqp::{confirm_channel, connect, consume, next_within, secret_uri, start_with_amqp};
use e2e::broker::{Broker, Solution};
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one expected step (a reply, a close) may take on a loaded machine.
const STEP: Duration = Duration::from_secs(10);
/// How long we listen for something that must not come.
const QUIET: Duration = Duration::from_secs(1);
/// What an AMQP 0.9.1 client sends first, and what the server answers to another header.
const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// The connect timeout the abuse tests give the server (`THINGSGATE_MQTT_CONNECT_TIMEOUT_SECONDS`).
const CONNECT_TIMEOUT_SECONDS: u64 = 2;
/// `broker::limits::amqp`, as documented there.
const FRAME_MAX: u32 = 131_072;
const HANDSHAKE_FRAME_MAX: u32 = 16_384;
const CHANNEL_MAX: u16 = 2047;
const MAX_QUEUES: usize = 64;
const MAX_BINDINGS: usize = 64;
const MAX_CONSUMERS: usize = 64;
const MAX_UNACKED: usize = 2048;
/// The default `max_packet_size`: the largest message body.
const MAX_BODY: usize = 1024 * 1024;

// --- frames -------------------------------------------------------------------------------------

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

fn encode(frame: &AMQPFrame) -> Vec<u8> {
    gen_frame(frame)(WriteContext::from(Vec::new()))
        .expect("an encodable frame")
        .write
}

fn method(channel: u16, class: AMQPClass) -> Vec<u8> {
    encode(&AMQPFrame::Method(channel, class))
}

fn content_header(channel: u16, body_size: u64) -> Vec<u8> {
    content_header_with(channel, body_size, basic::AMQPProperties::default())
}

fn content_header_with(channel: u16, body_size: u64, properties: basic::AMQPProperties) -> Vec<u8> {
    encode(&AMQPFrame::Header(
        channel,
        AMQPContentHeader {
            class_id: 60,
            body_size,
            properties,
        },
    ))
}

/// A frame written byte by byte: any type, any end octet.
fn raw_frame(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out.push(end);
    out
}

/// Only the 7-byte header of a frame announcing `size` payload bytes.
fn frame_head(kind: u8, channel: u16, size: u32) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out
}

fn heartbeat() -> Vec<u8> {
    raw_frame(FRAME_HEARTBEAT, 0, &[], FRAME_END)
}

fn channel_open(id: u16) -> Vec<u8> {
    method(
        id,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
}

fn queue_declare(id: u16, declare: queue::Declare) -> Vec<u8> {
    method(id, AMQPClass::Queue(queue::AMQPMethod::Declare(declare)))
}

fn exclusive_queue(id: u16) -> Vec<u8> {
    queue_declare(
        id,
        queue::Declare {
            exclusive: true,
            ..queue::Declare::default()
        },
    )
}

fn queue_bind(id: u16, queue: &str, key: &str) -> Vec<u8> {
    method(
        id,
        AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: queue.into(),
            exchange: "amq.topic".into(),
            routing_key: key.into(),
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
}

fn basic_consume(id: u16, queue: &str, tag: &str, no_ack: bool) -> Vec<u8> {
    method(
        id,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            consumer_tag: tag.into(),
            no_local: false,
            no_ack,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
}

fn basic_ack(id: u16, delivery_tag: u64, multiple: bool) -> Vec<u8> {
    method(
        id,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag,
            multiple,
        })),
    )
}

fn confirm_select(id: u16) -> Vec<u8> {
    method(
        id,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
}

fn basic_publish_method(id: u16, key: &str) -> Vec<u8> {
    method(
        id,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "amq.topic".into(),
            routing_key: key.into(),
            mandatory: false,
            immediate: false,
        })),
    )
}

/// `basic.publish` to `amq.topic`, its content header and its body in frames of at most
/// `frame_max`.
fn publish(id: u16, key: &str, body: &[u8], frame_max: u32) -> Vec<u8> {
    publish_with(id, key, body, frame_max, basic::AMQPProperties::default())
}

/// [`publish`] with `properties` (`delivery-mode` 2: QoS 1, kept for an offline queue).
fn publish_with(
    id: u16,
    key: &str,
    body: &[u8],
    frame_max: u32,
    properties: basic::AMQPProperties,
) -> Vec<u8> {
    let mut out = basic_publish_method(id, key);
    out.extend(content_header_with(id, body.len() as u64, properties));
    for part in body.chunks((frame_max - 8) as usize) {
        out.extend(raw_frame(FRAME_BODY, id, part, FRAME_END));
    }
    out
}

/// PLAIN credentials in `connection.start-ok`, with extra client properties.
fn start_ok(user: &str, password: &str, properties: FieldTable) -> Vec<u8> {
    let mut response = vec![0u8];
    response.extend_from_slice(user.as_bytes());
    response.push(0);
    response.extend_from_slice(password.as_bytes());
    method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: properties,
            mechanism: "PLAIN".into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        })),
    )
}

fn tune_ok(channel_max: u16, frame_max: u32, heartbeat: u16) -> Vec<u8> {
    method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max,
            frame_max,
            heartbeat,
        })),
    )
}

fn connection_open() -> Vec<u8> {
    method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    )
}

/// A frame the server sent.
#[derive(Debug)]
struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

impl Frame {
    /// Class and method IDs of a method frame.
    fn ids(&self) -> Option<(u16, u16)> {
        (self.kind == FRAME_METHOD && self.payload.len() >= 4).then(|| {
            (
                u16::from_be_bytes([self.payload[0], self.payload[1]]),
                u16::from_be_bytes([self.payload[2], self.payload[3]]),
            )
        })
    }

    fn is(&self, channel: u16, class: u16, method: u16) -> bool {
        self.channel == channel && self.ids() == Some((class, method))
    }

    /// The reply code of a `connection.close` (class 10, method 50) or `channel.close` (20,
    /// 40), read from the wire: the u16 after the class and method IDs.
    fn close_code(&self) -> Option<u16> {
        matches!(self.ids(), Some((10, 50) | (20, 40)))
            .then(|| u16::from_be_bytes([self.payload[4], self.payload[5]]))
    }

    fn method(&self) -> Option<AMQPClass> {
        if self.kind != FRAME_METHOD {
            return None;
        }
        amq_protocol::protocol::parse_class(&self.payload[..])
            .ok()
            .map(|(_, class)| class)
    }

    fn describe(&self) -> String {
        match self.method() {
            Some(class) => format!("channel {}: {class:?}", self.channel),
            None => format!(
                "frame type {} on channel {} with {} bytes",
                self.kind,
                self.channel,
                self.payload.len()
            ),
        }
    }
}

#[derive(Debug)]
enum Got {
    Frame(Frame),
    /// Bytes that are no frame (the protocol header the server answers a wrong one with).
    Header(Vec<u8>),
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing within the time given.
    Silent,
}

/// One TCP connection to the AMQP listener.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect within the step timeout")
            .expect("the AMQP listener accepts");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`; an error means the server closed first.
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(STEP, self.stream.write_all(bytes))
            .await
            .map_err(|_| std::io::Error::other("write timed out"))?
    }

    async fn must_send(&mut self, bytes: &[u8]) {
        self.send(bytes).await.expect("the server reads on");
    }

    /// The next frame (or the end, or silence) within `within`.
    async fn next(&mut self, within: Duration) -> Got {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.buf.starts_with(b"AMQP") && self.buf.len() >= 8 {
                return Got::Header(self.buf.drain(..8).collect());
            }
            if self.buf.len() >= 7 && !self.buf.starts_with(b"AMQP") {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= 8 + size {
                    let frame: Vec<u8> = self.buf.drain(..8 + size).collect();
                    assert_eq!(
                        frame[7 + size],
                        FRAME_END,
                        "the server ends frames with 0xCE"
                    );
                    return Got::Frame(Frame {
                        kind: frame[0],
                        channel: u16::from_be_bytes([frame[1], frame[2]]),
                        payload: frame[7..7 + size].to_vec(),
                    });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Got::Silent,
                Ok(Ok(0) | Err(_)) => {
                    return if self.buf.is_empty() {
                        Got::Closed
                    } else {
                        Got::Header(std::mem::take(&mut self.buf))
                    };
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame that is not a heartbeat; panics on the end or silence.
    async fn frame(&mut self, what: &str) -> Frame {
        loop {
            match self.next(STEP).await {
                Got::Frame(f) if f.kind == FRAME_HEARTBEAT => {}
                Got::Frame(f) => return f,
                other => panic!("waiting for {what}: got {other:?}"),
            }
        }
    }

    /// The next frame must be method `class.method` on `channel`.
    async fn expect(&mut self, channel: u16, class: u16, method: u16, what: &str) -> Frame {
        let f = self.frame(what).await;
        assert!(
            f.is(channel, class, method),
            "expected {what} ({class}.{method} on channel {channel}), got {}",
            f.describe()
        );
        f
    }

    /// The server closes the connection with `code` (read from the wire), answered with
    /// `close-ok`, and then closes the socket. Returns the reply text.
    async fn expect_connection_close(&mut self, code: u16, what: &str) -> String {
        let f = loop {
            match self.next(STEP).await {
                Got::Frame(f) if f.kind == FRAME_HEARTBEAT => {}
                Got::Frame(f) if f.is(0, 10, 50) => break f,
                // A reply to what came before the offending frame.
                Got::Frame(f) if f.channel != 0 || f.is(0, 10, 10) => {}
                other => panic!("{what}: expected connection.close {code}, got {other:?}"),
            }
        };
        let text = match f.method() {
            Some(AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                c.reply_text.as_str().to_owned()
            }
            other => panic!("{what}: connection.close does not parse: {other:?}"),
        };
        assert_eq!(
            f.close_code(),
            Some(code),
            "{what}: connection.close reply code (text: {text})"
        );
        let _ = self
            .send(&method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
            ))
            .await;
        self.expect_closed(what).await;
        text
    }

    /// The server closes channel `id` with `code`; answered with `close-ok`. Returns the text.
    async fn expect_channel_close(&mut self, id: u16, code: u16, what: &str) -> String {
        let f = loop {
            let f = self.frame(what).await;
            if f.is(id, 20, 40) {
                break f;
            }
            assert!(
                f.channel != id || f.kind != FRAME_METHOD,
                "{what}: expected channel.close {code} on channel {id}, got {}",
                f.describe()
            );
        };
        let text = match f.method() {
            Some(AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                c.reply_text.as_str().to_owned()
            }
            other => panic!("{what}: channel.close does not parse: {other:?}"),
        };
        assert_eq!(
            f.close_code(),
            Some(code),
            "{what}: channel.close reply code (text: {text})"
        );
        self.must_send(&method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
        ))
        .await;
        text
    }

    /// The server hangs up within [`STEP`] (frames before that are skipped).
    async fn expect_closed(&mut self, what: &str) {
        let deadline = Instant::now() + STEP;
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Got::Closed => return,
                Got::Silent => {
                    panic!("{what}: the server did not close the socket within {STEP:?}")
                }
                Got::Frame(_) | Got::Header(_) => {}
            }
        }
    }

    /// Nothing but heartbeats arrives for [`QUIET`].
    async fn expect_quiet(&mut self, what: &str) {
        let deadline = Instant::now() + QUIET;
        loop {
            match self
                .next(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Got::Silent => return,
                Got::Frame(f) if f.kind == FRAME_HEARTBEAT => {}
                other => panic!("{what}: expected nothing, got {other:?}"),
            }
        }
    }

    /// Protocol header, `start` → `start-ok` → the server's `tune`.
    async fn login(addr: SocketAddr, solution: &Solution) -> (Raw, connection::Tune) {
        let mut raw = Raw::connect(addr).await;
        raw.must_send(PROTOCOL_HEADER).await;
        raw.expect(0, 10, 10, "connection.start").await;
        raw.must_send(&start_ok(
            &solution.id,
            &solution.secret,
            FieldTable::default(),
        ))
        .await;
        let tune = raw.expect(0, 10, 30, "connection.tune").await;
        let Some(AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) = tune.method() else {
            panic!("connection.tune does not parse");
        };
        (raw, tune)
    }

    /// A whole handshake with these `tune-ok` values; the connection is open.
    async fn open_tuned(
        addr: SocketAddr,
        solution: &Solution,
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    ) -> Raw {
        let (mut raw, _) = Raw::login(addr, solution).await;
        let mut out = tune_ok(channel_max, frame_max, heartbeat);
        out.extend(connection_open());
        raw.must_send(&out).await;
        raw.expect(0, 10, 41, "connection.open-ok").await;
        raw
    }

    /// A whole handshake with the server's limits and no heartbeat.
    async fn open(addr: SocketAddr, solution: &Solution) -> Raw {
        Raw::open_tuned(addr, solution, 0, FRAME_MAX, 0).await
    }

    async fn open_channel(&mut self, id: u16) {
        self.must_send(&channel_open(id)).await;
        self.expect(id, 20, 11, "channel.open-ok").await;
    }

    /// A server-named exclusive queue on channel `id`: its name.
    async fn declare_queue(&mut self, id: u16) -> String {
        self.must_send(&exclusive_queue(id)).await;
        declared_name(&self.expect(id, 50, 11, "queue.declare-ok").await)
    }

    async fn bind(&mut self, id: u16, queue: &str, key: &str) {
        self.must_send(&queue_bind(id, queue, key)).await;
        self.expect(id, 50, 21, "queue.bind-ok").await;
    }

    async fn consume(&mut self, id: u16, queue: &str, tag: &str, no_ack: bool) {
        self.must_send(&basic_consume(id, queue, tag, no_ack)).await;
        self.expect(id, 60, 21, "basic.consume-ok").await;
    }

    async fn confirm_select(&mut self, id: u16) {
        self.must_send(&confirm_select(id)).await;
        self.expect(id, 85, 11, "confirm.select-ok").await;
    }

    /// A message of the next delivery (`basic.deliver` or `get-ok`): its delivery tag and body.
    async fn delivery(&mut self, what: &str) -> (u64, Vec<u8>) {
        let m = self.frame(what).await;
        let tag = match m.method() {
            Some(AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) => d.delivery_tag,
            Some(AMQPClass::Basic(basic::AMQPMethod::GetOk(g))) => g.delivery_tag,
            _ => panic!("{what}: expected a delivery, got {}", m.describe()),
        };
        let h = self.frame(what).await;
        assert_eq!(h.kind, FRAME_HEADER, "{what}: a content header follows");
        let size = u64::from_be_bytes(h.payload[4..12].try_into().unwrap()) as usize;
        let mut body = Vec::with_capacity(size);
        while body.len() < size {
            let b = self.frame(what).await;
            assert_eq!(b.kind, FRAME_BODY, "{what}: body frames follow");
            body.extend_from_slice(&b.payload);
        }
        (tag, body)
    }
}

fn declared_name(f: &Frame) -> String {
    match f.method() {
        Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => ok.queue.as_str().to_owned(),
        _ => panic!("not a queue.declare-ok: {}", f.describe()),
    }
}

fn declared_count(f: &Frame) -> u32 {
    match f.method() {
        Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => ok.message_count,
        _ => panic!("not a queue.declare-ok: {}", f.describe()),
    }
}

/// The confirm (`basic.ack` true, `basic.nack` false) of publish `tag` on `channel`.
async fn confirm_of(raw: &mut Raw, channel: u16, tag: u64) -> bool {
    let f = raw.frame("a publisher confirm").await;
    match f.method() {
        Some(AMQPClass::Basic(basic::AMQPMethod::Ack(a))) if f.channel == channel => {
            assert_eq!(a.delivery_tag, tag, "confirms in order");
            true
        }
        Some(AMQPClass::Basic(basic::AMQPMethod::Nack(n))) if f.channel == channel => {
            assert_eq!(n.delivery_tag, tag, "confirms in order");
            false
        }
        _ => panic!(
            "expected the confirm of publish {tag}, got {}",
            f.describe()
        ),
    }
}

// --- brokers ------------------------------------------------------------------------------------

const NS: &str = "org.acme";

/// A broker with an AMQP listener, one solution whose secret clients may use every plain topic,
/// and `env` for the server.
fn started(env: &[(&str, &str)]) -> (Broker, Solution, SocketAddr) {
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    broker.grant_topics(&solution.id, &[&format!("iot-things:{}", solution.id)]);
    for (name, value) in env {
        broker.env(name, value);
    }
    let addr = start_with_amqp(&mut broker);
    (broker, solution, addr)
}

// --- 500 malformed connections -----------------------------------------------------------------

/// The kinds of malformed connection, in the order the mix cycles through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Abuse {
    WrongProtocolHeader,
    HttpRequest,
    GarbageAfterHeader,
    OversizedFrameInHandshake,
    GarbledStartOk,
    BadFrameEnd,
    UnknownFrameType,
    OversizedFrameAfterOpen,
    GarbledMethodArguments,
    ContentHeaderWithoutPublish,
    BodyWithoutPublish,
    MethodOnUnopenedChannel,
    HeartbeatOnAChannel,
    TruncatedInHandshake,
    TruncatedAfterOpen,
    SlowLoris,
    Silent,
}

const ABUSES: [Abuse; 17] = [
    Abuse::WrongProtocolHeader,
    Abuse::HttpRequest,
    Abuse::GarbageAfterHeader,
    Abuse::OversizedFrameInHandshake,
    Abuse::GarbledStartOk,
    Abuse::BadFrameEnd,
    Abuse::UnknownFrameType,
    Abuse::OversizedFrameAfterOpen,
    Abuse::GarbledMethodArguments,
    Abuse::ContentHeaderWithoutPublish,
    Abuse::BodyWithoutPublish,
    Abuse::MethodOnUnopenedChannel,
    Abuse::HeartbeatOnAChannel,
    Abuse::TruncatedInHandshake,
    Abuse::TruncatedAfterOpen,
    Abuse::SlowLoris,
    Abuse::Silent,
];

/// One malformed connection of kind `abuse` (variant `n`), checking what the server answers.
async fn abuse(kind: Abuse, n: usize, addr: SocketAddr, solution: &Solution) {
    match kind {
        Abuse::WrongProtocolHeader => {
            // AMQP 0-8, AMQP 1.0, a header cut short of the version: each answered with ours.
            let headers: [&[u8]; 3] = [
                b"AMQP\x01\x01\x08\x00",
                b"AMQP\x00\x01\x00\x00",
                b"AMQX\x00\x00\x09\x01",
            ];
            let mut raw = Raw::connect(addr).await;
            raw.must_send(headers[n % 3]).await;
            match raw.next(STEP).await {
                Got::Header(h) => assert_eq!(h, PROTOCOL_HEADER, "the server's own header"),
                other => panic!("expected `AMQP 0 0 9 1`, got {other:?}"),
            }
            raw.expect_closed("after a wrong protocol header").await;
        }
        Abuse::HttpRequest => {
            let mut raw = Raw::connect(addr).await;
            let _ = raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            match raw.next(STEP).await {
                Got::Header(h) => assert_eq!(h, PROTOCOL_HEADER, "the server's own header"),
                other => panic!("expected `AMQP 0 0 9 1`, got {other:?}"),
            }
            raw.expect_closed("after an HTTP request").await;
        }
        Abuse::GarbageAfterHeader => {
            let mut raw = Raw::connect(addr).await;
            let mut out = PROTOCOL_HEADER.to_vec();
            // A first octet that is no frame type, then noise.
            out.push(0x47 + (n % 7) as u8);
            out.extend((0..64u8).map(|i| i.wrapping_mul(37).wrapping_add(n as u8)));
            raw.must_send(&out).await;
            raw.expect_connection_close(501, "garbage after the protocol header")
                .await;
        }
        Abuse::OversizedFrameInHandshake => {
            let mut raw = Raw::connect(addr).await;
            let mut out = PROTOCOL_HEADER.to_vec();
            // Only the header of a start-ok announcing 1 MiB (or just over 16 KiB): refused
            // from the header, before the payload arrives.
            let size = if n.is_multiple_of(2) {
                1 << 20
            } else {
                HANDSHAKE_FRAME_MAX - 7
            };
            out.extend(frame_head(FRAME_METHOD, 0, size));
            raw.must_send(&out).await;
            raw.expect_connection_close(501, "a handshake frame over 16 KiB")
                .await;
        }
        Abuse::GarbledStartOk => {
            let mut raw = Raw::connect(addr).await;
            let mut out = PROTOCOL_HEADER.to_vec();
            // connection.start-ok whose field table claims more bytes than the frame has.
            out.extend(raw_frame(
                FRAME_METHOD,
                0,
                &[0, 10, 0, 11, 0xFF, 0xFF, 0xFF, 0x00, 1, 2, 3],
                FRAME_END,
            ));
            raw.must_send(&out).await;
            raw.expect_connection_close(502, "a garbled start-ok").await;
        }
        Abuse::BadFrameEnd => {
            let mut raw = Raw::open(addr, solution).await;
            let mut frame = channel_open(1);
            *frame.last_mut().unwrap() = (n % 200) as u8;
            raw.must_send(&frame).await;
            raw.expect_connection_close(501, "a frame ending without 0xCE")
                .await;
        }
        Abuse::UnknownFrameType => {
            let mut raw = Raw::open(addr, solution).await;
            let kinds = [0u8, 4, 5, 9, 0x41, 0xFF];
            raw.must_send(&raw_frame(kinds[n % kinds.len()], 0, &[1, 2, 3], FRAME_END))
                .await;
            raw.expect_connection_close(501, "an unknown frame type")
                .await;
        }
        Abuse::OversizedFrameAfterOpen => {
            let mut raw = Raw::open(addr, solution).await;
            raw.open_channel(1).await;
            let mut out = basic_publish_method(1, "sensors.big");
            out.extend(content_header(1, 500_000));
            // A body frame announcing more than frame_max: only its header is sent.
            out.extend(frame_head(FRAME_BODY, 1, FRAME_MAX + (n as u32 % 3) * 1000));
            raw.must_send(&out).await;
            raw.expect_connection_close(501, "a frame over frame_max")
                .await;
        }
        Abuse::GarbledMethodArguments => {
            let mut raw = Raw::open(addr, solution).await;
            raw.open_channel(1).await;
            // queue.declare (50.10), basic.publish (60.40), queue.bind (50.20) with arguments
            // that end in the middle of a field.
            let methods: [[u8; 4]; 3] = [[0, 50, 0, 10], [0, 60, 0, 40], [0, 50, 0, 20]];
            let mut payload = methods[n % 3].to_vec();
            payload.extend_from_slice(&[0, 0, 200, b'x', b'y']);
            raw.must_send(&raw_frame(FRAME_METHOD, 1, &payload, FRAME_END))
                .await;
            raw.expect_connection_close(502, "a method with garbage arguments")
                .await;
        }
        Abuse::ContentHeaderWithoutPublish => {
            let mut raw = Raw::open(addr, solution).await;
            raw.open_channel(1).await;
            raw.must_send(&content_header(1, 10)).await;
            raw.expect_connection_close(505, "a content header without basic.publish")
                .await;
        }
        Abuse::BodyWithoutPublish => {
            let mut raw = Raw::open(addr, solution).await;
            raw.open_channel(1).await;
            raw.must_send(&raw_frame(FRAME_BODY, 1, b"orphan", FRAME_END))
                .await;
            raw.expect_connection_close(505, "a body frame without basic.publish")
                .await;
        }
        Abuse::MethodOnUnopenedChannel => {
            let mut raw = Raw::open(addr, solution).await;
            let id = 1 + (n % 100) as u16;
            raw.must_send(&exclusive_queue(id)).await;
            raw.expect_connection_close(504, "a method on a channel never opened")
                .await;
        }
        Abuse::HeartbeatOnAChannel => {
            let mut raw = Raw::open(addr, solution).await;
            raw.must_send(&raw_frame(FRAME_HEARTBEAT, 3, &[], FRAME_END))
                .await;
            raw.expect_connection_close(501, "a heartbeat on channel 3")
                .await;
        }
        Abuse::TruncatedInHandshake => {
            let mut raw = Raw::connect(addr).await;
            let mut out = PROTOCOL_HEADER.to_vec();
            let whole = start_ok(&solution.id, &solution.secret, FieldTable::default());
            out.extend_from_slice(&whole[..(n % (whole.len() - 1)).max(1)]);
            let _ = raw.send(&out).await;
            // Hang up mid-frame.
        }
        Abuse::TruncatedAfterOpen => {
            let mut raw = Raw::open(addr, solution).await;
            raw.open_channel(1).await;
            let whole = publish(1, "sensors.cut", &[7u8; 300], FRAME_MAX);
            let _ = raw.send(&whole[..(n % (whole.len() - 1)).max(1)]).await;
        }
        Abuse::SlowLoris => slow_loris(addr, solution, n).await,
        Abuse::Silent => {
            let mut raw = Raw::connect(addr).await;
            let started = Instant::now();
            raw.expect_closed("a socket that never speaks").await;
            assert!(
                started.elapsed() >= Duration::from_millis(CONNECT_TIMEOUT_SECONDS * 1000 / 2),
                "closed after {:?}, before the connect timeout",
                started.elapsed()
            );
        }
    }
}

/// The protocol header, then a start-ok one byte at a time, never finished: closed once the
/// connect timeout passes (not earlier, and well before [`STEP`]).
async fn slow_loris(addr: SocketAddr, solution: &Solution, n: usize) {
    let mut raw = Raw::connect(addr).await;
    let started = Instant::now();
    raw.must_send(PROTOCOL_HEADER).await;
    let whole = start_ok(&solution.id, &solution.secret, FieldTable::default());
    let mut sent = 0;
    loop {
        match raw
            .next(Duration::from_millis(200 + (n % 5) as u64 * 50))
            .await
        {
            Got::Closed => break,
            Got::Silent | Got::Frame(_) => {}
            Got::Header(h) => panic!("slow loris: unexpected bytes {h:?}"),
        }
        if started.elapsed() > STEP {
            panic!("slow loris: still open after {STEP:?}");
        }
        if sent + 1 < whole.len() && raw.send(&whole[sent..=sent]).await.is_ok() {
            sent += 1;
        }
    }
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(CONNECT_TIMEOUT_SECONDS * 1000 / 2),
        "slow loris closed after {lived:?}, before the connect timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_malformed_connections_leave_the_broker_serving_and_a_twin_intact() {
    let timeout = CONNECT_TIMEOUT_SECONDS.to_string();
    let (mut broker, solution, addr) =
        started(&[("THINGSGATE_MQTT_CONNECT_TIMEOUT_SECONDS", timeout.as_str())]);

    // A twin written before the abuse.
    let uri = secret_uri(addr, &solution);
    let connection = connect(&uri).await;
    let channel = confirm_channel(&connection).await;
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            "org/acme.lamp.things.twin.commands.create".into(),
            BasicPublishOptions::default(),
            br#"{"attributes":{"on":true,"room":"hall"}}"#,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish the create")
        .await
        .expect("its confirm");
    assert!(confirm.is_ack(), "the thing is created: {confirm:?}");
    connection.close(200, "bye".into()).await.expect("close");

    // The abuse: 500 connections, at most 40 at a time.
    let permits = Arc::new(tokio::sync::Semaphore::new(40));
    let solution = Arc::new(solution);
    let mut tasks = Vec::new();
    for i in 0..500usize {
        let kind = ABUSES[i % ABUSES.len()];
        let permits = permits.clone();
        let solution = solution.clone();
        tasks.push((
            kind,
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await.unwrap();
                tokio::time::timeout(Duration::from_secs(30), abuse(kind, i, addr, &solution))
                    .await
                    .unwrap_or_else(|_| panic!("{kind:?} #{i} did not finish within 30 s"));
            }),
        ));
    }
    let started = Instant::now();
    let mut failures: std::collections::BTreeMap<Abuse, (usize, String)> = Default::default();
    for (kind, task) in tasks {
        if let Err(e) = task.await {
            let message = match e.try_into_panic() {
                Ok(payload) => payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            let entry = failures.entry(kind).or_insert((0, message));
            entry.0 += 1;
        }
    }
    let elapsed = started.elapsed();
    assert!(
        broker.is_running(),
        "the broker died during the abuse\n{}",
        broker.logs()
    );
    assert!(
        failures.is_empty(),
        "malformed connections not answered as the protocol says (kind: count, first failure):\n{}",
        failures
            .iter()
            .map(|(k, (n, m))| format!("{k:?}: {n}× — {m}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("500 malformed connections in {elapsed:?}");

    // A normal client still works: publish with a confirm, consume it.
    let connection = connect(&uri).await;
    let channel = confirm_channel(&connection).await;
    let (_, mut consumer) = consume(&channel, &["sensors.#"], false).await;
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            "sensors.after.abuse".into(),
            BasicPublishOptions::default(),
            b"still here",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{confirm:?}");
    let delivery = next_within(&mut consumer, STEP).await.expect("the message");
    assert_eq!(delivery.data, b"still here");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");

    // The twin is intact: retrieved with a reply-to queue.
    let (reply_queue, mut replies) = consume(&channel, &[], true).await;
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            "org/acme.lamp.things.twin.commands.retrieve".into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default()
                .with_reply_to(reply_queue.as_str().into())
                .with_correlation_id("after-abuse".into()),
        )
        .await
        .expect("publish the retrieve")
        .await
        .expect("its confirm");
    assert!(confirm.is_ack(), "{confirm:?}");
    let answer = next_within(&mut replies, STEP)
        .await
        .expect("the retrieve's answer in the reply-to queue");
    let answer: Value = serde_json::from_slice(&answer.data).expect("a JSON answer");
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["value"]["attributes"]["on"], true, "{answer}");
    assert_eq!(answer["value"]["attributes"]["room"], "hall", "{answer}");
    connection.close(200, "bye".into()).await.expect("close");
    assert!(broker.is_running(), "the broker is still running");
}

// --- the limits of `broker::limits::amqp` -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tune_offers_the_documented_channel_max_frame_max_and_heartbeat() {
    let (_broker, solution, addr) = started(&[]);
    let (_raw, tune) = Raw::login(addr, &solution).await;
    assert_eq!(tune.channel_max, CHANNEL_MAX);
    assert_eq!(tune.frame_max, FRAME_MAX);
    assert_eq!(tune.heartbeat, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_up_to_channel_max_open_and_one_above_closes_the_connection_with_504() {
    let (_broker, solution, addr) = started(&[]);
    // The server's channel_max (tune-ok 0: no limit of the client's).
    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    raw.open_channel(CHANNEL_MAX).await;
    raw.must_send(&channel_open(CHANNEL_MAX + 1)).await;
    raw.expect_connection_close(504, "channel.open above channel_max")
        .await;
    // A client asking for fewer channels gets those.
    let mut raw = Raw::open_tuned(addr, &solution, 10, FRAME_MAX, 0).await;
    raw.open_channel(10).await;
    raw.must_send(&channel_open(11)).await;
    raw.expect_connection_close(504, "channel.open above the client's channel_max")
        .await;
    // The highest channel number there is.
    let mut raw = Raw::open(addr, &solution).await;
    raw.must_send(&channel_open(u16::MAX)).await;
    raw.expect_connection_close(504, "channel.open 65535").await;
}

/// A publish whose body is one frame of exactly `total` bytes (payload `total - 8`).
fn publish_with_body_frame(id: u16, key: &str, total: u32) -> Vec<u8> {
    let body = vec![b'x'; (total - 8) as usize];
    let mut out = basic_publish_method(id, key);
    out.extend(content_header(id, body.len() as u64));
    out.extend(raw_frame(FRAME_BODY, id, &body, FRAME_END));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_of_frame_max_is_read_and_one_byte_more_closes_the_connection_with_501() {
    let (_broker, solution, addr) = started(&[]);
    for frame_max in [FRAME_MAX, 4096] {
        let mut raw = Raw::open_tuned(addr, &solution, 0, frame_max, 0).await;
        raw.open_channel(1).await;
        raw.confirm_select(1).await;
        raw.must_send(&publish_with_body_frame(1, "sensors.frame", frame_max))
            .await;
        assert!(
            confirm_of(&mut raw, 1, 1).await,
            "a frame of exactly frame_max {frame_max} is published"
        );
        // One byte more: refused from the frame's header alone.
        let mut out = basic_publish_method(1, "sensors.frame");
        out.extend(content_header(1, u64::from(frame_max)));
        out.extend(frame_head(FRAME_BODY, 1, frame_max - 7));
        raw.must_send(&out).await;
        let text = raw
            .expect_connection_close(501, "a frame one byte over frame_max")
            .await;
        assert!(text.starts_with("FRAME_ERROR"), "{text}");
    }
    // A client asking for more than the server offers gets the server's frame_max.
    let mut raw = Raw::open_tuned(addr, &solution, 0, 1 << 20, 0).await;
    raw.open_channel(1).await;
    raw.must_send(&frame_head(FRAME_BODY, 1, FRAME_MAX)).await;
    raw.expect_connection_close(501, "a frame over the server's frame_max")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_reads_frames_up_to_16_kib_and_refuses_bigger_ones_with_501() {
    let (_broker, solution, addr) = started(&[]);
    // A start-ok padded (with a client property) to exactly 16 KiB.
    let padded = |pad: usize| {
        let mut properties = FieldTable::default();
        properties.insert(
            ShortString::from("padding"),
            AMQPValue::LongString(LongString::from(vec![b'p'; pad])),
        );
        start_ok(&solution.id, &solution.secret, properties)
    };
    let base = padded(0).len();
    let exact = padded(HANDSHAKE_FRAME_MAX as usize - base);
    assert_eq!(exact.len(), HANDSHAKE_FRAME_MAX as usize);
    let mut raw = Raw::connect(addr).await;
    raw.must_send(PROTOCOL_HEADER).await;
    raw.expect(0, 10, 10, "connection.start").await;
    raw.must_send(&exact).await;
    raw.expect(0, 10, 30, "connection.tune after a 16 KiB start-ok")
        .await;
    // One byte more.
    let over = padded(HANDSHAKE_FRAME_MAX as usize - base + 1);
    let mut raw = Raw::connect(addr).await;
    raw.must_send(PROTOCOL_HEADER).await;
    raw.expect(0, 10, 10, "connection.start").await;
    raw.must_send(&over).await;
    raw.expect_connection_close(501, "a start-ok of 16 KiB + 1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_come_at_half_the_interval_and_a_silent_client_is_dropped_after_two() {
    let (_broker, solution, addr) = started(&[]);
    // A client that sends heartbeats stays.
    let mut alive = Raw::open_tuned(addr, &solution, 0, FRAME_MAX, 1).await;
    // A client that sends nothing after the handshake goes.
    let mut silent = Raw::open_tuned(addr, &solution, 0, FRAME_MAX, 1).await;
    let opened = Instant::now();
    let mut beats = 0;
    while opened.elapsed() < Duration::from_secs(4) {
        alive.must_send(&heartbeat()).await;
        match alive.next(Duration::from_millis(300)).await {
            Got::Frame(f) if f.kind == FRAME_HEARTBEAT => beats += 1,
            Got::Silent => {}
            other => panic!("a client sending heartbeats got {other:?}"),
        }
    }
    assert!(
        beats >= 2,
        "the server sent {beats} heartbeats in 4 s at an interval of 1 s"
    );
    alive.open_channel(1).await;
    // The silent one was dropped (no close: nothing more to say), after two intervals.
    let mut heard = 0;
    let gone = loop {
        match silent.next(STEP).await {
            Got::Frame(f) if f.kind == FRAME_HEARTBEAT => heard += 1,
            Got::Closed => break opened.elapsed(),
            other => panic!("the silent client got {other:?}"),
        }
    };
    assert!(heard >= 1, "the silent client was sent heartbeats too");
    assert!(
        gone >= Duration::from_millis(1500),
        "dropped after {gone:?}, before two heartbeat intervals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_65th_queue_of_a_connection_closes_the_channel_with_406_and_the_connection_stays() {
    let (_broker, solution, addr) = started(&[]);
    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    let mut names = Vec::new();
    for _ in 0..MAX_QUEUES {
        names.push(raw.declare_queue(1).await);
    }
    raw.must_send(&exclusive_queue(1)).await;
    let text = raw
        .expect_channel_close(1, 406, "the 65th queue.declare")
        .await;
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    // The connection stays, its queues too; deleting one makes room.
    raw.open_channel(2).await;
    raw.must_send(&queue_declare(
        2,
        queue::Declare {
            queue: names[0].as_str().into(),
            passive: true,
            ..queue::Declare::default()
        },
    ))
    .await;
    raw.expect(2, 50, 11, "a passive declare of a queue of the connection")
        .await;
    raw.must_send(&method(
        2,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: names[0].as_str().into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })),
    ))
    .await;
    raw.expect(2, 50, 41, "queue.delete-ok").await;
    raw.declare_queue(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_65th_binding_of_a_queue_closes_the_channel_with_406() {
    let (_broker, solution, addr) = started(&[]);
    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    let name = raw.declare_queue(1).await;
    for i in 0..MAX_BINDINGS {
        raw.bind(1, &name, &format!("sensors.k{i}")).await;
    }
    raw.must_send(&queue_bind(1, &name, "sensors.one-more"))
        .await;
    let text = raw
        .expect_channel_close(1, 406, "the 65th queue.bind")
        .await;
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    // The 64 bindings still deliver.
    raw.open_channel(2).await;
    raw.consume(2, &name, "c", true).await;
    raw.must_send(&publish(2, "sensors.k63", b"bound", FRAME_MAX))
        .await;
    let (_, body) = raw.delivery("a message on the 64th binding").await;
    assert_eq!(body, b"bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_a_queue_again_with_a_key_it_has_is_no_new_binding_at_the_limit() {
    let (_broker, solution, addr) = started(&[]);
    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    let name = raw.declare_queue(1).await;
    for i in 0..MAX_BINDINGS {
        raw.bind(1, &name, &format!("sensors.k{i}")).await;
    }
    // queue.bind is idempotent (RabbitMQ answers bind-ok for a binding that exists): the
    // same key again adds no binding, so the limit does not refuse it.
    raw.must_send(&queue_bind(1, &name, "sensors.k0")).await;
    let f = raw.frame("queue.bind-ok for a binding the queue has").await;
    assert!(
        f.is(1, 50, 21),
        "binding key `sensors.k0` again on a queue with {MAX_BINDINGS} bindings: expected \
         queue.bind-ok, got {}",
        f.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_65th_consumer_of_a_channel_closes_the_channel_with_406() {
    let (_broker, solution, addr) = started(&[]);
    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    let name = raw.declare_queue(1).await;
    for i in 0..MAX_CONSUMERS {
        raw.consume(1, &name, &format!("c{i}"), false).await;
    }
    raw.must_send(&basic_consume(1, &name, "one-more", false))
        .await;
    let text = raw
        .expect_channel_close(1, 406, "the 65th basic.consume")
        .await;
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    // Another channel has its own 64.
    raw.open_channel(2).await;
    raw.consume(2, &name, "again", false).await;
}

/// Reads deliveries (their tags into `tags`) until there are `want`, then checks that no more
/// come for [`QUIET`].
async fn collect_deliveries(raw: &mut Raw, tags: &mut Vec<u64>, want: usize) {
    let deadline = Instant::now() + STEP;
    loop {
        let within = if tags.len() >= want {
            QUIET
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match raw.next(within).await {
            Got::Silent if tags.len() >= want => return,
            Got::Frame(f) if f.ids() == Some((60, 60)) => {
                let Some(AMQPClass::Basic(basic::AMQPMethod::Deliver(d))) = f.method() else {
                    panic!("basic.deliver does not parse");
                };
                tags.push(d.delivery_tag);
                assert!(
                    tags.len() <= want,
                    "delivery {} arrived: more than the {want} the window allows",
                    tags.len()
                );
            }
            Got::Frame(f) if matches!(f.kind, FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT) => {}
            other => panic!(
                "expected deliveries ({} of {want} so far), got {other:?}",
                tags.len()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_holds_at_most_2048_unacknowledged_deliveries() {
    let (_broker, solution, addr) = started(&[]);
    let mut consumer = Raw::open(addr, &solution).await;
    consumer.open_channel(1).await;
    // basic.qos asking for more than the limit changes nothing.
    consumer
        .must_send(&method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 5000,
                global: true,
            })),
        ))
        .await;
    consumer.expect(1, 60, 11, "basic.qos-ok").await;
    // Three queues of 800 messages each: 2400 deliveries for one channel.
    for i in 0..3 {
        let name = consumer.declare_queue(1).await;
        consumer.bind(1, &name, "sensors.unacked").await;
        consumer.consume(1, &name, &format!("c{i}"), false).await;
    }
    let mut publisher = Raw::open(addr, &solution).await;
    publisher.open_channel(1).await;
    publisher.confirm_select(1).await;
    let mut out = Vec::new();
    for i in 0..800u32 {
        out.extend(publish(1, "sensors.unacked", &i.to_be_bytes(), FRAME_MAX));
    }
    publisher.must_send(&out).await;
    for tag in 1..=800 {
        assert!(
            confirm_of(&mut publisher, 1, tag).await,
            "publish {tag} confirmed"
        );
    }
    let mut tags = Vec::new();
    collect_deliveries(&mut consumer, &mut tags, MAX_UNACKED).await;
    assert_eq!(
        tags.len(),
        MAX_UNACKED,
        "deliveries before any acknowledgement"
    );
    // Acknowledging 100 makes room for 100.
    consumer.must_send(&basic_ack(1, tags[99], true)).await;
    collect_deliveries(&mut consumer, &mut tags, MAX_UNACKED + 100).await;
    // Acknowledging everything lets the rest come.
    consumer.must_send(&basic_ack(1, 0, true)).await;
    collect_deliveries(&mut consumer, &mut tags, 2400).await;
    assert_eq!(tags.len(), 2400, "every message, in the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_packet_size_closes_the_channel_with_406_and_nothing_is_published() {
    let (_broker, solution, addr) = started(&[]);
    let mut watcher = Raw::open(addr, &solution).await;
    watcher.open_channel(1).await;
    let name = watcher.declare_queue(1).await;
    watcher.bind(1, &name, "sensors.big").await;
    watcher.consume(1, &name, "w", true).await;

    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    raw.confirm_select(1).await;
    // The whole oversized message at once, as a pipelining client sends it.
    raw.must_send(&publish(
        1,
        "sensors.big",
        &vec![b'o'; MAX_BODY + 1],
        FRAME_MAX,
    ))
    .await;
    let text = raw
        .expect_channel_close(1, 406, "a body of max_packet_size + 1")
        .await;
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    watcher.expect_quiet("the oversized message").await;
    // The connection stays; a body of exactly max_packet_size goes through.
    raw.open_channel(1).await;
    raw.confirm_select(1).await;
    raw.must_send(&publish(1, "sensors.big", &vec![b'k'; MAX_BODY], FRAME_MAX))
        .await;
    assert!(
        confirm_of(&mut raw, 1, 1).await,
        "a body of max_packet_size is accepted"
    );
    let (_, body) = watcher.delivery("the message of max_packet_size").await;
    assert_eq!(body.len(), MAX_BODY);
    assert!(
        body.iter().all(|&b| b == b'k'),
        "the oversized message never arrives"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_the_newest_messages() {
    let (_broker, solution, addr) = started(&[("THINGSGATE_MQTT_MAX_QUEUED_MESSAGES", "50")]);
    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    raw.confirm_select(1).await;
    let name = raw.declare_queue(1).await;
    raw.bind(1, &name, "sensors.full").await;
    let mut out = Vec::new();
    for i in 0..60u32 {
        out.extend(publish(
            1,
            "sensors.full",
            i.to_string().as_bytes(),
            FRAME_MAX,
        ));
    }
    raw.must_send(&out).await;
    for tag in 1..=60 {
        assert!(
            confirm_of(&mut raw, 1, tag).await,
            "a publish into a full queue is still accepted (the queue drops, not the publisher)"
        );
    }
    raw.must_send(&queue_declare(
        1,
        queue::Declare {
            queue: name.as_str().into(),
            passive: true,
            ..queue::Declare::default()
        },
    ))
    .await;
    let count = declared_count(&raw.expect(1, 50, 11, "a passive queue.declare").await);
    assert_eq!(count, 50, "max_queued_messages messages are kept");
    for i in 0..50u32 {
        raw.must_send(&method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: name.as_str().into(),
                no_ack: true,
            })),
        ))
        .await;
        let (_, body) = raw.delivery("basic.get-ok").await;
        assert_eq!(
            body,
            i.to_string().as_bytes(),
            "the oldest are kept, in order"
        );
    }
    raw.must_send(&method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: name.as_str().into(),
            no_ack: true,
        })),
    ))
    .await;
    raw.expect(1, 60, 72, "basic.get-empty: the newest 10 were dropped")
        .await;
}

// --- the `[mqtt]` limits the AMQP listener shares -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_not_finished_within_the_connect_timeout_is_closed() {
    let (_broker, solution, addr) = started(&[("THINGSGATE_MQTT_CONNECT_TIMEOUT_SECONDS", "2")]);
    let started = Instant::now();
    slow_loris(addr, &solution, 0).await;
    let lived = started.elapsed();
    assert!(
        lived < Duration::from_secs(2 + 4),
        "the slow handshake lived {lived:?} with a connect timeout of 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_one_more_amqp_connection_with_530() {
    let (_broker, solution, addr) = started(&[("THINGSGATE_MQTT_MAX_CONNECTIONS", "3")]);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Raw::open(addr, &solution).await);
    }
    let mut refused = Raw::connect(addr).await;
    refused.must_send(PROTOCOL_HEADER).await;
    refused.expect(0, 10, 10, "connection.start").await;
    refused
        .must_send(&start_ok(
            &solution.id,
            &solution.secret,
            FieldTable::default(),
        ))
        .await;
    refused
        .expect_connection_close(530, "a fourth connection over max_connections 3")
        .await;
    // One leaves (closing properly): one more may come.
    let mut first = open.remove(0);
    first
        .must_send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        ))
        .await;
    first.expect(0, 10, 51, "connection.close-ok").await;
    first.expect_closed("after close-ok").await;
    let deadline = Instant::now() + STEP;
    loop {
        let mut raw = Raw::connect(addr).await;
        raw.must_send(PROTOCOL_HEADER).await;
        raw.expect(0, 10, 10, "connection.start").await;
        raw.must_send(&start_ok(
            &solution.id,
            &solution.secret,
            FieldTable::default(),
        ))
        .await;
        let f = raw.frame("tune or close").await;
        if f.is(0, 10, 30) {
            break;
        }
        assert_eq!(f.close_code(), Some(530), "{}", f.describe());
        assert!(
            Instant::now() < deadline,
            "the slot of a closed connection is not given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_max_handshakes_per_address_sockets_before_the_handshake_ends() {
    let (_broker, _solution, addr) =
        started(&[("THINGSGATE_MQTT_MAX_HANDSHAKES_PER_ADDRESS", "4")]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut raw = Raw::connect(addr).await;
        raw.must_send(PROTOCOL_HEADER).await;
        raw.expect(0, 10, 10, "connection.start").await;
        held.push(raw);
    }
    let mut fifth = Raw::connect(addr).await;
    let _ = fifth.send(PROTOCOL_HEADER).await;
    match fifth.next(STEP).await {
        Got::Closed => {}
        other => panic!(
            "a fifth handshake from one address: expected the socket closed at once, got {other:?}"
        ),
    }
    // The four still wait for their start-ok.
    for raw in &mut held {
        assert!(matches!(
            raw.next(Duration::from_millis(200)).await,
            Got::Silent
        ));
    }
    // One hangs up: its slot is free again.
    drop(held.pop());
    let deadline = Instant::now() + STEP;
    loop {
        let mut raw = Raw::connect(addr).await;
        let _ = raw.send(PROTOCOL_HEADER).await;
        match raw.next(STEP).await {
            Got::Frame(f) if f.is(0, 10, 10) => break,
            Got::Closed if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("after a slot was freed: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_count_toward_max_sessions() {
    let (_broker, solution, addr) = started(&[("THINGSGATE_MQTT_MAX_SESSIONS", "4")]);
    // The connection is one session, each queue another.
    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    for _ in 0..3 {
        raw.declare_queue(1).await;
    }
    raw.must_send(&exclusive_queue(1)).await;
    let text = raw
        .expect_channel_close(1, 406, "a queue beyond max_sessions")
        .await;
    assert!(text.starts_with("PRECONDITION_FAILED"), "{text}");
    // And another connection has no session left.
    let mut other = Raw::connect(addr).await;
    other.must_send(PROTOCOL_HEADER).await;
    other.expect(0, 10, 10, "connection.start").await;
    other
        .must_send(&start_ok(
            &solution.id,
            &solution.secret,
            FieldTable::default(),
        ))
        .await;
    other.expect(0, 10, 30, "connection.tune").await;
    let mut out = tune_ok(0, FRAME_MAX, 0);
    out.extend(connection_open());
    other.must_send(&out).await;
    other
        .expect_connection_close(530, "a connection beyond max_sessions")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_queue_outlives_its_connection_for_max_session_expiry_seconds() {
    let (_broker, solution, addr) = started(&[("THINGSGATE_MQTT_MAX_SESSION_EXPIRY_SECONDS", "3")]);
    let durable = queue::Declare {
        queue: "keep-1".into(),
        durable: true,
        ..queue::Declare::default()
    };
    let mut owner = Raw::open(addr, &solution).await;
    owner.open_channel(1).await;
    owner.must_send(&queue_declare(1, durable)).await;
    owner.expect(1, 50, 11, "queue.declare-ok").await;
    owner.bind(1, "keep-1", "sensors.kept").await;
    drop(owner);
    let left = Instant::now();

    let mut other = Raw::open(addr, &solution).await;
    other.open_channel(1).await;
    other.confirm_select(1).await;
    other
        .must_send(&publish_with(
            1,
            "sensors.kept",
            b"for later",
            FRAME_MAX,
            basic::AMQPProperties::default().with_delivery_mode(2),
        ))
        .await;
    assert!(confirm_of(&mut other, 1, 1).await);
    let passive = || {
        queue_declare(
            1,
            queue::Declare {
                queue: "keep-1".into(),
                passive: true,
                ..queue::Declare::default()
            },
        )
    };
    other.must_send(&passive()).await;
    let f = other.frame("a passive declare of the durable queue").await;
    assert!(
        f.is(1, 50, 11),
        "the durable queue outlives its connection: {} (after {:?})",
        f.describe(),
        left.elapsed()
    );
    assert_eq!(declared_count(&f), 1, "the message waits in it");
    // Then it expires: a passive declare answers 404.
    let deadline = Instant::now() + Duration::from_secs(3) + STEP;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        other.must_send(&passive()).await;
        let f = other.frame("a passive declare").await;
        if f.close_code() == Some(404) {
            assert!(
                left.elapsed() >= Duration::from_secs(2),
                "the queue expired after {:?}, before max_session_expiry_seconds 3",
                left.elapsed()
            );
            break;
        }
        assert!(f.is(1, 50, 11), "{}", f.describe());
        assert!(
            Instant::now() < deadline,
            "the durable queue still exists {:?} after its connection left (expiry 3 s)",
            left.elapsed()
        );
    }
}

/// lapin against the same limits: the connection stays usable after a channel error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_sees_a_channel_error_as_an_error_and_keeps_its_connection() {
    let (_broker, solution, addr) = started(&[]);
    let connection = connect(&secret_uri(addr, &solution)).await;
    let channel = connection.create_channel().await.expect("channel.open");
    let err = channel
        .basic_consume(
            "no-such-queue".into(),
            "".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect_err("consuming from a queue that does not exist");
    let said = err.to_string().to_uppercase();
    assert!(
        said.contains("NOT_FOUND") || said.contains("NOT-FOUND") || said.contains("404"),
        "{err}"
    );
    let channel = confirm_channel(&connection).await;
    let (_, mut consumer) = consume(&channel, &["sensors.#"], true).await;
    channel
        .basic_publish(
            "amq.topic".into(),
            "sensors.x".into(),
            BasicPublishOptions::default(),
            b"ok",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(next_within(&mut consumer, STEP).await.is_some());
}

/// Bodies may interleave across channels, but what is announced and unfinished is bounded per
/// connection (2 × max_packet_size): two channels each starting a message of max_packet_size
/// are fine, a third closes its channel with 406 before anything of it is buffered — and the
/// two others still complete and are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_messages_on_many_channels_are_bounded_per_connection() {
    let (_broker, solution, addr) = started(&[]);
    let mut watcher = Raw::open(addr, &solution).await;
    watcher.open_channel(1).await;
    let name = watcher.declare_queue(1).await;
    watcher.bind(1, &name, "sensors.interleaved").await;
    watcher.consume(1, &name, "w", true).await;

    let mut raw = Raw::open(addr, &solution).await;
    for id in 1..=3 {
        raw.open_channel(id).await;
        raw.confirm_select(id).await;
    }
    let size = MAX_BODY as u64;
    let mut out = Vec::new();
    for id in 1..=3 {
        out.extend(basic_publish_method(id, "sensors.interleaved"));
        out.extend(content_header(id, size));
    }
    raw.must_send(&out).await;
    let text = raw
        .expect_channel_close(3, 406, "a third unfinished message of max_packet_size")
        .await;
    assert!(text.contains("unfinished messages"), "{text}");
    // The first two complete, their bodies interleaved frame by frame.
    let chunk = (FRAME_MAX - 8) as usize;
    let body = vec![b'i'; MAX_BODY];
    let mut out = Vec::new();
    for part in body.chunks(chunk) {
        for id in 1..=2 {
            out.extend(raw_frame(3, id, part, 0xCE));
        }
    }
    raw.must_send(&out).await;
    for id in 1..=2 {
        assert!(
            confirm_of(&mut raw, id, 1).await,
            "the message on channel {id}"
        );
    }
    for _ in 0..2 {
        let (_, received) = watcher.delivery("an interleaved message").await;
        assert_eq!(received.len(), MAX_BODY);
    }
}

/// A queue of large messages reaches a consumer without a window (prefetch 0, no ack) whole
/// and in order, written in batches (the write buffer does not take the whole queue at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_large_messages_reaches_its_consumer_whole_and_in_order() {
    let (_broker, solution, addr) = started(&[]);
    let mut consumer = Raw::open(addr, &solution).await;
    consumer.open_channel(1).await;
    let name = consumer.declare_queue(1).await;
    consumer.bind(1, &name, "sensors.large").await;

    let mut raw = Raw::open(addr, &solution).await;
    raw.open_channel(1).await;
    raw.confirm_select(1).await;
    let size = 300 * 1024;
    for i in 0..24u8 {
        let mut body = vec![i; size];
        body[0] = i;
        raw.must_send(&publish(1, "sensors.large", &body, FRAME_MAX))
            .await;
        assert!(confirm_of(&mut raw, 1, u64::from(i) + 1).await);
    }
    consumer.consume(1, &name, "c", true).await;
    for i in 0..24u8 {
        let (_, body) = consumer.delivery("a large message").await;
        assert_eq!(body.len(), size);
        assert!(
            body.iter().all(|&b| b == i),
            "message {i} whole and in order"
        );
    }
}
