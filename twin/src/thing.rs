//! The thing model (Eclipse Ditto's): document shape, validation and size limits.
//!
//! A thing is stored (in [`crate::Entity::doc`]) as the JSON object Ditto uses, without the
//! `_revision`, `_created`, `_modified` and `_namespace` pseudo-fields (the entity keeps those):
//!
//! ```json
//! {"thingId": "ns:name", "policyId": "ns:p", "definition": "ns:model:1.0.0",
//!  "attributes": {…},
//!  "features": {"lamp": {"definition": ["ns:lamp:1.0.0"], "properties": {…}, "desiredProperties": {…}}}}
//! ```
//!
//! Every key inside `attributes`, `features`, `properties` and `desiredProperties` (at any depth
//! reachable through objects) is a path segment of some command, so it must not be empty nor
//! contain `/` or control characters. [`validate_thing`] checks all of this on a whole document,
//! together with the [`Limits`] (nesting depth, serialized size, path length), and names what is
//! wrong with a JSON pointer. [`validate_thing_change`] gives the same answer for a change to a
//! valid document without building the new one (one read-only walk for the limits, the shape
//! rules for the new value only): the hot path never clones a thing to judge a change.
//! Sizes are counted as compact JSON without writing it ([`serialized_len`]). The errors about a level of a thing that is missing or may not be
//! changed ([`not_found`], [`not_modifiable`]) live here too, since both command application and
//! authorization answer with them.

use std::fmt;
use std::io;

use policy::json::type_name;
use serde_json::{Map, Value};

use crate::error::DittoError;
use crate::id::{PolicyId, ThingId};
use crate::path::{self, Level, ThingPath};

/// Size limits of stored documents (things and policies). Configurable; see [`Limits::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest document, in bytes of compact JSON (without pseudo-fields).
    pub max_document_bytes: usize,
    /// The deepest nesting of JSON objects and arrays; the document itself is level 1.
    pub max_depth: usize,
    /// The longest JSON pointer (as written, `~` as `~0`) to any value reachable through objects:
    /// longer paths could not be addressed by a command nor named in a policy.
    pub max_path_len: usize,
}

impl Default for Limits {
    /// 100 KiB, 32 levels, [`path::MAX_PATH_LEN`] bytes.
    fn default() -> Self {
        Limits {
            max_document_bytes: 100 * 1024,
            max_depth: 32,
            max_path_len: path::MAX_PATH_LEN,
        }
    }
}

/// The fields a thing document may hold.
pub const THING_FIELDS: [&str; 5] = [
    "thingId",
    "policyId",
    "definition",
    "attributes",
    "features",
];

/// The fields a feature may hold.
pub const FEATURE_FIELDS: [&str; 3] = ["definition", "properties", "desiredProperties"];

/// Fields computed from the entity (never stored), available to retrieves through `fields`.
pub const PSEUDO_FIELDS: [&str; 4] = ["_revision", "_created", "_modified", "_namespace"];

/// Why a document exceeds its [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("`{pointer}` is nested deeper than the limit of {limit} levels")]
    TooDeep { pointer: String, limit: usize },
    #[error("the document is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("the path `{pointer}…` is longer than the limit of {limit} bytes")]
    PathTooLong { pointer: String, limit: usize },
}

impl LimitError {
    /// As a thing error: 413 `things:thing.toolarge` or 400 `things:json.invalid`.
    pub fn for_thing(self, thing_id: &ThingId) -> DittoError {
        match self {
            LimitError::TooLarge { size, limit } => DittoError::too_large(format!(
                "the thing `{thing_id}` would be {size} bytes, more than the limit of {limit} bytes"
            ))
            .with_description(
                "Reduce the size of the thing, e.g. by removing unused attributes or properties.",
            ),
            other => DittoError::json_invalid(format!("the thing `{thing_id}`: {other}")),
        }
    }
}

/// Counts the bytes written to it, storing none.
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The length of a string written as a JSON string: quotes, and the escapes serde_json writes
/// (`\"`, `\\`, the short forms of `\b \t \n \f \r`, `\u00XX` for other control characters).
fn json_string_len(text: &str) -> usize {
    let needs_escape = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    // Most strings need no escape. Testing 16 bytes at a time without branching lets the
    // compiler use vector instructions; counting comes only when something needs escaping.
    let clean = text
        .as_bytes()
        .chunks(16)
        .all(|chunk| !chunk.iter().fold(false, |seen, &b| seen | needs_escape(b)));
    if clean {
        return text.len() + 2;
    }
    let escapes: usize = text
        .bytes()
        .filter(|&b| needs_escape(b))
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0A | 0x0C | 0x0D => 1,
            _ => 5,
        })
        .sum();
    text.len() + escapes + 2
}

/// The length of a number as serde_json writes it.
fn json_number_len(n: &serde_json::Number) -> usize {
    if let Some(i) = n.as_u64() {
        return i.checked_ilog10().map_or(1, |d| d as usize + 1);
    }
    if let Some(i) = n.as_i64() {
        return i
            .unsigned_abs()
            .checked_ilog10()
            .map_or(1, |d| d as usize + 1)
            + 1;
    }
    // Floats are written by `ryu`; let serde_json write this one number to learn its length.
    let mut counter = ByteCounter(0);
    match serde_json::to_writer(&mut counter, n) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// The length in bytes of `value` written as compact JSON (`serde_json::to_vec`), computed
/// without writing it.
pub fn serialized_len(value: &Value) -> usize {
    let mut walk = Measure {
        max_depth: usize::MAX,
    };
    walk.value(value, 1, &Pointer::ROOT).unwrap_or(usize::MAX)
}

/// One walk for both depth and size: never descends more than `max_depth + 1` levels.
struct Measure {
    max_depth: usize,
}

impl Measure {
    fn value(
        &mut self,
        value: &Value,
        level: usize,
        at: &Pointer<'_>,
    ) -> Result<usize, LimitError> {
        let container = |this: &Self| {
            if level > this.max_depth {
                Err(LimitError::TooDeep {
                    pointer: at.shown(),
                    limit: this.max_depth,
                })
            } else {
                Ok(())
            }
        };
        Ok(match value {
            Value::Null | Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Number(n) => json_number_len(n),
            Value::String(text) => json_string_len(text),
            Value::Array(items) => {
                container(self)?;
                let mut size = 2 + items.len().saturating_sub(1);
                for (i, item) in items.iter().enumerate() {
                    size = size.saturating_add(self.value(item, level + 1, &at.index(i))?);
                }
                size
            }
            Value::Object(map) => {
                container(self)?;
                // Braces, commas between members, a colon in each.
                let mut size = 2 + map.len().saturating_sub(1) + map.len();
                for (key, item) in map {
                    size = size
                        .saturating_add(json_string_len(key))
                        .saturating_add(self.value(item, level + 1, &at.key(key))?);
                }
                size
            }
        })
    }

    /// The size of `node` once `replacement` is put at `path` below it (`None`: removed, which
    /// gives `None` at the end of the path), with missing or non-object parents on the way
    /// turned into objects, as [`crate::Entity::apply`] does. Walks everything else unchanged.
    fn with_change<S: AsRef<str>>(
        &mut self,
        node: Option<&Value>,
        path: &[S],
        replacement: Option<&Value>,
        level: usize,
        at: &Pointer<'_>,
    ) -> Result<Option<usize>, LimitError> {
        let Some((first, rest)) = path.split_first() else {
            return replacement.map(|v| self.value(v, level, at)).transpose();
        };
        let first = first.as_ref();
        if level > self.max_depth {
            return Err(LimitError::TooDeep {
                pointer: at.shown(),
                limit: self.max_depth,
            });
        }
        let empty = Map::new();
        let map = node.and_then(Value::as_object).unwrap_or(&empty);
        let mut members = 0usize;
        let mut size = 2usize;
        for (key, item) in map {
            if key != first {
                members += 1;
                size = size
                    .saturating_add(json_string_len(key) + 1)
                    .saturating_add(self.value(item, level + 1, &at.key(key))?);
            }
        }
        if let Some(changed) =
            self.with_change(map.get(first), rest, replacement, level + 1, &at.key(first))?
        {
            members += 1;
            size = size
                .saturating_add(json_string_len(first) + 1)
                .saturating_add(changed);
        }
        Ok(Some(size.saturating_add(members.saturating_sub(1))))
    }

    /// The [`chain`] of `node` once `replacement` is put at `path` below it (parents created
    /// as [`Measure::with_change`] does), with the same depth checks on the way and in
    /// `replacement`; nothing beside the path is walked.
    fn chain_with_change<S: AsRef<str>>(
        &mut self,
        node: Option<&Value>,
        path: &[S],
        replacement: &Value,
        level: usize,
        at: &Pointer<'_>,
    ) -> Result<usize, LimitError> {
        let Some((first, rest)) = path.split_first() else {
            return self.value(replacement, level, at);
        };
        let first = first.as_ref();
        if level > self.max_depth {
            return Err(LimitError::TooDeep {
                pointer: at.shown(),
                limit: self.max_depth,
            });
        }
        let map = node.and_then(Value::as_object);
        let child = map.and_then(|m| m.get(first));
        let members = map.map_or(0, Map::len) + usize::from(child.is_none());
        let below = self.chain_with_change(child, rest, replacement, level + 1, &at.key(first))?;
        Ok(frame(members)
            .saturating_add(json_string_len(first))
            .saturating_add(below))
    }
}

/// An object's braces, and the commas and colons of its `members`.
fn frame(members: usize) -> usize {
    2 + members.saturating_sub(1) + members
}

/// The part of `node`'s size that a change at `path` can touch: at each level on the way its
/// braces, commas and colons and the key of the path's member, then the value at `path` (a
/// non-object on the way counts whole: a change below it replaces it). The members beside the
/// path are left out — keys and values — so for two documents that differ only at `path`, the
/// difference of their chains is the difference of their sizes. Walks the path and the value
/// at it, nothing else.
fn chain<'p>(doc: &Value, path: impl IntoIterator<Item = &'p str>) -> usize {
    let mut node = doc;
    let mut size = 0usize;
    for segment in path {
        let Value::Object(map) = node else {
            return size.saturating_add(serialized_len(node));
        };
        size = size.saturating_add(frame(map.len()));
        match map.get(segment) {
            Some(child) => {
                size = size.saturating_add(json_string_len(segment));
                node = child;
            }
            None => return size,
        }
    }
    size.saturating_add(serialized_len(node))
}

/// The [`chain`] of the path `parents`/`last` in `doc`: the part of its size that a change
/// there touches (taken before and after the change, their difference is the size's).
pub(crate) fn chain_len<S: AsRef<str>>(doc: &Value, parents: &[S], last: &str) -> usize {
    chain(
        doc,
        parents
            .iter()
            .map(AsRef::as_ref)
            .chain(std::iter::once(last)),
    )
}

/// A JSON pointer under construction, for messages only: nothing is allocated unless an error
/// is reported.
#[derive(Clone, Copy)]
pub(crate) struct Pointer<'a> {
    parent: Option<&'a Pointer<'a>>,
    step: Step<'a>,
}

#[derive(Clone, Copy)]
enum Step<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

impl<'a> Pointer<'a> {
    pub(crate) const ROOT: Pointer<'static> = Pointer {
        parent: None,
        step: Step::Root,
    };

    pub(crate) fn key(&'a self, key: &'a str) -> Pointer<'a> {
        Pointer {
            parent: Some(self),
            step: Step::Key(key),
        }
    }

    fn index(&'a self, index: usize) -> Pointer<'a> {
        Pointer {
            parent: Some(self),
            step: Step::Index(index),
        }
    }

    /// The pointer as text, cut to a length a message can carry.
    fn shown(&self) -> String {
        let text = self.to_string();
        if text.is_empty() {
            return "/".to_owned();
        }
        cut(&text, 200).to_owned()
    }
}

impl fmt::Display for Pointer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            parent.fmt(f)?;
        }
        match self.step {
            Step::Root => Ok(()),
            Step::Key(key) => write!(f, "/{}", key.replace('~', "~0")),
            Step::Index(i) => write!(f, "/{i}"),
        }
    }
}

/// The first `max` bytes of `text`, at a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or(text)
}

/// The length a key adds to a JSON pointer: `/` plus the key with `~` written `~0`.
pub(crate) fn pointer_step_len(key: &str) -> usize {
    1 + key.len() + key.bytes().filter(|&b| b == b'~').count()
}

/// Refuses a value nested deeper than `max_depth` (objects and arrays; `value` itself is level
/// 1 if it is one). Never descends further than `max_depth + 1` levels, so it is safe on any
/// value, however it was built.
pub fn check_depth(value: &Value, max_depth: usize) -> Result<(), LimitError> {
    depth_below(value, 1, max_depth, &Pointer::ROOT)
}

fn depth_below(
    value: &Value,
    level: usize,
    max_depth: usize,
    at: &Pointer<'_>,
) -> Result<(), LimitError> {
    let too_deep = || LimitError::TooDeep {
        pointer: at.shown(),
        limit: max_depth,
    };
    match value {
        Value::Object(map) => {
            if level > max_depth {
                return Err(too_deep());
            }
            map.iter()
                .try_for_each(|(k, v)| depth_below(v, level + 1, max_depth, &at.key(k)))
        }
        Value::Array(items) => {
            if level > max_depth {
                return Err(too_deep());
            }
            items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| depth_below(v, level + 1, max_depth, &at.index(i)))
        }
        _ => Ok(()),
    }
}

/// Checks depth and size in one walk. Returns the size in bytes of the compact JSON.
pub fn check_limits(doc: &Value, limits: &Limits) -> Result<usize, LimitError> {
    let mut walk = Measure {
        max_depth: limits.max_depth,
    };
    let size = walk.value(doc, 1, &Pointer::ROOT)?;
    if size > limits.max_document_bytes {
        return Err(LimitError::TooLarge {
            size,
            limit: limits.max_document_bytes,
        });
    }
    Ok(size)
}

fn must_be(at: &Pointer<'_>, expected: &str, found: &Value) -> DittoError {
    DittoError::json_invalid(format!(
        "`{}` must be {expected}, found {}",
        at.shown(),
        type_name(found)
    ))
}

fn object<'v>(v: &'v Value, at: &Pointer<'_>) -> Result<&'v Map<String, Value>, DittoError> {
    v.as_object().ok_or_else(|| must_be(at, "an object", v))
}

/// Why a key cannot be a path segment, if it cannot.
pub fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("must not be empty")
    } else if key.contains('/') {
        Some("must not contain `/`")
    } else if key.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    }
}

fn check_key(key: &str, at: &Pointer<'_>) -> Result<(), DittoError> {
    match key_problem(key) {
        None => Ok(()),
        Some(problem) => Err(DittoError::json_invalid(format!(
            "the key {:?} in `{}` {problem}",
            cut(key, 100),
            at.shown()
        ))),
    }
}

/// Walks the keys of a free-form object (attributes, properties) at any depth reachable through
/// objects: each must be a valid path segment and the path to it not longer than the limit.
fn check_free_object(
    map: &Map<String, Value>,
    at: &Pointer<'_>,
    len: usize,
    max_path_len: usize,
) -> Result<(), DittoError> {
    for (key, v) in map {
        check_key(key, at)?;
        let here = at.key(key);
        let len = len + pointer_step_len(key);
        if len > max_path_len {
            return Err(DittoError::json_invalid(
                LimitError::PathTooLong {
                    pointer: here.shown(),
                    limit: max_path_len,
                }
                .to_string(),
            ));
        }
        if let Value::Object(inner) = v {
            check_free_object(inner, &here, len, max_path_len)?;
        }
    }
    Ok(())
}

/// Whether `text` is a definition identifier `namespace:name:version` (each part made of
/// letters, digits, `_`, `-` and `.`, as Ditto's `ThingDefinition` and `DefinitionIdentifier`).
pub fn is_definition(text: &str) -> bool {
    let mut parts = 0;
    for part in text.split(':') {
        parts += 1;
        if part.is_empty()
            || !part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return false;
        }
    }
    parts == 3
}

fn check_definition(v: &Value, at: &Pointer<'_>) -> Result<(), DittoError> {
    let Value::String(text) = v else {
        return Err(must_be(
            at,
            "a definition string `namespace:name:version`",
            v,
        ));
    };
    if is_definition(text) {
        Ok(())
    } else {
        Err(DittoError::json_invalid(format!(
            "`{}` must be a definition `namespace:name:version`, found {:?}",
            at.shown(),
            cut(text, 100)
        )))
    }
}

fn check_feature_definition(v: &Value, at: &Pointer<'_>) -> Result<(), DittoError> {
    let Value::Array(ids) = v else {
        return Err(must_be(
            at,
            "an array of definitions `namespace:name:version`",
            v,
        ));
    };
    if ids.is_empty() {
        return Err(DittoError::json_invalid(format!(
            "`{}` must hold at least one definition",
            at.shown()
        )));
    }
    for (i, d) in ids.iter().enumerate() {
        check_definition(d, &at.index(i))?;
    }
    Ok(())
}

fn check_policy_id(v: &Value, at: &Pointer<'_>) -> Result<(), DittoError> {
    let Value::String(id) = v else {
        return Err(must_be(at, "a policy ID string", v));
    };
    PolicyId::parse(id).map_err(|e| {
        DittoError::json_invalid(format!("`{}` is not a valid policy ID: {e}", at.shown()))
    })?;
    Ok(())
}

fn check_feature(
    id: &str,
    feature: &Value,
    features_at: &Pointer<'_>,
    max_path_len: usize,
) -> Result<(), DittoError> {
    check_key(id, features_at)?;
    let at = features_at.key(id);
    let len = "/features".len() + pointer_step_len(id);
    for (field, v) in object(feature, &at)? {
        let field_at = at.key(field);
        match field.as_str() {
            "definition" => check_feature_definition(v, &field_at)?,
            "properties" | "desiredProperties" => {
                let map = object(v, &field_at)?;
                check_free_object(map, &field_at, len + pointer_step_len(field), max_path_len)?;
            }
            other => {
                return Err(DittoError::json_invalid(format!(
                    "`{}` has an unknown field {:?} (expected definition, properties or desiredProperties)",
                    at.shown(),
                    cut(other, 100)
                )));
            }
        }
    }
    Ok(())
}

/// Checks that `doc` is a valid thing document for `thing_id` within `limits`: shape (400
/// `things:json.invalid` naming the JSON pointer), `thingId` present and equal to `thing_id`
/// (400 `things:id.notsettable`), nesting depth and path lengths (400), size (413
/// `things:thing.toolarge`).
pub fn validate_thing(doc: &Value, thing_id: &ThingId, limits: &Limits) -> Result<(), DittoError> {
    // Depth first (the shape walk below recurses), size in the same walk.
    check_limits(doc, limits).map_err(|e| e.for_thing(thing_id))?;
    let root = Pointer::ROOT;
    let Value::Object(fields) = doc else {
        return Err(DittoError::json_invalid(format!(
            "a thing must be a JSON object, found {}",
            type_name(doc)
        )));
    };
    for (field, v) in fields {
        let at = root.key(field);
        match field.as_str() {
            "thingId" => match v {
                Value::String(id) if id == thing_id.as_str() => {}
                Value::String(id) => return Err(thing_id_not_settable(id, thing_id)),
                other => return Err(must_be(&at, "a string", other)),
            },
            "policyId" => check_policy_id(v, &at)?,
            "definition" => check_definition(v, &at)?,
            "attributes" => check_free_object(
                object(v, &at)?,
                &at,
                "/attributes".len(),
                limits.max_path_len,
            )?,
            "features" => {
                for (id, feature) in object(v, &at)? {
                    check_feature(id, feature, &at, limits.max_path_len)?;
                }
            }
            other => {
                return Err(DittoError::json_invalid(format!(
                    "a thing has no field {:?} (expected thingId, policyId, definition, attributes or features)",
                    cut(other, 100)
                )));
            }
        }
    }
    if !fields.contains_key("thingId") {
        return Err(DittoError::json_invalid(format!(
            "the thing `{thing_id}` must keep its `thingId`"
        )));
    }
    Ok(())
}

/// Calls `f` with the pointer of `segments` (built on the stack, one frame per segment).
fn at_position<S: AsRef<str>, R>(
    segments: &[S],
    at: &Pointer<'_>,
    f: impl FnOnce(&Pointer<'_>) -> R,
) -> R {
    match segments.split_first() {
        None => f(at),
        Some((first, rest)) => at_position(rest, &at.key(first.as_ref()), f),
    }
}

/// Checks `value` against the shape rules of the position `segments` in a thing (below the
/// root). Keys inside it and the paths to them are checked as in [`validate_thing`].
fn check_at<S: AsRef<str>>(
    segments: &[S],
    value: &Value,
    limits: &Limits,
) -> Result<(), DittoError> {
    let names: Vec<&str> = segments.iter().map(AsRef::as_ref).collect();
    let len: usize = names.iter().map(|s| pointer_step_len(s)).sum();
    let max = limits.max_path_len;
    // Keys on the way inside a free object (attributes, properties) count like keys in it.
    let free_from = match names.as_slice() {
        ["attributes", ..] => Some(1),
        ["features", _, "properties" | "desiredProperties", ..] => Some(3),
        _ => None,
    };
    if let Some(base) = free_from {
        let mut so_far = 0;
        for (i, name) in names.iter().enumerate() {
            so_far += pointer_step_len(name);
            if i >= base && so_far > max {
                let prefix = segments.get(..=i).unwrap_or(segments);
                return Err(at_position(prefix, &Pointer::ROOT, |at| {
                    DittoError::json_invalid(
                        LimitError::PathTooLong {
                            pointer: at.shown(),
                            limit: max,
                        }
                        .to_string(),
                    )
                }));
            }
        }
    }
    let free = |at: &Pointer<'_>| match value {
        Value::Object(map) => check_free_object(map, at, len, max),
        _ => Ok(()),
    };
    match names.as_slice() {
        ["policyId"] => at_position(segments, &Pointer::ROOT, |at| check_policy_id(value, at)),
        ["definition"] => at_position(segments, &Pointer::ROOT, |at| check_definition(value, at)),
        ["attributes"] | ["features", _, "properties"] | ["features", _, "desiredProperties"] => {
            at_position(segments, &Pointer::ROOT, |at| {
                object(value, at)?;
                free(at)
            })
        }
        ["attributes", _, ..]
        | ["features", _, "properties", _, ..]
        | ["features", _, "desiredProperties", _, ..] => {
            at_position(segments, &Pointer::ROOT, free)
        }
        ["features"] => at_position(segments, &Pointer::ROOT, |at| {
            object(value, at)?
                .iter()
                .try_for_each(|(id, feature)| check_feature(id, feature, at, max))
        }),
        ["features", id] => {
            let features = Pointer::ROOT.key("features");
            check_feature(id, value, &features, max)
        }
        ["features", _, "definition"] => at_position(segments, &Pointer::ROOT, |at| {
            check_feature_definition(value, at)
        }),
        _ => Err(at_position(segments, &Pointer::ROOT, |at| {
            DittoError::json_invalid(format!("`{}` is not a part of a thing", at.shown()))
        })),
    }
}

/// Checks the document that results from putting `replacement` at `segments` in the valid
/// thing `doc` (`None`: removing it), without building it: one read-only walk of `doc` with the
/// change in place for depth and size, and the shape rules for `replacement` at its position.
/// Missing parents count as the objects [`crate::Entity::apply`] creates.
///
/// The rest of `doc` is taken as valid (it was, when it was stored): only what changes is
/// judged, except for the limits, which are judged on the whole result.
pub fn validate_thing_change<S: AsRef<str>>(
    doc: &Value,
    segments: &[S],
    replacement: Option<&Value>,
    thing_id: &ThingId,
    limits: &Limits,
) -> Result<(), DittoError> {
    validate_thing_change_sized(doc, None, segments, replacement, thing_id, limits)
}

/// [`validate_thing_change`] for a document whose size is known (`doc_size`, as
/// [`serialized_len`] gives it; `Entity::size` keeps it for stored things): the new size is
/// worked out from the path alone — the keys of its levels and the old and new values at it —
/// instead of a walk of the whole document. The members beside the path are then not walked
/// for depth either: they were judged when they were written.
pub fn validate_thing_change_sized<S: AsRef<str>>(
    doc: &Value,
    doc_size: Option<usize>,
    segments: &[S],
    replacement: Option<&Value>,
    thing_id: &ThingId,
    limits: &Limits,
) -> Result<(), DittoError> {
    if segments.is_empty() {
        return match replacement {
            Some(new_doc) => validate_thing(new_doc, thing_id, limits),
            None => Ok(()),
        };
    }
    // Removing a value below the root cannot break the shape nor grow the document.
    let Some(value) = replacement else {
        return Ok(());
    };
    let mut walk = Measure {
        max_depth: limits.max_depth,
    };
    let size = match doc_size {
        None => walk
            .with_change(Some(doc), segments, Some(value), 1, &Pointer::ROOT)
            .map_err(|e| e.for_thing(thing_id))?
            .unwrap_or(0),
        Some(before) => before
            .saturating_sub(chain(doc, segments.iter().map(AsRef::as_ref)))
            .saturating_add(
                walk.chain_with_change(Some(doc), segments, value, 1, &Pointer::ROOT)
                    .map_err(|e| e.for_thing(thing_id))?,
            ),
    };
    if size > limits.max_document_bytes {
        return Err(LimitError::TooLarge {
            size,
            limit: limits.max_document_bytes,
        }
        .for_thing(thing_id));
    }
    check_at(segments, value, limits)
}

/// 400 `things:id.notsettable`: a body names another thing than the command.
pub fn thing_id_not_settable(found: &str, thing_id: &ThingId) -> DittoError {
    DittoError::new(
        400,
        "things:id.notsettable",
        format!(
            "the thingId {:?} in the body is not the thing ID `{thing_id}` of the command",
            cut(found, 300)
        ),
    )
    .with_description("Leave `thingId` out of the body or make it equal to the command's thing ID.")
}

/// Ditto's error codes for one level of a thing: `(notfound, notmodifiable)`.
fn codes(level: Level<'_>) -> (&'static str, &'static str) {
    match level {
        Level::Thing => ("things:thing.notfound", "things:thing.notmodifiable"),
        Level::PolicyId => ("things:policyId.notfound", "things:policyId.notmodifiable"),
        Level::Definition => (
            "things:definition.notfound",
            "things:definition.notmodifiable",
        ),
        Level::Attributes => (
            "things:attributes.notfound",
            "things:attributes.notmodifiable",
        ),
        Level::Attribute(_) => (
            "things:attribute.notfound",
            "things:attribute.notmodifiable",
        ),
        Level::Features => ("things:features.notfound", "things:features.notmodifiable"),
        Level::Feature(_) => ("things:feature.notfound", "things:feature.notmodifiable"),
        Level::FeatureDefinition(_) => (
            "things:feature.definition.notfound",
            "things:feature.definition.notmodifiable",
        ),
        Level::FeatureProperties(_) => (
            "things:feature.properties.notfound",
            "things:feature.properties.notmodifiable",
        ),
        Level::FeatureProperty(..) => (
            "things:feature.property.notfound",
            "things:feature.property.notmodifiable",
        ),
        Level::FeatureDesiredProperties(_) => (
            "things:feature.desiredProperties.notfound",
            "things:feature.desiredProperties.notmodifiable",
        ),
        Level::FeatureDesiredProperty(..) => (
            "things:feature.desiredProperty.notfound",
            "things:feature.desiredProperty.notmodifiable",
        ),
    }
}

/// `/a/b` from decoded segments (`~` written `~0`).
fn json_pointer(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        out.push('/');
        out.push_str(&s.replace('~', "~0"));
    }
    out
}

/// What a level is, in words: "the property `/on` of feature `lamp` of thing `ns:t`".
fn describe(thing_id: &ThingId, level: Level<'_>) -> String {
    match level {
        Level::Thing => format!("the thing `{thing_id}`"),
        Level::PolicyId => format!("the policy ID of thing `{thing_id}`"),
        Level::Definition => format!("the definition of thing `{thing_id}`"),
        Level::Attributes => format!("the attributes of thing `{thing_id}`"),
        Level::Attribute(p) => format!("the attribute `{}` of thing `{thing_id}`", json_pointer(p)),
        Level::Features => format!("the features of thing `{thing_id}`"),
        Level::Feature(f) => format!("the feature `{f}` of thing `{thing_id}`"),
        Level::FeatureDefinition(f) => {
            format!("the definition of feature `{f}` of thing `{thing_id}`")
        }
        Level::FeatureProperties(f) => {
            format!("the properties of feature `{f}` of thing `{thing_id}`")
        }
        Level::FeatureProperty(f, p) => format!(
            "the property `{}` of feature `{f}` of thing `{thing_id}`",
            json_pointer(p)
        ),
        Level::FeatureDesiredProperties(f) => {
            format!("the desired properties of feature `{f}` of thing `{thing_id}`")
        }
        Level::FeatureDesiredProperty(f, p) => format!(
            "the desired property `{}` of feature `{f}` of thing `{thing_id}`",
            json_pointer(p)
        ),
    }
}

/// 404 `things:<level>.notfound` for the level `path` addresses: it does not exist, or the
/// requester may not see it (Ditto does not tell the two apart).
pub fn not_found(thing_id: &ThingId, path: &ThingPath) -> DittoError {
    let level = path.level();
    DittoError::new(
        404,
        codes(level).0,
        format!(
            "{} could not be found or the requester had insufficient permissions to access it",
            describe(thing_id, level)
        ),
    )
    .with_description(
        "Check if the ID of the thing and the path were correct and you have sufficient permissions.",
    )
}

/// 403 `things:<level>.notmodifiable`: the requester may not change `path` (`resource` is the
/// `thing:` resource whose WRITE was missing, e.g. one leaf of a merge).
pub fn not_modifiable(thing_id: &ThingId, path: &ThingPath, resource: &str) -> DittoError {
    let level = path.level();
    DittoError::new(
        403,
        codes(level).1,
        format!(
            "{} could not be modified as the requester had insufficient permissions to modify it (`WRITE` on `thing:{resource}` is required)",
            describe(thing_id, level)
        ),
    )
    .with_description("Check if you have sufficient permissions.")
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

    fn id() -> ThingId {
        ThingId::parse("org.acme:t1").unwrap()
    }

    fn check(doc: Value) -> Result<(), DittoError> {
        validate_thing(&doc, &id(), &Limits::default())
    }

    fn message(doc: Value) -> String {
        let e = check(doc).unwrap_err();
        assert_eq!((e.status, e.error), (400, "things:json.invalid"), "{e}");
        e.message
    }

    /// `{"a":{"a":…}}` with `levels` objects in all.
    fn nested(levels: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "a": v });
        }
        v
    }

    #[test]
    fn a_complete_thing_is_valid() {
        check(json!({
            "thingId": "org.acme:t1",
            "policyId": "org.acme:p",
            "definition": "org.acme:model:1.0.0",
            "attributes": {"location": {"lat": 1.5, "tags": ["a", {"x/y": 1}]}},
            "features": {
                "lamp": {
                    "definition": ["org.acme:lamp:1.0.0", "org.acme:dimmable:2.1-beta"],
                    "properties": {"on": true},
                    "desiredProperties": {"on": false}
                },
                "empty": {}
            }
        }))
        .unwrap();
        check(json!({"thingId": "org.acme:t1"})).unwrap();
    }

    #[test]
    fn wrong_shapes_are_named_by_their_json_pointer() {
        let base = |extra: Value| {
            let mut doc = json!({"thingId": "org.acme:t1"});
            merge_into(&mut doc, extra);
            doc
        };
        assert_eq!(
            message(base(json!({"features": {"lamp": {"properties": 5}}}))),
            "`/features/lamp/properties` must be an object, found a number"
        );
        assert_eq!(
            message(base(json!({"attributes": []}))),
            "`/attributes` must be an object, found an array"
        );
        assert_eq!(
            message(base(json!({"features": {"lamp": 1}}))),
            "`/features/lamp` must be an object, found a number"
        );
        assert_eq!(
            message(base(json!({"features": {"lamp": {"definition": "a:b:c"}}}))),
            "`/features/lamp/definition` must be an array of definitions `namespace:name:version`, found a string"
        );
        assert_eq!(
            message(base(json!({"features": {"lamp": {"definition": ["a:b"]}}}))),
            "`/features/lamp/definition/0` must be a definition `namespace:name:version`, found \"a:b\""
        );
        assert_eq!(
            message(base(json!({"features": {"lamp": {"definition": []}}}))),
            "`/features/lamp/definition` must hold at least one definition"
        );
        assert_eq!(
            message(base(json!({"definition": "x"}))),
            "`/definition` must be a definition `namespace:name:version`, found \"x\""
        );
        assert!(
            message(base(json!({"policyId": "nope"})))
                .starts_with("`/policyId` is not a valid policy ID")
        );
        assert!(message(base(json!({"color": 1}))).starts_with("a thing has no field \"color\""));
        assert!(
            message(base(json!({"features": {"lamp": {"state": {}}}})))
                .starts_with("`/features/lamp` has an unknown field \"state\"")
        );
        assert_eq!(
            message(json!([1])),
            "a thing must be a JSON object, found an array"
        );
        assert_eq!(
            message(json!({})),
            "the thing `org.acme:t1` must keep its `thingId`"
        );
    }

    fn merge_into(doc: &mut Value, extra: Value) {
        crate::merge::merge_patch(doc, &extra);
    }

    #[test]
    fn keys_must_be_usable_as_path_segments() {
        let doc = |attributes: Value| json!({"thingId": "org.acme:t1", "attributes": attributes});
        assert_eq!(
            message(doc(json!({"a": {"b/c": 1}}))),
            "the key \"b/c\" in `/attributes/a` must not contain `/`"
        );
        assert_eq!(
            message(doc(json!({"": 1}))),
            "the key \"\" in `/attributes` must not be empty"
        );
        assert_eq!(
            message(doc(json!({"a\u{1}": 1}))),
            "the key \"a\\u{1}\" in `/attributes` must not contain control characters"
        );
        assert_eq!(
            message(json!({"thingId": "org.acme:t1", "features": {"a/b": {}}})),
            "the key \"a/b\" in `/features` must not contain `/`"
        );
        // Keys inside arrays are not addressable and not checked; `~` is fine everywhere.
        check(doc(json!({"list": [{"a/b": 1}], "t~x": {"~": 1}}))).unwrap();
    }

    #[test]
    fn a_thing_with_another_thing_id_is_refused() {
        let e = check(json!({"thingId": "org.acme:other"})).unwrap_err();
        assert_eq!((e.status, e.error), (400, "things:id.notsettable"));
        assert!(e.message.contains("`org.acme:t1`"), "{e}");
    }

    #[test]
    fn depth_is_counted_in_objects_and_arrays_with_the_document_as_level_one() {
        assert!(check_depth(&json!(1), 0).is_ok());
        assert!(check_depth(&json!({}), 1).is_ok());
        assert!(check_depth(&json!({"a": []}), 1).is_err());
        assert!(check_depth(&nested(32), 32).is_ok());
        assert_eq!(
            check_depth(&nested(33), 32),
            Err(LimitError::TooDeep {
                pointer: format!("/{}", vec!["a"; 32].join("/")),
                limit: 32
            })
        );
        assert!(check_depth(&json!([[[1]]]), 2).is_err());
    }

    #[test]
    fn a_thing_nested_33_levels_deep_is_refused_and_32_is_accepted() {
        // The thing is level 1; `attributes` and the objects nested in it are levels 2, 3, ….
        let ok = json!({"thingId": "org.acme:t1", "attributes": nested(31)});
        check(ok).unwrap();
        let deep = json!({"thingId": "org.acme:t1", "attributes": nested(32)});
        let e = check(deep).unwrap_err();
        assert_eq!((e.status, e.error), (400, "things:json.invalid"));
        assert!(
            e.message.contains("deeper than the limit of 32 levels"),
            "{e}"
        );
    }

    #[test]
    fn a_thing_over_100_kib_is_refused_with_its_size_and_the_limit() {
        let big = json!({"thingId": "org.acme:t1", "attributes": {"blob": "x".repeat(101 * 1024)}});
        let size = serde_json::to_string(&big).unwrap().len();
        let e = check(big).unwrap_err();
        assert_eq!((e.status, e.error), (413, "things:thing.toolarge"));
        assert!(e.message.contains(&format!("{size} bytes")), "{e}");
        assert!(e.message.contains("102400 bytes"), "{e}");
        let fits = json!({"thingId": "org.acme:t1", "attributes": {"blob": "x".repeat(99 * 1024)}});
        check(fits).unwrap();
    }

    #[test]
    fn serialized_len_is_the_length_of_the_compact_json() {
        let controls: String = (0u8..0x20).map(char::from).collect();
        for v in [
            json!(null),
            json!(true),
            json!(false),
            json!({"a": [1, 2.5, "é\"\n"], "b": {"c": true}}),
            json!("\u{1}"),
            json!(controls),
            json!("\\ \u{7f} \u{2028} 😀"),
            json!([0, -1, 9, 10, -10, 99, 100, u64::MAX, i64::MIN, i64::MAX]),
            json!([
                0.1,
                -0.0,
                1e21,
                1.5e-7,
                f64::MAX,
                f64::MIN_POSITIVE,
                123456789.125
            ]),
            json!({"": {}, "k\"ey": [], "x": [[]]}),
        ] {
            assert_eq!(
                serialized_len(&v),
                serde_json::to_string(&v).unwrap().len(),
                "{v}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn serialized_len_agrees_with_serde_json_on_any_value(v in any_json()) {
            proptest::prop_assert_eq!(serialized_len(&v), serde_json::to_vec(&v).unwrap().len());
        }
    }

    /// `doc` with `replacement` put at `segments` as `Entity::apply` does (parents created).
    fn put(doc: &Value, segments: &[&str], replacement: &Value) -> Value {
        let mut out = doc.clone();
        let mut current = &mut out;
        for (i, segment) in segments.iter().enumerate() {
            if !current.is_object() {
                *current = json!({});
            }
            let map = current.as_object_mut().unwrap();
            if i + 1 == segments.len() {
                map.insert((*segment).to_owned(), replacement.clone());
                break;
            }
            current = map.entry(*segment).or_insert(Value::Null);
        }
        out
    }

    fn depth(v: &Value) -> usize {
        match v {
            Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// The longest JSON pointer to a value reachable through objects.
    fn longest_path(v: &Value, here: usize) -> usize {
        match v {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| longest_path(v, here + pointer_step_len(k)))
                .max()
                .unwrap_or(here),
            _ => here,
        }
    }

    proptest::proptest! {
        /// The size a thing entity keeps, updated from the changed path alone, is the size of
        /// its document after any sequence of changes.
        #[test]
        fn a_things_kept_size_follows_every_change(
            changes in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        crate::EventAction::Modified,
                        crate::EventAction::Created,
                        crate::EventAction::Merged,
                        crate::EventAction::Deleted,
                    ]),
                    proptest::sample::select(vec![
                        "/attributes", "/attributes/a", "/attributes/a/bb", "/attributes/new/x",
                        "/features/f/properties/a", "/features/g", "/features/f/properties",
                        "/attributes/a~0b", "",
                    ]),
                    small_json(false),
                ),
                1..12,
            ),
        ) {
            use crate::{Entity, EntityKey, EntityKind, Event, EventAction};
            let key = EntityKey::new(EntityKind::Thing, "org.acme:t1");
            let event = |action, path: &str, value: Option<Value>, revision| Event {
                key: key.clone(),
                action,
                path: path.to_owned(),
                value,
                revision,
                timestamp: policy::Timestamp::from_unix_millis(1),
            };
            let mut entity = Entity::apply(
                None,
                &event(EventAction::Created, "", Some(json!({"thingId": "org.acme:t1",
                    "attributes": {"a": 1}, "features": {"f": {"properties": {"a": [1]}}}})), 1),
            )
            .unwrap()
            .unwrap();
            proptest::prop_assert_eq!(entity.size, Some(serialized_len(&entity.doc)));
            for (i, (action, path, value)) in changes.into_iter().enumerate() {
                let value = (action != EventAction::Deleted).then_some(value);
                let next = event(action, path, value, i as u64 + 2);
                // Refused events (a delete of nothing, a root value that is no object) leave
                // the entity as it was.
                if let Ok(prepared) = entity.prepare(&next)
                    && entity.commit(prepared)
                {
                    proptest::prop_assert_eq!(entity.size, Some(serialized_len(&entity.doc)));
                }
            }
        }
    }

    /// Small JSON; with `bad_keys`, also keys that are not valid path segments.
    fn small_json(bad_keys: bool) -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            (-100i64..100).prop_map(Value::from),
            Just(json!("a:b:1")),
            Just(json!(["a:b:1"])),
            Just(json!("org.acme:p")),
            "[a-z~/\\u{1}]{0,12}".prop_map(Value::from),
        ];
        let keys: Vec<&'static str> = if bad_keys {
            vec!["a", "bb", "properties", "x/y", ""]
        } else {
            vec!["a", "bb", "properties", "c~"]
        };
        leaf.prop_recursive(4, 16, 3, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map(
                    proptest::sample::select(keys.clone()).prop_map(str::to_owned),
                    inner,
                    0..3
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        // About three in four generated base documents are invalid and rejected by
        // `prop_assume!`; the default limit of 1,024 rejects made the test fail now and then.
        #![proptest_config(proptest::prelude::ProptestConfig {
            max_global_rejects: 65_536,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Judging only what changes gives the same answer as judging the whole result.
        #[test]
        fn validating_a_change_agrees_with_validating_its_result(
            attributes in small_json(false),
            properties in small_json(false),
            position in proptest::sample::select(vec![
                "policyId", "definition", "attributes", "attributes/a", "attributes/a/bb",
                "attributes/new/deeper", "features", "features/f", "features/g",
                "features/f/definition", "features/f/properties", "features/f/properties/a",
                "features/g/desiredProperties", "features/g/desiredProperties/a/bb",
            ]),
            replacement in small_json(true),
            slack_bytes in 0usize..120,
            slack_depth in 0usize..3,
            slack_path in 0usize..12,
        ) {
            let doc = json!({
                "thingId": "org.acme:t1",
                "attributes": attributes,
                "features": {"f": {"properties": properties}}
            });
            // Limits just above what the document needs, so that changes cross them.
            let limits = Limits {
                max_document_bytes: serialized_len(&doc) + slack_bytes,
                max_depth: depth(&doc) + slack_depth,
                max_path_len: longest_path(&doc, 0) + slack_path,
            };
            proptest::prop_assume!(validate_thing(&doc, &id(), &limits).is_ok());
            let segments: Vec<&str> = position.split('/').collect();
            let incremental =
                validate_thing_change(&doc, &segments, Some(&replacement), &id(), &limits);
            let full = validate_thing(&put(&doc, &segments, &replacement), &id(), &limits);
            proptest::prop_assert_eq!(&incremental, &full);
            // Knowing the document's size, only the path is walked: the same answer.
            let sized = validate_thing_change_sized(
                &doc,
                Some(serialized_len(&doc)),
                &segments,
                Some(&replacement),
                &id(),
                &limits,
            );
            proptest::prop_assert_eq!(sized, full);
        }
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn paths_longer_than_the_limit_are_refused() {
        let limits = Limits {
            max_path_len: 20,
            ..Limits::default()
        };
        let ok = json!({"thingId": "org.acme:t1", "attributes": {"abcdefgh": 1}}); // /attributes/abcdefgh = 20
        validate_thing(&ok, &id(), &limits).unwrap();
        let long = json!({"thingId": "org.acme:t1", "attributes": {"abcdefgh~": 1}}); // ~ counts as ~0
        let e = validate_thing(&long, &id(), &limits).unwrap_err();
        assert!(
            e.message.contains("longer than the limit of 20 bytes"),
            "{e}"
        );
    }

    #[test]
    fn definitions_have_three_parts() {
        assert!(is_definition("org.acme:lamp:1.0.0-rc_1"));
        for bad in ["a:b", "a:b:c:d", "a::c", "a:b:c d", ""] {
            assert!(!is_definition(bad), "{bad}");
        }
    }

    #[test]
    fn not_found_and_not_modifiable_name_the_level() {
        let path = ThingPath::parse("/features/lamp/properties/a~0b/c").unwrap();
        let e = not_found(&id(), &path);
        assert_eq!(
            (e.status, e.error),
            (404, "things:feature.property.notfound")
        );
        assert_eq!(
            e.message,
            "the property `/a~0b/c` of feature `lamp` of thing `org.acme:t1` could not be found or the requester had insufficient permissions to access it"
        );
        let e = not_modifiable(
            &id(),
            &ThingPath::parse("/attributes").unwrap(),
            "/attributes",
        );
        assert_eq!(
            (e.status, e.error),
            (403, "things:attributes.notmodifiable")
        );
        assert!(e.message.contains("`WRITE` on `thing:/attributes`"), "{e}");
        for (path, code) in [
            ("/", "things:thing.notfound"),
            ("/policyId", "things:policyId.notfound"),
            ("/definition", "things:definition.notfound"),
            ("/attributes/x", "things:attribute.notfound"),
            ("/features", "things:features.notfound"),
            ("/features/f", "things:feature.notfound"),
            (
                "/features/f/definition",
                "things:feature.definition.notfound",
            ),
            (
                "/features/f/properties",
                "things:feature.properties.notfound",
            ),
            (
                "/features/f/desiredProperties",
                "things:feature.desiredProperties.notfound",
            ),
            (
                "/features/f/desiredProperties/x",
                "things:feature.desiredProperty.notfound",
            ),
        ] {
            assert_eq!(
                not_found(&id(), &ThingPath::parse(path).unwrap()).error,
                code
            );
        }
    }
}
