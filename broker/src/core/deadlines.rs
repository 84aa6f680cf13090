//! One timer for the deadlines of every connection (MQTT keep-alive, token expiry) instead of
//! a `tokio::time::Sleep` in each connection's task: a `Sleep` is ~100 bytes with its timer
//! entry, kept by every idle connection for its keep-alive. A connection registers the instant
//! it must look again; this timer's one task raises [`Signal::Deadline`] on the connection's
//! link then, to the millisecond as a `Sleep` would.
//!
//! Entries are never removed: when a deadline moves later (a packet arrived) the old entry
//! fires, the connection finds its deadline not reached and registers the new one — once per
//! keep-alive interval for a busy connection, not once per packet. The entry of a connection
//! that ended holds its link's allocation (a `Weak`, ~64 bytes) until it fires.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::core::session::{Link, Signal};

/// The fewest entries at which ended connections' entries are looked for.
const MIN_COMPACT_AT: usize = 4096;

/// The deadlines of every connection of a core.
#[derive(Debug, Default)]
pub struct Deadlines {
    state: Mutex<State>,
    /// Wakes the timer's task when a deadline earlier than the one it sleeps until arrives.
    earlier: Notify,
}

#[derive(Debug, Default)]
struct State {
    entries: BinaryHeap<Entry>,
    /// The timer's task runs: spawned by the first registration, on that caller's runtime,
    /// and spawned again if that runtime went away (tests run one per test).
    running: bool,
    /// What the task sleeps until (`None`: until a registration).
    sleeping_until: Option<Instant>,
    /// At this many entries, those of links that are gone are dropped (see `register`).
    compact_at: usize,
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    link: Weak<Link>,
}

// The heap's top is the earliest entry.
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Entry {}

impl Deadlines {
    fn state(&self) -> MutexGuard<'_, State> {
        // Every change is a push or pop with no panic in between: a poisoned lock still holds
        // a consistent heap.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Raises [`Signal::Deadline`] on `link` at `at`. Must be called within a tokio runtime.
    pub fn register(self: &Arc<Self>, at: Instant, link: &Arc<Link>) {
        let mut state = self.state();
        // Entries of ended connections wait for their instant, which a client sets up to
        // 65,535 s × 1.5 ahead: a reconnect churn with long keep-alives would pile them up.
        // When the heap doubles past what was live at the last compaction, the dead ones go
        // (amortized O(1) per registration).
        if state.entries.len() >= state.compact_at.max(MIN_COMPACT_AT) {
            state.entries.retain(|entry| entry.link.strong_count() > 0);
            state.compact_at = state.entries.len().saturating_mul(2);
        }
        state.entries.push(Entry {
            at,
            link: Arc::downgrade(link),
        });
        if !state.running {
            state.running = true;
            drop(state);
            tokio::spawn(self.clone().run());
        } else if state.sleeping_until.is_none_or(|until| at < until) {
            drop(state);
            // A permit if the task is not waiting yet: it looks at the heap again before it
            // sleeps.
            self.earlier.notify_one();
        }
    }

    /// The number of entries (fired ones are gone).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.state().entries.len()
    }

    /// The timer's task: raises every deadline that has come, sleeps until the next one.
    async fn run(self: Arc<Self>) {
        // Dropped with the task (its runtime shut down): the next registration spawns anew.
        let _running = Running(self.clone());
        let mut due = Vec::new();
        loop {
            let next = {
                let mut state = self.state();
                let now = Instant::now();
                while let Some(entry) = state.entries.peek_mut()
                    && entry.at <= now
                {
                    due.push(std::collections::binary_heap::PeekMut::pop(entry).link);
                }
                state.sleeping_until = state.entries.peek().map(|entry| entry.at);
                state.sleeping_until
            };
            // Raised outside the lock: each wakes a task.
            for link in due.drain(..) {
                if let Some(link) = link.upgrade() {
                    link.raise(Signal::Deadline);
                }
            }
            match next {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.earlier.notified() => {}
                    }
                }
                None => self.earlier.notified().await,
            }
        }
    }
}

/// Marks the timer's task as gone when it is dropped.
struct Running(Arc<Deadlines>);

impl Drop for Running {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.running = false;
        state.sleeping_until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::session::Protocol;
    use std::task::Poll;
    use std::time::Duration;

    fn deadline_raised(link: &Link) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        link.poll_take(&mut cx, Signal::Deadline) == Poll::Ready(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_is_raised_on_its_link_when_it_comes_and_not_before() {
        let deadlines = Arc::new(Deadlines::default());
        let start = Instant::now();
        let late = Arc::new(Link::new(Protocol::Mqtt, None));
        let early = Arc::new(Link::new(Protocol::Mqtt, None));
        deadlines.register(start + Duration::from_secs(10), &late);
        // Registered after a later one: the sleeping task must wake earlier for it.
        tokio::time::sleep(Duration::from_millis(1)).await;
        deadlines.register(start + Duration::from_secs(2), &early);

        tokio::time::sleep_until(start + Duration::from_millis(1999)).await;
        assert!(!deadline_raised(&early));
        tokio::time::sleep_until(start + Duration::from_millis(2001)).await;
        assert!(deadline_raised(&early));
        assert!(!deadline_raised(&late));
        tokio::time::sleep_until(start + Duration::from_millis(10_001)).await;
        assert!(deadline_raised(&late));
        assert_eq!(deadlines.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_of_ended_connections_do_not_pile_up_until_their_far_deadlines() {
        let deadlines = Arc::new(Deadlines::default());
        let live = Arc::new(Link::new(Protocol::Mqtt, None));
        let far = Instant::now() + Duration::from_secs(98_302);
        deadlines.register(far, &live);
        // A reconnect churn: 100,000 connections, each gone right after registering.
        for _ in 0..100_000 {
            let gone = Arc::new(Link::new(Protocol::Mqtt, None));
            deadlines.register(far, &gone);
        }
        assert!(
            deadlines.len() <= 2 * MIN_COMPACT_AT,
            "{} entries held",
            deadlines.len()
        );
        tokio::time::sleep_until(far + Duration::from_millis(1)).await;
        assert!(
            deadline_raised(&live),
            "the live connection's deadline was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_entry_of_a_link_that_is_gone_fires_into_nothing() {
        let deadlines = Arc::new(Deadlines::default());
        let link = Arc::new(Link::new(Protocol::Mqtt, None));
        deadlines.register(Instant::now() + Duration::from_secs(1), &link);
        drop(link);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(deadlines.len(), 0);
    }
}
