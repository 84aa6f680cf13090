//! Thing commands at every level, as Ditto answers them, and the events they produce.
//!
//! Every change goes through `run`, which applies the event to the old entity with
//! `Entity::apply` (as the store does) and checks what the store relies on: the result is a
//! valid thing (judged in full, whereas `apply_thing_command` judged only what changes), at the
//! next revision, with `now` as its timestamp.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use serde_json::{Value, json};
use twin::apply::{Applied, apply_thing_command};
use twin::command::{Action, CommandHeaders, EntityTags, ThingCommand};
use twin::entity::pointer;
use twin::path::ThingPath;
use twin::policy::Timestamp;
use twin::thing::Limits;
use twin::{DittoError, Entity, EventAction, ThingId};

const ID: &str = "org.acme:lamp-1";

fn thing_id() -> ThingId {
    ThingId::parse(ID).unwrap()
}

fn cmd(action: Action, path: &str, value: Option<Value>) -> ThingCommand {
    ThingCommand {
        thing_id: thing_id(),
        action,
        path: ThingPath::parse(path).unwrap(),
        value,
        headers: CommandHeaders::default(),
    }
}

fn with_headers(mut c: ThingCommand, f: impl FnOnce(&mut CommandHeaders)) -> ThingCommand {
    f(&mut c.headers);
    c
}

/// A thing in memory, changed only through commands and their events.
struct Twin {
    state: Option<Entity>,
    clock: i64,
    limits: Limits,
}

impl Twin {
    fn empty() -> Self {
        Twin {
            state: None,
            clock: 1_700_000_000_000,
            limits: Limits::default(),
        }
    }

    fn with(doc: Value) -> Self {
        let mut twin = Twin::empty();
        twin.ok(cmd(Action::Create, "/", Some(doc)));
        twin
    }

    /// Applies `c`; for a change, checks the replay invariant and takes the new state.
    fn run(&mut self, c: ThingCommand) -> Result<Applied, DittoError> {
        self.clock += 1000;
        let now = Timestamp::from_unix_millis(self.clock);
        let applied = apply_thing_command(self.state.as_ref(), &c, now, &self.limits)?;
        if let Applied::Change(change) = &applied {
            let state = Entity::apply(self.state.clone(), &change.event).unwrap();
            let expected_revision = self.state.as_ref().map_or(1, |e| e.revision + 1);
            assert_eq!(change.event.revision, expected_revision);
            assert_eq!(change.event.timestamp, now);
            assert_eq!(change.event.key.id, ID);
            if let Some(state) = &state {
                assert_eq!((state.revision, state.modified), (expected_revision, now));
                // What the command judged without building it, judged again on the result.
                twin::thing::validate_thing(&state.doc, &thing_id(), &self.limits)
                    .unwrap_or_else(|e| panic!("{:?} led to an invalid thing: {e}", change.event));
            }
            self.state = state;
        }
        Ok(applied)
    }

    fn ok(&mut self, c: ThingCommand) -> Applied {
        let text = format!("{c:?}");
        self.run(c)
            .unwrap_or_else(|e| panic!("{text} was refused: {e}"))
    }

    fn err(&mut self, c: ThingCommand) -> DittoError {
        let before = self.state.clone();
        let text = format!("{c:?}");
        let e = match self.run(c) {
            Ok(applied) => panic!("{text} was accepted: {applied:?}"),
            Err(e) => e,
        };
        assert_eq!(self.state, before, "a refused command changed nothing");
        e
    }

    fn doc(&self) -> &Value {
        &self.state.as_ref().unwrap().doc
    }

    fn revision(&self) -> u64 {
        self.state.as_ref().unwrap().revision
    }

    fn at(&self, path: &str) -> Option<&Value> {
        pointer(self.doc(), path)
    }
}

fn lamp() -> Value {
    json!({
        "thingId": ID,
        "policyId": "org.acme:p",
        "definition": "org.acme:lamp:1.0.0",
        "attributes": {"location": {"room": "kitchen", "floor": 1}, "serial": "A1"},
        "features": {
            "lamp": {
                "definition": ["org.acme:switchable:1.0.0"],
                "properties": {"on": false, "brightness": 50},
                "desiredProperties": {"on": true}
            }
        }
    })
}

fn status_value(applied: &Applied) -> (u16, Option<&Value>) {
    let r = applied.response();
    (r.status, r.value.as_ref())
}

fn code(e: &DittoError) -> (u16, &str) {
    (e.status, e.error)
}

// --- create ------------------------------------------------------------------------------

#[test]
fn create_answers_201_with_the_thing_and_fills_in_the_thing_id() {
    let mut twin = Twin::empty();
    let body = json!({"policyId": "org.acme:p", "attributes": {"a": 1}});
    let applied = twin.ok(cmd(Action::Create, "/", Some(body)));
    let expected = json!({"thingId": ID, "policyId": "org.acme:p", "attributes": {"a": 1}});
    assert_eq!(status_value(&applied), (201, Some(&expected)));
    let event = applied.event().unwrap();
    assert_eq!(
        (event.action, event.path.as_str(), event.value.as_ref()),
        (EventAction::Created, "/", Some(&expected))
    );
    assert_eq!(twin.doc(), &expected);
    let state = twin.state.as_ref().unwrap();
    assert_eq!((state.revision, state.created), (1, state.modified));
}

#[test]
fn create_without_a_value_creates_an_empty_thing() {
    let mut twin = Twin::empty();
    twin.ok(cmd(Action::Create, "/", None));
    assert_eq!(twin.doc(), &json!({"thingId": ID}));
}

#[test]
fn create_of_an_existing_thing_is_a_conflict() {
    let mut twin = Twin::with(lamp());
    let e = twin.err(cmd(Action::Create, "/", Some(json!({}))));
    assert_eq!(code(&e), (409, "things:thing.conflict"));
    assert!(e.message.contains(ID), "{e}");
}

#[test]
fn create_below_the_root_is_refused_as_dittos_protocol_has_none() {
    let mut twin = Twin::with(lamp());
    let e = twin.err(cmd(Action::Create, "/attributes/x", Some(json!(1))));
    assert_eq!(code(&e), (400, "things:path.invalid"));
}

#[test]
fn a_body_naming_another_thing_is_refused() {
    let mut twin = Twin::empty();
    let e = twin.err(cmd(
        Action::Create,
        "/",
        Some(json!({"thingId": "org.acme:other"})),
    ));
    assert_eq!(code(&e), (400, "things:id.notsettable"));
    let mut twin = Twin::with(lamp());
    let e = twin.err(cmd(
        Action::Modify,
        "/",
        Some(json!({"thingId": "org.acme:other"})),
    ));
    assert_eq!(code(&e), (400, "things:id.notsettable"));
}

#[test]
fn read_only_pseudo_fields_in_a_root_body_are_dropped() {
    let mut twin = Twin::empty();
    twin.ok(cmd(
        Action::Create,
        "/",
        Some(json!({"_revision": 7, "_modified": "2020-01-01T00:00:00Z", "attributes": {}})),
    ));
    assert_eq!(twin.doc(), &json!({"thingId": ID, "attributes": {}}));
}

// --- modify ------------------------------------------------------------------------------

#[test]
fn modify_of_a_missing_thing_at_the_root_creates_it() {
    let mut twin = Twin::empty();
    let applied = twin.ok(cmd(
        Action::Modify,
        "/",
        Some(json!({"attributes": {"a": 1}})),
    ));
    assert_eq!(applied.status(), 201);
    assert_eq!(applied.event().unwrap().action, EventAction::Created);
    assert_eq!(twin.revision(), 1);
    assert_eq!(twin.doc(), &json!({"thingId": ID, "attributes": {"a": 1}}));
}

#[test]
fn modify_of_the_whole_thing_replaces_it_and_keeps_its_policy_id_when_left_out() {
    let mut twin = Twin::with(lamp());
    let applied = twin.ok(cmd(
        Action::Modify,
        "/",
        Some(json!({"attributes": {"b": 2}})),
    ));
    assert_eq!(status_value(&applied), (204, None));
    let event = applied.event().unwrap();
    assert_eq!(
        (event.action, event.path.as_str()),
        (EventAction::Modified, "/")
    );
    assert_eq!(
        twin.doc(),
        &json!({"thingId": ID, "policyId": "org.acme:p", "attributes": {"b": 2}})
    );
    assert_eq!(twin.revision(), 2);
}

#[test]
fn modify_at_every_level_creates_it_with_201_then_changes_it_with_204() {
    let cases = [
        ("/policyId", json!("org.acme:p1"), json!("org.acme:p2")),
        ("/definition", json!("a:b:1"), json!("a:b:2")),
        ("/attributes", json!({"a": 1}), json!({"b": 2})),
        ("/attributes/a/b", json!(1), json!({"c": [1, 2]})),
        ("/features", json!({"f": {}}), json!({"g": {}})),
        ("/features/f", json!({"properties": {"p": 1}}), json!({})),
        (
            "/features/f/definition",
            json!(["a:b:1"]),
            json!(["a:b:2", "c:d:3"]),
        ),
        ("/features/f/properties", json!({"p": 1}), json!({})),
        ("/features/f/properties/p/q", json!(true), json!(null)),
        (
            "/features/f/desiredProperties",
            json!({"p": 1}),
            json!({"q": 2}),
        ),
        ("/features/f/desiredProperties/p", json!("x"), json!(2.5)),
    ];
    for (path, first, second) in cases {
        let mut twin = Twin::with(json!({}));
        let applied = twin.ok(cmd(Action::Modify, path, Some(first.clone())));
        assert_eq!(status_value(&applied), (201, Some(&first)), "{path}");
        let event = applied.event().unwrap();
        assert_eq!(
            (event.action, event.path.as_str(), event.value.as_ref()),
            (EventAction::Created, path, Some(&first)),
            "{path}"
        );
        assert_eq!(twin.at(path), Some(&first), "{path}");
        let applied = twin.ok(cmd(Action::Modify, path, Some(second.clone())));
        assert_eq!(status_value(&applied), (204, None), "{path}");
        assert_eq!(
            applied.event().unwrap().action,
            EventAction::Modified,
            "{path}"
        );
        assert_eq!(twin.at(path), Some(&second), "{path}");
        assert_eq!(twin.revision(), 3, "{path}");
    }
}

#[test]
fn modify_of_a_property_of_a_missing_feature_creates_the_feature() {
    let mut twin = Twin::with(json!({"attributes": {}}));
    twin.ok(cmd(
        Action::Modify,
        "/features/lamp/properties/on",
        Some(json!(true)),
    ));
    assert_eq!(
        twin.doc(),
        &json!({"thingId": ID, "attributes": {}, "features": {"lamp": {"properties": {"on": true}}}})
    );
}

#[test]
fn modify_below_the_root_of_a_missing_thing_is_not_found() {
    let mut twin = Twin::empty();
    let e = twin.err(cmd(Action::Modify, "/attributes/a", Some(json!(1))));
    assert_eq!(code(&e), (404, "things:thing.notfound"));
    assert!(e.message.contains(ID), "{e}");
}

#[test]
fn modify_without_a_value_is_refused() {
    let mut twin = Twin::with(lamp());
    let e = twin.err(cmd(Action::Modify, "/attributes/a", None));
    assert_eq!(code(&e), (400, "things:json.invalid"));
}

#[test]
fn values_of_the_wrong_shape_are_refused_naming_the_pointer() {
    let cases = [
        (
            "/features/lamp/properties",
            json!(5),
            "`/features/lamp/properties` must be an object, found a number",
        ),
        (
            "/attributes",
            json!([]),
            "`/attributes` must be an object, found an array",
        ),
        (
            "/definition",
            json!("nope"),
            "`/definition` must be a definition `namespace:name:version`, found \"nope\"",
        ),
        (
            "/features/lamp/definition",
            json!(["x"]),
            "`/features/lamp/definition/0` must be a definition `namespace:name:version`, found \"x\"",
        ),
        (
            "/attributes/a",
            json!({"b/c": 1}),
            "the key \"b/c\" in `/attributes/a` must not contain `/`",
        ),
        (
            "/features/lamp",
            json!({"props": {}}),
            "`/features/lamp` has an unknown field \"props\" (expected definition, properties or desiredProperties)",
        ),
    ];
    for (path, value, message) in cases {
        let mut twin = Twin::with(lamp());
        let e = twin.err(cmd(Action::Modify, path, Some(value)));
        assert_eq!(code(&e), (400, "things:json.invalid"), "{path}");
        assert_eq!(e.message, message, "{path}");
    }
    let mut twin = Twin::with(lamp());
    let e = twin.err(cmd(Action::Modify, "/policyId", Some(json!("no id"))));
    assert!(
        e.message
            .starts_with("`/policyId` is not a valid policy ID"),
        "{e}"
    );
}

// --- retrieve ----------------------------------------------------------------------------

#[test]
fn retrieve_at_every_level_answers_200_with_the_value_there() {
    let mut twin = Twin::with(lamp());
    let doc = lamp();
    for path in [
        "/",
        "/policyId",
        "/definition",
        "/attributes",
        "/attributes/location/room",
        "/features",
        "/features/lamp",
        "/features/lamp/definition",
        "/features/lamp/properties",
        "/features/lamp/properties/brightness",
        "/features/lamp/desiredProperties",
        "/features/lamp/desiredProperties/on",
    ] {
        let applied = twin.ok(cmd(Action::Retrieve, path, None));
        assert!(applied.event().is_none());
        assert_eq!(status_value(&applied), (200, pointer(&doc, path)), "{path}");
    }
    assert_eq!(twin.revision(), 1, "retrieves change nothing");
}

#[test]
fn retrieve_of_missing_parts_answers_the_code_of_the_first_missing_level() {
    let mut twin = Twin::with(json!({"features": {"bare": {}}}));
    let cases = [
        ("/policyId", "things:policyId.notfound"),
        ("/definition", "things:definition.notfound"),
        ("/attributes", "things:attributes.notfound"),
        ("/attributes/a", "things:attributes.notfound"),
        ("/features/x", "things:feature.notfound"),
        ("/features/x/properties/p", "things:feature.notfound"),
        (
            "/features/bare/definition",
            "things:feature.definition.notfound",
        ),
        (
            "/features/bare/properties",
            "things:feature.properties.notfound",
        ),
        (
            "/features/bare/properties/p",
            "things:feature.properties.notfound",
        ),
        (
            "/features/bare/desiredProperties",
            "things:feature.desiredProperties.notfound",
        ),
        (
            "/features/bare/desiredProperties/p",
            "things:feature.desiredProperties.notfound",
        ),
    ];
    for (path, error) in cases {
        let e = twin.err(cmd(Action::Retrieve, path, None));
        assert_eq!(code(&e), (404, error), "{path}");
    }
    twin.ok(cmd(
        Action::Modify,
        "/features/bare/properties",
        Some(json!({})),
    ));
    twin.ok(cmd(Action::Modify, "/attributes", Some(json!({"b": 1}))));
    twin.ok(cmd(
        Action::Modify,
        "/features/bare/desiredProperties",
        Some(json!({})),
    ));
    let cases = [
        (
            "/attributes/a/b",
            "things:attribute.notfound",
            "the attribute `/a/b` of thing `org.acme:lamp-1` could not be found or the requester had insufficient permissions to access it",
        ),
        (
            "/features/bare/properties/p",
            "things:feature.property.notfound",
            "the property `/p` of feature `bare` of thing `org.acme:lamp-1` could not be found or the requester had insufficient permissions to access it",
        ),
        (
            "/features/bare/desiredProperties/p",
            "things:feature.desiredProperty.notfound",
            "the desired property `/p` of feature `bare` of thing `org.acme:lamp-1` could not be found or the requester had insufficient permissions to access it",
        ),
    ];
    for (path, error, message) in cases {
        let e = twin.err(cmd(Action::Retrieve, path, None));
        assert_eq!(
            (code(&e), e.message.as_str()),
            ((404, error), message),
            "{path}"
        );
    }
    let mut twin = Twin::with(json!({}));
    let e = twin.err(cmd(Action::Retrieve, "/features", None));
    assert_eq!(code(&e), (404, "things:features.notfound"));
    let mut missing = Twin::empty();
    let e = missing.err(cmd(Action::Retrieve, "/attributes", None));
    assert_eq!(code(&e), (404, "things:thing.notfound"));
}

#[test]
fn retrieve_with_fields_selects_parts_and_pseudo_fields_only_when_asked() {
    let mut twin = Twin::with(lamp());
    twin.ok(cmd(Action::Modify, "/attributes/serial", Some(json!("B2"))));
    let state = twin.state.clone().unwrap();

    let plain = twin.ok(cmd(Action::Retrieve, "/", None));
    let plain = plain.response().value.clone().unwrap();
    assert!(plain.get("_revision").is_none() && plain.get("_created").is_none());
    assert_eq!(&plain, twin.doc());

    let selected = twin.ok(with_headers(cmd(Action::Retrieve, "/", None), |h| {
        h.fields = Some(
            "thingId,attributes/location/room,features/lamp(properties/on,definition),_revision,_created,_modified,_namespace,nothing/here"
                .into(),
        );
    }));
    assert_eq!(
        selected.response().value,
        Some(json!({
            "thingId": ID,
            "attributes": {"location": {"room": "kitchen"}},
            "features": {"lamp": {"properties": {"on": false}, "definition": ["org.acme:switchable:1.0.0"]}},
            "_revision": 2,
            "_created": state.created.to_string(),
            "_modified": state.modified.to_string(),
            "_namespace": "org.acme"
        }))
    );

    // Below the root, fields select inside the value; pseudo-fields are not there.
    let below = twin.ok(with_headers(
        cmd(Action::Retrieve, "/attributes", None),
        |h| {
            h.fields = Some("serial,_revision".into());
        },
    ));
    assert_eq!(below.response().value, Some(json!({"serial": "B2"})));

    let bad = twin.err(with_headers(cmd(Action::Retrieve, "/", None), |h| {
        h.fields = Some("attributes(a".into());
    }));
    assert_eq!(code(&bad), (400, "json.fieldselector.invalid"));
}

// --- delete ------------------------------------------------------------------------------

#[test]
fn delete_at_every_level_removes_the_value_and_answers_204() {
    for path in [
        "/policyId",
        "/definition",
        "/attributes",
        "/attributes/location/room",
        "/features",
        "/features/lamp",
        "/features/lamp/definition",
        "/features/lamp/properties",
        "/features/lamp/properties/on",
        "/features/lamp/desiredProperties",
        "/features/lamp/desiredProperties/on",
    ] {
        let mut twin = Twin::with(lamp());
        let applied = twin.ok(cmd(Action::Delete, path, None));
        assert_eq!(status_value(&applied), (204, None), "{path}");
        let event = applied.event().unwrap();
        assert_eq!(
            (event.action, event.path.as_str(), event.value.as_ref()),
            (EventAction::Deleted, path, None),
            "{path}"
        );
        assert_eq!(twin.at(path), None, "{path}");
        let e = twin.err(cmd(Action::Delete, path, None));
        assert_eq!(e.status, 404, "{path}");
    }
}

#[test]
fn delete_of_missing_parts_answers_dittos_not_found_codes() {
    let mut twin = Twin::with(json!({"attributes": {}, "features": {"f": {"properties": {}}}}));
    for (path, error) in [
        ("/attributes/a", "things:attribute.notfound"),
        ("/features/g", "things:feature.notfound"),
        ("/features/g/properties/p", "things:feature.notfound"),
        (
            "/features/f/properties/p",
            "things:feature.property.notfound",
        ),
        (
            "/features/f/definition",
            "things:feature.definition.notfound",
        ),
        (
            "/features/f/desiredProperties/p",
            "things:feature.desiredProperties.notfound",
        ),
        ("/definition", "things:definition.notfound"),
        ("/policyId", "things:policyId.notfound"),
    ] {
        let e = twin.err(cmd(Action::Delete, path, None));
        assert_eq!(code(&e), (404, error), "{path}");
    }
}

#[test]
fn delete_of_the_thing_emits_a_deleted_event_and_leaves_nothing() {
    let mut twin = Twin::with(lamp());
    let applied = twin.ok(cmd(Action::Delete, "/", None));
    assert_eq!(applied.status(), 204);
    let event = applied.event().unwrap();
    assert_eq!(
        (event.action, event.path.as_str(), event.revision),
        (EventAction::Deleted, "/", 2)
    );
    assert!(twin.state.is_none());
    let e = twin.err(cmd(Action::Delete, "/", None));
    assert_eq!(code(&e), (404, "things:thing.notfound"));
    // It can be created again, from revision 1.
    twin.ok(cmd(Action::Create, "/", None));
    assert_eq!(twin.revision(), 1);
}

// --- merge (RFC 7396) --------------------------------------------------------------------

#[test]
fn merge_at_the_root_applies_the_patch_as_rfc_7396_says() {
    let mut twin = Twin::with(lamp());
    let applied = twin.ok(cmd(
        Action::Merge,
        "/",
        Some(json!({
            "definition": null,
            "attributes": {"location": {"floor": null, "wing": "B"}, "new": [1]},
            "features": {"lamp": {"properties": {"on": true}}}
        })),
    ));
    assert_eq!(status_value(&applied), (204, None));
    let event = applied.event().unwrap();
    assert_eq!(
        (event.action, event.path.as_str()),
        (EventAction::Merged, "/")
    );
    let mut expected = lamp();
    expected.as_object_mut().unwrap().remove("definition");
    expected["attributes"] =
        json!({"location": {"room": "kitchen", "wing": "B"}, "serial": "A1", "new": [1]});
    expected["features"]["lamp"]["properties"]["on"] = json!(true);
    assert_eq!(twin.doc(), &expected);
}

#[test]
fn merge_at_attributes_and_at_a_property_changes_only_what_the_patch_names() {
    let mut twin = Twin::with(lamp());
    twin.ok(cmd(
        Action::Merge,
        "/attributes",
        Some(json!({"serial": null, "location": {"room": "hall"}})),
    ));
    assert_eq!(
        twin.at("/attributes"),
        Some(&json!({"location": {"room": "hall", "floor": 1}}))
    );
    twin.ok(cmd(
        Action::Merge,
        "/features/lamp/properties/brightness",
        Some(json!(80)),
    ));
    twin.ok(cmd(
        Action::Merge,
        "/features/lamp/properties/color",
        Some(json!({"r": 1, "g": null})),
    ));
    assert_eq!(
        twin.at("/features/lamp/properties"),
        Some(&json!({"on": false, "brightness": 80, "color": {"r": 1}}))
    );
}

#[test]
fn merge_with_null_deletes() {
    let mut twin = Twin::with(lamp());
    twin.ok(cmd(
        Action::Merge,
        "/features/lamp/desiredProperties",
        Some(Value::Null),
    ));
    assert_eq!(twin.at("/features/lamp/desiredProperties"), None);
    twin.ok(cmd(Action::Merge, "/features", Some(json!({"lamp": null}))));
    assert_eq!(twin.at("/features"), Some(&json!({})));
    // Deleting what is not there changes nothing but is still a merge (and a revision).
    let before = twin.doc().clone();
    twin.ok(cmd(Action::Merge, "/attributes/nothing", Some(Value::Null)));
    assert_eq!(twin.doc(), &before);
}

#[test]
fn merge_can_create_a_feature() {
    let mut twin = Twin::with(json!({"attributes": {}}));
    twin.ok(cmd(
        Action::Merge,
        "/features/fan/properties",
        Some(json!({"speed": 3, "gone": null})),
    ));
    assert_eq!(
        twin.at("/features"),
        Some(&json!({"fan": {"properties": {"speed": 3}}}))
    );
}

#[test]
fn merge_of_null_below_a_missing_parent_creates_the_parents_as_rfc_7396_does() {
    // `{"features":{"fan":{"properties":{"x":null}}}}` at the root creates `fan` with empty
    // properties (RFC 7396 Appendix A, last example); a merge at the path does the same.
    let mut twin = Twin::with(json!({}));
    let applied = twin.ok(cmd(
        Action::Merge,
        "/features/fan/properties/x",
        Some(Value::Null),
    ));
    let event = applied.event().unwrap();
    assert_eq!(event.path, "/features");
    assert_eq!(
        twin.at("/features"),
        Some(&json!({"fan": {"properties": {}}}))
    );
}

#[test]
fn merge_is_validated_on_its_result() {
    let mut twin = Twin::with(lamp());
    let e = twin.err(cmd(
        Action::Merge,
        "/features/lamp",
        Some(json!({"properties": 5})),
    ));
    assert_eq!(
        e.message,
        "`/features/lamp/properties` must be an object, found a number"
    );
    let e = twin.err(cmd(
        Action::Merge,
        "/",
        Some(json!({"thingId": "org.acme:x"})),
    ));
    assert_eq!(code(&e), (400, "things:id.notsettable"));
    let e = twin.err(cmd(Action::Merge, "/", Some(json!({"thingId": null}))));
    assert_eq!(code(&e), (400, "things:json.invalid"));
    let e = twin.err(cmd(Action::Merge, "/", Some(json!([1]))));
    assert_eq!(code(&e), (400, "things:json.invalid"));
}

#[test]
fn merge_of_a_missing_thing_is_not_found() {
    let mut twin = Twin::empty();
    let e = twin.err(cmd(Action::Merge, "/", Some(json!({"attributes": {}}))));
    assert_eq!(code(&e), (404, "things:thing.notfound"));
}

// --- conditional headers -----------------------------------------------------------------

fn if_match(c: ThingCommand, tags: &str) -> ThingCommand {
    with_headers(c, |h| h.if_match = EntityTags::parse(tags))
}

fn if_none_match(c: ThingCommand, tags: &str) -> ThingCommand {
    with_headers(c, |h| h.if_none_match = EntityTags::parse(tags))
}

#[test]
fn if_match_applies_a_change_only_at_the_given_revision() {
    let mut twin = Twin::with(lamp());
    let stale = twin.err(if_match(
        cmd(Action::Modify, "/attributes/serial", Some(json!("X"))),
        "\"rev:7\"",
    ));
    assert_eq!(code(&stale), (412, "things:condition.failed"));
    assert!(stale.message.contains("\"rev:1\""), "{stale}");
    twin.ok(if_match(
        cmd(Action::Modify, "/attributes/serial", Some(json!("X"))),
        "\"rev:1\"",
    ));
    twin.ok(if_match(
        cmd(Action::Merge, "/attributes", Some(json!({"a": 1}))),
        "\"rev:1\", \"rev:2\"",
    ));
    twin.ok(if_match(
        cmd(Action::Delete, "/attributes/a", None),
        "rev:3",
    ));
    assert_eq!(twin.revision(), 4);
}

#[test]
fn if_match_star_changes_only_what_exists_and_if_none_match_star_only_creates() {
    let mut twin = Twin::with(lamp());
    let e = twin.err(if_match(
        cmd(Action::Modify, "/attributes/new", Some(json!(1))),
        "*",
    ));
    assert_eq!(code(&e), (412, "things:condition.failed"));
    assert!(e.message.contains("does not exist"), "{e}");
    twin.ok(if_none_match(
        cmd(Action::Modify, "/attributes/new", Some(json!(1))),
        "*",
    ));
    let e = twin.err(if_none_match(
        cmd(Action::Modify, "/attributes/new", Some(json!(2))),
        "*",
    ));
    assert_eq!(code(&e), (412, "things:condition.failed"));
    twin.ok(if_match(
        cmd(Action::Modify, "/attributes/new", Some(json!(2))),
        "*",
    ));
    // At the root: create only if the thing does not exist.
    let mut empty = Twin::empty();
    empty.ok(if_none_match(
        cmd(Action::Modify, "/", Some(json!({}))),
        "*",
    ));
    let e = empty.err(if_none_match(
        cmd(Action::Modify, "/", Some(json!({}))),
        "*",
    ));
    assert_eq!(e.status, 412);
    let e = Twin::empty().err(if_match(cmd(Action::Modify, "/", Some(json!({}))), "*"));
    assert_eq!(e.status, 412);
}

#[test]
fn a_retrieve_whose_if_none_match_matches_answers_304() {
    let mut twin = Twin::with(lamp());
    let applied = twin.ok(if_none_match(cmd(Action::Retrieve, "/", None), "\"rev:1\""));
    assert_eq!(status_value(&applied), (304, None));
    let applied = twin.ok(if_none_match(
        cmd(Action::Retrieve, "/attributes", None),
        "\"rev:0\"",
    ));
    assert_eq!(applied.status(), 200);
    let e = twin.err(if_match(cmd(Action::Retrieve, "/", None), "\"rev:2\""));
    assert_eq!(code(&e), (412, "things:condition.failed"));
}

// --- limits ------------------------------------------------------------------------------

#[test]
fn a_thing_of_101_kib_is_refused_with_413() {
    let mut twin = Twin::empty();
    let big = json!({"attributes": {"blob": "x".repeat(101 * 1024)}});
    let e = twin.err(cmd(Action::Create, "/", Some(big)));
    assert_eq!(code(&e), (413, "things:thing.toolarge"));
    assert!(e.message.contains("102400 bytes"), "{e}");

    // Growing a thing past the limit is refused the same way, by modify or by merge.
    let mut twin = Twin::with(json!({"attributes": {"a": "x".repeat(60 * 1024)}}));
    let e = twin.err(cmd(
        Action::Modify,
        "/attributes/b",
        Some(json!("y".repeat(41 * 1024))),
    ));
    assert_eq!(e.status, 413);
    let e = twin.err(cmd(
        Action::Merge,
        "/attributes",
        Some(json!({"b": "y".repeat(41 * 1024)})),
    ));
    assert_eq!(e.status, 413);
}

#[test]
fn a_thing_nested_33_levels_deep_is_refused() {
    let nested = |levels: usize| (0..levels).fold(json!(1), |v, _| json!({ "a": v }));
    let mut twin = Twin::with(json!({}));
    // The thing is level 1, `attributes` (the outermost of 31 nested objects) level 2, the
    // innermost object level 32: accepted.
    twin.ok(cmd(Action::Modify, "/attributes", Some(nested(31))));
    // An object inside the innermost one would be level 33.
    let innermost = format!("/attributes{}", "/a".repeat(30));
    assert!(twin.at(&innermost).unwrap().is_object());
    let e = twin.err(cmd(
        Action::Modify,
        &format!("{innermost}/b"),
        Some(json!({"c": 1})),
    ));
    assert_eq!(code(&e), (400, "things:json.invalid"));
    assert!(
        e.message.contains("deeper than the limit of 32 levels"),
        "{e}"
    );
    twin.ok(cmd(
        Action::Modify,
        &format!("{innermost}/b"),
        Some(json!(1)),
    ));
    // A value deeper than the limit on its own is refused before anything else.
    let e = twin.err(cmd(Action::Modify, "/attributes/x", Some(nested(40))));
    assert_eq!(code(&e), (400, "things:json.invalid"));
}

#[test]
fn limits_are_configurable() {
    let mut twin = Twin::with(json!({}));
    twin.limits = Limits {
        max_document_bytes: 100,
        max_depth: 3,
        max_path_len: 20,
    };
    let e = twin.err(cmd(
        Action::Modify,
        "/attributes/a",
        Some(json!("x".repeat(100))),
    ));
    assert_eq!(e.status, 413);
    let e = twin.err(cmd(Action::Modify, "/attributes/a", Some(json!({"b": {}}))));
    assert!(e.message.contains("limit of 3 levels"), "{e}");
    let e = twin.err(cmd(
        Action::Modify,
        "/attributes/abcdefghijk",
        Some(json!(1)),
    ));
    assert_eq!(code(&e), (400, "things:path.invalid"));
    let e = twin.err(cmd(
        Action::Modify,
        "/attributes",
        Some(json!({"abcdefghijk": 1})),
    ));
    assert!(
        e.message.contains("longer than the limit of 20 bytes"),
        "{e}"
    );
}

// --- events ------------------------------------------------------------------------------

#[test]
fn every_change_replays_to_the_validated_state_at_the_next_revision() {
    // `run` asserts the replay invariant on each of these; here we also check the sequence.
    let mut twin = Twin::empty();
    let commands = vec![
        cmd(Action::Create, "/", Some(lamp())),
        cmd(Action::Modify, "/attributes/location/floor", Some(json!(2))),
        cmd(
            Action::Modify,
            "/features/fan",
            Some(json!({"properties": {"rpm": 0}})),
        ),
        cmd(
            Action::Merge,
            "/features/fan/properties",
            Some(json!({"rpm": 900, "mode": "eco"})),
        ),
        cmd(
            Action::Merge,
            "/",
            Some(json!({"attributes": {"serial": null}})),
        ),
        cmd(Action::Merge, "/attributes/x~y/z", Some(Value::Null)),
        cmd(Action::Delete, "/features/lamp/desiredProperties/on", None),
        cmd(
            Action::Modify,
            "/definition",
            Some(json!("org.acme:lamp:2.0.0")),
        ),
        cmd(Action::Delete, "/policyId", None),
        cmd(Action::Modify, "/", Some(json!({"attributes": {"~": 1}}))),
        cmd(Action::Delete, "/", None),
    ];
    for (i, c) in commands.into_iter().enumerate() {
        let applied = twin.ok(c);
        assert!(applied.event().is_some());
        if let Some(state) = &twin.state {
            assert_eq!(state.revision, i as u64 + 1);
            twin::thing::validate_thing(&state.doc, &thing_id(), &Limits::default()).unwrap();
        }
    }
    assert!(twin.state.is_none());
}

#[test]
fn the_current_entity_must_be_the_commanded_thing() {
    let other = Entity::apply(
        None,
        &twin::Event {
            key: twin::EntityKey::new(twin::EntityKind::Thing, "org.acme:other"),
            action: EventAction::Created,
            path: "/".into(),
            value: Some(json!({"thingId": "org.acme:other"})),
            revision: 1,
            timestamp: Timestamp::from_unix_millis(0),
        },
    )
    .unwrap()
    .unwrap();
    let e = apply_thing_command(
        Some(&other),
        &cmd(Action::Retrieve, "/", None),
        Timestamp::from_unix_millis(1),
        &Limits::default(),
    )
    .unwrap_err();
    assert_eq!(e.status, 500);
}
