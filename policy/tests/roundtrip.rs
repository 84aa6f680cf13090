//! Parse → serialize → parse gives the same policy, for generated policies of every shape.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use policy::{parse_policy, policy_from_value, policy_to_value};
use proptest::prelude::*;
use serde_json::{Value, json};

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("features".to_owned()),
        Just("a~0b".to_owned()),
        Just("a~1b".to_owned()),
        Just("größe".to_owned()),
        Just("".to_owned()),
        "[a-z]{1,4}",
    ]
}

fn resource() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["thing", "policy", "message", "solution", "topic"]),
        prop::collection::vec(segment(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(kind, segs, slash)| {
            let path = segs.join("/");
            if slash || !path.is_empty() {
                format!("{kind}:/{path}")
            } else {
                format!("{kind}:")
            }
        })
}

fn perms() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(
        prop::sample::select(vec!["READ", "WRITE", "EXECUTE", "CREATE"]),
        0..5,
    )
}

fn subject() -> impl Strategy<Value = (String, Value)> {
    (
        "(google|iot-things|x):[a-z0-9/@.]{1,6}",
        prop::option::of(0i64..4_000_000_000_000),
        any::<bool>(),
    )
        .prop_map(|(id, expiry, announce)| {
            let mut s = json!({"type": "generated"});
            if let Some(ms) = expiry {
                s["expiry"] = Value::from(policy::Timestamp::from_unix_millis(ms).to_string());
            }
            if announce {
                s["announcement"] = json!({"beforeExpiry": "1h", "whenDeleted": true});
            }
            (id, s)
        })
}

fn entry() -> impl Strategy<Value = Value> {
    (
        prop::collection::btree_map(any::<u8>(), subject(), 0..3),
        prop::collection::btree_map(resource(), (perms(), perms()), 0..4),
        prop::option::of(prop::collection::vec(
            prop::sample::select(vec!["org.acme", "org.acme.*", "a_1.b"]),
            0..3,
        )),
        prop::option::of(prop::sample::select(vec!["implicit", "explicit", "never"])),
    )
        .prop_map(|(subjects, resources, namespaces, importable)| {
            let subjects: serde_json::Map<_, _> = subjects.into_values().collect();
            // Keys that normalize alike would be refused as duplicates: keep one of each.
            let mut seen = std::collections::HashSet::new();
            let resources: serde_json::Map<_, _> = resources
                .into_iter()
                .filter(|(k, _)| seen.insert(policy::ResourceKey::parse(k).unwrap()))
                .map(|(k, (g, r))| (k, json!({"grant": g, "revoke": r})))
                .collect();
            let mut e = json!({"subjects": subjects, "resources": resources});
            if let Some(ns) = namespaces {
                e["namespaces"] = json!(ns);
            }
            if let Some(i) = importable {
                e["importable"] = json!(i);
            }
            e
        })
}

fn policy_json() -> impl Strategy<Value = Value> {
    (
        prop::option::of("[a-z]{1,3}(\\.[a-z][a-z0-9_]{0,3}){0,2}:[a-zA-Z0-9-]{1,8}"),
        prop::collection::btree_map("[A-Za-z][A-Za-z0-9_-]{0,6}", entry(), 0..4),
        prop::collection::btree_map(
            "org\\.[a-z]{1,3}:[a-z]{1,3}",
            prop::collection::vec("[A-Z]{1,3}", 0..3),
            0..2,
        ),
        prop::option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(|(id, entries, imports, revision, metadata)| {
            let mut p = json!({"entries": entries});
            if let Some(id) = id {
                p["policyId"] = json!(id);
            }
            if !imports.is_empty() {
                let imports: serde_json::Map<_, _> = imports
                    .into_iter()
                    .map(|(id, labels)| (id, json!({"entries": labels})))
                    .collect();
                p["imports"] = Value::Object(imports);
            }
            if let Some(r) = revision {
                p["_revision"] = json!(r);
            }
            if metadata {
                p["_created"] = json!("2026-01-01T00:00:00Z");
                p["_metadata"] = json!({"x": [1, 2]});
            }
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn parse_serialize_parse_gives_the_same_policy(doc in policy_json()) {
        let text = doc.to_string();
        let first = parse_policy(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let written = policy_to_value(&first);
        let second = policy_from_value(&written).map_err(|e| TestCaseError::fail(format!("{e}\n{written}")))?;
        prop_assert_eq!(&first, &second);
        prop_assert_eq!(policy_to_value(&second), written);
    }
}
