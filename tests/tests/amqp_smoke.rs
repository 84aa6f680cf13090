//! The AMQP listener end to end with lapin: a secret's connection publishes a plain message
//! that its own consumer receives, with publisher confirms.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use e2e::amqp::{confirm_channel, connect, consume, next_within, secret_uri, start_with_amqp};
use e2e::broker::Broker;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicPublishOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_message_goes_through_amq_topic_with_a_confirm() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.grant_topics(&solution.id, &[&format!("iot-things:{}", solution.id)]);
    let addr = start_with_amqp(&mut broker);
    let connection = connect(&secret_uri(addr, &solution)).await;
    let channel = confirm_channel(&connection).await;
    let (_, mut consumer) = consume(&channel, &["sensors.#"], false).await;
    let confirm = channel
        .basic_publish(
            "amq.topic".into(),
            "sensors.s1.temp".into(),
            BasicPublishOptions::default(),
            b"21.5",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "{confirm:?}");
    let delivery = next_within(&mut consumer, Duration::from_secs(10))
        .await
        .expect("the message");
    assert_eq!(delivery.data, b"21.5");
    assert_eq!(delivery.routing_key.as_str(), "sensors.s1.temp");
    assert_eq!(delivery.exchange.as_str(), "amq.topic");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    connection.close(200, "bye".into()).await.expect("close");
}
