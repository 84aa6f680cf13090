//! Bad twin commands get clear, specific answers and never disturb the broker: malformed JSON,
//! invalid paths and IDs, unknown actions, conflicting creates, oversized values — each answered
//! with a reason code (MQTT 5) and a Ditto error envelope on the response topic, while a
//! subscriber keeps getting the events of good commands.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use broker::mqtt::codec::{Protocol, QoS};
use e2e::protocol_support::{
    assert_silent, connected, expect_publish, opts, publish_qos1, started, subscribe_ok, text,
};
use serde_json::Value;

#[tokio::test]
async fn bad_twin_commands_are_answered_with_specific_errors_and_the_broker_keeps_serving() {
    let (broker, sol) = started("");
    let addr = broker.mqtt_addr();
    let mut device = connected(addr, Protocol::V5, "device", &sol).await;
    let mut watcher = connected(addr, Protocol::V5, "watcher", &sol).await;
    subscribe_ok(
        &mut watcher,
        "org.acme/+/things/twin/events/#",
        opts(QoS::AtLeastOnce),
    )
    .await;
    subscribe_ok(
        &mut device,
        "org.acme/lamp/things/twin/responses/#",
        opts(QoS::AtLeastOnce),
    )
    .await;
    let create = "org.acme/lamp/things/twin/commands/create";
    assert_eq!(
        publish_qos1(&mut device, create, br#"{"attributes":{"on":false}}"#, 1).await,
        0
    );
    let created = expect_publish(&mut watcher).await;
    assert!(created.topic.as_str().ends_with("/events/created"));
    // The device's own answer to the create.
    let answer = expect_publish(&mut device).await;
    let answer: Value = serde_json::from_str(&text(&answer)).unwrap();
    assert_eq!(answer["status"], 201);

    let big = format!("\"{}\"", "x".repeat(200_000));
    // (topic, payload, expected v5 reason, expected Ditto status and error code prefix)
    let bad: [(&str, &[u8], u8, u64, &str); 7] = [
        (
            "org.acme/lamp/things/twin/commands/modify/attributes/on",
            b"{not json",
            0x99,
            400,
            "",
        ),
        (
            create,
            br#"{"attributes":{}}"#,
            0x80,
            409,
            "things:thing.conflict",
        ),
        (
            "org.acme/lamp/things/twin/commands/modify",
            br#"{"attributes":"a string where an object must be"}"#,
            0x80,
            400,
            "",
        ),
        (
            "org.acme/ghost/things/twin/commands/retrieve",
            b"",
            0x80,
            404,
            "things:thing.notfound",
        ),
        (
            "org.acme/lamp/things/twin/commands/modify/attributes/big",
            big.as_bytes(),
            0x80,
            413,
            "",
        ),
        // A thing may only move to an existing policy in the solution's own namespaces.
        (
            "org.acme/lamp/things/twin/commands/modify/policyId",
            br#""org.acme:no-such-policy""#,
            0x80,
            404,
            "policies:policy.notfound",
        ),
        (
            "org.acme/lamp/things/twin/commands/modify/policyId",
            br#""com.other:policy""#,
            0x80,
            404,
            "policies:policy.notfound",
        ),
    ];
    for (i, (topic, payload, reason, status, code)) in bad.iter().enumerate() {
        let n = u16::try_from(i).unwrap() + 10;
        let got = publish_qos1(&mut device, topic, payload, n).await;
        assert_eq!(got, *reason, "{topic}: reason code");
        if topic.starts_with("org.acme/lamp/") {
            let answer = expect_publish(&mut device).await;
            let envelope: Value = serde_json::from_str(&text(&answer)).unwrap();
            assert_eq!(envelope["status"], *status, "{topic}: {envelope}");
            let error = envelope["value"]["error"].as_str().unwrap_or_default();
            assert!(error.starts_with(code), "{topic}: {envelope}");
            assert!(
                envelope["value"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{topic}: a message says what is wrong: {envelope}"
            );
        }
    }
    // A twin topic that is not a valid command at all: refused by its topic.
    assert_eq!(
        publish_qos1(
            &mut device,
            "org.acme/lamp/things/twin/commands/explode",
            b"{}",
            30
        )
        .await,
        0x90
    );
    // None of that produced an event; a good command still does.
    assert_silent(&mut watcher, "events of refused commands").await;
    assert_eq!(
        publish_qos1(
            &mut device,
            "org.acme/lamp/things/twin/commands/modify/attributes/on",
            b"true",
            31
        )
        .await,
        0
    );
    let event = expect_publish(&mut watcher).await;
    assert_eq!(
        event.topic.as_str(),
        "org.acme/lamp/things/twin/events/modified/attributes/on"
    );
    let event: Value = serde_json::from_str(&text(&event)).unwrap();
    assert_eq!(
        (event["value"].clone(), event["revision"].clone()),
        (Value::Bool(true), 2.into())
    );
}
