//! The cluster store against the machine's NATS JetStream (127.0.0.1:4222, R1): two stores on
//! one stream behave as two nodes. Each test uses a stream of its own.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod store_common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use store_common::{event, thing};
use twin::store::{
    ChangeListener, ClusterOptions, ClusterStore, StoreError, TwinStore, TwinStoreExt,
};
use twin::{Entity, EntityKey, EventAction};

fn nats_url() -> String {
    let url = std::env::var("THINGSGATE_TEST_NATS").unwrap_or_else(|_| "127.0.0.1:4222".into());
    if std::net::TcpStream::connect_timeout(&url.parse().unwrap(), Duration::from_secs(2)).is_err()
    {
        panic!(
            "NATS with JetStream is not running on {url}: start it (`systemctl start nats-server`, \
             or `nats-server -js -a 127.0.0.1 -p 4222`)"
        );
    }
    format!("nats://{url}")
}

fn stream_name(test: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "TGTEST_{}_{}_{}_{nanos}",
        test.to_uppercase(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

async fn open(stream: &str) -> ClusterStore {
    let mut options = ClusterOptions::new(vec![nats_url()]);
    options.stream = stream.to_owned();
    ClusterStore::open(options).await.unwrap()
}

async fn delete_stream(stream: &str) {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let _ = js.delete_stream(stream).await;
}

/// Sets attribute `n` (creating the thing at first), deciding on the store's current state;
/// retries on conflicts as the broker does. Returns the revision written.
async fn increment(store: &ClusterStore, id: &str) -> u64 {
    let key = thing(id);
    for _ in 0..200 {
        let written = store
            .write(&key, |current: Option<&Entity>| {
                Ok::<_, std::convert::Infallible>(vec![match current {
                    None => event(
                        &key,
                        EventAction::Created,
                        "",
                        Some(json!({"thingId": id, "policyId": "ns:p", "attributes": {"n": 1}})),
                        1,
                    ),
                    Some(e) => {
                        let n = e.doc["attributes"]["n"].as_u64().unwrap();
                        event(
                            &key,
                            EventAction::Modified,
                            "/attributes/n",
                            Some(json!(n + 1)),
                            e.revision + 1,
                        )
                    }
                }])
            })
            .unwrap();
        let revision = written.events[0].revision;
        match written.durable.await {
            Ok(()) => return revision,
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => panic!("write failed: {e}"),
        }
    }
    panic!("200 conflicts in a row on {id}");
}

#[derive(Default)]
struct Heard(Mutex<Vec<(EntityKey, u64)>>);

impl ChangeListener for Heard {
    fn changed(
        &self,
        key: &EntityKey,
        events: &[twin::Event],
        _previous: Option<&Arc<Entity>>,
        _entity: Option<&Arc<Entity>>,
    ) {
        let mut heard = self.0.lock().unwrap();
        for e in events {
            heard.push((key.clone(), e.revision));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_one_node_is_seen_and_heard_on_the_other_and_survives_a_reopen() {
    let name = stream_name("visible");
    let a = open(&name).await;
    let b = open(&name).await;
    let heard = Arc::new(Heard::default());
    b.set_listener(heard.clone());
    for _ in 0..3 {
        increment(&a, "ns:t1").await;
    }
    let key = thing("ns:t1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get(&key).map(|e| e.revision) != Some(3) {
        assert!(Instant::now() < deadline, "node B never saw revision 3");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(b.get(&key).unwrap().doc["attributes"]["n"], json!(3));
    assert_eq!(b.thing_policy_id("ns:t1").as_deref(), Some("ns:p"));
    assert_eq!(
        heard
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| *r)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // B writes on top of what it saw; A sees it; a third node loads both.
    increment(&b, "ns:t1").await;
    let c = open(&name).await;
    assert_eq!(c.get(&key).unwrap().revision, 4);
    assert_eq!(c.keys(twin::EntityKind::Thing), vec![key]);
    c.current().unwrap();
    delete_stream(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_on_the_same_things_never_lose_an_update() {
    let name = stream_name("race");
    let a = Arc::new(open(&name).await);
    let b = Arc::new(open(&name).await);
    const THINGS: usize = 5;
    const PER_TASK: usize = 30;
    let mut tasks = Vec::new();
    for (node, store) in [(0, a.clone()), (1, b.clone())] {
        for task in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut revisions = Vec::new();
                for i in 0..PER_TASK {
                    let id = format!("ns:race{}", (i + task + node) % THINGS);
                    revisions.push((id.clone(), increment(&store, &id).await));
                }
                revisions
            }));
        }
    }
    let mut acked: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for task in tasks {
        for (id, revision) in tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap()
        {
            acked.entry(id).or_default().push(revision);
        }
    }
    // Every acknowledged write has its own revision, 1..n with no gap, and the counter
    // (each write read n and wrote n + 1) equals the number of writes: none was lost.
    let fresh = open(&name).await;
    let mut total = 0;
    for (id, mut revisions) in acked {
        revisions.sort_unstable();
        let n = revisions.len() as u64;
        assert_eq!(revisions, (1..=n).collect::<Vec<_>>(), "{id}");
        let stored = fresh.get(&thing(&id)).unwrap();
        assert_eq!(stored.revision, n, "{id}");
        assert_eq!(stored.doc["attributes"]["n"], json!(n), "{id}");
        total += n;
    }
    assert_eq!(total, (2 * 4 * PER_TASK) as u64);
    delete_stream(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writes_of_one_node_are_stored_in_order_and_a_barrier_waits_for_them() {
    let name = stream_name("pipeline");
    let a = open(&name).await;
    let key = thing("ns:p1");
    let mut durables = Vec::new();
    for n in 0..50u64 {
        let written = a
            .write(&key, |current: Option<&Entity>| {
                Ok::<_, std::convert::Infallible>(vec![match current {
                    None => event(
                        &key,
                        EventAction::Created,
                        "",
                        Some(
                            json!({"thingId": "ns:p1", "policyId": "ns:p", "attributes": {"n": n}}),
                        ),
                        1,
                    ),
                    Some(e) => event(
                        &key,
                        EventAction::Modified,
                        "/attributes/n",
                        Some(json!(n)),
                        e.revision + 1,
                    ),
                }])
            })
            .unwrap();
        durables.push(written.durable);
    }
    tokio::time::timeout(Duration::from_secs(20), a.durable_so_far())
        .await
        .unwrap()
        .unwrap();
    for durable in durables {
        durable.await.unwrap();
    }
    let fresh = open(&name).await;
    let stored = fresh.get(&key).unwrap();
    assert_eq!(stored.revision, 50);
    assert_eq!(stored.doc["attributes"]["n"], json!(49));
    delete_stream(&name).await;
}

/// A write of node A that JetStream stored although A never learnt it (its ack was lost, and
/// it failed at the write deadline after NATS had been away too long: nothing of it was
/// announced on A) reaches A through the stream as another node's write would: A must not
/// keep the state before it while every other node shows the write. Simulated by appending a
/// message with A's `Tg-Node` header that A did not write: the same payload B stored as
/// revision 2 in a stream of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_write_of_this_node_it_never_saw_acknowledged_is_taken_from_the_stream() {
    use async_nats::jetstream::message::PublishMessage;

    let name = stream_name("ownunacked");
    let elsewhere = stream_name("ownunackedsrc");
    let a = open(&name).await;
    let heard = Arc::new(Heard::default());
    a.set_listener(heard.clone());
    increment(&a, "ns:t1").await;
    let b = open(&elsewhere).await;
    increment(&b, "ns:t1").await;
    increment(&b, "ns:t1").await;

    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let token = twin::store::cluster::subject_token("ns:t1");
    let source = js
        .get_stream(&elsewhere)
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&format!("{elsewhere}.thing.{token}"))
        .await
        .unwrap();
    let subject = format!("{name}.thing.{token}");
    let target = js.get_stream(&name).await.unwrap();
    let last = target
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap()
        .sequence;
    let ack = js
        .send_publish(
            subject,
            PublishMessage::build()
                .payload(source.payload.clone())
                .expected_last_subject_sequence(last)
                .header("Tg-Node", a.node()),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let key = thing("ns:t1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.get(&key).map(|e| e.revision) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "node A keeps revision {:?} although the stream holds its revision 2 at {}",
            a.get(&key).map(|e| e.revision),
            ack.sequence
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.get(&key).unwrap().doc["attributes"]["n"], json!(2));
    // Announced here too (it never was when it was written).
    assert_eq!(
        heard
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| *r)
            .collect::<Vec<_>>(),
        vec![2]
    );
    // A writes on top of it without a conflict: it decided on what the stream holds.
    assert_eq!(increment(&a, "ns:t1").await, 3);
    delete_stream(&name).await;
    delete_stream(&elsewhere).await;
}
