//! Bridge tests' common ground: a broker with the HTTP API and one solution (namespace
//! `org.acme`), things whose policies let hub devices and the hub's target subjects in,
//! connections stored and watched through the API, and the external brokers of this machine
//! (RabbitMQ at 127.0.0.1:5672 as guest/guest, Mosquitto at 127.0.0.1:1883) with names unique
//! per test.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::broker::{Broker, Solution};
use crate::http::{Api, Auth};

/// RabbitMQ of this machine (and of CI).
pub const RABBITMQ: &str = "127.0.0.1:5672";
/// Mosquitto of this machine (and of CI).
pub const MOSQUITTO: &str = "127.0.0.1:1883";
/// The bridge's own URI of RabbitMQ.
pub const RABBITMQ_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long a bridge may take to reach a state, or a message to arrive.
pub const BRIDGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A name no other test (or earlier run) uses: `tg-<label>-<pid>-<n>`.
pub fn unique(label: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "tg-{label}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails with instructions if `addr` does not accept TCP connections.
pub fn require_service(addr: &str, what: &str, start: &str) {
    let Ok(parsed) = addr.parse() else {
        panic!("bad address {addr}")
    };
    if std::net::TcpStream::connect_timeout(&parsed, Duration::from_secs(3)).is_err() {
        panic!("{what} is not running at {addr}; start it: `{start}`");
    }
}

/// RabbitMQ must be up.
pub fn require_rabbitmq() {
    require_service(
        RABBITMQ,
        "RabbitMQ",
        "sudo systemctl start rabbitmq-server (or: rabbitmq-server -detached)",
    );
}

/// Mosquitto must be up.
pub fn require_mosquitto() {
    require_service(
        MOSQUITTO,
        "Mosquitto",
        "sudo systemctl start mosquitto (or: mosquitto -d -p 1883)",
    );
}

/// A started broker with `--http`, one solution owning `org.acme`, and the API client.
pub fn started() -> (Broker, Solution, Api) {
    crate::http::started_with_http()
}

/// The policy of a bridged thing: the solution (`iot-things:<id>`) owns it; the hub device
/// `integration:<thing ID>` may read and write its features; `reader` (a target's subject) may
/// read everything.
pub fn thing_policy(solution: &Solution, thing: &str, reader: &str) -> Value {
    let all = json!({"grant": ["READ", "WRITE"], "revoke": []});
    json!({"entries": {
        "owner": {
            "subjects": {format!("iot-things:{}", solution.id): {"type": "solution"}},
            "resources": {"thing:/": all, "policy:/": all, "message:/": all}
        },
        "device": {
            "subjects": {format!("integration:{thing}"): {"type": "hub device"}},
            "resources": {"thing:/features": all, "message:/": all}
        },
        "reader": {
            "subjects": {reader: {"type": "bridge target"}},
            "resources": {"thing:/": {"grant": ["READ"], "revoke": []}}
        }
    }})
}

/// Creates policy and thing `thing` (`org.acme:…`) with [`thing_policy`] and feature `temp`
/// at `value` 0.
pub async fn create_thing(api: &Api, solution: &Solution, thing: &str, reader: &str) {
    let auth = Auth::basic(solution);
    let policy = api
        .put(
            &format!("/api/2/policies/{thing}"),
            &auth,
            &thing_policy(solution, thing, reader),
        )
        .await;
    assert!(
        policy.status == 201 || policy.status == 204,
        "policy {thing}: {} {:?}",
        policy.status,
        policy.body
    );
    let created = api
        .put(
            &format!("/api/2/things/{thing}"),
            &auth,
            &json!({"policyId": thing, "features": {"temp": {"properties": {"value": 0}}}}),
        )
        .await;
    assert!(
        created.status == 201 || created.status == 204,
        "thing {thing}: {} {:?}",
        created.status,
        created.body
    );
}

/// Stores connection `id` (PUT); panics unless it is created or replaced.
pub async fn put_connection(api: &Api, solution: &Solution, id: &str, connection: &Value) {
    let answer = api
        .put(
            &format!("/api/2/solutions/{}/connections/{id}", solution.id),
            &Auth::basic(solution),
            connection,
        )
        .await;
    assert!(
        answer.status == 201 || answer.status == 204,
        "PUT connection {id}: {} {:?}",
        answer.status,
        answer.body
    );
}

/// The status document of connection `id`.
pub async fn status(api: &Api, solution: &Solution, id: &str) -> Value {
    let answer = api
        .get(
            &format!("/api/2/solutions/{}/connections/{id}/status", solution.id),
            &Auth::basic(solution),
        )
        .await;
    assert_eq!(answer.status, 200, "status of {id}: {:?}", answer.body);
    answer.body
}

/// Waits until connection `id` is in state `want` (`connected`, `failed`, …) and its status
/// satisfies `also`; panics after [`BRIDGE_TIMEOUT`] with the last status.
pub async fn wait_status(
    api: &Api,
    solution: &Solution,
    id: &str,
    want: &str,
    also: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let status = status(api, solution, id).await;
        if status["status"] == want && also(&status) {
            return status;
        }
        assert!(
            start.elapsed() < BRIDGE_TIMEOUT,
            "connection {id} not `{want}` within {BRIDGE_TIMEOUT:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A counter of a status document (`in`, `out`, `denied`, `failed`, `dropped`, `replies`).
pub fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

/// A Ditto envelope modifying `org.acme:<thing>`'s `temp` value.
pub fn modify_temp(thing: &str, value: Value, correlation: &str) -> Value {
    let name = thing.strip_prefix("org.acme:").unwrap_or(thing);
    json!({
        "topic": format!("org.acme/{name}/things/twin/commands/modify"),
        "path": "/features/temp/properties/value",
        "value": value,
        "headers": {"correlation-id": correlation}
    })
}

/// A RabbitMQ queue for one test (`x-expires`: gone after 10 idle minutes even if the test
/// fails before deleting it) and the connection that declared it.
pub async fn declare_queue(label: &str) -> (lapin::Connection, String) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    require_rabbitmq();
    let name = unique(label);
    let connection = tokio::time::timeout(
        Duration::from_secs(20),
        lapin::Connection::connect(RABBITMQ_URI, lapin::ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ answers")
    .expect("RabbitMQ accepts guest/guest");
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .unwrap();
    (connection, name)
}

/// Deletes a queue [`declare_queue`] made.
pub async fn delete_queue(connection: &lapin::Connection, name: &str) {
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .unwrap();
}
