//! The policy cache: policy ID → compiled enforcer of its latest known revision.
//!
//! Read by every connection task on every message that meets a policy not yet in its own memo,
//! written only when a policy is loaded or changes. Sharded `RwLock`s keep readers from meeting
//! each other; recency is a per-shard tick that only writers advance (by 2: an insert stamps its
//! entry with the new even tick, a read stamps with tick + 1, so a read counts as more recent
//! than every insert before it), so a read does one relaxed load and, at most, one relaxed store. When a shard is full, an insert evicts the
//! entry that was used least recently (ties: any of them).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::enforcer::Enforcer;

/// A cached enforcer and the policy revision it was compiled from.
#[derive(Debug, Clone)]
pub struct Cached {
    pub revision: u64,
    pub enforcer: Arc<Enforcer>,
}

#[derive(Debug)]
struct Slot {
    revision: u64,
    enforcer: Arc<Enforcer>,
    last_used: AtomicU64,
    /// The caller's generation at which this revision was last found current
    /// ([`PolicyCache::mark_verified`]); `u64::MAX`: never.
    verified_at: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    map: RwLock<HashMap<Box<str>, Slot, foldhash::fast::RandomState>>,
    /// Advanced by every insert; a read stamps its slot with the current value.
    clock: AtomicU64,
}

impl Shard {
    // A poisoned lock only means another thread panicked while holding it; the map itself is
    // never left half-updated by our code, so we keep serving it.
    fn read(&self) -> RwLockReadGuard<'_, HashMap<Box<str>, Slot, foldhash::fast::RandomState>> {
        self.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<Box<str>, Slot, foldhash::fast::RandomState>> {
        self.map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A bounded, concurrent map from policy ID to its compiled enforcer.
#[derive(Debug)]
pub struct PolicyCache {
    shards: Box<[Shard]>,
    per_shard: usize,
    hasher: foldhash::fast::FixedState,
}

impl PolicyCache {
    /// A cache holding at most `capacity` policies (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // Small caches use one shard, so that eviction is exactly least-recently-used.
        let shard_count = if capacity >= 1024 { 16 } else { 1 };
        PolicyCache {
            shards: (0..shard_count).map(|_| Shard::default()).collect(),
            per_shard: capacity.div_ceil(shard_count),
            hasher: foldhash::fast::FixedState::with_seed(0),
        }
    }

    fn shard(&self, policy_id: &str) -> Option<&Shard> {
        let index = self.hasher.hash_one(policy_id) as usize % self.shards.len();
        self.shards.get(index)
    }

    /// The cached enforcer of `policy_id`, if any.
    pub fn get(&self, policy_id: &str) -> Option<Cached> {
        let shard = self.shard(policy_id)?;
        let map = shard.read();
        let slot = map.get(policy_id)?;
        let now = shard.clock.load(Ordering::Relaxed) + 1;
        if slot.last_used.load(Ordering::Relaxed) != now {
            slot.last_used.store(now, Ordering::Relaxed);
        }
        Some(Cached {
            revision: slot.revision,
            enforcer: Arc::clone(&slot.enforcer),
        })
    }

    /// The cached enforcer of `policy_id` if its revision was marked current at `generation`
    /// — a counter of the caller's that moves whenever any policy may have changed. Lets the
    /// hot path skip looking up the policy's current revision while nothing changed.
    pub fn get_verified(&self, policy_id: &str, generation: u64) -> Option<Arc<Enforcer>> {
        let shard = self.shard(policy_id)?;
        let map = shard.read();
        let slot = map.get(policy_id)?;
        (slot.verified_at.load(Ordering::Acquire) == generation).then(|| Arc::clone(&slot.enforcer))
    }

    /// Records that revision `revision` of `policy_id` was the current one when the caller's
    /// generation read `generation` (read *before* the revision was looked up). Ignored if the
    /// cache holds another revision by now.
    pub fn mark_verified(&self, policy_id: &str, revision: u64, generation: u64) {
        let Some(shard) = self.shard(policy_id) else {
            return;
        };
        let map = shard.read();
        if let Some(slot) = map.get(policy_id)
            && slot.revision == revision
        {
            slot.verified_at.store(generation, Ordering::Release);
        }
    }

    /// Caches `enforcer` as revision `revision` of `policy_id`, unless a newer revision is
    /// already cached (two loaders racing must not put an old policy back). Returns whether it
    /// was stored.
    pub fn insert(&self, policy_id: &str, revision: u64, enforcer: Arc<Enforcer>) -> bool {
        let Some(shard) = self.shard(policy_id) else {
            return false;
        };
        let mut map = shard.write();
        let tick = shard.clock.fetch_add(2, Ordering::Relaxed) + 2;
        if let Some(slot) = map.get_mut(policy_id) {
            if slot.revision > revision {
                return false;
            }
            if slot.revision != revision {
                slot.verified_at.store(u64::MAX, Ordering::Relaxed);
            }
            slot.revision = revision;
            slot.enforcer = enforcer;
            slot.last_used.store(tick, Ordering::Relaxed);
            return true;
        }
        if map.len() >= self.per_shard {
            let oldest = map
                .iter()
                .min_by_key(|(_, slot)| slot.last_used.load(Ordering::Relaxed))
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                map.remove(&id);
            }
        }
        map.insert(
            policy_id.into(),
            Slot {
                revision,
                enforcer,
                last_used: AtomicU64::new(tick),
                verified_at: AtomicU64::new(u64::MAX),
            },
        );
        true
    }

    /// Drops `policy_id` from the cache; returns whether it was there.
    pub fn invalidate(&self, policy_id: &str) -> bool {
        self.shard(policy_id)
            .is_some_and(|shard| shard.write().remove(policy_id).is_some())
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.per_shard * self.shards.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse_policy;

    fn enforcer() -> Arc<Enforcer> {
        Arc::new(Enforcer::compile(
            &parse_policy(r#"{"entries":{}}"#).unwrap(),
        ))
    }

    #[test]
    fn get_returns_what_was_inserted_with_its_revision() {
        let cache = PolicyCache::new(10);
        let e = enforcer();
        assert!(cache.insert("ns:p", 3, Arc::clone(&e)));
        let hit = cache.get("ns:p").unwrap();
        assert_eq!(hit.revision, 3);
        assert!(Arc::ptr_eq(&hit.enforcer, &e));
        assert!(cache.get("ns:other").is_none());
    }

    #[test]
    fn an_older_revision_never_replaces_a_newer_one() {
        let cache = PolicyCache::new(10);
        assert!(cache.insert("ns:p", 5, enforcer()));
        assert!(!cache.insert("ns:p", 4, enforcer()));
        assert_eq!(cache.get("ns:p").unwrap().revision, 5);
        assert!(cache.insert("ns:p", 6, enforcer()));
        assert_eq!(cache.get("ns:p").unwrap().revision, 6);
    }

    #[test]
    fn invalidate_removes_the_entry() {
        let cache = PolicyCache::new(10);
        cache.insert("ns:p", 1, enforcer());
        assert!(cache.invalidate("ns:p"));
        assert!(cache.get("ns:p").is_none());
        assert!(!cache.invalidate("ns:p"));
    }

    #[test]
    fn a_full_cache_evicts_the_least_recently_used() {
        let cache = PolicyCache::new(2);
        cache.insert("ns:a", 1, enforcer());
        cache.insert("ns:b", 1, enforcer());
        cache.get("ns:a");
        cache.insert("ns:c", 1, enforcer());
        assert_eq!(cache.len(), 2);
        assert!(
            cache.get("ns:a").is_some(),
            "recently used entry was evicted"
        );
        assert!(
            cache.get("ns:b").is_none(),
            "least recently used entry was kept"
        );
        assert!(cache.get("ns:c").is_some());
    }

    #[test]
    fn a_large_cache_stays_within_its_bound() {
        let cache = PolicyCache::new(2048);
        for i in 0..10_000 {
            cache.insert(&format!("ns:p{i}"), 1, enforcer());
        }
        assert!(cache.len() <= cache.capacity());
        assert!(cache.capacity() < 2048 + 16);
    }

    #[test]
    fn concurrent_readers_and_writers_agree() {
        let cache = Arc::new(PolicyCache::new(64));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..2_000u64 {
                        let id = format!("ns:p{}", i % 50);
                        if t == 0 {
                            cache.insert(&id, i, enforcer());
                        } else if let Some(hit) = cache.get(&id) {
                            assert!(hit.revision <= i.max(2_000));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(cache.len() <= 64);
    }
}
