//! `thingsgate serve` as a user meets it: `--dev` prints client commands that work (mosquitto
//! clients and curl: `cargo xtask test` installs them when missing), and every
//! bad start (no data dir, a missing TLS file, an address in use, a data dir already in use)
//! ends at once with a message that names the problem.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::broker::Broker;
use e2e::{stderr, thingsgate_bin};

/// A `serve` child, killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `thingsgate serve ARGS` and returns its stdout lines up to `ready`.
fn start(args: &[&str]) -> (Serve, Vec<String>) {
    let mut child = Command::new(thingsgate_bin())
        .arg("serve")
        .args(args)
        .env("THINGSGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let serve = Serve(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no `ready` within 30 s; got {lines:?}"));
        if line == "ready" {
            return (serve, lines);
        }
        lines.push(line);
    }
}

/// Runs `thingsgate serve ARGS`, which must fail, within 30 s.
fn serve_fails(args: &[&str]) -> Output {
    let mut child = Command::new(thingsgate_bin())
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`serve {args:?}` did not fail within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    output
}

/// Runs a shell command line printed by `serve --dev`, after `setup` (the printed `export`
/// line) and with extra arguments, within 20 s.
fn run_printed(setup: &str, line: &str, extra: &str) -> Output {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{setup}\n{line} {extra}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`{line}` did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// stdout and stderr of a printed command, together (mosquitto's `-d` writes to stdout, its
/// warnings to stderr).
fn both(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The printed lines that start with `prefix`, in order.
fn printed<'a>(lines: &'a [String], prefix: &str) -> Vec<&'a str> {
    let found: Vec<&str> = lines
        .iter()
        .filter(|l| l.starts_with(prefix))
        .map(String::as_str)
        .collect();
    assert!(!found.is_empty(), "no `{prefix}` line in {lines:?}");
    found
}

/// Runs `publish` until the subscriber started before it has its message (a subscription takes
/// a moment); returns the subscriber's output and the last publish's.
fn publish_until_received(
    setup: &str,
    subscriber: std::thread::JoinHandle<Output>,
    publish: &str,
) -> (Output, Output) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = run_printed(setup, publish, "");
    while !subscriber.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        last = run_printed(setup, publish, "");
    }
    (subscriber.join().unwrap(), last)
}

/// `curl` output as JSON.
fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", both(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", both(out)))
}

/// The walk-through of README's "The first five minutes", command by command as `serve --dev`
/// prints it (HTTP on the port it chose itself): a device's allowed and denied write over MQTT
/// 5, an event cut to what its subscriber may read, and two users' different partial reads of
/// the same thing over HTTP; then the plain-topic commands.
#[test]
fn serve_dev_prints_commands_that_show_a_policy_at_work_as_printed() {
    let data = tempfile::tempdir().unwrap();
    let (_serve, lines) = start(&[
        "--dev",
        "--data",
        data.path().to_str().unwrap(),
        "--mqtt",
        "127.0.0.1:0",
    ]);
    assert!(
        lines.iter().any(|l| l.starts_with("http listening on ")),
        "--dev opens an HTTP listener: {lines:?}"
    );
    let [setup] = printed(&lines, "export ")[..] else {
        panic!("one export line: {lines:?}")
    };
    let [alice_events, _] = printed(&lines, "mosquitto_sub ")[..] else {
        panic!("two mosquitto_sub lines: {lines:?}")
    };
    let [allowed, denied, policy_change, plain_publish] = printed(&lines, "mosquitto_pub ")[..]
    else {
        panic!("four mosquitto_pub lines: {lines:?}")
    };
    let [alice_read, bob_read] = printed(&lines, "curl ")[..] else {
        panic!("two curl lines: {lines:?}")
    };

    // The lamp switches itself on: PUBACK 0, and alice's subscription gets the event.
    let (setup_owned, events) = (setup.to_owned(), alice_events.to_owned());
    let subscriber = std::thread::spawn(move || run_printed(&setup_owned, &events, "-C 1 -W 15"));
    let (event, published) = publish_until_received(setup, subscriber, allowed);
    assert!(
        both(&published).contains("received PUBACK (Mid: 1, RC:0)"),
        "{}",
        both(&published)
    );
    assert!(event.status.success(), "{}", both(&event));
    let event = String::from_utf8_lossy(&event.stdout);
    let (topic, envelope) = event.trim().split_once(' ').unwrap();
    assert_eq!(
        topic,
        "org.example.demo/lamp/things/twin/events/modified/features/power/properties/on"
    );
    let envelope: serde_json::Value = serde_json::from_str(envelope).unwrap();
    assert_eq!(envelope["value"], true, "{envelope}");

    // It may not move itself: PUBACK 135 with the reason string, nothing applied.
    let refused = both(&run_printed(setup, denied, ""));
    assert!(
        refused.contains("received PUBACK (Mid: 1, RC:135)"),
        "{refused}"
    );
    assert!(refused.contains("Not authorized"), "{refused}");
    assert!(
        refused.contains("`WRITE` on `thing:/attributes/location` is required"),
        "{refused}"
    );

    // The same thing over HTTP: alice sees all of it but the secret, bob only the power state.
    let alice = json_of(&run_printed(setup, alice_read, ""));
    assert_eq!(
        alice["attributes"],
        serde_json::json!({"model": "L-100", "location": "hall"}),
        "{alice}"
    );
    assert_eq!(alice["features"]["power"]["properties"]["on"], true);
    assert_eq!(
        alice["features"]["temperature"]["properties"]["celsius"],
        21.5
    );
    let bob = json_of(&run_printed(setup, bob_read, ""));
    assert_eq!(
        bob,
        serde_json::json!({
            "thingId": "org.example.demo:lamp",
            "features": {"power": {"properties": {"on": true}}}
        })
    );
    // The developer lets bob read the model: his next read has it (and still not the secret).
    let changed = both(&run_printed(setup, policy_change, ""));
    assert!(
        changed.contains("received PUBACK (Mid: 1, RC:0)"),
        "{changed}"
    );
    let bob = json_of(&run_printed(setup, bob_read, ""));
    assert_eq!(
        bob["attributes"],
        serde_json::json!({"model": "L-100"}),
        "{bob}"
    );

    // The secret is there, for its owner: alice's view is a cut, not a thing without it.
    let owner = alice_read.replace("$ALICE_TOKEN", "$DEV_TOKEN");
    let owner = json_of(&run_printed(setup, &owner, ""));
    assert_eq!(owner["attributes"]["secret"], "wifi-psk-4711", "{owner}");

    // Plain topics: the solution secret's subscriber gets the developer token's message.
    let [_, plain_subscribe] = printed(&lines, "mosquitto_sub ")[..] else {
        unreachable!()
    };
    assert!(
        plain_publish.contains("-P 'eyJ"),
        "the publisher uses the dev JWT: {plain_publish}"
    );
    let plain_subscribe = plain_subscribe.to_owned();
    let subscriber = std::thread::spawn(move || run_printed("", &plain_subscribe, "-C 1 -W 15"));
    let (received, published) = publish_until_received("", subscriber, plain_publish);
    assert!(published.status.success(), "{}", both(&published));
    assert!(received.status.success(), "{}", both(&received));
    assert_eq!(
        String::from_utf8_lossy(&received.stdout).trim(),
        "demo/hello hello from thingsgate"
    );

    // AMQP (Debian's amqp-tools): alice's consumer gets the lamp's switching off as an event.
    assert!(
        lines.iter().any(|l| l.starts_with("amqp listening on ")),
        "--dev opens an AMQP listener: {lines:?}"
    );
    let [amqp_events] = printed(&lines, "amqp-consume ")[..] else {
        panic!("one amqp-consume line: {lines:?}")
    };
    let [amqp_switch_off] = printed(&lines, "amqp-publish ")[..] else {
        panic!("one amqp-publish line: {lines:?}")
    };
    let (setup_owned, events) = (
        setup.to_owned(),
        amqp_events.replacen(" cat", " -c 1 cat", 1),
    );
    let subscriber = std::thread::spawn(move || run_printed(&setup_owned, &events, ""));
    let (event, published) = publish_until_received(setup, subscriber, amqp_switch_off);
    assert!(published.status.success(), "{}", both(&published));
    assert!(event.status.success(), "{}", both(&event));
    let envelope: serde_json::Value =
        serde_json::from_slice(&event.stdout).unwrap_or_else(|e| panic!("{e}: {}", both(&event)));
    assert_eq!(
        envelope["topic"], "org.example.demo/lamp/things/twin/events/modified",
        "{envelope}"
    );
    assert_eq!(
        envelope["path"], "/features/power/properties/on",
        "{envelope}"
    );
    assert_eq!(envelope["value"], false, "{envelope}");
}

#[test]
fn serve_dev_keeps_the_demo_thing_of_an_earlier_run() {
    let data = tempfile::tempdir().unwrap();
    let args = [
        "--dev",
        "--data",
        data.path().to_str().unwrap(),
        "--mqtt",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ];
    let (serve, lines) = start(&args);
    assert!(
        !lines.iter().any(|l| l.contains("kept from this data dir")),
        "{lines:?}"
    );
    drop(serve);
    let (_serve, lines) = start(&args);
    assert!(
        lines.iter().any(|l| l.contains("kept from this data dir")),
        "{lines:?}"
    );
}

#[test]
fn serve_without_a_data_dir_says_how_to_give_one() {
    let out = serve_fails(&["--mqtt", "127.0.0.1:0"]);
    assert!(
        stderr(&out).contains("`--data DIR` is required"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_tls_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate").unwrap();
    for (cert, key, named) in [
        ("cert.pem", "no-such-key.pem", "no-such-key.pem"),
        ("garbage.pem", "no-such-key.pem", "garbage.pem"),
    ] {
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!("[mqtt]\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n"),
        )
        .unwrap();
        let out = serve_fails(&[
            "--data",
            dir.path().join("data").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--mqtt",
            "127.0.0.1:0",
            "--mqtts",
            "127.0.0.1:0",
        ]);
        let text = stderr(&out);
        assert!(text.contains(named), "`{named}` is named: {text}");
    }
}

#[test]
fn an_address_in_use_and_a_data_dir_in_use_are_refused_with_their_reason() {
    let mut running = Broker::new();
    running.create_solution("org.acme");
    running.start();
    let taken = running.mqtt_addr().to_string();
    let other = tempfile::tempdir().unwrap();
    let out = serve_fails(&["--data", other.path().to_str().unwrap(), "--mqtt", &taken]);
    assert!(
        stderr(&out).contains(&format!("cannot listen on `{taken}`")),
        "{}",
        stderr(&out)
    );
    let out = serve_fails(&[
        "--data",
        running.data().to_str().unwrap(),
        "--mqtt",
        "127.0.0.1:0",
    ]);
    assert!(
        stderr(&out).contains("locked by a running Thingsgate"),
        "{}",
        stderr(&out)
    );
}
