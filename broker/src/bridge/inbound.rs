//! A consumed message, whatever the transport: its subjects from the source's authorization
//! context (placeholders resolved from its headers), the source's enforcement, then the core —
//! [`Core::publish`] on `ditto/commands`, exactly as an MQTT device publishing an envelope — and
//! how the message is settled: acknowledged once the command is applied durably or answered
//! with an error, requeued after a retryable failure, rejected (dead-lettered) when malformed
//! or not authorized. The answer goes back to the message's reply address, with its
//! correlation ID.
//!
//! Nothing is authorized or applied here: the subjects are the source's configuration, the
//! decision is the core's. The enforcement is the connection's own rule (Ditto's connectivity
//! applies it before the command exists), and is checked before the core sees the message.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use twin::DittoError;
use twin::protocol::envelope::Envelope;
use twin::protocol::topic::Topic;

use crate::bridge::Status;
use crate::bridge::config::Source;
use crate::bridge::placeholder::{TopicPart, Values};
use crate::core::message::Origin;
use crate::core::{Client, Core, Identity, Outcome, Pending, ReplyTo, Told, Verdict};
use crate::mqtt::codec::{QoS, TopicName};

/// How long a command may wait for the store before it is given back to the broker (requeued).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Distinct subject sets whose clients (and memoized policy views) are kept per source.
const MAX_CLIENTS: usize = 1024;

/// The topic commands arrive on in the core (the envelope form).
const COMMANDS_TOPIC: &str = "ditto/commands";

/// The address answers go to inside the core: the source's own sessions, never routed.
const ANSWER_TOPIC: &str = "$thingsgate/bridge/answer";

/// A message as a transport consumed it.
#[derive(Debug)]
pub struct Inbound<'a> {
    pub payload: &'a [u8],
    /// Header names in lower case (AMQP headers, MQTT 5 user properties), with the values
    /// of the source's `headerMapping` added.
    pub headers: Vec<(String, String)>,
    /// Where the answer goes (AMQP `reply-to`, MQTT 5 response topic, or a `reply-to` header).
    pub reply_to: Option<String>,
    /// Sent back with the answer (AMQP `correlation-id`, MQTT 5 correlation data).
    pub correlation: Option<Bytes>,
}

impl Values for Inbound<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn thing(&self) -> Option<(&str, &str)> {
        None
    }

    fn topic(&self, _: TopicPart) -> Option<&str> {
        None
    }
}

/// The addressed thing, for an enforcement filter.
struct Addressed<'a>(&'a str, &'a str);

impl Values for Addressed<'_> {
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
    fn thing(&self) -> Option<(&str, &str)> {
        Some((self.0, self.1))
    }
    fn topic(&self, _: TopicPart) -> Option<&str> {
        None
    }
}

/// What happens to the consumed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Applied (durably) or answered with an error: done.
    Ack,
    /// A retryable failure (store unavailable, timeout): back to the queue.
    Requeue,
    /// Malformed, unresolvable or not authorized: rejected without requeue (dead-lettered).
    Reject,
}

/// An answer for the message's reply address.
#[derive(Debug)]
pub struct Reply {
    pub to: String,
    pub correlation: Option<Bytes>,
    pub payload: Bytes,
    /// The answer's status (for the transport's own headers: AMQP `status`, MQTT 5 user
    /// property `status`).
    pub status: Option<u16>,
}

/// The result of handling one message.
#[derive(Debug)]
pub struct Handled {
    pub settle: Settle,
    pub reply: Option<Reply>,
}

/// A source at work: its settings, and the core clients of the subject sets it has met.
#[derive(Debug)]
pub struct SourceRuntime {
    core: Arc<Core>,
    solution: String,
    connection: String,
    source: Source,
    status: Arc<Status>,
    clients: Mutex<HashMap<Arc<[String]>, Arc<Client>>>,
    /// [`COMMANDS_TOPIC`] and [`ANSWER_TOPIC`], parsed once (not per message).
    commands_topic: Option<TopicName>,
    answer_topic: Option<TopicName>,
}

/// The part of an envelope the bridge reads before the core: the topic (the addressed thing)
/// and the correlation ID (for its own error answers).
#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    headers: Option<PeekHeaders<'a>>,
}

#[derive(Deserialize)]
struct PeekHeaders<'a> {
    #[serde(borrow, default, rename = "correlation-id")]
    correlation_id: Option<Cow<'a, str>>,
}

/// A message the core is still working on: resolves once the write is durable (or failed, or
/// [`COMMAND_TIMEOUT`] passed).
pub struct Waiting {
    core: Arc<Core>,
    client: Arc<Client>,
    pending: Pending,
    reply: Option<(String, Option<Bytes>)>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    status: Arc<Status>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting").finish_non_exhaustive()
    }
}

/// The first step of handling a message: decided now, or waiting for the store.
#[derive(Debug)]
pub enum Step {
    Done(Handled),
    Wait(Waiting),
}

impl Future for Waiting {
    type Output = Handled;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Handled> {
        let this = self.get_mut();
        let core = &this.core;
        let client = &this.client;
        match this
            .pending
            .poll_done(cx, core, &client.space, &client.session)
        {
            Poll::Ready(told) => {
                let answer = take_answer(core, client);
                Poll::Ready(finish(&this.status, &told, answer, this.reply.take()))
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    this.status.count_failed();
                    tracing::warn!("a bridged command waited too long for the store; requeued");
                    // The write may still complete; its answer then finds nobody waiting.
                    return Poll::Ready(Handled {
                        settle: Settle::Requeue,
                        reply: None,
                    });
                }
                Poll::Pending
            }
        }
    }
}

/// Messages the core is still working on, polled front to back — in the order they were
/// consumed — so that when several writes become durable in one journal batch their events go
/// out in the order the writes were made (a set that polls in wake-up order could announce a
/// thing's revision 11 before its revision 10). `T` is what the transport needs to settle
/// each (a delivery tag, a packet to acknowledge).
#[derive(Debug)]
pub struct InOrder<T> {
    queue: std::collections::VecDeque<(Waiting, T)>,
}

impl<T> Default for InOrder<T> {
    fn default() -> Self {
        InOrder {
            queue: std::collections::VecDeque::new(),
        }
    }
}

impl<T: Send + 'static> InOrder<T> {
    pub fn push(&mut self, waiting: Waiting, tag: T) {
        self.queue.push_back((waiting, tag));
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Every message settled by now, once at least one is.
    pub fn poll_settled(&mut self, cx: &mut Context<'_>) -> Poll<Vec<(Handled, T)>> {
        let mut settled = Vec::new();
        let mut i = 0;
        while let Some((waiting, _)) = self.queue.get_mut(i) {
            match Pin::new(&mut *waiting).poll(cx) {
                Poll::Ready(handled) => {
                    if let Some((_, tag)) = self.queue.remove(i) {
                        settled.push((handled, tag));
                    }
                }
                // No write announces its events before every write ahead of it has.
                Poll::Pending if !waiting.pending.announced() => break,
                Poll::Pending => i += 1,
            }
        }
        if settled.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(settled)
        }
    }

    /// Waits until at least one message is settled; every one settled by then.
    pub async fn settled(&mut self) -> Vec<(Handled, T)> {
        std::future::poll_fn(|cx| self.poll_settled(cx)).await
    }

    /// The transport is gone: the writes still complete in the background (their events go
    /// out, in order); their messages were not settled and come again.
    pub fn finish_in_background(mut self) {
        if self.queue.is_empty() {
            return;
        }
        tokio::spawn(async move {
            while !self.queue.is_empty() {
                let _ = self.settled().await;
            }
        });
    }
}

/// The answer the core put into the client's session, if any.
fn take_answer(core: &Core, client: &Client) -> Option<Bytes> {
    let mut state = client.session.lock();
    let mut answer = None;
    // Only answers go into these sessions (they subscribe to nothing); take them all.
    while let Some(delivery) = state.pop_next(&core.metrics) {
        answer = Some(delivery.message.payload.clone());
    }
    answer
}

/// How the core's verdict settles the message.
fn finish(
    status: &Status,
    told: &Told,
    answer: Option<Bytes>,
    reply: Option<(String, Option<Bytes>)>,
) -> Handled {
    let answer_status = || {
        told.status
            .or_else(|| answer.as_deref().and_then(status_of))
    };
    let (settle, code) = match told.verdict {
        Verdict::Accepted => {
            status.count_in();
            (Settle::Ack, None)
        }
        Verdict::NotAuthorized => {
            status.count_denied();
            (Settle::Reject, answer_status())
        }
        Verdict::BadTopic | Verdict::BadPayload => {
            status.count_failed();
            (Settle::Reject, answer_status())
        }
        Verdict::Failed => {
            let code = answer_status();
            status.count_failed();
            match code {
                // Answered with an error (not found, conflict, precondition failed, …): the
                // command is done; another delivery would be answered the same.
                Some(c) if c < 500 => (Settle::Ack, Some(c)),
                _ => (Settle::Requeue, code),
            }
        }
    };
    Handled {
        settle,
        reply: match (reply, answer) {
            (Some((to, correlation)), Some(payload)) => Some(Reply {
                to,
                correlation,
                status: code.or_else(|| status_of(&payload)),
                payload,
            }),
            _ => None,
        },
    }
}

/// The `status` of an answer envelope, read without building the envelope.
fn status_of(answer: &[u8]) -> Option<u16> {
    #[derive(Deserialize)]
    struct Status {
        status: Option<u16>,
    }
    serde_json::from_slice::<Status>(answer).ok()?.status
}

impl SourceRuntime {
    pub fn new(
        core: Arc<Core>,
        solution: &str,
        connection: &str,
        source: Source,
        status: Arc<Status>,
    ) -> Self {
        SourceRuntime {
            core,
            solution: solution.to_owned(),
            connection: connection.to_owned(),
            source,
            status,
            clients: Mutex::new(HashMap::new()),
            commands_topic: COMMANDS_TOPIC.parse().ok(),
            answer_topic: ANSWER_TOPIC.parse().ok(),
        }
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Adds the source's `headerMapping` values to `headers` (a mapping that cannot be
    /// resolved is left out: it only adds headers).
    pub fn map_headers(&self, headers: &mut Vec<(String, String)>) {
        if self.source.header_mapping.is_empty() {
            return;
        }
        let view = Inbound {
            payload: &[],
            headers: headers.clone(),
            reply_to: None,
            correlation: None,
        };
        for (name, template) in &self.source.header_mapping {
            if let Ok(value) = template.resolve(&view) {
                headers.retain(|(k, _)| k != name);
                headers.push((name.clone(), value));
            }
        }
    }

    /// Handles one consumed message: decided at once, or waiting for the store.
    pub fn handle(&self, inbound: &Inbound<'_>) -> Step {
        let reply = inbound
            .reply_to
            .clone()
            .filter(|to| !to.is_empty())
            .map(|to| (to, inbound.correlation.clone()));
        let limit = self.core.settings.max_packet_size as usize;
        if inbound.payload.len() > limit {
            // Not even parsed: the same bound as a device's message.
            self.status.count_failed();
            let error = DittoError::new(
                413,
                "things:message.toolarge",
                format!(
                    "the message has {} bytes, more than the {limit} a command may have",
                    inbound.payload.len()
                ),
            )
            .with_description("Send smaller commands (the server's `max_packet_size`).");
            return Step::Done(Handled {
                settle: Settle::Reject,
                reply: reply.map(|(to, correlation)| Reply {
                    to,
                    correlation,
                    payload: Bytes::from(Envelope::error(None, &error, None).to_bytes()),
                    status: Some(413),
                }),
            });
        }
        let mut subjects = Vec::with_capacity(self.source.authorization_context.len());
        for template in &self.source.authorization_context {
            match template.resolve(inbound) {
                Ok(subject) => subjects.push(subject),
                Err(unresolved) => {
                    self.status.count_failed();
                    let error = DittoError::new(
                        400,
                        "placeholder:placeholder.unresolved",
                        format!(
                            "the placeholder `{{{{ {} }}}}` of the connection's authorization context could not be resolved from the message",
                            unresolved.0
                        ),
                    )
                    .with_description("Send the header it names with every message.");
                    return Step::Done(self.refuse(inbound, reply, &error));
                }
            }
        }
        if let Some(enforcement) = &self.source.enforcement
            && let Err(error) = self.enforce(enforcement, inbound)
        {
            self.status.count_denied();
            tracing::debug!(
                solution = %self.solution,
                connection = %self.connection,
                "message refused by the connection's enforcement"
            );
            return Step::Done(self.refuse(inbound, reply, &error));
        }
        let Some(client) = self.client(subjects) else {
            self.status.count_failed();
            return Step::Done(Handled {
                settle: Settle::Requeue,
                reply: None,
            });
        };
        let Some(topic) = &self.commands_topic else {
            return Step::Done(Handled {
                settle: Settle::Requeue,
                reply: None,
            });
        };
        let to_core = ReplyTo {
            wanted: reply.is_some(),
            topic: self.answer_topic.clone(),
            correlation: None,
        };
        let origin = Origin {
            qos: QoS::AtLeastOnce,
            publisher: client.session.id,
            ..Origin::default()
        };
        match self
            .core
            .publish(&client, topic, inbound.payload, origin, to_core)
        {
            Outcome::Now(told) => {
                let answer = take_answer(&self.core, &client);
                Step::Done(finish(&self.status, &told, answer, reply))
            }
            Outcome::Pending(pending) => Step::Wait(Waiting {
                core: self.core.clone(),
                client,
                pending,
                reply,
                deadline: Box::pin(tokio::time::sleep(COMMAND_TIMEOUT)),
                status: self.status.clone(),
            }),
        }
    }

    /// The enforcement: the message's input must equal a filter resolved for the thing its
    /// envelope addresses.
    fn enforce(
        &self,
        enforcement: &crate::bridge::config::Enforcement,
        inbound: &Inbound<'_>,
    ) -> Result<(), DittoError> {
        let failed = |namespace: &str, name: &str| {
            DittoError::new(
                400,
                "connectivity:connection.id.enforcement.failed",
                format!("The configured filters could not be matched against the given target with ID '{namespace}:{name}'."),
            )
            .with_description("Either modify the configured filters or ensure that the message is sent via the correct ID.")
        };
        let peek: Option<Peek<'_>> = serde_json::from_slice(inbound.payload).ok();
        let topic = peek.as_ref().and_then(|p| p.topic.as_deref());
        let Some((namespace, name)) = topic.and_then(|t| {
            let mut levels = t.splitn(3, '/');
            Some((levels.next()?, levels.next()?))
        }) else {
            // Not an envelope addressing a thing: the core refuses it as malformed.
            return Ok(());
        };
        let Ok(input) = enforcement.input.resolve(inbound) else {
            return Err(failed(namespace, name));
        };
        let thing = Addressed(namespace, name);
        let matched = enforcement
            .filters
            .iter()
            .filter_map(|f| f.resolve(&thing).ok())
            .any(|filter| filter == input);
        if matched {
            Ok(())
        } else {
            Err(failed(namespace, name))
        }
    }

    /// A message the bridge itself refuses: rejected, with a Ditto error answer if it asked.
    fn refuse(
        &self,
        inbound: &Inbound<'_>,
        reply: Option<(String, Option<Bytes>)>,
        error: &DittoError,
    ) -> Handled {
        let reply = reply.map(|(to, correlation)| {
            let peek: Option<Peek<'_>> = serde_json::from_slice(inbound.payload).ok();
            let topic = peek
                .as_ref()
                .and_then(|p| p.topic.as_deref())
                .and_then(|t| Topic::parse(t).ok());
            let correlation_id = peek
                .as_ref()
                .and_then(|p| p.headers.as_ref())
                .and_then(|h| h.correlation_id.as_deref());
            Reply {
                to,
                correlation,
                payload: Bytes::from(
                    Envelope::error(topic.as_ref(), error, correlation_id).to_bytes(),
                ),
                status: Some(error.status),
            }
        });
        Handled {
            settle: Settle::Reject,
            reply,
        }
    }

    /// The core client of `subjects` (one per distinct subject set, so its policy views are
    /// memoized across messages).
    fn client(&self, subjects: Vec<String>) -> Option<Arc<Client>> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        // Looked up by slice: the shared list is built only for a subject set not met before.
        if let Some(client) = clients.get(subjects.as_slice()) {
            return Some(client.clone());
        }
        let subjects: Arc<[String]> = subjects.into();
        let solution = self.core.auth.solutions.get(&self.solution)?;
        if clients.len() >= MAX_CLIENTS {
            for (_, client) in clients.drain() {
                self.core.release(&client);
            }
        }
        let identity = Identity {
            solution,
            subjects: subjects.clone(),
            client_id: format!("bridge:{}", self.connection).into(),
            expiry: None,
            jwt_method: false,
            secret: None,
        };
        let client = Arc::new(
            self.core
                .transient_as(identity, crate::core::session::Protocol::Bridge),
        );
        clients.insert(subjects, client.clone());
        Some(client)
    }
}

impl Drop for SourceRuntime {
    fn drop(&mut self) {
        let clients = self
            .clients
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, client) in clients.drain() {
            self.core.release(&client);
        }
    }
}
