//! What the benchmarks that run the real binary share: running `thingsgate`, owning the server
//! process, reading a process's CPU time and memory from `/proc`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use broker::mqtt::codec::Utf8Str;
use bytes::Bytes;

#[allow(dead_code, reason = "not every benchmark speaks MQTT")]
pub fn utf8(text: &str) -> Utf8Str {
    Utf8Str::new(Bytes::copy_from_slice(text.as_bytes())).unwrap()
}

/// Runs `thingsgate ARGS` (the release binary of this package) and returns its stdout.
pub fn thingsgate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_thingsgate"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thingsgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Creates solution `bench` owning `namespace` in the data dir `data`; returns its secret.
pub fn create_solution(data: &str, namespace: &str) -> String {
    let created: serde_json::Value = serde_json::from_str(&thingsgate(&[
        "solution",
        "create",
        "--data",
        data,
        "--namespace",
        namespace,
        "--id",
        "bench",
        "--json",
    ]))
    .unwrap();
    created["secret"].as_str().unwrap().to_owned()
}

/// Starts `thingsgate serve ARGS` (logging at `warn`) and waits for `ready`: the server and the
/// addresses it printed, by listener (`mqtt`, `amqp`, `http`, …).
pub fn serve(args: &[&str]) -> (Server, HashMap<String, SocketAddr>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thingsgate"))
        .arg("serve")
        .args(args)
        .env("THINGSGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let mut addresses = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        if let Some((name, address)) = line.split_once(" listening on ") {
            addresses.insert(name.to_owned(), address.parse().unwrap());
        }
    }
    (server, addresses)
}

/// The broker process, killed when dropped (also while unwinding from a panic).
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User + system CPU time of a process (`self` or a PID), in seconds.
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start after the last `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Resident memory of a process, in KiB.
#[allow(dead_code, reason = "not every benchmark measures memory")]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The PID of RabbitMQ's Erlang VM (`beam.smp`, preferring one whose command line names
/// RabbitMQ).
#[allow(dead_code, reason = "not every benchmark drives RabbitMQ")]
pub fn rabbitmq_pid() -> Option<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() != "beam.smp" {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let rabbit = String::from_utf8_lossy(&cmdline).contains("rabbit");
        found.push((rabbit, name));
    }
    found.sort();
    found.pop().map(|(_, pid)| pid)
}
