#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! MQTT bridges (DESIGN.md §5) against the Mosquitto of this machine (127.0.0.1:1883), for
//! both `mqtt` (3.1.1) and `mqtt-5` connections: commands consumed from a topic are applied
//! with the source's authorization context and answered on the response topic (MQTT 5) or a
//! mapped reply topic (3.1.1); events reach the target topic cut to the target's view; refused
//! and malformed messages are counted, acknowledged and never applied; a connection taken over
//! on Mosquitto comes back by itself, and QoS 1 commands sent while it was away are applied
//! after it is back (the session is persistent).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::bridge::{
    BRIDGE_TIMEOUT, MOSQUITTO, counter, create_thing, modify_temp, put_connection,
    require_mosquitto, started, status, thing_policy, unique, wait_status,
};
use e2e::broker::Solution;
use e2e::clients::{V4Client, V5Client, connect_v4, connect_v5, v4_options, v5_options};
use e2e::http::{Api, Auth};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{Value, json};

/// The subject of the hub's target in these tests (the `reader` of [`thing_policy`]).
const HUB: &str = "integration:acme:hub";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    V311,
    V5,
}

impl Kind {
    fn connection_type(self) -> &'static str {
        match self {
            Kind::V311 => "mqtt",
            Kind::V5 => "mqtt-5",
        }
    }
}

fn mosquitto() -> SocketAddr {
    require_mosquitto();
    MOSQUITTO.parse().unwrap()
}

/// A connection document to Mosquitto with `clientId` `client_id`.
fn connection(kind: Kind, client_id: &str, sources: Value, targets: Value) -> Value {
    json!({
        "connectionType": kind.connection_type(),
        "uri": format!("mqtt://{MOSQUITTO}"),
        "specificConfig": {"clientId": client_id},
        "sources": sources,
        "targets": targets,
    })
}

/// `org.acme:<unique name>`, created with [`thing_policy`] (feature `temp` at 0).
async fn new_thing(api: &Api, solution: &Solution, label: &str) -> String {
    let thing = format!("org.acme:{}", unique(label));
    create_thing(api, solution, &thing, HUB).await;
    thing
}

async fn thing(api: &Api, solution: &Solution, thing: &str) -> Value {
    let answer = api
        .get(&format!("/api/2/things/{thing}"), &Auth::basic(solution))
        .await;
    assert_eq!(answer.status, 200, "GET {thing}: {:?}", answer.body);
    answer.body
}

/// Reads `thing` until `done` holds; panics with the last read after [`BRIDGE_TIMEOUT`].
async fn wait_thing(
    api: &Api,
    solution: &Solution,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let read = thing(api, solution, id).await;
        if done(&read) {
            return read;
        }
        assert!(
            start.elapsed() < BRIDGE_TIMEOUT,
            "{id} not as expected within {BRIDGE_TIMEOUT:?}: {read}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn temp(thing: &Value) -> &Value {
    &thing["features"]["temp"]["properties"]["value"]
}

/// A device on Mosquitto (MQTT 5) publishing commands with user properties.
async fn device_v5(addr: SocketAddr) -> V5Client {
    connect_v5(v5_options(addr, &unique("dev5"))).await.unwrap()
}

async fn device_v4(addr: SocketAddr) -> V4Client {
    connect_v4(v4_options(addr, &unique("dev4"))).await.unwrap()
}

/// Publishes `payload` at QoS 1 with `properties`; the PUBACK is skipped by the client.
async fn publish_v5(
    device: &V5Client,
    topic: &str,
    payload: Vec<u8>,
    properties: PublishProperties,
) {
    device
        .client
        .publish_with_properties(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload,
            properties,
        )
        .await
        .unwrap();
}

fn device_id(thing: &str) -> PublishProperties {
    PublishProperties {
        user_properties: vec![("device_id".into(), thing.into())],
        ..Default::default()
    }
}

/// The next PUBLISH a 3.1.1 client receives, within [`BRIDGE_TIMEOUT`].
async fn next_publish_v4(client: &mut V4Client) -> rumqttc::Publish {
    let deadline = tokio::time::Instant::now() + BRIDGE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_incoming_within(left).await {
            None => panic!("no PUBLISH within {BRIDGE_TIMEOUT:?}"),
            Some(Err(e)) => panic!("the subscriber's connection failed: {e}"),
            Some(Ok(rumqttc::Packet::Publish(p))) => return p,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_commands_are_applied_as_the_device_header_says_and_answered_on_the_response_topic() {
    let addr = mosquitto();
    let (_broker, solution, api) = started();
    let lamp = new_thing(&api, &solution, "lamp").await;
    let topic = unique("m5in");
    let commands = format!("{topic}/commands");
    let answers = format!("{topic}/answers");
    let sources = json!([{"addresses": [commands], "qos": 1,
        "authorizationContext": ["integration:{{ header:device_id }}"]}]);
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(Kind::V5, &unique("bridge"), sources, json!([])),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    let mut device = device_v5(addr).await;
    device
        .subscribe(&answers, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await;
    let properties = PublishProperties {
        response_topic: Some(answers.clone()),
        correlation_data: Some(Bytes::from_static(b"corr-7")),
        ..device_id(&lamp)
    };
    let command = modify_temp(&lamp, json!(21), "c-7");
    publish_v5(
        &device,
        &commands,
        command.to_string().into_bytes(),
        properties,
    )
    .await;

    let answer = device
        .next_publish_within(BRIDGE_TIMEOUT)
        .await
        .expect("an answer on the response topic");
    assert_eq!(answer.topic.as_ref(), answers.as_bytes());
    let properties = answer.properties.expect("answer properties");
    assert_eq!(
        properties.correlation_data.as_deref(),
        Some(&b"corr-7"[..]),
        "the correlation data comes back"
    );
    assert_eq!(
        properties.content_type.as_deref(),
        Some("application/vnd.eclipse.ditto+json")
    );
    let envelope: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(envelope["status"], 204, "{envelope}");
    assert_eq!(envelope["headers"]["correlation-id"], "c-7", "{envelope}");
    assert!(
        properties
            .user_properties
            .contains(&("status".to_owned(), "204".to_owned())),
        "{:?}",
        properties.user_properties
    );

    assert_eq!(temp(&thing(&api, &solution, &lamp).await), &json!(21));
    let shown = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "in") >= 1 && counter(s, "replies") >= 1
    })
    .await;
    assert_eq!(
        counter(&shown, "denied") + counter(&shown, "failed"),
        0,
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_commands_are_applied_with_a_fixed_context_and_answered_on_a_mapped_reply_topic() {
    let addr = mosquitto();
    let (_broker, solution, api) = started();
    let lamp = new_thing(&api, &solution, "lamp").await;
    let topic = unique("m4in");
    let commands = format!("{topic}/commands");
    let answers = format!("{topic}/answers");
    // 3.1.1 has no headers: the context names the device, the reply topic is fixed.
    let sources = json!([{"addresses": [commands], "qos": 1,
        "authorizationContext": [format!("integration:{lamp}")],
        "headerMapping": {"reply-to": answers}}]);
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(Kind::V311, &unique("bridge"), sources, json!([])),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    let mut device = device_v4(addr).await;
    device.subscribe(&answers, rumqttc::QoS::AtLeastOnce).await;
    let command = modify_temp(&lamp, json!(23), "c-3");
    device
        .publish_qos1(&commands, command.to_string().as_bytes())
        .await;
    let answer = next_publish_v4(&mut device).await;
    assert_eq!(answer.topic, answers);
    let envelope: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(envelope["status"], 204, "{envelope}");
    assert_eq!(envelope["headers"]["correlation-id"], "c-3", "{envelope}");
    assert_eq!(temp(&thing(&api, &solution, &lamp).await), &json!(23));
    wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "in") >= 1 && counter(s, "replies") >= 1
    })
    .await;
}

/// A thing whose policy lets the hub's target read `features/temp` only.
async fn thing_with_a_secret(api: &Api, solution: &Solution) -> String {
    let lamp = format!("org.acme:{}", unique("lamp"));
    let auth = Auth::basic(solution);
    let mut policy = thing_policy(solution, &lamp, HUB);
    policy["entries"]["reader"]["resources"] =
        json!({"thing:/features/temp": {"grant": ["READ"], "revoke": []}});
    let answer = api
        .put(&format!("/api/2/policies/{lamp}"), &auth, &policy)
        .await;
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    let answer = api
        .put(
            &format!("/api/2/things/{lamp}"),
            &auth,
            &json!({"policyId": lamp, "features": {"temp": {"properties": {"value": 0}}}}),
        )
        .await;
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    lamp
}

/// What a subscriber on Mosquitto received: topic, payload, (MQTT 5) content type and user
/// properties.
type Received = (String, Value, Option<String>, Vec<(String, String)>);

/// A subscriber on Mosquitto of either version.
enum Subscriber {
    V4(V4Client),
    V5(V5Client),
}

impl Subscriber {
    async fn on(kind: Kind, addr: SocketAddr, filter: &str) -> Self {
        match kind {
            Kind::V311 => {
                let mut s = device_v4(addr).await;
                s.subscribe(filter, rumqttc::QoS::AtLeastOnce).await;
                Subscriber::V4(s)
            }
            Kind::V5 => {
                let mut s = device_v5(addr).await;
                s.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                    .await;
                Subscriber::V5(s)
            }
        }
    }

    async fn next(&mut self) -> Received {
        match self {
            Subscriber::V4(s) => {
                let p = next_publish_v4(s).await;
                let payload = serde_json::from_slice(&p.payload).unwrap();
                (p.topic, payload, None, Vec::new())
            }
            Subscriber::V5(s) => {
                let p = s
                    .next_publish_within(BRIDGE_TIMEOUT)
                    .await
                    .expect("an event on Mosquitto");
                let properties = p.properties.unwrap_or_default();
                (
                    String::from_utf8(p.topic.to_vec()).unwrap(),
                    serde_json::from_slice(&p.payload).unwrap(),
                    properties.content_type,
                    properties.user_properties,
                )
            }
        }
    }
}

async fn events_reach_the_target_topic_cut_to_the_view(kind: Kind) {
    let addr = mosquitto();
    let (_broker, solution, api) = started();
    let lamp = thing_with_a_secret(&api, &solution).await;
    let name = lamp.strip_prefix("org.acme:").unwrap().to_owned();
    let topic = unique("out");
    let targets = json!([{"address": format!("{topic}/events/{{{{ thing:name }}}}/{{{{ topic:action }}}}"),
        "topics": ["_/_/things/twin/events"], "qos": 1, "authorizationContext": [HUB],
        "headerMapping": {"thing-id": "{{ thing:id }}"}}]);
    put_connection(
        &api,
        &solution,
        "out",
        &connection(kind, &unique("bridge"), json!([]), targets),
    )
    .await;
    wait_status(&api, &solution, "out", "connected", |_| true).await;
    let filter = format!("{topic}/events/#");
    let mut subscriber = Subscriber::on(kind, addr, &filter).await;

    let auth = Auth::basic(&solution);
    let features = json!({"temp": {"properties": {"value": 7}},
        "secret": {"properties": {"pin": "1234"}}});
    let answer = api
        .put(&format!("/api/2/things/{lamp}/features"), &auth, &features)
        .await;
    assert_eq!(answer.status, 204, "{:?}", answer.body);
    // Unreadable for the target: not published at all.
    let answer = api
        .put(
            &format!("/api/2/things/{lamp}/features/secret/properties/pin"),
            &auth,
            &json!("5678"),
        )
        .await;
    assert_eq!(answer.status, 204, "{:?}", answer.body);
    let answer = api
        .put(
            &format!("/api/2/things/{lamp}/features/temp/properties/value"),
            &auth,
            &json!(8),
        )
        .await;
    assert_eq!(answer.status, 204, "{:?}", answer.body);

    let (first_topic, first, content_type, properties) = subscriber.next().await;
    assert_eq!(first_topic, format!("{topic}/events/{name}/modified"));
    assert_eq!(first["path"], "/features", "{first}");
    assert_eq!(first["value"]["temp"]["properties"]["value"], 7, "{first}");
    assert!(
        first["value"].get("secret").is_none() && !first.to_string().contains("1234"),
        "the event is cut to the target's view: {first}"
    );
    if kind == Kind::V5 {
        assert_eq!(
            content_type.as_deref(),
            Some("application/vnd.eclipse.ditto+json")
        );
        assert!(
            properties.contains(&("thing-id".to_owned(), lamp.clone())),
            "{properties:?}"
        );
    }
    let (second_topic, second, ..) = subscriber.next().await;
    assert_eq!(second_topic, format!("{topic}/events/{name}/modified"));
    assert_eq!(
        second["path"], "/features/temp/properties/value",
        "the secret's event is not published: {second}"
    );
    assert_eq!(second["value"], 8, "{second}");
    wait_status(&api, &solution, "out", "connected", |s| {
        counter(s, "out") >= 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_events_reach_the_target_topic_cut_to_the_targets_view() {
    events_reach_the_target_topic_cut_to_the_view(Kind::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_events_reach_the_target_topic_cut_to_the_targets_view() {
    events_reach_the_target_topic_cut_to_the_view(Kind::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_refused_and_malformed_commands_are_counted_acknowledged_and_not_applied() {
    let addr = mosquitto();
    let (_broker, solution, api) = started();
    let lamp = new_thing(&api, &solution, "lamp").await;
    let other = new_thing(&api, &solution, "other").await;
    let topic = unique("m5bad");
    let commands = format!("{topic}/commands");
    let sources = json!([{"addresses": [commands], "qos": 1,
        "authorizationContext": ["integration:{{ header:device_id }}"]}]);
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(Kind::V5, &unique("bridge"), sources, json!([])),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;
    let device = device_v5(addr).await;
    // `other`'s device may not write `lamp`.
    let denied = modify_temp(&lamp, json!(99), "denied");
    publish_v5(
        &device,
        &commands,
        denied.to_string().into_bytes(),
        device_id(&other),
    )
    .await;
    publish_v5(&device, &commands, b"not json".to_vec(), device_id(&lamp)).await;
    // No `device_id`: the context cannot be resolved.
    let unresolved = modify_temp(&lamp, json!(98), "unresolved");
    publish_v5(
        &device,
        &commands,
        unresolved.to_string().into_bytes(),
        PublishProperties::default(),
    )
    .await;
    let good = modify_temp(&other, json!(5), "good");
    publish_v5(
        &device,
        &commands,
        good.to_string().into_bytes(),
        device_id(&other),
    )
    .await;

    wait_thing(&api, &solution, &other, |t| temp(t) == &json!(5)).await;
    let shown = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "in") >= 1 && counter(s, "denied") + counter(s, "failed") >= 3
    })
    .await;
    assert_eq!(temp(&thing(&api, &solution, &lamp).await), &json!(0));
    // Acknowledged once, not delivered again: the counts stay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = status(&api, &solution, "hub").await;
    assert_eq!(counter(&later, "denied"), 1, "{later}");
    assert_eq!(counter(&later, "failed"), 2, "{later}");
    assert_eq!(counter(&later, "in"), 1, "{later}");
    assert_eq!(later["connects"], shown["connects"], "{later}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_refused_and_malformed_commands_are_counted_acknowledged_and_not_applied() {
    let addr = mosquitto();
    let (_broker, solution, api) = started();
    let lamp = new_thing(&api, &solution, "lamp").await;
    let other = new_thing(&api, &solution, "other").await;
    let topic = unique("m4bad");
    let commands = format!("{topic}/commands");
    let sources = json!([{"addresses": [commands], "qos": 1,
        "authorizationContext": [format!("integration:{lamp}")]}]);
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(Kind::V311, &unique("bridge"), sources, json!([])),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;
    let mut device = device_v4(addr).await;
    // `lamp`'s device may not write `other`.
    let denied = modify_temp(&other, json!(99), "denied");
    device
        .publish_qos1(&commands, denied.to_string().as_bytes())
        .await;
    device.publish_qos1(&commands, b"not json").await;
    let good = modify_temp(&lamp, json!(5), "good");
    device
        .publish_qos1(&commands, good.to_string().as_bytes())
        .await;

    wait_thing(&api, &solution, &lamp, |t| temp(t) == &json!(5)).await;
    wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "in") >= 1 && counter(s, "denied") + counter(s, "failed") >= 2
    })
    .await;
    assert_eq!(temp(&thing(&api, &solution, &other).await), &json!(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = status(&api, &solution, "hub").await;
    assert_eq!(counter(&later, "denied"), 1, "{later}");
    assert_eq!(counter(&later, "failed"), 1, "{later}");
    assert_eq!(counter(&later, "in"), 1, "{later}");
}

/// A command setting feature `n<i>` of `thing` to `i`.
fn numbered(thing: &str, i: usize) -> Vec<u8> {
    let name = thing.strip_prefix("org.acme:").unwrap();
    json!({"topic": format!("org.acme/{name}/things/twin/commands/modify"),
        "path": format!("/features/n{i}/properties/value"), "value": i,
        "headers": {"correlation-id": format!("n{i}")}})
    .to_string()
    .into_bytes()
}

const AWAY: usize = 5;

async fn a_taken_over_connection_comes_back_and_loses_no_qos1_command(kind: Kind) {
    let addr = mosquitto();
    let (_broker, solution, api) = started();
    let lamp = new_thing(&api, &solution, "lamp").await;
    let topic = unique("cut");
    let commands = format!("{topic}/commands");
    let client_id = unique("bridge");
    let sources = json!([{"addresses": [commands], "qos": 1,
        "authorizationContext": [format!("integration:{lamp}")]}]);
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(kind, &client_id, sources, json!([])),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |s| s["connects"] == 1).await;

    let mut device = device_v4(addr).await;
    // Another client with the bridge's client ID takes the session over: Mosquitto closes the
    // bridge's connection. It keeps the session (no clean start) and acknowledges nothing, so
    // whatever reaches it stays for the bridge.
    let mut v4 = None;
    let mut v5 = None;
    match kind {
        Kind::V311 => {
            let mut options = v4_options(addr, &client_id);
            options.set_clean_session(false).set_manual_acks(true);
            v4 = Some(connect_v4(options).await.unwrap());
        }
        Kind::V5 => {
            let mut options = v5_options(addr, &client_id);
            options
                .set_clean_start(false)
                .set_session_expiry_interval(Some(600))
                .set_manual_acks(true);
            v5 = Some(connect_v5(options).await.unwrap());
        }
    }
    // QoS 1 commands while the bridge is away (it connects again after a backoff of about
    // 200 ms, taking the session back): they reach the session's new holder, unacknowledged.
    for i in 0..AWAY {
        device.publish_qos1(&commands, &numbered(&lamp, i)).await;
    }
    let held = match (v4.as_mut(), v5.as_mut()) {
        (Some(c), _) => matches!(
            c.next_incoming_within(Duration::from_secs(2)).await,
            Some(Ok(rumqttc::Packet::Publish(_)))
        ),
        (_, Some(c)) => matches!(
            c.next_incoming_within(Duration::from_secs(2)).await,
            Some(Ok(rumqttc::v5::mqttbytes::v5::Packet::Publish(_)))
        ),
        _ => false,
    };
    assert!(
        held,
        "the commands reached the session while the bridge was away"
    );
    drop(v4);
    drop(v5);

    let back = wait_status(&api, &solution, "hub", "connected", |s| {
        s["connects"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    assert!(back["connects"].as_u64().unwrap() >= 2, "{back}");
    wait_thing(&api, &solution, &lamp, |t| {
        (0..AWAY).all(|i| t["features"][format!("n{i}")]["properties"]["value"] == i)
    })
    .await;
    // And commands flow again.
    let command = modify_temp(&lamp, json!(42), "after");
    device
        .publish_qos1(&commands, command.to_string().as_bytes())
        .await;
    wait_thing(&api, &solution, &lamp, |t| temp(t) == &json!(42)).await;
    let shown = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "in") > AWAY as u64
    })
    .await;
    assert_eq!(
        counter(&shown, "denied") + counter(&shown, "failed"),
        0,
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_a_taken_over_connection_comes_back_and_loses_no_qos1_command() {
    a_taken_over_connection_comes_back_and_loses_no_qos1_command(Kind::V5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt311_a_taken_over_connection_comes_back_and_loses_no_qos1_command() {
    a_taken_over_connection_comes_back_and_loses_no_qos1_command(Kind::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_with_the_reason_and_never_shows_the_password() {
    let _ = mosquitto();
    let (_broker, solution, api) = started();
    // Nothing listens on port 1.
    let mut doc = connection(
        Kind::V5,
        &unique("bridge"),
        json!([{"addresses": ["tg/none"], "authorizationContext": ["integration:x"]}]),
        json!([]),
    );
    doc["uri"] = json!("mqtt://hub:s3cr3t@127.0.0.1:1");
    put_connection(&api, &solution, "down", &doc).await;
    let shown = wait_status(&api, &solution, "down", "failed", |s| {
        s["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("127.0.0.1:1"))
    })
    .await;
    assert!(!shown.to_string().contains("s3cr3t"), "{shown}");
    let stored = api
        .get(
            &format!("/api/2/solutions/{}/connections/down", solution.id),
            &Auth::basic(&solution),
        )
        .await;
    assert_eq!(stored.status, 200, "{:?}", stored.body);
    assert!(
        !stored.body.to_string().contains("s3cr3t"),
        "{:?}",
        stored.body
    );
}
