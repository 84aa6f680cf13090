//! The compact MQTT form of the Ditto protocol (DESIGN.md §3): the MQTT topic is the Ditto topic
//! followed by the path, the payload is the value.
//!
//! # Published by clients
//!
//! | MQTT topic | payload | meaning |
//! |---|---|---|
//! | `{ns}/{name}/things/twin/commands/{action}{path}` | JSON value | thing command |
//! | `{ns}/{name}/policies/commands/{action}{path}` | JSON value | policy command |
//! | `{ns}/{name}/things/live/messages/{subject}` | message | to the thing (its inbox) |
//! | `{ns}/{name}/things/live/messages/{subject}/outbox` | message | from the thing |
//! | `{ns}/{name}/things/live/messages/{subject}/features/{featureId}` | message | to a feature |
//! | `{ns}/{name}/things/live/messages/{subject}/features/{featureId}/outbox` | message | from a feature |
//! | `ditto/commands` | Ditto envelope | any command or message |
//!
//! `{action}` is `create`, `modify`, `merge`, `retrieve` or `delete`; `{path}` is empty (the whole
//! thing or policy) or `/`-separated levels (`/features/temp/properties/value`), checked when the
//! command is built ([`ThingPath::parse`]). A command's payload is its JSON value: required for
//! create, modify and merge, ignored (may be empty) for retrieve and delete.
//!
//! Live messages: the subject is exactly one level. After it comes where the message goes, the
//! Ditto message path without its redundant `/messages/{subject}` tail: nothing or `/inbox` for
//! the thing's inbox, `/outbox`, `/features/{featureId}` (or `…/inbox`), `/features/{featureId}/
//! outbox`. A subject of several levels needs the envelope on `ditto/commands`. The payload is
//! JSON when it parses as JSON (`content-type: application/json`), else UTF-8 text
//! (`text/plain`); binary payloads need the envelope (base64 value).
//!
//! Everything whose third level is not `things` or `policies`, and whose first level is not
//! `ditto`, is a plain topic ([`is_twin_topic`]). Clients never publish events, responses or
//! errors; wildcards (`+`, `#`) are refused anywhere.
//!
//! # Sent by the server
//!
//! | MQTT topic | payload |
//! |---|---|
//! | `{ns}/{name}/things/twin/events/{action}{path}` | event envelope (value, revision, timestamp) |
//! | `{ns}/{name}/policies/events/{action}{path}` | event envelope |
//! | `{ns}/{name}/things/twin/responses/{action}{path}` | the response value |
//! | `{ns}/{name}/policies/responses/{action}{path}` | the response value |
//! | the live message topics above | the message payload |
//! | `ditto/responses` | response envelope (to `ditto/commands` requests) |
//!
//! # The hot path
//!
//! [`parse_mqtt_topic`] runs on every published twin message: it borrows from the topic and
//! allocates nothing for a valid one (`tests/no_alloc.rs` proves it). The writers
//! append to a caller's `String` so a connection reuses one buffer; once it has grown they
//! allocate nothing either.

use serde_json::Value;

use crate::command::{Action, Command, CommandHeaders, PolicyCommand, ThingCommand};
use crate::entity::Event;
use crate::error::DittoError;
use crate::id::{PolicyId, ThingId};
use crate::path::ThingPath;
use crate::protocol::envelope::{
    Envelope, Request, entity_parts, policy_path, write_event_envelope,
};
use crate::protocol::message::{LiveMessage, MessageDirection};
use crate::protocol::topic::{
    Channel, Criterion, EXPECTED_CHANNEL, EXPECTED_GROUP, EXPECTED_NAME, EXPECTED_NAMESPACE,
    EXPECTED_SUBJECT, Group, Levels, Topic, TopicError, TopicLevel, check_entity, check_topic_text,
    is_valid_level, parse_action, write_entity_levels,
};

/// Where clients publish full Ditto envelopes.
pub const ENVELOPE_COMMANDS_TOPIC: &str = "ditto/commands";
/// Where the answers to [`ENVELOPE_COMMANDS_TOPIC`] requests go (to the requester only).
pub const ENVELOPE_RESPONSES_TOPIC: &str = "ditto/responses";

const EXPECTED_TWIN_CRITERION: &str = "`commands` (clients publish commands)";
const EXPECTED_LIVE_CRITERION: &str = "`messages`";
const EXPECTED_ENVELOPE_CHANNEL: &str = "`commands` (`ditto/commands`)";
const EXPECTED_FEATURE_ID: &str = "a feature ID: one level without `+`, `#` or control characters";
const EXPECTED_MESSAGE_TARGET: &str = "nothing (the thing's inbox), `inbox`, `outbox` or \
     `features/{featureId}[/inbox|/outbox]`";
const EXPECTED_DIRECTION: &str = "nothing (the feature's inbox), `inbox` or `outbox`";

/// A twin topic a client published to, borrowed from the topic text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttTopic<'a> {
    /// `{ns}/{name}/things/twin/commands/{action}{path}`.
    ThingCommand {
        namespace: &'a str,
        name: &'a str,
        action: Action,
        /// The rest of the topic after the action, from its `/` (`""` for the whole thing).
        path: &'a str,
    },
    /// `{ns}/{name}/policies/commands/{action}{path}`.
    PolicyCommand {
        namespace: &'a str,
        name: &'a str,
        action: Action,
        /// The rest of the topic after the action, from its `/` (`""` for the whole policy).
        path: &'a str,
    },
    /// `{ns}/{name}/things/live/messages/{subject}[/features/{featureId}][/inbox|/outbox]`.
    LiveMessage {
        namespace: &'a str,
        name: &'a str,
        direction: MessageDirection,
        feature_id: Option<&'a str>,
        subject: &'a str,
    },
    /// `ditto/commands`: the payload is a full Ditto envelope.
    Envelope,
}

impl<'a> MqttTopic<'a> {
    /// The namespace named by the topic (`None` for `ditto/commands`, whose entity is inside
    /// the payload). The broker checks the solution owns it before anything else.
    pub fn namespace(&self) -> Option<&'a str> {
        match *self {
            MqttTopic::ThingCommand { namespace, .. }
            | MqttTopic::PolicyCommand { namespace, .. }
            | MqttTopic::LiveMessage { namespace, .. } => Some(namespace),
            MqttTopic::Envelope => None,
        }
    }

    /// The entity name named by the topic (`None` for `ditto/commands`).
    pub fn name(&self) -> Option<&'a str> {
        match *self {
            MqttTopic::ThingCommand { name, .. }
            | MqttTopic::PolicyCommand { name, .. }
            | MqttTopic::LiveMessage { name, .. } => Some(name),
            MqttTopic::Envelope => None,
        }
    }

    /// The equivalent Ditto topic (e.g. to answer with an error envelope on its errors topic);
    /// `None` for `ditto/commands`.
    pub fn ditto_topic(&self) -> Option<Topic> {
        let (namespace, name, group, criterion) = match *self {
            MqttTopic::ThingCommand {
                namespace,
                name,
                action,
                ..
            } => (
                namespace,
                name,
                Group::Things(Channel::Twin),
                Criterion::Commands(action),
            ),
            MqttTopic::PolicyCommand {
                namespace,
                name,
                action,
                ..
            } => (
                namespace,
                name,
                Group::Policies,
                Criterion::Commands(action),
            ),
            MqttTopic::LiveMessage {
                namespace,
                name,
                subject,
                ..
            } => (
                namespace,
                name,
                Group::Things(Channel::Live),
                Criterion::Messages(subject.to_owned()),
            ),
            MqttTopic::Envelope => return None,
        };
        // INVARIANT: `parse_mqtt_topic` checked every part, so this cannot fail.
        Topic::new(namespace, name, group, criterion).ok()
    }
}

pub use super::space::is_twin_topic;

/// The criterion and action levels of a thing (twin channel) or policy command topic: only
/// `commands/{action}` is for clients; events, responses and errors go server → client.
fn parse_command_criterion(levels: &mut Levels<'_>) -> Result<Action, TopicError> {
    match levels.expect(TopicLevel::Criterion, EXPECTED_TWIN_CRITERION)? {
        "commands" => parse_action(levels),
        criterion @ ("events" | "responses" | "errors") => Err(TopicError::ServerToClient {
            criterion: server_to_client(criterion),
        }),
        other => Err(TopicError::invalid(
            TopicLevel::Criterion,
            levels.position(),
            other,
            EXPECTED_TWIN_CRITERION,
        )),
    }
}

fn server_to_client(criterion: &str) -> &'static str {
    match criterion {
        "events" => "events",
        "responses" => "responses",
        _ => "errors",
    }
}

/// Parses a twin topic a client published to, without allocating when it is valid.
///
/// Refuses, with the level and reason: an empty or too long topic, wildcards, an empty or
/// invalid namespace or name, a group other than `things`/`policies`, events, responses and
/// errors (server → client only), unknown actions, live commands and events, and anything
/// under `ditto/` but `ditto/commands`.
pub fn parse_mqtt_topic(topic: &str) -> Result<MqttTopic<'_>, TopicError> {
    check_topic_text(topic)?;
    let mut levels = Levels::new(topic);
    let namespace = levels.expect(TopicLevel::Namespace, EXPECTED_NAMESPACE)?;
    if namespace == "ditto" && !matches!(topic.split('/').nth(2), Some("things" | "policies")) {
        return parse_envelope_topic(levels);
    }
    let name = levels.expect(TopicLevel::Name, EXPECTED_NAME)?;
    check_entity(namespace, name, false)?;
    match levels.expect(TopicLevel::Group, EXPECTED_GROUP)? {
        "things" => match levels.expect(TopicLevel::Channel, EXPECTED_CHANNEL)? {
            "twin" => {
                let action = parse_command_criterion(&mut levels)?;
                Ok(MqttTopic::ThingCommand {
                    namespace,
                    name,
                    action,
                    path: levels.remainder(),
                })
            }
            "live" => match levels.expect(TopicLevel::Criterion, EXPECTED_LIVE_CRITERION)? {
                "messages" => parse_message_topic(namespace, name, levels),
                "commands" | "events" => Err(TopicError::Unsupported {
                    what: "live commands and live events",
                    hint: "send live messages (`{namespace}/{name}/things/live/messages/{subject}`)",
                }),
                "errors" => Err(TopicError::ServerToClient {
                    criterion: "errors",
                }),
                other => Err(TopicError::invalid(
                    TopicLevel::Criterion,
                    levels.position(),
                    other,
                    EXPECTED_LIVE_CRITERION,
                )),
            },
            other => Err(TopicError::invalid(
                TopicLevel::Channel,
                levels.position(),
                other,
                EXPECTED_CHANNEL,
            )),
        },
        "policies" => {
            let action = parse_command_criterion(&mut levels)?;
            Ok(MqttTopic::PolicyCommand {
                namespace,
                name,
                action,
                path: levels.remainder(),
            })
        }
        other => Err(TopicError::invalid(
            TopicLevel::Group,
            levels.position(),
            other,
            EXPECTED_GROUP,
        )),
    }
}

/// `ditto/…` after its first level: only `ditto/commands` is published by clients.
fn parse_envelope_topic(mut levels: Levels<'_>) -> Result<MqttTopic<'_>, TopicError> {
    match levels.expect(TopicLevel::EnvelopeChannel, EXPECTED_ENVELOPE_CHANNEL)? {
        "commands" => {
            levels.finish(TopicLevel::EnvelopeChannel)?;
            Ok(MqttTopic::Envelope)
        }
        "responses" => Err(TopicError::ServerToClient {
            criterion: "ditto/responses",
        }),
        other => Err(TopicError::invalid(
            TopicLevel::EnvelopeChannel,
            levels.position(),
            other,
            EXPECTED_ENVELOPE_CHANNEL,
        )),
    }
}

/// The levels after `{ns}/{name}/things/live/messages`.
fn parse_message_topic<'a>(
    namespace: &'a str,
    name: &'a str,
    mut levels: Levels<'a>,
) -> Result<MqttTopic<'a>, TopicError> {
    let subject = levels.expect(TopicLevel::Subject, EXPECTED_SUBJECT)?;
    if !is_valid_level(subject) {
        return Err(TopicError::invalid(
            TopicLevel::Subject,
            levels.position(),
            subject,
            EXPECTED_SUBJECT,
        ));
    }
    let (feature_id, direction, last) = match levels.next_level() {
        None => (None, MessageDirection::Inbox, TopicLevel::Subject),
        Some("features") => {
            let feature = levels.expect(TopicLevel::FeatureId, EXPECTED_FEATURE_ID)?;
            if !is_valid_level(feature) {
                return Err(TopicError::invalid(
                    TopicLevel::FeatureId,
                    levels.position(),
                    feature,
                    EXPECTED_FEATURE_ID,
                ));
            }
            match levels.next_level() {
                None => (
                    Some(feature),
                    MessageDirection::Inbox,
                    TopicLevel::FeatureId,
                ),
                Some(text) => match MessageDirection::parse(text) {
                    Some(direction) => (Some(feature), direction, TopicLevel::MessageTarget),
                    None => {
                        return Err(TopicError::invalid(
                            TopicLevel::MessageTarget,
                            levels.position(),
                            text,
                            EXPECTED_DIRECTION,
                        ));
                    }
                },
            }
        }
        Some(text) => match MessageDirection::parse(text) {
            Some(direction) => (None, direction, TopicLevel::MessageTarget),
            None => {
                return Err(TopicError::invalid(
                    TopicLevel::MessageTarget,
                    levels.position(),
                    text,
                    EXPECTED_MESSAGE_TARGET,
                ));
            }
        },
    };
    levels.finish(last)?;
    Ok(MqttTopic::LiveMessage {
        namespace,
        name,
        direction,
        feature_id,
        subject,
    })
}

/// What a client asks for with `payload` published on `topic`: a command (compact form or
/// envelope) or a live message. Headers are empty; the MQTT layer adds what it knows (MQTT 5
/// correlation data, response topic).
pub fn mqtt_request(topic: &MqttTopic<'_>, payload: &[u8]) -> Result<Request, DittoError> {
    match *topic {
        MqttTopic::ThingCommand {
            namespace,
            name,
            action,
            path,
        } => {
            let thing_id = ThingId::from_parts(namespace, name)
                .map_err(|e| DittoError::id_invalid(e.to_string()))?;
            let path = ThingPath::parse(path)?;
            let value = payload_value(action, payload)?;
            Ok(Request::Command(Command::Thing(ThingCommand {
                thing_id,
                action,
                path,
                value,
                headers: CommandHeaders::default(),
            })))
        }
        MqttTopic::PolicyCommand {
            namespace,
            name,
            action,
            path,
        } => {
            let policy_id = PolicyId::parse(&format!("{namespace}:{name}"))
                .map_err(|e| DittoError::id_invalid(e.to_string()))?;
            let path = policy_path(path)?;
            let value = payload_value(action, payload)?;
            Ok(Request::Command(Command::Policy(PolicyCommand {
                policy_id,
                action,
                path,
                value,
                headers: CommandHeaders::default(),
            })))
        }
        MqttTopic::LiveMessage {
            namespace,
            name,
            direction,
            feature_id,
            subject,
        } => {
            let thing_id = ThingId::from_parts(namespace, name)
                .map_err(|e| DittoError::id_invalid(e.to_string()))?;
            let mut message =
                LiveMessage::new(thing_id, direction, feature_id.map(str::to_owned), subject);
            let (payload, content_type) = message_payload(payload)?;
            message.payload = payload;
            message.headers.content_type = content_type.map(str::to_owned);
            Ok(Request::Message(message))
        }
        MqttTopic::Envelope => Envelope::parse(payload)?.into_request(),
    }
}

/// The command published with `payload` on `topic`. Live messages are refused here (see
/// [`mqtt_request`]).
pub fn mqtt_command(topic: &MqttTopic<'_>, payload: &[u8]) -> Result<Command, DittoError> {
    match mqtt_request(topic, payload)? {
        Request::Command(command) => Ok(command),
        Request::Message(_) => Err(DittoError::from(TopicError::Unsupported {
            what: "live messages as commands",
            hint: "a live message is routed, not applied",
        })),
    }
}

/// The live message published with `payload` on `topic`. Commands are refused here.
pub fn mqtt_message(topic: &MqttTopic<'_>, payload: &[u8]) -> Result<LiveMessage, DittoError> {
    match mqtt_request(topic, payload)? {
        Request::Message(message) => Ok(message),
        Request::Command(_) => Err(DittoError::from(TopicError::Unsupported {
            what: "commands as live messages",
            hint: "commands are applied to the twin, not routed",
        })),
    }
}

/// A command's payload: its JSON value for create, modify and merge; ignored for retrieve and
/// delete (which may be empty).
fn payload_value(action: Action, payload: &[u8]) -> Result<Option<Value>, DittoError> {
    match action {
        Action::Retrieve | Action::Delete => Ok(None),
        Action::Create | Action::Modify | Action::Merge => {
            if payload.trim_ascii().is_empty() {
                return Err(DittoError::json_invalid(format!(
                    "`{}` needs a JSON value as payload, and the payload is empty",
                    action.as_str()
                )));
            }
            serde_json::from_slice(payload).map(Some).map_err(|e| {
                DittoError::json_invalid(format!("the payload is not valid JSON: {e}"))
            })
        }
    }
}

/// A live message's payload: JSON if it parses, else UTF-8 text; and its content type.
fn message_payload(payload: &[u8]) -> Result<(Option<Value>, Option<&'static str>), DittoError> {
    if payload.is_empty() {
        return Ok((None, None));
    }
    if let Ok(value) = serde_json::from_slice::<Value>(payload) {
        return Ok((Some(value), Some("application/json")));
    }
    match std::str::from_utf8(payload) {
        Ok(text) => Ok((Some(Value::String(text.to_owned())), Some("text/plain"))),
        Err(_) => Err(DittoError::json_invalid(
            "the payload is neither JSON nor UTF-8 text: send binary messages as a Ditto envelope \
             on `ditto/commands` with a base64 value",
        )),
    }
}

/// Refuses a path that cannot be part of an MQTT topic name.
fn check_path_for_topic(path: &str) -> Result<(), TopicError> {
    match path.bytes().find(|b| matches!(b, b'+' | b'#')) {
        Some(wildcard) => Err(TopicError::Wildcard(char::from(wildcard))),
        None => Ok(()),
    }
}

/// Appends the non-empty segments of `path`, each after a `/` (no `//`, no trailing `/`).
fn push_path(buf: &mut String, path: &str) {
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        buf.push('/');
        buf.push_str(segment);
    }
}

/// Appends `{ns}/{name}/{group}[/{channel}]` ([`write_entity_levels`], the one writer of that
/// prefix).
#[inline]
fn push_entity(buf: &mut String, namespace: &str, name: &str, group: Group) {
    // Writing to a `String` cannot fail.
    let _ = write_entity_levels(buf, namespace, name, group);
}

/// Appends the MQTT topic of `event` to `buf`:
/// `org.acme/sensor-1/things/twin/events/modified/features/temp/properties/value` (a root event
/// has no path), `…/policies/events/{action}{path}` for policies. Solutions have no topic; a
/// path holding `+` or `#` cannot be a topic. Writes nothing on error.
pub fn write_event_topic(buf: &mut String, event: &Event) -> Result<(), TopicError> {
    let (namespace, name, group) = entity_parts(&event.key)?;
    check_path_for_topic(&event.path)?;
    push_entity(buf, namespace, name, group);
    buf.push_str("/events/");
    buf.push_str(event.action.as_str());
    push_path(buf, &event.path);
    Ok(())
}

/// Appends the MQTT payload of `event` to `buf`: its Ditto envelope (topic, path, value,
/// revision, timestamp), with `value` in place of the event's own value (pass the receiver's
/// partial view, or `event.value.as_ref()`). Writes nothing on error.
pub fn write_event_payload(
    buf: &mut String,
    event: &Event,
    value: Option<&Value>,
) -> Result<(), TopicError> {
    write_event_envelope(buf, event, value)
}

/// Appends the topic of the response to a thing command published in the compact form:
/// `{ns}/{name}/things/twin/responses/{action}{path}` (DESIGN.md §3), `path` as it came in the
/// command's topic. Writes nothing on error.
pub fn write_response_topic(
    buf: &mut String,
    thing_id: &ThingId,
    action: Action,
    path: &str,
) -> Result<(), TopicError> {
    check_path_for_topic(path)?;
    push_entity(
        buf,
        thing_id.namespace(),
        thing_id.name(),
        Group::Things(Channel::Twin),
    );
    push_response(buf, action, path);
    Ok(())
}

/// Appends `{ns}/{name}/policies/responses/{action}{path}`. Writes nothing on error.
pub fn write_policy_response_topic(
    buf: &mut String,
    policy_id: &PolicyId,
    action: Action,
    path: &str,
) -> Result<(), TopicError> {
    check_path_for_topic(path)?;
    let (namespace, name) = policy_id.as_str().split_once(':').unwrap_or_default();
    push_entity(buf, namespace, name, Group::Policies);
    push_response(buf, action, path);
    Ok(())
}

/// Appends the response topic of `command` (thing or policy), its path written from the
/// command (`~` as `~0`). Writes nothing on error.
pub fn write_command_response_topic(buf: &mut String, command: &Command) -> Result<(), TopicError> {
    match command {
        Command::Thing(c) => {
            if let Some(segment) = c.path.segments().iter().find(|s| s.contains(['+', '#'])) {
                return check_path_for_topic(segment);
            }
            push_entity(
                buf,
                c.thing_id.namespace(),
                c.thing_id.name(),
                Group::Things(Channel::Twin),
            );
            push_response(buf, c.action, "");
            for segment in c.path.segments() {
                buf.push('/');
                push_encoded(buf, segment);
            }
            Ok(())
        }
        Command::Policy(c) => write_policy_response_topic(buf, &c.policy_id, c.action, &c.path),
    }
}

fn push_response(buf: &mut String, action: Action, path: &str) {
    buf.push_str("/responses/");
    buf.push_str(action.as_str());
    push_path(buf, path);
}

/// Appends a decoded segment with `~` written `~0`.
fn push_encoded(buf: &mut String, segment: &str) {
    for (i, part) in segment.split('~').enumerate() {
        if i > 0 {
            buf.push_str("~0");
        }
        buf.push_str(part);
    }
}

/// Appends the compact MQTT topic of a live message (the shortest spelling: no `/inbox`):
/// `{ns}/{name}/things/live/messages/{subject}[/features/{featureId}][/outbox]`. Writes nothing
/// on error (a subject or feature ID that is not one valid level).
pub fn write_message_topic(buf: &mut String, message: &LiveMessage) -> Result<(), TopicError> {
    if !is_valid_level(&message.subject) {
        return Err(TopicError::invalid(
            TopicLevel::Subject,
            6,
            &message.subject,
            EXPECTED_SUBJECT,
        ));
    }
    if let Some(feature) = &message.feature_id
        && !is_valid_level(feature)
    {
        return Err(TopicError::invalid(
            TopicLevel::FeatureId,
            8,
            feature,
            EXPECTED_FEATURE_ID,
        ));
    }
    push_entity(
        buf,
        message.thing_id.namespace(),
        message.thing_id.name(),
        Group::Things(Channel::Live),
    );
    buf.push_str("/messages/");
    buf.push_str(&message.subject);
    if let Some(feature) = &message.feature_id {
        buf.push_str("/features/");
        buf.push_str(feature);
    }
    if message.direction == MessageDirection::Outbox {
        buf.push_str("/outbox");
    }
    Ok(())
}
