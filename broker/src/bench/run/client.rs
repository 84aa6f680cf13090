//! One MQTT connection of the generator, on the broker's own codec: opened from a chosen local
//! address with every step bounded, PUBLISH packets encoded once and patched per message, the
//! payload's stamp, and why things fail (`Failure`, counted by kind in the report).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::mqtt::codec::{
    self, CodecError, ConnAck, Connect, Packet, Properties, Protocol, PubResponse, Publish, QoS,
    QosPid, TopicName, Utf8Str,
};

/// How long a TCP connect, and then the CONNACK (or SUBACK), may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The keep-alive a connection asks for; it pings when idle for half of it.
const KEEP_ALIVE_SECS: u16 = 60;
/// The largest packet accepted from the broker.
const MAX_PACKET: usize = 4 << 20;
/// Room kept free in a read buffer, so that a busy reader is not held to tiny reads.
const READ_ROOM: usize = 64 * 1024;

/// Why something failed; the report counts them by [`Failure::kind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// The TCP connect failed (refused, unreachable, …).
    TcpConnect(std::io::ErrorKind),
    /// No local port left on a source address (use more `--source-addresses`).
    NoLocalPort,
    /// TCP connect or CONNACK did not come within [`CONNECT_TIMEOUT`].
    ConnectTimeout,
    /// CONNACK with a refusal code (3.1.1 return code or 5.0 reason code).
    ConnAck { code: u8, protocol: Protocol },
    /// SUBACK refused the filter, or did not come in time.
    SubAck(Option<u8>),
    /// The broker closed the connection (EOF or reset) while it was in use.
    Closed,
    /// The broker sent DISCONNECT (5.0) with this reason.
    Disconnect(u8),
    /// A packet our codec refuses, or one that makes no sense here.
    Protocol(String),
    /// Writing to or reading from the socket failed.
    Io(std::io::ErrorKind),
    /// PUBACK or PUBREC with a reason code of 0x80 or above.
    PublishRefused(u8),
    /// QoS 1/2 PUBLISHes still unacknowledged when the drain ended.
    Unacknowledged,
    /// The closed loop waited too long for deliveries; the device's window was written off
    /// (the messages are counted as lost if they never arrive).
    WindowStalled,
    /// A delivery whose payload carried no stamp of this run.
    UnreadablePayload,
}

impl Failure {
    /// The label the report counts under.
    pub(super) fn kind(&self) -> String {
        match self {
            Failure::TcpConnect(kind) => format!("tcp connect: {kind}"),
            Failure::NoLocalPort => "no local port left (add --source-addresses)".to_owned(),
            Failure::ConnectTimeout => "connect timeout".to_owned(),
            Failure::ConnAck { code, protocol } => {
                format!("connack 0x{code:02x} ({})", connack_name(*code, *protocol))
            }
            Failure::SubAck(Some(code)) => format!("suback 0x{code:02x} (refused)"),
            Failure::SubAck(None) => "suback timeout".to_owned(),
            Failure::Closed => "closed by the broker".to_owned(),
            Failure::Disconnect(code) => {
                format!("disconnect 0x{code:02x} ({})", reason_name(*code))
            }
            Failure::Protocol(what) => format!("protocol error: {what}"),
            Failure::Io(kind) => format!("socket error: {kind}"),
            Failure::PublishRefused(code) => {
                format!("publish refused 0x{code:02x} ({})", reason_name(*code))
            }
            Failure::Unacknowledged => "unacknowledged at the end".to_owned(),
            Failure::WindowStalled => "closed loop stalled (window written off)".to_owned(),
            Failure::UnreadablePayload => "unreadable payload".to_owned(),
        }
    }

    fn from_codec(e: &CodecError) -> Self {
        Failure::Protocol(e.to_string())
    }
}

fn connack_name(code: u8, protocol: Protocol) -> &'static str {
    match (protocol, code) {
        (Protocol::V311, 1) => "unacceptable protocol version",
        (Protocol::V311, 2) => "identifier rejected",
        (Protocol::V311, 3) => "server unavailable",
        (Protocol::V311, 4) => "bad user name or password",
        (Protocol::V311, 5) => "not authorized",
        (Protocol::V311, _) => "unknown",
        (Protocol::V5, code) => reason_name(code),
    }
}

/// MQTT 5 reason codes (§2.4) that a load test meets.
fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x04 => "disconnect with will",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x93 => "receive maximum exceeded",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x99 => "payload format invalid",
        0x9F => "connection rate exceeded",
        _ => "other",
    }
}

/// A UTF-8 string for the codec (the generator's own names, checked at start-up).
pub(super) fn utf8(text: &str) -> Result<Utf8Str, Failure> {
    Utf8Str::new(Bytes::copy_from_slice(text.as_bytes())).map_err(|e| Failure::from_codec(&e))
}

/// What a CONNECT carries.
#[derive(Debug)]
pub(super) struct Login {
    pub(super) client_id: String,
    pub(super) username: Option<String>,
    pub(super) password: Option<Bytes>,
    /// MQTT 5 user properties (the API token of a JWT connection).
    pub(super) user_properties: Vec<(String, String)>,
}

/// An open connection: the socket and its buffers.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    pub(super) protocol: Protocol,
    /// The broker's Receive Maximum (5.0), else 65,535.
    pub(super) receive_maximum: usize,
    /// Send PINGREQ when nothing was written for this long.
    pub(super) ping_after: Duration,
    /// When something was last written.
    pub(super) last_write: Instant,
}

/// Opens a TCP connection from `source` (if given), sends CONNECT and waits for CONNACK.
pub(super) async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    protocol: Protocol,
    login: Login,
) -> Result<Conn, Failure> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let stream = tokio::time::timeout_at(deadline, open_tcp(target, source))
        .await
        .map_err(|_| Failure::ConnectTimeout)??;
    // Bursts are batched into one write each: Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    let mut properties = Properties::default();
    for (name, value) in &login.user_properties {
        properties.user_properties.push((utf8(name)?, utf8(value)?));
    }
    let connect = Connect {
        protocol,
        clean_start: true,
        keep_alive: KEEP_ALIVE_SECS,
        client_id: utf8(&login.client_id)?,
        will: None,
        username: login.username.as_deref().map(utf8).transpose()?,
        password: login.password,
        properties,
    };
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::with_capacity(4096),
        wbuf: BytesMut::with_capacity(4096),
        protocol,
        receive_maximum: 65_535,
        ping_after: Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2),
        last_write: Instant::now(),
    };
    conn.queue(&Packet::Connect(Box::new(connect)))?;
    tokio::time::timeout_at(deadline, conn.flush())
        .await
        .map_err(|_| Failure::ConnectTimeout)??;
    let ack = loop {
        match conn.try_decode()? {
            Some(Packet::ConnAck(ack)) => break ack,
            Some(Packet::Disconnect(d)) => return Err(Failure::Disconnect(d.reason)),
            Some(other) => {
                return Err(Failure::Protocol(format!(
                    "{} before connack",
                    other.packet_type().name()
                )));
            }
            None => {}
        }
        tokio::time::timeout_at(deadline, conn.read_more())
            .await
            .map_err(|_| Failure::ConnectTimeout)??;
    };
    let ConnAck {
        code, properties, ..
    } = ack;
    if code != 0 {
        return Err(Failure::ConnAck { code, protocol });
    }
    if let Some(max) = properties.receive_maximum {
        conn.receive_maximum = usize::from(max.get());
    }
    if let Some(keep_alive) = properties.server_keep_alive
        && keep_alive > 0
    {
        conn.ping_after = Duration::from_secs(u64::from(keep_alive)) / 2;
    }
    Ok(conn)
}

/// A TCP connection to `target` from `source` (if given; the kernel picks the port).
pub(super) async fn open_tcp(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> Result<TcpStream, Failure> {
    let Some(source) = source else {
        return TcpStream::connect(target)
            .await
            .map_err(|e| Failure::TcpConnect(e.kind()));
    };
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| Failure::TcpConnect(e.kind()))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable => {
                Failure::NoLocalPort
            }
            kind => Failure::TcpConnect(kind),
        })?;
    socket.connect(target).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable => {
            Failure::NoLocalPort
        }
        kind => Failure::TcpConnect(kind),
    })
}

impl Conn {
    /// Appends `packet` to the write buffer.
    pub(super) fn queue(&mut self, packet: &Packet) -> Result<(), Failure> {
        packet
            .encode(self.protocol, &mut self.wbuf)
            .map(|_| ())
            .map_err(|e| Failure::from_codec(&e))
    }

    /// Writes the write buffer out.
    pub(super) async fn flush(&mut self) -> Result<(), Failure> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|e| Failure::Io(e.kind()))?;
        self.wbuf.clear();
        self.last_write = Instant::now();
        Ok(())
    }

    /// The next whole packet already in the read buffer.
    pub(super) fn try_decode(&mut self) -> Result<Option<Packet>, Failure> {
        codec::decode(&mut self.rbuf, self.protocol, MAX_PACKET)
            .map_err(|e| Failure::from_codec(&e))
    }

    /// Reads what the socket has; [`Failure::Closed`] at its end.
    pub(super) async fn read_more(&mut self) -> Result<(), Failure> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_ROOM {
            self.rbuf.reserve(READ_ROOM);
        }
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) => Err(Failure::Closed),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(Failure::Closed),
            Err(e) => Err(Failure::Io(e.kind())),
        }
    }

    /// Reads what the socket has without waiting.
    pub(super) fn read_ready(&mut self) -> Result<(), Failure> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_ROOM {
            self.rbuf.reserve(READ_ROOM);
        }
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => Err(Failure::Closed),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(Failure::Closed),
            Err(e) => Err(Failure::Io(e.kind())),
        }
    }

    /// When a PINGREQ is due.
    pub(super) fn ping_at(&self) -> Instant {
        self.last_write + self.ping_after
    }

    /// Queues an acknowledgement (PUBACK, PUBREC, PUBREL, PUBCOMP) for `packet_id`.
    pub(super) fn queue_ack(
        &mut self,
        kind: fn(PubResponse) -> Packet,
        packet_id: NonZeroU16,
    ) -> Result<(), Failure> {
        self.queue(&kind(PubResponse {
            packet_id,
            reason: 0,
            properties: Properties::default(),
        }))
    }

    /// Says goodbye (DISCONNECT, bounded) and closes.
    pub(super) async fn close(mut self) {
        self.wbuf.clear();
        if self.queue(&Packet::Disconnect(Default::default())).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

/// A device's PUBLISH, encoded once; each message is a copy with the packet identifier and the
/// payload's stamp patched in.
#[derive(Debug)]
pub(super) struct Template {
    bytes: Bytes,
    /// Where the payload starts.
    payload_at: usize,
    /// Where the packet identifier is (QoS 1/2).
    packet_id_at: Option<usize>,
    stamp: Stamp,
}

/// How a payload carries its send instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stamp {
    /// Binary: nanoseconds (u64), device index (u32), sequence number (u32), little-endian.
    Binary,
    /// A JSON number of nanoseconds, padded with spaces (twin mode: the value of a property).
    JsonNumber,
}

impl Template {
    pub(super) fn new(
        topic: &str,
        qos: QoS,
        payload_size: usize,
        stamp: Stamp,
        protocol: Protocol,
    ) -> Result<Self, Failure> {
        let topic: TopicName = topic.parse().map_err(|e| Failure::from_codec(&e))?;
        let payload = Bytes::from(stamp.blank(payload_size));
        let encode = |id: u16| -> Result<BytesMut, Failure> {
            let qos = match (qos, NonZeroU16::new(id)) {
                (QoS::AtMostOnce, _) | (_, None) => QosPid::AtMostOnce,
                (QoS::AtLeastOnce, Some(id)) => QosPid::AtLeastOnce(id),
                (QoS::ExactlyOnce, Some(id)) => QosPid::ExactlyOnce(id),
            };
            let mut buf = BytesMut::new();
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain: false,
                topic: topic.clone(),
                payload: payload.clone(),
                properties: Properties::default(),
            })
            .encode(protocol, &mut buf)
            .map_err(|e| Failure::from_codec(&e))?;
            Ok(buf)
        };
        let one = encode(0x0101)?;
        // Where the identifier sits: the first byte that differs from the same packet with
        // another identifier (the payload is last and the same).
        let packet_id_at = if qos == QoS::AtMostOnce {
            None
        } else {
            let two = encode(0x0202)?;
            one.iter().zip(two.iter()).position(|(a, b)| a != b)
        };
        let payload_at = one.len() - payload_size;
        Ok(Template {
            bytes: one.freeze(),
            payload_at,
            packet_id_at,
            stamp,
        })
    }

    /// Appends one message to `buf`: `packet_id` (ignored at QoS 0), sent at `now_ns`, the
    /// `seq`th of device `device`.
    pub(super) fn write(
        &self,
        buf: &mut BytesMut,
        packet_id: u16,
        now_ns: u64,
        device: u32,
        seq: u32,
    ) {
        let start = buf.len();
        buf.extend_from_slice(&self.bytes);
        let Some(message) = buf.get_mut(start..) else {
            return;
        };
        if let Some(at) = self.packet_id_at
            && let Some(slot) = message.get_mut(at..at + 2)
        {
            slot.copy_from_slice(&packet_id.to_be_bytes());
        }
        if let Some(payload) = message.get_mut(self.payload_at..) {
            self.stamp.write(payload, now_ns, device, seq);
        }
    }
}

impl Stamp {
    /// A payload of `size` bytes of filler, for [`Stamp::write`] to stamp.
    pub(super) fn blank(self, size: usize) -> Vec<u8> {
        let filler = match self {
            Stamp::Binary => b'x',
            Stamp::JsonNumber => b' ',
        };
        vec![filler; size]
    }

    /// Stamps `payload` (from [`Stamp::blank`]): sent at `now_ns`, the `seq`th of `device`.
    pub(super) fn write(self, payload: &mut [u8], now_ns: u64, device: u32, seq: u32) {
        match self {
            Stamp::Binary => {
                let mut head = [0u8; 16];
                let (ns, rest) = head.split_at_mut(8);
                let (dev, sq) = rest.split_at_mut(4);
                ns.copy_from_slice(&now_ns.to_le_bytes());
                dev.copy_from_slice(&device.to_le_bytes());
                sq.copy_from_slice(&seq.to_le_bytes());
                if let Some(slot) = payload.get_mut(..16) {
                    slot.copy_from_slice(&head);
                }
            }
            Stamp::JsonNumber => {
                let mut digits = [b' '; 20];
                write_decimal(now_ns, &mut digits);
                if let Some(slot) = payload.get_mut(..20) {
                    slot.copy_from_slice(&digits);
                }
            }
        }
    }
}

/// Writes `n` in decimal at the start of `out`, the rest left as it is.
fn write_decimal(mut n: u64, out: &mut [u8; 20]) {
    let mut tmp = [0u8; 20];
    let mut len = 0;
    loop {
        if let Some(slot) = tmp.get_mut(len) {
            *slot = b'0' + (n % 10) as u8;
        }
        len += 1;
        n /= 10;
        if n == 0 || len == 20 {
            break;
        }
    }
    for i in 0..len {
        if let (Some(slot), Some(digit)) = (out.get_mut(i), tmp.get(len - 1 - i)) {
            *slot = *digit;
        }
    }
}

/// What a delivered plain payload says: (sent at ns, device index, sequence number).
pub(super) fn read_binary_stamp(payload: &[u8]) -> Option<(u64, u32, u32)> {
    let ns = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
    let device = u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?);
    let seq = u32::from_le_bytes(payload.get(12..16)?.try_into().ok()?);
    Some((ns, device, seq))
}

/// The unsigned integer after `"key":` in a JSON text (the first occurrence).
pub(super) fn json_number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = text.get(at..)?;
    let rest = rest.get(rest.iter().position(|b| !b.is_ascii_whitespace())?..)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(rest.get(..digits)?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patched_template_decodes_to_the_stamped_message() {
        for protocol in [Protocol::V311, Protocol::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                let t =
                    Template::new("bench/dev-1/temp", qos, 64, Stamp::Binary, protocol).unwrap();
                let mut buf = BytesMut::new();
                t.write(&mut buf, 777, 123_456_789, 1, 42);
                t.write(&mut buf, 778, 5, 1, 43);
                let Packet::Publish(p) =
                    codec::decode(&mut buf, protocol, 1 << 20).unwrap().unwrap()
                else {
                    panic!("not a publish")
                };
                assert_eq!(p.topic.as_str(), "bench/dev-1/temp");
                assert_eq!(p.payload.len(), 64);
                assert_eq!(read_binary_stamp(&p.payload), Some((123_456_789, 1, 42)));
                assert_eq!(p.qos.qos(), qos);
                if qos != QoS::AtMostOnce {
                    assert_eq!(p.qos.packet_id().map(|id| id.get()), Some(777));
                }
                let Packet::Publish(p) =
                    codec::decode(&mut buf, protocol, 1 << 20).unwrap().unwrap()
                else {
                    panic!("not a publish")
                };
                assert_eq!(read_binary_stamp(&p.payload), Some((5, 1, 43)));
            }
        }
    }

    #[test]
    fn twin_payloads_are_json_numbers_padded_with_spaces() {
        let t = Template::new("a/b", QoS::AtMostOnce, 24, Stamp::JsonNumber, Protocol::V5).unwrap();
        let mut buf = BytesMut::new();
        t.write(&mut buf, 0, 1_234_567, 0, 0);
        let Packet::Publish(p) = codec::decode(&mut buf, Protocol::V5, 1 << 20)
            .unwrap()
            .unwrap()
        else {
            panic!("not a publish")
        };
        assert_eq!(&p.payload[..], b"1234567                 ");
        let value: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(value, serde_json::json!(1_234_567));
        let event = br#"{"topic":"x","path":"/","value":1234567,"revision":12}"#;
        assert_eq!(json_number_after(event, br#""value":"#), Some(1_234_567));
        assert_eq!(json_number_after(event, br#""revision":"#), Some(12));
    }
}
