//! A connection's side of the twin topic space: a PUBLISH on a twin topic becomes a command or a
//! live message (`crate::core::twins` authorizes and applies it); changes are acknowledged, answered
//! and announced only once the journal says durable; answers go to the requester alone.

use std::collections::VecDeque;
use std::future::Future;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use twin::command::{Command, CommandHeaders};
use twin::entity::Event;
use twin::protocol::envelope::{Envelope, Request};
use twin::protocol::mqtt::{
    ENVELOPE_RESPONSES_TOPIC, MqttTopic, mqtt_request, parse_mqtt_topic, write_message_topic,
    write_policy_response_topic, write_response_topic,
};
use twin::store::{Durable, StoreError};
use twin::{PolicyId, ThingId};

use super::connection::{Conn, now_timestamp};
use crate::mqtt::codec::{Packet, Properties, Protocol, PubResponse, Publish, QoS, TopicName};
use crate::core::session::{Delivery, ForwardedProperties, Message, deep_copy_topic};
use crate::core::space::tree_filter;
use crate::core::topics;
use crate::core::twins::{Executed, PolicyRef, Requester};

/// How a PUBLISH is acknowledged.
#[derive(Debug)]
pub enum PublishOutcome {
    /// Now, with this reason code (and reason string for a failure).
    Now { code: u8, reason: Option<String> },
    /// Once the write is durable.
    WhenDurable(Box<PendingWrite>),
}

/// Where the answer to a command goes: only ever to the requester.
#[derive(Debug)]
pub struct ReplyRoute {
    /// The MQTT 5 Response Topic of the command, if it had one: the answer goes there.
    explicit: Option<TopicName>,
    /// Otherwise this topic (`…/responses/…` or `ditto/responses`), if the requester
    /// subscribed to it.
    default_topic: Option<String>,
    correlation: Option<Bytes>,
    /// `response-required: false` asks for no answer.
    wanted: bool,
}

/// How a PUBLISH is acknowledged once its turn comes: PUBACK or PUBREC, and its identifier.
pub(super) type Ack = (fn(PubResponse) -> Packet, NonZeroU16);

/// A twin write waiting for the journal (or an acknowledgement waiting behind one).
#[derive(Debug)]
pub struct PendingWrite {
    durable: Option<Durable>,
    pub(super) ack: Option<Ack>,
    code: u8,
    properties: Properties,
    events: Vec<Event>,
    reply: Option<(Envelope, ReplyRoute)>,
    policy: Option<PolicyRef>,
}

impl PendingWrite {
    pub(super) fn ack_only(
        kind: fn(PubResponse) -> Packet,
        id: NonZeroU16,
        code: u8,
        properties: Properties,
    ) -> Self {
        PendingWrite {
            durable: None,
            ack: Some((kind, id)),
            code,
            properties,
            events: Vec::new(),
            reply: None,
            policy: None,
        }
    }
}

/// Completes when the oldest pending write is durable (at once for an acknowledgement that
/// only waits its turn). Cancel-safe: the `Durable` stays in the queue.
pub(super) fn front_durable(
    pending: &mut VecDeque<PendingWrite>,
) -> impl Future<Output = Result<(), StoreError>> + '_ {
    std::future::poll_fn(move |cx| match pending.front_mut() {
        Some(PendingWrite {
            durable: Some(durable),
            ..
        }) => Pin::new(durable).poll(cx),
        Some(_) => Poll::Ready(Ok(())),
        None => Poll::Pending,
    })
}

/// The `message` of a Ditto error envelope, for a reason string.
fn error_message(reply: &Envelope) -> Option<String> {
    reply
        .value
        .as_ref()
        .and_then(|v| v.get("message"))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
}

impl Conn {
    fn requester(&self) -> Requester<'_> {
        Requester {
            namespaces: &self.identity.solution.namespaces,
            space: &self.space,
            session: &self.session,
        }
    }

    /// A PUBLISH on a twin topic: a command (compact or envelope form) or a live message.
    pub(super) fn twin_publish(&mut self, publish: &Publish, topic: &TopicName) -> PublishOutcome {
        let now = now_timestamp();
        let parsed = match parse_mqtt_topic(topic.as_str()) {
            Ok(parsed) => parsed,
            Err(e) => {
                return PublishOutcome::Now {
                    code: 0x90,
                    reason: Some(e.to_string()),
                };
            }
        };
        let request = match mqtt_request(&parsed, &publish.payload) {
            Ok(request) => request,
            Err(error) => {
                let route = self.reply_route(publish, &parsed, None);
                let reply = Envelope::error(parsed.ditto_topic().as_ref(), &error, None);
                self.reply(&route, reply);
                return PublishOutcome::Now {
                    code: 0x99,
                    reason: Some(error.message),
                };
            }
        };
        match request {
            Request::Message(message) => {
                let message_topic = match parsed {
                    MqttTopic::Envelope => {
                        let mut text = String::new();
                        match write_message_topic(&mut text, &message)
                            .ok()
                            .and_then(|()| text.parse::<TopicName>().ok())
                        {
                            Some(topic) => topic,
                            None => {
                                return PublishOutcome::Now {
                                    code: 0x90,
                                    reason: Some("the message has no MQTT topic".to_owned()),
                                };
                            }
                        }
                    }
                    _ => deep_copy_topic(topic),
                };
                let routed = self.broker.twins.route_message(
                    self.requester(),
                    &message,
                    &message_topic,
                    Bytes::copy_from_slice(&publish.payload),
                    ForwardedProperties::from_publish(&publish.properties),
                    publish.qos.qos(),
                    &self.broker.metrics,
                    now,
                );
                match routed {
                    Ok(_) => PublishOutcome::Now {
                        code: 0,
                        reason: None,
                    },
                    Err(error) => {
                        self.broker
                            .metrics
                            .denied(self.space.id.as_str(), "message");
                        tracing::debug!(
                            solution = %self.space.id,
                            client = %self.session.client_id,
                            thing = %message.thing_id,
                            subject = %message.subject,
                            "live message denied"
                        );
                        PublishOutcome::Now {
                            code: 0x87,
                            reason: Some(error.message),
                        }
                    }
                }
            }
            Request::Command(command) => {
                let route = self.reply_route(publish, &parsed, Some(command_headers(&command)));
                let described = self.denial_logged().then(|| command_description(&command));
                match self.broker.twins.execute(self.requester(), command, now) {
                    Executed::Answered { reply, denied } => {
                        let status = reply.status.unwrap_or(200);
                        let reason = error_message(&reply);
                        if denied {
                            let description = described.unwrap_or_default();
                            self.broker
                                .metrics
                                .denied(self.space.id.as_str(), "command");
                            tracing::debug!(
                                solution = %self.space.id,
                                client = %self.session.client_id,
                                command = %description,
                                subjects = ?&self.subjects[..],
                                "command denied"
                            );
                        }
                        self.reply(&route, reply);
                        let code = match (denied, status) {
                            (true, _) => 0x87,
                            (false, s) if s >= 400 => 0x80,
                            _ => 0,
                        };
                        PublishOutcome::Now { code, reason }
                    }
                    Executed::Written {
                        durable,
                        events,
                        command,
                        status,
                        value,
                        policy,
                    } => {
                        // The answer is built only if it will reach the requester.
                        let reply = self
                            .reply_deliverable(&route)
                            .then(|| (Envelope::response(&command, status, value), route));
                        PublishOutcome::WhenDurable(Box::new(PendingWrite {
                            durable: Some(durable),
                            ack: None,
                            code: 0,
                            properties: Properties::default(),
                            events,
                            reply,
                            policy,
                        }))
                    }
                }
            }
        }
    }

    fn reply_route(
        &self,
        publish: &Publish,
        parsed: &MqttTopic<'_>,
        headers: Option<&CommandHeaders>,
    ) -> ReplyRoute {
        let wanted = headers.is_none_or(|h| h.response_required != Some(false));
        let explicit = (self.protocol == Protocol::V5)
            .then(|| {
                publish
                    .properties
                    .response_topic
                    .as_ref()
                    .map(deep_copy_topic)
            })
            .flatten();
        // Written only when it could be used: no Response Topic, and some subscription that
        // might match it.
        let default_topic =
            (wanted && explicit.is_none() && !self.session.lock().subscriptions.is_empty())
                .then(|| response_topic(parsed))
                .flatten();
        ReplyRoute {
            explicit,
            default_topic,
            correlation: publish
                .properties
                .correlation_data
                .as_deref()
                .map(Bytes::copy_from_slice),
            wanted,
        }
    }

    /// Sends `reply` to the requester alone: to its v5 Response Topic (with the Correlation
    /// Data), else to the default response topic if the requester subscribed to it.
    pub(super) fn reply(&mut self, route: &ReplyRoute, reply: Envelope) {
        if !route.wanted {
            return;
        }
        let (topic, qos) = match &route.explicit {
            Some(topic) => {
                let qos = self
                    .subscribed_qos(topic.as_str())
                    .unwrap_or(QoS::AtLeastOnce);
                (topic.clone(), qos)
            }
            None => {
                let Some(default_topic) = &route.default_topic else {
                    return;
                };
                let Some(qos) = self.subscribed_qos(default_topic) else {
                    return;
                };
                match default_topic.parse::<TopicName>() {
                    Ok(topic) => (topic, qos),
                    Err(_) => return,
                }
            }
        };
        let properties = route.correlation.clone().map(|correlation| {
            Box::new(ForwardedProperties {
                correlation_data: Some(correlation),
                ..ForwardedProperties::default()
            })
        });
        let message = Arc::new(Message {
            topic,
            payload: Bytes::from(reply.to_bytes()),
            qos,
            retain: false,
            properties,
            expires_at: None,
            publisher: 0,
        });
        self.session.offer_with(&self.broker.metrics, |_| {
            Some(Delivery {
                qos,
                retain: false,
                subscription_ids: Vec::new(),
                message,
            })
        });
    }

    /// Whether an answer on `route` would reach the requester now.
    fn reply_deliverable(&self, route: &ReplyRoute) -> bool {
        route.wanted
            && (route.explicit.is_some()
                || route
                    .default_topic
                    .as_deref()
                    .is_some_and(|t| self.subscribed_qos(t).is_some()))
    }

    /// Whether denials are logged (debug), so their description is worth formatting.
    fn denial_logged(&self) -> bool {
        tracing::enabled!(tracing::Level::DEBUG)
    }

    /// The QoS of the requester's subscription matching `topic`, if any.
    fn subscribed_qos(&self, topic: &str) -> Option<QoS> {
        let state = self.session.lock();
        state
            .subscriptions
            .iter()
            .filter(|(filter, _)| topics::matches(tree_filter(filter), topic))
            .map(|(_, record)| record.options.qos)
            .max()
    }

    /// The oldest pending write is durable (or failed): events, reply, acknowledgement.
    pub(super) fn complete_front(&mut self, result: Result<(), StoreError>) {
        let Some(pending) = self.pending.pop_front() else {
            return;
        };
        let PendingWrite {
            ack,
            code,
            properties,
            events,
            reply,
            policy,
            ..
        } = pending;
        match result {
            Ok(()) => {
                if !events.is_empty() {
                    self.broker.twins.publish_events(
                        &self.space,
                        &events,
                        policy.as_ref(),
                        &self.broker.metrics,
                        now_timestamp(),
                    );
                }
                if let Some((reply, route)) = reply {
                    self.reply(&route, reply);
                }
                if let Some((kind, id)) = ack {
                    self.ack(kind, id, code, properties);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, client = %self.session.client_id, "a twin change could not be journaled");
                if let Some((reply, route)) = reply {
                    let error = twin::error::DittoError::new(
                        500,
                        "things:internal.error",
                        "the change could not be stored",
                    );
                    let topic = Some(reply.topic.clone());
                    self.reply(&route, Envelope::error(topic.as_ref(), &error, None));
                }
                if let Some((kind, id)) = ack {
                    let properties = self.denied_reason("the change could not be stored");
                    self.ack(kind, id, 0x80, properties);
                }
            }
        }
    }

    /// At the end of a connection: writes still waiting for the journal are announced when
    /// durable, even though nobody is left to acknowledge them.
    pub(super) fn settle_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending.iter().all(|p| p.events.is_empty()) {
            return;
        }
        let broker = self.broker.clone();
        let space = self.space.clone();
        tokio::spawn(async move {
            for p in pending {
                if let Some(durable) = p.durable
                    && durable.await.is_err()
                {
                    continue;
                }
                if !p.events.is_empty() {
                    broker.twins.publish_events(
                        &space,
                        &p.events,
                        p.policy.as_ref(),
                        &broker.metrics,
                        now_timestamp(),
                    );
                }
            }
        });
    }
}

/// The topic where the answer to a command published on `parsed` goes when the requester gave
/// no Response Topic: `{ns}/{name}/things/twin/responses/{action}{path}` (the path as it came),
/// `…/policies/responses/…`, or `ditto/responses` for envelopes.
fn response_topic(parsed: &MqttTopic<'_>) -> Option<String> {
    let mut topic = String::new();
    let written = match *parsed {
        MqttTopic::Envelope => {
            topic.push_str(ENVELOPE_RESPONSES_TOPIC);
            true
        }
        MqttTopic::ThingCommand {
            namespace,
            name,
            action,
            path,
        } => ThingId::from_parts(namespace, name)
            .is_ok_and(|id| write_response_topic(&mut topic, &id, action, path).is_ok()),
        MqttTopic::PolicyCommand {
            namespace,
            name,
            action,
            path,
        } => PolicyId::parse(&format!("{namespace}:{name}"))
            .is_ok_and(|id| write_policy_response_topic(&mut topic, &id, action, path).is_ok()),
        MqttTopic::LiveMessage { .. } => false,
    };
    written.then_some(topic)
}

fn command_headers(command: &Command) -> &CommandHeaders {
    match command {
        Command::Thing(c) => &c.headers,
        Command::Policy(c) => &c.headers,
    }
}

/// `modify thing org.acme:lamp /features/x` — for logs (no values).
fn command_description(command: &Command) -> String {
    match command {
        Command::Thing(c) => format!("{} thing {} {}", c.action.as_str(), c.thing_id, c.path),
        Command::Policy(c) => format!("{} policy {} {}", c.action.as_str(), c.policy_id, c.path),
    }
}
