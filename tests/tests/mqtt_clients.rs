#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Third-party clients against the real `thingsgate serve`: Debian's `mosquitto_pub` /
//! `mosquitto_sub` and Eclipse Paho for Python (`tests/python/paho_client.py`), over MQTT 3.1.1
//! and 5, with solution secrets and JWTs. A missing tool fails the test with how to install it
//! (`.ci/run` installs both); nothing is skipped.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use e2e::broker::{Broker, Solution};
use e2e::issuer::{self, dev_issuer};
use e2e::process::{Streaming, run_bounded, text};
use e2e::workspace_root;

const NS: &str = "org.acme";
const HOUR: Duration = Duration::from_secs(3600);

/// A started broker with one solution, the dev issuer, and `dev:alice` granted every plain topic.
fn started() -> (Broker, Solution) {
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    dev_issuer().write_jwks(&broker.dir().join("jwks.json"), &[]);
    broker.write_config(&dev_issuer().config_toml("jwks.json"));
    broker.grant_topics(&solution.id, &[&format!("{}:alice", issuer::KEY)]);
    broker.start();
    (broker, solution)
}

/// Fails (never skips) when `program` cannot be run, saying how to install it.
fn require(program: &str, install: &str) {
    match Command::new(program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) => panic!("`{program}` cannot be run ({e}): install it with `{install}`"),
    }
}

fn require_mosquitto_clients() {
    for program in ["mosquitto_pub", "mosquitto_sub"] {
        require(program, "apt-get install mosquitto-clients");
    }
    require("stdbuf", "apt-get install coreutils");
}

fn require_paho() {
    require("python3", "apt-get install python3");
    let out = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "Python's paho-mqtt is missing: install it with `pip install 'paho-mqtt>=2,<3'`\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `mosquitto_sub|pub -h 127.0.0.1 -p PORT -V VERSION -i ID` plus `args`.
///
/// Run under `stdbuf -oL` (coreutils): into a pipe, the clients' stdout would otherwise be
/// block-buffered until they exit, and a test waiting for `-d`'s SUBACK line would wait for the
/// subscriber's timeout instead.
fn mosquitto(program: &str, broker: &Broker, version: &str, id: &str, args: &[&str]) -> Command {
    let mut command = Command::new("stdbuf");
    command
        .args(["-oL", program])
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-V", version, "-i", id])
        .args(args);
    command
}

/// A mosquitto_sub (secret) receives what a mosquitto_pub (JWT + API token) sends.
fn mosquitto_round_trip(version: &str, jwt_args: &[&str], s: &Solution, broker: &Broker) {
    let topic = format!("e2e/mosquitto-{version}/temp");
    let mut sub = Streaming::spawn(mosquitto(
        "mosquitto_sub",
        broker,
        version,
        "mosq-sub",
        &[
            "-u", &s.id, "-P", &s.secret, "-t", &topic, "-q", "1", "-C", "1", "-W", "10", "-d",
        ],
    ));
    // `-d` prints the SUBACK: publishing before it could race the subscription.
    sub.wait_for_line("SUBACK");
    let mut publisher_args = vec!["-t", topic.as_str(), "-m", "21.5", "-q", "1", "-d"];
    publisher_args.extend_from_slice(jwt_args);
    let out = run_bounded(mosquitto(
        "mosquitto_pub",
        broker,
        version,
        "mosq-pub",
        &publisher_args,
    ));
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}\n{}",
        out.status,
        text(&out.stderr)
    );
    let lines = sub.finish().unwrap_or_else(|e| {
        panic!(
            "mosquitto_sub: {e}\nmosquitto_pub said:\n{}{}\nserver log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            broker.logs()
        )
    });
    assert!(
        lines.iter().any(|l| l == "21.5"),
        "mosquitto_sub did not print the message:\n{}",
        lines.join("\n")
    );
}

#[test]
fn mosquitto_sub_receives_what_mosquitto_pub_sends_over_v311() {
    require_mosquitto_clients();
    let (broker, s) = started();
    let token = dev_issuer().token("alice", HOUR);
    mosquitto_round_trip("mqttv311", &["-u", &s.api_token, "-P", &token], &s, &broker);
    broker.assert_logs_never_contain(&[&s.secret, &s.api_token, &token]);
}

#[test]
fn mosquitto_sub_receives_what_mosquitto_pub_sends_over_v5() {
    require_mosquitto_clients();
    let (broker, s) = started();
    let token = dev_issuer().token("alice", HOUR);
    mosquitto_round_trip(
        "mqttv5",
        &[
            "-P",
            &token,
            "-D",
            "connect",
            "user-property",
            "x-cr-api-token",
            &s.api_token,
        ],
        &s,
        &broker,
    );
    broker.assert_logs_never_contain(&[&s.secret, &s.api_token, &token]);
}

#[test]
fn mosquitto_pub_with_a_wrong_password_exits_non_zero_saying_bad_user_name_or_password() {
    require_mosquitto_clients();
    let (broker, s) = started();
    for version in ["mqttv311", "mqttv5"] {
        let out = run_bounded(mosquitto(
            "mosquitto_pub",
            &broker,
            version,
            "wrong",
            &[
                "-u",
                &s.id,
                "-P",
                "not-the-secret",
                "-t",
                "e2e/x",
                "-m",
                "1",
            ],
        ));
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{version}: accepted\n{said}");
        assert!(
            said.to_lowercase().contains("bad user name or password"),
            "{version}: {said}"
        );
    }
}

#[test]
fn mosquitto_pub_with_a_jwt_of_no_solution_exits_non_zero_saying_not_authorized() {
    require_mosquitto_clients();
    let (broker, _s) = started();
    let token = dev_issuer().token("alice", HOUR);
    for version in ["mqttv311", "mqttv5"] {
        let out = run_bounded(mosquitto(
            "mosquitto_pub",
            &broker,
            version,
            "no-solution",
            &[
                "-u",
                "no-such-api-token",
                "-P",
                &token,
                "-t",
                "e2e/x",
                "-m",
                "1",
            ],
        ));
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success(), "{version}: accepted\n{said}");
        // libmosquitto: 3.1.1 "not authorised.", 5.0 "Not authorized".
        assert!(
            said.to_lowercase().contains("not authori"),
            "{version}: {said}"
        );
    }
}

/// Runs `tests/python/paho_client.py --port P ARGS`.
fn paho(broker: &Broker, args: &[&str]) -> Output {
    let script = workspace_root().join("tests/python/paho_client.py");
    let mut command = Command::new("python3");
    command
        .arg(script)
        .args(["--port", &broker.port().to_string()])
        .args(args);
    run_bounded(command)
}

fn assert_paho_ok(out: &Output) {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "paho client failed ({}):\n{stdout}\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(stdout.contains("received e2e/"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
}

#[test]
fn paho_mqtt_connects_subscribes_publishes_at_qos_1_and_receives_over_v311() {
    require_paho();
    let (broker, s) = started();
    assert_paho_ok(&paho(
        &broker,
        &[
            "--protocol",
            "311",
            "--client-id",
            "paho-311",
            "--username",
            &s.id,
            &format!("--password={}", s.secret),
            "--topic",
            "e2e/paho-311/temp",
        ],
    ));
    // And with a JWT, the API token as user name.
    let token = dev_issuer().token("alice", HOUR);
    assert_paho_ok(&paho(
        &broker,
        &[
            "--protocol",
            "311",
            "--client-id",
            "paho-311-jwt",
            &format!("--username={}", s.api_token),
            &format!("--password={}", token),
            "--topic",
            "e2e/paho-311-jwt/temp",
        ],
    ));
}

#[test]
fn paho_mqtt_connects_subscribes_publishes_at_qos_1_and_receives_over_v5() {
    require_paho();
    let (broker, s) = started();
    assert_paho_ok(&paho(
        &broker,
        &[
            "--protocol",
            "5",
            "--client-id",
            "paho-5",
            "--username",
            &s.id,
            &format!("--password={}", s.secret),
            "--topic",
            "e2e/paho-5/temp",
        ],
    ));
}

#[test]
fn paho_mqtt_with_a_wrong_password_is_refused_over_both_versions() {
    require_paho();
    let (broker, s) = started();
    for protocol in ["311", "5"] {
        let out = paho(
            &broker,
            &[
                "--protocol",
                protocol,
                "--client-id",
                "paho-wrong",
                "--username",
                &s.id,
                "--password=not-the-secret",
                // 3.1.1 return code 4 and 5.0 reason 0x86 both read as 134 in paho.
                "--expect-refused",
                "134",
            ],
        );
        assert!(
            out.status.success(),
            "{protocol}: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}
