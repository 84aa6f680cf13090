//! Who may hold a socket (`crate::limits`): sockets still in their handshake (TLS, CONNECT,
//! authentication) and authenticated connections are bounded apart, so that sockets that never
//! finish a CONNECT (a slowloris) cannot take the slots of devices.
//!
//! - A handshake needs a slot of `max_handshakes` before `accept` and, once its source address
//!   is known, one of that address's `max_handshakes_per_address`; without the latter the socket
//!   is closed at once. While more than half of the handshake slots are taken, a handshake gets
//!   at most [`PRESSURE_TIMEOUT`] instead of `connect_timeout_seconds`.
//! - A connection needs one of `max_connections` once its CONNECT is read; at the limit the
//!   client is told at once (CONNACK: v5 0x89 server busy, 3.1.1 3 server unavailable) instead
//!   of waiting in the kernel's accept queue.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// The handshake timeout while more than half of the handshake slots are taken.
pub const PRESSURE_TIMEOUT: Duration = Duration::from_secs(2);

/// The bounds of one server.
#[derive(Debug)]
pub struct Admission {
    handshakes: Arc<Semaphore>,
    max_handshakes: usize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    max_per_address: usize,
    connections: Arc<Semaphore>,
}

/// A socket's place among the handshakes; given back when dropped.
#[derive(Debug)]
pub struct HandshakeSlot {
    admission: Arc<Admission>,
    address: IpAddr,
    _permit: OwnedSemaphorePermit,
}

/// An authenticated connection's place; given back when dropped. The semaphore alone rather
/// than its `OwnedSemaphorePermit` (which adds a count): one word in every connection.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<Semaphore>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

impl Admission {
    pub fn new(max_handshakes: usize, max_per_address: usize, max_connections: usize) -> Self {
        Admission {
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            max_handshakes,
            per_address: Mutex::new(HashMap::new()),
            max_per_address,
            connections: Arc::new(Semaphore::new(max_connections)),
        }
    }

    fn per_address(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Counts are changed one at a time: a poisoned lock still holds consistent counts.
        self.per_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a handshake slot (before `accept`).
    pub async fn handshake_permit(&self) -> Result<OwnedSemaphorePermit, AcquireError> {
        self.handshakes.clone().acquire_owned().await
    }

    /// The slot of a socket from `address`, or `None` if that address has as many handshakes
    /// as it may.
    pub fn enter(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
        address: IpAddr,
    ) -> Option<HandshakeSlot> {
        let mut counts = self.per_address();
        let count = counts.entry(address).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        Some(HandshakeSlot {
            admission: self.clone(),
            address,
            _permit: permit,
        })
    }

    /// The time a handshake may take now: `normal`, or less under pressure.
    pub fn handshake_timeout(&self, normal: Duration) -> Duration {
        let taken = self
            .max_handshakes
            .saturating_sub(self.handshakes.available_permits());
        if taken * 2 > self.max_handshakes {
            normal.min(PRESSURE_TIMEOUT)
        } else {
            normal
        }
    }

    /// A connection slot, if one is free.
    pub fn connection(&self) -> Option<ConnectionSlot> {
        let permit = self.connections.try_acquire().ok()?;
        // Given back by the slot's drop.
        permit.forget();
        Some(ConnectionSlot(self.connections.clone()))
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.admission.per_address();
        if let Some(count) = counts.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Admission, PRESSURE_TIMEOUT};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test]
    async fn one_address_cannot_take_every_handshake_slot_and_pressure_shortens_the_timeout() {
        let admission = Arc::new(Admission::new(4, 2, 10));
        let normal = Duration::from_secs(10);
        let first = admission.enter(admission.handshake_permit().await.unwrap(), A);
        let second = admission.enter(admission.handshake_permit().await.unwrap(), A);
        assert!(first.is_some() && second.is_some());
        assert_eq!(admission.handshake_timeout(normal), normal);
        assert!(
            admission
                .enter(admission.handshake_permit().await.unwrap(), A)
                .is_none(),
            "a third handshake from the same address"
        );
        let other = admission.enter(admission.handshake_permit().await.unwrap(), B);
        assert!(other.is_some(), "another address still gets a slot");
        assert_eq!(admission.handshake_timeout(normal), PRESSURE_TIMEOUT);
        drop(first);
        assert!(
            admission
                .enter(admission.handshake_permit().await.unwrap(), A)
                .is_some(),
            "a finished handshake gives its address's slot back"
        );
    }

    #[test]
    fn connections_are_bounded_apart_from_handshakes() {
        let admission = Admission::new(4, 2, 1);
        let held = admission.connection();
        assert!(held.is_some());
        assert!(admission.connection().is_none());
        drop(held);
        assert!(admission.connection().is_some());
    }
}
