//! Drives `thingsgate bench run` processes for `bench compare`: spawns them with
//! `--json --quiet --phase-marks`, samples the broker when they say a phase begins, and reads
//! their reports.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use super::brokers::Running;

/// The broker as seen at one instant of a run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Probe {
    pub(super) at: Instant,
    pub(super) cpu_seconds: f64,
    pub(super) rss: u64,
    pub(super) open_files: usize,
}

impl Probe {
    pub(super) fn take(broker: &Running) -> anyhow::Result<Self> {
        Ok(Probe {
            at: Instant::now(),
            cpu_seconds: broker.cpu_seconds()?,
            rss: broker.rss()?,
            open_files: broker.open_files(),
        })
    }
}

/// One generator process to start: its `bench run` arguments and environment.
#[derive(Debug, Clone)]
pub(super) struct Job {
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
}

/// What the generators of one run produced, with the broker probed at each phase: before the
/// start, when every process was publishing (the ramp is over), a second later (`settled`),
/// when the first one began to drain (publishing is over) and when the last one was done.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) reports: Vec<Value>,
    pub(super) start: Probe,
    pub(super) publishing: Probe,
    pub(super) settled: Probe,
    pub(super) draining: Probe,
    pub(super) done: Probe,
}

enum Event {
    Phase(&'static str),
    Exited,
}

/// Runs `jobs` at once against `broker`; fails if a process fails, hangs past `limit`, or the
/// broker dies.
pub(super) fn run(
    program: &Path,
    broker: &mut Running,
    jobs: &[Job],
    limit: Duration,
) -> anyhow::Result<Outcome> {
    let start = Probe::take(broker)?;
    let (tx, rx) = mpsc::channel::<(usize, Event)>();
    let mut children = Vec::with_capacity(jobs.len());
    let mut outputs = Vec::with_capacity(jobs.len());
    let mut errors = Vec::with_capacity(jobs.len());
    for (i, job) in jobs.iter().enumerate() {
        let mut command = Command::new(program);
        command
            .args(["bench", "run", "--json", "--quiet", "--phase-marks"])
            .args(&job.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("THINGSGATE_") {
                command.env_remove(name);
            }
        }
        command.envs(job.env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {} bench run", program.display()))?;
        let stdout = child.stdout.take().context("generator: no stdout")?;
        let stderr = child.stderr.take().context("generator: no stderr")?;
        outputs.push(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stdout).read_to_string(&mut text);
            text
        }));
        let tx = tx.clone();
        errors.push(std::thread::spawn(move || {
            let mut other = Vec::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let phase = match line.trim() {
                    "phase publishing" => Some("publishing"),
                    "phase draining" => Some("draining"),
                    "phase done" => Some("done"),
                    _ => None,
                };
                match phase {
                    Some(p) => {
                        let _ = tx.send((i, Event::Phase(p)));
                    }
                    None => other.push(line),
                }
            }
            let _ = tx.send((i, Event::Exited));
            other.join("\n")
        }));
        children.push(child);
    }
    drop(tx);

    let n = jobs.len();
    let deadline = Instant::now() + limit;
    let (mut publishing, mut exited) = (0, 0);
    let mut done = 0;
    let (mut at_publishing, mut at_settled, mut at_draining, mut at_done) =
        (None, None, None, None);
    let mut settle_at: Option<Instant> = None;
    while exited < n {
        let wait = match settle_at {
            Some(at) => at.saturating_duration_since(Instant::now()),
            None => deadline.saturating_duration_since(Instant::now()),
        };
        match rx.recv_timeout(wait) {
            Ok((_, Event::Phase("publishing"))) => {
                publishing += 1;
                if publishing == n {
                    at_publishing = Some(Probe::take(broker)?);
                    settle_at = Some(Instant::now() + Duration::from_secs(1));
                }
            }
            Ok((_, Event::Phase("draining"))) => {
                if at_draining.is_none() {
                    at_draining = Some(Probe::take(broker)?);
                }
            }
            Ok((_, Event::Phase(_))) => {
                done += 1;
                if done == n {
                    at_done = Some(Probe::take(broker)?);
                }
            }
            Ok((_, Event::Exited)) => exited += 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(at) = settle_at
                    && Instant::now() >= at
                {
                    settle_at = None;
                    at_settled = Some(Probe::take(broker)?);
                    continue;
                }
                for child in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                bail!("the load generator did not finish within {limit:?}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if !broker.alive() {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            bail!("{} exited during the run", broker.kind.name());
        }
    }
    let mut reports = Vec::with_capacity(n);
    for ((mut child, output), error) in children.into_iter().zip(outputs).zip(errors) {
        let status = child.wait().context("generator: wait")?;
        let stdout = output.join().unwrap_or_default();
        let stderr = error.join().unwrap_or_default();
        if !status.success() {
            bail!(
                "bench run exited with {status}: {}{}",
                stderr.trim(),
                if stdout.trim().is_empty() {
                    String::new()
                } else {
                    format!("\n{}", stdout.trim())
                }
            );
        }
        let report: Value = serde_json::from_str(stdout.trim())
            .with_context(|| format!("bench run printed no JSON report: {}", stderr.trim()))?;
        reports.push(report);
    }
    let Some(publishing) = at_publishing else {
        bail!("the load generator never started publishing");
    };
    let settled = at_settled.unwrap_or(publishing);
    let draining = match at_draining {
        Some(p) => p,
        None => Probe::take(broker)?,
    };
    let done = match at_done {
        Some(p) => p,
        None => Probe::take(broker)?,
    };
    Ok(Outcome {
        reports,
        start,
        publishing,
        settled,
        draining,
        done,
    })
}
