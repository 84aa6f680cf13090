//! The Ditto protocol envelope: the JSON in which a full message travels (DESIGN.md §3).
//!
//! ```json
//! {"topic":"org.acme/sensor-1/things/twin/commands/modify","headers":{"correlation-id":"c1"},
//!  "path":"/features/temp/properties/value","value":21.5}
//! ```
//!
//! Fields: `topic` (required), `headers` (object, default empty), `path` (required: Ditto always
//! sends it, and a missing path must not default to the whole thing for a delete), `value`
//! (any JSON; `null` is a value), `status` (responses and errors), `fields` (a retrieve's field
//! selector), `extra` (object), `revision` and `timestamp` (events). Unknown fields are ignored,
//! as Ditto ignores them. Errors name the field: 400 `things:json.invalid` for the envelope's
//! shape, 400 `header.invalid` (Ditto's code) for a header value, the topic's own error
//! ([`TopicError`]) for the topic.
//!
//! The conversions: envelope → [`Request`] (a [`Command`] or a [`LiveMessage`]), command →
//! envelope, [`Event`] → envelope, command → response or error envelope.

use std::fmt::{self, Write};

use policy::Timestamp;
use policy::json::type_name;
use serde_json::{Map, Value};

use crate::command::{Action, Command, CommandHeaders, EntityTags, PolicyCommand, ThingCommand};
use crate::entity::{EntityKey, EntityKind, Event, EventAction};
use crate::error::DittoError;
use crate::path::ThingPath;
use crate::protocol::json::{self, ObjectWriter};
use crate::protocol::message::LiveMessage;
use crate::protocol::topic::{
    Channel, Criterion, Group, Topic, TopicError, check_entity, excerpt, write_entity_levels,
};

/// Ditto's error code for an invalid header value (status 400).
pub const HEADER_INVALID_ERROR: &str = "header.invalid";

/// A Ditto protocol message.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub topic: Topic,
    /// The JSON pointer the message addresses (`/` for the whole entity).
    pub path: String,
    /// `None` when absent; `Some(Value::Null)` is an explicit `null` (a merge that deletes).
    pub value: Option<Value>,
    pub headers: Map<String, Value>,
    /// Present on responses and errors (HTTP-like, 100 to 599).
    pub status: Option<u16>,
    /// Ditto's field selector for retrieves (`thingId,attributes/location`).
    pub fields: Option<String>,
    pub extra: Option<Map<String, Value>>,
    /// On events: the entity's revision after the event.
    pub revision: Option<u64>,
    /// On events: when the event happened (RFC 3339 on the wire).
    pub timestamp: Option<Timestamp>,
}

/// What a client's envelope asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A command on the twin (stored) or a policy.
    Command(Command),
    /// A live message, routed and never stored.
    Message(LiveMessage),
}

impl Envelope {
    /// An envelope with only a topic and a path.
    pub fn new(topic: Topic, path: impl Into<String>) -> Self {
        Envelope {
            topic,
            path: path.into(),
            value: None,
            headers: Map::new(),
            status: None,
            fields: None,
            extra: None,
            revision: None,
            timestamp: None,
        }
    }

    /// Parses an envelope from JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, DittoError> {
        let json: Value = serde_json::from_slice(bytes)
            .map_err(|e| DittoError::json_invalid(format!("the envelope is not JSON: {e}")))?;
        Envelope::from_json(json)
    }

    /// Parses an envelope from JSON text.
    pub fn parse_str(text: &str) -> Result<Self, DittoError> {
        Envelope::parse(text.as_bytes())
    }

    /// Reads an envelope from parsed JSON.
    pub fn from_json(json: Value) -> Result<Self, DittoError> {
        let Value::Object(mut object) = json else {
            return Err(DittoError::json_invalid(format!(
                "the envelope must be a JSON object, not {}",
                type_name(&json)
            )));
        };
        let topic = match object.remove("topic") {
            Some(Value::String(text)) => Topic::parse(&text).map_err(|e| {
                let mut error = DittoError::from(e);
                error.message = format!("field `topic` `{}`: {}", excerpt(&text), error.message);
                error
            })?,
            Some(other) => return Err(wrong_type("topic", "a string", &other)),
            None => return Err(missing("topic")),
        };
        let path = match object.remove("path") {
            Some(Value::String(path)) => path,
            Some(other) => return Err(wrong_type("path", "a string", &other)),
            None => return Err(missing("path")),
        };
        let headers = match object.remove("headers") {
            Some(Value::Object(headers)) => headers,
            None | Some(Value::Null) => Map::new(),
            Some(other) => return Err(wrong_type("headers", "an object", &other)),
        };
        let status = match object.remove("status") {
            None => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .and_then(|s| u16::try_from(s).ok())
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| {
                        DittoError::json_invalid(format!(
                            "field `status` must be an HTTP status (100 to 599), not `{n}`"
                        ))
                    })?,
            ),
            Some(other) => return Err(wrong_type("status", "a number", &other)),
        };
        let fields = match object.remove("fields") {
            None | Some(Value::Null) => None,
            Some(Value::String(fields)) => Some(fields),
            Some(other) => return Err(wrong_type("fields", "a string", &other)),
        };
        let extra = match object.remove("extra") {
            None | Some(Value::Null) => None,
            Some(Value::Object(extra)) => Some(extra),
            Some(other) => return Err(wrong_type("extra", "an object", &other)),
        };
        let revision = match object.remove("revision") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_u64().ok_or_else(|| {
                DittoError::json_invalid(format!(
                    "field `revision` must be a whole number ≥ 0, not `{n}`"
                ))
            })?),
            Some(other) => return Err(wrong_type("revision", "a number", &other)),
        };
        let timestamp = match object.remove("timestamp") {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(Timestamp::parse_rfc3339(&text).map_err(|e| {
                DittoError::json_invalid(format!(
                    "field `timestamp` `{text}` is not an RFC 3339 date-time: {e}"
                ))
            })?),
            Some(other) => return Err(wrong_type("timestamp", "a string", &other)),
        };
        Ok(Envelope {
            topic,
            path,
            value: object.remove("value"),
            headers,
            status,
            fields,
            extra,
            revision,
            timestamp,
        })
    }

    /// The envelope as JSON.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("topic".into(), Value::String(self.topic.to_string()));
        object.insert("headers".into(), Value::Object(self.headers.clone()));
        object.insert("path".into(), Value::String(self.path.clone()));
        if let Some(value) = &self.value {
            object.insert("value".into(), value.clone());
        }
        if let Some(fields) = &self.fields {
            object.insert("fields".into(), Value::String(fields.clone()));
        }
        if let Some(extra) = &self.extra {
            object.insert("extra".into(), Value::Object(extra.clone()));
        }
        if let Some(status) = self.status {
            object.insert("status".into(), Value::from(status));
        }
        if let Some(revision) = self.revision {
            object.insert("revision".into(), Value::from(revision));
        }
        if let Some(timestamp) = self.timestamp {
            object.insert("timestamp".into(), Value::String(timestamp.to_string()));
        }
        Value::Object(object)
    }

    /// Appends the envelope's JSON text to `out` (reuse the buffer to avoid allocating).
    pub fn write_json(&self, out: &mut String) {
        // Writing to a `String` cannot fail.
        let _ = self.parts().write(out);
    }

    /// The envelope's JSON text as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        self.write_json(&mut out);
        out.into_bytes()
    }

    fn parts(&self) -> EnvelopeParts<'_, Topic> {
        EnvelopeParts {
            topic: &self.topic,
            headers: Some(&self.headers),
            path: &self.path,
            value: self.value.as_ref(),
            fields: self.fields.as_deref(),
            extra: self.extra.as_ref(),
            status: self.status,
            revision: self.revision,
            timestamp: self.timestamp,
        }
    }

    /// Whether this is a response or an error (it has a `status`).
    pub fn is_response(&self) -> bool {
        self.status.is_some()
    }

    /// What the envelope asks for: a twin or policy command, or a live message. Events,
    /// errors and responses to commands travel from the server only and are refused.
    pub fn into_request(self) -> Result<Request, DittoError> {
        match (self.topic.group(), self.topic.criterion()) {
            (Group::Things(Channel::Live), Criterion::Messages(_)) => {
                LiveMessage::from_envelope(self).map(Request::Message)
            }
            (_, Criterion::Commands(_)) if self.status.is_some() => {
                Err(DittoError::from(TopicError::Unsupported {
                    what: "responses to commands",
                    hint: "Thingsgate answers commands, clients do not (the envelope has a `status`)",
                }))
            }
            (Group::Things(Channel::Twin), &Criterion::Commands(action)) => {
                let thing_id = self.topic.thing_id()?;
                let path = ThingPath::parse(&self.path)?;
                let value = command_value(action, self.value)?;
                let headers = command_headers(self.headers, self.fields)?;
                Ok(Request::Command(Command::Thing(ThingCommand {
                    thing_id,
                    action,
                    path,
                    value,
                    headers,
                })))
            }
            (Group::Policies, &Criterion::Commands(action)) => {
                let policy_id = self.topic.policy_id()?;
                let path = policy_path(&self.path)?;
                let value = command_value(action, self.value)?;
                let headers = command_headers(self.headers, self.fields)?;
                Ok(Request::Command(Command::Policy(PolicyCommand {
                    policy_id,
                    action,
                    path,
                    value,
                    headers,
                })))
            }
            (Group::Things(Channel::Live), Criterion::Commands(_) | Criterion::Events(_)) => {
                Err(DittoError::from(TopicError::Unsupported {
                    what: "live commands and live events",
                    hint: "send live messages (`{namespace}/{name}/things/live/messages/{subject}`)",
                }))
            }
            (_, criterion) => Err(DittoError::from(TopicError::ServerToClient {
                criterion: criterion.as_str(),
            })),
        }
    }

    /// The command the envelope carries (a live message is refused here: see
    /// [`Envelope::into_request`]).
    pub fn into_command(self) -> Result<Command, DittoError> {
        match self.into_request()? {
            Request::Command(command) => Ok(command),
            Request::Message(_) => Err(DittoError::from(TopicError::Unsupported {
                what: "live messages as commands",
                hint: "a live message is routed, not applied",
            })),
        }
    }

    /// The envelope that carries `command` (e.g. to forward it over a bridge).
    pub fn from_command(command: &Command) -> Self {
        let (path, value, headers) = match command {
            Command::Thing(c) => (c.path.to_string(), c.value.clone(), &c.headers),
            Command::Policy(c) => (c.path.clone(), c.value.clone(), &c.headers),
        };
        let mut envelope = Envelope::new(Topic::of_command(command), path);
        envelope.value = value;
        envelope.headers = headers_to_json(headers);
        envelope.fields = headers.fields.clone();
        envelope
    }

    /// The envelope announcing `event` (`{ns}/{name}/things/twin/events/{action}`, or
    /// `…/policies/events/{action}`), with value, revision and timestamp and no headers.
    /// Solutions have no topic.
    pub fn from_event(event: &Event) -> Result<Self, TopicError> {
        let (namespace, name, group) = entity_parts(&event.key)?;
        let topic = Topic::new(namespace, name, group, Criterion::Events(event.action))?;
        let mut envelope = Envelope::new(topic, event_path(&event.path));
        envelope.value = event.value.clone();
        envelope.revision = Some(event.revision);
        envelope.timestamp = Some(event.timestamp);
        Ok(envelope)
    }

    /// The response to `command`: its topic and path, `status`, `value`, and the command's
    /// `correlation-id` echoed.
    pub fn response(command: &Command, status: u16, value: Option<Value>) -> Self {
        let (path, headers) = match command {
            Command::Thing(c) => (c.path.to_string(), &c.headers),
            Command::Policy(c) => (c.path.clone(), &c.headers),
        };
        let mut envelope = Envelope::new(Topic::of_command(command), path);
        envelope.value = value;
        envelope.status = Some(status);
        envelope.headers = correlation_header(headers.correlation_id.as_deref());
        envelope
    }

    /// With the entity tag of `revision` (Ditto's `etag` header, `"rev:N"`), if there is one.
    pub fn with_etag(mut self, revision: Option<u64>) -> Self {
        if let Some(revision) = revision {
            self.headers
                .insert("etag".into(), Value::String(format!("\"rev:{revision}\"")));
        }
        self
    }

    /// The error answering a message on `topic` (`None`: the entity is unknown, Ditto's
    /// `_/_/things/twin/errors`): the errors topic of the same entity and channel, path `/`,
    /// value = the error's JSON, its status, and `correlation-id` echoed.
    pub fn error(topic: Option<&Topic>, error: &DittoError, correlation_id: Option<&str>) -> Self {
        let topic = topic.map_or_else(Topic::placeholder_errors, Topic::errors);
        let mut envelope = Envelope::new(topic, "/");
        envelope.value = Some(error.to_json());
        envelope.status = Some(error.status);
        envelope.headers = correlation_header(correlation_id);
        envelope
    }

    /// The error answering `command`.
    pub fn command_error(command: &Command, error: &DittoError) -> Self {
        let headers = match command {
            Command::Thing(c) => &c.headers,
            Command::Policy(c) => &c.headers,
        };
        Envelope::error(
            Some(&Topic::of_command(command)),
            error,
            headers.correlation_id.as_deref(),
        )
    }
}

impl fmt::Display for Envelope {
    /// The envelope's JSON text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.parts().write(f)
    }
}

/// Appends the envelope announcing `event` to `out`, with `value` in place of the event's own
/// (the receiver's partial view of it; pass `event.value.as_ref()` for all of it). Writes
/// nothing on error.
pub(crate) fn write_event_envelope(
    out: &mut String,
    event: &Event,
    value: Option<&Value>,
) -> Result<(), TopicError> {
    let (namespace, name, group) = entity_parts(&event.key)?;
    let topic = EventTopic {
        namespace,
        name,
        group,
        action: event.action,
    };
    let parts = EnvelopeParts {
        topic: &topic,
        headers: None,
        path: event_path(&event.path),
        value,
        fields: None,
        extra: None,
        status: None,
        revision: Some(event.revision),
        timestamp: Some(event.timestamp),
    };
    // Writing to a `String` cannot fail.
    let _ = parts.write(out);
    Ok(())
}

/// The namespace, name and group of an entity's topics.
pub(crate) fn entity_parts(key: &EntityKey) -> Result<(&str, &str, Group), TopicError> {
    let no_topic = || TopicError::NoTopic {
        key: key.to_string(),
    };
    let group = match key.kind {
        EntityKind::Thing => Group::Things(Channel::Twin),
        EntityKind::Policy => Group::Policies,
        EntityKind::Solution | EntityKind::Retained | EntityKind::Session | EntityKind::Queued => {
            return Err(no_topic());
        }
    };
    let (namespace, name) = key.id.split_once(':').ok_or_else(no_topic)?;
    check_entity(namespace, name, false)?;
    Ok((namespace, name, group))
}

/// An event's path as an envelope writes it: `/` for the root.
fn event_path(path: &str) -> &str {
    if path.split('/').all(str::is_empty) {
        "/"
    } else {
        path
    }
}

/// An event topic written from borrowed parts.
struct EventTopic<'a> {
    namespace: &'a str,
    name: &'a str,
    group: Group,
    action: EventAction,
}

impl fmt::Display for EventTopic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_entity_levels(f, self.namespace, self.name, self.group)?;
        write!(f, "/events/{}", self.action.as_str())
    }
}

/// A topic as an envelope's `topic` member: a JSON string.
trait TopicJson {
    fn write_json<W: Write>(&self, out: &mut W) -> fmt::Result;
}

impl TopicJson for Topic {
    fn write_json<W: Write>(&self, out: &mut W) -> fmt::Result {
        json::write_display(out, self)
    }
}

impl TopicJson for EventTopic<'_> {
    /// Piece by piece, escaping only the entity's name and namespace (once per event: going
    /// through `Display` and an escaping adapter cost a formatter call per piece).
    fn write_json<W: Write>(&self, out: &mut W) -> fmt::Result {
        out.write_char('"')?;
        json::Escaped(&mut *out).write_str(self.namespace)?;
        out.write_char('/')?;
        json::Escaped(&mut *out).write_str(self.name)?;
        out.write_char('/')?;
        out.write_str(self.group.as_str())?;
        if let Some(channel) = self.group.channel() {
            out.write_char('/')?;
            out.write_str(channel.as_str())?;
        }
        out.write_str("/events/")?;
        out.write_str(self.action.as_str())?;
        out.write_char('"')
    }
}

/// The fields of an envelope, borrowed, in the order they are written.
struct EnvelopeParts<'a, T: TopicJson> {
    topic: &'a T,
    /// `None` writes `{}`.
    headers: Option<&'a Map<String, Value>>,
    path: &'a str,
    value: Option<&'a Value>,
    fields: Option<&'a str>,
    extra: Option<&'a Map<String, Value>>,
    status: Option<u16>,
    revision: Option<u64>,
    timestamp: Option<Timestamp>,
}

impl<T: TopicJson> EnvelopeParts<'_, T> {
    fn write<W: Write>(&self, out: &mut W) -> fmt::Result {
        let mut object = ObjectWriter::open(out)?;
        self.topic.write_json(object.member("topic")?)?;
        match self.headers {
            Some(headers) => json::write_object(object.member("headers")?, headers)?,
            None => object.member("headers")?.write_str("{}")?,
        }
        json::write_str(object.member("path")?, self.path)?;
        if let Some(value) = self.value {
            write!(object.member("value")?, "{value}")?;
        }
        if let Some(fields) = self.fields {
            json::write_str(object.member("fields")?, fields)?;
        }
        if let Some(extra) = self.extra {
            json::write_object(object.member("extra")?, extra)?;
        }
        if let Some(status) = self.status {
            write!(object.member("status")?, "{status}")?;
        }
        if let Some(revision) = self.revision {
            write!(object.member("revision")?, "{revision}")?;
        }
        if let Some(timestamp) = self.timestamp {
            // RFC 3339 has nothing to escape.
            let out = object.member("timestamp")?;
            out.write_char('"')?;
            if timestamp.write_rfc3339(out).is_err() {
                write!(out, "{timestamp}")?;
            }
            out.write_char('"')?;
        }
        object.close()
    }
}

/// A command's value: required for create, modify and merge; ignored for retrieve and delete.
fn command_value(action: Action, value: Option<Value>) -> Result<Option<Value>, DittoError> {
    match action {
        Action::Create | Action::Modify | Action::Merge => value.map(Some).ok_or_else(|| {
            DittoError::json_invalid(format!(
                "field `value` is required for `{}`",
                action.as_str()
            ))
        }),
        Action::Retrieve | Action::Delete => Ok(None),
    }
}

/// A policy command's path: `/` for the root, always starting with `/`. Its structure is
/// checked where policy commands are applied.
pub(crate) fn policy_path(path: &str) -> Result<String, DittoError> {
    crate::path::check_path_text(path)?;
    Ok(if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    })
}

/// Reads the headers a command understands (names compared without case, as Ditto does);
/// the others are kept in `other`. The envelope's `fields` wins over a `fields` header.
pub(crate) fn command_headers(
    headers: Map<String, Value>,
    fields: Option<String>,
) -> Result<CommandHeaders, DittoError> {
    let mut parsed = CommandHeaders::default();
    for (key, value) in headers {
        if key.eq_ignore_ascii_case("correlation-id") {
            parsed.correlation_id = Some(header_string(&key, value)?);
        } else if key.eq_ignore_ascii_case("response-required") {
            parsed.response_required = Some(header_bool(&key, &value)?);
        } else if key.eq_ignore_ascii_case("if-match") {
            parsed.if_match = Some(header_entity_tags(&key, value)?);
        } else if key.eq_ignore_ascii_case("if-none-match") {
            parsed.if_none_match = Some(header_entity_tags(&key, value)?);
        } else if key.eq_ignore_ascii_case("fields") {
            parsed.fields = Some(header_string(&key, value)?);
        } else if key.eq_ignore_ascii_case("condition") {
            parsed.condition = Some(header_string(&key, value)?);
        } else {
            parsed.other.insert(key, value);
        }
    }
    if fields.is_some() {
        parsed.fields = fields;
    }
    Ok(parsed)
}

/// The headers of `headers` as an envelope carries them (`fields` travels as the envelope's
/// own field).
pub(crate) fn headers_to_json(headers: &CommandHeaders) -> Map<String, Value> {
    let mut json = correlation_header(headers.correlation_id.as_deref());
    if let Some(required) = headers.response_required {
        json.insert("response-required".into(), Value::Bool(required));
    }
    if let Some(tags) = &headers.if_match {
        json.insert("if-match".into(), Value::String(entity_tags_text(tags)));
    }
    if let Some(tags) = &headers.if_none_match {
        json.insert(
            "if-none-match".into(),
            Value::String(entity_tags_text(tags)),
        );
    }
    if let Some(condition) = &headers.condition {
        json.insert("condition".into(), Value::String(condition.clone()));
    }
    for (key, value) in &headers.other {
        json.entry(key.clone()).or_insert_with(|| value.clone());
    }
    json
}

fn correlation_header(correlation_id: Option<&str>) -> Map<String, Value> {
    let mut headers = Map::new();
    if let Some(id) = correlation_id {
        headers.insert("correlation-id".into(), Value::String(id.to_owned()));
    }
    headers
}

/// Entity tags as Ditto writes them: `*`, or `"rev:3","rev:4"`.
fn entity_tags_text(tags: &EntityTags) -> String {
    match tags {
        EntityTags::Any => "*".to_owned(),
        EntityTags::Revisions(revisions) => {
            let mut text = String::new();
            for (i, revision) in revisions.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                let _ = write!(text, "\"rev:{revision}\"");
            }
            text
        }
    }
}

fn header_invalid(key: &str, value: &Value, kind: &str) -> DittoError {
    DittoError::new(
        400,
        HEADER_INVALID_ERROR,
        format!("the value `{value}` of the header `{key}` is not a valid {kind}"),
    )
}

/// A header that must be a string.
pub(crate) fn header_string(key: &str, value: Value) -> Result<String, DittoError> {
    match value {
        Value::String(text) => Ok(text),
        other => Err(header_invalid(key, &other, "string")),
    }
}

/// A header that must be a boolean: `true`/`false`, or those words as a string.
pub(crate) fn header_bool(key: &str, value: &Value) -> Result<bool, DittoError> {
    match value {
        Value::Bool(b) => Ok(*b),
        Value::String(text) if text.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(text) if text.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(header_invalid(key, other, "boolean")),
    }
}

fn header_entity_tags(key: &str, value: Value) -> Result<EntityTags, DittoError> {
    match &value {
        Value::String(text) => EntityTags::parse(text),
        _ => None,
    }
    .ok_or_else(|| header_invalid(key, &value, "entity tag list (`*` or `\"rev:3\"`)"))
}

fn missing(field: &str) -> DittoError {
    DittoError::json_invalid(format!("the envelope has no field `{field}`"))
}

fn wrong_type(field: &str, expected: &str, found: &Value) -> DittoError {
    DittoError::json_invalid(format!(
        "field `{field}` must be {expected}, not {}",
        type_name(found)
    ))
}
