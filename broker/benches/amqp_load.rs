#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! AMQP 0.9.1 load, Thingsgate side by side with RabbitMQ in one run (DESIGN.md §10: ≥ 2× RabbitMQ's
//! messages per broker core-second with the same client and workload), and memory per idle
//! authenticated AMQP connection.
//!
//! `cargo bench -p broker --bench amqp_load` — starts the real `thingsgate serve` (release
//! build) with `--amqp 127.0.0.1:0`, a fresh data dir and solution `bench` (namespace
//! `org.acme`, default solution policy: READ and WRITE on `topic:/`), and uses the RabbitMQ
//! server already running on this machine (`amqp://guest:guest@127.0.0.1:5672/%2f`, or
//! `AMQP_LOAD_RABBITMQ_URI`); its broker CPU is that of its `beam.smp` process, found in
//! `/proc`. Both brokers get the same lapin client code and the same workload:
//!
//! - 100 publisher connections (`AMQP_LOAD_PUBLISHERS`), one channel each, publishing to
//!   `amq.topic` for `AMQP_LOAD_SECONDS` (default 5); one consumer connection with a
//!   server-named exclusive queue bound to the run's key, `basic.qos` prefetch 2,000 and
//!   manual acknowledgements (`basic.ack` with `multiple` every 100 deliveries);
//! - closed loop: a publisher is at most `AMQP_LOAD_WINDOW` (default 10) messages ahead of
//!   what the consumer received (the consumer gives a credit back per delivery), and has at
//!   most that many publishes in flight (written, or with confirms: unconfirmed). 100 × 10
//!   messages in flight never fill a queue (Thingsgate: 1,000 per queue) nor the prefetch, so
//!   nothing is dropped or held back and latencies are not socket-buffer backlogs;
//! - runs: `plain` (routing key `sensors.pN.temp`, binding `sensors.#`, 64-byte payload:
//!   send instant in ns since a start shared by every task of this process, publisher number,
//!   padding; transient) and `plain+confirms` (`confirm.select`, persistent: `delivery-mode`
//!   2, i.e. QoS 1 at Thingsgate; RabbitMQ writes nothing to disk for a non-durable queue) on
//!   both brokers, alternating Thingsgate, RabbitMQ, Thingsgate, RabbitMQ…; then, Thingsgate
//!   only, `twin` and `twin+confirms`: each publisher sends compact modify commands for its own
//!   thing (`org/acme.dev-N.things.twin.commands.modify.features.temp.properties.value`, the
//!   payload the send instant as a JSON number), the consumer is bound to the events
//!   (`org/acme.*.things.twin.events.#`) and reads the instant from the event's `value`. A twin
//!   write is journaled (group commit, `fdatasync`) before its event and its confirm.
//!
//! Fresh connections per run (not measured); one unprinted 1-second warm-up run per broker and
//! mode. `AMQP_LOAD_MODES` picks runs (default `plain,plain+confirms,twin,twin+confirms`).
//! Rounds: `AMQP_LOAD_ROUNDS` (default 3; the machine is noisy). Printed per run: delivered
//! messages/s within the publishing window, delivered messages per broker core-second (user
//! and system time from `/proc/PID/stat` over the run and its drain), p50/p99 latency, broker and
//! load-generator CPU, and the Thingsgate/RabbitMQ ratio per core-second of the round; at the
//! end the medians over the rounds and their ratios.
//!
//! Then (or alone, with `--idle`): memory per idle authenticated AMQP connection on a fresh
//! Thingsgate: RSS before and after `AMQP_LOAD_IDLE` (default 10,000; 0 skips it) connections
//! that finished the handshake (protocol header → start → start-ok PLAIN → tune → tune-ok with
//! heartbeat 0 → open → open-ok), written by hand with `amq-protocol` frames on raw sockets
//! (a lapin connection is a thread and buffers: too heavy client-side for 10,000), opened in
//! parallel batches of 100 (below `max_handshakes_per_address`). `AMQP_LOAD_IDLE_HOLD`: seconds
//! to keep them open afterwards (for a profiler).
//!
//! Everything is bounded in time; Thingsgate is killed at the end (and on a panic).

mod support;

use support::{Server, cpu_seconds, create_solution, rabbitmq_pid, rss_kib, serve};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{FieldTable as RawFieldTable, LongString};
use bytes::BytesMut;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::time::timeout;

/// The consumer's `basic.qos` prefetch: above what can be in flight (publishers × window +
/// deliveries received and not yet acknowledged), so it never holds deliveries back.
const PREFETCH: u16 = 2000;
/// The consumer acknowledges (`multiple`) every this many deliveries.
const ACK_EVERY: u64 = 100;
const PAYLOAD_SIZE: usize = 64;
/// How long the consumer waits for the last messages after the publishers stopped.
const DRAIN_QUIET: Duration = Duration::from_millis(500);
const DRAIN_MAX: Duration = Duration::from_secs(15);
/// One AMQP step (connect, declare, close), at most.
const STEP: Duration = Duration::from_secs(30);
/// Concurrent handshakes while opening idle connections.
const IDLE_BATCH: usize = 100;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Twin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    kind: Kind,
    confirms: bool,
}

impl Mode {
    fn name(self) -> &'static str {
        match (self.kind, self.confirms) {
            (Kind::Plain, false) => "plain",
            (Kind::Plain, true) => "plain+confirms",
            (Kind::Twin, false) => "twin",
            (Kind::Twin, true) => "twin+confirms",
        }
    }

    /// Transient without confirms; persistent (`delivery-mode` 2: QoS 1 at Thingsgate) with.
    fn properties(self) -> BasicProperties {
        if self.confirms {
            BasicProperties::default().with_delivery_mode(2)
        } else {
            BasicProperties::default()
        }
    }
}

impl Kind {
    fn routing_key(self, publisher: usize) -> String {
        match self {
            Kind::Plain => format!("sensors.p{publisher}.temp"),
            Kind::Twin => format!(
                "org/acme.dev-{publisher}.things.twin.commands.modify.features.temp.properties.value"
            ),
        }
    }

    fn binding(self) -> &'static str {
        match self {
            Kind::Plain => "sensors.#",
            Kind::Twin => "org/acme.*.things.twin.events.#",
        }
    }

    /// Plain: send instant (ns, big-endian), publisher number, padding to 64 bytes. Twin: the
    /// send instant as a JSON number (the new property value).
    fn payload(self, publisher: usize, sent: u64) -> Vec<u8> {
        match self {
            Kind::Plain => {
                let mut payload = Vec::with_capacity(PAYLOAD_SIZE);
                payload.extend_from_slice(&sent.to_be_bytes());
                payload.extend_from_slice(&(publisher as u32).to_be_bytes());
                payload.resize(PAYLOAD_SIZE, b'.');
                payload
            }
            Kind::Twin => sent.to_string().into_bytes(),
        }
    }

    /// The send instant and publisher of a delivery.
    fn read(self, routing_key: &str, payload: &[u8]) -> Option<(u64, usize)> {
        match self {
            Kind::Plain => {
                let sent = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
                let publisher = u32::from_be_bytes(payload.get(8..12)?.try_into().ok()?);
                Some((sent, publisher as usize))
            }
            Kind::Twin => {
                // `org/acme.dev-N.things.twin.events.modified.…`, the envelope's `"value":N`.
                let publisher = routing_key
                    .split('.')
                    .nth(1)?
                    .strip_prefix("dev-")?
                    .parse()
                    .ok()?;
                const KEY: &[u8] = br#""value":"#;
                let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
                let number = &payload[at..];
                let digits = number.iter().take_while(|b| b.is_ascii_digit()).count();
                let sent = std::str::from_utf8(&number[..digits]).ok()?.parse().ok()?;
                Some((sent, publisher))
            }
        }
    }
}

/// A broker under load: where to connect and which process does its work.
struct Target {
    name: &'static str,
    uri: String,
    pid: String,
}

/// The figures of one printed run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rate: f64,
    per_core_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What the consumer saw in one run.
struct Received {
    /// Latencies (ns) of every delivery.
    latencies: Vec<u64>,
    /// Delivered within the publishing window.
    in_window: u64,
    /// Deliveries without a readable send instant or publisher.
    unreadable: u64,
}

/// What one publisher did.
#[derive(Default)]
struct Published {
    sent: u64,
    /// Confirmed with `basic.nack`.
    nacked: u64,
    /// Publishes whose write or confirm failed.
    failed: u64,
}

async fn connect(uri: &str) -> Connection {
    timeout(
        STEP,
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("no AMQP connection to {uri} within {STEP:?}"))
    .unwrap_or_else(|e| panic!("AMQP connection to {uri} refused: {e}"))
}

async fn close(connection: Connection) {
    let _ = timeout(STEP, connection.close(200, "bye".into())).await;
}

/// Publishes as [`Mode`] says until `deadline`, within this publisher's end-to-end window
/// (`credits`) and at most `window` publishes in flight; waits for the last ones.
#[allow(
    clippy::too_many_arguments,
    reason = "one run's shared state, spelled out"
)]
async fn publish(
    channel: Channel,
    publisher: usize,
    mode: Mode,
    window: usize,
    credits: Arc<Vec<Semaphore>>,
    start: Instant,
    deadline: Instant,
) -> Published {
    let key: ShortString = mode.kind.routing_key(publisher).into();
    let properties = mode.properties();
    let credit = &credits[publisher];
    let mut done = Published::default();
    let mut inflight = FuturesUnordered::new();
    let settle = |done: &mut Published, result: lapin::Result<bool>| match result {
        Ok(true) => {}
        Ok(false) => done.nacked += 1,
        Err(_) => done.failed += 1,
    };
    loop {
        while inflight.len() >= window {
            if let Some(result) = inflight.next().await {
                settle(&mut done, result);
            }
        }
        let permit = tokio::select! {
            biased;
            Some(result) = inflight.next(), if !inflight.is_empty() => {
                settle(&mut done, result);
                continue;
            }
            permit = tokio::time::timeout_at(deadline.into(), credit.acquire()) => permit,
        };
        match permit {
            Ok(Ok(permit)) => permit.forget(),
            _ => break,
        }
        if Instant::now() >= deadline {
            break;
        }
        let payload = mode
            .kind
            .payload(publisher, start.elapsed().as_nanos() as u64);
        let (channel, key, properties) = (channel.clone(), key.clone(), properties.clone());
        inflight.push(async move {
            let confirm = channel
                .basic_publish(
                    "amq.topic".into(),
                    key,
                    BasicPublishOptions::default(),
                    &payload,
                    properties,
                )
                .await?;
            if mode.confirms {
                Ok(confirm.await?.is_ack())
            } else {
                Ok(true)
            }
        });
        done.sent += 1;
    }
    let rest = async {
        while let Some(result) = inflight.next().await {
            settle(&mut done, result);
        }
    };
    if timeout(STEP, rest).await.is_err() {
        panic!("publisher {publisher}: publishes unconfirmed {STEP:?} after the end");
    }
    done
}

/// Reads deliveries (a credit back to their publisher each, `basic.ack` `multiple` every
/// [`ACK_EVERY`]) until the publishers stopped and nothing arrived for [`DRAIN_QUIET`], or
/// [`DRAIN_MAX`] after they stopped.
async fn consume(
    channel: Channel,
    mut consumer: lapin::Consumer,
    kind: Kind,
    start: Instant,
    window_end: Arc<std::sync::atomic::AtomicU64>,
    credits: Arc<Vec<Semaphore>>,
    stopped: Arc<Notify>,
) -> Received {
    let mut received = Received {
        latencies: Vec::with_capacity(1 << 20),
        in_window: 0,
        unreadable: 0,
    };
    let mut stop_at: Option<Instant> = None;
    let mut last = Instant::now();
    let mut unacked: Option<u64> = None;
    let mut count = 0u64;
    loop {
        let deadline = match stop_at {
            Some(at) => (last + DRAIN_QUIET)
                .min(at + DRAIN_MAX)
                .max(at + DRAIN_QUIET),
            None => Instant::now() + Duration::from_secs(3600),
        };
        let delivery = tokio::select! {
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => panic!("the consumer failed: {e}"),
                None => panic!("the consumer was cancelled"),
            },
            () = stopped.notified(), if stop_at.is_none() => {
                stop_at = Some(Instant::now());
                continue;
            }
            () = tokio::time::sleep_until(deadline.into()) => break,
        };
        let now = start.elapsed().as_nanos() as u64;
        last = Instant::now();
        match kind.read(delivery.routing_key.as_str(), &delivery.data) {
            Some((sent, publisher)) => {
                received.latencies.push(now.saturating_sub(sent));
                if now <= window_end.load(std::sync::atomic::Ordering::Relaxed) {
                    received.in_window += 1;
                }
                if let Some(credit) = credits.get(publisher) {
                    credit.add_permits(1);
                }
            }
            None => received.unreadable += 1,
        }
        count += 1;
        unacked = Some(delivery.delivery_tag);
        if count.is_multiple_of(ACK_EVERY) {
            ack(&channel, delivery.delivery_tag).await;
            unacked = None;
        }
    }
    if let Some(tag) = unacked {
        ack(&channel, tag).await;
    }
    received
}

async fn ack(channel: &Channel, tag: u64) {
    let ack = channel.basic_ack(tag, BasicAckOptions { multiple: true });
    match timeout(STEP, ack).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("basic.ack failed: {e}"),
        Err(_) => panic!("basic.ack not written within {STEP:?}"),
    }
}

/// One run against `target`: fresh connections, every publisher publishing for `seconds`;
/// its figures (and one line printed unless `quiet`).
async fn run(
    target: &Target,
    mode: Mode,
    seconds: u64,
    publishers: usize,
    window: usize,
    quiet: bool,
) -> Figures {
    // The consumer first: a server-named exclusive queue, bound, consuming.
    let consumer_connection = connect(&target.uri).await;
    let channel = consumer_connection.create_channel().await.unwrap();
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            "amq.topic".into(),
            mode.kind.binding().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: queue.bind failed: {e}", target.name));
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let setup = async {
        let connections: Vec<Connection> =
            futures_util::future::join_all((0..publishers).map(|_| connect(&target.uri))).await;
        let mut channels = Vec::with_capacity(publishers);
        for connection in &connections {
            let channel = connection.create_channel().await.unwrap();
            if mode.confirms {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .unwrap();
            }
            channels.push(channel);
        }
        (connections, channels)
    };
    let (connections, channels) = timeout(Duration::from_secs(120), setup)
        .await
        .unwrap_or_else(|_| panic!("{}: connecting the publishers took over 120 s", target.name));

    let start = Instant::now();
    let window_end = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let stopped = Arc::new(Notify::new());
    let credits = Arc::new(
        (0..publishers)
            .map(|_| Semaphore::new(window))
            .collect::<Vec<_>>(),
    );
    let reader = tokio::spawn(consume(
        channel.clone(),
        consumer,
        mode.kind,
        start,
        window_end.clone(),
        credits.clone(),
        stopped.clone(),
    ));
    let broker_cpu = cpu_seconds(&target.pid);
    let own_cpu = cpu_seconds("self");
    let t0 = Instant::now();
    let duration = Duration::from_secs(seconds);
    let deadline = t0 + duration;
    window_end.store(
        (deadline - start).as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    let tasks: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(i, channel)| {
            tokio::spawn(publish(
                channel,
                i,
                mode,
                window,
                credits.clone(),
                start,
                deadline,
            ))
        })
        .collect();
    let mut published = Published::default();
    for task in tasks {
        let done = timeout(duration + STEP + Duration::from_secs(5), task)
            .await
            .unwrap_or_else(|_| panic!("{}: a publisher did not finish in time", target.name))
            .unwrap();
        published.sent += done.sent;
        published.nacked += done.nacked;
        published.failed += done.failed;
    }
    stopped.notify_one();
    let received = timeout(DRAIN_MAX + STEP, reader)
        .await
        .unwrap_or_else(|_| panic!("{}: the consumer did not finish in time", target.name))
        .unwrap();
    let broker_cpu = cpu_seconds(&target.pid) - broker_cpu;
    let own_cpu = cpu_seconds("self") - own_cpu;
    let elapsed = t0.elapsed().as_secs_f64();

    for connection in connections {
        close(connection).await;
    }
    close(consumer_connection).await;

    let mut latencies = received.latencies;
    latencies.sort_unstable();
    let delivered = latencies.len() as u64;
    assert!(
        delivered > 0,
        "{} {}: nothing delivered",
        target.name,
        mode.name()
    );
    let percentile = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1e6
    };
    let figures = Figures {
        rate: received.in_window as f64 / duration.as_secs_f64(),
        per_core_second: delivered as f64 / broker_cpu,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
    };
    if !quiet {
        println!(
            "amqp_load/{}/{}: {publishers} publishers, window {window}, {seconds} s: sent {}, \
             delivered {delivered} (lost {}, nacked {}, failed {}{}) = {:.0} msg/s; latency p50 \
             {:.2} ms p99 {:.2} ms max {:.2} ms; broker CPU {:.2} cores over {elapsed:.1} s = \
             {:.0} msg per broker core-second; load generator CPU {:.2} cores",
            mode.name(),
            target.name,
            published.sent,
            published.sent.saturating_sub(delivered),
            published.nacked,
            published.failed,
            if received.unreadable > 0 {
                format!(", {} unreadable", received.unreadable)
            } else {
                String::new()
            },
            figures.rate,
            figures.p50_ms,
            figures.p99_ms,
            percentile(1.0),
            broker_cpu / elapsed,
            figures.per_core_second,
            own_cpu / elapsed,
        );
    }
    figures
}

/// Solution `bench` in a fresh data dir; the running server (`--amqp`), its AMQP address and
/// the solution's secret.
fn start_thingsgate(dir: &std::path::Path) -> (Server, SocketAddr, String) {
    let data = dir.join("data");
    let data = data.to_str().unwrap();
    let secret = create_solution(data, "org.acme");
    let (server, addresses) = serve(&[
        "--data",
        data,
        "--mqtt",
        "127.0.0.1:0",
        "--amqp",
        "127.0.0.1:0",
    ]);
    let amqp = addresses["amqp"];
    (server, amqp, secret)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The median figures of several runs.
fn medians(runs: &[Figures]) -> Figures {
    let pick = |f: fn(&Figures) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    Figures {
        rate: pick(|f| f.rate),
        per_core_second: pick(|f| f.per_core_second),
        p50_ms: pick(|f| f.p50_ms),
        p99_ms: pick(|f| f.p99_ms),
    }
}

/// The runs `AMQP_LOAD_MODES` names (default: all four, in this order).
fn modes() -> Vec<Mode> {
    let names = std::env::var("AMQP_LOAD_MODES")
        .unwrap_or_else(|_| "plain,plain+confirms,twin,twin+confirms".to_owned());
    names
        .split(',')
        .map(|name| {
            let (kind, confirms) = match name.trim() {
                "plain" => (Kind::Plain, false),
                "plain+confirms" => (Kind::Plain, true),
                "twin" => (Kind::Twin, false),
                "twin+confirms" => (Kind::Twin, true),
                other => panic!(
                    "AMQP_LOAD_MODES: unknown run `{other}` (plain, plain+confirms, twin, \
                     twin+confirms)"
                ),
            };
            Mode { kind, confirms }
        })
        .collect()
}

fn load(seconds: u64, rounds: u64, publishers: usize, window: usize) {
    let modes = modes();
    let rabbit_uri = std::env::var("AMQP_LOAD_RABBITMQ_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let rabbit_addr = rabbit_uri
        .rsplit_once('@')
        .map_or("127.0.0.1:5672", |(_, rest)| {
            rest.split('/').next().unwrap_or("127.0.0.1:5672")
        })
        .to_owned();
    let reachable = rabbit_addr.parse::<SocketAddr>().is_ok_and(|addr| {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
    });
    assert!(
        reachable,
        "RabbitMQ (the comparison broker) is not reachable at {rabbit_addr}: start the \
         rabbitmq-server service (`systemctl start rabbitmq-server`, or `service rabbitmq-server \
         start` without systemd), or point AMQP_LOAD_RABBITMQ_URI at one"
    );
    let rabbit_pid = rabbitmq_pid().expect(
        "RabbitMQ answers on its port but no `beam.smp` process was found in /proc: its CPU \
         cannot be measured (is it running in another PID namespace?)",
    );

    let dir = tempfile::tempdir().unwrap();
    let (server, amqp, secret) = start_thingsgate(dir.path());
    let thingsgate_target = Target {
        name: "thingsgate",
        uri: format!("amqp://bench:{secret}@{amqp}/%2f"),
        pid: server.0.id().to_string(),
    };
    let rabbit_target = Target {
        name: "rabbitmq",
        uri: rabbit_uri,
        pid: rabbit_pid,
    };
    println!(
        "amqp_load: thingsgate pid {} at {amqp}; rabbitmq beam.smp pid {} at {rabbit_addr}; \
         {publishers} publishers → 1 consumer, window {window}, {seconds} s per run, {rounds} \
         rounds",
        thingsgate_target.pid, rabbit_target.pid
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Every publisher's thing, created with a confirm (durable) before anything else.
        let setup = async {
            let connection = connect(&thingsgate_target.uri).await;
            let channel = connection.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut confirms = Vec::with_capacity(publishers);
            for i in 0..publishers {
                let confirm = channel
                    .basic_publish(
                        "amq.topic".into(),
                        format!("org/acme.dev-{i}.things.twin.commands.create").into(),
                        BasicPublishOptions::default(),
                        br#"{"features":{"temp":{"properties":{"value":0}}}}"#,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .unwrap();
                confirms.push(confirm);
            }
            for (i, confirm) in confirms.into_iter().enumerate() {
                let confirm = confirm.await.unwrap();
                assert!(
                    confirm.is_ack(),
                    "creating thing org.acme:dev-{i} was refused"
                );
            }
            close(connection).await;
        };
        timeout(Duration::from_secs(60), setup)
            .await
            .expect("creating the things took over 60 s");

        let settle = || tokio::time::sleep(Duration::from_secs(1));
        // Warm-up (not printed): buffers grown, views compiled, the journal's first segment,
        // RabbitMQ's code paths hot.
        for &mode in &modes {
            run(&thingsgate_target, mode, 1, publishers, window, true).await;
            settle().await;
            if mode.kind == Kind::Plain {
                run(&rabbit_target, mode, 1, publishers, window, true).await;
                settle().await;
            }
        }

        // Per mode: (Thingsgate runs, RabbitMQ runs).
        let mut results: Vec<(Mode, Vec<Figures>, Vec<Figures>)> =
            modes.iter().map(|&m| (m, Vec::new(), Vec::new())).collect();
        for round in 1..=rounds {
            println!("-- round {round} of {rounds}");
            for (mode, ours, theirs) in &mut results {
                let tg = run(
                    &thingsgate_target,
                    *mode,
                    seconds,
                    publishers,
                    window,
                    false,
                )
                .await;
                ours.push(tg);
                settle().await;
                if mode.kind == Kind::Plain {
                    let rmq = run(&rabbit_target, *mode, seconds, publishers, window, false).await;
                    theirs.push(rmq);
                    settle().await;
                    println!(
                        "amqp_load/{}/ratio: thingsgate/rabbitmq {:.2}× per broker core-second, \
                         {:.2}× msg/s",
                        mode.name(),
                        tg.per_core_second / rmq.per_core_second,
                        tg.rate / rmq.rate,
                    );
                }
            }
        }

        println!("-- medians over {rounds} rounds");
        let mut rabbit_medians = Vec::new();
        for (mode, ours, theirs) in &results {
            let tg = medians(ours);
            let line = |name: &str, f: &Figures| {
                println!(
                    "amqp_load/median/{}/{name}: {:.0} msg/s; {:.0} msg per broker core-second; \
                     latency p50 {:.2} ms p99 {:.2} ms",
                    mode.name(),
                    f.rate,
                    f.per_core_second,
                    f.p50_ms,
                    f.p99_ms
                );
            };
            line("thingsgate", &tg);
            if !theirs.is_empty() {
                let rmq = medians(theirs);
                line("rabbitmq", &rmq);
                let ratios: Vec<String> = ours
                    .iter()
                    .zip(theirs)
                    .map(|(a, b)| format!("{:.2}", a.per_core_second / b.per_core_second))
                    .collect();
                println!(
                    "amqp_load/median/{}/ratio: thingsgate/rabbitmq {:.2}× per broker \
                     core-second (target ≥ 2×; per round: {}), {:.2}× msg/s",
                    mode.name(),
                    tg.per_core_second / rmq.per_core_second,
                    ratios.join(", "),
                    tg.rate / rmq.rate,
                );
                rabbit_medians.push((mode.confirms, rmq));
            } else if let Some((_, rmq)) = rabbit_medians
                .iter()
                .find(|(confirms, _)| *confirms == mode.confirms)
            {
                println!(
                    "amqp_load/median/{}/ratio: thingsgate twin updates / rabbitmq plain{} \
                     {:.2}× per broker core-second, {:.2}× msg/s",
                    mode.name(),
                    if mode.confirms { "+confirms" } else { "" },
                    tg.per_core_second / rmq.per_core_second,
                    tg.rate / rmq.rate,
                );
            }
        }
    });
    drop(server);
}

/// A frame's bytes, made by `amq-protocol`.
fn frame_bytes(class: AMQPClass) -> Vec<u8> {
    let frame = AMQPFrame::Method(0, class);
    gen_frame(&frame)(WriteContext::from(Vec::new()))
        .unwrap()
        .write
}

/// Reads the next frame; the class and method of a method frame (heartbeats are skipped).
async fn read_method(stream: &mut TcpStream, buf: &mut BytesMut) -> (u16, u16) {
    loop {
        if buf.len() >= 7 {
            let size = u32::from_be_bytes(buf[3..7].try_into().unwrap()) as usize;
            if buf.len() >= size + 8 {
                let frame = buf.split_to(size + 8);
                assert_eq!(frame[size + 7], 0xCE, "a frame without its end octet");
                match frame[0] {
                    1 => {
                        let class = u16::from_be_bytes([frame[7], frame[8]]);
                        let method = u16::from_be_bytes([frame[9], frame[10]]);
                        if (class, method) == (10, 50) {
                            let code = u16::from_be_bytes([frame[11], frame[12]]);
                            let len = frame[13] as usize;
                            panic!(
                                "the broker closed the connection: {code} {}",
                                String::from_utf8_lossy(&frame[14..14 + len])
                            );
                        }
                        return (class, method);
                    }
                    8 => continue,
                    other => panic!("unexpected frame type {other} during the handshake"),
                }
            }
        }
        let n = stream.read_buf(buf).await.unwrap();
        assert!(
            n > 0,
            "the broker closed the connection during the handshake"
        );
    }
}

/// The client's frames of a handshake: `start-ok` (PLAIN), then `tune-ok` (heartbeat 0) and
/// `open` (vhost `/`) together.
struct Handshake {
    start_ok: Vec<u8>,
    tune_ok_open: Vec<u8>,
}

impl Handshake {
    fn new(user: &str, password: &str) -> Self {
        let start_ok = frame_bytes(AMQPClass::Connection(connection::AMQPMethod::StartOk(
            connection::StartOk {
                client_properties: RawFieldTable::default(),
                mechanism: "PLAIN".into(),
                response: LongString::from(format!("\0{user}\0{password}").into_bytes()),
                locale: "en_US".into(),
            },
        )));
        let mut tune_ok_open = frame_bytes(AMQPClass::Connection(connection::AMQPMethod::TuneOk(
            connection::TuneOk {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 0,
            },
        )));
        tune_ok_open.extend(frame_bytes(AMQPClass::Connection(
            connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            }),
        )));
        Handshake {
            start_ok,
            tune_ok_open,
        }
    }

    /// Connects and finishes the handshake through `open-ok`; the open socket.
    async fn open(&self, addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut buf = BytesMut::with_capacity(1024);
        stream.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        assert_eq!(
            read_method(&mut stream, &mut buf).await,
            (10, 10),
            "connection.start"
        );
        stream.write_all(&self.start_ok).await.unwrap();
        assert_eq!(
            read_method(&mut stream, &mut buf).await,
            (10, 30),
            "connection.tune"
        );
        stream.write_all(&self.tune_ok_open).await.unwrap();
        assert_eq!(
            read_method(&mut stream, &mut buf).await,
            (10, 41),
            "connection.open-ok"
        );
        stream
    }
}

fn idle(count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (server, amqp, secret) = start_thingsgate(dir.path());
    let pid = server.0.id();
    let handshake = Arc::new(Handshake::new("bench", &secret));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Warm-up: one connection opened and dropped (first-use allocations).
        drop(handshake.open(amqp).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(pid);
        let cpu = cpu_seconds(&pid.to_string());
        let started = Instant::now();
        let mut open = Vec::with_capacity(count);
        // The first tenth, then the rest: the RSS after the first tenth separates what each
        // connection costs from what the allocator takes once (partly used pages per size
        // class and thread, table growth), which shows as ±200 B per connection at 10,000.
        let first = count / 10;
        let mut opening = async |upto: usize| {
            while open.len() < upto {
                let batch = IDLE_BATCH.min(upto - open.len());
                let streams =
                    futures_util::future::join_all((0..batch).map(|_| handshake.open(amqp))).await;
                open.extend(streams);
            }
        };
        timeout(Duration::from_secs(300), opening(first))
            .await
            .expect("opening the idle connections took over 300 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let warm = rss_kib(pid);
        timeout(Duration::from_secs(300), opening(count))
            .await
            .expect("opening the idle connections took over 300 s");
        let took = started.elapsed().as_secs_f64();
        let used = cpu_seconds(&pid.to_string()) - cpu;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rss_kib(pid);
        let per = after.saturating_sub(before) as f64 * 1024.0 / count as f64;
        let marginal =
            after.saturating_sub(warm) as f64 * 1024.0 / count.saturating_sub(first).max(1) as f64;
        println!(
            "amqp_load/memory/idle-connection: {per:.0} bytes per idle authenticated AMQP \
             connection ({count} connections, RSS {before} KiB -> {after} KiB; target ≤ 2,048); \
             {marginal:.0} bytes each for the last {} (RSS {warm} KiB -> {after} KiB); \
             opened in {took:.1} s = {:.0} handshakes/s in batches of {IDLE_BATCH}, broker CPU \
             {:.0} µs per handshake",
            count - first,
            count as f64 / took,
            used * 1e6 / count as f64,
        );
        // `AMQP_LOAD_IDLE_HOLD` seconds more with every connection open, for a profiler or a
        // heap tracer to look at the idle server.
        let hold = env_u64("AMQP_LOAD_IDLE_HOLD", 0);
        if hold > 0 {
            println!("amqp_load/memory: holding {count} idle connections for {hold} s");
            tokio::time::sleep(Duration::from_secs(hold)).await;
        }
        drop(open);
    });
    drop(server);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("amqp_load: benchmark");
        return;
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let idle_only = std::env::args().any(|a| a == "--idle");
    let seconds = env_u64("AMQP_LOAD_SECONDS", 5);
    let rounds = env_u64("AMQP_LOAD_ROUNDS", 3);
    let publishers = env_u64("AMQP_LOAD_PUBLISHERS", 100) as usize;
    let window = env_u64("AMQP_LOAD_WINDOW", 10).max(1) as usize;
    let idle_count = env_u64("AMQP_LOAD_IDLE", 10_000) as usize;
    if !idle_only && rounds > 0 {
        load(seconds, rounds, publishers, window);
    }
    if idle_count > 0 {
        idle(idle_count);
    }
}
