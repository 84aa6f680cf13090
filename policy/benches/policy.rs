#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The figures of DESIGN.md §10 for the policy engine, side by side in one binary:
//! - `check/cached_unrestricted`: one check through a connection's cached [`SubjectView`];
//! - `view/partial_2kb`: the partial view of a ~2 KB thing;
//! - `check/cedar`: the same decision through cedar-policy (feature `cedar-bench`);
//! - `compile/10_entries`, `compile/view_3_subjects`: what a policy change costs;
//! - `floor/hashmap_30b_key`: a `HashMap<String, bool>` lookup, the floor a check is held to.
//!
//! `criterion::black_box` is deprecated in criterion 0.8 in favour of `std::hint::black_box`,
//! which it merely forwarded to; that is what is used here.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use policy::{Enforcer, Mode, Permission, Policy, ResourceType, SubjectView, Timestamp};
use serde_json::{Value, json};

/// A realistic policy of 10 entries: several subjects, grants and revokes at various depths on
/// `thing:/`, `policy:/` and `message:/`. No namespaces and no expiry, so that the cedar model
/// below needs no `when` clauses.
const POLICY: &str = r#"{
  "policyId": "org.acme:lamp-42",
  "entries": {
    "owner": {
      "subjects": {"google:alice": {"type": "user"}},
      "resources": {
        "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
        "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
        "message:/": {"grant": ["READ", "WRITE"], "revoke": []}
      }
    },
    "device": {
      "subjects": {"jwt:device-0042": {"type": "device"}},
      "resources": {
        "thing:/features/lamp": {"grant": ["READ", "WRITE"], "revoke": []},
        "thing:/features/lamp/properties/config": {"grant": [], "revoke": ["WRITE"]},
        "message:/inbox": {"grant": ["READ"], "revoke": []}
      }
    },
    "lamps": {
      "subjects": {"group:lamps": {"type": "device group"}},
      "resources": {
        "thing:/features/lamp/properties": {"grant": ["READ"], "revoke": []},
        "thing:/attributes": {"grant": ["READ"], "revoke": []},
        "thing:/attributes/secret": {"grant": [], "revoke": ["READ"]}
      }
    },
    "gateway": {
      "subjects": {"integration:gateway-7": {"type": "connection"}},
      "resources": {
        "thing:/features": {"grant": ["READ"], "revoke": []},
        "thing:/features/lamp/properties/config/on": {"grant": ["READ"], "revoke": []},
        "thing:/features/camera": {"grant": [], "revoke": ["READ"]},
        "message:/outbox": {"grant": ["READ"], "revoke": []}
      }
    },
    "support": {
      "subjects": {"google:bob": {"type": "user"}, "google:carol": {"type": "user"}},
      "resources": {
        "thing:/": {"grant": ["READ"], "revoke": []},
        "thing:/features/lamp/properties/config": {"grant": [], "revoke": ["READ"]},
        "policy:/": {"grant": ["READ"], "revoke": []}
      }
    },
    "auditor": {
      "subjects": {"google:dave": {"type": "user"}},
      "resources": {
        "policy:/": {"grant": ["READ"], "revoke": []},
        "policy:/entries/owner": {"grant": [], "revoke": ["READ"]}
      }
    },
    "installer": {
      "subjects": {"google:erin": {"type": "user"}, "integration:gateway-7": {"type": "connection"}},
      "resources": {
        "thing:/features/lamp/properties/firmware": {"grant": ["WRITE"], "revoke": []},
        "thing:/features/lamp/properties/firmware/key": {"grant": [], "revoke": ["READ"]}
      }
    },
    "messaging": {
      "subjects": {"jwt:device-0042": {"type": "device"}, "google:alice": {"type": "user"}},
      "resources": {
        "message:/": {"grant": ["READ"], "revoke": []},
        "message:/outbox/messages/debug": {"grant": [], "revoke": ["READ"]}
      }
    },
    "guest": {
      "subjects": {"google:guest": {"type": "user"}},
      "resources": {
        "thing:/attributes/location": {"grant": ["READ"], "revoke": []},
        "thing:/": {"grant": [], "revoke": ["WRITE"]}
      }
    },
    "policy-lock": {
      "subjects": {"group:lamps": {"type": "device group"}},
      "resources": {
        "policy:/": {"grant": [], "revoke": ["READ", "WRITE"]}
      }
    }
  }
}"#;

/// One connection's subjects.
const SUBJECTS: [&str; 3] = ["integration:gateway-7", "jwt:device-0042", "group:lamps"];
/// The 5-level path of the checked resource (under `thing:`).
const PATH: &str = "/features/lamp/properties/config/on";
const NAMESPACE: Option<&str> = Some("org.acme");
const NOW: Timestamp = Timestamp::from_unix_millis(1_767_225_600_000);

fn fixture() -> (Policy, SubjectView) {
    let policy = policy::parse_policy(POLICY).expect("the bench policy parses");
    assert_eq!(policy.entries.len(), 10);
    let enforcer = Arc::new(Enforcer::compile(&policy));
    let view = enforcer.for_subjects(&SUBJECTS, NAMESPACE, NOW);
    (policy, view)
}

fn check(c: &mut Criterion) {
    let (_, view) = fixture();
    // Granted by `gateway` at level 5 (and above by `lamps`, `device`, `gateway`); the only READ
    // revoke on the way (`support` at level 4) is not held by this connection; nothing below.
    assert!(view.check(
        ResourceType::Thing,
        PATH,
        Permission::Read,
        Mode::Unrestricted
    ));
    c.bench_function("check/cached_unrestricted", |b| {
        b.iter(|| {
            view.check(
                black_box(ResourceType::Thing),
                black_box(PATH),
                black_box(Permission::Read),
                black_box(Mode::Unrestricted),
            )
        });
    });
}

/// A thing of about 2 KB whose attributes and features the policy grants and revokes in part.
fn thing() -> Value {
    json!({
        "thingId": "org.acme:lamp-42",
        "policyId": "org.acme:lamp-42",
        "definition": "org.acme:smart-lamp:2.1.0",
        "attributes": {
            "manufacturer": "ACME Lighting GmbH",
            "model": "Luma Pro 2",
            "serial": "LP2-2025-000042-7F3A",
            "location": {"building": "HQ-North", "floor": 3, "room": "3.14", "lat": 52.5200, "lon": 13.4050},
            "secret": {"apiKey": "k_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0", "pin": "4711"},
            "tags": ["lighting", "office", "dimmable", "rgb"],
            "installedAt": "2025-03-14T09:26:53Z"
        },
        "features": {
            "lamp": {
                "definition": ["org.acme:lamp:1.4.0"],
                "properties": {
                    "config": {
                        "on": true,
                        "brightness": 80,
                        "color": {"r": 255, "g": 180, "b": 90},
                        "transitionMs": 400,
                        "schedule": [
                            {"at": "07:00", "on": true, "brightness": 60},
                            {"at": "12:30", "on": true, "brightness": 100},
                            {"at": "22:00", "on": false, "brightness": 0}
                        ]
                    },
                    "status": {
                        "powerW": 7.5,
                        "temperatureC": 41.2,
                        "hoursOn": 1834,
                        "lastSeen": "2026-01-01T00:00:00Z",
                        "errors": []
                    },
                    "firmware": {
                        "version": "4.2.1",
                        "channel": "stable",
                        "key": "-----BEGIN KEY----- MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A -----END KEY-----",
                        "url": "https://updates.acme.example/luma/4.2.1.bin"
                    }
                }
            },
            "camera": {
                "properties": {
                    "resolution": "1920x1080",
                    "fps": 30,
                    "streamUrl": "rtsp://10.0.3.14/stream1",
                    "privacyMode": false
                }
            },
            "thermostat": {
                "properties": {
                    "targetC": 21.5,
                    "currentC": 20.9,
                    "humidity": 43,
                    "mode": "auto",
                    "history": [20.1, 20.4, 20.7, 20.9, 21.0, 20.9]
                }
            },
            "motion": {
                "properties": {
                    "detected": false,
                    "sensitivity": 7,
                    "lastMotion": "2025-12-31T23:59:01Z",
                    "zones": [{"id": 1, "enabled": true}, {"id": 2, "enabled": false}]
                }
            },
            "maintenance": {
                "properties": {
                    "lastService": "2025-11-02T10:15:00Z",
                    "nextService": "2026-05-02T10:15:00Z",
                    "technician": "google:erin",
                    "notes": "replaced diffuser, cleaned heat sink, recalibrated color sensor",
                    "log": [
                        {"at": "2025-03-14T09:26:53Z", "event": "installed"},
                        {"at": "2025-07-21T14:02:11Z", "event": "firmware 4.1.0"},
                        {"at": "2025-11-02T10:15:00Z", "event": "serviced"},
                        {"at": "2025-12-19T08:44:37Z", "event": "firmware 4.2.1"}
                    ]
                }
            },
            "connectivity": {
                "properties": {
                    "rssi": -61,
                    "ssid": "acme-iot",
                    "ip": "10.0.3.42",
                    "mac": "00:1B:44:11:3A:B7",
                    "uptimeS": 864000,
                    "reconnects": 3
                }
            }
        }
    })
}

fn view(c: &mut Criterion) {
    let (_, view) = fixture();
    let thing = thing();
    let size = serde_json::to_string(&thing).expect("serializes").len();
    let visible = view
        .partial_view(ResourceType::Thing, "", &thing)
        .expect("part of the thing is visible");
    let visible_size = serde_json::to_string(&visible).expect("serializes").len();
    eprintln!(
        "view/partial_2kb: the thing is {size} bytes serialized, its partial view {visible_size}"
    );
    // The view really filters: revoked inside a granted subtree, and not granted at all.
    assert!(visible.pointer("/attributes/manufacturer").is_some());
    assert!(visible.pointer("/attributes/secret").is_none());
    assert!(
        visible
            .pointer("/features/lamp/properties/firmware/key")
            .is_none()
    );
    assert!(
        visible
            .pointer("/features/lamp/properties/firmware/version")
            .is_some()
    );
    assert!(visible.pointer("/features/camera").is_none());
    assert!(visible.pointer("/thingId").is_none());
    c.bench_function("view/partial_2kb", |b| {
        b.iter(|| {
            view.partial_view(
                black_box(ResourceType::Thing),
                black_box(""),
                black_box(&thing),
            )
        });
    });
}

fn compile(c: &mut Criterion) {
    let (policy, _) = fixture();
    c.bench_function("compile/10_entries", |b| {
        b.iter(|| Enforcer::compile(black_box(&policy)));
    });
    let enforcer = Arc::new(Enforcer::compile(&policy));
    c.bench_function("compile/view_3_subjects", |b| {
        b.iter(|| {
            enforcer.for_subjects(black_box(&SUBJECTS), black_box(NAMESPACE), black_box(NOW))
        });
    });
}

fn floor(c: &mut Criterion) {
    // features/lamp000/properties/on … features/lamp099/properties/on: 100 keys of 30 bytes.
    let map: HashMap<String, bool> = (0..100)
        .map(|i| (format!("features/lamp{i:03}/properties/on"), i % 2 == 0))
        .collect();
    let key = String::from("features/lamp042/properties/on");
    assert_eq!(key.len(), 30);
    assert_eq!(map.get(key.as_str()), Some(&true));
    c.bench_function("floor/hashmap_30b_key", |b| {
        b.iter(|| map.get(black_box(key.as_str())).copied());
    });
}

#[cfg(not(feature = "cedar-bench"))]
fn cedar(_: &mut Criterion) {
    eprintln!(
        "check/cedar: skipped (enable it with `cargo bench -p policy --features cedar-bench`)"
    );
}

#[cfg(feature = "cedar-bench")]
fn cedar(c: &mut Criterion) {
    use cedar_model::Model;

    let (policy, view) = fixture();
    let model = Model::of(&policy, &SUBJECTS);
    let request = model.request(ResourceType::Thing, PATH, Permission::Read);
    let authorizer = cedar_policy::Authorizer::new();
    // The two engines must give the same answer before their speeds are compared. Cedar's
    // forbid-overrides differs from Ditto's "deepest level decides" (a revoke above a deeper
    // grant denies in cedar, allows here), and cedar has no notion of "revoked somewhere below"
    // (Mode::Unrestricted). The policy is chosen so that neither difference applies to this
    // request: no subject of the connection revokes READ at or above the resource (only
    // `support`, not held, does), and the resource is a leaf of the policy. Other requests on
    // the same policy, where the semantics coincide as well, are checked alongside.
    let agreeing = [
        (PATH, Permission::Read, true),
        // `device` grants WRITE at level 3 and revokes it at level 5: both deny.
        (PATH, Permission::Write, false),
        // `gateway` revokes READ on the camera, nothing grants deeper: both deny.
        ("/features/camera/properties/fps", Permission::Read, false),
        // Nothing of the connection's grants anything on the thing's root.
        ("/definition", Permission::Read, false),
    ];
    for (path, permission, expected) in agreeing {
        let ours = view.check(ResourceType::Thing, path, permission, Mode::Unrestricted);
        let theirs = authorizer
            .is_authorized(
                &model.request(ResourceType::Thing, path, permission),
                &model.policies,
                &model.entities,
            )
            .decision()
            == cedar_policy::Decision::Allow;
        assert_eq!(
            (ours, theirs),
            (expected, expected),
            "{permission} on thing:{path}"
        );
    }
    c.bench_function("check/cedar", |b| {
        b.iter(|| {
            authorizer.is_authorized(
                black_box(&request),
                black_box(&model.policies),
                black_box(&model.entities),
            )
        });
    });
}

/// The Ditto policy as a cedar policy set and entity store.
///
/// - Every resource path is a `Resource` entity (id `thing:/features/lamp`) whose parent is its
///   parent path, up to the type's root (`thing:/`).
/// - Every entry is an `Entry` entity; every subject a `Subject` entity whose parents are the
///   entries that name it.
/// - The connection is a `Connection` entity whose parents are its subjects, so
///   `principal in Entry::"x"` holds iff some subject of the connection is in entry `x`: the
///   subjects judged together, as the enforcer does.
/// - A grant of p on r is `permit(principal in Entry::"x", action in [Action::"p", …],
///   resource in Resource::"r")`, a revoke the same with `forbid`.
#[cfg(feature = "cedar-bench")]
mod cedar_model {
    use std::collections::{BTreeMap, BTreeSet, HashSet};
    use std::str::FromStr;

    use cedar_policy::{
        Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Request,
    };
    use policy::{Permission, Permissions, Policy, ResourceKey, ResourceType};

    const CONNECTION: &str = "conn-1";

    pub struct Model {
        pub policies: PolicySet,
        pub entities: Entities,
    }

    fn uid(kind: &str, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(EntityTypeName::from_str(kind).unwrap(), EntityId::new(id))
    }

    /// The IDs of a resource and its ancestors, root first: `thing:/`, `thing:/features`, ….
    fn chain<'a>(kind: ResourceType, segments: impl Iterator<Item = &'a str>) -> Vec<String> {
        let mut ids = vec![format!("{kind}:/")];
        for segment in segments.filter(|s| !s.is_empty()) {
            let last = ids.last().unwrap();
            let sep = if last.ends_with('/') { "" } else { "/" };
            ids.push(format!("{last}{sep}{segment}"));
        }
        ids
    }

    fn key_chain(key: &ResourceKey) -> Vec<String> {
        chain(key.kind(), key.segments())
    }

    fn actions(permissions: Permissions) -> String {
        let list: Vec<String> = permissions
            .iter()
            .map(|p| format!("Action::\"{p}\""))
            .collect();
        list.join(", ")
    }

    impl Model {
        pub fn of(policy: &Policy, subjects: &[&str]) -> Model {
            // Resource id → parent id; every node named by the policy, with its ancestors.
            let mut resources: BTreeMap<String, Option<String>> = BTreeMap::new();
            let mut add_chain = |ids: Vec<String>| {
                let mut parent = None;
                for id in ids {
                    resources.entry(id.clone()).or_insert(parent);
                    parent = Some(id);
                }
            };
            let mut memberships: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let mut text = String::new();
            for (label, entry) in &policy.entries {
                assert!(entry.namespaces.is_none(), "the model has no namespaces");
                for (subject_id, subject) in &entry.subjects {
                    assert!(subject.expiry.is_none(), "the model has no expiry");
                    memberships
                        .entry(subject_id.as_str().to_owned())
                        .or_default()
                        .insert(label.as_str().to_owned());
                }
                for (key, effects) in &entry.resources {
                    let ids = key_chain(key);
                    let resource = ids.last().unwrap().clone();
                    add_chain(ids);
                    for (effect, permissions) in
                        [("permit", effects.grant), ("forbid", effects.revoke)]
                    {
                        if permissions.is_empty() {
                            continue;
                        }
                        text.push_str(&format!(
                            "{effect}(principal in Entry::\"{label}\", action in [{}], resource in Resource::\"{resource}\");\n",
                            actions(permissions)
                        ));
                    }
                }
            }
            // The resources the benchmark asks about exist as entities too.
            for path in [
                super::PATH,
                "/features/camera/properties/fps",
                "/definition",
            ] {
                add_chain(chain(ResourceType::Thing, path.split('/')));
            }

            let mut entities = Vec::new();
            for (id, parent) in &resources {
                let parents: HashSet<EntityUid> =
                    parent.iter().map(|p| uid("Resource", p)).collect();
                entities.push(Entity::new_no_attrs(uid("Resource", id), parents));
            }
            for label in policy.entries.keys() {
                entities.push(Entity::new_no_attrs(
                    uid("Entry", label.as_str()),
                    HashSet::new(),
                ));
            }
            for (subject, entries) in &memberships {
                let parents = entries.iter().map(|e| uid("Entry", e)).collect();
                entities.push(Entity::new_no_attrs(uid("Subject", subject), parents));
            }
            let parents = subjects.iter().map(|s| uid("Subject", s)).collect();
            entities.push(Entity::new_no_attrs(uid("Connection", CONNECTION), parents));

            Model {
                policies: PolicySet::from_str(&text).unwrap(),
                entities: Entities::from_entities(entities, None).unwrap(),
            }
        }

        pub fn request(&self, kind: ResourceType, path: &str, permission: Permission) -> Request {
            let resource = chain(kind, path.split('/')).pop().unwrap();
            Request::new(
                uid("Connection", CONNECTION),
                uid("Action", permission.as_str()),
                uid("Resource", &resource),
                Context::empty(),
                None,
            )
            .unwrap()
        }
    }
}

criterion_group!(benches, check, view, cedar, compile, floor);
criterion_main!(benches);
