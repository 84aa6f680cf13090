//! Bridges (DESIGN.md §5): a solution's connections to external brokers — AMQP 0.9.1 (lapin)
//! and MQTT 3.1.1/5 (rumqttc) client connections to a device hub or a back end — each one more
//! adapter of the core: commands consumed from its sources go through [`Core::publish`] like
//! an MQTT device's (`inbound`), events and live messages reach its targets through a core
//! subscription cut to the target's authorization context (`outbound`). Nothing is authorized,
//! applied or routed here.
//!
//! - `config`: the stored connection document and its checked form; `placeholder`: the
//!   `{{ header:… }}` / `{{ thing:… }}` / `{{ topic:… }}` templates.
//! - [`Bridges`] (in the core): every running connection's [`Status`], and the signal that a
//!   solution's connections changed; `manager` starts, restarts and stops connection tasks to
//!   match the stored documents, without a restart of the server.
//! - `amqp`, `mqtt`: one task per connection: connect (every network call under a timeout),
//!   consume, settle, publish; on any failure back off (exponential, with jitter) and connect
//!   again.

pub mod amqp;
pub mod config;
pub mod inbound;
pub mod manager;
pub mod mqtt;
pub mod outbound;
pub mod placeholder;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::Notify;

/// How long one connect, declare, publish or acknowledgement to an external broker may take.
pub const NETWORK_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before connecting again; doubled per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A connection that failed after being connected this long starts over at [`MIN_BACKOFF`];
/// one that fails sooner keeps backing off (a broken target, a message that breaks it).
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Events and messages waiting for a target while its broker is unreachable; beyond it the
/// oldest are dropped and counted.
pub const TARGET_BUFFER: usize = 10_000;

/// The state of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Connecting,
    Connected,
    /// The last attempt failed; it is retried after a backoff.
    Failed(String),
    /// `connectionStatus: closed`: stored, not connected.
    Closed,
}

impl State {
    pub fn label(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Failed(_) => "failed",
            State::Closed => "closed",
        }
    }
}

/// A running connection's state and counters (read by the API and `/metrics`).
#[derive(Debug)]
pub struct Status {
    pub connection_type: &'static str,
    /// `host:port` of the external broker (never its credentials).
    pub address: String,
    state: Mutex<(State, SystemTime)>,
    /// Commands consumed and applied (or answered with an error).
    pub consumed: AtomicU64,
    /// Events and messages published to targets (confirmed).
    pub published: AtomicU64,
    /// Messages refused: not authorized, or by the enforcement.
    pub denied: AtomicU64,
    /// Messages that failed: malformed, unresolvable, answered with an error the command caused
    /// (404, 409, 412 …: settled), store failures and timeouts (requeued); a target message the
    /// broker refused.
    pub failed: AtomicU64,
    /// Events and messages dropped at a full target buffer.
    pub dropped: AtomicU64,
    /// Answers sent to reply addresses.
    pub replies: AtomicU64,
    /// Connects that succeeded (the first one and every reconnect).
    pub connects: AtomicU64,
}

impl Status {
    pub fn new(connection_type: &'static str, address: String) -> Self {
        Status {
            connection_type,
            address,
            state: Mutex::new((State::Connecting, SystemTime::now())),
            consumed: AtomicU64::new(0),
            published: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        }
    }

    /// Sets the state; `since` changes only when the state does.
    pub fn set(&self, state: State) {
        let mut current = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0.label() == state.label() {
            // The same state with another error: `since` stays.
            current.0 = state;
        } else {
            if state == State::Connected {
                self.connects.fetch_add(1, Ordering::Relaxed);
            }
            *current = (state, SystemTime::now());
        }
    }

    pub fn state(&self) -> (State, SystemTime) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn count_in(&self) {
        self.consumed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_denied(&self) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// The status as the API shows it.
    pub fn to_json(&self, id: &str) -> Value {
        let (state, since) = self.state();
        let millis = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let since = policy::Timestamp::from_unix_millis(millis).to_string();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut value = json!({
            "id": id,
            "connectionType": self.connection_type,
            "address": self.address,
            "status": state.label(),
            "since": since,
            "connects": load(&self.connects),
            "counters": {
                "in": load(&self.consumed),
                "out": load(&self.published),
                "denied": load(&self.denied),
                "failed": load(&self.failed),
                "dropped": load(&self.dropped),
                "replies": load(&self.replies),
            },
        });
        if let (State::Failed(error), Some(object)) = (&state, value.as_object_mut()) {
            object.insert("lastError".into(), Value::String(error.clone()));
        }
        value
    }
}

/// What the core keeps of the bridges: every running connection's status by solution and
/// connection ID, and the signal that stored connections changed.
#[derive(Debug, Default)]
pub struct Bridges {
    statuses: Mutex<HashMap<(String, String), Arc<Status>>>,
    /// Notified when a solution's connections (may have) changed.
    pub changed: Notify,
    /// Cluster mode: this node is not the one that runs the bridges (every node would
    /// otherwise consume each source and publish each target message once per node). One
    /// node: always `false`, it runs them.
    pub elsewhere: std::sync::atomic::AtomicBool,
}

impl Bridges {
    /// Cluster mode: whether this node runs the bridges from now on (the manager follows).
    pub fn host_here(&self, here: bool) {
        let was = self
            .elsewhere
            .swap(!here, std::sync::atomic::Ordering::AcqRel);
        if was == here {
            tracing::info!(here, "cluster: this node's share of the bridges changed");
            self.changed.notify_one();
        }
    }
}

impl Bridges {
    /// The status of connection `id` of `solution`, if it runs (or is closed).
    pub fn status(&self, solution: &str, id: &str) -> Option<Arc<Status>> {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(solution.to_owned(), id.to_owned()))
            .cloned()
    }

    /// Every status: (solution, connection ID, status), ordered.
    pub fn all(&self) -> Vec<(String, String, Arc<Status>)> {
        let mut all: Vec<_> = self
            .statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|((s, c), status)| (s.clone(), c.clone(), status.clone()))
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    fn insert(&self, solution: &str, id: &str, status: Arc<Status>) {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((solution.to_owned(), id.to_owned()), status);
    }

    fn remove(&self, solution: &str, id: &str) {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(solution.to_owned(), id.to_owned()));
    }
}

/// Resolves once `flag` is true (or its sender is gone), holding no borrow of it after.
pub async fn until_set(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// After a failed attempt: records `failure` in `status`, waits out the backoff (at least
/// `least`) — starting over at the shortest wait if the connection had held for
/// [`STABLE_AFTER`], so one that fails soon after connecting (a broken target, a poison
/// message) keeps backing off. `false` if `stop` was set meanwhile.
pub async fn back_off(
    status: &Status,
    backoff: &mut Backoff,
    failure: String,
    least: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if let (State::Connected, since) = status.state()
        && since.elapsed().unwrap_or_default() >= STABLE_AFTER
    {
        backoff.reset();
    }
    status.set(State::Failed(failure));
    let wait = backoff.next_wait().max(least);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = until_set(stop) => false,
    }
}

/// Exponential backoff with jitter between connection attempts.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: MIN_BACKOFF }
    }
}

impl Backoff {
    /// The wait before the next attempt: the current step with up to ±25 % jitter; the step
    /// doubles up to [`MAX_BACKOFF`].
    pub fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        let jitter = crate::auth::secret::random_bytes::<2>()
            .map(u16::from_le_bytes)
            .unwrap_or(0);
        // 0.75 … 1.25 of the step.
        let factor = 0.75 + f64::from(jitter) / f64::from(u16::MAX) * 0.5;
        step.mul_f64(factor)
    }

    /// A connection that worked starts over at the shortest wait.
    pub fn reset(&mut self) {
        self.next = MIN_BACKOFF;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_bound_and_resets() {
        let mut b = Backoff::default();
        let first = b.next_wait();
        assert!(first >= MIN_BACKOFF.mul_f64(0.74) && first <= MIN_BACKOFF.mul_f64(1.26));
        let second = b.next_wait();
        assert!(second >= (MIN_BACKOFF * 2).mul_f64(0.74));
        for _ in 0..20 {
            assert!(b.next_wait() <= MAX_BACKOFF.mul_f64(1.26));
        }
        b.reset();
        assert!(b.next_wait() <= MIN_BACKOFF.mul_f64(1.26));
    }

    #[test]
    fn a_status_shows_its_last_error_and_counters() {
        let s = Status::new("amqp-091", "127.0.0.1:5672".into());
        s.set(State::Connected);
        s.count_in();
        s.set(State::Failed("connection refused".into()));
        let v = s.to_json("hub");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["lastError"], "connection refused");
        assert_eq!(v["counters"]["in"], 1);
        assert_eq!(v["connects"], 1);
    }
}
