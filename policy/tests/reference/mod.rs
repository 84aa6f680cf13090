//! A naive reference evaluator of DESIGN.md §1, rules 1–8 (and the expiry rule of rule 9).
//!
//! Written to be obviously right, not fast: there is no trie, no index and no precomputation.
//! Every check walks every entry, every subject and every resource of the policy, keeps the
//! grants and revokes that are in force for the question, and then reads each rule off that list
//! almost word for word. The compiled enforcer is differentially tested against it
//! (`tests/differential.rs`).
//!
//! Paths are lists of *decoded* segments (`~0` already turned into `~`), so a segment of a
//! resource key (`ResourceKey::segments`, decoded by the model) and a key of a JSON object
//! (literal) compare as plain strings.

use policy::model::NamespacePattern;
use policy::{
    Mode, Permission, Permissions, Policy, PolicyEntry, ResourceKey, ResourceType, Timestamp,
};
use serde_json::{Map, Value};

/// Splits a raw check path as rule 7 says: at `/`, ignoring empty segments, decoding `~0` to `~`
/// (and nothing else).
pub fn decode_path(raw: &str) -> Vec<String> {
    raw.split('/')
        .filter(|segment| !segment.is_empty())
        .map(|segment| segment.replace("~0", "~"))
        .collect()
}

/// One question: a policy, asked about by a set of subjects S, for a thing in `namespace`, at
/// `now`.
#[derive(Debug, Clone, Copy)]
pub struct Reference<'q> {
    pub policy: &'q Policy,
    pub subjects: &'q [String],
    pub namespace: Option<&'q str>,
    pub now: Timestamp,
}

/// One grant/revoke list of one resource, held by one subject of S in one entry, in force for
/// this question.
#[derive(Debug)]
struct Statement<'p> {
    subject: &'p str,
    resource: &'p ResourceKey,
    grant: Permissions,
    revoke: Permissions,
}

/// Rule 1: a statement applies to its own resource and everything below it. Types never cover
/// each other (rule 7), and segments compare whole.
fn is_at_or_above(resource: &ResourceKey, kind: ResourceType, path: &[String]) -> bool {
    resource.kind() == kind
        && resource.segments().count() <= path.len()
        && resource
            .segments()
            .zip(path)
            .all(|(theirs, ours)| theirs == ours)
}

/// Whether `resource` lies strictly inside the subtree of `kind:path`.
fn is_strictly_below(resource: &ResourceKey, kind: ResourceType, path: &[String]) -> bool {
    resource.kind() == kind
        && resource.segments().count() > path.len()
        && resource
            .segments()
            .zip(path)
            .all(|(theirs, ours)| theirs == ours)
}

/// Rules 2 and 3, among the statements in force.
fn allowed_among(
    statements: &[Statement],
    kind: ResourceType,
    path: &[String],
    permission: Permission,
) -> bool {
    let at_or_above: Vec<&Statement> = statements
        .iter()
        .filter(|s| is_at_or_above(s.resource, kind, path))
        .collect();
    let depth = |s: &&Statement| s.resource.segments().count();
    let deepest_grant = at_or_above
        .iter()
        .filter(|s| s.grant.contains(permission))
        .map(depth)
        .max();
    let deepest_revoke = at_or_above
        .iter()
        .filter(|s| s.revoke.contains(permission))
        .map(depth)
        .max();
    match (deepest_grant, deepest_revoke) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(grant), Some(revoke)) => grant > revoke,
    }
}

/// Rule 8: an entry without namespace patterns (or with an empty list) applies everywhere; one
/// with patterns applies only to a thing whose namespace matches one of them (`a.b` exactly,
/// `a.b.*` strictly below `a.b`), so never to a question without a thing namespace.
fn entry_applies(entry: &PolicyEntry, namespace: Option<&str>) -> bool {
    let patterns = match &entry.namespaces {
        None => return true,
        Some(patterns) if patterns.is_empty() => return true,
        Some(patterns) => patterns,
    };
    let Some(namespace) = namespace else {
        return false;
    };
    patterns
        .iter()
        .any(|pattern| pattern_matches(pattern, namespace))
}

fn pattern_matches(pattern: &NamespacePattern, namespace: &str) -> bool {
    let text = pattern.to_string();
    match text.strip_suffix(".*") {
        Some(base) => {
            namespace.len() > base.len() + 1 && namespace.starts_with(&format!("{base}."))
        }
        None => namespace == text,
    }
}

/// Rule 9 (our difference from Ditto): a subject is in force strictly before its expiry.
fn is_active(expiry: Option<Timestamp>, now: Timestamp) -> bool {
    match expiry {
        None => true,
        Some(expiry) => now < expiry,
    }
}

impl<'q> Reference<'q> {
    /// Every grant/revoke in force for this question: every entry that applies to the
    /// namespace, every subject of that entry that is in S and not expired, every resource.
    /// (Entries without subjects or resources contribute nothing, as rule 7 wants.)
    fn statements(&self) -> Vec<Statement<'q>> {
        let mut out = Vec::new();
        for entry in self.policy.entries.values() {
            if !entry_applies(entry, self.namespace) {
                continue;
            }
            for (subject, details) in &entry.subjects {
                let in_s = self.subjects.iter().any(|s| s == subject.as_str());
                if !in_s || !is_active(details.expiry, self.now) {
                    continue;
                }
                for (resource, effects) in &entry.resources {
                    out.push(Statement {
                        subject: subject.as_str(),
                        resource,
                        grant: effects.grant,
                        revoke: effects.revoke,
                    });
                }
            }
        }
        out
    }

    /// Rules 2 and 3: allowed iff the deepest grant at or above is strictly deeper than the
    /// deepest revoke at or above (no grant: denied; same level: the revoke wins).
    pub fn allowed(&self, kind: ResourceType, path: &[String], permission: Permission) -> bool {
        allowed_among(&self.statements(), kind, path, permission)
    }

    /// Rules 4 and 5.
    pub fn check(
        &self,
        kind: ResourceType,
        path: &[String],
        permission: Permission,
        mode: Mode,
    ) -> bool {
        let statements = self.statements();
        let allowed = allowed_among(&statements, kind, path, permission);
        let below = || {
            statements
                .iter()
                .filter(|s| is_strictly_below(s.resource, kind, path))
        };
        match mode {
            // Rule 4: allowed here, and no subject of S revokes anywhere below.
            Mode::Unrestricted => allowed && !below().any(|s| s.revoke.contains(permission)),
            // Rule 5: allowed here, or some subject of S grants below, at a resource where that
            // same subject does not also revoke (in any entry in force).
            Mode::Partial => {
                allowed
                    || below().any(|granting| {
                        granting.grant.contains(permission)
                            && !statements.iter().any(|revoking| {
                                revoking.subject == granting.subject
                                    && revoking.resource == granting.resource
                                    && revoking.revoke.contains(permission)
                            })
                    })
            }
        }
    }

    /// Rule 6 for a set of permissions: whether S holds each of them at `kind:path` (rules 2
    /// and 3, each permission on its own). An empty set holds nowhere.
    fn allowed_all(&self, kind: ResourceType, path: &[String], permissions: Permissions) -> bool {
        !permissions.is_empty() && permissions.iter().all(|p| self.allowed(kind, path, p))
    }

    /// Rule 6: the part of `value` (found at `kind:path`) on which S holds every permission of
    /// `permissions` (READ alone for retrieves and events).
    pub fn partial_view(
        &self,
        kind: ResourceType,
        path: &[String],
        value: &Value,
        permissions: Permissions,
    ) -> Option<Value> {
        let allowed = self.allowed_all(kind, path, permissions);
        match value {
            // An object is kept if anything inside survives, or as `{}` if the set holds here.
            Value::Object(map) => {
                let mut kept = Map::new();
                for (key, inner) in map {
                    let mut inner_path = path.to_vec();
                    inner_path.push(key.clone());
                    if let Some(seen) = self.partial_view(kind, &inner_path, inner, permissions) {
                        kept.insert(key.clone(), seen);
                    }
                }
                (allowed || !kept.is_empty()).then_some(Value::Object(kept))
            }
            // Array elements are judged at the array's own path. Rule 6 does not say when the
            // array itself is kept; we read it as a container like an object: if an element
            // survives, or as `[]` if the set holds here.
            Value::Array(items) => {
                let kept: Vec<Value> = items
                    .iter()
                    .filter_map(|item| self.partial_view(kind, path, item, permissions))
                    .collect();
                (allowed || !kept.is_empty()).then_some(Value::Array(kept))
            }
            // A scalar (null included) is kept iff the set holds at its own path.
            scalar => allowed.then(|| scalar.clone()),
        }
    }

    /// Rule 6, last sentence: a retrieve at the root also returns the listed top-level `fields`
    /// when S has partial access on the root for every permission of the (non-empty) set.
    pub fn partial_view_with_fields(
        &self,
        kind: ResourceType,
        value: &Value,
        fields: &[&str],
        permissions: Permissions,
    ) -> Option<Value> {
        let view = self.partial_view(kind, &[], value, permissions);
        let Some(source) = value.as_object() else {
            return view;
        };
        let partial_on_root = !permissions.is_empty()
            && permissions
                .iter()
                .all(|p| self.check(kind, &[], p, Mode::Partial));
        if !partial_on_root {
            return view;
        }
        let mut out = match view {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        for field in fields {
            if let Some(v) = source.get(*field) {
                out.insert((*field).to_owned(), v.clone());
            }
        }
        Some(Value::Object(out))
    }
}
