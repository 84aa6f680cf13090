//! Fuzzes the policy JSON parser, the JSON round trip and everything a compiled policy offers.
//!
//! Property: no input may make any of this panic, and
//! - `policy_from_value(policy_to_value(p)) == p` for every policy `parse_policy` accepts;
//! - a check by parsed key, by its canonical spelling (`check_resource`) and by `kind` + path
//!   (`check`) agree;
//! - unrestricted implies partial;
//! - the partial view of a thing is the whole thing when READ on `thing:/` is unrestricted, and
//!   nothing when it is not even partial;
//! - an explanation agrees with the view it explains.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use policy::{
    Enforcer, Mode, Permission, Policy, ResourceKey, ResourceType, Timestamp, check_lockout,
    parse_policy, policy_from_value, policy_to_value,
};
use serde_json::{Value, json};

/// Bounds the work per input (views × keys × permissions × modes).
const MAX_SINGLE_SUBJECTS: usize = 4;
const MAX_KEYS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = parse_policy(text) else {
        return;
    };
    round_trip(&policy);
    exercise(&policy);
});

fn round_trip(policy: &Policy) {
    let value = policy_to_value(policy);
    let again = match policy_from_value(&value) {
        Ok(p) => p,
        Err(e) => panic!("policy_to_value wrote JSON that policy_from_value refuses: {e}\n{value}"),
    };
    assert_eq!(
        &again, policy,
        "round trip changed the policy; JSON written: {value}"
    );
}

fn thing() -> Value {
    json!({
        "thingId": "org.acme:lamp",
        "policyId": "org.acme:lamp",
        "_revision": 3,
        "attributes": {
            "location": {"latitude": 1.5, "longitude": -2, "nonexistentAttribute": null},
            "attr2": "x",
            "tags": ["a", {"b": true}]
        },
        "features": {
            "firmware": {"properties": {"modulesVersions": {"a": "1", "b": "2"}}},
            "foo": {"properties": {"special": 1, "plain": [1, 2]}, "desiredProperties": {}},
            "lamp~x": {"properties": {"on": false}}
        }
    })
}

fn exercise(policy: &Policy) {
    let enforcer = Arc::new(Enforcer::compile(policy));
    // A policy that imports itself: exercises `effective_entries` with real imports.
    let _ = Enforcer::compile_with_imports(policy, &[policy]);

    let mut all_subjects: Vec<&str> = Vec::new();
    let mut keys: Vec<&ResourceKey> = Vec::new();
    let mut namespaces: Vec<Option<String>> = vec![None, Some("org.acme".into())];
    for entry in policy.entries.values() {
        for id in entry.subjects.keys() {
            if !all_subjects.contains(&id.as_str()) {
                all_subjects.push(id.as_str());
            }
        }
        keys.extend(entry.resources.keys());
        if let Some(patterns) = &entry.namespaces {
            for p in patterns.iter().take(2) {
                // `a.b` matches `a.b`, `a.b.*` matches `a.b.x`.
                let text = p.to_string();
                let ns = match text.strip_suffix(".*") {
                    Some(base) => format!("{base}.x"),
                    None => text,
                };
                namespaces.push(Some(ns));
            }
        }
    }
    if let Some(id) = &policy.policy_id {
        namespaces.push(Some(id.namespace().to_owned()));
    }
    namespaces.sort();
    namespaces.dedup();
    namespaces.truncate(4);
    keys.truncate(MAX_KEYS);
    let roots: Vec<ResourceKey> = ResourceType::ALL
        .into_iter()
        .map(ResourceKey::root)
        .collect();

    let mut subject_sets: Vec<Vec<&str>> =
        vec![all_subjects.clone(), vec!["nobody:unknown"], vec![]];
    subject_sets.extend(
        all_subjects
            .iter()
            .take(MAX_SINGLE_SUBJECTS)
            .map(|s| vec![*s]),
    );
    let times = [
        Timestamp::MIN,
        Timestamp::from_unix_millis(1_780_000_000_000), // mid 2026
        Timestamp::MAX,
    ];

    let thing = thing();
    for subjects in &subject_sets {
        for namespace in &namespaces {
            for &now in &times {
                let view = enforcer.for_subjects(subjects, namespace.as_deref(), now);
                let _ = view.valid_until();
                let _ = view.is_valid_at(now);
                for key in keys.iter().copied().chain(roots.iter()) {
                    let spelled = key.to_string();
                    let path = spelled.split_once(':').map_or("", |(_, p)| p);
                    for permission in Permission::ALL {
                        let mut unrestricted = false;
                        for mode in [Mode::Unrestricted, Mode::Partial] {
                            let by_key = view.check_key(key, permission, mode);
                            let by_text = view.check_resource(&spelled, permission, mode);
                            let by_path = view.check(key.kind(), path, permission, mode);
                            assert!(
                                by_key == by_text && by_key == by_path,
                                "check_key {by_key} / check_resource {by_text} / check {by_path} \
                                 disagree on {spelled} {permission} {mode:?} \
                                 for {subjects:?} in {namespace:?} at {now:?}"
                            );
                            match mode {
                                Mode::Unrestricted => unrestricted = by_key,
                                Mode::Partial => assert!(
                                    by_key || !unrestricted,
                                    "unrestricted but not partial: {spelled} {permission} \
                                     for {subjects:?} in {namespace:?} at {now:?}"
                                ),
                            }
                        }
                    }
                }

                let view_of_thing = view.partial_view(ResourceType::Thing, "/", &thing);
                if view.check(
                    ResourceType::Thing,
                    "/",
                    Permission::Read,
                    Mode::Unrestricted,
                ) {
                    assert_eq!(
                        view_of_thing.as_ref(),
                        Some(&thing),
                        "unrestricted READ but partial view"
                    );
                }
                if !view.check(ResourceType::Thing, "/", Permission::Read, Mode::Partial) {
                    assert_eq!(view_of_thing, None, "no partial READ but something visible");
                }
                let _ = view.partial_view(ResourceType::Thing, "/features", &thing["features"]);
                let _ = view.partial_view(
                    ResourceType::Thing,
                    "attributes//location/",
                    &thing["attributes"]["location"],
                );
                let _ = view.partial_view_with_fields(
                    ResourceType::Thing,
                    &thing,
                    &["thingId", "policyId", "_revision"],
                );
            }
        }
    }

    let _ = check_lockout(policy);

    let resource = keys
        .first()
        .map_or_else(|| ResourceKey::root(ResourceType::Thing), |k| (*k).clone());
    let now = Timestamp::from_unix_millis(1_780_000_000_000);
    let namespace = namespaces.last().cloned().flatten();
    for permission in [Permission::Read, Permission::Write] {
        let explanation = enforcer.explain(
            &all_subjects,
            namespace.as_deref(),
            now,
            &resource,
            permission,
        );
        let view = enforcer.for_subjects(&all_subjects, namespace.as_deref(), now);
        assert_eq!(
            explanation.unrestricted,
            view.check_key(&resource, permission, Mode::Unrestricted)
        );
        assert_eq!(
            explanation.partial,
            view.check_key(&resource, permission, Mode::Partial)
        );
        let _ = explanation.to_string();
    }
}
