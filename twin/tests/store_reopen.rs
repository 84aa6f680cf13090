//! Reopening a store gives back exactly the state that was written: entities, revisions,
//! timestamps, the policy index — after `close()`, after a plain drop, across snapshots.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod store_common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use proptest::prelude::*;
use serde_json::{Value, json};
use store_common::{all_entities, event, files, options, set_n, thing};
use twin::store::{EmbeddedStore, StoreError, TwinStore, TwinStoreExt, WriteError};
use twin::{Entity, EntityKey, EntityKind, Event, EventAction};

fn open(dir: &std::path::Path) -> EmbeddedStore {
    EmbeddedStore::open(options(dir)).unwrap()
}

#[test]
fn reopened_store_has_identical_entities_revisions_and_policy_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for i in 0..5 {
        for value in 0..=i {
            set_n(&store, &format!("ns:t{i}"), value)
                .durable
                .wait()
                .unwrap();
        }
    }
    let policy = EntityKey::new(EntityKind::Policy, "ns:policy");
    let solution = EntityKey::new(EntityKind::Solution, "acme");
    for (key, doc) in [
        (&policy, json!({"policyId": "ns:policy", "entries": {}})),
        (&solution, json!({"namespaces": ["ns"]})),
    ] {
        store
            .write(key, |_| -> Result<_, Infallible> {
                Ok(vec![event(key, EventAction::Created, "", Some(doc), 1)])
            })
            .unwrap()
            .durable
            .wait()
            .unwrap();
    }
    let gone = thing("ns:t0");
    store
        .write(&gone, |_| -> Result<_, Infallible> {
            Ok(vec![event(&gone, EventAction::Deleted, "", None, 2)])
        })
        .unwrap()
        .durable
        .wait()
        .unwrap();
    let before = all_entities(&store);
    assert_eq!(before.len(), 6);
    store.close().unwrap();

    let store = open(dir.path());
    assert_eq!(all_entities(&store), before);
    assert_eq!(store.get(&thing("ns:t4")).unwrap().revision, 5);
    assert_eq!(store.thing_policy_id("ns:t3").as_deref(), Some("ns:policy"));
    assert_eq!(store.thing_policy_id("ns:t0"), None);
    assert_eq!(store.keys(EntityKind::Solution), vec![solution]);
    // The sequence continues where it stopped.
    assert_eq!(store.last_seq(), 5 * 6 / 2 + 3);
}

#[test]
fn dropping_without_close_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = open(dir.path());
        for value in 0..20 {
            set_n(&store, "ns:a", value).durable.wait().unwrap();
        }
        // Not waited for: drop still writes and syncs what is queued.
        let _ = set_n(&store, "ns:b", 7);
        all_entities(&store)
    };
    let store = open(dir.path());
    assert_eq!(all_entities(&store), before);
    assert!(files(dir.path(), "snapshot-").is_empty());
}

#[test]
fn snapshots_bound_the_journal_and_reopen_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.snapshot_every_events = 50;
    let store = EmbeddedStore::open(opts.clone()).unwrap();
    let mut last = None;
    for value in 0..400 {
        last = Some(set_n(&store, &format!("ns:t{}", value % 7), value).durable);
    }
    last.unwrap().wait().unwrap();
    // Whether the background snapshot at event 400 already ran or not, afterwards the newest
    // snapshot covers everything.
    let _ = store.snapshot().unwrap();
    assert_eq!(store.snapshot().unwrap(), None, "nothing changed since");
    let snapshots = files(dir.path(), "snapshot-");
    assert_eq!(
        snapshots.len(),
        1,
        "older snapshots are removed: {snapshots:?}"
    );
    assert!(
        snapshots[0].ends_with("snapshot-00000000000000000400.snap"),
        "{snapshots:?}"
    );
    let segments = files(dir.path(), "journal-");
    assert_eq!(
        segments.len(),
        1,
        "covered segments are removed: {segments:?}"
    );
    assert!(segments[0].ends_with("journal-00000000000000000401.log"));
    let before = all_entities(&store);
    drop(store);

    let store = EmbeddedStore::open(opts).unwrap();
    assert_eq!(all_entities(&store), before);
    set_n(&store, "ns:t1", 1000).durable.wait().unwrap();
    assert_eq!(store.last_seq(), 401);
}

#[test]
fn the_policy_index_follows_every_change_of_a_things_policy_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let key = thing("ns:t");
    let write = |action, path: &str, value: Option<Value>| {
        store
            .write(&key, |current| -> Result<_, Infallible> {
                let revision = current.map_or(1, |e| e.revision + 1);
                Ok(vec![event(&key, action, path, value, revision)])
            })
            .unwrap()
    };
    let _ = write(EventAction::Created, "", Some(json!({"policyId": "ns:p1"})));
    assert_eq!(store.thing_policy_id("ns:t").as_deref(), Some("ns:p1"));
    let _ = write(EventAction::Modified, "/policyId", Some(json!("ns:p2")));
    assert_eq!(store.thing_policy_id("ns:t").as_deref(), Some("ns:p2"));
    let _ = write(EventAction::Merged, "", Some(json!({"policyId": "ns:p3"})));
    assert_eq!(store.thing_policy_id("ns:t").as_deref(), Some("ns:p3"));
    let _ = write(EventAction::Deleted, "/policyId", None);
    assert_eq!(store.thing_policy_id("ns:t"), None);
    let _ = write(
        EventAction::Modified,
        "",
        Some(json!({"policyId": "ns:p4"})),
    );
    write(EventAction::Deleted, "", None)
        .durable
        .wait()
        .unwrap();
    assert_eq!(store.thing_policy_id("ns:t"), None);
    assert_eq!(store.get(&key), None);
}

#[test]
fn a_refused_decision_changes_nothing_and_reaches_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    set_n(&store, "ns:t", 1).durable.wait().unwrap();
    let result = store.write(&thing("ns:t"), |current| {
        assert_eq!(current.unwrap().revision, 1);
        Err::<Vec<Event>, _>(twin::DittoError::new(
            412,
            "things:precondition.failed",
            "no",
        ))
    });
    match result {
        Err(WriteError::Rejected(e)) => assert_eq!(e.status, 412),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.get(&thing("ns:t")).unwrap().revision, 1);
    assert_eq!(store.last_seq(), 1);
}

#[test]
fn events_that_do_not_apply_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    set_n(&store, "ns:t", 1).durable.wait().unwrap();
    let key = thing("ns:t");
    let stale = store.write(&key, |_| -> Result<_, Infallible> {
        Ok(vec![
            event(
                &key,
                EventAction::Modified,
                "/attributes/n",
                Some(json!(2)),
                2,
            ),
            event(
                &key,
                EventAction::Modified,
                "/attributes/n",
                Some(json!(3)),
                2,
            ),
        ])
    });
    assert!(
        matches!(stale, Err(WriteError::Store(StoreError::Apply { .. }))),
        "{stale:?}"
    );
    let other = thing("ns:other");
    let foreign = store.write(&key, |_| -> Result<_, Infallible> {
        Ok(vec![event(
            &other,
            EventAction::Created,
            "",
            Some(json!({})),
            1,
        )])
    });
    assert!(
        matches!(
            foreign,
            Err(WriteError::Store(StoreError::ForeignEvent { .. }))
        ),
        "{foreign:?}"
    );
    assert_eq!(
        store.get(&key).unwrap().doc,
        json!({"thingId": "ns:t", "policyId": "ns:policy", "attributes": {"n": 1}})
    );
    assert_eq!(store.get(&other), None);
    assert_eq!(store.last_seq(), 1);
    drop(store);
    assert_eq!(open(dir.path()).get(&key).unwrap().revision, 1);
}

#[test]
fn a_single_refused_event_changes_nothing_in_place_either() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    set_n(&store, "ns:t", 1).durable.wait().unwrap();
    let key = thing("ns:t");
    let before = store.get(&key).unwrap().as_ref().clone();
    let refused = [
        event(
            &key,
            EventAction::Modified,
            "/attributes/n",
            Some(json!(2)),
            1,
        ),
        event(&key, EventAction::Deleted, "/attributes/missing", None, 2),
        event(&key, EventAction::Merged, "", Some(json!(7)), 2),
        event(&key, EventAction::Modified, "", Some(json!([1])), 2),
    ];
    for bad in refused {
        let result = store.write(&key, |_| -> Result<_, Infallible> { Ok(vec![bad.clone()]) });
        assert!(
            matches!(result, Err(WriteError::Store(StoreError::Apply { .. }))),
            "{bad:?}: {result:?}"
        );
        assert_eq!(*store.get(&key).unwrap(), before, "{bad:?}");
    }
    assert_eq!(store.last_seq(), 1);
    drop(store);
    assert_eq!(*open(dir.path()).get(&key).unwrap(), before);
}

#[test]
fn a_reader_keeps_the_state_it_read_while_the_entity_changes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    set_n(&store, "ns:t", 1).durable.wait().unwrap();
    let key = thing("ns:t");
    let read = store.get(&key).unwrap();
    set_n(&store, "ns:t", 2).durable.wait().unwrap();
    assert_eq!(read.revision, 1);
    assert_eq!(read.doc.pointer("/attributes/n"), Some(&json!(1)));
    drop(read);
    // No reader now: the next write changes the entity in place, to the same result.
    set_n(&store, "ns:t", 3).durable.wait().unwrap();
    let now = store.get(&key).unwrap();
    assert_eq!(
        (now.revision, now.doc.pointer("/attributes/n")),
        (3, Some(&json!(3)))
    );
    drop(store);
    assert_eq!(open(dir.path()).get(&key).unwrap(), now);
}

#[test]
fn writes_after_close_are_refused_and_reads_still_answer() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    set_n(&store, "ns:t", 1).durable.wait().unwrap();
    store.close().unwrap();
    store.close().unwrap();
    let key = thing("ns:t");
    let refused = store.write(&key, |_| -> Result<Vec<Event>, Infallible> {
        panic!("decide must not run on a closed store")
    });
    assert!(
        matches!(refused, Err(WriteError::Store(StoreError::Closed))),
        "{refused:?}"
    );
    assert_eq!(store.get(&key).unwrap().revision, 1);
}

/// Polls a future to completion on this thread (no runtime needed).
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

#[test]
fn durable_completes_as_a_future_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let written = set_n(&store, "ns:t", 1);
    assert_eq!(written.events.len(), 1);
    assert_eq!(written.entity.as_ref().unwrap().revision, 1);
    block_on(written.durable).unwrap();
}

#[test]
fn concurrent_writers_all_become_durable_in_order_per_entity() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for value in 0..50 {
                    // Two threads share each thing, so per-entity order matters.
                    set_n(&*store, &format!("ns:t{}", t % 4), value)
                        .durable
                        .wait()
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let before = all_entities(&*store);
    assert_eq!(before.iter().map(|e| e.revision).sum::<u64>(), 400);
    drop(store);
    assert_eq!(all_entities(&open(dir.path())), before);
}

// ---------------------------------------------------------------------------------------
// Property: random writes of random documents at random paths, with snapshots and reopens
// (closed or just dropped) in between, always reopen to the state built in memory.

#[derive(Debug, Clone)]
enum Op {
    Put {
        thing: u8,
        path: &'static str,
        value: Value,
    },
    Merge {
        thing: u8,
        path: &'static str,
        patch: Value,
    },
    Delete {
        thing: u8,
        path: &'static str,
    },
    Snapshot,
    Reopen {
        close: bool,
    },
}

const PATHS: &[&str] = &[
    "",
    "/attributes",
    "/attributes/a",
    "/attributes/a/b",
    "/attributes/c~0d",
    "/features/f/properties/x",
    "/policyId",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        "[a-z~/ü]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            prop::collection::btree_map("[abx]", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn op() -> impl Strategy<Value = Op> {
    let path = prop::sample::select(PATHS);
    prop_oneof![
        4 => (0..3u8, path.clone(), json_value()).prop_map(|(thing, path, value)| Op::Put { thing, path, value }),
        2 => (0..3u8, path.clone(), json_value()).prop_map(|(thing, path, patch)| Op::Merge { thing, path, patch }),
        1 => (0..3u8, path).prop_map(|(thing, path)| Op::Delete { thing, path }),
        1 => Just(Op::Snapshot),
        1 => any::<bool>().prop_map(|close| Op::Reopen { close }),
    ]
}

/// The event an op asks for, if it applies to `current`.
fn decide(key: &EntityKey, op: &Op, current: Option<&Entity>) -> Option<Event> {
    let revision = current.map_or(1, |e| e.revision + 1);
    let event = match (op, current) {
        (Op::Put { value, .. }, None) => {
            let doc = if value.is_object() {
                value.clone()
            } else {
                json!({"v": value})
            };
            event(key, EventAction::Created, "", Some(doc), revision)
        }
        (Op::Put { path, value, .. }, Some(_)) => event(
            key,
            EventAction::Modified,
            path,
            Some(value.clone()),
            revision,
        ),
        (Op::Merge { path, patch, .. }, Some(_)) => event(
            key,
            EventAction::Merged,
            path,
            Some(patch.clone()),
            revision,
        ),
        (Op::Delete { path, .. }, Some(_)) => {
            event(key, EventAction::Deleted, path, None, revision)
        }
        _ => return None,
    };
    Entity::apply(current.cloned(), &event).ok().map(|_| event)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_reopen_to_identical_entities(ops in prop::collection::vec(op(), 1..40), every in 0..6u64) {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        opts.snapshot_every_events = every;
        let mut store = EmbeddedStore::open(opts.clone()).unwrap();
        let mut model: HashMap<EntityKey, Entity> = HashMap::new();
        for op in &ops {
            match op {
                Op::Snapshot => { store.snapshot().unwrap(); }
                Op::Reopen { close } => {
                    if *close { store.close().unwrap(); }
                    drop(store);
                    store = EmbeddedStore::open(opts.clone()).unwrap();
                }
                Op::Put { thing: n, .. } | Op::Merge { thing: n, .. } | Op::Delete { thing: n, .. } => {
                    let key = thing(&format!("ns:t{n}"));
                    let written = store
                        .write(&key, |current| -> Result<_, Infallible> {
                            Ok(decide(&key, op, current).into_iter().collect())
                        })
                        .unwrap();
                    let mut state = model.remove(&key);
                    for event in &written.events {
                        state = Entity::apply(state, event).unwrap();
                    }
                    prop_assert_eq!(state.as_ref(), written.entity.as_deref());
                    if let Some(state) = state { model.insert(key, state); }
                }
            }
        }
        let expected = {
            let mut entities: Vec<Entity> = model.into_values().collect();
            entities.sort_by(|a, b| a.key.cmp(&b.key));
            entities
        };
        prop_assert_eq!(&all_entities(&store), &expected);
        if ops.len() % 2 == 0 { store.close().unwrap(); }
        drop(store);
        let store = EmbeddedStore::open(opts).unwrap();
        prop_assert_eq!(&all_entities(&store), &expected);
    }
}

#[test]
fn durable_so_far_completes_only_once_every_earlier_write_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(options(dir.path())).unwrap();
    let writes: Vec<_> = (0..200)
        .map(|i| set_n(&store, &format!("org.acme:t{}", i % 7), i))
        .collect();
    store.durable_so_far().wait().unwrap();
    // Every earlier write's handle is complete by then: polled once, it is ready.
    struct Noop;
    impl Wake for Noop {
        fn wake(self: Arc<Self>) {}
    }
    let waker = Waker::from(Arc::new(Noop));
    let mut cx = Context::from_waker(&waker);
    for (i, written) in writes.into_iter().enumerate() {
        let mut durable = pin!(written.durable);
        assert!(
            matches!(durable.as_mut().poll(&mut cx), Poll::Ready(Ok(()))),
            "write {i} was not durable when the barrier after it completed"
        );
    }
    // A closed store says so instead of waiting.
    store.close().unwrap();
    assert!(store.durable_so_far().wait().is_err());
}
