//! Ditto topics: every level parses, displays back, and bad topics are refused naming the level.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use twin::command::{Action, Command, CommandHeaders, ThingCommand};
use twin::path::ThingPath;
use twin::protocol::topic::MAX_TOPIC_LEN;
use twin::protocol::{Channel, Criterion, Group, Topic, TopicError, TopicLevel};
use twin::{DittoError, EventAction, PolicyId, ThingId};

const ACTIONS: [Action; 5] = [
    Action::Create,
    Action::Modify,
    Action::Merge,
    Action::Retrieve,
    Action::Delete,
];
const EVENT_ACTIONS: [EventAction; 4] = [
    EventAction::Created,
    EventAction::Modified,
    EventAction::Merged,
    EventAction::Deleted,
];

fn parts(topic: &Topic) -> (&str, &str, Group, Criterion) {
    (
        topic.namespace(),
        topic.name(),
        topic.group(),
        topic.criterion().clone(),
    )
}

/// Every topic of the grammar, with its parts.
fn golden() -> Vec<(String, Group, Criterion)> {
    let mut all = Vec::new();
    for channel in [Channel::Twin, Channel::Live] {
        let ch = channel.as_str();
        for action in ACTIONS {
            all.push((
                format!("org.acme/sensor-1/things/{ch}/commands/{}", action.as_str()),
                Group::Things(channel),
                Criterion::Commands(action),
            ));
        }
        for action in EVENT_ACTIONS {
            all.push((
                format!("org.acme/sensor-1/things/{ch}/events/{}", action.as_str()),
                Group::Things(channel),
                Criterion::Events(action),
            ));
        }
        all.push((
            format!("org.acme/sensor-1/things/{ch}/errors"),
            Group::Things(channel),
            Criterion::Errors,
        ));
    }
    all.push((
        "org.acme/sensor-1/things/live/messages/reboot".to_owned(),
        Group::Things(Channel::Live),
        Criterion::Messages("reboot".to_owned()),
    ));
    for action in ACTIONS {
        all.push((
            format!("org.acme/sensor-1/policies/commands/{}", action.as_str()),
            Group::Policies,
            Criterion::Commands(action),
        ));
    }
    for action in EVENT_ACTIONS {
        all.push((
            format!("org.acme/sensor-1/policies/events/{}", action.as_str()),
            Group::Policies,
            Criterion::Events(action),
        ));
    }
    all.push((
        "org.acme/sensor-1/policies/errors".to_owned(),
        Group::Policies,
        Criterion::Errors,
    ));
    all
}

#[test]
fn every_thing_and_policy_topic_parses_into_its_parts() {
    for (text, group, criterion) in golden() {
        let topic = Topic::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            parts(&topic),
            ("org.acme", "sensor-1", group, criterion),
            "{text}"
        );
        assert_eq!(topic.channel(), group.channel());
    }
}

#[test]
fn topics_display_exactly_as_they_were_written() {
    for (text, _, _) in golden() {
        let topic: Topic = text.parse().unwrap();
        assert_eq!(topic.to_string(), text);
        assert_eq!(Topic::parse(&topic.to_string()).unwrap(), topic);
    }
}

#[test]
fn dittos_placeholder_names_an_unknown_entity() {
    let topic = Topic::parse("_/_/things/twin/errors").unwrap();
    assert!(topic.has_placeholder());
    assert_eq!(topic, Topic::placeholder_errors());
    assert_eq!(topic.to_string(), "_/_/things/twin/errors");
    assert_eq!(topic.thing_id().unwrap_err().error, "things:id.invalid");
    assert!(
        !Topic::parse("org.acme/x/things/twin/errors")
            .unwrap()
            .has_placeholder()
    );
}

#[test]
fn constructors_build_the_topics_of_commands_events_messages_and_errors() {
    let thing = ThingId::parse("org.acme:sensor-1").unwrap();
    let policy = PolicyId::parse("org.acme:policy-1").unwrap();
    assert_eq!(
        Topic::thing_command(&thing, Action::Merge).to_string(),
        "org.acme/sensor-1/things/twin/commands/merge"
    );
    assert_eq!(
        Topic::thing_event(&thing, EventAction::Deleted).to_string(),
        "org.acme/sensor-1/things/twin/events/deleted"
    );
    assert_eq!(
        Topic::policy_command(&policy, Action::Retrieve).to_string(),
        "org.acme/policy-1/policies/commands/retrieve"
    );
    assert_eq!(
        Topic::policy_event(&policy, EventAction::Created).to_string(),
        "org.acme/policy-1/policies/events/created"
    );
    let message = Topic::live_message(&thing, "reboot").unwrap();
    assert_eq!(
        message.to_string(),
        "org.acme/sensor-1/things/live/messages/reboot"
    );
    assert_eq!(
        message.errors().to_string(),
        "org.acme/sensor-1/things/live/errors"
    );
    assert_eq!(
        Topic::policy_command(&policy, Action::Modify)
            .errors()
            .to_string(),
        "org.acme/policy-1/policies/errors"
    );
    let command = Command::Thing(ThingCommand {
        thing_id: thing.clone(),
        action: Action::Delete,
        path: ThingPath::parse("/attributes/a").unwrap(),
        value: None,
        headers: CommandHeaders::default(),
    });
    assert_eq!(
        Topic::of_command(&command).to_string(),
        "org.acme/sensor-1/things/twin/commands/delete"
    );
    assert_eq!(
        Topic::of_command(&command).thing_id().unwrap(),
        thing.clone()
    );
    assert_eq!(
        Topic::policy_command(&policy, Action::Delete)
            .policy_id()
            .unwrap(),
        policy
    );
    for bad in ["", "a/b", "a+b", "a#b", "a\u{1}"] {
        assert!(Topic::live_message(&thing, bad).is_err(), "{bad:?}");
    }
}

#[test]
fn messages_are_only_on_the_live_channel_of_things() {
    for group in [Group::Things(Channel::Twin), Group::Policies] {
        let error =
            Topic::new("org.acme", "x", group, Criterion::Messages("hello".into())).unwrap_err();
        assert!(
            matches!(
                error,
                TopicError::Invalid {
                    level: TopicLevel::Criterion,
                    ..
                }
            ),
            "{error}"
        );
    }
    for text in [
        "org.acme/x/things/twin/messages/hello",
        "org.acme/x/policies/messages/hello",
    ] {
        assert!(
            matches!(
                Topic::parse(text),
                Err(TopicError::Invalid {
                    level: TopicLevel::Criterion,
                    ..
                })
            ),
            "{text}"
        );
    }
}

fn invalid(level: TopicLevel, position: usize, found: &str) -> (TopicLevel, usize, String) {
    (level, position, found.to_owned())
}

#[test]
fn bad_topics_are_refused_naming_the_level_and_what_was_expected() {
    use TopicLevel::*;
    let cases = [
        (
            "1org/x/things/twin/commands/modify",
            invalid(Namespace, 1, "1org"),
        ),
        (
            "org..acme/x/things/twin/commands/modify",
            invalid(Namespace, 1, "org..acme"),
        ),
        (
            "org.acme/x/thingz/twin/commands/modify",
            invalid(Group, 3, "thingz"),
        ),
        (
            "org.acme/x/things/tween/commands/modify",
            invalid(Channel, 4, "tween"),
        ),
        (
            "org.acme/x/things/twin/command/modify",
            invalid(Criterion, 5, "command"),
        ),
        (
            "org.acme/x/things/twin/commands/update",
            invalid(Action, 6, "update"),
        ),
        (
            "org.acme/x/things/twin/events/modify",
            invalid(Action, 6, "modify"),
        ),
        (
            "org.acme/x/policies/commands/created",
            invalid(Action, 5, "created"),
        ),
        (
            "org.acme/x/policies/twin/commands/modify",
            invalid(Criterion, 4, "twin"),
        ),
        (
            "org.acme/x/things/twin/search",
            invalid(Criterion, 5, "search"),
        ),
    ];
    for (text, (level, position, found)) in cases {
        match Topic::parse(text) {
            Err(TopicError::Invalid {
                level: l,
                position: p,
                found: f,
                ..
            }) => assert_eq!((l, p, f), (level, position, found), "{text}"),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn missing_empty_and_extra_levels_are_refused() {
    use TopicLevel::*;
    let missing = |text: &str| match Topic::parse(text) {
        Err(TopicError::Missing {
            level, position, ..
        }) => (level, position),
        other => panic!("{text}: {other:?}"),
    };
    assert_eq!(missing("org.acme"), (Name, 2));
    assert_eq!(missing("org.acme/x"), (Group, 3));
    assert_eq!(missing("org.acme/x/things"), (Channel, 4));
    assert_eq!(missing("org.acme/x/things/twin"), (Criterion, 5));
    assert_eq!(missing("org.acme/x/things/twin/commands"), (Action, 6));
    assert_eq!(missing("org.acme/x/policies/commands"), (Action, 5));
    assert_eq!(missing("org.acme/x/things/live/messages"), (Subject, 6));

    let empty = |text: &str| match Topic::parse(text) {
        Err(TopicError::EmptyLevel {
            level, position, ..
        }) => (level, position),
        other => panic!("{text}: {other:?}"),
    };
    assert_eq!(empty("/x/things/twin/errors"), (Namespace, 1));
    assert_eq!(empty("org.acme//things/twin/errors"), (Name, 2));
    assert_eq!(empty("org.acme/x/things//errors"), (Channel, 4));
    assert_eq!(empty("org.acme/x/things/twin/commands/"), (Action, 6));

    let trailing = |text: &str| match Topic::parse(text) {
        Err(TopicError::Trailing {
            level,
            position,
            found,
        }) => (level, position, found),
        other => panic!("{text}: {other:?}"),
    };
    assert_eq!(
        trailing("org.acme/x/things/twin/commands/modify/features/f"),
        (Action, 6, "/features/f".to_owned())
    );
    assert_eq!(
        trailing("org.acme/x/things/twin/errors/"),
        (Criterion, 5, "/".to_owned())
    );
    assert_eq!(
        trailing("org.acme/x/things/live/messages/a/b"),
        (Subject, 6, "/b".to_owned())
    );
}

#[test]
fn topics_that_no_ditto_topic_can_be_are_refused_before_splitting() {
    assert_eq!(Topic::parse(""), Err(TopicError::Empty));
    let long = format!("org.acme/{}/things/twin/errors", "x".repeat(MAX_TOPIC_LEN));
    assert!(matches!(
        Topic::parse(&long),
        Err(TopicError::TooLong { .. })
    ));
    assert_eq!(
        Topic::parse("org.acme/+/things/twin/errors"),
        Err(TopicError::Wildcard('+'))
    );
    assert_eq!(
        Topic::parse("org.acme/x/things/live/messages/#"),
        Err(TopicError::Wildcard('#'))
    );
    let long_name = format!("org.acme/{}/things/twin/errors", "x".repeat(250));
    assert_eq!(
        Topic::parse(&long_name),
        Err(TopicError::IdTooLong { len: 259 })
    );
    assert!(Topic::parse(&format!("org.acme/{}/things/twin/errors", "x".repeat(247))).is_ok());
}

#[test]
fn topic_errors_are_lowercase_sentences_and_dittos_400_unknown_topicpath() {
    let error = Topic::parse("org.acme/x/things/twin/commands/update").unwrap_err();
    assert_eq!(
        error.to_string(),
        "the action (level 6) `update` is invalid: expected `create`, `modify`, `merge`, `retrieve` or `delete`"
    );
    let ditto = DittoError::from(error);
    assert_eq!(
        (ditto.status, ditto.error),
        (400, "things.protocol.adapter:unknown.topicpath")
    );
    assert!(ditto.description.is_some());
    let quoted = Topic::parse(&format!(
        "org.acme/x/things/twin/commands/{}",
        "y".repeat(200)
    ))
    .unwrap_err()
    .to_string();
    assert!(
        quoted.contains(&format!("`{}…`", "y".repeat(64))),
        "{quoted}"
    );
    for error in [
        TopicError::Empty,
        TopicError::Wildcard('#'),
        Topic::parse("org.acme").unwrap_err(),
        Topic::parse("org.acme//x").unwrap_err(),
    ] {
        let text = error.to_string();
        assert!(text.starts_with(char::is_lowercase), "{text}");
        assert!(!text.ends_with('.'), "{text}");
    }
}
