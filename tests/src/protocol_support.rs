//! Support for the protocol and topic tests (`tests/mqtt_protocol.rs`, `tests/mqtt_topics.rs`):
//! a started broker with one solution, raw packets with every field a test needs (built on the
//! broker's codec, sent with [`crate::raw::RawClient`]), and waits that say what they expected.
//!
//! Every wait is bounded: [`crate::raw::NET_TIMEOUT`] for something that must come, [`QUIET`]
//! for something that must not.

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32};
use std::time::Duration;

use broker::mqtt::codec::{
    ConnAck, Connect, Packet, Properties, Protocol, PubResponse, Publish, QoS, QosPid,
    RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, TopicFilter, TopicName,
    Will,
};
use bytes::Bytes;

use crate::broker::{Broker, Solution};
use crate::raw::{RawClient, Received, connect_packet, with_login};

/// How long a test waits to be confident that something is *not* delivered.
pub const QUIET: Duration = Duration::from_millis(400);

/// Both protocol versions, for tests that hold for each.
pub const BOTH: [Protocol; 2] = [Protocol::V311, Protocol::V5];

/// A started broker (config `config`, empty for the defaults) with one solution in `org.acme`.
pub fn started(config: &str) -> (Broker, Solution) {
    let mut broker = Broker::new();
    broker.write_config(config);
    let solution = broker.create_solution("org.acme");
    broker.start();
    (broker, solution)
}

/// A non-zero packet identifier.
pub fn pid(n: u16) -> NonZeroU16 {
    NonZeroU16::new(n).expect("non-zero packet id")
}

/// A topic name.
pub fn topic(name: &str) -> TopicName {
    TopicName::new(Bytes::copy_from_slice(name.as_bytes())).expect("valid topic name")
}

/// A topic filter.
pub fn filter(text: &str) -> TopicFilter {
    TopicFilter::new(Bytes::copy_from_slice(text.as_bytes())).expect("valid topic filter")
}

/// A CONNECT of `client_id` with the solution's credentials (user name = solution ID, password =
/// secret), clean start, keep-alive 60 s.
pub fn login(protocol: Protocol, client_id: &str, solution: &Solution) -> Connect {
    with_login(
        connect_packet(protocol, client_id),
        Some(&solution.id),
        Some(&solution.secret),
    )
}

/// A CONNECT that keeps its session: 3.1.1 Clean Session 0; 5.0 Clean Start 0 with a Session
/// Expiry Interval of `expiry` seconds.
pub fn persistent(
    protocol: Protocol,
    client_id: &str,
    solution: &Solution,
    expiry: u32,
) -> Connect {
    let mut connect = login(protocol, client_id, solution);
    connect.clean_start = false;
    if protocol == Protocol::V5 {
        connect.properties.session_expiry_interval = Some(expiry);
    }
    connect
}

/// A will on `topic` with `payload` at `qos`.
pub fn will(topic_name: &str, payload: &[u8], qos: QoS) -> Will {
    Will {
        topic: topic(topic_name),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain: false,
        properties: Properties::default(),
    }
}

/// Connects and asserts CONNACK success; the client and its CONNACK.
pub async fn connect_ok(addr: SocketAddr, connect: Connect) -> (RawClient, ConnAck) {
    let id = connect.client_id.as_str().to_owned();
    let (client, ack) = RawClient::connect(addr, connect).await;
    assert_eq!(ack.code, 0, "CONNECT of `{id}` refused: {ack:?}");
    (client, ack)
}

/// Connects `client_id` with clean start and asserts success.
pub async fn connected(
    addr: SocketAddr,
    protocol: Protocol,
    client_id: &str,
    solution: &Solution,
) -> RawClient {
    connect_ok(addr, login(protocol, client_id, solution))
        .await
        .0
}

/// A PUBLISH (not yet a [`Packet`], so a test can set more fields first).
pub fn publish(topic_name: &str, payload: &[u8], qos: QosPid) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic(topic_name),
        payload: Bytes::copy_from_slice(payload),
        properties: Properties::default(),
    }
}

/// QoS 1 with packet identifier `n`.
pub fn qos1(n: u16) -> QosPid {
    QosPid::AtLeastOnce(pid(n))
}

/// QoS 2 with packet identifier `n`.
pub fn qos2(n: u16) -> QosPid {
    QosPid::ExactlyOnce(pid(n))
}

fn response(n: u16) -> PubResponse {
    PubResponse {
        packet_id: pid(n),
        reason: 0,
        properties: Properties::default(),
    }
}

pub fn puback(n: u16) -> Packet {
    Packet::PubAck(response(n))
}

pub fn pubrec(n: u16) -> Packet {
    Packet::PubRec(response(n))
}

pub fn pubrel(n: u16) -> Packet {
    Packet::PubRel(response(n))
}

pub fn pubcomp(n: u16) -> Packet {
    Packet::PubComp(response(n))
}

/// Subscription options with a maximum QoS only.
pub fn opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions::qos(qos)
}

/// Subscription options with a retain handling.
pub fn opts_retain(qos: QoS, retain_handling: RetainHandling) -> SubscriptionOptions {
    SubscriptionOptions {
        retain_handling,
        ..SubscriptionOptions::qos(qos)
    }
}

/// A SUBSCRIBE of several filters, with an optional subscription identifier (MQTT 5).
pub fn subscribe(
    packet_id: u16,
    filters: &[(&str, SubscriptionOptions)],
    id: Option<u32>,
) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(packet_id),
        subscriptions: filters
            .iter()
            .map(|(f, options)| Subscription {
                filter: filter(f),
                options: *options,
            })
            .collect(),
        properties: Properties {
            subscription_identifiers: id
                .map(|n| NonZeroU32::new(n).expect("non-zero subscription id"))
                .into_iter()
                .collect(),
            ..Properties::default()
        },
    })
}

/// The next packet, which must be a SUBACK for `packet_id`.
pub async fn expect_suback(client: &mut RawClient, packet_id: u16) -> SubAck {
    match client.recv().await {
        Packet::SubAck(ack) => {
            assert_eq!(ack.packet_id, pid(packet_id), "{ack:?}");
            ack
        }
        other => panic!("expected SUBACK {packet_id}, got {other:?}"),
    }
}

/// Subscribes to `filter` with `options` and asserts that the maximum QoS was granted.
pub async fn subscribe_ok(client: &mut RawClient, filter_text: &str, options: SubscriptionOptions) {
    subscribe_ok_with_id(client, filter_text, options, None).await;
}

/// [`subscribe_ok`] with a subscription identifier.
pub async fn subscribe_ok_with_id(
    client: &mut RawClient,
    filter_text: &str,
    options: SubscriptionOptions,
    id: Option<u32>,
) {
    client
        .send(&subscribe(1, &[(filter_text, options)], id))
        .await;
    let ack = expect_suback(client, 1).await;
    assert_eq!(
        ack.codes,
        [options.qos as u8],
        "SUBSCRIBE `{filter_text}` not granted"
    );
}

/// The next packet, which must be a PUBLISH.
pub async fn expect_publish(client: &mut RawClient) -> Publish {
    match client.recv().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// The next packet, which must be a PUBACK (its reason is returned).
pub async fn expect_puback(client: &mut RawClient, packet_id: u16) -> u8 {
    match client.recv().await {
        Packet::PubAck(ack) => {
            assert_eq!(ack.packet_id, pid(packet_id), "{ack:?}");
            ack.reason
        }
        other => panic!("expected PUBACK {packet_id}, got {other:?}"),
    }
}

/// Publishes at QoS 1 with packet identifier `n` and returns the PUBACK's reason.
pub async fn publish_qos1(client: &mut RawClient, topic_name: &str, payload: &[u8], n: u16) -> u8 {
    client
        .send(&Packet::Publish(publish(topic_name, payload, qos1(n))))
        .await;
    expect_puback(client, n).await
}

/// Publishes at QoS 0; a PINGREQ round trip after it makes sure the server has handled it
/// (packets of one connection are handled in order) before the test goes on.
pub async fn publish_qos0(client: &mut RawClient, topic_name: &str, payload: &[u8]) {
    client
        .send(&Packet::Publish(publish(
            topic_name,
            payload,
            QosPid::AtMostOnce,
        )))
        .await;
    client.ping().await;
}

/// Asserts that nothing arrives within [`QUIET`].
pub async fn assert_silent(client: &mut RawClient, what: &str) {
    match client.recv_within(QUIET).await {
        Received::Silent => {}
        Received::Packet(p) => panic!("{what}: expected nothing, got {p:?}"),
        Received::Closed => panic!("{what}: expected nothing, the connection closed"),
    }
}

/// Waits up to `limit` for the server to close the connection; the packets it sent before.
pub async fn expect_closed(client: &mut RawClient, limit: Duration) -> Vec<Packet> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut packets = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.recv_within(left).await {
            Received::Packet(p) => packets.push(p),
            Received::Closed => return packets,
            Received::Silent => {
                panic!("the connection is still open after {limit:?}; received {packets:?}")
            }
        }
    }
}

/// How long the server may take to notice that a client dropped its socket (nothing on the
/// wire says when it has). When the server closes a connection itself, it has let the session
/// go before the socket closes, so no wait is needed then.
pub const SETTLE: Duration = Duration::from_millis(100);

/// Waits [`SETTLE`] after a client dropped its connection.
pub async fn settle() {
    tokio::time::sleep(SETTLE).await;
}

/// Sends a normal DISCONNECT (reason 0) and waits for the server to close the socket: the
/// session is offline (or ended) by then.
pub async fn disconnect(mut client: RawClient) {
    client
        .send(&Packet::Disconnect(
            broker::mqtt::codec::Disconnect::default(),
        ))
        .await;
    let after = expect_closed(&mut client, crate::raw::NET_TIMEOUT).await;
    assert!(after.is_empty(), "packets after DISCONNECT: {after:?}");
}

/// A publish's payload as text, for messages.
pub fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

/// Acknowledges a received QoS 1 PUBLISH (PUBACK); nothing for QoS 0.
pub async fn ack_if_needed(client: &mut RawClient, p: &Publish) {
    if let broker::mqtt::codec::QosPid::AtLeastOnce(id) = p.qos {
        client.send(&puback(id.get())).await;
    }
}
