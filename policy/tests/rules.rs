//! One or more tests per rule of DESIGN.md §1, each on a policy small enough to read at a glance.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use policy::enforcer::{Effect, Place};
use policy::{
    Enforcer, Mode, Permission, Permissions, Policy, ResourceKey, ResourceType, SubjectView,
    Timestamp, check_lockout, parse_policy,
};
use serde_json::json;

use Mode::{Partial, Unrestricted};
use Permission::{Read, Write};

const NOW: Timestamp = Timestamp::from_unix_millis(1_800_000_000_000);

/// One entry, compactly: (subjects, [(resource, grant, revoke)]), permissions comma-separated.
type Entry<'a> = (&'a [&'a str], &'a [(&'a str, &'a str, &'a str)]);

fn policy(entries: &[Entry]) -> Policy {
    fn perms(list: &str) -> Vec<&str> {
        list.split(',').filter(|p| !p.is_empty()).collect()
    }
    let entries: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .enumerate()
        .map(|(i, (subjects, resources))| {
            let subjects: serde_json::Map<_, _> = subjects
                .iter()
                .map(|s| (s.to_string(), json!({"type": "test"})))
                .collect();
            let resources: serde_json::Map<_, _> = resources
                .iter()
                .map(|(r, g, v)| {
                    (
                        r.to_string(),
                        json!({"grant": perms(g), "revoke": perms(v)}),
                    )
                })
                .collect();
            (
                format!("e{i}"),
                json!({"subjects": subjects, "resources": resources}),
            )
        })
        .collect();
    parse_policy(&json!({"policyId": "t:p", "entries": entries}).to_string()).unwrap()
}

fn view(policy: &Policy, subjects: &[&str]) -> SubjectView {
    Arc::new(Enforcer::compile(policy)).for_subjects(subjects, None, NOW)
}

fn can(v: &SubjectView, resource: &str, p: Permission, mode: Mode) -> bool {
    v.check_resource(resource, p, mode)
}

// Rule 1: a grant or revoke applies to its resource and everything below it.
#[test]
fn a_grant_covers_every_sub_resource() {
    let p = policy(&[(&["g:a"], &[("thing:/features", "READ", "")])]);
    let v = view(&p, &["g:a"]);
    assert!(can(&v, "thing:/features", Read, Unrestricted));
    assert!(can(
        &v,
        "thing:/features/lamp/properties/on",
        Read,
        Unrestricted
    ));
    assert!(!can(&v, "thing:/attributes", Read, Partial));
    assert!(!can(&v, "thing:/", Read, Unrestricted));
}

// Rule 2: the deepest level decides.
#[test]
fn a_grant_below_a_revoke_grants_again_and_a_revoke_below_a_grant_denies() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:/", "READ", ""),
            ("thing:/features", "", "READ"),
            ("thing:/features/lamp", "READ", ""),
            ("thing:/features/lamp/properties/secret", "", "READ"),
        ],
    )]);
    let v = view(&p, &["g:a"]);
    assert!(can(&v, "thing:/attributes/x", Read, Unrestricted));
    assert!(!can(&v, "thing:/features/heater", Read, Partial));
    assert!(can(
        &v,
        "thing:/features/lamp/properties/on",
        Read,
        Unrestricted
    ));
    assert!(!can(
        &v,
        "thing:/features/lamp/properties/secret/x",
        Read,
        Partial
    ));
}

#[test]
fn the_deepest_level_decides_across_subjects_and_entries() {
    // A grants at the root, B revokes features, A grants lamp again: A and B together.
    let p = policy(&[
        (&["g:a"], &[("thing:/", "READ", "")]),
        (&["g:b"], &[("thing:/features", "", "READ")]),
        (&["g:a"], &[("thing:/features/lamp", "READ", "")]),
    ]);
    let v = view(&p, &["g:a", "g:b"]);
    assert!(can(&v, "thing:/features/lamp/on", Read, Unrestricted));
    assert!(!can(&v, "thing:/features/fan", Read, Partial));
    assert!(can(
        &view(&p, &["g:a"]),
        "thing:/features/fan",
        Read,
        Unrestricted
    ));
}

// Rule 3: at the same level revoke wins.
#[test]
fn at_the_same_level_a_revoke_wins_in_the_same_entry() {
    let p = policy(&[(&["g:a"], &[("thing:/", "READ,WRITE", "READ")])]);
    let v = view(&p, &["g:a"]);
    assert!(!can(&v, "thing:/attributes", Read, Partial));
    assert!(can(&v, "thing:/attributes", Write, Unrestricted));
}

#[test]
fn at_the_same_level_a_revoke_wins_from_another_entry_or_subject() {
    let p = policy(&[
        (&["g:a"], &[("thing:/attributes", "READ", "")]),
        (&["g:a"], &[("thing:/attributes", "", "READ")]),
        (&["g:b"], &[("thing:/features", "READ", "")]),
        (&["g:c"], &[("thing:/features", "", "READ")]),
    ]);
    assert!(!can(
        &view(&p, &["g:a"]),
        "thing:/attributes/x",
        Read,
        Partial
    ));
    assert!(can(
        &view(&p, &["g:b"]),
        "thing:/features/x",
        Read,
        Unrestricted
    ));
    assert!(!can(
        &view(&p, &["g:b", "g:c"]),
        "thing:/features/x",
        Read,
        Partial
    ));
}

// Rule 4: unrestricted needs no revoke anywhere below.
#[test]
fn unrestricted_is_denied_by_a_revoke_anywhere_below() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:/", "READ,WRITE", ""),
            ("thing:/features/lamp/properties/secret", "", "WRITE"),
        ],
    )]);
    let v = view(&p, &["g:a"]);
    assert!(!can(&v, "thing:/", Write, Unrestricted));
    assert!(!can(&v, "thing:/features/lamp", Write, Unrestricted));
    assert!(can(
        &v,
        "thing:/features/lamp/properties/on",
        Write,
        Unrestricted
    ));
    assert!(
        can(&v, "thing:/attributes", Write, Unrestricted),
        "a sibling branch stays writable"
    );
    assert!(
        can(&v, "thing:/", Read, Unrestricted),
        "a WRITE revoke says nothing of READ"
    );
}

#[test]
fn a_revoke_below_from_another_subject_of_the_set_counts_too() {
    let p = policy(&[
        (&["g:a"], &[("thing:/", "WRITE", "")]),
        (&["g:b"], &[("thing:/attributes/x/y/z", "", "WRITE")]),
    ]);
    let v = view(&p, &["g:a", "g:b"]);
    assert!(!can(&v, "thing:/attributes", Write, Unrestricted));
    assert!(can(&v, "thing:/features", Write, Unrestricted));
    assert!(can(
        &view(&p, &["g:a"]),
        "thing:/attributes",
        Write,
        Unrestricted
    ));
}

// Rule 5: partial is granted here or somewhere below.
#[test]
fn partial_is_granted_by_a_grant_somewhere_below() {
    let p = policy(&[(
        &["g:a"],
        &[("thing:/features/lamp/properties/on", "READ", "")],
    )]);
    let v = view(&p, &["g:a"]);
    assert!(can(&v, "thing:/", Read, Partial));
    assert!(can(&v, "thing:/features", Read, Partial));
    assert!(!can(&v, "thing:/features", Read, Unrestricted));
    assert!(!can(&v, "thing:/attributes", Read, Partial));
    assert!(!can(&v, "thing:/features/lamp2", Read, Partial));
}

#[test]
fn partial_ignores_a_grant_below_that_the_same_subject_revokes_at_that_level() {
    let p = policy(&[
        (&["g:a"], &[("thing:/features/x", "READ", "")]),
        (&["g:a"], &[("thing:/features/x", "", "READ")]),
    ]);
    assert!(!can(&view(&p, &["g:a"]), "thing:/", Read, Partial));
}

#[test]
fn partial_keeps_a_grant_below_that_only_another_subject_revokes_at_that_level() {
    // Ditto pushes the grant up; the other subject's revoke at that level does not cancel it
    // above (vector C2.rootPartialOverApproximation), but it does at the level itself.
    let p = policy(&[
        (&["g:a"], &[("thing:/attributes", "READ", "")]),
        (&["g:b"], &[("thing:/attributes", "", "READ")]),
    ]);
    let v = view(&p, &["g:a", "g:b"]);
    assert!(can(&v, "thing:/", Read, Partial));
    assert!(!can(&v, "thing:/attributes", Read, Partial));
}

// Rule 6: partial views.
#[test]
fn a_view_keeps_scalars_where_read_holds_and_objects_where_something_survives() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:/attributes", "READ", ""),
            ("thing:/attributes/secret", "", "READ"),
            ("thing:/features/lamp/properties/on", "READ", ""),
            ("thing:/features/empty", "READ", ""),
        ],
    )]);
    let thing = json!({
        "thingId": "t:x",
        "attributes": {"a": 1, "secret": {"pin": 1234}, "n": null},
        "features": {"lamp": {"properties": {"on": true, "level": 3}}, "empty": {"properties": {}}, "fan": {}}
    });
    let v = view(&p, &["g:a"]);
    assert_eq!(
        v.partial_view(ResourceType::Thing, "", &thing),
        Some(json!({
            "attributes": {"a": 1, "n": null},
            "features": {"lamp": {"properties": {"on": true}}, "empty": {"properties": {}}}
        }))
    );
    assert_eq!(
        v.partial_view(
            ResourceType::Thing,
            "/features/lamp",
            &thing["features"]["lamp"]
        ),
        Some(json!({"properties": {"on": true}}))
    );
    assert_eq!(
        v.partial_view(ResourceType::Thing, "/features/fan", &json!({"x": 1})),
        None
    );
}

#[test]
fn a_view_keeps_an_object_as_empty_where_read_holds_on_it_but_not_inside() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:/attributes", "READ", ""),
            ("thing:/attributes/x", "", "READ"),
        ],
    )]);
    let v = view(&p, &["g:a"]);
    assert_eq!(
        v.partial_view(
            ResourceType::Thing,
            "",
            &json!({"attributes": {"x": 1}, "features": {}})
        ),
        Some(json!({"attributes": {}}))
    );
}

#[test]
fn a_view_judges_array_elements_at_the_arrays_path() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:/", "READ", ""),
            ("thing:/attributes/list/secret", "", "READ"),
        ],
    )]);
    let thing =
        json!({"attributes": {"list": [{"name": "n", "secret": "s"}, 1, [2, {"secret": 3}]]}});
    assert_eq!(
        view(&p, &["g:a"]).partial_view(ResourceType::Thing, "", &thing),
        Some(json!({"attributes": {"list": [{"name": "n"}, 1, [2, {}]]}}))
    );
}

#[test]
fn a_retrieve_answer_adds_the_allowlisted_fields_only_with_partial_read_on_the_root() {
    let p = policy(&[(&["g:a"], &[("thing:/attributes/x", "READ", "")])]);
    let thing = json!({"thingId": "t:x", "policyId": "t:p", "_revision": 3, "attributes": {"x": 1, "y": 2}});
    let fields = ["thingId", "_revision"];
    assert_eq!(
        view(&p, &["g:a"]).partial_view_with_fields(ResourceType::Thing, &thing, &fields),
        Some(json!({"thingId": "t:x", "_revision": 3, "attributes": {"x": 1}}))
    );
    assert_eq!(
        view(&p, &["g:z"]).partial_view_with_fields(ResourceType::Thing, &thing, &fields),
        None
    );
}

#[test]
fn a_view_for_read_and_write_keeps_only_what_each_permission_allows_on_its_own() {
    let p = policy(&[
        (
            &["g:a"],
            &[
                ("thing:/", "READ,WRITE", ""),
                ("thing:/attributes/secret", "", "WRITE"),
                ("thing:/features", "", "READ"),
                ("thing:/features/lamp", "READ", ""),
            ],
        ),
        (&["g:b"], &[("thing:/features/fan", "READ", "")]),
    ]);
    let thing = json!({
        "attributes": {"a": 1, "secret": {"pin": 1}, "empty": {}},
        "features": {"lamp": {"on": true}, "fan": {"speed": 2}}
    });
    let both = [Read, Write].into_iter().collect();
    let v = view(&p, &["g:a"]);
    assert_eq!(
        v.partial_view_for(ResourceType::Thing, "", &thing, both),
        Some(json!({"attributes": {"a": 1, "empty": {}}, "features": {"lamp": {"on": true}}}))
    );
    assert_eq!(
        v.partial_view_for(ResourceType::Thing, "", &thing, Read.into()),
        Some(
            json!({"attributes": {"a": 1, "secret": {"pin": 1}, "empty": {}}, "features": {"lamp": {"on": true}}})
        ),
        "READ alone still sees the secret"
    );
    // READ on fan from g:b and WRITE on it from g:a's grant at the root: the subjects count
    // together, each permission on its own.
    assert_eq!(
        view(&p, &["g:a", "g:b"]).partial_view_for(
            ResourceType::Thing,
            "/features",
            &thing["features"],
            both
        ),
        Some(json!({"lamp": {"on": true}, "fan": {"speed": 2}}))
    );
    assert_eq!(
        view(&p, &["g:b"]).partial_view_for(ResourceType::Thing, "", &thing, both),
        None,
        "READ without WRITE shows nothing"
    );
}

#[test]
fn a_view_for_read_is_the_read_view_and_a_view_for_no_permission_shows_nothing() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:/", "READ,WRITE", ""),
            ("thing:/attributes/x", "", "READ"),
        ],
    )]);
    let thing = json!({"thingId": "t:x", "attributes": {"x": 1, "y": [1, {"x": 2}]}});
    let v = view(&p, &["g:a"]);
    assert_eq!(
        v.partial_view(ResourceType::Thing, "", &thing),
        v.partial_view_for(ResourceType::Thing, "", &thing, Read.into())
    );
    assert_eq!(
        v.partial_view_for(ResourceType::Thing, "", &thing, Permissions::NONE),
        None
    );
    assert_eq!(
        v.partial_view_with_fields_for(
            ResourceType::Thing,
            &thing,
            &["thingId"],
            Permissions::NONE
        ),
        None
    );
}

#[test]
fn a_retrieve_answer_for_a_permission_set_adds_the_fields_only_with_partial_access_for_each() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:/attributes/x", "READ,WRITE", ""),
            ("thing:/attributes/y", "READ", ""),
        ],
    )]);
    let thing = json!({"thingId": "t:x", "attributes": {"x": 1, "y": 2}});
    let fields = ["thingId"];
    let v = view(&p, &["g:a"]);
    assert_eq!(
        v.partial_view_with_fields_for(
            ResourceType::Thing,
            &thing,
            &fields,
            [Read, Write].into_iter().collect()
        ),
        Some(json!({"thingId": "t:x", "attributes": {"x": 1}}))
    );
    assert_eq!(
        v.partial_view_with_fields_for(
            ResourceType::Thing,
            &thing,
            &fields,
            [Read, Permission::Execute].into_iter().collect()
        ),
        None,
        "no EXECUTE anywhere: neither values nor fields"
    );
}

// Rule 7: resource keys.
#[test]
fn thing_colon_is_the_root_and_segments_are_whole_and_case_sensitive() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("thing:", "READ", ""),
            ("policy:/features/lamp/", "WRITE", ""),
        ],
    )]);
    let v = view(&p, &["g:a"]);
    assert!(can(&v, "thing:/", Read, Unrestricted));
    assert!(can(&v, "thing:", Read, Unrestricted));
    assert!(
        can(&v, "policy:/features//lamp", Write, Unrestricted),
        "empty segments are ignored"
    );
    assert!(
        !can(&v, "policy:/features/lamp2", Write, Partial),
        "lamp does not cover lamp2"
    );
    assert!(
        !can(&v, "policy:/features/Lamp", Write, Partial),
        "segments are case-sensitive"
    );
    assert!(
        !can(&v, "thing:/", Write, Partial),
        "policy: grants never apply to thing:"
    );
    assert!(
        !can(&v, "nonsense:/", Read, Partial),
        "an unknown type is denied"
    );
}

#[test]
fn tilde_zero_decodes_to_tilde_in_policies_and_requests() {
    let p = policy(&[(&["g:a"], &[("thing:/attributes/a~0b", "READ", "")])]);
    let v = view(&p, &["g:a"]);
    assert!(can(&v, "thing:/attributes/a~b", Read, Unrestricted));
    assert!(can(&v, "thing:/attributes/a~0b/c", Read, Unrestricted));
    assert!(
        !can(&v, "thing:/attributes/a~1b", Read, Partial),
        "~1 is not decoded"
    );
    let key = ResourceKey::parse("thing:/attributes/a~0b").unwrap();
    assert_eq!(key.to_string(), "thing:/attributes/a~0b");
    assert!(v.check_key(&key, Read, Unrestricted));
    assert_eq!(
        v.partial_view(
            ResourceType::Thing,
            "/attributes",
            &json!({"a~b": 1, "a~0b": 2})
        ),
        Some(json!({"a~b": 1}))
    );
}

#[test]
fn write_does_not_imply_read_and_empty_entries_take_no_part() {
    let p = parse_policy(
        r#"{"entries":{
        "w":{"subjects":{"g:a":{"type":"t"}},"resources":{"thing:/":{"grant":["WRITE"],"revoke":[]}}},
        "no-resources":{"subjects":{"g:a":{"type":"t"}},"resources":{}},
        "no-subjects":{"subjects":{},"resources":{"thing:/":{"grant":["READ"],"revoke":[]}}}}}"#,
    )
    .unwrap();
    let v = view(&p, &["g:a"]);
    assert!(can(&v, "thing:/", Write, Unrestricted));
    assert!(!can(&v, "thing:/", Read, Partial));
}

#[test]
fn check_segments_takes_topic_levels_as_they_come() {
    let p = policy(&[(
        &["g:a"],
        &[
            ("topic:/sensors", "READ", ""),
            ("topic:/sensors/s1/secret", "", "READ"),
        ],
    )]);
    let v = view(&p, &["g:a"]);
    assert!(v.check_segments(
        ResourceType::Topic,
        "sensors/s1/temp".split('/'),
        Read,
        Unrestricted
    ));
    assert!(!v.check_segments(
        ResourceType::Topic,
        "sensors/s1/secret".split('/'),
        Read,
        Partial
    ));
    assert!(!v.check_segments(
        ResourceType::Topic,
        "sensors/s1".split('/'),
        Read,
        Unrestricted
    ));
    assert!(v.check_segments(ResourceType::Topic, "sensors/s1".split('/'), Read, Partial));
}

// Rule 8: namespaces and imports.
#[test]
fn an_entry_with_namespaces_applies_only_to_matching_things() {
    let p = parse_policy(
        r#"{"entries":{"e":{"subjects":{"g:a":{"type":"t"}},
        "resources":{"thing:/":{"grant":["READ"],"revoke":[]}},"namespaces":["org.acme","com.x.*"]}}}"#,
    )
    .unwrap();
    let e = Arc::new(Enforcer::compile(&p));
    let reads = |ns: Option<&str>| {
        e.for_subjects(&["g:a"], ns, NOW)
            .check(ResourceType::Thing, "/", Read, Partial)
    };
    assert!(reads(Some("org.acme")));
    assert!(!reads(Some("org.acme.sub")), "`org.acme` is exact");
    assert!(reads(Some("com.x.y")));
    assert!(reads(Some("com.x.y.z")));
    assert!(!reads(Some("com.x")), "`com.x.*` is strictly below com.x");
    assert!(!reads(Some("com.xy")));
    assert!(
        !reads(None),
        "a check without a namespace ignores restricted entries"
    );
}

#[test]
fn imports_add_implicit_and_listed_explicit_entries_but_never_never() {
    let base = parse_policy(
        r#"{"policyId":"org.acme:base","entries":{
        "implicit":{"subjects":{"g:i":{"type":"t"}},"resources":{"thing:/":{"grant":["READ"],"revoke":[]}}},
        "explicit":{"subjects":{"g:e":{"type":"t"}},"resources":{"thing:/":{"grant":["READ"],"revoke":[]}},"importable":"explicit"},
        "unlisted":{"subjects":{"g:u":{"type":"t"}},"resources":{"thing:/":{"grant":["READ"],"revoke":[]}},"importable":"explicit"},
        "never":{"subjects":{"g:n":{"type":"t"}},"resources":{"thing:/":{"grant":["READ"],"revoke":[]}},"importable":"never"}}}"#,
    )
    .unwrap();
    let importing = parse_policy(
        r#"{"policyId":"org.acme:p","imports":{"org.acme:base":{"entries":["explicit","never"]},"org.acme:gone":{}},
        "entries":{"own":{"subjects":{"g:o":{"type":"t"}},"resources":{"thing:/":{"grant":["READ"],"revoke":[]}}}}}"#,
    )
    .unwrap();
    let e = Arc::new(Enforcer::compile_with_imports(&importing, &[&base]));
    let reads = |s: &str| {
        e.for_subjects(&[s], None, NOW)
            .check(ResourceType::Thing, "/", Read, Unrestricted)
    };
    assert!(reads("g:o"));
    assert!(reads("g:i"));
    assert!(reads("g:e"));
    assert!(!reads("g:u"), "an explicit entry needs to be listed");
    assert!(
        !reads("g:n"),
        "a never-importable entry is never imported, even when listed"
    );
    let without = Arc::new(Enforcer::compile(&importing));
    assert!(!without.for_subjects(&["g:i"], None, NOW).check(
        ResourceType::Thing,
        "/",
        Read,
        Partial
    ));
}

// Rule 9: expiry.
#[test]
fn an_expired_subject_matches_nothing_and_the_view_says_when_to_rebuild() {
    let p = parse_policy(
        r#"{"entries":{
        "temp":{"subjects":{"g:a":{"type":"t","expiry":"2027-01-01T00:00:00Z"}},"resources":{"thing:/":{"grant":["READ"],"revoke":[]}}},
        "deny":{"subjects":{"g:a":{"type":"t","expiry":"2026-01-01T00:00:00Z"}},"resources":{"thing:/":{"grant":[],"revoke":["READ"]}}}}}"#,
    )
    .unwrap();
    let e = Arc::new(Enforcer::compile(&p));
    let at = |t: &str| Timestamp::parse_rfc3339(t).unwrap();
    let before = e.for_subjects(&["g:a"], None, at("2025-06-01T00:00:00Z"));
    assert!(
        !before.check(ResourceType::Thing, "/", Read, Partial),
        "the revoke is still active"
    );
    assert_eq!(before.valid_until(), Some(at("2026-01-01T00:00:00Z")));
    let between = e.for_subjects(&["g:a"], None, at("2026-06-01T00:00:00Z"));
    assert!(
        between.check(ResourceType::Thing, "/", Read, Unrestricted),
        "the revoke expired"
    );
    assert!(between.is_valid_at(at("2026-12-31T23:59:59Z")));
    assert!(!between.is_valid_at(at("2027-01-01T00:00:00Z")));
    let after = e.for_subjects(&["g:a"], None, at("2027-01-01T00:00:00Z"));
    assert!(
        !after.check(ResourceType::Thing, "/", Read, Partial),
        "expired at the instant itself"
    );
    assert_eq!(after.valid_until(), None);
}

// Lockout prevention.
#[test]
fn a_policy_that_nobody_could_change_is_refused() {
    let ok = policy(&[(&["g:admin"], &[("policy:/", "READ,WRITE", "")])]);
    assert!(check_lockout(&ok).is_ok());
    let revoked_below = policy(&[(
        &["g:admin"],
        &[
            ("policy:/", "WRITE", ""),
            ("policy:/entries/x", "", "WRITE"),
        ],
    )]);
    assert!(
        check_lockout(&revoked_below).is_err(),
        "WRITE must be unrestricted"
    );
    let only_things = policy(&[(&["g:admin"], &[("thing:/", "READ,WRITE", "")])]);
    assert!(check_lockout(&only_things).is_err());
    let expiring = parse_policy(
        r#"{"entries":{"e":{"subjects":{"g:a":{"type":"t","expiry":"2099-01-01T00:00:00Z"}},
        "resources":{"policy:/":{"grant":["WRITE"],"revoke":[]}}}}}"#,
    )
    .unwrap();
    assert!(
        check_lockout(&expiring).is_err(),
        "a subject with an expiry is not permanent"
    );
    let split = policy(&[
        (&["g:a"], &[("policy:/", "WRITE", "")]),
        (&["g:b"], &[("policy:/", "", "WRITE")]),
    ]);
    assert!(check_lockout(&split).is_ok(), "g:a alone keeps WRITE");
}

// Explanations.
#[test]
fn explain_names_the_entries_and_levels_that_decided() {
    let p = policy(&[
        (&["g:a"], &[("thing:/", "WRITE", "")]),
        (&["g:b"], &[("thing:/features", "", "WRITE")]),
        (&["g:a"], &[("thing:/features/lamp/x", "", "WRITE")]),
        (&["g:z"], &[("thing:/", "", "WRITE")]),
    ]);
    let e = Arc::new(Enforcer::compile(&p));
    let key = ResourceKey::parse("thing:/features/lamp").unwrap();
    let ex = e.explain(&["g:a", "g:b"], None, NOW, &key, Write);
    assert!(!ex.unrestricted && !ex.partial);
    let summary: Vec<(Effect, Place, String, &str)> = ex
        .contributions
        .iter()
        .map(|c| (c.effect, c.place, c.resource.to_string(), c.entry.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Effect::Grant, Place::AtOrAbove, "thing:/".into(), "e0"),
            (
                Effect::Revoke,
                Place::AtOrAbove,
                "thing:/features".into(),
                "e1"
            ),
            (
                Effect::Revoke,
                Place::Below,
                "thing:/features/lamp/x".into(),
                "e2"
            ),
        ]
    );
    let text = ex.to_string();
    assert!(text.contains("unrestricted denied"), "{text}");
    assert!(text.contains("entry `e1`"), "{text}");
    assert!(
        !text.contains("g:z"),
        "subjects outside the set are not mentioned: {text}"
    );
}
