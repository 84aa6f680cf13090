//! The Ditto envelope: parsing with errors that name the field, writing, and the conversions
//! (envelope ⇄ command, event → envelope, responses, errors, live messages).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use serde_json::{Map, Value, json};
use twin::command::{Action, Command, CommandHeaders, EntityTags, PolicyCommand, ThingCommand};
use twin::path::ThingPath;
use twin::policy::Timestamp;
use twin::protocol::{Envelope, LiveMessage, MessageDirection, Request, Topic};
use twin::{DittoError, EntityKey, EntityKind, Event, EventAction, PolicyId, ThingId};

/// 2026-01-01T00:00:00Z.
const NEW_YEAR: i64 = 1_767_225_600_000;

fn parse(json: Value) -> Result<Envelope, DittoError> {
    Envelope::parse(json.to_string().as_bytes())
}

fn thing() -> ThingId {
    ThingId::parse("org.acme:sensor-1").unwrap()
}

fn thing_command(action: Action, path: &str, value: Option<Value>) -> ThingCommand {
    ThingCommand {
        thing_id: thing(),
        action,
        path: ThingPath::parse(path).unwrap(),
        value,
        headers: CommandHeaders::default(),
    }
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
        revision: 7,
        timestamp: Timestamp::from_unix_millis(NEW_YEAR),
    }
}

#[test]
fn an_envelope_parses_every_field() {
    let envelope = parse(json!({
        "topic": "org.acme/sensor-1/things/twin/events/modified",
        "headers": {"correlation-id": "c1", "x-custom": 3},
        "path": "/features/temp/properties/value",
        "value": 21.5,
        "status": 200,
        "fields": "thingId,attributes",
        "extra": {"attributes": {"site": "a"}},
        "revision": 42,
        "timestamp": "2026-01-01T00:00:00Z",
        "metadata": {"ignored": true}
    }))
    .unwrap();
    assert_eq!(
        envelope.topic.to_string(),
        "org.acme/sensor-1/things/twin/events/modified"
    );
    assert_eq!(envelope.path, "/features/temp/properties/value");
    assert_eq!(envelope.value, Some(json!(21.5)));
    assert_eq!(envelope.headers["correlation-id"], json!("c1"));
    assert_eq!(envelope.status, Some(200));
    assert_eq!(envelope.fields.as_deref(), Some("thingId,attributes"));
    assert_eq!(
        envelope.extra,
        Some(
            json!({"attributes": {"site": "a"}})
                .as_object()
                .unwrap()
                .clone()
        )
    );
    assert_eq!(envelope.revision, Some(42));
    assert_eq!(
        envelope.timestamp,
        Some(Timestamp::from_unix_millis(NEW_YEAR))
    );
    assert!(envelope.is_response());

    let minimal = Envelope::parse_str(
        r#"{"topic":"org.acme/sensor-1/things/twin/commands/retrieve","path":"/"}"#,
    )
    .unwrap();
    assert_eq!(minimal.headers, Map::new());
    assert_eq!(minimal.value, None);
    assert!(!minimal.is_response());
}

#[test]
fn an_explicit_null_value_is_kept_apart_from_no_value() {
    let with_null = parse(json!({"topic": "org.acme/x/things/twin/commands/merge", "path": "/attributes/a", "value": null})).unwrap();
    assert_eq!(with_null.value, Some(Value::Null));
    let Command::Thing(merge) = with_null.into_command().unwrap() else {
        panic!("not a thing command")
    };
    assert_eq!(merge.value, Some(Value::Null));
}

#[test]
fn envelope_errors_name_the_field() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "the envelope is not JSON: key must be a string"),
        (b"[1]".to_vec(), "the envelope must be a JSON object, not an array"),
        (br#"{"path":"/"}"#.to_vec(), "the envelope has no field `topic`"),
        (br#"{"topic":3,"path":"/"}"#.to_vec(), "field `topic` must be a string, not a number"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify"}"#.to_vec(), "the envelope has no field `path`"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":["/"]}"#.to_vec(), "field `path` must be a string, not an array"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":"/","headers":[]}"#.to_vec(), "field `headers` must be an object, not an array"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":"/","status":42}"#.to_vec(), "field `status` must be an HTTP status (100 to 599), not `42`"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":"/","status":"200"}"#.to_vec(), "field `status` must be a number, not a string"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":"/","revision":-1}"#.to_vec(), "field `revision` must be a whole number ≥ 0, not `-1`"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":"/","timestamp":"yesterday"}"#.to_vec(), "field `timestamp` `yesterday` is not an RFC 3339 date-time"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":"/","fields":1}"#.to_vec(), "field `fields` must be a string, not a number"),
        (br#"{"topic":"org.acme/x/things/twin/commands/modify","path":"/","extra":[]}"#.to_vec(), "field `extra` must be an object, not an array"),
    ];
    for (bytes, message) in cases {
        let error = Envelope::parse(&bytes).unwrap_err();
        assert_eq!(
            (error.status, error.error),
            (400, "things:json.invalid"),
            "{message}"
        );
        assert!(
            error.message.starts_with(message),
            "{} does not start with {message}",
            error.message
        );
    }
    let bad_topic =
        parse(json!({"topic": "org.acme/x/things/twin/commands/update", "path": "/"})).unwrap_err();
    assert_eq!(
        (bad_topic.status, bad_topic.error),
        (400, "things.protocol.adapter:unknown.topicpath")
    );
    assert_eq!(
        bad_topic.message,
        "field `topic` `org.acme/x/things/twin/commands/update`: the action (level 6) `update` is invalid: expected `create`, `modify`, `merge`, `retrieve` or `delete`"
    );
}

#[test]
fn a_modify_envelope_becomes_a_thing_command_with_its_headers() {
    let command = parse(json!({
        "topic": "org.acme/sensor-1/things/twin/commands/modify",
        "path": "/features/temp/properties/value",
        "value": 21.5,
        "headers": {
            "correlation-id": "c1",
            "response-required": true,
            "if-match": "\"rev:3\"",
            "content-type": "application/json"
        }
    }))
    .unwrap()
    .into_command()
    .unwrap();
    let mut expected = thing_command(
        Action::Modify,
        "/features/temp/properties/value",
        Some(json!(21.5)),
    );
    expected.headers = CommandHeaders {
        correlation_id: Some("c1".into()),
        response_required: Some(true),
        if_match: Some(EntityTags::Revisions(vec![3])),
        if_none_match: None,
        fields: None,
        condition: None,
        other: json!({"content-type": "application/json"})
            .as_object()
            .unwrap()
            .clone(),
    };
    assert_eq!(command, Command::Thing(expected));
}

#[test]
fn headers_are_read_without_case_and_response_required_accepts_words() {
    let command = parse(json!({
        "topic": "org.acme/sensor-1/things/twin/commands/retrieve",
        "path": "/attributes",
        "fields": "location",
        "headers": {"Correlation-ID": "c2", "response-required": "FALSE", "If-None-Match": "*", "fields": "ignored"}
    }))
    .unwrap()
    .into_command()
    .unwrap();
    let Command::Thing(command) = command else {
        panic!("not a thing command")
    };
    assert_eq!(command.headers.correlation_id.as_deref(), Some("c2"));
    assert_eq!(command.headers.response_required, Some(false));
    assert_eq!(command.headers.if_none_match, Some(EntityTags::Any));
    assert_eq!(command.headers.fields.as_deref(), Some("location"));
    assert!(command.headers.other.is_empty());

    let from_header = parse(json!({
        "topic": "org.acme/sensor-1/things/twin/commands/retrieve",
        "path": "/",
        "headers": {"fields": "thingId"}
    }))
    .unwrap()
    .into_command()
    .unwrap();
    let Command::Thing(from_header) = from_header else {
        panic!("not a thing command")
    };
    assert_eq!(from_header.headers.fields.as_deref(), Some("thingId"));
}

#[test]
fn invalid_header_values_are_dittos_400_header_invalid() {
    for (name, value, message) in [
        (
            "response-required",
            json!("maybe"),
            "the value `\"maybe\"` of the header `response-required` is not a valid boolean",
        ),
        (
            "correlation-id",
            json!(5),
            "the value `5` of the header `correlation-id` is not a valid string",
        ),
        (
            "if-match",
            json!("rev:x"),
            "the value `\"rev:x\"` of the header `if-match` is not a valid entity tag list (`*` or `\"rev:3\"`)",
        ),
        (
            "if-none-match",
            json!(true),
            "the value `true` of the header `if-none-match` is not a valid entity tag list (`*` or `\"rev:3\"`)",
        ),
    ] {
        let error = parse(json!({
            "topic": "org.acme/sensor-1/things/twin/commands/modify",
            "path": "/attributes/a",
            "value": 1,
            "headers": {name: value}
        }))
        .unwrap()
        .into_command()
        .unwrap_err();
        assert_eq!(
            (error.status, error.error),
            (400, "header.invalid"),
            "{name}"
        );
        assert_eq!(error.message, message);
    }
}

#[test]
fn policy_command_envelopes_become_policy_commands() {
    let command = parse(json!({
        "topic": "org.acme/policy-1/policies/commands/modify",
        "path": "/entries/owner/resources/thing:/features",
        "value": {"grant": ["READ"], "revoke": []},
        "headers": {"correlation-id": "p1"}
    }))
    .unwrap()
    .into_command()
    .unwrap();
    assert_eq!(
        command,
        Command::Policy(PolicyCommand {
            policy_id: PolicyId::parse("org.acme:policy-1").unwrap(),
            action: Action::Modify,
            path: "/entries/owner/resources/thing:/features".into(),
            value: Some(json!({"grant": ["READ"], "revoke": []})),
            headers: CommandHeaders {
                correlation_id: Some("p1".into()),
                ..CommandHeaders::default()
            },
        })
    );
    let Command::Policy(root) =
        parse(json!({"topic": "org.acme/policy-1/policies/commands/retrieve", "path": ""}))
            .unwrap()
            .into_command()
            .unwrap()
    else {
        panic!("not a policy command")
    };
    assert_eq!(root.path, "/");
}

#[test]
fn create_modify_and_merge_need_a_value_and_retrieve_and_delete_ignore_it() {
    for action in ["create", "modify", "merge"] {
        let error = parse(
            json!({"topic": format!("org.acme/x/things/twin/commands/{action}"), "path": "/"}),
        )
        .unwrap()
        .into_command()
        .unwrap_err();
        assert_eq!(error.error, "things:json.invalid");
        assert_eq!(
            error.message,
            format!("field `value` is required for `{action}`")
        );
    }
    for action in ["retrieve", "delete"] {
        let Command::Thing(command) = parse(json!({"topic": format!("org.acme/x/things/twin/commands/{action}"), "path": "/attributes", "value": 5}))
            .unwrap()
            .into_command()
            .unwrap()
        else {
            panic!("not a thing command")
        };
        assert_eq!(command.value, None, "{action}");
    }
}

#[test]
fn command_paths_and_ids_are_checked() {
    let path = parse(
        json!({"topic": "org.acme/x/things/twin/commands/retrieve", "path": "/features/f/other"}),
    )
    .unwrap()
    .into_command()
    .unwrap_err();
    assert_eq!((path.status, path.error), (400, "things:path.invalid"));
    let id = parse(json!({"topic": "_/_/things/twin/commands/create", "path": "/", "value": {}}))
        .unwrap()
        .into_command()
        .unwrap_err();
    assert_eq!((id.status, id.error), (400, "things:id.invalid"));
}

fn sample_commands() -> Vec<Command> {
    let mut with_headers = thing_command(
        Action::Merge,
        "/attributes/a~0b/c",
        Some(json!({"x": null, "y": [1, "two"]})),
    );
    with_headers.headers = CommandHeaders {
        correlation_id: Some("c\"1".into()),
        response_required: Some(false),
        if_match: Some(EntityTags::Revisions(vec![3, 4])),
        if_none_match: Some(EntityTags::Any),
        fields: Some("thingId,attributes".into()),
        condition: Some(r#"eq(attributes/a,"b")"#.into()),
        other: json!({"x-trace": "abc", "timeout": 5})
            .as_object()
            .unwrap()
            .clone(),
    };
    vec![
        Command::Thing(thing_command(
            Action::Create,
            "/",
            Some(json!({"attributes": {}})),
        )),
        Command::Thing(thing_command(
            Action::Modify,
            "/features/temp/properties/value",
            Some(json!(21.5)),
        )),
        Command::Thing(thing_command(Action::Retrieve, "/features", None)),
        Command::Thing(thing_command(Action::Delete, "/policyId", None)),
        Command::Thing(with_headers),
        Command::Policy(PolicyCommand {
            policy_id: PolicyId::parse("org.acme:p").unwrap(),
            action: Action::Delete,
            path: "/entries/old".into(),
            value: None,
            headers: CommandHeaders::default(),
        }),
    ]
}

#[test]
fn commands_round_trip_through_envelope_json() {
    for command in sample_commands() {
        let envelope = Envelope::from_command(&command);
        let bytes = envelope.to_bytes();
        let back = Envelope::parse(&bytes).unwrap();
        assert_eq!(back, envelope, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(back.into_command().unwrap(), command);
    }
}

#[test]
fn the_json_text_is_the_json_value() {
    for command in sample_commands() {
        let envelope = Envelope::from_command(&command);
        let text = envelope.to_string();
        assert!(text.starts_with("{\"topic\":"), "{text}");
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            envelope.to_json()
        );
        let mut reused = String::from("prefix");
        envelope.write_json(&mut reused);
        assert_eq!(reused, format!("prefix{text}"));
    }
}

#[test]
fn a_command_envelope_is_written_as_ditto_writes_it() {
    let mut command = thing_command(
        Action::Modify,
        "/features/temp/properties/value",
        Some(json!(21.5)),
    );
    command.headers.correlation_id = Some("c1".into());
    command.headers.response_required = Some(true);
    assert_eq!(
        Envelope::from_command(&Command::Thing(command)).to_string(),
        r#"{"topic":"org.acme/sensor-1/things/twin/commands/modify","headers":{"correlation-id":"c1","response-required":true},"path":"/features/temp/properties/value","value":21.5}"#
    );
}

#[test]
fn events_become_envelopes_with_revision_and_timestamp() {
    let modified = event(
        EntityKind::Thing,
        "org.acme:sensor-1",
        EventAction::Modified,
        "/features/temp/properties/value",
        Some(json!(21.5)),
    );
    let envelope = Envelope::from_event(&modified).unwrap();
    assert_eq!(
        envelope.to_string(),
        r#"{"topic":"org.acme/sensor-1/things/twin/events/modified","headers":{},"path":"/features/temp/properties/value","value":21.5,"revision":7,"timestamp":"2026-01-01T00:00:00Z"}"#
    );
    assert_eq!(Envelope::parse(&envelope.to_bytes()).unwrap(), envelope);

    let created = Envelope::from_event(&event(
        EntityKind::Thing,
        "org.acme:sensor-1",
        EventAction::Created,
        "",
        Some(json!({"attributes": {}})),
    ))
    .unwrap();
    assert_eq!(created.path, "/");
    assert_eq!(
        created.topic.to_string(),
        "org.acme/sensor-1/things/twin/events/created"
    );

    let deleted = Envelope::from_event(&event(
        EntityKind::Thing,
        "org.acme:sensor-1",
        EventAction::Deleted,
        "/attributes/a",
        None,
    ))
    .unwrap();
    assert_eq!(deleted.value, None);
    assert!(!deleted.to_string().contains("\"value\""));

    let policy = Envelope::from_event(&event(
        EntityKind::Policy,
        "org.acme:policy-1",
        EventAction::Merged,
        "/entries",
        Some(json!({})),
    ))
    .unwrap();
    assert_eq!(
        policy.topic.to_string(),
        "org.acme/policy-1/policies/events/merged"
    );

    let solution = Envelope::from_event(&event(
        EntityKind::Solution,
        "acme",
        EventAction::Modified,
        "/namespaces",
        Some(json!([])),
    ));
    assert_eq!(
        solution.unwrap_err().to_string(),
        "`solution:acme` has no topic (only things and policies have one)"
    );
}

#[test]
fn responses_echo_the_correlation_id_on_the_command_topic() {
    let mut command = thing_command(Action::Retrieve, "/features/temp", None);
    command.headers.correlation_id = Some("c7".into());
    command
        .headers
        .other
        .insert("x-other".into(), json!("not echoed"));
    let response = Envelope::response(
        &Command::Thing(command),
        200,
        Some(json!({"properties": {"value": 21.5}})),
    );
    assert_eq!(
        response.to_string(),
        r#"{"topic":"org.acme/sensor-1/things/twin/commands/retrieve","headers":{"correlation-id":"c7"},"path":"/features/temp","value":{"properties":{"value":21.5}},"status":200}"#
    );
    assert!(response.is_response());
}

#[test]
fn errors_go_to_the_errors_topic_with_dittos_error_json() {
    let mut command = thing_command(
        Action::Modify,
        "/features/temp/properties/value",
        Some(json!(1)),
    );
    command.headers.correlation_id = Some("c9".into());
    let error = DittoError::new(
        403,
        "things:feature.property.notmodifiable",
        "the property `value` may not be modified",
    )
    .with_description("Check the policy.");
    let envelope = Envelope::command_error(&Command::Thing(command), &error);
    assert_eq!(
        envelope.topic.to_string(),
        "org.acme/sensor-1/things/twin/errors"
    );
    assert_eq!(envelope.path, "/");
    assert_eq!(envelope.status, Some(403));
    assert_eq!(envelope.value, Some(error.to_json()));
    assert_eq!(envelope.headers["correlation-id"], json!("c9"));
    assert_eq!(Envelope::parse(&envelope.to_bytes()).unwrap(), envelope);

    let unknown = Envelope::error(None, &DittoError::json_invalid("bad"), None);
    assert_eq!(unknown.topic.to_string(), "_/_/things/twin/errors");
    assert!(unknown.headers.is_empty());
    let policy = Envelope::error(
        Some(&Topic::parse("org.acme/p/policies/commands/modify").unwrap()),
        &DittoError::json_invalid("bad"),
        Some("c"),
    );
    assert_eq!(policy.topic.to_string(), "org.acme/p/policies/errors");
}

#[test]
fn what_the_server_sends_is_refused_as_a_client_request() {
    let refused = |json: Value| parse(json).unwrap().into_request().unwrap_err();
    let event = refused(
        json!({"topic": "org.acme/x/things/twin/events/modified", "path": "/", "value": {}}),
    );
    assert_eq!(
        event.message,
        "`events` topics are sent by the server to clients, never published by them"
    );
    let error =
        refused(json!({"topic": "org.acme/x/things/twin/errors", "path": "/", "status": 400}));
    assert!(
        error.message.starts_with("`errors` topics"),
        "{}",
        error.message
    );
    let response = refused(
        json!({"topic": "org.acme/x/things/twin/commands/modify", "path": "/attributes", "value": 1, "status": 204}),
    );
    assert!(
        response
            .message
            .starts_with("responses to commands are not supported"),
        "{}",
        response.message
    );
    let live = refused(
        json!({"topic": "org.acme/x/things/live/commands/modify", "path": "/attributes", "value": 1}),
    );
    assert!(
        live.message
            .starts_with("live commands and live events are not supported"),
        "{}",
        live.message
    );
    for error in [event, error, response, live] {
        assert_eq!(
            (error.status, error.error),
            (400, "things.protocol.adapter:unknown.topicpath")
        );
    }
}

#[test]
fn live_message_envelopes_become_messages_authorized_on_their_resource() {
    let cases = [
        (
            "/inbox/messages/reboot",
            MessageDirection::Inbox,
            None,
            "message:/inbox/messages/reboot",
        ),
        (
            "/outbox/messages/reboot",
            MessageDirection::Outbox,
            None,
            "message:/outbox/messages/reboot",
        ),
        (
            "/features/lamp/inbox/messages/reboot",
            MessageDirection::Inbox,
            Some("lamp"),
            "message:/features/lamp/inbox/messages/reboot",
        ),
        (
            "/features/lamp/outbox/messages/reboot",
            MessageDirection::Outbox,
            Some("lamp"),
            "message:/features/lamp/outbox/messages/reboot",
        ),
    ];
    for (path, direction, feature, resource) in cases {
        let request = parse(json!({
            "topic": "org.acme/sensor-1/things/live/messages/reboot",
            "path": path,
            "value": {"delay": 5},
            "headers": {"content-type": "application/json", "correlation-id": "m1", "response-required": "true", "timeout": "10"}
        }))
        .unwrap()
        .into_request()
        .unwrap();
        let Request::Message(message) = request else {
            panic!("{path}: not a message")
        };
        assert_eq!(message.thing_id, thing());
        assert_eq!(message.direction, direction, "{path}");
        assert_eq!(message.feature_id.as_deref(), feature, "{path}");
        assert_eq!(message.subject, "reboot");
        assert_eq!(message.payload, Some(json!({"delay": 5})));
        assert_eq!(
            message.headers.content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(message.headers.correlation_id.as_deref(), Some("m1"));
        assert_eq!(message.headers.response_required, Some(true));
        assert_eq!(message.headers.other["timeout"], json!("10"));
        assert_eq!(message.path(), path);
        assert_eq!(message.resource(), resource);
    }
}

#[test]
fn a_message_path_must_be_a_message_path_naming_the_topics_subject() {
    for (path, message) in [
        (
            "/inbox/messages/other",
            "field `path` names the subject `other` but the topic names `reboot`",
        ),
        (
            "/inbox/reboot",
            "field `path` `/inbox/reboot` is not a message path",
        ),
        (
            "/sideways/messages/reboot",
            "field `path` `/sideways/messages/reboot` is not a message path",
        ),
        (
            "/features/lamp/messages/reboot",
            "field `path` `/features/lamp/messages/reboot` is not a message path",
        ),
        (
            "/attributes/a",
            "field `path` `/attributes/a` is not a message path",
        ),
    ] {
        let error =
            parse(json!({"topic": "org.acme/sensor-1/things/live/messages/reboot", "path": path}))
                .unwrap()
                .into_request()
                .unwrap_err();
        assert_eq!(error.error, "things:json.invalid", "{path}");
        assert!(
            error.message.starts_with(message),
            "{path}: {}",
            error.message
        );
    }
    let not_a_command = parse(json!({"topic": "org.acme/sensor-1/things/live/messages/reboot", "path": "/inbox/messages/reboot"}))
        .unwrap()
        .into_command()
        .unwrap_err();
    assert_eq!(not_a_command.status, 400);
}

#[test]
fn live_messages_round_trip_through_envelopes_and_encode_tilde() {
    let mut message = LiveMessage::new(
        thing(),
        MessageDirection::Outbox,
        Some("la~mp".into()),
        "alarm~1",
    );
    message.payload = Some(json!("smoke"));
    message.status = Some(200);
    message.headers.content_type = Some("text/plain".into());
    message.headers.correlation_id = Some("m2".into());
    message.headers.response_required = Some(false);
    message.headers.other.insert("x-extra".into(), json!(1));
    assert_eq!(message.path(), "/features/la~0mp/outbox/messages/alarm~01");
    assert_eq!(
        message.resource(),
        "message:/features/la~0mp/outbox/messages/alarm~01"
    );
    let envelope = message.to_envelope().unwrap();
    assert_eq!(
        envelope.topic.to_string(),
        "org.acme/sensor-1/things/live/messages/alarm~1"
    );
    let Request::Message(back) = Envelope::parse(&envelope.to_bytes())
        .unwrap()
        .into_request()
        .unwrap()
    else {
        panic!("not a message")
    };
    assert_eq!(back, message);
    let mut bad = LiveMessage::new(thing(), MessageDirection::Inbox, None, "a/b");
    assert!(bad.to_envelope().is_err());
    bad.subject = "ok".into();
    bad.feature_id = Some("x#".into());
    assert!(bad.to_envelope().is_err());
}

#[test]
fn quotes_and_control_characters_are_escaped_in_the_json_text() {
    let id = ThingId::parse("org.acme:we\"ird\\name").unwrap();
    let mut command = ThingCommand {
        thing_id: id,
        action: Action::Modify,
        path: ThingPath::parse("/attributes/q\"uote").unwrap(),
        value: Some(json!("line\nbreak")),
        headers: CommandHeaders::default(),
    };
    command
        .headers
        .other
        .insert("x-\"h\"".into(), json!("\u{1}"));
    let command = Command::Thing(command);
    let envelope = Envelope::from_command(&command);
    let back = Envelope::parse(&envelope.to_bytes()).unwrap();
    assert_eq!(back.into_command().unwrap(), command);
}
