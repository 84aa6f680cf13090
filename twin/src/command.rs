//! Commands: what a client asks of a thing or a policy, independent of how it arrived (compact
//! MQTT topic, Ditto envelope, HTTP).

use serde_json::{Map, Value};

use crate::id::{PolicyId, ThingId};
use crate::path::ThingPath;

/// What a command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Modify,
    /// JSON merge patch (RFC 7396) at the path; `null` deletes.
    Merge,
    Retrieve,
    Delete,
}

impl Action {
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Modify => "modify",
            Action::Merge => "merge",
            Action::Retrieve => "retrieve",
            Action::Delete => "delete",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "create" => Some(Action::Create),
            "modify" => Some(Action::Modify),
            "merge" => Some(Action::Merge),
            "retrieve" => Some(Action::Retrieve),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// An entity tag condition (`if-match` / `if-none-match`): `*` or a list of revisions.
/// Ditto writes entity tags as `"rev:3"`; `rev:3` and `3` are accepted too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityTags {
    Any,
    Revisions(Vec<u64>),
}

impl EntityTags {
    /// Parses a header value; `None` when it is not a valid entity tag list.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text == "*" {
            return Some(EntityTags::Any);
        }
        let revisions = text
            .split(',')
            .map(|tag| {
                let tag = tag.trim().trim_start_matches("W/").trim_matches('"');
                tag.strip_prefix("rev:").unwrap_or(tag).parse::<u64>().ok()
            })
            .collect::<Option<Vec<u64>>>()?;
        (!revisions.is_empty()).then_some(EntityTags::Revisions(revisions))
    }

    /// Whether an entity at `revision` (`None`: it does not exist) matches.
    pub fn matches(&self, revision: Option<u64>) -> bool {
        match (self, revision) {
            (_, None) => false,
            (EntityTags::Any, Some(_)) => true,
            (EntityTags::Revisions(list), Some(r)) => list.contains(&r),
        }
    }
}

/// The headers a command carries that change how it is applied or answered. Everything else
/// travels in `other` and is echoed where Ditto echoes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandHeaders {
    pub correlation_id: Option<String>,
    /// Whether the requester wants a response (default true for retrieves, as in Ditto).
    pub response_required: Option<bool>,
    pub if_match: Option<EntityTags>,
    pub if_none_match: Option<EntityTags>,
    /// Ditto's field selector for retrieves (`thingId,attributes/location`).
    pub fields: Option<String>,
    /// Ditto's `condition`: an RQL expression (`crate::rql`) the thing, as the requester may
    /// read it, must satisfy, or the command is refused with 412.
    pub condition: Option<String>,
    pub other: Map<String, Value>,
}

/// A command on a thing (twin channel).
#[derive(Debug, Clone, PartialEq)]
pub struct ThingCommand {
    pub thing_id: ThingId,
    pub action: Action,
    pub path: ThingPath,
    /// The value to create/modify, or the merge patch; `None` for retrieve and delete.
    pub value: Option<Value>,
    pub headers: CommandHeaders,
}

/// A command on a policy. Paths address the policy's JSON (`/`, `/entries`, `/entries/LABEL`,
/// `/entries/LABEL/subjects[/ID]`, `/entries/LABEL/resources[/KEY]`, `/imports[/ID]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyCommand {
    pub policy_id: PolicyId,
    pub action: Action,
    pub path: String,
    pub value: Option<Value>,
    pub headers: CommandHeaders,
}

/// Any command the twin layer applies.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Thing(ThingCommand),
    Policy(PolicyCommand),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_tags_parse_dittos_spellings() {
        assert_eq!(EntityTags::parse("*"), Some(EntityTags::Any));
        assert_eq!(
            EntityTags::parse("\"rev:3\""),
            Some(EntityTags::Revisions(vec![3]))
        );
        assert_eq!(
            EntityTags::parse("rev:3, \"rev:4\",5"),
            Some(EntityTags::Revisions(vec![3, 4, 5]))
        );
        assert_eq!(EntityTags::parse("rev:x"), None);
        assert_eq!(EntityTags::parse(""), None);
        assert!(EntityTags::Any.matches(Some(1)));
        assert!(!EntityTags::Any.matches(None));
        assert!(!EntityTags::Revisions(vec![2]).matches(Some(3)));
    }
}
