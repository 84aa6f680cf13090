//! Ditto protocol topics: `{namespace}/{name}/{group}/{channel}/{criterion}/{action}`.
//!
//! The grammar we accept (a subset of Eclipse Ditto's, the part Thingsgate serves):
//!
//! ```text
//! {ns}/{name}/things/{twin|live}/commands/{create|modify|merge|retrieve|delete}
//! {ns}/{name}/things/{twin|live}/events/{created|modified|merged|deleted}
//! {ns}/{name}/things/{twin|live}/errors
//! {ns}/{name}/things/live/messages/{subject}
//! {ns}/{name}/policies/commands/{create|modify|merge|retrieve|delete}
//! {ns}/{name}/policies/events/{created|modified|merged|deleted}
//! {ns}/{name}/policies/errors
//! ```
//!
//! Responses have no topic of their own: a response travels on its command's topic and is told
//! apart by the envelope's `status`. `{ns}` and `{name}` may be Ditto's placeholder `_` (as in
//! `_/_/things/twin/errors`, the answer to a message whose entity is unknown).
//!
//! A message subject is one topic level (no `/`): Ditto admits more, but a subject becomes an
//! MQTT topic level and a `message:` resource segment, where a `/` would change its meaning.
//!
//! [`TopicError`] is shared with the compact MQTT form ([`super::mqtt`]): it names the level
//! that is wrong, its position (1-based) and what was expected there.

use std::fmt;
use std::str::FromStr;

use policy::model::{MAX_ID_LEN, is_valid_name, is_valid_namespace};

use crate::command::{Action, Command};
use crate::entity::EventAction;
use crate::error::DittoError;
use crate::id::{PolicyId, ThingId};

/// The longest topic (in bytes) we accept: an ID of 256 characters, a path of
/// [`crate::path::MAX_PATH_LEN`] bytes and the fixed levels fit with room to spare. Longer topics
/// are refused before they are split.
pub const MAX_TOPIC_LEN: usize = 2048;

/// Ditto's placeholder for an unknown namespace or name (`_/_/things/twin/errors`).
pub const PLACEHOLDER: &str = "_";

/// Ditto's error code for a topic it cannot handle (status 400).
pub const UNKNOWN_TOPIC_ERROR: &str = "things.protocol.adapter:unknown.topicpath";

pub(crate) const EXPECTED_NAMESPACE: &str = "dot-separated parts that start with a letter and hold letters, digits and `_`, e.g. `org.acme`";
pub(crate) const EXPECTED_NAME: &str = "a name without `+`, `#` or control characters";
pub(crate) const EXPECTED_GROUP: &str = "`things` or `policies`";
pub(crate) const EXPECTED_CHANNEL: &str = "`twin` or `live`";
pub(crate) const EXPECTED_ACTION: &str = "`create`, `modify`, `merge`, `retrieve` or `delete`";
pub(crate) const EXPECTED_EVENT_ACTION: &str = "`created`, `modified`, `merged` or `deleted`";
pub(crate) const EXPECTED_SUBJECT: &str =
    "a message subject: one level without `+`, `#` or control characters";
const EXPECTED_TWIN_CRITERION: &str = "`commands`, `events` or `errors`";
const EXPECTED_LIVE_CRITERION: &str = "`commands`, `events`, `messages` or `errors`";
const EXPECTED_POLICY_CRITERION: &str = "`commands`, `events` or `errors`";

/// How much of an offending level an error quotes.
const EXCERPT_CHARS: usize = 64;

/// Writes the levels every topic of an entity starts with: `{namespace}/{name}/{group}`, then
/// `/{channel}` for things (`org.acme/lamp/things/twin`, `org.acme/p/policies`). The one writer
/// of this prefix, for [`Topic`]'s text, event envelopes and the compact MQTT topics written into
/// a connection's reused buffer (it allocates nothing of its own).
#[inline]
pub(crate) fn write_entity_levels<W: fmt::Write + ?Sized>(
    out: &mut W,
    namespace: &str,
    name: &str,
    group: Group,
) -> fmt::Result {
    out.write_str(namespace)?;
    out.write_char('/')?;
    out.write_str(name)?;
    out.write_char('/')?;
    out.write_str(group.as_str())?;
    if let Some(channel) = group.channel() {
        out.write_char('/')?;
        out.write_str(channel.as_str())?;
    }
    Ok(())
}

/// The channel of a thing topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The stored twin.
    Twin,
    /// Routed to and from the device, never stored.
    Live,
}

impl Channel {
    pub const fn as_str(self) -> &'static str {
        match self {
            Channel::Twin => "twin",
            Channel::Live => "live",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "twin" => Some(Channel::Twin),
            "live" => Some(Channel::Live),
            _ => None,
        }
    }
}

/// The third level: what kind of entity the topic is about. Policies have no channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Things(Channel),
    Policies,
}

impl Group {
    pub const fn as_str(self) -> &'static str {
        match self {
            Group::Things(_) => "things",
            Group::Policies => "policies",
        }
    }

    pub const fn channel(self) -> Option<Channel> {
        match self {
            Group::Things(channel) => Some(channel),
            Group::Policies => None,
        }
    }

    const fn expected_criteria(self) -> &'static str {
        match self {
            Group::Things(Channel::Twin) => EXPECTED_TWIN_CRITERION,
            Group::Things(Channel::Live) => EXPECTED_LIVE_CRITERION,
            Group::Policies => EXPECTED_POLICY_CRITERION,
        }
    }

    /// The position (1-based) of the criterion level.
    pub(crate) const fn criterion_position(self) -> usize {
        match self {
            Group::Things(_) => 5,
            Group::Policies => 4,
        }
    }
}

/// What the message is, with its action (or a live message's subject).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Criterion {
    Commands(Action),
    Events(EventAction),
    /// A live message; the subject is one topic level.
    Messages(String),
    Errors,
}

impl Criterion {
    pub const fn as_str(&self) -> &'static str {
        match self {
            Criterion::Commands(_) => "commands",
            Criterion::Events(_) => "events",
            Criterion::Messages(_) => "messages",
            Criterion::Errors => "errors",
        }
    }
}

/// A level of a twin topic, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicLevel {
    Namespace,
    Name,
    Group,
    Channel,
    Criterion,
    Action,
    Subject,
    /// The compact MQTT form's `inbox`, `outbox` or `features/{id}` after a message subject.
    MessageTarget,
    FeatureId,
    /// The level after `ditto` (`ditto/commands`).
    EnvelopeChannel,
}

impl fmt::Display for TopicLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopicLevel::Namespace => "namespace",
            TopicLevel::Name => "name",
            TopicLevel::Group => "group",
            TopicLevel::Channel => "channel",
            TopicLevel::Criterion => "criterion",
            TopicLevel::Action => "action",
            TopicLevel::Subject => "subject",
            TopicLevel::MessageTarget => "message target",
            TopicLevel::FeatureId => "feature ID",
            TopicLevel::EnvelopeChannel => "envelope channel",
        })
    }
}

/// Why a topic was refused (or could not be written). Positions are 1-based topic levels.
///
/// Refusing a topic allocates (the offending level is quoted); accepting one never does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("the topic is empty")]
    Empty,
    #[error("the topic is {len} bytes long, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    #[error(
        "the topic contains the wildcard `{0}`: wildcards belong in subscription filters, not in topics"
    )]
    Wildcard(char),
    #[error("the topic ends before its {level} (level {position}): expected {expected}")]
    Missing {
        level: TopicLevel,
        position: usize,
        expected: &'static str,
    },
    #[error("the {level} (level {position}) is empty: expected {expected}")]
    EmptyLevel {
        level: TopicLevel,
        position: usize,
        expected: &'static str,
    },
    #[error("the {level} (level {position}) `{found}` is invalid: expected {expected}")]
    Invalid {
        level: TopicLevel,
        position: usize,
        found: String,
        expected: &'static str,
    },
    #[error(
        "the ID `namespace:name` would be {len} characters long, more than the {MAX_ID_LEN} allowed"
    )]
    IdTooLong { len: usize },
    #[error("`{criterion}` topics are sent by the server to clients, never published by them")]
    ServerToClient { criterion: &'static str },
    #[error("{what} are not supported: {hint}")]
    Unsupported {
        what: &'static str,
        hint: &'static str,
    },
    #[error("the topic goes on after its {level} (level {position}): `{found}` is unexpected")]
    Trailing {
        level: TopicLevel,
        position: usize,
        found: String,
    },
    #[error("`{key}` has no topic (only things and policies have one)")]
    NoTopic { key: String },
}

impl TopicError {
    pub(crate) fn invalid(
        level: TopicLevel,
        position: usize,
        found: &str,
        expected: &'static str,
    ) -> Self {
        if found.is_empty() {
            return TopicError::EmptyLevel {
                level,
                position,
                expected,
            };
        }
        TopicError::Invalid {
            level,
            position,
            found: excerpt(found),
            expected,
        }
    }
}

impl From<TopicError> for DittoError {
    /// 400 `things.protocol.adapter:unknown.topicpath` (Ditto's code for a topic it refuses).
    fn from(error: TopicError) -> Self {
        DittoError::new(400, UNKNOWN_TOPIC_ERROR, error.to_string()).with_description(
            "Twin topics are `{namespace}/{name}/things/twin/commands/{action}[/{path}]`, \
             `{namespace}/{name}/policies/commands/{action}[/{path}]`, \
             `{namespace}/{name}/things/live/messages/{subject}` or `ditto/commands`.",
        )
    }
}

/// At most [`EXCERPT_CHARS`] characters of `text`, marked with `…` when cut.
pub(crate) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", text.get(..cut).unwrap_or_default()),
        None => text.to_owned(),
    }
}

/// The `/`-separated levels of a topic, read one at a time without allocating. Counts the
/// levels read so that errors can say which one is wrong.
#[derive(Debug, Clone)]
pub(crate) struct Levels<'a> {
    /// The unread text: the whole topic before the first read, afterwards `""` or the rest
    /// starting with the `/` that ended the last level read.
    tail: &'a str,
    started: bool,
    /// How many levels were read.
    position: usize,
}

impl<'a> Levels<'a> {
    pub(crate) fn new(topic: &'a str) -> Self {
        Levels {
            tail: topic,
            started: false,
            position: 0,
        }
    }

    /// The next level (possibly empty), or `None` after the last one.
    pub(crate) fn next_level(&mut self) -> Option<&'a str> {
        let rest = if self.started {
            self.tail.strip_prefix('/')?
        } else {
            self.started = true;
            self.tail
        };
        self.position += 1;
        // Levels are a few bytes long: a plain loop beats `find`'s memchr set-up here.
        let (level, tail) = match rest.bytes().position(|b| b == b'/') {
            Some(at) => rest.split_at_checked(at)?,
            None => (rest, ""),
        };
        self.tail = tail;
        Some(level)
    }

    /// The next level, which must exist and not be empty.
    pub(crate) fn expect(
        &mut self,
        level: TopicLevel,
        expected: &'static str,
    ) -> Result<&'a str, TopicError> {
        match self.next_level() {
            Some("") => Err(TopicError::EmptyLevel {
                level,
                position: self.position,
                expected,
            }),
            Some(text) => Ok(text),
            None => Err(TopicError::Missing {
                level,
                position: self.position + 1,
                expected,
            }),
        }
    }

    pub(crate) fn position(&self) -> usize {
        self.position
    }

    /// The unread rest from the `/` that ends the last level read; `""` when none is left.
    pub(crate) fn remainder(&self) -> &'a str {
        if self.started { self.tail } else { "" }
    }

    /// Succeeds when every level was read; `last` names the level read last.
    pub(crate) fn finish(&self, last: TopicLevel) -> Result<(), TopicError> {
        if self.remainder().is_empty() {
            Ok(())
        } else {
            Err(TopicError::Trailing {
                level: last,
                position: self.position,
                found: excerpt(self.remainder()),
            })
        }
    }
}

/// Checks what holds for the whole text of any topic: not empty, not too long, no wildcard.
pub(crate) fn check_topic_text(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            len: topic.len(),
            max: MAX_TOPIC_LEN,
        });
    }
    match topic.bytes().find(|b| matches!(b, b'+' | b'#')) {
        Some(wildcard) => Err(TopicError::Wildcard(char::from(wildcard))),
        None => Ok(()),
    }
}

/// Checks the namespace and name levels (positions 1 and 2) and the length of the ID they make.
/// With `placeholders`, Ditto's `_` stands for an unknown namespace or name.
pub(crate) fn check_entity(
    namespace: &str,
    name: &str,
    placeholders: bool,
) -> Result<(), TopicError> {
    let placeholder = |text: &str| placeholders && text == PLACEHOLDER;
    if namespace.is_empty() {
        return Err(TopicError::EmptyLevel {
            level: TopicLevel::Namespace,
            position: 1,
            expected: EXPECTED_NAMESPACE,
        });
    }
    if !is_valid_namespace(namespace) && !placeholder(namespace) {
        return Err(TopicError::invalid(
            TopicLevel::Namespace,
            1,
            namespace,
            EXPECTED_NAMESPACE,
        ));
    }
    if name.is_empty() {
        return Err(TopicError::EmptyLevel {
            level: TopicLevel::Name,
            position: 2,
            expected: EXPECTED_NAME,
        });
    }
    if !is_valid_name(name) {
        return Err(TopicError::invalid(
            TopicLevel::Name,
            2,
            name,
            EXPECTED_NAME,
        ));
    }
    // Bytes are never fewer than characters: count characters only when the bytes exceed.
    if namespace.len() + 1 + name.len() > MAX_ID_LEN {
        let len = namespace.chars().count() + 1 + name.chars().count();
        if len > MAX_ID_LEN {
            return Err(TopicError::IdTooLong { len });
        }
    }
    Ok(())
}

/// Whether `text` may be one topic level naming a subject or feature: not empty, no `/`, no
/// wildcard, no control character.
pub(crate) fn is_valid_level(text: &str) -> bool {
    !text.is_empty()
        && !text
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

/// Reads an action level.
pub(crate) fn parse_action(levels: &mut Levels<'_>) -> Result<Action, TopicError> {
    let text = levels.expect(TopicLevel::Action, EXPECTED_ACTION)?;
    Action::parse(text).ok_or_else(|| {
        TopicError::invalid(TopicLevel::Action, levels.position(), text, EXPECTED_ACTION)
    })
}

fn parse_event_action(levels: &mut Levels<'_>) -> Result<EventAction, TopicError> {
    let text = levels.expect(TopicLevel::Action, EXPECTED_EVENT_ACTION)?;
    EventAction::parse(text).ok_or_else(|| {
        TopicError::invalid(
            TopicLevel::Action,
            levels.position(),
            text,
            EXPECTED_EVENT_ACTION,
        )
    })
}

/// A Ditto protocol topic (the `topic` of an envelope).
///
/// INVARIANT: every `Topic` displays as text that [`Topic::parse`] reads back to an equal
/// `Topic`: the constructors check the namespace, name and subject, and that `messages` only
/// appear on the live channel of things.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    namespace: String,
    name: String,
    group: Group,
    criterion: Criterion,
}

impl Topic {
    /// Builds a topic from its parts, checked as [`Topic::parse`] checks them.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        group: Group,
        criterion: Criterion,
    ) -> Result<Self, TopicError> {
        let (namespace, name) = (namespace.into(), name.into());
        check_entity(&namespace, &name, true)?;
        if let Criterion::Messages(subject) = &criterion {
            if group != Group::Things(Channel::Live) {
                return Err(TopicError::invalid(
                    TopicLevel::Criterion,
                    group.criterion_position(),
                    "messages",
                    group.expected_criteria(),
                ));
            }
            if !is_valid_level(subject) {
                return Err(TopicError::invalid(
                    TopicLevel::Subject,
                    6,
                    subject,
                    EXPECTED_SUBJECT,
                ));
            }
        }
        Ok(Topic {
            namespace,
            name,
            group,
            criterion,
        })
    }

    /// Parses a Ditto topic; the error names the level that is wrong and what it should be.
    pub fn parse(text: &str) -> Result<Self, TopicError> {
        check_topic_text(text)?;
        let mut levels = Levels::new(text);
        let namespace = levels.expect(TopicLevel::Namespace, EXPECTED_NAMESPACE)?;
        let name = levels.expect(TopicLevel::Name, EXPECTED_NAME)?;
        check_entity(namespace, name, true)?;
        let group = match levels.expect(TopicLevel::Group, EXPECTED_GROUP)? {
            "things" => {
                let channel = levels.expect(TopicLevel::Channel, EXPECTED_CHANNEL)?;
                Group::Things(Channel::parse(channel).ok_or_else(|| {
                    TopicError::invalid(
                        TopicLevel::Channel,
                        levels.position(),
                        channel,
                        EXPECTED_CHANNEL,
                    )
                })?)
            }
            "policies" => Group::Policies,
            other => {
                return Err(TopicError::invalid(
                    TopicLevel::Group,
                    levels.position(),
                    other,
                    EXPECTED_GROUP,
                ));
            }
        };
        let expected = group.expected_criteria();
        let (criterion, last) = match levels.expect(TopicLevel::Criterion, expected)? {
            "commands" => (
                Criterion::Commands(parse_action(&mut levels)?),
                TopicLevel::Action,
            ),
            "events" => (
                Criterion::Events(parse_event_action(&mut levels)?),
                TopicLevel::Action,
            ),
            "messages" if group == Group::Things(Channel::Live) => {
                let subject = levels.expect(TopicLevel::Subject, EXPECTED_SUBJECT)?;
                if !is_valid_level(subject) {
                    return Err(TopicError::invalid(
                        TopicLevel::Subject,
                        levels.position(),
                        subject,
                        EXPECTED_SUBJECT,
                    ));
                }
                (Criterion::Messages(subject.to_owned()), TopicLevel::Subject)
            }
            "errors" => (Criterion::Errors, TopicLevel::Criterion),
            other => {
                return Err(TopicError::invalid(
                    TopicLevel::Criterion,
                    levels.position(),
                    other,
                    expected,
                ));
            }
        };
        levels.finish(last)?;
        Ok(Topic {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            group,
            criterion,
        })
    }

    /// `{ns}/{name}/things/twin/commands/{action}`.
    pub fn thing_command(thing_id: &ThingId, action: Action) -> Self {
        Topic::of_thing(thing_id, Channel::Twin, Criterion::Commands(action))
    }

    /// `{ns}/{name}/things/twin/events/{action}`.
    pub fn thing_event(thing_id: &ThingId, action: EventAction) -> Self {
        Topic::of_thing(thing_id, Channel::Twin, Criterion::Events(action))
    }

    /// `{ns}/{name}/things/live/messages/{subject}`; the subject must be one valid level.
    pub fn live_message(thing_id: &ThingId, subject: &str) -> Result<Self, TopicError> {
        Topic::new(
            thing_id.namespace(),
            thing_id.name(),
            Group::Things(Channel::Live),
            Criterion::Messages(subject.to_owned()),
        )
    }

    /// `{ns}/{name}/policies/commands/{action}`.
    pub fn policy_command(policy_id: &PolicyId, action: Action) -> Self {
        Topic::of_policy(policy_id, Criterion::Commands(action))
    }

    /// `{ns}/{name}/policies/events/{action}`.
    pub fn policy_event(policy_id: &PolicyId, action: EventAction) -> Self {
        Topic::of_policy(policy_id, Criterion::Events(action))
    }

    /// The topic a command travels on (and its response, told apart by `status`).
    pub fn of_command(command: &Command) -> Self {
        match command {
            Command::Thing(c) => Topic::thing_command(&c.thing_id, c.action),
            Command::Policy(c) => Topic::policy_command(&c.policy_id, c.action),
        }
    }

    /// `_/_/things/twin/errors`: where errors about an unknown entity go.
    pub fn placeholder_errors() -> Self {
        Topic {
            namespace: PLACEHOLDER.to_owned(),
            name: PLACEHOLDER.to_owned(),
            group: Group::Things(Channel::Twin),
            criterion: Criterion::Errors,
        }
    }

    /// The errors topic answering this one (same entity, group and channel).
    pub fn errors(&self) -> Self {
        Topic {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            group: self.group,
            criterion: Criterion::Errors,
        }
    }

    fn of_thing(thing_id: &ThingId, channel: Channel, criterion: Criterion) -> Self {
        // INVARIANT: a `ThingId` holds a valid namespace and name.
        Topic {
            namespace: thing_id.namespace().to_owned(),
            name: thing_id.name().to_owned(),
            group: Group::Things(channel),
            criterion,
        }
    }

    fn of_policy(policy_id: &PolicyId, criterion: Criterion) -> Self {
        let (namespace, name) = policy_id.as_str().split_once(':').unwrap_or_default();
        // INVARIANT: a `PolicyId` holds a valid namespace and name.
        Topic {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            group: Group::Policies,
            criterion,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn group(&self) -> Group {
        self.group
    }

    pub fn channel(&self) -> Option<Channel> {
        self.group.channel()
    }

    pub fn criterion(&self) -> &Criterion {
        &self.criterion
    }

    /// Whether namespace or name is Ditto's placeholder `_`.
    pub fn has_placeholder(&self) -> bool {
        self.namespace == PLACEHOLDER || self.name == PLACEHOLDER
    }

    /// The thing this topic names (400 `things:id.invalid` for placeholders).
    pub fn thing_id(&self) -> Result<ThingId, DittoError> {
        ThingId::from_parts(&self.namespace, &self.name)
            .map_err(|e| DittoError::id_invalid(e.to_string()))
    }

    /// The policy this topic names (400 `things:id.invalid` for placeholders).
    pub fn policy_id(&self) -> Result<PolicyId, DittoError> {
        PolicyId::parse(&format!("{}:{}", self.namespace, self.name))
            .map_err(|e| DittoError::id_invalid(e.to_string()))
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_entity_levels(f, &self.namespace, &self.name, self.group)?;
        write!(f, "/{}", self.criterion.as_str())?;
        match &self.criterion {
            Criterion::Commands(action) => write!(f, "/{}", action.as_str()),
            Criterion::Events(action) => write!(f, "/{}", action.as_str()),
            Criterion::Messages(subject) => write!(f, "/{subject}"),
            Criterion::Errors => Ok(()),
        }
    }
}

impl FromStr for Topic {
    type Err = TopicError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Topic::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_read_like_split_and_keep_the_rest_with_its_slash() {
        for topic in ["a/b/c", "a//c/", "/a", "a", "", "a/b/c/d/e/f/g/h"] {
            let mut levels = Levels::new(topic);
            let mut read = Vec::new();
            while let Some(level) = levels.next_level() {
                read.push(level);
            }
            assert_eq!(read, topic.split('/').collect::<Vec<_>>(), "{topic}");
        }
        let mut levels = Levels::new("a/b/features/x");
        assert_eq!(levels.remainder(), "");
        levels.next_level();
        levels.next_level();
        assert_eq!(levels.remainder(), "/features/x");
        assert_eq!(levels.position(), 2);
    }

    #[test]
    fn excerpts_cut_long_levels_at_a_character_boundary() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(100);
        assert_eq!(excerpt(&long), format!("{}…", "é".repeat(64)));
    }
}
