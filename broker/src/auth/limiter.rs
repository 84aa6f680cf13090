//! Rate limiting of failed authentication (DESIGN.md §2), per source address *and* claimed
//! identity, so that one misconfigured device behind a carrier NAT cannot lock out its fleet.
//!
//! - **Per identity** (address, claimed identity — the user name and client ID a client gave):
//!   the first `free_failures` failures cost nothing; after that each failure doubles the time
//!   the identity must wait before its next attempt is checked (`base_delay`, 2×, 4×, … up to
//!   `max_delay`). An attempt inside that wait is refused without checking credentials (no JWT
//!   verification, no digest). A success clears the identity's failures; failures older than
//!   `forget_after` are forgotten. A correct credential is never refused because *other*
//!   identities failed from the same address.
//! - **Per address**, coarse, against floods of distinct identities: a token bucket of failures
//!   (`address_burst`, refilling at `address_refill_per_second`); while it is empty every
//!   attempt from the address is *slowed* (`flood_delay` before it is checked), never refused.
//!
//! Identities are kept as keyed hashes (a random key per process), never as the strings a
//! client sent. Memory is bounded: at most `max_tracked` identities and as many addresses;
//! when full, records that carry no information any more go first, then the oldest. Time is
//! passed in (`Instant`), so tests need no sleeps.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Settings of a [`FailureLimiter`].
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Failures an identity may have before its attempts are delayed.
    pub free_failures: u32,
    /// The wait after the first failure beyond the free ones; it doubles with each further one.
    pub base_delay: Duration,
    /// The longest wait.
    pub max_delay: Duration,
    /// An identity's failures are forgotten this long after its last one.
    pub forget_after: Duration,
    /// Failures (of any identity) an address may have in a row before its attempts are slowed.
    pub address_burst: u32,
    /// Address failures forgiven per second.
    pub address_refill_per_second: f64,
    /// How long an attempt from a flooding address waits before it is checked.
    pub flood_delay: Duration,
    /// Identities (and addresses) tracked at most.
    pub max_tracked: usize,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            free_failures: 10,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(60 * 60),
            address_burst: 100,
            address_refill_per_second: 10.0,
            flood_delay: Duration::from_secs(1),
            max_tracked: 100_000,
        }
    }
}

/// Whether an attempt may be checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    Allowed,
    /// Check it, but only after `delay` (the address is flooding).
    Slowed {
        delay: Duration,
    },
    /// Refuse without checking; the identity may try again after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct IdentityRecord {
    failures: u32,
    last: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug, Default)]
struct State {
    identities: HashMap<(IpAddr, u64), IdentityRecord>,
    addresses: HashMap<IpAddr, Bucket>,
}

/// Failed-authentication records per (address, identity) and per address.
#[derive(Debug)]
pub struct FailureLimiter {
    config: LimiterConfig,
    hasher: RandomState,
    state: Mutex<State>,
}

impl FailureLimiter {
    pub fn new(config: LimiterConfig) -> Self {
        FailureLimiter {
            config,
            hasher: RandomState::new(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Records are replaced whole: a poisoned lock still holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key(&self, address: IpAddr, identity: &str) -> (IpAddr, u64) {
        (address, self.hasher.hash_one(identity))
    }

    /// The wait after `failures` failures (zero while they are free).
    fn delay_after(&self, failures: u32) -> Duration {
        let Some(beyond) = failures.checked_sub(self.config.free_failures) else {
            return Duration::ZERO;
        };
        let factor = 1u32.checked_shl(beyond.min(31)).unwrap_or(u32::MAX);
        self.config
            .base_delay
            .saturating_mul(factor)
            .min(self.config.max_delay)
    }

    fn live(&self, record: IdentityRecord, now: Instant) -> bool {
        now.saturating_duration_since(record.last) < self.config.forget_after
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.config.address_refill_per_second)
            .min(f64::from(self.config.address_burst))
    }

    /// Whether an attempt of `identity` from `address` may be checked now.
    pub fn admit(&self, address: IpAddr, identity: &str, now: Instant) -> Admission {
        let key = self.key(address, identity);
        let state = self.state();
        if let Some(record) = state.identities.get(&key).copied()
            && self.live(record, now)
        {
            let until = record.last + self.delay_after(record.failures);
            if now < until {
                return Admission::Limited {
                    retry_after: until - now,
                };
            }
        }
        match state.addresses.get(&address) {
            Some(bucket) if self.refilled(*bucket, now) < 1.0 => Admission::Slowed {
                delay: self.config.flood_delay,
            },
            _ => Admission::Allowed,
        }
    }

    /// Records a failed attempt of `identity` from `address`.
    pub fn record_failure(&self, address: IpAddr, identity: &str, now: Instant) {
        let key = self.key(address, identity);
        let mut state = self.state();
        if !state.identities.contains_key(&key) && state.identities.len() >= self.config.max_tracked
        {
            self.make_room_for_identity(&mut state.identities, now);
        }
        let failures = match state.identities.get(&key) {
            Some(record) if self.live(*record, now) => record.failures.saturating_add(1),
            _ => 1,
        };
        state.identities.insert(
            key,
            IdentityRecord {
                failures,
                last: now,
            },
        );
        if !state.addresses.contains_key(&address)
            && state.addresses.len() >= self.config.max_tracked
        {
            self.make_room_for_address(&mut state.addresses, now);
        }
        let full = Bucket {
            tokens: f64::from(self.config.address_burst),
            updated: now,
        };
        let current = state.addresses.get(&address).copied().unwrap_or(full);
        let tokens = (self.refilled(current, now) - 1.0).max(0.0);
        state.addresses.insert(
            address,
            Bucket {
                tokens,
                updated: now,
            },
        );
    }

    /// A correct credential: the identity's failures are cleared.
    pub fn record_success(&self, address: IpAddr, identity: &str) {
        let key = self.key(address, identity);
        self.state().identities.remove(&key);
    }

    fn make_room_for_identity(
        &self,
        identities: &mut HashMap<(IpAddr, u64), IdentityRecord>,
        now: Instant,
    ) {
        identities.retain(|_, r| self.live(*r, now));
        if identities.len() >= self.config.max_tracked
            && let Some(oldest) = identities
                .iter()
                .min_by_key(|(_, r)| r.last)
                .map(|(k, _)| *k)
        {
            identities.remove(&oldest);
        }
    }

    fn make_room_for_address(&self, addresses: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let burst = f64::from(self.config.address_burst);
        addresses.retain(|_, b| self.refilled(*b, now) < burst);
        if addresses.len() >= self.config.max_tracked
            && let Some(oldest) = addresses
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(a, _)| *a)
        {
            addresses.remove(&oldest);
        }
    }

    /// Identities currently tracked.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state().identities.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(free: u32, max_tracked: usize) -> FailureLimiter {
        FailureLimiter::new(LimiterConfig {
            free_failures: free,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            forget_after: Duration::from_secs(600),
            address_burst: 20,
            address_refill_per_second: 1.0,
            flood_delay: Duration::from_millis(500),
            max_tracked,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn a_brute_force_on_one_identity_waits_longer_after_each_failure() {
        let l = limiter(3, 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit(A, "sol/dev-1", t0), Admission::Allowed);
            l.record_failure(A, "sol/dev-1", t0);
        }
        // The free failures are spent: 1 s, then 2 s, then 4 s.
        assert_eq!(
            l.admit(A, "sol/dev-1", t0),
            Admission::Limited {
                retry_after: Duration::from_secs(1)
            }
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.admit(A, "sol/dev-1", t1), Admission::Allowed);
        l.record_failure(A, "sol/dev-1", t1);
        assert_eq!(
            l.admit(A, "sol/dev-1", t1),
            Admission::Limited {
                retry_after: Duration::from_secs(2)
            }
        );
        let t2 = t1 + Duration::from_secs(2);
        l.record_failure(A, "sol/dev-1", t2);
        assert!(matches!(
            l.admit(A, "sol/dev-1", t2 + Duration::from_millis(3_900)),
            Admission::Limited { .. }
        ));
        assert_eq!(
            l.admit(A, "sol/dev-1", t2 + Duration::from_secs(4)),
            Admission::Allowed
        );
    }

    #[test]
    fn neighbours_behind_the_same_address_are_not_refused() {
        let l = limiter(3, 10);
        let t0 = Instant::now();
        for _ in 0..10 {
            l.record_failure(A, "sol/broken-device", t0);
        }
        assert!(matches!(
            l.admit(A, "sol/broken-device", t0),
            Admission::Limited { .. }
        ));
        assert_eq!(l.admit(A, "sol/dev-2", t0), Admission::Allowed);
        assert_eq!(l.admit(B, "sol/broken-device", t0), Admission::Allowed);
    }

    #[test]
    fn a_success_clears_the_identity_and_old_failures_are_forgotten() {
        let l = limiter(1, 10);
        let t0 = Instant::now();
        l.record_failure(A, "x", t0);
        l.record_failure(A, "x", t0);
        assert!(matches!(l.admit(A, "x", t0), Admission::Limited { .. }));
        l.record_success(A, "x");
        assert_eq!(l.admit(A, "x", t0), Admission::Allowed);
        for _ in 0..5 {
            l.record_failure(A, "y", t0);
        }
        assert_eq!(
            l.admit(A, "y", t0 + Duration::from_secs(600)),
            Admission::Allowed
        );
    }

    #[test]
    fn a_flood_of_distinct_identities_slows_the_address_without_refusing() {
        let l = limiter(3, 1000);
        let t0 = Instant::now();
        for i in 0..20 {
            l.record_failure(A, &format!("guess-{i}"), t0);
        }
        assert_eq!(
            l.admit(A, "sol/dev-1", t0),
            Admission::Slowed {
                delay: Duration::from_millis(500)
            }
        );
        assert_eq!(l.admit(B, "sol/dev-1", t0), Admission::Allowed);
        // One failure forgiven per second.
        assert_eq!(
            l.admit(A, "sol/dev-1", t0 + Duration::from_secs(1)),
            Admission::Allowed
        );
    }

    #[test]
    fn memory_stays_bounded_and_forgotten_records_go_first() {
        let l = limiter(2, 3);
        let t0 = Instant::now();
        for i in 0..3 {
            l.record_failure(A, &format!("old-{i}"), t0);
        }
        l.record_failure(B, "new", t0);
        assert_eq!(l.tracked(), 3);
        let later = t0 + Duration::from_secs(601);
        l.record_failure(B, "newer", later);
        assert_eq!(l.tracked(), 1);
    }
}
