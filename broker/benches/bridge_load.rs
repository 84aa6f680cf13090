#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Commands per second through one AMQP bridge connection (DESIGN.md §5), with RabbitMQ's own
//! baseline in the same run: how fast can a Thingsgate bridge drain a hub's queue of twin
//! commands, against a lapin consumer that only acknowledges the same messages.
//!
//! `cargo bench -p broker --bench bridge_load` — starts the real `thingsgate serve` (release
//! build, `--http 127.0.0.1:0`, a fresh data dir and solution `bench` owning `org.acme`),
//! creates `BRIDGE_LOAD_THINGS` (default 100) things `org.acme:dev-N` over HTTP whose policies
//! let `integration:org.acme:dev-N` write their features, and uses the RabbitMQ server of this
//! machine (`amqp://guest:guest@127.0.0.1:5672/%2f`). Per round and per prefetch
//! (`BRIDGE_LOAD_PREFETCH`, default `100,1000`), on a fresh durable queue each:
//!
//! - **baseline**: `BRIDGE_LOAD_MESSAGES` (default 30,000) persistent messages are published
//!   into the queue first (with confirms; not measured), then one lapin consumer with that
//!   prefetch acknowledges them and does nothing else, the cheapest way: `basic.ack` with
//!   `multiple` once per half prefetch window (the bridge acknowledges the settled prefix with
//!   `multiple` too); timed from the first delivery to the last acknowledgement;
//! - **bridge**: the same messages — Ditto envelopes modifying `dev-(i mod THINGS)`'s
//!   `temp` value, with the hub's `device_id` header, `correlation-id` and no `reply-to` — are
//!   published into a new queue, then an `amqp-091` connection with that prefetch, the
//!   authorization context `integration:{{ header:device_id }}` and the enforcement
//!   `{{ header:device_id }}` = `{{ thing:id }}` is stored through the HTTP API; timed from the
//!   first command counted in the connection's status to the last (polled every 10 ms). Each
//!   command is authorized, applied, journaled (`fdatasync`, group commit) and only then
//!   acknowledged to RabbitMQ.
//!
//! Printed per run: commands (or acks) per second, Thingsgate's and RabbitMQ's CPU seconds
//! over the run, and the bridge/baseline ratio; at the end the medians over
//! `BRIDGE_LOAD_ROUNDS` rounds (default 3). Everything is bounded in time; Thingsgate is killed
//! at the end (and on a panic).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use support::{cpu_seconds, create_solution, rabbitmq_pid, serve};

const RABBITMQ_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// No run may take longer.
const RUN_LIMIT: Duration = Duration::from_secs(120);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One HTTP/1.1 request with Basic auth; (status, body).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let text = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("");
    (status, serde_json::from_str(text).unwrap_or(Value::Null))
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

async fn declare(channel: &Channel, queue: &str) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Publishes `messages` into `queue` with confirms, 1,000 in flight at most.
async fn fill(channel: &Channel, queue: &str, messages: usize, things: usize) {
    let mut confirms = Vec::new();
    for i in 0..messages {
        let thing = format!("org.acme:dev-{}", i % things);
        let envelope = json!({
            "topic": format!("org.acme/dev-{}/things/twin/commands/modify", i % things),
            "path": "/features/temp/properties/value",
            "value": i,
            "headers": {"correlation-id": format!("c-{i}"), "response-required": false}
        });
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from("device_id"),
            AMQPValue::LongString(LongString::from(thing.into_bytes())),
        );
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                envelope.to_string().as_bytes(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers)
                    .with_correlation_id(format!("c-{i}").as_str().into()),
            )
            .await
            .unwrap();
        confirms.push(confirm);
        if confirms.len() >= 1000 {
            for c in confirms.drain(..) {
                assert!(c.await.unwrap().is_ack());
            }
        }
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

/// Durable queue `queue`, emptied, then filled with `messages` commands; the channel (with
/// confirms) that did it.
async fn filled_queue(
    connection: &Connection,
    queue: &str,
    messages: usize,
    things: usize,
) -> Channel {
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare(&channel, queue).await;
    channel
        .queue_purge(queue.into(), Default::default())
        .await
        .unwrap();
    fill(&channel, queue, messages, things).await;
    channel
}

struct Run {
    per_second: f64,
    thingsgate_cpu: f64,
    rabbitmq_cpu: f64,
}

async fn baseline(
    connection: &Connection,
    prefetch: u16,
    messages: usize,
    things: usize,
    rabbit: &str,
) -> Run {
    let queue = format!("tg-bridge-load-baseline-{}", std::process::id());
    let channel = filled_queue(connection, &queue, messages, things).await;
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let rabbit_before = cpu_seconds(rabbit);
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut first = None;
    let mut received = 0;
    // Acknowledged the cheapest way: `multiple` up to the latest delivery, once per half window
    // (and at the end).
    let every = (usize::from(prefetch) / 2).max(1);
    let deadline = Instant::now() + RUN_LIMIT;
    while received < messages {
        tokio::select! {
            delivery = consumer.next() => {
                let delivery = delivery.unwrap().unwrap();
                first.get_or_insert_with(Instant::now);
                received += 1;
                if received % every == 0 || received == messages {
                    // In order: a `multiple` ack overtaken by a later one would name a tag
                    // already acknowledged.
                    delivery.acker.ack(BasicAckOptions { multiple: true }).await.unwrap();
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => panic!("the baseline consumer did not get every message in time"),
        }
    }
    let elapsed = first.unwrap().elapsed();
    let rabbit_cpu = cpu_seconds(rabbit) - rabbit_before;
    consumer_channel
        .basic_cancel(consumer.tag(), Default::default())
        .await
        .unwrap();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    Run {
        per_second: messages as f64 / elapsed.as_secs_f64(),
        thingsgate_cpu: 0.0,
        rabbitmq_cpu: rabbit_cpu,
    }
}

#[allow(clippy::too_many_arguments)]
async fn bridged(
    connection: &Connection,
    http_addr: SocketAddr,
    auth: &str,
    pid: &str,
    prefetch: u16,
    messages: usize,
    things: usize,
    rabbit: &str,
    round: usize,
) -> Run {
    let queue = format!("tg-bridge-load-{}-{round}-{prefetch}", std::process::id());
    let channel = filled_queue(connection, &queue, messages, things).await;
    let id = format!("load-{round}-{prefetch}");
    let doc = json!({
        "connectionType": "amqp-091",
        "uri": RABBITMQ_URI,
        "sources": [{
            "addresses": [queue],
            "prefetch": prefetch,
            "authorizationContext": ["integration:{{ header:device_id }}"],
            "enforcement": {"input": "{{ header:device_id }}", "filters": ["{{ thing:id }}"]}
        }]
    });
    let path = format!("/api/2/solutions/bench/connections/{id}");
    let tg_before = cpu_seconds(pid);
    let rabbit_before = cpu_seconds(rabbit);
    let (status, body) = http(http_addr, "PUT", &path, auth, Some(&doc));
    assert_eq!(status, 201, "{body}");
    let mut first = None;
    let deadline = Instant::now() + RUN_LIMIT;
    let done = loop {
        let (_, status) = http(http_addr, "GET", &format!("{path}/status"), auth, None);
        let counters = &status["counters"];
        let settled = counters["in"].as_u64().unwrap_or(0)
            + counters["failed"].as_u64().unwrap_or(0)
            + counters["denied"].as_u64().unwrap_or(0);
        if settled > 0 {
            first.get_or_insert_with(Instant::now);
        }
        if settled as usize >= messages {
            assert_eq!(
                counters["in"].as_u64(),
                Some(messages as u64),
                "every command applied: {status}"
            );
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the bridge did not drain the queue in time: {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = done - first.unwrap();
    let run = Run {
        per_second: messages as f64 / elapsed.as_secs_f64(),
        thingsgate_cpu: cpu_seconds(pid) - tg_before,
        rabbitmq_cpu: cpu_seconds(rabbit) - rabbit_before,
    };
    let (status, _) = http(http_addr, "DELETE", &path, auth, None);
    assert_eq!(status, 204);
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    run
}

/// One prefetch's figures over the rounds: bridge commands/s, baseline acks/s, Thingsgate CPU
/// µs per command.
type Series = (u16, Vec<f64>, Vec<f64>, Vec<f64>);

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let messages: usize = env_or("BRIDGE_LOAD_MESSAGES", 30_000);
    let things: usize = env_or("BRIDGE_LOAD_THINGS", 100);
    let rounds: usize = env_or("BRIDGE_LOAD_ROUNDS", 3);
    let prefetches: Vec<u16> = std::env::var("BRIDGE_LOAD_PREFETCH")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let rabbit = rabbitmq_pid().expect("RabbitMQ (beam.smp) runs on this machine");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let secret = create_solution(data, "org.acme");
    let (server, addresses) = serve(&[
        "--data",
        data,
        "--mqtt",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ]);
    let http_addr = addresses["http"];
    let pid = server.0.id().to_string();
    let auth = basic("bench", &secret);
    for n in 0..things {
        let policy = json!({"entries": {
            "owner": {"subjects": {"iot-things:bench": {"type": "solution"}},
                      "resources": {"thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []}}},
            "device": {"subjects": {format!("integration:org.acme:dev-{n}"): {"type": "hub device"}},
                       "resources": {"thing:/features": {"grant": ["READ", "WRITE"], "revoke": []}}}
        }});
        let (s, b) = http(
            http_addr,
            "PUT",
            &format!("/api/2/policies/org.acme:dev-{n}"),
            &auth,
            Some(&policy),
        );
        assert_eq!(s, 201, "{b}");
        let thing = json!({"policyId": format!("org.acme:dev-{n}"), "features": {"temp": {"properties": {"value": 0}}}});
        let (s, b) = http(
            http_addr,
            "PUT",
            &format!("/api/2/things/org.acme:dev-{n}"),
            &auth,
            Some(&thing),
        );
        assert_eq!(s, 201, "{b}");
    }
    println!(
        "bridge_load: thingsgate pid {pid}, rabbitmq beam.smp pid {rabbit}; {messages} commands over {things} things per run, {rounds} rounds"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connection = Connection::connect(RABBITMQ_URI, ConnectionProperties::default())
            .await
            .expect("RabbitMQ at 127.0.0.1:5672 (guest/guest)");
        let mut results: Vec<Series> =
            prefetches.iter().map(|p| (*p, Vec::new(), Vec::new(), Vec::new())).collect();
        for round in 0..rounds {
            for (prefetch, bridge_rates, base_rates, tg_cpu_per_k) in &mut results {
                let base = baseline(&connection, *prefetch, messages, things, &rabbit).await;
                let bridge = bridged(&connection, http_addr, &auth, &pid, *prefetch, messages, things, &rabbit, round).await;
                println!(
                    "round {round} prefetch {prefetch:>5}: bridge {:>8.0} commands/s (thingsgate {:.2} CPU-s, rabbitmq {:.2} CPU-s) | baseline {:>8.0} acks/s (rabbitmq {:.2} CPU-s) | ratio {:.2}",
                    bridge.per_second,
                    bridge.thingsgate_cpu,
                    bridge.rabbitmq_cpu,
                    base.per_second,
                    base.rabbitmq_cpu,
                    bridge.per_second / base.per_second
                );
                bridge_rates.push(bridge.per_second);
                base_rates.push(base.per_second);
                tg_cpu_per_k.push(bridge.thingsgate_cpu / messages as f64 * 1e6);
            }
        }
        println!("medians over {rounds} rounds:");
        for (prefetch, bridge_rates, base_rates, tg_cpu) in &mut results {
            let (b, r) = (median(bridge_rates), median(base_rates));
            println!(
                "prefetch {prefetch:>5}: bridge {b:>8.0} commands/s, baseline {r:>8.0} acks/s, ratio {:.2}; thingsgate {:.1} µs CPU per command",
                b / r,
                median(tg_cpu)
            );
        }
    });
    drop(server);
}
