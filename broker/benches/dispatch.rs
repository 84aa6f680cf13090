#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The twin dispatch path without sockets, in one process, ns per message (one iteration of
//! every benchmark is one message):
//! - `dispatch/full_path`: compact topic parsed (`parse_mqtt_topic` + `mqtt_request` of
//!   `org.acme/dev-1/things/twin/commands/modify/features/temp/properties/value`, payload
//!   `21.5`) → `Twins::execute` (solution namespace, the thing's policy from the cache, the
//!   device's memoized view, the command's requirement, apply under the entity's lock, journal
//!   append) → `Twins::publish_events` (event topic, route through the solution's topic tree,
//!   the subscriber's view checked on partial READ at the event's path) → the subscriber's
//!   queue drained into bytes (`SessionState::drain_into` with an `Outbound`, v3.1.1) and the
//!   PUBACK it would send (`complete`).
//! - `dispatch/full_path_cut`: the same with a modify of `…/features/temp/properties` whose
//!   value holds `calibration`, which the subscriber may not READ: its event is cut per
//!   subscriber (`cut_to_view`) and its payload written for that subscriber alone.
//! - `dispatch/authorize`: the view check of the command's requirement only
//!   (`required_permissions` + `first_denied` on the device's memoized view, under the session
//!   lock); `dispatch/authorize_with_lookup` adds what `execute` does before it: the thing's
//!   policy ID from the store's index and the compiled enforcer from the cache.
//! - `dispatch/fan_out` and `dispatch/fan_out_cut`: `publish_events` of one event (produced
//!   once, outside the loop) to the one wildcard subscriber plus the drain, without and with a
//!   cut.
//! - `dispatch/parse`, `dispatch/execute`: the first two steps alone, to place the cost.
//!
//! The thing's policy has 10 entries (owner, the device, the subscriber with READ on `thing:/`
//! and a revoke on `thing:/features/temp/properties/calibration`, apps, auditors, integrations,
//! a namespace-restricted and an expiring entry). The solution policy is the default one of
//! solution `bench` (`auth::solution::default_policy`), so the device's subjects are those a
//! secret connection of client `dev-1` gets: `iot-things:bench:dev-1`, `iot-things:bench`.
//!
//! **Durability is not awaited.** `execute` returns `Executed::Written { durable, .. }`; the
//! broker acknowledges and publishes events only once `durable` completes (after the batch's
//! `fdatasync`). Here each `durable` is dropped: `StoreOptions` has no setting to turn syncing
//! off, so the journal's writer thread keeps writing and `fdatasync`ing in the background (in a
//! temporary directory) while these figures measure the in-memory path of the calling thread.
//! The store's backpressure limit (`max_queued_bytes`) is raised so that a slow disk never
//! blocks the caller, and background snapshots are off.
//!
//! `cargo bench -p broker --bench dispatch -- --warm-up-time 1 --measurement-time 5`; a summary
//! with ns/message for each benchmark that ran is printed at the end.

use std::hint::black_box;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use broker::auth::solution::{SolutionId, default_policy};
use broker::mqtt::codec::{Protocol, QoS, SubscriptionOptions};
use broker::core::dispatch;
use broker::metrics::Metrics;
use broker::core::session::{AckOutcome, Link, Outbound, Session, TopicAliases};
use broker::core::space::{SolutionSpace, Subscriber};
use broker::core::twins::{Executed, PolicyRef, Requester, Twins};
use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput};
use policy::{Enforcer, Timestamp};
use serde_json::json;
use twin::authz::{first_denied, required_permissions};
use twin::command::Command;
use twin::entity::Event;
use twin::protocol::envelope::Request;
use twin::protocol::mqtt::{mqtt_request, parse_mqtt_topic};
use twin::store::{EmbeddedStore, StoreOptions};

const NAMESPACE: &str = "org.acme";
const MODIFY_TOPIC: &str =
    "org.acme/dev-1/things/twin/commands/modify/features/temp/properties/value";
const MODIFY_PAYLOAD: &[u8] = b"21.5";
const CUT_TOPIC: &str = "org.acme/dev-1/things/twin/commands/modify/features/temp/properties";
const CUT_PAYLOAD: &[u8] =
    br#"{"value":21.5,"unit":"Cel","calibration":{"offset":0.25,"gain":1.02}}"#;
const SUBSCRIPTION: &str = "org.acme/+/things/twin/events/#";

/// The thing's policy: 10 entries, grants and revokes at several depths.
fn thing_policy() -> serde_json::Value {
    json!({
        "entries": {
            "owner": {
                "subjects": {"iot-things:bench:admin": {"type": "administrator"}},
                "resources": {
                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "message:/": {"grant": ["READ", "WRITE"], "revoke": []}
                }
            },
            "device": {
                "subjects": {"iot-things:bench:dev-1": {"type": "the device"}},
                "resources": {
                    "thing:/features": {"grant": ["READ", "WRITE"], "revoke": []},
                    "thing:/features/firmware": {"grant": [], "revoke": ["WRITE"]},
                    "thing:/attributes": {"grant": ["READ"], "revoke": []},
                    "message:/inbox": {"grant": ["READ"], "revoke": []}
                }
            },
            "subscriber": {
                "subjects": {"iot-things:bench:sub": {"type": "the dashboard backend"}},
                "resources": {
                    "thing:/": {"grant": ["READ"], "revoke": []},
                    "thing:/features/temp/properties/calibration": {"grant": [], "revoke": ["READ"]}
                }
            },
            "app": {
                "subjects": {"google:alice": {"type": "user"}, "google:bob": {"type": "user"}},
                "resources": {
                    "thing:/": {"grant": ["READ"], "revoke": []},
                    "thing:/features/secret": {"grant": [], "revoke": ["READ"]},
                    "message:/outbox": {"grant": ["READ", "WRITE"], "revoke": []}
                }
            },
            "auditors": {
                "subjects": {"group:auditors": {"type": "auditors"}},
                "resources": {"thing:/attributes": {"grant": ["READ"], "revoke": []}}
            },
            "firmware": {
                "subjects": {"integration:firmware": {"type": "update service"}},
                "resources": {
                    "thing:/features/firmware": {"grant": ["READ", "WRITE"], "revoke": []},
                    "message:/inbox/messages/update": {"grant": ["WRITE"], "revoke": []}
                }
            },
            "location": {
                "subjects": {"integration:maps": {"type": "map service"}},
                "resources": {
                    "thing:/attributes/location": {"grant": ["READ", "WRITE"], "revoke": []}
                }
            },
            "fleet": {
                "subjects": {"group:fleet-ops": {"type": "operators"}},
                "resources": {
                    "thing:/features": {"grant": ["READ"], "revoke": []},
                    "thing:/features/temp/properties/calibration": {"grant": ["WRITE"], "revoke": []}
                },
                "namespaces": ["org.acme"]
            },
            "support": {
                "subjects": {"google:support": {"type": "support", "expiry": "2099-01-01T00:00:00Z"}},
                "resources": {"thing:/": {"grant": ["READ"], "revoke": []}}
            },
            "nobody": {
                "subjects": {"google:mallory": {"type": "locked out"}},
                "resources": {"thing:/": {"grant": [], "revoke": ["READ", "WRITE"]}}
            }
        }
    })
}

/// Everything the path touches, as a running broker holds it.
struct Fixture {
    _dir: tempfile::TempDir,
    twins: Twins,
    space: SolutionSpace,
    namespaces: Vec<String>,
    device: Arc<Session>,
    subscriber: Arc<Session>,
    metrics: Metrics,
    /// The subscriber connection's write buffer and topic aliases.
    buf: BytesMut,
    aliases: TopicAliases,
    /// The packet identifier the subscriber's session gives its next QoS 1 delivery (they are
    /// allocated in order and each is completed at once, as a PUBACK would).
    next_packet_id: u16,
}

fn session(space: &SolutionSpace, client_id: &str) -> Arc<Session> {
    let subjects: Arc<[String]> = vec![
        format!("iot-things:bench:{client_id}"),
        "iot-things:bench".to_owned(),
    ]
    .into();
    let view = space
        .policy()
        .for_subjects(&subjects, None, dispatch::now());
    let session = Arc::new(Session::new(client_id.into(), subjects, view, 0, 1000));
    // Online: a connection is attached (QoS 0 is not queued for offline sessions).
    session.lock().link = Some(Arc::new(Link::default()));
    session
}

fn command(topic: &str, payload: &[u8]) -> Command {
    let parsed = parse_mqtt_topic(topic).unwrap();
    match mqtt_request(&parsed, payload).unwrap() {
        Request::Command(command) => command,
        Request::Message(_) => panic!("`{topic}` is a live message"),
    }
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut options = StoreOptions::new(dir.path().join("data"));
        options.max_queued_bytes = 1 << 30;
        options.snapshot_every_events = 0;
        options.snapshot_every = None;
        let store = Arc::new(EmbeddedStore::open(options).unwrap());
        let twins = Twins::new(store);
        let id = SolutionId::parse("bench").unwrap();
        let solution_policy = Arc::new(Enforcer::compile(&default_policy(&id).unwrap()));
        let space = SolutionSpace::new(id, solution_policy);
        let device = session(&space, "dev-1");
        let subscriber = session(&space, "sub");
        let admin = session(&space, "admin");
        space.tree_write().insert(
            SUBSCRIPTION,
            Subscriber {
                session: subscriber.clone(),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
                id: None,
                share: None,
            },
        );
        let fixture = Fixture {
            _dir: dir,
            twins,
            space,
            namespaces: vec![NAMESPACE.to_owned()],
            device,
            subscriber,
            metrics: Metrics::default(),
            buf: BytesMut::with_capacity(4096),
            aliases: TopicAliases::new(0),
            next_packet_id: 1,
        };
        let policy = serde_json::to_vec(&thing_policy()).unwrap();
        fixture.setup_write(&admin, "org.acme/dev-1/policies/commands/create", &policy);
        let thing = json!({
            "policyId": "org.acme:dev-1",
            "attributes": {"location": {"building": "B7", "floor": 3}, "serial": "0815"},
            "features": {
                "temp": {"properties": {"value": 20.0, "unit": "Cel",
                                        "calibration": {"offset": 0.25, "gain": 1.02}}},
                "firmware": {"properties": {"version": "1.2.3"}}
            }
        });
        let thing = serde_json::to_vec(&thing).unwrap();
        fixture.setup_write(&admin, "org.acme/dev-1/things/twin/commands/create", &thing);
        fixture
    }

    fn requester<'a>(&'a self, session: &'a Session) -> Requester<'a> {
        Requester {
            namespaces: &self.namespaces,
            space: &self.space,
            session,
        }
    }

    /// A setup write, awaited until durable.
    fn setup_write(&self, session: &Session, topic: &str, payload: &[u8]) {
        let command = command(topic, payload);
        match self
            .twins
            .execute(self.requester(session), command, dispatch::now())
        {
            Executed::Written { durable, .. } => durable.wait().unwrap(),
            Executed::Answered { reply, .. } => panic!("`{topic}` was refused: {reply:?}"),
        }
    }

    /// Parse → execute; the `durable` is dropped (see the module docs).
    fn execute(&self, topic: &str, payload: &[u8], now: Timestamp) -> (Vec<Event>, PolicyRef) {
        let parsed = parse_mqtt_topic(topic).unwrap();
        let Ok(Request::Command(command)) = mqtt_request(&parsed, payload) else {
            panic!("`{topic}` is not a command");
        };
        match self
            .twins
            .execute(self.requester(&self.device), command, now)
        {
            Executed::Written {
                events,
                policy,
                durable,
                ..
            } => {
                // The answer is not built: the device subscribed to no response topic, as
                // the connection checks before building one.
                drop(durable);
                (events, policy.unwrap())
            }
            Executed::Answered { reply, .. } => panic!("`{topic}` was refused: {reply:?}"),
        }
    }

    /// Publishes `events` and drains the subscriber's queue into its write buffer, then
    /// acknowledges the delivery as the subscriber's PUBACK would. Returns the bytes written.
    fn fan_out(&mut self, events: &[Event], policy: &PolicyRef, now: Timestamp) -> usize {
        self.twins
            .publish_events(&self.space, events, Some(policy), &self.metrics, now);
        self.buf.clear();
        let mut state = self.subscriber.lock();
        let mut out = Outbound {
            buf: &mut self.buf,
            protocol: Protocol::V311,
            max_packet_size: u32::MAX,
            metrics: &self.metrics,
            aliases: &mut self.aliases,
        };
        let sent = state.drain_into(&mut out, 32);
        assert_eq!(sent, 1, "the subscriber got exactly one delivery");
        let id = NonZeroU16::new(self.next_packet_id).unwrap();
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        assert_eq!(state.complete(id, QoS::AtLeastOnce), AckOutcome::Done);
        self.buf.len()
    }

    /// One message end to end: what a connection does for a PUBLISH and, once durable, for
    /// its events (the reply is not routed: the device subscribed to no response topic).
    fn full_path(&mut self, topic: &str, payload: &[u8]) -> usize {
        let now = dispatch::now();
        let (events, policy) = self.execute(topic, payload, now);
        self.fan_out(&events, &policy, now)
    }
}

fn benches(c: &mut Criterion) {
    let mut fixture = Fixture::new();

    // Check once that the cut path cuts and the plain one does not.
    let whole = fixture.full_path(MODIFY_TOPIC, MODIFY_PAYLOAD);
    let payload = String::from_utf8_lossy(&fixture.buf).into_owned();
    assert!(payload.contains(r#""value":21.5"#), "{payload}");
    let cut = fixture.full_path(CUT_TOPIC, CUT_PAYLOAD);
    let payload = String::from_utf8_lossy(&fixture.buf).into_owned();
    assert!(
        payload.contains(r#""unit":"Cel""#) && !payload.contains("calibration"),
        "the subscriber's event is cut: {payload}"
    );
    println!(
        "dispatch: one iteration = one message; the subscriber's PUBLISH is {whole} bytes \
         ({cut} bytes cut); `durable` not awaited: fsync runs in the store's writer thread, \
         the figures are the in-memory path"
    );

    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(1));

    group.bench_function("full_path", |b| {
        b.iter(|| black_box(fixture.full_path(MODIFY_TOPIC, MODIFY_PAYLOAD)));
    });
    group.bench_function("full_path_cut", |b| {
        b.iter(|| black_box(fixture.full_path(CUT_TOPIC, CUT_PAYLOAD)));
    });

    group.bench_function("parse", |b| {
        b.iter(|| {
            let parsed = parse_mqtt_topic(black_box(MODIFY_TOPIC)).unwrap();
            black_box(mqtt_request(&parsed, black_box(MODIFY_PAYLOAD)).unwrap())
        });
    });

    let prepared = command(MODIFY_TOPIC, MODIFY_PAYLOAD);
    group.bench_function("execute", |b| {
        b.iter_batched(
            || prepared.clone(),
            |command| {
                let requester = fixture.requester(&fixture.device);
                black_box(fixture.twins.execute(requester, command, dispatch::now()))
            },
            BatchSize::SmallInput,
        );
    });

    let Command::Thing(modify) = &prepared else {
        panic!("a thing command");
    };
    let now = dispatch::now();
    let policy = fixture.twins.thing_policy("org.acme:dev-1").unwrap();
    group.bench_function("authorize", |b| {
        b.iter(|| {
            let mut state = fixture.device.lock();
            let view = state.policy_view(&policy.id, &policy.enforcer, NAMESPACE, now);
            let requirements = required_permissions(black_box(modify));
            assert!(first_denied(view, &requirements).is_none());
        });
    });
    group.bench_function("authorize_with_lookup", |b| {
        b.iter(|| {
            let policy = fixture
                .twins
                .thing_policy(modify.thing_id.as_str())
                .unwrap();
            let mut state = fixture.device.lock();
            let view = state.policy_view(&policy.id, &policy.enforcer, NAMESPACE, now);
            let requirements = required_permissions(black_box(modify));
            assert!(first_denied(view, &requirements).is_none());
        });
    });

    let (events, policy) = fixture.execute(MODIFY_TOPIC, MODIFY_PAYLOAD, now);
    let (cut_events, cut_policy) = fixture.execute(CUT_TOPIC, CUT_PAYLOAD, now);
    group.bench_function("fan_out", |b| {
        b.iter(|| black_box(fixture.fan_out(&events, &policy, now)));
    });
    group.bench_function("fan_out_cut", |b| {
        b.iter(|| black_box(fixture.fan_out(&cut_events, &cut_policy, now)));
    });
    group.finish();
}

/// Where criterion keeps its estimates: `$CRITERION_HOME`, else `<target>/criterion`.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    // CARGO_TARGET_TMPDIR is `<target>/tmp`.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../criterion")
}

/// One line per benchmark measured by this process: criterion's estimate and median per
/// iteration (= per message).
fn print_summary(started: SystemTime) {
    let names = [
        "full_path",
        "full_path_cut",
        "parse",
        "execute",
        "authorize",
        "authorize_with_lookup",
        "fan_out",
        "fan_out_cut",
    ];
    let dir = criterion_dir().join("dispatch");
    let mut lines = Vec::new();
    for name in names {
        let file = dir.join(name).join("new").join("estimates.json");
        let fresh = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .is_ok_and(|modified| modified >= started);
        if !fresh {
            continue;
        }
        let estimates: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        // Criterion's headline figure: the slope of its linear sampling, else the mean.
        let typical = estimates["slope"]["point_estimate"]
            .as_f64()
            .or_else(|| estimates["mean"]["point_estimate"].as_f64())
            .unwrap();
        let median = estimates["median"]["point_estimate"].as_f64().unwrap();
        lines.push(format!(
            "dispatch/{name:<22} {typical:>6.0} ns/message (median {median:.0} ns; {:.0} messages/s)",
            1e9 / typical
        ));
    }
    if !lines.is_empty() {
        println!("\nsummary (durable not awaited: the in-memory path; fsync in the background):");
        for line in lines {
            println!("{line}");
        }
    }
}

fn main() {
    let started = SystemTime::now();
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion);
    criterion.final_summary();
    print_summary(started);
}
