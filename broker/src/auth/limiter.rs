//! Rate limiting of failed authentication, per source address (DESIGN.md §2).
//!
//! Each address has a token bucket of failures: it holds `burst` tokens, refills at `refill`
//! per second, and every failed attempt takes one. An address whose bucket is empty is
//! *limited*: the server refuses its next attempts without checking credentials (no JWT
//! verification, no digest) until a token has come back. Successful attempts cost nothing, so
//! a fleet of devices behind one NAT address is only slowed down by its own failures.
//!
//! Memory is bounded: at most `max_addresses` buckets are kept; when full, buckets that have
//! refilled completely (they carry no information) are dropped first, then the oldest.
//! Time is passed in (`Instant`), so tests need no sleeps.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Settings of a [`FailureLimiter`].
#[derive(Debug, Clone, Copy)]
pub struct LimiterConfig {
    /// Failures an address may have in a row before it is limited.
    pub burst: u32,
    /// Failures forgiven per second.
    pub refill_per_second: f64,
    /// Addresses tracked at most.
    pub max_addresses: usize,
}

impl Default for LimiterConfig {
    fn default() -> Self {
        LimiterConfig {
            burst: 10,
            refill_per_second: 1.0,
            max_addresses: 100_000,
        }
    }
}

/// Whether an attempt from an address may be checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    Allowed,
    /// Refuse without checking; a token comes back after `retry_after`.
    Limited {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Failed-authentication buckets per source address.
#[derive(Debug)]
pub struct FailureLimiter {
    config: LimiterConfig,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl FailureLimiter {
    pub fn new(config: LimiterConfig) -> Self {
        FailureLimiter {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.config.refill_per_second).min(f64::from(self.config.burst))
    }

    /// Whether an attempt from `address` may be checked now.
    pub fn admit(&self, address: IpAddr, now: Instant) -> Admission {
        let buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(bucket) = buckets.get(&address) else {
            return Admission::Allowed;
        };
        let tokens = self.refilled(*bucket, now);
        if tokens >= 1.0 {
            return Admission::Allowed;
        }
        let missing = 1.0 - tokens;
        let retry_after = if self.config.refill_per_second > 0.0 {
            Duration::from_secs_f64(missing / self.config.refill_per_second)
        } else {
            Duration::MAX
        };
        Admission::Limited { retry_after }
    }

    /// Records a failed attempt from `address`.
    pub fn record_failure(&self, address: IpAddr, now: Instant) {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !buckets.contains_key(&address) && buckets.len() >= self.config.max_addresses {
            self.make_room(&mut buckets, now);
        }
        let full = Bucket {
            tokens: f64::from(self.config.burst),
            updated: now,
        };
        let current = buckets.get(&address).copied().unwrap_or(full);
        let tokens = (self.refilled(current, now) - 1.0).max(0.0);
        buckets.insert(
            address,
            Bucket {
                tokens,
                updated: now,
            },
        );
    }

    /// Drops buckets that have refilled, or else the least recently updated one.
    fn make_room(&self, buckets: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        let burst = f64::from(self.config.burst);
        buckets.retain(|_, b| self.refilled(*b, now) < burst);
        if buckets.len() >= self.config.max_addresses
            && let Some(oldest) = buckets
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(a, _)| *a)
        {
            buckets.remove(&oldest);
        }
    }

    /// Addresses currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: u32, refill: f64, max: usize) -> FailureLimiter {
        FailureLimiter::new(LimiterConfig {
            burst,
            refill_per_second: refill,
            max_addresses: max,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn an_address_is_limited_after_its_burst_of_failures_and_recovers_with_time() {
        let l = limiter(3, 0.5, 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit(A, t0), Admission::Allowed);
            l.record_failure(A, t0);
        }
        let Admission::Limited { retry_after } = l.admit(A, t0) else {
            panic!("not limited after 3 failures");
        };
        assert_eq!(retry_after, Duration::from_secs(2));
        assert_eq!(
            l.admit(B, t0),
            Admission::Allowed,
            "other addresses are not affected"
        );
        assert!(matches!(
            l.admit(A, t0 + Duration::from_millis(1_900)),
            Admission::Limited { .. }
        ));
        assert_eq!(l.admit(A, t0 + Duration::from_secs(2)), Admission::Allowed);
    }

    #[test]
    fn memory_stays_bounded_and_refilled_buckets_go_first() {
        let l = limiter(2, 1.0, 3);
        let t0 = Instant::now();
        for i in 0..3u8 {
            l.record_failure(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i)), t0);
        }
        l.record_failure(A, t0);
        l.record_failure(A, t0);
        assert_eq!(l.tracked(), 3);
        assert!(
            matches!(l.admit(A, t0), Admission::Limited { .. }),
            "the newest limited address was dropped"
        );
        // Much later every old bucket has refilled: they are dropped, not the new one.
        let later = t0 + Duration::from_secs(60);
        l.record_failure(B, later);
        assert_eq!(l.tracked(), 1);
    }
}
