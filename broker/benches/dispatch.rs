#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The twin dispatch path without sockets, in one process, ns per message (one iteration of
//! every benchmark is one message), driven through `broker::testing::Harness` (the core as a
//! connection uses it):
//! - `dispatch/full_path`: `Core::publish` of the compact topic
//!   `org.acme/dev-1/things/twin/commands/modify/features/temp/properties/value`, payload
//!   `21.5` (topic parsed, solution namespace, the thing's policy from the cache, the device's
//!   memoized view, the command's requirement, apply under the entity's lock, journal append)
//!   → the change announced (`Harness::announce`: events through the fan-out — event topic,
//!   the solution's topic tree, the subscriber's view checked on partial READ at the event's
//!   path) → the subscriber's queue drained into MQTT 3.1.1 bytes and the PUBACK it would send.
//! - `dispatch/full_path_cut`: the same with a modify of `…/features/temp/properties` whose
//!   value holds `calibration`, which the subscriber may not READ: its event is cut per
//!   subscriber and its payload written for that subscriber alone.
//! - `dispatch/authorize_with_lookup`: the authorization alone: the thing's policy ID from the
//!   store's index, the compiled enforcer from the cache, the device's memoized view, the
//!   command's requirement.
//! - `dispatch/fan_out` and `dispatch/fan_out_cut`: the fan-out of one change's events
//!   (applied once, outside the loop) to the one wildcard subscriber plus the drain, without
//!   and with a cut.
//! - `dispatch/parse`, `dispatch/execute`: the first two steps alone (`execute`:
//!   `Core::execute` of a parsed command, up to the journal append), to place the cost.
//!
//! The thing's policy has 10 entries (owner, the device, the subscriber with READ on `thing:/`
//! and a revoke on `thing:/features/temp/properties/calibration`, apps, auditors, integrations,
//! a namespace-restricted and an expiring entry). The solution policy is the default one of
//! solution `bench` (`auth::solution::default_policy`), so the device's subjects are those a
//! secret connection of client `dev-1` gets: `iot-things:bench:dev-1`, `iot-things:bench`.
//!
//! **Durability is not awaited.** `Core::publish` returns a pending change; the broker
//! acknowledges and publishes events only once it is durable (after the batch's
//! `fdatasync`). Here each change is announced at once (`Harness::announce`): the journal's
//! writer thread keeps writing and `fdatasync`ing in the background (in a temporary directory)
//! while these figures measure the in-memory path of the calling thread. The harness raises
//! the store's backpressure limit so that a slow disk never blocks the caller, and turns
//! background snapshots off.
//!
//! `cargo bench -p broker --bench dispatch -- --warm-up-time 1 --measurement-time 5`; a summary
//! with ns/message for each benchmark that ran is printed at the end.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::SystemTime;

use broker::mqtt::codec::{QoS, TopicName};
use broker::mqtt::outbound::TopicAliases;
use broker::testing::{Change, Harness, TestClient};
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput};
use serde_json::json;
use twin::command::Command;
use twin::protocol::envelope::Request;
use twin::protocol::mqtt::{mqtt_request, parse_mqtt_topic};

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
    harness: Harness,
    device: TestClient,
    subscriber: TestClient,
    /// The subscriber connection's write buffer and topic aliases.
    buf: BytesMut,
    aliases: TopicAliases,
}

fn topic(text: &str) -> TopicName {
    TopicName::new(Bytes::copy_from_slice(text.as_bytes())).unwrap()
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
        let harness = Harness::new(&dir.path().join("data"), "bench", &[NAMESPACE]).unwrap();
        let device = harness.connect("dev-1");
        let subscriber = harness.connect("sub");
        let admin = harness.connect("admin");
        assert!(harness.subscribe(&subscriber, SUBSCRIPTION, QoS::AtLeastOnce));
        let policy = serde_json::to_vec(&thing_policy()).unwrap();
        setup_write(
            &harness,
            &admin,
            "org.acme/dev-1/policies/commands/create",
            &policy,
        );
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
        setup_write(
            &harness,
            &admin,
            "org.acme/dev-1/things/twin/commands/create",
            &thing,
        );
        let mut fixture = Fixture {
            _dir: dir,
            harness,
            device,
            subscriber,
            buf: BytesMut::with_capacity(4096),
            aliases: TopicAliases::new(0),
        };
        // The setup's own events (the subscriber may read the thing's creation).
        fixture.drain();
        fixture
    }

    /// Publish → pending change, not announced (see the module docs).
    fn execute(&self, topic_text: &str, payload: &[u8]) -> Change {
        self.harness
            .publish(&self.device, &topic(topic_text), payload, QoS::AtLeastOnce)
            .unwrap_or_else(|told| panic!("`{topic_text}` was refused: {told:?}"))
    }

    /// Drains the subscriber's queue into its write buffer, acknowledging each delivery as
    /// the subscriber's PUBACK would. Returns the bytes written.
    fn drain(&mut self) -> usize {
        self.buf.clear();
        self.harness
            .drain(&self.subscriber, &mut self.buf, &mut self.aliases);
        self.buf.len()
    }

    /// The fan-out of one change again, and the drain.
    fn fan_out(&mut self, change: &Change) -> usize {
        self.harness.fan_out(&self.device, change);
        let sent = self
            .harness
            .drain(&self.subscriber, &mut self.buf, &mut self.aliases);
        assert_eq!(sent, 1, "the subscriber got exactly one delivery");
        let len = self.buf.len();
        self.buf.clear();
        len
    }

    /// One message end to end: what a connection does for a PUBLISH and, once durable, for
    /// its events (the answer is not built: the device subscribed to no response topic).
    fn full_path(&mut self, topic: &str, payload: &[u8]) -> usize {
        let change = self.execute(topic, payload);
        self.harness.announce(&self.device, change);
        self.buf.clear();
        let sent = self
            .harness
            .drain(&self.subscriber, &mut self.buf, &mut self.aliases);
        assert_eq!(sent, 1, "the subscriber got exactly one delivery");
        self.buf.len()
    }
}

/// A setup write, awaited until durable.
fn setup_write(harness: &Harness, client: &TestClient, topic_text: &str, payload: &[u8]) {
    let change = harness
        .publish(client, &topic(topic_text), payload, QoS::AtLeastOnce)
        .unwrap_or_else(|told| panic!("`{topic_text}` was refused: {told:?}"));
    harness.wait(client, change);
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
            |command| black_box(fixture.harness.execute(&fixture.device, command)),
            BatchSize::SmallInput,
        );
    });

    let Command::Thing(modify) = &prepared else {
        panic!("a thing command");
    };
    group.bench_function("authorize_with_lookup", |b| {
        b.iter(|| {
            assert!(
                fixture
                    .harness
                    .authorize(&fixture.device, black_box(modify))
            )
        });
    });

    let change = fixture.execute(MODIFY_TOPIC, MODIFY_PAYLOAD);
    let cut_change = fixture.execute(CUT_TOPIC, CUT_PAYLOAD);
    group.bench_function("fan_out", |b| {
        b.iter(|| black_box(fixture.fan_out(&change)));
    });
    group.bench_function("fan_out_cut", |b| {
        b.iter(|| black_box(fixture.fan_out(&cut_change)));
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
