#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The NATS fixture of the cluster-mode tests (`e2e::nats`) works: the machine's NATS service is
//! there; a nats-server of the test's own (Debian's) runs JetStream, and a stream it stored
//! survives a SIGKILL and a restart on the same port and store dir; a cluster of three current
//! nats-servers (`THINGSGATE_NATS_SERVER_BIN`, which `cargo xtask test` installs) elects a
//! JetStream meta leader, keeps a replicated (R3) stream writable when that leader is killed,
//! and the restarted server catches up.
//!
//! The streams are driven through the JetStream API over the plain NATS protocol
//! (`e2e::nats::request`).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use e2e::nats::{
    NatsServers, current_server_bin, debian_server_bin, request_json, server_version,
    shared_nats_url, unique_prefix,
};
use serde_json::{Value, json};

/// How long one request may wait for its reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a step may keep retrying (a stream leader elected, a replica caught up).
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Retries `attempt` until it returns `Ok` or [`STEP_TIMEOUT`] passes (then panics with the
/// last error and `context`).
fn eventually<T>(
    what: &str,
    context: impl Fn() -> String,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        match attempt() {
            Ok(value) => return value,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: not within {STEP_TIMEOUT:?}: {e}\n{}", context())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A JetStream API reply, or its `error` as `Err`.
fn api(url: &str, subject: &str, payload: &Value) -> Result<Value, String> {
    let reply = request_json(url, subject, payload, REQUEST_TIMEOUT)?;
    match reply.get("error") {
        Some(error) => Err(format!("{subject}: {error}")),
        None => Ok(reply),
    }
}

/// Creates the file stream `name` on subjects `name.>` with `replicas` replicas.
fn create_stream(url: &str, name: &str, replicas: u32) -> Result<Value, String> {
    api(
        url,
        &format!("$JS.API.STREAM.CREATE.{name}"),
        &json!({
            "name": name,
            "subjects": [format!("{name}.>")],
            "storage": "file",
            "num_replicas": replicas,
        }),
    )
}

/// Publishes `payload` to `subject` (of a stream) and returns the stream's ack
/// (`{"stream": …, "seq": …}`).
fn publish(url: &str, subject: &str, payload: &Value) -> Result<Value, String> {
    api(url, subject, payload)
}

/// `$JS.API.STREAM.INFO.<name>`.
fn stream_info(url: &str, name: &str) -> Result<Value, String> {
    api(url, &format!("$JS.API.STREAM.INFO.{name}"), &json!({}))
}

#[test]
fn the_shared_service_takes_a_stream_under_a_unique_prefix() {
    let url = shared_nats_url();
    assert_eq!(url, "nats://127.0.0.1:4222");
    let name = unique_prefix("shared service");
    assert_ne!(name, unique_prefix("shared service"));
    let created = create_stream(&url, &name, 1).unwrap();
    assert_eq!(created["config"]["name"], name.as_str(), "{created}");
    let ack = publish(&url, &format!("{name}.one"), &json!({"n": 1})).unwrap();
    assert_eq!(ack["seq"], 1, "{ack}");
    let deleted = api(&url, &format!("$JS.API.STREAM.DELETE.{name}"), &json!({})).unwrap();
    assert_eq!(deleted["success"], true, "{deleted}");
}

#[test]
fn a_debian_server_keeps_its_stream_across_kill9_and_restart() {
    let binary = debian_server_bin();
    let version = server_version(&binary);
    eprintln!("{} is {version:?}", binary.display());
    let mut nats = NatsServers::start(1, &binary);
    let url = nats.urls()[0].clone();
    assert_eq!(nats.url_list(), url);
    assert_eq!(nats.len(), 1);

    // JetStream is on, with its store in the fixture's temp dir.
    let jsz = nats.jsz(0);
    let store = jsz["config"]["store_dir"].as_str().unwrap_or_default();
    assert!(
        store.starts_with(nats.store_dir(0).to_str().unwrap()),
        "/jsz: {jsz}"
    );
    let (status, body) = nats.monitor(0, "/healthz?js-enabled-only=true");
    assert_eq!(status, 200, "{body}");

    let name = unique_prefix("debian_r1");
    create_stream(&url, &name, 1).unwrap_or_else(|e| panic!("{e}\n{}", nats.logs()));
    let ack = publish(&url, &format!("{name}.a"), &json!({"n": 1})).unwrap();
    assert_eq!(ack["seq"], 1, "{ack}");

    let pid = nats.pid(0);
    nats.kill9(0);
    assert!(!nats.is_running(0));
    let addr = url.trim_start_matches("nats://");
    assert!(
        TcpStream::connect(addr).is_err(),
        "{addr} still accepts after SIGKILL"
    );

    nats.restart(0);
    assert_ne!(nats.pid(0), pid);
    assert_eq!(nats.urls()[0], url, "the same port after a restart");
    let info = eventually(
        "the stream back after the restart",
        || nats.logs(),
        || {
            let info = stream_info(&url, &name)?;
            match info["state"]["messages"].as_u64() {
                Some(1) => Ok(info),
                _ => Err(format!("{info}")),
            }
        },
    );
    assert_eq!(info["state"]["last_seq"], 1, "{info}");
}

#[test]
fn a_cluster_of_three_keeps_a_replicated_stream_when_its_meta_leader_is_killed() {
    let binary = current_server_bin();
    let version = server_version(&binary);
    eprintln!("{} is {version:?}", binary.display());
    let began = Instant::now();
    let mut nats = NatsServers::start(3, &binary);
    let leader = nats.meta_leader();
    eprintln!(
        "cluster of 3 with meta leader {leader} in {:?}",
        began.elapsed()
    );
    let urls = nats.urls();
    assert_eq!(urls.len(), 3);
    assert_eq!(nats.url_list(), urls.join(","));
    assert_eq!(nats.jsz(0)["meta_cluster"]["cluster_size"], 3);

    let name = unique_prefix("cluster_r3");
    let created = eventually(
        "an R3 stream created",
        || nats.logs(),
        || create_stream(&urls[0], &name, 3),
    );
    assert_eq!(created["config"]["num_replicas"], 3, "{created}");
    let ack = eventually(
        "the first message stored",
        || nats.logs(),
        || publish(&urls[0], &format!("{name}.a"), &json!({"n": 1})),
    );
    assert_eq!(ack["seq"], 1, "{ack}");

    // Kill the meta leader: the other two elect another and the stream still takes writes.
    let killed = nats.index_of(&leader);
    let survivor = (killed + 1) % 3;
    let killed_at = Instant::now();
    nats.kill9(killed);
    let new_leader = nats.meta_leader();
    assert_ne!(new_leader, leader);
    eprintln!(
        "meta leader {leader} killed, {new_leader} elected in {:?}",
        killed_at.elapsed()
    );
    let ack = eventually(
        "a message stored with one server of three down",
        || nats.logs(),
        || publish(&urls[survivor], &format!("{name}.b"), &json!({"n": 2})),
    );
    assert_eq!(ack["seq"], 2, "{ack}");

    // Back on the same port and store dir, it catches up: its own replica has both messages.
    let began = Instant::now();
    nats.restart(killed);
    let after = nats.meta_leader();
    eprintln!(
        "{} restarted, meta leader {after}, in {:?}",
        nats.name(killed),
        began.elapsed()
    );
    eventually(
        "the restarted server's replica caught up",
        || nats.logs(),
        || {
            let (status, body) = nats.monitor(killed, "/jsz?accounts=true&streams=true");
            let jsz: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}"))?;
            let messages = jsz["account_details"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
                .find(|stream| stream["name"] == name.as_str())
                .and_then(|stream| stream["state"]["messages"].as_u64());
            match messages {
                Some(2) => Ok(()),
                other => Err(format!("its replica has {other:?} messages: {body}")),
            }
        },
    );
    let info = stream_info(&urls[killed], &name).unwrap();
    assert_eq!(info["state"]["messages"], 2, "{info}");
}
