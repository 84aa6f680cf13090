//! What commands need from a policy, Ditto's answers to denials, and retrieve answers cut to
//! the requester's view — checked against real compiled policies.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use serde_json::{Value, json};
use twin::apply::{Applied, apply_thing_command};
use twin::authz::{
    Requirement, authorize_policy_command, authorize_thing_command, cut_policy_to_view,
    cut_to_view, denied, first_denied, required_permissions, required_policy_permissions,
};
use twin::command::{Action, CommandHeaders, PolicyCommand, ThingCommand};
use twin::path::ThingPath;
use twin::policy::{Enforcer, Mode, Permission, ResourceType, SubjectView, Timestamp};
use twin::thing::Limits;
use twin::{Entity, PolicyId, ThingId};

fn now() -> Timestamp {
    Timestamp::from_unix_millis(1_700_000_000_000)
}

fn cmd(action: Action, path: &str, value: Option<Value>) -> ThingCommand {
    ThingCommand {
        thing_id: ThingId::parse("org.acme:lamp-1").unwrap(),
        action,
        path: ThingPath::parse(path).unwrap(),
        value,
        headers: CommandHeaders::default(),
    }
}

fn policy_cmd(action: Action, path: &str, value: Option<Value>) -> PolicyCommand {
    PolicyCommand {
        policy_id: PolicyId::parse("org.acme:p").unwrap(),
        action,
        path: path.to_owned(),
        value,
        headers: CommandHeaders::default(),
    }
}

fn view(subject: &str) -> SubjectView {
    let policy = twin::policy::policy_from_value(&json!({
        "policyId": "org.acme:p",
        "entries": {
            "owner": {
                "subjects": {"issuer:owner": {"type": "user"}},
                "resources": {
                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []}
                }
            },
            "device": {
                "subjects": {"issuer:device": {"type": "device"}},
                "resources": {
                    "thing:/features/lamp/properties": {"grant": ["READ", "WRITE"], "revoke": []},
                    "thing:/features/lamp/properties/locked": {"grant": [], "revoke": ["WRITE"]}
                }
            },
            "reader": {
                "subjects": {"issuer:reader": {"type": "user"}},
                "resources": {
                    "thing:/features": {"grant": ["READ"], "revoke": []},
                    "thing:/features/secret": {"grant": [], "revoke": ["READ"]},
                    "policy:/entries/reader": {"grant": ["READ"], "revoke": []}
                }
            }
        }
    }))
    .unwrap();
    Arc::new(Enforcer::compile(&policy)).for_subjects(&[subject], Some("org.acme"), now())
}

fn thing() -> Entity {
    let applied = apply_thing_command(
        None,
        &cmd(
            Action::Create,
            "/",
            Some(json!({
                "policyId": "org.acme:p",
                "attributes": {"serial": "A1"},
                "features": {
                    "lamp": {"properties": {"on": false, "locked": true}},
                    "secret": {"properties": {"pin": 1234}}
                }
            })),
        ),
        now(),
        &Limits::default(),
    )
    .unwrap();
    match applied {
        Applied::Change(change) => Entity::apply(None, &change.event).unwrap().unwrap(),
        Applied::Retrieve(_) => panic!("create retrieved"),
    }
}

fn described(reqs: &[Requirement]) -> Vec<(String, Permission, Mode)> {
    reqs.iter()
        .map(|r| (format!("{}:{}", r.kind, r.resource), r.permission, r.mode))
        .collect()
}

#[test]
fn changes_need_unrestricted_write_and_retrieves_partial_read_at_their_path() {
    for action in [Action::Create, Action::Modify, Action::Delete] {
        assert_eq!(
            described(&required_permissions(&cmd(
                action,
                "/features/f~0x/properties",
                None
            ))),
            vec![(
                "thing:/features/f~0x/properties".to_owned(),
                Permission::Write,
                Mode::Unrestricted
            )]
        );
    }
    assert_eq!(
        described(&required_permissions(&cmd(Action::Retrieve, "/", None))),
        vec![("thing:/".to_owned(), Permission::Read, Mode::Partial)]
    );
    assert_eq!(
        described(&required_policy_permissions(&policy_cmd(
            Action::Modify,
            "/entries/owner/resources/thing:/features",
            None
        ))),
        vec![(
            "policy:/entries/owner/resources/thing:/features".to_owned(),
            Permission::Write,
            Mode::Unrestricted
        )]
    );
    assert_eq!(
        described(&required_policy_permissions(&policy_cmd(
            Action::Retrieve,
            "",
            None
        ))),
        vec![("policy:/".to_owned(), Permission::Read, Mode::Partial)]
    );
}

#[test]
fn a_merge_needs_write_on_each_leaf_and_nothing_above_it() {
    let merge = cmd(
        Action::Merge,
        "/features/lamp",
        Some(
            json!({"properties": {"on": true, "color": {"r": 1, "g": null}}, "definition": ["a:b:1"]}),
        ),
    );
    assert_eq!(
        described(&required_permissions(&merge))
            .into_iter()
            .map(|(r, _, _)| r)
            .collect::<Vec<_>>(),
        vec![
            "thing:/features/lamp/definition",
            "thing:/features/lamp/properties/color/g",
            "thing:/features/lamp/properties/color/r",
            "thing:/features/lamp/properties/on",
        ]
    );
    // The device may write the lamp's properties but not `locked`, nor anything else.
    let device = view("issuer:device");
    let only_on = cmd(
        Action::Merge,
        "/",
        Some(json!({"features": {"lamp": {"properties": {"on": true}}}})),
    );
    authorize_thing_command(&device, &only_on).unwrap();
    let with_locked = cmd(
        Action::Merge,
        "/features/lamp/properties",
        Some(json!({"on": true, "locked": false})),
    );
    let reqs = required_permissions(&with_locked);
    let failing = first_denied(&device, &reqs).unwrap();
    assert_eq!(failing.resource, "/features/lamp/properties/locked");
    let e = denied(&with_locked, failing);
    assert_eq!(
        (e.status, e.error),
        (403, "things:feature.property.notmodifiable")
    );
    assert!(
        e.message
            .contains("`WRITE` on `thing:/features/lamp/properties/locked` is required"),
        "{e}"
    );
}

#[test]
fn denied_changes_answer_403_notmodifiable_for_their_level() {
    let device = view("issuer:device");
    for (path, error) in [
        ("/", "things:thing.notmodifiable"),
        ("/policyId", "things:policyId.notmodifiable"),
        ("/definition", "things:definition.notmodifiable"),
        ("/attributes", "things:attributes.notmodifiable"),
        ("/attributes/a", "things:attribute.notmodifiable"),
        ("/features", "things:features.notmodifiable"),
        ("/features/lamp", "things:feature.notmodifiable"),
        (
            "/features/lamp/definition",
            "things:feature.definition.notmodifiable",
        ),
        // A revoke below makes the whole properties object off limits for a modify.
        (
            "/features/lamp/properties",
            "things:feature.properties.notmodifiable",
        ),
        (
            "/features/lamp/properties/locked",
            "things:feature.property.notmodifiable",
        ),
        (
            "/features/lamp/desiredProperties",
            "things:feature.desiredProperties.notmodifiable",
        ),
        (
            "/features/lamp/desiredProperties/on",
            "things:feature.desiredProperty.notmodifiable",
        ),
    ] {
        let e = authorize_thing_command(&device, &cmd(Action::Modify, path, Some(json!(1))))
            .unwrap_err();
        assert_eq!((e.status, e.error), (403, error), "{path}");
        let e = authorize_thing_command(&device, &cmd(Action::Delete, path, None)).unwrap_err();
        assert_eq!((e.status, e.error), (403, error), "{path}");
    }
    authorize_thing_command(
        &device,
        &cmd(
            Action::Modify,
            "/features/lamp/properties/on",
            Some(json!(true)),
        ),
    )
    .unwrap();
}

#[test]
fn denied_retrieves_answer_404_like_missing_resources() {
    let device = view("issuer:device");
    for (path, error) in [
        ("/attributes", "things:attributes.notfound"),
        ("/attributes/serial", "things:attribute.notfound"),
        ("/features/secret", "things:feature.notfound"),
        (
            "/features/lamp/desiredProperties/on",
            "things:feature.desiredProperty.notfound",
        ),
    ] {
        let e = authorize_thing_command(&device, &cmd(Action::Retrieve, path, None)).unwrap_err();
        assert_eq!((e.status, e.error), (404, error), "{path}");
        assert!(e.message.contains("insufficient permissions"), "{e}");
    }
    // Partial READ below is enough to ask; the answer is then cut.
    authorize_thing_command(&device, &cmd(Action::Retrieve, "/", None)).unwrap();
    authorize_thing_command(&device, &cmd(Action::Retrieve, "/features/lamp", None)).unwrap();
    let e = authorize_thing_command(&view("issuer:stranger"), &cmd(Action::Retrieve, "/", None))
        .unwrap_err();
    assert_eq!((e.status, e.error), (404, "things:thing.notfound"));
}

#[test]
fn policy_commands_are_denied_with_policy_errors() {
    let reader = view("issuer:reader");
    let e = authorize_policy_command(
        &reader,
        &policy_cmd(Action::Modify, "/entries/reader", None),
    )
    .unwrap_err();
    assert_eq!((e.status, e.error), (403, "policies:policy.notmodifiable"));
    let e = authorize_policy_command(
        &reader,
        &policy_cmd(Action::Retrieve, "/entries/owner", None),
    )
    .unwrap_err();
    assert_eq!((e.status, e.error), (404, "policies:policy.notfound"));
    authorize_policy_command(&reader, &policy_cmd(Action::Retrieve, "/", None)).unwrap();
    authorize_policy_command(
        &view("issuer:owner"),
        &policy_cmd(Action::Delete, "/entries/owner/resources/thing:/", None),
    )
    .unwrap();
    let cut = cut_policy_to_view(
        &reader,
        "/",
        &json!({"policyId": "org.acme:p", "entries": {"owner": {"subjects": {}}, "reader": {"subjects": {}}}}),
    );
    assert_eq!(
        cut,
        Some(json!({"policyId": "org.acme:p", "entries": {"reader": {"subjects": {}}}}))
    );
}

fn retrieve(entity: &Entity, path: &str, fields: Option<&str>) -> Value {
    let mut c = cmd(Action::Retrieve, path, None);
    c.headers.fields = fields.map(str::to_owned);
    let applied = apply_thing_command(Some(entity), &c, now(), &Limits::default()).unwrap();
    applied.response().value.clone().unwrap()
}

#[test]
fn retrieve_answers_are_cut_to_the_requesters_view() {
    let entity = thing();
    let root = ThingPath::root();
    let reader = view("issuer:reader");
    // The reader sees features except the secret one, and the thing ID (partial READ on `/`).
    assert_eq!(
        cut_to_view(&reader, &root, &retrieve(&entity, "/", None)),
        Some(json!({
            "thingId": "org.acme:lamp-1",
            "features": {"lamp": {"properties": {"on": false, "locked": true}}}
        }))
    );
    // Pseudo-fields appear only when selected, and then pass the view like `thingId`.
    assert_eq!(
        cut_to_view(
            &reader,
            &root,
            &retrieve(
                &entity,
                "/",
                Some("_revision,_namespace,attributes,features/secret")
            )
        ),
        // `features` is readable at its own level, so its emptied selection stays as `{}`.
        Some(json!({"_revision": 1, "_namespace": "org.acme", "features": {}}))
    );
    let device = view("issuer:device");
    let lamp = ThingPath::parse("/features/lamp").unwrap();
    assert_eq!(
        cut_to_view(&device, &lamp, &retrieve(&entity, "/features/lamp", None)),
        Some(json!({"properties": {"on": false, "locked": true}}))
    );
    // Nothing visible: the retrieve answers 404, as for a missing resource.
    let secret = ThingPath::parse("/features/secret").unwrap();
    assert_eq!(
        cut_to_view(
            &reader,
            &secret,
            &retrieve(&entity, "/features/secret", None)
        ),
        None
    );
    let owner = view("issuer:owner");
    assert_eq!(
        cut_to_view(&owner, &root, &retrieve(&entity, "/", None)),
        Some(entity.doc.clone())
    );
}

#[test]
fn requirements_are_checked_by_the_view_they_name() {
    let reader = view("issuer:reader");
    let read_features = Requirement {
        kind: ResourceType::Thing,
        resource: "/features/lamp".into(),
        permission: Permission::Read,
        mode: Mode::Unrestricted,
    };
    assert!(read_features.is_met(&reader));
    let read_all = Requirement {
        resource: "/features".into(),
        ..read_features.clone()
    };
    assert!(
        !read_all.is_met(&reader),
        "a revoke below denies unrestricted READ"
    );
    let reqs = [read_features, read_all.clone()];
    assert_eq!(first_denied(&reader, &reqs), Some(&read_all));
}
