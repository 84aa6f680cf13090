//! kill -9 loses nothing that was acknowledged.
//!
//! The test re-executes its own binary as a child (`--exact crash_child_writes_until_killed
//! --ignored`, with the data directory in an environment variable). The child writes from
//! several threads as fast as it can and prints one line per write *after* its `Durable`
//! completed. The parent SIGKILLs it at a random moment (`Child::kill`), reopens the store and
//! checks that every acknowledged write is there — round after round in the same directory,
//! so it also reopens after repeated crashes, torn tails and interrupted snapshots.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod store_common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use store_common::{Logs, options, set_n, thing};
use twin::store::{EmbeddedStore, StoreOptions, TwinStore};

const CHILD_DIR_VAR: &str = "TWIN_STORE_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "crash_child_writes_until_killed";
const THREADS: u64 = 4;
const THINGS_PER_THREAD: u64 = 3;

fn child_options(dir: &str) -> StoreOptions {
    let mut options = options(std::path::Path::new(dir));
    // Snapshots and segment rolls happen often, so kills land in the middle of them too.
    options.snapshot_every_events = 250;
    options.segment_max_bytes = 8 << 10;
    options
}

/// The child: writes until killed (or, should the parent be gone, for at most 30 s).
#[test]
#[ignore = "run as a child process by every_acknowledged_write_survives_kill_9"]
fn crash_child_writes_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR_VAR) else {
        return;
    };
    let store = Arc::new(EmbeddedStore::open(child_options(&dir)).unwrap());
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "OPEN").unwrap();
        out.flush().unwrap();
    }
    let stop_at = Instant::now() + Duration::from_secs(30);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    if Instant::now() > stop_at {
                        return;
                    }
                    let id = format!("ns:t{t}-{}", i % THINGS_PER_THREAD);
                    let value = store
                        .get(&thing(&id))
                        .map_or(0, |e| e.doc["attributes"]["n"].as_u64().unwrap() + 1);
                    let written = set_n(&*store, &id, value);
                    let revision = written.entity.as_ref().unwrap().revision;
                    written.durable.wait().unwrap();
                    let mut out = std::io::stdout().lock();
                    if writeln!(out, "ACK {id} {revision} {value}")
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        return; // the parent is gone
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

/// xorshift64*: enough randomness for kill moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

enum Line {
    Open,
    Ack(String, u64, u64),
}

/// Reads a line of the child; the test harness may have printed `test … ` before it.
fn parse(line: &str) -> Option<Line> {
    if line.ends_with("OPEN") {
        return Some(Line::Open);
    }
    let at = line.find("ACK ")?;
    let mut parts = line.get(at + 4..)?.split(' ');
    let id = parts.next()?.to_owned();
    let revision = parts.next()?.parse().ok()?;
    let value = parts.next()?.parse().ok()?;
    Some(Line::Ack(id, revision, value))
}

#[test]
fn every_acknowledged_write_survives_kill_9() {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let dir_str = dir.path().to_str().unwrap().to_owned();
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    // Thing ID → the newest acknowledged (revision, value).
    let mut acked: HashMap<String, (u64, u64)> = HashMap::new();
    let mut total_acks = 0usize;
    let mut torn_tails = 0usize;
    let rounds = 30;
    for round in 0..rounds {
        let stderr_path = dir.path().join("child-stderr.txt");
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                CHILD_TEST,
                "--nocapture",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_VAR, &dir_str)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, received) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut record = |line: &str, acked: &mut HashMap<String, (u64, u64)>| {
            let parsed = parse(line);
            if let Some(Line::Ack(id, revision, value)) = &parsed {
                total_acks += 1;
                let newest = acked.entry(id.clone()).or_insert((*revision, *value));
                if *revision > newest.0 {
                    *newest = (*revision, *value);
                }
            }
            parsed
        };

        // Every fifth round the kill lands during start-up (recovery, truncation); otherwise
        // after a random number of acknowledged writes.
        if round % 5 == 4 {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
        } else {
            let target = rng.below(600);
            let mut open = false;
            let mut round_acks = 0;
            let give_up = Instant::now() + Duration::from_secs(20);
            while !(open && round_acks >= target) {
                let left = give_up.saturating_duration_since(Instant::now());
                match received.recv_timeout(left) {
                    Ok(line) => match record(&line, &mut acked) {
                        Some(Line::Open) => open = true,
                        Some(Line::Ack(..)) => round_acks += 1,
                        None => {}
                    },
                    Err(_) => {
                        let _ = child.kill();
                        panic!(
                            "round {round}: the child stopped or stalled (open: {open}, {round_acks} acks); stderr:\n{}",
                            std::fs::read_to_string(&stderr_path).unwrap_or_default()
                        );
                    }
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // Lines printed before the kill are acknowledged writes too.
        for line in received.try_iter() {
            record(&line, &mut acked);
        }

        let logs = Logs::default();
        let store = logs
            .capture(|| EmbeddedStore::open(child_options(&dir_str)))
            .unwrap_or_else(|e| panic!("round {round} (seed {seed}): reopening failed: {e}"));
        torn_tails += logs.lines().iter().filter(|l| l.contains("torn")).count();
        for (id, &(revision, value)) in &acked {
            let entity = store.get(&thing(id)).unwrap_or_else(|| {
                panic!("round {round} (seed {seed}): acknowledged `{id}` is missing")
            });
            let n = entity.doc["attributes"]["n"].as_u64().unwrap();
            assert!(
                entity.revision > revision || (entity.revision == revision && n == value),
                "round {round} (seed {seed}): `{id}` acknowledged at revision {revision} with n = {value}, \
                 found revision {} with n = {n}",
                entity.revision
            );
            assert!(
                n >= value,
                "round {round}: `{id}` went back from {value} to {n}"
            );
        }
        if round % 3 == 0 {
            store.close().unwrap();
        }
        drop(store);
    }
    println!(
        "{rounds} rounds, {total_acks} acknowledged writes checked, {torn_tails} torn tails truncated, {:?}",
        started.elapsed()
    );
    assert!(total_acks > 0);
}
