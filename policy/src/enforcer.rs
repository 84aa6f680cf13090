//! Checks and partial views: the compiled enforcer and its per-subject-set views.
//!
//! [`Enforcer`] is one compiled policy revision, shared by everyone (`Arc`). A connection asks it
//! once for a [`SubjectView`]: the trie's records folded, for that connection's subjects, thing
//! namespace and the current time, into 16 bits per trie node. From then on a check is a walk
//! down the trie along the resource path, reading those bits: no allocation, no lock, and a cost
//! that depends on the path's length, not on the number of entries or subjects.
//!
//! # The decision (DESIGN.md §1, rules 1–5), per permission p
//! Along the walk we remember the depth of the deepest node where some subject of the set grants
//! p (`grant`) and where some subject revokes p (`revoke`):
//! - `allowed` (rule 2, 3): `grant > revoke`, so the deepest level decides and a revoke at the
//!   same level as a grant wins;
//! - unrestricted (rule 4): `allowed` and no subject revokes p anywhere below the resource;
//! - partial (rule 5): `allowed`, or some subject grants p somewhere below the resource where that
//!   same subject does not also revoke p.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::compile::{self, Edge, NONE, Node, Trie};
use crate::model::{
    Permission, Permissions, Policy, PolicyId, ResourceKey, ResourceType, raw_segments,
};
use crate::timestamp::Timestamp;

/// Which check a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// For changes and live messages: granted here and revoked nowhere below.
    Unrestricted,
    /// For retrieves and event deliveries: granted here, or somewhere below.
    Partial,
}

/// Bit layout of a view's per-node flags: four groups of four bits, one bit per permission
/// (in [`Permission::index`] order).
mod bits {
    /// Some subject of the set grants p at this node.
    pub const GRANT: u32 = 0;
    /// Some subject of the set revokes p at this node.
    pub const REVOKE: u32 = 4;
    /// Some subject of the set revokes p strictly below this node.
    pub const REVOKE_BELOW: u32 = 8;
    /// Some subject grants p strictly below this node and does not revoke it at that node.
    pub const PARTIAL_BELOW: u32 = 12;

    pub fn has(flags: u16, group: u32, permission: super::Permission) -> bool {
        (flags >> (group + permission.index() as u32)) & 1 != 0
    }

    pub fn group(flags: u16, group: u32) -> u16 {
        (flags >> group) & 0xF
    }
}

/// One compiled policy revision.
#[derive(Debug)]
pub struct Enforcer {
    policy_id: Option<PolicyId>,
    revision: Option<u64>,
    trie: Trie,
}

impl Enforcer {
    /// Compiles a policy's own entries (its imports contribute nothing).
    pub fn compile(policy: &Policy) -> Self {
        Enforcer::compile_with_imports(policy, &[])
    }

    /// Compiles a policy with the policies it imports (see [`crate::effective_entries`]).
    pub fn compile_with_imports(policy: &Policy, imported: &[&Policy]) -> Self {
        Enforcer {
            policy_id: policy.policy_id.clone(),
            revision: policy.revision,
            trie: compile::compile(policy, imported),
        }
    }

    pub fn policy_id(&self) -> Option<&PolicyId> {
        self.policy_id.as_ref()
    }

    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// The view of this policy for one subject set, as a connection keeps it.
    ///
    /// `namespace` is the namespace of the thing the checks are about (entries restricted to
    /// other namespaces are ignored; `None` ignores every restricted entry). Subjects whose
    /// `expiry` is at or before `now` match nothing; [`SubjectView::valid_until`] says when the
    /// next one expires, after which the view must be rebuilt.
    pub fn for_subjects<S: AsRef<str>>(
        self: &Arc<Self>,
        subjects: &[S],
        namespace: Option<&str>,
        now: Timestamp,
    ) -> SubjectView {
        let trie = &self.trie;
        let mut member = vec![false; trie.subject_names.len()];
        for subject in subjects {
            if let Some(&i) = trie.subjects.get(subject.as_ref())
                && let Some(m) = member.get_mut(i as usize)
            {
                *m = true;
            }
        }
        let applies: Vec<bool> = trie
            .entries
            .iter()
            .map(|e| e.applies_to(namespace))
            .collect();
        let mut valid_until: Option<Timestamp> = None;
        let mut flags = vec![0u16; trie.nodes.len()];
        let mut partial_here = vec![0u16; trie.nodes.len()];

        for (i, node) in trie.nodes.iter().enumerate() {
            let mut grant = Permissions::NONE;
            let mut revoke = Permissions::NONE;
            let mut partial = Permissions::NONE;
            for group in records_of(trie, node).chunk_by(|a, b| a.subject == b.subject) {
                let Some(first) = group.first() else { continue };
                if !member.get(first.subject as usize).copied().unwrap_or(false) {
                    continue;
                }
                let mut subject_grant = Permissions::NONE;
                let mut subject_revoke = Permissions::NONE;
                for record in group {
                    if !applies.get(record.entry as usize).copied().unwrap_or(false) {
                        continue;
                    }
                    if let Some(expiry) = record.expiry {
                        if now >= expiry {
                            continue;
                        }
                        valid_until = Some(valid_until.map_or(expiry, |v| v.min(expiry)));
                    }
                    subject_grant = subject_grant.union(record.effects.grant);
                    subject_revoke = subject_revoke.union(record.effects.revoke);
                }
                grant = grant.union(subject_grant);
                revoke = revoke.union(subject_revoke);
                partial = partial.union(subject_grant.minus(subject_revoke));
            }
            if let (Some(f), Some(p)) = (flags.get_mut(i), partial_here.get_mut(i)) {
                *f = u16::from(grant.bits()) << bits::GRANT
                    | u16::from(revoke.bits()) << bits::REVOKE;
                *p = u16::from(partial.bits());
            }
        }
        // Children have larger indices than their parents: one backward pass aggregates subtrees.
        for (i, node) in trie.nodes.iter().enumerate().rev() {
            let (Some(&f), Some(&p)) = (flags.get(i), partial_here.get(i)) else {
                continue;
            };
            let revoke_below = bits::group(f, bits::REVOKE) | bits::group(f, bits::REVOKE_BELOW);
            let partial_below = p | bits::group(f, bits::PARTIAL_BELOW);
            if let Some(parent) = flags.get_mut(node.parent as usize) {
                *parent |=
                    revoke_below << bits::REVOKE_BELOW | partial_below << bits::PARTIAL_BELOW;
            }
        }
        SubjectView {
            enforcer: Arc::clone(self),
            flags: flags.into_boxed_slice(),
            valid_until,
        }
    }

    /// Explains a decision: which entries and levels grant or revoke `permission` at or above the
    /// resource, which do below it, and which were ignored (namespace, expiry). For error messages
    /// and the CLI; it allocates.
    pub fn explain<S: AsRef<str>>(
        self: &Arc<Self>,
        subjects: &[S],
        namespace: Option<&str>,
        now: Timestamp,
        resource: &ResourceKey,
        permission: Permission,
    ) -> Explanation {
        let view = self.for_subjects(subjects, namespace, now);
        let trie = &self.trie;
        let mut explanation = Explanation {
            resource: resource.clone(),
            permission,
            subjects: subjects.iter().map(|s| s.as_ref().to_owned()).collect(),
            unrestricted: view.check_key(resource, permission, Mode::Unrestricted),
            partial: view.check_key(resource, permission, Mode::Partial),
            contributions: Vec::new(),
            ignored: Vec::new(),
        };
        let asked = |subject: u32| {
            trie.subject_names
                .get(subject as usize)
                .is_some_and(|name| subjects.iter().any(|s| s.as_ref() == &**name))
        };
        let mut on_path = Vec::new();
        let mut node = trie
            .roots
            .get(resource.kind().index())
            .copied()
            .unwrap_or(NONE);
        let mut segments = resource.segments();
        while node != NONE {
            on_path.push(node);
            node = match segments.next() {
                Some(segment) => self.child(node, segment, false).unwrap_or(NONE),
                None => break,
            };
        }
        let reached = segments.next().is_none() && node != NONE;
        let mut below = Vec::new();
        if reached {
            let mut stack = vec![node];
            while let Some(n) = stack.pop() {
                if n != node {
                    below.push(n);
                }
                if let Some(nd) = trie.nodes.get(n as usize) {
                    stack.extend(self.edges_of(nd).iter().map(|e| e.child));
                }
            }
        }
        for (place, nodes) in [(Place::AtOrAbove, &on_path), (Place::Below, &below)] {
            for &n in nodes.iter() {
                let Some(nd) = trie.nodes.get(n as usize) else {
                    continue;
                };
                for record in records_of(trie, nd).iter().filter(|r| asked(r.subject)) {
                    let effect = if record.effects.revoke.contains(permission) {
                        Effect::Revoke
                    } else if record.effects.grant.contains(permission) {
                        Effect::Grant
                    } else {
                        continue;
                    };
                    let entry = trie.entries.get(record.entry as usize);
                    let label = entry.map_or_else(String::new, |e| e.label.clone());
                    let subject = trie
                        .subject_names
                        .get(record.subject as usize)
                        .map_or_else(String::new, |s| s.to_string());
                    if !entry.is_some_and(|e| e.applies_to(namespace)) {
                        explanation
                            .ignored
                            .push(Ignored::Namespace { entry: label });
                        continue;
                    }
                    if let Some(expiry) = record.expiry.filter(|&e| now >= e) {
                        explanation.ignored.push(Ignored::Expired {
                            entry: label,
                            subject,
                            expiry,
                        });
                        continue;
                    }
                    explanation.contributions.push(Contribution {
                        effect,
                        place,
                        resource: nd.resource.clone(),
                        subject,
                        entry: label,
                    });
                    if effect == Effect::Revoke
                        && record.effects.grant.contains(permission)
                        && let Some(last) = explanation.contributions.last_mut()
                    {
                        last.effect = Effect::GrantAndRevoke;
                    }
                }
            }
        }
        explanation.ignored.dedup();
        explanation
    }

    fn edges_of(&self, node: &Node) -> &[Edge] {
        let start = node.first_edge as usize;
        self.trie
            .edges
            .get(start..start + node.edge_count as usize)
            .unwrap_or(&[])
    }

    fn edge_key(&self, edge: &Edge) -> &str {
        let start = edge.key_start as usize;
        self.trie
            .keys
            .get(start..start + edge.key_len as usize)
            .unwrap_or("")
    }

    /// The child of `node` along `segment`. `raw`: the segment still has to be decoded (`~0`).
    fn child(&self, node: u32, segment: &str, raw: bool) -> Option<u32> {
        let edges = self.edges_of(self.trie.nodes.get(node as usize)?);
        if raw && segment.contains('~') {
            return edges
                .iter()
                .find(|e| eq_decoded(self.edge_key(e), segment))
                .map(|e| e.child);
        }
        edges
            .binary_search_by(|e| self.edge_key(e).as_bytes().cmp(segment.as_bytes()))
            .ok()
            .and_then(|i| edges.get(i))
            .map(|e| e.child)
    }
}

fn records_of<'t>(trie: &'t Trie, node: &Node) -> &'t [compile::Record] {
    let start = node.first_record as usize;
    trie.records
        .get(start..start + node.record_count as usize)
        .unwrap_or(&[])
}

/// Whether `key` equals the decoding of `raw` (`~0` → `~`), without allocating.
fn eq_decoded(key: &str, raw: &str) -> bool {
    let mut key = key.bytes();
    let mut raw = raw.bytes().peekable();
    while let Some(b) = raw.next() {
        let decoded = if b == b'~' && raw.peek() == Some(&b'0') {
            raw.next();
            b'~'
        } else {
            b
        };
        if key.next() != Some(decoded) {
            return false;
        }
    }
    key.next().is_none()
}

/// Where a walk ended and what it saw on the way.
#[derive(Clone, Copy)]
struct Walk {
    /// The node of the resource, or [`NONE`] when the path leaves the trie.
    node: u32,
    /// 1 + depth of the deepest granting node on the path, 0 if none.
    grant: u32,
    /// 1 + depth of the deepest revoking node on the path, 0 if none.
    revoke: u32,
    depth: u32,
}

impl Walk {
    fn allowed(self) -> bool {
        self.grant > self.revoke
    }
}

/// A policy as seen by one subject set, in one namespace, at one time. Cheap to keep per
/// connection; every check through it is allocation-free.
#[derive(Debug, Clone)]
pub struct SubjectView {
    enforcer: Arc<Enforcer>,
    /// Per trie node, the [`bits`] of this subject set.
    flags: Box<[u16]>,
    valid_until: Option<Timestamp>,
}

impl SubjectView {
    pub fn enforcer(&self) -> &Arc<Enforcer> {
        &self.enforcer
    }

    /// When the next matched subject expires; the view is wrong from then on.
    pub fn valid_until(&self) -> Option<Timestamp> {
        self.valid_until
    }

    pub fn is_valid_at(&self, now: Timestamp) -> bool {
        self.valid_until.is_none_or(|t| now < t)
    }

    fn flags(&self, node: u32) -> u16 {
        self.flags.get(node as usize).copied().unwrap_or(0)
    }

    fn start(&self, kind: ResourceType, permission: Permission) -> Walk {
        let root = self
            .enforcer
            .trie
            .roots
            .get(kind.index())
            .copied()
            .unwrap_or(NONE);
        let walk = Walk {
            node: root,
            grant: 0,
            revoke: 0,
            depth: 0,
        };
        if root == NONE {
            walk
        } else {
            self.enter(walk, root, permission)
        }
    }

    /// Moves the walk onto `node` (one level deeper than where it was, or the root).
    fn enter(&self, mut walk: Walk, node: u32, permission: Permission) -> Walk {
        let flags = self.flags(node);
        walk.node = node;
        walk.depth += 1;
        if bits::has(flags, bits::GRANT, permission) {
            walk.grant = walk.depth;
        }
        if bits::has(flags, bits::REVOKE, permission) {
            walk.revoke = walk.depth;
        }
        walk
    }

    fn step(&self, walk: Walk, segment: &str, raw: bool, permission: Permission) -> Walk {
        if walk.node == NONE {
            return walk;
        }
        match self.enforcer.child(walk.node, segment, raw) {
            Some(child) => self.enter(walk, child, permission),
            None => Walk { node: NONE, ..walk },
        }
    }

    fn walk<'a>(
        &self,
        kind: ResourceType,
        segments: impl Iterator<Item = &'a str>,
        raw: bool,
        permission: Permission,
    ) -> Walk {
        let mut walk = self.start(kind, permission);
        for segment in segments.filter(|s| !s.is_empty()) {
            if walk.node == NONE {
                break;
            }
            walk = self.step(walk, segment, raw, permission);
        }
        walk
    }

    fn decide(&self, walk: Walk, permission: Permission, mode: Mode) -> bool {
        let below =
            |group| walk.node != NONE && bits::has(self.flags(walk.node), group, permission);
        match mode {
            Mode::Unrestricted => walk.allowed() && !below(bits::REVOKE_BELOW),
            Mode::Partial => walk.allowed() || below(bits::PARTIAL_BELOW),
        }
    }

    /// Checks `permission` on `kind:path`, where `path` is `/`-separated and JSON-pointer encoded
    /// (`~0` is `~`; empty segments are ignored).
    pub fn check(
        &self,
        kind: ResourceType,
        path: &str,
        permission: Permission,
        mode: Mode,
    ) -> bool {
        self.check_segments(kind, raw_segments(path), permission, mode)
    }

    /// Like [`SubjectView::check`] with the path already split (e.g. MQTT topic levels).
    pub fn check_segments<'a>(
        &self,
        kind: ResourceType,
        segments: impl Iterator<Item = &'a str>,
        permission: Permission,
        mode: Mode,
    ) -> bool {
        let walk = self.walk(kind, segments, true, permission);
        self.decide(walk, permission, mode)
    }

    /// Checks a resource written as `type:path` (`thing:/features/x`). An unknown type is denied.
    pub fn check_resource(&self, resource: &str, permission: Permission, mode: Mode) -> bool {
        let Some((kind, path)) = resource.split_once(':') else {
            return false;
        };
        let Some(kind) = ResourceType::parse(kind) else {
            return false;
        };
        self.check(kind, path, permission, mode)
    }

    /// Checks a parsed resource key.
    pub fn check_key(&self, key: &ResourceKey, permission: Permission, mode: Mode) -> bool {
        let walk = self.walk(key.kind(), key.segments(), false, permission);
        self.decide(walk, permission, mode)
    }

    /// The part of `value` (the JSON found at `kind:path`) that READ lets this subject set see
    /// (rule 6), or `None` when nothing is visible.
    pub fn partial_view(&self, kind: ResourceType, path: &str, value: &Value) -> Option<Value> {
        let walk = self.walk(kind, raw_segments(path), true, Permission::Read);
        self.view_at(walk, value)
    }

    /// A retrieve's answer at the root of `kind`: the partial view, plus the top-level `fields`
    /// of `value` (e.g. `thingId`, `_revision`) whenever this subject set has partial READ on
    /// the root (Ditto's allowlist).
    pub fn partial_view_with_fields(
        &self,
        kind: ResourceType,
        value: &Value,
        fields: &[&str],
    ) -> Option<Value> {
        let view = self.partial_view(kind, "", value);
        if !self.check(kind, "", Permission::Read, Mode::Partial) {
            return view;
        }
        let Some(source) = value.as_object() else {
            return view;
        };
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

    fn view_at(&self, walk: Walk, value: &Value) -> Option<Value> {
        let allowed = walk.allowed();
        if walk.node == NONE {
            // Below every resource the policy names: the decision is the same for the subtree.
            return allowed.then(|| value.clone());
        }
        let flags = self.flags(walk.node);
        if allowed && !bits::has(flags, bits::REVOKE_BELOW, Permission::Read) {
            return Some(value.clone());
        }
        if !allowed && !bits::has(flags, bits::PARTIAL_BELOW, Permission::Read) {
            return None;
        }
        match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (key, v) in map {
                    let child = self.step(walk, key, false, Permission::Read);
                    if let Some(kept) = self.view_at(child, v) {
                        out.insert(key.clone(), kept);
                    }
                }
                (allowed || !out.is_empty()).then_some(Value::Object(out))
            }
            // Array elements are judged at the array's own node.
            Value::Array(items) => {
                let out: Vec<Value> = items.iter().filter_map(|v| self.view_at(walk, v)).collect();
                (allowed || !out.is_empty()).then_some(Value::Array(out))
            }
            scalar => allowed.then(|| scalar.clone()),
        }
    }
}

/// How a record relates to the permission asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Grant,
    Revoke,
    /// Granted and revoked by the same record: the revoke wins.
    GrantAndRevoke,
}

/// Where a record sits relative to the resource asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    AtOrAbove,
    Below,
}

/// One grant or revoke that took part in a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contribution {
    pub effect: Effect,
    pub place: Place,
    pub resource: ResourceKey,
    pub subject: String,
    pub entry: String,
}

/// A record that matched a subject but was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// The entry's `namespaces` do not match the thing's namespace.
    Namespace { entry: String },
    Expired {
        entry: String,
        subject: String,
        expiry: Timestamp,
    },
}

/// Why a subject set may or may not do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub resource: ResourceKey,
    pub permission: Permission,
    pub subjects: Vec<String>,
    pub unrestricted: bool,
    pub partial: bool,
    pub contributions: Vec<Contribution>,
    pub ignored: Vec<Ignored>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = |b: bool| if b { "granted" } else { "denied" };
        writeln!(
            f,
            "{} on {} for [{}]: unrestricted {}, partial {}",
            self.permission,
            self.resource,
            self.subjects.join(", "),
            word(self.unrestricted),
            word(self.partial)
        )?;
        if self.contributions.is_empty() {
            writeln!(
                f,
                "  no entry grants or revokes {} for these subjects here",
                self.permission
            )?;
        }
        for c in &self.contributions {
            let effect = match c.effect {
                Effect::Grant => "grant ",
                Effect::Revoke => "revoke",
                Effect::GrantAndRevoke => "grant+revoke (revoke wins)",
            };
            let place = match c.place {
                Place::AtOrAbove => "",
                Place::Below => " (below)",
            };
            writeln!(
                f,
                "  {effect} {}{place} by {} in entry `{}` (level {})",
                c.resource,
                c.subject,
                c.entry,
                c.resource.depth()
            )?;
        }
        for i in &self.ignored {
            match i {
                Ignored::Namespace { entry } => writeln!(
                    f,
                    "  ignored: entry `{entry}` (its namespaces do not match the thing's)"
                )?,
                Ignored::Expired {
                    entry,
                    subject,
                    expiry,
                } => writeln!(
                    f,
                    "  ignored: {subject} in entry `{entry}` expired at {expiry}"
                )?,
            }
        }
        Ok(())
    }
}
