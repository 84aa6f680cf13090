#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Log injection (CWE-117): values a client chooses — client ID, user name, topic, the protocol
//! name of a CONNECT, bytes of a malformed packet — reach the log escaped, in the text and in the
//! JSON format: one line per event, no raw newline, carriage return or terminal escape, no line
//! a client wrote.

use std::time::Duration;

use broker::mqtt::codec::Protocol;
use bytes::{BufMut, BytesMut};
use e2e::broker::{Broker, Solution};
use e2e::raw::{RawClient, connect_packet, publish_packet, with_login};

/// What an attacker puts in a field: a line break followed by a forged log line (with and
/// without a timestamp), a terminal escape, a carriage return and a bidi override.
const FORGED: &str =
    "x\nFORGED ERROR injected\r\n1999-01-01T00:00:00.000000Z ERROR forged: pwned\u{1b}[2J\u{202e}";

/// A CONNECT whose protocol name is `name` (level 4), client ID `c`.
fn connect_with_protocol_name(name: &[u8]) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_u16(u16::try_from(name.len()).unwrap());
    body.put_slice(name);
    body.put_u8(4); // level
    body.put_u8(0x02); // clean session
    body.put_u16(0); // keep-alive
    body.put_u16(1);
    body.put_u8(b'c');
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend_from_slice(&body);
    packet
}

/// Drives every field a client chooses into the log of `broker`.
async fn inject(broker: &Broker, solution: &Solution) {
    let addr = broker.mqtt_addr();
    // An authenticated client whose client ID forges lines, then a malformed packet: the INFO
    // line "closing the connection: bad packet" names the client.
    let connect = with_login(
        connect_packet(Protocol::V311, FORGED),
        Some(&solution.id),
        Some(&solution.secret),
    );
    let (mut client, ack) = RawClient::connect(addr, connect).await;
    assert_eq!(ack.code, 0);
    // A denied publish on a topic that forges lines (debug), then a packet with a reserved
    // type: bad packet.
    client
        .send(&publish_packet(&format!("t/{FORGED}"), b"1", None))
        .await;
    client.send_bytes(&[0xF0, 0x00]).await;
    // A wrong password with a user name that forges lines.
    let connect = with_login(
        connect_packet(Protocol::V5, "c2"),
        Some(FORGED),
        Some("not-the-secret"),
    );
    let _ = RawClient::connect(addr, connect).await;
    // A protocol name that forges lines, and one with invalid UTF-8 and an escape.
    for name in [FORGED.as_bytes(), b"MQ\xff\xfe\x1b[31m\nTT".as_slice()] {
        let mut raw = RawClient::open(addr, Protocol::V311).await;
        raw.send_bytes(&connect_with_protocol_name(name)).await;
        let _ = raw.recv_within(Duration::from_secs(2)).await;
    }
    // A client ID with invalid UTF-8.
    let mut raw = RawClient::open(addr, Protocol::V311).await;
    let mut bad_id = connect_with_protocol_name(b"MQTT");
    let at = bad_id.len() - 1;
    bad_id[at] = 0xff;
    raw.send_bytes(&bad_id).await;
    let _ = raw.recv_within(Duration::from_secs(2)).await;
}

/// The log so far, after the server had time to write it.
async fn settled_logs(broker: &Broker, expected: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = broker.logs();
        if logs.contains(expected) || tokio::time::Instant::now() > deadline {
            return logs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// No control character (newline, carriage return, escape, …) inside a line; in the text format
/// also no Unicode line separator or bidirectional override (JSON strings may hold those: a
/// JSON reader does not take them for line ends).
fn assert_no_raw_control_characters(logs: &str, text_format: bool) {
    for (i, line) in logs.lines().enumerate() {
        let bad: Vec<char> = line
            .chars()
            .filter(|&c| {
                c.is_control() || (text_format && matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}'))
            })
            .collect();
        assert!(
            bad.is_empty(),
            "line {i} holds raw control characters {bad:?}: {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_values_cannot_forge_text_log_lines() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.env("THINGSGATE_LOG", "debug").start();
    inject(&broker, &solution).await;
    let logs = settled_logs(&broker, "closing the connection: bad packet").await;
    assert!(
        logs.contains("closing the connection: bad packet"),
        "the bad packet was logged:\n{logs}"
    );
    assert!(logs.contains("refused a bad CONNECT"), "{logs}");
    assert_no_raw_control_characters(&logs, true);
    for line in logs.lines() {
        // Every line is one event: it starts with the timestamp the server wrote (this year,
        // not the forged one) and a level.
        let event = line.len() > 28
            && line.as_bytes()[4] == b'-'
            && line.as_bytes()[10] == b'T'
            && !line.starts_with("1999-");
        assert!(event, "a line that is no event of the server: {line:?}");
    }
    assert!(!logs.contains("\nFORGED"), "{logs}");
    // The forged text is there, escaped, inside the line of its event.
    assert!(
        logs.contains(r"x\u{a}FORGED ERROR injected\u{d}\u{a}1999-"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_values_cannot_forge_json_log_lines() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker
        .env("THINGSGATE_LOG", "debug")
        .env("THINGSGATE_LOG_FORMAT", "json")
        .start();
    inject(&broker, &solution).await;
    let logs = settled_logs(&broker, "closing the connection: bad packet").await;
    assert!(
        logs.contains("closing the connection: bad packet"),
        "{logs}"
    );
    assert_no_raw_control_characters(&logs, false);
    for line in logs.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a line that is not one JSON event ({e}): {line:?}"));
        assert!(event["level"].is_string(), "{line}");
    }
}

#[test]
fn an_unknown_log_format_is_refused_by_name() {
    let broker = Broker::new();
    let mut child = std::process::Command::new(e2e::thingsgate_bin())
        .args(["serve", "--data"])
        .arg(broker.data())
        .args(["--mqtt", "127.0.0.1:0"])
        .env("THINGSGATE_LOG_FORMAT", "xml")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`serve` with an unknown log format did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(2));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("THINGSGATE_LOG_FORMAT is `xml`: expected `text` or `json`"),
        "{stderr}"
    );
}
