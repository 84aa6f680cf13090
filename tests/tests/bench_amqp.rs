//! `thingsgate bench run --url amqp://…`, the load generator's AMQP 0.9.1 devices and
//! subscribers, run as the real binary: against the RabbitMQ of this machine (guest/guest, with
//! topics unique per test so that parallel tests do not see each other's messages) at QoS 0
//! and 1, and against Thingsgate's AMQP listener with plain topics and twin updates; refused
//! credentials and a refused binding are counted by kind. Every run small and bounded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::{Command, Output};

use e2e::amqp::start_with_amqp;
use e2e::bridge::{require_rabbitmq, unique};
use e2e::broker::{Broker, Solution};
use e2e::http::{Api, Auth, http_addr};
use e2e::process::run_bounded;
use e2e::{stderr, stdout, thingsgate_bin};
use serde_json::Value;

/// The variable the RabbitMQ runs pass guest's password in (`--password-env`).
const PASSWORD_ENV: &str = "BENCH_AMQP_PASSWORD";

/// `thingsgate bench run --quiet --json ARGS` with `env` (and none of the test's own
/// `THINGSGATE_…` variables), bounded in time.
fn bench(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(thingsgate_bin());
    command
        .args(["bench", "run", "--quiet", "--json"])
        .args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("THINGSGATE_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    run_bounded(command)
}

/// The report of a run that must exit 0.
fn report_of(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = bench(args, env);
    assert_eq!(
        out.status.code(),
        Some(0),
        "bench run {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    parse(&out)
}

fn parse(out: &Output) -> Value {
    serde_json::from_str(stdout(out).trim())
        .unwrap_or_else(|e| panic!("--json prints one JSON object ({e}): {}", stdout(out)))
}

/// An AMQP run: everything expected arrived once, with latencies, and nothing failed.
fn assert_complete_amqp(report: &Value) {
    assert_eq!(report["scenario"]["transport"], "amqp", "{report:#}");
    assert_eq!(report["scenario"]["protocol"], "0.9.1", "{report:#}");
    let messages = &report["messages"];
    assert!(
        messages["sent"].as_u64().unwrap() > 0,
        "nothing sent: {report:#}"
    );
    assert_eq!(messages["received"], messages["expected"], "{report:#}");
    assert_eq!(messages["lost"], 0, "{report:#}");
    assert_eq!(messages["duplicates"], 0, "{report:#}");
    let latency = &report["latency_ms"];
    let p = |k: &str| {
        latency[k]
            .as_f64()
            .unwrap_or_else(|| panic!("no `{k}`: {report:#}"))
    };
    assert!(
        p("p50") > 0.0 && p("p50") <= p("p99") && p("p99") <= p("max"),
        "{report:#}"
    );
    assert_eq!(latency["samples"], messages["received"], "{report:#}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report:#}");
}

/// Arguments for a run on RabbitMQ as guest, on topics no other test uses, and `extra`.
fn rabbitmq_args(label: &str, extra: &[&str]) -> Vec<String> {
    let prefix = unique(label);
    let mut args: Vec<String> = [
        "--url",
        "amqp://127.0.0.1:5672",
        "--username",
        "guest",
        "--password-env",
        PASSWORD_ENV,
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    args.extend([
        "--device-prefix".to_owned(),
        format!("{prefix}-"),
        "--topic".to_owned(),
        format!("{prefix}/{{device}}/t"),
        "--filter".to_owned(),
        format!("{prefix}/+/t"),
    ]);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn a_qos0_run_against_rabbitmq_loses_nothing() {
    require_rabbitmq();
    let args = rabbitmq_args("bench-amqp0", &["--devices", "5", "--duration", "2"]);
    let report = report_of(&strs(&args), &[(PASSWORD_ENV, "guest")]);
    assert_complete_amqp(&report);
    assert_eq!(report["connections"]["devices_connected"], 5, "{report:#}");
    assert_eq!(report["scenario"]["qos"], 0);
    assert_eq!(report["scenario"]["login"], "user name and password");
}

#[test]
fn a_qos1_run_with_publisher_confirms_against_rabbitmq_loses_nothing() {
    require_rabbitmq();
    // Two subscribers: every message reaches both queues, each acknowledged in batches.
    let args = rabbitmq_args(
        "bench-amqp1",
        &[
            "--qos",
            "1",
            "--subscribers",
            "2",
            "--devices",
            "5",
            "--duration",
            "2",
        ],
    );
    let report = report_of(&strs(&args), &[(PASSWORD_ENV, "guest")]);
    assert_complete_amqp(&report);
    let messages = &report["messages"];
    assert_eq!(
        messages["expected"].as_u64(),
        messages["sent"].as_u64().map(|s| s * 2),
        "{report:#}"
    );
    assert_eq!(report["scenario"]["qos"], 1);
}

#[test]
fn a_paced_run_with_a_count_against_rabbitmq_stops_at_the_count() {
    require_rabbitmq();
    let args = rabbitmq_args(
        "bench-amqp-count",
        &[
            "--qos",
            "1",
            "--rate",
            "50",
            "--count",
            "60",
            "--duration",
            "10",
            "--devices",
            "5",
        ],
    );
    let report = report_of(&strs(&args), &[(PASSWORD_ENV, "guest")]);
    assert_complete_amqp(&report);
    assert_eq!(report["messages"]["sent"], 60, "{report:#}");
}

#[test]
fn a_wrong_rabbitmq_password_exits_1_with_access_refused_counted() {
    require_rabbitmq();
    let args = rabbitmq_args("bench-amqp-refused", &["--devices", "2", "--duration", "1"]);
    let out = bench(&strs(&args), &[(PASSWORD_ENV, "not-guest's")]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let report = parse(&out);
    assert_eq!(report["connections"]["devices_failed"], 2, "{report:#}");
    assert_eq!(report["connections"]["subscribers_failed"], 1, "{report:#}");
    assert_eq!(report["errors"]["access refused (403)"], 3, "{report:#}");
}

/// A started Thingsgate with an AMQP listener and one solution owning `org.acme`; its URL.
fn thingsgate() -> (Broker, Solution, String) {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    let addr = start_with_amqp(&mut broker);
    (broker, solution, format!("amqp://{addr}"))
}

#[test]
fn plain_topics_through_thingsgates_amqp_listener_lose_nothing_at_qos_0_and_1() {
    let (_broker, solution, url) = thingsgate();
    for qos in ["0", "1"] {
        let report = report_of(
            &[
                "--url",
                &url,
                "--solution",
                &solution.id,
                "--devices",
                "5",
                "--qos",
                qos,
                "--duration",
                "2",
            ],
            &[("THINGSGATE_SECRET", &solution.secret)],
        );
        assert_complete_amqp(&report);
        assert_eq!(report["scenario"]["login"], "solution secret");
    }
}

#[test]
fn a_wrong_secret_at_thingsgate_exits_1_with_access_refused_counted() {
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
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let report = parse(&out);
    assert_eq!(report["errors"]["access refused (403)"], 3, "{report:#}");
}

#[test]
fn a_binding_thingsgate_refuses_is_counted_as_a_channel_closed_403() {
    let (_broker, solution, url) = thingsgate();
    // The solution owns `org.acme`, not `org.other`: the subscriber's binding is refused.
    let out = bench(
        &[
            "--url",
            &url,
            "--solution",
            &solution.id,
            "--devices",
            "1",
            "--duration",
            "1",
            "--filter",
            "org.other/+/things/twin/events/#",
        ],
        &[("THINGSGATE_SECRET", &solution.secret)],
    );
    let report = parse(&out);
    assert_eq!(report["connections"]["subscribers_failed"], 1, "{report:#}");
    let errors = report["errors"].as_object().unwrap();
    assert!(
        errors
            .keys()
            .any(|k| k.starts_with("channel closed 403 ACCESS_REFUSED")),
        "{report:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_updates_over_amqp_close_the_loop_on_the_modified_events() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.arg("--http").arg("127.0.0.1:0");
    let amqp = start_with_amqp(&mut broker);
    let http = format!("http://{}", http_addr(&broker));
    let api = Api::new(http_addr(&broker));
    let (id, secret) = (solution.id.clone(), solution.secret.clone());
    let report = tokio::task::spawn_blocking(move || {
        // The things org.acme:dev-0 … 4, with policies for the devices and one subscriber.
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
            "5",
            "--subscribers",
            "1",
            "--json",
        ]);
        provision.env("THINGSGATE_SECRET", &secret);
        let out = run_bounded(provision);
        assert_eq!(out.status.code(), Some(0), "provision: {}", stderr(&out));
        report_of(
            &[
                "--url",
                &format!("amqp://{amqp}"),
                "--solution",
                &id,
                "--twin",
                "org.acme",
                "--devices",
                "5",
                "--qos",
                "1",
                "--duration",
                "2",
            ],
            &[("THINGSGATE_SECRET", &secret)],
        )
    })
    .await
    .unwrap();
    assert_complete_amqp(&report);
    assert_eq!(report["scenario"]["twin"], "org.acme");
    // Every update was a write: the thing holds the last one's send instant.
    let thing = api
        .get(
            "/api/2/things/org.acme:dev-4/features/temp/properties/value",
            &Auth::basic(&solution),
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
fn what_amqp_cannot_say_is_refused_with_exit_2() {
    for (args, needle) in [
        (&["--qos", "2"][..], "no exactly-once"),
        (&["--protocol", "3.1.1"][..], "--protocol is MQTT's version"),
        (
            &["--filter", "$share/g/bench/+/temp"][..],
            "shared subscription",
        ),
    ] {
        let mut all = vec!["--url", "amqp://127.0.0.1:5672"];
        all.extend_from_slice(args);
        let out = bench(&all, &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}
