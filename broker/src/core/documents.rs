//! Whole documents the broker keeps in the twin store besides things and policies (retained
//! messages, persistent sessions, their queued messages): each is replaced whole with a root
//! `created` event, or removed with `deleted`, through the store's one write path (journal,
//! group commit, recovery).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use twin::entity::{Entity, EntityKey, Event, EventAction};
use twin::store::{Durable, EmbeddedStore, StoreError, TwinStoreExt, WriteError};

/// Replaces the document `key` with `doc`, or removes it (`None`; nothing happens if there is
/// none). The handle completes once the write is durable.
pub fn put(
    store: &EmbeddedStore,
    key: &EntityKey,
    doc: Option<Value>,
) -> Result<Durable, StoreError> {
    let now = crate::core::now();
    let written = store.write(
        key,
        |current: Option<&Entity>| -> Result<Vec<Event>, std::convert::Infallible> {
            let revision = current.map_or(0, |e| e.revision).saturating_add(1);
            let action = match (&doc, current) {
                (None, None) => return Ok(Vec::new()),
                (None, Some(_)) => EventAction::Deleted,
                (Some(_), _) => EventAction::Created,
            };
            Ok(vec![Event {
                key: key.clone(),
                action,
                path: String::new(),
                value: doc.clone(),
                revision,
                timestamp: now,
            }])
        },
    );
    match written {
        Ok(written) => Ok(written.durable),
        Err(WriteError::Store(e)) => Err(e),
        Err(WriteError::Rejected(never)) => match never {},
    }
}

/// Wall-clock milliseconds since the Unix epoch (what a stored document holds for a time).
pub fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A message's expiry instant as stored wall-clock milliseconds.
pub fn expiry_millis(at: Instant) -> u64 {
    millis(SystemTime::now() + at.saturating_duration_since(Instant::now()))
}

/// The whole seconds, rounded up, left until the stored expiry `millis` (the expiry clock runs
/// in seconds); `None`: it has passed.
pub fn seconds_left(millis: u64) -> Option<u32> {
    let left = (UNIX_EPOCH + Duration::from_millis(millis))
        .duration_since(SystemTime::now())
        .ok()?;
    u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).ok()
}
