//! Stored entities (things, policies, solutions) and the events that change them.
//!
//! Every entity is kept as its JSON document plus revision and timestamps. An [`Event`] says how
//! one revision became the next: created, modified (a value set at a path), merged (a JSON merge
//! patch applied at a path) or deleted (the value at a path, or the entity, removed). Events are
//! what the journal stores and what subscribers receive; [`Entity::apply`] is the only way state
//! changes, both live and when the store replays its journal, so the two cannot disagree.
//!
//! Paths are JSON pointers into the document whose segments decode `~0` to `~` only (as policy
//! resource paths do, so that a command's path and the resource it is authorized on are the
//! same string); document keys therefore never contain `/`.

use std::borrow::Cow;
use std::fmt;

use policy::Timestamp;
use serde_json::{Map, Value};

use crate::merge::merge_patch;
use crate::thing::{chain_len, serialized_len};

/// Which kind of entity a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKind {
    Thing,
    Policy,
    Solution,
    /// A retained MQTT message of a solution (kept by the broker, `broker::core::retained`).
    Retained,
    /// A persistent MQTT session: subjects, subscriptions, expiry (`broker::core::sessions`).
    Session,
    /// A QoS 1/2 message queued for a persistent MQTT session (`broker::core::sessions`).
    Queued,
}

impl EntityKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            EntityKind::Thing => "thing",
            EntityKind::Policy => "policy",
            EntityKind::Solution => "solution",
            EntityKind::Retained => "retained",
            EntityKind::Session => "session",
            EntityKind::Queued => "queued",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "thing" => Some(EntityKind::Thing),
            "policy" => Some(EntityKind::Policy),
            "solution" => Some(EntityKind::Solution),
            "retained" => Some(EntityKind::Retained),
            "session" => Some(EntityKind::Session),
            "queued" => Some(EntityKind::Queued),
            _ => None,
        }
    }
}

/// The key of a stored entity: its kind and ID (validated by whoever built it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityKey {
    pub kind: EntityKind,
    pub id: String,
}

impl EntityKey {
    pub fn new(kind: EntityKind, id: impl Into<String>) -> Self {
        EntityKey {
            kind,
            id: id.into(),
        }
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// What an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventAction {
    Created,
    Modified,
    Merged,
    Deleted,
}

impl EventAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            EventAction::Created => "created",
            EventAction::Modified => "modified",
            EventAction::Merged => "merged",
            EventAction::Deleted => "deleted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "created" => Some(EventAction::Created),
            "modified" => Some(EventAction::Modified),
            "merged" => Some(EventAction::Merged),
            "deleted" => Some(EventAction::Deleted),
            _ => None,
        }
    }
}

/// One change to one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub key: EntityKey,
    pub action: EventAction,
    /// JSON pointer into the document (`""` is the whole entity).
    pub path: String,
    /// The value set (`modified`, `created`) or the patch applied (`merged`); `None` for `deleted`.
    pub value: Option<Value>,
    /// The entity's revision after this event (1 for the event that created it).
    pub revision: u64,
    pub timestamp: Timestamp,
}

/// Why an event could not be applied: the journal and the state disagree, which the store
/// reports as corruption, never ignores.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyEventError {
    #[error("event for {key} at revision {revision}: the entity does not exist")]
    Missing { key: String, revision: u64 },
    #[error("event for {key}: revision {revision} does not follow {current}")]
    Revision {
        key: String,
        revision: u64,
        current: u64,
    },
    #[error("event for {key}: path `{path}` does not lead to an object to change")]
    Path { key: String, path: String },
    #[error("event for {key}: `{action}` at the root needs a JSON object value")]
    Root { key: String, action: &'static str },
}

/// A stored entity: its document (without `_revision` and the other `_` fields) and metadata.
#[derive(Debug, Clone)]
pub struct Entity {
    pub key: EntityKey,
    pub doc: Value,
    pub revision: u64,
    pub created: Timestamp,
    pub modified: Timestamp,
    /// For things: the document's size as compact JSON once known (`None`: not yet), kept up
    /// to date by [`Entity::commit`] from the changed path alone, so that a change is judged
    /// against the size limit without walking the whole document
    /// ([`crate::thing::validate_thing_change_sized`]). Not part of equality.
    pub size: Option<usize>,
}

impl PartialEq for Entity {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
            && self.doc == other.doc
            && self.revision == other.revision
            && self.created == other.created
            && self.modified == other.modified
    }
}

/// Decoded segments of a document path (`~0` → `~`; empty segments ignored).
pub fn path_segments(path: &str) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
    path.split('/').filter(|s| !s.is_empty()).map(|s| {
        if s.contains("~0") {
            std::borrow::Cow::Owned(s.replace("~0", "~"))
        } else {
            std::borrow::Cow::Borrowed(s)
        }
    })
}

/// The value at `path` in `doc`, if there is one.
pub fn pointer<'v>(doc: &'v Value, path: &str) -> Option<&'v Value> {
    path_segments(path).try_fold(doc, |v, s| v.as_object()?.get(s.as_ref()))
}

impl Entity {
    /// Applies `event` to the current state (`None`: the entity does not exist) and returns the
    /// new state (`None`: deleted).
    pub fn apply(
        current: Option<Entity>,
        event: &Event,
    ) -> Result<Option<Entity>, ApplyEventError> {
        let Some(mut entity) = current else {
            return Self::create(event).map(Some);
        };
        let change = entity.prepare(event)?;
        Ok(entity.commit(change).then_some(entity))
    }

    /// The entity a root event brings into existence (every event on a missing entity).
    fn create(event: &Event) -> Result<Entity, ApplyEventError> {
        let root = event.path.split('/').all(str::is_empty);
        if !root {
            return Err(ApplyEventError::Missing {
                key: event.key.to_string(),
                revision: event.revision,
            });
        }
        match &event.value {
            Some(doc @ Value::Object(_)) => Ok(Entity {
                key: event.key.clone(),
                doc: doc.clone(),
                revision: event.revision,
                created: event.timestamp,
                modified: event.timestamp,
                size: (event.key.kind == EntityKind::Thing).then(|| serialized_len(doc)),
            }),
            _ => Err(ApplyEventError::Root {
                key: event.key.to_string(),
                action: event.action.as_str(),
            }),
        }
    }

    /// Checks that `event` applies to this (existing) entity, changing nothing: the first half
    /// of applying it in place. What it returns is applied with [`Entity::commit`], which
    /// cannot fail — so a store can check, then journal, then change the state it holds
    /// without a copy, and nothing changes when the check or the journal fails.
    pub fn prepare<'e>(&self, event: &'e Event) -> Result<Prepared<'e>, ApplyEventError> {
        let key = || event.key.to_string();
        let root = event.path.split('/').all(str::is_empty);
        // Only a root event creates the entity; `created` below the root sets a value there like
        // `modified` (Ditto's AttributeCreated and friends).
        if root && event.action == EventAction::Created {
            return Self::create(event).map(|entity| Prepared {
                event,
                step: Step::Replace(Box::new(entity)),
            });
        }
        if event.revision <= self.revision {
            return Err(ApplyEventError::Revision {
                key: key(),
                revision: event.revision,
                current: self.revision,
            });
        }
        let path_error = || ApplyEventError::Path {
            key: key(),
            path: event.path.clone(),
        };
        let root_error = |action: &'static str| ApplyEventError::Root { key: key(), action };
        let mut segments: Vec<Cow<'e, str>> = path_segments(&event.path).collect();
        let step = match (event.action, segments.pop()) {
            (EventAction::Deleted, None) => Step::Delete,
            // (A root `created` replaced the entity above.)
            (EventAction::Created, None) => return Err(path_error()),
            (EventAction::Modified, None) => match &event.value {
                Some(doc @ Value::Object(_)) => Step::SetDoc(doc),
                _ => return Err(root_error("modified")),
            },
            // A merge patch that is an object leaves an object an object; any other replaces it.
            (EventAction::Merged, None) => match &event.value {
                Some(patch @ Value::Object(_)) => Step::MergeDoc(patch),
                _ => return Err(root_error("merged")),
            },
            // Missing or non-object parents become objects, so only the root must be one.
            (_, Some(_)) if !self.doc.is_object() => return Err(path_error()),
            (EventAction::Modified | EventAction::Created, Some(last)) => Step::At {
                parents: segments,
                last,
                change: Change::Set,
            },
            (EventAction::Merged, Some(last)) => Step::At {
                parents: segments,
                last,
                change: Change::Merge,
            },
            (EventAction::Deleted, Some(last)) => {
                let found = segments
                    .iter()
                    .try_fold(&self.doc, |v, s| v.as_object()?.get(s.as_ref()))
                    .and_then(Value::as_object)
                    .is_some_and(|parent| parent.contains_key(last.as_ref()));
                if !found {
                    return Err(path_error());
                }
                Step::At {
                    parents: segments,
                    last,
                    change: Change::Remove,
                }
            }
        };
        Ok(Prepared { event, step })
    }

    /// Applies what [`Entity::prepare`] checked on this same, unchanged entity. Whether the
    /// entity remains (`false`: the event deleted it).
    pub fn commit(&mut self, prepared: Prepared<'_>) -> bool {
        let event = prepared.event;
        let value = || event.value.clone().unwrap_or(Value::Null);
        let thing = self.key.kind == EntityKind::Thing;
        match prepared.step {
            Step::Replace(entity) => {
                *self = *entity;
                return true;
            }
            Step::Delete => return false,
            Step::SetDoc(doc) => {
                self.doc = doc.clone();
                self.size = thing.then(|| serialized_len(&self.doc));
            }
            Step::MergeDoc(patch) => {
                merge_patch(&mut self.doc, patch);
                self.size = thing.then(|| serialized_len(&self.doc));
            }
            // INVARIANT: `prepare` checked that the root is an object (so `object_at` with
            // `create` finds every level) and that a removed value exists.
            Step::At {
                parents,
                last,
                change,
            } => {
                let before = self
                    .size
                    .map(|size| (size, chain_len(&self.doc, &parents, &last)));
                let create = change != Change::Remove;
                if let Some(parent) = object_at(&mut self.doc, &parents, create) {
                    let patch = event.value.as_ref().unwrap_or(&Value::Null);
                    match change {
                        Change::Set => {
                            parent.insert(last.to_string(), value());
                        }
                        Change::Remove => {
                            parent.remove(last.as_ref());
                        }
                        // As RFC 7396 of the patch wrapped down to this path: missing parents
                        // appear.
                        Change::Merge if patch.is_null() => {
                            parent.remove(last.as_ref());
                        }
                        Change::Merge => {
                            let target = parent.entry(last.to_string()).or_insert(Value::Null);
                            merge_patch(target, patch);
                        }
                    }
                }
                self.resize(thing, before, &parents, &last);
            }
        }
        self.revision = event.revision;
        self.modified = event.timestamp;
        true
    }

    /// Brings [`Entity::size`] up to date after a change at `parents`/`last`: from the size and
    /// the path's chain `before` it, or measured whole the first time.
    fn resize(
        &mut self,
        thing: bool,
        before: Option<(usize, usize)>,
        parents: &[Cow<'_, str>],
        last: &str,
    ) {
        if !thing {
            return;
        }
        self.size = Some(match before {
            Some((size, chain)) => size
                .saturating_sub(chain)
                .saturating_add(chain_len(&self.doc, parents, last)),
            None => serialized_len(&self.doc),
        });
    }
}

/// An event checked against an entity by [`Entity::prepare`], ready to [`Entity::commit`].
#[derive(Debug)]
pub struct Prepared<'e> {
    event: &'e Event,
    step: Step<'e>,
}

/// What committing an event does to the document.
#[derive(Debug)]
enum Step<'e> {
    /// A root `created` on an existing entity: a new entity in its place.
    Replace(Box<Entity>),
    Delete,
    SetDoc(&'e Value),
    MergeDoc(&'e Value),
    /// A change of the member `last` of the object at `parents`.
    At {
        parents: Vec<Cow<'e, str>>,
        last: Cow<'e, str>,
        change: Change,
    },
}

/// What happens to the member a [`Step::At`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The event's value put there (missing parents created).
    Set,
    /// The event's merge patch applied there (missing parents created).
    Merge,
    /// Removed (it exists: checked).
    Remove,
}

/// The object at `segments` below `doc`; with `create`, missing levels become empty objects
/// (as Ditto creates the parents of a modified attribute path).
fn object_at<'v>(
    doc: &'v mut Value,
    segments: &[Cow<'_, str>],
    create: bool,
) -> Option<&'v mut Map<String, Value>> {
    let mut current = doc;
    for segment in segments {
        let object = current.as_object_mut()?;
        if create && !object.get(segment.as_ref()).is_some_and(Value::is_object) {
            object.insert(segment.to_string(), Value::Object(Map::new()));
        }
        current = object.get_mut(segment.as_ref())?;
    }
    current.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(action: EventAction, path: &str, value: Option<Value>, revision: u64) -> Event {
        Event {
            key: EntityKey::new(EntityKind::Thing, "ns:t"),
            action,
            path: path.into(),
            value,
            revision,
            timestamp: Timestamp::from_unix_millis(revision as i64),
        }
    }

    #[test]
    fn events_build_and_change_a_document() {
        let created = Entity::apply(
            None,
            &event(EventAction::Created, "", Some(json!({"attributes": {}})), 1),
        )
        .unwrap();
        let modified = Entity::apply(
            created,
            &event(
                EventAction::Modified,
                "/attributes/a~0b/c",
                Some(json!(1)),
                2,
            ),
        )
        .unwrap();
        assert_eq!(
            modified.as_ref().unwrap().doc,
            json!({"attributes": {"a~b": {"c": 1}}})
        );
        let merged = Entity::apply(
            modified,
            &event(
                EventAction::Merged,
                "/attributes",
                Some(json!({"a~b": null, "x": 2})),
                3,
            ),
        )
        .unwrap();
        assert_eq!(
            merged.as_ref().unwrap().doc,
            json!({"attributes": {"x": 2}})
        );
        let deleted = Entity::apply(
            merged,
            &event(EventAction::Deleted, "/attributes/x", None, 4),
        )
        .unwrap()
        .unwrap();
        assert_eq!(deleted.doc, json!({"attributes": {}}));
        assert_eq!(
            (deleted.revision, deleted.created, deleted.modified),
            (
                4,
                Timestamp::from_unix_millis(1),
                Timestamp::from_unix_millis(4)
            )
        );
        assert_eq!(
            Entity::apply(Some(deleted), &event(EventAction::Deleted, "", None, 5)).unwrap(),
            None
        );
    }

    #[test]
    fn events_that_do_not_fit_the_state_are_errors() {
        let e = Entity::apply(None, &event(EventAction::Created, "", Some(json!({})), 1)).unwrap();
        assert!(matches!(
            Entity::apply(None, &event(EventAction::Modified, "/a", Some(json!(1)), 2)),
            Err(ApplyEventError::Missing { .. })
        ));
        assert!(matches!(
            Entity::apply(
                e.clone(),
                &event(EventAction::Modified, "/a", Some(json!(1)), 1)
            ),
            Err(ApplyEventError::Revision { .. })
        ));
        assert!(matches!(
            Entity::apply(e.clone(), &event(EventAction::Deleted, "/nope", None, 2)),
            Err(ApplyEventError::Path { .. })
        ));
        assert!(matches!(
            Entity::apply(e, &event(EventAction::Modified, "", Some(json!(3)), 2)),
            Err(ApplyEventError::Root { .. })
        ));
    }
}
