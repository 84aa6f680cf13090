//! `thingsgate bench run`: a load generator users can run against any MQTT broker (and against
//! Thingsgate's twins), so that figures come from a tool and not only from `cargo bench`.
//!
//! N devices, each its own connection, publish to M subscribers for a bounded time (or count);
//! the payload carries the send instant (nanoseconds since an `Instant` every task of this
//! process shares), so a subscriber's receipt is an end-to-end latency, recorded in an HDR
//! histogram. The run ends with a report as text or JSON (`docs/bench.md`).
//!
//! # Layout
//! - this file: the command line (`RunArgs`) and `main` (settings → run → report → exit code).
//! - `settings`: the scenario file, flags over it, validation (bad input exits 2), credentials.
//! - `client`: one MQTT connection on the broker's own codec: connect (TCP from a chosen local
//!   address, CONNECT, CONNACK, all bounded), pre-encoded PUBLISH templates patched per message,
//!   the payload stamp, failures by kind.
//! - `load`: the run — subscribers, the connect ramp, devices publishing (paced, or a closed
//!   loop), the drain, the live progress line.
//! - `amqp` (a child of `load`, sharing its state): AMQP 0.9.1 devices and subscribers on lapin
//!   for `--url amqp://…` — topics mapped to routing keys, confirms, acknowledgements, failures
//!   by kind.
//! - `report`: the figures and their text and JSON forms; the generator's own CPU.
//! - `timeline`: per interval, sent and received per second and latency percentiles, sampled
//!   without a lock of its own (the JSON `timeline`, the plot's series).
//! - `plot`: `--plot FILE.svg`, the timeline drawn (throughput above, latency below).
//! - `churn`: `--policy-churn`, one device policy changed through the HTTP API every period.
//!
//! The generator shares the machine with the broker, so it is cheap: one runtime thread by
//! default, PUBLISH packets encoded once per device and patched in place (packet identifier,
//! timestamp, sequence number), bursts written with one `write` each, deliveries decoded as
//! slices of the read buffer, latencies recorded under one lock per read batch.

mod churn;
mod client;
mod load;
mod plot;
mod report;
mod settings;
mod timeline;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::mqtt::codec::{Protocol, QoS};

pub use settings::Rate;

/// Arguments of `bench run`. Every option may also come from `--scenario FILE.toml` under the
/// same name in snake_case (`payload_size = 128`); flags override the file.
#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct RunArgs {
    /// A TOML scenario: the options below in snake_case (`devices = 100`, `rate = "max"`,
    /// `protocol = "3.1.1"`, `jwt_claim = ["k=v"]`); flags given as well override it.
    #[arg(long, value_name = "FILE.toml")]
    pub scenario: Option<PathBuf>,
    /// The broker: `mqtt://HOST:PORT`, or `amqp://HOST:PORT` for AMQP 0.9.1 devices and
    /// subscribers [default: mqtt://127.0.0.1:1883]. A host that is not on loopback is refused
    /// unless `--allow-remote`. The nodes of a cluster: a comma-separated list of MQTT URLs;
    /// device `i` connects to the `i`-th (round robin), subscribers each to the next node.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Allow a broker that is not on this machine's loopback.
    #[arg(long)]
    pub allow_remote: bool,
    /// MQTT version: `3.1.1` or `5` [default: 5].
    #[arg(long, value_name = "3.1.1|5", value_parser = settings::parse_protocol)]
    pub protocol: Option<Protocol>,
    /// Simulated devices, each its own connection, each publishing [default: 10].
    #[arg(long, value_name = "N")]
    pub devices: Option<usize>,
    /// Subscribers, each its own connection, each subscribed to `--filter` [default: 1].
    #[arg(long, value_name = "M")]
    pub subscribers: Option<usize>,
    /// QoS of the devices' PUBLISHes and of the subscriptions: 0, 1 or 2 (AMQP: 0 or 1,
    /// publisher confirms and acknowledgements) [default: 0].
    #[arg(long, value_name = "0|1|2", value_parser = settings::parse_qos)]
    pub qos: Option<QoS>,
    /// Messages per second per device, or `max`: a closed loop, each device keeping at most
    /// `--inflight` messages that the subscribers have not received yet (or, with no
    /// subscriber on its topic, that the broker has not acknowledged yet at QoS 1/2); or
    /// `idle`: devices hold their connections for the duration, keep-alive only
    /// [default: max].
    #[arg(long, value_name = "R|max|idle", value_parser = settings::parse_rate)]
    pub rate: Option<Rate>,
    /// The window of the closed loop (see `--rate`), and at QoS 1/2 also the most
    /// unacknowledged PUBLISHes a device keeps at any rate (capped by the broker's Receive
    /// Maximum) [default: 10].
    #[arg(long, value_name = "W")]
    pub inflight: Option<usize>,
    /// Payload bytes per message, at least 16 (timestamp, device, sequence number)
    /// [default: 64]. Twin mode: the JSON number padded with spaces, at least 20.
    #[arg(long, value_name = "BYTES")]
    pub payload_size: Option<usize>,
    /// The devices' topic; `{device}` is the device's name (prefix + index), `{index}` its
    /// index [default: bench/{device}/temp].
    #[arg(long, value_name = "TEMPLATE")]
    pub topic: Option<String>,
    /// The subscribers' topic filter [default: bench/+/temp; twin mode: the namespace's
    /// `modified` events of feature `temp`'s property `value`].
    #[arg(long, value_name = "FILTER")]
    pub filter: Option<String>,
    /// Twin mode: devices publish compact twin updates
    /// `NS/{device}/things/twin/commands/modify/features/temp/properties/value` (the things
    /// must exist), subscribers receive the `modified` events, so the loop closes on the event
    /// topic.
    #[arg(long, value_name = "NAMESPACE")]
    pub twin: Option<String>,
    /// How long devices publish, in seconds, at most 3600 [default: 10; with `--count` only:
    /// 3600, the run ends at the count].
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// Total messages over all devices (spread evenly); the run ends at the count or at
    /// `--duration`, whichever comes first.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Connections opened per second during the ramp [default: 500].
    #[arg(long, value_name = "R")]
    pub connect_rate: Option<f64>,
    /// Device names: prefix + index; the name is the client ID, `{device}` and the JWT `sub`
    /// [default: dev-].
    #[arg(long, value_name = "PREFIX")]
    pub device_prefix: Option<String>,
    /// Plain user name (other brokers' password files); the password comes from the
    /// environment variable named by `--password-env`, never from a flag.
    #[arg(long, value_name = "U", conflicts_with_all = ["solution", "jwt_key"])]
    pub username: Option<String>,
    /// The environment variable holding the password of `--username`.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// A Thingsgate solution ID: user name = the ID, password = the solution secret from the
    /// environment variable THINGSGATE_SECRET.
    #[arg(long, value_name = "ID", conflicts_with = "jwt_key")]
    pub solution: Option<String>,
    /// Mint one JWT per connection with this PKCS#8 PEM private key (`sub` = the client ID),
    /// sent as the password.
    #[arg(long, value_name = "FILE.pem")]
    pub jwt_key: Option<PathBuf>,
    /// The `iss` claim of the minted tokens (a configured issuer).
    #[arg(long, value_name = "ISS")]
    pub jwt_iss: Option<String>,
    /// The `aud` claim of the minted tokens (repeat for several).
    #[arg(long, value_name = "AUD")]
    pub jwt_aud: Vec<String>,
    /// An extra claim `K=V` of the minted tokens (V as JSON if it parses; repeatable), e.g. the
    /// issuer's solution claim.
    #[arg(long, value_name = "K=V")]
    pub jwt_claim: Vec<String>,
    /// The environment variable holding the solution's API token, for an issuer without a
    /// solution claim: MQTT 5 user property `x-cr-api-token`, or the user name in 3.1.1.
    #[arg(long, value_name = "VAR")]
    pub api_token_env: Option<String>,
    /// Local addresses to bind connections to, round-robin (`127.0.0.1,127.0.0.2`): one address
    /// has about 28,000 ports towards one broker port [default: 127.0.0.1 … as many loopback
    /// addresses as that needs, for a loopback broker].
    #[arg(long, value_name = "IP,IP,…", value_delimiter = ',')]
    pub source_addresses: Vec<std::net::IpAddr>,
    /// Seconds to wait after publishing for messages still on their way; what has not arrived
    /// then is lost [default: 5].
    #[arg(long, value_name = "SECONDS")]
    pub drain: Option<f64>,
    /// Runtime threads of the generator: 1 (the default) or 2 [default: 1].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
    /// Seconds between progress lines (on stderr) [default: 1].
    #[arg(long, value_name = "SECONDS")]
    pub report_every: Option<f64>,
    /// Print `phase publishing`, `phase draining` and `phase done` lines on stderr as the run
    /// moves on (for `bench compare`, which samples the broker's CPU and memory at those
    /// instants).
    #[arg(long, hide = true)]
    pub phase_marks: bool,
    /// Write the run's timeline as an SVG: messages sent and received per second above,
    /// latency p50/p99/max per interval below (log scale), the ramp and the drain shaded. The
    /// directory must exist. The same series is the JSON report's `timeline`.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Twin mode with `--solution`: while devices publish, every SECONDS write an entry
    /// `bench-churn` (a subject no client holds) into one device's policy `NS:<device>`,
    /// round-robin, through `--http`: the broker recompiles the policy, the run's rights stay
    /// the same. The report counts the changes, the failures and their HTTP round trip.
    #[arg(long, value_name = "SECONDS")]
    pub policy_churn: Option<f64>,
    /// Thingsgate's HTTP API for `--policy-churn`, e.g. `http://127.0.0.1:8080` (plain HTTP;
    /// this machine only unless `--allow-remote`); the secret is THINGSGATE_SECRET.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
}

const AFTER_HELP: &str = "\
Examples:
  # Against `thingsgate serve --dev` (it prints a solution ID and secret):
  THINGSGATE_SECRET=<secret> thingsgate bench run --solution <id> --devices 100 --duration 10
  # Twin updates (the things NS:dev-0 … must exist and grant the solution's subject):
  THINGSGATE_SECRET=<secret> thingsgate bench run --solution <id> --twin org.acme --devices 10
  # Against Mosquitto on this machine, MQTT 3.1.1, QoS 1, 20 msg/s per device:
  thingsgate bench run --protocol 3.1.1 --qos 1 --rate 20 --devices 1000
  # AMQP 0.9.1 devices against RabbitMQ (guest/guest), publisher confirms:
  PASSWORD=guest thingsgate bench run --url amqp://127.0.0.1:5672 --username guest \
    --password-env PASSWORD --devices 100 --qos 1
  # A plot of the run (throughput and latency over time) and policy changes every 0.5 s:
  THINGSGATE_SECRET=<secret> thingsgate bench run --solution <id> --twin org.acme \
    --plot run.svg --policy-churn 0.5 --http http://127.0.0.1:8080

Messages lost = expected (sent x matching subscribers) - received once the drain is over.
Exit status: 0 the run completed (losses are reported, not failures), 1 nothing could connect,
2 bad input. See docs/bench.md.";

/// Runs `bench run`: the report on stdout (text or JSON), progress on stderr.
pub fn main(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = settings::Settings::from_args(args)?;
    // Every device and subscriber is a socket: raise the soft limit of open files to the hard
    // one (what it cannot raise shows up as `tcp connect` failures in the report).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = match settings.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("cannot start the runtime")?;
    let outcome = runtime.block_on(load::run(&settings))?;
    let report = report::Report::new(&settings, &outcome);
    if settings.json {
        let text = serde_json::to_string(&report.to_json()).context("cannot write the report")?;
        println!("{text}");
    } else {
        print!("{}", report.to_text());
    }
    if let Some(path) = &settings.plot {
        // After the report: a plot that cannot be written still leaves the figures.
        plot::write(path, &plot::render(&settings, &outcome.timeline)?)?;
        if !settings.quiet {
            eprintln!("plot written to {}", path.display());
        }
    }
    Ok(if report.nothing_connected() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
