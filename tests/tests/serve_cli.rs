//! `thingsgate serve` as a user meets it: `--dev` prints client commands that work, and every
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

/// Runs a shell command line printed by `serve --dev`, with extra arguments, within 20 s.
fn run_printed(line: &str, extra: &str) -> Output {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("{line} {extra}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh runs (mosquitto-clients: `apt-get install mosquitto-clients`)");
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

#[test]
fn serve_dev_prints_mosquitto_commands_that_work_as_printed() {
    let data = tempfile::tempdir().unwrap();
    let (_serve, lines) = start(&[
        "--dev",
        "--data",
        data.path().to_str().unwrap(),
        "--mqtt",
        "127.0.0.1:0",
    ]);
    let command = |tool: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(tool))
            .unwrap_or_else(|| panic!("no `{tool}` line in {lines:?}"))
            .clone()
    };
    let sub = command("mosquitto_sub ");
    let publish = command("mosquitto_pub ");
    assert!(
        publish.contains("-P 'eyJ"),
        "the publisher uses the dev JWT: {publish}"
    );
    let subscriber = std::thread::spawn(move || run_printed(&sub, "-C 1 -W 15"));
    // The subscriber needs a moment to subscribe; publish until it has its message.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !subscriber.is_finished() && Instant::now() < deadline {
        let out = run_printed(&publish, "");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let received = subscriber.join().unwrap();
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&received.stdout).trim(),
        "demo/hello hello from thingsgate"
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
