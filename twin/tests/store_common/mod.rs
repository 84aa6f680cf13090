//! Helpers shared by the store tests: events, a blocking write helper, a log capture.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    dead_code
)]

use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use twin::policy::Timestamp;
use twin::store::{StoreOptions, TwinStore, TwinStoreExt, Written};
use twin::{Entity, EntityKey, EntityKind, Event, EventAction};

/// Options for tests: no time-based snapshots, small delay.
pub fn options(dir: &Path) -> StoreOptions {
    let mut options = StoreOptions::new(dir);
    options.snapshot_every = None;
    options.snapshot_every_events = 0;
    options.group_commit_delay = Duration::from_millis(1);
    options
}

pub fn thing(id: &str) -> EntityKey {
    EntityKey::new(EntityKind::Thing, id)
}

pub fn event(
    key: &EntityKey,
    action: EventAction,
    path: &str,
    value: Option<Value>,
    revision: u64,
) -> Event {
    Event {
        key: key.clone(),
        action,
        path: path.into(),
        value,
        revision,
        timestamp: Timestamp::from_unix_millis(1_700_000_000_000 + revision as i64),
    }
}

/// Creates the thing `id` with attribute `n = value`, or sets `n` if it exists.
pub fn set_n(store: &dyn TwinStore, id: &str, value: u64) -> Written {
    let key = thing(id);
    store
        .write(&key, |current: Option<&Entity>| -> Result<Vec<Event>, Infallible> {
            Ok(vec![match current {
                None => event(
                    &key,
                    EventAction::Created,
                    "",
                    Some(json!({"thingId": id, "policyId": "ns:policy", "attributes": {"n": value}})),
                    1,
                ),
                Some(entity) => event(
                    &key,
                    EventAction::Modified,
                    "/attributes/n",
                    Some(json!(value)),
                    entity.revision + 1,
                ),
            }])
        })
        .unwrap()
}

/// Every entity of the store, sorted by key.
pub fn all_entities(store: &dyn TwinStore) -> Vec<Entity> {
    let mut keys = Vec::new();
    for kind in [EntityKind::Thing, EntityKind::Policy, EntityKind::Solution] {
        keys.extend(store.keys(kind));
    }
    keys.sort();
    keys.iter()
        .map(|key| Entity::clone(&store.get(key).unwrap()))
        .collect()
}

/// The journal segments and snapshot files of a data directory, sorted by name.
pub fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(prefix)
        })
        .collect();
    files.sort();
    files
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A tracing subscriber that keeps every event as a line `LEVEL field=value …`.
#[derive(Debug, Clone, Default)]
pub struct Logs(pub Arc<Mutex<Vec<String>>>);

thread_local! {
    /// The lines of the thread's running [`Logs::capture`], if any.
    static CAPTURED: std::cell::RefCell<Option<Logs>> = const { std::cell::RefCell::new(None) };
}

/// The process-wide subscriber: hands each event to the capture running on its thread.
///
/// A global subscriber rather than `with_default` per test: tracing caches each callsite's
/// interest across threads, and a callsite first hit on a thread without a subscriber can stay
/// disabled for a test running in parallel (a flaky missing warning).
struct ToCapture;

impl tracing::Subscriber for ToCapture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        CAPTURED.with(|c| {
            if let Some(logs) = c.borrow().as_ref() {
                tracing::Subscriber::event(logs, event);
            }
        });
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl Logs {
    /// Runs `f`, collecting what the store logs on this thread meanwhile.
    pub fn capture<T>(&self, f: impl FnOnce() -> T) -> T {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let _ = tracing::subscriber::set_global_default(ToCapture);
        });
        CAPTURED.with(|c| *c.borrow_mut() = Some(self.clone()));
        let result = f();
        CAPTURED.with(|c| *c.borrow_mut() = None);
        result
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl tracing::Subscriber for Logs {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = format!("{} ", event.metadata().level());
        event.record(
            &mut |field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
                let _ = write!(line, "{}={:?} ", field.name(), value);
            },
        );
        self.0.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
