//! `thingsgate bench compare`, run as the real binary: Thingsgate and Mosquitto each started
//! fresh, driven by `bench run`, their CPU and memory read from /proc. The smallest comparison
//! (one round, one second): it checks the instrument, not the figures.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::{Command, Output};
use std::time::Duration;

use e2e::process::run_bounded_for;
use e2e::{stderr, stdout, thingsgate_bin};
use serde_json::Value;

/// A comparison starts and stops several brokers: more than a client's 30 s.
const LIMIT: Duration = Duration::from_secs(180);

fn compare(args: &[&str]) -> Output {
    let mut command = Command::new(thingsgate_bin());
    command.args(["bench", "compare"]).args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("THINGSGATE_") {
            command.env_remove(name);
        }
    }
    run_bounded_for(command, LIMIT)
}

fn require_mosquitto_binary() {
    let found = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .iter()
        .any(|p| std::path::Path::new(p).is_file());
    assert!(
        found,
        "the Mosquitto broker is not installed: `apt-get install mosquitto` (bench compare \
         starts its own Mosquitto on a free port)"
    );
}

#[test]
fn thingsgate_and_mosquitto_side_by_side() {
    require_mosquitto_binary();
    let out = compare(&[
        "--scenarios",
        "qos1,idle",
        "--brokers",
        "thingsgate,mosquitto",
        "--runs",
        "1",
        "--duration",
        "1",
        "--idle-connections",
        "300",
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    let doc: Value = serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("--json prints one object ({e}): {}", stdout(&out)));
    assert_eq!(doc["failures"], serde_json::json!([]), "{doc:#}");
    let samples = doc["samples"].as_array().unwrap();
    let find = |scenario: &str, broker: &str| {
        samples
            .iter()
            .find(|s| s["scenario"] == scenario && s["broker"] == broker)
            .unwrap_or_else(|| panic!("no {scenario} sample of {broker}: {doc:#}"))["figures"]
            .clone()
    };
    for broker in ["Thingsgate", "Mosquitto"] {
        let qos1 = find("qos1", broker);
        assert!(qos1["received"].as_u64().unwrap() > 0, "{broker}: {qos1:#}");
        assert_eq!(qos1["lost"], 0, "{broker}: {qos1:#}");
        assert_eq!(qos1["errors"], 0, "{broker}: {qos1:#}");
        assert!(
            qos1["per_core_second"].as_f64().unwrap() > 0.0,
            "{broker}: {qos1:#}"
        );
        assert!(qos1["p99_ms"].as_f64().unwrap() > 0.0, "{broker}: {qos1:#}");

        let idle = find("idle", broker);
        assert_eq!(idle["connections"], 300, "{broker}: {idle:#}");
        assert_eq!(idle["errors"], 0, "{broker}: {idle:#}");
        // Each connection is a socket the broker holds while its memory is read.
        assert!(
            idle["broker_open_files"].as_u64().unwrap() >= 300,
            "{broker}: {idle:#}"
        );
        assert!(
            idle["bytes_per_connection"].as_f64().unwrap() > 0.0,
            "{broker}: {idle:#}"
        );
    }
}

#[test]
fn the_table_names_every_broker_and_the_ratio() {
    require_mosquitto_binary();
    let out = compare(&[
        "--scenarios",
        "qos0",
        "--brokers",
        "thingsgate,mosquitto-nodelay",
        "--runs",
        "1",
        "--duration",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "| scenario | metric | Thingsgate | Mosquitto nodelay | Thingsgate / best peer |"
        ),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.contains("| msg per broker core-second |"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.trim_end().ends_with("× |"), "a ratio: {row}");
    assert!(
        text.contains("2 cores") || text.contains("cores,"),
        "{text}"
    );
    // Progress goes to stderr, one line per measurement.
    assert!(
        stderr(&out).contains("round 1/1 qos0 on Thingsgate:"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_arguments_exit_2_before_starting_anything() {
    let out = compare(&["--runs", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--runs"), "{}", stderr(&out));
    let out = compare(&["--idle-connections", "25000"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("19,000"), "{}", stderr(&out));
    let out = compare(&["--baseline", "/nonexistent/thingsgate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the baseline build `/nonexistent/thingsgate` does not exist"),
        "{}",
        stderr(&out)
    );
    let out = compare(&["--brokers", "thingsgate-baseline"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("needs --baseline PATH"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_broker_that_cannot_start_is_reported_and_nothing_measured_exits_1() {
    let out = compare(&[
        "--scenarios",
        "qos0",
        "--brokers",
        "mosquitto,rumqttd",
        "--mosquitto",
        "/nonexistent/mosquitto",
        "--rumqttd",
        "/nonexistent/rumqttd-baseline",
        "--runs",
        "1",
        "--duration",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "failed: round 1 qos0 on Mosquitto: Mosquitto is not at `/nonexistent/mosquitto`"
        ),
        "{text}"
    );
    assert!(
        text.contains("failed: round 1 qos0 on rumqttd: the rumqttd baseline is not built"),
        "{text}"
    );
}
