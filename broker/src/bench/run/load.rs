//! The run: subscribers first, then the devices' connect ramp, then every device publishing
//! until the deadline or its share of the count, then the drain; a live progress line on stderr
//! throughout.
//!
//! # The closed loop (`--rate max`)
//! A device keeps at most `inflight` messages that its subscribers have not all received yet
//! (with a shared subscription: that no subscriber has received); each subscriber counts, per
//! device, what it received and wakes the device once per read batch. Without a subscriber
//! on its topic the loop closes on the broker's acknowledgements (QoS 1/2) or not at all
//! (QoS 0: bursts as fast as the socket takes them). If no delivery comes for
//! [`STALL`] the device writes its window off (counted as a failure; the messages count as lost
//! unless they arrive later) rather than stopping.
//!
//! At QoS 1/2 a device also keeps at most `inflight` (capped by the broker's Receive Maximum)
//! unacknowledged PUBLISHes at any rate, as an MQTT client's inflight window does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::client::{
    self, CONNECT_TIMEOUT, Conn, Failure, Stamp, Template, json_number_after, read_binary_stamp,
};
use super::settings::{Login, Rate, Settings, Transport};
use super::timeline::{self, Latencies, Timeline};
use crate::mqtt::codec::{
    Packet, Properties, QoS, QosPid, Subscribe, Subscription, SubscriptionOptions,
};

// AMQP 0.9.1 devices and subscribers (`--url amqp://…`): a child of this module, so that it
// shares the run's state (`Shared`, `Plan`, `Loop`) without widening its visibility.
#[path = "amqp.rs"]
mod amqp;

/// How long a closed-loop device waits for a delivery before writing its window off.
const STALL: Duration = Duration::from_secs(2);
/// The most PUBLISHes written in one burst.
const BURST: u64 = 64;
/// Latency histogram: 1 ns to 1 hour, 3 significant digits.
const LATENCY_MAX_NS: u64 = 3_600_000_000_000;

/// What the progress line shows as the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Connecting = 0,
    Publishing = 1,
    Draining = 2,
    Done = 3,
}

/// What every task of the run shares.
#[derive(Debug)]
struct Shared {
    /// The instant payload stamps count from (devices and subscribers are in this process).
    base: std::time::Instant,
    devices_connected: AtomicU64,
    devices_failed: AtomicU64,
    subscribers_connected: AtomicU64,
    subscribers_failed: AtomicU64,
    sent: AtomicU64,
    /// Unique deliveries (duplicates not counted).
    received: AtomicU64,
    errors: AtomicU64,
    phase: AtomicU8,
    failures: Mutex<BTreeMap<String, u64>>,
    /// The run's latencies and the timeline's current interval, under one lock.
    latency: Mutex<Latencies>,
    /// Per device: what each subscriber received from it, and how to wake it.
    feedback: Vec<Feedback>,
}

#[derive(Debug)]
struct Feedback {
    /// Deliveries of this device's messages, per subscriber.
    per_subscriber: Box<[AtomicU64]>,
    wake: Notify,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn fail(&self, failure: &Failure, times: u64) {
        self.errors.fetch_add(times, Ordering::Relaxed);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        *failures.entry(failure.kind()).or_insert(0) += times;
    }

    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Connecting,
            1 => Phase::Publishing,
            2 => Phase::Draining,
            _ => Phase::Done,
        }
    }
}

/// What a run measured; the report is made from it.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) devices_connected: u64,
    pub(super) devices_failed: u64,
    pub(super) subscribers_connected: u64,
    pub(super) subscribers_failed: u64,
    /// From the first connect attempt to the last CONNACK (or failure) of the ramp.
    pub(super) connect_seconds: f64,
    pub(super) sent: u64,
    /// Sent × subscribers that should receive each message.
    pub(super) expected: u64,
    pub(super) received: u64,
    pub(super) duplicates: u64,
    /// Deliveries that arrived after a later message of the same device.
    pub(super) reordered: u64,
    /// From the start of publishing until the last device stopped.
    pub(super) publish_seconds: f64,
    /// From the start of publishing until the last delivery.
    pub(super) receive_seconds: f64,
    pub(super) latency: Histogram<u64>,
    pub(super) failures: BTreeMap<String, u64>,
    /// Stopped early by Ctrl-C.
    pub(super) interrupted: bool,
    /// User and system CPU seconds of this process over the run, and the run's wall time.
    pub(super) cpu: super::report::CpuUse,
    /// Per interval: sent, received, latency percentiles (`--plot`, the JSON `timeline`).
    pub(super) timeline: Timeline,
    /// What `--policy-churn` did.
    pub(super) policy_churn: Option<super::churn::Summary>,
}

/// When devices publish: the start and the deadline, sent to every device at once.
#[derive(Debug, Clone, Copy)]
struct Go {
    start: Instant,
    deadline: Instant,
    /// QoS 1/2 devices wait for their last acknowledgements until then.
    drain_deadline: Instant,
}

/// What the devices need to know about the subscribers.
#[derive(Debug)]
struct Loop {
    /// Indexes of the subscribers whose SUBSCRIBE was accepted.
    subscribed: Vec<usize>,
    /// The filter is a shared subscription: one subscriber gets each message.
    shared: bool,
}

impl Loop {
    /// Messages of a device every subscriber received (a shared subscription: any), from the
    /// device's feedback counters.
    fn delivered(&self, feedback: &Feedback) -> u64 {
        let counts = self
            .subscribed
            .iter()
            .filter_map(|&s| feedback.per_subscriber.get(s))
            .map(|c| c.load(Ordering::Relaxed));
        if self.shared {
            counts.sum()
        } else {
            counts.min().unwrap_or(0)
        }
    }
}

/// When a paced device's next messages are due (MQTT and AMQP devices alike); a closed loop
/// or an idle device is never held back by it.
struct Schedule {
    period: Option<Duration>,
    next_due: Instant,
}

impl Schedule {
    fn new(rate: Rate, go: &Go, index: usize, devices: usize) -> Self {
        let period = match rate {
            Rate::PerSecond(r) => Some(Duration::from_secs_f64(1.0 / r)),
            Rate::Max | Rate::Idle => None,
        };
        // Paced devices start spread over one period, not in step.
        let next_due = match period {
            Some(p) => go.start + p.mul_f64(index as f64 / devices.max(1) as f64),
            None => go.start,
        };
        Schedule { period, next_due }
    }

    /// How many messages are due at `now` (a device that fell behind catches up).
    fn due(&self, now: Instant) -> u64 {
        match self.period {
            None => u64::MAX,
            Some(_) if now < self.next_due => 0,
            Some(period) => {
                1 + (now.duration_since(self.next_due).as_secs_f64() / period.as_secs_f64()) as u64
            }
        }
    }

    /// `n` messages went.
    fn advance(&mut self, n: u64) {
        if let Some(period) = self.period {
            self.next_due += period.mul_f64(n as f64);
        }
    }
}

/// Connects at most `rate` connections per second.
struct Pacer {
    next: Instant,
    period: Duration,
}

impl Pacer {
    async fn tick(&mut self) {
        tokio::time::sleep_until(self.next).await;
        self.next += self.period;
    }
}

pub(super) async fn run(s: &Settings) -> anyhow::Result<Outcome> {
    let cpu_start = super::report::CpuUse::now();
    let wall_start = Instant::now();
    let latency = Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3)
        .map_err(|e| anyhow::anyhow!("latency histogram: {e}"))?;
    let shared = Arc::new(Shared {
        base: std::time::Instant::now(),
        devices_connected: AtomicU64::new(0),
        devices_failed: AtomicU64::new(0),
        subscribers_connected: AtomicU64::new(0),
        subscribers_failed: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        phase: AtomicU8::new(Phase::Connecting as u8),
        failures: Mutex::new(BTreeMap::new()),
        latency: Mutex::new(Latencies::new(latency)?),
        feedback: (0..s.devices)
            .map(|_| Feedback {
                per_subscriber: (0..s.subscribers).map(|_| AtomicU64::new(0)).collect(),
                wake: Notify::new(),
            })
            .collect(),
    });
    let progress = (!s.quiet).then(|| tokio::spawn(progress(shared.clone(), s.report_every)));
    // Ctrl-C ends publishing early; the drain and the report follow.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let interrupt = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = stop_tx.send(true);
            }
        })
    };
    let plan = Arc::new(Plan::new(s));

    // Subscribers first, so that they see every message.
    let ramp_start = Instant::now();
    let step = timeline::step(s);
    let sampler = Arc::new(Mutex::new(timeline::Sampler::new(
        step,
        LATENCY_MAX_NS,
        ramp_start,
    )?));
    let sample = {
        let (shared, sampler) = (shared.clone(), sampler.clone());
        move || sample_timeline(&shared, &sampler)
    };
    let mut ticker = timeline::every_step(step, ramp_start, sample.clone());
    let mut pacer = Pacer {
        next: Instant::now(),
        period: Duration::from_secs_f64(1.0 / s.connect_rate),
    };
    let (end_tx, end_rx) = watch::channel(false);
    let mut subscriber_tasks = Vec::with_capacity(s.subscribers);
    let mut ready = Vec::with_capacity(s.subscribers);
    for index in 0..s.subscribers {
        pacer.tick().await;
        let (ready_tx, ready_rx) = oneshot::channel();
        ready.push(ready_rx);
        let (shared, plan, end_rx) = (shared.clone(), plan.clone(), end_rx.clone());
        subscriber_tasks.push(match plan.transport {
            Transport::Mqtt => tokio::spawn(subscriber(shared, plan, index, ready_tx, end_rx)),
            Transport::Amqp => {
                tokio::spawn(amqp::subscriber(shared, plan, index, ready_tx, end_rx))
            }
        });
    }
    let mut subscribed = Vec::new();
    for (index, ready_rx) in ready.into_iter().enumerate() {
        // Each subscriber's connect and SUBACK are bounded; this is a backstop.
        let limit = CONNECT_TIMEOUT * 2 + Duration::from_secs(1);
        if let Ok(Ok(true)) = tokio::time::timeout(limit, ready_rx).await {
            subscribed.push(index);
        }
    }
    let filter = s.filter.as_str();
    let the_loop = Arc::new(Loop {
        subscribed,
        shared: filter.starts_with("$share/"),
    });

    // The devices' ramp.
    let (go_tx, go_rx) = watch::channel(None::<Go>);
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel::<()>();
    let mut device_tasks = Vec::with_capacity(s.devices);
    for index in 0..s.devices {
        if *stop_rx.borrow() {
            break;
        }
        pacer.tick().await;
        let matching = if filter_matches(filter, &s.delivery_topic(index)) {
            if the_loop.shared {
                the_loop.subscribed.len().min(1)
            } else {
                the_loop.subscribed.len()
            }
        } else {
            0
        };
        let (shared, plan, the_loop) = (shared.clone(), plan.clone(), the_loop.clone());
        let (connected, go, stop) = (connected_tx.clone(), go_rx.clone(), stop_rx.clone());
        let matching = matching as u64;
        device_tasks.push(match plan.transport {
            Transport::Mqtt => tokio::spawn(device(
                shared, plan, the_loop, index, matching, connected, go, stop,
            )),
            Transport::Amqp => tokio::spawn(amqp::device(
                shared, plan, the_loop, index, matching, connected, go, stop,
            )),
        });
    }
    drop(connected_tx);
    let spawned = device_tasks.len();
    let ramp_limit = Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1);
    for _ in 0..spawned {
        match tokio::time::timeout_at(ramp_limit, connected_rx.recv()).await {
            Ok(Some(())) => {}
            _ => break,
        }
    }
    let connect_seconds = ramp_start.elapsed().as_secs_f64();

    // Publishing.
    let start = Instant::now();
    let deadline = start + s.duration;
    let drain_deadline = deadline + s.drain;
    shared
        .phase
        .store(Phase::Publishing as u8, Ordering::Relaxed);
    mark(s, "publishing");
    // The ramp's last interval ends before any device may publish.
    ticker.abort();
    sample();
    ticker = timeline::every_step(step, start, sample.clone());
    let _ = go_tx.send(Some(Go {
        start,
        deadline,
        drain_deadline,
    }));
    let (publishing_over, publishing_over_rx) = watch::channel(false);
    let churn = match (&s.policy_churn, &s.twin) {
        (Some(churn), Some(namespace)) => Some(tokio::spawn(
            super::churn::Churn::new(churn, namespace, &plan.device_names).run(publishing_over_rx),
        )),
        _ => None,
    };
    let mut sent = 0;
    let mut expected = 0;
    let mut last_stop = start;
    let task_limit = drain_deadline + Duration::from_secs(5);
    for task in device_tasks {
        if let Ok(Ok(result)) = tokio::time::timeout_at(task_limit, task).await {
            sent += result.sent;
            expected += result.sent * result.matching;
            last_stop = last_stop.max(result.stopped_at);
        }
    }
    let publish_seconds = last_stop.duration_since(start).as_secs_f64();
    let _ = publishing_over.send(true);

    // The drain: until everything expected arrived, or the grace period is over.
    shared.phase.store(Phase::Draining as u8, Ordering::Relaxed);
    mark(s, "draining");
    let drain_until = Instant::now().max(last_stop) + s.drain;
    while Instant::now() < drain_until && shared.received.load(Ordering::Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = end_tx.send(true);
    let mut received = 0;
    let mut duplicates = 0;
    let mut reordered = 0;
    let mut last_delivery_ns = 0;
    for task in subscriber_tasks {
        if let Ok(Ok(result)) = tokio::time::timeout(Duration::from_secs(5), task).await {
            received += result.received;
            duplicates += result.duplicates;
            reordered += result.reordered;
            last_delivery_ns = last_delivery_ns.max(result.last_delivery_ns);
        }
    }
    shared.phase.store(Phase::Done as u8, Ordering::Relaxed);
    mark(s, "done");
    ticker.abort();
    sample();
    let timeline = {
        let mut sampler = sampler.lock().unwrap_or_else(|e| e.into_inner());
        sampler.finish(start, last_stop, Instant::now())
    };
    // A change still in flight had the drain to finish; it has its own timeout.
    let policy_churn = match churn {
        Some(task) => {
            let limit = crate::http_client::REQUEST_TIMEOUT + Duration::from_secs(1);
            match tokio::time::timeout(limit, task).await {
                Ok(Ok(summary)) => Some(summary),
                _ => None,
            }
        }
        None => None,
    };
    if let Some(progress) = progress {
        progress.abort();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!();
        }
    }
    interrupt.abort();
    let start_ns = u64::try_from(
        start
            .into_std()
            .saturating_duration_since(shared.base)
            .as_nanos(),
    )
    .unwrap_or(0);
    let receive_seconds = last_delivery_ns.saturating_sub(start_ns) as f64 / 1e9;
    let latency = shared
        .latency
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .total
        .clone();
    let failures = shared
        .failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(Outcome {
        devices_connected: shared.devices_connected.load(Ordering::Relaxed),
        devices_failed: shared.devices_failed.load(Ordering::Relaxed),
        subscribers_connected: shared.subscribers_connected.load(Ordering::Relaxed),
        subscribers_failed: shared.subscribers_failed.load(Ordering::Relaxed),
        connect_seconds,
        sent,
        expected,
        received,
        duplicates,
        reordered,
        publish_seconds,
        receive_seconds,
        latency,
        failures,
        interrupted: *stop_rx.borrow(),
        cpu: super::report::CpuUse::now().since(&cpu_start, wall_start.elapsed()),
        timeline,
        policy_churn,
    })
}

/// Ends the timeline's current interval now (see `timeline`).
fn sample_timeline(shared: &Shared, sampler: &Mutex<timeline::Sampler>) {
    let sent = shared.sent.load(Ordering::Relaxed);
    let received = shared.received.load(Ordering::Relaxed);
    sampler
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .sample_now(sent, received, &shared.latency);
}

/// A `phase NAME` line on stderr for `bench compare` (`--phase-marks`), which samples the
/// broker's CPU and memory when it reads one.
fn mark(s: &Settings, phase: &str) {
    if s.phase_marks {
        eprintln!("phase {phase}");
    }
}

/// What devices and subscribers read from the settings, shared.
#[derive(Debug)]
struct Plan {
    transport: Transport,
    target: std::net::SocketAddr,
    /// Every node of `--url` (one, or a cluster's): see `Settings::targets`.
    targets: Vec<std::net::SocketAddr>,
    protocol: crate::mqtt::codec::Protocol,
    qos: QoS,
    rate: Rate,
    inflight: usize,
    payload_size: usize,
    twin: bool,
    devices: usize,
    count: Option<u64>,
    filter: crate::mqtt::codec::TopicFilter,
    device_prefix: String,
    sources: Vec<std::net::IpAddr>,
    /// Topics and client IDs, computed once.
    device_names: Vec<String>,
    device_topics: Vec<String>,
    subscriber_names: Vec<String>,
    login: LoginPlan,
}

#[derive(Debug)]
enum LoginPlan {
    Anonymous,
    Fixed {
        username: String,
        password: bytes::Bytes,
    },
    /// Tokens minted per connection (before the ramp, so the ramp measures the broker).
    Tokens {
        devices: Vec<Result<String, String>>,
        subscribers: Vec<Result<String, String>>,
        api_token: Option<String>,
    },
}

impl Plan {
    fn new(s: &Settings) -> Self {
        let device_names: Vec<String> = (0..s.devices).map(|i| s.device_name(i)).collect();
        let subscriber_names: Vec<String> =
            (0..s.subscribers).map(|i| s.subscriber_name(i)).collect();
        let login = match &s.login {
            Login::Anonymous => LoginPlan::Anonymous,
            Login::Plain { username, password } => LoginPlan::Fixed {
                username: username.clone(),
                password: password.clone(),
            },
            Login::Secret { solution, secret } => LoginPlan::Fixed {
                username: solution.clone(),
                password: secret.clone(),
            },
            Login::Jwt(minter) => {
                let mint = |names: &[String]| {
                    names
                        .iter()
                        .map(|n| minter.mint(n).map_err(|e| format!("{e:#}")))
                        .collect()
                };
                LoginPlan::Tokens {
                    devices: mint(&device_names),
                    subscribers: mint(&subscriber_names),
                    api_token: minter.api_token.clone(),
                }
            }
        };
        Plan {
            transport: s.transport,
            target: s.target,
            targets: s.targets.clone(),
            protocol: s.protocol,
            qos: s.qos,
            rate: s.rate,
            inflight: s.inflight,
            payload_size: s.payload_size,
            twin: s.twin.is_some(),
            devices: s.devices,
            count: s.count,
            filter: s.filter.clone(),
            device_prefix: s.device_prefix.clone(),
            sources: s.source_addresses.clone(),
            device_topics: (0..s.devices).map(|i| s.device_topic(i)).collect(),
            device_names,
            subscriber_names,
            login,
        }
    }

    /// The CONNECT login of a device (`subscriber` false) or subscriber `index`.
    fn login(&self, subscriber: bool, index: usize) -> client::Login {
        let names = if subscriber {
            &self.subscriber_names
        } else {
            &self.device_names
        };
        let client_id = names.get(index).cloned().unwrap_or_default();
        let (username, password, user_properties) = match &self.login {
            LoginPlan::Anonymous => (None, None, Vec::new()),
            LoginPlan::Fixed { username, password } => {
                (Some(username.clone()), Some(password.clone()), Vec::new())
            }
            LoginPlan::Tokens {
                devices,
                subscribers,
                api_token,
            } => {
                let tokens = if subscriber { subscribers } else { devices };
                let token = tokens
                    .get(index)
                    .and_then(|t| t.as_ref().ok())
                    .cloned()
                    .unwrap_or_default();
                let (username, properties) = match (api_token, self.protocol) {
                    (Some(api), crate::mqtt::codec::Protocol::V5) => (
                        None,
                        vec![(
                            crate::core::identity::API_TOKEN_PROPERTY.to_owned(),
                            api.clone(),
                        )],
                    ),
                    (Some(api), crate::mqtt::codec::Protocol::V311) => {
                        (Some(api.clone()), Vec::new())
                    }
                    // MQTT 3.1.1 allows no password without a user name (MQTT-3.1.2-22):
                    // the client ID stands in (the solution comes from the token's claim).
                    (None, crate::mqtt::codec::Protocol::V311) => {
                        (Some(client_id.clone()), Vec::new())
                    }
                    (None, crate::mqtt::codec::Protocol::V5) => (None, Vec::new()),
                };
                (username, Some(bytes::Bytes::from(token)), properties)
            }
        };
        client::Login {
            client_id,
            username,
            password,
            user_properties,
        }
    }

    /// The local address of connection number `n` (devices after subscribers).
    /// The broker device `index` connects to (`--url` may list cluster nodes).
    fn device_target(&self, index: usize) -> std::net::SocketAddr {
        self.targets
            .get(index % self.targets.len().max(1))
            .copied()
            .unwrap_or(self.target)
    }

    /// The broker subscriber `index` connects to: the node after a device's, so that events
    /// cross nodes.
    fn subscriber_target(&self, index: usize) -> std::net::SocketAddr {
        self.device_target(index + 1)
    }

    fn source(&self, n: usize) -> Option<std::net::IpAddr> {
        match self.sources.len() {
            0 => None,
            len => self.sources.get(n % len).copied(),
        }
    }

    /// Device `index`'s share of `--count`.
    fn count_of(&self, index: usize) -> u64 {
        match self.count {
            None => u64::MAX,
            Some(total) => {
                let devices = self.devices.max(1) as u64;
                total / devices + u64::from((index as u64) < total % devices)
            }
        }
    }
}

/// What one device did.
#[derive(Debug)]
struct DeviceResult {
    sent: u64,
    /// Subscribers that should receive each of its messages.
    matching: u64,
    stopped_at: Instant,
}

#[expect(
    clippy::too_many_arguments,
    reason = "one task's inputs, spelled out at its one spawn"
)]
async fn device(
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
        LoginPlan::Tokens { devices, .. } if devices.get(index).is_some_and(Result::is_err) => {
            Err(Failure::Protocol("no token could be minted".to_owned()))
        }
        _ => {
            let target = plan.device_target(index);
            client::connect(target, source, plan.protocol, plan.login(false, index)).await
        }
    };
    let mut conn = match attempt {
        Ok(conn) => {
            shared.devices_connected.fetch_add(1, Ordering::Relaxed);
            conn
        }
        Err(failure) => {
            shared.devices_failed.fetch_add(1, Ordering::Relaxed);
            shared.fail(&failure, 1);
            let _ = connected.send(());
            return nothing(Instant::now());
        }
    };
    let _ = connected.send(());
    drop(connected);
    // Wait for the start, keeping the connection alive.
    let go = loop {
        if let Some(go) = *go.borrow_and_update() {
            break go;
        }
        let ping_at = conn.ping_at();
        let result = tokio::select! {
            changed = go.changed() => match changed {
                Ok(()) => Ok(()),
                Err(_) => {
                    conn.close().await;
                    return nothing(Instant::now());
                }
            },
            read = conn.read_more() => read.and_then(|()| idle_packets(&mut conn)),
            () = tokio::time::sleep_until(ping_at) => ping(&mut conn).await,
        };
        if let Err(failure) = result {
            shared.fail(&failure, 1);
            return nothing(Instant::now());
        }
    };
    if plan.rate == Rate::Idle {
        // Hold the connection (keep-alive only) until the deadline or a stop.
        let held = hold(&mut conn, go.deadline, stop).await;
        let stopped_at = Instant::now();
        match held {
            Ok(()) => conn.close().await,
            Err(failure) => shared.fail(&failure, 1),
        }
        return nothing(stopped_at);
    }
    let template = match Template::new(
        plan.device_topics.get(index).map_or("", String::as_str),
        plan.qos,
        plan.payload_size,
        if plan.twin {
            Stamp::JsonNumber
        } else {
            Stamp::Binary
        },
        plan.protocol,
    ) {
        Ok(t) => t,
        Err(failure) => {
            shared.fail(&failure, 1);
            conn.close().await;
            return nothing(Instant::now());
        }
    };
    let feedback = shared.feedback.get(index);
    let mut publisher = Publisher {
        shared: &shared,
        the_loop: &the_loop,
        feedback: if matching > 0 { feedback } else { None },
        template,
        device: u32::try_from(index).unwrap_or(u32::MAX),
        qos: plan.qos,
        window: plan.inflight.min(conn.receive_maximum).max(1) as u64,
        limit: plan.count_of(index),
        sent: 0,
        floor: 0,
        unacked: 0,
        next_packet_id: 1,
    };
    let outcome = publisher
        .publish(&mut conn, plan.rate, go, index, plan.devices, stop)
        .await;
    let stopped_at = Instant::now();
    let sent = publisher.sent;
    match outcome {
        Ok(()) => {
            // The last acknowledgements, until the drain deadline.
            let drained = publisher.drain(&mut conn, go.drain_deadline).await;
            if let Err(failure) = drained {
                shared.fail(&failure, 1);
            } else {
                if publisher.unacked > 0 {
                    shared.fail(&Failure::Unacknowledged, publisher.unacked);
                }
                conn.close().await;
            }
        }
        Err(failure) => shared.fail(&failure, 1),
    }
    DeviceResult {
        sent,
        matching,
        stopped_at,
    }
}

/// Handles what an idle connection may receive; a DISCONNECT ends it.
fn idle_packets(conn: &mut Conn) -> Result<(), Failure> {
    while let Some(packet) = conn.try_decode()? {
        if let Packet::Disconnect(d) = packet {
            return Err(Failure::Disconnect(d.reason));
        }
    }
    Ok(())
}

/// Keeps an idle connection alive until `until` or a stop: reads what comes, pings when the
/// keep-alive says so.
async fn hold(
    conn: &mut Conn,
    until: Instant,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Failure> {
    while Instant::now() < until && !*stop.borrow() {
        let ping_at = conn.ping_at();
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            read = conn.read_more() => read.and_then(|()| idle_packets(conn))?,
            () = tokio::time::sleep_until(ping_at) => ping(conn).await?,
        }
    }
    Ok(())
}

async fn ping(conn: &mut Conn) -> Result<(), Failure> {
    conn.queue(&Packet::PingReq)?;
    conn.flush().await
}

/// A device's publishing state.
struct Publisher<'a> {
    shared: &'a Shared,
    the_loop: &'a Loop,
    /// Closed on deliveries: this device's counters (None: no subscriber on its topic).
    feedback: Option<&'a Feedback>,
    template: Template,
    device: u32,
    qos: QoS,
    window: u64,
    /// Its share of `--count`.
    limit: u64,
    sent: u64,
    /// Messages counted as delivered or written off (closed loop).
    floor: u64,
    /// PUBLISHes not yet acknowledged (PUBACK, or PUBCOMP at QoS 2).
    unacked: u64,
    next_packet_id: u16,
}

impl Publisher<'_> {
    /// Messages of this device every subscriber received (shared subscription: any).
    fn delivered(&self) -> u64 {
        self.feedback.map_or(0, |f| self.the_loop.delivered(f))
    }

    /// How many messages may go now (before pacing).
    fn credit(&mut self, closed_loop: bool) -> u64 {
        let mut n = BURST.min(self.limit - self.sent);
        if closed_loop && self.feedback.is_some() {
            self.floor = self.floor.max(self.delivered());
            let in_flight = self.sent.saturating_sub(self.floor);
            n = n.min(self.window.saturating_sub(in_flight));
        }
        if self.qos != QoS::AtMostOnce {
            n = n.min(self.window.saturating_sub(self.unacked));
        }
        n
    }

    /// Publishes until the deadline, the count or a stop.
    async fn publish(
        &mut self,
        conn: &mut Conn,
        rate: Rate,
        go: Go,
        index: usize,
        devices: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Failure> {
        let closed_loop = rate == Rate::Max;
        let mut schedule = Schedule::new(rate, &go, index, devices);
        let mut waiting_since: Option<Instant> = None;
        loop {
            conn.read_ready()?;
            self.handle_acks(conn)?;
            conn.flush().await?;
            let now = Instant::now();
            if now >= go.deadline || self.sent >= self.limit || *stop.borrow() {
                return Ok(());
            }
            let credit = self.credit(closed_loop);
            let n = credit.min(schedule.due(now));
            if n > 0 {
                let now_ns = self.shared.now_ns();
                for _ in 0..n {
                    self.sent += 1;
                    let seq = u32::try_from(self.sent).unwrap_or(u32::MAX);
                    let packet_id = if self.qos == QoS::AtMostOnce {
                        0
                    } else {
                        self.unacked += 1;
                        let id = self.next_packet_id;
                        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
                        id
                    };
                    self.template
                        .write(&mut conn.wbuf, packet_id, now_ns, self.device, seq);
                }
                schedule.advance(n);
                conn.flush().await?;
                self.shared.sent.fetch_add(n, Ordering::Relaxed);
                waiting_since = None;
                continue;
            }
            // Nothing may go now: wait for a delivery, an acknowledgement, the next due
            // instant, the deadline or a stop.
            let waiting_for_loop = credit == 0 && closed_loop && self.feedback.is_some();
            let since = if waiting_for_loop {
                *waiting_since.get_or_insert(now)
            } else {
                waiting_since = None;
                now
            };
            let mut wake_at = go.deadline.min(conn.ping_at());
            if waiting_for_loop {
                wake_at = wake_at.min(since + STALL);
            }
            if credit > 0 {
                wake_at = wake_at.min(schedule.next_due);
            }
            let feedback = self.feedback;
            tokio::select! {
                read = conn.read_more() => read?,
                () = async {
                    match feedback {
                        Some(f) => f.wake.notified().await,
                        None => std::future::pending().await,
                    }
                }, if waiting_for_loop => {}
                () = tokio::time::sleep_until(wake_at) => {
                    let now = Instant::now();
                    if waiting_for_loop && now >= since + STALL {
                        self.shared.fail(&Failure::WindowStalled, 1);
                        self.floor = self.sent;
                        waiting_since = None;
                    }
                    if now >= conn.ping_at() {
                        ping(conn).await?;
                    }
                }
                _ = stop.changed() => {}
            }
        }
    }

    /// Handles the acknowledgements in the read buffer; queues PUBRELs.
    fn handle_acks(&mut self, conn: &mut Conn) -> Result<(), Failure> {
        while let Some(packet) = conn.try_decode()? {
            match packet {
                Packet::PubAck(ack) | Packet::PubComp(ack) => {
                    self.unacked = self.unacked.saturating_sub(1);
                    if ack.reason >= 0x80 {
                        self.shared.fail(&Failure::PublishRefused(ack.reason), 1);
                    }
                }
                Packet::PubRec(rec) => {
                    if rec.reason >= 0x80 {
                        self.unacked = self.unacked.saturating_sub(1);
                        self.shared.fail(&Failure::PublishRefused(rec.reason), 1);
                    } else {
                        conn.queue_ack(Packet::PubRel, rec.packet_id)?;
                    }
                }
                Packet::PingResp | Packet::Publish(_) => {}
                Packet::Disconnect(d) => return Err(Failure::Disconnect(d.reason)),
                other => {
                    return Err(Failure::Protocol(format!(
                        "unexpected {} for a device",
                        other.packet_type().name()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Waits for the outstanding acknowledgements until `deadline`.
    async fn drain(&mut self, conn: &mut Conn, deadline: Instant) -> Result<(), Failure> {
        while self.unacked > 0 {
            self.handle_acks(conn)?;
            conn.flush().await?;
            if self.unacked == 0 {
                break;
            }
            tokio::select! {
                read = conn.read_more() => read?,
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        Ok(())
    }
}

/// What one subscriber received.
#[derive(Debug, Default)]
struct SubscriberResult {
    received: u64,
    duplicates: u64,
    /// Deliveries that came after a later message of the same device.
    reordered: u64,
    last_delivery_ns: u64,
}

/// What a subscriber saw of one device: the highest sequence number (plain) or revision
/// (twin) and which of the 128 below it arrived, so that a duplicate is told from a message
/// that arrived out of order (as in IPsec's anti-replay window).
#[derive(Debug, Clone, Copy, Default)]
struct SeenWindow {
    highest: u64,
    /// Bit `i`: `highest - 1 - i` arrived.
    below: u128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    First,
    /// Out of order: after a higher one.
    Late,
    Again,
}

impl SeenWindow {
    fn see(&mut self, n: u64) -> Seen {
        if n == 0 {
            // No number to go by (an event without revision): counted as new.
            return Seen::First;
        }
        if n > self.highest {
            let shift = n - self.highest;
            self.below = if shift >= 128 {
                0
            } else {
                (self.below << shift) | (1u128 << (shift - 1))
            };
            if self.highest == 0 {
                self.below = 0;
            }
            self.highest = n;
            return Seen::First;
        }
        if n == self.highest {
            return Seen::Again;
        }
        let bit = self.highest - 1 - n;
        if bit >= 128 {
            // Too old to tell: counted as new, late.
            return Seen::Late;
        }
        let mask = 1u128 << bit;
        if self.below & mask != 0 {
            Seen::Again
        } else {
            self.below |= mask;
            Seen::Late
        }
    }
}

async fn subscriber(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    index: usize,
    ready: oneshot::Sender<bool>,
    mut end: watch::Receiver<bool>,
) -> SubscriberResult {
    let mut result = SubscriberResult::default();
    let failed = |failure: &Failure| {
        shared.subscribers_failed.fetch_add(1, Ordering::Relaxed);
        shared.fail(failure, 1);
    };
    let login = plan.login(true, index);
    if let LoginPlan::Tokens { subscribers, .. } = &plan.login
        && let Some(Err(e)) = subscribers.get(index)
    {
        failed(&Failure::Protocol(format!("no token: {e}")));
        let _ = ready.send(false);
        return result;
    }
    let mut conn = match client::connect(
        plan.subscriber_target(index),
        plan.source(index),
        plan.protocol,
        login,
    )
    .await
    {
        Ok(conn) => conn,
        Err(failure) => {
            failed(&failure);
            let _ = ready.send(false);
            return result;
        }
    };
    if let Err(failure) = subscribe(&mut conn, &plan).await {
        failed(&failure);
        let _ = ready.send(false);
        conn.close().await;
        return result;
    }
    shared.subscribers_connected.fetch_add(1, Ordering::Relaxed);
    let _ = ready.send(true);

    let mut last_seen = vec![SeenWindow::default(); plan.devices];
    // Devices to wake after this read batch, each once.
    let mut touched: Vec<usize> = Vec::new();
    let mut marked = vec![false; plan.devices];
    let mut latencies: Vec<u64> = Vec::with_capacity(1024);
    loop {
        let ping_at = conn.ping_at();
        let read = tokio::select! {
            read = conn.read_more() => read,
            _ = end.changed() => break,
            () = tokio::time::sleep_until(ping_at) => ping(&mut conn).await,
        };
        if let Err(failure) = read {
            shared.fail(&failure, 1);
            return result;
        }
        let now_ns = shared.now_ns();
        let mut fresh = 0;
        loop {
            let packet = match conn.try_decode() {
                Ok(Some(packet)) => packet,
                Ok(None) => break,
                Err(failure) => {
                    shared.fail(&failure, 1);
                    return result;
                }
            };
            let queued = match packet {
                Packet::Publish(publish) => {
                    let seen = if plan.twin {
                        read_event(&plan, publish.topic.as_str(), &publish.payload)
                    } else {
                        read_binary_stamp(&publish.payload)
                            .map(|(ns, device, seq)| (ns, device as usize, u64::from(seq)))
                    };
                    match seen {
                        Some((sent_ns, device, order)) if device < plan.devices => {
                            let seen = last_seen.get_mut(device).map(|w| w.see(order));
                            match seen {
                                Some(Seen::Again) => result.duplicates += 1,
                                Some(seen) => {
                                    if seen == Seen::Late {
                                        result.reordered += 1;
                                    }
                                    fresh += 1;
                                    latencies.push(now_ns.saturating_sub(sent_ns).max(1));
                                    if let Some(counter) = shared
                                        .feedback
                                        .get(device)
                                        .and_then(|f| f.per_subscriber.get(index))
                                    {
                                        counter.fetch_add(1, Ordering::Relaxed);
                                    }
                                    if let Some(mark) = marked.get_mut(device)
                                        && !*mark
                                    {
                                        *mark = true;
                                        touched.push(device);
                                    }
                                }
                                None => {}
                            }
                        }
                        _ => shared.fail(&Failure::UnreadablePayload, 1),
                    }
                    match publish.qos {
                        QosPid::AtMostOnce => Ok(()),
                        QosPid::AtLeastOnce(id) => conn.queue_ack(Packet::PubAck, id),
                        QosPid::ExactlyOnce(id) => conn.queue_ack(Packet::PubRec, id),
                    }
                }
                Packet::PubRel(rel) => conn.queue_ack(Packet::PubComp, rel.packet_id),
                Packet::PingResp => Ok(()),
                Packet::Disconnect(d) => Err(Failure::Disconnect(d.reason)),
                other => Err(Failure::Protocol(format!(
                    "unexpected {} for a subscriber",
                    other.packet_type().name()
                ))),
            };
            if let Err(failure) = queued {
                shared.fail(&failure, 1);
                return result;
            }
        }
        if fresh > 0 {
            result.received += fresh;
            result.last_delivery_ns = now_ns;
            shared.received.fetch_add(fresh, Ordering::Relaxed);
            let mut histogram = shared.latency.lock().unwrap_or_else(|e| e.into_inner());
            for latency in latencies.drain(..) {
                histogram.record(latency);
            }
        }
        for device in touched.drain(..) {
            if let Some(mark) = marked.get_mut(device) {
                *mark = false;
            }
            if let Some(f) = shared.feedback.get(device) {
                f.wake.notify_one();
            }
        }
        if let Err(failure) = conn.flush().await {
            shared.fail(&failure, 1);
            return result;
        }
    }
    conn.close().await;
    result
}

/// SUBSCRIBE to the run's filter and wait for the SUBACK.
async fn subscribe(conn: &mut Conn, plan: &Plan) -> Result<(), Failure> {
    let packet_id = std::num::NonZeroU16::MIN;
    conn.queue(&Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: plan.filter.clone(),
            options: SubscriptionOptions::qos(plan.qos),
        }],
        properties: Properties::default(),
    }))?;
    conn.flush().await?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match conn.try_decode()? {
            Some(Packet::SubAck(ack)) => {
                return match ack.codes.first() {
                    Some(&code) if code < 0x80 => Ok(()),
                    Some(&code) => Err(Failure::SubAck(Some(code))),
                    None => Err(Failure::Protocol("empty suback".to_owned())),
                };
            }
            Some(Packet::Disconnect(d)) => return Err(Failure::Disconnect(d.reason)),
            Some(_) => {}
            None => {}
        }
        tokio::time::timeout_at(deadline, conn.read_more())
            .await
            .map_err(|_| Failure::SubAck(None))??;
    }
}

/// A twin event: (sent at ns from its `value`, device index from its topic, its revision).
fn read_event(plan: &Plan, topic: &str, payload: &[u8]) -> Option<(u64, usize, u64)> {
    let name = topic.split('/').nth(1)?;
    let device = name
        .strip_prefix(plan.device_prefix.as_str())?
        .parse()
        .ok()?;
    let sent = json_number_after(payload, br#""value":"#)?;
    let revision = json_number_after(payload, br#""revision":"#).unwrap_or(0);
    Some((sent, device, revision))
}

/// Whether `filter` matches `topic` (MQTT §4.7; a shared subscription by its filter part):
/// the broker's own rule, `core::topics::matches`.
pub(super) fn filter_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, f)| f),
        None => filter,
    };
    crate::core::topics::matches(filter, topic)
}

/// The live line on stderr: connections, and per second sent, received and errors.
async fn progress(shared: Arc<Shared>, every: Duration) {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last = (0u64, 0u64, 0u64);
    let mut last_at = Instant::now();
    let mut interval = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        interval.tick().await;
        let phase = shared.phase();
        let now = Instant::now();
        let seconds = now.duration_since(last_at).as_secs_f64().max(1e-9);
        last_at = now;
        let counts = (
            shared.sent.load(Ordering::Relaxed),
            shared.received.load(Ordering::Relaxed),
            shared.errors.load(Ordering::Relaxed),
        );
        let rate = |now: u64, before: u64| (now.saturating_sub(before)) as f64 / seconds;
        let line = format!(
            "[{:>6.1}s] {:<10} devices {}/{} subscribers {} | sent {:.0}/s received {:.0}/s \
             errors {:.0}/s | total sent {} received {}",
            started.elapsed().as_secs_f64(),
            match phase {
                Phase::Connecting => "connecting",
                Phase::Publishing => "publishing",
                Phase::Draining => "draining",
                Phase::Done => "done",
            },
            shared.devices_connected.load(Ordering::Relaxed),
            shared.feedback.len(),
            shared.subscribers_connected.load(Ordering::Relaxed),
            rate(counts.0, last.0),
            rate(counts.1, last.1),
            rate(counts.2, last.2),
            counts.0,
            counts.1,
        );
        last = counts;
        let mut err = std::io::stderr().lock();
        let _ = if terminal {
            write!(err, "\r\x1b[K{line}")
        } else {
            writeln!(err, "{line}")
        };
        if phase == Phase::Done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{Go, Rate, Schedule, filter_matches};

    #[test]
    fn a_paced_schedule_spreads_devices_and_catches_up() {
        let start = Instant::now();
        let go = Go {
            start,
            deadline: start + Duration::from_secs(10),
            drain_deadline: start + Duration::from_secs(15),
        };
        // 10 msg/s: device 5 of 10 starts half a period (50 ms) late.
        let mut s = Schedule::new(Rate::PerSecond(10.0), &go, 5, 10);
        assert_eq!(s.due(start), 0);
        assert_eq!(s.due(start + Duration::from_millis(50)), 1);
        // 250 ms behind its first message: three are due at once.
        assert_eq!(s.due(start + Duration::from_millis(300)), 3);
        s.advance(3);
        assert_eq!(s.due(start + Duration::from_millis(300)), 0);
        assert_eq!(s.next_due, start + Duration::from_millis(350));
        // A closed loop or an idle device is never held back.
        assert_eq!(Schedule::new(Rate::Max, &go, 5, 10).due(start), u64::MAX);
        assert_eq!(Schedule::new(Rate::Idle, &go, 5, 10).due(start), u64::MAX);
    }

    #[test]
    fn the_seen_window_tells_duplicates_from_late_messages() {
        use super::{Seen, SeenWindow};
        let mut w = SeenWindow::default();
        assert_eq!(w.see(5), Seen::First);
        assert_eq!(w.see(7), Seen::First);
        assert_eq!(w.see(6), Seen::Late);
        assert_eq!(w.see(6), Seen::Again);
        assert_eq!(w.see(7), Seen::Again);
        assert_eq!(w.see(5), Seen::Again);
        assert_eq!(w.see(4), Seen::Late);
        assert_eq!(w.see(400), Seen::First);
        assert_eq!(w.see(8), Seen::Late);
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(filter_matches("bench/+/temp", "bench/dev-1/temp"));
        assert!(!filter_matches("bench/+/temp", "bench/dev-1/hum"));
        assert!(filter_matches("bench/#", "bench"));
        assert!(filter_matches("#", "a/b"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("$share/g/bench/+/t", "bench/1/t"));
        assert!(!filter_matches("a/b", "a/b/c"));
    }
}
