//! A raw MQTT client over tokio TCP, encoding and decoding packets with the broker crate's public
//! codec: for what the third-party clients cannot send or show (AUTH packets, exact reason codes
//! and properties, the moment a connection closes).

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use broker::mqtt::codec::{
    Auth, ConnAck, Connect, Packet, Properties, Protocol, Publish, QoS, QosPid, Subscribe,
    Subscription, SubscriptionOptions, TopicFilter, TopicName, Utf8Str, decode,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single network step may take before the test fails.
pub const NET_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`RawClient::recv_within`] saw.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one value per received packet in a test; matching beats boxing"
)]
pub enum Received {
    Packet(Packet),
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing within the time given.
    Silent,
}

/// One TCP connection speaking `protocol`.
#[derive(Debug)]
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    protocol: Protocol,
}

/// A UTF-8 string for the codec's types.
pub fn utf8(text: &str) -> Utf8Str {
    Utf8Str::new(Bytes::copy_from_slice(text.as_bytes())).expect("valid MQTT string")
}

/// A CONNECT with clean start, keep-alive 60 s and no credentials.
pub fn connect_packet(protocol: Protocol, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: utf8(client_id),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// `connect` with a user name and password.
pub fn with_login(mut connect: Connect, username: Option<&str>, password: Option<&str>) -> Connect {
    connect.username = username.map(utf8);
    connect.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
    connect
}

/// An AUTH packet with Authentication Method `method` and Authentication Data `data`.
pub fn auth_packet(reason: u8, method: &str, data: &str) -> Packet {
    Packet::Auth(Auth {
        reason,
        properties: Properties {
            authentication_method: Some(utf8(method)),
            authentication_data: Some(Bytes::copy_from_slice(data.as_bytes())),
            ..Properties::default()
        },
    })
}

/// A SUBSCRIBE of one filter.
pub fn subscribe_packet(packet_id: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: NonZeroU16::new(packet_id).expect("non-zero packet id"),
        subscriptions: vec![Subscription {
            filter: TopicFilter::new(Bytes::copy_from_slice(filter.as_bytes()))
                .expect("valid filter"),
            options: SubscriptionOptions::qos(qos),
        }],
        properties: Properties::default(),
    })
}

/// A PUBLISH at QoS 0 (`packet_id` None) or 1.
pub fn publish_packet(topic: &str, payload: &[u8], packet_id: Option<u16>) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: match packet_id {
            None => QosPid::AtMostOnce,
            Some(id) => QosPid::AtLeastOnce(NonZeroU16::new(id).expect("non-zero packet id")),
        },
        retain: false,
        topic: TopicName::new(Bytes::copy_from_slice(topic.as_bytes())).expect("valid topic"),
        payload: Bytes::copy_from_slice(payload),
        properties: Properties::default(),
    })
}

impl RawClient {
    /// Opens a TCP connection (nothing sent yet).
    pub async fn open(addr: SocketAddr, protocol: Protocol) -> Self {
        let stream = tokio::time::timeout(NET_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("TCP connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("TCP connect to {addr}: {e}"));
        RawClient {
            stream,
            buf: BytesMut::with_capacity(4096),
            protocol,
        }
    }

    /// Opens a TCP connection from the local address `local` (e.g. `127.0.0.2`, another host
    /// on loopback).
    pub async fn open_from(local: std::net::IpAddr, addr: SocketAddr, protocol: Protocol) -> Self {
        let connect = async {
            let socket = match local {
                std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }?;
            socket.bind(SocketAddr::new(local, 0))?;
            socket.connect(addr).await
        };
        let stream = tokio::time::timeout(NET_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| panic!("TCP connect from {local} to {addr} timed out"))
            .unwrap_or_else(|e| panic!("TCP connect from {local} to {addr}: {e}"));
        RawClient {
            stream,
            buf: BytesMut::with_capacity(4096),
            protocol,
        }
    }

    /// Opens a connection, sends `connect` and returns the CONNACK (the caller checks its code).
    /// Panics if the server closes or sends anything else first.
    pub async fn connect(addr: SocketAddr, connect: Connect) -> (Self, ConnAck) {
        let mut client = Self::open(addr, connect.protocol).await;
        client.send(&Packet::Connect(Box::new(connect))).await;
        match client.recv_within(NET_TIMEOUT).await {
            Received::Packet(Packet::ConnAck(ack)) => (client, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Encodes and writes one packet.
    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet
            .encode(self.protocol, &mut out)
            .unwrap_or_else(|e| panic!("cannot encode {packet:?}: {e}"));
        self.send_bytes(&out).await;
    }

    /// Writes raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        tokio::time::timeout(NET_TIMEOUT, self.stream.write_all(bytes))
            .await
            .expect("write timed out")
            .expect("write failed");
    }

    /// The next packet, or that the connection closed, or [`Received::Silent`] after `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Received {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match decode(&mut self.buf, self.protocol, usize::MAX >> 4) {
                Ok(Some(packet)) => return Received::Packet(packet),
                Ok(None) => {}
                Err(e) => panic!("the server sent a packet our codec refuses: {e}"),
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match read {
                Err(_) => return Received::Silent,
                Ok(Ok(0)) | Ok(Err(_)) => return Received::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; panics on close or after [`NET_TIMEOUT`].
    pub async fn recv(&mut self) -> Packet {
        match self.recv_within(NET_TIMEOUT).await {
            Received::Packet(packet) => packet,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Sends PINGREQ and expects PINGRESP (skipping nothing else: the caller has no traffic
    /// pending).
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}
