//! Fuzzes the compact MQTT topic form of the Ditto protocol (`twin::protocol::mqtt`).
//!
//! The input, when it is UTF-8, is an MQTT topic name: `is_twin_topic` and `parse_mqtt_topic`
//! run on it. Property: no input may make any of this panic, and for every accepted topic
//! - `is_twin_topic` is true (every twin topic belongs to the twin topic space);
//! - `namespace`, `name` and `ditto_topic` are `Some` except for `ditto/commands` (documented
//!   invariant of `MqttTopic::ditto_topic`), and the Ditto topic reads back from its text;
//! - `mqtt_request`, `mqtt_command` and `mqtt_message` run with a few small payloads, and agree:
//!   a command is what `mqtt_command` returns, a live message what `mqtt_message` returns.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twin::protocol::mqtt::{
    MqttTopic, is_twin_topic, mqtt_command, mqtt_message, mqtt_request, parse_mqtt_topic,
};
use twin::protocol::{Request, Topic};

const PAYLOADS: &[&[u8]] = &[
    b"",
    b"{\"on\":true,\"level\":3}",
    b"42",
    b"null",
    b"plain text",
    b"\xff\xfe",
    br#"{"topic":"org.acme/lamp/things/twin/commands/modify","path":"/attributes/x","value":1}"#,
];

fuzz_target!(|data: &[u8]| {
    let Ok(topic) = std::str::from_utf8(data) else {
        return;
    };
    let twin_space = is_twin_topic(topic);
    let Ok(parsed) = parse_mqtt_topic(topic) else {
        return;
    };
    assert!(
        twin_space,
        "parse_mqtt_topic accepted {topic:?} ({parsed:?}) but is_twin_topic is false"
    );

    match parsed {
        MqttTopic::Envelope => {
            assert_eq!(parsed.namespace(), None);
            assert_eq!(parsed.name(), None);
            assert_eq!(parsed.ditto_topic(), None);
        }
        _ => {
            assert!(parsed.namespace().is_some(), "{topic:?}: no namespace");
            assert!(parsed.name().is_some(), "{topic:?}: no name");
            let Some(ditto) = parsed.ditto_topic() else {
                panic!("{topic:?} ({parsed:?}) was accepted but has no Ditto topic");
            };
            let text = ditto.to_string();
            match Topic::parse(&text) {
                Ok(again) => assert_eq!(
                    again, ditto,
                    "Ditto topic {text:?} of {topic:?} reads back differently"
                ),
                Err(e) => panic!("Ditto topic {text:?} of {topic:?} does not parse: {e}"),
            }
        }
    }

    for payload in PAYLOADS {
        let request = mqtt_request(&parsed, payload);
        let command = mqtt_command(&parsed, payload);
        let message = mqtt_message(&parsed, payload);
        match request {
            Ok(Request::Command(c)) => {
                assert_eq!(command.as_ref().ok(), Some(&c), "{topic:?}: mqtt_command disagrees");
                assert!(message.is_err(), "{topic:?}: a command is also a message");
            }
            Ok(Request::Message(m)) => {
                assert_eq!(message.as_ref().ok(), Some(&m), "{topic:?}: mqtt_message disagrees");
                assert!(command.is_err(), "{topic:?}: a message is also a command");
            }
            Err(_) => {
                assert!(command.is_err() && message.is_err(), "{topic:?}: request failed but not all");
            }
        }
    }
});
