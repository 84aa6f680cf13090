#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! MQTT over WebSockets (`/mqtt` on the HTTP listener, subprotocol `mqtt`) against the real
//! `thingsgate serve`: Eclipse Paho for Python over its websocket transport, and a tungstenite
//! client carrying packets of the broker's codec, next to TCP clients on the same broker. The
//! same handshake, admission limits and shutdown as TCP; what only WebSockets have (messages
//! that split or join packets, pings, text frames, the subprotocol) is checked here too.

use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use broker::mqtt::codec::{ConnAck, Connect, Packet, Protocol, QoS, decode};
use bytes::{Bytes, BytesMut};
use e2e::broker::{Broker, Solution};
use e2e::protocol_support::{BOTH, QUIET, connected, login, puback, publish, qos1};
use e2e::raw::{NET_TIMEOUT, RawClient, Received, connect_packet, subscribe_packet, with_login};
use e2e::workspace_root;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest the Paho client process may run.
const PROCESS_LIMIT: Duration = Duration::from_secs(45);

/// A started broker (`[mqtt]` config `config`) with an HTTP listener and one solution in
/// `org.acme`; the HTTP listener's address.
fn started(config: &str) -> (Broker, Solution, SocketAddr) {
    let mut broker = Broker::new();
    broker.write_config(config);
    let solution = broker.create_solution("org.acme");
    broker.arg("--http").arg("127.0.0.1:0");
    broker.start();
    let http = broker
        .stdout_lines()
        .iter()
        .find_map(|line| line.strip_prefix("http listening on ")?.parse().ok())
        .expect("`http listening on ADDR` before `ready`");
    (broker, solution, http)
}

/// One WebSocket connection to `/mqtt` speaking `protocol`, one binary message per packet sent.
struct WsClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    buf: BytesMut,
    protocol: Protocol,
    /// The close frame the server sent, once it did.
    close: Option<CloseFrame>,
}

/// Upgrades `GET /mqtt`, offering `subprotocols` (none: no `Sec-WebSocket-Protocol` header).
async fn upgrade(
    http: SocketAddr,
    subprotocols: Option<&'static str>,
) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, WsError> {
    let mut request = format!("ws://{http}/mqtt").into_client_request().unwrap();
    if let Some(offered) = subprotocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(offered));
    }
    let (ws, response) =
        tokio::time::timeout(NET_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .expect("WebSocket upgrade timed out")?;
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol"),
        Some(&HeaderValue::from_static("mqtt")),
        "the server must select subprotocol `mqtt`"
    );
    Ok(ws)
}

/// The HTTP status of a refused upgrade.
async fn refused_upgrade(http: SocketAddr, subprotocols: Option<&'static str>) -> StatusCode {
    match upgrade(http, subprotocols).await {
        Err(WsError::Http(response)) => response.status(),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

impl WsClient {
    /// Upgrades with subprotocol `mqtt` (nothing sent yet).
    async fn open(http: SocketAddr, protocol: Protocol) -> Self {
        let ws = upgrade(http, Some("mqtt"))
            .await
            .unwrap_or_else(|e| panic!("WebSocket upgrade at {http}/mqtt: {e}"));
        WsClient {
            ws,
            buf: BytesMut::new(),
            protocol,
            close: None,
        }
    }

    /// Opens, sends `connect` and returns the CONNACK (the caller checks its code).
    async fn connect(http: SocketAddr, connect: Connect) -> (Self, ConnAck) {
        let mut client = Self::open(http, connect.protocol).await;
        client.send(&Packet::Connect(Box::new(connect))).await;
        match client.recv_within(NET_TIMEOUT).await {
            Received::Packet(Packet::ConnAck(ack)) => (client, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects with the solution's credentials and asserts success.
    async fn connected(http: SocketAddr, protocol: Protocol, id: &str, s: &Solution) -> Self {
        let (client, ack) = Self::connect(http, login(protocol, id, s)).await;
        assert_eq!(
            ack.code, 0,
            "CONNECT of `{id}` over WebSockets refused: {ack:?}"
        );
        client
    }

    fn encode(&self, packet: &Packet) -> Vec<u8> {
        let mut out = BytesMut::new();
        packet.encode(self.protocol, &mut out).unwrap();
        out.to_vec()
    }

    /// Sends `packet` as one binary message.
    async fn send(&mut self, packet: &Packet) {
        let bytes = self.encode(packet);
        self.send_message(Message::Binary(bytes.into())).await;
    }

    async fn send_message(&mut self, message: Message) {
        tokio::time::timeout(NET_TIMEOUT, self.ws.send(message))
            .await
            .expect("WebSocket send timed out")
            .expect("WebSocket send failed");
    }

    /// The next packet (binary messages joined), or that the server closed (its close frame
    /// kept in `close`), or [`Received::Silent`] after `limit`.
    async fn recv_within(&mut self, limit: Duration) -> Received {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match decode(&mut self.buf, self.protocol, usize::MAX >> 4) {
                Ok(Some(packet)) => return Received::Packet(packet),
                Ok(None) => {}
                Err(e) => panic!("the server sent a packet our codec refuses: {e}"),
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Received::Silent,
                Ok(Some(Ok(Message::Binary(data)))) => self.buf.extend_from_slice(&data),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    self.close = frame;
                    return Received::Closed;
                }
                Ok(Some(Ok(Message::Text(text)))) => panic!("the server sent a text frame: {text}"),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => return Received::Closed,
            }
        }
    }

    async fn recv(&mut self) -> Packet {
        match self.recv_within(NET_TIMEOUT).await {
            Received::Packet(packet) => packet,
            other => panic!("expected a packet over WebSockets, got {other:?}"),
        }
    }

    /// PINGREQ → PINGRESP.
    async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    /// Asserts that the server closes the WebSocket, after at most a DISCONNECT: that
    /// DISCONNECT's reason code and the WebSocket close code.
    async fn closed(&mut self) -> (Option<u8>, Option<CloseCode>) {
        let mut disconnect = None;
        loop {
            match self.recv_within(NET_TIMEOUT).await {
                Received::Closed => return (disconnect, self.close.as_ref().map(|f| f.code)),
                Received::Packet(Packet::Disconnect(d)) if disconnect.is_none() => {
                    disconnect = Some(d.reason);
                }
                other => panic!("expected the connection to close, got {other:?}"),
            }
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `tests/python/paho_client.py --transport websockets --port HTTP ARGS` (killed after
/// [`PROCESS_LIMIT`]).
fn paho_over_websockets(http: SocketAddr, args: &[&str]) -> Output {
    let out = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .output()
        .expect("python3 runs: apt-get install python3");
    assert!(
        out.status.success(),
        "Python's paho-mqtt is missing: install it with `pip install 'paho-mqtt>=2,<3'`\n{}",
        text(&out.stderr)
    );
    let mut command = Command::new("python3");
    command
        .arg(workspace_root().join("tests/python/paho_client.py"))
        .args(["--transport", "websockets", "--ws-path", "/mqtt"])
        // Each of the script's waits; generous, as a CI machine may be loaded (seen: a wait
        // of the default 10 s ran out once while three test binaries ran in parallel).
        .args(["--timeout", "20"])
        .args(["--port", &http.port().to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let described = format!("{command:?}");
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{described}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PROCESS_LIMIT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{described}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{described} did not finish within {PROCESS_LIMIT:?}");
        }
    }
}

#[test]
fn paho_mqtt_over_websockets_subscribes_and_receives_what_it_publishes_at_qos_0_and_1() {
    let (_broker, s, http) = started("");
    for protocol in ["311", "5"] {
        let topic = format!("e2e/paho-ws-{protocol}/temp");
        let client_id = format!("paho-ws-{protocol}");
        let out = paho_over_websockets(
            http,
            &[
                "--protocol",
                protocol,
                "--client-id",
                &client_id,
                "--username",
                &s.id,
                &format!("--password={}", s.secret),
                "--topic",
                &topic,
                "--qos",
                "0",
                "--qos",
                "1",
            ],
        );
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "paho over WebSockets, MQTT {protocol} ({}):\n{stdout}\n{}",
            out.status,
            text(&out.stderr)
        );
        for qos in [0, 1] {
            assert!(
                stdout.contains(&format!("received {topic} 21.5 qos={qos}")),
                "{stdout}"
            );
        }
        assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
    }
}

#[test]
fn paho_mqtt_over_websockets_with_a_wrong_password_gets_a_refusing_connack() {
    let (_broker, s, http) = started("");
    for protocol in ["311", "5"] {
        let out = paho_over_websockets(
            http,
            &[
                "--protocol",
                protocol,
                "--client-id",
                "paho-ws-wrong",
                "--username",
                &s.id,
                "--password=not-the-secret",
                // 3.1.1 return code 4 and 5.0 reason 0x86 both read as 134 in paho.
                "--expect-refused",
                "134",
            ],
        );
        assert!(
            out.status.success(),
            "MQTT {protocol}: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[tokio::test]
async fn a_bad_credential_is_refused_by_connack_over_websockets_then_closed() {
    let (_broker, s, http) = started("");
    for protocol in BOTH {
        let connect = with_login(
            connect_packet(protocol, "ws-wrong"),
            Some(&s.id),
            Some("not-the-secret"),
        );
        let (mut client, ack) = WsClient::connect(http, connect).await;
        let expected = match protocol {
            Protocol::V311 => 4,
            Protocol::V5 => 0x86,
        };
        assert_eq!(ack.code, expected, "{protocol:?}: {ack:?}");
        let (_, code) = client.closed().await;
        assert_eq!(code, Some(CloseCode::Normal), "{protocol:?}");
    }
}

#[tokio::test]
async fn a_websocket_client_and_a_tcp_client_exchange_messages_both_ways() {
    let (broker, s, http) = started("");
    let mut ws = WsClient::connected(http, Protocol::V5, "dashboard", &s).await;
    let mut tcp = connected(broker.mqtt_addr(), Protocol::V311, "device", &s).await;
    ws.send(&subscribe_packet(1, "e2e/device/#", QoS::AtLeastOnce))
        .await;
    assert!(matches!(ws.recv().await, Packet::SubAck(_)));
    tcp.send(&subscribe_packet(1, "e2e/dashboard/#", QoS::AtLeastOnce))
        .await;
    assert!(matches!(tcp.recv().await, Packet::SubAck(_)));

    // Device → dashboard, QoS 1.
    tcp.send(&Packet::Publish(publish(
        "e2e/device/temp",
        b"21.5",
        qos1(2),
    )))
    .await;
    assert!(matches!(tcp.recv().await, Packet::PubAck(a) if a.packet_id.get() == 2));
    match ws.recv().await {
        Packet::Publish(p) => {
            assert_eq!(p.topic.as_str(), "e2e/device/temp");
            assert_eq!(&p.payload[..], b"21.5");
            let id = p.qos.packet_id().expect("QoS 1 has a packet identifier");
            ws.send(&puback(id.get())).await;
        }
        other => panic!("expected the device's PUBLISH, got {other:?}"),
    }

    // Dashboard → device, QoS 1 and QoS 0.
    ws.send(&Packet::Publish(publish(
        "e2e/dashboard/set",
        b"on",
        qos1(3),
    )))
    .await;
    assert!(matches!(ws.recv().await, Packet::PubAck(a) if a.packet_id.get() == 3));
    match tcp.recv().await {
        Packet::Publish(p) => {
            assert_eq!(p.topic.as_str(), "e2e/dashboard/set");
            assert_eq!(&p.payload[..], b"on");
            let id = p.qos.packet_id().expect("QoS 1 has a packet identifier");
            tcp.send(&puback(id.get())).await;
        }
        other => panic!("expected the dashboard's PUBLISH, got {other:?}"),
    }
    ws.send(&Packet::Publish(publish(
        "e2e/dashboard/set",
        b"off",
        broker::mqtt::codec::QosPid::AtMostOnce,
    )))
    .await;
    match tcp.recv().await {
        Packet::Publish(p) => assert_eq!(&p.payload[..], b"off"),
        other => panic!("expected the dashboard's QoS 0 PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn packets_split_across_messages_and_packets_sharing_a_message_are_read_and_pings_answered() {
    let (_broker, s, http) = started("");
    let mut ws = WsClient::open(http, Protocol::V5).await;
    // The CONNECT in three messages, cut inside its fixed header and inside its payload.
    let connect = ws.encode(&Packet::Connect(Box::new(login(Protocol::V5, "split", &s))));
    let (a, rest) = connect.split_at(1);
    let (b, c) = rest.split_at(rest.len() / 2);
    for part in [a, b, c] {
        ws.send_message(Message::Binary(Bytes::copy_from_slice(part)))
            .await;
    }
    match ws.recv().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, 0, "{ack:?}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // A WebSocket ping between MQTT packets is answered with a pong.
    ws.send_message(Message::Ping(Bytes::from_static(b"are you there")))
        .await;
    let pong = tokio::time::timeout(NET_TIMEOUT, ws.ws.next())
        .await
        .expect("no pong within the timeout");
    let Some(Ok(Message::Pong(pong))) = pong else {
        panic!("expected a pong, got {pong:?}");
    };
    assert_eq!(&pong[..], b"are you there");
    // SUBSCRIBE and a PUBLISH to the same topic in one message, then an empty message.
    let mut both = ws.encode(&subscribe_packet(1, "e2e/split/#", QoS::AtLeastOnce));
    both.extend(ws.encode(&Packet::Publish(publish("e2e/split/x", b"joined", qos1(2)))));
    ws.send_message(Message::Binary(both.into())).await;
    ws.send_message(Message::Binary(Bytes::new())).await;
    let mut seen = (false, false, false);
    while seen != (true, true, true) {
        match ws.recv().await {
            Packet::SubAck(_) => seen.0 = true,
            Packet::PubAck(a) if a.packet_id.get() == 2 => seen.1 = true,
            Packet::Publish(p) if &p.payload[..] == b"joined" => seen.2 = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    ws.ping().await;
}

#[tokio::test]
async fn an_upgrade_without_the_mqtt_subprotocol_is_refused() {
    let (_broker, _s, http) = started("");
    assert_eq!(refused_upgrade(http, None).await, StatusCode::BAD_REQUEST);
    assert_eq!(
        refused_upgrade(http, Some("graphql-ws, wamp")).await,
        StatusCode::BAD_REQUEST
    );
    // `mqtt` among others is chosen.
    let ws = upgrade(http, Some("wamp, mqtt")).await;
    assert!(ws.is_ok(), "{:?}", ws.err());
}

#[tokio::test]
async fn garbage_or_a_text_frame_closes_only_that_connection() {
    let (broker, s, http) = started("");
    let mut bystander = WsClient::connected(http, Protocol::V5, "bystander", &s).await;
    let mut device = connected(broker.mqtt_addr(), Protocol::V311, "device", &s).await;

    // A reserved packet type (0) in a binary message: v5 DISCONNECT with a reason ≥ 0x80, then
    // the WebSocket close.
    let mut garbage = WsClient::connected(http, Protocol::V5, "garbage", &s).await;
    garbage
        .send_message(Message::Binary(Bytes::from_static(&[
            0x00, 0x02, 0xde, 0xad,
        ])))
        .await;
    let (disconnect, _) = garbage.closed().await;
    assert!(
        disconnect.is_some_and(|reason| reason >= 0x80),
        "expected a DISCONNECT with an error reason, got {disconnect:?}"
    );

    // Garbage instead of a CONNECT: closed too.
    let mut early = WsClient::open(http, Protocol::V5).await;
    early
        .send_message(Message::Binary(Bytes::from_static(
            b"GET / HTTP/1.1\r\n\r\n",
        )))
        .await;
    early.closed().await;

    // A text frame (MQTT-6.0.0-1): closed with 1003 (unsupported data).
    let mut texter = WsClient::connected(http, Protocol::V311, "texter", &s).await;
    texter.send_message(Message::text("hello")).await;
    let (_, code) = texter.closed().await;
    assert_eq!(code, Some(CloseCode::Unsupported));

    // The others are untouched.
    bystander.ping().await;
    device.ping().await;
    assert!(matches!(
        bystander.recv_within(QUIET).await,
        Received::Silent
    ));
}

#[tokio::test]
async fn websocket_connections_take_the_same_handshake_and_connection_slots_as_tcp() {
    let (broker, s, http) =
        started("[mqtt]\nmax_handshakes_per_address = 1\nmax_connections = 1\n");
    // An upgraded socket without a CONNECT yet holds 127.0.0.1's only handshake slot.
    let mut first = WsClient::open(http, Protocol::V5).await;
    assert_eq!(
        refused_upgrade(http, Some("mqtt")).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let mut tcp = RawClient::open(broker.mqtt_addr(), Protocol::V5).await;
    assert!(
        matches!(tcp.recv_within(NET_TIMEOUT).await, Received::Closed),
        "a TCP socket from the same address is closed at once"
    );
    // Its CONNECT takes the only connection slot and gives the handshake slot back.
    first
        .send(&Packet::Connect(Box::new(login(Protocol::V5, "first", &s))))
        .await;
    assert!(matches!(first.recv().await, Packet::ConnAck(a) if a.code == 0));
    first.ping().await;
    // Now a TCP client gets through the handshake and is told the server is busy, and so is
    // a second WebSocket client.
    let (_tcp, ack) = RawClient::connect(broker.mqtt_addr(), login(Protocol::V5, "tcp", &s)).await;
    assert_eq!(ack.code, 0x89, "{ack:?}");
    let (_ws, ack) = WsClient::connect(http, login(Protocol::V311, "second", &s)).await;
    assert_eq!(ack.code, 3, "{ack:?}");
}

#[tokio::test]
async fn graceful_shutdown_sends_disconnect_0x8b_then_closes_the_websocket() {
    let (mut broker, s, http) = started("");
    let mut ws = WsClient::connected(http, Protocol::V5, "dashboard", &s).await;
    ws.ping().await;
    let stop = tokio::task::spawn_blocking(move || {
        let status = broker.stop();
        (broker, status)
    });
    let (disconnect, code) = ws.closed().await;
    assert_eq!(disconnect, Some(0x8B), "v5 DISCONNECT server shutting down");
    assert_eq!(code, Some(CloseCode::Normal));
    let (broker, status) = stop.await.unwrap();
    assert!(status.success(), "{status}\n{}", broker.logs());
}

#[tokio::test]
async fn a_message_bigger_than_the_packet_limit_closes_that_connection_with_1009() {
    let (_broker, s, http) = started("[mqtt]\nmax_packet_size = 1024\n");
    let mut bystander = WsClient::connected(http, Protocol::V311, "bystander", &s).await;
    let mut big = WsClient::connected(http, Protocol::V311, "big", &s).await;
    // Refused from the frame header: the broker never buffers the 64 KiB.
    big.send_message(Message::Binary(Bytes::from(vec![0x30; 64 * 1024])))
        .await;
    let (_, code) = big.closed().await;
    assert_eq!(
        code,
        Some(CloseCode::Size),
        "close code 1009: message too big"
    );
    bystander.ping().await;
}
