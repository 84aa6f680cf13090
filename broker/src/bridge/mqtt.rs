//! An MQTT 3.1.1 (`mqtt`) or MQTT 5 (`mqtt-5`) connection to an external broker (rumqttc): one
//! task per connection that connects with a persistent session, subscribes each source's
//! addresses (topic filters), hands every PUBLISH it receives to `inbound` and acknowledges it
//! as `inbound` settles it, sends answers to the message's response topic, and publishes each
//! target's buffer, a message leaving the buffer only once the broker acknowledged it.
//!
//! **The session.** The client ID is `specificConfig.clientId`, else
//! `thingsgate-<solution>-<connection ID>`. MQTT 3.1.1 connects with clean session off, MQTT 5
//! with clean start off and a session expiry of [`SESSION_EXPIRY_SECONDS`], so that the broker
//! keeps the subscriptions and the QoS 1 messages the bridge has not acknowledged across a
//! reconnect (and a restart of the server within that time), and delivers them again then.
//! The subscriptions are made again after every connect; one that an earlier version of the
//! connection left in the session still delivers: a message no source's filter matches is
//! acknowledged and counted as failed. A source of QoS 2 is subscribed with QoS 1: rumqttc
//! forgets, with each connection, the QoS 2 packet identifiers it has answered with PUBREC, so a
//! PUBREL the broker sends again after a reconnect would fail every following attempt; and the
//! bridge is at least once in any case (a command delivered twice is applied twice).
//!
//! **Settling.** A received PUBLISH is acknowledged (PUBACK) only once `inbound` settled it:
//! - `Settle::Ack` (applied durably, or answered with an error): the answer, if any, is
//!   published first (QoS 1; MQTT 5: to the response topic with the correlation data, a
//!   `status` user property and the Ditto content type; MQTT 3.1.1: to a `reply-to` header
//!   the source's `headerMapping` sets), then the PUBACK.
//! - `Settle::Reject` (malformed, unresolvable, not authorized): MQTT has no reject and no
//!   dead-letter queue, so the message is acknowledged like an accepted one — `inbound` has
//!   counted it as denied or failed, and it is logged at debug. It is never applied.
//! - `Settle::Requeue` (the store failed or timed out): MQTT has no negative acknowledgement
//!   either; the message is left unacknowledged, so the broker delivers it again on the next
//!   connection of the session. The attempt therefore ends: no new message is taken, the ones
//!   under way are settled, the connection is closed, and after a backoff (at least
//!   [`REQUEUE_DELAY`]) the bridge connects again and gets the message back.
//!
//! Messages are handled concurrently (the broker's inflight window bounds how many): a write
//! waiting for the store does not hold up the next message, and acknowledgements are sent as
//! each settles (MQTT allows any order).
//!
//! **Targets.** Each target's buffer is published in order at the target's QoS (MQTT 5: its
//! `headerMapping` as user properties, the message's content type), up to [`WINDOW`] messages
//! unacknowledged per target. A QoS 0 message is done once written; QoS 1 once its PUBACK
//! came, QoS 2 once its PUBCOMP came (MQTT 5: a PUBACK or PUBREC with an error reason is done
//! too, logged). rumqttc reports each of our PUBLISHes as it writes it, in the order they were
//! asked for, with its packet identifier: that maps acknowledgements to buffer positions. A
//! message not acknowledged when the connection breaks stays in the buffer and is published
//! again on the next connection (at least once; for QoS 2 also a message whose PUBREC had come,
//! since rumqttc's state — and the PUBREL it owed — start anew with each connection).
//!
//! **Failures.** The CONNACK, each SUBACK and each acknowledgement of a PUBLISH must come
//! within [`NETWORK_TIMEOUT`], and a request handed to rumqttc must be written within it;
//! rumqttc's keep-alive ([`KEEP_ALIVE`]) finds a silent broker. Any failure of the event loop
//! (a refused CONNACK, a closed socket, a DISCONNECT, a protocol error) or a timeout ends the
//! attempt: the state says why, and after a backoff with jitter the task connects again. The
//! event loop runs in a task of its own (rumqttc's `poll` must not be cancelled mid-write),
//! forwarding what the bridge needs through a bounded channel. The URI and the password are
//! never logged. Packets are limited to the server's own `max_packet_size` coming in (MQTT 5
//! tells the broker so; with MQTT 3.1.1 a bigger PUBLISH from the broker ends the connection)
//! and to the broker's (MQTT 5 CONNACK) or that size going out: a bigger answer or target
//! message is not published and is counted as failed — handed to rumqttc it would end the
//! connection each time it was tried again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::bridge::config::{Compiled, ConnectionType};
use crate::bridge::inbound::{Handled, InOrder, Inbound, Settle, SourceRuntime, Step, Waiting};
use crate::bridge::outbound::{OutMessage, TargetRuntime};
use crate::bridge::{Backoff, NETWORK_TIMEOUT, State, Status};
use crate::core::Core;

/// The keep-alive asked for: a broker silent for about twice as long ends the attempt.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// MQTT 5: how long the broker keeps the session after the connection ends — a restart or an
/// outage of the server shorter than this loses no QoS 1 command; a deleted connection's
/// session is gone after it. (A 3.1.1 session lasts as long as the broker keeps sessions:
/// Mosquitto's `persistent_client_expiration`, by default for ever.)
pub const SESSION_EXPIRY_SECONDS: u32 = 24 * 3600;
/// The least wait before connecting again after a message was requeued, so that a failing
/// store is not hammered with redeliveries.
pub const REQUEUE_DELAY: Duration = Duration::from_secs(1);
/// Messages of one target published and not yet acknowledged.
pub const WINDOW: usize = 256;
/// Our PUBLISHes rumqttc keeps unacknowledged (at most; the broker may ask for fewer): its
/// state holds a slot per packet identifier, by default 65 535 of them for MQTT 5.
const INFLIGHT: u16 = 128;
/// rumqttc's request channel; answers and acknowledgements that find it full wait in order.
const REQUESTS: usize = 1024;
/// Events from the event loop's task not yet taken; a full channel holds the event loop.
const EVENTS: usize = 1024;
/// How often the deadlines are checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long closing may take (the last acknowledgements written, DISCONNECT).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The content type of answers (MQTT 5).
const DITTO_JSON: &str = "application/vnd.eclipse.ditto+json";

/// Why an attempt ended.
type Failure = String;

/// How one connection attempt ended.
#[derive(Debug)]
enum Ended {
    /// `stop` was set: the task ends.
    Stopped,
    /// Connect again after a backoff.
    Failed(Failure),
    /// A message was left unacknowledged to be delivered again: connect again after a backoff.
    Requeued,
}

/// Runs connection `compiled` of `solution` until `stop` turns true.
pub async fn run(
    core: Arc<Core>,
    solution: String,
    compiled: Compiled,
    status: Arc<Status>,
    mut stop: watch::Receiver<bool>,
) {
    let id = compiled.doc.id.clone();
    let sources: Vec<SourceRuntime> = compiled
        .sources
        .iter()
        .map(|s| SourceRuntime::new(core.clone(), &solution, &id, s.clone(), status.clone()))
        .collect();
    let mut targets: Vec<TargetRuntime> = Vec::new();
    for target in &compiled.targets {
        match TargetRuntime::new(core.clone(), &solution, &id, target.clone(), status.clone()) {
            Some(t) => targets.push(t),
            None => {
                status.set(State::Failed(
                    "a target's topics name a namespace the solution does not own".into(),
                ));
                crate::bridge::until_set(&mut stop).await;
                return;
            }
        }
    }
    let client_id = compiled
        .doc
        .specific_config
        .get("clientId")
        .filter(|c| !c.is_empty())
        .cloned()
        .unwrap_or_else(|| format!("thingsgate-{solution}-{id}"));
    let attempt = Attempt {
        solution: &solution,
        id: &id,
        compiled: &compiled,
        client_id: &client_id,
        max_packet_size: core.settings.max_packet_size,
        sources: &sources,
        status: &status,
    };
    let mut backoff = Backoff::default();
    loop {
        if *stop.borrow() {
            return;
        }
        status.set(State::Connecting);
        let (failure, least) = match attempt.run(&mut targets, &mut stop).await {
            Ended::Stopped => return,
            Ended::Failed(failure) => (failure, Duration::ZERO),
            Ended::Requeued => (
                "a command was given back after a failure of the store; connecting again so that the broker delivers it again".to_owned(),
                REQUEUE_DELAY,
            ),
        };
        tracing::warn!(solution = %solution, connection = %id, error = %failure, "bridge connection ended; connecting again after a backoff");
        if !crate::bridge::back_off(&status, &mut backoff, failure, least, &mut stop).await {
            return;
        }
    }
}

/// What stays the same across the attempts of one connection.
struct Attempt<'a> {
    solution: &'a str,
    id: &'a str,
    compiled: &'a Compiled,
    client_id: &'a str,
    max_packet_size: u32,
    sources: &'a [SourceRuntime],
    status: &'a Arc<Status>,
}

impl Attempt<'_> {
    /// One connection: connect, subscribe, serve until stopped, failed or requeued.
    async fn run(&self, targets: &mut [TargetRuntime], stop: &mut watch::Receiver<bool>) -> Ended {
        let link = tokio::select! {
            link = self.connect() => link,
            () = crate::bridge::until_set(stop) => return Ended::Stopped,
        };
        let link = match link {
            Ok(link) => link,
            Err(failure) => return Ended::Failed(failure),
        };
        tracing::debug!(solution = %self.solution, connection = %self.id, session_present = link.session_present, "bridge CONNACK");
        let mut flow = Flow::new(self, link, targets.len());
        flow.serve(targets, stop).await
    }

    /// Connects and waits for the CONNACK; the event loop then runs in a task of its own.
    async fn connect(&self) -> Result<Link, Failure> {
        let endpoint = &self.compiled.endpoint;
        let what = format!("connect to {}", endpoint.address());
        let max = usize::try_from(self.max_packet_size).unwrap_or(usize::MAX);
        let (events_tx, events) = mpsc::channel(EVENTS);
        if self.compiled.doc.connection_type == ConnectionType::Mqtt5 {
            let mut options =
                rumqttc::v5::MqttOptions::new(self.client_id, endpoint.host.clone(), endpoint.port);
            options
                .set_keep_alive(KEEP_ALIVE)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(SESSION_EXPIRY_SECONDS))
                .set_manual_acks(true)
                .set_max_packet_size(Some(self.max_packet_size))
                .set_request_channel_capacity(REQUESTS)
                .set_outgoing_inflight_upper_limit(INFLIGHT)
                .set_connection_timeout(NETWORK_TIMEOUT.as_secs());
            if let Some(user) = &endpoint.username {
                options.set_credentials(user, endpoint.password.clone().unwrap_or_default());
            }
            let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, REQUESTS);
            let (session_present, max_outgoing) =
                match tokio::time::timeout(NETWORK_TIMEOUT, eventloop.poll()).await {
                    Err(_) => return Err(format!("{what}: no CONNACK within {NETWORK_TIMEOUT:?}")),
                    Ok(Err(e)) => return Err(format!("{what}: {e}")),
                    Ok(Ok(rumqttc::v5::Event::Incoming(
                        rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack),
                    ))) => (
                        ack.session_present,
                        // The broker's own limit, if it says one.
                        ack.properties
                            .and_then(|p| p.max_packet_size)
                            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX)),
                    ),
                    Ok(Ok(_)) => {
                        return Err(format!("{what}: the broker's first packet was no CONNACK"));
                    }
                };
            let driver = tokio::spawn(drive_v5(eventloop, events_tx));
            Ok(Link {
                client: Client::V5(client),
                events,
                driver: Driver(driver),
                session_present,
                max_outgoing,
            })
        } else {
            let mut options =
                rumqttc::MqttOptions::new(self.client_id, endpoint.host.clone(), endpoint.port);
            options
                .set_keep_alive(KEEP_ALIVE)
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_max_packet_size(max, max)
                .set_inflight(INFLIGHT)
                .set_request_channel_capacity(REQUESTS);
            if let Some(user) = &endpoint.username {
                options.set_credentials(user, endpoint.password.clone().unwrap_or_default());
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, REQUESTS);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_connection_timeout(NETWORK_TIMEOUT.as_secs());
            eventloop.set_network_options(network);
            let session_present =
                match tokio::time::timeout(NETWORK_TIMEOUT, eventloop.poll()).await {
                    Err(_) => return Err(format!("{what}: no CONNACK within {NETWORK_TIMEOUT:?}")),
                    Ok(Err(e)) => return Err(format!("{what}: {e}")),
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)))) => {
                        ack.session_present
                    }
                    Ok(Ok(_)) => {
                        return Err(format!("{what}: the broker's first packet was no CONNACK"));
                    }
                };
            let driver = tokio::spawn(drive_v4(eventloop, events_tx));
            Ok(Link {
                client: Client::V4(client),
                events,
                driver: Driver(driver),
                session_present,
                max_outgoing: max,
            })
        }
    }
}

/// A connected client: its requests, the events of its event loop, the task running it.
struct Link {
    client: Client,
    events: mpsc::Receiver<Event>,
    /// Aborted when the attempt ends, whichever way.
    driver: Driver,
    session_present: bool,
    /// The largest packet rumqttc will write: a bigger one would fail the connection, every
    /// time the message is tried again, so it is not handed over.
    max_outgoing: usize,
}

/// The event loop's task, aborted on drop.
struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// rumqttc's two clients, as the bridge uses them. Every call only queues a request for the
/// event loop; `false` means the request channel is full (the event loop takes it later).
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A PUBLISH to ask for.
struct Publication<'a> {
    topic: &'a str,
    qos: u8,
    payload: &'a Bytes,
    content_type: Option<&'a str>,
    correlation: Option<&'a Bytes>,
    user_properties: &'a [(String, String)],
}

impl Publication<'_> {
    /// The PUBLISH packet's size, or a little more: fixed header, topic, packet identifier,
    /// properties (MQTT 5), payload.
    fn size(&self) -> usize {
        let properties = self.content_type.map_or(0, |c| 3 + c.len())
            + self.correlation.map_or(0, |c| 3 + c.len())
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>();
        5 + 2 + self.topic.len() + 2 + 4 + properties + self.payload.len()
    }
}

impl Client {
    fn try_subscribe(&self, filters: &[String], qos: u8) -> bool {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos_v4(qos))),
                )
                .is_ok(),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f.clone(), qos_v5(qos))),
                )
                .is_ok(),
        }
    }

    fn try_publish(&self, p: &Publication<'_>) -> bool {
        match self {
            Client::V4(c) => c
                .try_publish(p.topic, qos_v4(p.qos), false, p.payload.to_vec())
                .is_ok(),
            Client::V5(c) => {
                let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
                    content_type: p.content_type.map(str::to_owned),
                    correlation_data: p.correlation.cloned(),
                    user_properties: p.user_properties.to_vec(),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    p.topic,
                    qos_v5(p.qos),
                    false,
                    p.payload.clone(),
                    properties,
                )
                .is_ok()
            }
        }
    }

    fn try_ack(&self, ack: Ack) -> bool {
        match self {
            Client::V4(c) => {
                let mut publish = rumqttc::Publish::new("", qos_v4(ack.qos), Vec::new());
                publish.pkid = ack.pkid;
                c.try_ack(&publish).is_ok()
            }
            Client::V5(c) => {
                let mut publish = rumqttc::v5::mqttbytes::v5::Publish::new(
                    "",
                    qos_v5(ack.qos),
                    Bytes::new(),
                    None,
                );
                publish.pkid = ack.pkid;
                c.try_ack(&publish).is_ok()
            }
        }
    }

    fn try_disconnect(&self) -> bool {
        match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        }
    }
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A topic name rumqttc accepts (it refuses one with wildcards as if its channel were full).
fn is_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// What the bridge takes from either event loop.
#[derive(Debug)]
enum Event {
    /// A PUBLISH of a subscription.
    Message(Message),
    /// A SUBSCRIBE of ours was written under this packet identifier.
    Subscribing(u16),
    /// The broker's SUBACK: the positions of the filters it refused.
    SubAck { pkid: u16, refused: Vec<usize> },
    /// A PUBLISH of ours was written (packet identifier 0: QoS 0).
    Sent(u16),
    /// The broker is done with a PUBLISH of ours: PUBACK (QoS 1), PUBCOMP (QoS 2), or (MQTT 5)
    /// a PUBACK or PUBREC refusing it for this reason.
    Acked { pkid: u16, refused: Option<String> },
    /// An acknowledgement of ours (PUBACK, PUBREC) was written.
    AckWritten,
    /// The event loop failed; it ends.
    Failed(String),
}

/// A received PUBLISH.
#[derive(Debug)]
struct Message {
    topic: String,
    payload: Bytes,
    ack: Ack,
    /// MQTT 5 user properties, names in lower case.
    headers: Vec<(String, String)>,
    response_topic: Option<String>,
    correlation: Option<Bytes>,
}

/// How a received PUBLISH is acknowledged.
#[derive(Debug, Clone, Copy)]
struct Ack {
    qos: u8,
    pkid: u16,
}

/// Polls a 3.1.1 event loop until it fails, forwarding what the bridge needs.
async fn drive_v4(mut eventloop: rumqttc::EventLoop, events: mpsc::Sender<Event>) {
    use rumqttc::{Outgoing, Packet};
    loop {
        let event = match eventloop.poll().await {
            Ok(rumqttc::Event::Incoming(packet)) => match packet {
                Packet::Publish(p) => Event::Message(Message {
                    topic: p.topic,
                    payload: p.payload,
                    ack: Ack {
                        qos: match p.qos {
                            rumqttc::QoS::AtMostOnce => 0,
                            rumqttc::QoS::AtLeastOnce => 1,
                            rumqttc::QoS::ExactlyOnce => 2,
                        },
                        pkid: p.pkid,
                    },
                    headers: Vec::new(),
                    response_topic: None,
                    correlation: None,
                }),
                Packet::SubAck(ack) => Event::SubAck {
                    pkid: ack.pkid,
                    refused: ack
                        .return_codes
                        .iter()
                        .enumerate()
                        .filter(|(_, code)| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                        .map(|(i, _)| i)
                        .collect(),
                },
                Packet::PubAck(ack) => Event::Acked {
                    pkid: ack.pkid,
                    refused: None,
                },
                Packet::PubComp(comp) => Event::Acked {
                    pkid: comp.pkid,
                    refused: None,
                },
                _ => continue,
            },
            Ok(rumqttc::Event::Outgoing(outgoing)) => match outgoing {
                Outgoing::Publish(pkid) => Event::Sent(pkid),
                Outgoing::Subscribe(pkid) => Event::Subscribing(pkid),
                Outgoing::PubAck(_) | Outgoing::PubRec(_) => Event::AckWritten,
                _ => continue,
            },
            Err(e) => {
                let _ = events.send(Event::Failed(e.to_string())).await;
                return;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// Polls an MQTT 5 event loop until it fails, forwarding what the bridge needs.
async fn drive_v5(mut eventloop: rumqttc::v5::EventLoop, events: mpsc::Sender<Event>) {
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason, SubscribeReasonCode};
    loop {
        let event = match eventloop.poll().await {
            Ok(rumqttc::v5::Event::Incoming(packet)) => match packet {
                Packet::Publish(p) => {
                    let (headers, response_topic, correlation) = match p.properties {
                        Some(properties) => (
                            properties
                                .user_properties
                                .into_iter()
                                .map(|(name, value)| (name.to_ascii_lowercase(), value))
                                .collect(),
                            properties.response_topic,
                            properties.correlation_data,
                        ),
                        None => (Vec::new(), None, None),
                    };
                    Event::Message(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        ack: Ack {
                            qos: match p.qos {
                                QoS::AtMostOnce => 0,
                                QoS::AtLeastOnce => 1,
                                QoS::ExactlyOnce => 2,
                            },
                            pkid: p.pkid,
                        },
                        headers,
                        response_topic,
                        correlation,
                    })
                }
                Packet::SubAck(ack) => Event::SubAck {
                    pkid: ack.pkid,
                    refused: ack
                        .return_codes
                        .iter()
                        .enumerate()
                        .filter(|(_, code)| !matches!(code, SubscribeReasonCode::Success(_)))
                        .map(|(i, _)| i)
                        .collect(),
                },
                Packet::PubAck(ack) => Event::Acked {
                    pkid: ack.pkid,
                    refused: (!matches!(
                        ack.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ))
                    .then(|| format!("{:?}", ack.reason)),
                },
                // A PUBREC that refuses ends the exchange; a PUBREC that accepts waits for PUBCOMP.
                Packet::PubRec(rec)
                    if !matches!(
                        rec.reason,
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                    ) =>
                {
                    Event::Acked {
                        pkid: rec.pkid,
                        refused: Some(format!("{:?}", rec.reason)),
                    }
                }
                Packet::PubComp(comp) => Event::Acked {
                    pkid: comp.pkid,
                    refused: None,
                },
                _ => continue,
            },
            Ok(rumqttc::v5::Event::Outgoing(outgoing)) => match outgoing {
                Outgoing::Publish(pkid) => Event::Sent(pkid),
                Outgoing::Subscribe(pkid) => Event::Subscribing(pkid),
                Outgoing::PubAck(_) | Outgoing::PubRec(_) => Event::AckWritten,
                _ => continue,
            },
            Err(e) => {
                let _ = events.send(Event::Failed(e.to_string())).await;
                return;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// What a PUBLISH of ours was for.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Message `seq` of target `index`.
    Target { index: usize, seq: u64 },
    /// An answer.
    Reply,
}

/// A request waiting for room in rumqttc's channel (in order: an answer before the
/// acknowledgement of the message it answers).
enum Request {
    Reply {
        topic: String,
        payload: Bytes,
        correlation: Option<Bytes>,
        properties: Vec<(String, String)>,
    },
    Ack(Ack),
}

/// A target's messages published on this connection and not yet confirmed: `acked[i]` is for
/// the buffer's message `i`, which has the sequence number `first + i`.
#[derive(Debug, Default)]
struct Window {
    acked: VecDeque<bool>,
    first: u64,
}

impl Window {
    /// The oldest `n` buffered messages were dropped (a full buffer).
    fn forget(&mut self, n: usize) {
        let n = n.min(self.acked.len());
        self.acked.drain(..n);
        self.first += n as u64;
    }

    /// Confirms the acknowledged prefix in the target.
    fn confirm(&mut self, target: &mut TargetRuntime) {
        let n = self.acked.iter().take_while(|acked| **acked).count();
        if n > 0 {
            self.acked.drain(..n);
            self.first += n as u64;
            target.confirmed(n);
        }
    }

    fn mark(&mut self, seq: u64) {
        if let Some(slot) = seq
            .checked_sub(self.first)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.acked.get_mut(i))
        {
            *slot = true;
        }
    }
}

/// What woke the main loop.
enum Woke {
    Stop,
    Event(Option<Event>),
    Settled(Vec<(Handled, Ack)>),
    Targets,
    Tick,
}

/// One connection at work.
struct Flow<'a> {
    attempt: &'a Attempt<'a>,
    client: Client,
    events: mpsc::Receiver<Event>,
    _driver: Driver,
    max_outgoing: usize,
    /// Answers and acknowledgements rumqttc's channel had no room for yet.
    outbox: VecDeque<Request>,
    /// PUBLISHes handed to rumqttc and not written yet, in order, with their QoS.
    unsent: VecDeque<(Kind, u8)>,
    /// Acknowledgements handed to rumqttc and not written yet.
    acks_unsent: usize,
    /// PUBLISHes written with QoS ≥ 1 and not acknowledged, oldest first.
    inflight: VecDeque<(u16, Kind, Instant)>,
    windows: Vec<Window>,
    /// Sources whose SUBSCRIBE was handed to rumqttc and not written yet, in order.
    subscribing: VecDeque<usize>,
    /// SUBSCRIBEs written, SUBACK awaited: packet identifier and source.
    subscribed: Vec<(u16, usize)>,
    connected: bool,
    started: Instant,
    /// When the event loop last said anything.
    last_event: Instant,
    /// Set once the attempt is to end: no new message is taken, the ones under way settle.
    draining: Option<Ended>,
}

impl<'a> Flow<'a> {
    fn new(attempt: &'a Attempt<'a>, link: Link, targets: usize) -> Self {
        let now = Instant::now();
        Flow {
            attempt,
            client: link.client,
            events: link.events,
            _driver: link.driver,
            max_outgoing: link.max_outgoing,
            outbox: VecDeque::new(),
            unsent: VecDeque::new(),
            acks_unsent: 0,
            inflight: VecDeque::new(),
            windows: (0..targets).map(|_| Window::default()).collect(),
            subscribing: VecDeque::new(),
            subscribed: Vec::new(),
            connected: false,
            started: now,
            last_event: now,
            draining: None,
        }
    }

    async fn serve(
        &mut self,
        targets: &mut [TargetRuntime],
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        for (index, source) in self.attempt.sources.iter().enumerate() {
            // QoS 2 is taken as QoS 1 (see the module documentation).
            let qos = source.source().qos.min(1);
            if !self.client.try_subscribe(&source.source().addresses, qos) {
                return Ended::Failed("could not queue a SUBSCRIBE".into());
            }
            self.subscribing.push_back(index);
        }
        if self.attempt.sources.is_empty() {
            self.connected();
        }
        let mut waiting: InOrder<Ack> = InOrder::default();
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            self.flush_outbox();
            self.pump(targets);
            if self.draining.is_some() && waiting.is_empty() && self.outbox.is_empty() {
                break Ok(());
            }
            let woke = tokio::select! {
                () = crate::bridge::until_set(stop), if !matches!(self.draining, Some(Ended::Stopped)) => Woke::Stop,
                event = self.events.recv() => Woke::Event(event),
                settled = waiting.settled(), if !waiting.is_empty() => Woke::Settled(settled),
                () = any_target(targets) => Woke::Targets,
                _ = check.tick() => Woke::Tick,
            };
            match woke {
                Woke::Stop => self.draining = Some(Ended::Stopped),
                Woke::Event(None) => break Err("the connection's event loop ended".to_owned()),
                Woke::Event(Some(event)) => {
                    self.last_event = Instant::now();
                    match event {
                        Event::Message(message) => {
                            if let Some((wait, ack)) = self.take(message) {
                                waiting.push(wait, ack);
                            }
                        }
                        other => {
                            if let Err(failure) = self.on_event(other, targets) {
                                break Err(failure);
                            }
                        }
                    }
                }
                Woke::Settled(settled) => {
                    for (handled, ack) in settled {
                        self.settle(ack, handled);
                    }
                }
                Woke::Targets => {}
                Woke::Tick => {
                    if let Err(failure) = self.check() {
                        break Err(failure);
                    }
                }
            }
        };
        // Writes still waiting complete in the background: their events go out; their
        // messages were not acknowledged and come again.
        waiting.finish_in_background();
        match result {
            Err(failure) => Ended::Failed(failure),
            Ok(()) => {
                self.close(targets).await;
                self.draining.take().unwrap_or(Ended::Stopped)
            }
        }
    }

    fn connected(&mut self) {
        self.connected = true;
        self.attempt.status.set(State::Connected);
        tracing::info!(solution = %self.attempt.solution, connection = %self.attempt.id, address = %self.attempt.compiled.endpoint.address(), "bridge connected");
    }

    /// Hands a received PUBLISH to its source: settled now, or a future settling it later.
    fn take(&mut self, message: Message) -> Option<(Waiting, Ack)> {
        if self.draining.is_some() {
            // Not acknowledged: the broker delivers it again on the next connection.
            return None;
        }
        let Message {
            topic,
            payload,
            ack,
            mut headers,
            response_topic,
            correlation,
        } = message;
        let Some(source) = self.attempt.sources.iter().find(|s| {
            s.source()
                .addresses
                .iter()
                .any(|filter| filter_matches(filter, &topic))
        }) else {
            self.attempt.status.count_failed();
            tracing::debug!(connection = %self.attempt.id, topic = %topic, "a message on a topic no source subscribes (an earlier subscription of the session); acknowledged");
            self.outbox.push_back(Request::Ack(ack));
            return None;
        };
        source.map_headers(&mut headers);
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let reply_to = response_topic.or_else(|| header("reply-to"));
        let correlation = correlation.or_else(|| header("correlation-id").map(Bytes::from));
        let inbound = Inbound {
            payload: &payload,
            headers,
            reply_to,
            correlation,
        };
        match source.handle(&inbound) {
            Step::Done(handled) => {
                self.settle(ack, handled);
                None
            }
            Step::Wait(wait) => Some((wait, ack)),
        }
    }

    /// Queues the answer (if any), then the acknowledgement — or, for a requeue, ends the
    /// attempt so that the broker delivers the message again.
    fn settle(&mut self, ack: Ack, handled: Handled) {
        if let Some(reply) = handled.reply {
            if is_topic_name(&reply.to) {
                let properties = reply
                    .status
                    .map(|code| vec![("status".to_owned(), code.to_string())])
                    .unwrap_or_default();
                self.outbox.push_back(Request::Reply {
                    topic: reply.to,
                    payload: reply.payload,
                    correlation: reply.correlation,
                    properties,
                });
            } else {
                self.attempt.status.count_failed();
                tracing::debug!(connection = %self.attempt.id, "an answer's reply address is not a topic name; not sent");
            }
        }
        match handled.settle {
            Settle::Ack => self.outbox.push_back(Request::Ack(ack)),
            Settle::Reject => {
                tracing::debug!(connection = %self.attempt.id, "a message refused (malformed, unresolvable or not authorized); acknowledged, not applied");
                self.outbox.push_back(Request::Ack(ack));
            }
            Settle::Requeue => {
                if self.draining.is_none() {
                    self.draining = Some(Ended::Requeued);
                }
            }
        }
    }

    /// Hands queued answers and acknowledgements to rumqttc while its channel has room.
    fn flush_outbox(&mut self) {
        while let Some(request) = self.outbox.front() {
            let handed = match request {
                Request::Reply {
                    topic,
                    payload,
                    correlation,
                    properties,
                } => {
                    let publication = Publication {
                        topic,
                        qos: 1,
                        payload,
                        content_type: Some(DITTO_JSON),
                        correlation: correlation.as_ref(),
                        user_properties: properties,
                    };
                    if publication.size() > self.max_outgoing {
                        self.attempt.status.count_failed();
                        tracing::warn!(connection = %self.attempt.id, "an answer is bigger than the broker's maximum packet size; not sent");
                        self.outbox.pop_front();
                        continue;
                    }
                    let handed = self.client.try_publish(&publication);
                    if handed {
                        self.unsent.push_back((Kind::Reply, 1));
                    }
                    handed
                }
                Request::Ack(ack) => {
                    let handed = ack.qos == 0 || self.client.try_ack(*ack);
                    if handed && ack.qos > 0 {
                        self.acks_unsent += 1;
                    }
                    handed
                }
            };
            if !handed {
                return;
            }
            self.outbox.pop_front();
        }
    }

    /// Moves what the fan-out queued into the targets' buffers and publishes what fits into
    /// each window.
    fn pump(&mut self, targets: &mut [TargetRuntime]) {
        let status = self.attempt.status;
        let mut full = false;
        for (index, (target, window)) in targets.iter_mut().zip(&mut self.windows).enumerate() {
            let before = status.dropped.load(Ordering::Relaxed);
            target.fill();
            // A full buffer drops its oldest messages, which may be ones published and not
            // yet acknowledged: their acknowledgements must not confirm the messages after.
            let dropped = status
                .dropped
                .load(Ordering::Relaxed)
                .saturating_sub(before);
            window.forget(usize::try_from(dropped).unwrap_or(usize::MAX));
            if full {
                window.confirm(target);
                continue;
            }
            let qos = target.target().qos;
            let room = WINDOW.saturating_sub(window.acked.len());
            let mut handed = Vec::new();
            for message in target.pending().skip(window.acked.len()).take(room) {
                let publication = publication(message, qos);
                if !is_topic_name(&message.address) || publication.size() > self.max_outgoing {
                    status.count_failed();
                    tracing::warn!(connection = %self.attempt.id, "a target message resolved to no topic name or is bigger than the broker's maximum packet size; not published");
                    handed.push(true);
                    continue;
                }
                if !self.client.try_publish(&publication) {
                    full = true;
                    break;
                }
                let seq = window.first + (window.acked.len() + handed.len()) as u64;
                self.unsent.push_back((Kind::Target { index, seq }, qos));
                handed.push(false);
            }
            window.acked.extend(handed);
            window.confirm(target);
        }
    }

    /// Takes an event of the event loop other than a received message.
    fn on_event(&mut self, event: Event, targets: &mut [TargetRuntime]) -> Result<(), Failure> {
        match event {
            Event::Message(_) => {}
            Event::Failed(e) => return Err(e),
            Event::Subscribing(pkid) => {
                if let Some(source) = self.subscribing.pop_front() {
                    self.subscribed.push((pkid, source));
                }
            }
            Event::SubAck { pkid, refused } => {
                let Some(position) = self.subscribed.iter().position(|(p, _)| *p == pkid) else {
                    return Ok(());
                };
                let (_, source) = self.subscribed.swap_remove(position);
                if let Some(&first) = refused.first() {
                    let filter = self
                        .attempt
                        .sources
                        .get(source)
                        .and_then(|s| s.source().addresses.get(first))
                        .map_or("?", String::as_str);
                    return Err(format!("the broker refused the subscription to `{filter}`"));
                }
                if !self.connected && self.subscribing.is_empty() && self.subscribed.is_empty() {
                    self.connected();
                }
            }
            Event::Sent(pkid) => {
                if let Some((kind, qos)) = self.unsent.pop_front() {
                    if qos == 0 {
                        self.done(kind, targets);
                    } else {
                        self.inflight.push_back((pkid, kind, Instant::now()));
                    }
                }
            }
            Event::Acked { pkid, refused } => {
                let Some(position) = self.inflight.iter().position(|(p, ..)| *p == pkid) else {
                    return Ok(());
                };
                if let Some((_, kind, _)) = self.inflight.remove(position) {
                    if let Some(reason) = refused {
                        // Counted as done, not retried forever (as an AMQP basic.nack).
                        tracing::warn!(connection = %self.attempt.id, reason = %reason, "the broker refused a message the bridge published");
                    }
                    self.done(kind, targets);
                }
            }
            Event::AckWritten => self.acks_unsent = self.acks_unsent.saturating_sub(1),
        }
        Ok(())
    }

    /// A PUBLISH of ours is done.
    fn done(&mut self, kind: Kind, targets: &mut [TargetRuntime]) {
        match kind {
            Kind::Reply => {
                self.attempt.status.replies.fetch_add(1, Ordering::Relaxed);
            }
            Kind::Target { index, seq } => {
                if let (Some(window), Some(target)) =
                    (self.windows.get_mut(index), targets.get_mut(index))
                {
                    window.mark(seq);
                    window.confirm(target);
                }
            }
        }
    }

    /// The deadlines: SUBACKs, the oldest acknowledgement, requests rumqttc has not written.
    fn check(&self) -> Result<(), Failure> {
        let now = Instant::now();
        if !self.connected && now.duration_since(self.started) > NETWORK_TIMEOUT {
            return Err(format!("no SUBACK within {NETWORK_TIMEOUT:?}"));
        }
        if let Some((_, _, sent)) = self.inflight.front()
            && now.duration_since(*sent) > NETWORK_TIMEOUT
        {
            return Err(format!(
                "no acknowledgement of a PUBLISH within {NETWORK_TIMEOUT:?}"
            ));
        }
        let queued = !self.unsent.is_empty() || self.acks_unsent > 0 || !self.outbox.is_empty();
        if queued && now.duration_since(self.last_event) > NETWORK_TIMEOUT {
            return Err(format!(
                "nothing could be written to the broker within {NETWORK_TIMEOUT:?}"
            ));
        }
        Ok(())
    }

    /// Ends the connection politely: DISCONNECT after the last acknowledgements, taking the
    /// acknowledgements of our PUBLISHes that still come.
    async fn close(&mut self, targets: &mut [TargetRuntime]) {
        if !self.client.try_disconnect() {
            return;
        }
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            match event {
                Event::Failed(_) => return,
                acked @ (Event::Sent(_) | Event::Acked { .. }) => {
                    let _ = self.on_event(acked, targets);
                }
                _ => {}
            }
        }
    }
}

/// The PUBLISH of a target's message.
fn publication(message: &OutMessage, qos: u8) -> Publication<'_> {
    Publication {
        topic: &message.address,
        qos,
        payload: &message.payload,
        content_type: message.content_type.as_deref(),
        correlation: None,
        user_properties: &message.headers,
    }
}

/// Whether a source address (a filter, maybe `$share/<group>/<filter>`) matches `topic`.
fn filter_matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(shared) => shared.split_once('/').map_or(shared, |(_, f)| f),
        None => filter,
    };
    crate::core::topics::matches(filter, topic)
}

/// Resolves when any target's session has something queued.
async fn any_target(targets: &[TargetRuntime]) {
    if targets.is_empty() {
        return std::future::pending().await;
    }
    futures_util::future::select_all(targets.iter().map(|t| Box::pin(t.wait()))).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_shared_subscription_matches_like_its_filter() {
        assert!(filter_matches("$share/hub/tg/+/commands", "tg/a/commands"));
        assert!(filter_matches("tg/#", "tg/a/commands"));
        assert!(!filter_matches("tg/+", "tg/a/commands"));
    }

    #[test]
    fn wildcards_are_no_topic_name() {
        assert!(is_topic_name("tg/events/lamp/modified"));
        assert!(!is_topic_name("tg/+/x"));
        assert!(!is_topic_name("tg/#"));
        assert!(!is_topic_name(""));
    }
}
