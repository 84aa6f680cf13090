#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Plain MQTT topics against the real `thingsgate serve` (DESIGN.md §3, issue 4): wildcards and
//! `$`-topics, retained messages, shared subscriptions, subscription identifiers, No Local, topic
//! aliases, message expiry, forwarded properties, one topic tree per solution, and per-message
//! authorization by `topic:` resources of the solution policy.
//!
//! A raw client on the broker's codec throughout: the assertions are about exact flags,
//! properties and reason codes. "Not delivered" is shown, where possible, by a later message
//! arriving first (deliveries of one publisher keep their order); otherwise by a bounded silence.

use std::collections::BTreeSet;
use std::num::NonZeroU16;
use std::time::Duration;

use broker::mqtt::codec::{
    Packet, Properties, Protocol, QoS, QosPid, RetainHandling, SubscriptionOptions,
};
use bytes::Bytes;
use e2e::broker::{Broker, Solution};
use e2e::protocol_support::{
    BOTH, QUIET, assert_silent, connect_ok, connected, disconnect, expect_closed, expect_publish,
    expect_suback, login, opts, opts_retain, persistent, pid, puback, publish, publish_qos0,
    publish_qos1, pubrel, qos1, qos2, started, subscribe, subscribe_ok, subscribe_ok_with_id, text,
    topic,
};
use e2e::raw::{NET_TIMEOUT, RawClient, Received, utf8};
use serde_json::json;

fn tag(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::V311 => "v3",
        Protocol::V5 => "v5",
    }
}

/// Acknowledges a QoS 1 delivery (nothing for QoS 0).
async fn ack(client: &mut RawClient, p: &broker::mqtt::codec::Publish) {
    match p.qos {
        QosPid::AtMostOnce => {}
        QosPid::AtLeastOnce(id) => client.send(&puback(id.get())).await,
        QosPid::ExactlyOnce(_) => panic!("no QoS 2 expected here: {p:?}"),
    }
}

/// The next delivery, acknowledged.
async fn next(client: &mut RawClient) -> broker::mqtt::codec::Publish {
    let p = expect_publish(client).await;
    ack(client, &p).await;
    p
}

/// Topics of the deliveries up to and including the first one on `marker`.
async fn topics_until(client: &mut RawClient, marker: &str) -> Vec<String> {
    let mut topics = Vec::new();
    loop {
        let p = next(client).await;
        topics.push(p.topic.as_str().to_owned());
        if p.topic.as_str() == marker {
            return topics;
        }
    }
}

/// A PUBLISH packet with the retain flag set, QoS 1.
fn retained(topic_name: &str, payload: &[u8], n: u16) -> Packet {
    let mut p = publish(topic_name, payload, qos1(n));
    p.retain = true;
    Packet::Publish(p)
}

async fn publish_retained(client: &mut RawClient, topic_name: &str, payload: &[u8], n: u16) {
    client.send(&retained(topic_name, payload, n)).await;
    assert!(
        matches!(client.recv().await, Packet::PubAck(a) if a.packet_id == pid(n) && a.reason == 0),
        "PUBACK of the retained `{topic_name}`"
    );
}

// --- wildcards -------------------------------------------------------------------------------

#[tokio::test]
async fn plus_matches_one_level_and_hash_matches_the_parent_and_every_level_below() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let mut sub = connected(addr, protocol, &format!("wild-{t}"), &sol).await;
        subscribe_ok(&mut sub, &format!("plus/{t}/+/temp"), opts(QoS::AtMostOnce)).await;
        subscribe_ok(&mut sub, &format!("hash/{t}/#"), opts(QoS::AtMostOnce)).await;
        let mut publ = connected(addr, protocol, &format!("wild-pub-{t}"), &sol).await;
        let sent = [
            format!("plus/{t}/x/temp"),
            format!("plus/{t}/x/y/temp"),
            format!("plus/{t}/temp"),
            format!("plus/{t}//temp"),
            format!("Plus/{t}/x/temp"),
            format!("hash/{t}"),
            format!("hash/{t}/a"),
            format!("hash/{t}/a/b/c"),
            format!("hash/{t}x"),
            format!("hash/{t}/end"),
        ];
        for (i, name) in sent.iter().enumerate() {
            assert_eq!(publish_qos1(&mut publ, name, b"m", i as u16 + 1).await, 0);
        }
        let got = topics_until(&mut sub, &format!("hash/{t}/end")).await;
        assert_eq!(
            got,
            [
                format!("plus/{t}/x/temp"),
                format!("plus/{t}//temp"),
                format!("hash/{t}"),
                format!("hash/{t}/a"),
                format!("hash/{t}/a/b/c"),
                format!("hash/{t}/end"),
            ],
            "{t}: §4.7.1"
        );
    }
}

#[tokio::test]
async fn dollar_topics_are_matched_only_by_filters_that_name_their_first_level() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut hash = connected(addr, Protocol::V5, "all", &sol).await;
    subscribe_ok(&mut hash, "#", opts(QoS::AtMostOnce)).await;
    let mut plus = connected(addr, Protocol::V311, "plus-status", &sol).await;
    subscribe_ok(&mut plus, "+/status", opts(QoS::AtMostOnce)).await;
    let mut dollar = connected(addr, Protocol::V5, "sys", &sol).await;
    subscribe_ok(&mut dollar, "$SYS/#", opts(QoS::AtMostOnce)).await;

    let mut publ = connected(addr, Protocol::V5, "dollar-pub", &sol).await;
    assert_eq!(
        publish_qos1(&mut publ, "$SYS/status", b"system", 1).await,
        0
    );
    assert_eq!(publish_qos1(&mut publ, "app/status", b"app", 2).await, 0);

    // MQTT-4.7.2-1: `#` and `+/…` do not match `$SYS/status`; the first delivery each sees is
    // the later `app/status`.
    assert_eq!(next(&mut hash).await.topic.as_str(), "app/status");
    assert_eq!(next(&mut plus).await.topic.as_str(), "app/status");
    let p = next(&mut dollar).await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("$SYS/status", "system")
    );
    assert_silent(&mut dollar, "`$SYS/#` must not match `app/status`").await;
}

// --- retained messages -------------------------------------------------------------------------

#[tokio::test]
async fn retained_messages_are_delivered_on_subscribe_replaced_and_cleared() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let filter = format!("ret/{t}/#");
        let marker = format!("ret/{t}/marker");
        let mut publ = connected(addr, protocol, &format!("ret-pub-{t}"), &sol).await;
        publish_retained(&mut publ, &format!("ret/{t}/a"), b"v1", 1).await;

        // Set: delivered on subscribe with RETAIN 1 (§3.3.1.3 of both versions).
        let mut first = connected(addr, protocol, &format!("ret-1-{t}"), &sol).await;
        subscribe_ok(&mut first, &filter, opts(QoS::AtLeastOnce)).await;
        let p = next(&mut first).await;
        assert_eq!((text(&p).as_str(), p.retain), ("v1", true), "{t}");

        // Replaced: an established subscription gets it with RETAIN 0 (3.1.1 MQTT-3.3.1-9;
        // 5.0 MQTT-3.3.1-12, Retain As Published 0); a new one gets only the new value.
        publish_retained(&mut publ, &format!("ret/{t}/a"), b"v2", 2).await;
        let p = next(&mut first).await;
        assert_eq!((text(&p).as_str(), p.retain), ("v2", false), "{t}");
        let mut second = connected(addr, protocol, &format!("ret-2-{t}"), &sol).await;
        subscribe_ok(&mut second, &filter, opts(QoS::AtLeastOnce)).await;
        let p = next(&mut second).await;
        assert_eq!((text(&p).as_str(), p.retain), ("v2", true), "{t}");
        assert_eq!(publish_qos1(&mut publ, &marker, b"", 3).await, 0);
        assert_eq!(
            next(&mut second).await.topic.as_str(),
            marker,
            "{t}: one retained message"
        );
        assert_eq!(next(&mut first).await.topic.as_str(), marker, "{t}");

        // Cleared by an empty payload (3.1.1 MQTT-3.3.1-10, 5.0 MQTT-3.3.1-6), which current subscribers
        // still receive as a normal message.
        publish_retained(&mut publ, &format!("ret/{t}/a"), b"", 4).await;
        let p = next(&mut first).await;
        assert_eq!(
            (p.topic.as_str(), p.payload.len(), p.retain),
            (&*format!("ret/{t}/a"), 0, false)
        );
        publish_retained(&mut publ, &format!("ret/{t}/b"), b"other", 5).await;
        let mut third = connected(addr, protocol, &format!("ret-3-{t}"), &sol).await;
        subscribe_ok(&mut third, &filter, opts(QoS::AtLeastOnce)).await;
        let p = next(&mut third).await;
        assert_eq!(
            (p.topic.as_str(), text(&p).as_str(), p.retain),
            (&*format!("ret/{t}/b"), "other", true),
            "{t}: `ret/{t}/a` was cleared"
        );
        assert_eq!(publish_qos1(&mut publ, &marker, b"", 6).await, 0);
        assert_eq!(next(&mut third).await.topic.as_str(), marker, "{t}");
    }
}

#[tokio::test]
async fn resubscribing_resends_retained_messages_unless_v5_retain_handling_says_otherwise() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut publ = connected(addr, Protocol::V5, "rh-pub", &sol).await;
    publish_retained(&mut publ, "rh/x", b"kept", 1).await;

    // Retain Handling 0 (and 3.1.1, MQTT-3.8.4-3): sent at every SUBSCRIBE, also a repeated one.
    for protocol in BOTH {
        let t = tag(protocol);
        let mut zero = connected(addr, protocol, &format!("rh0-{t}"), &sol).await;
        for round in 0..2 {
            subscribe_ok(&mut zero, "rh/#", opts(QoS::AtMostOnce)).await;
            let p = next(&mut zero).await;
            assert_eq!(
                (text(&p).as_str(), p.retain),
                ("kept", true),
                "{t}, SUBSCRIBE {round}"
            );
        }
    }

    // 1: only for a subscription that did not exist.
    let mut one = connected(addr, Protocol::V5, "rh1", &sol).await;
    subscribe_ok(
        &mut one,
        "rh/#",
        opts_retain(QoS::AtMostOnce, RetainHandling::OnNewSubscribe),
    )
    .await;
    let p = next(&mut one).await;
    assert_eq!((text(&p).as_str(), p.retain), ("kept", true));
    subscribe_ok(
        &mut one,
        "rh/#",
        opts_retain(QoS::AtMostOnce, RetainHandling::OnNewSubscribe),
    )
    .await;

    // 2: never.
    let mut two = connected(addr, Protocol::V5, "rh2", &sol).await;
    subscribe_ok(
        &mut two,
        "rh/#",
        opts_retain(QoS::AtMostOnce, RetainHandling::Never),
    )
    .await;

    assert_eq!(publish_qos1(&mut publ, "rh/marker", b"", 2).await, 0);
    assert_eq!(
        next(&mut one).await.topic.as_str(),
        "rh/marker",
        "MQTT-3.3.1-10: Retain Handling 1 on an existing subscription sends nothing"
    );
    assert_eq!(
        next(&mut two).await.topic.as_str(),
        "rh/marker",
        "MQTT-3.3.1-11: Retain Handling 2 sends no retained message"
    );
}

#[tokio::test]
async fn retain_as_published_keeps_the_retain_flag_on_live_deliveries() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut rap = connected(addr, Protocol::V5, "rap", &sol).await;
    let options = SubscriptionOptions {
        retain_as_published: true,
        ..opts(QoS::AtMostOnce)
    };
    subscribe_ok(&mut rap, "rap/#", options).await;
    let mut plain5 = connected(addr, Protocol::V5, "rap-plain5", &sol).await;
    subscribe_ok(&mut plain5, "rap/#", opts(QoS::AtMostOnce)).await;
    let mut plain3 = connected(addr, Protocol::V311, "rap-plain3", &sol).await;
    subscribe_ok(&mut plain3, "rap/#", opts(QoS::AtMostOnce)).await;

    let mut publ = connected(addr, Protocol::V5, "rap-pub", &sol).await;
    publish_retained(&mut publ, "rap/x", b"r", 1).await;
    assert_eq!(
        publish_qos1(&mut publ, "rap/y", b"not retained", 2).await,
        0
    );

    let p = next(&mut rap).await;
    assert_eq!(
        (p.topic.as_str(), p.retain),
        ("rap/x", true),
        "MQTT-3.3.1-13"
    );
    let p = next(&mut rap).await;
    assert_eq!((p.topic.as_str(), p.retain), ("rap/y", false));
    for (name, client) in [("5.0", &mut plain5), ("3.1.1", &mut plain3)] {
        let p = next(client).await;
        assert_eq!(
            (p.topic.as_str(), p.retain),
            ("rap/x", false),
            "{name}: MQTT-3.3.1-12 / 3.3.1-9"
        );
    }
}

// --- shared subscriptions ----------------------------------------------------------------------

/// Every delivery until [`QUIET`] passes without one, acknowledged; their payloads.
async fn drain(client: &mut RawClient) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        match client.recv_within(QUIET).await {
            Received::Silent => return got,
            Received::Packet(Packet::Publish(p)) => {
                ack(client, &p).await;
                got.push(text(&p));
            }
            other => panic!("expected PUBLISH or nothing, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn each_message_to_a_shared_subscription_goes_to_exactly_one_member() {
    const N: u16 = 20;
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut m1 = connected(addr, Protocol::V5, "member-1", &sol).await;
    subscribe_ok(&mut m1, "$share/workers/jobs/#", opts(QoS::AtLeastOnce)).await;
    let mut m2 = connected(addr, Protocol::V311, "member-2", &sol).await;
    subscribe_ok(&mut m2, "$share/workers/jobs/#", opts(QoS::AtLeastOnce)).await;
    let mut all = connected(addr, Protocol::V5, "observer", &sol).await;
    subscribe_ok(&mut all, "jobs/#", opts(QoS::AtLeastOnce)).await;

    let mut publ = connected(addr, Protocol::V5, "dispatcher", &sol).await;
    for i in 0..N {
        assert_eq!(
            publish_qos1(
                &mut publ,
                &format!("jobs/{i}"),
                format!("job {i}").as_bytes(),
                i + 1
            )
            .await,
            0
        );
    }
    let one = drain(&mut m1).await;
    let two = drain(&mut m2).await;
    let every: Vec<String> = (0..N).map(|i| format!("job {i}")).collect();
    assert_eq!(
        one.len() + two.len(),
        usize::from(N),
        "member 1: {one:?}\nmember 2: {two:?}"
    );
    let union: BTreeSet<&String> = one.iter().chain(&two).collect();
    assert_eq!(
        union,
        every.iter().collect(),
        "each message to exactly one member"
    );
    // An ordinary subscription on the same filter is not part of the group.
    assert_eq!(drain(&mut all).await, every);
}

// --- subscription identifiers, No Local ---------------------------------------------------------

#[tokio::test]
async fn overlapping_subscriptions_give_one_delivery_with_every_identifier_at_the_highest_qos() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut sub = connected(addr, Protocol::V5, "ids", &sol).await;
    subscribe_ok_with_id(&mut sub, "sid/+", opts(QoS::AtMostOnce), Some(1)).await;
    subscribe_ok_with_id(&mut sub, "sid/#", opts(QoS::AtLeastOnce), Some(2)).await;
    let mut publ = connected(addr, Protocol::V5, "ids-pub", &sol).await;
    assert_eq!(publish_qos1(&mut publ, "sid/a", b"both", 1).await, 0);
    assert_eq!(publish_qos1(&mut publ, "sid/a/b", b"deep", 2).await, 0);

    let p = next(&mut sub).await;
    assert_eq!(text(&p), "both");
    assert!(
        matches!(p.qos, QosPid::AtLeastOnce(_)),
        "the higher granted QoS: {p:?}"
    );
    let mut ids: Vec<u32> = p
        .properties
        .subscription_identifiers
        .iter()
        .map(|n| n.get())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        [1, 2],
        "MQTT-3.3.4-3/-5: the identifiers of both subscriptions"
    );
    // The next delivery is the next message, not a second copy of the first.
    let p = next(&mut sub).await;
    assert_eq!(text(&p), "deep");
    let ids: Vec<u32> = p
        .properties
        .subscription_identifiers
        .iter()
        .map(|n| n.get())
        .collect();
    assert_eq!(ids, [2], "only `sid/#` matches `sid/a/b`");
}

#[tokio::test]
async fn no_local_subscriptions_do_not_receive_their_own_messages() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut me = connected(addr, Protocol::V5, "no-local", &sol).await;
    let options = SubscriptionOptions {
        no_local: true,
        ..opts(QoS::AtMostOnce)
    };
    subscribe_ok(&mut me, "nl/#", options).await;
    let mut other = connected(addr, Protocol::V5, "local", &sol).await;
    subscribe_ok(&mut other, "nl/#", opts(QoS::AtMostOnce)).await;

    assert_eq!(publish_qos1(&mut me, "nl/mine", b"mine", 1).await, 0);
    assert_eq!(next(&mut other).await.topic.as_str(), "nl/mine");
    assert_eq!(publish_qos1(&mut other, "nl/theirs", b"theirs", 1).await, 0);
    // MQTT-3.8.3-3: its own message was not sent back; the other client's is.
    assert_eq!(next(&mut me).await.topic.as_str(), "nl/theirs");
}

#[tokio::test]
async fn unsubscribe_stops_deliveries_and_the_v5_unsuback_says_whether_the_filter_existed() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let mut sub = connected(addr, protocol, &format!("unsub-{t}"), &sol).await;
        subscribe_ok(&mut sub, &format!("unsub/{t}/a"), opts(QoS::AtMostOnce)).await;
        subscribe_ok(&mut sub, &format!("unsub/{t}/b"), opts(QoS::AtMostOnce)).await;
        sub.send(&Packet::Unsubscribe(broker::mqtt::codec::Unsubscribe {
            packet_id: pid(9),
            filters: vec![
                e2e::protocol_support::filter(&format!("unsub/{t}/a")),
                e2e::protocol_support::filter(&format!("unsub/{t}/never")),
            ],
            properties: Properties::default(),
        }))
        .await;
        match sub.recv().await {
            Packet::UnsubAck(a) => {
                assert_eq!(a.packet_id, pid(9), "{t}");
                let want: &[u8] = if protocol == Protocol::V5 {
                    &[0x00, 0x11]
                } else {
                    &[]
                };
                assert_eq!(
                    a.codes, want,
                    "{t}: §3.11.3 (0x11: no subscription existed)"
                );
            }
            other => panic!("{t}: expected UNSUBACK, got {other:?}"),
        }
        let mut publ = connected(addr, protocol, &format!("unsub-pub-{t}"), &sol).await;
        assert_eq!(
            publish_qos1(&mut publ, &format!("unsub/{t}/a"), b"gone", 1).await,
            0
        );
        assert_eq!(
            publish_qos1(&mut publ, &format!("unsub/{t}/b"), b"kept", 2).await,
            0
        );
        assert_eq!(text(&next(&mut sub).await), "kept", "{t}: MQTT-3.10.4-2");
    }
}

// --- topic aliases, expiry, properties -----------------------------------------------------------

fn aliased(topic_name: &str, alias: u16, payload: &[u8], n: u16) -> Packet {
    let mut p = publish(topic_name, payload, qos1(n));
    if topic_name.is_empty() {
        p.topic = broker::mqtt::codec::TopicName::new(Bytes::new()).unwrap();
    }
    p.properties.topic_alias = NonZeroU16::new(alias);
    Packet::Publish(p)
}

#[tokio::test]
async fn a_topic_alias_from_the_publisher_is_delivered_with_the_full_topic() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut sub5 = connected(addr, Protocol::V5, "alias-sub5", &sol).await;
    subscribe_ok(&mut sub5, "alias/#", opts(QoS::AtMostOnce)).await;
    let mut sub3 = connected(addr, Protocol::V311, "alias-sub3", &sol).await;
    subscribe_ok(&mut sub3, "alias/#", opts(QoS::AtMostOnce)).await;

    let (mut publ, ack) = connect_ok(addr, login(Protocol::V5, "alias-pub", &sol)).await;
    let max = ack.properties.topic_alias_maximum.unwrap_or(0);
    assert!(
        max >= 2,
        "the CONNACK announces a Topic Alias Maximum: {ack:?}"
    );
    let steps = [
        ("alias/t", 1, "one"),
        ("", 1, "two"),
        ("alias/u", 1, "three"),
        ("", 1, "four"),
        ("alias/t", 2, "five"),
        ("", 2, "six"),
    ];
    for (i, (name, alias, payload)) in steps.iter().enumerate() {
        let n = i as u16 + 1;
        publ.send(&aliased(name, *alias, payload.as_bytes(), n))
            .await;
        assert!(
            matches!(publ.recv().await, Packet::PubAck(a) if a.packet_id == pid(n) && a.reason == 0),
            "PUBACK of step {i}"
        );
    }
    let want = [
        ("alias/t", "one"),
        ("alias/t", "two"),
        ("alias/u", "three"),
        ("alias/u", "four"),
        ("alias/t", "five"),
        ("alias/t", "six"),
    ];
    for (name, sub) in [("5.0", &mut sub5), ("3.1.1", &mut sub3)] {
        for (want_topic, want_payload) in want {
            let p = next(sub).await;
            assert_eq!(
                (p.topic.as_str(), text(&p).as_str()),
                (want_topic, want_payload),
                "{name}"
            );
            // The subscriber announced no Topic Alias Maximum: the server must not use one
            // (MQTT-3.3.2-11).
            assert_eq!(p.properties.topic_alias, None, "{name}");
        }
    }
}

#[tokio::test]
async fn an_unknown_or_out_of_range_topic_alias_closes_the_connection() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let (mut publ, ack) = connect_ok(addr, login(Protocol::V5, "bad-alias", &sol)).await;
    let max = ack.properties.topic_alias_maximum.unwrap_or(0);
    publ.send(&aliased("alias/x", max + 1, b"x", 1)).await;
    let last = expect_closed(&mut publ, NET_TIMEOUT).await;
    assert!(
        matches!(last.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x94),
        "§3.3.2.3.4: alias above the maximum → DISCONNECT 0x94, got {last:?}"
    );
    let (mut publ, _) = connect_ok(addr, login(Protocol::V5, "bad-alias-2", &sol)).await;
    publ.send(&aliased("", 1, b"x", 1)).await;
    let last = expect_closed(&mut publ, NET_TIMEOUT).await;
    assert!(
        matches!(last.as_slice(), [Packet::Disconnect(d)] if d.reason == 0x82),
        "§3.3.2.3.4: an alias without a mapping is a protocol error (0x82), got {last:?}"
    );
}

#[tokio::test]
async fn an_expired_message_is_not_delivered_and_the_remaining_expiry_is_forwarded() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let (mut sub, _) = connect_ok(addr, persistent(Protocol::V5, "exp-sub", &sol, 300)).await;
    subscribe_ok(&mut sub, "exp/#", opts(QoS::AtLeastOnce)).await;
    disconnect(sub).await;

    let mut publ = connected(addr, Protocol::V5, "exp-pub", &sol).await;
    let messages = [
        ("exp/short", 1, false),
        ("exp/long", 60, false),
        ("retained/short", 1, true),
        ("retained/long", 60, true),
    ];
    for (i, (name, expiry, retain)) in messages.into_iter().enumerate() {
        let n = i as u16 + 1;
        let mut p = publish(name, name.as_bytes(), qos1(n));
        p.properties.message_expiry_interval = Some(expiry);
        p.retain = retain;
        publ.send(&Packet::Publish(p)).await;
        assert!(
            matches!(publ.recv().await, Packet::PubAck(a) if a.packet_id == pid(n) && a.reason == 0)
        );
    }
    // Every message was received (PUBACK) by now. Nothing signals an expiry: wait past the
    // short ones' 1 s; the long ones then have at most 58 s left.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (mut sub, ack) = connect_ok(addr, persistent(Protocol::V5, "exp-sub", &sol, 300)).await;
    assert!(ack.session_present);
    let p = next(&mut sub).await;
    assert_eq!(
        p.topic.as_str(),
        "exp/long",
        "MQTT-3.3.2-5: `exp/short` expired while queued"
    );
    let left = p
        .properties
        .message_expiry_interval
        .expect("the expiry is forwarded");
    assert!(
        (50..=58).contains(&left),
        "MQTT-3.3.2-6: 60 s minus the ≥ 2 s spent queued, got {left}"
    );
    assert_silent(&mut sub, "after `exp/long`").await;

    // Retained messages expire too: a new subscriber gets only the one still valid, with its
    // remaining lifetime.
    let mut late = connected(addr, Protocol::V5, "exp-late", &sol).await;
    subscribe_ok(&mut late, "retained/#", opts(QoS::AtLeastOnce)).await;
    let p = next(&mut late).await;
    assert_eq!(
        (p.topic.as_str(), p.retain),
        ("retained/long", true),
        "§3.3.2.3.3"
    );
    let left = p
        .properties
        .message_expiry_interval
        .expect("the expiry is forwarded");
    assert!((50..=58).contains(&left), "got {left}");
    assert_silent(&mut late, "`retained/short` expired").await;
}

#[tokio::test]
async fn user_properties_response_topic_correlation_data_and_content_type_are_forwarded_unchanged()
{
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut sub = connected(addr, Protocol::V5, "props-sub", &sol).await;
    subscribe_ok(&mut sub, "props/#", opts(QoS::AtLeastOnce)).await;
    let mut publ = connected(addr, Protocol::V5, "props-pub", &sol).await;
    let properties = Properties {
        payload_format_utf8: Some(true),
        content_type: Some(utf8("application/json")),
        response_topic: Some(topic("props/reply/c1")),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xFF])),
        user_properties: vec![
            (utf8("a"), utf8("1")),
            (utf8("b"), utf8("two words")),
            (utf8("a"), utf8("3")),
        ],
        ..Properties::default()
    };
    let mut p = publish("props/x", br#"{"v":1}"#, qos1(1));
    p.properties = properties.clone();
    publ.send(&Packet::Publish(p)).await;
    assert!(matches!(publ.recv().await, Packet::PubAck(a) if a.reason == 0));

    let got = next(&mut sub).await;
    assert_eq!(text(&got), r#"{"v":1}"#);
    // MQTT-3.3.2-4, -15, -16, -17, -18, -20: unchanged, user properties in order.
    assert_eq!(
        got.properties, properties,
        "everything forwarded, nothing added"
    );
}

// --- solutions ---------------------------------------------------------------------------------

#[tokio::test]
async fn two_solutions_never_see_each_others_messages_on_the_same_topic() {
    let mut broker = Broker::new();
    let a = broker.create_solution("org.acme");
    let b = broker.create_solution("org.other");
    broker.start();
    let addr = broker.mqtt_addr();
    // The same client ID in both: unique per solution, so no takeover either.
    let mut a_sub = connected(addr, Protocol::V5, "device-1", &a).await;
    subscribe_ok(&mut a_sub, "#", opts(QoS::AtLeastOnce)).await;
    let mut b_sub = connected(addr, Protocol::V311, "device-1", &b).await;
    subscribe_ok(&mut b_sub, "#", opts(QoS::AtLeastOnce)).await;
    let mut a_pub = connected(addr, Protocol::V5, "a-pub", &a).await;
    let mut b_pub = connected(addr, Protocol::V311, "b-pub", &b).await;

    assert_eq!(publish_qos1(&mut b_pub, "iso/t", b"from b", 1).await, 0);
    publish_retained(&mut b_pub, "iso/retained", b"b's retained", 2).await;
    assert_eq!(publish_qos1(&mut a_pub, "iso/t", b"from a", 1).await, 0);
    assert_eq!(publish_qos1(&mut a_pub, "iso/end", b"a done", 2).await, 0);
    assert_eq!(publish_qos1(&mut b_pub, "iso/end", b"b done", 3).await, 0);

    let got_a = [text(&next(&mut a_sub).await), text(&next(&mut a_sub).await)];
    assert_eq!(got_a, ["from a", "a done"]);
    let got_b = [
        text(&next(&mut b_sub).await),
        text(&next(&mut b_sub).await),
        text(&next(&mut b_sub).await),
    ];
    assert_eq!(got_b, ["from b", "b's retained", "b done"]);

    // Retained messages are per solution too.
    let mut a_late = connected(addr, Protocol::V5, "a-late", &a).await;
    subscribe_ok(&mut a_late, "iso/#", opts(QoS::AtLeastOnce)).await;
    assert_eq!(publish_qos1(&mut a_pub, "iso/end", b"a again", 3).await, 0);
    assert_eq!(
        text(&next(&mut a_late).await),
        "a again",
        "b's retained message leaked"
    );
    assert_eq!(text(&next(&mut a_sub).await), "a again");
    // Both `device-1` connections are still open.
    a_sub.ping().await;
    b_sub.ping().await;
}

// --- authorization by the solution policy ---------------------------------------------------------

/// A broker whose solution policy grants the solution's clients READ and WRITE on
/// `topic:/sensors` but not READ below `topic:/sensors/secret`, nothing on `topic:/private`
/// except READ for the client `spy` (so that a refused publish there would be visible).
fn policed() -> (Broker, Solution) {
    let mut broker = Broker::new();
    let sol = broker.create_solution("org.acme");
    let everyone = format!("iot-things:{}", sol.id);
    let spy = format!("iot-things:{}:spy", sol.id);
    let policy = json!({"entries": {
        "solution": {
            "subjects": {everyone: {"type": "every client of the solution"}},
            "resources": {
                "solution:/": {"grant": ["READ", "WRITE"], "revoke": []},
                "thing:/": {"grant": ["CREATE"], "revoke": []},
                "policy:/": {"grant": ["CREATE"], "revoke": []},
                "topic:/sensors": {"grant": ["READ", "WRITE"], "revoke": []},
                "topic:/sensors/secret": {"grant": [], "revoke": ["READ"]},
            },
        },
        "spy": {
            "subjects": {spy: {"type": "one client"}},
            "resources": {"topic:/private": {"grant": ["READ"], "revoke": []}},
        },
    }});
    broker.set_policy(&sol.id, &policy);
    broker.start();
    (broker, sol)
}

#[tokio::test]
async fn a_publish_without_write_permission_is_refused_and_never_delivered() {
    let (broker, sol) = policed();
    let addr = broker.mqtt_addr();
    let mut spy = connected(addr, Protocol::V5, "spy", &sol).await;
    subscribe_ok(&mut spy, "private/#", opts(QoS::AtLeastOnce)).await;
    subscribe_ok(&mut spy, "sensors/visible", opts(QoS::AtLeastOnce)).await;

    // 5.0: PUBACK / PUBREC 0x87 (not authorized).
    let mut p5 = connected(addr, Protocol::V5, "writer-5", &sol).await;
    p5.send(&Packet::Publish(publish("private/x", b"no", qos1(1))))
        .await;
    match p5.recv().await {
        Packet::PubAck(a) => assert_eq!((a.packet_id, a.reason), (pid(1), 0x87)),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    p5.send(&Packet::Publish(publish("private/y", b"no", qos2(2))))
        .await;
    match p5.recv().await {
        Packet::PubRec(r) => assert_eq!((r.packet_id, r.reason), (pid(2), 0x87)),
        other => panic!("expected PUBREC 0x87, got {other:?}"),
    }
    // 3.1.1 cannot say no: a positive acknowledgement (MQTT-3.3.5-2), and no delivery.
    let mut p3 = connected(addr, Protocol::V311, "writer-3", &sol).await;
    assert_eq!(publish_qos1(&mut p3, "private/z", b"no", 1).await, 0);
    p3.send(&Packet::Publish(publish("private/w", b"no", qos2(2))))
        .await;
    assert!(matches!(p3.recv().await, Packet::PubRec(r) if r.packet_id == pid(2)));
    p3.send(&pubrel(2)).await;
    assert!(matches!(p3.recv().await, Packet::PubComp(c) if c.packet_id == pid(2)));
    publish_qos0(&mut p3, "private/v", b"no").await;

    assert_eq!(publish_qos1(&mut p3, "sensors/visible", b"yes", 3).await, 0);
    let p = next(&mut spy).await;
    assert_eq!(
        p.topic.as_str(),
        "sensors/visible",
        "the spy may read `private/…`, so a refused publish there would have arrived first"
    );
}

#[tokio::test]
async fn a_client_that_asked_for_no_problem_information_gets_no_reason_string_on_a_refusal() {
    let (broker, sol) = policed();
    let mut connect = login(Protocol::V5, "quiet", &sol);
    connect.properties.request_problem_information = Some(false);
    let (mut client, _) = connect_ok(broker.mqtt_addr(), connect).await;
    client
        .send(&Packet::Publish(publish("private/x", b"no", qos1(1))))
        .await;
    match client.recv().await {
        Packet::PubAck(a) => {
            assert_eq!(a.reason, 0x87);
            assert_eq!(
                (
                    a.properties.reason_string,
                    a.properties.user_properties.len()
                ),
                (None, 0),
                "MQTT-3.1.2-29: no Reason String or User Properties on a PUBACK"
            );
        }
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
}

#[tokio::test]
async fn a_will_on_a_topic_without_write_permission_is_not_published() {
    let (broker, sol) = policed();
    let addr = broker.mqtt_addr();
    let mut spy = connected(addr, Protocol::V5, "spy", &sol).await;
    subscribe_ok(&mut spy, "private/#", opts(QoS::AtLeastOnce)).await;
    subscribe_ok(&mut spy, "sensors/will", opts(QoS::AtLeastOnce)).await;
    for (name, will_topic) in [
        ("denied-will", "private/will"),
        ("allowed-will", "sensors/will"),
    ] {
        let mut connect = login(Protocol::V311, name, &sol);
        connect.will = Some(e2e::protocol_support::will(
            will_topic,
            name.as_bytes(),
            QoS::AtLeastOnce,
        ));
        // 5.0 lets a server refuse such a CONNECT (0x87); a 3.1.1 server may only drop the will.
        let (client, _) = connect_ok(addr, connect).await;
        drop(client);
    }
    let p = next(&mut spy).await;
    assert_eq!(
        (p.topic.as_str(), text(&p).as_str()),
        ("sensors/will", "allowed-will"),
        "the will on `private/will` needs WRITE there, like any PUBLISH"
    );
    // The two connections closed independently: the refused will could also come later.
    assert_silent(&mut spy, "the will on `private/will`").await;
}

#[tokio::test]
async fn a_subscribe_without_read_permission_is_refused_per_filter() {
    let (broker, sol) = policed();
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let mut sub = connected(addr, protocol, &format!("reader-{t}"), &sol).await;
        sub.send(&subscribe(
            1,
            &[("private/#", opts(QoS::AtLeastOnce))],
            None,
        ))
        .await;
        let refused = if protocol == Protocol::V5 { 0x87 } else { 0x80 };
        assert_eq!(expect_suback(&mut sub, 1).await.codes, [refused], "{t}");

        sub.send(&subscribe(
            2,
            &[
                ("sensors/#", opts(QoS::AtLeastOnce)),
                ("private/#", opts(QoS::AtLeastOnce)),
                ("sensors/+/temp", opts(QoS::AtMostOnce)),
            ],
            None,
        ))
        .await;
        assert_eq!(
            expect_suback(&mut sub, 2).await.codes,
            [1, refused, 0],
            "{t}: only that filter"
        );
        let mut publ = connected(addr, protocol, &format!("reader-pub-{t}"), &sol).await;
        assert_eq!(publish_qos1(&mut publ, "sensors/a/temp", b"21", 1).await, 0);
        let p = next(&mut sub).await;
        assert_eq!(
            p.topic.as_str(),
            "sensors/a/temp",
            "{t}: the granted filters work"
        );
    }
}

#[tokio::test]
async fn a_wildcard_subscriber_receives_only_topics_it_may_read() {
    let (broker, sol) = policed();
    let addr = broker.mqtt_addr();
    for protocol in BOTH {
        let t = tag(protocol);
        let mut sub = connected(addr, protocol, &format!("wide-{t}"), &sol).await;
        subscribe_ok(&mut sub, "sensors/#", opts(QoS::AtLeastOnce)).await;
        let mut publ = connected(addr, protocol, &format!("wide-pub-{t}"), &sol).await;
        // WRITE is granted below `sensors/secret` (only READ is revoked): accepted, not delivered.
        assert_eq!(
            publish_qos1(&mut publ, "sensors/secret/x", b"hidden", 1).await,
            0
        );
        assert_eq!(
            publish_qos1(&mut publ, "sensors/secret", b"hidden", 2).await,
            0
        );
        assert_eq!(publish_qos1(&mut publ, "sensors/a", b"open", 3).await, 0);
        let p = next(&mut sub).await;
        assert_eq!(
            (p.topic.as_str(), text(&p).as_str()),
            ("sensors/a", "open"),
            "{t}"
        );
        assert_silent(&mut sub, t).await;
    }
    // Retained messages are checked the same way when a subscription sends them.
    let mut publ = connected(addr, Protocol::V5, "wide-retainer", &sol).await;
    publish_retained(&mut publ, "sensors/secret/r", b"hidden", 1).await;
    publish_retained(&mut publ, "sensors/open/r", b"open", 2).await;
    for protocol in BOTH {
        let t = tag(protocol);
        let mut late = connected(addr, protocol, &format!("wide-late-{t}"), &sol).await;
        subscribe_ok(&mut late, "sensors/#", opts(QoS::AtLeastOnce)).await;
        let p = next(&mut late).await;
        assert_eq!(
            (p.topic.as_str(), p.retain),
            ("sensors/open/r", true),
            "{t}"
        );
        assert_silent(&mut late, &format!("{t}: the retained secret")).await;
    }
}

#[tokio::test]
async fn the_twin_topic_space_of_other_solutions_namespaces_is_refused() {
    // The solution owns `org.acme` only: commands and subscriptions naming another namespace
    // are refused whatever any policy says; its own namespace is open (wildcards included).
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let foreign = "com.other/thing1/things/twin/commands/modify";
    let mut c5 = connected(addr, Protocol::V5, "twin-5", &sol).await;
    assert_eq!(publish_qos1(&mut c5, foreign, b"{}", 1).await, 0x87);
    c5.send(&subscribe(
        2,
        &[
            ("com.other/+/things/#", opts(QoS::AtLeastOnce)),
            ("org.acme/+/things/#", opts(QoS::AtLeastOnce)),
            ("+/+/things/twin/events/#", opts(QoS::AtMostOnce)),
        ],
        None,
    ))
    .await;
    assert_eq!(expect_suback(&mut c5, 2).await.codes, [0x87, 0x01, 0x00]);
    let mut c3 = connected(addr, Protocol::V311, "twin-3", &sol).await;
    c3.send(&subscribe(
        1,
        &[("com.other/+/things/#", opts(QoS::AtLeastOnce))],
        None,
    ))
    .await;
    assert_eq!(expect_suback(&mut c3, 1).await.codes, [0x80]);
}
