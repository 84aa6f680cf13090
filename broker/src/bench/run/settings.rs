//! A run's settings: the scenario file, the flags over it, defaults, and every check of the
//! input (a refusal is an `Err`, which the binary turns into exit status 2).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use bytes::Bytes;

use super::RunArgs;
use crate::amqp::mapping::topic_to_key;
use crate::mqtt::codec::{Protocol, QoS, TopicFilter, TopicName};
use crate::token_cmd::{SigningKey, TokenArgs, token_claims};

/// The longest run, in seconds.
const MAX_DURATION: f64 = 3600.0;
/// Payload bytes a plain message needs: timestamp (u64), device (u32), sequence number (u32).
pub(super) const PLAIN_HEADER: usize = 16;
/// Payload bytes a twin update needs: a u64 as a JSON number.
pub(super) const TWIN_NUMBER: usize = 20;
/// The largest payload accepted.
const MAX_PAYLOAD: usize = 1 << 20;
/// Ports one local address has towards one broker port (Linux's default ephemeral range is
/// 32768–60999), with a margin.
const PORTS_PER_ADDRESS: usize = 25_000;
/// Environment variable of a Thingsgate solution secret (the same as `thingsgate connection`).
const SECRET_ENV: &str = "THINGSGATE_SECRET";

/// What the devices and subscribers speak, from the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transport {
    /// `mqtt://` or `tcp://`: MQTT 3.1.1 or 5 (`--protocol`).
    Mqtt,
    /// `amqp://`: AMQP 0.9.1 (`run/amqp.rs`).
    Amqp,
}

impl Transport {
    /// As the report names it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Transport::Mqtt => "mqtt",
            Transport::Amqp => "amqp",
        }
    }
}

/// How fast each device publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second per device.
    PerSecond(f64),
    /// A closed loop: at most `inflight` messages in flight per device.
    Max,
    /// No messages: devices connect and hold their connections (keep-alive only) for the
    /// duration — idle fleets, memory per connection, connect storms.
    Idle,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rate::PerSecond(r) => write!(f, "{r}"),
            Rate::Max => f.write_str("max"),
            Rate::Idle => f.write_str("idle"),
        }
    }
}

pub(super) fn parse_protocol(text: &str) -> Result<Protocol, String> {
    match text.trim() {
        "3.1.1" | "311" | "4" => Ok(Protocol::V311),
        "5" | "5.0" => Ok(Protocol::V5),
        other => Err(format!(
            "unknown MQTT protocol `{other}` (expected 3.1.1 or 5)"
        )),
    }
}

pub(super) fn parse_qos(text: &str) -> Result<QoS, String> {
    match text.trim() {
        "0" => Ok(QoS::AtMostOnce),
        "1" => Ok(QoS::AtLeastOnce),
        "2" => Ok(QoS::ExactlyOnce),
        other => Err(format!("QoS `{other}` must be 0, 1 or 2")),
    }
}

pub(super) fn parse_rate(text: &str) -> Result<Rate, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    if text.eq_ignore_ascii_case("idle") {
        return Ok(Rate::Idle);
    }
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(Rate::PerSecond(r)),
        _ => Err(format!(
            "rate `{text}` must be a positive number of messages per second, `max` or `idle`"
        )),
    }
}

/// A number or a string in the scenario file (`protocol = 5` and `protocol = "3.1.1"`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
enum Text {
    Int(i64),
    Float(f64),
    Str(String),
}

impl Text {
    fn text(&self) -> String {
        match self {
            Text::Int(i) => i.to_string(),
            Text::Float(f) => f.to_string(),
            Text::Str(s) => s.clone(),
        }
    }
}

/// `--scenario FILE.toml`: the flags' names in snake_case.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    url: Option<String>,
    allow_remote: Option<bool>,
    protocol: Option<Text>,
    devices: Option<usize>,
    subscribers: Option<usize>,
    qos: Option<Text>,
    rate: Option<Text>,
    inflight: Option<usize>,
    payload_size: Option<usize>,
    topic: Option<String>,
    filter: Option<String>,
    twin: Option<String>,
    duration: Option<f64>,
    count: Option<u64>,
    connect_rate: Option<f64>,
    device_prefix: Option<String>,
    username: Option<String>,
    password_env: Option<String>,
    solution: Option<String>,
    jwt_key: Option<PathBuf>,
    jwt_iss: Option<String>,
    #[serde(default)]
    jwt_aud: Vec<String>,
    #[serde(default)]
    jwt_claim: Vec<String>,
    api_token_env: Option<String>,
    #[serde(default)]
    source_addresses: Vec<IpAddr>,
    drain: Option<f64>,
    threads: Option<usize>,
    json: Option<bool>,
    quiet: Option<bool>,
    report_every: Option<f64>,
    plot: Option<PathBuf>,
    policy_churn: Option<f64>,
    http: Option<String>,
}

/// How connections authenticate.
#[derive(Debug)]
pub(super) enum Login {
    Anonymous,
    /// The same user name and password for every connection.
    Plain {
        username: String,
        password: Bytes,
    },
    /// A Thingsgate solution secret: user name = solution ID.
    Secret {
        solution: String,
        secret: Bytes,
    },
    /// One token per connection, `sub` = its client ID.
    Jwt(Box<JwtMinter>),
}

/// Mints the tokens of `--jwt-key`.
#[derive(Debug)]
pub(super) struct JwtMinter {
    key: SigningKey,
    key_path: PathBuf,
    iss: String,
    aud: Vec<String>,
    claims: Vec<String>,
    /// Seconds: long enough for the ramp, the run and the drain.
    ttl: u64,
    /// The solution's API token, if the issuer has no solution claim.
    pub(super) api_token: Option<String>,
}

impl JwtMinter {
    /// A token for client `sub`.
    pub(super) fn mint(&self, sub: &str) -> anyhow::Result<String> {
        let args = TokenArgs {
            key: self.key_path.clone(),
            iss: self.iss.clone(),
            sub: sub.to_owned(),
            aud: self.aud.clone(),
            claims: self.claims.clone(),
            ttl: self.ttl.to_string(),
            kid: None,
        };
        let claims = token_claims(&args, SystemTime::now())?;
        Ok(self.key.sign(&claims, None)?)
    }
}

/// Everything a run needs, checked.
#[derive(Debug)]
pub(super) struct Settings {
    /// As given (for the report).
    pub(super) url: String,
    pub(super) transport: Transport,
    /// The broker (the first of `--url`'s list).
    pub(super) target: SocketAddr,
    /// Every broker of `--url`'s list (cluster nodes): device `i` connects to
    /// `targets[i % n]`, subscriber `j` to `targets[(j + 1) % n]` — so with one subscriber
    /// its events come from devices on the other nodes too.
    pub(super) targets: Vec<SocketAddr>,
    pub(super) protocol: Protocol,
    pub(super) devices: usize,
    pub(super) subscribers: usize,
    pub(super) qos: QoS,
    pub(super) rate: Rate,
    pub(super) inflight: usize,
    pub(super) payload_size: usize,
    /// The topic template (plain mode) or the twin command topic template.
    pub(super) topic: String,
    pub(super) filter: TopicFilter,
    /// Twin mode: the namespace.
    pub(super) twin: Option<String>,
    pub(super) duration: Duration,
    pub(super) count: Option<u64>,
    pub(super) connect_rate: f64,
    pub(super) device_prefix: String,
    pub(super) login: Login,
    pub(super) source_addresses: Vec<IpAddr>,
    pub(super) drain: Duration,
    pub(super) threads: usize,
    pub(super) json: bool,
    pub(super) quiet: bool,
    pub(super) report_every: Duration,
    /// Phase lines on stderr (`RunArgs::phase_marks`).
    pub(super) phase_marks: bool,
    /// `--plot`: where the timeline's SVG goes (checked writable before the run).
    pub(super) plot: Option<PathBuf>,
    /// `--policy-churn` with its `--http` API.
    pub(super) policy_churn: Option<super::churn::ChurnSettings>,
}

/// `Some(flag)`, else the file's value.
fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

fn seconds(name: &str, value: f64, max: f64) -> anyhow::Result<Duration> {
    if !value.is_finite() || value <= 0.0 || value > max {
        bail!("--{name} `{value}` must be more than 0 and at most {max} seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

fn env_value(var: &str, what: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => bail!("{what}: the environment variable `{var}` is not set"),
    }
}

impl Settings {
    /// The flags over the scenario file over the defaults, checked.
    pub(super) fn from_args(args: RunArgs) -> anyhow::Result<Self> {
        let file = match &args.scenario {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read scenario `{}`", path.display()))?;
                toml::from_str::<ScenarioFile>(&text)
                    .with_context(|| format!("scenario `{}`", path.display()))?
            }
            None => ScenarioFile::default(),
        };
        let protocol_given = args.protocol.is_some() || file.protocol.is_some();
        let protocol = match args.protocol {
            Some(p) => p,
            None => from_file(file.protocol, parse_protocol)?.unwrap_or(Protocol::V5),
        };
        let qos = match args.qos {
            Some(q) => q,
            None => from_file(file.qos, parse_qos)?.unwrap_or(QoS::AtMostOnce),
        };
        let rate = match args.rate {
            Some(r) => r,
            None => from_file(file.rate, parse_rate)?.unwrap_or(Rate::Max),
        };

        let allow_remote = args.allow_remote || file.allow_remote.unwrap_or(false);
        let url = pick(args.url, file.url).unwrap_or_else(|| "mqtt://127.0.0.1:1883".to_owned());
        // A comma-separated list: the nodes of a cluster, devices spread over them.
        let mut resolved = Vec::new();
        for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            resolved.push(resolve(one, allow_remote)?);
        }
        let Some(&(transport, target)) = resolved.first() else {
            bail!("--url: no URL given");
        };
        if resolved.iter().any(|(t, _)| *t != transport) {
            bail!("--url `{url}`: every URL of a list must use the same scheme");
        }
        if resolved.len() > 1 && transport == Transport::Amqp {
            bail!("--url `{url}`: a list of brokers is for MQTT only");
        }
        let targets: Vec<SocketAddr> = resolved.iter().map(|(_, a)| *a).collect();

        let devices = pick(args.devices, file.devices).unwrap_or(10);
        let subscribers = pick(args.subscribers, file.subscribers).unwrap_or(1);
        if devices > 1_000_000 || subscribers > 100_000 {
            bail!("at most 1,000,000 devices and 100,000 subscribers");
        }
        if devices + subscribers == 0 {
            bail!("nothing to run: --devices and --subscribers are both 0");
        }
        let inflight = pick(args.inflight, file.inflight).unwrap_or(10);
        if !(1..=65_535).contains(&inflight) {
            bail!("--inflight `{inflight}` must be 1 to 65535");
        }

        let twin = pick(args.twin, file.twin);
        if let Some(ns) = &twin
            && (ns.is_empty() || ns.contains(['/', '+', '#']))
        {
            bail!("--twin `{ns}` is not a namespace");
        }
        let minimum = if twin.is_some() {
            TWIN_NUMBER
        } else {
            PLAIN_HEADER
        };
        let payload_size = pick(args.payload_size, file.payload_size).unwrap_or(64);
        if payload_size < minimum || payload_size > MAX_PAYLOAD {
            bail!(
                "--payload-size `{payload_size}` must be {minimum} to {MAX_PAYLOAD} bytes \
                 (the payload carries the send instant{})",
                if twin.is_some() {
                    ""
                } else {
                    ", the device and a sequence number"
                }
            );
        }
        let topic_flag = pick(args.topic, file.topic);
        let (topic, default_filter) = match &twin {
            Some(ns) => {
                if topic_flag.is_some() {
                    bail!("--topic and --twin exclude each other (twin mode has its own topics)");
                }
                (
                    format!(
                        "{ns}/{{device}}/things/twin/commands/modify/features/temp/properties/value"
                    ),
                    format!("{ns}/+/things/twin/events/modified/features/temp/properties/value"),
                )
            }
            None => (
                topic_flag.unwrap_or_else(|| "bench/{device}/temp".to_owned()),
                "bench/+/temp".to_owned(),
            ),
        };
        let filter_text = pick(args.filter, file.filter).unwrap_or(default_filter);
        let filter: TopicFilter = filter_text
            .parse()
            .map_err(|e| anyhow::anyhow!("--filter `{filter_text}`: {e}"))?;

        let duration_given = pick(args.duration, file.duration);
        let count = pick(args.count, file.count);
        if count == Some(0) {
            bail!("--count must be more than 0");
        }
        let duration = match (duration_given, count) {
            (Some(d), _) => seconds("duration", d, MAX_DURATION)?,
            (None, Some(_)) => Duration::from_secs_f64(MAX_DURATION),
            (None, None) => Duration::from_secs(10),
        };
        let connect_rate = pick(args.connect_rate, file.connect_rate).unwrap_or(500.0);
        if !connect_rate.is_finite() || connect_rate <= 0.0 {
            bail!("--connect-rate `{connect_rate}` must be a positive number");
        }
        let device_prefix =
            pick(args.device_prefix, file.device_prefix).unwrap_or_else(|| "dev-".to_owned());
        if device_prefix.contains(['/', '+', '#']) {
            bail!("--device-prefix `{device_prefix}` may not contain `/`, `+` or `#`");
        }
        // Every device's topic must be a valid topic name: check the first and the last.
        for index in [0, devices.saturating_sub(1)] {
            let name = device_name(&device_prefix, index);
            let topic = instantiate(&topic, &name, index);
            topic
                .parse::<TopicName>()
                .map_err(|e| anyhow::anyhow!("--topic `{topic}`: {e}"))?;
        }

        let drain = seconds("drain", pick(args.drain, file.drain).unwrap_or(5.0), 600.0)?;
        let report_every = seconds(
            "report-every",
            pick(args.report_every, file.report_every).unwrap_or(1.0),
            3600.0,
        )?;
        let threads = pick(args.threads, file.threads).unwrap_or(1);
        if !(1..=2).contains(&threads) {
            bail!("--threads `{threads}` must be 1 or 2 (the generator shares the machine)");
        }

        let ramp_seconds = (devices + subscribers) as f64 / connect_rate;
        let login = login(
            LoginInput {
                username: pick(args.username, file.username),
                password_env: pick(args.password_env, file.password_env),
                solution: pick(args.solution, file.solution),
                jwt_key: pick(args.jwt_key, file.jwt_key),
                jwt_iss: pick(args.jwt_iss, file.jwt_iss),
                jwt_aud: if args.jwt_aud.is_empty() {
                    file.jwt_aud
                } else {
                    args.jwt_aud
                },
                jwt_claim: if args.jwt_claim.is_empty() {
                    file.jwt_claim
                } else {
                    args.jwt_claim
                },
                api_token_env: pick(args.api_token_env, file.api_token_env),
            },
            // Ramp, run, drain and a margin.
            (ramp_seconds + duration.as_secs_f64() + drain.as_secs_f64()) as u64 + 600,
        )?;

        let mut source_addresses = if args.source_addresses.is_empty() {
            file.source_addresses
        } else {
            args.source_addresses
        };
        if source_addresses.is_empty() {
            source_addresses = default_sources(target, devices + subscribers);
        }
        if let Some(wrong) = source_addresses
            .iter()
            .find(|a| a.is_ipv4() != target.is_ipv4())
        {
            bail!(
                "--source-addresses: `{wrong}` is not of the broker's address family ({})",
                target.ip()
            );
        }

        let plot = pick(args.plot, file.plot);
        if let Some(path) = &plot {
            super::plot::check_path(path)?;
        }
        let policy_churn = super::churn::settings(super::churn::ChurnInput {
            every: pick(args.policy_churn, file.policy_churn),
            http: pick(args.http, file.http),
            solution: match &login {
                Login::Secret { solution, .. } => Some(solution.as_str()),
                _ => None,
            },
            twin: twin.as_deref(),
            devices,
            allow_remote,
        })?;

        let settings = Settings {
            url,
            transport,
            target,
            targets,
            protocol,
            devices,
            subscribers,
            qos,
            rate,
            inflight,
            payload_size,
            topic,
            filter,
            twin,
            duration,
            count,
            connect_rate,
            device_prefix,
            login,
            source_addresses,
            drain,
            threads,
            json: args.json || file.json.unwrap_or(false),
            quiet: args.quiet || file.quiet.unwrap_or(false),
            report_every,
            phase_marks: args.phase_marks,
            plot,
            policy_churn,
        };
        if settings.transport == Transport::Amqp {
            settings.check_amqp(protocol_given)?;
        }
        Ok(settings)
    }

    /// Refuses what AMQP 0.9.1 cannot say of the run (`--url amqp://…`).
    fn check_amqp(&self, protocol_given: bool) -> anyhow::Result<()> {
        if protocol_given {
            bail!("--protocol is MQTT's version; an amqp:// broker speaks AMQP 0.9.1");
        }
        if self.qos == QoS::ExactlyOnce {
            bail!(
                "--qos 2: AMQP 0.9.1 has no exactly-once delivery (--qos 1 is publisher \
                 confirms and acknowledgements)"
            );
        }
        let filter = self.filter.as_str();
        if filter.starts_with("$share/") {
            bail!(
                "--filter `{filter}`: a shared subscription has no AMQP form here (each \
                 subscriber has its own queue)"
            );
        }
        if topic_to_key(filter).is_none() {
            bail!("--filter `{filter}`: its binding key would be longer than 255 bytes");
        }
        for index in [0, self.devices.saturating_sub(1)] {
            let topic = self.device_topic(index);
            if topic_to_key(&topic).is_none() {
                bail!("--topic `{topic}`: its routing key would be longer than 255 bytes");
            }
        }
        Ok(())
    }

    /// Device `index`'s name (its client ID and `{device}`).
    pub(super) fn device_name(&self, index: usize) -> String {
        device_name(&self.device_prefix, index)
    }

    /// The topic device `index` publishes on.
    pub(super) fn device_topic(&self, index: usize) -> String {
        instantiate(&self.topic, &self.device_name(index), index)
    }

    /// The topic on which subscribers see device `index`'s messages: its own topic, or in twin
    /// mode the `modified` event of its thing.
    pub(super) fn delivery_topic(&self, index: usize) -> String {
        match &self.twin {
            Some(ns) => format!(
                "{ns}/{}/things/twin/events/modified/features/temp/properties/value",
                self.device_name(index)
            ),
            None => self.device_topic(index),
        }
    }

    /// Subscriber `index`'s client ID.
    pub(super) fn subscriber_name(&self, index: usize) -> String {
        format!("{}sub-{index}", self.device_prefix)
    }

    /// The protocol as users write it.
    pub(super) fn protocol_name(&self) -> &'static str {
        match (self.transport, self.protocol) {
            (Transport::Amqp, _) => "0.9.1",
            (Transport::Mqtt, Protocol::V311) => "3.1.1",
            (Transport::Mqtt, Protocol::V5) => "5",
        }
    }

    /// The transport and its protocol as a report's header says them: `MQTT 5`, `AMQP 0.9.1`.
    pub(super) fn protocol_label(&self) -> String {
        let transport = match self.transport {
            Transport::Mqtt => "MQTT",
            Transport::Amqp => "AMQP",
        };
        format!("{transport} {}", self.protocol_name())
    }
}

/// A scenario file's value through the flag's parser.
fn from_file<T>(
    value: Option<Text>,
    parse: fn(&str) -> Result<T, String>,
) -> anyhow::Result<Option<T>> {
    value
        .map(|v| parse(&v.text()).map_err(anyhow::Error::msg))
        .transpose()
}

fn device_name(prefix: &str, index: usize) -> String {
    format!("{prefix}{index}")
}

fn instantiate(template: &str, name: &str, index: usize) -> String {
    template
        .replace("{device}", name)
        .replace("{index}", &index.to_string())
}

/// `mqtt://HOST[:PORT]` or `amqp://HOST[:PORT][/%2f]` → the transport and the broker's
/// address; refuses a host off loopback unless allowed.
fn resolve(url: &str, allow_remote: bool) -> anyhow::Result<(Transport, SocketAddr)> {
    let (transport, rest, default_port) = if let Some(rest) = url.strip_prefix("amqp://") {
        // AMQP's default vhost `/`, the only one Thingsgate has; credentials never go in the URL.
        let rest = rest
            .strip_suffix("/%2f")
            .or_else(|| rest.strip_suffix("/%2F"))
            .unwrap_or(rest);
        (Transport::Amqp, rest, "5672")
    } else if let Some(rest) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (Transport::Mqtt, rest, "1883")
    } else {
        bail!(
            "--url `{url}`: expected mqtt://HOST:PORT or amqp://HOST:PORT (TLS is not supported \
             yet)"
        );
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '@', '?']) {
        bail!(
            "--url `{url}`: expected {}://HOST:PORT (credentials come from flags and the \
             environment, an AMQP vhost can only be the default `/`)",
            transport.name()
        );
    }
    // `[::1]:1883`, `[::1]`, `host:1883`, `host`.
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            bail!("--url `{url}`: unclosed `[`");
        };
        let port = match after.strip_prefix(':') {
            Some(p) => p,
            None if after.is_empty() => default_port,
            None => bail!("--url `{url}`: expected mqtt://[IPv6]:PORT"),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (authority, default_port),
        }
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("--url `{url}`: bad port `{port}`"))?;
    let addresses: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--url `{url}`: cannot resolve `{host}`"))?
        .collect();
    let Some(first) = addresses.first() else {
        bail!("--url `{url}`: `{host}` has no address");
    };
    if !allow_remote && !addresses.iter().all(|a| a.ip().is_loopback()) {
        bail!(
            "--url `{url}`: `{host}` is not on loopback; a load test of another machine needs \
             --allow-remote (and that machine's owner's consent)"
        );
    }
    Ok((transport, *first))
}

/// Local addresses for `connections` towards `target`: none (the kernel chooses) unless one
/// address would run out of ports towards a loopback IPv4 broker; then 127.0.0.1, 127.0.0.2, …
fn default_sources(target: SocketAddr, connections: usize) -> Vec<IpAddr> {
    if !target.ip().is_loopback() || !target.is_ipv4() || connections <= PORTS_PER_ADDRESS {
        return Vec::new();
    }
    let needed = connections.div_ceil(PORTS_PER_ADDRESS).min(250);
    (1..=needed)
        .filter_map(|n| u8::try_from(n).ok())
        .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
        .collect()
}

struct LoginInput {
    username: Option<String>,
    password_env: Option<String>,
    solution: Option<String>,
    jwt_key: Option<PathBuf>,
    jwt_iss: Option<String>,
    jwt_aud: Vec<String>,
    jwt_claim: Vec<String>,
    api_token_env: Option<String>,
}

fn login(input: LoginInput, ttl: u64) -> anyhow::Result<Login> {
    let kinds = [
        input.username.is_some(),
        input.solution.is_some(),
        input.jwt_key.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() > 1 {
        bail!("--username, --solution and --jwt-key exclude each other");
    }
    let jwt_only = input.jwt_iss.is_some()
        || !input.jwt_aud.is_empty()
        || !input.jwt_claim.is_empty()
        || input.api_token_env.is_some();
    if input.jwt_key.is_none() && jwt_only {
        bail!("--jwt-iss, --jwt-aud, --jwt-claim and --api-token-env need --jwt-key");
    }
    if input.username.is_none() && input.password_env.is_some() {
        bail!("--password-env needs --username");
    }
    if let Some(username) = input.username {
        let password = match &input.password_env {
            Some(var) => Bytes::from(env_value(var, "--password-env")?),
            None => Bytes::new(),
        };
        return Ok(Login::Plain { username, password });
    }
    if let Some(solution) = input.solution {
        let secret = env_value(SECRET_ENV, "--solution needs the solution secret")?;
        return Ok(Login::Secret {
            solution,
            secret: Bytes::from(secret),
        });
    }
    if let Some(key_path) = input.jwt_key {
        let Some(iss) = input.jwt_iss else {
            bail!("--jwt-key needs --jwt-iss");
        };
        let pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read --jwt-key `{}`", key_path.display()))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .with_context(|| format!("--jwt-key `{}`", key_path.display()))?;
        let api_token = input
            .api_token_env
            .as_deref()
            .map(|var| env_value(var, "--api-token-env"))
            .transpose()?;
        let minter = JwtMinter {
            key,
            key_path,
            iss,
            aud: input.jwt_aud,
            claims: input.jwt_claim,
            ttl,
            api_token,
        };
        // A bad claim is bad input: find it now, not at the first connection.
        minter.mint("check")?;
        return Ok(Login::Jwt(Box::new(minter)));
    }
    Ok(Login::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_off_loopback_are_refused_unless_allowed() {
        assert!(resolve("mqtt://127.0.0.1:1883", false).is_ok());
        assert!(resolve("mqtt://localhost", false).is_ok());
        assert!(resolve("mqtt://[::1]:1884", false).is_ok());
        assert!(resolve("mqtt://10.1.2.3:1883", false).is_err());
        assert!(resolve("mqtt://10.1.2.3:1883", true).is_ok());
        assert!(resolve("mqtts://127.0.0.1:8883", false).is_err());
        assert!(resolve("127.0.0.1:1883", false).is_err());
    }

    #[test]
    fn an_amqp_url_picks_amqp_with_its_default_port_and_vhost() {
        let local: SocketAddr = "127.0.0.1:5672".parse().unwrap();
        assert_eq!(
            resolve("amqp://127.0.0.1", false).unwrap(),
            (Transport::Amqp, local)
        );
        assert_eq!(
            resolve("amqp://127.0.0.1:5672/%2f", false).unwrap(),
            (Transport::Amqp, local)
        );
        assert_eq!(
            resolve("mqtt://127.0.0.1", false).unwrap().0,
            Transport::Mqtt
        );
        assert!(resolve("amqp://guest:guest@127.0.0.1:5672", false).is_err());
        assert!(resolve("amqp://127.0.0.1:5672/other", false).is_err());
        assert!(resolve("amqps://127.0.0.1:5671", false).is_err());
        assert!(resolve("amqp://10.1.2.3", false).is_err());
    }

    #[test]
    fn many_connections_to_loopback_spread_over_addresses() {
        let target: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert!(default_sources(target, 100).is_empty());
        let sources = default_sources(target, 60_000);
        assert_eq!(sources.len(), 3);
        assert_eq!(sources[2], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
    }

    #[test]
    fn rates_protocols_and_qos_parse() {
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("IDLE"), Ok(Rate::Idle));
        assert_eq!(parse_rate("20"), Ok(Rate::PerSecond(20.0)));
        assert!(parse_rate("0").is_err());
        assert_eq!(parse_protocol("3.1.1"), Ok(Protocol::V311));
        assert!(parse_protocol("3.1").is_err());
        assert_eq!(parse_qos("2"), Ok(QoS::ExactlyOnce));
    }
}
