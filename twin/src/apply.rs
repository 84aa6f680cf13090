//! Command application: a command and the current entity give an event (or a retrieve answer).
//!
//! Pure: no I/O and no clock (`now` comes from the caller). [`apply_thing_command`] and
//! [`apply_policy_command`] decide, as Eclipse Ditto does, whether a command may change the
//! entity (existence, conditional headers, validation of the result) and produce the [`Event`]
//! that makes the change. The caller applies it with [`Entity::apply`] — the only state
//! transition there is, the one the store replays — and the event has been checked to lead to a
//! valid document before it is handed out, so a journal never holds an event that leads to an
//! invalid one.
//!
//! A thing change is judged without building the new document (the hot path: no clone of the
//! thing): one read-only walk of the current document with the new value in place gives depth
//! and size, and the shape rules are applied to the new value at its position (see
//! [`thing::validate_thing_change`]); only a merge at the root builds the merged document.
//! Policy changes (rare, small) build the new policy JSON, parse it whole, and check that the
//! event reproduces it exactly.
//!
//! # Semantics (Ditto's, unless said otherwise)
//! - **create** addresses the whole entity (`/`): 201 with the document, 409 if it exists.
//!   Ditto's protocol has no create below the root; we refuse one with 400 `*:path.invalid`.
//! - **modify** sets the value at the path: 201 with the value if nothing was there (creating
//!   missing parents, e.g. the feature of a property), 204 otherwise. A modify of a missing thing
//!   at `/` creates it. The root body may omit `thingId`/`policyId` (filled in from the command
//!   and, for `policyId`, kept from the current thing); a different `thingId` is 400.
//! - **merge** applies an RFC 7396 patch at the path: the same as merging `{"a":{"b":patch}}`
//!   at the root, so missing parents become objects and `null` deletes. 204. The thing must
//!   exist (404).
//! - **retrieve**: 200 with the value at the path; `fields` selects parts of it and, at the root,
//!   the pseudo-fields `_revision`, `_created`, `_modified`, `_namespace` (only when selected).
//! - **delete**: 204; 404 if the value is not there.
//! - A missing level answers 404 with the code of the *first* missing level, as Ditto's
//!   strategies do (a property of a missing feature: `things:feature.notfound`).
//! - **Conditional headers** compare entity tags with the thing's revision, and a resource that
//!   does not exist has no tag: `if-match: *` = only if the addressed resource exists,
//!   `if-none-match: *` = only if it does not, `if-match: "rev:3"` = only if it exists and the
//!   entity is at revision 3. A failed condition answers 412 `things:condition.failed` for
//!   changes; a retrieve whose `if-none-match` matches answers 304. (Ditto tags sub-resources
//!   with a hash of their value; we use the entity revision everywhere, which is what optimistic
//!   concurrency needs.)
//!
//! # Events
//! A change is one [`Event`] with the next revision (1 on create) and `now`. Events below the
//! root are `modified` even when they create the level (Ditto would emit e.g. `attributeCreated`):
//! [`Entity::apply`] treats any `created` event as the creation of the whole entity. The response
//! still says 201. Policy documents have keys with `/` (resource keys such as
//! `thing:/features/x`, some subject IDs), which an event path cannot address: a change below
//! such a key is written as a `modified` event of the nearest addressable ancestor (e.g.
//! `/entries/owner/resources` with the whole new resources object).

use std::borrow::Cow;
use std::fmt;

use policy::Timestamp;
use serde_json::{Map, Value};

use crate::command::{Action, CommandHeaders, EntityTags, PolicyCommand, ThingCommand};
use crate::entity::{Entity, EntityKey, EntityKind, Event, EventAction, path_segments};
use crate::error::DittoError;
use crate::id::{PolicyId, ThingId};
use crate::merge::merge_patch;
use crate::path::{Level, ThingPath};
use crate::thing::{self, LimitError, Limits, PSEUDO_FIELDS};

/// A status and, for some, a value: what the requester is answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// 200 retrieved, 201 created, 204 changed, 304 not modified.
    pub status: u16,
    pub value: Option<Value>,
}

/// The outcome of a command that was accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The entity changes: journal `event` (and apply it with [`Entity::apply`]), then answer
    /// `response`.
    Change(Change),
    /// A retrieve's answer (200, or 304 when `if-none-match` matched); nothing changes.
    Retrieve(Response),
}

/// An accepted change: the event has been checked to lead to a valid entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub event: Event,
    pub response: Response,
}

impl Applied {
    pub fn response(&self) -> &Response {
        match self {
            Applied::Change(change) => &change.response,
            Applied::Retrieve(response) => response,
        }
    }

    pub fn event(&self) -> Option<&Event> {
        match self {
            Applied::Change(change) => Some(&change.event),
            Applied::Retrieve(_) => None,
        }
    }

    pub fn status(&self) -> u16 {
        self.response().status
    }
}

/// The value at the (decoded) `segments` below `doc`.
fn value_at<'v, S: AsRef<str>>(doc: &'v Value, segments: &[S]) -> Option<&'v Value> {
    segments
        .iter()
        .try_fold(doc, |v, s| v.as_object()?.get(s.as_ref()))
}

/// A JSON pointer for an event from decoded keys (`~` written `~0`); `/` for none.
fn event_path<S: AsRef<str>>(segments: &[S]) -> String {
    if segments.is_empty() {
        return "/".to_owned();
    }
    let len = segments.iter().map(|s| s.as_ref().len() + 1).sum();
    let mut out = String::with_capacity(len);
    for s in segments {
        out.push('/');
        // Most segments hold no `~`: pushed as they are, without a copy.
        for (i, part) in s.as_ref().split('~').enumerate() {
            if i > 0 {
                out.push_str("~0");
            }
            out.push_str(part);
        }
    }
    out
}

/// `{k1: {k2: … value}}`.
fn wrap<S: AsRef<str>>(keys: &[S], value: Value) -> Value {
    keys.iter().rev().fold(value, |inner, key| {
        let mut map = Map::new();
        map.insert(key.as_ref().to_owned(), inner);
        Value::Object(map)
    })
}

/// Where a `merged` event must say what merging `patch` at `segments` does to `doc` — RFC 7396
/// of `wrap(segments, patch)` at the root: the number of leading segments of its path, and its
/// patch.
///
/// [`Entity::apply`] creates missing parents for a non-null patch, exactly as the wrapped merge
/// does, but refuses a `null` patch below a parent that is missing or not an object; the wrapped
/// merge turns such a parent into `{}` (RFC 7396 Appendix A, last example). The event is then
/// moved up to that parent, with the rest of the path wrapped into the patch.
fn merge_event<S: AsRef<str>>(doc: &Value, segments: &[S], patch: &Value) -> (usize, Value) {
    if patch.is_null()
        && let Some((_, parents)) = segments.split_last()
    {
        let mut current = doc;
        for (k, segment) in parents.iter().enumerate() {
            match current.get(segment.as_ref()) {
                Some(v @ Value::Object(_)) => current = v,
                _ => {
                    if let Some(tail) = segments.get(k + 1..) {
                        return (k + 1, wrap(tail, Value::Null));
                    }
                }
            }
        }
    }
    (segments.len(), patch.clone())
}

/// Whether the conditional headers let a command through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precondition {
    Holds,
    /// A retrieve whose `if-none-match` matched: 304.
    NotModified,
}

fn show_tags(tags: &EntityTags) -> String {
    match tags {
        EntityTags::Any => "*".to_owned(),
        EntityTags::Revisions(list) => list
            .iter()
            .map(|r| format!("\"rev:{r}\""))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Checks `if-match` and `if-none-match` against the addressed resource's tag (`None`: the
/// resource does not exist).
fn preconditions(
    headers: &CommandHeaders,
    tag: Option<u64>,
    retrieve: bool,
) -> Result<Precondition, DittoError> {
    let actual = || match tag {
        Some(r) => format!("the resource's entity tag is `\"rev:{r}\"`"),
        None => "the resource does not exist".to_owned(),
    };
    if let Some(tags) = &headers.if_match
        && !tags.matches(tag)
    {
        return Err(DittoError::condition_failed(format!(
            "the precondition `if-match: {}` does not hold: {}",
            show_tags(tags),
            actual()
        ))
        .with_description("The resource was changed or does not exist; retrieve it and retry."));
    }
    if let Some(tags) = &headers.if_none_match
        && tags.matches(tag)
    {
        if retrieve {
            return Ok(Precondition::NotModified);
        }
        return Err(DittoError::condition_failed(format!(
            "the precondition `if-none-match: {}` does not hold: {}",
            show_tags(tags),
            actual()
        )));
    }
    Ok(Precondition::Holds)
}

fn internal(group: &str, problem: impl fmt::Display) -> DittoError {
    let code = if group == "policies" {
        "policies:internalerror"
    } else {
        "things:internalerror"
    };
    DittoError::new(
        500,
        code,
        format!("the command could not be applied: {problem}"),
    )
}

fn next_revision(current: Option<&Entity>, group: &str) -> Result<u64, DittoError> {
    match current {
        None => Ok(1),
        Some(e) => e
            .revision
            .checked_add(1)
            .ok_or_else(|| internal(group, "the revision cannot grow any more")),
    }
}

// ---------------------------------------------------------------------------------------------
// Field selection (retrieves)
// ---------------------------------------------------------------------------------------------

fn selector_invalid(text: &str, why: &str) -> DittoError {
    DittoError::new(
        400,
        "json.fieldselector.invalid",
        format!("the field selector `{text}` is invalid: {why}"),
    )
    .with_description(
        "Use comma-separated JSON pointers, optionally grouped: `thingId,attributes(model,location)`.",
    )
}

/// Parses Ditto's field selector (`thingId,attributes/location,features/lamp(properties,definition)`)
/// into JSON pointers without leading slash (`features/lamp/properties`, …).
pub fn parse_field_selector(text: &str) -> Result<Vec<String>, DittoError> {
    let mut out = Vec::new();
    parse_selector_into(text, text, "", 0, &mut out)?;
    Ok(out)
}

fn parse_selector_into(
    whole: &str,
    text: &str,
    prefix: &str,
    depth: usize,
    out: &mut Vec<String>,
) -> Result<(), DittoError> {
    if depth > 16 {
        return Err(selector_invalid(whole, "too many nested parentheses"));
    }
    let join = |p: &str| match (prefix.is_empty(), p.is_empty()) {
        (true, _) => p.to_owned(),
        (_, true) => prefix.to_owned(),
        _ => format!("{prefix}/{p}"),
    };
    // Split at the commas outside parentheses.
    let mut items = Vec::new();
    let mut open = 0usize;
    let mut start = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '(' => open += 1,
            ')' => {
                open = open
                    .checked_sub(1)
                    .ok_or_else(|| selector_invalid(whole, "a `)` closes nothing"))?;
            }
            ',' if open == 0 => {
                items.push(text.get(start..i).unwrap_or_default());
                start = i + 1;
            }
            _ => {}
        }
    }
    if open != 0 {
        return Err(selector_invalid(whole, "a `(` is not closed"));
    }
    items.push(text.get(start..).unwrap_or_default());
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        match item.find('(') {
            None => out.push(join(item.trim_matches('/'))),
            Some(at) => {
                let head = item.get(..at).unwrap_or_default().trim().trim_matches('/');
                let inner = item
                    .get(at + 1..)
                    .and_then(|rest| rest.strip_suffix(')'))
                    .ok_or_else(|| selector_invalid(whole, "nothing may follow a `)` but a `,`"))?;
                parse_selector_into(whole, inner, &join(head), depth + 1, out)?;
            }
        }
    }
    Ok(())
}

/// `value` (an object) reduced to Ditto's field selector `fields`: what each selected pointer
/// addresses, at its place (for values that are not a stored entity: an SSE event's partial
/// thing).
pub fn select_fields(value: &Value, fields: &str) -> Result<Value, DittoError> {
    let mut out = Map::new();
    for pointer in parse_field_selector(fields)? {
        let segments: Vec<Cow<'_, str>> = path_segments(&pointer).collect();
        if let Some(v) = value_at(value, &segments) {
            insert_at(&mut out, &segments, v.clone());
        }
    }
    Ok(Value::Object(out))
}

/// Copies `value` into `out` at `segments`, creating the objects on the way.
fn insert_at(out: &mut Map<String, Value>, segments: &[Cow<'_, str>], value: Value) {
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut map = out;
    for segment in parents {
        let entry = map
            .entry(segment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        map = match entry {
            Value::Object(inner) => inner,
            _ => return,
        };
    }
    map.insert(last.to_string(), value);
}

/// The pseudo-fields of an entity at the root of a retrieve.
fn pseudo_field(entity: &Entity, namespace: &str, field: &str) -> Option<Value> {
    match field {
        "_revision" => Some(Value::from(entity.revision)),
        "_created" => Some(Value::from(entity.created.to_string())),
        "_modified" => Some(Value::from(entity.modified.to_string())),
        "_namespace" => Some(Value::from(namespace)),
        _ => None,
    }
}

/// A retrieve's value: `target`, reduced to `fields` when given (pseudo-fields only at the root,
/// `namespace` being the entity's). Nothing selected that exists gives `{}`, as in Ditto.
fn retrieved_value(
    entity: &Entity,
    target: &Value,
    root: bool,
    namespace: &str,
    fields: Option<&str>,
) -> Result<Value, DittoError> {
    let Some(fields) = fields.filter(|f| !f.trim().is_empty()) else {
        return Ok(target.clone());
    };
    if !target.is_object() {
        return Ok(target.clone());
    }
    let mut out = Map::new();
    for pointer in parse_field_selector(fields)? {
        let segments: Vec<Cow<'_, str>> = path_segments(&pointer).collect();
        if root
            && let [single] = segments.as_slice()
            && PSEUDO_FIELDS.contains(&single.as_ref())
        {
            if let Some(v) = pseudo_field(entity, namespace, single) {
                out.insert(single.to_string(), v);
            }
            continue;
        }
        if let Some(v) = value_at(target, &segments) {
            insert_at(&mut out, &segments, v.clone());
        }
    }
    Ok(Value::Object(out))
}

// ---------------------------------------------------------------------------------------------
// Things
// ---------------------------------------------------------------------------------------------

/// The level of `path` that is missing in `doc`, as Ditto names it: the attributes before an
/// attribute, the feature before anything in it, its properties before a property.
fn first_missing(doc: &Value, path: &ThingPath) -> ThingPath {
    let segments = path.segments();
    let exists = |n: usize| {
        segments
            .get(..n)
            .is_some_and(|prefix| value_at(doc, prefix).is_some())
    };
    let keep = match path.level() {
        Level::Attribute(_) if !exists(1) => 1,
        Level::FeatureDefinition(_)
        | Level::FeatureProperties(_)
        | Level::FeatureDesiredProperties(_)
        | Level::FeatureProperty(..)
        | Level::FeatureDesiredProperty(..)
            if !exists(2) =>
        {
            2
        }
        Level::FeatureProperty(..) | Level::FeatureDesiredProperty(..) if !exists(3) => 3,
        _ => segments.len(),
    };
    path.prefix(keep)
}

/// A root body for `thing_id`: an object, `thingId` filled in or checked, `policyId` kept from
/// the current thing when left out, read-only pseudo-fields dropped.
fn thing_body(
    value: &Value,
    thing_id: &ThingId,
    keep_policy: Option<&Value>,
) -> Result<Value, DittoError> {
    let Value::Object(given) = value else {
        return Err(DittoError::json_invalid(
            "a thing must be a JSON object".to_owned(),
        ));
    };
    let mut body = given.clone();
    for field in PSEUDO_FIELDS {
        body.remove(field);
    }
    match body.get("thingId") {
        None => {
            body.insert("thingId".into(), Value::from(thing_id.as_str()));
        }
        Some(Value::String(id)) if id == thing_id.as_str() => {}
        Some(Value::String(id)) => return Err(thing::thing_id_not_settable(id, thing_id)),
        Some(_) => {
            return Err(DittoError::json_invalid(
                "`/thingId` must be a string".to_owned(),
            ));
        }
    }
    if !body.contains_key("policyId")
        && let Some(policy_id) = keep_policy
    {
        body.insert("policyId".into(), policy_id.clone());
    }
    Ok(Value::Object(body))
}

/// Applies a thing command to the current state of its thing (`None`: it does not exist).
///
/// `Ok` is either a change (an event with the next revision and `now`, and the response) or a
/// retrieve's answer; `Err` is the Ditto error to answer with. Pure. Applying the event to
/// `current` with [`Entity::apply`] gives a valid thing within `limits`.
pub fn apply_thing_command(
    current: Option<&Entity>,
    cmd: &ThingCommand,
    now: Timestamp,
    limits: &Limits,
) -> Result<Applied, DittoError> {
    let thing_id = &cmd.thing_id;
    let key = EntityKey::new(EntityKind::Thing, thing_id.as_str());
    if let Some(entity) = current
        && entity.key != key
    {
        return Err(internal(
            "things",
            format!("the state given is {} instead of {key}", entity.key),
        ));
    }
    let path = &cmd.path;
    let path_len: usize = path
        .segments()
        .iter()
        .map(|s| thing::pointer_step_len(s))
        .sum();
    if path_len > limits.max_path_len {
        return Err(DittoError::new(
            400,
            "things:path.invalid",
            format!(
                "the path is {path_len} bytes, longer than the limit of {} bytes",
                limits.max_path_len
            ),
        ));
    }
    if let Some(value) = &cmd.value {
        thing::check_depth(value, limits.max_depth).map_err(|e| e.for_thing(thing_id))?;
    }
    let target = current.and_then(|e| value_at(&e.doc, path.segments()));
    if cmd.action == Action::Retrieve {
        return retrieve_thing(current, target, cmd);
    }
    let tag = current.filter(|_| target.is_some()).map(|e| e.revision);
    preconditions(&cmd.headers, tag, false)?;
    let thing_missing = || thing::not_found(thing_id, &ThingPath::root());
    // `segments`: the event's path, as the command's parsed segments (not parsed again).
    let (action, event_path, value, response, segments) = match cmd.action {
        Action::Create => {
            if !path.is_root() {
                return Err(DittoError::new(
                    400,
                    "things:path.invalid",
                    format!("`create` addresses a whole thing (path `/`), not `{path}`"),
                )
                .with_description("Use `modify` to create a part of a thing."));
            }
            if current.is_some() {
                return Err(DittoError::new(
                    409,
                    "things:thing.conflict",
                    format!("the thing `{thing_id}` already exists"),
                )
                .with_description(
                    "Choose another thing ID, or use `modify` to change the thing.",
                ));
            }
            let empty = Value::Object(Map::new());
            let doc = thing_body(cmd.value.as_ref().unwrap_or(&empty), thing_id, None)?;
            let response = Response {
                status: 201,
                value: Some(doc.clone()),
            };
            (
                EventAction::Created,
                "/".to_owned(),
                Some(doc),
                response,
                &[][..],
            )
        }
        Action::Modify => {
            let value = cmd
                .value
                .as_ref()
                .ok_or_else(|| DittoError::json_invalid("`modify` needs a value".to_owned()))?;
            if path.is_root() {
                let keep_policy = current.and_then(|e| e.doc.get("policyId"));
                let doc = thing_body(value, thing_id, keep_policy)?;
                if current.is_none() {
                    let response = Response {
                        status: 201,
                        value: Some(doc.clone()),
                    };
                    (
                        EventAction::Created,
                        "/".to_owned(),
                        Some(doc),
                        response,
                        &[][..],
                    )
                } else {
                    let response = Response {
                        status: 204,
                        value: None,
                    };
                    (
                        EventAction::Modified,
                        "/".to_owned(),
                        Some(doc),
                        response,
                        &[][..],
                    )
                }
            } else {
                if current.is_none() {
                    return Err(thing_missing());
                }
                // A new sub-resource is `created` (Ditto's AttributeCreated, FeatureCreated, …),
                // an existing one `modified`.
                let (action, response) = match target {
                    None => (
                        EventAction::Created,
                        Response {
                            status: 201,
                            value: Some(value.clone()),
                        },
                    ),
                    Some(_) => (
                        EventAction::Modified,
                        Response {
                            status: 204,
                            value: None,
                        },
                    ),
                };
                (
                    action,
                    event_path(path.segments()),
                    Some(value.clone()),
                    response,
                    path.segments(),
                )
            }
        }
        Action::Merge => {
            let Some(entity) = current else {
                return Err(thing_missing());
            };
            let patch = cmd.value.as_ref().ok_or_else(|| {
                DittoError::json_invalid("`merge` needs a value (a JSON merge patch)".to_owned())
            })?;
            if path.is_root() && !patch.is_object() {
                return Err(DittoError::json_invalid(
                    "a merge patch of a whole thing must be a JSON object".to_owned(),
                ));
            }
            let (keep, patch) = merge_event(&entity.doc, path.segments(), patch);
            let at = path.segments().get(..keep).unwrap_or_default();
            let response = Response {
                status: 204,
                value: None,
            };
            (
                EventAction::Merged,
                event_path(at),
                Some(patch),
                response,
                at,
            )
        }
        Action::Delete => {
            let Some(entity) = current else {
                return Err(thing_missing());
            };
            if target.is_none() {
                return Err(thing::not_found(
                    thing_id,
                    &first_missing(&entity.doc, path),
                ));
            }
            let response = Response {
                status: 204,
                value: None,
            };
            (
                EventAction::Deleted,
                event_path(path.segments()),
                None,
                response,
                path.segments(),
            )
        }
        Action::Retrieve => return retrieve_thing(current, target, cmd),
    };
    // Judge the document the event leads to, without building it.
    let doc = current.map_or(&Value::Null, |e| &e.doc);
    let size = current.and_then(|e| e.size);
    match (action, &value) {
        (EventAction::Created, Some(new_doc)) if segments.is_empty() => {
            thing::validate_thing(new_doc, thing_id, limits)?
        }
        (EventAction::Created | EventAction::Modified, Some(v)) => {
            thing::validate_thing_change_sized(doc, size, segments, Some(v), thing_id, limits)?
        }
        (EventAction::Merged, Some(patch)) if !patch.is_null() => {
            let mut merged = value_at(doc, segments).cloned().unwrap_or(Value::Null);
            merge_patch(&mut merged, patch);
            thing::validate_thing_change_sized(
                doc,
                size,
                segments,
                Some(&merged),
                thing_id,
                limits,
            )?
        }
        // Removals (a delete, a `null` merge) below the root leave a valid thing valid.
        _ => {}
    }
    let event = Event {
        key,
        action,
        path: event_path,
        value,
        revision: next_revision(current, "things")?,
        timestamp: now,
    };
    Ok(Applied::Change(Change { event, response }))
}

fn retrieve_thing(
    current: Option<&Entity>,
    target: Option<&Value>,
    cmd: &ThingCommand,
) -> Result<Applied, DittoError> {
    let Some(entity) = current else {
        return Err(thing::not_found(&cmd.thing_id, &ThingPath::root()));
    };
    let tag = target.map(|_| entity.revision);
    if preconditions(&cmd.headers, tag, true)? == Precondition::NotModified {
        return Ok(Applied::Retrieve(Response {
            status: 304,
            value: None,
        }));
    }
    let Some(target) = target else {
        return Err(thing::not_found(
            &cmd.thing_id,
            &first_missing(&entity.doc, &cmd.path),
        ));
    };
    let value = retrieved_value(
        entity,
        target,
        cmd.path.is_root(),
        cmd.thing_id.namespace(),
        cmd.headers.fields.as_deref(),
    )?;
    Ok(Applied::Retrieve(Response {
        status: 200,
        value: Some(value),
    }))
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

/// The part of a policy a policy command addresses. Labels and policy IDs never contain `/`;
/// subject IDs and resource keys may, so they are everything after `subjects/` or `resources/`
/// (`/entries/owner/resources/thing:/features/x`), taken as written in the policy JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyLevel<'a> {
    Policy,
    Entries,
    Entry(&'a str),
    Subjects(&'a str),
    Subject(&'a str, &'a str),
    Resources(&'a str),
    Resource(&'a str, &'a str),
    Imports,
    Import(&'a str),
}

impl<'a> PolicyLevel<'a> {
    /// Parses a policy command's path (400 `policies:path.invalid` when it addresses nothing).
    pub fn parse(path: &'a str) -> Result<Self, DittoError> {
        let invalid = || {
            DittoError::new(
                400,
                "policies:path.invalid",
                format!("`{path}` does not address a part of a policy"),
            )
            .with_description("Valid paths: /, /entries[/LABEL[/subjects[/SUBJECT]|/resources[/TYPE:PATH]]], /imports[/POLICY_ID]")
        };
        let split = |s: &'a str| match s.split_once('/') {
            Some((head, rest)) if !rest.is_empty() => (head, Some(rest)),
            Some((head, _)) => (head, None),
            None => (s, None),
        };
        let text = path.strip_prefix('/').unwrap_or(path);
        if text.is_empty() {
            return Ok(PolicyLevel::Policy);
        }
        let (head, rest) = split(text);
        match (head, rest) {
            ("entries", None) => Ok(PolicyLevel::Entries),
            ("entries", Some(rest)) => {
                let (label, rest) = split(rest);
                if label.is_empty() {
                    return Err(invalid());
                }
                let Some(rest) = rest else {
                    return Ok(PolicyLevel::Entry(label));
                };
                match split(rest) {
                    ("subjects", None) => Ok(PolicyLevel::Subjects(label)),
                    ("subjects", Some(subject)) => Ok(PolicyLevel::Subject(label, subject)),
                    ("resources", None) => Ok(PolicyLevel::Resources(label)),
                    ("resources", Some(resource)) => Ok(PolicyLevel::Resource(label, resource)),
                    _ => Err(invalid()),
                }
            }
            ("imports", None) => Ok(PolicyLevel::Imports),
            ("imports", Some(id)) if !id.contains('/') => Ok(PolicyLevel::Import(id)),
            _ => Err(invalid()),
        }
    }

    /// The keys of the policy JSON this level addresses, root first.
    pub fn keys(self) -> Vec<&'a str> {
        match self {
            PolicyLevel::Policy => vec![],
            PolicyLevel::Entries => vec!["entries"],
            PolicyLevel::Entry(l) => vec!["entries", l],
            PolicyLevel::Subjects(l) => vec!["entries", l, "subjects"],
            PolicyLevel::Subject(l, s) => vec!["entries", l, "subjects", s],
            PolicyLevel::Resources(l) => vec!["entries", l, "resources"],
            PolicyLevel::Resource(l, r) => vec!["entries", l, "resources", r],
            PolicyLevel::Imports => vec!["imports"],
            PolicyLevel::Import(id) => vec!["imports", id],
        }
    }

    /// The entry this level lies in, if any.
    fn label(self) -> Option<&'a str> {
        match self {
            PolicyLevel::Entry(l)
            | PolicyLevel::Subjects(l)
            | PolicyLevel::Subject(l, _)
            | PolicyLevel::Resources(l)
            | PolicyLevel::Resource(l, _) => Some(l),
            _ => None,
        }
    }
}

fn missing_text(what: String) -> String {
    format!("{what} could not be found or the requester had insufficient permissions to access it")
}

/// 404 for a policy (`policies:policy.notfound`) or the first missing part of it.
fn policy_missing(id: &PolicyId, level: PolicyLevel<'_>, doc: Option<&Value>) -> DittoError {
    let policy = || {
        DittoError::new(
            404,
            "policies:policy.notfound",
            missing_text(format!("the policy `{id}`")),
        )
        .with_description(
            "Check if the ID of the policy was correct and you have sufficient permissions.",
        )
    };
    let Some(doc) = doc else {
        return policy();
    };
    let entry_exists = |label: &str| value_at(doc, &["entries", label]).is_some();
    match level {
        PolicyLevel::Entry(l)
        | PolicyLevel::Subjects(l)
        | PolicyLevel::Resources(l)
        | PolicyLevel::Subject(l, _)
        | PolicyLevel::Resource(l, _)
            if !entry_exists(l) =>
        {
            DittoError::new(
                404,
                "policies:entry.notfound",
                missing_text(format!("the entry `{l}` of policy `{id}`")),
            )
        }
        PolicyLevel::Subject(l, s) => DittoError::new(
            404,
            "policies:subject.notfound",
            missing_text(format!("the subject `{s}` of entry `{l}` of policy `{id}`")),
        ),
        PolicyLevel::Resource(l, r) => DittoError::new(
            404,
            "policies:resource.notfound",
            missing_text(format!(
                "the resource `{r}` of entry `{l}` of policy `{id}`"
            )),
        ),
        PolicyLevel::Imports | PolicyLevel::Import(_) => {
            let what = match level {
                PolicyLevel::Import(i) => format!("the import of policy `{i}` in policy `{id}`"),
                _ => format!("the imports of policy `{id}`"),
            };
            DittoError::new(404, "policies:import.notfound", missing_text(what))
        }
        _ => policy(),
    }
}

/// The key under which the resource `requested` is stored in entry `label`: the same text, or a
/// spelling of the same resource (`thing:` and `thing:/`).
fn stored_resource_key<'d>(doc: &'d Value, label: &str, requested: &str) -> Option<&'d str> {
    let resources = value_at(doc, &["entries", label, "resources"])?.as_object()?;
    if let Some((k, _)) = resources.get_key_value(requested) {
        return Some(k.as_str());
    }
    let wanted = policy::ResourceKey::parse(requested).ok()?;
    resources
        .keys()
        .find(|k| policy::ResourceKey::parse(k).is_ok_and(|key| key == wanted))
        .map(String::as_str)
}

fn policy_invalid(id: &PolicyId, problem: impl fmt::Display) -> DittoError {
    DittoError::new(
        400,
        "policies:policy.invalid",
        format!("the policy `{id}` is invalid: {problem}"),
    )
}

fn policy_id_not_settable(found: &str, id: &PolicyId) -> DittoError {
    DittoError::new(
        400,
        "policies:id.notsettable",
        format!("the policyId {found:?} in the body is not the policy ID `{id}` of the command"),
    )
    .with_description(
        "Leave `policyId` out of the body or make it equal to the command's policy ID.",
    )
}

/// A root policy body: an object, `policyId` filled in or checked, pseudo-fields dropped.
fn policy_body(value: &Value, id: &PolicyId) -> Result<Value, DittoError> {
    let Value::Object(given) = value else {
        return Err(policy_invalid(id, "a policy must be a JSON object"));
    };
    let mut body = given.clone();
    for field in PSEUDO_FIELDS {
        body.remove(field);
    }
    match body.get("policyId") {
        None => {
            body.insert("policyId".into(), Value::from(id.as_str()));
        }
        Some(Value::String(found)) if found != id.as_str() => {
            return Err(policy_id_not_settable(found, id));
        }
        Some(_) => {}
    }
    Ok(Value::Object(body))
}

/// A policy document is valid: within the limits, its own `policyId`, no pseudo-fields, parsed
/// by the policy crate (400 `policies:policy.invalid` with the parser's JSON path) and nobody
/// locked out (403 `policies:policy.modificationinvalid`).
pub fn validate_policy(doc: &Value, id: &PolicyId, limits: &Limits) -> Result<(), DittoError> {
    thing::check_limits(doc, limits).map_err(|e| match e {
        LimitError::TooLarge { size, limit } => DittoError::new(
            413,
            "policies:policy.toolarge",
            format!(
                "the policy `{id}` would be {size} bytes, more than the limit of {limit} bytes"
            ),
        ),
        other => policy_invalid(id, other),
    })?;
    let Value::Object(fields) = doc else {
        return Err(policy_invalid(id, "a policy must be a JSON object"));
    };
    match fields.get("policyId") {
        Some(Value::String(found)) if found != id.as_str() => {
            return Err(policy_id_not_settable(found, id));
        }
        None => return Err(policy_invalid(id, "the policy must keep its `policyId`")),
        _ => {}
    }
    if let Some(field) = PSEUDO_FIELDS.iter().find(|f| fields.contains_key(**f)) {
        return Err(policy_invalid(
            id,
            format!("`{field}` is kept by the store and cannot be set"),
        ));
    }
    let parsed = policy::policy_from_value(doc).map_err(|e| policy_invalid(id, e))?;
    policy::check_lockout(&parsed).map_err(|e| {
        DittoError::new(
            403,
            "policies:policy.modificationinvalid",
            format!("the policy `{id}` cannot be changed this way: {e}"),
        )
        .with_description(
            "Keep at least one subject without expiry that has unrestricted WRITE on `policy:/`.",
        )
    })?;
    Ok(())
}

/// Whether an event path can address `key` (keys with `/` cannot; `~` is written `~0`).
fn addressable(key: &str) -> bool {
    !key.is_empty() && !key.contains('/')
}

/// Sets `value` at `keys` below `doc`, creating missing parents (as [`Entity::apply`] does).
fn set_at(doc: &mut Value, keys: &[&str], value: Value) {
    let Some((last, parents)) = keys.split_last() else {
        *doc = value;
        return;
    };
    let mut current = doc;
    for key in parents {
        let Value::Object(map) = current else { return };
        let entry = map
            .entry((*key).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        current = entry;
    }
    if let Value::Object(map) = current {
        map.insert((*last).to_owned(), value);
    }
}

fn remove_at(doc: &mut Value, keys: &[&str]) {
    let Some((last, parents)) = keys.split_last() else {
        return;
    };
    let parent = parents
        .iter()
        .try_fold(doc, |v, k| v.as_object_mut()?.get_mut(*k));
    if let Some(Value::Object(map)) = parent {
        map.remove(*last);
    }
}

/// Applies a policy command to the current state of its policy (`None`: it does not exist).
///
/// Changes are applied to the policy JSON, and the whole result must parse
/// ([`policy::policy_from_value`]) and keep someone able to change it
/// ([`policy::check_lockout`]). Pure.
pub fn apply_policy_command(
    current: Option<&Entity>,
    cmd: &PolicyCommand,
    now: Timestamp,
    limits: &Limits,
) -> Result<Applied, DittoError> {
    let id = &cmd.policy_id;
    let key = EntityKey::new(EntityKind::Policy, id.as_str());
    if let Some(entity) = current
        && entity.key != key
    {
        return Err(internal(
            "policies",
            format!("the state given is {} instead of {key}", entity.key),
        ));
    }
    let level = PolicyLevel::parse(&cmd.path)?;
    if let Some(value) = &cmd.value {
        thing::check_depth(value, limits.max_depth).map_err(|e| policy_invalid(id, e))?;
    }
    let doc = current.map(|e| &e.doc);
    let mut keys = level.keys();
    if let PolicyLevel::Resource(label, requested) = level
        && let Some(doc) = doc
        && let Some(stored) = stored_resource_key(doc, label, requested)
        && let Some(last) = keys.last_mut()
    {
        *last = stored;
    }
    let target = doc.and_then(|d| value_at(d, &keys));
    let missing = || policy_missing(id, level, doc);

    if cmd.action == Action::Retrieve {
        let Some(entity) = current else {
            return Err(missing());
        };
        let tag = target.map(|_| entity.revision);
        if preconditions(&cmd.headers, tag, true)? == Precondition::NotModified {
            return Ok(Applied::Retrieve(Response {
                status: 304,
                value: None,
            }));
        }
        let empty = Value::Object(Map::new());
        let target = match (target, level) {
            (Some(t), _) => t,
            (None, PolicyLevel::Imports) => &empty,
            (None, _) => return Err(missing()),
        };
        let value = retrieved_value(
            entity,
            target,
            keys.is_empty(),
            id.namespace(),
            cmd.headers.fields.as_deref(),
        )?;
        return Ok(Applied::Retrieve(Response {
            status: 200,
            value: Some(value),
        }));
    }

    let tag = current.filter(|_| target.is_some()).map(|e| e.revision);
    preconditions(&cmd.headers, tag, false)?;
    let needs_value = || {
        cmd.value
            .as_ref()
            .ok_or_else(|| policy_invalid(id, format!("`{}` needs a value", cmd.action.as_str())))
    };
    // Below the root, the policy must exist, and so must the entry a level lies in.
    let existing = |action: Action| -> Result<&Entity, DittoError> {
        let entity = current.ok_or_else(missing)?;
        if action != Action::Delete
            && let Some(label) = level.label()
            && !matches!(level, PolicyLevel::Entry(_))
            && value_at(&entity.doc, &["entries", label]).is_none()
        {
            return Err(missing());
        }
        Ok(entity)
    };
    let no_content = Response {
        status: 204,
        value: None,
    };

    // The new document, the event's action, and the response.
    let (new_doc, action, response) = match cmd.action {
        Action::Create => {
            if level != PolicyLevel::Policy {
                return Err(DittoError::new(
                    400,
                    "policies:path.invalid",
                    format!(
                        "`create` addresses a whole policy (path `/`), not `{}`",
                        cmd.path
                    ),
                )
                .with_description("Use `modify` to create a part of a policy."));
            }
            if current.is_some() {
                return Err(DittoError::new(
                    409,
                    "policies:policy.conflict",
                    format!("the policy `{id}` already exists"),
                ));
            }
            let empty = Value::Object(Map::new());
            let body = policy_body(cmd.value.as_ref().unwrap_or(&empty), id)?;
            let response = Response {
                status: 201,
                value: Some(body.clone()),
            };
            (Some(body), EventAction::Created, response)
        }
        Action::Modify => {
            let value = needs_value()?;
            if level == PolicyLevel::Policy {
                let body = policy_body(value, id)?;
                match current {
                    None => {
                        let response = Response {
                            status: 201,
                            value: Some(body.clone()),
                        };
                        (Some(body), EventAction::Created, response)
                    }
                    Some(_) => (Some(body), EventAction::Modified, no_content),
                }
            } else {
                let entity = existing(Action::Modify)?;
                let mut new_doc = entity.doc.clone();
                set_at(&mut new_doc, &keys, value.clone());
                let response = match target {
                    None => Response {
                        status: 201,
                        value: Some(value.clone()),
                    },
                    Some(_) => no_content,
                };
                (Some(new_doc), EventAction::Modified, response)
            }
        }
        Action::Merge => {
            let entity = existing(Action::Merge)?;
            let patch = needs_value()?;
            if level == PolicyLevel::Policy && !patch.is_object() {
                return Err(policy_invalid(
                    id,
                    "a merge patch of a whole policy must be a JSON object",
                ));
            }
            let mut new_doc = entity.doc.clone();
            merge_patch(&mut new_doc, &wrap(&keys, patch.clone()));
            (Some(new_doc), EventAction::Merged, no_content)
        }
        Action::Delete => {
            let entity = existing(Action::Delete)?;
            if target.is_none() {
                return Err(missing());
            }
            if level == PolicyLevel::Policy {
                (None, EventAction::Deleted, no_content)
            } else {
                let mut new_doc = entity.doc.clone();
                remove_at(&mut new_doc, &keys);
                (Some(new_doc), EventAction::Deleted, no_content)
            }
        }
        Action::Retrieve => return Err(internal("policies", "a retrieve is no change")),
    };
    if let Some(doc) = &new_doc {
        validate_policy(doc, id, limits)?;
    }

    // The event: at the addressed path if an event path can say it, else a `modified` of the
    // nearest addressable ancestor with its new value.
    let (action, event_path, event_value) = if keys.iter().all(|k| addressable(k)) {
        match action {
            EventAction::Created => (action, "/".to_owned(), new_doc.clone()),
            EventAction::Modified if keys.is_empty() => (action, "/".to_owned(), new_doc.clone()),
            EventAction::Modified => (action, event_path(&keys), cmd.value.clone()),
            EventAction::Merged => {
                let old = current.map_or(&Value::Null, |e| &e.doc);
                let patch = cmd.value.as_ref().unwrap_or(&Value::Null);
                let (keep, patch) = merge_event(old, &keys, patch);
                let at = keys.get(..keep).unwrap_or_default();
                (action, event_path(at), Some(patch))
            }
            EventAction::Deleted => (action, event_path(&keys), None),
        }
    } else {
        let reachable = keys
            .iter()
            .position(|k| !addressable(k))
            .and_then(|n| keys.get(..n))
            .unwrap_or_default();
        let value = new_doc
            .as_ref()
            .and_then(|d| value_at(d, reachable))
            .cloned();
        (EventAction::Modified, event_path(reachable), value)
    };
    let event = Event {
        key,
        action,
        path: event_path,
        value: event_value,
        revision: next_revision(current, "policies")?,
        timestamp: now,
    };
    // INVARIANT: the event says exactly what was validated. (Policies are small and rarely
    // changed: the clone this costs is fine here, unlike on things.)
    let state = Entity::apply(current.cloned(), &event).map_err(|e| internal("policies", e))?;
    if state.as_ref().map(|e| &e.doc) != new_doc.as_ref() {
        return Err(internal(
            "policies",
            "the event does not reproduce the validated document",
        ));
    }
    Ok(Applied::Change(Change { event, response }))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;
    use serde_json::json;

    #[test]
    fn field_selectors_expand_groups_and_drop_leading_slashes() {
        assert_eq!(
            parse_field_selector("thingId, /attributes/location ,_revision").unwrap(),
            vec!["thingId", "attributes/location", "_revision"]
        );
        assert_eq!(
            parse_field_selector(
                "attributes(model,location/lat),features/lamp(properties(on),definition)"
            )
            .unwrap(),
            vec![
                "attributes/model",
                "attributes/location/lat",
                "features/lamp/properties/on",
                "features/lamp/definition"
            ]
        );
        for bad in ["a(b", "a)b", "a(b)c", "a(b))"] {
            let e = parse_field_selector(bad).unwrap_err();
            assert_eq!(
                (e.status, e.error),
                (400, "json.fieldselector.invalid"),
                "{bad}"
            );
        }
    }

    #[test]
    fn policy_paths_take_resource_keys_and_subjects_whole() {
        assert_eq!(PolicyLevel::parse("/").unwrap(), PolicyLevel::Policy);
        assert_eq!(PolicyLevel::parse("").unwrap(), PolicyLevel::Policy);
        assert_eq!(
            PolicyLevel::parse("/entries").unwrap(),
            PolicyLevel::Entries
        );
        assert_eq!(
            PolicyLevel::parse("/entries/owner/resources/thing:/features/x").unwrap(),
            PolicyLevel::Resource("owner", "thing:/features/x")
        );
        assert_eq!(
            PolicyLevel::parse("/entries/owner/subjects/issuer:a/b@c").unwrap(),
            PolicyLevel::Subject("owner", "issuer:a/b@c")
        );
        assert_eq!(
            PolicyLevel::parse("/imports/ns:p").unwrap(),
            PolicyLevel::Import("ns:p")
        );
        for bad in [
            "/x",
            "/entries//subjects",
            "/entries/o/other",
            "/imports/a/b",
        ] {
            assert_eq!(
                PolicyLevel::parse(bad).unwrap_err().error,
                "policies:path.invalid",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_null_merge_below_a_missing_parent_moves_up_to_that_parent() {
        let doc = json!({"attributes": {"a": 5}});
        let segs = |p: &str| ThingPath::parse(p).unwrap().segments().to_vec();
        let cases = [
            ("/attributes/a/b", Value::Null, (2, json!({"b": null}))),
            (
                "/features/f/properties/p",
                Value::Null,
                (1, json!({"f": {"properties": {"p": null}}})),
            ),
            ("/attributes/x", Value::Null, (2, Value::Null)),
            ("/attributes/a/b", json!(1), (3, json!(1))),
        ];
        for (path, patch, expected) in cases {
            assert_eq!(merge_event(&doc, &segs(path), &patch), expected, "{path}");
        }
    }
}
