//! AMQP 0.9.1 clients for the end-to-end tests (lapin, the crate the product card names): a
//! broker started with `--amqp 127.0.0.1:0`, connection URIs for each kind of credential, and
//! bounded waits. RabbitMQ itself (127.0.0.1:5672, guest/guest) is used by the benchmarks.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::broker::{Broker, Solution};

/// How long one AMQP step (connect, declare, a delivery) may take.
pub const AMQP_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts `broker` with an AMQP listener on a free port (besides whatever else it was given).
pub fn start_with_amqp(broker: &mut Broker) -> SocketAddr {
    broker.arg("--amqp").arg("127.0.0.1:0");
    broker.start();
    amqp_addr(broker)
}

/// The address `serve` printed as `amqp listening on ADDR`.
pub fn amqp_addr(broker: &Broker) -> SocketAddr {
    broker
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("amqp listening on "))
        .and_then(|a| a.parse().ok())
        .expect("the broker printed `amqp listening on ADDR` (was it started with --amqp?)")
}

/// Percent-encodes a URI user-info part (solution IDs, secrets and tokens are URL-safe
/// already, but a test may pass anything).
pub fn encode(part: &str) -> String {
    part.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `amqp://user:password@addr/%2f`.
pub fn uri(addr: SocketAddr, user: &str, password: &str) -> String {
    format!("amqp://{}:{}@{addr}/%2f", encode(user), encode(password))
}

/// The URI of a solution's secret (basic: user name = solution ID).
pub fn secret_uri(addr: SocketAddr, solution: &Solution) -> String {
    uri(addr, &solution.id, &solution.secret)
}

/// Connects within [`AMQP_TIMEOUT`] with `properties` (e.g. a `client_id` or
/// `x-cr-api-token` client property).
pub async fn connect_with(
    uri: &str,
    properties: ConnectionProperties,
) -> lapin::Result<Connection> {
    tokio::time::timeout(AMQP_TIMEOUT, Connection::connect(uri, properties))
        .await
        .unwrap_or_else(|_| panic!("no AMQP connection within {AMQP_TIMEOUT:?}"))
}

/// Connects within [`AMQP_TIMEOUT`]; panics if refused.
pub async fn connect(uri: &str) -> Connection {
    connect_with(uri, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("AMQP connection refused: {e}"))
}

/// A channel with publisher confirms on.
pub async fn confirm_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.expect("channel.open");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    channel
}

/// A server-named exclusive queue bound to `amq.topic` with each of `keys`, and a consumer on
/// it (manual acknowledgements unless `no_ack`).
pub async fn consume(channel: &Channel, keys: &[&str], no_ack: bool) -> (String, Consumer) {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    let name = queue.name().as_str().to_owned();
    for key in keys {
        channel
            .queue_bind(
                name.as_str().into(),
                "amq.topic".into(),
                (*key).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue.bind {key}: {e}"));
    }
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    (name, consumer)
}

/// The next delivery within `limit`; `None` if none came.
pub async fn next_within(
    consumer: &mut Consumer,
    limit: Duration,
) -> Option<lapin::message::Delivery> {
    match tokio::time::timeout(limit, consumer.next()).await {
        Ok(Some(Ok(delivery))) => Some(delivery),
        Ok(Some(Err(e))) => panic!("consumer failed: {e}"),
        Ok(None) | Err(_) => None,
    }
}
