//! `thingsgate bench compare`: Thingsgate side by side with Mosquitto (and rumqttd, and
//! RabbitMQ for AMQP) in one run on one machine, driven by the same load generator
//! (`bench run`), each broker started fresh for each measurement, its CPU and memory read from
//! `/proc`; a table of medians (min–max) with the ratios Thingsgate / the best peer.
//!
//! # Layout
//! - this file: the command line, the scenarios (what `bench run` is asked to do, per broker),
//!   the loop over runs × scenarios × brokers (alternating brokers within each run), and the
//!   table.
//! - `brokers`: starting and stopping each broker in its own directory on its own port
//!   (Mosquitto with a password file and an ACL), `/proc` readings.
//! - `generator`: spawning `bench run` processes and probing the broker at their phases (ramp
//!   over, publishing over, done), so CPU is counted over the publishing window only.

mod brokers;
mod generator;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

pub use brokers::BrokerKind;
use brokers::{Credentials, Programs, Running};

use super::thousands;
use generator::Job;

/// Devices of the throughput scenarios (DESIGN.md §10: 100 devices → one wildcard subscriber).
const THROUGHPUT_DEVICES: usize = 100;
/// Devices of the paced scenario, and their rate.
const PACED_DEVICES: usize = 1_000;
const PACED_RATE: u32 = 20;
/// Connections of the connect storm.
const STORM_CONNECTIONS: usize = 2_000;
/// Connections per second of the idle ramp, over all generator processes: what every broker
/// here takes without connect timeouts (rumqttd accepts on one thread).
const IDLE_CONNECT_RATE: usize = 2_000;
/// Source addresses of the connect storm (`storm_sources`).
const STORM_ADDRESSES: usize = 32;
/// Connections one generator process holds at most in the idle scenario (its own open-file
/// limit is 20,000, and several processes spread the ramp over the cores).
const IDLE_PER_PROCESS: usize = 5_000;
/// How long idle connections are held once all are up: `--duration` within these bounds
/// (the memory is read a second after the ramp).
const IDLE_HOLD_MIN: f64 = 3.0;
const IDLE_HOLD_MAX: f64 = 8.0;
/// The closed loop's window per device.
const INFLIGHT: usize = 10;
const PAYLOAD: usize = 64;

/// A workload of `bench compare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 100 devices → 1 wildcard subscriber, plain topics, QoS 0, closed loop.
    Qos0,
    /// The same at QoS 1.
    Qos1,
    /// 100 devices → 1 subscriber of their events, compact twin updates, QoS 0 (Thingsgate).
    TwinQos0,
    /// The same at QoS 1 (every update durable before its PUBACK and event).
    TwinQos1,
    /// 1,000 devices × 20 msg/s → 1 subscriber, plain topics, QoS 0: latency and broker CPU.
    Paced,
    /// The same as twin updates (Thingsgate).
    TwinPaced,
    /// N idle authenticated connections (`--idle-connections`): broker memory per connection.
    Idle,
    /// 2,000 connections as fast as they are accepted, with the broker's password check
    /// (Thingsgate: a solution secret).
    ConnectSecret,
    /// The same with a JWT per connection (Thingsgate).
    ConnectJwt,
    /// 100 AMQP 0.9.1 publishers → 1 consumer, no confirms (Thingsgate, RabbitMQ).
    AmqpQos0,
    /// The same with publisher confirms and persistent messages.
    AmqpQos1,
}

impl Scenario {
    const ALL: [Scenario; 11] = [
        Scenario::Qos0,
        Scenario::Qos1,
        Scenario::TwinQos0,
        Scenario::TwinQos1,
        Scenario::Paced,
        Scenario::TwinPaced,
        Scenario::Idle,
        Scenario::ConnectSecret,
        Scenario::ConnectJwt,
        Scenario::AmqpQos0,
        Scenario::AmqpQos1,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Qos0 => "qos0",
            Scenario::Qos1 => "qos1",
            Scenario::TwinQos0 => "twin-qos0",
            Scenario::TwinQos1 => "twin-qos1",
            Scenario::Paced => "paced",
            Scenario::TwinPaced => "twin-paced",
            Scenario::Idle => "idle",
            Scenario::ConnectSecret => "connect-secret",
            Scenario::ConnectJwt => "connect-jwt",
            Scenario::AmqpQos0 => "amqp-qos0",
            Scenario::AmqpQos1 => "amqp-qos1",
        }
    }

    fn title(self, idle: usize) -> String {
        match self {
            Scenario::Qos0 => "100 devices → 1 wildcard subscriber, plain topics, QoS 0".into(),
            Scenario::Qos1 => "100 devices → 1 wildcard subscriber, plain topics, QoS 1".into(),
            Scenario::TwinQos0 => "100 devices → 1 subscriber, twin updates → events, QoS 0".into(),
            Scenario::TwinQos1 => {
                "100 devices → 1 subscriber, twin updates → events, QoS 1 (durable)".into()
            }
            Scenario::Paced => {
                "1,000 devices × 20 msg/s → 1 subscriber, plain topics, QoS 0".into()
            }
            Scenario::TwinPaced => {
                "1,000 devices × 20 msg/s → 1 subscriber, twin updates, QoS 0".into()
            }
            Scenario::Idle => format!("{idle} idle authenticated connections"),
            Scenario::ConnectSecret => {
                "connect storm, 2,000 connections, password (solution secret)".into()
            }
            Scenario::ConnectJwt => "connect storm, 2,000 connections, a JWT each".into(),
            Scenario::AmqpQos0 => "100 AMQP publishers → 1 consumer, no confirms".into(),
            Scenario::AmqpQos1 => "100 AMQP publishers → 1 consumer, confirms, persistent".into(),
        }
    }

    /// The brokers that can run it.
    fn runs_on(self, broker: BrokerKind) -> bool {
        use BrokerKind as B;
        match self {
            Scenario::Qos0 | Scenario::Qos1 | Scenario::Paced | Scenario::Idle => {
                matches!(
                    broker,
                    B::Thingsgate
                        | B::ThingsgateBaseline
                        | B::ThingsgateCluster
                        | B::ThingsgateCluster3
                        | B::Mosquitto
                        | B::MosquittoNodelay
                        | B::Rumqttd
                )
            }
            // rumqttd has no authentication: a connect storm there measures something else.
            Scenario::ConnectSecret => matches!(
                broker,
                B::Thingsgate
                    | B::ThingsgateBaseline
                    | B::ThingsgateCluster
                    | B::ThingsgateCluster3
                    | B::Mosquitto
                    | B::MosquittoNodelay
            ),
            Scenario::TwinQos0
            | Scenario::TwinQos1
            | Scenario::TwinPaced
            | Scenario::ConnectJwt => matches!(
                broker,
                B::Thingsgate
                    | B::ThingsgateBaseline
                    | B::ThingsgateCluster
                    | B::ThingsgateCluster3
            ),
            Scenario::AmqpQos0 | Scenario::AmqpQos1 => {
                matches!(broker, B::Thingsgate | B::ThingsgateBaseline | B::Rabbitmq)
            }
        }
    }

    fn twin(self) -> bool {
        matches!(
            self,
            Scenario::TwinQos0 | Scenario::TwinQos1 | Scenario::TwinPaced
        )
    }

    fn amqp(self) -> bool {
        matches!(self, Scenario::AmqpQos0 | Scenario::AmqpQos1)
    }

    /// What the table shows for it.
    fn kind(self) -> Kind {
        match self {
            Scenario::Paced | Scenario::TwinPaced => Kind::Paced,
            Scenario::Idle => Kind::Idle,
            Scenario::ConnectSecret | Scenario::ConnectJwt => Kind::Storm,
            _ => Kind::Throughput,
        }
    }

    /// For a Thingsgate-only scenario: the scenario whose best peer figure it is compared with
    /// (twin updates against the peers' plain topics, as DESIGN.md §10 states its targets).
    fn peer_scenario(self) -> Scenario {
        match self {
            Scenario::TwinQos0 => Scenario::Qos0,
            Scenario::TwinQos1 => Scenario::Qos1,
            Scenario::TwinPaced => Scenario::Paced,
            Scenario::ConnectJwt => Scenario::ConnectSecret,
            other => other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Throughput,
    Paced,
    Idle,
    Storm,
}

/// Arguments of `bench compare`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct CompareArgs {
    /// Scenarios, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenarios: Vec<Scenario>,
    /// Brokers, comma-separated [default: thingsgate, mosquitto, mosquitto-nodelay, rabbitmq,
    /// and rumqttd when its baseline binary is built].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub brokers: Vec<BrokerKind>,
    /// Rounds; each runs every scenario on every broker once, brokers alternating.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds of publishing per measurement (at most 600).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Connections of the idle scenario (at most 19,000: the open-file limit of a broker
    /// process here is 20,000).
    #[arg(long, default_value_t = 10_000)]
    pub idle_connections: usize,
    /// The Thingsgate binary to measure (and whose `bench run` drives every broker)
    /// [default: this binary].
    #[arg(long, value_name = "PATH")]
    pub thingsgate: Option<PathBuf>,
    /// An earlier Thingsgate build to measure beside this one, as the broker
    /// `thingsgate-baseline` (added to the default brokers when given): before/after figures
    /// from one run, brokers alternating.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// The Mosquitto binary [default: `mosquitto` on PATH, else /usr/sbin/mosquitto].
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
    /// The rumqttd baseline binary [default: bench/rumqttd-baseline/target/release/rumqttd-baseline].
    #[arg(long, value_name = "PATH")]
    pub rumqttd: Option<PathBuf>,
    /// Print everything measured as one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep the brokers' directories (configs, data, logs) here instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
}

const AFTER_HELP: &str = "\
Each measurement starts its broker fresh (Thingsgate: a new data directory with one solution;
Mosquitto: a password file with one user and an ACL giving each device its own topic, on its own
port; rumqttd: no authentication; RabbitMQ: the one running on this machine), runs `bench run`
against it and stops it. The broker's CPU is read from /proc over the publishing window, its
memory when the connections are up. The table shows medians (min-max) over --runs rounds and
the ratio Thingsgate / the best peer; twin updates are compared with the peers' plain topics.

Examples:
  thingsgate bench compare                       # everything, 3 rounds (about 25 minutes)
  thingsgate bench compare --scenarios qos0,qos1 --runs 1 --duration 5
  thingsgate bench compare --scenarios idle --idle-connections 19000 --brokers thingsgate,mosquitto";

/// One measurement: a scenario on a broker.
#[derive(Debug, Clone)]
struct Sample {
    scenario: Scenario,
    broker: BrokerKind,
    round: usize,
    figures: Figures,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    sent: u64,
    received: u64,
    lost: u64,
    errors: u64,
    /// Failures reported by the generators, by kind.
    errors_by_kind: std::collections::BTreeMap<String, u64>,
    received_per_second: f64,
    /// Messages received per second of broker CPU over the publishing window.
    per_core_second: f64,
    /// Broker CPU as a percentage of one core over the publishing window.
    broker_cpu_percent: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    connections: u64,
    connects_per_second: f64,
    /// Broker CPU per connection during the ramp.
    broker_cpu_us_per_connect: f64,
    /// (RSS with the connections up − RSS at start) / connections.
    bytes_per_connection: f64,
    broker_rss_mib: f64,
    /// Files the broker had open a second after the ramp (sockets: the connections it holds).
    broker_open_files: usize,
    generator_cpu_percent: f64,
}

/// Runs `bench compare`.
pub fn main(args: CompareArgs) -> anyhow::Result<ExitCode> {
    if !(1..=20).contains(&args.runs) {
        bail!("--runs must be between 1 and 20");
    }
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= 600.0) {
        bail!("--duration must be more than 0 and at most 600 seconds");
    }
    if !(1..=19_000).contains(&args.idle_connections) {
        bail!("--idle-connections must be between 1 and 19,000");
    }
    let programs = programs(&args)?;
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let brokers = if args.brokers.is_empty() {
        let mut all = vec![BrokerKind::Thingsgate];
        if programs.baseline.is_some() {
            all.push(BrokerKind::ThingsgateBaseline);
        }
        all.extend([BrokerKind::Mosquitto, BrokerKind::MosquittoNodelay]);
        if programs.rumqttd.exists() {
            all.push(BrokerKind::Rumqttd);
        } else {
            eprintln!(
                "rumqttd left out: `{}` is not built (cargo build --release --manifest-path \
                 bench/rumqttd-baseline/Cargo.toml)",
                programs.rumqttd.display()
            );
        }
        all.push(BrokerKind::Rabbitmq);
        all
    } else {
        args.brokers.clone()
    };
    if brokers.contains(&BrokerKind::ThingsgateBaseline) && programs.baseline.is_none() {
        bail!("the broker thingsgate-baseline needs --baseline PATH (an earlier Thingsgate build)");
    }
    let temp;
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create `{}`", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("thingsgate-compare-")
                .tempdir()
                .context("cannot create a temporary directory")?;
            temp.path().to_path_buf()
        }
    };

    let mut samples = Vec::new();
    let mut failures = Vec::new();
    for round in 0..args.runs {
        for &scenario in &scenarios {
            for &broker in brokers.iter().filter(|b| scenario.runs_on(**b)) {
                let dir = work.join(format!(
                    "{}-{}-{}",
                    round + 1,
                    scenario.name(),
                    broker.name().replace(' ', "-").to_lowercase()
                ));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create `{}`", dir.display()))?;
                eprint!(
                    "round {}/{} {} on {}: ",
                    round + 1,
                    args.runs,
                    scenario.name(),
                    broker.name()
                );
                match measure(scenario, broker, &programs, &dir, &args) {
                    Ok(figures) => {
                        eprintln!("{}", one_line(scenario, &figures));
                        samples.push(Sample {
                            scenario,
                            broker,
                            round,
                            figures,
                        });
                    }
                    Err(e) => {
                        eprintln!("failed: {e:#}");
                        failures.push(json!({
                            "round": round + 1,
                            "scenario": scenario.name(),
                            "broker": broker.name(),
                            "error": format!("{e:#}"),
                        }));
                    }
                }
            }
        }
    }

    if args.json {
        let all: Vec<Value> = samples
            .iter()
            .map(|s| {
                json!({
                    "round": s.round + 1,
                    "scenario": s.scenario.name(),
                    "broker": s.broker.name(),
                    "figures": s.figures,
                })
            })
            .collect();
        let doc = json!({
            "machine": machine(),
            "runs": args.runs,
            "duration": args.duration,
            "samples": all,
            "failures": failures,
        });
        println!("{doc}");
    } else {
        print!(
            "{}",
            table(&scenarios, &brokers, &samples, args.idle_connections)
        );
        println!();
        println!(
            "{} ({} round(s), {} s each; medians, min-max in parentheses)",
            machine(),
            args.runs,
            args.duration
        );
        for f in &failures {
            println!(
                "failed: round {} {} on {}: {}",
                f["round"],
                f["scenario"].as_str().unwrap_or_default(),
                f["broker"].as_str().unwrap_or_default(),
                f["error"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(if samples.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn programs(args: &CompareArgs) -> anyhow::Result<Programs> {
    let thingsgate = match &args.thingsgate {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this binary")?,
    };
    let on_path = |name: &str| -> PathBuf {
        std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| Path::new("/usr/sbin").join(name))
    };
    let mosquitto = args
        .mosquitto
        .clone()
        .unwrap_or_else(|| on_path("mosquitto"));
    let mosquitto_passwd = mosquitto
        .parent()
        .map(|d| d.join("mosquitto_passwd"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| on_path("mosquitto_passwd"));
    if let Some(baseline) = &args.baseline
        && !baseline.is_file()
    {
        bail!("the baseline build `{}` does not exist", baseline.display());
    }
    Ok(Programs {
        thingsgate,
        baseline: args.baseline.clone(),
        mosquitto,
        mosquitto_passwd,
        nats_server: on_path("nats-server"),
        rumqttd: args
            .rumqttd
            .clone()
            .unwrap_or_else(|| PathBuf::from(brokers::RUMQTTD_DEFAULT)),
    })
}

/// Starts `broker` fresh, prepares it (twin scenarios: the things), runs the generators, stops
/// it; the figures.
fn measure(
    scenario: Scenario,
    kind: BrokerKind,
    programs: &Programs,
    dir: &Path,
    args: &CompareArgs,
) -> anyhow::Result<Figures> {
    let mut broker = Running::start(kind, programs, dir)?;
    let devices = match scenario.kind() {
        Kind::Throughput => THROUGHPUT_DEVICES,
        Kind::Paced => PACED_DEVICES,
        Kind::Idle => args.idle_connections,
        Kind::Storm => STORM_CONNECTIONS,
    };
    if scenario.twin() {
        provision(programs, &broker, devices)?;
    }
    let jobs = jobs(scenario, &broker, devices, args.duration)?;
    let limit = Duration::from_secs_f64(args.duration) + Duration::from_secs(120);
    let before = broker.cpu_seconds_each();
    let outcome = generator::run(&programs.thingsgate, &mut broker, &jobs, limit)?;
    if let [nodes @ .., nats] = broker.cpu_seconds_each().as_slice()
        && kind.is_thingsgate_variant()
        && kind != BrokerKind::ThingsgateBaseline
    {
        // Where a cluster's CPU went (for projecting a deployment on separate machines).
        let spent = |i: usize, now: f64| now - before.get(i).copied().unwrap_or(0.0);
        let nodes: Vec<String> = nodes
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:.2}", spent(i, *c)))
            .collect();
        eprintln!(
            "  CPU seconds of the run: node(s) {}, NATS server {:.2}",
            nodes.join(" + "),
            spent(before.len().saturating_sub(1), *nats)
        );
    }
    Ok(figures(scenario, &broker, &outcome))
}

/// `bench provision` of `things` things (and one subscriber) in the run's solution.
fn provision(programs: &Programs, broker: &Running, things: usize) -> anyhow::Result<()> {
    let (Some(http), Credentials::Solution { id, secret, .. }) = (broker.http, &broker.credentials)
    else {
        bail!("twin scenarios need Thingsgate's HTTP listener and a solution");
    };
    let out = std::process::Command::new(&programs.thingsgate)
        .args(["bench", "provision", "--json", "--http"])
        .arg(format!("http://{http}"))
        .args(["--solution", id, "--namespace", brokers::NAMESPACE])
        .args(["--things", &things.to_string(), "--subscribers", "1"])
        .env("THINGSGATE_SECRET", secret)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run bench provision")?;
    if !out.status.success() {
        bail!(
            "bench provision failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The generator processes of a measurement.
fn jobs(
    scenario: Scenario,
    broker: &Running,
    devices: usize,
    duration: f64,
) -> anyhow::Result<Vec<Job>> {
    let url = if scenario.amqp() {
        format!(
            "amqp://{}",
            broker.amqp.context("the broker has no AMQP listener")?
        )
    } else if broker.mqtt_all.len() > 1 {
        // A cluster: devices spread over its nodes.
        broker
            .mqtt_all
            .iter()
            .map(|a| format!("mqtt://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        format!(
            "mqtt://{}",
            broker.mqtt.context("the broker has no MQTT listener")?
        )
    };
    let mut args: Vec<String> = vec!["--url".into(), url];
    let mut env = Vec::new();
    match (&broker.credentials, scenario) {
        (Credentials::Anonymous, _) => {}
        (Credentials::Plain { username, password }, _) => {
            args.extend(["--username".into(), username.clone()]);
            args.extend(["--password-env".into(), "BENCH_PASSWORD".into()]);
            env.push(("BENCH_PASSWORD".to_owned(), password.clone()));
        }
        (Credentials::Solution { id, jwt_key, .. }, Scenario::ConnectJwt) => {
            args.extend(["--jwt-key".into(), jwt_key.display().to_string()]);
            args.extend(["--jwt-iss".into(), brokers::JWT_ISSUER.into()]);
            args.extend(["--jwt-aud".into(), brokers::JWT_AUDIENCE.into()]);
            args.extend([
                "--jwt-claim".into(),
                format!("{}={id}", brokers::JWT_SOLUTION_CLAIM),
            ]);
        }
        (Credentials::Solution { id, secret, .. }, _) => {
            args.extend(["--solution".into(), id.clone()]);
            env.push(("THINGSGATE_SECRET".to_owned(), secret.clone()));
        }
    }
    if !scenario.amqp() {
        // The one MQTT version every peer speaks (rumqttd's v5 is partial).
        args.extend(["--protocol".into(), "3.1.1".into()]);
    }
    if scenario.twin() {
        args.extend(["--twin".into(), brokers::NAMESPACE.into()]);
    }
    let qos = match scenario {
        Scenario::Qos1 | Scenario::TwinQos1 | Scenario::AmqpQos1 => "1",
        _ => "0",
    };
    let common = |args: &mut Vec<String>| {
        args.extend(["--payload-size".into(), PAYLOAD.to_string()]);
        args.extend(["--qos".into(), qos.into()]);
    };
    let one = |args: Vec<String>| {
        vec![Job {
            args,
            env: env.clone(),
        }]
    };
    Ok(match scenario.kind() {
        Kind::Throughput => {
            common(&mut args);
            args.extend(
                [
                    "--devices",
                    &devices.to_string(),
                    "--subscribers",
                    "1",
                    "--rate",
                    "max",
                    "--inflight",
                    &INFLIGHT.to_string(),
                    "--duration",
                    &duration.to_string(),
                    "--connect-rate",
                    "2000",
                ]
                .map(String::from),
            );
            one(args)
        }
        Kind::Paced => {
            common(&mut args);
            args.extend(
                [
                    "--devices",
                    &devices.to_string(),
                    "--subscribers",
                    "1",
                    "--rate",
                    &PACED_RATE.to_string(),
                    "--duration",
                    &duration.to_string(),
                    "--connect-rate",
                    "2000",
                ]
                .map(String::from),
            );
            one(args)
        }
        Kind::Storm => {
            args.extend(
                [
                    "--devices",
                    &devices.to_string(),
                    "--subscribers",
                    "0",
                    "--rate",
                    "idle",
                    "--duration",
                    "1",
                    "--connect-rate",
                    "100000",
                    "--drain",
                    "0.1",
                    "--source-addresses",
                    &storm_sources(),
                ]
                .map(String::from),
            );
            one(args)
        }
        Kind::Idle => {
            let processes = devices.div_ceil(IDLE_PER_PROCESS).max(1);
            (0..processes)
                .map(|p| {
                    let share = devices / processes + usize::from(p < devices % processes);
                    let mut args = args.clone();
                    args.extend(
                        [
                            "--devices",
                            &share.to_string(),
                            "--subscribers",
                            "0",
                            "--rate",
                            "idle",
                            "--duration",
                            &duration.clamp(IDLE_HOLD_MIN, IDLE_HOLD_MAX).to_string(),
                            "--connect-rate",
                            &(IDLE_CONNECT_RATE / processes).max(100).to_string(),
                            "--device-prefix",
                            &format!("idle{p}-"),
                            "--source-addresses",
                            &idle_sources(p),
                            "--drain",
                            "0.1",
                        ]
                        .map(String::from),
                    );
                    Job {
                        args,
                        env: env.clone(),
                    }
                })
                .collect()
        }
    })
}

/// The source addresses of idle generator process `p`: 127.0.`p + 2`.1 … .16. Each process
/// has ports enough on one address; sixteen keep each address under Thingsgate's 128
/// unfinished handshakes per address while the broker is busy with the ramp (see
/// `storm_sources`).
fn idle_sources(p: usize) -> String {
    (1..=16)
        .map(|i| format!("127.0.{}.{i}", p + 2))
        .collect::<Vec<_>>()
        .join(",")
}

/// The storm's devices come from [`STORM_ADDRESSES`] loopback addresses, as a fleet's devices
/// come from many: Thingsgate lets each source address hold at most 128 handshakes at once (a
/// slowloris from one address cannot take every slot), so 2,000 connects at once from one
/// address would measure that defence instead of the connect path.
fn storm_sources() -> String {
    (0..STORM_ADDRESSES)
        .map(|i| format!("127.0.1.{}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// The figures of one measurement from the generators' reports and the broker's probes.
fn figures(scenario: Scenario, broker: &Running, outcome: &generator::Outcome) -> Figures {
    let sum = |path: &[&str]| -> u64 {
        outcome
            .reports
            .iter()
            .map(|r| {
                path.iter()
                    .fold(r, |v, k| &v[*k])
                    .as_u64()
                    .unwrap_or_default()
            })
            .sum()
    };
    let first = |path: &[&str]| -> f64 {
        outcome
            .reports
            .first()
            .map(|r| path.iter().fold(r, |v, k| &v[*k]))
            .and_then(Value::as_f64)
            .unwrap_or_default()
    };
    let max = |path: &[&str]| -> f64 {
        outcome
            .reports
            .iter()
            .filter_map(|r| path.iter().fold(r, |v, k| &v[*k]).as_f64())
            .fold(0.0, f64::max)
    };
    let errors: u64 = outcome
        .reports
        .iter()
        .filter_map(|r| r["errors"].as_object())
        .flat_map(|e| e.values())
        .filter_map(Value::as_u64)
        .sum();
    let mut errors_by_kind = std::collections::BTreeMap::new();
    for (kind, n) in outcome
        .reports
        .iter()
        .filter_map(|r| r["errors"].as_object())
        .flat_map(|e| e.iter())
    {
        *errors_by_kind.entry(kind.clone()).or_insert(0) += n.as_u64().unwrap_or_default();
    }
    let received = sum(&["messages", "received"]);
    let (publishing, draining, done) = (&outcome.publishing, &outcome.draining, &outcome.done);
    let window_cpu = done.cpu_seconds - publishing.cpu_seconds;
    let publish_cpu = draining.cpu_seconds - publishing.cpu_seconds;
    let publish_wall = draining.at.duration_since(publishing.at).as_secs_f64();
    let connections =
        sum(&["connections", "devices_connected"]) + sum(&["connections", "subscribers_connected"]);
    let ramp_cpu = publishing.cpu_seconds - outcome.start.cpu_seconds;
    let connect_seconds = max(&["connections", "connect_seconds"]);
    let held = outcome.settled.rss.max(outcome.publishing.rss);
    let bytes_per_connection = if scenario.kind() == Kind::Idle && connections > 0 {
        held.saturating_sub(broker.rss_at_start) as f64 / connections as f64
    } else {
        0.0
    };
    Figures {
        sent: sum(&["messages", "sent"]),
        received,
        lost: sum(&["messages", "lost"]),
        errors,
        errors_by_kind,
        received_per_second: first(&["throughput", "received_per_second"]),
        per_core_second: if window_cpu > 0.0 {
            received as f64 / window_cpu
        } else {
            0.0
        },
        broker_cpu_percent: if publish_wall > 0.0 {
            100.0 * publish_cpu / publish_wall
        } else {
            0.0
        },
        p50_ms: first(&["latency_ms", "p50"]),
        p99_ms: first(&["latency_ms", "p99"]),
        max_ms: first(&["latency_ms", "max"]),
        connections,
        connects_per_second: if connect_seconds > 0.0 {
            connections as f64 / connect_seconds
        } else {
            0.0
        },
        broker_cpu_us_per_connect: if connections > 0 {
            1e6 * ramp_cpu / connections as f64
        } else {
            0.0
        },
        bytes_per_connection,
        broker_rss_mib: held.max(draining.rss) as f64 / (1024.0 * 1024.0),
        broker_open_files: outcome.settled.open_files,
        generator_cpu_percent: outcome
            .reports
            .iter()
            .filter_map(|r| {
                r.pointer("/generator_cpu/percent_of_one_core")
                    .and_then(Value::as_f64)
            })
            .sum(),
    }
}

/// The progress line of one measurement.
fn one_line(scenario: Scenario, f: &Figures) -> String {
    let mut line = figures_line(scenario, f);
    if !f.errors_by_kind.is_empty() {
        let kinds: Vec<String> = f
            .errors_by_kind
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let _ = write!(line, " [{}]", kinds.join(", "));
    }
    line
}

fn figures_line(scenario: Scenario, f: &Figures) -> String {
    match scenario.kind() {
        Kind::Throughput => format!(
            "{} msg/s, {} per broker core-second, p99 {:.2} ms, broker {:.0}% CPU, lost {}, \
             generator {:.0}%",
            thousands(f.received_per_second),
            thousands(f.per_core_second),
            f.p99_ms,
            f.broker_cpu_percent,
            f.lost,
            f.generator_cpu_percent
        ),
        Kind::Paced => format!(
            "p50 {:.2} ms, p99 {:.2} ms, broker {:.1}% CPU, {} msg/s, lost {}",
            f.p50_ms,
            f.p99_ms,
            f.broker_cpu_percent,
            thousands(f.received_per_second),
            f.lost
        ),
        Kind::Idle => format!(
            "{} connections ({} files open in the broker), {} B each, {} connects/s, RSS {:.1} \
             MiB, errors {}",
            f.connections,
            f.broker_open_files,
            thousands(f.bytes_per_connection),
            thousands(f.connects_per_second),
            f.broker_rss_mib,
            f.errors
        ),
        Kind::Storm => format!(
            "{} connections, {} connects/s, {:.0} µs broker CPU each, errors {}",
            f.connections,
            thousands(f.connects_per_second),
            f.broker_cpu_us_per_connect,
            f.errors
        ),
    }
}

/// One metric of the table: its name, how to read it from figures, whether more is better.
struct Metric {
    name: &'static str,
    read: fn(&Figures) -> f64,
    higher_is_better: bool,
    format: fn(f64) -> String,
}

fn metrics(kind: Kind) -> Vec<Metric> {
    let count = |x: f64| thousands(x);
    let ms = |x: f64| format!("{x:.2}");
    let pct = |x: f64| format!("{x:.1}");
    match kind {
        Kind::Throughput => vec![
            Metric {
                name: "received msg/s",
                read: |f| f.received_per_second,
                higher_is_better: true,
                format: count,
            },
            Metric {
                name: "msg per broker core-second",
                read: |f| f.per_core_second,
                higher_is_better: true,
                format: count,
            },
            Metric {
                name: "p99 latency ms",
                read: |f| f.p99_ms,
                higher_is_better: false,
                format: ms,
            },
            Metric {
                name: "lost",
                read: |f| f.lost as f64,
                higher_is_better: false,
                format: count,
            },
        ],
        Kind::Paced => vec![
            Metric {
                name: "p99 latency ms",
                read: |f| f.p99_ms,
                higher_is_better: false,
                format: ms,
            },
            Metric {
                name: "broker CPU % of a core",
                read: |f| f.broker_cpu_percent,
                higher_is_better: false,
                format: pct,
            },
            Metric {
                name: "lost",
                read: |f| f.lost as f64,
                higher_is_better: false,
                format: count,
            },
        ],
        Kind::Idle => vec![
            Metric {
                name: "bytes per connection",
                read: |f| f.bytes_per_connection,
                higher_is_better: false,
                format: count,
            },
            Metric {
                name: "connections up",
                read: |f| f.connections as f64,
                higher_is_better: true,
                format: count,
            },
            Metric {
                name: "connects/s (ramp)",
                read: |f| f.connects_per_second,
                higher_is_better: true,
                format: count,
            },
        ],
        Kind::Storm => vec![
            Metric {
                name: "connects/s",
                read: |f| f.connects_per_second,
                higher_is_better: true,
                format: count,
            },
            Metric {
                name: "broker CPU µs per connect",
                read: |f| f.broker_cpu_us_per_connect,
                higher_is_better: false,
                format: |x| format!("{x:.0}"),
            },
        ],
    }
}

/// Median and range of `values` (not empty).
fn median_range(values: &mut [f64]) -> Option<(f64, f64, f64)> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = match n {
        0 => return None,
        n if n % 2 == 1 => *values.get(n / 2)?,
        n => (values.get(n / 2 - 1)? + values.get(n / 2)?) / 2.0,
    };
    Some((median, *values.first()?, *values.last()?))
}

fn cell(samples: &[&Sample], metric: &Metric) -> (Option<f64>, String) {
    let mut values: Vec<f64> = samples.iter().map(|s| (metric.read)(&s.figures)).collect();
    match median_range(&mut values) {
        None => (None, "–".to_owned()),
        Some((median, min, max)) if values.len() > 1 && min != max => (
            Some(median),
            format!(
                "{} ({}–{})",
                (metric.format)(median),
                (metric.format)(min),
                (metric.format)(max)
            ),
        ),
        Some((median, ..)) => (Some(median), (metric.format)(median)),
    }
}

/// The markdown table: per scenario and metric, one column per broker and the ratio Thingsgate
/// / the best peer (for a lower-is-better metric the ratio is still Thingsgate / peer: below 1
/// is better there).
fn table(
    scenarios: &[Scenario],
    brokers: &[BrokerKind],
    samples: &[Sample],
    idle: usize,
) -> String {
    // The baseline is a column (before/after), not a peer of the ratio.
    let peers: Vec<BrokerKind> = brokers
        .iter()
        .copied()
        .filter(|b| *b != BrokerKind::Thingsgate)
        .collect();
    let mut out = String::new();
    let _ = write!(out, "| scenario | metric | Thingsgate |");
    for p in &peers {
        let _ = write!(out, " {} |", p.name());
    }
    let _ = writeln!(out, " Thingsgate / best peer |");
    let _ = write!(out, "|---|---|---|");
    for _ in &peers {
        let _ = write!(out, "---|");
    }
    let _ = writeln!(out, "---|");
    let of = |scenario: Scenario, broker: BrokerKind| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.scenario == scenario && s.broker == broker)
            .collect()
    };
    for &scenario in scenarios {
        let peer_scenario = scenario.peer_scenario();
        for (i, metric) in metrics(scenario.kind()).iter().enumerate() {
            let title = if i == 0 {
                scenario.title(idle)
            } else {
                String::new()
            };
            let (ours, our_text) = cell(&of(scenario, BrokerKind::Thingsgate), metric);
            let _ = write!(out, "| {title} | {} | {our_text} |", metric.name);
            let mut best: Option<f64> = None;
            for &p in &peers {
                let baseline = p.is_thingsgate_variant();
                let their_scenario = if baseline { scenario } else { peer_scenario };
                let (value, text) = cell(&of(their_scenario, p), metric);
                let text = if their_scenario != scenario && value.is_some() {
                    format!("{text} (plain)")
                } else {
                    text
                };
                let _ = write!(out, " {text} |");
                if let Some(v) = value.filter(|_| !baseline) {
                    best = Some(match best {
                        None => v,
                        Some(b) if metric.higher_is_better => b.max(v),
                        Some(b) => b.min(v),
                    });
                }
            }
            let ratio = match (ours, best) {
                (Some(o), Some(b)) if b > 0.0 && metric.name != "lost" => format!("{:.2}×", o / b),
                _ => "–".to_owned(),
            };
            let _ = writeln!(out, " {ratio} |");
        }
    }
    out
}

/// The machine the figures come from, in one line.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    format!(
        "{date}, {cores} cores, Linux {}, loopback, {PAYLOAD}-byte payloads",
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        assert_eq!(median_range(&mut []), None);
        assert_eq!(median_range(&mut [3.0]), Some((3.0, 3.0, 3.0)));
        assert_eq!(median_range(&mut [5.0, 1.0, 3.0]), Some((3.0, 1.0, 5.0)));
        assert_eq!(
            median_range(&mut [4.0, 1.0, 2.0, 9.0]),
            Some((3.0, 1.0, 9.0))
        );
    }

    #[test]
    fn a_baseline_build_is_a_column_of_its_own_figures_and_not_a_peer_of_the_ratio() {
        let sample = |scenario, broker, per_core_second| Sample {
            scenario,
            broker,
            round: 0,
            figures: Figures {
                received_per_second: per_core_second,
                per_core_second,
                p99_ms: 1.0,
                ..Figures::default()
            },
        };
        let samples = vec![
            sample(Scenario::Qos0, BrokerKind::Thingsgate, 300_000.0),
            sample(Scenario::Qos0, BrokerKind::ThingsgateBaseline, 900_000.0),
            sample(Scenario::Qos0, BrokerKind::Mosquitto, 150_000.0),
            sample(Scenario::TwinQos0, BrokerKind::Thingsgate, 200_000.0),
            sample(Scenario::TwinQos0, BrokerKind::ThingsgateBaseline, 50_000.0),
        ];
        let brokers = [
            BrokerKind::Thingsgate,
            BrokerKind::ThingsgateBaseline,
            BrokerKind::Mosquitto,
        ];
        let text = table(
            &[Scenario::Qos0, Scenario::TwinQos0],
            &brokers,
            &samples,
            10,
        );
        assert!(text.contains("| Thingsgate baseline |"), "{text}");
        assert!(
            text.contains("| msg per broker core-second | 300,000 | 900,000 | 150,000 | 2.00× |"),
            "{text}"
        );
        // The baseline's own twin figure, the peer's plain one; the ratio against the peer.
        assert!(
            text.contains(
                "| msg per broker core-second | 200,000 | 50,000 | 150,000 (plain) | 1.33× |"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_table_compares_with_the_best_peer() {
        let sample = |scenario, broker, received_per_second, per_core_second| Sample {
            scenario,
            broker,
            round: 0,
            figures: Figures {
                received_per_second,
                per_core_second,
                p99_ms: 1.0,
                ..Figures::default()
            },
        };
        let samples = vec![
            sample(Scenario::Qos0, BrokerKind::Thingsgate, 200_000.0, 300_000.0),
            sample(Scenario::Qos0, BrokerKind::Mosquitto, 100_000.0, 150_000.0),
            sample(
                Scenario::Qos0,
                BrokerKind::MosquittoNodelay,
                160_000.0,
                200_000.0,
            ),
            sample(
                Scenario::TwinQos0,
                BrokerKind::Thingsgate,
                120_000.0,
                100_000.0,
            ),
        ];
        let brokers = [
            BrokerKind::Thingsgate,
            BrokerKind::Mosquitto,
            BrokerKind::MosquittoNodelay,
        ];
        let text = table(
            &[Scenario::Qos0, Scenario::TwinQos0],
            &brokers,
            &samples,
            10,
        );
        assert!(
            text.contains("| received msg/s | 200,000 | 100,000 | 160,000 | 1.25× |"),
            "{text}"
        );
        assert!(
            text.contains("| msg per broker core-second | 300,000 | 150,000 | 200,000 | 1.50× |"),
            "{text}"
        );
        // Twin updates against the peers' plain topics.
        assert!(
            text.contains(
                "| msg per broker core-second | 100,000 | 150,000 (plain) | 200,000 (plain) | 0.50× |"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_scenario_runs_on_thingsgate_and_names_itself() {
        for s in Scenario::ALL {
            assert!(s.runs_on(BrokerKind::Thingsgate), "{}", s.name());
            assert!(!s.title(10).is_empty());
        }
        assert!(!Scenario::TwinQos0.runs_on(BrokerKind::Mosquitto));
        assert!(Scenario::AmqpQos1.runs_on(BrokerKind::Rabbitmq));
        assert!(!Scenario::Qos0.runs_on(BrokerKind::Rabbitmq));
    }
}
