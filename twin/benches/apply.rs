//! Command application on a ~2 KB thing.
//!
//! What is timed (and what is not):
//! - `apply/modify_property_2kb` and `apply/merge_2kb`: `apply_thing_command` on an entity
//!   built once (passed by reference, never changed), followed by `Entity::apply` of the
//!   resulting event to a clone of that entity prepared *outside* the timed section
//!   (`iter_batched`): everything the hot path does to accept a change and make it — checks,
//!   validation of the resulting document (depth, size, shape of the new value), building the
//!   event, applying it in place — plus dropping the command's outputs and the changed entity.
//!   The clone is not timed (the store owns its entity and applies events to it in place).
//! - `apply/decide_modify_2kb`: `apply_thing_command` alone (no state change).
//! - `apply/replay_event_2kb`: `Entity::apply` alone, as the store replays a journal.
//! - `apply/validate_2kb`: `validate_thing` of the whole document, for comparison (a change
//!   below the root does not run it).
//!
//! Not timed anywhere here: authorization, parsing the command, journaling.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use twin::apply::{Applied, apply_thing_command};
use twin::command::{Action, CommandHeaders, ThingCommand};
use twin::path::ThingPath;
use twin::policy::Timestamp;
use twin::thing::{Limits, serialized_len, validate_thing};
use twin::{Entity, ThingId};

fn thing_2kb() -> Value {
    let mut features = serde_json::Map::new();
    for i in 0..8 {
        features.insert(
            format!("sensor-{i}"),
            json!({
                "definition": ["org.acme:sensor:1.2.0"],
                "properties": {
                    "value": 21.5 + f64::from(i),
                    "unit": "°C",
                    "status": {"ok": true, "since": "2025-01-01T00:00:00Z"},
                    "limits": [0, 100]
                },
                "desiredProperties": {"interval": 60}
            }),
        );
    }
    features.insert(
        "lamp".into(),
        json!({"properties": {"on": false, "brightness": 50}}),
    );
    json!({
        "thingId": "org.acme:bench-1",
        "policyId": "org.acme:bench",
        "definition": "org.acme:device:1.0.0",
        "attributes": {
            "manufacturer": "ACME",
            "serial": "0815-4711",
            "location": {"building": "B7", "floor": 3, "room": "3.14"}
        },
        "features": features
    })
}

fn setup() -> (Entity, ThingId) {
    let thing_id = ThingId::parse("org.acme:bench-1").unwrap();
    let create = ThingCommand {
        thing_id: thing_id.clone(),
        action: Action::Create,
        path: ThingPath::root(),
        value: Some(thing_2kb()),
        headers: CommandHeaders::default(),
    };
    let applied = apply_thing_command(
        None,
        &create,
        Timestamp::from_unix_millis(1),
        &Limits::default(),
    )
    .unwrap();
    let Applied::Change(change) = applied else {
        panic!("create did not change anything")
    };
    (
        Entity::apply(None, &change.event).unwrap().unwrap(),
        thing_id,
    )
}

fn bench(c: &mut Criterion) {
    let (entity, thing_id) = setup();
    let size = serialized_len(&entity.doc);
    assert!((1800..2600).contains(&size), "the thing is {size} bytes");
    let limits = Limits::default();
    let now = Timestamp::from_unix_millis(2);

    let modify = ThingCommand {
        thing_id: thing_id.clone(),
        action: Action::Modify,
        path: ThingPath::parse("/features/sensor-3/properties/value").unwrap(),
        value: Some(json!(23.25)),
        headers: CommandHeaders::default(),
    };
    let merge = ThingCommand {
        thing_id: thing_id.clone(),
        action: Action::Merge,
        path: ThingPath::parse("/features/lamp/properties").unwrap(),
        value: Some(json!({"on": true, "brightness": 80, "color": null})),
        headers: CommandHeaders::default(),
    };

    let mut group = c.benchmark_group("apply");
    let decide_and_apply = |cmd: &ThingCommand, current: Option<Entity>| {
        let Ok(Applied::Change(change)) =
            apply_thing_command(current.as_ref(), black_box(cmd), now, &limits)
        else {
            panic!("the command was refused")
        };
        Entity::apply(current, &change.event)
    };
    group.bench_function("modify_property_2kb", |b| {
        b.iter_batched(
            || Some(entity.clone()),
            |current| decide_and_apply(&modify, current),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("merge_2kb", |b| {
        b.iter_batched(
            || Some(entity.clone()),
            |current| decide_and_apply(&merge, current),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("decide_modify_2kb", |b| {
        b.iter(|| apply_thing_command(Some(black_box(&entity)), black_box(&modify), now, &limits))
    });
    let Ok(Applied::Change(change)) = apply_thing_command(Some(&entity), &modify, now, &limits)
    else {
        panic!("the modify was refused")
    };
    let event = change.event;
    group.bench_function("replay_event_2kb", |b| {
        b.iter_batched(
            || Some(entity.clone()),
            |current| Entity::apply(current, black_box(&event)),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("validate_2kb", |b| {
        b.iter(|| validate_thing(black_box(&entity.doc), &thing_id, &limits))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
