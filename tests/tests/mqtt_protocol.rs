#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The MQTT protocol against the real `thingsgate serve` (issue 4; OASIS MQTT 3.1.1 and 5.0):
//! QoS 1 and 2 flows, also across a reconnect; persistent sessions and their queue; session
//! expiry; will messages and the will delay; keep-alive; session takeover; maximum packet sizes
//! and the other limits of `broker/src/limits.rs`; protocol errors and malformed input; TLS.
//!
//! rumqttc (3.1.1 and 5) where a real client shows what users rely on; a raw client on the
//! broker's codec where exact packets, flags, packet identifiers and reason codes matter, or
//! where a client must misbehave (drop the socket without acknowledging, send garbage).
//! Every test runs its own broker; every wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::mqtt::codec::{self, Disconnect, Packet, Properties, Protocol, QoS, QosPid};
use bytes::BytesMut;
use e2e::broker::{Broker, Solution};
use e2e::clients::{connect_v4_login, connect_v5_login};
use e2e::protocol_support::{
    BOTH, QUIET, assert_silent, connect_ok, connected, disconnect, expect_closed, expect_puback,
    expect_publish, login, opts, persistent, pid, puback, pubcomp, publish, publish_qos0,
    publish_qos1, pubrec, pubrel, qos1, qos2, settle, started, subscribe_ok, text, will,
};
use e2e::raw::{NET_TIMEOUT, RawClient, Received};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A short name for a protocol, for client IDs and topics.
fn tag(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::V311 => "v3",
        Protocol::V5 => "v5",
    }
}

/// The packet identifier of a QoS 1/2 PUBLISH.
fn packet_id(p: &codec::Publish) -> u16 {
    p.qos
        .packet_id()
        .unwrap_or_else(|| panic!("a QoS 0 PUBLISH where QoS 1/2 was expected: {p:?}"))
        .get()
}

// --- QoS 1 and 2 -------------------------------------------------------------------------------

#[tokio::test]
async fn qos1_and_qos2_messages_reach_rumqttc_subscribers_of_both_versions() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();

    // MQTT 3.1.1.
    let mut sub = connect_v4_login(addr, "rumq-sub-v3", &sol.id, &sol.secret)
        .await
        .unwrap();
    assert_eq!(
        sub.subscribe("rumq/v3/#", rumqttc::QoS::ExactlyOnce).await,
        rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::ExactlyOnce)
    );
    let mut publ = connect_v4_login(addr, "rumq-pub-v3", &sol.id, &sol.secret)
        .await
        .unwrap();
    publ.publish_qos1("rumq/v3/one", b"at least once").await;
    let p = sub.next_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.qos),
        (
            "rumq/v3/one",
            &b"at least once"[..],
            rumqttc::QoS::AtLeastOnce
        )
    );
    publ.client
        .publish(
            "rumq/v3/two",
            rumqttc::QoS::ExactlyOnce,
            false,
            &b"exactly once"[..],
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"pubcomp") {
        match publ.next_incoming_within(NET_TIMEOUT).await {
            Some(Ok(rumqttc::Packet::PubRec(_))) => seen.push("pubrec"),
            Some(Ok(rumqttc::Packet::PubComp(_))) => seen.push("pubcomp"),
            Some(Ok(_)) => {}
            other => panic!("3.1.1 QoS 2 publisher: {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen, ["pubrec", "pubcomp"]);
    let p = sub.next_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.qos),
        (
            "rumq/v3/two",
            &b"exactly once"[..],
            rumqttc::QoS::ExactlyOnce
        )
    );

    // MQTT 5.
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode};
    let mut sub = connect_v5_login(addr, "rumq-sub-v5", &sol.id, &sol.secret)
        .await
        .unwrap();
    assert_eq!(
        sub.subscribe("rumq/v5/#", Q5::ExactlyOnce).await,
        SubscribeReasonCode::Success(Q5::ExactlyOnce)
    );
    let mut publ = connect_v5_login(addr, "rumq-pub-v5", &sol.id, &sol.secret)
        .await
        .unwrap();
    assert_eq!(
        publ.publish_qos1("rumq/v5/one", b"at least once").await,
        PubAckReason::Success
    );
    let p = sub.next_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.qos),
        (&b"rumq/v5/one"[..], &b"at least once"[..], Q5::AtLeastOnce)
    );
    publ.client
        .publish("rumq/v5/two", Q5::ExactlyOnce, false, &b"exactly once"[..])
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"pubcomp") {
        match publ.next_incoming_within(NET_TIMEOUT).await {
            Some(Ok(P5::PubRec(rec))) => {
                assert_eq!(
                    rec.reason,
                    rumqttc::v5::mqttbytes::v5::PubRecReason::Success
                );
                seen.push("pubrec");
            }
            Some(Ok(P5::PubComp(_))) => seen.push("pubcomp"),
            Some(Ok(_)) => {}
            other => panic!("5.0 QoS 2 publisher: {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen, ["pubrec", "pubcomp"]);
    let p = sub.next_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.qos),
        (&b"rumq/v5/two"[..], &b"exactly once"[..], Q5::ExactlyOnce)
    );
}

#[tokio::test]
async fn qos2_handshake_completes_on_both_sides_with_each_sides_packet_id() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let topic = format!("flow/{t}");
        let mut sub = connected(addr, protocol, &format!("q2-sub-{t}"), &sol).await;
        subscribe_ok(&mut sub, &topic, opts(QoS::ExactlyOnce)).await;
        let mut publ = connected(addr, protocol, &format!("q2-pub-{t}"), &sol).await;

        publ.send(&Packet::Publish(publish(
            &topic,
            b"exactly once",
            qos2(500),
        )))
        .await;
        match publ.recv().await {
            Packet::PubRec(r) => assert_eq!((r.packet_id, r.reason), (pid(500), 0), "{t}"),
            other => panic!("{t}: expected PUBREC 500, got {other:?}"),
        }
        publ.send(&pubrel(500)).await;
        match publ.recv().await {
            Packet::PubComp(c) => assert_eq!((c.packet_id, c.reason), (pid(500), 0), "{t}"),
            other => panic!("{t}: expected PUBCOMP 500, got {other:?}"),
        }

        let p = expect_publish(&mut sub).await;
        assert!(
            matches!(p.qos, QosPid::ExactlyOnce(_)),
            "{t}: delivered at {:?}",
            p.qos
        );
        assert_eq!(
            (p.topic.as_str(), text(&p), p.dup),
            (&*topic, "exactly once".to_owned(), false)
        );
        let id = packet_id(&p);
        sub.send(&pubrec(id)).await;
        match sub.recv().await {
            Packet::PubRel(r) => assert_eq!((r.packet_id, r.reason), (pid(id), 0), "{t}"),
            other => panic!("{t}: expected PUBREL {id}, got {other:?}"),
        }
        sub.send(&pubcomp(id)).await;
        sub.ping().await;
    }
}

#[tokio::test]
async fn unacknowledged_deliveries_are_resent_with_dup_and_the_same_packet_id_after_reconnect() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let id = format!("resend-{t}");
        let (mut sub, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(!ack.session_present, "{t}: a new session");
        subscribe_ok(&mut sub, &format!("resend/{t}/#"), opts(QoS::ExactlyOnce)).await;

        let mut publ = connected(addr, protocol, &format!("resend-pub-{t}"), &sol).await;
        assert_eq!(
            publish_qos1(&mut publ, &format!("resend/{t}/one"), b"one", 1).await,
            0
        );
        publ.send(&Packet::Publish(publish(
            &format!("resend/{t}/two"),
            b"two",
            qos2(2),
        )))
        .await;
        assert!(matches!(publ.recv().await, Packet::PubRec(r) if r.packet_id == pid(2)));
        publ.send(&pubrel(2)).await;
        assert!(matches!(publ.recv().await, Packet::PubComp(c) if c.packet_id == pid(2)));

        let first = expect_publish(&mut sub).await;
        let second = expect_publish(&mut sub).await;
        assert_eq!((text(&first), first.dup), ("one".to_owned(), false), "{t}");
        assert_eq!(
            (text(&second), second.dup),
            ("two".to_owned(), false),
            "{t}"
        );
        assert!(
            matches!(first.qos, QosPid::AtLeastOnce(_)),
            "{t}: {first:?}"
        );
        assert!(
            matches!(second.qos, QosPid::ExactlyOnce(_)),
            "{t}: {second:?}"
        );
        // Neither PUBACK nor PUBREC: the connection just drops.
        drop(sub);
        assert_eq!(
            publish_qos1(&mut publ, &format!("resend/{t}/three"), b"three", 3).await,
            0
        );

        let (mut sub, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(ack.session_present, "{t}: the session must be resumed");
        // MQTT-4.4.0-1 (5.0) / §4.4 (3.1.1): resent with the original packet identifiers and
        // DUP = 1 (MQTT-3.3.1-1), in the original order (MQTT-4.6.0-1).
        let again = expect_publish(&mut sub).await;
        assert_eq!(
            (again.qos, again.dup, again.topic.as_str(), text(&again)),
            (first.qos, true, first.topic.as_str(), "one".to_owned()),
            "{t}: QoS 1 resend"
        );
        let again2 = expect_publish(&mut sub).await;
        assert_eq!(
            (again2.qos, again2.dup, again2.topic.as_str(), text(&again2)),
            (second.qos, true, second.topic.as_str(), "two".to_owned()),
            "{t}: QoS 2 resend"
        );
        // Published while the subscriber was away: after the resent ones (§4.6: an Ordered Topic).
        let third = expect_publish(&mut sub).await;
        assert_eq!(text(&third), "three", "{t}");
        sub.send(&puback(packet_id(&again))).await;
        sub.send(&puback(packet_id(&third))).await;
        let id2 = packet_id(&again2);
        sub.send(&pubrec(id2)).await;
        assert!(matches!(sub.recv().await, Packet::PubRel(r) if r.packet_id == pid(id2)));
        sub.send(&pubcomp(id2)).await;
        assert_silent(&mut sub, &format!("{t}: after all were acknowledged")).await;
    }
}

#[tokio::test]
async fn qos2_pubrel_is_resent_after_reconnect_when_the_subscriber_had_sent_pubrec() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let id = format!("pubrel-{t}");
        let (mut sub, _) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        subscribe_ok(&mut sub, &format!("rel/{t}"), opts(QoS::ExactlyOnce)).await;
        let mut publ = connected(addr, protocol, &format!("pubrel-pub-{t}"), &sol).await;
        publ.send(&Packet::Publish(publish(
            &format!("rel/{t}"),
            b"x",
            qos2(7),
        )))
        .await;
        assert!(matches!(publ.recv().await, Packet::PubRec(r) if r.packet_id == pid(7)));

        let p = expect_publish(&mut sub).await;
        let n = packet_id(&p);
        sub.send(&pubrec(n)).await;
        assert!(
            matches!(sub.recv().await, Packet::PubRel(r) if r.packet_id == pid(n)),
            "{t}: PUBREL"
        );
        // No PUBCOMP.
        drop(sub);

        let (mut sub, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(ack.session_present, "{t}");
        // MQTT-4.4.0-1: the PUBREL is resent, not the PUBLISH.
        match sub.recv().await {
            Packet::PubRel(r) => assert_eq!((r.packet_id, r.reason), (pid(n), 0), "{t}"),
            other => panic!("{t}: expected the PUBREL {n} again, got {other:?}"),
        }
        sub.send(&pubcomp(n)).await;
        assert_silent(&mut sub, &format!("{t}: after PUBCOMP")).await;
    }
}

#[tokio::test]
async fn a_duplicate_incoming_qos2_publish_before_pubrel_is_delivered_once() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let topic = format!("once/{t}");
        let mut sub = connected(addr, protocol, &format!("once-sub-{t}"), &sol).await;
        subscribe_ok(&mut sub, &topic, opts(QoS::AtMostOnce)).await;

        let id = format!("once-pub-{t}");
        let (mut publ, _) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        let mut first = publish(&topic, b"first", qos2(9));
        publ.send(&Packet::Publish(first.clone())).await;
        assert!(
            matches!(publ.recv().await, Packet::PubRec(r) if r.packet_id == pid(9) && r.reason == 0)
        );
        // The same packet again, as after a lost PUBREC, on the same connection…
        first.dup = true;
        publ.send(&Packet::Publish(first.clone())).await;
        assert!(
            matches!(publ.recv().await, Packet::PubRec(r) if r.packet_id == pid(9) && r.reason == 0)
        );
        // …and after a reconnect to the same session (MQTT §4.3.3: the receiver must not
        // deliver it again until it has received the PUBREL).
        drop(publ);
        let (mut publ, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(ack.session_present, "{t}");
        publ.send(&Packet::Publish(first)).await;
        assert!(
            matches!(publ.recv().await, Packet::PubRec(r) if r.packet_id == pid(9) && r.reason == 0)
        );
        publ.send(&pubrel(9)).await;
        assert!(
            matches!(publ.recv().await, Packet::PubComp(c) if c.packet_id == pid(9) && c.reason == 0)
        );
        // After PUBCOMP the identifier is free: the same identifier is a new message.
        publ.send(&Packet::Publish(publish(&topic, b"second", qos2(9))))
            .await;
        assert!(matches!(publ.recv().await, Packet::PubRec(r) if r.packet_id == pid(9)));
        publ.send(&pubrel(9)).await;
        assert!(matches!(publ.recv().await, Packet::PubComp(c) if c.packet_id == pid(9)));

        let got = [
            text(&expect_publish(&mut sub).await),
            text(&expect_publish(&mut sub).await),
        ];
        assert_eq!(got, ["first", "second"], "{t}: exactly once each, in order");
    }
}

#[tokio::test]
async fn a_pubrel_for_an_unknown_packet_id_is_still_answered_with_pubcomp() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let mut client = connected(addr, protocol, &format!("stray-{}", tag(protocol)), &sol).await;
        client.send(&pubrel(77)).await;
        match client.recv().await {
            Packet::PubComp(c) => {
                let want = if protocol == Protocol::V5 { 0x92 } else { 0 };
                assert_eq!(
                    (c.packet_id, c.reason),
                    (pid(77), want),
                    "0x92: packet identifier not found"
                );
            }
            other => panic!("expected PUBCOMP 77, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_empty_client_id_is_assigned_on_v5_and_refused_on_v3_with_a_persistent_session() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let (_c, ack) = connect_ok(addr, login(Protocol::V5, "", &sol)).await;
    let assigned = ack
        .properties
        .assigned_client_identifier
        .expect("§3.2.2.3.7");
    assert!(!assigned.is_empty());
    let (_c, ack) = connect_ok(addr, login(Protocol::V311, "", &sol)).await;
    assert!(!ack.session_present);
    let (mut c, ack) = RawClient::connect(addr, persistent(Protocol::V311, "", &sol, 0)).await;
    assert_eq!(ack.code, 0x02, "MQTT-3.1.3-8: identifier rejected");
    assert!(expect_closed(&mut c, NET_TIMEOUT).await.is_empty());
}

// --- persistent sessions -----------------------------------------------------------------------

#[tokio::test]
async fn a_persistent_session_receives_the_qos1_messages_queued_while_offline_in_order() {
    const N: u16 = 20;
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let id = format!("queue-{t}");
        let (mut sub, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(!ack.session_present);
        subscribe_ok(&mut sub, &format!("queue/{t}/#"), opts(QoS::AtLeastOnce)).await;
        disconnect(sub).await;

        let mut publ = connected(addr, protocol, &format!("queue-pub-{t}"), &sol).await;
        for i in 0..N {
            let reason = publish_qos1(
                &mut publ,
                &format!("queue/{t}/m"),
                format!("m{i}").as_bytes(),
                i + 1,
            )
            .await;
            assert_eq!(reason, 0);
        }

        let (mut sub, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(ack.session_present, "{t}: the session must be resumed");
        let mut got = Vec::new();
        for _ in 0..N {
            let p = expect_publish(&mut sub).await;
            assert!(matches!(p.qos, QosPid::AtLeastOnce(_)), "{t}: {p:?}");
            assert!(!p.dup, "{t}: first delivery, not a resend: {p:?}");
            sub.send(&puback(packet_id(&p))).await;
            got.push(text(&p));
        }
        let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
        assert_eq!(got, want, "{t}");
        assert_silent(&mut sub, &format!("{t}: after the queue")).await;
    }
}

#[tokio::test]
async fn qos0_messages_are_not_queued_for_an_offline_session() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let id = format!("q0-{t}");
        let (mut sub, _) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        subscribe_ok(&mut sub, &format!("q0/{t}"), opts(QoS::AtLeastOnce)).await;
        disconnect(sub).await;

        let mut publ = connected(addr, protocol, &format!("q0-pub-{t}"), &sol).await;
        publish_qos0(&mut publ, &format!("q0/{t}"), b"qos 0").await;
        assert_eq!(
            publish_qos1(&mut publ, &format!("q0/{t}"), b"qos 1", 1).await,
            0
        );

        let (mut sub, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(ack.session_present);
        let p = expect_publish(&mut sub).await;
        assert_eq!(
            text(&p),
            "qos 1",
            "{t}: the QoS 0 message must not have been kept"
        );
        sub.send(&puback(packet_id(&p))).await;
        assert_silent(&mut sub, t).await;
    }
}

#[tokio::test]
async fn clean_start_discards_the_session_with_its_queue_and_subscriptions() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let id = format!("clean-{t}");
        let (mut sub, _) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        subscribe_ok(&mut sub, &format!("clean/{t}"), opts(QoS::AtLeastOnce)).await;
        disconnect(sub).await;
        let mut publ = connected(addr, protocol, &format!("clean-pub-{t}"), &sol).await;
        assert_eq!(
            publish_qos1(&mut publ, &format!("clean/{t}"), b"queued", 1).await,
            0
        );

        let (mut sub, ack) = connect_ok(addr, login(protocol, &id, &sol)).await;
        assert!(
            !ack.session_present,
            "{t}: clean start must not resume the session"
        );
        assert_eq!(
            publish_qos1(&mut publ, &format!("clean/{t}"), b"after", 2).await,
            0
        );
        // Neither the queued message nor the new one: the subscription went with the session.
        assert_silent(&mut sub, &format!("{t}: after clean start")).await;
    }
}

#[tokio::test]
async fn a_v5_session_is_gone_once_its_expiry_interval_has_passed() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let (mut sub, ack) = connect_ok(addr, persistent(Protocol::V5, "expiring", &sol, 1)).await;
    assert!(!ack.session_present);
    subscribe_ok(&mut sub, "expiry/x", opts(QoS::AtLeastOnce)).await;
    disconnect(sub).await;
    // Within the interval the session is there.
    let (sub, ack) = connect_ok(addr, persistent(Protocol::V5, "expiring", &sol, 1)).await;
    assert!(ack.session_present, "reconnected within the 1 s expiry");
    disconnect(sub).await;
    let offline_since = Instant::now();

    let mut publ = connected(addr, Protocol::V5, "expiry-pub", &sol).await;
    assert_eq!(publish_qos1(&mut publ, "expiry/x", b"queued", 1).await, 0);
    // The interval (1 s) passes; no signal exists for an expiry, so the test waits it out.
    tokio::time::sleep_until((offline_since + Duration::from_secs(2)).into()).await;

    let (mut sub, ack) = connect_ok(addr, persistent(Protocol::V5, "expiring", &sol, 1)).await;
    assert!(
        !ack.session_present,
        "§3.1.2.11.2: the session must have ended 1 s after the connection closed"
    );
    assert_silent(&mut sub, "the expired session's queue").await;
}

#[tokio::test]
async fn a_v5_session_without_an_expiry_interval_ends_with_its_connection() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut connect = login(Protocol::V5, "no-expiry", &sol);
    connect.clean_start = false;
    let (mut client, _) = connect_ok(addr, connect.clone()).await;
    subscribe_ok(&mut client, "noexp/x", opts(QoS::AtLeastOnce)).await;
    disconnect(client).await;
    // §3.1.2.11.2: an absent Session Expiry Interval is 0, even with Clean Start 0.
    let (mut client, ack) = connect_ok(addr, connect).await;
    assert!(
        !ack.session_present,
        "MQTT-3.1.2-23 does not apply: the session ended"
    );
    let mut publ = connected(addr, Protocol::V5, "noexp-pub", &sol).await;
    assert_eq!(
        publish_qos1(&mut publ, "noexp/x", b"for nobody", 1).await,
        0
    );
    assert_silent(&mut client, "the subscription went with the session").await;
}

#[tokio::test]
async fn a_v5_disconnect_may_not_give_a_session_expiry_to_a_session_that_had_none() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut connect = login(Protocol::V5, "late-expiry", &sol);
    connect.clean_start = false;
    let (mut client, _) = connect_ok(addr, connect.clone()).await;
    subscribe_ok(&mut client, "late/x", opts(QoS::AtLeastOnce)).await;
    client
        .send(&Packet::Disconnect(Disconnect {
            reason: 0,
            properties: Properties {
                session_expiry_interval: Some(300),
                ..Properties::default()
            },
        }))
        .await;
    let last = expect_closed(&mut client, NET_TIMEOUT).await;
    assert!(
        matches!(last.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x82),
        "§3.14.2.2.2: a protocol error (0x82), got {last:?}"
    );
    let (_client, ack) = connect_ok(addr, connect).await;
    assert!(!ack.session_present, "the session had expiry 0 and ended");
}

#[tokio::test]
async fn a_v5_disconnect_with_session_expiry_zero_ends_a_persistent_session() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let (mut client, _) =
        connect_ok(addr, persistent(Protocol::V5, "short-lived", &sol, 300)).await;
    subscribe_ok(&mut client, "short/x", opts(QoS::AtLeastOnce)).await;
    client
        .send(&Packet::Disconnect(Disconnect {
            reason: 0,
            properties: Properties {
                session_expiry_interval: Some(0),
                ..Properties::default()
            },
        }))
        .await;
    assert!(expect_closed(&mut client, NET_TIMEOUT).await.is_empty());
    let mut publ = connected(addr, Protocol::V5, "short-pub", &sol).await;
    assert_eq!(
        publish_qos1(&mut publ, "short/x", b"for nobody", 1).await,
        0
    );
    let (mut client, ack) =
        connect_ok(addr, persistent(Protocol::V5, "short-lived", &sol, 300)).await;
    assert!(
        !ack.session_present,
        "§3.14.2.2.2: the DISCONNECT set the expiry to 0"
    );
    assert_silent(&mut client, "the ended session").await;
}

#[tokio::test]
async fn the_server_keeps_no_more_deliveries_in_flight_than_the_clients_receive_maximum() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut connect = login(Protocol::V5, "slow", &sol);
    connect.properties.receive_maximum = std::num::NonZeroU16::new(2);
    let (mut slow, _) = connect_ok(addr, connect).await;
    subscribe_ok(&mut slow, "window/#", opts(QoS::AtLeastOnce)).await;
    let mut publ = connected(addr, Protocol::V5, "window-pub", &sol).await;
    for i in 0..5u16 {
        assert_eq!(
            publish_qos1(&mut publ, "window/m", format!("m{i}").as_bytes(), i + 1).await,
            0
        );
    }
    // MQTT-3.3.4-9: at most Receive Maximum (2) unacknowledged QoS 1 PUBLISH packets.
    let a = expect_publish(&mut slow).await;
    let b = expect_publish(&mut slow).await;
    assert_eq!((text(&a).as_str(), text(&b).as_str()), ("m0", "m1"));
    assert_silent(&mut slow, "a third PUBLISH before any PUBACK").await;
    slow.send(&puback(packet_id(&a))).await;
    let c = expect_publish(&mut slow).await;
    assert_eq!(text(&c), "m2", "one acknowledged, one more sent");
    assert_silent(&mut slow, "the window is full again").await;
    for p in [b, c] {
        slow.send(&puback(packet_id(&p))).await;
    }
    let rest = [
        text(&expect_publish(&mut slow).await),
        text(&expect_publish(&mut slow).await),
    ];
    assert_eq!(rest, ["m3", "m4"]);
}

// --- wills ------------------------------------------------------------------------------------

/// A subscriber to `wills/#` at QoS 1.
async fn will_watcher(addr: SocketAddr, sol: &Solution, protocol: Protocol) -> RawClient {
    let mut watcher = connected(addr, protocol, &format!("watcher-{}", tag(protocol)), sol).await;
    subscribe_ok(&mut watcher, "wills/#", opts(QoS::AtLeastOnce)).await;
    watcher
}

/// A connection with a will on `wills/<name>` (payload `gone <name>`, QoS 1).
fn with_will(protocol: Protocol, name: &str, sol: &Solution) -> broker::mqtt::codec::Connect {
    let mut connect = login(protocol, name, sol);
    connect.will = Some(will(
        &format!("wills/{name}"),
        format!("gone {name}").as_bytes(),
        QoS::AtLeastOnce,
    ));
    connect
}

async fn expect_will(watcher: &mut RawClient, name: &str) {
    let p = expect_publish(watcher).await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        (
            format!("wills/{name}").as_str(),
            format!("gone {name}").as_str()
        )
    );
    assert!(matches!(p.qos, QosPid::AtLeastOnce(_)), "{p:?}");
    watcher.send(&puback(packet_id(&p))).await;
}

#[tokio::test]
async fn the_will_is_published_when_a_client_drops_its_connection() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let mut watcher = will_watcher(addr, &sol, protocol).await;
        let name = format!("dropper-{}", tag(protocol));
        let (client, _) = connect_ok(addr, with_will(protocol, &name, &sol)).await;
        drop(client);
        expect_will(&mut watcher, &name).await;
    }
}

#[tokio::test]
async fn the_will_is_not_published_after_a_normal_disconnect() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let mut watcher = will_watcher(addr, &sol, protocol).await;
        let name = format!("polite-{}", tag(protocol));
        let (client, _) = connect_ok(addr, with_will(protocol, &name, &sol)).await;
        disconnect(client).await;
        assert_silent(
            &mut watcher,
            &format!("{name}: MQTT-3.1.2-10 / MQTT-3.14.4-3"),
        )
        .await;
    }
}

#[tokio::test]
async fn a_v5_disconnect_with_reason_0x04_publishes_the_will() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = will_watcher(addr, &sol, Protocol::V5).await;
    let (mut client, _) = connect_ok(addr, with_will(Protocol::V5, "leaver", &sol)).await;
    client
        .send(&Packet::Disconnect(Disconnect {
            reason: 0x04,
            properties: Properties::default(),
        }))
        .await;
    assert!(expect_closed(&mut client, NET_TIMEOUT).await.is_empty());
    expect_will(&mut watcher, "leaver").await;
}

/// A 5.0 connection with a session expiry of 60 s and a will delayed by `delay` seconds.
fn with_delayed_will(name: &str, sol: &Solution, delay: u32) -> broker::mqtt::codec::Connect {
    let mut connect = with_will(Protocol::V5, name, sol);
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    if let Some(w) = &mut connect.will {
        w.properties.will_delay_interval = Some(delay);
    }
    connect
}

#[tokio::test]
async fn a_v5_delayed_will_is_published_after_the_delay_when_the_client_does_not_return() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = will_watcher(addr, &sol, Protocol::V5).await;
    let (client, _) = connect_ok(addr, with_delayed_will("late", &sol, 1)).await;
    drop(client);
    let dropped = Instant::now();
    match watcher.recv_within(Duration::from_millis(800)).await {
        Received::Silent => {}
        other => panic!("§3.1.3.2.2: nothing before the 1 s will delay, got {other:?}"),
    }
    expect_will(&mut watcher, "late").await;
    let after = dropped.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_millis(3500),
        "the will came {after:?} after the drop, the delay is 1 s"
    );
}

#[tokio::test]
async fn a_v5_delayed_will_is_not_published_when_the_client_reconnects_within_the_delay() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = will_watcher(addr, &sol, Protocol::V5).await;
    let (client, _) = connect_ok(addr, with_delayed_will("back", &sol, 1)).await;
    drop(client);
    // Let the server notice the drop: a CONNECT before that would be a takeover (see
    // `a_takeover_within_the_v5_will_delay_does_not_publish_the_will`).
    settle().await;
    let mut again = persistent(Protocol::V5, "back", &sol, 60);
    again.clean_start = false;
    let (_back, ack) = connect_ok(addr, again).await;
    assert!(ack.session_present);
    // MQTT 5 §3.1.3.2.2: reconnecting before the delay passed suppresses the will. Wait past
    // the delay with margin.
    match watcher.recv_within(Duration::from_millis(2000)).await {
        Received::Silent => {}
        other => panic!("the client came back within the will delay, yet: {other:?}"),
    }
}

#[tokio::test]
async fn a_retained_will_becomes_the_retained_message_of_its_topic() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut connect = with_will(Protocol::V311, "keeper", &sol);
    if let Some(w) = &mut connect.will {
        w.retain = true;
    }
    let (client, _) = connect_ok(addr, connect).await;
    let mut watcher = will_watcher(addr, &sol, Protocol::V311).await;
    drop(client);
    expect_will(&mut watcher, "keeper").await;
    let mut late = connected(addr, Protocol::V5, "late", &sol).await;
    subscribe_ok(&mut late, "wills/keeper", opts(QoS::AtLeastOnce)).await;
    let p = expect_publish(&mut late).await;
    assert_eq!(
        (text(&p).as_str(), p.retain),
        ("gone keeper", true),
        "MQTT-3.1.2-17"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_retained_messages_survive_kill_9_and_restart() {
    let (mut broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut publisher = connected(addr, Protocol::V5, "keeper", &sol).await;
    let retained = |topic: &str, payload: &[u8], n: u16| {
        let mut p = publish(topic, payload, qos1(n));
        p.retain = true;
        p
    };
    let mut with_properties = retained("keep/b", b"two", 2);
    with_properties.properties.content_type = Some(e2e::raw::utf8("text/plain"));
    with_properties.properties.user_properties =
        vec![(e2e::raw::utf8("unit"), e2e::raw::utf8("Cel"))];
    let mut expiring = retained("keep/c", b"three", 4);
    expiring.properties.message_expiry_interval = Some(1);
    for (n, packet) in [
        (1, retained("keep/a", b"one", 1)),
        (2, with_properties),
        // Clearing: an empty retained payload.
        (3, retained("keep/a", b"", 3)),
        (4, expiring),
        (5, retained("keep/d", b"four", 5)),
        (6, retained("keep/d", b"five", 6)),
    ] {
        publisher.send(&Packet::Publish(packet)).await;
        assert_eq!(expect_puback(&mut publisher, n).await, 0);
    }
    // At once after the last PUBACK.
    broker.kill();
    drop(publisher);
    broker.start();
    // Past keep/c's expiry.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut late = connected(broker.mqtt_addr(), Protocol::V5, "late", &sol).await;
    subscribe_ok(&mut late, "keep/#", opts(QoS::AtLeastOnce)).await;
    let mut got = Vec::new();
    while let Received::Packet(Packet::Publish(p)) = late.recv_within(QUIET).await {
        got.push((
            p.topic.as_str().to_owned(),
            text(&p),
            p.retain,
            p.properties
                .content_type
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            p.properties.user_properties.len(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        [
            (
                "keep/b".to_owned(),
                "two".to_owned(),
                true,
                Some("text/plain".to_owned()),
                1
            ),
            ("keep/d".to_owned(), "five".to_owned(), true, None, 0),
        ],
        "after kill -9: keep/a cleared, keep/b with its properties, keep/c expired, keep/d replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_with_its_queued_messages_survives_kill_9_and_restart() {
    let (mut broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let name = format!("durable-{}", tag(protocol));
        let (mut client, ack) = connect_ok(addr, persistent(protocol, &name, &sol, 600)).await;
        assert!(!ack.session_present);
        subscribe_ok(&mut client, &format!("{name}/#"), opts(QoS::AtLeastOnce)).await;
        if protocol == Protocol::V5 {
            // A second subscription, then one taken back: only the first must come back.
            subscribe_ok(&mut client, "gone/#", opts(QoS::AtMostOnce)).await;
            client
                .send(&Packet::Unsubscribe(codec::Unsubscribe {
                    packet_id: pid(9),
                    filters: vec![e2e::protocol_support::filter("gone/#")],
                    properties: Properties::default(),
                }))
                .await;
            assert!(matches!(client.recv().await, Packet::UnsubAck(_)));
        }
        disconnect(client).await;
    }
    // A session whose 2 s expiry runs out while the server is down is gone after the restart.
    let (client, _) = connect_ok(addr, persistent(Protocol::V5, "short", &sol, 2)).await;
    disconnect(client).await;
    settle().await;
    // Messages queued for the offline sessions, each acknowledged to its publisher: then
    // kill -9 at once.
    let mut early = connected(addr, Protocol::V5, "early", &sol).await;
    let mut n = 0;
    for protocol in BOTH {
        let name = format!("durable-{}", tag(protocol));
        for k in 1..=3 {
            n += 1;
            let payload = format!("before {k}");
            assert_eq!(
                publish_qos1(&mut early, &format!("{name}/t"), payload.as_bytes(), n).await,
                0
            );
        }
    }
    broker.kill();
    drop(early);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    broker.start();
    let addr = broker.mqtt_addr();
    let mut publisher = connected(addr, Protocol::V5, "publisher", &sol).await;
    for protocol in BOTH {
        let name = format!("durable-{}", tag(protocol));
        // Published while the session is offline: queued for it.
        assert_eq!(
            publish_qos1(&mut publisher, &format!("{name}/t"), b"after restart", 1).await,
            0
        );
        let (mut client, ack) = connect_ok(addr, persistent(protocol, &name, &sol, 600)).await;
        assert!(ack.session_present, "{name}: the session came back");
        // What was queued before the kill, in order, then what came after the restart.
        for expected in ["before 1", "before 2", "before 3", "after restart"] {
            let p = expect_publish(&mut client).await;
            assert_eq!(
                (p.topic.as_str(), text(&p).as_str()),
                (format!("{name}/t").as_str(), expected)
            );
            if let QosPid::AtLeastOnce(id) = p.qos {
                client
                    .send(&Packet::PubAck(codec::PubResponse {
                        packet_id: id,
                        reason: 0,
                        properties: Properties::default(),
                    }))
                    .await;
            }
        }
        // The acknowledgements are processed (PINGRESP comes after them) before the client
        // leaves: otherwise the next connection would rightly get them again with DUP.
        client.ping().await;
        disconnect(client).await;
    }
    let (mut v5, _) = connect_ok(addr, persistent(Protocol::V5, "durable-v5", &sol, 600)).await;
    publish_qos0(&mut publisher, "gone/x", b"not for the taken-back filter").await;
    assert_silent(&mut v5, "an unsubscribed filter came back").await;
    let (_short, ack) = connect_ok(addr, persistent(Protocol::V5, "short", &sol, 2)).await;
    assert!(!ack.session_present, "the expired session is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_events_and_live_messages_queued_for_an_offline_session_survive_kill_9() {
    let (mut broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let (mut watcher, _) = connect_ok(addr, persistent(Protocol::V5, "watcher", &sol, 600)).await;
    subscribe_ok(
        &mut watcher,
        "org.acme/+/things/twin/events/#",
        opts(QoS::AtLeastOnce),
    )
    .await;
    subscribe_ok(
        &mut watcher,
        "org.acme/+/things/live/messages/#",
        opts(QoS::AtLeastOnce),
    )
    .await;
    disconnect(watcher).await;
    // While the watcher is offline: a thing created and changed, and a live message with its
    // properties, each acknowledged; then kill -9 at once.
    let mut device = connected(addr, Protocol::V5, "device", &sol).await;
    let create = "org.acme/lamp/things/twin/commands/create";
    assert_eq!(publish_qos1(&mut device, create, b"{}", 1).await, 0);
    let modify = "org.acme/lamp/things/twin/commands/modify/attributes/on";
    assert_eq!(publish_qos1(&mut device, modify, b"true", 2).await, 0);
    let live = "org.acme/lamp/things/live/messages/switch";
    let mut message = publish(live, br#"{"on":false}"#, qos1(3));
    message.properties.correlation_data = Some(bytes::Bytes::from_static(b"\x00c-1"));
    message.properties.response_topic = Some(e2e::protocol_support::topic("app/replies"));
    message.properties.user_properties = vec![(e2e::raw::utf8("trace"), e2e::raw::utf8("t-1"))];
    device.send(&Packet::Publish(message)).await;
    assert_eq!(expect_puback(&mut device, 3).await, 0);
    broker.kill();
    drop(device);
    broker.start();
    let (mut watcher, ack) = connect_ok(
        broker.mqtt_addr(),
        persistent(Protocol::V5, "watcher", &sol, 600),
    )
    .await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = expect_publish(&mut watcher).await;
        got.push(p.topic.as_str().to_owned());
        if p.topic.as_str() == live {
            assert_eq!(text(&p), r#"{"on":false}"#);
            assert_eq!(
                p.properties.correlation_data.as_deref(),
                Some(&b"\x00c-1"[..])
            );
            assert_eq!(
                p.properties.response_topic.as_ref().map(|t| t.as_str()),
                Some("app/replies")
            );
            assert_eq!(p.properties.user_properties.len(), 1);
        }
        if let QosPid::AtLeastOnce(id) = p.qos {
            watcher.send(&puback(id.get())).await;
        }
    }
    assert_eq!(
        got,
        [
            "org.acme/lamp/things/twin/events/created",
            "org.acme/lamp/things/twin/events/created/attributes/on",
            live
        ],
        "what was queued for the offline session before kill -9, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_session_and_subscription_survive_kill_9_at_once() {
    let (mut broker, sol) = started("");
    // Without waiting for the journal, the session or the subscription was lost within a
    // few rounds.
    for round in 0..5 {
        let name = format!("quick-{round}");
        // CONNACK, then kill -9 at once: the session is there after the restart.
        let (client, ack) = connect_ok(
            broker.mqtt_addr(),
            persistent(Protocol::V5, &name, &sol, 600),
        )
        .await;
        assert!(!ack.session_present);
        broker.kill();
        drop(client);
        broker.start();
        let (mut client, ack) = connect_ok(
            broker.mqtt_addr(),
            persistent(Protocol::V5, &name, &sol, 600),
        )
        .await;
        assert!(
            ack.session_present,
            "round {round}: the acknowledged session is gone"
        );
        // SUBACK, then kill -9 at once: the subscription is there after the restart.
        subscribe_ok(&mut client, &format!("{name}/#"), opts(QoS::AtLeastOnce)).await;
        broker.kill();
        drop(client);
        broker.start();
        let addr = broker.mqtt_addr();
        let (mut client, ack) = connect_ok(addr, persistent(Protocol::V5, &name, &sol, 600)).await;
        assert!(ack.session_present);
        let mut publisher = connected(addr, Protocol::V5, "publisher", &sol).await;
        assert_eq!(
            publish_qos1(&mut publisher, &format!("{name}/t"), b"hello", 1).await,
            0
        );
        let p = expect_publish(&mut client).await;
        assert_eq!(
            text(&p),
            "hello",
            "round {round}: the acknowledged subscription is gone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_deliveries_come_again_after_kill_9_with_dup_and_their_packet_ids() {
    let (mut broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let (mut sub, _) = connect_ok(addr, persistent(Protocol::V5, "inflight", &sol, 600)).await;
    subscribe_ok(&mut sub, "inf/#", opts(QoS::AtLeastOnce)).await;
    let mut publisher = connected(addr, Protocol::V5, "pub", &sol).await;
    for (n, payload) in [(1, "m1"), (2, "m2")] {
        assert_eq!(
            publish_qos1(&mut publisher, "inf/t", payload.as_bytes(), n).await,
            0
        );
    }
    // Received, never acknowledged.
    let mut sent = Vec::new();
    for expected in ["m1", "m2"] {
        let p = expect_publish(&mut sub).await;
        assert_eq!(text(&p), expected);
        assert!(!p.dup);
        sent.push(p.qos);
    }
    // The packet identifiers are journaled without being awaited: give the group commit a
    // moment, then kill -9.
    settle().await;
    broker.kill();
    drop((sub, publisher));
    broker.start();
    let (mut sub, ack) = connect_ok(
        broker.mqtt_addr(),
        persistent(Protocol::V5, "inflight", &sol, 600),
    )
    .await;
    assert!(ack.session_present);
    for (expected, qos) in ["m1", "m2"].into_iter().zip(sent) {
        let p = expect_publish(&mut sub).await;
        assert_eq!(
            (text(&p).as_str(), p.dup, p.qos),
            (expected, true, qos),
            "MQTT-4.4.0-1: resent with DUP under its original packet identifier"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_resent_with_dup_after_kill_9_is_not_delivered_twice() {
    let (mut broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = connected(addr, Protocol::V5, "watcher", &sol).await;
    subscribe_ok(&mut watcher, "once/#", opts(QoS::AtLeastOnce)).await;
    let (mut sender, _) = connect_ok(addr, persistent(Protocol::V5, "sender", &sol, 600)).await;
    let mut first = publish("once/t", b"exactly once", qos2(5));
    sender.send(&Packet::Publish(first.clone())).await;
    match sender.recv().await {
        Packet::PubRec(rec) => assert_eq!((rec.packet_id, rec.reason), (pid(5), 0)),
        other => panic!("expected PUBREC 5, got {other:?}"),
    }
    assert_eq!(text(&expect_publish(&mut watcher).await), "exactly once");
    // The PUBREL never went out: kill -9 right after the PUBREC.
    broker.kill();
    drop((sender, watcher));
    broker.start();
    let addr = broker.mqtt_addr();
    let mut watcher = connected(addr, Protocol::V5, "watcher", &sol).await;
    subscribe_ok(&mut watcher, "once/#", opts(QoS::AtLeastOnce)).await;
    let (mut sender, ack) = connect_ok(addr, persistent(Protocol::V5, "sender", &sol, 600)).await;
    assert!(ack.session_present);
    // MQTT 4.3.3: the sender sends the PUBLISH again with DUP; the receiver knows it.
    first.dup = true;
    sender.send(&Packet::Publish(first)).await;
    match sender.recv().await {
        Packet::PubRec(rec) => assert_eq!((rec.packet_id, rec.reason), (pid(5), 0)),
        other => panic!("expected PUBREC 5 again, got {other:?}"),
    }
    sender.send(&pubrel(5)).await;
    match sender.recv().await {
        Packet::PubComp(comp) => assert_eq!((comp.packet_id, comp.reason), (pid(5), 0)),
        other => panic!("expected PUBCOMP 5, got {other:?}"),
    }
    assert_silent(
        &mut watcher,
        "the resent QoS 2 PUBLISH was delivered a second time",
    )
    .await;
}

#[tokio::test]
async fn a_session_takeover_publishes_the_will_of_the_replaced_connection() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let mut watcher = will_watcher(addr, &sol, protocol).await;
        let name = format!("replaced-{}", tag(protocol));
        let mut first = with_will(protocol, &name, &sol);
        first.clean_start = false;
        let (mut old, _) = connect_ok(addr, first).await;
        let (_new, ack) = connect_ok(addr, persistent(protocol, &name, &sol, 60)).await;
        assert!(ack.session_present);
        expect_closed(&mut old, NET_TIMEOUT).await;
        // 5.0 §3.1.4 step 3: "If the existing Client has a Will Message, that Will Message is
        // published as described in section 3.1.2.5" (no will delay here).
        expect_will(&mut watcher, &name).await;
    }
}

#[tokio::test]
async fn a_takeover_within_the_v5_will_delay_does_not_publish_the_will() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = will_watcher(addr, &sol, Protocol::V5).await;
    let (mut old, _) = connect_ok(addr, with_delayed_will("half-open", &sol, 1)).await;
    // The device's link broke without the server noticing; it reconnects to its session.
    let (_new, ack) = connect_ok(addr, persistent(Protocol::V5, "half-open", &sol, 60)).await;
    assert!(ack.session_present);
    let last_words = expect_closed(&mut old, NET_TIMEOUT).await;
    assert!(
        matches!(last_words.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x8E),
        "{last_words:?}"
    );
    let taken_over = Instant::now();
    // MQTT-3.1.2-8 / MQTT-3.1.3-9: a new Network Connection for the Client ID opened before the
    // Will Delay Interval has passed: the will must not be sent — neither at once nor later.
    match watcher.recv_within(Duration::from_millis(1800)).await {
        Received::Silent => {}
        other => panic!(
            "the session was taken over within its 1 s will delay, yet the will was sent \
             {:?} after the takeover: {other:?}",
            taken_over.elapsed()
        ),
    }
}

#[tokio::test]
async fn a_clean_start_reconnect_within_the_v5_will_delay_does_not_publish_the_will() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = will_watcher(addr, &sol, Protocol::V5).await;
    let (client, _) = connect_ok(addr, with_delayed_will("fresh-start", &sol, 1)).await;
    drop(client);
    let dropped = Instant::now();
    // Let the server notice the drop first (otherwise this is the takeover case).
    settle().await;
    let (_again, ack) = connect_ok(addr, login(Protocol::V5, "fresh-start", &sol)).await;
    assert!(!ack.session_present);
    // MQTT-3.1.2-8: "… unless … a new Network Connection for the ClientID is opened before the
    // Will Delay Interval has elapsed."
    match watcher.recv_within(Duration::from_millis(1800)).await {
        Received::Silent => {}
        other => panic!(
            "a new connection for the client ID came within the 1 s will delay, yet the will \
             was sent {:?} after the drop: {other:?}",
            dropped.elapsed()
        ),
    }
}

// --- keep-alive --------------------------------------------------------------------------------

async fn silent_client_is_closed(addr: SocketAddr, sol: &Solution, protocol: Protocol) {
    let mut connect = login(protocol, &format!("sleeper-{}", tag(protocol)), sol);
    connect.keep_alive = 1;
    let (mut client, _) = connect_ok(addr, connect).await;
    let since = Instant::now();
    let before_close = expect_closed(&mut client, Duration::from_secs(5)).await;
    let after = since.elapsed();
    assert!(
        after >= Duration::from_millis(1000) && after <= Duration::from_millis(3500),
        "{}: closed after {after:?}; keep-alive 1 s → 1.5 s (MQTT-3.1.2-24 / 3.1.2-22)",
        tag(protocol)
    );
    match protocol {
        Protocol::V311 => assert!(before_close.is_empty(), "{before_close:?}"),
        Protocol::V5 => assert!(
            matches!(before_close.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x8D),
            "5.0 expects DISCONNECT 0x8D (keep alive timeout) first, got {before_close:?}"
        ),
    }
}

#[tokio::test]
async fn a_silent_client_is_disconnected_after_one_and_a_half_keep_alive_intervals() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    tokio::join!(
        silent_client_is_closed(addr, &sol, Protocol::V311),
        silent_client_is_closed(addr, &sol, Protocol::V5),
    );
}

async fn pings_keep_alive(addr: SocketAddr, sol: &Solution, protocol: Protocol) {
    let mut connect = login(protocol, &format!("pinger-{}", tag(protocol)), sol);
    connect.keep_alive = 1;
    let (mut client, _) = connect_ok(addr, connect).await;
    let since = Instant::now();
    while since.elapsed() < Duration::from_millis(2600) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.ping().await;
    }
}

#[tokio::test]
async fn pingreq_keeps_a_connection_alive_past_its_keep_alive() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    tokio::join!(
        pings_keep_alive(addr, &sol, Protocol::V311),
        pings_keep_alive(addr, &sol, Protocol::V5),
    );
}

// --- takeover ----------------------------------------------------------------------------------

#[tokio::test]
async fn a_second_connect_with_the_same_client_id_takes_the_session_over() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let id = format!("twin-{t}");
        let (mut first, _) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        subscribe_ok(&mut first, &format!("takeover/{t}"), opts(QoS::AtLeastOnce)).await;

        let (mut second, ack) = connect_ok(addr, persistent(protocol, &id, &sol, 300)).await;
        assert!(
            ack.session_present,
            "{t}: clean start 0 resumes the session"
        );
        let last_words = expect_closed(&mut first, NET_TIMEOUT).await;
        match protocol {
            Protocol::V311 => assert!(last_words.is_empty(), "{last_words:?}"),
            Protocol::V5 => assert!(
                matches!(last_words.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x8E),
                "5.0: DISCONNECT 0x8E (session taken over) expected, got {last_words:?}"
            ),
        }
        let mut publ = connected(addr, protocol, &format!("takeover-pub-{t}"), &sol).await;
        assert_eq!(
            publish_qos1(&mut publ, &format!("takeover/{t}"), b"to the new one", 1).await,
            0
        );
        let p = expect_publish(&mut second).await;
        assert_eq!(text(&p), "to the new one", "{t}");
        second.send(&puback(packet_id(&p))).await;
    }
}

// --- maximum packet size -----------------------------------------------------------------------

const SMALL_PACKETS: &str = "[mqtt]\nmax_packet_size = 1024\n";

#[tokio::test]
async fn the_v5_connack_announces_the_configured_maximum_packet_size() {
    let (broker, sol) = started(SMALL_PACKETS);
    let (_client, ack) =
        connect_ok(broker.mqtt_addr(), login(Protocol::V5, "announce", &sol)).await;
    assert_eq!(
        ack.properties.maximum_packet_size.map(|n| n.get()),
        Some(1024)
    );
}

#[tokio::test]
async fn a_publish_over_the_maximum_packet_size_closes_that_connection_only() {
    let (broker, sol) = started(SMALL_PACKETS);
    let addr = broker.mqtt_addr();
    let mut watcher = connected(addr, Protocol::V5, "big-watcher", &sol).await;
    subscribe_ok(&mut watcher, "big/#", opts(QoS::AtMostOnce)).await;

    for protocol in BOTH {
        let mut big = connected(addr, protocol, &format!("big-{}", tag(protocol)), &sol).await;
        big.send(&Packet::Publish(publish(
            "big/x",
            &[b'x'; 2048],
            QosPid::AtMostOnce,
        )))
        .await;
        let last_words = expect_closed(&mut big, NET_TIMEOUT).await;
        match protocol {
            Protocol::V311 => assert!(last_words.is_empty(), "{last_words:?}"),
            Protocol::V5 => assert!(
                matches!(last_words.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x95),
                "§3.2.2.3.6: DISCONNECT 0x95 (packet too large) expected, got {last_words:?}"
            ),
        }
    }
    // The others keep working: a fresh publisher reaches the watcher, whose first message it is.
    let mut fresh = connected(addr, Protocol::V311, "big-fresh", &sol).await;
    assert_eq!(publish_qos1(&mut fresh, "big/small", b"small", 1).await, 0);
    let p = expect_publish(&mut watcher).await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("big/small", "small")
    );
}

/// A PUBLISH on `topic_name` whose encoding for `protocol` is exactly `size` bytes.
fn publish_of_size(
    protocol: Protocol,
    topic_name: &str,
    qos: QosPid,
    size: usize,
) -> codec::Publish {
    let mut p = publish(topic_name, b"", qos);
    for _ in 0..4 {
        let mut out = BytesMut::new();
        let len = Packet::Publish(p.clone())
            .encode(protocol, &mut out)
            .unwrap();
        let payload = (p.payload.len() + size)
            .checked_sub(len)
            .expect("size too small");
        p.payload = bytes::Bytes::from(vec![b'p'; payload]);
    }
    let mut out = BytesMut::new();
    assert_eq!(
        Packet::Publish(p.clone())
            .encode(protocol, &mut out)
            .unwrap(),
        size
    );
    p
}

#[tokio::test]
async fn a_packet_of_exactly_the_maximum_packet_size_is_accepted() {
    let (broker, sol) = started(SMALL_PACKETS);
    let addr = broker.mqtt_addr();
    let mut watcher = connected(addr, Protocol::V311, "edge-watcher", &sol).await;
    subscribe_ok(&mut watcher, "edge/#", opts(QoS::AtMostOnce)).await;
    for protocol in BOTH {
        let t = tag(protocol);
        let mut client = connected(addr, protocol, &format!("edge-{t}"), &sol).await;
        let p = publish_of_size(protocol, &format!("edge/{t}"), qos1(1), 1024);
        client.send(&Packet::Publish(p)).await;
        // §3.2.2.3.6 / MQTT-3.1.2-24: the maximum is the total packet size, inclusive.
        assert_eq!(
            expect_puback(&mut client, 1).await,
            0,
            "{t}: a 1024-byte packet"
        );
        assert_eq!(
            expect_publish(&mut watcher).await.topic.as_str(),
            format!("edge/{t}")
        );
        let p = publish_of_size(protocol, &format!("edge/{t}"), qos1(2), 1025);
        client.send(&Packet::Publish(p)).await;
        let last = expect_closed(&mut client, NET_TIMEOUT).await;
        if protocol == Protocol::V5 {
            assert!(
                matches!(last.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x95),
                "{last:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_message_over_the_clients_maximum_packet_size_is_not_sent_to_it() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut connect = login(Protocol::V5, "tiny", &sol);
    connect.properties.maximum_packet_size = std::num::NonZeroU32::new(128);
    let (mut tiny, _) = connect_ok(addr, connect).await;
    subscribe_ok(&mut tiny, "sized/#", opts(QoS::AtLeastOnce)).await;
    let mut roomy = connected(addr, Protocol::V5, "roomy", &sol).await;
    subscribe_ok(&mut roomy, "sized/#", opts(QoS::AtLeastOnce)).await;

    let mut publ = connected(addr, Protocol::V5, "sizer", &sol).await;
    assert_eq!(
        publish_qos1(&mut publ, "sized/big", &[b'b'; 300], 1).await,
        0
    );
    // As the subscriber would receive them (QoS 1, no properties): 129 and 128 bytes.
    let over = publish_of_size(Protocol::V5, "sized/edge", qos1(1), 129);
    let exact = publish_of_size(Protocol::V5, "sized/edge", qos1(1), 128);
    assert_eq!(
        publish_qos1(&mut publ, "sized/edge", &over.payload, 2).await,
        0
    );
    assert_eq!(
        publish_qos1(&mut publ, "sized/edge", &exact.payload, 3).await,
        0
    );
    assert_eq!(publish_qos1(&mut publ, "sized/small", b"small", 4).await, 0);

    // MQTT-3.1.2-24/-25: not sent to the client whose maximum it exceeds; smaller ones are.
    let p = expect_publish(&mut tiny).await;
    assert_eq!(
        (p.topic.as_str(), p.payload.len()),
        ("sized/edge", exact.payload.len()),
        "the first message that fits in 128 bytes"
    );
    tiny.send(&puback(packet_id(&p))).await;
    let p = expect_publish(&mut tiny).await;
    assert_eq!(p.topic.as_str(), "sized/small", "{p:?}");
    tiny.send(&puback(packet_id(&p))).await;
    assert_silent(&mut tiny, "after the small message").await;
    for want in [300, over.payload.len(), exact.payload.len(), 5] {
        let p = expect_publish(&mut roomy).await;
        assert_eq!(p.payload.len(), want);
        roomy.send(&puback(packet_id(&p))).await;
    }
}

#[tokio::test]
async fn a_client_publish_carrying_a_subscription_identifier_is_a_protocol_error() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = connected(addr, Protocol::V5, "sid-watcher", &sol).await;
    subscribe_ok(&mut watcher, "sid/in", opts(QoS::AtMostOnce)).await;
    let mut client = connected(addr, Protocol::V5, "sid-sender", &sol).await;
    let mut p = publish("sid/in", b"with an id", qos1(1));
    p.properties.subscription_identifiers = vec![std::num::NonZeroU32::new(1).unwrap()];
    client.send(&Packet::Publish(p)).await;
    // MQTT-3.3.4-6: a client's PUBLISH must not contain one; §4.13.1: on a protocol error the
    // server closes the connection (DISCONNECT 0x82 first, if it says anything).
    match client.recv_within(Duration::from_secs(3)).await {
        Received::Closed => {}
        Received::Packet(Packet::Disconnect(d)) => {
            assert_eq!(d.reason, 0x82, "{d:?}");
            assert!(expect_closed(&mut client, NET_TIMEOUT).await.is_empty());
        }
        other => panic!(
            "the PUBLISH with a Subscription Identifier was accepted (got {other:?}); \
             the watcher then receives: {:?}",
            watcher.recv_within(QUIET).await
        ),
    }
    assert_silent(&mut watcher, "a refused PUBLISH").await;
}

// --- the other limits of `broker/src/limits.rs` ------------------------------------------------

const TIGHT_LIMITS: &str = "[mqtt]\nreceive_maximum = 2\nmax_queued_messages = 5\n\
                            max_session_expiry_seconds = 10\nmax_keep_alive_seconds = 5\n";

#[tokio::test]
async fn the_v5_connack_announces_lowered_session_expiry_keep_alive_and_receive_maximum() {
    let (broker, sol) = started(TIGHT_LIMITS);
    let mut connect = persistent(Protocol::V5, "greedy", &sol, 3600);
    connect.keep_alive = 0;
    let (_c, ack) = connect_ok(broker.mqtt_addr(), connect).await;
    let p = &ack.properties;
    assert_eq!(
        p.session_expiry_interval,
        Some(10),
        "§3.2.2.3.2: the session expiry the server uses: {p:?}"
    );
    assert_eq!(
        p.server_keep_alive,
        Some(5),
        "§3.2.2.3.14: Server Keep Alive: {p:?}"
    );
    assert_eq!(p.receive_maximum.map(|n| n.get()), Some(2), "{p:?}");
}

#[tokio::test]
async fn more_unreleased_qos2_messages_than_the_receive_maximum_get_disconnect_0x93() {
    let (broker, sol) = started(TIGHT_LIMITS);
    let mut client = connected(broker.mqtt_addr(), Protocol::V5, "flood", &sol).await;
    for n in 1..=2 {
        client
            .send(&Packet::Publish(publish("flood/x", b"q2", qos2(n))))
            .await;
        assert!(matches!(client.recv().await, Packet::PubRec(r) if r.packet_id == pid(n)));
    }
    client
        .send(&Packet::Publish(publish("flood/x", b"q2", qos2(3))))
        .await;
    let last = expect_closed(&mut client, NET_TIMEOUT).await;
    assert!(
        matches!(last.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x93),
        "§3.3.4: Receive Maximum exceeded → DISCONNECT 0x93, got {last:?}"
    );
}

#[tokio::test]
async fn an_offline_session_keeps_at_most_max_queued_messages_dropping_the_newest() {
    let (broker, sol) = started(TIGHT_LIMITS);
    let addr = broker.mqtt_addr();
    let (mut sub, _) = connect_ok(addr, persistent(Protocol::V311, "full", &sol, 0)).await;
    subscribe_ok(&mut sub, "full/#", opts(QoS::AtLeastOnce)).await;
    disconnect(sub).await;
    let mut publ = connected(addr, Protocol::V311, "full-pub", &sol).await;
    for i in 0..8u16 {
        assert_eq!(
            publish_qos1(&mut publ, "full/m", format!("m{i}").as_bytes(), i + 1).await,
            0
        );
    }
    let (mut sub, ack) = connect_ok(addr, persistent(Protocol::V311, "full", &sol, 0)).await;
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..5 {
        let p = expect_publish(&mut sub).await;
        sub.send(&puback(packet_id(&p))).await;
        got.push(text(&p));
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    assert_silent(&mut sub, "messages 6 to 8 were dropped").await;
}

// --- malformed input ---------------------------------------------------------------------------

/// A small xorshift generator: the malformed input is the same on every run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One fuzz connection.
#[derive(Debug, Clone)]
struct Case {
    index: usize,
    protocol: Protocol,
    /// Send a valid CONNECT (and read its CONNACK) before the bytes.
    after_connect: bool,
    bytes: Vec<u8>,
    /// A packet the specification says the server must refuse: the server has to close the
    /// connection by itself. Otherwise (random bytes, possibly incomplete or even valid) the
    /// client half-closes after sending and the server must close its side then.
    must_close: bool,
}

/// A fixed header with a remaining-length varint, then `body`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A PUBLISH body: topic bytes, optional packet identifier, (5.0: empty properties), payload.
fn publish_body(protocol: Protocol, topic_bytes: &[u8], packet_id: Option<u16>) -> Vec<u8> {
    let mut body = string(topic_bytes);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    if protocol == Protocol::V5 {
        body.push(0);
    }
    body.extend_from_slice(b"payload");
    body
}

/// A packet identifier, (5.0: empty properties), then `rest`.
fn with_id(protocol: Protocol, id: u16, rest: &[u8]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if protocol == Protocol::V5 {
        body.push(0);
    }
    body.extend_from_slice(rest);
    body
}

/// Packets a server must refuse after a valid CONNECT: malformed packets and protocol errors,
/// which it must answer by closing the connection (3.1.1 §4.8, 5.0 §4.13). Statement numbers
/// are 3.1.1's unless the case is 5.0 only.
fn bad_packet(protocol: Protocol, rng: &mut XorShift) -> Vec<u8> {
    let v5 = protocol == Protocol::V5;
    match rng.below(24) {
        // QoS 3 (MQTT-3.3.1-4).
        0 => frame(0x36, &publish_body(protocol, b"a/b", Some(1))),
        // A wildcard in a topic name (MQTT-3.3.2-2).
        1 => frame(0x30, &publish_body(protocol, b"a/+", None)),
        2 => frame(0x30, &publish_body(protocol, b"a/#", None)),
        // Ill-formed UTF-8 (MQTT-1.5.3-1) and U+0000 (MQTT-1.5.3-2) in a topic.
        3 => frame(0x30, &publish_body(protocol, &[b'a', 0xC3, 0x28], None)),
        4 => frame(0x30, &publish_body(protocol, b"a\0b", None)),
        // Packet identifier 0 (MQTT-2.3.1-1).
        5 => frame(0x32, &publish_body(protocol, b"a/b", Some(0))),
        // SUBSCRIBE with reserved flags other than 0010 (MQTT-3.8.1-1).
        6 => frame(
            0x80,
            &with_id(protocol, 1, &[&string(b"a")[..], &[0]].concat()),
        ),
        // SUBSCRIBE without any filter (MQTT-3.8.3-3).
        7 => frame(0x82, &with_id(protocol, 1, &[])),
        // Subscription QoS 3 (MQTT-3.8.3-4).
        8 => frame(
            0x82,
            &with_id(protocol, 1, &[&string(b"a")[..], &[3]].concat()),
        ),
        // UNSUBSCRIBE without any filter (MQTT-3.10.3-2).
        9 => frame(0xA2, &with_id(protocol, 1, &[])),
        // PUBREL with reserved flags other than 0010 (MQTT-3.6.1-1).
        10 => frame(0x60, &[0, 1]),
        // Reserved packet type 0.
        11 => vec![0x00, 0x00],
        // A second CONNECT (MQTT-3.1.0-2).
        12 => frame(0x10, &connect_body(if v5 { 5 } else { 4 }, 0x02, b"again")),
        // Packets only a server sends.
        13 => [
            vec![0x20, 0x02, 0x00, 0x00],
            vec![0xD0, 0x00],
            vec![0x90, 0x03, 0, 1, 0],
        ][rng.below(3)]
        .clone(),
        // A remaining length of five bytes (§1.5.5 / 2.2.3: at most four).
        14 => vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        // A remaining length far above the maximum packet size.
        15 => vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F],
        // A string longer than its packet.
        16 => frame(0x30, &[0x00, 0x40, b'a', b'b']),
        // AUTH in 3.1.1 (no such packet) / an AUTH the connection did not negotiate (5.0
        // §4.12: a protocol error without an Authentication Method in CONNECT).
        17 => frame(0xF0, if v5 { &[0x19, 0x00] } else { &[] }),
        // 5.0 only (3.1.1: QoS 3 instead).
        _ if !v5 => frame(0x36, &publish_body(protocol, b"a/b", Some(1))),
        // A Subscription Identifier from a client (MQTT-3.3.4-6).
        18 => frame(0x30, &[&string(b"a/b")[..], &[2, 0x0B, 1], b"x"].concat()),
        // Topic Alias 0 (MQTT-3.3.2-8).
        19 => frame(
            0x30,
            &[&string(b"a/b")[..], &[3, 0x23, 0, 0], b"x"].concat(),
        ),
        // Subscription Identifier 0 (§3.8.2.1.2).
        20 => frame(
            0x82,
            &[&[0, 1, 2, 0x0B, 0][..], &string(b"a"), &[0]].concat(),
        ),
        // Reserved subscription option bits (MQTT-3.8.3-5) and Retain Handling 3.
        21 => frame(
            0x82,
            &with_id(protocol, 1, &[&string(b"a")[..], &[0xC0]].concat()),
        ),
        22 => frame(
            0x82,
            &with_id(protocol, 1, &[&string(b"a")[..], &[0x30]].concat()),
        ),
        // No Local on a shared subscription (MQTT-3.8.3-4).
        _ => frame(
            0x82,
            &with_id(protocol, 1, &[&string(b"$share/g/a")[..], &[0x04]].concat()),
        ),
    }
}

/// A CONNECT body with protocol level `level` and connect flags `flags`, no credentials.
fn connect_body(level: u8, flags: u8, client_id: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.push(level);
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(&string(client_id));
    body
}

/// A 5.0 CONNECT body whose properties are `properties`.
fn connect_with_properties(properties: &[u8]) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[5, 0x02, 0, 60, properties.len() as u8]);
    body.extend_from_slice(properties);
    body.extend_from_slice(&string(b"x"));
    body
}

/// First packets a server must refuse (3.1.1: MQTT-3.1.0-1, 3.1.2-1…3, 3.1.2-11…15, 3.1.4-1).
fn bad_connect(protocol: Protocol, rng: &mut XorShift) -> Vec<u8> {
    let level = if protocol == Protocol::V5 { 5 } else { 4 };
    match rng.below(13) {
        // Not a CONNECT first.
        0 => frame(0x30, &publish_body(protocol, b"a/b", None)),
        1 => vec![0xC0, 0x00],
        // Another protocol name, an unknown level.
        2 => frame(0x10, &{
            let mut b = connect_body(level, 0x02, b"x");
            b[5] = b'X';
            b
        }),
        3 => frame(0x10, &connect_body(6, 0x02, b"x")),
        // The reserved connect flag set.
        4 => frame(0x10, &connect_body(level, 0x03, b"x")),
        // Will QoS 3; will QoS or retain without the will flag.
        5 => frame(0x10, &connect_body(level, 0x02 | 0x04 | 0x18, b"x")),
        6 => frame(0x10, &connect_body(level, 0x02 | 0x08, b"x")),
        7 => frame(0x10, &connect_body(level, 0x02 | 0x20, b"x")),
        // Reserved fixed-header flags of CONNECT.
        8 => frame(0x11, &connect_body(level, 0x02, b"x")),
        // An ill-formed UTF-8 client ID.
        9 => frame(0x10, &connect_body(level, 0x02, &[0xFF, 0xFE])),
        // A will topic with a wildcard (a topic name: MQTT-3.3.2-2).
        10 => frame(0x10, &{
            let mut b = connect_body(level, 0x02 | 0x04, b"x");
            if level == 5 {
                b.push(0);
            }
            b.extend_from_slice(&string(b"will/#"));
            b.extend_from_slice(&string(b"bye"));
            b
        }),
        // 5.0: Receive Maximum 0 and Maximum Packet Size 0 (§3.1.2.11.3, §3.1.2.11.4).
        11 if level == 5 => frame(0x10, &connect_with_properties(&[0x21, 0, 0])),
        _ if level == 5 => frame(0x10, &connect_with_properties(&[0x27, 0, 0, 0, 0])),
        _ => frame(0x10, &connect_body(level, 0x03, b"x")),
    }
}

fn fuzz_cases(seed: u64, count: usize) -> Vec<Case> {
    let mut rng = XorShift(seed);
    (0..count)
        .map(|index| {
            let protocol = if rng.next() & 1 == 0 {
                Protocol::V311
            } else {
                Protocol::V5
            };
            let after_connect = index % 2 == 0;
            let structured = rng.next() & 1 == 0;
            let bytes = match (structured, after_connect) {
                (true, true) => bad_packet(protocol, &mut rng),
                (true, false) => bad_connect(protocol, &mut rng),
                (false, _) => {
                    let len = 1 + rng.below(96);
                    rng.bytes(len)
                }
            };
            Case {
                index,
                protocol,
                after_connect,
                bytes,
                must_close: structured,
            }
        })
        .collect()
}

/// Reads until the server closes; everything it sent, or what went wrong.
async fn read_until_closed(
    stream: &mut TcpStream,
    limit: Duration,
    case: &Case,
) -> Result<Vec<u8>, String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(format!(
                    "case {} ({:?}, after CONNECT: {}): the connection is still open {limit:?} \
                     after {:02x?}; the server sent {got:02x?}",
                    case.index, case.protocol, case.after_connect, case.bytes
                ));
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Runs one case; a description of how the server misbehaved, if it did.
async fn run_case(server: SocketAddr, case: Case, sol: &Solution) -> Option<String> {
    // Fuzz traffic comes from other loopback addresses than the well-behaved clients, so the
    // failed-authentication limiter (per address) cannot confuse the two.
    let source: SocketAddr = if case.after_connect {
        "127.0.0.2:0"
    } else {
        "127.0.0.3:0"
    }
    .parse()
    .unwrap();
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(source).unwrap();
    let mut stream = tokio::time::timeout(NET_TIMEOUT, socket.connect(server))
        .await
        .expect("TCP connect timed out")
        .expect("TCP connect");
    if case.after_connect {
        let mut out = BytesMut::new();
        Packet::Connect(Box::new(login(
            case.protocol,
            &format!("fuzz-{}", case.index),
            sol,
        )))
        .encode(case.protocol, &mut out)
        .unwrap();
        stream.write_all(&out).await.unwrap();
        let mut inbuf = BytesMut::new();
        let ack = loop {
            if let Some(p) = codec::decode(&mut inbuf, case.protocol, 1 << 20).unwrap() {
                break p;
            }
            let n = tokio::time::timeout(NET_TIMEOUT, stream.read_buf(&mut inbuf))
                .await
                .expect("CONNACK timed out")
                .unwrap();
            assert!(n > 0, "case {}: closed before CONNACK", case.index);
        };
        assert!(
            matches!(&ack, Packet::ConnAck(a) if a.code == 0),
            "case {}: {ack:?}",
            case.index
        );
    }
    // The server may close while we write: a write error is part of the game.
    let _ = stream.write_all(&case.bytes).await;
    if !case.must_close {
        let _ = stream.shutdown().await;
    }
    let got = match read_until_closed(&mut stream, Duration::from_secs(5), &case).await {
        Ok(got) => got,
        Err(e) => return Some(e),
    };
    if !case.after_connect && got.first() == Some(&0x20) && got.get(3) == Some(&0) {
        return Some(format!(
            "case {}: a malformed CONNECT was accepted: {:02x?}",
            case.index, case.bytes
        ));
    }
    if case.after_connect {
        // What the server sent after the CONNACK must be valid MQTT, and a DISCONNECT (5.0)
        // must carry an error reason.
        let mut rest = BytesMut::from(&got[..]);
        loop {
            match codec::decode(&mut rest, case.protocol, 1 << 20) {
                Ok(None) => break,
                Ok(Some(Packet::Disconnect(d))) if d.reason < 0x80 => {
                    return Some(format!(
                        "case {}: DISCONNECT {:#x} after {:02x?}",
                        case.index, d.reason, case.bytes
                    ));
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    return Some(format!(
                        "case {}: the server sent {got:02x?}, not MQTT: {e}",
                        case.index
                    ));
                }
            }
        }
    }
    None
}

#[tokio::test]
async fn malformed_packets_and_random_bytes_close_only_their_own_connections() {
    const CASES: usize = 500;
    const CONCURRENCY: usize = 20;
    let (mut broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut watcher = connected(addr, Protocol::V5, "fuzz-watcher", &sol).await;
    subscribe_ok(&mut watcher, "health/check", opts(QoS::AtLeastOnce)).await;

    let cases = Arc::new(fuzz_cases(0x5EED_CAFE_F00D_D00D, CASES));
    let sol = Arc::new(sol);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..CONCURRENCY {
        let cases = cases.clone();
        let sol = sol.clone();
        workers.spawn(async move {
            let mut failures = Vec::new();
            for case in cases.iter().skip(worker).step_by(CONCURRENCY) {
                failures.extend(run_case(addr, case.clone(), &sol).await);
            }
            failures
        });
    }
    let mut failures = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(done) = workers.join_next().await {
            match done {
                Ok(f) => failures.extend(f),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "the fuzz connections did not finish within 60 s"
    );

    assert!(
        broker.is_running(),
        "the broker process died:\n{}",
        broker.logs()
    );
    // The well-behaved subscriber, connected all along, still receives; a fresh client works.
    let mut fresh = connected(addr, Protocol::V311, "fuzz-fresh", &sol).await;
    assert_eq!(
        publish_qos1(&mut fresh, "health/check", b"still here", 1).await,
        0
    );
    let p = expect_publish(&mut watcher).await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("health/check", "still here")
    );
    watcher.send(&puback(packet_id(&p))).await;
    assert!(broker.is_running());
    assert!(
        !broker.logs().contains("panicked"),
        "the broker logged a panic:\n{}",
        broker.logs()
    );
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} of {CASES} connections were not handled as the specification requires:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// --- TLS ---------------------------------------------------------------------------------------

/// A broker with a TLS listener on a certificate made here; the certificate (to trust).
fn tls_broker() -> (Broker, Solution, rustls::pki_types::CertificateDer<'static>) {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    std::fs::write(broker.dir().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        broker.dir().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    broker.write_config("[mqtt]\ntls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"\n");
    broker.arg("--mqtts").arg("127.0.0.1:0");
    broker.start();
    (broker, solution, certified.cert.der().clone())
}

/// A raw MQTT client over TLS (the broker's codec on a tokio-rustls stream).
struct TlsClient {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    buf: BytesMut,
    protocol: Protocol,
}

impl TlsClient {
    async fn connect(
        addr: SocketAddr,
        trusted: &rustls::pki_types::CertificateDer<'static>,
        connect: broker::mqtt::codec::Connect,
    ) -> (Self, broker::mqtt::codec::ConnAck) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::time::timeout(NET_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio::time::timeout(NET_TIMEOUT, connector.connect(name, tcp))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake");
        let mut client = TlsClient {
            stream,
            buf: BytesMut::new(),
            protocol: connect.protocol,
        };
        client.send(&Packet::Connect(Box::new(connect))).await;
        match client.recv().await {
            Packet::ConnAck(ack) => (client, ack),
            other => panic!("expected CONNACK over TLS, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.encode(self.protocol, &mut out).unwrap();
        tokio::time::timeout(NET_TIMEOUT, async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await
        })
        .await
        .expect("TLS write timed out")
        .expect("TLS write");
    }

    async fn recv(&mut self) -> Packet {
        tokio::time::timeout(NET_TIMEOUT, async {
            loop {
                if let Some(p) = codec::decode(&mut self.buf, self.protocol, 1 << 20).unwrap() {
                    return p;
                }
                let n = self.stream.read_buf(&mut self.buf).await.expect("TLS read");
                assert!(n > 0, "the TLS connection closed");
            }
        })
        .await
        .expect("nothing received over TLS in time")
    }
}

#[tokio::test]
async fn tls_clients_trusting_the_certificate_connect_and_exchange_messages() {
    let (broker, sol, cert) = tls_broker();
    let tls_addr = broker
        .mqtts_addr()
        .expect("`mqtts listening on ADDR` printed");
    assert_ne!(tls_addr.port(), broker.port());

    let (mut sub, ack) =
        TlsClient::connect(tls_addr, &cert, login(Protocol::V5, "tls-sub", &sol)).await;
    assert_eq!((ack.code, ack.session_present), (0, false));
    sub.send(&e2e::protocol_support::subscribe(
        1,
        &[("tls/#", opts(QoS::AtLeastOnce))],
        None,
    ))
    .await;
    assert!(matches!(sub.recv().await, Packet::SubAck(a) if a.codes == [1]));

    let (mut publ, ack) =
        TlsClient::connect(tls_addr, &cert, login(Protocol::V311, "tls-pub", &sol)).await;
    assert_eq!(ack.code, 0);
    publ.send(&Packet::Publish(publish("tls/hello", b"over tls", qos1(3))))
        .await;
    assert!(matches!(publ.recv().await, Packet::PubAck(a) if a.packet_id == pid(3)));

    match sub.recv().await {
        Packet::Publish(p) => {
            assert_eq!(
                (p.topic.as_str(), text(&p).as_str()),
                ("tls/hello", "over tls")
            );
            sub.send(&puback(packet_id(&p))).await;
        }
        other => panic!("expected the PUBLISH over TLS, got {other:?}"),
    }
    // The plain listener shares the topic space.
    let mut plain = connected(broker.mqtt_addr(), Protocol::V5, "plain-pub", &sol).await;
    assert_eq!(
        publish_qos1(&mut plain, "tls/plain", b"from tcp", 1).await,
        0
    );
    match sub.recv().await {
        Packet::Publish(p) => assert_eq!(text(&p), "from tcp"),
        other => panic!("expected the plain client's PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn a_plain_tcp_client_on_the_tls_port_fails_cleanly() {
    let (broker, sol, cert) = tls_broker();
    let tls_addr = broker.mqtts_addr().unwrap();
    let mut tcp = tokio::time::timeout(NET_TIMEOUT, TcpStream::connect(tls_addr))
        .await
        .unwrap()
        .unwrap();
    let mut out = BytesMut::new();
    Packet::Connect(Box::new(login(Protocol::V311, "plain-on-tls", &sol)))
        .encode(Protocol::V311, &mut out)
        .unwrap();
    let _ = tcp.write_all(&out).await;
    let case = Case {
        index: 0,
        protocol: Protocol::V311,
        after_connect: false,
        bytes: out.to_vec(),
        must_close: true,
    };
    let got = read_until_closed(&mut tcp, NET_TIMEOUT, &case)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(
        got.first(),
        Some(&0x20),
        "an MQTT CONNACK over plain TCP on the TLS port"
    );
    // A TLS alert at most (content type 21), never MQTT.
    assert!(
        got.is_empty() || got[0] == 0x15,
        "expected nothing or a TLS alert, got {got:02x?}"
    );
    // The listener still serves TLS.
    let (_ok, ack) =
        TlsClient::connect(tls_addr, &cert, login(Protocol::V5, "after-plain", &sol)).await;
    assert_eq!(ack.code, 0);
}
