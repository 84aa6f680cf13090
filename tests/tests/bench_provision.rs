#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! `thingsgate bench provision` run as the real binary against a running server's HTTP API
//! (the secret in `THINGSGATE_SECRET`): things and policies for simulated devices and
//! subscribers, idempotent, usable by a device over MQTT and by JWT clients, refused with exit 2
//! and the server's reason, removed again with `--delete`.
//!
//! The broker is `e2e::bridge::started()`: one solution owning `org.acme`, the dev JWT issuer
//! (key `dev`, so provisioning passes `--issuer-key dev` where JWT clients are used).

use std::process::{Command, Output};
use std::time::Duration;

use e2e::broker::{Broker, Solution};
use e2e::clients::connect_v4_login;
use e2e::http::{Api, Auth, http_addr};
use e2e::issuer::{SOLUTION_CLAIM, dev_issuer};
use e2e::process::run_bounded;
use e2e::{stderr, stdout, thingsgate_bin};
use serde_json::{Value, json};

const NS: &str = "org.acme";

/// `thingsgate bench provision --http <broker> --solution <id> --namespace org.acme ARGS`
/// with `secret` in `THINGSGATE_SECRET`, bounded in time.
async fn provision(broker: &Broker, solution: &Solution, secret: &str, args: &[&str]) -> Output {
    provision_in(NS, broker, solution, secret, args).await
}

/// [`provision`] in namespace `namespace`.
async fn provision_in(
    namespace: &str,
    broker: &Broker,
    solution: &Solution,
    secret: &str,
    args: &[&str],
) -> Output {
    let http = format!("http://{}", http_addr(broker));
    let mut command = Command::new(thingsgate_bin());
    command.args([
        "bench",
        "provision",
        "--http",
        &http,
        "--solution",
        &solution.id,
        "--namespace",
        namespace,
    ]);
    command.args(args);
    without_thingsgate_env(&mut command);
    command.env("THINGSGATE_SECRET", secret);
    tokio::task::spawn_blocking(move || run_bounded(command))
        .await
        .unwrap()
}

/// The command's environment without the `THINGSGATE_…` variables of the test's own.
fn without_thingsgate_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("THINGSGATE_") {
            command.env_remove(name);
        }
    }
}

/// A run that must succeed with `--json`: its summary.
async fn summary(broker: &Broker, solution: &Solution, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = provision(broker, solution, &solution.secret, &args).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).is_empty(),
        "no progress with --json: {}",
        stderr(&out)
    );
    serde_json::from_str(stdout(&out).trim())
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {}", stdout(&out)))
}

async fn get(api: &Api, solution: &Solution, path: &str) -> Value {
    let answer = api.get(path, &Auth::basic(solution)).await;
    assert_eq!(answer.status, 200, "GET {path}: {:?}", answer.body);
    answer.body
}

/// A JWT of the dev issuer for `sub`, naming `solution`.
fn token(solution: &Solution, sub: &str) -> String {
    let mut claims = dev_issuer().claims(sub, Duration::from_secs(600));
    claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
    dev_issuer().sign(&claims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_things_with_three_subscribers_get_owner_device_and_subscriber_entries_and_a_second_run_replaces_them()
 {
    let (broker, solution, api) = e2e::bridge::started();
    let first = summary(
        &broker,
        &solution,
        &["--things", "50", "--subscribers", "3"],
    )
    .await;
    assert_eq!(first["things"], 50, "{first}");
    assert_eq!(first["created"], 50, "{first}");
    assert_eq!(first["replaced"], 0, "{first}");
    assert_eq!(first["policiesCreated"], 50, "{first}");
    assert_eq!(first["view"], "full", "{first}");

    for i in [0, 3, 49] {
        let thing = get(&api, &solution, &format!("/api/2/things/{NS}:dev-{i}")).await;
        assert_eq!(
            thing,
            json!({
                "thingId": format!("{NS}:dev-{i}"),
                "policyId": format!("{NS}:dev-{i}"),
                "attributes": {"serial": i},
                "features": {"temp": {"properties": {"value": 0}}},
            })
        );
        let policy = get(&api, &solution, &format!("/api/2/policies/{NS}:dev-{i}")).await;
        let entries = &policy["entries"];
        let sol = &solution.id;
        let all = json!({"grant": ["READ", "WRITE"], "revoke": []});
        assert!(entries["owner"]["subjects"][format!("iot-things:{sol}")].is_object());
        assert_eq!(
            entries["owner"]["resources"],
            json!({"thing:/": all, "policy:/": all, "message:/": all})
        );
        let device: Vec<&String> = entries["device"]["subjects"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert_eq!(
            device,
            [
                &format!("bench:dev-{i}"),
                &format!("iot-things:{sol}:dev-{i}")
            ]
        );
        assert_eq!(
            entries["device"]["resources"],
            json!({"thing:/features": all})
        );
        let subscribers = entries["subscribers"]["subjects"].as_object().unwrap();
        assert_eq!(subscribers.len(), 6, "{subscribers:?}");
        for j in 0..3 {
            assert!(subscribers.contains_key(&format!("iot-things:{sol}:sub-{j}")));
            assert!(subscribers.contains_key(&format!("bench:sub-{j}")));
        }
        assert_eq!(
            entries["subscribers"]["resources"],
            json!({"thing:/": {"grant": ["READ"], "revoke": []}})
        );
    }
    assert_eq!(
        api.get(
            &format!("/api/2/things/{NS}:dev-50"),
            &Auth::basic(&solution)
        )
        .await
        .status,
        404,
        "exactly 50 things"
    );

    let again = summary(
        &broker,
        &solution,
        &["--things", "50", "--subscribers", "3"],
    )
    .await;
    assert_eq!(again["created"], 0, "{again}");
    assert_eq!(again["replaced"], 50, "{again}");
    assert_eq!(again["policiesReplaced"], 50, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_view_lets_a_jwt_subscriber_read_only_the_temp_feature() {
    let (broker, solution, api) = e2e::bridge::started();
    let done = summary(
        &broker,
        &solution,
        &[
            "--things",
            "5",
            "--subscribers",
            "2",
            "--view",
            "partial",
            "--issuer-key",
            "dev",
        ],
    )
    .await;
    assert_eq!(done["view"], "partial", "{done}");
    let policy = get(&api, &solution, &format!("/api/2/policies/{NS}:dev-2")).await;
    assert_eq!(
        policy["entries"]["subscribers"]["resources"],
        json!({"thing:/features/temp": {"grant": ["READ"], "revoke": []}})
    );
    assert!(policy["entries"]["subscribers"]["subjects"]["dev:sub-1"].is_object());

    // The JWT subscriber `dev:sub-1` holds no owner subject: its view is cut to `temp`.
    let seen = api
        .get(
            &format!("/api/2/things/{NS}:dev-2"),
            &Auth::bearer(&token(&solution, "sub-1"), None),
        )
        .await;
    assert_eq!(seen.status, 200, "{:?}", seen.body);
    assert_eq!(
        seen.body["features"],
        json!({"temp": {"properties": {"value": 0}}})
    );
    assert!(seen.body.get("attributes").is_none(), "{}", seen.body);
    // A subject the policy does not name sees nothing.
    let stranger = api
        .get(
            &format!("/api/2/things/{NS}:dev-2"),
            &Auth::bearer(&token(&solution, "sub-2"), None),
        )
        .await;
    assert_eq!(stranger.status, 404, "{:?}", stranger.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_writes_its_own_things_temp_over_mqtt_and_a_jwt_device_only_its_features() {
    let (broker, solution, api) = e2e::bridge::started();
    summary(
        &broker,
        &solution,
        &["--things", "5", "--issuer-key", "dev"],
    )
    .await;

    // The device `dev-3` with the secret and its name as client ID (it holds the owner's
    // subject too, as every secret client does).
    let mut device = connect_v4_login(broker.mqtt_addr(), "dev-3", &solution.id, &solution.secret)
        .await
        .unwrap_or_else(|code| panic!("device dev-3 refused: {code:?}"));
    device
        .subscribe(
            &format!("{NS}/dev-3/things/twin/responses/#"),
            rumqttc::QoS::AtLeastOnce,
        )
        .await;
    device
        .publish_qos1(
            &format!("{NS}/dev-3/things/twin/commands/modify/features/temp/properties/value"),
            b"21.5",
        )
        .await;
    let answer = device.next_publish().await;
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["status"], 204, "{answer}");
    let thing = get(&api, &solution, &format!("/api/2/things/{NS}:dev-3")).await;
    assert_eq!(thing["features"]["temp"]["properties"]["value"], 21.5);

    // The same device with a JWT (`dev:dev-4`): its features, not its attributes.
    let jwt = Auth::bearer(&token(&solution, "dev-4"), None);
    let wrote = api
        .put(
            &format!("/api/2/things/{NS}:dev-4/features/temp/properties/value"),
            &jwt,
            &json!(30),
        )
        .await;
    assert_eq!(wrote.status, 204, "{:?}", wrote.body);
    let refused = api
        .put(
            &format!("/api/2/things/{NS}:dev-4/attributes/serial"),
            &jwt,
            &json!(99),
        )
        .await;
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    let other = api
        .put(
            &format!("/api/2/things/{NS}:dev-3/features/temp/properties/value"),
            &jwt,
            &json!(30),
        )
        .await;
    assert!(
        other.status == 403 || other.status == 404,
        "another device's thing: {} {:?}",
        other.status,
        other.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_exits_2_naming_the_thing_and_the_secret_variable() {
    let (broker, solution, _api) = e2e::bridge::started();
    let out = provision(&broker, &solution, "not-the-secret", &["--things", "20"]).await;
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(stdout(&out).is_empty(), "stdout: {}", stdout(&out));
    let message = stderr(&out);
    assert!(message.contains(&format!("{NS}:dev-0")), "{message}");
    assert!(message.contains("THINGSGATE_SECRET"), "{message}");
    assert!(!message.contains("not-the-secret"), "{message}");

    // A namespace the solution does not own: the server's Ditto error, and the thing.
    let out = provision_in(
        "org.other",
        &broker,
        &solution,
        &solution.secret,
        &["--things", "3"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let message = stderr(&out);
    assert!(message.contains("org.other:dev-0"), "{message}");
    assert!(message.contains("the server refused (4"), "{message}");
}

#[test]
fn a_remote_server_is_refused_without_allow_remote() {
    let mut command = Command::new(thingsgate_bin());
    command.args([
        "bench",
        "provision",
        "--http",
        "http://192.0.2.1:8080",
        "--solution",
        "acme",
        "--namespace",
        NS,
        "--things",
        "10",
    ]);
    without_thingsgate_env(&mut command);
    command.env("THINGSGATE_SECRET", "s3cr3t");
    let out = run_bounded(command);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains("192.0.2.1") && message.contains("--allow-remote"),
        "{message}"
    );
    assert!(!message.contains("s3cr3t"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_things_and_policies_and_a_second_delete_finds_them_absent() {
    let (broker, solution, api) = e2e::bridge::started();
    summary(
        &broker,
        &solution,
        &["--things", "30", "--subscribers", "1"],
    )
    .await;
    let deleted = summary(&broker, &solution, &["--things", "30", "--delete"]).await;
    assert_eq!(deleted["deleted"], 30, "{deleted}");
    assert_eq!(deleted["policiesDeleted"], 30, "{deleted}");
    assert_eq!(deleted["absent"], 0, "{deleted}");
    for i in [0, 17, 29] {
        for kind in ["things", "policies"] {
            let answer = api
                .get(
                    &format!("/api/2/{kind}/{NS}:dev-{i}"),
                    &Auth::basic(&solution),
                )
                .await;
            assert_eq!(answer.status, 404, "{kind} dev-{i}: {:?}", answer.body);
        }
    }
    let again = summary(&broker, &solution, &["--things", "30", "--delete"]).await;
    assert_eq!(again["deleted"], 0, "{again}");
    assert_eq!(again["absent"], 30, "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_json_progress_goes_to_stderr_and_a_summary_to_stdout() {
    let (broker, solution, _api) = e2e::bridge::started();
    let out = provision(
        &broker,
        &solution,
        &solution.secret,
        &["--things", "1000", "--concurrency", "32"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("provisioned 1000/1000 things"),
        "{}",
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(
        text.starts_with("provisioned 1000 things in org.acme (1000 created, 0 replaced)")
            && text.contains("things/s"),
        "{text}"
    );
}
