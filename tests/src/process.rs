//! Third-party client processes (mosquitto and amqp-tools, Python's paho-mqtt and pika) run
//! from the tests: to completion within a bound, or streaming their stdout lines.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a client process may take.
pub const PROCESS_LIMIT: Duration = Duration::from_secs(30);

/// Runs `command` to completion, killing it and failing after [`PROCESS_LIMIT`].
pub fn run_bounded(command: Command) -> Output {
    run_bounded_for(command, PROCESS_LIMIT)
}

/// Runs `command` to completion, killing it and failing after `limit`.
pub fn run_bounded_for(mut command: Command, limit: Duration) -> Output {
    let described = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{described}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{described}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{described} did not finish within {limit:?}");
        }
    }
}

/// A client process whose stdout lines arrive on a channel; killed on drop.
#[derive(Debug)]
pub struct Streaming {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Streaming {
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Streaming {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next stdout line within `within`, if one came.
    pub fn line_within(&mut self, within: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(within).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Waits for a stdout line containing `needle`.
    pub fn wait_for_line(&mut self, needle: &str) {
        let deadline = Instant::now() + PROCESS_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no stdout line with `{needle}`; stdout so far:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.kill_and_stderr()
                ),
            }
        }
    }

    /// Waits for the process to exit: every stdout line if it succeeded, else what it said.
    pub fn finish(mut self) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + PROCESS_LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let stderr = self.kill_and_stderr();
                return Err(format!(
                    "client still running after {PROCESS_LIMIT:?}; stdout:\n{}\nstderr:\n{stderr}",
                    self.seen.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push(line);
        }
        let seen = std::mem::take(&mut self.seen);
        if status.success() {
            Ok(seen)
        } else {
            let stderr = self.kill_and_stderr();
            Err(format!(
                "client exited with {status}\nstdout:\n{}\nstderr:\n{stderr}",
                seen.join("\n")
            ))
        }
    }

    fn kill_and_stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        stderr
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes as text (lossy), for messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
