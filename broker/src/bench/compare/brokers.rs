//! The brokers `bench compare` starts (fresh for every run, each on its own port, in its own
//! directory) and what it reads of them from `/proc`: CPU seconds, resident memory, open files.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a broker has to say it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a broker has to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The password of the one user of Mosquitto's password file (a load test's throwaway).
pub(super) const MOSQUITTO_USER: &str = "bench";
/// Where `bench compare` finds the rumqttd baseline when `--rumqttd` is not given (built with
/// `cargo build --release --manifest-path bench/rumqttd-baseline/Cargo.toml`).
pub(super) const RUMQTTD_DEFAULT: &str = "bench/rumqttd-baseline/target/release/rumqttd-baseline";
/// The namespace of the Thingsgate solution a run creates.
pub(super) const NAMESPACE: &str = "bench.compare";
/// The JWT issuer a Thingsgate run configures (its key is generated per run).
pub(super) const JWT_ISSUER: &str = "https://bench.thingsgate.local";
pub(super) const JWT_AUDIENCE: &str = "thingsgate";
pub(super) const JWT_SOLUTION_CLAIM: &str = "solution_id";

/// A broker under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerKind {
    /// `thingsgate serve` (this binary, or `--thingsgate PATH`), release build expected.
    Thingsgate,
    /// An earlier Thingsgate build (`--baseline PATH`), started and driven exactly like
    /// `thingsgate`: before/after figures from one run.
    ThingsgateBaseline,
    /// One `thingsgate serve --cluster` node on a NATS JetStream server of its own (R1, the
    /// machine's `nats-server`): the cost of the shared store against `thingsgate`'s journal.
    ThingsgateCluster,
    /// Three such nodes on one NATS server; the generator spreads devices over them and its
    /// subscriber sits on another node than most of them.
    ThingsgateCluster3,
    /// Mosquitto with a password file and an ACL (Nagle's algorithm on: its default).
    Mosquitto,
    /// The same with `set_tcp_nodelay true`.
    MosquittoNodelay,
    /// rumqttd embedded in `bench/rumqttd-baseline` (no authentication).
    Rumqttd,
    /// The RabbitMQ already running on this machine (127.0.0.1:5672, guest/guest): AMQP only.
    Rabbitmq,
}

impl BrokerKind {
    /// Another Thingsgate than the one measured (an earlier build, cluster mode): a column of
    /// its own figures, not a peer of the ratio.
    pub(super) fn is_thingsgate_variant(self) -> bool {
        matches!(
            self,
            BrokerKind::ThingsgateBaseline
                | BrokerKind::ThingsgateCluster
                | BrokerKind::ThingsgateCluster3
        )
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            BrokerKind::Thingsgate => "Thingsgate",
            BrokerKind::ThingsgateBaseline => "Thingsgate baseline",
            BrokerKind::ThingsgateCluster => "Thingsgate on JetStream",
            BrokerKind::ThingsgateCluster3 => "Thingsgate ×3 on JetStream",
            BrokerKind::Mosquitto => "Mosquitto",
            BrokerKind::MosquittoNodelay => "Mosquitto nodelay",
            BrokerKind::Rumqttd => "rumqttd",
            BrokerKind::Rabbitmq => "RabbitMQ",
        }
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub(super) struct Programs {
    pub(super) thingsgate: PathBuf,
    /// The earlier build `thingsgate-baseline` runs, if given.
    pub(super) baseline: Option<PathBuf>,
    pub(super) mosquitto: PathBuf,
    pub(super) mosquitto_passwd: PathBuf,
    /// The NATS server of the cluster brokers.
    pub(super) nats_server: PathBuf,
    pub(super) rumqttd: PathBuf,
}

/// What a client needs to log in to a started broker.
#[derive(Debug, Clone)]
pub(super) enum Credentials {
    /// No authentication (rumqttd).
    Anonymous,
    /// One user name and password for every connection (Mosquitto's password file, RabbitMQ).
    Plain { username: String, password: String },
    /// A Thingsgate solution: its ID and a secret; and the JWT issuer configured for it.
    Solution {
        id: String,
        secret: String,
        jwt_key: PathBuf,
    },
}

/// A started broker; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub(super) struct Running {
    pub(super) kind: BrokerKind,
    /// None for RabbitMQ: the machine's own, not ours to stop.
    child: Option<Child>,
    pub(super) pid: u32,
    /// Cluster brokers: the other nodes, then the NATS server (stopped after the first).
    others: Vec<Child>,
    /// Every process whose CPU and memory count: the node(s) and the NATS server.
    pids: Vec<u32>,
    /// Every node's MQTT listener (one for a single broker).
    pub(super) mqtt_all: Vec<SocketAddr>,
    pub(super) mqtt: Option<SocketAddr>,
    pub(super) amqp: Option<SocketAddr>,
    pub(super) http: Option<SocketAddr>,
    pub(super) credentials: Credentials,
    /// Resident memory right after the start, before any client.
    pub(super) rss_at_start: u64,
}

impl Running {
    /// Starts a fresh broker of `kind` with its files in `dir` (which must exist).
    pub(super) fn start(kind: BrokerKind, programs: &Programs, dir: &Path) -> anyhow::Result<Self> {
        let mut running = match kind {
            BrokerKind::Thingsgate => start_thingsgate(kind, &programs.thingsgate, dir)?,
            BrokerKind::ThingsgateCluster => start_cluster(kind, programs, dir, 1)?,
            BrokerKind::ThingsgateCluster3 => start_cluster(kind, programs, dir, 3)?,
            BrokerKind::ThingsgateBaseline => {
                let Some(baseline) = &programs.baseline else {
                    bail!("the broker thingsgate-baseline needs --baseline PATH");
                };
                start_thingsgate(kind, baseline, dir)?
            }
            BrokerKind::Mosquitto | BrokerKind::MosquittoNodelay => {
                start_mosquitto(kind, programs, dir)?
            }
            BrokerKind::Rumqttd => start_rumqttd(programs)?,
            BrokerKind::Rabbitmq => attach_rabbitmq()?,
        };
        // Let the start-up settle (allocator arenas, lazy statics) before the baseline.
        std::thread::sleep(Duration::from_millis(500));
        if running.pids.is_empty() {
            running.pids.push(running.pid);
        }
        if running.mqtt_all.is_empty() {
            running.mqtt_all.extend(running.mqtt);
        }
        running.rss_at_start = running.rss()?;
        Ok(running)
    }

    /// User + system CPU seconds of the broker so far (a cluster: its nodes and NATS server).
    pub(super) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for pid in &self.pids {
            total += cpu_seconds(*pid)?;
        }
        Ok(total)
    }

    /// The CPU seconds of each process (a cluster: nodes first, then the NATS server).
    pub(super) fn cpu_seconds_each(&self) -> Vec<f64> {
        self.pids
            .iter()
            .map(|pid| cpu_seconds(*pid).unwrap_or(0.0))
            .collect()
    }

    pub(super) fn rss(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for pid in &self.pids {
            total += rss_bytes(*pid)?;
        }
        Ok(total)
    }

    pub(super) fn open_files(&self) -> usize {
        self.pids
            .iter()
            .map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count))
            .sum()
    }

    /// Whether the broker is still running (a crash during a run is a finding, not a figure).
    pub(super) fn alive(&mut self) -> bool {
        let others = self
            .others
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(None)));
        others
            && match &mut self.child {
                Some(child) => matches!(child.try_wait(), Ok(None)),
                None => Path::new(&format!("/proc/{}", self.pid)).exists(),
            }
    }
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            stop(child);
        }
        for other in &mut self.others {
            stop(other);
        }
    }
}

/// Spawns `command` with stdout piped and waits for `ready` on it, collecting the addresses of
/// `<name> listening on ADDR` lines.
fn spawn_until_ready(
    mut command: Command,
    what: &str,
    stderr_file: &Path,
) -> anyhow::Result<(Child, Vec<(String, SocketAddr)>)> {
    let log = std::fs::File::create(stderr_file)
        .with_context(|| format!("cannot create `{}`", stderr_file.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let Some(pipe) = child.stdout.take() else {
        bail!("{what}: no stdout");
    };
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            // The receiver is gone once `ready` was seen: keep draining.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let mut listeners = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim();
                if line == "ready" {
                    return Ok((child, listeners));
                }
                if let Some((name, addr)) = line.split_once(" listening on ")
                    && let Ok(addr) = addr.trim().parse::<SocketAddr>()
                {
                    listeners.push((name.to_owned(), addr));
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(stderr_file).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                bail!(
                    "{what} did not print `ready` ({}); its stderr ends with:\n{tail}",
                    match e {
                        mpsc::RecvTimeoutError::Timeout => "timed out",
                        mpsc::RecvTimeoutError::Disconnected => "it exited",
                    }
                );
            }
        }
    }
}

fn listener(listeners: &[(String, SocketAddr)], name: &str) -> Option<SocketAddr> {
    listeners.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
}

/// Thingsgate: a solution (and a JWT issuer with a fresh key) in a new data directory, then
/// `serve` with MQTT, AMQP and HTTP on free loopback ports.
fn start_thingsgate(kind: BrokerKind, program: &Path, dir: &Path) -> anyhow::Result<Running> {
    let data = dir.join("data");
    let (id, secret) = create_solution(program, &["--data".as_ref(), data.as_os_str()])?;
    let (jwt_key, config) = write_config(dir)?;
    let mut command = serve_command(program, &config);
    command.arg("--data").arg(&data);
    let (child, listeners) = spawn_until_ready(command, "thingsgate serve", &dir.join("stderr"))?;
    let pid = child.id();
    Ok(Running {
        kind,
        child: Some(child),
        pid,
        others: Vec::new(),
        pids: Vec::new(),
        mqtt_all: Vec::new(),
        mqtt: listener(&listeners, "mqtt"),
        amqp: listener(&listeners, "amqp"),
        http: listener(&listeners, "http"),
        credentials: Credentials::Solution {
            id,
            secret,
            jwt_key,
        },
        rss_at_start: 0,
    })
}

/// `thingsgate solution create --namespace NAMESPACE --json` with `place` (`--data DIR` or
/// `--cluster URL`): the solution's ID and secret.
fn create_solution(program: &Path, place: &[&std::ffi::OsStr]) -> anyhow::Result<(String, String)> {
    let out = Command::new(program)
        .args(["solution", "create", "--namespace", NAMESPACE, "--json"])
        .args(place)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "thingsgate solution create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("thingsgate solution create --json printed no JSON")?;
    let field = |k: &str| {
        doc.get(k)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("`{k}` missing from solution create --json"))
    };
    Ok((field("solutionId")?, field("secret")?))
}

/// A JWT issuer with a fresh key, in a config file: (the key, the config).
fn write_config(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let pem = crate::token_cmd::generate_dev_key()?;
    let jwt_key = dir.join("jwt-key.pem");
    std::fs::write(&jwt_key, &pem).context("cannot write the JWT key")?;
    let jwks = crate::token_cmd::jwks_for_private_key(&pem)?;
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).context("cannot write the JWKS")?;
    let config = dir.join("thingsgate.toml");
    std::fs::write(
        &config,
        format!(
            "[[issuer]]\nkey = \"bench\"\nissuer = \"{JWT_ISSUER}\"\naudiences = \
             [\"{JWT_AUDIENCE}\"]\njwks_file = \"jwks.json\"\nsolution_claim = \
             \"{JWT_SOLUTION_CLAIM}\"\n"
        ),
    )
    .context("cannot write the config")?;
    Ok((jwt_key, config))
}

/// `thingsgate serve --config CONFIG` on free loopback ports, no `THINGSGATE_…` inherited.
fn serve_command(program: &Path, config: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args([
            "--mqtt",
            "127.0.0.1:0",
            "--amqp",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("THINGSGATE_") {
            command.env_remove(name);
        }
    }
    command
}

/// Cluster mode: a NATS server of this run's own (JetStream, R1, its store in `dir`), a
/// solution created on it, and `nodes` × `thingsgate serve --cluster`.
fn start_cluster(
    kind: BrokerKind,
    programs: &Programs,
    dir: &Path,
    nodes: usize,
) -> anyhow::Result<Running> {
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("nats.log")).context("cannot create nats.log")?;
    let mut nats = Command::new(&programs.nats_server)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("nats"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| {
            format!(
                "cannot start `{}` (cluster mode needs a nats-server: apt-get install nats-server)",
                programs.nats_server.display()
            )
        })?;
    let deadline = Instant::now() + START_TIMEOUT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline || !matches!(nats.try_wait(), Ok(None)) {
            let _ = nats.kill();
            let _ = nats.wait();
            bail!(
                "the NATS server did not accept connections on port {port}: {}",
                std::fs::read_to_string(dir.join("nats.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nats://127.0.0.1:{port}");
    let nats_pid = nats.id();
    let mut others = vec![nats];
    let (id, secret) =
        create_solution(&programs.thingsgate, &["--cluster".as_ref(), url.as_ref()])?;
    let (jwt_key, config) = write_config(dir)?;
    let mut started = Vec::new();
    for n in 0..nodes {
        let mut command = serve_command(&programs.thingsgate, &config);
        command.arg("--cluster").arg(&url);
        match spawn_until_ready(
            command,
            "thingsgate serve --cluster",
            &dir.join(format!("stderr-{n}")),
        ) {
            Ok(node) => started.push(node),
            Err(e) => {
                for (mut child, _) in started {
                    stop(&mut child);
                }
                for other in &mut others {
                    stop(other);
                }
                return Err(e);
            }
        }
    }
    let mut pids: Vec<u32> = started.iter().map(|(c, _)| c.id()).collect();
    pids.push(nats_pid);
    let mqtt_all: Vec<SocketAddr> = started
        .iter()
        .filter_map(|(_, l)| listener(l, "mqtt"))
        .collect();
    let mut nodes_iter = started.into_iter();
    let Some((first, listeners)) = nodes_iter.next() else {
        bail!("no cluster node started");
    };
    // Nodes are stopped before the NATS server.
    let mut rest: Vec<Child> = nodes_iter.map(|(c, _)| c).collect();
    rest.append(&mut others);
    Ok(Running {
        kind,
        pid: first.id(),
        child: Some(first),
        others: rest,
        pids,
        mqtt_all,
        mqtt: listener(&listeners, "mqtt"),
        amqp: listener(&listeners, "amqp"),
        http: listener(&listeners, "http"),
        credentials: Credentials::Solution {
            id,
            secret,
            jwt_key,
        },
        rss_at_start: 0,
    })
}

/// A free loopback port: bound and released (the broker binds it a moment later; another
/// process taking it in between makes the start fail, and the run say so).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The highest number of open files this process may have: the brokers get it as their soft
/// limit (a shell's `ulimit -n`), as `thingsgate serve` raises its own.
fn hard_nofile() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(_, hard)| hard)
}

/// Mosquitto on its own port with a password file (one user) and an ACL that lets each device
/// write only its own topic and the user read every device's topic.
fn start_mosquitto(kind: BrokerKind, programs: &Programs, dir: &Path) -> anyhow::Result<Running> {
    if !programs.mosquitto.is_file() {
        bail!(
            "Mosquitto is not at `{}` (apt-get install mosquitto, or --mosquitto PATH)",
            programs.mosquitto.display()
        );
    }
    // A throwaway password (prefixed: a generated secret may start with `-`, which
    // `mosquitto_passwd` would take for an option).
    let password = format!(
        "p{}",
        crate::auth::secret::Secret::generate()
            .context("no random password")?
            .expose()
    );
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, "").context("cannot write the password file")?;
    let out = Command::new(&programs.mosquitto_passwd)
        .arg("-b")
        .arg(&passwd)
        .args([MOSQUITTO_USER, &password])
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (apt-get install mosquitto)",
                programs.mosquitto_passwd.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "mosquitto_passwd failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let acl = dir.join("acl");
    std::fs::write(
        &acl,
        format!("pattern write bench/%c/temp\n\nuser {MOSQUITTO_USER}\ntopic read bench/+/temp\n"),
    )
    .context("cannot write the ACL")?;
    let port = free_port()?;
    let config = dir.join("mosquitto.conf");
    let nodelay = if kind == BrokerKind::MosquittoNodelay {
        "set_tcp_nodelay true\n"
    } else {
        ""
    };
    // Queues big enough that the closed loops (100 devices x 10 in flight to one subscriber)
    // are not cut by Mosquitto's defaults (1,000 queued, 20 in flight per client): a load
    // test measures throughput, not the default drop policy. In-flight is unlimited (0): with
    // any limit, Mosquitto 2.0.11 leaves QoS 1 messages queued behind a full in-flight window
    // until another message arrives for that client — a closed loop stalls (2 s until the
    // generator writes its window off) and the last (devices - 1) x window messages of a run
    // are never delivered (measured: 990 of every 100 x 10 run at limit 1,000, none at 0).
    std::fs::write(
        &config,
        format!(
            "per_listener_settings false\nlistener {port} 127.0.0.1\nallow_anonymous false\n\
             password_file {}\nacl_file {}\npersistence false\nlog_dest stderr\nlog_type error\n\
             log_type warning\nmax_queued_messages 100000\nmax_inflight_messages 0\n\
             max_connections -1\n{nodelay}",
            passwd.display(),
            acl.display()
        ),
    )
    .context("cannot write the Mosquitto config")?;
    let log = std::fs::File::create(dir.join("stderr")).context("cannot create the log")?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "ulimit -n {} && exec \"$0\" -c \"$1\"",
            hard_nofile()
        ))
        .arg(&programs.mosquitto)
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    let mut child = command.spawn().with_context(|| {
        format!(
            "cannot start {} (apt-get install mosquitto)",
            programs.mosquitto.display()
        )
    })?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_for_port(&mut child, addr, "mosquitto", &dir.join("stderr"))?;
    let pid = child.id();
    Ok(Running {
        kind,
        child: Some(child),
        pid,
        others: Vec::new(),
        pids: Vec::new(),
        mqtt_all: Vec::new(),
        mqtt: Some(addr),
        amqp: None,
        http: None,
        credentials: Credentials::Plain {
            username: MOSQUITTO_USER.to_owned(),
            password,
        },
        rss_at_start: 0,
    })
}

/// Waits until `addr` accepts a TCP connection, or `child` exits.
fn wait_for_port(
    child: &mut Child,
    addr: SocketAddr,
    what: &str,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "{what} exited at start ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not listen on {addr} within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rumqttd baseline binary (no authentication): it prints its address and `ready`.
fn start_rumqttd(programs: &Programs) -> anyhow::Result<Running> {
    if !programs.rumqttd.exists() {
        bail!(
            "the rumqttd baseline is not built: `{}` is missing (cargo build --release \
             --manifest-path bench/rumqttd-baseline/Cargo.toml, or --rumqttd PATH)",
            programs.rumqttd.display()
        );
    }
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -n {} && exec \"$0\"", hard_nofile()))
        .arg(&programs.rumqttd)
        .env("RUST_LOG", "error");
    let log = std::env::temp_dir().join(format!("rumqttd-baseline-{}.log", std::process::id()));
    let (child, listeners) = spawn_until_ready(command, "rumqttd-baseline", &log)?;
    let pid = child.id();
    Ok(Running {
        kind: BrokerKind::Rumqttd,
        child: Some(child),
        pid,
        others: Vec::new(),
        pids: Vec::new(),
        mqtt_all: Vec::new(),
        mqtt: listener(&listeners, "mqtt"),
        amqp: None,
        http: None,
        credentials: Credentials::Anonymous,
        rss_at_start: 0,
    })
}

/// The machine's RabbitMQ (not started by us: its process is found by its command line).
fn attach_rabbitmq() -> anyhow::Result<Running> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 5672));
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
        bail!("RabbitMQ is not listening on {addr} (start it: `service rabbitmq-server start`)");
    }
    let pid = rabbitmq_pid()
        .context("RabbitMQ listens on 5672 but its beam.smp process was not found in /proc")?;
    Ok(Running {
        kind: BrokerKind::Rabbitmq,
        child: None,
        pid,
        others: Vec::new(),
        pids: Vec::new(),
        mqtt_all: Vec::new(),
        mqtt: None,
        amqp: Some(addr),
        http: None,
        credentials: Credentials::Plain {
            username: "guest".to_owned(),
            password: "guest".to_owned(),
        },
        rss_at_start: 0,
    })
}

/// The Erlang VM running RabbitMQ: a `beam.smp` whose command line names `rabbit`.
pub(super) fn rabbitmq_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline);
            (text.contains("beam.smp") && text.contains("rabbit")).then_some(pid)
        })
}

/// User + system CPU seconds of `pid`.
pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let (user, system) = crate::bench::procfs::cpu_seconds(&pid.to_string())
        .with_context(|| format!("cannot read the CPU time of process {pid} in /proc"))?;
    Ok(user + system)
}

/// Resident memory of `pid`.
pub(super) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    crate::bench::procfs::rss_bytes(&pid.to_string())
        .with_context(|| format!("cannot read the memory of process {pid} in /proc"))
}
