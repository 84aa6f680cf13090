//! The compact MQTT form (DESIGN.md §3): topics parsed on every publish, commands built from
//! topic + payload, and the topics and payloads the server writes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use serde_json::{Value, json};
use twin::command::{Action, Command, CommandHeaders, PolicyCommand, ThingCommand};
use twin::path::ThingPath;
use twin::policy::Timestamp;
use twin::protocol::mqtt::{
    ENVELOPE_COMMANDS_TOPIC, write_command_response_topic, write_event_payload, write_event_topic,
    write_message_topic, write_policy_response_topic, write_response_topic,
};
use twin::protocol::topic::MAX_TOPIC_LEN;
use twin::protocol::{
    Envelope, LiveMessage, MessageDirection, MqttTopic, Request, TopicError, TopicLevel,
    is_twin_topic, mqtt_command, mqtt_message, mqtt_request, parse_mqtt_topic,
};
use twin::{DittoError, EntityKey, EntityKind, Event, EventAction, PolicyId, ThingId};

const ACTIONS: [Action; 5] = [
    Action::Create,
    Action::Modify,
    Action::Merge,
    Action::Retrieve,
    Action::Delete,
];
const PATHS: [&str; 9] = [
    "",
    "/policyId",
    "/definition",
    "/attributes",
    "/attributes/location/lat",
    "/features",
    "/features/temp",
    "/features/temp/properties/value",
    "/features/temp/desiredProperties/target",
];

fn thing() -> ThingId {
    ThingId::parse("org.acme:sensor-1").unwrap()
}

fn event(
    kind: EntityKind,
    id: &str,
    action: EventAction,
    path: &str,
    value: Option<Value>,
) -> Event {
    Event {
        key: EntityKey::new(kind, id),
        action,
        path: path.into(),
        value,
        revision: 3,
        timestamp: Timestamp::from_unix_millis(1_767_225_600_000),
    }
}

#[test]
fn compact_thing_commands_parse_for_every_action_and_level() {
    for action in ACTIONS {
        for path in PATHS {
            let topic = format!(
                "org.acme/sensor-1/things/twin/commands/{}{path}",
                action.as_str()
            );
            assert_eq!(
                parse_mqtt_topic(&topic),
                Ok(MqttTopic::ThingCommand {
                    namespace: "org.acme",
                    name: "sensor-1",
                    action,
                    path,
                }),
                "{topic}"
            );
        }
    }
    let trailing = parse_mqtt_topic("org.acme/sensor-1/things/twin/commands/retrieve/").unwrap();
    assert!(matches!(
        trailing,
        MqttTopic::ThingCommand { path: "/", .. }
    ));
}

#[test]
fn compact_policy_commands_parse_with_their_path() {
    for action in ACTIONS {
        for path in ["", "/entries", "/entries/owner/resources/thing:/features"] {
            let topic = format!(
                "org.acme/policy-1/policies/commands/{}{path}",
                action.as_str()
            );
            assert_eq!(
                parse_mqtt_topic(&topic),
                Ok(MqttTopic::PolicyCommand {
                    namespace: "org.acme",
                    name: "policy-1",
                    action,
                    path,
                }),
                "{topic}"
            );
        }
    }
}

#[test]
fn live_message_topics_parse_in_every_documented_form() {
    use MessageDirection::{Inbox, Outbox};
    for (suffix, direction, feature) in [
        ("", Inbox, None),
        ("/inbox", Inbox, None),
        ("/outbox", Outbox, None),
        ("/features/lamp", Inbox, Some("lamp")),
        ("/features/lamp/inbox", Inbox, Some("lamp")),
        ("/features/lamp/outbox", Outbox, Some("lamp")),
    ] {
        let topic = format!("org.acme/sensor-1/things/live/messages/switch-on{suffix}");
        assert_eq!(
            parse_mqtt_topic(&topic),
            Ok(MqttTopic::LiveMessage {
                namespace: "org.acme",
                name: "sensor-1",
                direction,
                feature_id: feature,
                subject: "switch-on",
            }),
            "{topic}"
        );
    }
}

#[test]
fn ditto_commands_is_the_envelope_topic_and_ditto_is_still_a_namespace() {
    assert_eq!(
        parse_mqtt_topic(ENVELOPE_COMMANDS_TOPIC),
        Ok(MqttTopic::Envelope)
    );
    assert_eq!(MqttTopic::Envelope.namespace(), None);
    let owned = parse_mqtt_topic("ditto/lamp/things/twin/commands/modify/attributes/on").unwrap();
    assert_eq!(owned.namespace(), Some("ditto"));
    assert_eq!(owned.name(), Some("lamp"));
}

/// Each bad topic and the error it gets.
fn rejections() -> Vec<(String, TopicError)> {
    use TopicLevel::*;
    let invalid = |level, position, found: &str, expected: &'static str| TopicError::Invalid {
        level,
        position,
        found: found.into(),
        expected,
    };
    let ns_expected = "dot-separated parts that start with a letter and hold letters, digits and `_`, e.g. `org.acme`";
    let actions = "`create`, `modify`, `merge`, `retrieve` or `delete`";
    vec![
        ("".into(), TopicError::Empty),
        (
            format!(
                "org.acme/{}/things/twin/commands/modify",
                "x".repeat(MAX_TOPIC_LEN)
            ),
            TopicError::TooLong {
                len: MAX_TOPIC_LEN + 37,
                max: MAX_TOPIC_LEN,
            },
        ),
        (
            "org.acme/+/things/twin/commands/modify".into(),
            TopicError::Wildcard('+'),
        ),
        (
            "org.acme/x/things/twin/commands/modify/attributes/#".into(),
            TopicError::Wildcard('#'),
        ),
        ("#".into(), TopicError::Wildcard('#')),
        (
            "/x/things/twin/commands/modify".into(),
            TopicError::EmptyLevel {
                level: Namespace,
                position: 1,
                expected: ns_expected,
            },
        ),
        (
            "org.acme//things/twin/commands/modify".into(),
            TopicError::EmptyLevel {
                level: Name,
                position: 2,
                expected: "a name without `+`, `#` or control characters",
            },
        ),
        (
            "Org-Acme/x/things/twin/commands/modify".into(),
            invalid(Namespace, 1, "Org-Acme", ns_expected),
        ),
        (
            "_/x/things/twin/commands/modify".into(),
            invalid(Namespace, 1, "_", ns_expected),
        ),
        (
            "org.acme/bell\u{7}/things/twin/commands/modify".into(),
            invalid(
                Name,
                2,
                "bell\u{7}",
                "a name without `+`, `#` or control characters",
            ),
        ),
        (
            format!("org.acme/{}/things/twin/commands/modify", "x".repeat(250)),
            TopicError::IdTooLong { len: 259 },
        ),
        (
            "org.acme/x/devices/twin/commands/modify".into(),
            invalid(Group, 3, "devices", "`things` or `policies`"),
        ),
        (
            "org.acme/x/things/shadow/commands/modify".into(),
            invalid(Channel, 4, "shadow", "`twin` or `live`"),
        ),
        (
            "org.acme/x/things/twin/commandz/modify".into(),
            invalid(
                Criterion,
                5,
                "commandz",
                "`commands` (clients publish commands)",
            ),
        ),
        (
            "org.acme/x/things/twin/commands/update".into(),
            invalid(Action, 6, "update", actions),
        ),
        (
            "org.acme/x/things/twin/commands/modified/attributes".into(),
            invalid(Action, 6, "modified", actions),
        ),
        (
            "org.acme/x/policies/commands/put".into(),
            invalid(Action, 5, "put", actions),
        ),
        (
            "org.acme/x/things/twin/commands".into(),
            TopicError::Missing {
                level: Action,
                position: 6,
                expected: actions,
            },
        ),
        (
            "org.acme/x".into(),
            TopicError::Missing {
                level: Group,
                position: 3,
                expected: "`things` or `policies`",
            },
        ),
        (
            "org.acme/x/things/twin/events/modified/attributes".into(),
            TopicError::ServerToClient {
                criterion: "events",
            },
        ),
        (
            "org.acme/x/things/twin/responses/retrieve".into(),
            TopicError::ServerToClient {
                criterion: "responses",
            },
        ),
        (
            "org.acme/x/things/twin/errors".into(),
            TopicError::ServerToClient {
                criterion: "errors",
            },
        ),
        (
            "org.acme/x/policies/events/created".into(),
            TopicError::ServerToClient {
                criterion: "events",
            },
        ),
        (
            "org.acme/x/things/live/errors".into(),
            TopicError::ServerToClient {
                criterion: "errors",
            },
        ),
        (
            "ditto/responses".into(),
            TopicError::ServerToClient {
                criterion: "ditto/responses",
            },
        ),
        (
            "org.acme/x/things/live/commands/modify".into(),
            TopicError::Unsupported {
                what: "live commands and live events",
                hint: "send live messages (`{namespace}/{name}/things/live/messages/{subject}`)",
            },
        ),
        (
            "org.acme/x/things/live/messages".into(),
            TopicError::Missing {
                level: Subject,
                position: 6,
                expected: "a message subject: one level without `+`, `#` or control characters",
            },
        ),
        (
            "org.acme/x/things/live/messages/hi/sideways".into(),
            invalid(
                MessageTarget,
                7,
                "sideways",
                "nothing (the thing's inbox), `inbox`, `outbox` or `features/{featureId}[/inbox|/outbox]`",
            ),
        ),
        (
            "org.acme/x/things/live/messages/hi/features".into(),
            TopicError::Missing {
                level: FeatureId,
                position: 8,
                expected: "a feature ID: one level without `+`, `#` or control characters",
            },
        ),
        (
            "org.acme/x/things/live/messages/hi/features/f/up".into(),
            invalid(
                MessageTarget,
                9,
                "up",
                "nothing (the feature's inbox), `inbox` or `outbox`",
            ),
        ),
        (
            "org.acme/x/things/live/messages/hi/outbox/more".into(),
            TopicError::Trailing {
                level: MessageTarget,
                position: 7,
                found: "/more".into(),
            },
        ),
        (
            "ditto/events".into(),
            invalid(
                EnvelopeChannel,
                2,
                "events",
                "`commands` (`ditto/commands`)",
            ),
        ),
        (
            "ditto/commands/extra".into(),
            TopicError::Trailing {
                level: EnvelopeChannel,
                position: 2,
                found: "/extra".into(),
            },
        ),
    ]
}

#[test]
fn bad_topics_are_refused_with_their_reason() {
    for (topic, error) in rejections() {
        assert_eq!(parse_mqtt_topic(&topic), Err(error), "{topic:?}");
    }
}

#[test]
fn topic_errors_read_as_lowercase_sentences_and_become_400s() {
    for (topic, error) in rejections() {
        let text = error.to_string();
        assert!(
            text.starts_with(|c: char| c.is_lowercase() || c == '`'),
            "{text}"
        );
        assert!(!text.ends_with('.'), "{text}");
        let ditto = DittoError::from(error);
        assert_eq!(ditto.status, 400, "{topic}");
        assert_eq!(ditto.error, "things.protocol.adapter:unknown.topicpath");
    }
    assert_eq!(
        parse_mqtt_topic("org.acme/x/things/twin/events/modified")
            .unwrap_err()
            .to_string(),
        "`events` topics are sent by the server to clients, never published by them"
    );
    assert_eq!(
        parse_mqtt_topic("org.acme/x/things/twin/commands/update")
            .unwrap_err()
            .to_string(),
        "the action (level 6) `update` is invalid: expected `create`, `modify`, `merge`, `retrieve` or `delete`"
    );
}

#[test]
fn twin_topics_are_things_policies_and_ditto_and_everything_else_is_plain() {
    for topic in [
        "org.acme/x/things/twin/commands/modify",
        "org.acme/x/policies/commands/retrieve",
        "org.acme/x/things/twin/events/modified",
        "org.acme/x/things",
        "a/b/things",
        "ditto/commands",
        "ditto/anything/else",
        "ditto",
    ] {
        assert!(is_twin_topic(topic), "{topic}");
    }
    for topic in [
        "sensors/s1/temp",
        "org.acme/x/thing/twin",
        "things/x/y",
        "a/things",
        "dittos/commands",
        "",
        "/",
        "$share/g/x/things",
    ] {
        assert!(!is_twin_topic(topic), "{topic}");
    }
}

#[test]
fn every_accepted_topic_is_a_twin_topic() {
    for topic in [
        "org.acme/x/things/twin/commands/modify",
        "org.acme/x/policies/commands/delete/entries/a",
        "org.acme/x/things/live/messages/s/features/f/outbox",
        "ditto/commands",
    ] {
        assert!(
            parse_mqtt_topic(topic).is_ok() && is_twin_topic(topic),
            "{topic}"
        );
    }
}

fn command(topic: &str, payload: &[u8]) -> Result<Command, DittoError> {
    mqtt_command(&parse_mqtt_topic(topic).unwrap(), payload)
}

#[test]
fn compact_commands_carry_the_payload_as_value_and_no_headers() {
    assert_eq!(
        command(
            "org.acme/sensor-1/things/twin/commands/modify/features/temp/properties/value",
            b"21.5"
        )
        .unwrap(),
        Command::Thing(ThingCommand {
            thing_id: thing(),
            action: Action::Modify,
            path: ThingPath::parse("/features/temp/properties/value").unwrap(),
            value: Some(json!(21.5)),
            headers: CommandHeaders::default(),
        })
    );
    let Command::Thing(create) = command(
        "org.acme/sensor-1/things/twin/commands/create",
        br#"{"attributes":{"a":1}}"#,
    )
    .unwrap() else {
        panic!("not a thing command")
    };
    assert!(create.path.is_root());
    assert_eq!(create.value, Some(json!({"attributes": {"a": 1}})));
    let Command::Thing(merge) = command(
        "org.acme/sensor-1/things/twin/commands/merge/attributes/a",
        b" null ",
    )
    .unwrap() else {
        panic!("not a thing command")
    };
    assert_eq!(merge.value, Some(Value::Null));
    for (topic, payload) in [
        (
            "org.acme/sensor-1/things/twin/commands/retrieve/features/temp",
            &b""[..],
        ),
        (
            "org.acme/sensor-1/things/twin/commands/delete/attributes/a",
            &b"ignored, not JSON"[..],
        ),
    ] {
        let Command::Thing(c) = command(topic, payload).unwrap() else {
            panic!("not a thing command")
        };
        assert_eq!(c.value, None, "{topic}");
    }
    assert_eq!(
        command(
            "org.acme/policy-1/policies/commands/modify/entries/owner/subjects/google:1",
            br#"{"type":"user"}"#
        )
        .unwrap(),
        Command::Policy(PolicyCommand {
            policy_id: PolicyId::parse("org.acme:policy-1").unwrap(),
            action: Action::Modify,
            path: "/entries/owner/subjects/google:1".into(),
            value: Some(json!({"type": "user"})),
            headers: CommandHeaders::default(),
        })
    );
    let Command::Policy(root) =
        command("org.acme/policy-1/policies/commands/retrieve", b"").unwrap()
    else {
        panic!("not a policy command")
    };
    assert_eq!(root.path, "/");
}

#[test]
fn invalid_or_missing_payloads_are_400_json_invalid_with_serdes_reason() {
    let error = command(
        "org.acme/sensor-1/things/twin/commands/modify/attributes/a",
        b"{oops",
    )
    .unwrap_err();
    assert_eq!((error.status, error.error), (400, "things:json.invalid"));
    assert_eq!(
        error.message,
        "the payload is not valid JSON: key must be a string at line 1 column 2"
    );
    for action in ["create", "modify", "merge"] {
        let error = command(
            &format!("org.acme/sensor-1/things/twin/commands/{action}"),
            b"  ",
        )
        .unwrap_err();
        assert_eq!(error.error, "things:json.invalid");
        assert_eq!(
            error.message,
            format!("`{action}` needs a JSON value as payload, and the payload is empty")
        );
    }
}

#[test]
fn paths_that_address_no_part_of_a_thing_are_400_path_invalid() {
    for path in ["/thingId", "/features/f/other", "/attributes/a\u{1}"] {
        let error = command(
            &format!("org.acme/sensor-1/things/twin/commands/retrieve{path}"),
            b"",
        )
        .unwrap_err();
        assert_eq!(
            (error.status, error.error),
            (400, "things:path.invalid"),
            "{path}"
        );
    }
}

#[test]
fn envelopes_on_ditto_commands_become_commands_and_messages() {
    let envelope = br#"{"topic":"org.acme/sensor-1/things/twin/commands/modify","path":"/attributes/a","value":1,"headers":{"correlation-id":"c1"}}"#;
    let Command::Thing(c) = mqtt_command(&MqttTopic::Envelope, envelope).unwrap() else {
        panic!("not a thing command")
    };
    assert_eq!(c.headers.correlation_id.as_deref(), Some("c1"));
    let message = br#"{"topic":"org.acme/sensor-1/things/live/messages/hi","path":"/inbox/messages/hi","value":"hello"}"#;
    assert!(matches!(
        mqtt_request(&MqttTopic::Envelope, message).unwrap(),
        Request::Message(_)
    ));
    assert_eq!(
        mqtt_command(&MqttTopic::Envelope, message)
            .unwrap_err()
            .status,
        400
    );
    let error = mqtt_command(&MqttTopic::Envelope, b"not json").unwrap_err();
    assert_eq!(error.error, "things:json.invalid");
}

#[test]
fn compact_messages_carry_json_or_text_payloads() {
    let topic =
        parse_mqtt_topic("org.acme/sensor-1/things/live/messages/alarm/features/smoke/outbox")
            .unwrap();
    let message = mqtt_message(&topic, br#"{"level":3}"#).unwrap();
    assert_eq!(message.thing_id, thing());
    assert_eq!(message.direction, MessageDirection::Outbox);
    assert_eq!(message.feature_id.as_deref(), Some("smoke"));
    assert_eq!(message.subject, "alarm");
    assert_eq!(message.payload, Some(json!({"level": 3})));
    assert_eq!(
        message.headers.content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(
        message.resource(),
        "message:/features/smoke/outbox/messages/alarm"
    );

    let text = mqtt_message(&topic, b"smoke detected").unwrap();
    assert_eq!(text.payload, Some(json!("smoke detected")));
    assert_eq!(text.headers.content_type.as_deref(), Some("text/plain"));
    let empty = mqtt_message(&topic, b"").unwrap();
    assert_eq!((empty.payload, empty.headers.content_type), (None, None));
    let binary = mqtt_message(&topic, &[0xff, 0xfe]).unwrap_err();
    assert_eq!(binary.error, "things:json.invalid");

    assert_eq!(mqtt_command(&topic, b"{}").unwrap_err().status, 400);
    let command_topic =
        parse_mqtt_topic("org.acme/sensor-1/things/twin/commands/retrieve").unwrap();
    assert_eq!(mqtt_message(&command_topic, b"").unwrap_err().status, 400);
}

#[test]
fn event_topics_append_the_path_without_double_slashes() {
    let cases = [
        (
            event(
                EntityKind::Thing,
                "org.acme:sensor-1",
                EventAction::Modified,
                "/features/temp/properties/value",
                Some(json!(21.5)),
            ),
            "org.acme/sensor-1/things/twin/events/modified/features/temp/properties/value",
        ),
        (
            event(
                EntityKind::Thing,
                "org.acme:sensor-1",
                EventAction::Created,
                "",
                Some(json!({})),
            ),
            "org.acme/sensor-1/things/twin/events/created",
        ),
        (
            event(
                EntityKind::Thing,
                "org.acme:sensor-1",
                EventAction::Deleted,
                "/",
                None,
            ),
            "org.acme/sensor-1/things/twin/events/deleted",
        ),
        (
            event(
                EntityKind::Thing,
                "org.acme:sensor-1",
                EventAction::Merged,
                "//attributes//a~0b/",
                Some(json!(1)),
            ),
            "org.acme/sensor-1/things/twin/events/merged/attributes/a~0b",
        ),
        (
            event(
                EntityKind::Policy,
                "org.acme:policy-1",
                EventAction::Modified,
                "/entries/owner",
                Some(json!({})),
            ),
            "org.acme/policy-1/policies/events/modified/entries/owner",
        ),
    ];
    let mut buf = String::new();
    for (event, expected) in cases {
        buf.clear();
        write_event_topic(&mut buf, &event).unwrap();
        assert_eq!(buf, expected);
    }
    let mut mounted = String::from("mount/");
    write_event_topic(
        &mut mounted,
        &event(
            EntityKind::Thing,
            "org.acme:x",
            EventAction::Deleted,
            "",
            None,
        ),
    )
    .unwrap();
    assert_eq!(mounted, "mount/org.acme/x/things/twin/events/deleted");
}

#[test]
fn events_that_cannot_be_topics_write_nothing() {
    let mut buf = String::from("kept");
    let solution = event(
        EntityKind::Solution,
        "acme",
        EventAction::Modified,
        "/usage",
        Some(json!({})),
    );
    assert!(matches!(
        write_event_topic(&mut buf, &solution),
        Err(TopicError::NoTopic { .. })
    ));
    let wildcard = event(
        EntityKind::Thing,
        "org.acme:x",
        EventAction::Modified,
        "/attributes/a#b",
        Some(json!(1)),
    );
    assert_eq!(
        write_event_topic(&mut buf, &wildcard),
        Err(TopicError::Wildcard('#'))
    );
    assert!(write_event_payload(&mut buf, &solution, None).is_err());
    assert_eq!(buf, "kept");
}

#[test]
fn event_payloads_are_ditto_envelopes_with_value_revision_and_timestamp() {
    let modified = event(
        EntityKind::Thing,
        "org.acme:sensor-1",
        EventAction::Modified,
        "/features/temp",
        Some(json!({"properties": {"value": 21.5, "secret": 1}})),
    );
    let mut buf = String::new();
    write_event_payload(&mut buf, &modified, modified.value.as_ref()).unwrap();
    assert_eq!(
        buf,
        r#"{"topic":"org.acme/sensor-1/things/twin/events/modified","headers":{},"path":"/features/temp","value":{"properties":{"secret":1,"value":21.5}},"revision":3,"timestamp":"2026-01-01T00:00:00Z"}"#
    );
    assert_eq!(
        Envelope::parse(buf.as_bytes()).unwrap(),
        Envelope::from_event(&modified).unwrap()
    );

    let view = json!({"properties": {"value": 21.5}});
    buf.clear();
    write_event_payload(&mut buf, &modified, Some(&view)).unwrap();
    assert_eq!(Envelope::parse(buf.as_bytes()).unwrap().value, Some(view));

    buf.clear();
    let deleted = event(
        EntityKind::Thing,
        "org.acme:sensor-1",
        EventAction::Deleted,
        "",
        None,
    );
    write_event_payload(&mut buf, &deleted, None).unwrap();
    assert_eq!(
        buf,
        r#"{"topic":"org.acme/sensor-1/things/twin/events/deleted","headers":{},"path":"/","revision":3,"timestamp":"2026-01-01T00:00:00Z"}"#
    );
}

#[test]
fn response_topics_mirror_the_command_topic() {
    let mut buf = String::new();
    write_response_topic(&mut buf, &thing(), Action::Retrieve, "/features/temp").unwrap();
    assert_eq!(
        buf,
        "org.acme/sensor-1/things/twin/responses/retrieve/features/temp"
    );
    buf.clear();
    write_response_topic(&mut buf, &thing(), Action::Retrieve, "").unwrap();
    assert_eq!(buf, "org.acme/sensor-1/things/twin/responses/retrieve");
    buf.clear();
    let policy = PolicyId::parse("org.acme:policy-1").unwrap();
    write_policy_response_topic(&mut buf, &policy, Action::Retrieve, "/entries/owner").unwrap();
    assert_eq!(
        buf,
        "org.acme/policy-1/policies/responses/retrieve/entries/owner"
    );

    // Straight from the parsed topic of the request.
    let request = "org.acme/sensor-1/things/twin/commands/retrieve/features/temp/properties";
    let MqttTopic::ThingCommand { action, path, .. } = parse_mqtt_topic(request).unwrap() else {
        panic!("not a thing command")
    };
    buf.clear();
    write_response_topic(&mut buf, &thing(), action, path).unwrap();
    assert_eq!(buf, request.replace("/commands/", "/responses/"));

    for (topic, expected) in [
        (
            "org.acme/sensor-1/things/twin/commands/retrieve/attributes/a~0b",
            "org.acme/sensor-1/things/twin/responses/retrieve/attributes/a~0b",
        ),
        (
            "org.acme/policy-1/policies/commands/retrieve",
            "org.acme/policy-1/policies/responses/retrieve/",
        ),
    ] {
        buf.clear();
        write_command_response_topic(&mut buf, &command(topic, b"").unwrap()).unwrap();
        assert_eq!(buf, expected.trim_end_matches('/'));
    }
}

#[test]
fn message_topics_are_written_in_the_shortest_form_and_parse_back() {
    use MessageDirection::{Inbox, Outbox};
    for (direction, feature, expected) in [
        (Inbox, None, "org.acme/sensor-1/things/live/messages/hello"),
        (
            Outbox,
            None,
            "org.acme/sensor-1/things/live/messages/hello/outbox",
        ),
        (
            Inbox,
            Some("lamp"),
            "org.acme/sensor-1/things/live/messages/hello/features/lamp",
        ),
        (
            Outbox,
            Some("lamp"),
            "org.acme/sensor-1/things/live/messages/hello/features/lamp/outbox",
        ),
    ] {
        let message = LiveMessage::new(thing(), direction, feature.map(str::to_owned), "hello");
        let mut buf = String::new();
        write_message_topic(&mut buf, &message).unwrap();
        assert_eq!(buf, expected);
        let parsed = mqtt_message(&parse_mqtt_topic(&buf).unwrap(), b"").unwrap();
        assert_eq!(parsed, message);
    }
    let mut buf = String::new();
    let bad = LiveMessage::new(thing(), Inbox, None, "a/b");
    assert!(write_message_topic(&mut buf, &bad).is_err());
    let bad = LiveMessage::new(thing(), Inbox, Some("x+".into()), "ok");
    assert!(write_message_topic(&mut buf, &bad).is_err());
    assert!(buf.is_empty());
}

#[test]
fn the_equivalent_ditto_topic_answers_with_errors() {
    let topic =
        parse_mqtt_topic("org.acme/sensor-1/things/twin/commands/modify/attributes/a").unwrap();
    let ditto = topic.ditto_topic().unwrap();
    assert_eq!(
        ditto.to_string(),
        "org.acme/sensor-1/things/twin/commands/modify"
    );
    let error = Envelope::error(Some(&ditto), &DittoError::json_invalid("bad"), None);
    assert_eq!(
        error.topic.to_string(),
        "org.acme/sensor-1/things/twin/errors"
    );
    let message = parse_mqtt_topic("org.acme/sensor-1/things/live/messages/hi/outbox").unwrap();
    assert_eq!(
        message.ditto_topic().unwrap().to_string(),
        "org.acme/sensor-1/things/live/messages/hi"
    );
    let policy = parse_mqtt_topic("org.acme/p/policies/commands/delete/entries/x").unwrap();
    assert_eq!(
        policy.ditto_topic().unwrap().to_string(),
        "org.acme/p/policies/commands/delete"
    );
    assert_eq!(MqttTopic::Envelope.ditto_topic(), None);
}

/// Run with `cargo test --release -p twin --test protocol_mqtt -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: run it in release mode"]
fn parse_mqtt_topic_speed() {
    let topics = [
        "org.acme/sensor-1/things/twin/commands/modify/features/temp/properties/value",
        "org.acme.fleet/device-000123/things/twin/commands/retrieve",
        "org.acme/policy-1/policies/commands/modify/entries/owner",
        "org.acme/sensor-1/things/live/messages/alarm/features/smoke/outbox",
        "ditto/commands",
    ];
    let rounds = 2_000_000u32;
    let parses = f64::from(rounds * topics.len() as u32);
    // The floor, in the same run: splitting the topic into its levels and counting them.
    let start = std::time::Instant::now();
    let mut levels = 0usize;
    for _ in 0..rounds {
        for topic in topics {
            levels += std::hint::black_box(topic).split('/').count();
        }
    }
    let floor = start.elapsed().as_nanos() as f64 / parses;
    let start = std::time::Instant::now();
    let mut accepted = 0u32;
    for _ in 0..rounds {
        for topic in topics {
            accepted += u32::from(parse_mqtt_topic(std::hint::black_box(topic)).is_ok());
        }
    }
    let per_parse = start.elapsed().as_nanos() as f64 / parses;
    println!(
        "parse_mqtt_topic: {per_parse:.1} ns per topic (mean of {} topics); \
         split('/').count(): {floor:.1} ns; ratio {:.2}",
        topics.len(),
        per_parse / floor
    );
    assert_eq!(accepted, rounds * topics.len() as u32);
    assert!(levels > 0);

    let event = event(
        EntityKind::Thing,
        "org.acme:sensor-1",
        EventAction::Modified,
        "/features/temp/properties/value",
        Some(json!(21.5)),
    );
    let mut buf = String::with_capacity(256);
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        buf.clear();
        write_event_topic(&mut buf, std::hint::black_box(&event)).unwrap();
    }
    println!(
        "write_event_topic: {:.1} ns per topic",
        start.elapsed().as_nanos() as f64 / f64::from(rounds)
    );
}
