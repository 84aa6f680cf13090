//! What the benchmarks that run the real binary share: running `thingsgate`, owning the server
//! process, reading a process's CPU time and memory from `/proc`.

use std::process::{Child, Command};

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
