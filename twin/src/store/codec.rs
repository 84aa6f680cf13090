//! Binary encodings of events (journal record payloads) and entities (snapshot entries).
//!
//! All integers are little-endian. A string is `u32 length ‖ UTF-8 bytes`; a JSON value is a
//! string holding its compact JSON text (compact enough, and readable with `strings` in an
//! emergency).
//!
//! ```text
//! event  = kind u8 ‖ action u8 ‖ revision u64 ‖ timestamp i64 (Unix ms) ‖ id str ‖ path str
//!          ‖ has_value u8 (0|1) ‖ [value json]
//! entity = kind u8 ‖ revision u64 ‖ created i64 ‖ modified i64 ‖ id str ‖ doc json
//! ```

use policy::Timestamp;
use serde_json::Value;

use crate::entity::{Entity, EntityKey, EntityKind, Event, EventAction};

/// Why bytes could not be decoded (the caller adds file and offset).
pub(crate) type DecodeError = String;

fn kind_code(kind: EntityKind) -> u8 {
    match kind {
        EntityKind::Thing => 1,
        EntityKind::Policy => 2,
        EntityKind::Solution => 3,
        EntityKind::Retained => 4,
        EntityKind::Session => 5,
        EntityKind::Queued => 6,
    }
}

fn kind_of(code: u8) -> Result<EntityKind, DecodeError> {
    match code {
        1 => Ok(EntityKind::Thing),
        2 => Ok(EntityKind::Policy),
        3 => Ok(EntityKind::Solution),
        4 => Ok(EntityKind::Retained),
        5 => Ok(EntityKind::Session),
        6 => Ok(EntityKind::Queued),
        other => Err(format!("unknown entity kind {other}")),
    }
}

fn action_code(action: EventAction) -> u8 {
    match action {
        EventAction::Created => 1,
        EventAction::Modified => 2,
        EventAction::Merged => 3,
        EventAction::Deleted => 4,
    }
}

fn action_of(code: u8) -> Result<EventAction, DecodeError> {
    match code {
        1 => Ok(EventAction::Created),
        2 => Ok(EventAction::Modified),
        3 => Ok(EventAction::Merged),
        4 => Ok(EventAction::Deleted),
        other => Err(format!("unknown event action {other}")),
    }
}

/// Appends `len ‖ bytes`; false when `bytes` is longer than a `u32` can say.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let Ok(len) = u32::try_from(bytes.len()) else {
        return false;
    };
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    true
}

/// Appends a JSON value as a length-prefixed string, serialized in place.
fn put_json(out: &mut Vec<u8>, value: &Value) -> bool {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    if serde_json::to_writer(&mut *out, value).is_err() {
        return false;
    }
    let Ok(len) = u32::try_from(out.len() - at - 4) else {
        return false;
    };
    match out.get_mut(at..at + 4) {
        Some(slot) => {
            slot.copy_from_slice(&len.to_le_bytes());
            true
        }
        None => false,
    }
}

/// Appends the encoding of `event` to `out`; false if a part is too large to encode (nothing
/// sensible fits a journal record then; the caller reports it).
pub(crate) fn put_event(out: &mut Vec<u8>, event: &Event) -> bool {
    out.push(kind_code(event.key.kind));
    out.push(action_code(event.action));
    out.extend_from_slice(&event.revision.to_le_bytes());
    out.extend_from_slice(&event.timestamp.unix_millis().to_le_bytes());
    if !put_bytes(out, event.key.id.as_bytes()) || !put_bytes(out, event.path.as_bytes()) {
        return false;
    }
    match &event.value {
        None => {
            out.push(0);
            true
        }
        Some(value) => {
            out.push(1);
            put_json(out, value)
        }
    }
}

pub(crate) fn decode_event(bytes: &[u8]) -> Result<Event, DecodeError> {
    let mut r = Reader { bytes };
    let kind = kind_of(r.u8()?)?;
    let action = action_of(r.u8()?)?;
    let revision = r.u64()?;
    let timestamp = Timestamp::from_unix_millis(r.i64()?);
    let id = r.string()?;
    let path = r.string()?;
    let value = match r.u8()? {
        0 => None,
        1 => Some(r.json()?),
        other => return Err(format!("invalid value marker {other}")),
    };
    r.end()?;
    Ok(Event {
        key: EntityKey { kind, id },
        action,
        path,
        value,
        revision,
        timestamp,
    })
}

pub(crate) fn put_entity(out: &mut Vec<u8>, entity: &Entity) -> bool {
    out.push(kind_code(entity.key.kind));
    out.extend_from_slice(&entity.revision.to_le_bytes());
    out.extend_from_slice(&entity.created.unix_millis().to_le_bytes());
    out.extend_from_slice(&entity.modified.unix_millis().to_le_bytes());
    put_bytes(out, entity.key.id.as_bytes()) && put_json(out, &entity.doc)
}

pub(crate) fn decode_entity(bytes: &[u8]) -> Result<Entity, DecodeError> {
    let mut r = Reader { bytes };
    let kind = kind_of(r.u8()?)?;
    let revision = r.u64()?;
    let created = Timestamp::from_unix_millis(r.i64()?);
    let modified = Timestamp::from_unix_millis(r.i64()?);
    let id = r.string()?;
    let doc = r.json()?;
    r.end()?;
    Ok(Entity {
        key: EntityKey { kind, id },
        doc,
        revision,
        created,
        modified,
        // Measured at the first change (the snapshot does not keep it).
        size: None,
    })
}

/// A cursor over bytes that never reads past the end.
pub(crate) struct Reader<'a> {
    pub(crate) bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(format!("needs {n} more bytes, {} left", self.bytes.len()));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn len_prefixed(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u32()?).map_err(|e| e.to_string())?;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.len_prefixed()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not UTF-8".to_owned())
    }

    fn json(&mut self) -> Result<Value, DecodeError> {
        serde_json::from_slice(self.len_prefixed()?).map_err(|e| format!("invalid JSON value: {e}"))
    }

    fn end(&self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} unexpected bytes after the end",
                self.bytes.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_round_trip_through_their_encoding() {
        for (action, value) in [
            (
                EventAction::Created,
                Some(json!({"attributes": {"a": [1, "x", null]}})),
            ),
            (EventAction::Modified, Some(json!(21.5))),
            (EventAction::Merged, Some(json!({"a": null}))),
            (EventAction::Deleted, None),
        ] {
            let event = Event {
                key: EntityKey::new(EntityKind::Policy, "org.acme:p~1"),
                action,
                path: "/features/ü/properties/a~0b".into(),
                value,
                revision: u64::MAX - 1,
                timestamp: Timestamp::from_unix_millis(-5),
            };
            let mut bytes = Vec::new();
            assert!(put_event(&mut bytes, &event));
            assert_eq!(decode_event(&bytes).unwrap(), event);
            for cut in 0..bytes.len() {
                assert!(
                    decode_event(&bytes[..cut]).is_err(),
                    "prefix of {cut} bytes"
                );
            }
        }
    }

    #[test]
    fn entities_round_trip_through_their_encoding() {
        let entity = Entity {
            key: EntityKey::new(EntityKind::Solution, "acme"),
            doc: json!({"namespaces": ["org.acme"], "n": 1.5e300}),
            revision: 7,
            created: Timestamp::from_unix_millis(1),
            modified: Timestamp::from_unix_millis(i64::MAX),
            size: None,
        };
        let mut bytes = Vec::new();
        assert!(put_entity(&mut bytes, &entity));
        assert_eq!(decode_entity(&bytes).unwrap(), entity);
        bytes.push(0);
        assert!(decode_entity(&bytes).is_err());
    }
}
