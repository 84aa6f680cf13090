//! Random command sequences on one thing, in memory, against an obviously correct model.
//!
//! The model says what a command means on the whole document — modify sets the value at the
//! path (creating parents), merge is RFC 7396 of the patch wrapped to the root, delete removes —
//! and that a command is refused exactly when the model's result is not a valid thing (or the
//! addressed value is missing). After every accepted change, `Entity::apply(old, &event)` gives
//! the model's state, which is a valid thing judged in full (the command judged only what
//! changed), and the revision grew by exactly one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use twin::apply::{Applied, apply_thing_command};
use twin::command::{Action, CommandHeaders, ThingCommand};
use twin::entity::pointer;
use twin::merge::merge_patch;
use twin::path::ThingPath;
use twin::policy::Timestamp;
use twin::thing::{Limits, validate_thing};
use twin::{Entity, ThingId};

const ID: &str = "org.acme:t";

const PATHS: &[&str] = &[
    "/",
    "/policyId",
    "/definition",
    "/attributes",
    "/attributes/a",
    "/attributes/a/b",
    "/attributes/b",
    "/attributes/x~y",
    "/features",
    "/features/f",
    "/features/g",
    "/features/f/definition",
    "/features/f/properties",
    "/features/f/properties/a",
    "/features/f/properties/a/b",
    "/features/g/properties/on",
    "/features/f/desiredProperties",
    "/features/f/desiredProperties/a",
];

fn key() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("a"),
        Just("b"),
        Just("on"),
        Just("f"),
        Just("properties"),
        Just("desiredProperties"),
        Just("attributes"),
        Just("features"),
    ]
}

fn object_of(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), inner, 0..3).prop_map(|m| {
        Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect::<Map<String, Value>>(),
        )
    })
}

/// Any small JSON value, valid or not where it lands.
fn value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-3i64..3).prop_map(Value::from),
        Just(json!("org.acme:p1")),
        Just(json!("a:b:1")),
        Just(json!(["a:b:1"])),
        Just(json!([])),
        Just(json!("no id")),
    ];
    leaf.prop_recursive(3, 24, 3, object_of).boxed()
}

/// A value of the shape `path` holds in a valid thing (so that sequences get somewhere).
fn shaped(path: &'static str) -> BoxedStrategy<Value> {
    let feature = || object_of(value()).prop_map(|p| json!({"properties": p}));
    match path {
        "/" => (object_of(value()), feature())
            .prop_map(|(a, f)| json!({"attributes": a, "features": {"f": f}}))
            .boxed(),
        "/policyId" => Just(json!("org.acme:p1")).boxed(),
        "/definition" => Just(json!("a:b:1")).boxed(),
        "/features/f/definition" => Just(json!(["a:b:1", "c:d:2"])).boxed(),
        "/features" => feature().prop_map(|f| json!({ "f": f })).boxed(),
        "/features/f" | "/features/g" => feature().boxed(),
        "/attributes" | "/features/f/properties" | "/features/f/desiredProperties" => {
            object_of(value()).boxed()
        }
        _ => value(),
    }
}

fn command() -> impl Strategy<Value = (Action, &'static str, Value)> {
    prop::sample::select(PATHS).prop_flat_map(|path| {
        (
            prop_oneof![
                3 => Just(Action::Modify),
                3 => Just(Action::Merge),
                1 => Just(Action::Delete),
                1 => Just(Action::Retrieve),
            ],
            Just(path),
            // A bare `null` often: it deletes in a merge, and is a value like any other in a
            // modify.
            prop_oneof![1 => Just(Value::Null), 1 => value(), 3 => shaped(path)],
        )
    })
}

fn segments(path: &str) -> Vec<String> {
    ThingPath::parse(path).unwrap().segments().to_vec()
}

/// Sets `value` at `segments`, turning missing or non-object parents into objects.
fn set(doc: &mut Value, segments: &[String], value: Value) {
    match segments.split_first() {
        None => *doc = value,
        Some((first, rest)) => {
            if !doc.is_object() {
                *doc = json!({});
            }
            let child = doc
                .as_object_mut()
                .unwrap()
                .entry(first.clone())
                .or_insert(Value::Null);
            if !rest.is_empty() && !child.is_object() {
                *child = json!({});
            }
            set(child, rest, value);
        }
    }
}

fn wrap(segments: &[String], value: Value) -> Value {
    segments
        .iter()
        .rev()
        .fold(value, |v, k| json!({ k.clone(): v }))
}

/// What the model expects: `Ok(Some(doc))`, `Ok(None)` (deleted), or `Err(status)` for a command
/// that must be refused before validation (missing thing or value).
fn model(
    doc: Option<&Value>,
    action: Action,
    path: &str,
    value: &Value,
) -> Result<Option<Value>, u16> {
    let segs = segments(path);
    match (doc, action) {
        (None, Action::Modify) if segs.is_empty() => {
            let mut body = value.clone();
            if let Value::Object(map) = &mut body {
                map.insert("thingId".into(), json!(ID));
            }
            Ok(Some(body))
        }
        (None, _) => Err(404),
        (Some(doc), Action::Modify) if segs.is_empty() => {
            let mut body = value.clone();
            if let Value::Object(map) = &mut body {
                map.insert("thingId".into(), json!(ID));
                if !map.contains_key("policyId")
                    && let Some(p) = doc.get("policyId")
                {
                    map.insert("policyId".into(), p.clone());
                }
            }
            Ok(Some(body))
        }
        (Some(doc), Action::Modify) => {
            let mut doc = doc.clone();
            set(&mut doc, &segs, value.clone());
            Ok(Some(doc))
        }
        (Some(doc), Action::Merge) => {
            let mut doc = doc.clone();
            merge_patch(&mut doc, &wrap(&segs, value.clone()));
            Ok(Some(doc))
        }
        (Some(doc), Action::Delete) => {
            if pointer(doc, path).is_none() {
                return Err(404);
            }
            if segs.is_empty() {
                return Ok(None);
            }
            let mut doc = doc.clone();
            let (last, parents) = segs.split_last().unwrap();
            let parent = parents
                .iter()
                .try_fold(&mut doc, |v, k| v.get_mut(k.as_str()))
                .unwrap();
            parent.as_object_mut().unwrap().remove(last);
            Ok(Some(doc))
        }
        (Some(doc), _) => Ok(Some(doc.clone())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_command_sequences_replay_to_the_validated_model_state(
        commands in prop::collection::vec(command(), 1..40)
    ) {
        let thing_id = ThingId::parse(ID).unwrap();
        let limits = Limits::default();
        let mut state: Option<Entity> = None;
        for (i, (action, path, value)) in commands.into_iter().enumerate() {
            let cmd = ThingCommand {
                thing_id: thing_id.clone(),
                action,
                path: ThingPath::parse(path).unwrap(),
                value: Some(value.clone()),
                headers: CommandHeaders::default(),
            };
            let now = Timestamp::from_unix_millis(i as i64);
            let old = state.clone();
            let expected = model(old.as_ref().map(|e| &e.doc), action, path, &value);
            match apply_thing_command(old.as_ref(), &cmd, now, &limits) {
                Ok(Applied::Change(change)) => {
                    let new_state = Entity::apply(old.clone(), &change.event);
                    prop_assert!(new_state.is_ok(), "{:?}: {:?}", change.event, new_state);
                    let new_state = new_state.unwrap();
                    prop_assert_eq!(
                        change.event.revision,
                        old.as_ref().map_or(1, |e| e.revision + 1)
                    );
                    let doc = new_state.as_ref().map(|e| e.doc.clone());
                    prop_assert_eq!(Ok(doc.clone()), expected, "{} {}", action.as_str(), path);
                    if let Some(doc) = &doc {
                        // Judged in full: the command judged only what changed.
                        let full = validate_thing(doc, &thing_id, &limits);
                        prop_assert!(full.is_ok(), "accepted {} {}: {:?}", action.as_str(), path, full);
                    }
                    state = new_state;
                }
                Ok(Applied::Retrieve(response)) => {
                    prop_assert_eq!(action, Action::Retrieve);
                    prop_assert_eq!(response.status, 200);
                    let doc = &old.as_ref().unwrap().doc;
                    prop_assert_eq!(response.value.as_ref(), pointer(doc, path));
                }
                Err(e) => {
                    prop_assert_eq!(&state, &old);
                    match expected {
                        Err(status) => prop_assert_eq!(e.status, status, "{}", e),
                        Ok(None) => prop_assert!(false, "a delete was refused: {}", e),
                        Ok(Some(_)) if action == Action::Retrieve => {
                            prop_assert_eq!(e.status, 404, "{}", e);
                            let doc = &old.as_ref().unwrap().doc;
                            prop_assert!(pointer(doc, path).is_none());
                        }
                        Ok(Some(doc)) => {
                            // Refused exactly when the model's result is not a valid thing.
                            let why = validate_thing(&doc, &thing_id, &limits);
                            prop_assert!(why.is_err(), "refused {} {} with {}: {}", action.as_str(), path, e, doc);
                            let why = why.unwrap_err();
                            prop_assert_eq!((e.status, e.error), (why.status, why.error));
                        }
                    }
                }
            }
        }
    }
}

/// The generator is not so hostile that nothing is ever accepted.
#[test]
fn the_command_generator_gets_commands_accepted() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let thing_id = ThingId::parse(ID).unwrap();
    let mut state: Option<Entity> = apply_thing_command(
        None,
        &ThingCommand {
            thing_id: thing_id.clone(),
            action: Action::Create,
            path: ThingPath::root(),
            value: None,
            headers: CommandHeaders::default(),
        },
        Timestamp::from_unix_millis(0),
        &Limits::default(),
    )
    .ok()
    .and_then(|a| match a {
        Applied::Change(c) => Entity::apply(None, &c.event).unwrap(),
        Applied::Retrieve(_) => None,
    });
    let mut accepted = 0;
    for _ in 0..500 {
        let (action, path, value) = command().new_tree(&mut runner).unwrap().current();
        let cmd = ThingCommand {
            thing_id: thing_id.clone(),
            action,
            path: ThingPath::parse(path).unwrap(),
            value: Some(value),
            headers: CommandHeaders::default(),
        };
        if let Ok(Applied::Change(change)) = apply_thing_command(
            state.as_ref(),
            &cmd,
            Timestamp::from_unix_millis(1),
            &Limits::default(),
        ) {
            accepted += 1;
            state = Entity::apply(state, &change.event).unwrap();
        }
    }
    assert!(accepted > 200, "only {accepted} of 500 accepted");
}
