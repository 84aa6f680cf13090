//! rumqttc clients (MQTT 3.1.1: [`V4Client`], MQTT 5: [`V5Client`]) driven for tests: the event
//! loop runs in a task that forwards every event until the first error (no silent reconnects),
//! and every wait is bounded by [`NET_TIMEOUT`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use crate::raw::NET_TIMEOUT;

/// What a test sees after the connection closed.
#[derive(Debug)]
pub enum Closed<E> {
    /// The event loop failed with this error (server DISCONNECT, reset, EOF, …).
    Error(E),
    /// Still open after the time given.
    StillOpen,
}

/// An MQTT 3.1.1 rumqttc client whose event loop runs in a task.
#[derive(Debug)]
pub struct V4Client {
    pub client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Event, rumqttc::ConnectionError>>,
    task: JoinHandle<()>,
    /// Publishes that arrived while waiting for something else.
    received: VecDeque<rumqttc::Publish>,
}

/// An MQTT 5 rumqttc client whose event loop runs in a task.
#[derive(Debug)]
pub struct V5Client {
    pub client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>>,
    task: JoinHandle<()>,
    /// Publishes that arrived while waiting for something else.
    received: VecDeque<rumqttc::v5::mqttbytes::v5::Publish>,
}

impl Drop for V4Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for V5Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Options for an MQTT 3.1.1 connection to `addr` (keep-alive 30 s, clean session).
pub fn v4_options(addr: SocketAddr, client_id: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Options for an MQTT 5 connection to `addr` (keep-alive 30 s, clean start).
pub fn v5_options(addr: SocketAddr, client_id: &str) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Connects with 3.1.1 and waits for the CONNACK: `Err(code)` if the server refused. Panics if
/// the connection fails otherwise (no CONNACK, timeout).
pub async fn connect_v4(
    options: rumqttc::MqttOptions,
) -> Result<V4Client, rumqttc::ConnectReturnCode> {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    let first = tokio::time::timeout(NET_TIMEOUT, eventloop.poll())
        .await
        .expect("no CONNACK in time");
    match first {
        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
        }
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let (tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                break;
            }
        }
    });
    Ok(V4Client {
        client,
        events,
        task,
        received: VecDeque::new(),
    })
}

/// `connect_v4` with a user name and password.
pub async fn connect_v4_login(
    addr: SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
) -> Result<V4Client, rumqttc::ConnectReturnCode> {
    let mut options = v4_options(addr, client_id);
    options.set_credentials(username, password);
    connect_v4(options).await
}

/// Connects with MQTT 5 and waits for the CONNACK: `Err(code)` if the server refused.
pub async fn connect_v5(
    options: rumqttc::v5::MqttOptions,
) -> Result<V5Client, rumqttc::v5::mqttbytes::v5::ConnectReturnCode> {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
    let first = tokio::time::timeout(NET_TIMEOUT, eventloop.poll())
        .await
        .expect("no CONNACK in time");
    match first {
        Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(ack))) => {
            assert_eq!(ack.code, ConnectReturnCode::Success);
        }
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => return Err(code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let (tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).is_err() || failed {
                break;
            }
        }
    });
    Ok(V5Client {
        client,
        events,
        task,
        received: VecDeque::new(),
    })
}

/// `connect_v5` with a user name (empty: none) and password.
pub async fn connect_v5_login(
    addr: SocketAddr,
    client_id: &str,
    username: &str,
    password: &str,
) -> Result<V5Client, rumqttc::v5::mqttbytes::v5::ConnectReturnCode> {
    let mut options = v5_options(addr, client_id);
    options.set_credentials(username, password);
    connect_v5(options).await
}

impl V4Client {
    /// The next incoming packet (outgoing events skipped); `Err` once the connection failed.
    pub async fn next_incoming_within(
        &mut self,
        limit: Duration,
    ) -> Option<Result<rumqttc::Packet, String>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(None) => return Some(Err("event loop ended".to_owned())),
                Ok(Some(Err(e))) => return Some(Err(format!("{e:?}"))),
                Ok(Some(Ok(rumqttc::Event::Incoming(packet)))) => return Some(Ok(packet)),
                Ok(Some(Ok(rumqttc::Event::Outgoing(_)))) => {}
            }
        }
    }

    /// The next incoming packet that is not a PUBLISH (those are kept for [`Self::next_publish`]).
    async fn next_control(&mut self, waiting_for: &str) -> rumqttc::Packet {
        loop {
            match self.next_incoming_within(NET_TIMEOUT).await {
                None => panic!("no {waiting_for} within {NET_TIMEOUT:?}"),
                Some(Err(e)) => panic!("connection failed waiting for {waiting_for}: {e}"),
                Some(Ok(rumqttc::Packet::Publish(p))) => self.received.push_back(p),
                Some(Ok(rumqttc::Packet::PingResp)) => {}
                Some(Ok(packet)) => return packet,
            }
        }
    }

    /// Subscribes to one filter and returns the SUBACK's return code.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: rumqttc::QoS,
    ) -> rumqttc::SubscribeReasonCode {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe queued");
        match self.next_control("SUBACK").await {
            rumqttc::Packet::SubAck(ack) => {
                assert_eq!(ack.return_codes.len(), 1, "{ack:?}");
                ack.return_codes[0]
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK.
    pub async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("publish queued");
        match self.next_control("PUBACK").await {
            rumqttc::Packet::PubAck(_) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// The next PUBLISH delivered to this client; panics after [`NET_TIMEOUT`].
    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        if let Some(p) = self.received.pop_front() {
            return p;
        }
        loop {
            match self.next_incoming_within(NET_TIMEOUT).await {
                None => panic!("no PUBLISH delivered within {NET_TIMEOUT:?}"),
                Some(Err(e)) => panic!("connection failed waiting for a PUBLISH: {e}"),
                Some(Ok(rumqttc::Packet::Publish(p))) => return p,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits up to `limit` for the connection to fail; the error, or `StillOpen`.
    pub async fn closed_within(&mut self, limit: Duration) -> Closed<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_incoming_within(left).await {
                None => return Closed::StillOpen,
                Some(Err(e)) => return Closed::Error(e),
                Some(Ok(_)) => {}
            }
        }
    }
}

impl V5Client {
    /// The next incoming packet (outgoing events skipped); `Err` once the connection failed.
    pub async fn next_incoming_within(
        &mut self,
        limit: Duration,
    ) -> Option<Result<rumqttc::v5::mqttbytes::v5::Packet, rumqttc::v5::ConnectionError>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(None) => {
                    return Some(Err(rumqttc::v5::ConnectionError::RequestsDone));
                }
                Ok(Some(Err(e))) => return Some(Err(e)),
                Ok(Some(Ok(rumqttc::v5::Event::Incoming(packet)))) => return Some(Ok(packet)),
                Ok(Some(Ok(rumqttc::v5::Event::Outgoing(_)))) => {}
            }
        }
    }

    async fn next_control(&mut self, waiting_for: &str) -> rumqttc::v5::mqttbytes::v5::Packet {
        use rumqttc::v5::mqttbytes::v5::Packet;
        loop {
            match self.next_incoming_within(NET_TIMEOUT).await {
                None => panic!("no {waiting_for} within {NET_TIMEOUT:?}"),
                Some(Err(e)) => panic!("connection failed waiting for {waiting_for}: {e:?}"),
                Some(Ok(Packet::Publish(p))) => self.received.push_back(p),
                Some(Ok(Packet::PingResp(_))) => {}
                Some(Ok(packet)) => return packet,
            }
        }
    }

    /// Subscribes to one filter and returns the SUBACK's reason code.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: rumqttc::v5::mqttbytes::QoS,
    ) -> rumqttc::v5::mqttbytes::v5::SubscribeReasonCode {
        use rumqttc::v5::mqttbytes::v5::Packet;
        self.client
            .subscribe(filter, qos)
            .await
            .expect("subscribe queued");
        match self.next_control("SUBACK").await {
            Packet::SubAck(ack) => {
                assert_eq!(ack.return_codes.len(), 1, "{ack:?}");
                ack.return_codes[0]
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason.
    pub async fn publish_qos1(
        &mut self,
        topic: &str,
        payload: &[u8],
    ) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
        use rumqttc::v5::mqttbytes::v5::Packet;
        self.client
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .await
            .expect("publish queued");
        match self.next_control("PUBACK").await {
            Packet::PubAck(ack) => ack.reason,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// The next PUBLISH delivered to this client; panics after [`NET_TIMEOUT`].
    pub async fn next_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        if let Some(p) = self.received.pop_front() {
            return p;
        }
        self.next_publish_within(NET_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no PUBLISH delivered within {NET_TIMEOUT:?}"))
    }

    /// The next PUBLISH within `limit`, or `None`.
    pub async fn next_publish_within(
        &mut self,
        limit: Duration,
    ) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        if let Some(p) = self.received.pop_front() {
            return Some(p);
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_incoming_within(left).await {
                None => return None,
                Some(Err(e)) => panic!("connection failed waiting for a PUBLISH: {e:?}"),
                Some(Ok(Packet::Publish(p))) => return Some(p),
                Some(Ok(_)) => {}
            }
        }
    }

    /// Waits up to `limit` for the connection to fail; the error, or `StillOpen`.
    pub async fn closed_within(&mut self, limit: Duration) -> Closed<rumqttc::v5::ConnectionError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_incoming_within(left).await {
                None => return Closed::StillOpen,
                Some(Err(e)) => return Closed::Error(e),
                Some(Ok(_)) => {}
            }
        }
    }
}
