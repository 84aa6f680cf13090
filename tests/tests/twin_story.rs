#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The owner/observer/device scenario of Ditto's documentation as a story, end to end against
//! the real `thingsgate serve` (DESIGN.md §1, §3, §4; issue 5).
//!
//! One solution owns `org.acme`; its owner (a secret client, client ID `owner`) creates the
//! policy `org.acme:thing-policy` and the thing `org.acme:thing`. The policy names:
//! - the owner (`iot-things:<sol>:owner`): everything. Not `iot-things:<sol>`: every secret
//!   client of the solution carries that subject, the device too;
//! - the device (`iot-things:<sol>:device-1`, secret auth): READ and WRITE on
//!   `thing:/features/telemetry` only, READ on `message:/inbox` (it receives live messages);
//! - the app user (`google:alice`, JWT): READ on `thing:/` but not `thing:/features/secret`,
//!   WRITE on `message:/`;
//! - the auditor group (`google:auditors`, from the JWT's `groups` claim): READ on
//!   `thing:/attributes`;
//! - a second solution's clients (`iot-things:<solB>`): READ on `thing:/`, READ and WRITE on
//!   `message:/` — which must not let them in: isolation is checked before policies.
//!
//! Every network wait is bounded ([`NET_TIMEOUT`] for what must come, [`QUIET`] for what must
//! not); the broker listens on port 0.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use broker::mqtt::codec::{
    Connect, Packet, Properties, Protocol, PubResponse, Publish, QoS, QosPid,
};
use bytes::Bytes;
use e2e::broker::{Broker, Solution};
use e2e::clients::connect_v4_login;
use e2e::issuer::{AUD, ISS, SOLUTION_CLAIM, dev_issuer};
use e2e::protocol_support::{QUIET, login, opts, pid, publish, qos1, qos2, subscribe, topic};
use e2e::raw::{NET_TIMEOUT, RawClient, Received, connect_packet, utf8, with_login};
use serde_json::{Value, json};

const NS: &str = "org.acme";
const THING: &str = "org.acme:thing";
const POLICY: &str = "org.acme:thing-policy";
/// The compact twin topics of the thing.
const TWIN: &str = "org.acme/thing/things/twin";
/// Every event of every thing in the namespace: what each role subscribes to.
const EVENTS: &str = "org.acme/+/things/twin/events/#";
/// The issuer key of the JWT clients: their subjects are `google:<value>`.
const GOOGLE: &str = "google";
const ALICE: &str = "google:alice";
const AUDITORS: &str = "google:auditors";
const HOUR: Duration = Duration::from_secs(3600);

// --- the story's setup -------------------------------------------------------------------------

/// The `[[issuer]]` block: the dev issuer's keys under key `google`, the solution named by the
/// `solution_id` claim, one subject per `sub` and one per element of `groups`.
fn issuer_toml() -> String {
    format!(
        "[[issuer]]\nkey = \"{GOOGLE}\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
         jwks_file = \"jwks.json\"\nsolution_claim = \"{SOLUTION_CLAIM}\"\n\
         auth_subjects = [\"{{{{ jwt:sub }}}}\", \"{{{{ jwt:groups }}}}\"]\n"
    )
}

/// A JWT of `solution` for `sub` with the `groups` claim (none if empty).
fn token(solution: &Solution, sub: &str, groups: &[&str]) -> String {
    let mut claims = dev_issuer().claims(sub, HOUR);
    claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
    if !groups.is_empty() {
        claims.insert("groups".into(), json!(groups));
    }
    dev_issuer().sign(&claims)
}

fn grant(permissions: &[&str]) -> Value {
    json!({"grant": permissions, "revoke": []})
}

fn revoke(permissions: &[&str]) -> Value {
    json!({"grant": [], "revoke": permissions})
}

fn subject(id: &str) -> Value {
    json!({id: {"type": "twin story"}})
}

/// The thing's policy (see the module docs).
fn thing_policy(a: &Solution, b: &Solution) -> Value {
    json!({
        "policyId": POLICY,
        "entries": {
            "owner": {
                "subjects": subject(&format!("iot-things:{}:owner", a.id)),
                "resources": {
                    "thing:/": grant(&["READ", "WRITE"]),
                    "policy:/": grant(&["READ", "WRITE"]),
                    "message:/": grant(&["READ", "WRITE"]),
                },
            },
            "device": {
                "subjects": subject(&format!("iot-things:{}:device-1", a.id)),
                "resources": {
                    "thing:/features/telemetry": grant(&["READ", "WRITE"]),
                    "message:/inbox": grant(&["READ"]),
                },
            },
            "app": {
                "subjects": subject(ALICE),
                "resources": {
                    "thing:/": grant(&["READ"]),
                    "thing:/features/secret": revoke(&["READ"]),
                    "message:/": grant(&["WRITE"]),
                },
            },
            "auditors": {
                "subjects": subject(AUDITORS),
                "resources": {"thing:/attributes": grant(&["READ"])},
            },
            "other-solution": {
                "subjects": subject(&format!("iot-things:{}", b.id)),
                "resources": {
                    "thing:/": grant(&["READ"]),
                    "message:/": grant(&["READ", "WRITE"]),
                },
            },
        },
    })
}

fn attributes() -> Value {
    json!({"location": "kitchen", "model": "TG-1"})
}

fn telemetry() -> Value {
    json!({"properties": {"temp": 20}})
}

fn secret() -> Value {
    json!({"properties": {"pin": "1234"}})
}

/// The thing as the owner creates it.
fn thing_doc() -> Value {
    json!({
        "policyId": POLICY,
        "attributes": attributes(),
        "features": {"telemetry": telemetry(), "secret": secret()},
    })
}

/// A running broker with solution A (`org.acme`, thing and policy created by its owner) and
/// solution B (`com.other`), and A's owner connected (MQTT 5).
struct Story {
    broker: Broker,
    a: Solution,
    b: Solution,
    owner: Peer,
}

impl Story {
    async fn begin() -> Self {
        let mut broker = Broker::new();
        let a = broker.create_solution(NS);
        let b = broker.create_solution("com.other");
        dev_issuer().write_jwks(&broker.dir().join("jwks.json"), &[]);
        broker.write_config(&issuer_toml());
        // The app (a JWT client) reads the replies devices send it on plain topics; the default
        // entry (secret clients: every plain topic, CREATE on things and policies) stays.
        let mut solution_policy = broker.policy(&a.id);
        solution_policy["entries"]["app-replies"] = json!({
            "subjects": subject(ALICE),
            "resources": {"topic:/app/replies": grant(&["READ"])},
        });
        broker.set_policy(&a.id, &solution_policy);
        broker.start();

        let mut owner = Peer::secret(broker.mqtt_addr(), Protocol::V5, "owner", &a).await;
        let created = owner
            .command(
                "org.acme/thing-policy/policies/commands/create",
                thing_policy(&a, &b).to_string().as_bytes(),
            )
            .await;
        assert_eq!(created.code, 0, "the owner creates the policy: {created:?}");
        let created = owner
            .command(
                &format!("{TWIN}/commands/create"),
                thing_doc().to_string().as_bytes(),
            )
            .await;
        assert_eq!(created.code, 0, "the owner creates the thing: {created:?}");
        Story {
            broker,
            a,
            b,
            owner,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.broker.mqtt_addr()
    }

    /// The device, authenticated with solution A's secret as `device-1`.
    async fn device(&self, protocol: Protocol) -> Peer {
        Peer::secret(self.addr(), protocol, "device-1", &self.a).await
    }

    /// The app user `google:alice` (MQTT 5, JWT).
    async fn app(&self) -> Peer {
        Peer::jwt(self.addr(), "app", &token(&self.a, "alice", &[])).await
    }

    /// An auditor: `google:carol` and, from her groups claim, `google:auditors` (MQTT 5, JWT).
    async fn auditor(&self) -> Peer {
        Peer::jwt(
            self.addr(),
            "auditor",
            &token(&self.a, "carol", &["auditors"]),
        )
        .await
    }

    /// The thing as its owner sees it now.
    async fn owner_view(&mut self) -> Value {
        let (ack, reply) = self.owner.retrieve(THING, "").await;
        assert_eq!(ack.code, 0, "{ack:?}");
        assert_eq!(reply["status"], 200, "{reply}");
        reply["value"].clone()
    }
}

// --- a raw MQTT client that keeps what it is not waiting for -------------------------------------

/// A PUBACK's reason code and reason string.
#[derive(Debug)]
struct Ack {
    code: u8,
    reason: Option<String>,
}

impl Ack {
    /// Asserts a refusal 0x87 whose reason string says why.
    fn assert_denied(&self, what: &str, mentions: &str) {
        assert_eq!(self.code, 0x87, "{what}: {self:?}");
        let reason = self.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains(mentions),
            "{what}: the reason string should mention `{mentions}`: {self:?}"
        );
    }
}

/// One connection on the broker's codec: PUBLISHes that arrive while it waits for something else
/// are acknowledged and kept, in order, for the next `next_publish*`.
struct Peer {
    raw: RawClient,
    name: String,
    next_id: u16,
    inbox: VecDeque<Publish>,
}

impl Peer {
    async fn connect(addr: SocketAddr, connect: Connect) -> Self {
        let name = connect.client_id.as_str().to_owned();
        let (raw, ack) = RawClient::connect(addr, connect).await;
        assert_eq!(ack.code, 0, "CONNECT of `{name}` refused: {ack:?}");
        Peer {
            raw,
            name,
            next_id: 1,
            inbox: VecDeque::new(),
        }
    }

    /// Solution secret: subjects `iot-things:<sol>:<client_id>` and `iot-things:<sol>`.
    async fn secret(
        addr: SocketAddr,
        protocol: Protocol,
        client_id: &str,
        solution: &Solution,
    ) -> Self {
        Self::connect(addr, login(protocol, client_id, solution)).await
    }

    /// MQTT 5 with the JWT as password (the solution comes from its `solution_id` claim).
    async fn jwt(addr: SocketAddr, client_id: &str, token: &str) -> Self {
        let connect = with_login(connect_packet(Protocol::V5, client_id), None, Some(token));
        Self::connect(addr, connect).await
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Acknowledges a delivery (the story subscribes at QoS 1 at most).
    async fn acknowledge(&mut self, p: &Publish) {
        match p.qos {
            QosPid::AtMostOnce => {}
            QosPid::AtLeastOnce(packet_id) => {
                self.raw
                    .send(&Packet::PubAck(PubResponse {
                        packet_id,
                        reason: 0,
                        properties: Properties::default(),
                    }))
                    .await;
            }
            QosPid::ExactlyOnce(_) => panic!("{}: a QoS 2 delivery: {p:?}", self.name),
        }
    }

    /// The next packet that is not a PUBLISH (those are acknowledged and kept).
    async fn next_control(&mut self, waiting_for: &str) -> Packet {
        loop {
            match self.raw.recv_within(NET_TIMEOUT).await {
                Received::Packet(Packet::Publish(p)) => {
                    self.acknowledge(&p).await;
                    self.inbox.push_back(p);
                }
                Received::Packet(Packet::PingResp) => {}
                Received::Packet(other) => return other,
                other => panic!("{}: waiting for {waiting_for}, got {other:?}", self.name),
            }
        }
    }

    /// Subscribes to `filters` (QoS 1 each) in one SUBSCRIBE; the SUBACK's codes.
    async fn subscribe(&mut self, filters: &[&str]) -> Vec<u8> {
        let id = self.packet_id();
        let filters: Vec<_> = filters
            .iter()
            .map(|f| (*f, opts(QoS::AtLeastOnce)))
            .collect();
        self.raw.send(&subscribe(id, &filters, None)).await;
        match self.next_control("SUBACK").await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.packet_id, pid(id), "{ack:?}");
                ack.codes
            }
            other => panic!("{}: expected SUBACK, got {other:?}", self.name),
        }
    }

    /// Subscribes and asserts that QoS 1 was granted for each filter.
    async fn subscribe_ok(&mut self, filters: &[&str]) {
        let codes = self.subscribe(filters).await;
        assert_eq!(codes, vec![1; filters.len()], "{}: {filters:?}", self.name);
    }

    /// Sends `p` at QoS 1 (a fresh packet identifier) and waits for its PUBACK.
    async fn publish(&mut self, mut p: Publish) -> Ack {
        let id = self.packet_id();
        p.qos = qos1(id);
        self.raw.send(&Packet::Publish(p)).await;
        match self.next_control("PUBACK").await {
            Packet::PubAck(ack) => {
                assert_eq!(ack.packet_id, pid(id), "{ack:?}");
                Ack {
                    code: ack.reason,
                    reason: ack
                        .properties
                        .reason_string
                        .as_ref()
                        .map(|r| r.as_str().to_owned()),
                }
            }
            other => panic!("{}: expected PUBACK, got {other:?}", self.name),
        }
    }

    /// Publishes `payload` on `topic_name` at QoS 1; the PUBACK.
    async fn command(&mut self, topic_name: &str, payload: &[u8]) -> Ack {
        self.publish(publish(topic_name, payload, qos1(1))).await
    }

    /// An MQTT 5 request: `payload` on `topic_name` with Response Topic `replies/<client ID>`
    /// and fresh Correlation Data; the PUBACK and the answer (its correlation data checked).
    async fn request(&mut self, topic_name: &str, payload: &[u8]) -> (Ack, Value) {
        let reply_to = format!("replies/{}", self.name);
        let correlation = format!("{}-{}", self.name, self.next_id);
        let mut p = publish(topic_name, payload, qos1(1));
        p.properties.response_topic = Some(topic(&reply_to));
        p.properties.correlation_data = Some(Bytes::from(correlation.clone()));
        let ack = self.publish(p).await;
        let reply = self.next_publish_on(&reply_to).await;
        assert_eq!(
            reply.properties.correlation_data.as_deref(),
            Some(correlation.as_bytes()),
            "{}: the answer must echo the correlation data",
            self.name
        );
        (ack, payload_json(&reply))
    }

    /// Retrieves `path` of thing `thing_id` (compact form, MQTT 5 response topic).
    async fn retrieve(&mut self, thing_id: &str, path: &str) -> (Ack, Value) {
        let (ns, name) = thing_id.split_once(':').unwrap();
        self.request(
            &format!("{ns}/{name}/things/twin/commands/retrieve{path}"),
            b"",
        )
        .await
    }

    /// The first kept or arriving PUBLISH that `wanted` accepts (others are kept).
    async fn next_publish_where(
        &mut self,
        what: &str,
        wanted: impl Fn(&Publish) -> bool,
    ) -> Publish {
        if let Some(i) = self.inbox.iter().position(&wanted) {
            return self.inbox.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + NET_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.raw.recv_within(left).await {
                Received::Packet(Packet::Publish(p)) => {
                    self.acknowledge(&p).await;
                    if wanted(&p) {
                        return p;
                    }
                    self.inbox.push_back(p);
                }
                Received::Packet(Packet::PingResp) => {}
                Received::Silent => panic!(
                    "{}: no {what} within {NET_TIMEOUT:?}; received meanwhile: {:?}",
                    self.name, self.inbox
                ),
                other => panic!("{}: waiting for {what}, got {other:?}", self.name),
            }
        }
    }

    async fn next_publish_on(&mut self, topic_name: &str) -> Publish {
        self.next_publish_where(&format!("PUBLISH on `{topic_name}`"), |p| {
            p.topic.as_str() == topic_name
        })
        .await
    }

    /// The next event delivered: its MQTT topic and envelope.
    async fn next_event(&mut self) -> (String, Value) {
        let p = self
            .next_publish_where("event", |p| {
                p.topic.as_str().contains("/things/twin/events/")
            })
            .await;
        (p.topic.as_str().to_owned(), payload_json(&p))
    }

    /// Asserts that nothing was kept and nothing arrives within [`QUIET`].
    async fn assert_silent(&mut self, what: &str) {
        assert!(
            self.inbox.is_empty(),
            "{} ({what}): expected nothing, received {:?}",
            self.name,
            self.inbox
        );
        match self.raw.recv_within(QUIET).await {
            Received::Silent => {}
            Received::Packet(p) => panic!("{} ({what}): expected nothing, got {p:?}", self.name),
            Received::Closed => panic!("{} ({what}): the connection closed", self.name),
        }
    }
}

fn payload_json(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap_or_else(|e| {
        panic!(
            "the payload on `{}` is not JSON ({e}): {:?}",
            p.topic.as_str(),
            String::from_utf8_lossy(&p.payload)
        )
    })
}

/// Asserts an error envelope: the thing's errors topic, `status` and the Ditto error code.
fn assert_error(reply: &Value, status: u16, error: &str) {
    assert_eq!(reply["topic"], format!("{TWIN}/errors"), "{reply}");
    assert_eq!(reply["status"], status, "{reply}");
    assert_eq!(reply["value"]["status"], status, "{reply}");
    assert_eq!(reply["value"]["error"], error, "{reply}");
}

/// Splits a retrieve answer at the root into Ditto's allowlisted pseudo-fields (`_revision`,
/// `_created`, …, kept whenever the requester has partial READ on `thing:/`) and the rest.
fn without_pseudo_fields(value: &Value) -> Value {
    let mut object = value.as_object().cloned().unwrap_or_default();
    let pseudo: Vec<String> = object
        .keys()
        .filter(|k| k.starts_with('_'))
        .cloned()
        .collect();
    for key in pseudo {
        assert!(
            ["_namespace", "_revision", "_modified", "_created"].contains(&key.as_str()),
            "`{key}` is not one of Ditto's allowlisted fields: {value}"
        );
        object.remove(&key);
    }
    Value::Object(object)
}

// --- writes: the device ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_device_may_write_its_telemetry_while_writes_elsewhere_get_0x87_with_a_reason_and_change_nothing()
 {
    let mut story = Story::begin().await;
    let mut device = story.device(Protocol::V5).await;

    let ack = device
        .command(
            &format!("{TWIN}/commands/modify/features/telemetry/properties/temp"),
            b"21",
        )
        .await;
    assert_eq!(ack.code, 0, "telemetry is the device's to write: {ack:?}");
    assert_eq!(ack.reason, None);

    device
        .command(
            &format!("{TWIN}/commands/modify/features/secret/properties/pin"),
            b"\"0000\"",
        )
        .await
        .assert_denied(
            "the device writes the secret",
            "`WRITE` on `thing:/features/secret/properties/pin` is required",
        );
    device
        .command(
            &format!("{TWIN}/commands/modify/attributes/location"),
            b"\"garage\"",
        )
        .await
        .assert_denied(
            "the device writes an attribute",
            "`thing:/attributes/location`",
        );
    // A merge is checked per leaf: one leaf outside the telemetry refuses the whole merge.
    device
        .command(
            &format!("{TWIN}/commands/merge"),
            br#"{"features":{"telemetry":{"properties":{"temp":99}},"secret":{"properties":{"pin":"0000"}}}}"#,
        )
        .await
        .assert_denied("the device merges into the secret", "`thing:/features/secret/properties/pin`");
    // QoS 2: the refusal is the PUBREC's reason code (and the exchange ends there).
    let exactly_once = publish(
        &format!("{TWIN}/commands/modify/features/secret/properties/pin"),
        b"\"0000\"",
        qos2(500),
    );
    device.raw.send(&Packet::Publish(exactly_once)).await;
    match device.next_control("PUBREC").await {
        Packet::PubRec(rec) => {
            assert_eq!(rec.packet_id, pid(500), "{rec:?}");
            assert_eq!(rec.reason, 0x87, "QoS 2 write of the secret: {rec:?}");
            let reason = rec.properties.reason_string.as_ref().map(|r| r.as_str());
            assert!(
                reason.is_some_and(|r| r.contains("insufficient permissions")),
                "PUBREC 0x87 without a reason string: {rec:?}"
            );
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // When the device asks for answers (Response Topic), the refusal is a Ditto 403 envelope.
    let (ack, reply) = device
        .request(&format!("{TWIN}/commands/delete/features/secret"), b"")
        .await;
    ack.assert_denied("the device deletes the secret", "insufficient permissions");
    assert_error(&reply, 403, "things:feature.notmodifiable");

    let seen = story.owner_view().await;
    assert_eq!(
        seen["features"],
        json!({"telemetry": {"properties": {"temp": 21}}, "secret": secret()}),
        "only the telemetry write was applied"
    );
    assert_eq!(seen["attributes"], attributes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v311_device_gets_a_positive_puback_for_a_denied_write_which_is_not_applied_and_answered_with_403()
 {
    let mut story = Story::begin().await;
    // rumqttc as the device's MQTT 3.1.1 client.
    let mut device = connect_v4_login(story.addr(), "device-1", &story.a.id, &story.a.secret)
        .await
        .unwrap_or_else(|code| panic!("the v3.1.1 device is refused: {code:?}"));
    assert_eq!(
        device
            .subscribe(
                "org.acme/thing/things/twin/responses/#",
                rumqttc::QoS::AtLeastOnce
            )
            .await,
        rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)
    );

    // `publish_qos1` returns once the PUBACK came (3.1.1 has no reason code: it is positive).
    device
        .publish_qos1(
            &format!("{TWIN}/commands/modify/features/telemetry/properties/temp"),
            b"22",
        )
        .await;
    let answer = device.next_publish().await;
    assert_eq!(
        answer.topic,
        "org.acme/thing/things/twin/responses/modify/features/telemetry/properties/temp"
    );
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["status"], 204, "{answer}");

    device
        .publish_qos1(
            &format!("{TWIN}/commands/modify/features/secret/properties/pin"),
            b"\"0000\"",
        )
        .await;
    let answer = device.next_publish().await;
    assert_eq!(
        answer.topic,
        "org.acme/thing/things/twin/responses/modify/features/secret/properties/pin"
    );
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_error(&answer, 403, "things:feature.property.notmodifiable");

    let seen = story.owner_view().await;
    assert_eq!(seen["features"]["telemetry"]["properties"]["temp"], 22);
    assert_eq!(
        seen["features"]["secret"],
        secret(),
        "the PUBACK was positive, the write was not applied"
    );
}

// --- retrieves: each role's partial view ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_retrieves_its_partial_view_and_a_feature_it_may_not_read_is_404() {
    let mut story = Story::begin().await;
    let full = story.owner_view().await;
    assert_eq!(
        full,
        json!({
            "thingId": THING,
            "policyId": POLICY,
            "attributes": attributes(),
            "features": {"telemetry": telemetry(), "secret": secret()},
        })
    );

    // The app user: everything but the secret feature.
    let mut app = story.app().await;
    let (ack, reply) = app.retrieve(THING, "").await;
    assert_eq!(ack.code, 0, "{ack:?}");
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(
        without_pseudo_fields(&reply["value"]),
        json!({
            "thingId": THING,
            "policyId": POLICY,
            "attributes": attributes(),
            "features": {"telemetry": telemetry()},
        })
    );
    let (_, reply) = app.retrieve(THING, "/features").await;
    assert_eq!(reply["value"], json!({"telemetry": telemetry()}), "{reply}");
    let (ack, reply) = app.retrieve(THING, "/features/secret").await;
    ack.assert_denied("the app retrieves the secret", "could not be found");
    assert_error(&reply, 404, "things:feature.notfound");
    let (ack, reply) = app.retrieve(THING, "/features/secret/properties/pin").await;
    ack.assert_denied("the app retrieves the pin", "could not be found");
    assert_error(&reply, 404, "things:feature.property.notfound");

    // The auditor (by group): attributes only, plus the thing ID (partial READ on `thing:/`).
    let mut auditor = story.auditor().await;
    let (ack, reply) = auditor.retrieve(THING, "").await;
    assert_eq!(ack.code, 0, "{ack:?}");
    assert_eq!(
        without_pseudo_fields(&reply["value"]),
        json!({"thingId": THING, "attributes": attributes()}),
        "{reply}"
    );
    let (ack, reply) = auditor.retrieve(THING, "/features").await;
    ack.assert_denied("the auditor retrieves the features", "could not be found");
    assert_error(&reply, 404, "things:features.notfound");
    // The envelope form with a field selector: Ditto's allowlist keeps `_revision` for a
    // requester with partial READ on `thing:/`, the policy cuts `policyId` and `features`.
    assert_eq!(
        auditor.subscribe(&["ditto/responses"]).await,
        [1],
        "the auditor subscribes to the envelope answers"
    );
    let envelope = json!({
        "topic": "org.acme/thing/things/twin/commands/retrieve",
        "path": "/",
        "headers": {"correlation-id": "audit-1"},
        "fields": "thingId,policyId,_revision,attributes/location,features",
    });
    let ack = auditor
        .command("ditto/commands", envelope.to_string().as_bytes())
        .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    let reply = payload_json(&auditor.next_publish_on("ditto/responses").await);
    assert_eq!(reply["status"], 200, "{reply}");
    assert_eq!(reply["headers"]["correlation-id"], "audit-1", "{reply}");
    assert_eq!(
        reply["value"],
        json!({"thingId": THING, "_revision": 1, "attributes": {"location": "kitchen"}}),
        "{reply}"
    );

    // The device: its feature only.
    let mut device = story.device(Protocol::V5).await;
    let (_, reply) = device.retrieve(THING, "").await;
    assert_eq!(
        without_pseudo_fields(&reply["value"]),
        json!({"thingId": THING, "features": {"telemetry": telemetry()}}),
        "{reply}"
    );
}

// --- events: cut per subscriber -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_event_subscribers_get_events_cut_to_their_view_and_none_they_may_not_see() {
    let mut story = Story::begin().await;
    let mut device = story.device(Protocol::V5).await;
    let mut app = story.app().await;
    let mut auditor = story.auditor().await;
    story.owner.subscribe_ok(&[EVENTS]).await;
    device.subscribe_ok(&[EVENTS]).await;
    app.subscribe_ok(&[EVENTS]).await;
    auditor.subscribe_ok(&[EVENTS]).await;
    let mut delivered_to_app = Vec::new();

    // 1. The device writes its telemetry: owner, device and app see it; the auditor does not.
    let temp = format!("{TWIN}/commands/modify/features/telemetry/properties/temp");
    assert_eq!(device.command(&temp, b"23").await.code, 0);
    let temp_event =
        "org.acme/thing/things/twin/events/modified/features/telemetry/properties/temp";
    for peer in [&mut story.owner, &mut device, &mut app] {
        let (topic_name, event) = peer.next_event().await;
        assert_eq!(topic_name, temp_event, "{}", peer.name);
        assert_eq!(
            event["topic"], "org.acme/thing/things/twin/events/modified",
            "{event}"
        );
        assert_eq!(
            event["path"], "/features/telemetry/properties/temp",
            "{event}"
        );
        assert_eq!(event["value"], 23, "{event}");
        assert_eq!(event["revision"], 2, "{event}");
        assert!(event["timestamp"].is_string(), "{event}");
        if peer.name == "app" {
            delivered_to_app.push(event);
        }
    }

    // 2. The owner changes an attribute: app and auditor see it; the device does not.
    let location = format!("{TWIN}/commands/modify/attributes/location");
    assert_eq!(story.owner.command(&location, b"\"hall\"").await.code, 0);
    for peer in [&mut story.owner, &mut app, &mut auditor] {
        let (topic_name, event) = peer.next_event().await;
        assert_eq!(
            topic_name, "org.acme/thing/things/twin/events/modified/attributes/location",
            "{}",
            peer.name
        );
        assert_eq!(event["value"], "hall", "{event}");
        assert_eq!(event["revision"], 3, "{event}");
        if peer.name == "app" {
            delivered_to_app.push(event);
        }
    }

    // 3. The owner changes only the secret: nobody but the owner hears of it.
    let pin = format!("{TWIN}/commands/modify/features/secret/properties/pin");
    assert_eq!(story.owner.command(&pin, b"\"9999\"").await.code, 0);
    let (topic_name, event) = story.owner.next_event().await;
    assert_eq!(
        topic_name,
        "org.acme/thing/things/twin/events/modified/features/secret/properties/pin"
    );
    assert_eq!(event["value"], "9999");
    tokio::join!(
        app.assert_silent("an event only touching the secret feature"),
        auditor.assert_silent("an event only touching the secret feature"),
        device.assert_silent("an event about the device's telemetry or attributes only"),
    );

    // 4. A merge touching the secret, the attributes and the telemetry arrives cut.
    let patch = json!({
        "attributes": {"location": "attic"},
        "features": {
            "secret": {"properties": {"pin": "1111"}},
            "telemetry": {"properties": {"temp": 24}},
        },
    });
    let merge = format!("{TWIN}/commands/merge");
    assert_eq!(
        story
            .owner
            .command(&merge, patch.to_string().as_bytes())
            .await
            .code,
        0
    );
    let merged = "org.acme/thing/things/twin/events/merged";
    let expected = [
        ("owner", patch.clone()),
        (
            "app",
            json!({"attributes": {"location": "attic"}, "features": {"telemetry": {"properties": {"temp": 24}}}}),
        ),
        ("auditor", json!({"attributes": {"location": "attic"}})),
        (
            "device-1",
            json!({"features": {"telemetry": {"properties": {"temp": 24}}}}),
        ),
    ];
    for (peer, (name, value)) in [&mut story.owner, &mut app, &mut auditor, &mut device]
        .into_iter()
        .zip(expected)
    {
        assert_eq!(peer.name, name);
        let (topic_name, event) = peer.next_event().await;
        assert_eq!(topic_name, merged, "{name}");
        assert_eq!(event["path"], "/", "{name}: {event}");
        assert_eq!(event["value"], value, "{name}: the merge cut to its view");
        assert_eq!(event["revision"], 5, "{name}: {event}");
        if name == "app" {
            delivered_to_app.push(event);
        }
    }

    // Nothing else came, and nothing the app received carries the secret feature.
    tokio::join!(
        story.owner.assert_silent("after the story"),
        app.assert_silent("after the story"),
        auditor.assert_silent("after the story"),
        device.assert_silent("after the story"),
    );
    for event in &delivered_to_app {
        let text = event.to_string();
        for leak in ["secret", "pin", "1234", "9999", "1111"] {
            assert!(!text.contains(leak), "the app received `{leak}`: {text}");
        }
    }
}

// --- isolation between solutions ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_granting_another_solutions_subject_does_not_let_that_solution_read_subscribe_or_write()
 {
    let mut story = Story::begin().await;
    let b = story.b.clone();
    let mut intruder = Peer::secret(story.addr(), Protocol::V5, "intruder", &b).await;

    let codes = intruder
        .subscribe(&[
            EVENTS,
            "org.acme/thing/things/twin/events/#",
            "org.acme/thing/things/#",
            "org.acme/thing/things/twin/responses/#",
            "org.acme/+/policies/#",
            // Wildcards and its own namespace are fine: they only match its own topics.
            "+/+/things/twin/events/#",
            "com.other/+/things/twin/events/#",
        ])
        .await;
    assert_eq!(codes, [0x87, 0x87, 0x87, 0x87, 0x87, 1, 1]);
    let mut v311 = Peer::secret(story.addr(), Protocol::V311, "intruder-v3", &b).await;
    assert_eq!(v311.subscribe(&[EVENTS]).await, [0x80]);

    let (ack, reply) = intruder.retrieve(THING, "").await;
    ack.assert_denied(
        "solution B retrieves an org.acme thing",
        "could not be found",
    );
    assert_error(&reply, 404, "things:thing.notfound");
    let (ack, _) = intruder.retrieve(THING, "/attributes").await;
    ack.assert_denied("solution B retrieves the attributes", "could not be found");
    intruder
        .command(
            &format!("{TWIN}/commands/modify/attributes/location"),
            b"\"elsewhere\"",
        )
        .await
        .assert_denied(
            "solution B modifies an attribute",
            "insufficient permissions",
        );
    intruder
        .command(
            &format!("{TWIN}/commands/create"),
            json!({"attributes": {}}).to_string().as_bytes(),
        )
        .await
        .assert_denied("solution B replaces the thing", "insufficient permissions");
    let envelope = json!({
        "topic": "org.acme/thing/things/twin/commands/retrieve",
        "path": "/",
        "headers": {"correlation-id": "b-1"},
    });
    assert_eq!(
        intruder
            .command("ditto/commands", envelope.to_string().as_bytes())
            .await
            .code,
        0x87,
        "solution B retrieves through the envelope"
    );
    assert_eq!(
        intruder
            .command("org.acme/thing-policy/policies/commands/retrieve", b"")
            .await
            .code,
        0x87,
        "solution B retrieves the policy"
    );
    assert_eq!(
        intruder
            .command("org.acme/thing/things/live/messages/switch", b"{}")
            .await
            .code,
        0x87,
        "solution B sends a live message"
    );

    // The thing changes: solution B hears nothing, and nothing it sent was applied.
    let location = format!("{TWIN}/commands/modify/attributes/location");
    assert_eq!(story.owner.command(&location, b"\"porch\"").await.code, 0);
    tokio::join!(
        intruder.assert_silent("an org.acme event"),
        v311.assert_silent("an org.acme event"),
    );
    let seen = story.owner_view().await;
    assert_eq!(
        seen["attributes"],
        json!({"location": "porch", "model": "TG-1"})
    );
}

/// DESIGN.md §1 ("a connection of solution A can never touch B's namespaces") and §4 ("a twin
/// filter naming a namespace the solution does not own is refused (SUBACK 0x87/0x80)"): a filter
/// whose first level is a foreign namespace covers that namespace's twin topics even when its
/// `things` level is a `#` or `+`. (No event could reach B through them, since each solution has
/// its own topic tree; what is asserted is the SUBACK.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_whose_first_level_is_a_foreign_namespace_is_refused_even_with_a_multi_level_wildcard()
 {
    let story = Story::begin().await;
    let mut intruder = Peer::secret(story.addr(), Protocol::V5, "intruder", &story.b).await;
    assert_eq!(
        intruder
            .subscribe(&["org.acme/#", "org.acme/thing/#", "org.acme/+/+/twin/#"])
            .await,
        [0x87, 0x87, 0x87],
        "SUBACK of solution B for filters naming org.acme"
    );
}

// --- live messages: app ↔ device ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_message_goes_from_app_to_device_with_its_properties_and_the_reply_returns_with_the_correlation_data()
 {
    let story = Story::begin().await;
    let mut device = story.device(Protocol::V5).await;
    device
        .subscribe_ok(&["org.acme/thing/things/live/messages/#"])
        .await;
    let mut app = story.app().await;
    app.subscribe_ok(&["app/replies/#"]).await;

    let message_topic = "org.acme/thing/things/live/messages/switch";
    let mut message = publish(message_topic, br#"{"on":true}"#, qos1(1));
    message.properties.response_topic = Some(topic("app/replies/1"));
    message.properties.correlation_data = Some(Bytes::from_static(b"\x00corr-42\xff"));
    message.properties.content_type = Some(utf8("application/json"));
    message
        .properties
        .user_properties
        .push((utf8("trace"), utf8("t-1")));
    let ack = app.publish(message).await;
    assert_eq!(ack.code, 0, "the app may WRITE `message:/`: {ack:?}");

    let received = device.next_publish_on(message_topic).await;
    assert_eq!(&received.payload[..], br#"{"on":true}"#);
    let properties = &received.properties;
    assert_eq!(
        properties.response_topic.as_ref().map(|t| t.as_str()),
        Some("app/replies/1")
    );
    assert_eq!(
        properties.correlation_data.as_deref(),
        Some(&b"\x00corr-42\xff"[..])
    );
    assert_eq!(
        properties.content_type.as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let user: Vec<(&str, &str)> = properties
        .user_properties
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(user, [("trace", "t-1")]);

    // The device answers on the response topic (a plain topic) with the correlation data.
    let mut reply = publish("app/replies/1", br#"{"switched":true}"#, qos1(1));
    reply.properties.correlation_data = properties.correlation_data.clone();
    assert_eq!(device.publish(reply).await.code, 0);
    let answer = app.next_publish_on("app/replies/1").await;
    assert_eq!(&answer.payload[..], br#"{"switched":true}"#);
    assert_eq!(
        answer.properties.correlation_data.as_deref(),
        Some(&b"\x00corr-42\xff"[..])
    );

    // The auditor may not WRITE `message:/…`: refused, and the device receives nothing.
    let mut auditor = story.auditor().await;
    auditor
        .command(message_topic, br#"{"on":false}"#)
        .await
        .assert_denied(
            "the auditor sends a live message",
            "`message:/inbox/messages/switch`",
        );
    device
        .assert_silent("a live message from the auditor")
        .await;
    app.assert_silent("after the round trip").await;
}

// --- creating things ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thing_created_without_a_policy_id_gets_an_inline_policy_granting_its_creators_subjects()
{
    let mut story = Story::begin().await;
    let ack = story
        .owner
        .command(
            "org.acme/inline-lamp/things/twin/commands/create",
            br#"{"attributes":{"on":false}}"#,
        )
        .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    let (_, reply) = story.owner.retrieve("org.acme:inline-lamp", "").await;
    assert_eq!(
        reply["value"],
        json!({"thingId": "org.acme:inline-lamp", "policyId": "org.acme:inline-lamp",
               "attributes": {"on": false}}),
        "{reply}"
    );
    let (ack, reply) = story
        .owner
        .request("org.acme/inline-lamp/policies/commands/retrieve", b"")
        .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    assert_eq!(reply["status"], 200, "{reply}");
    let entries = reply["value"]["entries"].as_object().unwrap();
    assert_eq!(entries.len(), 1, "{reply}");
    let entry = entries.values().next().unwrap();
    let mut subjects: Vec<&str> = entry["subjects"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    subjects.sort_unstable();
    let a = &story.a.id;
    assert_eq!(
        subjects,
        [format!("iot-things:{a}"), format!("iot-things:{a}:owner")],
        "the creator's subjects"
    );
    for resource in ["thing:/", "policy:/", "message:/"] {
        let mut granted: Vec<&str> = entry["resources"][resource]["grant"]
            .as_array()
            .unwrap_or_else(|| panic!("no `{resource}` in {entry}"))
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        granted.sort_unstable();
        assert_eq!(granted, ["READ", "WRITE"], "{resource}: {entry}");
    }

    // The app user is not one of the creator's subjects: the new thing is invisible to it.
    let mut app = story.app().await;
    let (ack, reply) = app.retrieve("org.acme:inline-lamp", "").await;
    ack.assert_denied(
        "the app retrieves the inline-policy thing",
        "could not be found",
    );
    assert_eq!(reply["status"], 404, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_subject_without_create_in_the_solution_policy_cannot_create_a_thing() {
    let mut story = Story::begin().await;
    let mut app = story.app().await;
    let (ack, reply) = app
        .request(
            "org.acme/alice-lamp/things/twin/commands/create",
            br#"{"attributes":{"on":true}}"#,
        )
        .await;
    ack.assert_denied(
        "the app creates a thing",
        "`WRITE` on `thing:/` is required",
    );
    assert_eq!(reply["status"], 403, "{reply}");
    assert_eq!(
        reply["value"]["error"], "things:thing.notmodifiable",
        "{reply}"
    );
    // Nor through a policy it would own.
    let policy = json!({"entries": {"me": {
        "subjects": subject(ALICE),
        "resources": {"thing:/": grant(&["READ", "WRITE"]), "policy:/": grant(&["READ", "WRITE"])},
    }}});
    app.command(
        "org.acme/alice-policy/policies/commands/create",
        policy.to_string().as_bytes(),
    )
    .await
    .assert_denied("the app creates a policy", "insufficient permissions");

    // Nothing was created: the owner finds neither.
    let (ack, reply) = story.owner.retrieve("org.acme:alice-lamp", "").await;
    assert_eq!(ack.code, 0x80, "{ack:?}");
    assert_eq!(reply["value"]["error"], "things:thing.notfound", "{reply}");
    let (ack, reply) = story
        .owner
        .request("org.acme/alice-policy/policies/commands/retrieve", b"")
        .await;
    assert_eq!(ack.code, 0x80, "{ack:?}");
    assert_eq!(
        reply["value"]["error"], "policies:policy.notfound",
        "{reply}"
    );
    // The owner (a secret client: CREATE by the default solution policy) can.
    let ack = story
        .owner
        .command(
            "org.acme/owner-lamp/things/twin/commands/create",
            br#"{"attributes":{"on":true}}"#,
        )
        .await;
    assert_eq!(ack.code, 0, "{ack:?}");
}
