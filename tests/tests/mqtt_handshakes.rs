#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Sockets in their handshake and authenticated connections are bounded apart
//! (`broker/src/mqtt/admission.rs`): a slowloris cannot keep devices out, and a client at the
//! connection limit is told so at once.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use broker::mqtt::codec::{Packet, Protocol};
use e2e::broker::Broker;
use e2e::raw::{RawClient, connect_packet, with_login};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_a_client_is_refused_within_a_second() {
    let mut broker = Broker::new();
    let s = broker.create_solution("org.acme");
    broker.env("THINGSGATE_MQTT_MAX_CONNECTIONS", "3").start();
    let addr = broker.mqtt_addr();
    let mut held = Vec::new();
    for i in 0..3 {
        let connect = with_login(
            connect_packet(Protocol::V5, &format!("held-{i}")),
            Some(&s.id),
            Some(&s.secret),
        );
        let (client, ack) = RawClient::connect(addr, connect).await;
        assert_eq!(ack.code, 0, "{ack:?}");
        held.push(client);
    }
    for (protocol, expected) in [(Protocol::V5, 0x89), (Protocol::V311, 3)] {
        let started = Instant::now();
        let connect = with_login(
            connect_packet(protocol, "one-too-many"),
            Some(&s.id),
            Some(&s.secret),
        );
        let mut client = RawClient::open(addr, protocol).await;
        client.send(&Packet::Connect(Box::new(connect))).await;
        match client.recv_within(Duration::from_secs(1)).await {
            e2e::raw::Received::Packet(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, expected, "{protocol:?}: {ack:?}")
            }
            other => panic!("{protocol:?}: expected a CONNACK refusal within 1 s, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    // A slot given back is a slot for the next client.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let connect = with_login(
            connect_packet(Protocol::V5, "next"),
            Some(&s.id),
            Some(&s.secret),
        );
        let (_client, ack) = RawClient::connect(addr, connect).await;
        if ack.code == 0 {
            break;
        }
        assert_eq!(ack.code, 0x89);
        assert!(
            Instant::now() < deadline,
            "the freed slot was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_sockets_cannot_keep_an_authenticated_device_from_connecting() {
    // 19,000 sockets from one address that start a CONNECT and never finish it; the test needs
    // as many open files (the hard limit here is 20,000).
    const SLOW: usize = 19_000;
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    rlimit::Resource::NOFILE
        .set(hard, hard)
        .expect("raise the open-file limit");
    assert!(
        hard >= SLOW as u64 + 200,
        "this test needs an open-file hard limit of at least {} (`ulimit -Hn`)",
        SLOW + 200
    );
    let mut broker = Broker::new();
    let s = broker.create_solution("org.acme");
    // A long connect timeout: every slow socket would keep its handshake for the whole test.
    broker
        .env("THINGSGATE_MQTT_CONNECT_TIMEOUT_SECONDS", "120")
        .start();
    let addr = broker.mqtt_addr();
    let opened = Instant::now();
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let connect = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await;
        let Ok(Ok(mut stream)) = connect else {
            panic!(
                "TCP connect {} timed out or failed: {connect:?}",
                slow.len()
            );
        };
        // The first byte of a CONNECT, and nothing more.
        let _ = stream.write_all(&[0x10]).await;
        slow.push(stream);
    }
    let opening = opened.elapsed();
    // A device from another address connects at once, with every slow socket still open.
    let started = Instant::now();
    let connect = with_login(
        connect_packet(Protocol::V5, "device"),
        Some(&s.id),
        Some(&s.secret),
    );
    let mut device =
        RawClient::open_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), addr, Protocol::V5).await;
    device.send(&Packet::Connect(Box::new(connect))).await;
    match device.recv_within(Duration::from_secs(3)).await {
        e2e::raw::Received::Packet(Packet::ConnAck(ack)) => assert_eq!(ack.code, 0, "{ack:?}"),
        other => panic!(
            "the device got no CONNACK within 3 s of {SLOW} slow sockets ({opening:?} to open them): {other:?}"
        ),
    }
    println!(
        "{SLOW} slow sockets opened in {opening:?}; the device connected in {:?}",
        started.elapsed()
    );
    assert!(broker.is_running(), "{}", broker.logs());
    drop(slow);
}
