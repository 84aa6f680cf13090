//! Compiled thing and policy policies (DESIGN.md §4: "the policy cache"): policy ID → the
//! compiled current revision, with the imports each was compiled with.
//!
//! The cache is keyed by policy ID and the policy entity's revision, so a policy change is seen
//! by the next check anywhere (commands, event deliveries, live messages): the cached enforcer
//! is stale, the new revision is compiled, and every session's memoized view follows (it
//! compares enforcers, `crate::core::session::PolicyViews`). A policy that imports others is
//! also stale when an imported policy's revision moved since it was compiled.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use policy::{Enforcer, PolicyCache};
use twin::entity::{EntityKey, EntityKind};
use twin::store::TwinStore;

/// A policy ID the broker passes between its parts: valid (it came from a parsed command or
/// from the store, which holds only validated IDs) and shared without copying. Also the key of
/// a session's memoized views.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicyId(Arc<str>);

impl PolicyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The namespace (the part before the first `:`).
    pub fn namespace(&self) -> &str {
        self.0.split_once(':').map_or("", |(ns, _)| ns)
    }
}

impl From<&twin::PolicyId> for PolicyId {
    fn from(id: &twin::PolicyId) -> Self {
        PolicyId(id.as_str().into())
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A policy's ID and its compiled current revision.
#[derive(Debug, Clone)]
pub struct PolicyRef {
    pub id: PolicyId,
    pub enforcer: Arc<Enforcer>,
}

/// The policies one policy imports, each with its revision when the importer was compiled
/// (`None`: it did not exist).
type ImportRevisions = Vec<(Box<str>, Option<u64>)>;

/// The compiled policies of the store's things.
#[derive(Debug)]
pub struct Policies {
    store: Arc<dyn TwinStore>,
    cache: PolicyCache,
    /// For policies with imports: each imported policy's revision when the importer was
    /// compiled.
    imports: RwLock<HashMap<Box<str>, ImportRevisions>>,
    /// Lookups answered from the cache, and compilations (for metrics).
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

fn policy_key(id: &str) -> EntityKey {
    EntityKey::new(EntityKind::Policy, id)
}

impl Policies {
    pub fn new(store: Arc<dyn TwinStore>) -> Self {
        Policies {
            store,
            cache: PolicyCache::new(100_000),
            imports: RwLock::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The compiled current revision of policy `id` (`None`: no such policy).
    pub fn get(&self, id: &PolicyId) -> Option<PolicyRef> {
        Some(PolicyRef {
            enforcer: self.enforcer(id.as_str())?,
            id: id.clone(),
        })
    }

    /// The policy of thing `thing_id` (`None`: no such thing, or its policy is gone).
    pub fn of_thing(&self, thing_id: &twin::ThingId) -> Option<PolicyRef> {
        self.of_stored_thing(thing_id.as_str())
    }

    /// The policy ID thing `thing_id` names (`None`: no such thing).
    pub fn id_of_thing(&self, thing_id: &twin::ThingId) -> Option<PolicyId> {
        self.store.thing_policy_id(thing_id.as_str()).map(PolicyId)
    }

    /// [`Policies::of_thing`] for the ID of a stored entity (an event's key), which the store
    /// validated when it was written.
    pub(crate) fn of_stored_thing(&self, thing_id: &str) -> Option<PolicyRef> {
        let id = self.store.thing_policy_id(thing_id)?;
        let enforcer = self.enforcer(&id)?;
        Some(PolicyRef {
            id: PolicyId(id),
            enforcer,
        })
    }

    /// [`Policies::get`] for the ID of a stored policy entity (an event's key).
    pub(crate) fn of_stored_policy(&self, id: &str) -> Option<PolicyRef> {
        Some(PolicyRef {
            enforcer: self.enforcer(id)?,
            id: PolicyId(id.into()),
        })
    }

    fn enforcer(&self, id: &str) -> Option<Arc<Enforcer>> {
        // While no policy was written, what was current is current: no lookup of the policy's
        // (nor its imports') revision.
        let generation = self.store.policy_generation();
        if let Some(enforcer) = self.cache.get_verified(id, generation) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Some(enforcer);
        }
        let entity = self.store.get(&policy_key(id))?;
        if let Some(cached) = self.cache.get(id)
            && cached.revision == entity.revision
            && self.imports_unchanged(id)
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            self.cache.mark_verified(id, entity.revision, generation);
            return Some(cached.enforcer);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Stored policies were validated when written; one that no longer parses grants nothing.
        let policy = policy::policy_from_value(&entity.doc).ok()?;
        let mut revisions = Vec::with_capacity(policy.imports.len());
        let imported: Vec<policy::Policy> = policy
            .imports
            .keys()
            .filter_map(|import| {
                let doc = self.store.get(&policy_key(import.as_str()));
                revisions.push((
                    Box::<str>::from(import.as_str()),
                    doc.as_ref().map(|d| d.revision),
                ));
                policy::policy_from_value(&doc?.doc).ok()
            })
            .collect();
        let refs: Vec<&policy::Policy> = imported.iter().collect();
        let enforcer = Arc::new(Enforcer::compile_with_imports(&policy, &refs));
        {
            let mut imports = self.imports.write().unwrap_or_else(PoisonError::into_inner);
            if revisions.is_empty() {
                imports.remove(id);
            } else {
                imports.insert(id.into(), revisions);
            }
        }
        self.cache.insert(id, entity.revision, enforcer.clone());
        self.cache.mark_verified(id, entity.revision, generation);
        Some(enforcer)
    }

    /// How many compiled policies the cache holds.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Whether the policies `id` imports are at the revisions its cached enforcer was compiled
    /// with (a change to an imported policy changes the importer's effective entries).
    fn imports_unchanged(&self, id: &str) -> bool {
        let imports = self.imports.read().unwrap_or_else(PoisonError::into_inner);
        let Some(recorded) = imports.get(id) else {
            return true;
        };
        recorded.iter().all(|(import, revision)| {
            self.store.get(&policy_key(import)).map(|e| e.revision) == *revision
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use policy::{Mode, Permission, ResourceType, Timestamp};
    use serde_json::{Value, json};
    use twin::apply::{Applied, apply_policy_command};
    use twin::command::{Action, CommandHeaders, PolicyCommand};
    use twin::store::{EmbeddedStore, StoreOptions, TwinStoreExt};
    use twin::thing::Limits;

    use super::{Policies, PolicyId, policy_key};

    fn put_policy(store: &EmbeddedStore, doc: Value) {
        let id = doc["policyId"].as_str().unwrap().to_owned();
        let cmd = PolicyCommand {
            policy_id: policy::PolicyId::parse(&id).unwrap(),
            action: Action::Modify,
            path: "/".to_owned(),
            value: Some(doc),
            headers: CommandHeaders::default(),
        };
        let limits = Limits::default();
        let written = store
            .write(&policy_key(&id), |current| -> Result<_, twin::DittoError> {
                match apply_policy_command(current, &cmd, Timestamp::from_unix_millis(1), &limits)?
                {
                    Applied::Change(change) => Ok(vec![change.event]),
                    Applied::Retrieve(_) => Ok(Vec::new()),
                }
            })
            .unwrap();
        written.durable.wait().unwrap();
    }

    #[test]
    fn a_change_to_a_policy_reaches_its_cached_enforcer_at_the_next_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(StoreOptions::new(dir.path())).unwrap());
        let policies = Policies::new(store.clone());
        let policy = |grant: &[&str]| {
            json!({"policyId": "org.acme:p", "entries": {
                "admin": {"subjects": {"s:admin": {"type": "t"}},
                    "resources": {"policy:/": {"grant": ["READ", "WRITE"], "revoke": []}}},
                "readers": {"subjects": {"s:reader": {"type": "t"}},
                    "resources": {"thing:/": {"grant": grant, "revoke": []}}}
            }})
        };
        let id = PolicyId::from(&twin::PolicyId::parse("org.acme:p").unwrap());
        let reads = |policies: &Policies| {
            policies.get(&id).is_some_and(|p| {
                p.enforcer
                    .for_subjects(
                        &["s:reader"],
                        Some("org.acme"),
                        Timestamp::from_unix_millis(2),
                    )
                    .check(ResourceType::Thing, "/", Permission::Read, Mode::Partial)
            })
        };
        put_policy(&store, policy(&["READ"]));
        // Compiled, then answered from the cache while nothing changes.
        assert!(reads(&policies) && reads(&policies) && reads(&policies));
        put_policy(&store, policy(&[]));
        assert!(!reads(&policies), "the revoked grant still answered");
        put_policy(&store, policy(&["READ"]));
        assert!(reads(&policies));
        assert_eq!(
            policies.misses.load(std::sync::atomic::Ordering::Relaxed),
            3,
            "one compilation per revision"
        );
    }

    #[test]
    fn a_change_to_an_imported_policy_reaches_the_importers_cached_enforcer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(StoreOptions::new(dir.path())).unwrap());
        let policies = Policies::new(store.clone());
        let admin = json!({"subjects": {"s:admin": {"type": "t"}},
            "resources": {"policy:/": {"grant": ["READ", "WRITE"], "revoke": []}}});
        let base = |grant: &[&str]| {
            json!({"policyId": "org.acme:base", "entries": {
                "admin": admin.clone(),
                "readers": {"subjects": {"s:reader": {"type": "t"}},
                    "resources": {"thing:/": {"grant": grant, "revoke": []}}}
            }})
        };
        put_policy(&store, base(&["READ"]));
        put_policy(
            &store,
            json!({"policyId": "org.acme:p", "imports": {"org.acme:base": {}},
                "entries": {"admin": admin.clone()}}),
        );
        let id = PolicyId::from(&twin::PolicyId::parse("org.acme:p").unwrap());
        let reads = |policies: &Policies| {
            policies
                .get(&id)
                .unwrap()
                .enforcer
                .for_subjects(
                    &["s:reader"],
                    Some("org.acme"),
                    Timestamp::from_unix_millis(2),
                )
                .check(ResourceType::Thing, "/", Permission::Read, Mode::Partial)
        };
        assert!(reads(&policies));
        // The importer itself does not change; the imported policy revokes the grant.
        put_policy(&store, base(&[]));
        assert!(!reads(&policies), "the importer's enforcer was recompiled");
    }
}
