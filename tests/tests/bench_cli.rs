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
