#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! `thingsgate connection …` run as the real binary (DESIGN.md §5, §7): offline on a stopped
//! data dir (`--data`), online against a running server (`--http`, the secret in
//! `THINGSGATE_SECRET`), and a connection created offline that the server starts and connects
//! to RabbitMQ (127.0.0.1:5672, guest/guest). Passwords in URIs are never printed.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::bridge::{BRIDGE_TIMEOUT, declare_queue, delete_queue, unique};
use e2e::broker::{Broker, Solution};
use e2e::http::http_addr;
use e2e::{stderr, stdout, thingsgate_bin};
use serde_json::{Value, json};

/// How long one command may take (the CLI's own request timeout is shorter).
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// One run of `thingsgate ARGS`, with `secret` in `THINGSGATE_SECRET` and `input` on stdin;
/// killed and failed after [`COMMAND_LIMIT`].
fn run(args: &[&str], secret: Option<&str>, input: Option<&str>) -> Output {
    let mut command = Command::new(thingsgate_bin());
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("THINGSGATE_") {
            command.env_remove(name);
        }
    }
    if let Some(secret) = secret {
        command.env("THINGSGATE_SECRET", secret);
    }
    let mut child = command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("thingsgate runs");
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_LIMIT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("thingsgate {args:?} did not finish within {COMMAND_LIMIT:?}");
        }
    }
}

/// A command that must succeed: its stdout.
fn ok(args: &[&str], secret: Option<&str>, input: Option<&str>) -> String {
    let out = run(args, secret, input);
    assert_eq!(
        out.status.code(),
        Some(0),
        "thingsgate {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// A command that must exit 2 with a message on stderr (and nothing on stdout): the message.
fn refused(args: &[&str], secret: Option<&str>, input: Option<&str>) -> String {
    let out = run(args, secret, input);
    assert_eq!(
        out.status.code(),
        Some(2),
        "thingsgate {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "stdout: {}", stdout(&out));
    let message = stderr(&out);
    assert!(!message.trim().is_empty(), "a refusal says why");
    message
}

/// An AMQP connection to RabbitMQ whose source consumes `queue`, the URI's password `password`.
fn amqp_connection(id: &str, queue: &str, password: &str) -> Value {
    json!({
        "id": id,
        "connectionType": "amqp-091",
        "uri": format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
        "sources": [{
            "addresses": [queue],
            "authorizationContext": ["integration:{{ header:device_id }}"]
        }]
    })
}

/// Writes `doc` to a file in the broker's temp dir; its path.
fn document(broker: &Broker, name: &str, doc: &Value) -> String {
    let path = broker.dir().join(format!("{name}.json"));
    std::fs::write(&path, doc.to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `--data DATA --solution ID`, as owned strings.
fn offline(broker: &Broker, solution: &str) -> Vec<String> {
    vec![
        "--data".into(),
        broker.data().to_str().unwrap().to_owned(),
        "--solution".into(),
        solution.to_owned(),
    ]
}

/// `connection SUBCOMMAND PLACE… REST…` as the argument list.
fn args<'a>(subcommand: &'a str, place: &'a [String], rest: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["connection", subcommand];
    all.extend(place.iter().map(String::as_str));
    all.extend_from_slice(rest);
    all
}

/// Polls `connection status --http … --id ID --json` until its state is `want`.
fn wait_for_state(place: &[String], secret: &str, id: &str, want: &str) -> Value {
    let start = Instant::now();
    loop {
        let out = ok(
            &args("status", place, &["--id", id, "--json"]),
            Some(secret),
            None,
        );
        let status: Value = serde_json::from_str(&out).unwrap();
        if status["status"] == want {
            return status;
        }
        assert!(
            start.elapsed() < BRIDGE_TIMEOUT,
            "connection {id} not `{want}` within {BRIDGE_TIMEOUT:?}: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `--http URL --solution ID` of a running broker.
fn online(broker: &Broker, solution: &Solution) -> Vec<String> {
    vec![
        "--http".into(),
        format!("http://{}", http_addr(broker)),
        "--solution".into(),
        solution.id.clone(),
    ]
}

#[test]
fn connections_are_created_listed_and_deleted_offline_without_showing_passwords() {
    let broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    let place = offline(&broker, &solution.id);
    let password = unique("pw");
    let hub = document(
        &broker,
        "hub",
        &amqp_connection("hub", "telemetry", &password),
    );

    let created = ok(&args("create", &place, &[&hub]), None, None);
    assert!(created.contains("created connection hub"), "{created}");
    assert!(created.contains("guest:***@"), "{created}");
    // A second one from stdin: MQTT, closed, one target.
    let second = json!({
        "id": "cloud", "connectionType": "mqtt", "connectionStatus": "closed",
        "uri": format!("mqtt://bridge:{password}@127.0.0.1:1883"),
        "targets": [{"address": "acme/{{ thing:name }}", "topics": ["_/_/things/twin/events"],
                     "authorizationContext": ["integration:acme:cloud"]}]
    });
    ok(
        &args("create", &place, &["--json", "-"]),
        None,
        Some(&second.to_string()),
    );

    let table = ok(&args("list", &place, &[]), None, None);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two connections: {table}");
    assert!(lines[0].starts_with("CONNECTION"), "{table}");
    let hub_line = lines.iter().find(|l| l.starts_with("hub ")).unwrap();
    for column in [
        "amqp-091",
        "open",
        "1",
        "0",
        "amqp://guest:***@127.0.0.1:5672/%2f",
    ] {
        assert!(hub_line.contains(column), "`{column}` in {hub_line}");
    }
    let cloud_line = lines.iter().find(|l| l.starts_with("cloud ")).unwrap();
    for column in ["mqtt", "closed", "mqtt://bridge:***@127.0.0.1:1883"] {
        assert!(cloud_line.contains(column), "`{column}` in {cloud_line}");
    }
    let listed: Value = serde_json::from_str(&ok(&args("list", &place, &["--json"]), None, None))
        .expect("list --json prints JSON");
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let hub_doc = listed.iter().find(|d| d["id"] == "hub").unwrap();
    assert_eq!(hub_doc["uri"], "amqp://guest:***@127.0.0.1:5672/%2f");
    assert_eq!(hub_doc["sources"][0]["addresses"], json!(["telemetry"]));
    for text in [&created, &table] {
        assert!(!text.contains(&password), "a password was printed: {text}");
    }
    assert!(!listed.iter().any(|d| d.to_string().contains(&password)));

    // A password with an unencoded `/` (the URI would read as host `guest`, port 12): refused,
    // asking for percent-encoding, and the password is not in the message.
    let odd_password = format!("12/{password}");
    let odd = amqp_connection("odd", "telemetry", &odd_password);
    let odd_file = document(&broker, "odd", &odd);
    let message = refused(&args("create", &place, &[&odd_file]), None, None);
    assert!(message.contains("percent-encode"), "{message}");
    assert!(
        !message.contains(&odd_password),
        "a password was printed: {message}"
    );
    let table = ok(&args("list", &place, &["--json"]), None, None);
    assert!(!table.contains("\"odd\""), "{table}");

    let deleted = ok(&args("delete", &place, &["--id", "hub"]), None, None);
    assert!(deleted.contains("deleted connection hub"), "{deleted}");
    let table = ok(&args("list", &place, &[]), None, None);
    assert!(!table.contains("hub "), "{table}");
    assert!(table.contains("cloud "), "{table}");
    let again = refused(&args("delete", &place, &["--id", "hub"]), None, None);
    assert!(again.contains("has no connection `hub`"), "{again}");
}

#[test]
fn offline_mistakes_exit_2_with_a_message_naming_the_problem() {
    let broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    let place = offline(&broker, &solution.id);
    let good = amqp_connection("hub", "telemetry", "guest");
    let file = document(&broker, "good", &good);
    ok(&args("create", &place, &[&file]), None, None);

    // The same ID again.
    let exists = refused(&args("create", &place, &[&file]), None, None);
    assert!(
        exists.contains("already has a connection `hub`"),
        "{exists}"
    );
    // An unknown solution.
    let nobody = offline(&broker, "nobody");
    for command in [
        args("create", &nobody, &[&file]),
        args("list", &nobody, &[]),
        args("delete", &nobody, &["--id", "hub"]),
    ] {
        let message = refused(&command, None, None);
        assert!(message.contains("no solution `nobody`"), "{message}");
    }
    // Invalid documents: the message names the field.
    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    let mut no_id = good.clone();
    no_id.as_object_mut().unwrap().remove("id");
    cases.push(("no-id", no_id, "`id`"));
    let mut scheme = good.clone();
    scheme["id"] = json!("scheme");
    scheme["uri"] = json!("http://guest:guest@127.0.0.1:5672");
    cases.push(("scheme", scheme, "`uri`"));
    let mut unknown = good.clone();
    unknown["id"] = json!("unknown");
    unknown["sourcez"] = json!([]);
    cases.push(("unknown-field", unknown, "sourcez"));
    let mut placeholder = good.clone();
    placeholder["id"] = json!("placeholder");
    placeholder["sources"][0]["authorizationContext"] = json!(["integration:{{ jwt:sub }}"]);
    cases.push((
        "placeholder",
        placeholder,
        "sources[0].authorizationContext",
    ));
    let mut bad_id = good.clone();
    bad_id["id"] = json!("a b");
    cases.push(("bad-id", bad_id, "`id`"));
    for (name, doc, field) in cases {
        let file = document(&broker, name, &doc);
        let message = refused(&args("create", &place, &[&file]), None, None);
        assert!(message.contains(field), "{name}: `{field}` in {message}");
        assert!(
            message.contains("invalid") || message.contains("needs"),
            "{name}: {message}"
        );
    }
    // A URI refused for a password with an unencoded `/`: the message does not quote it.
    let slashed = format!("pa/{}", unique("pw"));
    let file = document(&broker, "slashed", &amqp_connection("s", "q", &slashed));
    let message = refused(&args("create", &place, &[&file]), None, None);
    assert!(message.contains("`uri`"), "{message}");
    assert!(
        !message.contains(&slashed),
        "a password was printed: {message}"
    );
    let not_json = refused(&args("create", &place, &["-"]), None, Some("{\"id\": "));
    assert!(not_json.contains("stdin is not JSON"), "{not_json}");
    let missing = refused(
        &args("create", &place, &["/nonexistent/connection.json"]),
        None,
        None,
    );
    assert!(missing.contains("cannot read"), "{missing}");
    // Nothing of that was stored.
    let listed: Value =
        serde_json::from_str(&ok(&args("list", &place, &["--json"]), None, None)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    // A state is the running server's: `status` needs `--http`.
    let status = refused(&args("status", &place, &[]), None, None);
    assert!(status.contains("--http"), "{status}");
    // `--data` and `--http` together, or neither: a usage error.
    let both = run(
        &[
            "connection",
            "list",
            "--data",
            "x",
            "--http",
            "http://127.0.0.1:1",
            "--solution",
            "s",
        ],
        None,
        None,
    );
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
    let neither = run(&["connection", "list", "--solution", "s"], None, None);
    assert_eq!(neither.status.code(), Some(2), "{}", stderr(&neither));
}

#[test]
fn a_data_dir_held_by_a_running_server_is_refused_offline() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.start();
    let place = offline(&broker, &solution.id);
    let message = refused(&args("list", &place, &[]), None, None);
    assert!(message.contains("locked"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_administered_online_with_the_secret_from_the_environment() {
    let (amqp, queue) = declare_queue("cli-online").await;
    let (broker, solution, _api) = e2e::bridge::started();
    let place = online(&broker, &solution);
    let secret = solution.secret.as_str();
    let hub = document(&broker, "hub", &amqp_connection("hub", &queue, "guest"));

    let created = ok(&args("create", &place, &[&hub]), Some(secret), None);
    assert!(created.contains("created connection hub"), "{created}");
    assert!(!created.contains("guest:guest"), "{created}");
    let table = ok(&args("list", &place, &[]), Some(secret), None);
    assert!(
        table.contains("amqp://guest:***@127.0.0.1:5672/%2f"),
        "{table}"
    );
    let listed: Value =
        serde_json::from_str(&ok(&args("list", &place, &["--json"]), Some(secret), None)).unwrap();
    assert_eq!(listed[0]["id"], "hub");
    assert_eq!(listed[0]["uri"], "amqp://guest:***@127.0.0.1:5672/%2f");

    // Running: `status` shows it connected, as JSON and as one line.
    let status = wait_for_state(&place, secret, "hub", "connected");
    assert_eq!(status["address"], "127.0.0.1:5672");
    let line = ok(&args("status", &place, &[]), Some(secret), None);
    let hub_line = line.lines().find(|l| l.starts_with("hub ")).unwrap();
    assert!(hub_line.contains("connected"), "{line}");
    assert!(hub_line.contains("0/0/0/0"), "{line}");
    let all: Value = serde_json::from_str(&ok(
        &args("status", &place, &["--json"]),
        Some(secret),
        None,
    ))
    .unwrap();
    assert_eq!(all[0]["id"], "hub", "{all}");

    // The server's refusals, with its Ditto error.
    let exists = refused(&args("create", &place, &[&hub]), Some(secret), None);
    assert!(exists.contains("409"), "{exists}");
    assert!(
        exists.contains("already has a connection `hub`"),
        "{exists}"
    );
    let mut bad = amqp_connection("bad", &queue, "guest");
    bad["uri"] = json!("mqtt://127.0.0.1:1883");
    let invalid = refused(
        &args("create", &place, &["-"]),
        Some(secret),
        Some(&bad.to_string()),
    );
    assert!(
        invalid.contains("connectivity:connection.configuration.invalid")
            && invalid.contains("`uri`"),
        "{invalid}"
    );
    let slashed = format!("pa/{}", unique("pw"));
    let refused_uri = refused(
        &args("create", &place, &["-"]),
        Some(secret),
        Some(&amqp_connection("s", &queue, &slashed).to_string()),
    );
    assert!(refused_uri.contains("`uri`"), "{refused_uri}");
    assert!(
        !refused_uri.contains(&slashed),
        "a password was printed: {refused_uri}"
    );
    let unknown = refused(
        &args("status", &place, &["--id", "nope"]),
        Some(secret),
        None,
    );
    assert!(
        unknown.contains("connectivity:connection.notfound"),
        "{unknown}"
    );
    let wrong = refused(&args("list", &place, &[]), Some("not-the-secret"), None);
    assert!(wrong.contains("did not accept the credentials"), "{wrong}");
    assert!(!wrong.contains("not-the-secret"), "{wrong}");
    let other = vec![
        place[0].clone(),
        place[1].clone(),
        "--solution".to_owned(),
        "someone-else".to_owned(),
    ];
    let foreign = refused(&args("list", &other, &[]), Some(secret), None);
    assert!(
        foreign.contains("did not accept the credentials"),
        "{foreign}"
    );
    let no_secret = refused(&args("list", &place, &[]), None, None);
    assert!(no_secret.contains("THINGSGATE_SECRET"), "{no_secret}");

    let deleted = ok(
        &args("delete", &place, &["--id", "hub"]),
        Some(secret),
        None,
    );
    assert!(deleted.contains("deleted connection hub"), "{deleted}");
    let empty = ok(&args("list", &place, &[]), Some(secret), None);
    assert!(empty.contains("no connections"), "{empty}");
    let gone = refused(
        &args("delete", &place, &["--id", "hub"]),
        Some(secret),
        None,
    );
    assert!(gone.contains("404"), "{gone}");
    broker.assert_logs_never_contain(&[secret]);
    delete_queue(&amqp, &queue).await;
}

#[test]
fn an_unreachable_server_is_an_error_not_a_hang() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let place = vec![
        "--http".to_owned(),
        format!("http://127.0.0.1:{port}"),
        "--solution".to_owned(),
        "acme".to_owned(),
    ];
    let message = refused(&args("list", &place, &[]), Some("s"), None);
    assert!(message.contains("cannot reach the server"), "{message}");
    let https = vec![
        "--http".to_owned(),
        "https://127.0.0.1:1".to_owned(),
        "--solution".to_owned(),
        "acme".to_owned(),
    ];
    let message = refused(&args("list", &https, &[]), Some("s"), None);
    assert!(message.contains("https"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_created_offline_connects_when_the_server_starts() {
    let (amqp, queue) = declare_queue("cli-offline").await;
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    let file = document(&broker, "hub", &amqp_connection("hub", &queue, "guest"));
    ok(
        &args("create", &offline(&broker, &solution.id), &[&file]),
        None,
        None,
    );
    broker.arg("--http").arg("127.0.0.1:0");
    broker.start();
    let place = online(&broker, &solution);
    let status = wait_for_state(&place, &solution.secret, "hub", "connected");
    assert_eq!(status["connectionType"], "amqp-091");
    assert!(status["connects"].as_u64().unwrap() >= 1, "{status}");
    assert!(status.get("lastError").is_none(), "{status}");
    broker.assert_logs_never_contain(&["guest:guest"]);
    drop(broker);
    delete_queue(&amqp, &queue).await;
}
