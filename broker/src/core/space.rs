//! A solution's plain-topic space (DESIGN.md §3): its own subscription tree, retained messages
//! and sessions — the "hidden mount point" that keeps two solutions' topics apart — and its
//! compiled solution policy, which decides every `topic:` check.
//!
//! Locks are `std` locks held only for map and tree operations, never across an `.await`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use policy::Enforcer;

use crate::auth::solution::{Solution, SolutionId};
use crate::core::message::Message;
use crate::core::session::{Link, Session};
use crate::core::topics::TopicTree;
use crate::mqtt::codec::SubscriptionOptions;

/// One entry of the subscription tree.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub session: Arc<Session>,
    pub options: SubscriptionOptions,
    pub id: Option<NonZeroU32>,
    /// `Some(full filter)` for `$share/{group}/{filter}`: one member of the group gets each
    /// message. The full filter string names the group.
    pub share: Option<Arc<str>>,
}

/// A solution's topics, retained messages and sessions.
#[derive(Debug)]
pub struct SolutionSpace {
    pub id: SolutionId,
    /// The solution as it is now (namespaces, secrets, policy) and its compiled policy:
    /// replaced whole when the solution is changed online (`Core::solution_changed`), seen by
    /// the next check of every connection.
    current: RwLock<(Arc<Solution>, Arc<Enforcer>)>,
    /// Usage counters (DESIGN.md §1).
    pub usage: Usage,
    pub tree: RwLock<TopicTree<Subscriber>>,
    /// Retained messages by topic name.
    pub retained: RwLock<HashMap<Box<str>, Arc<Message>>>,
    /// Sessions by client ID: a client ID is unique within its solution (DESIGN.md §2).
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    /// Round-robin position for shared subscriptions.
    pub share_cursor: AtomicUsize,
    /// Wills waiting for their v5 Will Delay, by client ID: a new connection with that client
    /// ID cancels the will (MQTT-3.1.3-9), whichever session it starts or resumes.
    pending_wills: Mutex<HashMap<Box<str>, u64>>,
    next_will: AtomicU64,
    /// Retained messages kept at most (`crate::limits`): a memory bound per solution.
    pub max_retained: usize,
    /// Reply addresses handed out (`Core::reply_address`), each to one waiting session.
    replies: Mutex<HashMap<Box<str>, std::sync::Weak<Session>>>,
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // Writers replace values whole: a poisoned lock still holds consistent data.
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Map updates only: a poisoned lock still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// A solution's usage counters, kept as it is used (relaxed atomics).
#[derive(Debug, Default)]
pub struct Usage {
    /// Requests and deliveries allowed (the other authorization outcome is `denied`).
    pub allowed: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub denied: AtomicU64,
}

impl Usage {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl SolutionSpace {
    pub fn new(solution: Arc<Solution>) -> Self {
        let policy = Arc::new(Enforcer::compile(&solution.policy));
        SolutionSpace {
            id: solution.id.clone(),
            current: RwLock::new((solution, policy)),
            usage: Usage::default(),
            tree: RwLock::new(TopicTree::new()),
            retained: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            share_cursor: AtomicUsize::new(0),
            pending_wills: Mutex::new(HashMap::new()),
            next_will: AtomicU64::new(1),
            max_retained: crate::limits::MqttSettings::default().max_retained_messages,
            replies: Mutex::new(HashMap::new()),
        }
    }

    /// Registers reply address `topic` for `session`.
    pub fn add_reply(&self, topic: &str, session: &Arc<Session>) {
        lock(&self.replies).insert(topic.into(), Arc::downgrade(session));
    }

    /// The session waiting on reply address `topic`, if it still is.
    pub fn reply_session(&self, topic: &str) -> Option<Arc<Session>> {
        lock(&self.replies)
            .get(topic)
            .and_then(std::sync::Weak::upgrade)
    }

    /// Forgets the reply addresses of `session`.
    pub fn remove_replies(&self, session: &Arc<Session>) {
        lock(&self.replies)
            .retain(|_, waiting| waiting.upgrade().is_some_and(|s| !Arc::ptr_eq(&s, session)));
    }

    /// The solution policy's current compiled revision.
    pub fn policy(&self) -> Arc<Enforcer> {
        read(&self.current).1.clone()
    }

    /// The solution as it is now.
    pub fn solution(&self) -> Arc<Solution> {
        read(&self.current).0.clone()
    }

    /// Whether the solution owns `namespace` now.
    pub fn owns(&self, namespace: &str) -> bool {
        read(&self.current)
            .0
            .namespaces
            .iter()
            .any(|n| n == namespace)
    }

    /// A publish, subscription, delivery or command of this solution was denied: counted in
    /// the metrics (by kind) and in the solution's usage.
    pub fn denied(&self, metrics: &crate::metrics::Metrics, kind: &'static str) {
        metrics.denied(self.id.as_str(), kind);
        Usage::add(&self.usage.denied, 1);
    }

    /// The solution changed: its namespaces and policy apply from the next check on.
    pub fn replace_solution(&self, solution: Arc<Solution>) {
        let policy = Arc::new(Enforcer::compile(&solution.policy));
        *write(&self.current) = (solution, policy);
    }

    /// The links of the clients attached now that connected with secret number `secret`.
    pub fn links_with_secret(&self, secret: u32) -> Vec<Arc<Link>> {
        self.sessions()
            .values()
            .filter_map(|session| session.lock().link.clone())
            .filter(|link| link.secret == secret)
            .collect()
    }

    pub fn tree_read(&self) -> RwLockReadGuard<'_, TopicTree<Subscriber>> {
        read(&self.tree)
    }

    pub fn tree_write(&self) -> RwLockWriteGuard<'_, TopicTree<Subscriber>> {
        write(&self.tree)
    }

    pub fn retained_read(&self) -> RwLockReadGuard<'_, HashMap<Box<str>, Arc<Message>>> {
        read(&self.retained)
    }

    pub fn retained_write(&self) -> RwLockWriteGuard<'_, HashMap<Box<str>, Arc<Message>>> {
        write(&self.retained)
    }

    pub fn sessions(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pending_wills(&self) -> MutexGuard<'_, HashMap<Box<str>, u64>> {
        self.pending_wills
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a delayed will of `client_id`; the token claims it later.
    pub fn register_pending_will(&self, client_id: &str) -> u64 {
        let token = self.next_will.fetch_add(1, Ordering::Relaxed);
        self.pending_wills().insert(client_id.into(), token);
        token
    }

    /// A new connection for `client_id`: its pending will is not sent.
    pub fn cancel_pending_will(&self, client_id: &str) {
        self.pending_wills().remove(client_id);
    }

    /// Whether the will registered with `token` is still due (and claims it).
    pub fn claim_pending_will(&self, client_id: &str, token: u64) -> bool {
        let mut wills = self.pending_wills();
        if wills.get(client_id) == Some(&token) {
            wills.remove(client_id);
            true
        } else {
            false
        }
    }

    /// Removes every subscription of `session` from the tree (session end or clean start).
    pub fn unsubscribe_all(&self, session: &Arc<Session>) {
        let filters: Vec<Box<str>> = session.lock().subscriptions.keys().cloned().collect();
        let mut tree = self.tree_write();
        for filter in filters {
            tree.remove(tree_filter(&filter), |s| Arc::ptr_eq(&s.session, session));
        }
    }

    /// Ends a session if it is still the registered one for its client ID.
    pub fn end_session(&self, session: &Arc<Session>) {
        let mut sessions = self.sessions();
        if sessions
            .get(&*session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&*session.client_id);
        }
        drop(sessions);
        self.unsubscribe_all(session);
        session.lock().clear();
    }
}

/// The filter as stored in the tree: without `$share/{group}/`.
pub fn tree_filter(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

/// The spaces of all solutions, created at first use. A space holds its solution policy
/// compiled once: it is the cache of solution policies.
#[derive(Debug)]
pub struct Spaces {
    spaces: RwLock<HashMap<SolutionId, Arc<SolutionSpace>>>,
    max_retained: usize,
}

impl Default for Spaces {
    fn default() -> Self {
        Spaces::new(crate::limits::MqttSettings::default().max_retained_messages)
    }
}

impl Spaces {
    /// Spaces whose solutions keep at most `max_retained` retained messages each.
    pub fn new(max_retained: usize) -> Self {
        Spaces {
            spaces: RwLock::new(HashMap::new()),
            max_retained,
        }
    }

    /// Every solution's space.
    pub fn all(&self) -> Vec<Arc<SolutionSpace>> {
        read(&self.spaces).values().cloned().collect()
    }

    /// The space of `solution`, created (its policy compiled once) if new.
    pub fn get_or_create(&self, solution: &Solution) -> Arc<SolutionSpace> {
        if let Some(space) = read(&self.spaces).get(&solution.id) {
            return space.clone();
        }
        write(&self.spaces)
            .entry(solution.id.clone())
            .or_insert_with(|| {
                let mut space = SolutionSpace::new(Arc::new(solution.clone()));
                space.max_retained = self.max_retained;
                Arc::new(space)
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::tree_filter;

    #[test]
    fn shared_filters_lose_their_group_in_the_tree() {
        assert_eq!(tree_filter("$share/g/a/+/c"), "a/+/c");
        assert_eq!(tree_filter("a/#"), "a/#");
        assert_eq!(tree_filter("$SYS/#"), "$SYS/#");
    }
}
