#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Acknowledged twin updates survive a crash (issue 5; DESIGN.md §4 "QoS 1 PUBACK only once
//! durable", §6 "a crash (kill -9) loses nothing that was acknowledged").
//!
//! The broker is killed with SIGKILL (no shutdown, no flush) right after the PUBACKs the test
//! relies on, restarted on the same data dir, and the things are read back whole with their
//! revision.

use std::time::Duration;

use broker::mqtt::codec::Protocol;
use e2e::broker::Broker;
use e2e::twin_random_support::{NET_TIMEOUT, NS, PendingAck, TwinClient, thing_command};
use serde_json::{Value, json};

/// The `value` of a retrieve's answer, which must have status 200.
fn answered(reply: &Value, thing: &str) -> Value {
    assert_eq!(
        reply.get("status").and_then(Value::as_u64),
        Some(200),
        "retrieve of {thing} after the restart: {reply}"
    );
    reply.get("value").cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_qos1_update_survives_kill_9_and_restart() {
    const N: u64 = 50;
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    broker.start();
    let addr = broker.mqtt_addr();
    // One device per protocol, each with its own thing (created without a policy: the inline
    // default policy grants the creator's subjects, among them the solution's).
    let mut devices = Vec::new();
    for (id, protocol) in [("device3", Protocol::V311), ("device5", Protocol::V5)] {
        let mut device = TwinClient::connect(addr, protocol, id, &solution).await;
        let thing = format!("{NS}:{id}");
        let ack = device
            .publish_qos1(
                &thing_command(&thing, "create", ""),
                json!({"attributes": {"n": 0}}).to_string().as_bytes(),
            )
            .await;
        assert_eq!(ack.reason, 0, "create {thing}: {ack:?}");
        devices.push((device, thing));
    }
    for (device, thing) in &mut devices {
        let topic = thing_command(thing, "modify", "/attributes/n");
        for k in 1..=N {
            let ack = device.publish_qos1(&topic, k.to_string().as_bytes()).await;
            assert_eq!(ack.reason, 0, "modify {k} of {thing}: {ack:?}");
        }
    }
    // At once after the last PUBACK: nothing can have been flushed on the way out.
    broker.kill();
    drop(devices);

    broker.start();
    let mut reader =
        TwinClient::connect(broker.mqtt_addr(), Protocol::V5, "reader", &solution).await;
    for id in ["device3", "device5"] {
        let thing = format!("{NS}:{id}");
        let reply = reader.retrieve_fields(&thing, "attributes,_revision").await;
        assert_eq!(
            answered(&reply, &thing),
            json!({"attributes": {"n": N}, "_revision": N + 1}),
            "{thing}: the last acknowledged value and revision (create + {N} modifies) after \
             kill -9 and restart"
        );
    }
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_update_of_many_concurrent_devices_survives_kill_9() {
    const DEVICES: usize = 8;
    const UPDATES: usize = 1000;
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    broker.start();
    let addr = broker.mqtt_addr();
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let id = format!("dev{i}");
        let mut device = TwinClient::connect(addr, Protocol::V5, &id, &solution).await;
        let thing = format!("{NS}:{id}");
        let ack = device
            .publish_qos1(
                &thing_command(&thing, "create", ""),
                json!({"attributes": {}}).to_string().as_bytes(),
            )
            .await;
        assert_eq!(ack.reason, 0, "create {thing}: {ack:?}");
        devices.push((device, thing, Vec::<PendingAck>::new()));
    }
    // Every device sends all its updates without waiting (each one a new attribute, so each
    // acknowledged update can be found on its own), interleaved across the connections so the
    // journal batches writes of many connections together.
    for j in 0..UPDATES {
        for (device, thing, pending) in &mut devices {
            let topic = thing_command(thing, "modify", &format!("/attributes/k{j}"));
            pending.push(device.send_qos1(&topic, j.to_string().as_bytes()));
        }
    }
    // Kill while updates are still in flight: once the first device has a quarter of its
    // PUBACKs.
    let ack = devices[0].2[UPDATES / 4].wait_mut().await;
    assert_eq!(ack.reason, 0, "{ack:?}");
    broker.kill();
    // Let every reader take what was on the wire before the socket closed.
    let deadline = tokio::time::Instant::now() + NET_TIMEOUT;
    while devices.iter().any(|(d, _, _)| !d.is_closed()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the devices' connections did not close after kill -9"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut acknowledged = Vec::new();
    for (_, thing, pending) in &mut devices {
        let mut acked = Vec::new();
        for (j, p) in pending.iter_mut().enumerate() {
            if let Some(ack) = p.arrived() {
                assert_eq!(ack.reason, 0, "{thing} update {j}: {ack:?}");
                acked.push(j);
            }
        }
        acknowledged.push((thing.clone(), acked));
    }
    drop(devices);

    broker.start();
    let mut reader =
        TwinClient::connect(broker.mqtt_addr(), Protocol::V5, "reader", &solution).await;
    let mut total_acked = 0;
    let mut total_stored = 0;
    for (thing, acked) in &acknowledged {
        let reply = reader.retrieve_fields(thing, "attributes,_revision").await;
        let value = answered(&reply, thing);
        let attributes = value["attributes"].as_object().cloned().unwrap_or_default();
        let revision = value["_revision"].as_u64().expect("_revision");
        for j in acked {
            assert_eq!(
                attributes.get(&format!("k{j}")),
                Some(&json!(j)),
                "{thing}: update {j} was acknowledged before kill -9 but is not stored"
            );
        }
        // One connection's updates are applied in order: what is stored is a prefix of what
        // was sent, and the revision counts it (create = 1).
        let stored = attributes.len();
        for j in 0..stored {
            assert_eq!(
                attributes.get(&format!("k{j}")),
                Some(&json!(j)),
                "{thing}: {stored} updates stored, but not the first {stored}: {attributes:?}"
            );
        }
        assert_eq!(
            revision,
            stored as u64 + 1,
            "{thing}: revision {revision} for {stored} stored updates"
        );
        assert!(stored >= acked.len());
        total_acked += acked.len();
        total_stored += stored;
    }
    eprintln!(
        "{DEVICES} devices × {UPDATES} pipelined QoS 1 updates: {total_acked} acknowledged \
         before kill -9, {total_stored} found after the restart (every acknowledged one among \
         them)"
    );
    assert!(
        total_acked > UPDATES / 4,
        "too few acknowledged: {total_acked}"
    );
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_twin_command_resent_with_dup_on_a_new_connection_is_applied_once_and_survives_kill_9()
 {
    use e2e::protocol_support::{connect_ok, persistent, pubrec, pubrel, qos2};
    use e2e::raw::Received;

    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    broker.start();
    let addr = broker.mqtt_addr();
    let thing = format!("{NS}:dup");
    let mut creator = TwinClient::connect(addr, Protocol::V5, "creator", &solution).await;
    let ack = creator
        .publish_qos1(
            &thing_command(&thing, "create", ""),
            json!({"attributes": {"n": 0}}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(ack.reason, 0, "{ack:?}");

    // A device with a persistent session sends a QoS 2 modify and loses the connection before
    // it reads the PUBREC.
    let topic = thing_command(&thing, "modify", "/attributes/n");
    let modify = |dup: bool| {
        let mut publish = e2e::protocol_support::publish(&topic, b"7", qos2(7));
        publish.dup = dup;
        broker::mqtt::codec::Packet::Publish(publish)
    };
    let (mut device, ack) =
        connect_ok(addr, persistent(Protocol::V5, "device", &solution, 600)).await;
    assert_eq!(ack.code, 0);
    device.send(&modify(false)).await;
    drop(device);

    // It comes back and sends the PUBLISH again, with DUP: PUBREC (once the first attempt is
    // durable), then PUBREL → PUBCOMP; the command is not applied a second time.
    let (mut device, ack) =
        connect_ok(addr, persistent(Protocol::V5, "device", &solution, 600)).await;
    assert!(ack.session_present, "{ack:?}");
    device.send(&modify(true)).await;
    match device.recv_within(NET_TIMEOUT).await {
        Received::Packet(packet) => assert_eq!(packet, pubrec(7)),
        other => panic!("expected PUBREC 7, got {other:?}"),
    }
    device.send(&pubrel(7)).await;
    match device.recv_within(NET_TIMEOUT).await {
        Received::Packet(broker::mqtt::codec::Packet::PubComp(comp)) => {
            assert_eq!(comp.packet_id.get(), 7)
        }
        other => panic!("expected PUBCOMP 7, got {other:?}"),
    }

    // At once after the PUBCOMP: kill -9, restart, and the change is there, applied once.
    broker.kill();
    drop((device, creator));
    broker.start();
    let mut reader =
        TwinClient::connect(broker.mqtt_addr(), Protocol::V5, "reader", &solution).await;
    let reply = reader.retrieve_fields(&thing, "attributes,_revision").await;
    assert_eq!(
        answered(&reply, &thing),
        json!({"attributes": {"n": 7}, "_revision": 2}),
        "create + one modify, after kill -9 and restart"
    );
    broker.stop();
}
