//! `Core::publish` and `Core::execute`: a request of an authenticated client — a publish on a
//! topic, a thing or policy command, a live message, a will — authorized and carried out, and
//! what the requester is told: at once ([`Told`]) or, for a twin change, once it is durable
//! ([`Pending`]). Answers go to the requester alone, into its own session ([`ReplyTo`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use policy::{Mode, Permission, ResourceType, Timestamp};
use serde_json::Value;
use twin::command::{Action, Command, CommandHeaders};
use twin::entity::Event;
use twin::error::DittoError;
use twin::protocol::envelope::{Envelope, Request as DittoRequest};
use twin::protocol::message::LiveMessage;
use twin::protocol::mqtt::{
    ENVELOPE_RESPONSES_TOPIC, MqttTopic, mqtt_request, parse_mqtt_topic, write_message_topic,
    write_policy_response_topic, write_response_topic,
};
use twin::protocol::space::is_twin_topic;
use twin::store::{Durable, StoreError};
use twin::{PolicyId, ThingId};

use crate::core::message::{Delivery, ForwardedProperties, Message, Origin, deep_copy_topic};
use crate::core::policies::PolicyRef;
use crate::core::retained::{self, RetainError};
use crate::core::session::Session;
use crate::core::space::{SolutionSpace, Usage};
use crate::core::twins::{Executed, Redo};
use crate::core::{Client, Core, dispatch, now};
use crate::metrics::Metrics;
use crate::mqtt::codec::{QoS, TopicName};

/// Where the answer to a command goes: only ever to the requester.
#[derive(Debug, Default)]
pub struct ReplyTo {
    /// `false`: the requester asked for no answer (`response-required: false` also counts).
    pub wanted: bool,
    /// The address the requester gave (MQTT 5 Response Topic); otherwise the default response
    /// topic of the command, if the requester's session subscribed to it.
    pub topic: Option<TopicName>,
    /// Sent back with the answer (MQTT 5 Correlation Data).
    pub correlation: Option<Bytes>,
}

impl ReplyTo {
    /// Topic and correlation data may be slices of a read buffer; a reply kept until a write is
    /// durable holds its own copies (so that it keeps no read buffer alive).
    fn owned(self) -> ReplyTo {
        ReplyTo {
            wanted: self.wanted,
            topic: self.topic.as_ref().map(deep_copy_topic),
            correlation: self.correlation.as_deref().map(Bytes::copy_from_slice),
        }
    }
}

/// What the requester is told about a request, besides the answer that went to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Told {
    pub verdict: Verdict,
    /// Why, for a refusal or failure (a Ditto error's message); never a secret.
    pub reason: Option<String>,
    /// The status of the Ditto answer to a command, when it had one (404, 412, 500, …): tells
    /// an error the command caused from a failure worth retrying (a bridge requeues 5xx).
    pub status: Option<u16>,
}

/// The kinds of result an adapter maps to its wire (MQTT reason code, AMQP ack/nack, HTTP
/// status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Refused by a policy or by solution isolation.
    NotAuthorized,
    /// Not applied: a Ditto error (not found, conflict, invalid value, storage failure).
    Failed,
    /// The topic is in the twin space but is not a valid Ditto topic.
    BadTopic,
    /// The payload is not what the topic requires.
    BadPayload,
}

impl Told {
    const ACCEPTED: Told = Told {
        verdict: Verdict::Accepted,
        reason: None,
        status: None,
    };

    pub(crate) fn new(verdict: Verdict, reason: impl Into<String>) -> Self {
        Told {
            verdict,
            reason: Some(reason.into()),
            status: None,
        }
    }

    pub fn accepted() -> Self {
        Told::ACCEPTED
    }
}

/// The result of a request.
#[derive(Debug)]
pub enum Outcome {
    /// Decided now.
    Now(Told),
    /// A change applied in memory: await it (in request order) before acknowledging.
    Pending(Pending),
}

/// A twin change waiting for the journal. Completing it ([`Pending::poll_done`]) — once the
/// journal batch holding it is durable — publishes its events through the fan-out, sends the
/// answer to the requester, and yields what the requester is told; nothing is announced before
/// that. If an event was queued for a persistent session, its record is journaled and the
/// requester is told only once that is durable too. Cancel-safe: nothing happens until the
/// write is durable, and then all of the announcing within one poll. It borrows the core and
/// the requester's space and session while polled (its holder has them) instead of keeping
/// shared references of its own.
#[derive(Debug)]
pub struct Pending {
    durable: Durable,
    events: Vec<Event>,
    /// Built only if it will reach the requester.
    answer: Option<Box<(Envelope, ReplyTo)>>,
    /// The policy the events are judged with when the entity no longer names one.
    policy: Option<PolicyRef>,
    /// Announced: what the requester is told once the deliveries journaled for persistent
    /// sessions (`durable` now waits for them) are durable.
    told: Option<Told>,
    /// A twin change and how many more times it may be decided again after a cluster store's
    /// conflict (another node wrote the entity first; nothing of this write was stored).
    redo: Option<Box<Retry>>,
}

/// A twin change to decide again after a conflict: what, how many more times, and (after the
/// first conflict) the jittered pause before the next attempt — so that a node racing another
/// that pipelines writes to the same thing does not lose every race.
#[derive(Debug)]
struct Retry {
    redo: Redo,
    left: u8,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The pause before attempt `conflicts` + 1: none after the first conflict (the usual one:
/// this node's state was a moment behind), then random up to 2, 4, … 64 ms.
fn backoff(conflicts: u8) -> Option<std::time::Duration> {
    if conflicts <= 1 {
        return None;
    }
    let cap = 1u64 << u32::from(conflicts.min(6));
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x9e37_79b9_7f4a_7c15);
            h.finish() | 1
        });
    }
    let random = STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    });
    Some(std::time::Duration::from_micros(random % (cap * 1000)))
}

/// How many times a change is decided again after conflicts before the requester is told it
/// failed (each conflict means another node's write to the same entity went through).
const REDO_ATTEMPTS: u8 = 64;

/// The answer to a twin change, with the entity tag of the changed entity (a deleted one has
/// none).
fn build_answer(
    command: &Command,
    events: &[Event],
    status: u16,
    value: Option<Value>,
) -> Envelope {
    let deleted = match command {
        Command::Thing(c) => c.action == Action::Delete && c.path.is_root(),
        Command::Policy(c) => c.action == Action::Delete && c.path == "/",
    };
    let revision = events.last().map(|e| e.revision).filter(|_| !deleted);
    Envelope::response(command, status, value).with_etag(revision)
}

impl Pending {
    /// Completes once every write made so far is durable, with nothing to announce: for
    /// acknowledging again a request whose write may still be on its way to the journal.
    pub fn durable_so_far(core: &Core) -> Pending {
        Pending::after(core.twins.store.durable_so_far())
    }

    /// Completes when `durable` does, with nothing to announce (a retained message's write).
    fn after(durable: Durable) -> Pending {
        Pending {
            durable,
            events: Vec::new(),
            answer: None,
            policy: None,
            told: None,
            redo: None,
        }
    }

    /// Completes once the write is durable (or failed): events and answer out, or the failure
    /// told. `space` and `session` are the requester's.
    pub fn poll_done(
        &mut self,
        cx: &mut Context<'_>,
        core: &Core,
        space: &SolutionSpace,
        session: &Session,
    ) -> Poll<Told> {
        loop {
            if let Some(wait) = self.redo.as_mut().and_then(|r| r.wait.as_mut()) {
                std::task::ready!(wait.as_mut().poll(cx));
                if let Some(retry) = self.redo.take() {
                    let Retry { redo, left, .. } = *retry;
                    match self.decide_again(redo, left, core, space, session) {
                        None => continue,
                        Some(told) => return Poll::Ready(told),
                    }
                }
            }
            let result = std::task::ready!(Pin::new(&mut self.durable).poll(cx));
            if let Some(told) = self.told.take() {
                if let Err(e) = result {
                    // The change itself is durable and announced; the journal failed after it.
                    tracing::error!(error = %e, "a queued event could not be journaled");
                }
                return Poll::Ready(told);
            }
            let Some(told) = self.complete(result, core, space, session) else {
                // Decided again after a cluster store's conflict: wait for the new write.
                continue;
            };
            if self.told.is_none() {
                return Poll::Ready(told);
            }
        }
    }

    /// The requester has gone: its events still go out once durable, no answer.
    pub async fn settle(
        mut self,
        core: Arc<Core>,
        space: Arc<SolutionSpace>,
        session: Arc<Session>,
    ) {
        self.answer = None;
        std::future::poll_fn(|cx| self.poll_done(cx, &core, &space, &session)).await;
    }

    /// Whether its events are out already (it waits only for the record of a delivery queued
    /// for a persistent session). A write behind it may then announce its own events; one
    /// behind a write that has not announced must wait, or a thing's events could go out of
    /// revision order.
    pub fn announced(&self) -> bool {
        self.told.is_some()
    }

    /// Whether completing it announces anything.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Publishes its events through the fan-out, as completing it would, and keeps them (for
    /// benchmarks of the fan-out: `crate::testing`).
    pub(crate) fn publish_events_again(&self, core: &Core, space: &SolutionSpace) {
        dispatch::publish_events(
            &core.twins.policies,
            space,
            &self.events,
            self.policy.as_ref(),
            &*core.twins.store,
            &core.metrics,
            now(),
        );
    }

    /// What happens once the journal has answered: events and answer out (durable), or the
    /// failure told (not stored: nothing announced). If an event was journaled for a persistent
    /// session, `told` is set and `durable` waits for that record. `None`: another node wrote
    /// the entity first (cluster store), and the change was decided again on what it left:
    /// `durable` now waits for the new write.
    pub(crate) fn complete(
        &mut self,
        result: Result<(), StoreError>,
        core: &Core,
        space: &SolutionSpace,
        session: &Session,
    ) -> Option<Told> {
        if let Err(StoreError::Conflict { .. }) = &result
            && let Some(retry) = self.redo.take()
        {
            let Retry { redo, left, .. } = *retry;
            if left > 0 {
                core.metrics.cluster_conflicts.inc();
                return match backoff(REDO_ATTEMPTS - left + 1) {
                    None => self.decide_again(redo, left - 1, core, space, session),
                    Some(pause) => {
                        // Decided again once the pause is over (`poll_done`).
                        self.redo = Some(Box::new(Retry {
                            redo,
                            left: left - 1,
                            wait: Some(Box::pin(tokio::time::sleep(pause))),
                        }));
                        None
                    }
                };
            }
            tracing::warn!(client = %session.client_id, "a twin change met {REDO_ATTEMPTS} conflicts in a row; giving up");
        }
        Some(self.finish(result, core, space, session))
    }

    /// Decides `redo` again after a conflict: `None` if it was written again (wait), or what
    /// the requester is told now (refused on the new state, e.g. the thing moved to another
    /// policy or was deleted).
    fn decide_again(
        &mut self,
        redo: Redo,
        left: u8,
        core: &Core,
        space: &SolutionSpace,
        session: &Session,
    ) -> Option<Told> {
        match core.twins.redo(redo, self.policy.clone()) {
            Executed::Written {
                durable,
                events,
                command,
                status,
                value,
                policy: _,
                now,
                precondition,
            } => {
                if let Some(answer) = self.answer.as_mut() {
                    answer.0 = build_answer(&command, &events, status, value);
                }
                self.durable = durable;
                self.events = events;
                self.redo = Some(Box::new(Retry {
                    redo: Redo {
                        command,
                        now,
                        precondition,
                    },
                    left,
                    wait: None,
                }));
                None
            }
            Executed::Answered { reply, denied } => {
                let status = reply.status.unwrap_or(200);
                let reason = error_message(&reply);
                if let Some(answer) = self.answer.take() {
                    let (_, to) = *answer;
                    answer_requester(space, session, &to, &reply, &core.metrics);
                }
                let verdict = match (denied, status) {
                    (true, _) => Verdict::NotAuthorized,
                    (false, s) if s >= 400 => Verdict::Failed,
                    _ => Verdict::Accepted,
                };
                self.events.clear();
                Some(Told {
                    verdict,
                    reason,
                    status: Some(status),
                })
            }
        }
    }

    pub(crate) fn finish(
        &mut self,
        result: Result<(), StoreError>,
        core: &Core,
        space: &SolutionSpace,
        session: &Session,
    ) -> Told {
        match result {
            Ok(()) => {
                let queued_durably = dispatch::publish_events(
                    &core.twins.policies,
                    space,
                    &std::mem::take(&mut self.events),
                    self.policy.as_ref(),
                    &*core.twins.store,
                    &core.metrics,
                    now(),
                );
                if queued_durably {
                    self.durable = core.twins.store.durable_so_far();
                    self.told = Some(Told::accepted());
                }
                if let Some(answer) = self.answer.take() {
                    let (answer, reply) = *answer;
                    answer_requester(space, session, &reply, &answer, &core.metrics);
                }
                Told::accepted()
            }
            Err(e) => {
                tracing::error!(error = %e, client = %session.client_id, "a twin change could not be journaled");
                // A cluster store that got no ack in time cannot say whether JetStream stored
                // the write after all (other nodes will show it if it did): say so.
                let (status, code, reason) = match e {
                    StoreError::Unavailable { .. } => (
                        503,
                        "things:unavailable",
                        "the change was not confirmed: the cluster store did not acknowledge it \
                         in time (it may still have been stored; read the thing to see)",
                    ),
                    _ => (
                        500,
                        "things:internal.error",
                        "the change could not be stored",
                    ),
                };
                if let Some(answer) = self.answer.take() {
                    let (answer, reply) = *answer;
                    let error = DittoError::new(status, code, reason);
                    let topic = Some(answer.topic.clone());
                    let failed = Envelope::error(topic.as_ref(), &error, None);
                    answer_requester(space, session, &reply, &failed, &core.metrics);
                }
                Told {
                    status: Some(status),
                    ..Told::new(Verdict::Failed, reason)
                }
            }
        }
    }
}

/// A request to [`Core::execute`].
#[derive(Debug)]
pub enum Request<'a> {
    /// A thing or policy command.
    Command(Command),
    /// A live message to a thing, with the topic it travels on.
    Message {
        message: LiveMessage,
        topic: TopicName,
        payload: &'a [u8],
        origin: Origin,
    },
    /// A message on a plain topic (`topic` may be a slice of a read buffer).
    Plain {
        topic: &'a TopicName,
        payload: &'a [u8],
        origin: Origin,
    },
}

impl Core {
    pub fn publish(
        &self,
        client: &Client,
        topic: &TopicName,
        payload: &[u8],
        origin: Origin,
        reply: ReplyTo,
    ) -> Outcome {
        Usage::add(&client.space.usage.bytes_in, payload.len() as u64);
        if !is_twin_topic(topic.as_str()) {
            return self.execute(
                client,
                Request::Plain {
                    topic,
                    payload,
                    origin,
                },
                reply,
            );
        }
        let parsed = match parse_mqtt_topic(topic.as_str()) {
            Ok(parsed) => parsed,
            Err(e) => return Outcome::Now(Told::new(Verdict::BadTopic, e.to_string())),
        };
        let request = match mqtt_request(&parsed, payload) {
            Ok(DittoRequest::Command(command)) => {
                let reply = default_reply(client, reply, &parsed, Some(command_headers(&command)));
                return self.execute(client, Request::Command(command), reply);
            }
            Ok(DittoRequest::Message(message)) => message,
            Err(error) => {
                let reply = default_reply(client, reply, &parsed, None);
                let answer = Envelope::error(parsed.ditto_topic().as_ref(), &error, None);
                answer_requester(
                    &client.space,
                    &client.session,
                    &reply,
                    &answer,
                    &self.metrics,
                );
                return Outcome::Now(Told::new(Verdict::BadPayload, error.message));
            }
        };
        let message_topic = match parsed {
            MqttTopic::Envelope => {
                let mut text = String::new();
                match write_message_topic(&mut text, &request)
                    .ok()
                    .and_then(|()| text.parse::<TopicName>().ok())
                {
                    Some(topic) => topic,
                    None => {
                        return Outcome::Now(Told::new(
                            Verdict::BadTopic,
                            "the message has no MQTT topic",
                        ));
                    }
                }
            }
            _ => deep_copy_topic(topic),
        };
        self.execute(
            client,
            Request::Message {
                message: request,
                topic: message_topic,
                payload,
                origin,
            },
            reply,
        )
    }

    /// What the requester of a duplicate (a QoS 2 PUBLISH resent before its PUBREL) is told,
    /// and when: a twin command once everything written so far is durable (its first attempt
    /// may still be on its way to the journal); a plain message at once.
    pub fn duplicate(&self, topic: &TopicName) -> Outcome {
        if is_twin_topic(topic.as_str()) {
            Outcome::Pending(Pending::durable_so_far(self))
        } else {
            Outcome::Now(Told::accepted())
        }
    }

    /// Authorizes and carries out `request` for `client`; the answer to a command goes to
    /// the requester alone, as `reply` says.
    pub fn execute(&self, client: &Client, request: Request<'_>, reply: ReplyTo) -> Outcome {
        let now = now();
        let usage = &client.space.usage;
        Usage::add(&usage.messages_in, 1);
        match &request {
            Request::Plain { .. } => self.metrics.core_in.plain.inc(),
            Request::Message { .. } => self.metrics.core_in.message.inc(),
            Request::Command(_) => self.metrics.core_in.command.inc(),
        };
        let outcome = self.execute_request(client, request, reply, now);
        let allowed = match &outcome {
            Outcome::Now(told) => told.verdict != Verdict::NotAuthorized,
            Outcome::Pending(_) => true,
        };
        if allowed {
            Usage::add(&usage.allowed, 1);
        }
        outcome
    }

    fn execute_request(
        &self,
        client: &Client,
        request: Request<'_>,
        reply: ReplyTo,
        now: Timestamp,
    ) -> Outcome {
        match request {
            Request::Plain {
                topic,
                payload,
                origin,
            } if topic.as_str().starts_with(crate::core::REPLY_PREFIX) => {
                self.reply(client, topic, payload, origin)
            }
            Request::Plain {
                topic,
                payload,
                origin,
            } => {
                // Fail closed: a cluster node that cannot prove the solution policy current
                // neither authorizes nor delivers; the publisher is told, not left to believe
                // it was delivered.
                if let Err(e) = self.twins.store.current() {
                    return Outcome::Now(Told {
                        status: Some(503),
                        ..Told::new(
                            Verdict::Failed,
                            format!("the message cannot be authorized now: {e}"),
                        )
                    });
                }
                if !client.solution_allows(
                    ResourceType::Topic,
                    topic.as_str(),
                    Permission::Write,
                    Mode::Unrestricted,
                    now,
                ) {
                    client.space.denied(&self.metrics, "publish");
                    tracing::debug!(
                        solution = %client.space.id,
                        client = %client.session.client_id,
                        topic = topic.as_str(),
                        subjects = ?&client.identity.subjects[..],
                        "publish denied"
                    );
                    return Outcome::Now(Told::new(
                        Verdict::NotAuthorized,
                        "not authorized to publish to this topic",
                    ));
                }
                let message = Message::new(
                    deep_copy_topic(topic),
                    Bytes::copy_from_slice(payload),
                    origin,
                );
                let kept = message
                    .retain
                    .then(|| self.keep_retained(&client.space, &message))
                    .flatten();
                let queued_durably =
                    dispatch::publish(&client.space, &message, &self.metrics, &*self.twins.store);
                if let Some(relay) = self.relay.get() {
                    relay.plain(client.space.id.as_str(), &message);
                }
                match kept {
                    Some(Err(e)) => Outcome::Now(Told::new(Verdict::Failed, e.to_string())),
                    // A retained message, or one queued for a persistent session, is
                    // acknowledged once it is durable (the barrier covers both writes).
                    _ if queued_durably => Outcome::Pending(Pending::durable_so_far(self)),
                    Some(Ok(durable)) => Outcome::Pending(Pending::after(durable)),
                    None => Outcome::Now(Told::accepted()),
                }
            }
            Request::Message {
                message,
                topic,
                payload,
                origin,
            } => {
                let resource = message.path();
                match self
                    .twins
                    .authorize_message(client, &message, &resource, now)
                {
                    Ok(policy) => {
                        let shared = Message::new(
                            topic,
                            Bytes::copy_from_slice(payload),
                            Origin {
                                retain: false,
                                expiry_seconds: None,
                                ..origin
                            },
                        );
                        if let Some(relay) = self.relay.get() {
                            relay.live(
                                client.space.id.as_str(),
                                &shared,
                                message.thing_id.as_str(),
                                &resource,
                            );
                        }
                        let queued_durably = dispatch::publish_live(
                            &client.space,
                            shared,
                            &policy,
                            &resource,
                            message.thing_id.namespace(),
                            &*self.twins.store,
                            &self.metrics,
                            now,
                        );
                        if queued_durably {
                            // Queued for a persistent session: acknowledged once journaled.
                            Outcome::Pending(Pending::durable_so_far(self))
                        } else {
                            Outcome::Now(Told::accepted())
                        }
                    }
                    Err(error) => {
                        if let Ok(topic) = message.topic() {
                            let answer = Envelope::error(
                                Some(&topic),
                                &error,
                                message.headers.correlation_id.as_deref(),
                            );
                            answer_requester(
                                &client.space,
                                &client.session,
                                &reply,
                                &answer,
                                &self.metrics,
                            );
                        }
                        if error.status == 503 {
                            // Not a denial: this node cannot decide now (cluster store behind).
                            return Outcome::Now(Told {
                                status: Some(503),
                                ..Told::new(Verdict::Failed, error.message)
                            });
                        }
                        client.space.denied(&self.metrics, "message");
                        tracing::debug!(
                            solution = %client.space.id,
                            client = %client.session.client_id,
                            thing = %message.thing_id,
                            subject = %message.subject,
                            "live message denied"
                        );
                        Outcome::Now(Told::new(Verdict::NotAuthorized, error.message))
                    }
                }
            }
            Request::Command(command) => self.execute_command(client, command, reply, now),
        }
    }

    /// A publish to a reply address: to the one session waiting on it, or refused if none is
    /// (any more).
    fn reply(&self, client: &Client, topic: &TopicName, payload: &[u8], origin: Origin) -> Outcome {
        let message = Message::new(
            deep_copy_topic(topic),
            Bytes::copy_from_slice(payload),
            Origin {
                qos: origin.qos.min(QoS::AtLeastOnce),
                retain: false,
                ..origin
            },
        );
        if self.deliver_reply(&client.space, message.clone()) {
            return Outcome::Now(Told::accepted());
        }
        if let Some(relay) = self.relay.get() {
            // Cluster mode: the requester may wait on another node (the address is
            // unguessable: only the node holding it delivers).
            relay.reply(client.space.id.as_str(), &message);
            return Outcome::Now(Told::accepted());
        }
        client.space.denied(&self.metrics, "publish");
        Outcome::Now(Told::new(
            Verdict::NotAuthorized,
            "nobody waits for an answer at this address",
        ))
    }

    /// An answer for a reply address (`message.topic`), into the session waiting there:
    /// whether one waits on this node.
    pub fn deliver_reply(&self, space: &SolutionSpace, message: Arc<Message>) -> bool {
        let Some(waiting) = space.reply_session(message.topic.as_str()) else {
            return false;
        };
        let qos = message.qos;
        let delivery = Delivery {
            message,
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            stored: None,
            redelivered: false,
        };
        waiting.enqueue(waiting.lock(), delivery, &self.metrics);
        true
    }

    fn execute_command(
        &self,
        client: &Client,
        command: Command,
        reply: ReplyTo,
        now: Timestamp,
    ) -> Outcome {
        let described = tracing::enabled!(tracing::Level::DEBUG).then(|| describe(&command));
        match self.twins.execute(client, command, now) {
            Executed::Answered {
                reply: answer,
                denied,
            } => {
                let status = answer.status.unwrap_or(200);
                let reason = error_message(&answer);
                if denied {
                    client.space.denied(&self.metrics, "command");
                    tracing::debug!(
                        solution = %client.space.id,
                        client = %client.session.client_id,
                        command = %described.unwrap_or_default(),
                        subjects = ?&client.identity.subjects[..],
                        "command denied"
                    );
                }
                answer_requester(
                    &client.space,
                    &client.session,
                    &reply,
                    &answer,
                    &self.metrics,
                );
                let verdict = match (denied, status) {
                    (true, _) => Verdict::NotAuthorized,
                    (false, s) if s >= 400 => Verdict::Failed,
                    _ => Verdict::Accepted,
                };
                Outcome::Now(Told {
                    verdict,
                    reason,
                    status: Some(status),
                })
            }
            Executed::Written {
                durable,
                events,
                command,
                status,
                value,
                policy,
                now,
                precondition,
            } => {
                let wanted = reply.wanted && reply.topic.is_some();
                let answer = wanted.then(|| {
                    Box::new((
                        build_answer(&command, &events, status, value),
                        reply.owned(),
                    ))
                });
                Outcome::Pending(Pending {
                    durable,
                    events,
                    answer,
                    policy,
                    told: None,
                    redo: Some(Box::new(Retry {
                        redo: Redo {
                            command,
                            now,
                            precondition,
                        },
                        left: REDO_ATTEMPTS,
                        wait: None,
                    })),
                })
            }
        }
    }

    /// Subscribes `client`'s session to `filter` (`$share/{group}/…` for a shared
    /// subscription), then sends it the matching retained messages. A filter in the twin space
    /// must stay within the solution's namespaces (each event is judged on delivery); any
    /// other needs partial READ on its levels before the first wildcard in the solution policy,
    /// and may not reach into the twin space of another solution's namespace.
    /// Publishes a client's last will: authorized like a plain publish of its subjects (a will
    /// in the twin space is refused), at the moment it is due.
    pub fn publish_will(
        &self,
        space: &SolutionSpace,
        client_id: &str,
        subjects: &[String],
        will: Arc<Message>,
    ) {
        let view = space.policy().for_subjects(subjects, None, now());
        let topic = will.topic.as_str();
        if is_twin_topic(topic)
            || !view.check(
                ResourceType::Topic,
                topic,
                Permission::Write,
                Mode::Unrestricted,
            )
        {
            space.denied(&self.metrics, "publish");
            tracing::debug!(solution = %space.id, client = client_id, topic, "will denied");
            return;
        }
        if will.retain
            && let Some(Err(e)) = self.keep_retained(space, &will)
        {
            tracing::error!(error = %e, solution = %space.id, "a retained will could not be stored");
        }
        dispatch::publish(space, &will, &self.metrics, &*self.twins.store);
    }

    /// Keeps `message` as its topic's retained message in `space` (an empty payload clears it),
    /// in memory and in the journal, in the same order (`crate::core::retained`). `None`: not
    /// kept (the solution's retained limit; counted).
    fn keep_retained(
        &self,
        space: &SolutionSpace,
        message: &Arc<Message>,
    ) -> Option<Result<Durable, RetainError>> {
        let topic = message.topic.as_str();
        let mut retained = space.retained_write();
        let clear = message.payload.is_empty();
        if !clear && retained.len() >= space.max_retained && !retained.contains_key(topic) {
            self.metrics.dropped("retained_limit");
            return None;
        }
        let written = retained::store(&*self.twins.store, space.id.as_str(), message);
        if clear {
            retained.remove(topic);
        } else {
            retained.insert(topic.into(), message.clone());
        }
        Some(written)
    }
}

/// `reply` completed: the default response topic of the command published on `parsed` when the
/// requester gave none, and kept only if the requester's session subscribed to it.
fn default_reply(
    client: &Client,
    mut reply: ReplyTo,
    parsed: &MqttTopic<'_>,
    headers: Option<&CommandHeaders>,
) -> ReplyTo {
    reply.wanted &= headers.is_none_or(|h| h.response_required != Some(false));
    if reply.wanted && reply.topic.is_none() && client.session.has_subscriptions() {
        reply.topic = response_topic(parsed)
            .and_then(|t| t.parse::<TopicName>().ok())
            .filter(|t| client.session.subscribed_qos(t.as_str()).is_some());
    }
    reply
}

/// Sends `answer` to the requester alone: into its own session, on the topic `reply` names —
/// or, when that topic is one of the solution's reply addresses ([`Core::reply_address`]),
/// into the session waiting there (an AMQP requester's `reply-to` queue).
fn answer_requester(
    space: &SolutionSpace,
    session: &Session,
    reply: &ReplyTo,
    answer: &Envelope,
    metrics: &Metrics,
) {
    let (true, Some(topic)) = (reply.wanted, &reply.topic) else {
        return;
    };
    let waiting = topic
        .as_str()
        .starts_with(crate::core::REPLY_PREFIX)
        .then(|| space.reply_session(topic.as_str()))
        .flatten();
    let session = waiting.as_deref().unwrap_or(session);
    let qos = session
        .subscribed_qos(topic.as_str())
        .unwrap_or(QoS::AtLeastOnce);
    let message = Message::new(
        deep_copy_topic(topic),
        Bytes::from(answer.to_bytes()),
        Origin {
            qos,
            properties: ForwardedProperties::correlation(
                reply.correlation.as_deref().map(Bytes::copy_from_slice),
            ),
            ..Origin::default()
        },
    );
    let delivery = Delivery {
        qos,
        retain: false,
        subscription_ids: Vec::new(),
        message,
        stored: None,
        redelivered: false,
    };
    metrics.core_out.answer.inc();
    session.enqueue(session.lock(), delivery, metrics);
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
fn describe(command: &Command) -> String {
    match command {
        Command::Thing(c) => format!("{} thing {} {}", c.action.as_str(), c.thing_id, c.path),
        Command::Policy(c) => format!("{} policy {} {}", c.action.as_str(), c.policy_id, c.path),
    }
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

#[cfg(test)]
mod retry_tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn the_first_conflict_is_decided_again_at_once_then_after_a_growing_random_pause() {
        assert_eq!(backoff(0), None);
        assert_eq!(backoff(1), None);
        for (conflicts, cap) in [(2, 4), (3, 8), (6, 64), (40, 64)] {
            let pauses: Vec<Duration> = (0..200).filter_map(|_| backoff(conflicts)).collect();
            assert_eq!(pauses.len(), 200);
            assert!(pauses.iter().all(|p| *p < Duration::from_millis(cap)));
            // Jittered: not all the same.
            assert!(pauses.iter().any(|p| *p != pauses[0]), "{pauses:?}");
        }
    }
}
