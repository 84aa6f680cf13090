//! The twin layer's per-message steps allocate nothing: parsing a valid compact MQTT topic
//! (DESIGN.md §4: "parse topic (zero-copy)"), the topic writers once their buffer has grown,
//! and authorizing a command on a connection's view.
//!
//! This file is its own test binary, so that it can install the counting global allocator;
//! only allocations on the measuring thread are counted (`alloc_counter`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use alloc_counter::{CountingAllocator, allocations_during};
use serde_json::json;
use twin::authz::grants_without_allocation;
use twin::command::{Action, CommandHeaders, ThingCommand};
use twin::path::ThingPath;
use twin::policy::{Enforcer, Timestamp};
use twin::protocol::mqtt::{write_event_topic, write_message_topic, write_response_topic};
use twin::protocol::{LiveMessage, MessageDirection, MqttTopic, is_twin_topic, parse_mqtt_topic};
use twin::{EntityKey, EntityKind, Event, EventAction, ThingId};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

#[test]
fn the_per_message_steps_allocate_nothing() {
    valid_twin_topics_parse_and_topics_are_written_without_allocating();
    authorizing_a_command_on_a_view_allocates_nothing();
}

fn valid_twin_topics_parse_and_topics_are_written_without_allocating() {
    let topics = [
        "org.acme/sensor-1/things/twin/commands/modify/features/temp/properties/value",
        "org.acme/sensor-1/things/twin/commands/create",
        "org.acme/sensor-1/things/twin/commands/merge/attributes",
        "org.acme.fleet.eu/device-000123/things/twin/commands/retrieve/features/temp/",
        "org.acme/sensor-1/things/twin/commands/delete/attributes/a~0b/c",
        "org.acme/policy-1/policies/commands/modify/entries/owner/subjects/google:1",
        "org.acme/policy-1/policies/commands/retrieve",
        "org.acme/sensor-1/things/live/messages/alarm",
        "org.acme/sensor-1/things/live/messages/alarm/outbox",
        "org.acme/sensor-1/things/live/messages/alarm/features/smoke",
        "org.acme/sensor-1/things/live/messages/alarm/features/smoke/outbox",
        "ditto/commands",
        "ditto/lamp/things/twin/commands/modify/attributes/on",
        "org.acme/sënsor-€/things/twin/commands/modify/attributes/ünïcode",
    ];
    let thing = ThingId::parse("org.acme:sensor-1").unwrap();
    let event = Event {
        key: EntityKey::new(EntityKind::Thing, "org.acme:sensor-1"),
        action: EventAction::Modified,
        path: "/features/temp/properties/value".into(),
        value: Some(json!(21.5)),
        revision: 9,
        timestamp: Timestamp::from_unix_millis(0),
    };
    let message = LiveMessage::new(
        thing.clone(),
        MessageDirection::Outbox,
        Some("smoke".into()),
        "alarm",
    );
    // A connection's reusable buffer, already grown.
    let mut buf = String::with_capacity(256);

    // The counter itself must work, or a zero below would prove nothing.
    assert_eq!(
        allocations_during(|| drop(std::hint::black_box(vec![1u8; 8]))),
        1,
        "the counting allocator does not count"
    );

    let mut parsed = 0usize;
    let mut written = 0usize;
    let allocations = allocations_during(|| {
        for _ in 0..1_000 {
            for topic in topics {
                let topic = std::hint::black_box(topic);
                if let Ok(t) = parse_mqtt_topic(topic) {
                    parsed += 1;
                    if let MqttTopic::ThingCommand { path, .. } = t {
                        written += path.len();
                    }
                }
                parsed += usize::from(is_twin_topic(topic));
            }
            buf.clear();
            written += usize::from(write_event_topic(&mut buf, &event).is_ok());
            buf.clear();
            written += usize::from(
                write_response_topic(&mut buf, &thing, Action::Retrieve, "/features/temp").is_ok(),
            );
            buf.clear();
            written += usize::from(write_message_topic(&mut buf, &message).is_ok());
            written += buf.len();
        }
    });

    assert_eq!(
        allocations, 0,
        "{allocations} allocations in 14,000 parses and 3,000 writes"
    );
    // Every topic was accepted (and the loop was not optimized into nothing).
    assert_eq!(parsed, 2 * 1_000 * topics.len());
    assert!(written > 3_000, "written {written}");
}

/// `authz::grants_without_allocation` on a connection's view, for every single-requirement
/// command whose path has no `~` (issue: "no allocation in the authorization itself").
fn authorizing_a_command_on_a_view_allocates_nothing() {
    let policy = twin::policy::policy_from_value(&json!({"policyId": "org.acme:p", "entries": {
        "owner": {"subjects": {"s:owner": {"type": "t"}},
                  "resources": {"thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                                "policy:/": {"grant": ["READ", "WRITE"], "revoke": []}}},
        "device": {"subjects": {"s:device": {"type": "t"}},
                   "resources": {"thing:/features/telemetry": {"grant": ["READ", "WRITE"], "revoke": []},
                                 "thing:/features/telemetry/properties/secret": {"grant": [], "revoke": ["READ"]}}}
    }}))
    .unwrap();
    let view = Arc::new(Enforcer::compile(&policy)).for_subjects(
        &["s:device"],
        Some("org.acme"),
        Timestamp::from_unix_millis(0),
    );
    let command = |action, path: &str| ThingCommand {
        thing_id: ThingId::parse("org.acme:lamp").unwrap(),
        action,
        path: ThingPath::parse(path).unwrap(),
        value: None,
        headers: CommandHeaders::default(),
    };
    let commands = [
        command(Action::Modify, "/features/telemetry/properties/temp"),
        command(Action::Modify, "/attributes/location"),
        command(Action::Retrieve, "/features/telemetry"),
        command(Action::Retrieve, "/"),
        command(Action::Delete, "/features/telemetry/properties/secret"),
        command(Action::Create, "/features/other"),
    ];
    let expected = [true, false, true, true, true, false];

    // The counter itself must work, or a zero below would prove nothing.
    assert!(
        allocations_during(|| drop(std::hint::black_box(vec![1u8; 3]))) > 0,
        "the counter counts"
    );

    let mut decisions = [false; 6];
    let allocations = allocations_during(|| {
        for _ in 0..1000 {
            for (i, cmd) in commands.iter().enumerate() {
                decisions[i] = grants_without_allocation(&view, cmd) == Some(true);
            }
        }
    });
    assert_eq!(allocations, 0, "allocations while authorizing");
    assert_eq!(decisions, expected);
}
