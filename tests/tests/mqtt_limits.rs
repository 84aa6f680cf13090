//! Limits and backpressure of the real broker (`broker/src/limits.rs`): a subscriber that stops
//! reading gets a bounded queue, the publisher is never blocked by it, drops are counted in the
//! metrics served on `--http`; the operational endpoints answer.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::net::SocketAddr;
use std::time::Duration;

use broker::mqtt::codec::{Packet, Protocol, QoS};
use e2e::broker::Broker;
use e2e::raw::{RawClient, Received, connect_packet, publish_packet, subscribe_packet, with_login};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn http_addr(broker: &Broker) -> SocketAddr {
    broker
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("http listening on "))
        .expect("the broker printed its HTTP address")
        .parse()
        .unwrap()
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("HTTP answer within 10 s");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of a counter line in the metrics text (0 if absent).
fn counter(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}

async fn login(broker: &Broker, solution: &e2e::broker::Solution, client: &str) -> RawClient {
    let connect = with_login(
        connect_packet(Protocol::V311, client),
        Some(&solution.id),
        Some(&solution.secret),
    );
    let (client, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0);
    client
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_gets_a_bounded_queue_and_never_blocks_the_publisher() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.write_config("[mqtt]\nmax_queued_messages = 50\n");
    broker.arg("--http").arg("127.0.0.1:0").start();
    let http = http_addr(&broker);
    let baseline = rss_mib(broker.pid());

    let mut stalled = login(&broker, &solution, "stalled").await;
    stalled
        .send(&subscribe_packet(1, "load/#", QoS::AtMostOnce))
        .await;
    assert!(matches!(stalled.recv().await, Packet::SubAck(_)));
    // From here on `stalled` never reads: its socket buffers fill, then its session queue.

    let mut publisher = login(&broker, &solution, "publisher").await;
    let payload = vec![b'x'; 2048];
    for _ in 0..20_000 {
        publisher
            .send(&publish_packet("load/data", &payload, None))
            .await;
    }
    // A QoS 1 publish after 40 MB for the stalled subscriber is acknowledged at once.
    publisher
        .send(&publish_packet("other/topic", b"still here", Some(7)))
        .await;
    match publisher.recv_within(Duration::from_secs(10)).await {
        Received::Packet(Packet::PubAck(ack)) => assert_eq!(ack.packet_id.get(), 7),
        other => panic!("expected PUBACK, got {other:?}"),
    }

    // Other clients are served normally.
    let mut fresh = login(&broker, &solution, "fresh").await;
    fresh
        .send(&subscribe_packet(1, "ping/+", QoS::AtLeastOnce))
        .await;
    assert!(matches!(fresh.recv().await, Packet::SubAck(_)));
    publisher
        .send(&publish_packet("ping/1", b"pong", Some(8)))
        .await;
    let mut got_it = false;
    for _ in 0..4 {
        if let Received::Packet(Packet::Publish(p)) =
            fresh.recv_within(Duration::from_secs(5)).await
        {
            assert_eq!(p.topic.as_str(), "ping/1");
            got_it = true;
            break;
        }
    }
    assert!(got_it, "the fresh subscriber got the message");

    let (status, metrics) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    let dropped = counter(
        &metrics,
        "thingsgate_messages_dropped_total{reason=\"queue_full\"}",
    );
    assert!(dropped > 10_000, "drops are counted: {dropped}\n{metrics}");
    let grown = rss_mib(broker.pid()).saturating_sub(baseline);
    assert!(
        grown < 64,
        "memory stayed bounded: grew {grown} MiB for 40 MB published"
    );
    drop(stalled);
}

#[tokio::test]
async fn the_operational_endpoints_answer_and_count_refused_connects() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.arg("--http").arg("127.0.0.1:0").start();
    let http = http_addr(&broker);
    assert_eq!(http_get(http, "/health").await, (200, "ok\n".to_owned()));
    assert_eq!(http_get(http, "/ready").await, (200, "ready\n".to_owned()));
    let connect = with_login(
        connect_packet(Protocol::V311, "intruder"),
        Some(&solution.id),
        Some("not-the-secret"),
    );
    let (_client, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 4);
    let (_, metrics) = http_get(http, "/metrics").await;
    assert_eq!(
        counter(
            &metrics,
            "thingsgate_connects_refused_total{reason=\"wrong_secret\"}"
        ),
        1,
        "{metrics}"
    );
    assert!(!metrics.contains("not-the-secret"));
    assert_eq!(http_get(http, "/nothing").await.0, 404);
}

#[tokio::test]
async fn sigterm_tells_mqtt5_clients_the_server_is_shutting_down_and_exits_cleanly() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.start();
    let connect = with_login(
        connect_packet(Protocol::V5, "leaving"),
        Some(&solution.id),
        Some(&solution.secret),
    );
    let (mut client, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0);
    let v3 = with_login(
        connect_packet(Protocol::V311, "leaving-too"),
        Some(&solution.id),
        Some(&solution.secret),
    );
    let (mut old, ack) = RawClient::connect(broker.mqtt_addr(), v3).await;
    assert_eq!(ack.code, 0);
    let status = tokio::task::spawn_blocking(move || {
        let status = broker.stop();
        (broker, status)
    });
    match client.recv_within(Duration::from_secs(15)).await {
        Received::Packet(Packet::Disconnect(d)) => {
            assert_eq!(d.reason, 0x8B, "server shutting down")
        }
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(matches!(
        old.recv_within(Duration::from_secs(15)).await,
        Received::Closed
    ));
    let (_broker, status) = status.await.unwrap();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn retained_messages_are_bounded_per_solution_and_the_excess_is_counted() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.write_config("[mqtt]\nmax_retained_messages = 3\n");
    broker.arg("--http").arg("127.0.0.1:0").start();
    let http = http_addr(&broker);
    let mut publisher = login(&broker, &solution, "retainer").await;
    let retained = |topic: &str, payload: &[u8], id: u16| {
        let mut packet = publish_packet(topic, payload, Some(id));
        if let Packet::Publish(p) = &mut packet {
            p.retain = true;
        }
        packet
    };
    for (i, topic) in ["r/1", "r/2", "r/3", "r/4", "r/5"].iter().enumerate() {
        let id = u16::try_from(i).unwrap() + 1;
        publisher.send(&retained(topic, b"v1", id)).await;
        assert!(matches!(publisher.recv().await, Packet::PubAck(_)));
    }
    // Replacing a kept one still works at the limit.
    publisher.send(&retained("r/1", b"v2", 9)).await;
    assert!(matches!(publisher.recv().await, Packet::PubAck(_)));

    let mut late = login(&broker, &solution, "late").await;
    late.send(&subscribe_packet(1, "r/#", QoS::AtMostOnce))
        .await;
    let mut got = Vec::new();
    loop {
        match late.recv_within(Duration::from_millis(500)).await {
            Received::Packet(Packet::Publish(p)) => {
                got.push((p.topic.as_str().to_owned(), p.payload.to_vec()));
            }
            Received::Packet(_) => {}
            Received::Silent => break,
            Received::Closed => panic!("closed"),
        }
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("r/1".to_owned(), b"v2".to_vec()),
            ("r/2".to_owned(), b"v1".to_vec()),
            ("r/3".to_owned(), b"v1".to_vec()),
        ]
    );
    let (_, metrics) = http_get(http, "/metrics").await;
    assert_eq!(
        counter(
            &metrics,
            "thingsgate_messages_dropped_total{reason=\"retained_limit\"}"
        ),
        2,
        "{metrics}"
    );
}

#[tokio::test]
async fn sessions_are_bounded_per_solution_and_an_existing_one_can_always_reconnect() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.write_config("[mqtt]\nmax_sessions = 2\n");
    broker.start();
    let persistent = |protocol, id: &str| {
        let mut connect = with_login(
            connect_packet(protocol, id),
            Some(&solution.id),
            Some(&solution.secret),
        );
        connect.clean_start = false;
        if protocol == Protocol::V5 {
            connect.properties.session_expiry_interval = Some(600);
        }
        connect
    };
    // Two persistent sessions, their connections gone.
    for id in ["a", "b"] {
        let (client, ack) =
            RawClient::connect(broker.mqtt_addr(), persistent(Protocol::V5, id)).await;
        assert_eq!(ack.code, 0);
        drop(client);
    }
    // A third client is refused on both versions (the two sessions outlive their
    // connections); the first two come back.
    let (_c, ack) = RawClient::connect(broker.mqtt_addr(), persistent(Protocol::V5, "c")).await;
    assert_eq!(ack.code, 0x97, "quota exceeded");
    let (_c, ack) = RawClient::connect(broker.mqtt_addr(), persistent(Protocol::V311, "c")).await;
    assert_eq!(ack.code, 3, "3.1.1: server unavailable");
    for id in ["a", "b"] {
        let (_client, ack) =
            RawClient::connect(broker.mqtt_addr(), persistent(Protocol::V5, id)).await;
        assert_eq!(ack.code, 0);
        assert!(ack.session_present);
    }
}
