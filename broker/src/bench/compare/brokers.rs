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
    pub(super) fn name(self) -> &'static str {
        match self {
            BrokerKind::Thingsgate => "Thingsgate",
            BrokerKind::ThingsgateBaseline => "Thingsgate baseline",
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
        running.rss_at_start = rss_bytes(running.pid)?;
        Ok(running)
    }

    /// User + system CPU seconds of the broker so far.
    pub(super) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(self.pid)
    }

    pub(super) fn rss(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid)
    }

    pub(super) fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(0, Iterator::count)
    }

    /// Whether the broker is still running (a crash during a run is a finding, not a figure).
    pub(super) fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(child) = &mut self.child else { return };
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
    let out = Command::new(program)
        .args([
            "solution",
            "create",
            "--namespace",
            NAMESPACE,
            "--json",
            "--data",
        ])
        .arg(&data)
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
    let (id, secret) = (field("solutionId")?, field("secret")?);

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

    let mut command = Command::new(program);
    command
        .arg("serve")
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&config)
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
    let (child, listeners) = spawn_until_ready(command, "thingsgate serve", &dir.join("stderr"))?;
    let pid = child.id();
    Ok(Running {
        kind,
        child: Some(child),
        pid,
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
