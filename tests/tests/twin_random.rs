#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! A randomized end-to-end test of per-message authorization (issue 5): random policies, random
//! things and random modifies, merges, deletes and retrieves from several secret clients over
//! real connections (MQTT 5 and 3.1.1), each client subscribed with a wildcard to every thing
//! event. Every outcome is predicted by a naive evaluator of DESIGN.md §1
//! (`e2e::twin_random_support::Oracle`) whose every answer is then run through the policy crate
//! (`thingsgate policy test`), so each expectation is the policy crate's decision:
//!
//! - a change is acknowledged with 0 and applied iff the client's subjects have unrestricted
//!   WRITE at its path (a merge: at every leaf); denied: MQTT 5 PUBACK 0x87 (3.1.1: PUBACK 0)
//!   and not applied (the revisions of later events and retrieves say so);
//! - a retrieve is answered with the partial view of the value, 404 when nothing is visible;
//! - every subscriber receives exactly the events whose path it may partially READ, each cut
//!   to its view, nothing when nothing is visible, and none is missing. Commands run one after
//!   another and each one's events are offered before its acknowledgement, so each
//!   subscriber's deliveries have one order: they are compared as sequences.
//!
//! Seeds are fixed, so a failure is reproducible; the report names the seed and the operation.

use std::time::{Duration, Instant};

use broker::mqtt::codec::{Properties, Protocol, QoS, TopicName};
use bytes::Bytes;
use e2e::broker::{Broker, Solution};
use e2e::twin_random_support::{
    Delivered, Entry, Mode, NET_TIMEOUT, NS, Oracle, Perm, Perms, Resource, Rng, SeenEvent, Tally,
    ThingPolicy, TwinClient, Vectors, client_subject, client_subjects, event_topic, is_event,
    merge_leaves, merge_patch, policy_command, remove_at, set_at, solution_subject, thing_command,
    value_at,
};
use serde_json::{Map, Value, json};

/// The seeds, and the operations per seed (the three runs take a few seconds in all).
const SEEDS: [u64; 3] = [0x5EED_0001, 0x5EED_0002, 0x5EED_0003];
const OPERATIONS: usize = 300;

/// The resource paths random policies name (a small universe, so entries overlap).
const POLICY_PATHS: [&str; 12] = [
    "/",
    "/attributes",
    "/attributes/a",
    "/attributes/b",
    "/attributes/b/c",
    "/features",
    "/features/f1",
    "/features/f1/properties",
    "/features/f1/properties/x",
    "/features/f1/properties/y",
    "/features/f2",
    "/features/f2/properties/x",
];

/// Where retrieves look (`/attributes/zz` never exists: 404 when READ allows a look).
const RETRIEVE_PATHS: [&str; 11] = [
    "/",
    "/attributes",
    "/attributes/a",
    "/attributes/b",
    "/attributes/b/c",
    "/features",
    "/features/f1",
    "/features/f1/properties/x",
    "/features/f2",
    "/policyId",
    "/attributes/zz",
];

/// What deletes remove.
const DELETE_PATHS: [&str; 4] = [
    "/attributes/a",
    "/attributes/b",
    "/features/f1/properties/x",
    "/features/f2",
];

/// How long the clients have, in all, to receive what the model expects; and how long each
/// must then stay silent to show that nothing more comes.
const SETTLE_LIMIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);

/// The wildcard filter every client subscribes to.
const EVENTS: &str = "org.acme/+/things/twin/events/#";

/// One connected client: its connection, subjects, and the events the model says it gets.
struct Actor {
    conn: TwinClient,
    subjects: Vec<String>,
    expected: Vec<SeenEvent>,
}

impl Actor {
    fn v5(&self) -> bool {
        self.conn.protocol == Protocol::V5
    }
}

/// A thing as the model keeps it.
struct Thing {
    id: String,
    policy: usize,
    doc: Value,
    revision: u64,
}

/// What a command should lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Applied,
    Denied,
    NotFound,
}

/// The PUBACK reason a verdict gives on MQTT 5 (3.1.1 acknowledges everything with 0).
fn reason(verdict: Verdict, v5: bool) -> u8 {
    match (v5, verdict) {
        (false, _) | (true, Verdict::Applied) => 0,
        (true, Verdict::Denied) => 0x87,
        (true, Verdict::NotFound) => 0x80,
    }
}

fn number(rng: &mut Rng) -> Value {
    json!(rng.below(1000))
}

fn maybe_null(rng: &mut Rng) -> Value {
    if rng.chance(25) {
        Value::Null
    } else {
        number(rng)
    }
}

/// A random non-empty subset of `fields`.
fn some_of(rng: &mut Rng, fields: Vec<(&str, Value)>) -> Value {
    let mut out = Map::new();
    for (k, v) in &fields {
        if rng.chance(60) {
            out.insert((*k).to_owned(), v.clone());
        }
    }
    if out.is_empty()
        && let Some((k, v)) = fields.first()
    {
        out.insert((*k).to_owned(), v.clone());
    }
    Value::Object(out)
}

fn random_a(rng: &mut Rng) -> Value {
    if rng.chance(20) {
        json!([rng.below(10), rng.below(10)])
    } else {
        number(rng)
    }
}

fn random_b(rng: &mut Rng) -> Value {
    if rng.chance(70) {
        json!({"c": rng.below(1000), "d": rng.below(1000)})
    } else {
        number(rng)
    }
}

fn random_attributes(rng: &mut Rng) -> Value {
    let a = random_a(rng);
    let b = random_b(rng);
    some_of(rng, vec![("a", a), ("b", b)])
}

fn random_features(rng: &mut Rng) -> Value {
    let f1 = json!({"properties": {"x": rng.below(1000), "y": rng.below(1000)}});
    let f2 = json!({"properties": {"x": rng.below(1000)}});
    some_of(rng, vec![("f1", f1), ("f2", f2)])
}

/// A modify: a path and a value of the shape the thing model accepts there.
fn random_modify(rng: &mut Rng, doc: &Value) -> (&'static str, Value) {
    loop {
        let pick = rng.below(20);
        return match pick {
            0 => (
                "/",
                json!({"attributes": random_attributes(rng), "features": random_features(rng)}),
            ),
            1..=3 => ("/attributes", random_attributes(rng)),
            4..=6 => ("/attributes/a", random_a(rng)),
            7..=8 => ("/attributes/b", random_b(rng)),
            9..=10 => {
                // A property below a scalar has no parent to be set in.
                if value_at(doc, "/attributes/b").is_some_and(|b| !b.is_object()) {
                    continue;
                }
                ("/attributes/b/c", number(rng))
            }
            11..=12 => (
                "/features/f1",
                json!({"properties": {"x": rng.below(1000), "y": rng.below(1000)}}),
            ),
            13 => ("/features/f1/properties", json!({"x": rng.below(1000)})),
            14..=15 => ("/features/f1/properties/x", number(rng)),
            16..=17 => ("/features/f1/properties/y", number(rng)),
            _ => ("/features/f2/properties/x", number(rng)),
        };
    }
}

/// A merge: a base path and an object patch (`null`s delete).
fn random_merge(rng: &mut Rng) -> (&'static str, Value) {
    let attributes = |rng: &mut Rng| {
        let a = maybe_null(rng);
        let b = if rng.chance(50) {
            json!({"c": maybe_null(rng)})
        } else {
            maybe_null(rng)
        };
        some_of(rng, vec![("a", a), ("b", b)])
    };
    match rng.below(10) {
        0..=2 => {
            let attributes = attributes(rng);
            let f1 = json!({"properties": {"y": maybe_null(rng)}});
            let features = some_of(rng, vec![("f1", f1)]);
            (
                "/",
                some_of(
                    rng,
                    vec![("attributes", attributes), ("features", features)],
                ),
            )
        }
        3..=5 => ("/attributes", attributes(rng)),
        6..=7 => {
            let x = maybe_null(rng);
            let y = maybe_null(rng);
            (
                "/features/f1/properties",
                some_of(rng, vec![("x", x), ("y", y)]),
            )
        }
        8 => (
            "/features/f2",
            json!({"properties": {"x": maybe_null(rng)}}),
        ),
        // An empty patch is one leaf at its own path.
        _ => ("/attributes", json!({})),
    }
}

/// Everything one seed's run saw, and what went wrong.
struct Run {
    seed: u64,
    rng: Rng,
    solution: Solution,
    actors: Vec<Actor>,
    things: Vec<Thing>,
    policies: Vec<ThingPolicy>,
    vectors: Vectors,
    tally: Tally,
    failures: Vec<String>,
    /// The operation being run (for reports).
    op: String,
}

impl Run {
    fn fail(&mut self, what: String) {
        self.failures
            .push(format!("seed {:#x} {}: {what}", self.seed, self.op));
    }

    fn check(&mut self, actor: usize, thing: usize, path: &str, p: Perm, mode: Mode) -> bool {
        let policy = &self.policies[self.things[thing].policy];
        Oracle::new(policy, &self.actors[actor].subjects).check(path, p, mode, &mut self.vectors)
    }

    /// A random policy: the owner's administrative entry and 2–5 random entries over
    /// [`POLICY_PATHS`], their subjects drawn from the clients' own subjects, the solution's
    /// subject (which every client has) and one that nobody has.
    fn random_policy(&mut self, id: &str) -> ThingPolicy {
        let mut pool: Vec<String> = self.actors.iter().map(|a| a.subjects[0].clone()).collect();
        pool.push(solution_subject(&self.solution));
        pool.push(client_subject(&self.solution, "nobody"));
        let mut entries = vec![Entry {
            label: "owner".to_owned(),
            subjects: vec![client_subject(&self.solution, "owner")],
            resources: Vec::new(),
            policy_admin: true,
        }];
        let n = 2 + self.rng.below(4);
        for i in 0..n {
            let k = 1 + self.rng.below(2);
            let subjects = self.rng.pick_distinct(&pool, k);
            let k = 1 + self.rng.below(3);
            let paths = self.rng.pick_distinct(&POLICY_PATHS, k);
            let resources = paths
                .into_iter()
                .map(|path| {
                    let mut grant = Perms {
                        read: self.rng.chance(70),
                        write: self.rng.chance(65),
                    };
                    let revoke = Perms {
                        read: self.rng.chance(15),
                        write: self.rng.chance(12),
                    };
                    if grant == Perms::NONE && revoke == Perms::NONE {
                        grant.read = true;
                    }
                    Resource {
                        path: path.to_owned(),
                        grant,
                        revoke,
                    }
                })
                .collect();
            entries.push(Entry {
                label: format!("e{i}"),
                subjects,
                resources,
                policy_admin: false,
            });
        }
        // Often one subject may change a whole part of the thing (and seldom read it all), so
        // that changes get through while reads stay fine-grained.
        if self.rng.chance(60) {
            let subject = self.rng.pick(&pool).clone();
            let path = *self.rng.pick(&["/", "/attributes", "/features"]);
            let read = self.rng.chance(30);
            entries.push(Entry {
                label: "wide".to_owned(),
                subjects: vec![subject],
                resources: vec![Resource {
                    path: path.to_owned(),
                    grant: Perms { read, write: true },
                    revoke: Perms::NONE,
                }],
                policy_admin: false,
            });
        }
        ThingPolicy {
            id: id.to_owned(),
            entries,
        }
    }

    /// What subscriber `s` should receive of `event` of `thing` (`None`: nothing): partial
    /// READ at the event's path, the value cut to the subscriber's view, nothing when nothing
    /// of the value is visible. At the root the cut is a retrieve's (the view plus `thingId`
    /// and the other allowlisted fields the value has), so a whole-thing event still carries
    /// `thingId`; but a root event of which nothing is visible (a merge patch touching only
    /// what `s` may not read) is not delivered.
    fn expected_delivery(
        &mut self,
        s: usize,
        thing: usize,
        event: &SeenEvent,
    ) -> Option<SeenEvent> {
        let policy = &self.policies[self.things[thing].policy];
        let oracle = Oracle::new(policy, &self.actors[s].subjects);
        if !oracle.check(&event.path, Perm::Read, Mode::Partial, &mut self.vectors) {
            return None;
        }
        let value = match &event.value {
            None => None,
            Some(v) if event.path == "/" => {
                let view = oracle.view("/", v, &mut self.vectors);
                if view.is_none() && v.get("thingId").is_none() {
                    return None;
                }
                Some(oracle.view_with_fields(v, &mut self.vectors)?)
            }
            Some(v) => Some(oracle.view(&event.path, v, &mut self.vectors)?),
        };
        Some(SeenEvent {
            value,
            ..event.clone()
        })
    }

    /// Applies an event to the model and records what each subscriber should receive.
    fn announce(&mut self, thing: usize, action: &str, path: &str, value: Option<Value>) {
        self.things[thing].revision += 1;
        let event = SeenEvent {
            topic: event_topic(&self.things[thing].id, action, path),
            path: path.to_owned(),
            value,
            revision: self.things[thing].revision,
        };
        for s in 0..self.actors.len() {
            match self.expected_delivery(s, thing, &event) {
                Some(delivery) => {
                    if delivery.value != event.value {
                        self.tally.add("deliveries expected, cut", 1);
                    }
                    self.tally.add("deliveries expected", 1);
                    self.actors[s].expected.push(delivery);
                }
                None => self.tally.add("deliveries withheld (not readable)", 1),
            }
        }
    }

    /// Compares a PUBACK with the verdict; counts it.
    fn judge_ack(&mut self, actor: usize, verdict: Verdict, got: u8, what: &str) {
        let v5 = self.actors[actor].v5();
        let want = reason(verdict, v5);
        if got != want {
            self.fail(format!(
                "{what}: PUBACK {got:#04x}, expected {want:#04x} ({verdict:?}, MQTT {})",
                if v5 { "5" } else { "3.1.1" }
            ));
        }
        self.tally.add(
            match verdict {
                Verdict::Applied => "changes applied",
                Verdict::Denied => "changes denied",
                Verdict::NotFound => "changes not found",
            },
            1,
        );
    }

    async fn policy_change(&mut self) {
        let p = self.rng.below(self.policies.len());
        let id = self.policies[p].id.clone();
        let policy = self.random_policy(&id);
        self.op = format!("policy modify {id}");
        let ack = self.actors[0]
            .conn
            .publish_qos1(
                &policy_command(&id, "modify", ""),
                policy.to_json().to_string().as_bytes(),
            )
            .await;
        if ack.reason != 0 {
            self.fail(format!("the owner's policy modify answered {ack:?}"));
            return;
        }
        self.policies[p] = policy;
        self.tally.add("policy changes", 1);
    }

    async fn modify(&mut self, a: usize, t: usize) {
        let (path, value) = random_modify(&mut self.rng, &self.things[t].doc);
        let id = self.things[t].id.clone();
        self.op = format!(
            "{} modify {id} {path} {value}",
            self.actors[a].conn.client_id
        );
        let allowed = self.check(a, t, path, Perm::Write, Mode::Unrestricted);
        let ack = self.actors[a]
            .conn
            .publish_qos1(
                &thing_command(&id, "modify", path),
                value.to_string().as_bytes(),
            )
            .await;
        let verdict = if allowed {
            Verdict::Applied
        } else {
            Verdict::Denied
        };
        self.judge_ack(a, verdict, ack.reason, "modify");
        if verdict != Verdict::Applied {
            return;
        }
        let doc = &mut self.things[t].doc;
        if path == "/" {
            let mut new = value;
            new["thingId"] = doc["thingId"].clone();
            new["policyId"] = doc["policyId"].clone();
            *doc = new.clone();
            self.announce(t, "modified", "/", Some(new));
        } else {
            let action = if value_at(doc, path).is_some() {
                "modified"
            } else {
                "created"
            };
            set_at(doc, path, value.clone());
            self.announce(t, action, path, Some(value));
        }
    }

    async fn merge(&mut self, a: usize, t: usize) {
        let (base, patch) = random_merge(&mut self.rng);
        let id = self.things[t].id.clone();
        self.op = format!(
            "{} merge {id} {base} {patch}",
            self.actors[a].conn.client_id
        );
        let leaves = merge_leaves(base, &patch);
        let mut allowed = true;
        for leaf in &leaves {
            allowed &= self.check(a, t, leaf, Perm::Write, Mode::Unrestricted);
        }
        let ack = self.actors[a]
            .conn
            .publish_qos1(
                &thing_command(&id, "merge", base),
                patch.to_string().as_bytes(),
            )
            .await;
        let verdict = if allowed {
            Verdict::Applied
        } else {
            Verdict::Denied
        };
        self.judge_ack(a, verdict, ack.reason, "merge");
        if verdict != Verdict::Applied {
            return;
        }
        let doc = &mut self.things[t].doc;
        let mut merged = value_at(doc, base).cloned().unwrap_or(Value::Null);
        merge_patch(&mut merged, &patch);
        if base == "/" {
            *doc = merged;
        } else {
            set_at(doc, base, merged);
        }
        self.announce(t, "merged", base, Some(patch));
    }

    async fn delete(&mut self, a: usize, t: usize) {
        let path = *self.rng.pick(&DELETE_PATHS);
        let id = self.things[t].id.clone();
        self.op = format!("{} delete {id} {path}", self.actors[a].conn.client_id);
        let allowed = self.check(a, t, path, Perm::Write, Mode::Unrestricted);
        let verdict = if !allowed {
            Verdict::Denied
        } else if value_at(&self.things[t].doc, path).is_none() {
            Verdict::NotFound
        } else {
            Verdict::Applied
        };
        let ack = self.actors[a]
            .conn
            .publish_qos1(&thing_command(&id, "delete", path), b"")
            .await;
        self.judge_ack(a, verdict, ack.reason, "delete");
        if verdict == Verdict::Applied {
            remove_at(&mut self.things[t].doc, path);
            self.announce(t, "deleted", path, None);
        }
    }

    async fn retrieve(&mut self, a: usize, t: usize, n: usize) {
        let path = *self.rng.pick(&RETRIEVE_PATHS);
        let id = self.things[t].id.clone();
        self.op = format!("{} retrieve {id} {path}", self.actors[a].conn.client_id);
        let partial = self.check(a, t, path, Perm::Read, Mode::Partial);
        let (verdict, value) = if !partial {
            (Verdict::Denied, None)
        } else {
            match value_at(&self.things[t].doc, path).cloned() {
                None => (Verdict::NotFound, None),
                Some(v) => {
                    let policy = &self.policies[self.things[t].policy];
                    let oracle = Oracle::new(policy, &self.actors[a].subjects);
                    let cut = if path == "/" {
                        oracle.view_with_fields(&v, &mut self.vectors)
                    } else {
                        oracle.view(path, &v, &mut self.vectors)
                    };
                    match cut {
                        Some(cut) => (Verdict::Applied, Some(cut)),
                        None => (Verdict::Denied, None),
                    }
                }
            }
        };
        let topic = thing_command(&id, "retrieve", path);
        let correlation = format!("r{n}");
        let actor = &mut self.actors[a];
        let (ack, reply) = if actor.v5() {
            let reply_topic = format!("e2e/replies/{}", actor.conn.client_id);
            let properties = Properties {
                response_topic: Some(
                    TopicName::new(Bytes::from(reply_topic.clone())).expect("topic"),
                ),
                correlation_data: Some(Bytes::from(correlation.clone())),
                ..Properties::default()
            };
            let pending = actor.conn.send_qos1_with(&topic, b"", properties);
            let ack = pending.wait().await;
            let wanted = Some(Bytes::from(correlation));
            let reply = actor
                .conn
                .next_matching(NET_TIMEOUT, |d| {
                    d.topic == reply_topic && d.correlation == wanted
                })
                .await;
            (ack, reply)
        } else {
            let reply_topic = topic.replace("/commands/", "/responses/");
            let ack = actor.conn.publish_qos1(&topic, b"").await;
            let reply = actor
                .conn
                .next_matching(NET_TIMEOUT, |d| d.topic == reply_topic)
                .await;
            (ack, reply)
        };
        let v5 = actor.v5();
        let want = reason(verdict, v5);
        if ack.reason != want {
            self.fail(format!(
                "retrieve: PUBACK {:#04x}, expected {want:#04x} ({verdict:?})",
                ack.reason
            ));
        }
        self.tally.add(
            match verdict {
                Verdict::Applied => "retrieves answered",
                Verdict::Denied => "retrieves denied",
                Verdict::NotFound => "retrieves not found",
            },
            1,
        );
        let Some(reply) = reply else {
            self.fail(format!("retrieve: no answer within {NET_TIMEOUT:?}"));
            return;
        };
        let reply = reply.json();
        let status = reply.get("status").and_then(Value::as_u64);
        match verdict {
            Verdict::Applied => {
                if status != Some(200) || reply.get("value") != value.as_ref() {
                    self.fail(format!(
                        "retrieve: answered {reply}, expected status 200 with value {}",
                        value.unwrap_or_default()
                    ));
                }
            }
            Verdict::Denied | Verdict::NotFound => {
                if status != Some(404) {
                    self.fail(format!("retrieve: answered {reply}, expected 404"));
                }
            }
        }
    }

    /// The stored state at the end: the owner grants itself READ on `thing:/` in every
    /// policy and retrieves each thing whole with `_revision` (Ditto envelope on
    /// `ditto/commands`): document and revision must be the model's, so no denied change was
    /// applied and no allowed one lost, even where no subscriber could see it.
    async fn compare_state(&mut self) {
        for p in 0..self.policies.len() {
            let id = self.policies[p].id.clone();
            self.op = format!("final policy modify {id}");
            let policy = ThingPolicy {
                id: id.clone(),
                entries: vec![Entry {
                    label: "owner".to_owned(),
                    subjects: vec![client_subject(&self.solution, "owner")],
                    resources: vec![Resource {
                        path: "/".to_owned(),
                        grant: Perms {
                            read: true,
                            write: false,
                        },
                        revoke: Perms::NONE,
                    }],
                    policy_admin: true,
                }],
            };
            let ack = self.actors[0]
                .conn
                .publish_qos1(
                    &policy_command(&id, "modify", ""),
                    policy.to_json().to_string().as_bytes(),
                )
                .await;
            assert_eq!(ack.reason, 0, "final policy modify {id}: {ack:?}");
            self.policies[p] = policy;
        }
        for t in 0..self.things.len() {
            let id = self.things[t].id.clone();
            self.op = format!("final retrieve {id}");
            let (ns, name) = id.split_once(':').expect("ns:name");
            let envelope = json!({
                "topic": format!("{ns}/{name}/things/twin/commands/retrieve"),
                "path": "/",
                "fields": "thingId,policyId,attributes,features,_revision",
                "headers": {"correlation-id": format!("final-{t}")},
            });
            let properties = Properties {
                response_topic: Some(
                    TopicName::new(Bytes::from("e2e/replies/owner")).expect("topic"),
                ),
                correlation_data: Some(Bytes::from(format!("final-{t}"))),
                ..Properties::default()
            };
            let owner = &mut self.actors[0].conn;
            let ack = owner
                .send_qos1_with(
                    "ditto/commands",
                    envelope.to_string().as_bytes(),
                    properties,
                )
                .wait()
                .await;
            assert_eq!(ack.reason, 0, "final retrieve {id}: {ack:?}");
            let wanted = Some(Bytes::from(format!("final-{t}")));
            let reply = owner
                .next_matching(NET_TIMEOUT, |d| d.correlation == wanted)
                .await
                .unwrap_or_else(|| panic!("no answer to the final retrieve of {id}"))
                .json();
            let mut expected = self.things[t].doc.clone();
            expected["_revision"] = json!(self.things[t].revision);
            let mut expected_map = expected.as_object().cloned().unwrap_or_default();
            // A thing whose attributes or features were all deleted has none.
            expected_map.retain(|_, v| !v.is_null());
            let expected = Value::Object(expected_map);
            if reply.get("value") != Some(&expected) {
                self.fail(format!(
                    "stored state {}, the model (every acknowledged change, no denied one) says \
                     {expected}",
                    reply.get("value").cloned().unwrap_or_default()
                ));
            }
            self.tally.add("things compared whole", 1);
        }
    }

    /// Waits until every client has received at least what the model expects (or
    /// [`SETTLE_LIMIT`] passed), then for [`QUIET`] more, and compares each client's thing
    /// events with the model's, in order.
    async fn compare_deliveries(&mut self) {
        self.op = "final comparison".to_owned();
        let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
        for s in 0..self.actors.len() {
            let mut got: Vec<SeenEvent> = Vec::new();
            let mut others: Vec<Delivered> = Vec::new();
            let expected = self.actors[s].expected.len();
            while got.len() < expected {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.actors[s].conn.next_within(left).await {
                    Some(d) if is_event(&d) => got.push(SeenEvent::parse(&d)),
                    Some(d) => others.push(d),
                    None => break,
                }
            }
            for d in self.actors[s]
                .conn
                .drain_until_quiet(QUIET, SETTLE_LIMIT)
                .await
            {
                if is_event(&d) {
                    got.push(SeenEvent::parse(&d));
                } else {
                    others.push(d);
                }
            }
            let name = self.actors[s].conn.client_id.clone();
            for d in others {
                self.fail(format!(
                    "`{name}` received an unexpected message on `{}`: {}",
                    d.topic,
                    String::from_utf8_lossy(&d.payload)
                ));
            }
            let want = std::mem::take(&mut self.actors[s].expected);
            let mut missing: Vec<&SeenEvent> = want.iter().collect();
            let mut unexpected: Vec<&SeenEvent> = Vec::new();
            for g in &got {
                match missing.iter().position(|w| *w == g) {
                    Some(i) => {
                        missing.remove(i);
                    }
                    None => unexpected.push(g),
                }
            }
            self.tally
                .add("deliveries checked", got.len() - unexpected.len());
            if got == want {
                continue;
            }
            if unexpected.is_empty() && missing.is_empty() {
                self.fail(format!(
                    "`{name}` received the allowed thing events in another order than they were \
                     published"
                ));
                continue;
            }
            let show = |events: &[&SeenEvent]| {
                events
                    .iter()
                    .take(8)
                    .map(|e| {
                        format!(
                            "\n    rev {} {} value {}",
                            e.revision,
                            e.topic,
                            e.value
                                .as_ref()
                                .map_or_else(|| "(none)".to_owned(), Value::to_string)
                        )
                    })
                    .collect::<String>()
            };
            self.fail(format!(
                "`{name}` received {} thing events where the policy allows exactly {}; delivered \
                 but not allowed as such ({}):{}\n  allowed but not delivered ({}):{}",
                got.len(),
                want.len(),
                unexpected.len(),
                show(&unexpected),
                missing.len(),
                show(&missing)
            ));
        }
    }
}

async fn run_seed(seed: u64) -> (Tally, Vec<String>, usize) {
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    broker.start();
    let addr = broker.mqtt_addr();
    let mut actors = Vec::new();
    for (id, protocol) in [
        ("owner", Protocol::V5),
        ("c1", Protocol::V5),
        ("c2", Protocol::V311),
        ("c3", Protocol::V5),
        ("c4", Protocol::V311),
    ] {
        let mut conn = TwinClient::connect(addr, protocol, id, &solution).await;
        conn.subscribe_ok(EVENTS, QoS::AtLeastOnce).await;
        if protocol == Protocol::V311 {
            conn.subscribe_ok(
                "org.acme/+/things/twin/responses/retrieve/#",
                QoS::AtLeastOnce,
            )
            .await;
        }
        actors.push(Actor {
            conn,
            subjects: client_subjects(&solution, id),
            expected: Vec::new(),
        });
    }
    let mut run = Run {
        seed,
        rng: Rng::new(seed),
        solution,
        actors,
        things: Vec::new(),
        policies: Vec::new(),
        vectors: Vectors::default(),
        tally: Tally::default(),
        failures: Vec::new(),
        op: "setup".to_owned(),
    };
    // Two policies, created by the owner with only itself in them; three things.
    let owner = client_subject(&run.solution, "owner");
    for p in ["p0", "p1"] {
        let policy = ThingPolicy {
            id: format!("{NS}:{p}"),
            entries: vec![Entry {
                label: "owner".to_owned(),
                subjects: vec![owner.clone()],
                resources: vec![Resource {
                    path: "/".to_owned(),
                    grant: Perms::RW,
                    revoke: Perms::NONE,
                }],
                policy_admin: true,
            }],
        };
        let ack = run.actors[0]
            .conn
            .publish_qos1(
                &policy_command(&policy.id, "create", ""),
                policy.to_json().to_string().as_bytes(),
            )
            .await;
        assert_eq!(ack.reason, 0, "policy create {}: {ack:?}", policy.id);
        run.policies.push(policy);
    }
    for (t, p) in [(0usize, 0usize), (1, 0), (2, 1)] {
        let id = format!("{NS}:t{t}");
        let attributes = random_attributes(&mut run.rng);
        let features = random_features(&mut run.rng);
        let doc = json!({
            "thingId": id,
            "policyId": run.policies[p].id,
            "attributes": attributes,
            "features": features,
        });
        let body =
            json!({"policyId": run.policies[p].id, "attributes": attributes, "features": features});
        let ack = run.actors[0]
            .conn
            .publish_qos1(
                &thing_command(&id, "create", ""),
                body.to_string().as_bytes(),
            )
            .await;
        assert_eq!(ack.reason, 0, "thing create {id}: {ack:?}");
        run.things.push(Thing {
            id,
            policy: p,
            doc: doc.clone(),
            revision: 0,
        });
        run.op = format!("create t{t}");
        run.announce(t, "created", "/", Some(doc));
    }
    for _ in 0..run.policies.len() {
        run.policy_change().await;
    }
    for n in 0..OPERATIONS {
        let a = run.rng.below(run.actors.len());
        let t = run.rng.below(run.things.len());
        match run.rng.below(100) {
            0..=9 => run.policy_change().await,
            10..=42 => run.modify(a, t).await,
            43..=67 => run.merge(a, t).await,
            68..=74 => run.delete(a, t).await,
            _ => run.retrieve(a, t, n).await,
        }
    }
    run.compare_deliveries().await;
    run.compare_state().await;
    let vectors = run.vectors.len();
    run.vectors
        .assert_policy_crate_agrees(broker.dir(), &format!("seed-{seed:x}"));
    broker.stop();
    (run.tally, run.failures, vectors)
}

/// The case the randomized test found, on its own: a merge at the root whose patch touches only
/// what a subscriber may not read. DESIGN.md §4: "payload reduced to the subscriber's partial
/// view, nothing readable → not delivered".
#[tokio::test]
async fn a_root_merge_that_changes_nothing_a_subscriber_may_read_is_not_delivered_to_it() {
    let mut broker = Broker::new();
    let solution = broker.create_solution(NS);
    broker.start();
    let addr = broker.mqtt_addr();
    let mut owner = TwinClient::connect(addr, Protocol::V5, "owner", &solution).await;
    let mut watcher = TwinClient::connect(addr, Protocol::V5, "watcher", &solution).await;
    let policy = ThingPolicy {
        id: format!("{NS}:p"),
        entries: vec![
            Entry {
                label: "owner".to_owned(),
                subjects: vec![client_subject(&solution, "owner")],
                resources: vec![Resource {
                    path: "/".to_owned(),
                    grant: Perms::RW,
                    revoke: Perms::NONE,
                }],
                policy_admin: true,
            },
            Entry {
                label: "watcher".to_owned(),
                subjects: vec![client_subject(&solution, "watcher")],
                resources: vec![Resource {
                    path: "/features".to_owned(),
                    grant: Perms {
                        read: true,
                        write: false,
                    },
                    revoke: Perms::NONE,
                }],
                policy_admin: false,
            },
        ],
    };
    let ack = owner
        .publish_qos1(
            &policy_command(&policy.id, "create", ""),
            policy.to_json().to_string().as_bytes(),
        )
        .await;
    assert_eq!(ack.reason, 0, "{ack:?}");
    let thing = format!("{NS}:lamp");
    let body = json!({"policyId": policy.id, "attributes": {"a": 1}, "features": {"f": {"properties": {"x": 1}}}});
    let ack = owner
        .publish_qos1(
            &thing_command(&thing, "create", ""),
            body.to_string().as_bytes(),
        )
        .await;
    assert_eq!(ack.reason, 0, "{ack:?}");
    watcher.subscribe_ok(EVENTS, QoS::AtLeastOnce).await;
    // Revision 2: only an attribute, which the watcher may not read.
    let ack = owner
        .publish_qos1(
            &thing_command(&thing, "merge", ""),
            json!({"attributes": {"a": 2}}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(ack.reason, 0, "{ack:?}");
    // Revision 3: a feature property, which it may.
    let ack = owner
        .publish_qos1(
            &thing_command(&thing, "merge", ""),
            json!({"features": {"f": {"properties": {"x": 2}}}})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(ack.reason, 0, "{ack:?}");
    // Deliveries to one session keep their order: the first one must be revision 3.
    let first = watcher
        .next_within(NET_TIMEOUT)
        .await
        .expect("the visible merge is delivered");
    let first = SeenEvent::parse(&first);
    assert_eq!(
        first,
        SeenEvent {
            topic: event_topic(&thing, "merged", "/"),
            path: "/".to_owned(),
            value: Some(json!({"features": {"f": {"properties": {"x": 2}}}})),
            revision: 3,
        },
        "the merge of revision 2 touched nothing the watcher may read, yet it was delivered"
    );
    let more = watcher.drain_until_quiet(QUIET, NET_TIMEOUT).await;
    assert!(more.is_empty(), "more deliveries: {more:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_policies_decide_every_command_retrieve_and_delivery_over_real_connections() {
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut total = Tally::default();
    for seed in SEEDS {
        let (tally, seed_failures, vectors) = run_seed(seed).await;
        eprintln!(
            "seed {seed:#x}: {tally} | oracle answers confirmed by the policy crate={vectors}"
        );
        for (k, v) in &tally.0 {
            total.add(k, *v);
        }
        total.add("policy crate vectors", vectors);
        failures.extend(seed_failures);
    }
    eprintln!(
        "all seeds ({:.1} s): {total}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        total.get("changes denied") > 0
            && total.get("changes applied") > 0
            && total.get("retrieves denied") > 0
            && total.get("retrieves answered") > 0
            && total.get("deliveries expected, cut") > 0
            && total.get("deliveries withheld (not readable)") > 0,
        "the random runs did not exercise every kind of decision: {total}"
    );
    assert!(
        failures.is_empty(),
        "{} mismatches between the server and the policy decisions:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
