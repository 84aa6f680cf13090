//! Storage benchmark: `cargo bench -p twin --bench store`.
//!
//! A plain program (not criterion: the figures are rates of whole threads and one-off open
//! times) that prints:
//! - this machine's `fdatasync` latency for a small append, idle and with both cores busy;
//! - durable appends/s with 1, 8, 64 and 256 concurrent writers, each doing write → wait, with
//!   mean batch size and per-write latency;
//! - the time to open a store of 1,000,000 events, without and with a snapshot.
//!
//! The data goes to a temporary directory under `THINGSGATE_BENCH_DIR` (default: the system
//! temporary directory); it must be on the disk you want to measure. `STORE_BENCH_SECONDS`
//! sets the duration of each throughput run (default 5), `STORE_BENCH_EVENTS` the size of the
//! open-time store (default 1,000,000), `STORE_BENCH_ONLY=fsync|appends|open` runs one part.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::convert::Infallible;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use twin::policy::Timestamp;
use twin::store::{Durable, EmbeddedStore, StoreOptions, TwinStore, TwinStoreExt};
use twin::{EntityKey, EntityKind, Event, EventAction};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn temp_dir() -> tempfile::TempDir {
    match std::env::var_os("THINGSGATE_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Appends 128 bytes and `fdatasync`s, `n` times; returns the sorted latencies.
fn fsync_latencies(dir: &Path, n: usize) -> Vec<Duration> {
    let path = dir.join("fsync-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let mut latencies: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            file.write_all(&[0x5a; 128]).unwrap();
            file.sync_data().unwrap();
            started.elapsed()
        })
        .collect();
    std::fs::remove_file(path).unwrap();
    latencies.sort();
    latencies
}

fn report_fsync(label: &str, latencies: &[Duration]) {
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    println!(
        "  {label:<28} mean {}  p50 {}  p99 {}",
        ms(mean),
        ms(percentile(latencies, 0.5)),
        ms(percentile(latencies, 0.99))
    );
}

fn measure_fsync() {
    let dir = temp_dir();
    println!("fdatasync latency (append 128 B + sync_data, 300 times):");
    report_fsync("idle machine", &fsync_latencies(dir.path(), 300));
    let stop = Arc::new(AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    report_fsync(
        &format!("{cores} cores busy"),
        &fsync_latencies(dir.path(), 300),
    );
    stop.store(true, Ordering::Relaxed);
    for spinner in spinners {
        spinner.join().unwrap();
    }
}

fn thing(id: &str) -> EntityKey {
    EntityKey::new(EntityKind::Thing, id)
}

/// One small durable-to-be update of thing `id` (created on first use); the caller waits.
fn update(store: &dyn TwinStore, key: &EntityKey, value: u64) -> Durable {
    store
        .write(key, |current| -> Result<_, Infallible> {
            let revision = current.map_or(1, |e| e.revision + 1);
            let timestamp = Timestamp::from_unix_millis(1_700_000_000_000 + value as i64);
            Ok(vec![match current {
                None => Event {
                    key: key.clone(),
                    action: EventAction::Created,
                    path: String::new(),
                    value: Some(json!({
                        "thingId": key.id, "policyId": "org.acme:policy",
                        "features": {"temp": {"properties": {"value": value}}}
                    })),
                    revision,
                    timestamp,
                },
                Some(_) => Event {
                    key: key.clone(),
                    action: EventAction::Modified,
                    path: "/features/temp/properties/value".into(),
                    value: Some(json!(value)),
                    revision,
                    timestamp,
                },
            }])
        })
        .unwrap()
        .durable
}

fn measure_appends(writers: usize, seconds: u64) {
    let dir = temp_dir();
    let mut options = StoreOptions::new(dir.path());
    if let Ok(micros) = std::env::var("STORE_BENCH_DELAY_US") {
        options.group_commit_delay = Duration::from_micros(micros.parse().unwrap());
    }
    let store = Arc::new(EmbeddedStore::open(options).unwrap());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                let key = thing(&format!("org.acme:device-{w}"));
                let mut latencies = Vec::new();
                let mut value = 0;
                while Instant::now() < deadline {
                    let started = Instant::now();
                    update(&*store, &key, value).wait().unwrap();
                    latencies.push(started.elapsed());
                    value += 1;
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    let mut latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = started.elapsed();
    let stats = store.journal_stats().unwrap_or_default();
    store.close().unwrap();
    latencies.sort();
    println!(
        "  {writers:>2} writers: {:>8.0} durable appends/s  ({} appends, {} fsyncs, {:.1} appends/fsync, latency p50 {} p99 {})",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        latencies.len(),
        stats.batches,
        stats.writes as f64 / stats.batches.max(1) as f64,
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
    );
}

fn measure_open(events: u64) {
    const EVENTS_PER_THING: u64 = 10;
    let dir = temp_dir();
    let mut options = StoreOptions::new(dir.path());
    options.snapshot_every_events = 0;
    options.snapshot_every = None;
    let things = events / EVENTS_PER_THING;
    println!("open time, {events} events ({things} things × {EVENTS_PER_THING} small updates):");
    let started = Instant::now();
    {
        let store = Arc::new(EmbeddedStore::open(options.clone()).unwrap());
        let producers = 4;
        let threads: Vec<_> = (0..producers)
            .map(|p| {
                let store = store.clone();
                std::thread::spawn(move || {
                    // Pipelined: wait only now and then, so batches are large.
                    let mut pending = None;
                    for round in 0..EVENTS_PER_THING {
                        for t in (p..things).step_by(producers as usize) {
                            let key = thing(&format!("org.acme:device-{t}"));
                            pending = Some(update(&*store, &key, round));
                            if t % 1000 == 0 {
                                pending.take().unwrap().wait().unwrap();
                            }
                        }
                    }
                    if let Some(last) = pending {
                        last.wait().unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(store.last_seq(), events);
        // Dropped without close: no snapshot, the whole journal is replayed.
    }
    let journal_bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "  generated in {:.1} s, {:.0} MB on disk",
        started.elapsed().as_secs_f64(),
        journal_bytes as f64 / 1e6
    );

    let started = Instant::now();
    let store = EmbeddedStore::open(options.clone()).unwrap();
    let without = started.elapsed();
    assert_eq!(store.keys(EntityKind::Thing).len() as u64, things);
    let started = Instant::now();
    store.close().unwrap();
    let closing = started.elapsed();
    drop(store);
    let snapshot_bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("snapshot-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();

    let started = Instant::now();
    let store = EmbeddedStore::open(options).unwrap();
    let with = started.elapsed();
    assert_eq!(store.keys(EntityKind::Thing).len() as u64, things);
    println!(
        "  without snapshot (replays {events} events): {:>8.0} ms",
        without.as_secs_f64() * 1e3
    );
    println!(
        "  with snapshot ({things} entities, {:.1} MB, written by close() in {:.0} ms): {:>8.0} ms",
        snapshot_bytes as f64 / 1e6,
        closing.as_secs_f64() * 1e3,
        with.as_secs_f64() * 1e3
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either:
    // with `--test` (or no `--bench`), run a tiny smoke version.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let seconds = if smoke {
        1
    } else {
        env_u64("STORE_BENCH_SECONDS", 5)
    };
    let events = if smoke {
        10_000
    } else {
        env_u64("STORE_BENCH_EVENTS", 1_000_000)
    };
    // `STORE_BENCH_ONLY=fsync|appends|open` runs one part.
    let only = std::env::var("STORE_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;
    if run("fsync") {
        measure_fsync();
    }
    if run("appends") {
        println!("durable appends (each writer: write → wait, its own thing, {seconds} s):");
        let writers = std::env::var("STORE_BENCH_WRITERS").map_or(vec![1, 8, 64, 256], |list| {
            list.split(',').map(|n| n.parse().unwrap()).collect()
        });
        for writers in writers {
            measure_appends(writers, seconds);
        }
    }
    if run("open") {
        measure_open(events);
    }
}
