//! AMQP 0.9.1 bridges end to end (DESIGN.md §5): a solution's connection to the RabbitMQ of
//! this machine (and of CI; 127.0.0.1:5672, guest/guest), stored through the HTTP API, run by
//! the real `thingsgate serve`. A hub publishes Ditto envelopes into a RabbitMQ queue with a
//! `device_id` header, `reply-to` and `correlation-id`; the bridge applies them as the device
//! (`integration:{{ header:device_id }}`), enforces that a device addresses only its own thing,
//! answers to `reply-to`, acknowledges only once a command is durable or answered, rejects what
//! is malformed, unresolvable or not authorized to the queue's dead-letter exchange, publishes
//! events cut to its target's view to `amq.topic` with confirms, survives a kill -9 of
//! Thingsgate (at least once; exactly-once effect through Ditto's `if-match` revision
//! condition), a graceful close while consuming (nothing lost, nothing repeated) and a forced
//! close of its RabbitMQ connection, and follows its queue (missing, declared, deleted) and its
//! stored document (closed, reopened, deleted). An independent client (pika) plays the hub once.
//!
//! Every queue and exchange name is unique per test (`unique`); queues are declared with
//! `x-expires` and exchanges auto-deleted, so a test that fails before its clean-up leaves
//! nothing behind for long; every test deletes what it declared at its end (best effort).
//! Every wait is bounded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::amqp::{confirm_channel, connect, next_within};
use e2e::bridge::{
    BRIDGE_TIMEOUT, RABBITMQ_URI, counter, create_thing, modify_temp, put_connection,
    require_rabbitmq, started, status, unique, wait_status,
};
use e2e::broker::Solution;
use e2e::http::{Api, Auth, http_addr};
use e2e::process::{run_bounded, text};
use e2e::workspace_root;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, Consumer, ExchangeKind, PublisherConfirm,
};
use serde_json::{Value, json};

/// How long one step (a confirm, an answer, a delivery) may take.
const STEP: Duration = Duration::from_secs(10);

/// How long to watch for a delivery that must not come.
const QUIET: Duration = Duration::from_millis(500);

/// The subject the bridge's target sees events as.
const TARGET_SUBJECT: &str = "integration:acme:hub";

/// RabbitMQ deletes a test's queue this long after its last use, should the test fail before
/// its clean-up.
const QUEUE_EXPIRES_MS: i32 = 300_000;

// --- RabbitMQ, as the hub and the back end see it ------------------------------------------------

/// A lapin connection to RabbitMQ with a confirm channel, and what the test declared on it.
struct Rabbit {
    connection: Connection,
    channel: Channel,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl Rabbit {
    async fn connect() -> Rabbit {
        require_rabbitmq();
        let connection = connect(RABBITMQ_URI).await;
        let channel = confirm_channel(&connection).await;
        Rabbit {
            connection,
            channel,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// Declares queue `name` (durable, expiring when unused), with `dead_letter` as its
    /// dead-letter exchange if given.
    async fn queue(&self, name: &str, dead_letter: Option<&str>) {
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(QUEUE_EXPIRES_MS));
        if let Some(exchange) = dead_letter {
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(exchange.into()),
            );
        }
        bounded(
            "queue.declare",
            self.channel.queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            ),
        )
        .await;
        self.queues.lock().unwrap().push(name.to_owned());
    }

    /// A fanout dead-letter exchange `exchange` (deleted with its last binding) bound to a new
    /// queue `queue`, and a consumer of that queue.
    async fn dead_letters(&self, exchange: &str, queue: &str) -> Consumer {
        bounded(
            "exchange.declare",
            self.channel.exchange_declare(
                exchange.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        self.exchanges.lock().unwrap().push(exchange.to_owned());
        self.queue(queue, None).await;
        bounded(
            "queue.bind",
            self.channel.queue_bind(
                queue.into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        self.consume(queue).await
    }

    /// A server-named exclusive queue for answers (`reply-to`) and an auto-ack consumer of it.
    async fn reply_queue(&self) -> (String, Consumer) {
        let queue = bounded(
            "queue.declare",
            self.channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await;
        let name = queue.name().as_str().to_owned();
        let consumer = self.consume(&name).await;
        (name, consumer)
    }

    /// An exclusive queue bound to `amq.topic` with `key`, and a consumer of it.
    async fn topic_queue(&self, key: &str) -> Consumer {
        let (name, consumer) = self.reply_queue().await;
        bounded(
            "queue.bind",
            self.channel.queue_bind(
                name.as_str().into(),
                "amq.topic".into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await;
        consumer
    }

    async fn consume(&self, queue: &str) -> Consumer {
        bounded(
            "basic.consume",
            self.channel.basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
    }

    /// Publishes `payload` into `queue` (default exchange, mandatory); RabbitMQ must confirm
    /// it and route it.
    async fn publish(&self, queue: &str, payload: &[u8], properties: BasicProperties) {
        let confirm = self.publish_unconfirmed(queue, payload, properties).await;
        let confirmation = bounded("a publisher confirm", confirm).await;
        assert!(
            matches!(confirmation, Confirmation::Ack(None)),
            "RabbitMQ did not take the message for `{queue}`: {confirmation:?}"
        );
    }

    async fn publish_unconfirmed(
        &self,
        queue: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> PublisherConfirm {
        bounded(
            "basic.publish",
            self.channel.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                properties,
            ),
        )
        .await
    }

    /// (ready messages, consumers) of `queue` (a passive declare on a channel of its own, so a
    /// missing queue closes only that one); `None` if the queue does not exist.
    async fn counts(&self, queue: &str) -> Option<(u32, u32)> {
        let channel = bounded("channel.open", self.connection.create_channel()).await;
        let declared = tokio::time::timeout(
            STEP,
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("no answer to a passive queue.declare within {STEP:?}"));
        let counts = declared
            .ok()
            .map(|q| (q.message_count(), q.consumer_count()));
        if counts.is_some() {
            let _ = tokio::time::timeout(STEP, channel.close(200, "done".into())).await;
        }
        counts
    }

    /// Waits until `queue`'s (ready messages, consumers) satisfy `want`; panics after
    /// [`BRIDGE_TIMEOUT`] with the last counts.
    async fn wait_counts(&self, queue: &str, what: &str, want: impl Fn(u32, u32) -> bool) {
        let start = Instant::now();
        loop {
            let counts = self.counts(queue).await;
            if let Some((messages, consumers)) = counts
                && want(messages, consumers)
            {
                return;
            }
            assert!(
                start.elapsed() < BRIDGE_TIMEOUT,
                "queue `{queue}`: not {what} within {BRIDGE_TIMEOUT:?}; (messages, consumers) = {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes every queue and exchange the test declared (best effort), then disconnects.
    async fn clean_up(self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        let exchanges = std::mem::take(&mut *self.exchanges.lock().unwrap());
        for queue in queues {
            let _ = tokio::time::timeout(
                STEP,
                self.channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
            )
            .await;
        }
        for exchange in exchanges {
            let _ = tokio::time::timeout(
                STEP,
                self.channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()),
            )
            .await;
        }
        let _ = tokio::time::timeout(STEP, self.connection.close(200, "done".into())).await;
    }
}

/// `future` within [`STEP`]; panics naming `what` on an error or a timeout.
async fn bounded<T, E: std::fmt::Debug>(
    what: &str,
    future: impl std::future::Future<Output = Result<T, E>>,
) -> T {
    match tokio::time::timeout(STEP, future).await {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("{what}: {e:?}"),
        Err(_) => panic!("{what}: no answer within {STEP:?}"),
    }
}

/// The properties a hub sends a command with: persistent, `correlation-id`, and `reply-to`
/// and the `device_id` header if given.
fn command_properties(
    device: Option<&str>,
    reply_to: Option<&str>,
    correlation: &str,
) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_correlation_id(correlation.into());
    if let Some(to) = reply_to {
        properties = properties.with_reply_to(to.into());
    }
    if let Some(device) = device {
        let mut headers = FieldTable::default();
        headers.insert("device_id".into(), AMQPValue::LongString(device.into()));
        properties = properties.with_headers(headers);
    }
    properties
}

/// An answer read from a reply queue.
#[derive(Debug)]
struct Answer {
    /// The AMQP `correlation-id` property.
    correlation: Option<String>,
    /// The AMQP `status` header (the answer's status).
    status_header: Option<i64>,
    envelope: Value,
}

fn number(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongString(s) => text(s.as_bytes()).parse().ok(),
        _ => None,
    }
}

fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

fn answer_of(delivery: &lapin::message::Delivery) -> Answer {
    let envelope = serde_json::from_slice(&delivery.data)
        .unwrap_or_else(|e| panic!("an answer is not JSON ({e}): {}", text(&delivery.data)));
    Answer {
        correlation: delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned()),
        status_header: header(&delivery.properties, "status").and_then(number),
        envelope,
    }
}

/// The next `n` answers (each within [`STEP`]) by correlation ID (several answers to one ID
/// are kept in order).
async fn answers(replies: &mut Consumer, n: usize) -> HashMap<String, Vec<Answer>> {
    let mut by_id: HashMap<String, Vec<Answer>> = HashMap::new();
    for got in 0..n {
        let delivery = next_within(replies, STEP)
            .await
            .unwrap_or_else(|| panic!("{got} of {n} answers within {STEP:?}: {by_id:#?}"));
        let answer = answer_of(&delivery);
        by_id
            .entry(answer.correlation.clone().unwrap_or_default())
            .or_default()
            .push(answer);
    }
    by_id
}

/// The one answer to `correlation` in `answers`.
fn one<'a>(answers: &'a HashMap<String, Vec<Answer>>, correlation: &str) -> &'a Answer {
    match answers.get(correlation).map(Vec::as_slice) {
        Some([answer]) => answer,
        other => panic!("not exactly one answer to `{correlation}`: {other:#?}"),
    }
}

/// The `x-death` header's first entry of a dead-lettered message: (reason, queue).
fn x_death(delivery: &lapin::message::Delivery) -> (String, String) {
    let deaths = header(&delivery.properties, "x-death")
        .unwrap_or_else(|| panic!("no x-death header: {:?}", delivery.properties));
    let AMQPValue::FieldArray(deaths) = deaths else {
        panic!("x-death is not an array: {deaths:?}")
    };
    let Some(AMQPValue::FieldTable(first)) = deaths.as_slice().first() else {
        panic!("x-death has no table: {deaths:?}")
    };
    let field = |name: &str| match first.inner().get(name) {
        Some(AMQPValue::LongString(s)) => text(s.as_bytes()),
        other => panic!("x-death `{name}`: {other:?}"),
    };
    (field("reason"), field("queue"))
}

// --- Thingsgate ----------------------------------------------------------------------------------

/// The hub's source on `queue`: subjects from the `device_id` header, Ditto's enforcement.
fn hub_source(queue: &str, prefetch: u16) -> Value {
    json!({
        "addresses": [queue],
        "prefetch": prefetch,
        "authorizationContext": ["integration:{{ header:device_id }}"],
        "enforcement": {"input": "{{ header:device_id }}", "filters": ["{{ thing:id }}"]}
    })
}

/// Twin events to `amq.topic` as `<namespace>.<name>.<action>`, seen as [`TARGET_SUBJECT`].
fn events_target() -> Value {
    json!({
        "address": "amq.topic/{{ thing:namespace }}.{{ thing:name }}.{{ topic:action }}",
        "topics": ["_/_/things/twin/events"],
        "authorizationContext": [TARGET_SUBJECT]
    })
}

/// An `amqp-091` connection to the RabbitMQ of this machine.
fn connection(sources: &[Value], targets: &[Value]) -> Value {
    json!({
        "connectionType": "amqp-091",
        "uri": RABBITMQ_URI,
        "sources": sources,
        "targets": targets
    })
}

/// A new thing `org.acme:<unique>` (the policy of `e2e::bridge::thing_policy`).
async fn new_thing(api: &Api, solution: &Solution, label: &str) -> String {
    let thing = format!("org.acme:{}", unique(label));
    create_thing(api, solution, &thing, TARGET_SUBJECT).await;
    thing
}

/// The `temp` value of `thing`, read over HTTP.
async fn temp(api: &Api, solution: &Solution, thing: &str) -> Value {
    let answer = api
        .get(
            &format!("/api/2/things/{thing}/features/temp/properties/value"),
            &Auth::basic(solution),
        )
        .await;
    assert_eq!(answer.status, 200, "temp of {thing}: {:?}", answer.body);
    answer.body
}

/// The revision of `thing`, read over HTTP.
async fn revision(api: &Api, solution: &Solution, thing: &str) -> u64 {
    let answer = api
        .get(
            &format!("/api/2/things/{thing}?fields=_revision"),
            &Auth::basic(solution),
        )
        .await;
    assert_eq!(answer.status, 200, "revision of {thing}: {:?}", answer.body);
    answer.body["_revision"]
        .as_u64()
        .unwrap_or_else(|| panic!("no _revision: {}", answer.body))
}

/// Publishes `n` persistent commands into `queue`, all confirmed: command `i` sets `thing`'s
/// `temp` to `i`, with correlation ID `c-<i>`, `reply_to` if given, and the envelope header
/// `if-match: <condition(i)>` if any.
async fn publish_commands(
    rabbit: &Rabbit,
    queue: &str,
    thing: &str,
    reply_to: Option<&str>,
    n: u64,
    condition: impl Fn(u64) -> Option<String>,
) {
    let mut confirms = Vec::new();
    for i in 0..n {
        let correlation = format!("c-{i}");
        let mut command = modify_temp(thing, json!(i), &correlation);
        if let Some(tag) = condition(i) {
            command["headers"]["if-match"] = json!(tag);
        }
        confirms.push(
            rabbit
                .publish_unconfirmed(
                    queue,
                    &payload(&command),
                    command_properties(Some(thing), reply_to, &correlation),
                )
                .await,
        );
    }
    for confirm in confirms {
        let confirmation = bounded("a publisher confirm", confirm).await;
        assert!(matches!(confirmation, Confirmation::Ack(None)));
    }
    assert_eq!(
        rabbit.counts(queue).await,
        Some((u32::try_from(n).unwrap(), 0))
    );
}

/// Polls `thing`'s revision until it is above `above` (bounded); returns it.
async fn wait_for_revision_above(api: &Api, solution: &Solution, thing: &str, above: u64) -> u64 {
    let start = Instant::now();
    loop {
        let now = revision(api, solution, thing).await;
        if now > above {
            return now;
        }
        assert!(
            start.elapsed() < BRIDGE_TIMEOUT,
            "{thing}: revision {now}, not above {above} within {BRIDGE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn payload(envelope: &Value) -> Vec<u8> {
    envelope.to_string().into_bytes()
}

/// `<name>` of `org.acme:<name>`.
fn name_of(thing: &str) -> &str {
    thing.strip_prefix("org.acme:").unwrap()
}

// --- commands in, answers back -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_are_applied_and_answered_to_reply_to_with_their_correlation_id() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "cmd").await;
    let queue = unique("cmd-in");
    rabbit.queue(&queue, None).await;
    let (reply_to, mut replies) = rabbit.reply_queue().await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 100)], &[events_target()]),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    for (i, value) in [21.5, 22.0, 22.5].iter().enumerate() {
        let correlation = format!("cmd-{i}");
        rabbit
            .publish(
                &queue,
                &payload(&modify_temp(&thing, json!(value), &correlation)),
                command_properties(Some(&thing), Some(&reply_to), &correlation),
            )
            .await;
    }
    let answers = answers(&mut replies, 3).await;
    for i in 0..3 {
        let answer = one(&answers, &format!("cmd-{i}"));
        assert_eq!(answer.envelope["status"], 204, "{answer:#?}");
        assert_eq!(
            answer.envelope["topic"],
            format!("org.acme/{}/things/twin/commands/modify", name_of(&thing)),
            "{answer:#?}"
        );
        assert_eq!(
            answer.envelope["path"], "/features/temp/properties/value",
            "{answer:#?}"
        );
        assert_eq!(
            answer.envelope["headers"]["correlation-id"],
            format!("cmd-{i}"),
            "the envelope's correlation ID is echoed too: {answer:#?}"
        );
        assert_eq!(
            answer.status_header,
            Some(204),
            "the answer's status as a header"
        );
    }
    assert_eq!(temp(&api, &solution, &thing).await, json!(22.5));
    assert_eq!(revision(&api, &solution, &thing).await, 4);

    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "in") == 3 && counter(s, "replies") == 3
    })
    .await;
    assert_eq!(
        (
            counter(&status, "denied"),
            counter(&status, "failed"),
            status["connects"].as_u64()
        ),
        (0, 0, Some(1)),
        "{status}"
    );
    rabbit
        .wait_counts(&queue, "drained", |messages, consumers| {
            messages == 0 && consumers == 1
        })
        .await;
    rabbit.clean_up().await;
}

// --- events out ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_amq_topic_with_the_thing_and_action_as_routing_key_cut_to_the_target_view() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let auth = Auth::basic(&solution);
    let thing = format!("org.acme:{}", unique("evt"));
    // The target's subject may read `temp` and nothing else of this thing.
    let all = json!({"grant": ["READ", "WRITE"], "revoke": []});
    let policy = json!({"entries": {
        "owner": {
            "subjects": {format!("iot-things:{}", solution.id): {"type": "solution"}},
            "resources": {"thing:/": all, "policy:/": all, "message:/": all}
        },
        "device": {
            "subjects": {format!("integration:{thing}"): {"type": "hub device"}},
            "resources": {"thing:/features": all}
        },
        "reader": {
            "subjects": {TARGET_SUBJECT: {"type": "bridge target"}},
            "resources": {"thing:/features/temp": {"grant": ["READ"], "revoke": []}}
        }
    }});
    let created = api
        .put(&format!("/api/2/policies/{thing}"), &auth, &policy)
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let created = api
        .put(
            &format!("/api/2/things/{thing}"),
            &auth,
            &json!({
                "policyId": thing,
                "attributes": {"location": "hall"},
                "features": {
                    "temp": {"properties": {"value": 0}},
                    "battery": {"properties": {"level": 100}}
                }
            }),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);

    let queue = unique("evt-in");
    rabbit.queue(&queue, None).await;
    let (reply_to, mut replies) = rabbit.reply_queue().await;
    let key = format!("org.acme.{}.modified", name_of(&thing));
    let mut events = rabbit.topic_queue(&key).await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 100)], &[events_target()]),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    // First a change the target may not see at all, then one it may see in part.
    let battery_only = json!({
        "topic": format!("org.acme/{}/things/twin/commands/modify", name_of(&thing)),
        "path": "/features/battery/properties/level",
        "value": 80,
        "headers": {"correlation-id": "battery"}
    });
    let both = json!({
        "topic": format!("org.acme/{}/things/twin/commands/modify", name_of(&thing)),
        "path": "/features",
        "value": {"temp": {"properties": {"value": 5}}, "battery": {"properties": {"level": 70}}},
        "headers": {"correlation-id": "both"}
    });
    for (envelope, correlation) in [(&battery_only, "battery"), (&both, "both")] {
        rabbit
            .publish(
                &queue,
                &payload(envelope),
                command_properties(Some(&thing), Some(&reply_to), correlation),
            )
            .await;
        let answer = answers(&mut replies, 1).await;
        assert_eq!(
            one(&answer, correlation).envelope["status"],
            204,
            "{answer:#?}"
        );
    }

    let delivery = next_within(&mut events, STEP)
        .await
        .unwrap_or_else(|| panic!("no event on amq.topic `{key}` within {STEP:?}"));
    assert_eq!(delivery.routing_key.as_str(), key);
    assert_eq!(delivery.exchange.as_str(), "amq.topic");
    assert_eq!(
        delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.as_str()),
        Some("application/vnd.eclipse.ditto+json")
    );
    assert_eq!(delivery.properties.delivery_mode(), &Some(2));
    let event: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(
        event["topic"],
        format!("org.acme/{}/things/twin/events/modified", name_of(&thing)),
        "the battery-only event must not reach a target that cannot read the battery: {event}"
    );
    assert_eq!(event["path"], "/features", "{event}");
    assert_eq!(
        event["value"],
        json!({"temp": {"properties": {"value": 5}}}),
        "the event is cut to the target's view (no battery): {event}"
    );
    if let Some(extra) = next_within(&mut events, QUIET).await {
        panic!("one event only, got also: {}", text(&extra.data));
    }
    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "out") >= 1
    })
    .await;
    assert_eq!(counter(&status, "out"), 1, "{status}");
    assert_eq!(counter(&status, "in"), 2, "{status}");
    rabbit.clean_up().await;
}

// --- placeholders and enforcement ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_command_another_thing_and_a_message_without_device_id_is_unresolvable() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let mine = new_thing(&api, &solution, "mine").await;
    let other = new_thing(&api, &solution, "other").await;
    let queue = unique("enf-in");
    rabbit.queue(&queue, None).await;
    let (reply_to, mut replies) = rabbit.reply_queue().await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 100)], &[]),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    // `mine`'s device addresses `other`.
    rabbit
        .publish(
            &queue,
            &payload(&modify_temp(&other, json!(66), "foreign")),
            command_properties(Some(&mine), Some(&reply_to), "foreign"),
        )
        .await;
    // No `device_id` header.
    rabbit
        .publish(
            &queue,
            &payload(&modify_temp(&mine, json!(55), "anonymous")),
            command_properties(None, Some(&reply_to), "anonymous"),
        )
        .await;
    // The legitimate one.
    rabbit
        .publish(
            &queue,
            &payload(&modify_temp(&mine, json!(7), "legit")),
            command_properties(Some(&mine), Some(&reply_to), "legit"),
        )
        .await;
    let answers = answers(&mut replies, 3).await;

    let foreign = one(&answers, "foreign");
    assert_eq!(foreign.status_header, Some(400), "{foreign:#?}");
    assert_eq!(foreign.envelope["status"], 400, "{foreign:#?}");
    assert_eq!(
        foreign.envelope["value"]["error"], "connectivity:connection.id.enforcement.failed",
        "{foreign:#?}"
    );
    assert_eq!(
        foreign.envelope["topic"],
        format!("org.acme/{}/things/twin/errors", name_of(&other)),
        "{foreign:#?}"
    );
    assert_eq!(
        foreign.envelope["headers"]["correlation-id"], "foreign",
        "{foreign:#?}"
    );

    let anonymous = one(&answers, "anonymous");
    assert_eq!(anonymous.status_header, Some(400), "{anonymous:#?}");
    assert_eq!(
        anonymous.envelope["value"]["error"], "placeholder:placeholder.unresolved",
        "{anonymous:#?}"
    );

    let legit = one(&answers, "legit");
    assert_eq!(legit.envelope["status"], 204, "{legit:#?}");

    assert_eq!(temp(&api, &solution, &mine).await, json!(7));
    assert_eq!(
        temp(&api, &solution, &other).await,
        json!(0),
        "the foreign command was not applied"
    );
    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "replies") == 3
    })
    .await;
    assert_eq!(
        (
            counter(&status, "in"),
            counter(&status, "denied"),
            counter(&status, "failed")
        ),
        (1, 1, 1),
        "in: the legit one; denied: the foreign one; failed: the unresolvable one: {status}"
    );
    // Refused messages are rejected, not requeued: nothing comes back.
    rabbit
        .wait_counts(&queue, "drained", |messages, _| messages == 0)
        .await;
    assert_eq!(rabbit.counts(&queue).await, Some((0, 1)));
    rabbit.clean_up().await;
}

// --- malformed and denied messages: the dead-letter exchange -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_rejected_to_the_dead_letter_exchange() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "bad").await;
    let dlx = unique("bad-dlx");
    let dlq = unique("bad-dlq");
    let mut dead = rabbit.dead_letters(&dlx, &dlq).await;
    let queue = unique("bad-in");
    rabbit.queue(&queue, Some(&dlx)).await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 100)], &[]),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    let not_json: &[u8] = b"this is { not JSON";
    let not_an_envelope = br#"{"hello": "world", "path": 3}"#;
    // A valid command, but larger than a command may be (the default `max_packet_size`, 1 MiB).
    let mut huge = modify_temp(&thing, json!("x".repeat(1024 * 1024)), "huge");
    huge["headers"]["correlation-id"] = json!("huge");
    let huge = payload(&huge);
    for (body, correlation) in [
        (not_json, "not-json"),
        (not_an_envelope, "not-envelope"),
        (huge.as_slice(), "huge"),
    ] {
        rabbit
            .publish(
                &queue,
                body,
                command_properties(Some(&thing), None, correlation),
            )
            .await;
    }
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let delivery = next_within(&mut dead, STEP)
            .await
            .unwrap_or_else(|| panic!("no dead letter in `{dlq}` within {STEP:?}"));
        assert_eq!(
            x_death(&delivery),
            ("rejected".to_owned(), queue.clone()),
            "{:?}",
            delivery.properties
        );
        bodies.push(delivery.data);
    }
    bodies.sort();
    let mut sent = vec![not_json.to_vec(), not_an_envelope.to_vec(), huge.clone()];
    sent.sort();
    assert!(bodies == sent, "dead-lettered unchanged");

    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "failed") == 3
    })
    .await;
    assert_eq!(
        (counter(&status, "in"), counter(&status, "denied")),
        (0, 0),
        "{status}"
    );
    assert_eq!(temp(&api, &solution, &thing).await, json!(0));
    assert_eq!(
        rabbit.counts(&queue).await,
        Some((0, 1)),
        "rejected, not requeued"
    );
    rabbit.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_device_may_not_write_is_rejected_to_the_dead_letter_exchange_unapplied() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    // The device may write its features, not its attributes.
    let thing = new_thing(&api, &solution, "deny").await;
    let dlx = unique("deny-dlx");
    let dlq = unique("deny-dlq");
    let mut dead = rabbit.dead_letters(&dlx, &dlq).await;
    let queue = unique("deny-in");
    rabbit.queue(&queue, Some(&dlx)).await;
    let (reply_to, mut replies) = rabbit.reply_queue().await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 100)], &[]),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    let denied = json!({
        "topic": format!("org.acme/{}/things/twin/commands/modify", name_of(&thing)),
        "path": "/attributes/owner",
        "value": "mallory",
        "headers": {"correlation-id": "denied"}
    });
    rabbit
        .publish(
            &queue,
            &payload(&denied),
            command_properties(Some(&thing), Some(&reply_to), "denied"),
        )
        .await;

    let delivery = next_within(&mut dead, STEP)
        .await
        .unwrap_or_else(|| panic!("no dead letter in `{dlq}` within {STEP:?}"));
    assert_eq!(x_death(&delivery), ("rejected".to_owned(), queue.clone()));
    assert_eq!(
        serde_json::from_slice::<Value>(&delivery.data).unwrap(),
        denied
    );
    let answers = answers(&mut replies, 1).await;
    let answer = one(&answers, "denied");
    assert_eq!(answer.envelope["status"], 403, "{answer:#?}");
    assert_eq!(answer.status_header, Some(403), "{answer:#?}");

    let attribute = api
        .get(
            &format!("/api/2/things/{thing}/attributes/owner"),
            &Auth::basic(&solution),
        )
        .await;
    assert_eq!(attribute.status, 404, "not applied: {:?}", attribute.body);
    assert_eq!(revision(&api, &solution, &thing).await, 1);
    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "denied") == 1
    })
    .await;
    assert_eq!(
        (counter(&status, "in"), counter(&status, "failed")),
        (0, 0),
        "{status}"
    );
    assert_eq!(rabbit.counts(&queue).await, Some((0, 1)));
    rabbit.clean_up().await;
}

// --- at least once: a crash, a graceful close ----------------------------------------------------

/// At least once, applied exactly once: N persistent commands wait in a durable queue; the
/// bridge consumes them with a prefetch window; Thingsgate is killed (SIGKILL) in the middle
/// and started again. RabbitMQ redelivers every message the dead bridge had not acknowledged
/// — some of them already applied and durable. Idempotency is Ditto's own, through the
/// revision condition: command `i` carries `if-match: "rev:<i+1>"` (the revision the thing has
/// before it), so a redelivered command that was applied finds a newer revision and is answered
/// 412 (`things:condition.failed`) and acknowledged, not applied again. In the end the queue is
/// empty and nothing is unacknowledged, the thing's revision is exactly N+1 and its value the
/// last command's, and every command was answered (204 at most once, otherwise 412).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_is_applied_exactly_once_across_a_kill_9_through_the_if_match_revision() {
    const N: u64 = 1000;
    let rabbit = Rabbit::connect().await;
    let (mut broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "crash").await;
    assert_eq!(revision(&api, &solution, &thing).await, 1);
    let queue = unique("crash-in");
    rabbit.queue(&queue, None).await;
    let (reply_to, mut replies) = rabbit.reply_queue().await;

    publish_commands(&rabbit, &queue, &thing, Some(&reply_to), N, |i| {
        Some(format!("\"rev:{}\"", i + 1))
    })
    .await;

    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 50)], &[]),
    )
    .await;
    // Kill it once a quarter of the commands is applied.
    let at_kill = wait_for_revision_above(&api, &solution, &thing, N / 4 + 1).await;
    broker.kill();
    // RabbitMQ takes back what the dead connection held: work was left.
    rabbit
        .wait_counts(&queue, "without consumer", |_, consumers| consumers == 0)
        .await;
    let (left, _) = rabbit.counts(&queue).await.unwrap();
    assert!(
        left > 0,
        "the kill came too late to test anything (revision {at_kill} seen, nothing left)"
    );

    broker.start();
    let api = Api::new(http_addr(&broker));
    rabbit
        .wait_counts(&queue, "drained", |messages, _| messages == 0)
        .await;
    wait_for_revision_above(&api, &solution, &thing, N).await;
    // Every answer: 204 at most once per command, 412 otherwise.
    let mut by_id: HashMap<String, Vec<u64>> = HashMap::new();
    let start = Instant::now();
    while by_id.len() < N as usize {
        let Some(delivery) = next_within(&mut replies, STEP).await else {
            panic!(
                "{} of {N} commands answered within {:?}",
                by_id.len(),
                start.elapsed()
            );
        };
        let answer = answer_of(&delivery);
        let code = answer.envelope["status"].as_u64().unwrap_or(0);
        by_id
            .entry(answer.correlation.unwrap_or_default())
            .or_default()
            .push(code);
    }
    // Stop the bridge: whatever it had not acknowledged would go back to the queue.
    let deleted = api
        .delete(
            &format!("/api/2/solutions/{}/connections/hub", solution.id),
            &Auth::basic(&solution),
        )
        .await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    wait_connection_gone(&format!("thingsgate:{}:hub", solution.id)).await;
    assert_eq!(
        rabbit.counts(&queue).await,
        Some((0, 0)),
        "every message acknowledged"
    );
    assert_eq!(revision(&api, &solution, &thing).await, N + 1);
    assert_eq!(temp(&api, &solution, &thing).await, json!(N - 1));
    // Late answers (redeliveries answered while we read) are collected too.
    while let Some(delivery) = next_within(&mut replies, QUIET).await {
        let answer = answer_of(&delivery);
        let code = answer.envelope["status"].as_u64().unwrap_or(0);
        by_id
            .entry(answer.correlation.unwrap_or_default())
            .or_default()
            .push(code);
    }
    let mut redelivered = 0;
    for i in 0..N {
        let codes = &by_id[&format!("c-{i}")];
        assert!(
            codes.iter().all(|c| *c == 204 || *c == 412),
            "command {i}: answers {codes:?}"
        );
        assert!(
            codes.iter().filter(|c| **c == 204).count() <= 1,
            "command {i} applied twice: answers {codes:?}"
        );
        if codes.contains(&412) {
            redelivered += 1;
        }
    }
    eprintln!(
        "killed at revision {at_kill}; {left} messages left in the queue; {redelivered} commands answered 412 after a redelivery"
    );
    rabbit.clean_up().await;
}

/// A graceful stop settles what it took: the connection is closed through the API (stored
/// `connectionStatus: closed`) while the bridge consumes plain commands (no condition, so a
/// command applied twice would show as an extra revision); every command it applied was
/// acknowledged and every other one is back in the queue; reopened, it applies the rest. In the
/// end the revision is exactly N+1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_while_it_consumes_neither_loses_nor_repeats_a_command() {
    const N: u64 = 1000;
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "close").await;
    let queue = unique("close-in");
    rabbit.queue(&queue, None).await;
    publish_commands(&rabbit, &queue, &thing, None, N, |_| None).await;
    let document = connection(&[hub_source(&queue, 50)], &[]);
    put_connection(&api, &solution, "hub", &document).await;
    wait_for_revision_above(&api, &solution, &thing, N / 4 + 1).await;

    let mut closed = document.clone();
    closed["connectionStatus"] = json!("closed");
    put_connection(&api, &solution, "hub", &closed).await;
    wait_status(&api, &solution, "hub", "closed", |_| true).await;
    wait_connection_gone(&format!("thingsgate:{}:hub", solution.id)).await;
    let applied = revision(&api, &solution, &thing).await - 1;
    let (left, consumers) = rabbit.counts(&queue).await.unwrap();
    assert_eq!(consumers, 0);
    assert!(left > 0, "closed too late to test anything");
    assert_eq!(
        applied + u64::from(left),
        N,
        "every applied command acknowledged, every other one back in the queue \
         ({applied} applied, {left} left)"
    );

    put_connection(&api, &solution, "hub", &document).await;
    rabbit
        .wait_counts(&queue, "drained", |messages, _| messages == 0)
        .await;
    wait_for_revision_above(&api, &solution, &thing, N).await;
    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "in") == u64::from(left)
    })
    .await;
    assert_eq!(revision(&api, &solution, &thing).await, N + 1, "{status}");
    assert_eq!(temp(&api, &solution, &thing).await, json!(N - 1));
    rabbit.clean_up().await;
}

// --- a target that cannot publish ----------------------------------------------------------------

/// A target whose exchange does not exist yet must not make the bridge thrash: it reconnects
/// with a growing backoff (not several times a second) and applies no command twice; once the
/// exchange is declared, every command is applied exactly once and events go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_exchange_that_is_missing_neither_makes_the_bridge_thrash_nor_repeats_commands() {
    const COMMANDS: u64 = 5;
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "noexch").await;
    let queue = unique("noexch-in");
    rabbit.queue(&queue, None).await;
    let exchange = unique("noexch-x");
    let target = json!({
        "address": format!("{exchange}/{{{{ thing:name }}}}.{{{{ topic:action }}}}"),
        "topics": ["_/_/things/twin/events"],
        "authorizationContext": [TARGET_SUBJECT]
    });
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 10)], &[target]),
    )
    .await;
    publish_commands(&rabbit, &queue, &thing, None, COMMANDS, |_| None).await;

    // Watched for a while: a backoff that doubles from 200 ms (±25 %) allows at most 6
    // attempts in 5 s, not dozens.
    let watch = Duration::from_secs(5);
    tokio::time::sleep(watch).await;
    let watched = status(&api, &solution, "hub").await;
    assert!(
        watched["connects"].as_u64().unwrap_or(0) <= 6,
        "the bridge reconnects too often while its target's exchange is missing \
         ({watch:?}): {watched}"
    );
    let so_far = revision(&api, &solution, &thing).await;
    assert!(
        so_far <= COMMANDS + 1,
        "commands applied more than once: revision {so_far} after {COMMANDS} commands; {watched}"
    );

    // The exchange appears: everything goes through, once.
    bounded(
        "exchange.declare",
        rabbit.channel.exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    rabbit.exchanges.lock().unwrap().push(exchange.clone());
    let (events_queue, mut events) = rabbit.reply_queue().await;
    bounded(
        "queue.bind",
        rabbit.channel.queue_bind(
            events_queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    // One more command: its event has somewhere to go now.
    rabbit
        .publish(
            &queue,
            &payload(&modify_temp(&thing, json!("last"), "last")),
            command_properties(Some(&thing), None, "last"),
        )
        .await;
    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "out") >= 1
    })
    .await;
    rabbit
        .wait_counts(&queue, "drained", |messages, _| messages == 0)
        .await;
    assert_eq!(
        revision(&api, &solution, &thing).await,
        COMMANDS + 2,
        "every command applied exactly once: {status}"
    );
    assert_eq!(temp(&api, &solution, &thing).await, json!("last"));
    assert!(
        next_within(&mut events, STEP).await.is_some(),
        "an event on `{exchange}`"
    );
    rabbit.clean_up().await;
}

// --- reconnect -----------------------------------------------------------------------------------

/// `rabbitmqctl ARGS`, bounded; must succeed.
fn rabbitmqctl(args: &[&str]) -> Output {
    let mut command = Command::new("rabbitmqctl");
    command.args(args);
    let out = run_bounded(command);
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// The RabbitMQ connection PIDs whose client property `connection_name` is `name`.
async fn connections_named(name: &str) -> Vec<String> {
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let out = tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"])
    })
    .await
    .unwrap();
    text(&out.stdout)
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| line.split('\t').next())
        .map(str::to_owned)
        .collect()
}

/// Waits until RabbitMQ lists no connection named `name` (its channels are closed: whatever
/// they held unacknowledged is back in its queue).
async fn wait_connection_gone(name: &str) {
    let start = Instant::now();
    loop {
        let left = connections_named(name).await;
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < BRIDGE_TIMEOUT,
            "RabbitMQ still lists `{name}` after {BRIDGE_TIMEOUT:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reconnects_after_rabbitmq_closes_its_connection_and_consumes_again() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "recon").await;
    let queue = unique("recon-in");
    rabbit.queue(&queue, None).await;
    let (reply_to, mut replies) = rabbit.reply_queue().await;
    let key = format!("org.acme.{}.modified", name_of(&thing));
    let mut events = rabbit.topic_queue(&key).await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 100)], &[events_target()]),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    let name = format!("thingsgate:{}:hub", solution.id);
    let before = connections_named(&name).await;
    let [pid] = before.as_slice() else {
        panic!("one RabbitMQ connection named `{name}`: {before:?}")
    };
    let pid = pid.clone();
    tokio::task::spawn_blocking(move || rabbitmqctl(&["close_connection", &pid, "e2e test"]))
        .await
        .unwrap();

    // Failed (or connecting) for a moment, then connected again.
    let start = Instant::now();
    let mut seen = Vec::new();
    let status = loop {
        let now = status(&api, &solution, "hub").await;
        let state = now["status"].as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "connected" && now["connects"].as_u64() >= Some(2) {
            break now;
        }
        assert!(
            start.elapsed() < BRIDGE_TIMEOUT,
            "not reconnected within {BRIDGE_TIMEOUT:?}: {now}; states seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["connects"], 2, "{status}");
    let after = connections_named(&name).await;
    assert_eq!(after.len(), 1, "one connection again: {after:?}");
    assert_ne!(after, before, "a new connection");
    rabbit
        .wait_counts(&queue, "consumed once", |_, consumers| consumers == 1)
        .await;

    rabbit
        .publish(
            &queue,
            &payload(&modify_temp(&thing, json!(42), "after")),
            command_properties(Some(&thing), Some(&reply_to), "after"),
        )
        .await;
    let answers = answers(&mut replies, 1).await;
    assert_eq!(one(&answers, "after").envelope["status"], 204);
    assert_eq!(temp(&api, &solution, &thing).await, json!(42));
    // The target came through the reconnect: the command's event is published.
    let delivery = next_within(&mut events, STEP)
        .await
        .unwrap_or_else(|| panic!("no event on `{key}` after the reconnect within {STEP:?}"));
    let event: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(event["value"], json!(42), "{event}");
    eprintln!("states after the forced close: {seen:?}");
    rabbit.clean_up().await;
}

// --- an independent hub: pika --------------------------------------------------------------------

/// `PYTHONPATH` with the directory `cargo xtask test` installs pika into first.
fn python_path() -> OsString {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| workspace_root().join(t))
        .unwrap_or_else(|| workspace_root().join("target"));
    let mut paths = vec![target.join("xtask").join("python")];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pika_hub_publishes_commands_and_reads_the_answers() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "pika").await;
    let other = new_thing(&api, &solution, "pika-other").await;
    let queue = unique("pika-in");
    rabbit.queue(&queue, None).await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 100)], &[]),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    let mut command = Command::new("python3");
    command
        .env("PYTHONPATH", python_path())
        .arg(workspace_root().join("tests/python/bridge_publisher.py"))
        .args(["--uri", RABBITMQ_URI, "--queue", &queue, "--thing", &thing])
        .args(["--device-id", &thing, "--values", "1.5,2.5,3.5"])
        .args(["--foreign-thing", &other]);
    let out = tokio::task::spawn_blocking(move || run_bounded(command))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "bridge_publisher.py failed ({}); exit code 2 means pika is missing: run `cargo xtask \
         test` or `python3 -m pip install 'pika>=1.3,<2'`\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("printed `{l}`: {e}")))
        .collect();
    assert_eq!(lines.first().map(|l| &l["step"]), Some(&json!("published")));
    assert_eq!(lines[0]["count"], 4, "{lines:#?}");
    assert_eq!(lines.last().map(|l| &l["step"]), Some(&json!("done")));
    let answer = |correlation: &str| {
        let found: Vec<&Value> = lines
            .iter()
            .filter(|l| l["step"] == "answer" && l["correlation_id"] == correlation)
            .collect();
        assert_eq!(found.len(), 1, "one answer to {correlation}: {lines:#?}");
        found[0].clone()
    };
    for i in 0..3 {
        let a = answer(&format!("pika-{i}"));
        assert_eq!(a["envelope"]["status"], 204, "{a}");
        assert_eq!(a["status_header"], 204, "{a}");
    }
    let foreign = answer("pika-foreign");
    assert_eq!(foreign["status_header"], 400, "{foreign}");
    assert_eq!(
        foreign["envelope"]["value"]["error"], "connectivity:connection.id.enforcement.failed",
        "{foreign}"
    );
    assert_eq!(temp(&api, &solution, &thing).await, json!(3.5));
    assert_eq!(temp(&api, &solution, &other).await, json!(0));
    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "replies") == 4
    })
    .await;
    assert_eq!(
        (counter(&status, "in"), counter(&status, "denied")),
        (3, 1),
        "{status}"
    );
    rabbit.clean_up().await;
}

// --- the connection's life through the API -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_follows_its_queue_and_its_stored_document() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let auth = Auth::basic(&solution);
    let queue = unique("life-in");
    let document = connection(&[hub_source(&queue, 10)], &[]);

    // A queue that does not exist: failed, saying which.
    put_connection(&api, &solution, "hub", &document).await;
    let failed = wait_status(&api, &solution, "hub", "failed", |s| {
        s["lastError"].as_str().is_some_and(|e| e.contains(&queue))
    })
    .await;
    assert_eq!(failed["connects"], 0, "{failed}");

    // Declared: it connects by itself within the backoff.
    rabbit.queue(&queue, None).await;
    let connected = wait_status(&api, &solution, "hub", "connected", |_| true).await;
    assert_eq!(connected["connects"], 1, "{connected}");
    assert!(connected.get("lastError").is_none(), "{connected}");
    rabbit
        .wait_counts(&queue, "consumed", |_, consumers| consumers == 1)
        .await;

    // The queue deleted under it: failed, saying which; declared again: connected again.
    bounded(
        "queue.delete",
        rabbit
            .channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
    )
    .await;
    wait_status(&api, &solution, "hub", "failed", |s| {
        s["lastError"].as_str().is_some_and(|e| e.contains(&queue))
    })
    .await;
    rabbit.queue(&queue, None).await;
    let connected = wait_status(&api, &solution, "hub", "connected", |_| true).await;
    assert_eq!(connected["connects"], 2, "{connected}");
    rabbit
        .wait_counts(&queue, "consumed", |_, consumers| consumers == 1)
        .await;

    // Closed: stored, not connected, no consumer.
    let mut closed = document.clone();
    closed["connectionStatus"] = json!("closed");
    put_connection(&api, &solution, "hub", &closed).await;
    wait_status(&api, &solution, "hub", "closed", |_| true).await;
    rabbit
        .wait_counts(&queue, "without consumer", |_, consumers| consumers == 0)
        .await;
    let stored = api
        .get(
            &format!("/api/2/solutions/{}/connections/hub", solution.id),
            &auth,
        )
        .await;
    assert_eq!(stored.status, 200, "{:?}", stored.body);
    assert_eq!(
        stored.body["connectionStatus"], "closed",
        "{:?}",
        stored.body
    );

    // Open again.
    put_connection(&api, &solution, "hub", &document).await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;
    rabbit
        .wait_counts(&queue, "consumed", |_, consumers| consumers == 1)
        .await;

    // Deleted: the consumer goes, the status with it.
    let deleted = api
        .delete(
            &format!("/api/2/solutions/{}/connections/hub", solution.id),
            &auth,
        )
        .await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    rabbit
        .wait_counts(&queue, "without consumer", |_, consumers| consumers == 0)
        .await;
    let gone = api
        .get(
            &format!("/api/2/solutions/{}/connections/hub/status", solution.id),
            &auth,
        )
        .await;
    assert_eq!(gone.status, 404, "{:?}", gone.body);
    rabbit.clean_up().await;
}

// --- live messages to a target -------------------------------------------------------------------

/// A live message sent to a thing over HTTP reaches a target that takes
/// `_/_/things/live/messages`, with the message's subject as `{{ topic:action }}`, only when the
/// target's subjects may READ it (`message:/`): a thing whose policy does not let them read its
/// messages publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_reach_a_target_whose_subjects_may_read_them() {
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let auth = Auth::basic(&solution);
    let all = json!({"grant": ["READ", "WRITE"], "revoke": []});
    let mut things = Vec::new();
    for (label, readable) in [("live-yes", true), ("live-no", false)] {
        let thing = format!("org.acme:{}", unique(label));
        let reader_resources = if readable {
            json!({"message:/": {"grant": ["READ"], "revoke": []}})
        } else {
            json!({"thing:/": {"grant": ["READ"], "revoke": []}})
        };
        let policy = json!({"entries": {
            "owner": {
                "subjects": {format!("iot-things:{}", solution.id): {"type": "solution"}},
                "resources": {"thing:/": all, "policy:/": all, "message:/": all}
            },
            "reader": {
                "subjects": {TARGET_SUBJECT: {"type": "bridge target"}},
                "resources": reader_resources
            }
        }});
        let created = api
            .put(&format!("/api/2/policies/{thing}"), &auth, &policy)
            .await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        let created = api
            .put(
                &format!("/api/2/things/{thing}"),
                &auth,
                &json!({"policyId": thing}),
            )
            .await;
        assert_eq!(created.status, 201, "{:?}", created.body);
        things.push(thing);
    }
    let mut messages = rabbit.topic_queue("live.#").await;
    let target = json!({
        "address": "amq.topic/live.{{ thing:name }}.{{ topic:action }}",
        "topics": ["_/_/things/live/messages"],
        "authorizationContext": [TARGET_SUBJECT]
    });
    put_connection(&api, &solution, "hub", &connection(&[], &[target])).await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    for thing in &things {
        let sent = api
            .send(
                api.request(
                    reqwest::Method::POST,
                    &format!("/api/2/things/{thing}/inbox/messages/blink?timeout=0"),
                    &auth,
                )
                .header("content-type", "application/json")
                .body(r#"{"times":2}"#),
            )
            .await;
        assert_eq!(sent.status, 202, "{sent:?}");
    }
    let delivery = next_within(&mut messages, STEP)
        .await
        .unwrap_or_else(|| panic!("no live message on amq.topic `live.#` within {STEP:?}"));
    let readable = things.first().map(|t| name_of(t)).unwrap_or_default();
    assert_eq!(
        delivery.routing_key.as_str(),
        format!("live.{readable}.blink")
    );
    let body: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(body, json!({"times": 2}));
    if let Some(extra) = next_within(&mut messages, QUIET).await {
        panic!(
            "the target may not read the second thing's messages, got: {} {}",
            extra.routing_key,
            text(&extra.data)
        );
    }
    let status = wait_status(&api, &solution, "hub", "connected", |s| {
        counter(s, "out") >= 1
    })
    .await;
    assert_eq!(counter(&status, "out"), 1, "{status}");
    rabbit.clean_up().await;
}

// --- event order ---------------------------------------------------------------------------------

/// Many commands for one thing under way at once (prefetch 500): the target gets the thing's
/// events in revision order, every one once. Writes that one journal batch makes durable
/// together must be announced in the order they were made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_things_events_reach_the_target_in_revision_order() {
    const N: u64 = 1000;
    let rabbit = Rabbit::connect().await;
    let (_broker, solution, api) = started();
    let thing = new_thing(&api, &solution, "order").await;
    let queue = unique("order-in");
    rabbit.queue(&queue, None).await;
    let key = format!("org.acme.{}.modified", name_of(&thing));
    let mut events = rabbit.topic_queue(&key).await;
    publish_commands(&rabbit, &queue, &thing, None, N, |_| None).await;
    put_connection(
        &api,
        &solution,
        "hub",
        &connection(&[hub_source(&queue, 500)], &[events_target()]),
    )
    .await;
    let mut revisions = Vec::new();
    while revisions.len() < usize::try_from(N).unwrap() {
        let delivery = next_within(&mut events, STEP)
            .await
            .unwrap_or_else(|| panic!("{} of {N} events within {STEP:?} each", revisions.len()));
        let event: Value = serde_json::from_slice(&delivery.data).unwrap();
        revisions.push(event["revision"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (2..N + 2).collect();
    let missing: Vec<u64> = expected
        .iter()
        .filter(|r| !revisions.contains(r))
        .copied()
        .collect();
    assert!(
        revisions == expected,
        "events out of revision order or missing (missing {missing:?}): first difference at {:?}",
        revisions
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .map(|i| (
                &revisions[i.saturating_sub(2)..(i + 3).min(revisions.len())],
                i
            ))
    );
    rabbit.clean_up().await;
}
