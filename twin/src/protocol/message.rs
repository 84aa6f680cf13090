//! Live messages: routed between applications and devices on the `live` channel, never stored.
//!
//! A message goes to a thing (`inbox`) or comes from it (`outbox`), either the thing itself or
//! one of its features; its Ditto path says which, and its subject is free text:
//!
//! | Ditto path | authorized on |
//! |---|---|
//! | `/inbox/messages/{subject}` | `message:/inbox/messages/{subject}` |
//! | `/outbox/messages/{subject}` | `message:/outbox/messages/{subject}` |
//! | `/features/{id}/inbox/messages/{subject}` | `message:/features/{id}/inbox/messages/{subject}` |
//! | `/features/{id}/outbox/messages/{subject}` | `message:/features/{id}/outbox/messages/{subject}` |
//!
//! (Sending a message needs unrestricted WRITE on its resource, DESIGN.md §1 rule 4.) Path
//! segments are written with `~` as `~0`, as every path in Thingsgate is.

use std::fmt::{self, Write};

use serde_json::{Map, Value};

use crate::error::DittoError;
use crate::id::ThingId;
use crate::protocol::envelope::{Envelope, header_bool, header_string};
use crate::protocol::topic::{
    Channel, Criterion, EXPECTED_SUBJECT, Group, Topic, TopicError, TopicLevel, is_valid_level,
};

/// Which way a message travels, seen from the thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageDirection {
    /// To the thing (or feature): an application asks the device.
    Inbox,
    /// From the thing (or feature): the device tells applications.
    Outbox,
}

impl MessageDirection {
    pub const fn as_str(self) -> &'static str {
        match self {
            MessageDirection::Inbox => "inbox",
            MessageDirection::Outbox => "outbox",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "inbox" => Some(MessageDirection::Inbox),
            "outbox" => Some(MessageDirection::Outbox),
            _ => None,
        }
    }
}

/// The headers a live message carries that Thingsgate reads; the rest travel in `other`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageHeaders {
    /// How to read the payload (`application/json`, `text/plain`, …).
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    /// Whether the sender waits for a response message (Ditto's default: true).
    pub response_required: Option<bool>,
    pub other: Map<String, Value>,
}

/// A live message to or from a thing or one of its features.
///
/// `subject` and `feature_id` are single path levels: not empty, no `/`, `+`, `#` or control
/// characters (the parsers guarantee it; writers refuse what breaks it).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMessage {
    pub thing_id: ThingId,
    pub direction: MessageDirection,
    /// The feature the message is for or from; `None` for the thing itself.
    pub feature_id: Option<String>,
    pub subject: String,
    pub payload: Option<Value>,
    pub headers: MessageHeaders,
    /// Set on a response to a message (the device's answer), as Ditto sets it.
    pub status: Option<u16>,
}

impl LiveMessage {
    /// A message without payload or headers.
    pub fn new(
        thing_id: ThingId,
        direction: MessageDirection,
        feature_id: Option<String>,
        subject: impl Into<String>,
    ) -> Self {
        LiveMessage {
            thing_id,
            direction,
            feature_id,
            subject: subject.into(),
            payload: None,
            headers: MessageHeaders::default(),
            status: None,
        }
    }

    /// Appends the Ditto path (`/features/{id}/inbox/messages/{subject}`) to `out`.
    pub fn write_path(&self, out: &mut String) {
        // Writing to a `String` cannot fail.
        let _ = self.write_path_to(out);
    }

    fn write_path_to(&self, out: &mut impl Write) -> fmt::Result {
        if let Some(feature) = &self.feature_id {
            out.write_str("/features/")?;
            write_segment(out, feature)?;
        }
        write!(out, "/{}/messages/", self.direction.as_str())?;
        write_segment(out, &self.subject)
    }

    /// The Ditto path, e.g. `/inbox/messages/reboot`.
    pub fn path(&self) -> String {
        let mut path = String::new();
        self.write_path(&mut path);
        path
    }

    /// Appends the policy resource the message is authorized on (`message:` + its path).
    pub fn write_resource(&self, out: &mut String) {
        out.push_str("message:");
        self.write_path(out);
    }

    /// The policy resource the message is authorized on, e.g. `message:/inbox/messages/reboot`.
    pub fn resource(&self) -> String {
        let mut resource = String::new();
        self.write_resource(&mut resource);
        resource
    }

    /// The Ditto topic, `{ns}/{name}/things/live/messages/{subject}`.
    pub fn topic(&self) -> Result<Topic, TopicError> {
        Topic::live_message(&self.thing_id, &self.subject)
    }

    /// The message as a Ditto envelope.
    pub fn to_envelope(&self) -> Result<Envelope, TopicError> {
        let topic = self.topic()?;
        if let Some(feature) = &self.feature_id
            && !is_valid_level(feature)
        {
            return Err(TopicError::invalid(
                TopicLevel::FeatureId,
                8,
                feature,
                "a feature ID: one level without `+`, `#` or control characters",
            ));
        }
        let mut headers = Map::new();
        let h = &self.headers;
        if let Some(content_type) = &h.content_type {
            headers.insert("content-type".into(), Value::from(content_type.as_str()));
        }
        if let Some(id) = &h.correlation_id {
            headers.insert("correlation-id".into(), Value::from(id.as_str()));
        }
        if let Some(required) = h.response_required {
            headers.insert("response-required".into(), Value::from(required));
        }
        for (key, value) in &h.other {
            headers.entry(key.clone()).or_insert_with(|| value.clone());
        }
        let mut envelope = Envelope::new(topic, self.path());
        envelope.value = self.payload.clone();
        envelope.headers = headers;
        envelope.status = self.status;
        Ok(envelope)
    }

    /// Reads a message from an envelope on `{ns}/{name}/things/live/messages/{subject}`; the
    /// envelope's path must name the same subject.
    pub fn from_envelope(envelope: Envelope) -> Result<Self, DittoError> {
        let Envelope {
            topic,
            path,
            value,
            headers,
            status,
            ..
        } = envelope;
        let (Group::Things(Channel::Live), Criterion::Messages(subject)) =
            (topic.group(), topic.criterion())
        else {
            return Err(DittoError::from(TopicError::invalid(
                TopicLevel::Criterion,
                topic.group().criterion_position(),
                topic.criterion().as_str(),
                "`messages` on the `live` channel",
            )));
        };
        let thing_id = topic.thing_id()?;
        let (direction, feature_id, path_subject) = parse_message_path(&path)?;
        if path_subject != *subject {
            return Err(DittoError::json_invalid(format!(
                "field `path` names the subject `{path_subject}` but the topic names `{subject}`"
            )));
        }
        let mut message = LiveMessage::new(thing_id, direction, feature_id, subject.clone());
        message.payload = value;
        message.status = status;
        message.headers = message_headers(headers)?;
        Ok(message)
    }
}

/// Writes one path segment with `~` as `~0`.
fn write_segment(out: &mut impl Write, segment: &str) -> fmt::Result {
    for (i, part) in segment.split('~').enumerate() {
        if i > 0 {
            out.write_str("~0")?;
        }
        out.write_str(part)?;
    }
    Ok(())
}

/// Splits a message path into direction, feature and subject (all decoded).
fn parse_message_path(
    path: &str,
) -> Result<(MessageDirection, Option<String>, String), DittoError> {
    let invalid = || {
        DittoError::json_invalid(format!(
            "field `path` `{path}` is not a message path: expected `/inbox/messages/{{subject}}`, \
             `/outbox/messages/{{subject}}` or `/features/{{id}}/inbox|outbox/messages/{{subject}}`"
        ))
    };
    let segments: Vec<_> = crate::entity::path_segments(path).collect();
    let (feature, rest) = match segments.as_slice() {
        [features, feature, rest @ ..] if features == "features" => {
            (Some(feature.to_string()), rest)
        }
        all => (None, all),
    };
    let [direction, messages, subject] = rest else {
        return Err(invalid());
    };
    let direction = MessageDirection::parse(direction).ok_or_else(invalid)?;
    if messages != "messages" {
        return Err(invalid());
    }
    if !is_valid_level(subject) {
        return Err(DittoError::json_invalid(format!(
            "field `path` names the subject `{subject}`: expected {EXPECTED_SUBJECT}"
        )));
    }
    if let Some(feature) = &feature
        && !is_valid_level(feature)
    {
        return Err(invalid());
    }
    Ok((direction, feature, subject.to_string()))
}

fn message_headers(headers: Map<String, Value>) -> Result<MessageHeaders, DittoError> {
    let mut parsed = MessageHeaders::default();
    for (key, value) in headers {
        if key.eq_ignore_ascii_case("content-type") {
            parsed.content_type = Some(header_string(&key, value)?);
        } else if key.eq_ignore_ascii_case("correlation-id") {
            parsed.correlation_id = Some(header_string(&key, value)?);
        } else if key.eq_ignore_ascii_case("response-required") {
            parsed.response_required = Some(header_bool(&key, &value)?);
        } else {
            parsed.other.insert(key, value);
        }
    }
    Ok(parsed)
}
