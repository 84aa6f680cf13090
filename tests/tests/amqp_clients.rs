//! Independent AMQP 0.9.1 clients against the real `thingsgate serve --amqp`: pika (Python,
//! `tests/python/pika_client.py`) and Debian's `amqp-tools` (librabbitmq's `amqp-publish`,
//! `amqp-consume`, `amqp-declare-queue`, `amqp-get`), with solution secrets. A missing client
//! fails the test with how to install it (`cargo xtask test` installs both); nothing is skipped.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::amqp::{confirm_channel, connect, consume, next_within, secret_uri, start_with_amqp};
use e2e::broker::{Broker, Solution};
use e2e::process::{PROCESS_LIMIT, Streaming, run_bounded, text};
use e2e::workspace_root;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

const NS: &str = "org.acme";
/// How long one lapin step may take.
const STEP: Duration = Duration::from_secs(10);

/// A broker with an AMQP listener and one solution whose secret clients may read and write
/// every plain topic (the default solution policy) except write under `secret/` (revoked here).
fn started() -> (Broker, Solution, SocketAddr) {
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    let mut policy = broker.policy(&solution.id);
    policy["entries"]["e2e-no-secret"] = json!({
        "subjects": {format!("iot-things:{}", solution.id): {"type": "e2e test"}},
        "resources": {"topic:/secret": {"grant": [], "revoke": ["WRITE"]}},
    });
    broker.set_policy(&solution.id, &policy);
    let addr = start_with_amqp(&mut broker);
    (broker, solution, addr)
}

// --- pika ---------------------------------------------------------------------------------------

/// `PYTHONPATH` with the directory `cargo xtask test` installs pika into first (so the test also
/// runs under a plain `cargo test` once the xtask has run).
fn python_path() -> OsString {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| workspace_root().join(t))
        .unwrap_or_else(|| workspace_root().join("target"));
    let mut paths = vec![target.join("xtask").join("python")];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap()
}

fn python() -> Command {
    let mut command = Command::new("python3");
    command.env("PYTHONPATH", python_path());
    command
}

/// Fails (never skips) when Python or pika is missing, saying how to install them.
fn require_pika() {
    let out = python()
        .args(["-c", "import pika, sys; print(pika.__version__)"])
        .output()
        .unwrap_or_else(|e| {
            panic!("`python3` cannot be run ({e}): install it with `apt-get install python3`")
        });
    assert!(
        out.status.success(),
        "Python's pika is missing: run `cargo xtask test` (it installs it into \
         target/xtask/python) or `python3 -m pip install 'pika>=1.3,<2'`\n{}",
        text(&out.stderr)
    );
}

/// Runs `tests/python/pika_client.py --port P ARGS`; its JSON lines.
fn pika(addr: SocketAddr, args: &[&str]) -> (Output, Vec<Value>) {
    let mut command = python();
    command
        .arg(workspace_root().join("tests/python/pika_client.py"))
        .args(["--port", &addr.port().to_string()])
        .args(args);
    let out = run_bounded(command);
    let lines = text(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("pika_client.py printed `{l}`: {e}"))
        })
        .collect();
    (out, lines)
}

fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .unwrap_or_else(|| panic!("no `{name}` line in {lines:#?}"))
}

#[test]
fn pika_publishes_with_confirms_consumes_is_nacked_when_denied_and_commands_a_twin() {
    require_pika();
    let (broker, solution, addr) = started();
    let (out, lines) = pika(
        addr,
        // `--password=…`: a secret may begin with `-`, which argparse would take for an option.
        &[
            "--username",
            &solution.id,
            &format!("--password={}", solution.secret),
        ],
    );
    assert!(
        out.status.success(),
        "pika client failed ({}):\n{}\n{}\nserver log (tail):\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        tail(&broker.logs(), 40)
    );
    assert_eq!(step(&lines, "connected")["product"], "Thingsgate");
    assert_eq!(step(&lines, "connected")["publisher_confirms"], true);
    let queue = step(&lines, "bound")["queue"].as_str().unwrap();
    assert!(
        queue.starts_with("amq.gen-"),
        "a server-named queue: {queue}"
    );

    let received = step(&lines, "received");
    assert_eq!(received["exchange"], "amq.topic", "{received}");
    assert_eq!(received["routing_key"], "e2e.pika.temp", "{received}");
    assert_eq!(received["body"], "21.5", "{received}");
    assert_eq!(received["content_type"], "text/plain", "{received}");
    assert_eq!(received["delivery_mode"], 2, "{received}");
    assert_eq!(received["headers"]["unit"], "C", "{received}");

    let denied = step(&lines, "denied");
    assert_eq!(
        denied["outcome"], "nack",
        "a publish to `secret.pika` (no WRITE on topic:/secret) must be nacked: {denied}"
    );

    let answer = step(&lines, "answer");
    assert_eq!(
        answer["exchange"], "",
        "answers come through the default exchange: {answer}"
    );
    assert_eq!(answer["correlation_id"], "pika-1", "{answer}");
    assert_eq!(answer["answer"]["status"], 200, "{answer}");
    assert_eq!(
        answer["answer"]["value"]["attributes"]["maker"], "pika",
        "{answer}"
    );
    assert!(lines.iter().any(|l| l["step"] == "ok"), "{lines:#?}");
}

#[test]
fn pika_with_a_wrong_password_is_refused() {
    require_pika();
    let (_broker, solution, addr) = started();
    let (out, lines) = pika(
        addr,
        &[
            "--username",
            &solution.id,
            "--password=not-the-secret",
            "--expect-refused",
        ],
    );
    assert!(
        out.status.success(),
        "pika client failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let refused = step(&lines, "refused");
    let detail = refused["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("403") || detail.contains("ACCESS_REFUSED"),
        "pika was refused, but not with 403 ACCESS_REFUSED: {refused}"
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// --- amqp-tools ---------------------------------------------------------------------------------

/// Fails (never skips) when the `amqp-tools` programs cannot be run.
fn require_amqp_tools() {
    for program in [
        "amqp-publish",
        "amqp-consume",
        "amqp-declare-queue",
        "amqp-get",
    ] {
        if let Err(e) = Command::new(program)
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            panic!(
                "`{program}` cannot be run ({e}): install Debian's amqp-tools with \
                 `apt-get install amqp-tools` (`cargo xtask test` does)"
            );
        }
    }
}

/// `amqp-PROGRAM --url amqp://solution:secret@addr/%2f ARGS`.
fn amqp_tool(program: &str, url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    command.arg("--url").arg(url).args(args);
    command
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `amqp-publish -e amq.topic -r KEY -b BODY ARGS`, which must succeed.
fn amqp_publish(url: &str, key: &str, body: &str, args: &[&str]) {
    let mut all = vec!["-e", "amq.topic", "-r", key, "-b", body];
    all.extend_from_slice(args);
    let out = run_bounded(amqp_tool("amqp-publish", url, &all));
    assert_ok(&out, &format!("amqp-publish to {key}"));
}

/// Publishes `warmup` messages to `key` until `consumer` prints one (it has bound its queue:
/// amqp-consume says nothing when it is ready), at most one every 3 s, so that only one
/// reaches it. Bounded by [`PROCESS_LIMIT`].
fn wait_until_consuming(consumer: &mut Streaming, url: &str, key: &str) {
    let deadline = Instant::now() + PROCESS_LIMIT;
    while Instant::now() < deadline {
        amqp_publish(url, key, "warmup\n", &[]);
        if let Some(line) = consumer.line_within(Duration::from_secs(3)) {
            assert_eq!(line, "warmup", "the consumer's first message");
            return;
        }
    }
    panic!("amqp-consume received no warmup message within {PROCESS_LIMIT:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_consume_receives_what_amqp_publish_sends_and_amqp_publish_commands_a_twin() {
    require_amqp_tools();
    let (broker, solution, addr) = started();
    let url = secret_uri(addr, &solution);
    // A consumer of three messages (the warmup and two), acknowledging each after `cat`.
    let mut consumer = Streaming::spawn(amqp_tool(
        "amqp-consume",
        &url,
        &["-e", "amq.topic", "-r", "e2e.tools.#", "-c", "3", "cat"],
    ));
    wait_until_consuming(&mut consumer, &url, "e2e.tools.warmup");
    amqp_publish(
        &url,
        "e2e.tools.temp",
        "21.5\n",
        &["-p", "-C", "text/plain"],
    );
    // A `.` inside an MQTT level is `/` in the routing key (MQTT topic `e2e/tools/v1.2`).
    amqp_publish(&url, "e2e.tools.v1/2", "version 1.2\n", &["-H", "unit: C"]);
    let lines = consumer.finish().unwrap_or_else(|e| {
        panic!(
            "amqp-consume -c 3: {e}\nserver log (tail):\n{}",
            tail(&broker.logs(), 40)
        )
    });
    assert_eq!(
        lines,
        ["warmup", "21.5", "version 1.2"],
        "amqp-consume's messages"
    );

    // A twin command from amqp-publish, checked with lapin.
    amqp_publish(
        &url,
        "org/acme.tools-lamp.things.twin.commands.create",
        r#"{"attributes":{"maker":"amqp-tools"}}"#,
        &["-p", "-C", "application/json"],
    );
    let connection = connect(&url).await;
    let channel = confirm_channel(&connection).await;
    let (queue, mut answers) = consume(&channel, &[], true).await;
    channel
        .basic_publish(
            "amq.topic".into(),
            "org/acme.tools-lamp.things.twin.commands.retrieve".into(),
            BasicPublishOptions::default(),
            b"",
            BasicProperties::default().with_reply_to(queue.as_str().into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let answer = next_within(&mut answers, STEP)
        .await
        .expect("the retrieve's answer");
    let answer: Value = serde_json::from_slice(&answer.data).unwrap();
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(
        answer["value"]["attributes"]["maker"], "amqp-tools",
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_declare_queue_prints_the_queues_it_declares_and_a_durable_one_stays() {
    require_amqp_tools();
    let (_broker, solution, addr) = started();
    let url = secret_uri(addr, &solution);
    let out = run_bounded(amqp_tool("amqp-declare-queue", &url, &["-q", ""]));
    assert_ok(&out, "amqp-declare-queue -q ''");
    let generated = text(&out.stdout).trim().to_owned();
    assert!(
        generated.starts_with("amq.gen-"),
        "a server-named queue: {generated:?}"
    );
    let out = run_bounded(amqp_tool(
        "amqp-declare-queue",
        &url,
        &["-q", "tools-q", "-d"],
    ));
    assert_ok(&out, "amqp-declare-queue -q tools-q -d");
    assert_eq!(text(&out.stdout).trim(), "tools-q");
    // The durable queue outlives amqp-declare-queue's connection: a passive declare finds it.
    let connection = connect(&url).await;
    let channel = connection.create_channel().await.expect("channel.open");
    channel
        .queue_declare(
            "tools-q".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the durable queue exists after its connection closed");
    connection.close(200, "bye".into()).await.expect("close");
}

/// As on RabbitMQ, a durable queue exists apart from the connection that declared it: amqp-get
/// (one `basic.get`, no declare) reads it from a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_get_reads_a_message_from_a_durable_queue_another_connection_declared() {
    require_amqp_tools();
    let (_broker, solution, addr) = started();
    let url = secret_uri(addr, &solution);
    // A durable queue, bound with lapin; it collects a persistent message from amqp-publish
    // after its connection has gone.
    let connection = connect(&url).await;
    let channel = connection.create_channel().await.expect("channel.open");
    channel
        .queue_declare(
            "tools-q".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the durable queue again");
    channel
        .queue_bind(
            "tools-q".into(),
            "amq.topic".into(),
            "e2e.get.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind it");
    connection.close(200, "bye".into()).await.expect("close");
    amqp_publish(&url, "e2e.get.one", "kept for amqp-get", &["-p"]);

    let out = run_bounded(amqp_tool("amqp-get", &url, &["-q", "tools-q"]));
    assert_ok(
        &out,
        "amqp-get -q tools-q (a durable queue declared by another connection)",
    );
    assert_eq!(text(&out.stdout).trim(), "kept for amqp-get");
}

#[test]
fn amqp_tools_with_a_wrong_password_exit_non_zero() {
    require_amqp_tools();
    let (_broker, solution, addr) = started();
    let url = e2e::amqp::uri(addr, &solution.id, "not-the-secret");
    let runs: [(&str, Vec<&str>); 4] = [
        (
            "amqp-publish",
            vec!["-e", "amq.topic", "-r", "e2e.x", "-b", "x"],
        ),
        (
            "amqp-consume",
            vec!["-e", "amq.topic", "-r", "e2e.#", "-c", "1", "cat"],
        ),
        ("amqp-declare-queue", vec!["-q", "refused"]),
        ("amqp-get", vec!["-q", "refused"]),
    ];
    for (program, args) in runs {
        let out = run_bounded(amqp_tool(program, &url, &args));
        assert!(
            !out.status.success(),
            "{program} with a wrong password exited 0\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let said = text(&out.stderr);
        assert!(
            said.contains("ACCESS_REFUSED") || said.to_lowercase().contains("login"),
            "{program}: expected a login refusal on stderr, got: {said}"
        );
    }
}
