//! `thingsgate bench run`, the load generator, run as the real binary against a started
//! Thingsgate (solution secret, JWTs, twin updates) and against the Mosquitto of this machine;
//! every run small and bounded. CI runs these as its smoke test of the bench.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::{Command, Output};

use e2e::bridge::{create_thing, require_mosquitto, unique};
use e2e::broker::{Broker, Solution};
use e2e::process::run_bounded;
use e2e::{stderr, stdout, thingsgate_bin};
use serde_json::Value;

/// `thingsgate bench run ARGS --json` with `env`; the report, after checking exit status 0.
fn bench_json(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = bench(args, env, true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "bench run {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("--json prints one JSON object ({e}): {}", stdout(&out)))
}

fn bench(args: &[&str], env: &[(&str, &str)], json: bool) -> Output {
    let mut command = Command::new(thingsgate_bin());
    command.args(["bench", "run", "--quiet"]).args(args);
    if json {
        command.arg("--json");
    }
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("THINGSGATE_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    run_bounded(command)
}

/// Every message expected arrived once, and the latency percentiles are there and ordered.
fn assert_complete(report: &Value) {
    let messages = &report["messages"];
    let sent = messages["sent"].as_u64().unwrap();
    assert!(sent > 0, "nothing sent: {report:#}");
    assert_eq!(messages["received"], messages["expected"], "{report:#}");
    assert_eq!(messages["lost"], 0, "{report:#}");
    assert_eq!(messages["duplicates"], 0, "{report:#}");
    let latency = &report["latency_ms"];
    let p = |k: &str| {
        latency[k]
            .as_f64()
            .unwrap_or_else(|| panic!("latency `{k}` missing: {report:#}"))
    };
    assert!(p("p50") > 0.0, "{report:#}");
    assert!(p("p50") <= p("p90"), "{report:#}");
    assert!(p("p90") <= p("p99"), "{report:#}");
    assert!(p("p99") <= p("p99_9"), "{report:#}");
    assert!(p("p99_9") <= p("max"), "{report:#}");
    assert_eq!(latency["samples"], messages["received"], "{report:#}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report:#}");
    assert!(report["generator_cpu"]["seconds"].as_f64().is_some());
}

/// A started Thingsgate with one solution; the URL of its MQTT listener.
fn thingsgate() -> (Broker, Solution, String) {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.start();
    let url = format!("mqtt://{}", broker.mqtt_addr());
    (broker, solution, url)
}

#[test]
fn a_small_plain_topic_run_against_thingsgate_loses_nothing_and_reports_latency() {
    let (_broker, solution, url) = thingsgate();
    let report = bench_json(
        &[
            "--url",
            &url,
            "--solution",
            &solution.id,
            "--devices",
            "5",
            "--subscribers",
            "2",
            "--duration",
            "2",
        ],
        &[("THINGSGATE_SECRET", &solution.secret)],
    );
    assert_complete(&report);
    let connections = &report["connections"];
    assert_eq!(connections["devices_connected"], 5, "{report:#}");
    assert_eq!(connections["subscribers_connected"], 2, "{report:#}");
    let messages = &report["messages"];
    assert_eq!(
        messages["expected"].as_u64(),
        messages["sent"].as_u64().map(|s| s * 2),
        "every subscriber gets every message: {report:#}"
    );
    assert_eq!(report["scenario"]["protocol"], "5");
    assert_eq!(report["completed"], true);
}

#[test]
fn a_qos1_closed_loop_run_against_thingsgate_loses_nothing() {
    let (_broker, solution, url) = thingsgate();
    let report = bench_json(
        &[
            "--url",
            &url,
            "--solution",
            &solution.id,
            "--devices",
            "5",
            "--subscribers",
            "2",
            "--qos",
            "1",
            "--rate",
            "max",
            "--duration",
            "2",
        ],
        &[("THINGSGATE_SECRET", &solution.secret)],
    );
    assert_complete(&report);
    assert_eq!(report["scenario"]["qos"], 1);
}

#[test]
fn a_qos2_paced_run_with_a_count_stops_at_the_count() {
    let (_broker, solution, url) = thingsgate();
    let report = bench_json(
        &[
            "--url",
            &url,
            "--solution",
            &solution.id,
            "--devices",
            "4",
            "--qos",
            "2",
            "--rate",
            "100",
            "--count",
            "100",
            "--duration",
            "10",
        ],
        &[("THINGSGATE_SECRET", &solution.secret)],
    );
    assert_complete(&report);
    assert_eq!(report["messages"]["sent"], 100, "{report:#}");
}

#[test]
fn a_mqtt_311_run_against_mosquitto_loses_nothing() {
    require_mosquitto();
    let prefix = unique("bench");
    let topic = format!("{prefix}/{{device}}/t");
    let filter = format!("{prefix}/+/t");
    let report = bench_json(
        &[
            "--protocol",
            "3.1.1",
            "--devices",
            "5",
            "--duration",
            "2",
            "--device-prefix",
            &format!("{prefix}-"),
            "--topic",
            &topic,
            "--filter",
            &filter,
        ],
        &[],
    );
    assert_complete(&report);
    assert_eq!(report["scenario"]["url"], "mqtt://127.0.0.1:1883");
    assert_eq!(report["scenario"]["protocol"], "3.1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_updates_close_the_loop_on_the_event_topic() {
    let (broker, solution, api) = e2e::bridge::started();
    for device in 0..3 {
        // The thing's policy lets the solution's subject (the secret's) read and write it.
        create_thing(
            &api,
            &solution,
            &format!("org.acme:dev-{device}"),
            "nobody:reader",
        )
        .await;
    }
    let url = format!("mqtt://{}", broker.mqtt_addr());
    let secret = solution.secret.clone();
    let id = solution.id.clone();
    let report = tokio::task::spawn_blocking(move || {
        bench_json(
            &[
                "--url",
                &url,
                "--solution",
                &id,
                "--twin",
                "org.acme",
                "--devices",
                "3",
                "--duration",
                "2",
            ],
            &[("THINGSGATE_SECRET", &secret)],
        )
    })
    .await
    .unwrap();
    assert_complete(&report);
    assert_eq!(report["scenario"]["twin"], "org.acme");
    assert_eq!(
        report["scenario"]["filter"],
        "org.acme/+/things/twin/events/modified/features/temp/properties/value"
    );
    // The last update is the thing's state: the twin was really written.
    let thing = api
        .get(
            "/api/2/things/org.acme:dev-0/features/temp/properties/value",
            &e2e::http::Auth::basic(&solution),
        )
        .await;
    assert_eq!(thing.status, 200, "{:?}", thing.body);
    assert!(
        thing.body.as_u64().is_some_and(|v| v > 0),
        "{:?}",
        thing.body
    );
}

#[test]
fn jwt_devices_minted_per_connection_are_let_in() {
    let issuer = e2e::issuer::dev_issuer();
    let mut broker = Broker::new();
    issuer.write_jwks(&broker.dir().join("jwks.json"), &[]);
    broker.write_config(&issuer.config_toml("jwks.json"));
    let solution = broker.create_solution("org.acme");
    // Token subjects are `dev:<sub>`; the solution policy lets them use plain topics.
    broker.grant_topics(
        &solution.id,
        &["dev:dev-0", "dev:dev-1", "dev:dev-2", "dev:dev-sub-0"],
    );
    let key = broker.dir().join("issuer.pem");
    std::fs::write(&key, &issuer.ec_pem).unwrap();
    broker.start();
    let url = format!("mqtt://{}", broker.mqtt_addr());
    let claim = format!("{}={}", e2e::issuer::SOLUTION_CLAIM, solution.id);
    let report = bench_json(
        &[
            "--url",
            &url,
            "--jwt-key",
            key.to_str().unwrap(),
            "--jwt-iss",
            e2e::issuer::ISS,
            "--jwt-aud",
            e2e::issuer::AUD,
            "--jwt-claim",
            &claim,
            "--devices",
            "3",
            "--duration",
            "1",
        ],
        &[],
    );
    assert_complete(&report);
    assert_eq!(report["scenario"]["login"], "JWT per connection");
}

#[test]
fn a_broker_that_refuses_everyone_exits_1_with_the_connack_code_counted() {
    let (_broker, solution, url) = thingsgate();
    let out = bench(
        &[
            "--url",
            &url,
            "--solution",
            &solution.id,
            "--devices",
            "2",
            "--duration",
            "1",
        ],
        &[("THINGSGATE_SECRET", "not-the-secret")],
        true,
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let report: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["connections"]["devices_failed"], 2, "{report:#}");
    let errors = report["errors"].as_object().unwrap();
    assert!(
        errors.keys().any(|k| k.starts_with("connack 0x86")),
        "{report:#}"
    );
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let refused = |args: &[&str], env: &[(&str, &str)], needle: &str| {
        let out = bench(args, env, false);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}\nstdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: `{needle}` not in stderr: {}",
            stderr(&out)
        );
    };
    refused(&["--url", "mqtt://192.0.2.1:1883"], &[], "--allow-remote");
    refused(&["--protocol", "3.1"], &[], "3.1");
    refused(&["--username", "u", "--password", "p"], &[], "--password");
    refused(&["--qos", "3"], &[], "QoS");
    refused(&["--solution", "s-1"], &[], "THINGSGATE_SECRET");
    refused(&["--payload-size", "8"], &[], "--payload-size");
    refused(&["--duration", "4000"], &[], "--duration");
    let scenario = std::env::temp_dir().join(format!("bench-{}.toml", std::process::id()));
    std::fs::write(&scenario, "devices = 3\nwat = 1\n").unwrap();
    refused(
        &["--scenario", scenario.to_str().unwrap()],
        &[],
        "unknown field",
    );
    let _ = std::fs::remove_file(&scenario);
}

#[test]
fn a_scenario_file_sets_the_run_and_flags_override_it() {
    require_mosquitto();
    let prefix = unique("bench-file");
    let scenario = std::env::temp_dir().join(format!("{prefix}.toml"));
    std::fs::write(
        &scenario,
        format!(
            "protocol = \"3.1.1\"\ndevices = 7\nqos = 1\nrate = 50\nduration = 1\n\
             topic = \"{prefix}/{{device}}/t\"\nfilter = \"{prefix}/#\"\n\
             device_prefix = \"{prefix}-\"\n"
        ),
    )
    .unwrap();
    let report = bench_json(
        &["--scenario", scenario.to_str().unwrap(), "--devices", "2"],
        &[],
    );
    let _ = std::fs::remove_file(&scenario);
    assert_complete(&report);
    assert_eq!(report["scenario"]["devices"], 2, "the flag wins");
    assert_eq!(report["scenario"]["qos"], 1);
    assert_eq!(report["scenario"]["rate"], "50");
    assert_eq!(report["scenario"]["protocol"], "3.1.1");
}

/// Whether `svg` is one well-formed `<svg>` element: every tag closed in order, nothing
/// outside the root (what an SVG viewer needs to open it).
fn well_formed_svg(svg: &str) -> Result<(), String> {
    let svg = svg.trim();
    let body = svg
        .strip_prefix("<?xml")
        .and_then(|rest| rest.split_once("?>"))
        .map_or(svg, |(_, rest)| rest.trim_start());
    if !body.starts_with("<svg") || !body.ends_with("</svg>") {
        return Err("not one <svg> element".to_owned());
    }
    let mut open: Vec<&str> = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find('<') {
        if open.is_empty() && start > 0 && !rest[..start].trim().is_empty() {
            return Err(format!("text outside the root: {:?}", &rest[..start]));
        }
        let end = rest[start..]
            .find('>')
            .ok_or_else(|| "an unclosed tag".to_owned())?
            + start;
        let tag = &rest[start + 1..end];
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some(opened) if opened == name.trim() => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else if !tag.ends_with('/') && !tag.starts_with('!') {
            let name = tag.split_whitespace().next().unwrap_or_default();
            open.push(name);
        }
        if open.is_empty() && !rest[end + 1..].trim().is_empty() {
            return Err("something after the root".to_owned());
        }
        rest = &rest[end + 1..];
    }
    if open.is_empty() {
        Ok(())
    } else {
        Err(format!("unclosed: {open:?}"))
    }
}

/// The contents of an SVG's `<text>` elements.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>'))
        .filter_map(|(_, rest)| rest.split_once("</text>"))
        .map(|(text, _)| text.trim().to_owned())
        .collect()
}

#[test]
fn a_plot_of_a_small_run_is_an_svg_of_throughput_and_latency_over_time_and_the_json_has_its_timeline()
 {
    let (_broker, solution, url) = thingsgate();
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("run.svg");
    let report = bench_json(
        &[
            "--url",
            &url,
            "--solution",
            &solution.id,
            "--devices",
            "3",
            "--qos",
            "1",
            "--duration",
            "2",
            "--plot",
            plot.to_str().unwrap(),
        ],
        &[("THINGSGATE_SECRET", &solution.secret)],
    );
    assert_complete(&report);

    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    well_formed_svg(&svg).unwrap_or_else(|e| panic!("{e}:\n{svg}"));
    let texts = svg_texts(&svg);
    for expected in [
        "3 devices \u{2192} 1 subscriber, QoS 1, closed loop (inflight 10)",
        "messages per second",
        "latency, ms (log scale)",
        "seconds since the run started",
        "sent/s",
        "received/s",
        "p50",
        "p99",
        "max",
        "publish",
    ] {
        assert!(
            texts.iter().any(|t| t.contains(expected)),
            "`{expected}` is not a text of the plot: {texts:?}"
        );
    }
    assert!(
        texts.iter().any(|t| t.contains(&url)),
        "the broker is named: {texts:?}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["run.svg"], "no temporary file is left");

    // The JSON timeline: intervals in order, their counts adding up to the report's, sane
    // rates and percentiles, in phases that follow each other.
    let timeline = report["timeline"].as_array().expect("a timeline array");
    assert!(timeline.len() >= 4, "2 s in 0.25 s steps: {report:#}");
    let phases = &report["phases"];
    let publish = phases["publish_s"].as_array().unwrap();
    let (publish_start, publish_end) = (publish[0].as_f64().unwrap(), publish[1].as_f64().unwrap());
    assert!(
        (publish_end - publish_start - 2.0).abs() < 0.5,
        "about 2 s of publishing: {phases}"
    );
    assert_eq!(phases["step_s"], 0.25);
    let (mut sent, mut received, mut last_t) = (0, 0, 0.0);
    for point in timeline {
        let f = |k: &str| point[k].as_f64();
        let t = f("t").unwrap();
        assert!(t > last_t, "in order: {point}");
        last_t = t;
        sent += point["sent"].as_u64().unwrap();
        received += point["received"].as_u64().unwrap();
        let interval = f("interval_s").unwrap();
        assert!(interval > 0.0 && interval <= 0.25 * 1.25 + 0.01, "{point}");
        assert!(f("sent_per_s").unwrap() >= 0.0 && f("received_per_s").unwrap() >= 0.0);
        match (f("p50_ms"), f("p99_ms"), f("max_ms")) {
            (Some(p50), Some(p99), Some(max)) => {
                assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{point}");
                assert!(point["received"].as_u64() > Some(0), "{point}");
            }
            (None, None, None) => assert_eq!(point["received"], 0, "{point}"),
            _ => panic!("p50, p99 and max come together: {point}"),
        }
        assert!(
            ["ramp", "publish", "drain"].contains(&point["phase"].as_str().unwrap()),
            "{point}"
        );
    }
    assert_eq!(
        sent,
        report["messages"]["sent"].as_u64().unwrap(),
        "{report:#}"
    );
    assert_eq!(received, report["messages"]["received"].as_u64().unwrap());
    let publishing: Vec<&Value> = timeline
        .iter()
        .filter(|p| p["phase"] == "publish")
        .collect();
    assert!(publishing.len() >= 6, "{report:#}");
    assert!(
        publishing
            .iter()
            .all(|p| p["sent_per_s"].as_f64() > Some(0.0)),
        "every publishing interval sent something: {report:#}"
    );
    assert_eq!(
        timeline[0]["phase"], "ramp",
        "the ramp comes first: {report:#}"
    );
    assert_eq!(
        timeline[0]["sent"], 0,
        "nothing is sent during the ramp: {report:#}"
    );
}

#[test]
fn a_plot_in_a_directory_that_does_not_exist_is_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("run.svg");
    // No broker listens: the refusal must come before any connection is tried.
    let out = bench(
        &[
            "--url",
            "mqtt://127.0.0.1:9",
            "--plot",
            missing.to_str().unwrap(),
        ],
        &[],
        false,
    );
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("--plot") && stderr(&out).contains("no-such-dir"),
        "{}",
        stderr(&out)
    );
    assert!(
        stdout(&out).is_empty(),
        "no run, no report: {}",
        stdout(&out)
    );
    let out = bench(&["--plot", dir.path().to_str().unwrap()], &[], false);
    assert_eq!(out.status.code(), Some(2), "a directory: {}", stderr(&out));
}

#[test]
fn policy_churn_without_its_http_api_or_twin_mode_is_refused() {
    let refused = |args: &[&str], needle: &str| {
        let out = bench(args, &[("THINGSGATE_SECRET", "s")], false);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    };
    let twin = ["--solution", "acme", "--twin", "org.acme"];
    refused(&[&twin[..], &["--policy-churn", "1"]].concat(), "--http");
    refused(
        &[
            "--solution",
            "acme",
            "--policy-churn",
            "1",
            "--http",
            "127.0.0.1:8080",
        ],
        "--twin",
    );
    refused(
        &[
            &twin[..],
            &["--policy-churn", "0", "--http", "127.0.0.1:8080"],
        ]
        .concat(),
        "--policy-churn",
    );
    refused(
        &[
            &twin[..],
            &["--policy-churn", "1", "--http", "http://192.0.2.1:8080"],
        ]
        .concat(),
        "--allow-remote",
    );
    refused(&["--http", "127.0.0.1:8080"], "--policy-churn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_churn_during_a_twin_run_changes_policies_and_loses_no_message() {
    let (broker, solution, api) = e2e::bridge::started();
    let http = format!("http://{}", e2e::http::http_addr(&broker));
    let url = format!("mqtt://{}", broker.mqtt_addr());
    let (id, secret) = (solution.id.clone(), solution.secret.clone());
    let report = tokio::task::spawn_blocking(move || {
        let mut provision = Command::new(thingsgate_bin());
        provision.args([
            "bench",
            "provision",
            "--http",
            &http,
            "--solution",
            &id,
            "--namespace",
            "org.acme",
            "--things",
            "4",
            "--subscribers",
            "1",
        ]);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("THINGSGATE_") {
                provision.env_remove(name);
            }
        }
        provision.env("THINGSGATE_SECRET", &secret);
        let out = run_bounded(provision);
        assert_eq!(out.status.code(), Some(0), "provision: {}", stderr(&out));
        bench_json(
            &[
                "--url",
                &url,
                "--solution",
                &id,
                "--twin",
                "org.acme",
                "--devices",
                "4",
                "--qos",
                "1",
                "--duration",
                "2",
                "--policy-churn",
                "0.1",
                "--http",
                &http,
            ],
            &[("THINGSGATE_SECRET", &secret)],
        )
    })
    .await
    .unwrap();
    // Nothing lost, nothing refused: the churn never touches what the run may do.
    assert_complete(&report);
    let churn = &report["policy_churn"];
    let changes = churn["changes"].as_u64().unwrap();
    assert!(changes >= 5, "about 20 changes in 2 s: {churn}");
    assert_eq!(churn["failed"], 0, "{churn}");
    assert_eq!(churn["policies"], 4, "{churn}");
    assert_eq!(churn["first_error"], Value::Null, "{churn}");
    let p50 = churn["http_ms"]["p50"].as_f64().unwrap();
    assert!(
        0.0 < p50 && p50 <= churn["http_ms"]["max"].as_f64().unwrap(),
        "{churn}"
    );

    // The policies were really changed: each has the churn's entry, and the first (changed
    // most often, round-robin) its last content.
    let auth = e2e::http::Auth::basic(&solution);
    for device in 0..4 {
        let entry = api
            .get(
                &format!("/api/2/policies/org.acme:dev-{device}/entries/bench-churn"),
                &auth,
            )
            .await;
        assert_eq!(entry.status, 200, "dev-{device}: {:?}", entry.body);
        assert!(
            entry.body["subjects"]["bench-churn:nobody"].is_object(),
            "{:?}",
            entry.body
        );
    }
    // Changes 0, 4, 8, … went to dev-0, alternating READ and READ + WRITE.
    let rounds_of_dev_0 = changes.div_ceil(4);
    let entry = api
        .get("/api/2/policies/org.acme:dev-0/entries/bench-churn", &auth)
        .await;
    let expected = if rounds_of_dev_0 % 2 == 1 {
        serde_json::json!(["READ"])
    } else {
        serde_json::json!(["READ", "WRITE"])
    };
    assert_eq!(
        entry.body["resources"]["thing:/attributes/bench-churn"]["grant"], expected,
        "{changes} changes: {:?}",
        entry.body
    );
}
