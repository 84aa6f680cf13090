//! Properties of the protocol parsers: no input panics them, and what is written parses back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use proptest::prelude::*;
use serde_json::json;
use twin::command::Action;
use twin::policy::Timestamp;
use twin::protocol::mqtt::{write_event_topic, write_message_topic, write_response_topic};
use twin::protocol::{
    Channel, Criterion, Envelope, Group, LiveMessage, MessageDirection, MqttTopic, Topic,
    is_twin_topic, mqtt_request, parse_mqtt_topic,
};
use twin::{EntityKey, EntityKind, Event, EventAction, ThingId};

fn namespace() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9_]{0,8}(\\.[a-zA-Z][a-zA-Z0-9_]{0,8}){0,3}"
}

/// Names: no `/`, `+`, `#` or control characters; some non-ASCII and punctuation.
fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.:~@$ \"\\\\é€😀-]{1,24}"
}

/// A path after the action: empty or `/`-separated levels (possibly empty ones).
fn path() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9_:~é-]{0,10}", 0..6)
        .prop_map(|levels| levels.iter().map(|l| format!("/{l}")).collect::<String>())
}

fn level() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.:~é-]{1,12}"
}

fn action() -> impl Strategy<Value = Action> {
    prop::sample::select(vec![
        Action::Create,
        Action::Modify,
        Action::Merge,
        Action::Retrieve,
        Action::Delete,
    ])
}

fn event_action() -> impl Strategy<Value = EventAction> {
    prop::sample::select(vec![
        EventAction::Created,
        EventAction::Modified,
        EventAction::Merged,
        EventAction::Deleted,
    ])
}

/// Topic-like text: the grammar's words, separators, wildcards and junk, in any order.
fn topicish() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("org.acme".to_owned()),
            Just("ditto".to_owned()),
            Just("things".to_owned()),
            Just("policies".to_owned()),
            Just("twin".to_owned()),
            Just("live".to_owned()),
            Just("commands".to_owned()),
            Just("events".to_owned()),
            Just("messages".to_owned()),
            Just("features".to_owned()),
            Just("outbox".to_owned()),
            Just("modify".to_owned()),
            Just("retrieve".to_owned()),
            Just("+".to_owned()),
            Just("#".to_owned()),
            Just(String::new()),
            "\\PC{0,6}",
        ],
        0..10,
    )
    .prop_map(|levels| levels.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_text_never_panics_the_topic_parsers(text in prop_oneof![any::<String>(), topicish()]) {
        let mqtt = parse_mqtt_topic(&text);
        if let Ok(topic) = &mqtt {
            // Whatever the parser accepts is in the twin topic space, and builds a request or
            // a precise error without panicking.
            prop_assert!(is_twin_topic(&text));
            let _ = mqtt_request(topic, b"{}");
            let _ = mqtt_request(topic, b"");
        }
        let _ = is_twin_topic(&text);
        if let Ok(topic) = Topic::parse(&text) {
            prop_assert_eq!(topic.to_string(), text);
        }
    }

    #[test]
    fn random_bytes_never_panic_the_envelope_parser(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = Envelope::parse(&bytes);
        let _ = mqtt_request(&MqttTopic::Envelope, &bytes);
    }

    #[test]
    fn random_envelopes_never_panic_and_valid_ones_round_trip(
        topic in topicish(),
        path in prop_oneof![path(), "\\PC{0,20}"],
        status in prop::option::of(0u16..1000),
    ) {
        let mut envelope = json!({"topic": topic, "path": path, "value": {"a": [1, null]}});
        if let Some(status) = status {
            envelope["status"] = json!(status);
        }
        if let Ok(parsed) = Envelope::parse(envelope.to_string().as_bytes()) {
            prop_assert_eq!(Envelope::parse(&parsed.to_bytes()).unwrap(), parsed.clone());
            let _ = parsed.into_request();
        }
    }

    #[test]
    fn valid_compact_command_topics_parse_back_to_their_parts(
        ns in namespace(), name in name(), action in action(), path in path(), policy in any::<bool>(),
    ) {
        let group = if policy { "policies" } else { "things/twin" };
        let topic = format!("{ns}/{name}/{group}/commands/{}{path}", action.as_str());
        let parsed = parse_mqtt_topic(&topic).unwrap();
        let expected = if policy {
            MqttTopic::PolicyCommand { namespace: &ns, name: &name, action, path: &path }
        } else {
            MqttTopic::ThingCommand { namespace: &ns, name: &name, action, path: &path }
        };
        prop_assert_eq!(parsed, expected);
        prop_assert!(is_twin_topic(&topic));
    }

    #[test]
    fn written_topics_parse_back_to_what_was_written(
        ns in namespace(), name in name(), action in action(), path in path(),
        event_action in event_action(), subject in level(), feature in prop::option::of(level()),
        outbox in any::<bool>(),
    ) {
        let thing = ThingId::from_parts(&ns, &name).unwrap();
        let mut buf = String::new();
        write_response_topic(&mut buf, &thing, action, &path).unwrap();
        let normalized: String = path.split('/').filter(|s| !s.is_empty()).map(|s| format!("/{s}")).collect();
        prop_assert_eq!(&buf, &format!("{ns}/{name}/things/twin/responses/{}{normalized}", action.as_str()));

        buf.clear();
        let event = Event {
            key: EntityKey::new(EntityKind::Thing, thing.as_str()),
            action: event_action,
            path: path.clone(),
            value: None,
            revision: 1,
            timestamp: Timestamp::from_unix_millis(0),
        };
        write_event_topic(&mut buf, &event).unwrap();
        prop_assert_eq!(&buf, &format!("{ns}/{name}/things/twin/events/{}{normalized}", event_action.as_str()));
        // The command topic with the same action and path parses to the same parts.
        let command = format!("{ns}/{name}/things/twin/commands/{}{normalized}", action.as_str());
        prop_assert_eq!(
            parse_mqtt_topic(&command).unwrap(),
            MqttTopic::ThingCommand { namespace: &ns, name: &name, action, path: &normalized }
        );

        let direction = if outbox { MessageDirection::Outbox } else { MessageDirection::Inbox };
        let message = LiveMessage::new(thing.clone(), direction, feature.clone(), subject.clone());
        buf.clear();
        write_message_topic(&mut buf, &message).unwrap();
        prop_assert_eq!(
            parse_mqtt_topic(&buf).unwrap(),
            MqttTopic::LiveMessage {
                namespace: &ns,
                name: &name,
                direction,
                feature_id: feature.as_deref(),
                subject: &subject,
            }
        );
    }

    #[test]
    fn ditto_topics_round_trip_through_display(
        ns in prop_oneof![namespace(), Just("_".to_owned())],
        name in name(),
        which in 0usize..5,
        action in action(),
        event_action in event_action(),
        subject in level(),
        live in any::<bool>(),
    ) {
        let channel = if live { Channel::Live } else { Channel::Twin };
        let (group, criterion) = match which {
            0 => (Group::Things(channel), Criterion::Commands(action)),
            1 => (Group::Things(channel), Criterion::Events(event_action)),
            2 => (Group::Things(Channel::Live), Criterion::Messages(subject)),
            3 => (Group::Policies, Criterion::Commands(action)),
            _ => (Group::Policies, Criterion::Errors),
        };
        let topic = Topic::new(ns, name, group, criterion).unwrap();
        prop_assert_eq!(Topic::parse(&topic.to_string()).unwrap(), topic);
    }
}
