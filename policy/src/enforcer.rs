//! Checks and partial views: the compiled enforcer and its per-subject-set views.
//!
//! [`Enforcer`] is one compiled policy revision, shared by everyone (`Arc`). A connection asks it
//! once for a [`SubjectView`]: the trie's records folded, for that connection's subjects, thing
//! namespace and the current time, into 16 bits per trie node. From then on a check is a walk
//! down the trie along the resource path, reading those bits: no allocation, no lock, and a cost
//! that depends on the path's length, not on the number of entries or subjects.
//!
//! # The decision (DESIGN.md §1, rules 1–5), per permission p
//! Building a view computes, for every trie node n and the view's subjects:
//! - `allowed(n)` (rules 2, 3): the deepest node on the way to n where some subject grants p is
//!   strictly deeper than the deepest where some subject revokes p — so the deepest level
//!   decides, and a revoke at the same level as a grant wins;
//! - `revoked_below(n)`: some subject revokes p strictly below n;
//! - `partial_below(n)`: some subject grants p strictly below n where that same subject does not
//!   also revoke p.
//!
//! A check finds the deepest node on the resource's path. If the path ends at that node,
//! unrestricted (rule 4) is `allowed && !revoked_below` and partial (rule 5) is
//! `allowed || partial_below`. If the path goes on below it, no entry names anything there, so
//! both are `allowed` of that node.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::compile::{self, Edge, NONE, Node, Trie, prefix_of};
use crate::model::{Permission, Permissions, Policy, PolicyId, ResourceKey, ResourceType};
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
    /// Rule 2 holds at this node: the deepest grant on its path is deeper than every revoke.
    pub const ALLOWED: u32 = 0;
    /// Some subject of the set revokes p at this node (used while building the view).
    pub const REVOKE: u32 = 4;
    /// Some subject of the set revokes p strictly below this node.
    pub const REVOKE_BELOW: u32 = 8;
    /// Some subject grants p strictly below this node and does not revoke it at that node.
    pub const PARTIAL_BELOW: u32 = 12;

    #[inline]
    pub fn has(flags: u16, group: u32, permission: super::Permission) -> bool {
        (flags >> (group + permission.index() as u32)) & 1 != 0
    }

    pub fn group(flags: u16, group: u32) -> u16 {
        (flags >> group) & 0xF
    }

    /// Whether every permission of `set` has its bit set in `group`.
    #[inline]
    pub fn all(flags: u16, group: u32, set: super::Permissions) -> bool {
        let want = u16::from(set.bits());
        self::group(flags, group) & want == want
    }

    /// Whether some permission of `set` has its bit set in `group`.
    #[inline]
    pub fn any(flags: u16, group: u32, set: super::Permissions) -> bool {
        self::group(flags, group) & u16::from(set.bits()) != 0
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
        let node_count = trie.nodes.len();
        let mut flags = vec![0u16; node_count];
        let mut partial_here = vec![0u16; node_count];
        // Per node and permission: 1 + depth of the deepest grant / revoke on its path (0: none).
        let mut grant_depth = vec![[0u16; 4]; node_count];
        let mut revoke_depth = vec![[0u16; 4]; node_count];
        let mut depth = vec![0u16; node_count];

        // INVARIANT: a parent's index is smaller than its children's, so one forward pass sees
        // each node's whole path and one backward pass each node's whole subtree.
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
            let parent = node.parent as usize;
            let here = depth.get(parent).map_or(1, |d| d.saturating_add(1));
            let mut grants = grant_depth.get(parent).copied().unwrap_or_default();
            let mut revokes = revoke_depth.get(parent).copied().unwrap_or_default();
            let mut allowed = 0u16;
            for p in Permission::ALL {
                let k = p.index();
                if let (Some(g), Some(r)) = (grants.get_mut(k), revokes.get_mut(k)) {
                    if grant.contains(p) {
                        *g = here;
                    }
                    if revoke.contains(p) {
                        *r = here;
                    }
                    if *g > *r {
                        allowed |= 1 << k;
                    }
                }
            }
            if let (Some(f), Some(ph), Some(d), Some(g), Some(r)) = (
                flags.get_mut(i),
                partial_here.get_mut(i),
                depth.get_mut(i),
                grant_depth.get_mut(i),
                revoke_depth.get_mut(i),
            ) {
                *f = allowed << bits::ALLOWED | u16::from(revoke.bits()) << bits::REVOKE;
                *ph = u16::from(partial.bits());
                *d = here;
                *g = grants;
                *r = revokes;
            }
        }
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
                Some(segment) => self.child(node, segment.as_bytes(), false).unwrap_or(NONE),
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
                        resource: trie
                            .resources
                            .get(n as usize)
                            .cloned()
                            .unwrap_or_else(|| ResourceKey::root(resource.kind())),
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

    #[inline]
    fn edges_of(&self, node: &Node) -> &[Edge] {
        let start = node.first_edge as usize;
        self.trie
            .edges
            .get(start..start + node.edge_count as usize)
            .unwrap_or(&[])
    }

    #[inline]
    fn edge_key(&self, edge: &Edge) -> &[u8] {
        let start = edge.key_start as usize;
        self.trie
            .keys
            .as_bytes()
            .get(start..start + edge.key_len as usize)
            .unwrap_or(&[])
    }

    #[inline]
    fn root(&self, kind: ResourceType) -> u32 {
        self.trie.roots.get(kind.index()).copied().unwrap_or(NONE)
    }

    /// The child of `node` along `segment`. `raw`: the segment is JSON-pointer encoded (`~0`
    /// stands for `~`); otherwise it is a literal key.
    #[inline]
    fn child(&self, node: u32, segment: &[u8], raw: bool) -> Option<u32> {
        let edges = self.edges_of(self.trie.nodes.get(node as usize)?);
        let (len, prefix) = (segment.len(), prefix_of(segment));
        let literal = |e: &Edge| {
            e.key_len as usize == len
                && e.prefix == prefix
                && (len <= 8 || self.edge_key(e) == segment)
        };
        let same = |e: &&Edge| {
            if raw && e.tilde {
                eq_decoded(self.edge_key(e), segment)
            } else {
                literal(e)
            }
        };
        // Edge keys are short and few: compare length and first 8 bytes before anything else.
        if edges.len() <= 16 {
            return edges.iter().find(same).map(|e| e.child);
        }
        let found = edges
            .binary_search_by(|e| self.edge_key(e).cmp(segment))
            .ok()
            .and_then(|i| edges.get(i))
            .filter(same);
        match found {
            Some(e) => Some(e.child),
            None if raw => edges.iter().filter(|e| e.tilde).find(same).map(|e| e.child),
            None => None,
        }
    }
}

fn records_of<'t>(trie: &'t Trie, node: &Node) -> &'t [compile::Record] {
    let start = node.first_record as usize;
    trie.records
        .get(start..start + node.record_count as usize)
        .unwrap_or(&[])
}

/// The first (up to) 8 bytes of `rest` as a little-endian number, zero above its length. `rest`
/// is a suffix of `path`: when it is shorter than 8 bytes, the last 8 bytes of `path` are loaded
/// and shifted instead of copying byte by byte.
#[inline]
fn load8(rest: &[u8], path: &[u8]) -> u64 {
    if let Some(first) = rest.first_chunk::<8>() {
        return u64::from_le_bytes(*first);
    }
    if let Some(last) = path.last_chunk::<8>() {
        return u64::from_le_bytes(*last) >> (8 * (8 - rest.len()));
    }
    prefix_of(rest)
}

/// Whether `key` equals the decoding of `raw` (`~0` → `~`), without allocating.
fn eq_decoded(key: &[u8], raw: &[u8]) -> bool {
    let mut key = key.iter();
    let mut raw = raw.iter().peekable();
    while let Some(&b) = raw.next() {
        if b == b'~' && raw.peek() == Some(&&b'0') {
            raw.next();
        }
        if key.next() != Some(&b) {
            return false;
        }
    }
    key.next().is_none()
}

/// Splits `/`-separated path bytes into non-empty segments with a byte loop: segments are short,
/// and `memchr`'s setup would cost more than it saves.
#[derive(Clone)]
struct Segments<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        loop {
            let end = self
                .rest
                .iter()
                .position(|&b| b == b'/')
                .unwrap_or(self.rest.len());
            let (segment, rest) = self.rest.split_at_checked(end)?;
            self.rest = rest.get(1..).unwrap_or(&[]);
            if !segment.is_empty() {
                return Some(segment);
            }
            if self.rest.is_empty() {
                return None;
            }
        }
    }
}

/// Where a walk down the trie stopped.
#[derive(Clone, Copy)]
struct At {
    /// The node of the resource, or [`NONE`] when the path went on below the deepest node.
    node: u32,
    /// The flags of the deepest node reached.
    flags: u16,
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

    #[inline]
    fn flags(&self, node: u32) -> u16 {
        self.flags.get(node as usize).copied().unwrap_or(0)
    }

    /// Walks from the root of `kind` along `segments` as far as the trie goes. `raw`: segments
    /// are JSON-pointer encoded.
    #[inline]
    fn walk<'a>(
        &self,
        kind: ResourceType,
        segments: impl Iterator<Item = &'a [u8]>,
        raw: bool,
    ) -> At {
        let root = self.enforcer.root(kind);
        let mut at = At {
            node: root,
            flags: self.flags(root),
        };
        if root == NONE {
            return at;
        }
        for segment in segments {
            match self.enforcer.child(at.node, segment, raw) {
                Some(child) => {
                    at = At {
                        node: child,
                        flags: self.flags(child),
                    }
                }
                None => {
                    at.node = NONE;
                    break;
                }
            }
        }
        at
    }

    /// [`SubjectView::walk`] for an encoded path given whole: instead of splitting it first,
    /// each edge label is matched in place against the path (first 8 bytes as one number, then
    /// the rest, then the `/` or end that must follow), so most bytes are read once.
    #[inline]
    fn walk_path(&self, kind: ResourceType, path: &[u8]) -> At {
        let enforcer = &*self.enforcer;
        let root = enforcer.root(kind);
        let mut at = At {
            node: root,
            flags: self.flags(root),
        };
        let mut rest = path;
        while at.node != NONE {
            match rest.split_first() {
                Some((b'/', tail)) => rest = tail,
                Some(_) => {}
                None => break,
            }
            if rest.first() == Some(&b'/') {
                // Empty segments are ignored (rare).
                while let Some((b'/', tail)) = rest.split_first() {
                    rest = tail;
                }
            }
            if rest.is_empty() {
                break;
            }
            let Some(node) = enforcer.trie.nodes.get(at.node as usize) else {
                break;
            };
            let head = load8(rest, path);
            let mut next = None;
            for e in enforcer.edges_of(node) {
                if head & e.mask == e.prefix && !e.tilde {
                    let len = e.key_len as usize;
                    let tail_matches = len <= 8
                        || match rest.get(8..) {
                            Some(second) if len <= 16 => load8(second, path) & e.mask2 == e.prefix2,
                            Some(second) => second.get(..len - 8) == enforcer.edge_key(e).get(8..),
                            None => false,
                        };
                    if tail_matches && matches!(rest.get(len), None | Some(b'/')) {
                        next = Some((e.child, len));
                        break;
                    }
                } else if e.tilde {
                    // Rare: the label holds `~`, so the segment must be decoded to compare.
                    let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                    let segment = rest.get(..end).unwrap_or(&[]);
                    if eq_decoded(enforcer.edge_key(e), segment) {
                        next = Some((e.child, end));
                        break;
                    }
                }
            }
            match next {
                Some((child, consumed)) => {
                    at = At {
                        node: child,
                        flags: self.flags(child),
                    };
                    rest = rest.get(consumed..).unwrap_or(&[]);
                }
                None => at.node = NONE,
            }
        }
        at
    }

    #[inline]
    fn decide(at: At, permission: Permission, mode: Mode) -> bool {
        let allowed = bits::has(at.flags, bits::ALLOWED, permission);
        let exact = at.node != NONE;
        match mode {
            Mode::Unrestricted => {
                allowed && !(exact && bits::has(at.flags, bits::REVOKE_BELOW, permission))
            }
            Mode::Partial => {
                allowed || (exact && bits::has(at.flags, bits::PARTIAL_BELOW, permission))
            }
        }
    }

    /// Checks `permission` on `kind:path`, where `path` is `/`-separated and JSON-pointer encoded
    /// (`~0` is `~`; empty segments are ignored).
    #[inline]
    pub fn check(
        &self,
        kind: ResourceType,
        path: &str,
        permission: Permission,
        mode: Mode,
    ) -> bool {
        let at = self.walk_path(kind, path.as_bytes());
        Self::decide(at, permission, mode)
    }

    /// Like [`SubjectView::check`] with the path already split (e.g. MQTT topic levels); each
    /// segment is JSON-pointer encoded, empty ones are ignored.
    pub fn check_segments<'a>(
        &self,
        kind: ResourceType,
        segments: impl Iterator<Item = &'a str>,
        permission: Permission,
        mode: Mode,
    ) -> bool {
        let segments = segments.filter(|s| !s.is_empty()).map(str::as_bytes);
        Self::decide(self.walk(kind, segments, true), permission, mode)
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

    /// Checks a parsed resource key (its segments are already decoded).
    pub fn check_key(&self, key: &ResourceKey, permission: Permission, mode: Mode) -> bool {
        let at = self.walk(key.kind(), key.segments().map(str::as_bytes), false);
        Self::decide(at, permission, mode)
    }

    /// The part of `value` (the JSON found at `kind:path`) that READ lets this subject set see
    /// (rule 6), or `None` when nothing is visible. [`SubjectView::partial_view_for`] with READ.
    pub fn partial_view(&self, kind: ResourceType, path: &str, value: &Value) -> Option<Value> {
        self.partial_view_for(kind, path, value, Permission::Read.into())
    }

    /// The part of `value` (the JSON found at `kind:path`) on which this subject set holds
    /// *every* permission of `permissions` (Ditto's `buildJsonView` with a permission set), or
    /// `None` when nothing is visible. Rule 6 with "allowed" meaning allowed for each permission
    /// on its own (rule 2): a scalar is kept iff each permission is allowed at its own path; an
    /// object if anything inside it survives, or as `{}` if each permission is allowed at its
    /// level; array elements are judged at the array's path. An empty set holds nowhere, as in
    /// Ditto, so it sees nothing.
    pub fn partial_view_for(
        &self,
        kind: ResourceType,
        path: &str,
        value: &Value,
        permissions: Permissions,
    ) -> Option<Value> {
        if permissions.is_empty() {
            return None;
        }
        let at = self.walk(
            kind,
            Segments {
                rest: path.as_bytes(),
            },
            true,
        );
        self.view_at(at, value, permissions)
    }

    /// A retrieve's answer at the root of `kind`: the partial view, plus the top-level `fields`
    /// of `value` (e.g. `thingId`, `_revision`) whenever this subject set has partial READ on
    /// the root (Ditto's allowlist). [`SubjectView::partial_view_with_fields_for`] with READ.
    pub fn partial_view_with_fields(
        &self,
        kind: ResourceType,
        value: &Value,
        fields: &[&str],
    ) -> Option<Value> {
        self.partial_view_with_fields_for(kind, value, fields, Permission::Read.into())
    }

    /// [`SubjectView::partial_view_for`] at the root of `kind`, plus the top-level `fields` of
    /// `value` whenever this subject set has partial access on the root for every permission
    /// of `permissions`.
    pub fn partial_view_with_fields_for(
        &self,
        kind: ResourceType,
        value: &Value,
        fields: &[&str],
        permissions: Permissions,
    ) -> Option<Value> {
        let view = self.partial_view_for(kind, "", value, permissions);
        if permissions.is_empty()
            || !permissions
                .iter()
                .all(|p| self.check(kind, "", p, Mode::Partial))
        {
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

    /// Rule 6 for a non-empty permission set, from the trie node `at` (or below every named
    /// resource when `at.node` is [`NONE`]).
    fn view_at(&self, at: At, value: &Value, permissions: Permissions) -> Option<Value> {
        let allowed = bits::all(at.flags, bits::ALLOWED, permissions);
        if at.node == NONE {
            // Below every resource the policy names: the decision is the same for the subtree.
            return allowed.then(|| value.clone());
        }
        if allowed && !bits::any(at.flags, bits::REVOKE_BELOW, permissions) {
            return Some(value.clone());
        }
        // A permission that is neither allowed here nor granted below (without a revoke at the
        // same node) is allowed nowhere in this subtree: nothing can be kept.
        let possible =
            bits::group(at.flags, bits::ALLOWED) | bits::group(at.flags, bits::PARTIAL_BELOW);
        let want = u16::from(permissions.bits());
        if possible & want != want {
            return None;
        }
        match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (key, v) in map {
                    // JSON keys are literal: no decoding.
                    let child = match self.enforcer.child(at.node, key.as_bytes(), false) {
                        Some(node) => At {
                            node,
                            flags: self.flags(node),
                        },
                        None => At {
                            node: NONE,
                            flags: at.flags,
                        },
                    };
                    if let Some(kept) = self.view_at(child, v, permissions) {
                        out.insert(key.clone(), kept);
                    }
                }
                (allowed || !out.is_empty()).then_some(Value::Object(out))
            }
            // Array elements are judged at the array's own node.
            Value::Array(items) => {
                let out: Vec<Value> = items
                    .iter()
                    .filter_map(|v| self.view_at(at, v, permissions))
                    .collect();
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
