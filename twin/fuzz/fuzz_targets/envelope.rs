//! Fuzzes the Ditto protocol envelope (`twin::protocol::envelope`).
//!
//! Bytes → `Envelope::parse` → `into_request`. Property: no input may make any of this panic,
//! and for every envelope `parse` accepts
//! - `from_json(to_json(e)) == e` (the JSON value round trip);
//! - `to_bytes(e)` is the same JSON as serde_json's text of `to_json(e)`, and reads back like it
//!   (not necessarily to `e` itself: see below);
//! - `into_request` either refuses it or yields a command or a message; a command's envelope
//!   (`from_command`) and a message's (`to_envelope`) are built and written too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use twin::protocol::{Envelope, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::parse(data) else {
        return;
    };

    let json = envelope.to_json();
    match Envelope::from_json(json.clone()) {
        Ok(again) => assert_eq!(again, envelope, "to_json → from_json changed it; JSON: {json}"),
        Err(e) => panic!("from_json refuses to_json's output: {e:?}\nJSON: {json}"),
    }

    // The text writer (`to_bytes`) must write the same JSON as serde_json writes for
    // `to_json`, and what it writes must read back. Both texts are compared after parsing them
    // the same way, not against the envelope itself: serde_json's default float parser is not
    // correctly rounded (no `float_roundtrip` feature), so a number written in its shortest
    // form may read back one ULP off (found by this target, see README.md).
    let bytes = envelope.to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    let again = match Envelope::parse(&bytes) {
        Ok(again) => again,
        Err(e) => panic!("parse refuses to_bytes's output: {e:?}\ntext: {text}"),
    };
    let ours: Value = serde_json::from_slice(&bytes).expect("to_bytes writes JSON");
    let theirs: Value = serde_json::from_str(&json.to_string()).expect("serde_json writes JSON");
    assert_eq!(ours, theirs, "to_bytes and to_json disagree; to_bytes: {text}\nto_json: {json}");
    match Envelope::from_json(theirs) {
        Ok(expected) => assert_eq!(again, expected, "to_bytes → parse differs; text: {text}"),
        Err(e) => panic!("serde_json's text of to_json does not read back: {e:?}\nJSON: {json}"),
    }

    let _ = envelope.is_response();
    match envelope.into_request() {
        Ok(Request::Command(command)) => {
            let _ = Envelope::from_command(&command).to_bytes();
        }
        Ok(Request::Message(message)) => {
            let _ = message.to_envelope().map(|e| e.to_bytes());
        }
        Err(_) => {}
    }
});
