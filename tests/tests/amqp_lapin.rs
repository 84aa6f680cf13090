//! The AMQP 0.9.1 adapter end to end with lapin (DESIGN.md §3 "AMQP 0.9.1 devices", §2, §4):
//! every kind of credential, twin commands with `reply-to` answers and publisher confirms,
//! denied writes, events cut to the consumer's view, one topic space with MQTT, revocation of
//! a live consumer, prefetch and overflow, kill -9, tenant isolation, token expiry, and the
//! queue methods RabbitMQ clients rely on. The real binary, the real lapin; every wait bounded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::amqp::{amqp_addr, confirm_channel, consume, next_within, start_with_amqp, uri};
use e2e::broker::{Broker, Solution};
use e2e::clients::connect_v5_login;
use e2e::http::{Api, Auth, http_addr};
use e2e::issuer::{SOLUTION_CLAIM, dev_issuer, signature_of, unix_now};
use e2e::twin_random_support::{event_topic, policy_command, thing_command};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind,
    ExchangeKind,
};
use serde_json::{Value, json};

/// The namespace of the test solution.
const NS: &str = "org.acme";

/// How long one step (a confirm, an answer, a delivery) may take.
const STEP: Duration = Duration::from_secs(10);

/// How long to watch for a delivery that must not come (each such wait is paired with a
/// barrier where one exists: a later delivery that would have come after it).
const QUIET: Duration = Duration::from_millis(400);

const HOUR: Duration = Duration::from_secs(3600);

/// DESIGN.md §10: a policy change stops deliveries to live subscribers within 50 ms.
const REVOCATION_TARGET: Duration = Duration::from_millis(50);

// --- set-up -------------------------------------------------------------------------------------

/// A stopped broker configured with the dev JWT issuer.
fn new_broker() -> Broker {
    let issuer = dev_issuer();
    let broker = Broker::new();
    issuer.write_jwks(&broker.dir().join("jwks.json"), &[]);
    broker.write_config(&issuer.config_toml("jwks.json"));
    broker
}

/// Starts `broker` with an HTTP and an AMQP listener: the AMQP address and the HTTP API.
fn launch(broker: &mut Broker) -> (SocketAddr, Api) {
    broker.arg("--http").arg("127.0.0.1:0");
    let amqp = start_with_amqp(broker);
    (amqp, Api::new(http_addr(broker)))
}

/// A token of the dev issuer for `sub`, valid for `ttl`, naming `solution` in its claim if given.
fn token(sub: &str, solution: Option<&Solution>, ttl: Duration) -> String {
    let mut claims = dev_issuer().claims(sub, ttl);
    if let Some(solution) = solution {
        claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
    }
    dev_issuer().sign(&claims)
}

/// Client properties naming the connection's client ID.
fn props(client_id: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_client_property(
        "client_id".into(),
        LongString::from(client_id.as_bytes().to_vec()),
    )
}

/// Connects with exactly this user name (lapin's URI parser would turn an empty one into
/// `guest`) and password, PLAIN or (`amqplain`) AMQPLAIN.
async fn login(
    addr: SocketAddr,
    user: &str,
    password: &str,
    amqplain: bool,
    properties: ConnectionProperties,
) -> lapin::Result<Connection> {
    let text = if amqplain {
        format!("{}?auth_mechanism=amqplain", uri(addr, "x", password))
    } else {
        uri(addr, "x", password)
    };
    let mut parsed: AMQPUri = text.parse().expect("an AMQP URI");
    parsed.authority.userinfo.username = user.to_owned();
    tokio::time::timeout(STEP, Connection::connect_uri(parsed, properties))
        .await
        .unwrap_or_else(|_| panic!("no answer to the AMQP handshake within {STEP:?}"))
}

/// A connection with the solution's secret and client ID `client_id`.
async fn with_secret(addr: SocketAddr, solution: &Solution, client_id: &str) -> Connection {
    login(
        addr,
        &solution.id,
        &solution.secret,
        false,
        props(client_id),
    )
    .await
    .unwrap_or_else(|e| panic!("secret connection `{client_id}` refused: {e}"))
}

/// A connection with a JWT whose claim names the solution.
async fn with_token(addr: SocketAddr, token: &str, client_id: &str) -> Connection {
    login(addr, "", token, false, props(client_id))
        .await
        .unwrap_or_else(|e| panic!("token connection `{client_id}` refused: {e}"))
}

/// The AMQP routing key of an MQTT topic (DESIGN.md §3: `/` ⇄ `.`, `+` ⇄ `*`, a `.` inside a
/// level is `/`), written here from the specification, not from the server's code.
fn key(topic: &str) -> String {
    topic
        .split('/')
        .map(|level| {
            if level == "+" {
                "*".to_owned()
            } else {
                level.replace('.', "/")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The AMQP error of a failed lapin call: (reply code, reply text).
fn amqp_error(error: &lapin::Error) -> (u16, String) {
    match error.kind() {
        ErrorKind::ProtocolError(e) => (e.get_id(), e.get_message().as_str().to_owned()),
        other => panic!("expected an AMQP error from the server, got {other:?}"),
    }
}

/// Publishes with confirms on and waits for the confirm.
async fn publish(
    channel: &Channel,
    key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Confirmation {
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .unwrap_or_else(|e| panic!("basic.publish {key}: {e}"));
    tokio::time::timeout(STEP, confirm)
        .await
        .unwrap_or_else(|_| panic!("no confirm for {key} within {STEP:?}"))
        .unwrap_or_else(|e| panic!("confirm for {key}: {e}"))
}

/// Persistent (`delivery-mode` 2: QoS 1).
fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Asserts that nothing is delivered to `consumer` within `limit`.
async fn assert_quiet(consumer: &mut Consumer, limit: Duration, what: &str) {
    if let Some(d) = next_within(consumer, limit).await {
        panic!(
            "{what}: unexpected delivery {} {}",
            d.routing_key,
            String::from_utf8_lossy(&d.data)
        );
    }
}

/// The next delivery, which must come within [`STEP`].
async fn next(consumer: &mut Consumer, what: &str) -> lapin::message::Delivery {
    next_within(consumer, STEP)
        .await
        .unwrap_or_else(|| panic!("{what}: nothing delivered within {STEP:?}"))
}

fn body_json(delivery: &lapin::message::Delivery) -> Value {
    serde_json::from_slice(&delivery.data).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&delivery.data)
        )
    })
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match header(properties, name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// A requester over AMQP: a confirm channel and an exclusive server-named queue for the
/// answers, named as `reply-to` of every command.
struct Requester {
    channel: Channel,
    queue: String,
    answers: Consumer,
}

/// What a command got: the confirm and the answer (envelope and its delivery).
struct Answered {
    confirm: Confirmation,
    envelope: Value,
    delivery: lapin::message::Delivery,
}

impl Requester {
    async fn new(connection: &Connection) -> Self {
        let channel = confirm_channel(connection).await;
        let (queue, answers) = consume(&channel, &[], true).await;
        Requester {
            channel,
            queue,
            answers,
        }
    }

    fn properties(&self, correlation: &str) -> BasicProperties {
        persistent()
            .with_reply_to(self.queue.as_str().into())
            .with_correlation_id(correlation.into())
            .with_content_type("application/json".into())
    }

    /// Publishes `body` on the MQTT `topic`'s routing key with `reply-to` and
    /// `correlation-id`, and waits for the confirm and the answer.
    async fn request(&mut self, topic: &str, body: &[u8], correlation: &str) -> Answered {
        let confirm = publish(
            &self.channel,
            &key(topic),
            body,
            self.properties(correlation),
        )
        .await;
        let delivery = next(&mut self.answers, &format!("the answer to {topic}")).await;
        self.check_answer(&delivery, correlation);
        Answered {
            confirm,
            envelope: body_json(&delivery),
            delivery,
        }
    }

    /// An answer comes through the default exchange to the queue, with the correlation ID.
    fn check_answer(&self, delivery: &lapin::message::Delivery, correlation: &str) {
        assert_eq!(
            delivery.exchange.as_str(),
            "",
            "answers use the default exchange"
        );
        assert_eq!(
            delivery.routing_key.as_str(),
            self.queue,
            "an answer's routing key is the reply queue's name"
        );
        assert_eq!(
            delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(ShortString::as_str),
            Some(correlation),
            "the correlation ID comes back with the answer: {}",
            String::from_utf8_lossy(&delivery.data)
        );
    }
}

fn status(envelope: &Value) -> u64 {
    envelope["status"]
        .as_u64()
        .unwrap_or_else(|| panic!("an answer without status: {envelope}"))
}

/// The thing over HTTP (Basic with the solution's secret): status 200 and the JSON.
async fn http_thing(api: &Api, solution: &Solution, thing: &str) -> (Value, String) {
    let got = api
        .get(&format!("/api/2/things/{thing}"), &Auth::basic(solution))
        .await;
    assert_eq!(got.status, 200, "GET {thing}: {got:?}");
    let etag = got.header("etag").unwrap_or_default().to_owned();
    (got.body, etag)
}

fn subjects(names: &[&str]) -> Value {
    Value::Object(
        names
            .iter()
            .map(|s| ((*s).to_owned(), json!({"type": "e2e"})))
            .collect(),
    )
}

/// A policy whose owner is the solution itself (every secret client and HTTP Basic) plus
/// `extra` entries.
fn owned_policy(solution: &Solution, extra: Value) -> Value {
    let mut entries = json!({
        "owner": {
            "subjects": subjects(&[&format!("iot-things:{}", solution.id)]),
            "resources": {
                "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                "message:/": {"grant": ["READ", "WRITE"], "revoke": []}
            }
        }
    });
    if let (Some(entries), Value::Object(extra)) = (entries.as_object_mut(), extra) {
        entries.extend(extra);
    }
    json!({ "entries": entries })
}

/// Creates policy `id` and thing `id` (the same ID) over HTTP.
async fn create_over_http(api: &Api, solution: &Solution, id: &str, policy: &Value, thing: &Value) {
    let owner = Auth::basic(solution);
    let created = api
        .put(&format!("/api/2/policies/{id}"), &owner, policy)
        .await;
    assert_eq!(created.status, 201, "policy {id}: {created:?}");
    let mut thing = thing.clone();
    thing["policyId"] = json!(id);
    let created = api
        .put(&format!("/api/2/things/{id}"), &owner, &thing)
        .await;
    assert_eq!(created.status, 201, "thing {id}: {created:?}");
}

/// The value of counter `name` (with labels) in a Prometheus text exposition; 0 if absent.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

// --- 1. credentials -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_credential_connects_and_every_bad_one_is_refused_with_a_neutral_403() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    // JWT subjects may use the plain topics (secret clients may by the default solution policy).
    broker.grant_topics(
        &solution.id,
        &["dev:alice", "dev:bob", "dev:carol", "dev:dave"],
    );
    let (addr, _api) = launch(&mut broker);

    // A witness of the solution: whatever the connections below publish on `creds.…` in this
    // solution's topic space reaches it.
    let witness = with_secret(addr, &solution, "witness").await;
    let witness_channel = witness.create_channel().await.unwrap();
    let (_, mut seen) = consume(&witness_channel, &["creds.#"], true).await;

    let with_claim = token("alice", Some(&solution), HOUR);
    let no_claim_bob = token("bob", None, HOUR);
    let no_claim_carol = token("carol", None, HOUR);
    let with_claim_dave = token("dave", Some(&solution), HOUR);
    let api_token_props = props("carol-app")
        .with_client_property("x-cr-api-token".into(), solution.api_token.as_str().into());
    let good: Vec<(&str, lapin::Result<Connection>)> = vec![
        (
            "secret",
            login(
                addr,
                &solution.id,
                &solution.secret,
                false,
                props("sec-plain"),
            )
            .await,
        ),
        (
            "secret-amqplain",
            login(
                addr,
                &solution.id,
                &solution.secret,
                true,
                props("sec-amqplain"),
            )
            .await,
        ),
        (
            "jwt-claim",
            login(addr, "", &with_claim, false, props("alice-app")).await,
        ),
        (
            "jwt-api-token-user",
            login(
                addr,
                &solution.api_token,
                &no_claim_bob,
                false,
                props("bob-app"),
            )
            .await,
        ),
        (
            "jwt-api-token-property",
            login(addr, "", &no_claim_carol, false, api_token_props).await,
        ),
        (
            "jwt-amqplain",
            login(addr, "", &with_claim_dave, true, props("dave-app")).await,
        ),
    ];
    for (tag, connection) in good {
        let connection = connection.unwrap_or_else(|e| panic!("{tag}: refused: {e}"));
        let channel = confirm_channel(&connection).await;
        let confirm = publish(
            &channel,
            &format!("creds.{tag}"),
            tag.as_bytes(),
            persistent(),
        )
        .await;
        assert!(
            confirm.is_ack(),
            "{tag}: its publish is allowed: {confirm:?}"
        );
        let delivery = next(&mut seen, tag).await;
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("creds.{tag}"),
            "{tag}: the connection is in the solution's topic space"
        );
        connection.close(200, "bye".into()).await.unwrap();
    }

    let wrong_secret = "0000-not-the-secret-0000-0000-0000-0000";
    let mut expired_claims = dev_issuer().claims("erin", HOUR);
    expired_claims.insert("exp".into(), json!(unix_now() - 120));
    expired_claims.insert("iat".into(), json!(unix_now() - 3600));
    expired_claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
    let expired = dev_issuer().sign(&expired_claims);
    let tampered = {
        let mut claims = dev_issuer().claims("frank", HOUR);
        claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
        dev_issuer().tampered(&claims)
    };
    let unidentified = token("gina", None, HOUR);
    let bad: Vec<(&str, lapin::Result<Connection>)> = vec![
        (
            "wrong secret",
            login(addr, &solution.id, wrong_secret, false, props("bad-1")).await,
        ),
        (
            "wrong secret (AMQPLAIN)",
            login(addr, &solution.id, wrong_secret, true, props("bad-2")).await,
        ),
        (
            "unknown solution",
            login(
                addr,
                "no-such-solution",
                &solution.secret,
                false,
                props("bad-3"),
            )
            .await,
        ),
        (
            "expired token",
            login(addr, "", &expired, false, props("bad-4")).await,
        ),
        (
            "tampered token",
            login(addr, "", &tampered, false, props("bad-5")).await,
        ),
        (
            "token naming no solution, no API token",
            login(addr, "", &unidentified, false, props("bad-6")).await,
        ),
        (
            "token with an unknown API token",
            login(
                addr,
                "not-an-api-token",
                &unidentified,
                false,
                props("bad-7"),
            )
            .await,
        ),
        (
            "the API token alone as password",
            login(
                addr,
                &solution.id,
                &solution.api_token,
                false,
                props("bad-8"),
            )
            .await,
        ),
    ];
    let mut texts = Vec::new();
    for (what, result) in bad {
        let error = match result {
            Ok(_) => panic!("{what}: the connection was accepted"),
            Err(e) => e,
        };
        let (code, text) = amqp_error(&error);
        assert_eq!(code, 403, "{what}: ACCESS_REFUSED: {text}");
        assert!(text.starts_with("ACCESS_REFUSED"), "{what}: {text}");
        for secret in [
            wrong_secret,
            solution.secret.as_str(),
            "no-such-solution",
            "expired",
            "token",
        ] {
            assert!(
                !text.contains(secret),
                "{what}: the refusal says too much: {text}"
            );
        }
        texts.push(text);
    }
    // The text names only the mechanism the client used (as RabbitMQ's does), never why.
    let mut texts: Vec<String> = texts
        .iter()
        .map(|t| t.replace("mechanism AMQPLAIN", "mechanism PLAIN"))
        .collect();
    texts.sort();
    texts.dedup();
    assert_eq!(texts.len(), 1, "every refusal reads the same: {texts:?}");

    broker.assert_logs_never_contain(&[
        &solution.secret,
        wrong_secret,
        &solution.api_token,
        signature_of(&with_claim),
        signature_of(&no_claim_bob),
        signature_of(&no_claim_carol),
        signature_of(&with_claim_dave),
        signature_of(&expired),
        signature_of(&tampered),
        signature_of(&unidentified),
    ]);
}

// --- 2. twin commands with answers ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_commands_over_amqp_are_confirmed_and_answered_to_the_reply_queue_with_the_correlation_id()
 {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, api) = launch(&mut broker);
    let connection = with_secret(addr, &solution, "app").await;
    let mut app = Requester::new(&connection).await;
    let thing = "org.acme:lamp-1";

    let created = app
        .request(
            &thing_command(thing, "create", ""),
            json!({"attributes": {"room": "hall"}, "features": {"temp": {"properties": {"value": 20}}}})
                .to_string()
                .as_bytes(),
            "c-create",
        )
        .await;
    assert!(created.confirm.is_ack(), "{:?}", created.confirm);
    assert_eq!(status(&created.envelope), 201, "{}", created.envelope);
    assert_eq!(
        created.envelope["value"]["thingId"], thing,
        "{}",
        created.envelope
    );

    let modified = app
        .request(
            &thing_command(thing, "modify", "/features/temp/properties/value"),
            b"21.5",
            "c-modify-1",
        )
        .await;
    assert!(modified.confirm.is_ack());
    assert_eq!(status(&modified.envelope), 204, "{}", modified.envelope);
    assert_eq!(
        modified.envelope["path"], "/features/temp/properties/value",
        "{}",
        modified.envelope
    );

    let modified = app
        .request(
            &thing_command(thing, "modify", "/attributes/room"),
            b"\"kitchen\"",
            "c-modify-2",
        )
        .await;
    assert!(modified.confirm.is_ack());
    assert_eq!(status(&modified.envelope), 204, "{}", modified.envelope);

    let merged = app
        .request(
            &thing_command(thing, "merge", "/features/temp/properties"),
            br#"{"unit":"C"}"#,
            "c-merge",
        )
        .await;
    assert!(merged.confirm.is_ack());
    assert_eq!(status(&merged.envelope), 204, "{}", merged.envelope);

    let retrieved = app
        .request(
            &thing_command(thing, "retrieve", "/features/temp"),
            b"",
            "c-retrieve",
        )
        .await;
    assert!(retrieved.confirm.is_ack());
    assert_eq!(status(&retrieved.envelope), 200, "{}", retrieved.envelope);
    assert_eq!(
        retrieved.envelope["value"],
        json!({"properties": {"value": 21.5, "unit": "C"}}),
        "{}",
        retrieved.envelope
    );
    assert_eq!(
        retrieved.delivery.properties.delivery_mode(),
        &Some(2),
        "the answer to a persistent command is persistent (QoS 1)"
    );

    // Two requests in flight at once: each answer carries its own correlation ID.
    let mut confirms = Vec::new();
    for (correlation, path) in [
        ("c-a", "/attributes"),
        ("c-b", "/features/temp/properties/value"),
    ] {
        let confirm = app
            .channel
            .basic_publish(
                "amq.topic".into(),
                key(&thing_command(thing, "retrieve", path)).as_str().into(),
                BasicPublishOptions::default(),
                b"",
                app.properties(correlation),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirm = tokio::time::timeout(STEP, confirm).await.unwrap().unwrap();
        assert!(confirm.is_ack(), "{confirm:?}");
    }
    let mut pipelined = Vec::new();
    for _ in 0..2 {
        let d = next(&mut app.answers, "a pipelined answer").await;
        let correlation = d.properties.correlation_id().clone().unwrap();
        pipelined.push((
            correlation.as_str().to_owned(),
            body_json(&d)["value"].clone(),
        ));
    }
    pipelined.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        pipelined,
        vec![
            ("c-a".to_owned(), json!({"room": "kitchen"})),
            ("c-b".to_owned(), json!(21.5)),
        ]
    );

    // Failures are answered with Ditto's errors and nacked.
    let missing = app
        .request(
            &thing_command("org.acme:nothing", "retrieve", ""),
            b"",
            "c-missing",
        )
        .await;
    assert!(
        missing.confirm.is_nack(),
        "a failed retrieve is nacked: {:?}",
        missing.confirm
    );
    assert_eq!(status(&missing.envelope), 404, "{}", missing.envelope);
    assert_eq!(
        missing.envelope["value"]["error"], "things:thing.notfound",
        "{}",
        missing.envelope
    );
    let again = app
        .request(&thing_command(thing, "create", ""), b"{}", "c-create-again")
        .await;
    assert!(again.confirm.is_nack(), "{:?}", again.confirm);
    assert_eq!(status(&again.envelope), 409, "{}", again.envelope);

    // The same twin over HTTP: create + 2 modifies + merge = revision 4.
    let (doc, etag) = http_thing(&api, &solution, thing).await;
    assert_eq!(doc["attributes"], json!({"room": "kitchen"}), "{doc}");
    assert_eq!(
        doc["features"]["temp"]["properties"],
        json!({"value": 21.5, "unit": "C"}),
        "{doc}"
    );
    assert_eq!(etag, "\"rev:4\"", "{doc}");
    connection.close(200, "bye".into()).await.unwrap();
}

// --- 3. a denied write ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_twin_write_is_nacked_answered_with_403_never_applied_and_the_connection_stays() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, api) = launch(&mut broker);
    let thing = "org.acme:guarded";
    let policy = owned_policy(
        &solution,
        json!({
            "device": {
                "subjects": subjects(&["dev:bob"]),
                "resources": {
                    "thing:/": {"grant": ["READ"], "revoke": []},
                    "thing:/features/temp": {"grant": ["WRITE"], "revoke": []}
                }
            }
        }),
    );
    create_over_http(
        &api,
        &solution,
        thing,
        &policy,
        &json!({"attributes": {"room": "hall"}, "features": {"temp": {"properties": {"value": 20}}}}),
    )
    .await;

    let bob = with_token(addr, &token("bob", Some(&solution), HOUR), "bob-device").await;
    let mut device = Requester::new(&bob).await;
    let denied = device
        .request(
            &thing_command(thing, "modify", "/attributes/room"),
            b"\"attic\"",
            "c-denied",
        )
        .await;
    assert!(
        denied.confirm.is_nack(),
        "a denied write is nacked: {:?}",
        denied.confirm
    );
    assert_eq!(status(&denied.envelope), 403, "{}", denied.envelope);
    let error = denied.envelope["value"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.starts_with("things:") && error.ends_with(".notmodifiable"),
        "Ditto's error: {}",
        denied.envelope
    );
    // Without reply-to: only the nack.
    let confirm = publish(
        &device.channel,
        &key(&thing_command(thing, "modify", "/attributes/room")),
        b"\"cellar\"",
        persistent(),
    )
    .await;
    assert!(confirm.is_nack(), "{confirm:?}");
    // A merge touching a leaf it may not write is denied as a whole.
    let merge = device
        .request(
            &thing_command(thing, "merge", ""),
            br#"{"attributes":{"room":"roof"},"features":{"temp":{"properties":{"value":99}}}}"#,
            "c-merge",
        )
        .await;
    assert!(merge.confirm.is_nack(), "{:?}", merge.confirm);
    assert_eq!(status(&merge.envelope), 403, "{}", merge.envelope);

    let (doc, etag) = http_thing(&api, &solution, thing).await;
    assert_eq!(doc["attributes"]["room"], "hall", "never applied: {doc}");
    assert_eq!(doc["features"]["temp"]["properties"]["value"], 20, "{doc}");
    assert_eq!(etag, "\"rev:1\"");

    // The same connection and channel go on: an allowed write is confirmed and applied.
    let allowed = device
        .request(
            &thing_command(thing, "modify", "/features/temp/properties/value"),
            b"30",
            "c-ok",
        )
        .await;
    assert!(allowed.confirm.is_ack(), "{:?}", allowed.confirm);
    assert_eq!(status(&allowed.envelope), 204, "{}", allowed.envelope);
    let (doc, etag) = http_thing(&api, &solution, thing).await;
    assert_eq!(doc["features"]["temp"]["properties"]["value"], 30, "{doc}");
    assert_eq!(doc["attributes"]["room"], "hall", "{doc}");
    assert_eq!(etag, "\"rev:2\"");
    assert!(bob.status().connected());
}

// --- 4. events cut to the consumer's view ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_an_amqp_consumer_cut_to_its_view_and_not_at_all_where_it_reads_nothing() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, api) = launch(&mut broker);
    let thing = "org.acme:lamp";
    let policy = owned_policy(
        &solution,
        json!({
            "viewer": {
                "subjects": subjects(&["dev:carol"]),
                "resources": {"thing:/features/temp": {"grant": ["READ"], "revoke": []}}
            }
        }),
    );
    create_over_http(
        &api,
        &solution,
        thing,
        &policy,
        &json!({
            "attributes": {"room": "hall"},
            "features": {
                "temp": {"properties": {"value": 20}},
                "humidity": {"properties": {"value": 40}}
            }
        }),
    )
    .await;
    let events = key(&format!(
        "{}/#",
        event_topic(thing, "", "").trim_end_matches('/')
    ));
    assert_eq!(events, "org/acme.lamp.things.twin.events.#");

    let carol = with_token(addr, &token("carol", Some(&solution), HOUR), "carol-app").await;
    let carol_channel = carol.create_channel().await.unwrap();
    let (_, mut carol_sees) = consume(&carol_channel, &[&events], false).await;
    let owner = with_secret(addr, &solution, "owner").await;
    let owner_channel = confirm_channel(&owner).await;
    let (_, mut control) = consume(&owner_channel, &[&events], true).await;

    let modify = |path: &str| key(&thing_command(thing, "modify", path));
    // One event over both features: carol's copy holds `temp` only.
    let confirm = publish(
        &owner_channel,
        &modify("/features"),
        br#"{"temp":{"properties":{"value":21}},"humidity":{"properties":{"value":41}}}"#,
        persistent(),
    )
    .await;
    assert!(confirm.is_ack());
    let full = body_json(&next(&mut control, "the control's event").await);
    assert_eq!(
        full["value"]["humidity"]["properties"]["value"], 41,
        "{full}"
    );
    let cut = next(&mut carol_sees, "carol's cut event").await;
    assert_eq!(
        cut.routing_key.as_str(),
        key(&event_topic(thing, "modified", "/features"))
    );
    let cut_json = body_json(&cut);
    assert_eq!(
        cut_json["value"],
        json!({"temp": {"properties": {"value": 21}}}),
        "{cut_json}"
    );
    assert_eq!(cut_json["revision"], 2, "{cut_json}");
    cut.ack(BasicAckOptions::default()).await.unwrap();

    // Events on paths carol cannot read are not delivered at all; the temp event after them
    // is her next delivery (deliveries keep their order).
    for (path, value) in [
        ("/attributes/room", "\"kitchen\""),
        ("/features/humidity/properties/value", "42"),
        ("/features/temp/properties/value", "22"),
    ] {
        let confirm = publish(
            &owner_channel,
            &modify(path),
            value.as_bytes(),
            persistent(),
        )
        .await;
        assert!(confirm.is_ack(), "{path}");
        let seen = body_json(&next(&mut control, path).await);
        assert_eq!(seen["path"], path, "{seen}");
    }
    let next_for_carol = next(&mut carol_sees, "the temp event").await;
    let doc = body_json(&next_for_carol);
    assert_eq!(doc["path"], "/features/temp/properties/value", "{doc}");
    assert_eq!(doc["value"], 22);
    assert_eq!(doc["revision"], 5, "{doc}");
    next_for_carol
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    assert_quiet(&mut carol_sees, QUIET, "carol").await;
}

// --- 5. one topic space with MQTT ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_amqp_share_one_topic_space_with_their_properties_mapped_both_ways() {
    use rumqttc::v5::mqttbytes::QoS as Qos5;
    use rumqttc::v5::mqttbytes::v5::PublishProperties;

    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    let mut mqtt = connect_v5_login(broker.mqtt_addr(), "mqtt5", &solution.id, &solution.secret)
        .await
        .expect("MQTT 5 connect");
    let amqp = with_secret(addr, &solution, "amqp-app").await;
    let channel = confirm_channel(&amqp).await;
    let thing = "org.acme:lamp";
    let (_, mut amqp_sees) = consume(
        &channel,
        &[
            "sensors.#",
            "v1/2.#",
            &key(&format!(
                "{}/#",
                event_topic(thing, "", "").trim_end_matches('/')
            )),
        ],
        false,
    )
    .await;
    for filter in ["commands/#", "v1.2/#", "org.acme/lamp/things/twin/events/#"] {
        let code = mqtt.subscribe(filter, Qos5::AtLeastOnce).await;
        assert!(
            matches!(
                code,
                rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
            ),
            "{filter}: {code:?}"
        );
    }

    // MQTT → AMQP, with properties.
    let properties = PublishProperties {
        content_type: Some("application/json".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-1")),
        user_properties: vec![("unit".into(), "C".into()), ("site".into(), "b7".into())],
        response_topic: Some("answers/s1".into()),
        ..PublishProperties::default()
    };
    mqtt.client
        .publish_with_properties(
            "sensors/s1/temp",
            Qos5::AtLeastOnce,
            false,
            "21.5",
            properties,
        )
        .await
        .unwrap();
    let d = next(&mut amqp_sees, "the MQTT publish").await;
    assert_eq!(d.exchange.as_str(), "amq.topic");
    assert_eq!(d.routing_key.as_str(), "sensors.s1.temp");
    assert_eq!(d.data, b"21.5");
    let p = &d.properties;
    assert_eq!(
        p.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    assert_eq!(
        p.correlation_id().as_ref().map(ShortString::as_str),
        Some("corr-1")
    );
    assert_eq!(
        p.reply_to().as_ref().map(ShortString::as_str),
        Some("answers.s1")
    );
    assert_eq!(p.delivery_mode(), &Some(2), "QoS 1 is persistent");
    assert_eq!(header_text(p, "unit").as_deref(), Some("C"));
    assert_eq!(header_text(p, "site").as_deref(), Some("b7"));
    d.ack(BasicAckOptions::default()).await.unwrap();
    // A `.` inside an MQTT level is `/` in the routing key.
    mqtt.client
        .publish("v1.2/status", Qos5::AtMostOnce, false, "up")
        .await
        .unwrap();
    let d = next(&mut amqp_sees, "the dotted topic").await;
    assert_eq!(d.routing_key.as_str(), "v1/2.status");
    assert_eq!(d.properties.delivery_mode(), &None, "QoS 0 is transient");
    d.ack(BasicAckOptions::default()).await.unwrap();
    let own = mqtt.next_publish().await; // the MQTT client's own `v1.2/#` subscription
    assert_eq!(
        (&own.topic[..], &own.payload[..]),
        (&b"v1.2/status"[..], &b"up"[..])
    );

    // AMQP → MQTT, with properties.
    let mut headers = FieldTable::default();
    headers.insert("origin".into(), AMQPValue::LongString("amqp".into()));
    headers.insert("n".into(), AMQPValue::LongInt(7));
    let confirm = publish(
        &channel,
        "commands.s1",
        b"on",
        persistent()
            .with_content_type("text/plain".into())
            .with_correlation_id("corr-2".into())
            .with_reply_to("answers.s1".into())
            .with_headers(headers),
    )
    .await;
    assert!(confirm.is_ack(), "{confirm:?}");
    let p = mqtt.next_publish().await;
    assert_eq!(&p.topic[..], b"commands/s1");
    assert_eq!(&p.payload[..], b"on");
    assert_eq!(p.qos, Qos5::AtLeastOnce);
    let mqtt_props = p.properties.expect("MQTT 5 properties");
    assert_eq!(mqtt_props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(mqtt_props.correlation_data.as_deref(), Some(&b"corr-2"[..]));
    assert_eq!(
        mqtt_props.response_topic.as_deref(),
        Some("answers/s1"),
        "reply-to ⇄ response topic"
    );
    let user = &mqtt_props.user_properties;
    assert!(user.contains(&("origin".into(), "amqp".into())), "{user:?}");
    assert!(user.contains(&("n".into(), "7".into())), "{user:?}");
    let confirm = publish(&channel, "v1/2.status", b"down", BasicProperties::default()).await;
    assert!(confirm.is_ack());
    let p = mqtt.next_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..]),
        (&b"v1.2/status"[..], &b"down"[..])
    );
    assert_eq!(p.qos, Qos5::AtMostOnce);
    let d = next(&mut amqp_sees, "the AMQP client's own dotted publish").await;
    assert_eq!(
        (d.routing_key.as_str(), d.data.as_slice()),
        ("v1/2.status", &b"down"[..])
    );
    d.ack(BasicAckOptions::default()).await.unwrap();

    // A twin event: the MQTT device's create and modify reach the AMQP consumer …
    let reason = mqtt
        .publish_qos1(
            &thing_command(thing, "create", ""),
            json!({"features": {"temp": {"properties": {"value": 20}}}})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    let created = next(&mut amqp_sees, "the created event").await;
    assert_eq!(
        created.routing_key.as_str(),
        key(&event_topic(thing, "created", ""))
    );
    created.ack(BasicAckOptions::default()).await.unwrap();
    let _ = mqtt.next_publish().await; // the MQTT device's own created event
    let reason = mqtt
        .publish_qos1(
            &thing_command(thing, "modify", "/features/temp/properties/value"),
            b"21",
        )
        .await;
    assert_eq!(reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
    let modified = next(&mut amqp_sees, "the modified event").await;
    assert_eq!(
        modified.routing_key.as_str(),
        "org/acme.lamp.things.twin.events.modified.features.temp.properties.value"
    );
    let doc = body_json(&modified);
    assert_eq!(
        (doc["value"].clone(), doc["revision"].clone()),
        (json!(21), json!(2)),
        "{doc}"
    );
    modified.ack(BasicAckOptions::default()).await.unwrap();
    let _ = mqtt.next_publish().await;
    // … and the AMQP client's modify reaches the MQTT subscriber.
    let confirm = publish(
        &channel,
        &key(&thing_command(
            thing,
            "modify",
            "/features/temp/properties/value",
        )),
        b"22",
        persistent(),
    )
    .await;
    assert!(confirm.is_ack());
    let p = mqtt.next_publish().await;
    assert_eq!(
        std::str::from_utf8(&p.topic).unwrap(),
        event_topic(thing, "modified", "/features/temp/properties/value")
    );
    let doc: Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(
        (doc["value"].clone(), doc["revision"].clone()),
        (json!(22), json!(3)),
        "{doc}"
    );
}

// --- 6. revocation of a live consumer --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_amqp_consumer_receives_nothing_50_ms_after_the_policy_change_is_confirmed() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, api) = launch(&mut broker);
    let thing = "org.acme:lamp";
    let watcher_entry = |read: bool| {
        let (grant, revoke) = if read {
            (json!(["READ"]), json!([]))
        } else {
            (json!([]), json!(["READ"]))
        };
        json!({
            "subjects": subjects(&["dev:watcher"]),
            "resources": {"thing:/": {"grant": grant, "revoke": revoke}}
        })
    };
    let policy = owned_policy(&solution, json!({ "watcher": watcher_entry(true) }));
    create_over_http(
        &api,
        &solution,
        thing,
        &policy,
        &json!({"attributes": {"n": 0}}),
    )
    .await;
    let events = "org/acme.lamp.things.twin.events.#";

    // The watcher: every delivery timestamped as lapin hands it over.
    let watcher = with_token(addr, &token("watcher", Some(&solution), HOUR), "watcher").await;
    let watcher_channel = watcher.create_channel().await.unwrap();
    let (_, mut watcher_consumer) = consume(&watcher_channel, &[events], true).await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, u64)>();
    let watching = tokio::spawn(async move {
        while let Some(Ok(d)) = watcher_consumer.next().await {
            let at = Instant::now();
            let revision = serde_json::from_slice::<Value>(&d.data)
                .ok()
                .and_then(|v| v["revision"].as_u64())
                .unwrap_or(0);
            if seen_tx.send((at, revision)).is_err() {
                break;
            }
        }
    });

    // A control consumer that keeps READ: events keep flowing after the change.
    let owner = with_secret(addr, &solution, "owner").await;
    let owner_channel = confirm_channel(&owner).await;
    let control_channel = owner.create_channel().await.unwrap();
    let (_, mut control) = consume(&control_channel, &[events], true).await;

    // The device: one modify in flight at a time, continuously.
    let device = with_secret(addr, &solution, "device").await;
    let device_channel = confirm_channel(&device).await;
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publishing = {
        let (stop, published) = (stop.clone(), published.clone());
        let topic = key(&thing_command(thing, "modify", "/attributes/n"));
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let confirm = publish(
                    &device_channel,
                    &topic,
                    n.to_string().as_bytes(),
                    persistent(),
                )
                .await;
                assert!(confirm.is_ack(), "modify {n}: {confirm:?}");
                published.store(n, Ordering::Relaxed);
            }
            n
        })
    };

    // Granted: the watcher sees events.
    let mut before = 0;
    let deadline = Instant::now() + STEP;
    while before < 20 {
        assert!(
            Instant::now() < deadline,
            "the watcher saw only {before} events"
        );
        if tokio::time::timeout(STEP, seen_rx.recv())
            .await
            .ok()
            .flatten()
            .is_some()
        {
            before += 1;
        }
    }

    // Deliveries flowing right up to the change.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Revoke: modify the watcher's entry; the instant its confirm arrives is the reference.
    let entry = key(&policy_command(thing, "modify", "/entries/watcher"));
    let sent = Instant::now();
    let confirm = publish(
        &owner_channel,
        &entry,
        watcher_entry(false).to_string().as_bytes(),
        persistent(),
    )
    .await;
    let acked = Instant::now();
    assert!(
        confirm.is_ack(),
        "the policy change is confirmed: {confirm:?}"
    );
    let published_at_ack = published.load(Ordering::Relaxed);

    // The device keeps going for a while; then everything the watcher got, with the instant.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let published_while_revoked = published.load(Ordering::Relaxed) - published_at_ack;
    let mut late = Vec::new();
    let mut last_after_ack = Duration::ZERO;
    let mut last_before_ack = None;
    let mut after_ack = 0;
    while let Ok(Some((at, revision))) =
        tokio::time::timeout(Duration::from_millis(100), seen_rx.recv()).await
    {
        if at > acked {
            after_ack += 1;
            last_after_ack = last_after_ack.max(at - acked);
        } else {
            last_before_ack = Some(acked - at);
        }
        if at > acked + REVOCATION_TARGET {
            late.push((at - acked, revision));
        }
    }
    println!(
        "revocation: policy change confirmed {:?} after it was sent; the watcher's last delivery \
         before the confirm came {last_before_ack:?} before it; {after_ack} deliveries after \
         the confirm (the last {last_after_ack:?} after it); {published_while_revoked} modifies \
         confirmed in the 400 ms after it",
        acked - sent,
    );
    assert!(
        late.is_empty(),
        "deliveries later than {REVOCATION_TARGET:?} after the confirmed revocation \
         (delay, revision): {late:?}"
    );
    assert!(
        published_while_revoked > 10,
        "the device kept publishing after the change ({published_while_revoked} modifies)"
    );

    // Granted again: deliveries resume on the same binding, without a new subscription.
    let confirm = publish(
        &owner_channel,
        &entry,
        watcher_entry(true).to_string().as_bytes(),
        persistent(),
    )
    .await;
    assert!(confirm.is_ack(), "{confirm:?}");
    let granted_at = published.load(Ordering::Relaxed);
    let resumed = loop {
        let (_, revision) = tokio::time::timeout(STEP, seen_rx.recv())
            .await
            .expect("no delivery to the watcher after READ was granted again")
            .expect("the watcher's consumer ended");
        if revision > granted_at + 2 {
            break revision;
        }
    };
    stop.store(true, Ordering::Relaxed);
    let total = tokio::time::timeout(STEP, publishing)
        .await
        .unwrap()
        .unwrap();
    watching.abort();
    assert!(
        resumed <= total + 1,
        "revision {resumed} of {total} modifies"
    );

    // The control consumer, which kept READ, received events all along.
    let mut control_revisions = Vec::new();
    while let Some(d) = next_within(&mut control, Duration::from_millis(300)).await {
        control_revisions.push(body_json(&d)["revision"].as_u64().unwrap_or(0));
    }
    let while_revoked = control_revisions
        .iter()
        .filter(|&&r| r > published_at_ack + 2 && r <= published_at_ack + published_while_revoked)
        .count();
    assert!(
        while_revoked > 5,
        "the control consumer received events while the watcher was revoked: {while_revoked}"
    );
}

// --- 7. slow consumers -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_unacknowledged_deliveries_and_nack_with_requeue_redelivers() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    let connection = with_secret(addr, &solution, "slow").await;
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(3, BasicQosOptions::default())
        .await
        .unwrap();
    let (queue, mut consumer) = consume(&consumer_channel, &["load.#"], false).await;
    let publisher = confirm_channel(&connection).await;
    for i in 0..20 {
        let confirm = publish(
            &publisher,
            "load.m",
            format!("{i}").as_bytes(),
            persistent(),
        )
        .await;
        assert!(confirm.is_ack());
    }
    let payload = |d: &lapin::message::Delivery| String::from_utf8_lossy(&d.data).into_owned();

    let mut window = Vec::new();
    for _ in 0..3 {
        window.push(next(&mut consumer, "within the prefetch window").await);
    }
    assert_eq!(
        window.iter().map(payload).collect::<Vec<_>>(),
        ["0", "1", "2"]
    );
    assert_quiet(&mut consumer, QUIET, "prefetch 3 with 3 unacknowledged").await;
    let declared = publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 17, "the rest waits in the queue");
    assert_eq!(declared.consumer_count(), 1);

    // One ack, one more delivery.
    window
        .remove(1)
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    let d = next(&mut consumer, "after one ack").await;
    assert_eq!(payload(&d), "3");
    window.push(d);
    assert_quiet(&mut consumer, QUIET, "the window is full again").await;

    // A nack with requeue: the same message comes again, before the rest.
    let nacked = window.remove(0);
    assert_eq!(payload(&nacked), "0");
    nacked
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    let again = next(&mut consumer, "the requeued message").await;
    assert_eq!(
        payload(&again),
        "0",
        "a requeued message is redelivered first"
    );
    assert!(
        again.redelivered,
        "a requeued delivery says it was delivered before"
    );
    assert!(!nacked.redelivered, "a first delivery does not");
    // A reject with requeue: likewise.
    again
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let again = next(&mut consumer, "the rejected message").await;
    assert_eq!(payload(&again), "0");
    // A reject without requeue: gone for good.
    again
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let d = next(&mut consumer, "after the reject").await;
    assert_eq!(payload(&d), "4");
    window.push(d);
    // Ack everything so far with one `multiple` ack: three more come.
    let last = window.iter().map(|d| d.delivery_tag).max().unwrap();
    consumer_channel
        .basic_ack(last, BasicAckOptions { multiple: true })
        .await
        .unwrap();
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(payload(
            &next(&mut consumer, "after the multiple ack").await,
        ));
    }
    assert_eq!(more, ["5", "6", "7"]);
    assert_quiet(&mut consumer, QUIET, "three unacknowledged again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_message_is_requeued_by_nack_and_by_its_channel_closing_unacknowledged() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    let connection = with_secret(addr, &solution, "app").await;
    let first = confirm_channel(&connection).await;
    let (queue, mut consumer) = consume(&first, &["transient.#"], false).await;
    // `delivery-mode` 1: QoS 0 in the core, but a manual-ack consumer may still refuse it.
    let confirm = publish(&first, "transient.a", b"t", BasicProperties::default()).await;
    assert!(confirm.is_ack());
    let d = next(&mut consumer, "the transient message").await;
    assert_eq!(d.properties.delivery_mode(), &None);
    d.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .unwrap();
    let d = next(&mut consumer, "the transient message, requeued").await;
    assert_eq!(
        d.data, b"t",
        "nack with requeue redelivers a transient message"
    );
    assert!(d.redelivered);
    let d = d; // unacknowledged when its channel closes
    // Another consumer of the queue on another channel gets it once the first channel ends.
    let second = connection.create_channel().await.unwrap();
    let mut other = second
        .basic_consume(
            queue.as_str().into(),
            "other".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    first.close(200, "bye".into()).await.unwrap();
    drop(d);
    let again = next(
        &mut other,
        "the unacknowledged message of the closed channel",
    )
    .await;
    assert_eq!(again.data, b"t");
    assert!(again.redelivered);
    again.ack(BasicAckOptions::default()).await.unwrap();
    assert_quiet(&mut other, QUIET, "acknowledged: gone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_the_newest_messages_and_counts_them() {
    const LIMIT: usize = 10;
    const SENT: usize = 30;
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    broker.env("THINGSGATE_MQTT_MAX_QUEUED_MESSAGES", &LIMIT.to_string());
    let (addr, api) = launch(&mut broker);
    let connection = with_secret(addr, &solution, "app").await;
    let channel = confirm_channel(&connection).await;
    channel
        .queue_declare(
            "overflow".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "overflow".into(),
            "amq.topic".into(),
            "flood.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..SENT {
        let confirm = publish(&channel, "flood.x", format!("{i}").as_bytes(), persistent()).await;
        assert!(
            confirm.is_ack(),
            "the publisher is never blocked nor refused: {confirm:?}"
        );
    }
    let declared = channel
        .queue_declare(
            "overflow".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count() as usize, LIMIT);
    let metrics = api.get("/metrics", &Auth::None).await;
    let text = metrics.body.as_str().unwrap_or_default();
    assert_eq!(
        counter(
            text,
            "thingsgate_messages_dropped_total{reason=\"queue_full\"}"
        ),
        (SENT - LIMIT) as f64,
        "{text}"
    );
    let consumer_channel = connection.create_channel().await.unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            "overflow".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..LIMIT {
        got.push(String::from_utf8(next(&mut consumer, "a queued message").await.data).unwrap());
    }
    let oldest: Vec<String> = (0..LIMIT).map(|i| i.to_string()).collect();
    assert_eq!(got, oldest, "the oldest are kept, the newest dropped");
    assert_quiet(&mut consumer, QUIET, "the dropped messages").await;
}

// --- 8. kill -9 --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_twin_writes_and_a_durable_queue_survive_kill_9() {
    const N: u64 = 30;
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    let thing = "org.acme:counter";
    let connection = with_secret(addr, &solution, "writer").await;
    let mut writer = Requester::new(&connection).await;
    let created = writer
        .request(
            &thing_command(thing, "create", ""),
            br#"{"attributes":{"n":0}}"#,
            "create",
        )
        .await;
    assert!(created.confirm.is_ack());
    // A durable named queue with a binding; its connection goes away.
    let keeper = with_secret(addr, &solution, "keeper").await;
    let keeper_channel = keeper.create_channel().await.unwrap();
    keeper_channel
        .queue_declare(
            "alerts-durable".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    keeper_channel
        .queue_bind(
            "alerts-durable".into(),
            "amq.topic".into(),
            "alerts.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    keeper.close(200, "bye".into()).await.unwrap();
    let confirm = publish(&writer.channel, "alerts.one", b"one", persistent()).await;
    assert!(
        confirm.is_ack(),
        "queued for the offline durable queue: {confirm:?}"
    );

    // N modifies pipelined; every confirm is an ack.
    let topic = key(&thing_command(thing, "modify", "/attributes/n"));
    let mut confirms = Vec::new();
    for k in 1..=N {
        confirms.push(
            writer
                .channel
                .basic_publish(
                    "amq.topic".into(),
                    topic.as_str().into(),
                    BasicPublishOptions::default(),
                    k.to_string().as_bytes(),
                    persistent(),
                )
                .await
                .unwrap(),
        );
    }
    for (k, confirm) in confirms.into_iter().enumerate() {
        let confirm = tokio::time::timeout(STEP, confirm).await.unwrap().unwrap();
        assert!(confirm.is_ack(), "modify {}: {confirm:?}", k + 1);
    }
    // At once after the last confirm.
    broker.kill();
    drop((writer, connection, keeper_channel));

    broker.start();
    let addr = amqp_addr(&broker);
    let api = Api::new(http_addr(&broker));
    let (doc, etag) = http_thing(&api, &solution, thing).await;
    assert_eq!(doc["attributes"]["n"], N, "the last confirmed value: {doc}");
    assert_eq!(etag, format!("\"rev:{}\"", N + 1), "create + {N} modifies");

    // The durable queue is still there, still bound: it holds the message from before the
    // crash and receives a new one.
    let publisher = with_secret(addr, &solution, "publisher").await;
    let publisher_channel = confirm_channel(&publisher).await;
    let confirm = publish(&publisher_channel, "alerts.two", b"two", persistent()).await;
    assert!(confirm.is_ack());
    let declared = publisher_channel
        .queue_declare(
            "alerts-durable".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the durable queue survived kill -9");
    assert_eq!(declared.message_count(), 2);
    let keeper = with_secret(addr, &solution, "keeper").await;
    let channel = keeper.create_channel().await.unwrap();
    channel
        .queue_declare(
            "alerts-durable".into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            "alerts-durable".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for expected in ["one", "two"] {
        let d = next(&mut consumer, expected).await;
        assert_eq!(d.data, expected.as_bytes());
        assert_eq!(d.routing_key.as_str(), format!("alerts.{expected}"));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Still bound after the restart: a publish now reaches the consumer directly.
    let confirm = publish(&publisher_channel, "alerts.three", b"three", persistent()).await;
    assert!(confirm.is_ack());
    assert_eq!(next(&mut consumer, "three").await.data, b"three");
}

// --- 9. tenant isolation -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_solution_sees_nothing_of_this_one_and_may_not_bind_to_its_namespace() {
    let mut broker = new_broker();
    let a = broker.create_solution(NS);
    let b = broker.create_solution("com.other");
    let (addr, api) = launch(&mut broker);

    let alice = with_secret(addr, &a, "alice").await;
    let a_channel = confirm_channel(&alice).await;
    let (_, mut a_sees) = consume(&a_channel, &["#"], true).await;
    a_channel
        .queue_declare(
            "same-name".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let bob = with_secret(addr, &b, "bob").await;
    let b_channel = confirm_channel(&bob).await;
    let (_, mut b_sees) = consume(&b_channel, &["#", "sensors.#"], true).await;

    // A's plain message and twin events reach A's consumer …
    let mut a_requester = Requester::new(&alice).await;
    let confirm = publish(&a_channel, "sensors.s1", b"a-only", persistent()).await;
    assert!(confirm.is_ack());
    assert_eq!(next(&mut a_sees, "A's own message").await.data, b"a-only");
    let thing = "org.acme:lamp";
    let created = a_requester
        .request(
            &thing_command(thing, "create", ""),
            br#"{"attributes":{"x":1}}"#,
            "c1",
        )
        .await;
    assert_eq!(status(&created.envelope), 201, "{}", created.envelope);
    let event = next(&mut a_sees, "A's created event").await;
    assert_eq!(
        event.routing_key.as_str(),
        key(&event_topic(thing, "created", ""))
    );
    // … and B's next delivery is B's own message, published after them: nothing of A's came.
    let confirm = publish(&b_channel, "sensors.s1", b"b-only", persistent()).await;
    assert!(confirm.is_ack());
    let d = next(&mut b_sees, "B's own message").await;
    assert_eq!(d.data, b"b-only", "B received something of A's");
    assert_quiet(&mut b_sees, QUIET, "B").await;

    // B may not bind to A's namespace: the channel is closed with 403, the connection stays.
    for binding in [
        "org/acme.#",
        "org/acme.*.things.twin.events.#",
        "org/acme.lamp.things.#",
    ] {
        let channel = bob.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let refused = channel
            .queue_bind(
                queue.name().clone(),
                "amq.topic".into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect_err(binding);
        assert_eq!(amqp_error(&refused).0, 403, "{binding}: {refused}");
        assert!(bob.status().connected(), "{binding}: the connection stays");
    }
    // B's command on A's thing: nacked, not applied.
    let confirm = publish(
        &b_channel,
        &key(&thing_command(thing, "modify", "/attributes/x")),
        b"2",
        persistent(),
    )
    .await;
    assert!(confirm.is_nack(), "{confirm:?}");
    let (doc, etag) = http_thing(&api, &a, thing).await;
    assert_eq!(
        (doc["attributes"]["x"].clone(), etag.as_str()),
        (json!(1), "\"rev:1\"")
    );
    // A's named queue is not B's: a passive declare does not find it (404), and B's own queue
    // of the same name is another one.
    let channel = bob.create_channel().await.unwrap();
    let missing = channel
        .queue_declare(
            "same-name".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("A's queue is not visible to B");
    assert_eq!(amqp_error(&missing).0, 404, "{missing}");
    let channel = bob.create_channel().await.unwrap();
    let own = channel
        .queue_declare(
            "same-name".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(own.message_count(), 0);
    assert_quiet(&mut a_sees, Duration::from_millis(100), "A").await;
}

// --- 10. token expiry ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_connection_is_closed_with_320_when_its_token_expires() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    broker.grant_topics(&solution.id, &["dev:shortlived"]);
    let (addr, _api) = launch(&mut broker);
    let ttl = Duration::from_secs(3);
    let exp = unix_now() + ttl.as_secs();
    let short = token("shortlived", Some(&solution), ttl);
    let connection = with_token(addr, &short, "short").await;
    let connected = Instant::now();
    let channel = connection.create_channel().await.unwrap();
    let (_, mut consumer) = consume(&channel, &["ticks.#"], true).await;
    // Alive until then.
    let confirm = publish(&channel, "ticks.one", b"1", BasicProperties::default()).await;
    assert!(confirm.is_ack() || matches!(confirm, Confirmation::NotRequested));
    assert_eq!(next(&mut consumer, "a tick").await.data, b"1");

    // A second connection with an equally short token refreshes it (connection.update-secret)
    // and outlives the first token.
    let refreshed = with_token(
        addr,
        &token("shortlived", Some(&solution), ttl),
        "refreshed",
    )
    .await;
    refreshed
        .update_secret(
            token("shortlived", Some(&solution), HOUR).as_str().into(),
            "refresh".into(),
        )
        .await
        .expect("update-secret with a fresh token of the same subject");

    let ended = tokio::time::timeout(ttl + STEP, consumer.next())
        .await
        .expect("the connection was not closed after its token expired");
    let closed_at = Instant::now();
    let error = match ended {
        Some(Err(e)) => e,
        other => panic!("expected the consumer to fail with the connection's close, got {other:?}"),
    };
    let (code, text) = amqp_error(&error);
    assert_eq!(code, 320, "CONNECTION_FORCED: {text}");
    assert!(text.contains("token expired"), "{text}");
    let lived = closed_at - connected;
    let now = unix_now();
    assert!(
        now >= exp,
        "closed before the token's exp ({now} < {exp}), after {lived:?}"
    );
    assert!(
        lived <= ttl + Duration::from_secs(3),
        "closed late: {lived:?}"
    );
    assert!(!connection.status().connected());
    // The refreshed connection is still served after the first token's expiry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let channel = confirm_channel(&refreshed).await;
    let (_, mut ticks) = consume(&channel, &["ticks.#"], true).await;
    assert!(
        publish(&channel, "ticks.two", b"2", persistent())
            .await
            .is_ack()
    );
    assert_eq!(
        next(&mut ticks, "a tick after the refresh").await.data,
        b"2"
    );
    broker.assert_logs_never_contain(&[signature_of(&short)]);
}

// --- 11. queue methods -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_purge_delete_and_passive_declares_answer_as_rabbitmq_does() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    let connection = with_secret(addr, &solution, "worker").await;
    let channel = confirm_channel(&connection).await;
    channel
        .queue_declare(
            "work".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "work".into(),
            "amq.topic".into(),
            "jobs.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..4 {
        assert!(
            publish(
                &channel,
                "jobs.x",
                format!("job-{i}").as_bytes(),
                persistent()
            )
            .await
            .is_ack()
        );
    }
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare("work".into(), passive, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(
        (declared.message_count(), declared.consumer_count()),
        (4, 0)
    );

    // basic.get: one message and the count left; acknowledged or not.
    let got = channel
        .basic_get("work".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"job-0");
    assert_eq!(got.message_count, 3);
    assert_eq!(got.delivery.routing_key.as_str(), "jobs.x");
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    let got = channel
        .basic_get("work".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(
        (got.delivery.data.as_slice(), got.message_count),
        (&b"job-1"[..], 2)
    );
    // A get without ack, rejected with requeue: it comes back first.
    let got = channel
        .basic_get("work".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"job-2");
    got.delivery
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let got = channel
        .basic_get("work".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"job-2", "the requeued message first");

    // queue.purge: what waits, counted; then get-empty.
    let purged = channel
        .queue_purge("work".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert!(
        channel
            .basic_get("work".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_none()
    );

    // queue.delete with if-empty on a queue that is not: 406, channel closed.
    assert!(
        publish(&channel, "jobs.y", b"left", persistent())
            .await
            .is_ack()
    );
    let refused = channel
        .queue_delete(
            "work".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..QueueDeleteOptions::default()
            },
        )
        .await
        .expect_err("if-empty on a queue holding a message");
    assert_eq!(amqp_error(&refused).0, 406, "{refused}");
    let channel = confirm_channel(&connection).await;
    let deleted = channel
        .queue_delete("work".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(deleted, 1, "delete-ok counts the messages it dropped");
    // Gone: unbound too (a publish is confirmed, nobody holds it) and a passive declare fails.
    assert!(
        publish(&channel, "jobs.z", b"nobody", persistent())
            .await
            .is_ack()
    );
    let gone = channel
        .queue_declare("work".into(), passive, FieldTable::default())
        .await
        .expect_err("the deleted queue");
    assert_eq!(amqp_error(&gone).0, 404, "{gone}");
    assert!(
        connection.status().connected(),
        "a 404 closes the channel, not the connection"
    );

    // Passive declares: amq.topic exists; an unknown exchange closes the channel with 404.
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            "amq.topic".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("amq.topic exists");
    let unknown = channel
        .exchange_declare(
            "no-such-exchange".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("an unknown exchange");
    let (code, text) = amqp_error(&unknown);
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("no-such-exchange"), "{text}");
    let after = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(after.is_err(), "the channel was closed by the 404");
    let channel = connection.create_channel().await.unwrap();
    let missing = channel
        .queue_declare("never-declared".into(), passive, FieldTable::default())
        .await
        .expect_err("an unknown queue");
    let (code, text) = amqp_error(&missing);
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("never-declared"), "{text}");

    // A queue named like the connection's own client ID would be the connection's own
    // session: refused (405), the connection stays.
    let channel = connection.create_channel().await.unwrap();
    let locked = channel
        .queue_declare(
            "worker".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("the connection's own client ID as a queue name");
    let (code, text) = amqp_error(&locked);
    assert_eq!(code, 405, "RESOURCE_LOCKED: {text}");
    assert!(connection.status().connected(), "{text}");

    // The connection goes on: a fresh channel declares, publishes and consumes.
    let channel = confirm_channel(&connection).await;
    let (_, mut consumer) = consume(&channel, &["after.#"], true).await;
    assert!(
        publish(&channel, "after.all", b"fine", persistent())
            .await
            .is_ack()
    );
    assert_eq!(
        next(&mut consumer, "after the channel errors").await.data,
        b"fine"
    );
}

/// A queue name another connection holds is not taken from it: `queue.declare` closes the
/// channel with 405 RESOURCE_LOCKED (the holder keeps its consumer); once the holder is gone,
/// a durable queue is declared — and resumed, with what was queued for it — by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_another_connection_holds_is_locked_and_a_durable_one_is_resumed_after_it() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let holder = with_secret(addr, &solution, "holder").await;
    let held = confirm_channel(&holder).await;
    held.queue_declare("orders".into(), durable, FieldTable::default())
        .await
        .unwrap();
    held.queue_bind(
        "orders".into(),
        "amq.topic".into(),
        "orders.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let other = with_secret(addr, &solution, "other").await;
    let channel = confirm_channel(&other).await;
    let error = channel
        .queue_declare("orders".into(), durable, FieldTable::default())
        .await
        .expect_err("the queue is held by another connection");
    let (code, text) = amqp_error(&error);
    assert_eq!(code, 405, "{text}");
    assert!(text.starts_with("RESOURCE_LOCKED"), "{text}");
    // The holder was not disturbed: it still publishes and its queue still fills.
    assert!(
        publish(&held, "orders.1", b"one", persistent())
            .await
            .is_ack()
    );
    holder.close(200, "bye".into()).await.unwrap();

    // The holder is gone: the durable queue, with its binding and message, is the next one's.
    let channel = confirm_channel(&other).await;
    let declared = channel
        .queue_declare("orders".into(), durable, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 1, "{declared:?}");
    let mut consumer = channel
        .basic_consume(
            "orders".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = next(&mut consumer, "the message queued for the durable queue").await;
    assert_eq!(delivery.data, b"one");
    assert!(
        publish(&channel, "orders.2", b"two", persistent())
            .await
            .is_ack()
    );
    let delivery = next(&mut consumer, "a message through the resumed binding").await;
    assert_eq!(delivery.data, b"two");
}

/// SIGTERM: every AMQP connection is told `connection.close` 320 CONNECTION_FORCED (a
/// consumer sees it as its stream's error), and the server exits 0 within its grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_amqp_connections_with_320() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    let connection = with_secret(addr, &solution, "until-shutdown").await;
    let channel = connection.create_channel().await.unwrap();
    let (_, mut consumer) = consume(&channel, &["anything.#"], true).await;
    let stopping = std::thread::spawn(move || broker.stop());
    let ended = tokio::time::timeout(STEP, consumer.next())
        .await
        .expect("the consumer did not end within the shutdown");
    let error = match ended {
        Some(Err(e)) => e,
        other => panic!("expected the connection's close as an error, got {other:?}"),
    };
    let (code, text) = amqp_error(&error);
    assert_eq!(code, 320, "CONNECTION_FORCED: {text}");
    assert!(text.contains("shutdown"), "{text}");
    let status = stopping.join().unwrap();
    assert!(status.success(), "{status:?}");
}

/// `connection.update-secret` with a token of another subject, or with no token at all, is
/// refused: the connection is closed with 403, and it is not served as the other identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_secret_with_another_identity_or_garbage_closes_the_connection_with_403() {
    let mut broker = new_broker();
    let solution = broker.create_solution(NS);
    let (addr, _api) = launch(&mut broker);
    for (what, secret) in [
        (
            "another subject's token",
            token("someone-else", Some(&solution), HOUR),
        ),
        ("no token at all", "not-a-token".to_owned()),
    ] {
        let connection =
            with_token(addr, &token("updater", Some(&solution), HOUR), "updater").await;
        let error = tokio::time::timeout(
            STEP,
            connection.update_secret(secret.as_str().into(), "refresh".into()),
        )
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer to update-secret"))
        .expect_err(what);
        let (code, text) = amqp_error(&error);
        assert_eq!(code, 403, "{what}: {text}");
        assert!(text.starts_with("ACCESS_REFUSED"), "{what}: {text}");
        assert!(!connection.status().connected(), "{what}");
    }
    broker.assert_logs_never_contain(&["not-a-token"]);
}
