//! The policy model: Eclipse Ditto's policy JSON as Rust types.
//!
//! Every type here is valid by construction: the constructors (`parse`) refuse what Ditto would
//! refuse, and [`crate::json`] builds a [`Policy`] only through them, so the compiler and the
//! enforcer never re-validate.

use std::collections::BTreeMap;
use std::fmt;

use indexmap::IndexMap;
use serde_json::Value;

use crate::timestamp::Timestamp;

/// The longest entity ID (`namespace:name`) we accept, as in Ditto.
pub const MAX_ID_LEN: usize = 256;

/// One permission. Permissions are always checked one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    Read,
    Write,
    /// Policy actions (e.g. activating token-based subjects).
    Execute,
    /// Creating things and policies (solution policies).
    Create,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::Read,
        Permission::Write,
        Permission::Execute,
        Permission::Create,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "READ",
            Permission::Write => "WRITE",
            Permission::Execute => "EXECUTE",
            Permission::Create => "CREATE",
        }
    }

    /// Parses the exact (upper-case) spelling used in policy JSON.
    pub fn parse(text: &str) -> Option<Self> {
        Permission::ALL.into_iter().find(|p| p.as_str() == text)
    }

    /// Position in [`Permission::ALL`]; used to index per-permission tables.
    pub(crate) const fn index(self) -> usize {
        match self {
            Permission::Read => 0,
            Permission::Write => 1,
            Permission::Execute => 2,
            Permission::Create => 3,
        }
    }

    const fn bit(self) -> u8 {
        1 << self.index()
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions (a `grant` or `revoke` list; duplicates collapse), or the permissions a
/// partial view asks for together ([`crate::SubjectView::partial_view_for`]).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Permissions(u8);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);

    pub const fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn insert(&mut self, p: Permission) {
        self.0 |= p.bit();
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// The permissions in `self` that are not in `other`.
    pub const fn minus(self, other: Permissions) -> Permissions {
        Permissions(self.0 & !other.0)
    }

    /// One bit per permission, in [`Permission::ALL`] order.
    pub(crate) const fn bits(self) -> u8 {
        self.0
    }

    /// The permissions in the canonical order READ, WRITE, EXECUTE, CREATE.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |p| self.contains(*p))
    }
}

impl From<Permission> for Permissions {
    fn from(p: Permission) -> Self {
        Permissions(p.bit())
    }
}

impl FromIterator<Permission> for Permissions {
    fn from_iter<I: IntoIterator<Item = Permission>>(iter: I) -> Self {
        let mut set = Permissions::NONE;
        for p in iter {
            set.insert(p);
        }
        set
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// What a resource key's type names: the first level of the resource tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Thing,
    Policy,
    Message,
    Solution,
    /// Plain MQTT topics of a solution (solution policies only).
    Topic,
}

impl ResourceType {
    pub const ALL: [ResourceType; 5] = [
        ResourceType::Thing,
        ResourceType::Policy,
        ResourceType::Message,
        ResourceType::Solution,
        ResourceType::Topic,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ResourceType::Thing => "thing",
            ResourceType::Policy => "policy",
            ResourceType::Message => "message",
            ResourceType::Solution => "solution",
            ResourceType::Topic => "topic",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "thing" => Some(ResourceType::Thing),
            "policy" => Some(ResourceType::Policy),
            "message" => Some(ResourceType::Message),
            "solution" => Some(ResourceType::Solution),
            "topic" => Some(ResourceType::Topic),
            _ => None,
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            ResourceType::Thing => 0,
            ResourceType::Policy => 1,
            ResourceType::Message => 2,
            ResourceType::Solution => 3,
            ResourceType::Topic => 4,
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a resource key (`thing:/features/x`) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceKeyError {
    #[error("resource `{0}` has no type (expected `type:/path`, e.g. `thing:/features`)")]
    MissingType(String),
    #[error(
        "resource `{key}` has unknown type `{kind}` (expected thing, policy, message, solution or topic)"
    )]
    UnknownType { key: String, kind: String },
    #[error("resource `{0}` contains a control character")]
    ControlCharacter(String),
}

/// Decodes one raw path segment: `~0` becomes `~` (Ditto decodes nothing else, not even `~1`).
pub(crate) fn decode_segment(raw: &str) -> std::borrow::Cow<'_, str> {
    if raw.contains("~0") {
        std::borrow::Cow::Owned(raw.replace("~0", "~"))
    } else {
        std::borrow::Cow::Borrowed(raw)
    }
}

/// Iterates the non-empty raw segments of a `/`-separated path (`//a/` is `a`).
pub(crate) fn raw_segments(path: &str) -> impl Iterator<Item = &str> + Clone {
    path.split('/').filter(|s| !s.is_empty())
}

/// A resource in a policy: type and path, e.g. `thing:/features/lamp`.
///
/// Normalized: `thing:` and `thing:/` are both the root; empty segments are dropped; each segment
/// is stored decoded (`~0` → `~`). Two keys that normalize alike are the same resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    kind: ResourceType,
    /// Decoded segments, each prefixed with `/`; empty for the root.
    path: String,
}

impl ResourceKey {
    /// Parses `type:path`, splitting at the first `:`.
    pub fn parse(text: &str) -> Result<Self, ResourceKeyError> {
        if text.chars().any(char::is_control) {
            return Err(ResourceKeyError::ControlCharacter(text.to_owned()));
        }
        let Some((kind, path)) = text.split_once(':') else {
            return Err(ResourceKeyError::MissingType(text.to_owned()));
        };
        if kind.is_empty() {
            return Err(ResourceKeyError::MissingType(text.to_owned()));
        }
        let kind = ResourceType::parse(kind).ok_or_else(|| ResourceKeyError::UnknownType {
            key: text.to_owned(),
            kind: kind.to_owned(),
        })?;
        Ok(ResourceKey::new(kind, raw_segments(path)))
    }

    /// Builds a key from raw (still encoded) segments.
    pub fn new<'a>(kind: ResourceType, raw: impl IntoIterator<Item = &'a str>) -> Self {
        let mut path = String::new();
        for segment in raw.into_iter().filter(|s| !s.is_empty()) {
            path.push('/');
            path.push_str(&decode_segment(segment));
        }
        ResourceKey { kind, path }
    }

    /// Builds a key from segments that are already decoded (taken from another key).
    pub(crate) fn from_decoded<'a>(
        kind: ResourceType,
        decoded: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut path = String::new();
        for segment in decoded {
            path.push('/');
            path.push_str(segment);
        }
        ResourceKey { kind, path }
    }

    pub fn root(kind: ResourceType) -> Self {
        ResourceKey {
            kind,
            path: String::new(),
        }
    }

    pub fn kind(&self) -> ResourceType {
        self.kind
    }

    /// The decoded segments, root first.
    pub fn segments(&self) -> impl Iterator<Item = &str> + Clone {
        raw_segments(&self.path)
    }

    /// The number of segments (0 for the root).
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// Whether `self` is `other` or one of its ancestors.
    pub fn covers(&self, other: &ResourceKey) -> bool {
        self.kind == other.kind && {
            let mut theirs = other.segments();
            self.segments().all(|s| theirs.next() == Some(s))
        }
    }
}

impl fmt::Display for ResourceKey {
    /// The canonical spelling: `thing:/` for the root, `~` written as `~0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.kind)?;
        if self.path.is_empty() {
            return f.write_str("/");
        }
        for segment in self.segments() {
            write!(f, "/{}", segment.replace('~', "~0"))?;
        }
        Ok(())
    }
}

/// Why an ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("`{0}` is not of the form `namespace:name`")]
    NoSeparator(String),
    #[error(
        "namespace `{0}` is invalid (expected dot-separated parts that start with a letter and hold only letters, digits and `_`, e.g. `org.acme`)"
    )]
    BadNamespace(String),
    #[error(
        "name `{0}` is invalid (it must not be empty nor contain `/`, `+`, `#` or control characters)"
    )]
    BadName(String),
    #[error("ID `{0}…` is longer than {MAX_ID_LEN} characters")]
    TooLong(String),
    #[error(
        "subject `{0}` is invalid (expected `issuer:subject`, both parts non-empty, no control characters)"
    )]
    BadSubject(String),
    #[error("label `{0}` is invalid (it must not be empty nor contain `/` or control characters)")]
    BadLabel(String),
    #[error(
        "namespace pattern `{0}` is invalid (expected a namespace such as `org.acme`, or `org.acme.*` for every namespace below it)"
    )]
    BadNamespacePattern(String),
}

/// Whether `ns` is a valid namespace: `a.b.c`, each part `[A-Za-z][A-Za-z0-9_]*`.
pub fn is_valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.split('.').all(|part| {
            let mut chars = part.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic())
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Whether `name` is a valid entity name: non-empty, no `/`, `+`, `#` or control characters.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c == '/' || c == '+' || c == '#' || c.is_control())
}

/// Splits and validates an entity ID `namespace:name` (things and policies share the rules).
pub fn split_entity_id(id: &str) -> Result<(&str, &str), IdError> {
    if id.chars().count() > MAX_ID_LEN {
        return Err(IdError::TooLong(id.chars().take(32).collect()));
    }
    let (ns, name) = id
        .split_once(':')
        .ok_or_else(|| IdError::NoSeparator(id.to_owned()))?;
    if !is_valid_namespace(ns) {
        return Err(IdError::BadNamespace(ns.to_owned()));
    }
    if !is_valid_name(name) {
        return Err(IdError::BadName(name.to_owned()));
    }
    Ok((ns, name))
}

/// A policy ID, `namespace:name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId(String);

impl PolicyId {
    pub fn parse(text: &str) -> Result<Self, IdError> {
        split_entity_id(text)?;
        Ok(PolicyId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once(':').map_or("", |(ns, _)| ns)
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subject ID as it appears in a policy, `issuer:subject` (e.g. `google:1234`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectId(String);

impl SubjectId {
    pub fn parse(text: &str) -> Result<Self, IdError> {
        match text.split_once(':') {
            Some((issuer, subject))
                if !issuer.is_empty()
                    && !subject.is_empty()
                    && !text.chars().any(char::is_control) =>
            {
                Ok(SubjectId(text.to_owned()))
            }
            _ => Err(IdError::BadSubject(text.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The label of a policy entry (`owner`, `DEFAULT`, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    pub fn parse(text: &str) -> Result<Self, IdError> {
        if text.is_empty() || text.chars().any(|c| c == '/' || c.is_control()) {
            return Err(IdError::BadLabel(text.to_owned()));
        }
        Ok(Label(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An entry's namespace restriction: `a.b` matches exactly `a.b`; `a.b.*` every namespace strictly
/// below `a.b` (`a.b.c`, `a.b.c.d`), not `a.b` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamespacePattern {
    Exact(String),
    Below(String),
}

impl NamespacePattern {
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let pattern = match text.strip_suffix(".*") {
            Some(base) => NamespacePattern::Below(base.to_owned()),
            None => NamespacePattern::Exact(text.to_owned()),
        };
        let base = match &pattern {
            NamespacePattern::Exact(b) | NamespacePattern::Below(b) => b,
        };
        if !is_valid_namespace(base) {
            return Err(IdError::BadNamespacePattern(text.to_owned()));
        }
        Ok(pattern)
    }

    pub fn matches(&self, namespace: &str) -> bool {
        match self {
            NamespacePattern::Exact(ns) => namespace == ns,
            NamespacePattern::Below(base) => namespace
                .strip_prefix(base.as_str())
                .and_then(|rest| rest.strip_prefix('.'))
                .is_some_and(|rest| !rest.is_empty()),
        }
    }
}

impl fmt::Display for NamespacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamespacePattern::Exact(ns) => f.write_str(ns),
            NamespacePattern::Below(base) => write!(f, "{base}.*"),
        }
    }
}

/// A subject of an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    /// Free-text description of what the subject is (`type` in JSON).
    pub kind: String,
    /// After this instant the subject matches nothing (Ditto deletes it; we ignore it at once).
    pub expiry: Option<Timestamp>,
    /// Ditto's announcement settings, kept as given so a policy round-trips.
    pub announcement: Option<Value>,
}

/// A resource's `grant` and `revoke` lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects {
    pub grant: Permissions,
    pub revoke: Permissions,
}

/// Whether other policies may import an entry (Ditto's `importable`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Importable {
    /// Imported by every policy that imports this one (the default).
    #[default]
    Implicit,
    /// Imported only where the import lists the entry's label.
    Explicit,
    /// Never imported.
    Never,
}

impl Importable {
    pub const fn as_str(self) -> &'static str {
        match self {
            Importable::Implicit => "implicit",
            Importable::Explicit => "explicit",
            Importable::Never => "never",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "implicit" => Some(Importable::Implicit),
            "explicit" => Some(Importable::Explicit),
            "never" => Some(Importable::Never),
            _ => None,
        }
    }
}

/// One entry: who (subjects) may do what (resources), optionally only in some namespaces.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyEntry {
    pub subjects: IndexMap<SubjectId, Subject>,
    pub resources: IndexMap<ResourceKey, Effects>,
    /// `None`: the entry applies to every namespace.
    pub namespaces: Option<Vec<NamespacePattern>>,
    pub importable: Importable,
}

impl PolicyEntry {
    /// Whether the entry applies to a thing in `namespace` (`None`: no thing, e.g. a solution
    /// policy's `topic:` check; only unrestricted entries apply).
    pub fn applies_to(&self, namespace: Option<&str>) -> bool {
        namespaces_apply(self.namespaces.as_deref(), namespace)
    }
}

/// Rule 8: an entry with namespace patterns applies only to things in a matching namespace; with
/// no patterns (or an empty list) it applies everywhere.
pub(crate) fn namespaces_apply(
    patterns: Option<&[NamespacePattern]>,
    namespace: Option<&str>,
) -> bool {
    match (patterns, namespace) {
        (None, _) => true,
        (Some([]), _) => true,
        (Some(patterns), Some(ns)) => patterns.iter().any(|p| p.matches(ns)),
        (Some(_), None) => false,
    }
}

/// An import of another policy's entries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyImport {
    /// Labels of `explicit` entries to import (`implicit` ones come without being listed).
    pub entries: Vec<Label>,
}

/// A policy, as in Eclipse Ditto.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// Absent in a policy body that gets its ID from elsewhere (a URL, a solution).
    pub policy_id: Option<PolicyId>,
    pub imports: IndexMap<PolicyId, PolicyImport>,
    pub entries: IndexMap<Label, PolicyEntry>,
    pub revision: Option<u64>,
    /// Other `_`-prefixed fields (`_created`, `_modified`, `_metadata`, …), kept as given.
    pub metadata: BTreeMap<String, Value>,
}
