//! Solutions (tenants, DESIGN.md §1): their stored form, the in-memory [`Solutions`] registry,
//! and authentication with a solution secret or an API token.
//!
//! # Stored form
//! One entity of kind [`EntityKind::Solution`] per solution, keyed by its [`SolutionId`]:
//! ```json
//! {"solutionId": "acme",
//!  "apiTokenDigest": "<sha-256, 64 lowercase hex digits>",
//!  "secrets": [{"id": "s1", "digest": "<sha-256>", "created": "2026-01-31T12:00:00Z"},
//!              {"id": "s2", "digest": "<sha-256>", "created": "…", "revoked": true}],
//!  "namespaces": ["org.acme"],
//!  "policy": {"entries": {…}}}
//! ```
//! Secrets and the API token are never stored, only their digests ([`super::secret`]). Revoked
//! secrets stay listed (marked `revoked`) so their IDs are never reused and a client that still
//! presents one is told apart from one that presents garbage (in logs and metrics only). Each
//! change writes the one field it changes (`/secrets`, `/namespaces`, `/policy`), so fields a
//! later version adds (connections, clients, usage) survive this version's writes.
//!
//! # Rules
//! - **IDs**: 2 to 63 characters `[a-z0-9-]`, starting with a letter or digit (a lowercase UUID
//!   is one). Generated IDs are `s-<8 hex digits>`.
//! - **Namespaces are exclusive**: a namespace (`org.acme`) belongs to at most one solution;
//!   ownership is by exact name (owning `org.acme` does not own `org.acme.fleet`, which is
//!   listed on its own).
//! - **The solution policy is stored without `policyId`.** DESIGN.md §1 names it
//!   `<solutionId>:solution`, but a solution ID may contain `-`, which a policy ID's namespace
//!   may not; the policy is found through its solution, so it is stored and shown without
//!   `policyId`. A policy document given for it ([`parse_solution_policy`]) may name it by
//!   that documented ID, or by none; any other ID is refused, naming the expected one.
//! - **Lockout**: a solution policy must keep a permanent subject (no `expiry`) that on its own
//!   has unrestricted WRITE on `solution:/`, the resource that says who administers the
//!   solution and may change this policy. `policy::check_lockout` asks the same of `policy:/`,
//!   which is right for thing policies but would refuse the default solution policy (it grants
//!   only CREATE on `policy:/`), so solution policies are checked on `solution:/` instead.
//!   Solution policies may not `import` other policies (nothing would resolve the imports).
//! - **Default policy** of a new solution ([`default_policy`]): subject `iot-things:<id>` may
//!   READ and WRITE `topic:/`, CREATE on `thing:/` and `policy:/`, READ and WRITE
//!   `solution:/`; nothing else.
//!
//! # Concurrency
//! [`Solutions`] is read-mostly: lookups take a read lock on an in-memory index (by ID, by
//! API-token digest, by namespace). Changes take the write lock for the check (e.g. namespace
//! exclusivity, which spans solutions) and the store write together, so two changes cannot both
//! pass the check; every write of solutions must go through one `Solutions` per store. Changes
//! wait for durability ([`twin::store::Durable::wait`]) and therefore block: from async code,
//! call them in `spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use policy::{Policy, PolicyJsonError, ResourceType, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use twin::store::{StoreError, TwinStore, TwinStoreExt, WriteError};
use twin::{Entity, EntityKey, EntityKind, Event, EventAction};

use super::Subjects;
use super::secret::{Digest, RandomError, Secret, hex, random_bytes, verify_digest};
use crate::bridge::config::ConnectionDoc;

/// The issuer part of the subjects of clients that authenticated with a solution secret.
pub const SECRET_SUBJECT_ISSUER: &str = "iot-things";

/// A solution's ID: 2 to 63 characters `[a-z0-9-]`, the first not `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SolutionId(String);

impl SolutionId {
    pub fn parse(text: &str) -> Result<Self, SolutionError> {
        let mut chars = text.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if first_ok && rest_ok && (2..=63).contains(&text.len()) {
            Ok(SolutionId(text.to_owned()))
        } else {
            Err(SolutionError::BadId(text.to_owned()))
        }
    }

    /// A new random ID, `s-<8 hex digits>`.
    pub fn generate() -> Result<Self, RandomError> {
        Ok(SolutionId(format!("s-{}", hex(&random_bytes::<4>()?))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `iot-things:<id>`: every client that authenticated with a secret of this solution.
    pub fn subject(&self) -> String {
        format!("{SECRET_SUBJECT_ISSUER}:{}", self.0)
    }
}

impl fmt::Display for SolutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SolutionId {
    type Error = SolutionError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        SolutionId::parse(&text)
    }
}

impl From<SolutionId> for String {
    fn from(id: SolutionId) -> Self {
        id.0
    }
}

/// What can go wrong managing solutions. Messages are meant for operators.
#[derive(Debug, thiserror::Error)]
pub enum SolutionError {
    #[error(
        "solution ID `{0}` is invalid (expected 2 to 63 lowercase letters, digits and `-`, not starting with `-`, e.g. `acme-prod` or a lowercase UUID)"
    )]
    BadId(String),
    #[error(
        "namespace `{0}` is invalid (expected dot-separated parts that start with a letter and hold only letters, digits and `_`, e.g. `org.acme`)"
    )]
    BadNamespace(String),
    #[error("solution `{0}` already exists")]
    Exists(SolutionId),
    #[error("there is no solution `{0}`")]
    NotFound(String),
    #[error(
        "namespace `{namespace}` is already owned by solution `{owner}` (a namespace belongs to one solution only)"
    )]
    NamespaceTaken {
        namespace: String,
        owner: SolutionId,
    },
    #[error("solution `{solution}` has no secret `{secret_id}`")]
    NoSuchSecret {
        solution: SolutionId,
        secret_id: String,
    },
    #[error("invalid solution policy: {0}")]
    Policy(#[from] PolicyJsonError),
    #[error(
        "a solution policy has no `policyId` (it is found through its solution): remove `\"policyId\": \"{0}\"`"
    )]
    PolicyHasId(String),
    #[error(
        "the policy of solution `{solution}` is `{solution}:solution` (or has no `policyId`), not `{found}`"
    )]
    PolicyIdMismatch { solution: SolutionId, found: String },
    #[error("invalid solution policy: not JSON: {0}")]
    PolicyNotJson(String),
    #[error("a solution policy cannot import other policies (found `imports`)")]
    PolicyHasImports,
    #[error(
        "the solution policy would lock everyone out: no permanent subject (one without `expiry`) keeps unrestricted WRITE on `solution:/`"
    )]
    Lockout,
    #[error("invalid connection: {0}")]
    Connection(#[from] crate::bridge::config::ConfigError),
    #[error("solution `{solution}` has no connection `{id}`")]
    NoSuchConnection { solution: SolutionId, id: String },
    #[error("solution `{solution}` already has a connection `{id}`")]
    ConnectionExists { solution: SolutionId, id: String },
    #[error("solution `{0}` has as many connections as allowed ({max})", max = crate::bridge::config::MAX_CONNECTIONS)]
    TooManyConnections(SolutionId),
    #[error("stored solution `{id}` is malformed: {reason}")]
    Corrupt { id: String, reason: String },
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<WriteError<SolutionError>> for SolutionError {
    fn from(e: WriteError<SolutionError>) -> Self {
        match e {
            WriteError::Rejected(e) => e,
            WriteError::Store(e) => SolutionError::Store(e),
        }
    }
}

/// Why a connection's solution credentials were refused. Said in logs and metrics only: the
/// client is told "not authorized" whatever the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    #[error("unknown solution")]
    UnknownSolution,
    #[error("wrong solution secret")]
    WrongSecret,
    #[error("revoked solution secret")]
    RevokedSecret,
}

impl AuthRefusal {
    /// A short label for metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthRefusal::UnknownSolution => "unknown_solution",
            AuthRefusal::WrongSecret => "wrong_secret",
            AuthRefusal::RevokedSecret => "revoked_secret",
        }
    }
}

/// One solution secret, as stored: its digest, never its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// `s1`, `s2`, …: what an operator names to revoke it (never reused).
    pub id: String,
    pub digest: Digest,
    #[serde(with = "rfc3339")]
    pub created: Timestamp,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

/// A solution as the broker uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub id: SolutionId,
    pub api_token_digest: Digest,
    pub secrets: Vec<SecretRecord>,
    /// Namespaces it owns, in the order they were added (no duplicates).
    pub namespaces: Vec<String>,
    /// The solution policy (without `policyId`, see the module docs).
    pub policy: Policy,
    /// Its connections to external brokers (bridges, DESIGN.md §5), by ID.
    pub connections: Vec<ConnectionDoc>,
}

/// The stored document, field for field.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredSolution {
    solution_id: SolutionId,
    api_token_digest: Digest,
    secrets: Vec<SecretRecord>,
    namespaces: Vec<String>,
    policy: Value,
    #[serde(default)]
    connections: Vec<ConnectionDoc>,
}

impl Solution {
    /// Reads a stored document.
    pub fn from_doc(doc: &Value) -> Result<Self, SolutionError> {
        let corrupt = |reason: String| SolutionError::Corrupt {
            id: doc
                .get("solutionId")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned(),
            reason,
        };
        let stored: StoredSolution =
            StoredSolution::deserialize(doc).map_err(|e| corrupt(e.to_string()))?;
        let policy =
            policy::policy_from_value(&stored.policy).map_err(|e| corrupt(e.to_string()))?;
        Ok(Solution {
            id: stored.solution_id,
            api_token_digest: stored.api_token_digest,
            secrets: stored.secrets,
            namespaces: stored.namespaces,
            policy,
            connections: stored.connections,
        })
    }

    /// The stored document.
    pub fn to_doc(&self) -> Result<Value, SolutionError> {
        let stored = StoredSolution {
            solution_id: self.id.clone(),
            api_token_digest: self.api_token_digest,
            secrets: self.secrets.clone(),
            namespaces: self.namespaces.clone(),
            policy: policy::policy_to_value(&self.policy),
            connections: self.connections.clone(),
        };
        serde_json::to_value(stored).map_err(|e| self.corrupt(e))
    }

    fn corrupt(&self, e: impl fmt::Display) -> SolutionError {
        SolutionError::Corrupt {
            id: self.id.to_string(),
            reason: e.to_string(),
        }
    }

    /// How many secrets can still authenticate.
    pub fn active_secrets(&self) -> usize {
        self.secrets.iter().filter(|s| !s.revoked).count()
    }

    /// The ID the next secret gets: one more than the highest `s<n>` so far.
    fn next_secret_id(&self) -> String {
        let highest = self
            .secrets
            .iter()
            .filter_map(|s| s.id.strip_prefix('s')?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        format!("s{}", highest.saturating_add(1))
    }
}

mod rfc3339 {
    use policy::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(t)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// The policy of a new solution: `iot-things:<id>` may READ and WRITE `topic:/`, CREATE on
/// `thing:/` and `policy:/`, READ and WRITE `solution:/`; nothing else.
pub fn default_policy(id: &SolutionId) -> Result<Policy, SolutionError> {
    let mut subjects = serde_json::Map::new();
    subjects.insert(
        id.subject(),
        json!({"type": "every client authenticated with a secret of this solution"}),
    );
    let value = json!({"entries": {"solution": {
        "subjects": subjects,
        "resources": {
            "topic:/": {"grant": ["READ", "WRITE"], "revoke": []},
            "thing:/": {"grant": ["CREATE"], "revoke": []},
            "policy:/": {"grant": ["CREATE"], "revoke": []},
            "solution:/": {"grant": ["READ", "WRITE"], "revoke": []},
        },
    }}});
    Ok(policy::policy_from_value(&value)?)
}

/// One sentence saying what [`default_policy`] grants, for the output of `solution create`.
pub fn default_policy_summary(id: &SolutionId) -> String {
    format!(
        "default solution policy: subject `{}` (every client that authenticates with a secret of this solution) may READ and WRITE `topic:/`, CREATE on `thing:/` and `policy:/`, READ and WRITE `solution:/` (administer the solution); nothing else",
        id.subject()
    )
}

/// Reads a policy document given for solution `id`'s policy: its `policyId`, if it has one,
/// must be the documented `<solutionId>:solution` (DESIGN.md §1) and is dropped (see the module
/// docs); then the policy as any other.
pub fn parse_solution_policy(id: &SolutionId, text: &str) -> Result<Policy, SolutionError> {
    let mut value: Value =
        serde_json::from_str(text).map_err(|e| SolutionError::PolicyNotJson(e.to_string()))?;
    if let Some(object) = value.as_object_mut()
        && let Some(named) = object.remove("policyId")
    {
        let documented = format!("{id}:solution");
        if named.as_str() != Some(documented.as_str()) {
            return Err(SolutionError::PolicyIdMismatch {
                solution: id.clone(),
                found: match named {
                    Value::String(text) => text,
                    other => other.to_string(),
                },
            });
        }
    }
    Ok(policy::policy_from_value(&value)?)
}

/// Accepts a solution policy only without `policyId`, without imports, and with a permanent
/// subject that keeps unrestricted WRITE on `solution:/` (see the module docs).
pub fn check_solution_policy(policy: &Policy) -> Result<(), SolutionError> {
    if let Some(id) = &policy.policy_id {
        return Err(SolutionError::PolicyHasId(id.to_string()));
    }
    if !policy.imports.is_empty() {
        return Err(SolutionError::PolicyHasImports);
    }
    policy::check_lockout_on(policy, ResourceType::Solution).map_err(|_| SolutionError::Lockout)
}

/// What `create` hands back: the credentials, shown to the operator once.
#[derive(Debug)]
pub struct Created {
    pub solution_id: SolutionId,
    pub api_token: Secret,
    pub secret_id: String,
    pub secret: Secret,
}

/// A new secret, shown to the operator once.
#[derive(Debug)]
pub struct NewSecret {
    pub secret_id: String,
    pub secret: Secret,
}

/// The outcome of revoking a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// It had been revoked before (nothing changed).
    pub already: bool,
    /// Secrets that can still authenticate.
    pub active_left: usize,
}

/// The in-memory index of every solution, loaded from the store and kept up to date by the
/// changes made through it.
#[derive(Debug, Default)]
pub struct Solutions {
    index: RwLock<Index>,
}

#[derive(Debug, Default)]
struct Index {
    by_id: BTreeMap<SolutionId, Arc<Solution>>,
    /// API-token digest → solution (a lookup is confirmed in constant time).
    by_token: HashMap<Digest, SolutionId>,
    /// Namespace → the one solution that owns it.
    by_namespace: HashMap<String, SolutionId>,
}

impl Index {
    fn insert(&mut self, solution: Solution) {
        if let Some(old) = self.by_id.remove(&solution.id) {
            self.by_token.remove(&old.api_token_digest);
            for ns in &old.namespaces {
                self.by_namespace.remove(ns);
            }
        }
        self.by_token
            .insert(solution.api_token_digest, solution.id.clone());
        for ns in &solution.namespaces {
            self.by_namespace.insert(ns.clone(), solution.id.clone());
        }
        self.by_id.insert(solution.id.clone(), Arc::new(solution));
    }

    fn check_namespace_free(&self, ns: &str, for_id: &SolutionId) -> Result<(), SolutionError> {
        match self.by_namespace.get(ns) {
            Some(owner) if owner != for_id => Err(SolutionError::NamespaceTaken {
                namespace: ns.to_owned(),
                owner: owner.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn solution(&self, id: &SolutionId) -> Result<Arc<Solution>, SolutionError> {
        self.by_id
            .get(id)
            .cloned()
            .ok_or_else(|| SolutionError::NotFound(id.to_string()))
    }
}

fn validate_namespace(ns: &str) -> Result<(), SolutionError> {
    if policy::model::is_valid_namespace(ns) {
        Ok(())
    } else {
        Err(SolutionError::BadNamespace(ns.to_owned()))
    }
}

fn key_of(id: &SolutionId) -> EntityKey {
    EntityKey::new(EntityKind::Solution, id.as_str())
}

/// The event that creates a solution, if it does not exist yet.
fn create_events(
    key: &EntityKey,
    current: Option<&Entity>,
    doc: Value,
    now: Timestamp,
) -> Result<Vec<Event>, SolutionError> {
    if current.is_some() {
        return Err(SolutionError::Exists(SolutionId(key.id.clone())));
    }
    Ok(vec![Event {
        key: key.clone(),
        action: EventAction::Created,
        path: String::new(),
        value: Some(doc),
        revision: 1,
        timestamp: now,
    }])
}

/// The event that sets one top-level field of an existing solution.
fn set_field_events(
    key: &EntityKey,
    current: Option<&Entity>,
    field: &str,
    value: Value,
    now: Timestamp,
) -> Result<Vec<Event>, SolutionError> {
    let Some(current) = current else {
        return Err(SolutionError::NotFound(key.id.clone()));
    };
    Ok(vec![Event {
        key: key.clone(),
        action: EventAction::Modified,
        path: format!("/{field}"),
        value: Some(value),
        revision: current.revision.saturating_add(1),
        timestamp: now,
    }])
}

impl Solutions {
    /// Loads every stored solution. A malformed one is an error naming it.
    pub fn load(store: &dyn TwinStore) -> Result<Self, SolutionError> {
        let mut index = Index::default();
        for key in store.keys(EntityKind::Solution) {
            if let Some(entity) = store.get(&key) {
                index.insert(Solution::from_doc(&entity.doc)?);
            }
        }
        Ok(Solutions {
            index: RwLock::new(index),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        // The index is only replaced whole-entry under the lock: a panic elsewhere cannot leave
        // it half-changed, so a poisoned lock is still usable.
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Solution>> {
        let id = SolutionId::parse(id).ok()?;
        self.read().by_id.get(&id).cloned()
    }

    /// Takes a solution as another cluster node stored it (its document, as `load` reads it):
    /// the registry's entry is replaced. The solution as it is now.
    pub fn reload(&self, doc: &Value) -> Result<Arc<Solution>, SolutionError> {
        let solution = Solution::from_doc(doc)?;
        let id = solution.id.clone();
        let mut index = self.write();
        index.insert(solution);
        index.solution(&id)
    }

    /// Every solution, ordered by ID.
    pub fn list(&self) -> Vec<Arc<Solution>> {
        self.read().by_id.values().cloned().collect()
    }

    /// The solution that owns `namespace` (exactly), if any.
    pub fn owner_of_namespace(&self, namespace: &str) -> Option<SolutionId> {
        self.read().by_namespace.get(namespace).cloned()
    }

    /// The solution an API token identifies. The token only identifies: it grants nothing.
    pub fn solution_by_api_token(&self, token: &str) -> Option<SolutionId> {
        let digest = Digest::of(token);
        let index = self.read();
        let id = index.by_token.get(&digest)?;
        let solution = index.by_id.get(id)?;
        verify_digest(&digest, &solution.api_token_digest).then(|| id.clone())
    }

    /// Checks a solution secret (MQTT CONNECT user name = solution ID, password = secret) and
    /// gives the connection's subjects: `iot-things:<id>:<client_id>` (unless `client_id` is
    /// empty: assign the client ID first) and `iot-things:<id>`.
    ///
    /// Every stored digest of the solution is compared, in constant time, whatever matches.
    pub fn authenticate_secret(
        &self,
        solution_id: &str,
        secret: &str,
        client_id: &str,
    ) -> Result<Subjects, AuthRefusal> {
        self.check_secret(solution_id, secret, client_id)
            .map(|(subjects, _)| subjects)
    }

    /// [`Solutions::authenticate_secret`], also giving the ID of the secret that matched (a
    /// revocation closes the connections it opened).
    pub fn check_secret(
        &self,
        solution_id: &str,
        secret: &str,
        client_id: &str,
    ) -> Result<(Subjects, String), AuthRefusal> {
        let solution = self.get(solution_id).ok_or(AuthRefusal::UnknownSolution)?;
        let candidate = Digest::of(secret);
        let mut matched: Option<bool> = None;
        let mut secret_id = String::new();
        for record in &solution.secrets {
            if verify_digest(&candidate, &record.digest) {
                matched = Some(record.revoked || matched == Some(true));
                secret_id.clone_from(&record.id);
            }
        }
        match matched {
            None => Err(AuthRefusal::WrongSecret),
            Some(true) => Err(AuthRefusal::RevokedSecret),
            Some(false) => {
                let solution_subject = solution.id.subject();
                let mut subjects = Vec::with_capacity(2);
                if !client_id.is_empty() {
                    subjects.push(format!("{solution_subject}:{client_id}"));
                }
                subjects.push(solution_subject);
                Ok((Subjects::new(subjects), secret_id))
            }
        }
    }

    /// Creates a solution owning `namespaces` (duplicates ignored), with a generated API token,
    /// one generated secret (`s1`) and the [`default_policy`]. `id`: `None` generates one.
    pub fn create(
        &self,
        store: &dyn TwinStore,
        id: Option<SolutionId>,
        namespaces: &[String],
        now: Timestamp,
    ) -> Result<Created, SolutionError> {
        let mut owned: Vec<String> = Vec::with_capacity(namespaces.len());
        for ns in namespaces {
            validate_namespace(ns)?;
            if !owned.contains(ns) {
                owned.push(ns.clone());
            }
        }
        let mut index = self.write();
        let id = match id {
            Some(id) => id,
            None => loop {
                let candidate = SolutionId::generate()?;
                if !index.by_id.contains_key(&candidate) {
                    break candidate;
                }
            },
        };
        if index.by_id.contains_key(&id) {
            return Err(SolutionError::Exists(id));
        }
        for ns in &owned {
            index.check_namespace_free(ns, &id)?;
        }
        let api_token = Secret::generate()?;
        let secret = Secret::generate()?;
        let secret_id = "s1".to_owned();
        let solution = Solution {
            id: id.clone(),
            api_token_digest: api_token.digest(),
            secrets: vec![SecretRecord {
                id: secret_id.clone(),
                digest: secret.digest(),
                created: now,
                revoked: false,
            }],
            namespaces: owned,
            policy: default_policy(&id)?,
            connections: Vec::new(),
        };
        let doc = solution.to_doc()?;
        let key = key_of(&id);
        let written = store.write(&key, |current| create_events(&key, current, doc, now))?;
        index.insert(solution);
        drop(index);
        written.durable.wait()?;
        Ok(Created {
            solution_id: id,
            api_token,
            secret_id,
            secret,
        })
    }

    /// Changes one field of a solution under the write lock: `change` gets the current
    /// solution and returns the changed one (or `None`: nothing to do).
    fn change(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        field: &str,
        now: Timestamp,
        change: impl FnOnce(&Index, &Solution) -> Result<Option<Solution>, SolutionError>,
    ) -> Result<Arc<Solution>, SolutionError> {
        let mut index = self.write();
        let current = index.solution(id)?;
        let Some(changed) = change(&index, &current)? else {
            return Ok(current);
        };
        let doc = changed.to_doc()?;
        let value = doc
            .get(field)
            .cloned()
            .ok_or_else(|| changed.corrupt(format!("no field `{field}`")))?;
        let key = key_of(id);
        let written = store.write(&key, |current| {
            set_field_events(&key, current, field, value, now)
        })?;
        let changed = Arc::new(changed);
        index.insert((*changed).clone());
        drop(index);
        written.durable.wait()?;
        Ok(changed)
    }

    /// Adds a generated secret to a solution.
    pub fn add_secret(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        now: Timestamp,
    ) -> Result<NewSecret, SolutionError> {
        let secret = Secret::generate()?;
        let digest = secret.digest();
        let mut secret_id = String::new();
        self.change(store, id, "secrets", now, |_, current| {
            let mut changed = current.clone();
            secret_id = current.next_secret_id();
            changed.secrets.push(SecretRecord {
                id: secret_id.clone(),
                digest,
                created: now,
                revoked: false,
            });
            Ok(Some(changed))
        })?;
        Ok(NewSecret { secret_id, secret })
    }

    /// Revokes a secret by its ID. Revoking the last active one is allowed (the outcome says
    /// so); revoking a revoked one changes nothing.
    pub fn revoke_secret(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        secret_id: &str,
        now: Timestamp,
    ) -> Result<Revoked, SolutionError> {
        let mut already = false;
        let solution = self.change(store, id, "secrets", now, |_, current| {
            let mut changed = current.clone();
            let record = changed
                .secrets
                .iter_mut()
                .find(|s| s.id == secret_id)
                .ok_or_else(|| SolutionError::NoSuchSecret {
                    solution: id.clone(),
                    secret_id: secret_id.to_owned(),
                })?;
            if record.revoked {
                already = true;
                return Ok(None);
            }
            record.revoked = true;
            Ok(Some(changed))
        })?;
        Ok(Revoked {
            already,
            active_left: solution.active_secrets(),
        })
    }

    /// Adds a namespace to a solution; `false` if it already owned it. A namespace owned by
    /// another solution is refused.
    pub fn add_namespace(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        namespace: &str,
        now: Timestamp,
    ) -> Result<bool, SolutionError> {
        validate_namespace(namespace)?;
        let mut added = false;
        self.change(store, id, "namespaces", now, |index, current| {
            index.check_namespace_free(namespace, id)?;
            if current.namespaces.iter().any(|ns| ns == namespace) {
                return Ok(None);
            }
            let mut changed = current.clone();
            changed.namespaces.push(namespace.to_owned());
            added = true;
            Ok(Some(changed))
        })?;
        Ok(added)
    }

    /// Removes a namespace from a solution; `false` if it did not own it. Its things stay in
    /// the store, out of reach of every solution until a solution adds the namespace again.
    pub fn remove_namespace(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        namespace: &str,
        now: Timestamp,
    ) -> Result<bool, SolutionError> {
        let mut removed = false;
        self.change(store, id, "namespaces", now, |_, current| {
            if !current.namespaces.iter().any(|ns| ns == namespace) {
                return Ok(None);
            }
            let mut changed = current.clone();
            changed.namespaces.retain(|ns| ns != namespace);
            removed = true;
            Ok(Some(changed))
        })?;
        Ok(removed)
    }

    /// Creates or replaces connection `doc.id` of a solution (`create_only`: an existing one is
    /// a conflict), after checking it ([`ConnectionDoc::compile`]); a document showing the
    /// password as `***` keeps the stored one. `true` if it was created.
    pub fn put_connection(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        mut doc: ConnectionDoc,
        create_only: bool,
        now: Timestamp,
    ) -> Result<bool, SolutionError> {
        let mut created = false;
        self.change(store, id, "connections", now, |_, current| {
            let mut changed = current.clone();
            match changed.connections.iter_mut().find(|c| c.id == doc.id) {
                Some(_) if create_only => {
                    return Err(SolutionError::ConnectionExists {
                        solution: id.clone(),
                        id: doc.id.clone(),
                    });
                }
                Some(stored) => {
                    doc.keep_password_of(stored);
                    doc.compile()?;
                    if *stored == doc {
                        return Ok(None);
                    }
                    *stored = doc.clone();
                }
                None => {
                    doc.compile()?;
                    if changed.connections.len() >= crate::bridge::config::MAX_CONNECTIONS {
                        return Err(SolutionError::TooManyConnections(id.clone()));
                    }
                    changed.connections.push(doc.clone());
                    created = true;
                }
            }
            Ok(Some(changed))
        })?;
        Ok(created)
    }

    /// Deletes connection `connection` of a solution.
    pub fn delete_connection(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        connection: &str,
        now: Timestamp,
    ) -> Result<(), SolutionError> {
        self.change(store, id, "connections", now, |_, current| {
            if !current.connections.iter().any(|c| c.id == connection) {
                return Err(SolutionError::NoSuchConnection {
                    solution: id.clone(),
                    id: connection.to_owned(),
                });
            }
            let mut changed = current.clone();
            changed.connections.retain(|c| c.id != connection);
            Ok(Some(changed))
        })?;
        Ok(())
    }

    /// Replaces a solution's policy, after [`check_solution_policy`]. Revision and `_` metadata
    /// of the given policy are not kept (the store keeps the revision).
    pub fn set_policy(
        &self,
        store: &dyn TwinStore,
        id: &SolutionId,
        mut policy: Policy,
        now: Timestamp,
    ) -> Result<(), SolutionError> {
        check_solution_policy(&policy)?;
        policy.revision = None;
        policy.metadata.clear();
        self.change(store, id, "policy", now, |_, current| {
            let mut changed = current.clone();
            changed.policy = policy;
            Ok(Some(changed))
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use policy::{Enforcer, Mode, Permission};
    use twin::store::{EmbeddedStore, StoreOptions};

    use super::*;
    use crate::auth::secret::verify;

    fn now() -> Timestamp {
        Timestamp::parse_rfc3339("2026-01-31T12:00:00Z").unwrap()
    }

    fn open(dir: &std::path::Path) -> EmbeddedStore {
        EmbeddedStore::open(StoreOptions::new(dir)).unwrap()
    }

    fn id(text: &str) -> SolutionId {
        SolutionId::parse(text).unwrap()
    }

    fn ns(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn solution_ids_are_lowercase_slugs_or_uuids() {
        for good in [
            "acme",
            "a1",
            "acme-prod-2",
            "0day",
            "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
            &"a".repeat(63),
        ] {
            assert!(SolutionId::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a",
            "-acme",
            "Acme",
            "acme_prod",
            "acme.prod",
            "acme:x",
            "3F2504E0-4F89-11D3-9A0C-0305E82C3301",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(SolutionId::parse(bad), Err(SolutionError::BadId(_))),
                "{bad}"
            );
        }
        let generated = SolutionId::generate().unwrap();
        assert!(generated.as_str().starts_with("s-"));
        assert_eq!(generated.as_str().len(), 10);
        assert_eq!(SolutionId::parse(generated.as_str()).unwrap(), generated);
    }

    #[test]
    fn default_policy_grants_topics_creation_and_administration_and_nothing_else() {
        let id = id("acme-1");
        let policy = default_policy(&id).unwrap();
        assert_eq!(policy.policy_id, None);
        check_solution_policy(&policy).unwrap();
        let enforcer = Arc::new(Enforcer::compile(&policy));
        let view = enforcer.for_subjects(&["iot-things:acme-1"], None, now());
        let yes = |r: &str, p| view.check_resource(r, p, Mode::Unrestricted);
        assert!(yes("topic:/x", Permission::Write));
        assert!(yes("topic:/a/b", Permission::Read));
        assert!(yes("thing:/", Permission::Create));
        assert!(yes("policy:/", Permission::Create));
        assert!(yes("solution:/", Permission::Write));
        assert!(yes("solution:/namespaces", Permission::Read));
        assert!(!yes("thing:/", Permission::Read));
        assert!(!yes("thing:/", Permission::Write));
        assert!(!yes("policy:/", Permission::Write));
        assert!(!yes("message:/", Permission::Write));
        assert!(!yes("topic:/x", Permission::Execute));
        assert!(!yes("solution:/", Permission::Create));
        // Another solution's clients get nothing.
        let other = enforcer.for_subjects(&["iot-things:acme-2"], None, now());
        assert!(!other.check_resource("topic:/x", Permission::Write, Mode::Partial));
        assert!(default_policy_summary(&id).contains("`iot-things:acme-1`"));
    }

    #[test]
    fn solution_policies_that_lock_everyone_out_are_refused() {
        let no_admin = policy::parse_policy(
            r#"{"entries":{"e":{"subjects":{"iot-things:acme":{"type":"x"}},
                "resources":{"topic:/":{"grant":["READ","WRITE"],"revoke":[]}}}}}"#,
        )
        .unwrap();
        assert!(matches!(
            check_solution_policy(&no_admin),
            Err(SolutionError::Lockout)
        ));
        let expiring_admin = policy::parse_policy(
            r#"{"entries":{"e":{"subjects":{"google:ops":{"type":"x","expiry":"2030-01-01T00:00:00Z"}},
                "resources":{"solution:/":{"grant":["WRITE"],"revoke":[]}}}}}"#,
        )
        .unwrap();
        assert!(matches!(
            check_solution_policy(&expiring_admin),
            Err(SolutionError::Lockout)
        ));
        let revoked_below = policy::parse_policy(
            r#"{"entries":{"e":{"subjects":{"google:ops":{"type":"x"}},
                "resources":{"solution:/":{"grant":["WRITE"],"revoke":[]},
                             "solution:/namespaces":{"grant":[],"revoke":["WRITE"]}}}}}"#,
        )
        .unwrap();
        assert!(matches!(
            check_solution_policy(&revoked_below),
            Err(SolutionError::Lockout)
        ));
        let with_id = policy::parse_policy(
            r#"{"policyId":"org.acme:solution","entries":{"e":{"subjects":{"google:ops":{"type":"x"}},
                "resources":{"solution:/":{"grant":["WRITE"],"revoke":[]}}}}}"#,
        )
        .unwrap();
        assert!(matches!(
            check_solution_policy(&with_id),
            Err(SolutionError::PolicyHasId(_))
        ));
    }

    #[test]
    fn a_solution_policy_file_names_its_documented_id_or_none_and_is_json() {
        let id = SolutionId::parse("acme-eu").unwrap();
        let entries = r#""entries":{"e":{"subjects":{"google:ops":{"type":"x"}},
            "resources":{"solution:/":{"grant":["WRITE"],"revoke":[]}}}}"#;
        for accepted in [
            format!(r#"{{"policyId":"acme-eu:solution",{entries}}}"#),
            format!("{{{entries}}}"),
        ] {
            let policy = parse_solution_policy(&id, &accepted).unwrap();
            assert!(policy.policy_id.is_none(), "{accepted}");
        }
        let refused = |text: &str| parse_solution_policy(&id, text).unwrap_err();
        assert!(matches!(
            refused(&format!(r#"{{"policyId":"acme-us:solution",{entries}}}"#)),
            SolutionError::PolicyIdMismatch { found, .. } if found == "acme-us:solution"
        ));
        assert!(matches!(
            refused(&format!(r#"{{"policyId":7,{entries}}}"#)),
            SolutionError::PolicyIdMismatch { found, .. } if found == "7"
        ));
        assert!(matches!(
            refused("{not json"),
            SolutionError::PolicyNotJson(_)
        ));
        assert!(matches!(
            refused(r#"{"entries":{"e":{"resources":{"solution:/":{"grant":["FLY"]}}}}}"#),
            SolutionError::Policy(_)
        ));
    }

    #[test]
    fn a_created_solution_authenticates_its_secret_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let solutions = Solutions::load(&store).unwrap();
        let created = solutions
            .create(&store, Some(id("acme")), &ns(&["org.acme"]), now())
            .unwrap();
        assert_eq!(created.secret_id, "s1");
        let subjects = solutions
            .authenticate_secret("acme", created.secret.expose(), "dev-1")
            .unwrap();
        assert_eq!(
            subjects.as_slice(),
            ["iot-things:acme:dev-1", "iot-things:acme"]
        );
        assert_eq!(
            solutions
                .authenticate_secret("acme", created.secret.expose(), "")
                .unwrap()
                .as_slice(),
            ["iot-things:acme"]
        );
        assert_eq!(
            solutions.authenticate_secret("acme", "wrong", "dev-1"),
            Err(AuthRefusal::WrongSecret)
        );
        // The API token is not a secret for basic authentication.
        assert_eq!(
            solutions.authenticate_secret("acme", created.api_token.expose(), "dev-1"),
            Err(AuthRefusal::WrongSecret)
        );
        assert_eq!(
            solutions.authenticate_secret("nope", created.secret.expose(), "dev-1"),
            Err(AuthRefusal::UnknownSolution)
        );
        assert_eq!(
            solutions.authenticate_secret("ACME", created.secret.expose(), "dev-1"),
            Err(AuthRefusal::UnknownSolution)
        );
    }

    #[test]
    fn revoked_secrets_no_longer_authenticate_and_new_ones_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let solutions = Solutions::load(&store).unwrap();
        let acme = id("acme");
        let created = solutions
            .create(&store, Some(acme.clone()), &ns(&["org.acme"]), now())
            .unwrap();
        let second = solutions.add_secret(&store, &acme, now()).unwrap();
        assert_eq!(second.secret_id, "s2");
        let revoked = solutions.revoke_secret(&store, &acme, "s1", now()).unwrap();
        assert_eq!(
            revoked,
            Revoked {
                already: false,
                active_left: 1
            }
        );
        assert_eq!(
            solutions.authenticate_secret("acme", created.secret.expose(), "c"),
            Err(AuthRefusal::RevokedSecret)
        );
        assert!(
            solutions
                .authenticate_secret("acme", second.secret.expose(), "c")
                .is_ok()
        );
        let again = solutions.revoke_secret(&store, &acme, "s1", now()).unwrap();
        assert!(again.already);
        let last = solutions.revoke_secret(&store, &acme, "s2", now()).unwrap();
        assert_eq!(last.active_left, 0);
        assert!(matches!(
            solutions.revoke_secret(&store, &acme, "s9", now()),
            Err(SolutionError::NoSuchSecret { .. })
        ));
        // IDs are never reused.
        assert_eq!(
            solutions
                .add_secret(&store, &acme, now())
                .unwrap()
                .secret_id,
            "s3"
        );
    }

    #[test]
    fn api_tokens_identify_their_solution_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let solutions = Solutions::load(&store).unwrap();
        let a = solutions
            .create(&store, Some(id("a1")), &ns(&["org.a"]), now())
            .unwrap();
        let b = solutions
            .create(&store, None, &ns(&["org.b"]), now())
            .unwrap();
        assert_eq!(
            solutions.solution_by_api_token(a.api_token.expose()),
            Some(id("a1"))
        );
        assert_eq!(
            solutions.solution_by_api_token(b.api_token.expose()),
            Some(b.solution_id.clone())
        );
        assert_eq!(solutions.solution_by_api_token(a.secret.expose()), None);
        assert_eq!(solutions.solution_by_api_token(""), None);
    }

    #[test]
    fn namespaces_belong_to_one_solution_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let solutions = Solutions::load(&store).unwrap();
        let a = id("a1");
        solutions
            .create(&store, Some(a.clone()), &ns(&["org.a", "org.a"]), now())
            .unwrap();
        assert_eq!(solutions.get("a1").unwrap().namespaces, ns(&["org.a"]));
        let taken = solutions
            .create(&store, Some(id("b1")), &ns(&["org.b", "org.a"]), now())
            .unwrap_err();
        assert!(
            matches!(&taken, SolutionError::NamespaceTaken { namespace, owner } if namespace == "org.a" && owner == &a),
            "{taken}"
        );
        // Nothing of the refused solution was stored.
        assert!(solutions.get("b1").is_none());
        assert!(store.get(&key_of(&id("b1"))).is_none());
        let b = id("b1");
        solutions
            .create(&store, Some(b.clone()), &ns(&["org.b"]), now())
            .unwrap();
        assert!(matches!(
            solutions.add_namespace(&store, &b, "org.a", now()),
            Err(SolutionError::NamespaceTaken { .. })
        ));
        assert!(!solutions.add_namespace(&store, &a, "org.a", now()).unwrap());
        assert!(
            solutions
                .add_namespace(&store, &a, "org.a.fleet", now())
                .unwrap()
        );
        assert!(matches!(
            solutions.add_namespace(&store, &a, "org-a", now()),
            Err(SolutionError::BadNamespace(_))
        ));
        assert_eq!(solutions.owner_of_namespace("org.a.fleet"), Some(a.clone()));
        assert_eq!(solutions.owner_of_namespace("org.b"), Some(b));
        assert_eq!(solutions.owner_of_namespace("org"), None);
        assert!(matches!(
            solutions.create(&store, Some(a), &ns(&["org.c"]), now()),
            Err(SolutionError::Exists(_))
        ));
    }

    #[test]
    fn policy_set_refuses_lockout_and_keeps_the_old_policy() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let solutions = Solutions::load(&store).unwrap();
        let acme = id("acme");
        solutions
            .create(&store, Some(acme.clone()), &ns(&["org.acme"]), now())
            .unwrap();
        let lockout = policy::parse_policy(
            r#"{"entries":{"e":{"subjects":{"iot-things:acme":{"type":"x"}},
                "resources":{"topic:/":{"grant":["READ"],"revoke":[]}}}}}"#,
        )
        .unwrap();
        assert!(matches!(
            solutions.set_policy(&store, &acme, lockout, now()),
            Err(SolutionError::Lockout)
        ));
        assert_eq!(
            solutions.get("acme").unwrap().policy,
            default_policy(&acme).unwrap()
        );
        let ops = policy::parse_policy(
            r#"{"entries":{"ops":{"subjects":{"google:ops":{"type":"x"}},
                "resources":{"solution:/":{"grant":["READ","WRITE"],"revoke":[]}}}},"_revision":7}"#,
        )
        .unwrap();
        solutions.set_policy(&store, &acme, ops, now()).unwrap();
        let stored = solutions.get("acme").unwrap().policy.clone();
        assert_eq!(stored.revision, None);
        assert!(stored.entries.keys().any(|l| l.as_str() == "ops"));
        assert!(matches!(
            solutions.set_policy(&store, &id("nope"), stored, now()),
            Err(SolutionError::NotFound(_))
        ));
    }

    #[test]
    fn solutions_survive_a_restart_with_digests_only() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, token) = {
            let store = open(dir.path());
            let solutions = Solutions::load(&store).unwrap();
            let created = solutions
                .create(&store, Some(id("acme")), &ns(&["org.acme"]), now())
                .unwrap();
            solutions.add_secret(&store, &id("acme"), now()).unwrap();
            store.close().unwrap();
            (
                created.secret.expose().to_owned(),
                created.api_token.expose().to_owned(),
            )
        };
        let store = open(dir.path());
        let entity = store.get(&key_of(&id("acme"))).unwrap();
        let text = entity.doc.to_string();
        assert!(!text.contains(&secret) && !text.contains(&token));
        assert_eq!(entity.doc["solutionId"], "acme");
        assert_eq!(entity.doc["secrets"][0]["created"], "2026-01-31T12:00:00Z");
        assert!(entity.doc["secrets"][0].get("revoked").is_none());
        assert!(entity.doc["policy"].get("policyId").is_none());
        let solutions = Solutions::load(&store).unwrap();
        let acme = solutions.get("acme").unwrap();
        assert_eq!(acme.active_secrets(), 2);
        assert!(verify(&secret, &acme.secrets[0].digest));
        assert!(verify(&token, &acme.api_token_digest));
        assert!(solutions.authenticate_secret("acme", &secret, "c").is_ok());
        assert_eq!(solutions.solution_by_api_token(&token), Some(id("acme")));
    }

    #[test]
    fn a_malformed_stored_solution_is_an_error_naming_it() {
        let doc = json!({"solutionId": "acme", "apiTokenDigest": "nope", "secrets": [],
                         "namespaces": [], "policy": {"entries": {}}});
        let e = Solution::from_doc(&doc).unwrap_err();
        assert!(
            matches!(&e, SolutionError::Corrupt { id, .. } if id == "acme"),
            "{e}"
        );
    }
}
