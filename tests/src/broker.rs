//! A running `thingsgate serve` for one test: its own temp data dir and config, port 0, stdout
//! read until `ready`, stderr captured to a file the test can search, killed on drop.
//!
//! Solutions are made with the real command line on the stopped data dir
//! (`thingsgate solution …`), as an operator would; [`Broker::start`] then runs the server on it.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{stderr, stdout, thingsgate_bin};

/// How long start-up may take (a debug build, tests running in parallel on a small machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a graceful stop (SIGTERM) may take before the test fails.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The credentials `thingsgate solution create --json` prints once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Solution {
    pub id: String,
    pub api_token: String,
    /// Secret `s1`.
    pub secret: String,
}

/// One test's broker: a temp dir holding `data/` (the data dir), `config.toml`, `stderr.log`.
#[derive(Debug)]
pub struct Broker {
    dir: tempfile::TempDir,
    /// Extra `serve` arguments, after `--data`, `--config` and `--mqtt 127.0.0.1:0`.
    args: Vec<String>,
    /// Environment of the server beyond the inherited one (minus `THINGSGATE_…` variables).
    env: Vec<(String, String)>,
    /// Cluster mode: `--cluster URLS` instead of `--data` (the stream in the environment).
    cluster: Option<String>,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    child: Child,
    mqtt: SocketAddr,
    mqtts: Option<SocketAddr>,
    /// Every stdout line, including those after `ready` (drained by a thread so the server
    /// never blocks on a full pipe).
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Default for Broker {
    fn default() -> Self {
        Self::new()
    }
}

impl Broker {
    /// A stopped broker with an empty config and no data dir yet (`solution create` makes it).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("thingsgate-e2e-")
            .tempdir()
            .expect("a temp dir");
        let broker = Broker {
            dir,
            args: Vec::new(),
            env: vec![("THINGSGATE_LOG".to_owned(), "debug".to_owned())],
            cluster: None,
            running: None,
        };
        broker.write_config("");
        broker
    }

    /// A cluster node: `serve --cluster URLS` with stream `stream` (no data dir), HTTP on a
    /// free port. Solutions: [`create_cluster_solution`].
    pub fn cluster_node(urls: &str, stream: &str) -> Self {
        let mut broker = Broker::new();
        broker.cluster = Some(urls.to_owned());
        broker.env("THINGSGATE_CLUSTER_STREAM", stream);
        broker.arg("--http").arg("127.0.0.1:0");
        broker
    }

    /// The temp dir holding the data dir, config and logs (a place for JWKS files, keys, …).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The data dir.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The config file passed with `--config`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Where the server's stderr (its logs) goes, across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// Replaces the config file (takes effect at the next start).
    pub fn write_config(&self, toml: &str) {
        std::fs::write(self.config_path(), toml).expect("config written");
    }

    /// Adds `serve` arguments for the next start (e.g. `--mqtts 127.0.0.1:0`).
    pub fn arg(&mut self, arg: &str) -> &mut Self {
        self.args.push(arg.to_owned());
        self
    }

    /// Sets an environment variable of the server for the next start.
    pub fn env(&mut self, name: &str, value: &str) -> &mut Self {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    // --- the command line on the stopped data dir ---------------------------------------------

    /// Runs `thingsgate ARGS` (any command) and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(thingsgate_bin())
            .args(args)
            .env_remove("THINGSGATE_LOG")
            .output()
            .expect("thingsgate runs")
    }

    /// Runs `thingsgate solution SUBCOMMAND… --data DATA ARGS…`, which must succeed; its stdout.
    pub fn solution_cmd(&self, subcommand: &[&str], args: &[&str]) -> String {
        assert!(
            self.running.is_none(),
            "`thingsgate solution` works on a stopped data dir: stop the broker first"
        );
        let data = self.data();
        let mut all = vec!["solution"];
        all.extend_from_slice(subcommand);
        all.extend_from_slice(&["--data", data.to_str().expect("UTF-8 temp path")]);
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert_eq!(
            out.status.code(),
            Some(0),
            "thingsgate {all:?}\nstdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// `solution create --namespace NS --json`.
    pub fn create_solution(&self, namespace: &str) -> Solution {
        let out = self.solution_cmd(&["create"], &["--namespace", namespace, "--json"]);
        let doc: Value = serde_json::from_str(&out).expect("create --json prints JSON");
        let field = |k: &str| {
            doc[k]
                .as_str()
                .unwrap_or_else(|| panic!("`{k}` missing in {out}"))
                .to_owned()
        };
        Solution {
            id: field("solutionId"),
            api_token: field("apiToken"),
            secret: field("secret"),
        }
    }

    /// `solution add-secret --json`: (secret ID, secret).
    pub fn add_secret(&self, solution: &str) -> (String, String) {
        let out = self.solution_cmd(&["add-secret"], &["--solution", solution, "--json"]);
        let doc: Value = serde_json::from_str(&out).expect("add-secret --json prints JSON");
        (
            doc["secretId"].as_str().expect("secretId").to_owned(),
            doc["secret"].as_str().expect("secret").to_owned(),
        )
    }

    /// `solution revoke-secret --secret-id ID`.
    pub fn revoke_secret(&self, solution: &str, secret_id: &str) {
        self.solution_cmd(
            &["revoke-secret"],
            &["--solution", solution, "--secret-id", secret_id],
        );
    }

    /// `solution policy get`.
    pub fn policy(&self, solution: &str) -> Value {
        let out = self.solution_cmd(&["policy", "get"], &["--solution", solution]);
        serde_json::from_str(&out).expect("policy get prints JSON")
    }

    /// `solution policy set` with `policy`.
    pub fn set_policy(&self, solution: &str, policy: &Value) {
        let file = self.dir.path().join(format!("policy-{solution}.json"));
        std::fs::write(&file, policy.to_string()).expect("policy file written");
        self.solution_cmd(
            &["policy", "set"],
            &[
                "--solution",
                solution,
                file.to_str().expect("UTF-8 temp path"),
            ],
        );
    }

    /// Adds a policy entry granting `subjects` READ and WRITE on `topic:/` (every plain topic),
    /// keeping the default entries (so the lockout rule stays satisfied).
    pub fn grant_topics(&self, solution: &str, subjects: &[&str]) {
        let mut policy = self.policy(solution);
        let subjects: serde_json::Map<String, Value> = subjects
            .iter()
            .map(|s| ((*s).to_owned(), json!({"type": "e2e test"})))
            .collect();
        policy["entries"]["e2e-topics"] = json!({
            "subjects": subjects,
            "resources": {"topic:/": {"grant": ["READ", "WRITE"], "revoke": []}},
        });
        self.set_policy(solution, &policy);
    }

    // --- the server ------------------------------------------------------------------------------

    /// Starts `thingsgate serve --data DATA --config CONFIG --mqtt 127.0.0.1:0 [ARGS]` and waits
    /// for `ready` on its stdout. Panics (with the server's stderr) if it does not get there.
    pub fn start(&mut self) -> &mut Self {
        assert!(self.running.is_none(), "the broker is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut command = Command::new(thingsgate_bin());
        command.arg("serve");
        match &self.cluster {
            Some(urls) => command.arg("--cluster").arg(urls),
            None => command.arg("--data").arg(self.data()),
        };
        command
            .arg("--config")
            .arg(self.config_path())
            .args(["--mqtt", "127.0.0.1:0"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        // Only what this test sets: an override inherited from the developer's shell (or
        // `THINGSGATE_BIN`) must not change the server under test.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("THINGSGATE_") {
                command.env_remove(name);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", thingsgate_bin().display()));
        let pipe = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let collected = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                collected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.clone());
                // The receiver is gone once `ready` was seen: keep draining.
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let mut mqtt = None;
        let mut mqtts = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let line = line.trim();
                    if line == "ready" {
                        break;
                    }
                    if let Some(addr) = line.strip_prefix("mqtt listening on ") {
                        mqtt = Some(parse_addr(addr, line));
                    } else if let Some(addr) = line.strip_prefix("mqtts listening on ") {
                        mqtts = Some(parse_addr(addr, line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "thingsgate serve did not print `ready` within {START_TIMEOUT:?}\n\
                         stdout: {:?}\nstderr:\n{}",
                        lines.lock().unwrap_or_else(|e| e.into_inner()),
                        self.logs()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = wait_with_deadline(&mut child, Duration::from_secs(5));
                    panic!(
                        "thingsgate serve exited before `ready` ({status:?})\nstdout: {:?}\n\
                         stderr:\n{}",
                        lines.lock().unwrap_or_else(|e| e.into_inner()),
                        self.logs()
                    );
                }
            }
        }
        let Some(mqtt) = mqtt else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "thingsgate serve printed `ready` without `mqtt listening on ADDR` before it\n\
                 stdout: {:?}",
                lines.lock().unwrap_or_else(|e| e.into_inner())
            );
        };
        assert_ne!(
            mqtt.port(),
            1883,
            "the broker must not take 1883 (another broker runs there)"
        );
        self.running = Some(Running {
            child,
            mqtt,
            mqtts,
            stdout: lines,
        });
        self
    }

    /// Whether the server process is running (started and not yet exited).
    pub fn is_running(&mut self) -> bool {
        match &mut self.running {
            Some(running) => matches!(running.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Whether it was started and not killed or stopped since (without asking the process).
    pub fn is_started(&self) -> bool {
        self.running.is_some()
    }

    fn running(&self) -> &Running {
        self.running
            .as_ref()
            .expect("the broker is not running: call start() first")
    }

    /// The plain MQTT listener's bound address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.running().mqtt
    }

    /// The plain MQTT listener's port.
    pub fn port(&self) -> u16 {
        self.mqtt_addr().port()
    }

    /// The TLS listener's bound address, if `--mqtts` was given.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.running().mqtts
    }

    /// The server process ID.
    pub fn pid(&self) -> u32 {
        self.running().child.id()
    }

    /// Every stdout line so far (of the current run).
    pub fn stdout_lines(&self) -> Vec<String> {
        self.running()
            .stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Everything the server wrote to stderr, across restarts.
    pub fn logs(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut running) = self.running.take() {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }

    /// Stops the server gracefully (SIGTERM) and waits for it to exit; panics (with its logs)
    /// if it does not exit within [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> ExitStatus {
        let mut running = self.running.take().expect("the broker is not running");
        let pid = running.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("`kill` runs");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        match wait_with_deadline(&mut running.child, STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                panic!(
                    "thingsgate serve did not exit within {STOP_TIMEOUT:?} of SIGTERM\nstderr:\n{}",
                    self.logs()
                );
            }
        }
    }

    /// Stops the server gracefully and starts it again on the same data dir and config (the
    /// port changes: it binds port 0 again).
    pub fn restart(&mut self) -> &mut Self {
        let status = self.stop();
        assert!(
            status.success(),
            "thingsgate serve exited with {status} on SIGTERM\nstderr:\n{}",
            self.logs()
        );
        self.start()
    }

    /// Asserts that none of `secrets` (secrets, API tokens, JWTs or their signatures) appears in
    /// the server's logs.
    pub fn assert_logs_never_contain(&self, secrets: &[&str]) {
        let logs = self.logs();
        for secret in secrets {
            assert!(!secret.is_empty());
            if let Some(at) = logs.find(secret) {
                let line = logs
                    .get(..at)
                    .and_then(|before| before.rfind('\n'))
                    .map_or(0, |i| i + 1);
                let end = logs
                    .get(at..)
                    .and_then(|after| after.find('\n'))
                    .map_or(logs.len(), |i| at + i);
                panic!(
                    "a credential appears in the server's log:\n{}",
                    logs.get(line..end).unwrap_or_default()
                );
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn parse_addr(text: &str, line: &str) -> SocketAddr {
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("`{line}`: not an address: {e}"))
}

/// Waits for `child` to exit, polling until `limit`; `None` if it is still running.
fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `thingsgate solution create --cluster URLS` on stream `stream`: a solution every node of the
/// cluster serves at once.
pub fn create_cluster_solution(urls: &str, stream: &str, id: &str, namespace: &str) -> Solution {
    create_cluster_solution_env(urls, stream, id, namespace, &[])
}

/// [`create_cluster_solution`] with more of the command's environment: e.g.
/// `THINGSGATE_CLUSTER_REPLICAS=3`, so that the stream it creates (when it is the first) is
/// replicated.
pub fn create_cluster_solution_env(
    urls: &str,
    stream: &str,
    id: &str,
    namespace: &str,
    env: &[(&str, &str)],
) -> Solution {
    let output = Command::new(thingsgate_bin())
        .args([
            "solution",
            "create",
            "--cluster",
            urls,
            "--namespace",
            namespace,
            "--id",
            id,
            "--json",
        ])
        .env("THINGSGATE_CLUSTER_STREAM", stream)
        .env_remove("THINGSGATE_CLUSTER_URLS")
        .envs(env.iter().copied())
        .output()
        .expect("thingsgate runs");
    assert!(
        output.status.success(),
        "solution create --cluster failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    Solution {
        id: doc["solutionId"].as_str().expect("solutionId").to_owned(),
        api_token: doc["apiToken"].as_str().expect("apiToken").to_owned(),
        secret: doc["secret"].as_str().expect("secret").to_owned(),
    }
}
