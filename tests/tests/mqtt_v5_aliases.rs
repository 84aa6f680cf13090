//! Topic aliases from the server to the client (MQTT 5 §3.3.2.3.4): used up to the client's
//! Topic Alias Maximum, never for a client that allows none.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::time::Duration;

use broker::mqtt::codec::{Packet, Properties, Protocol, Publish, QoS};
use e2e::broker::Broker;
use e2e::raw::{RawClient, Received, connect_packet, publish_packet, subscribe_packet, with_login};

async fn next_publish(client: &mut RawClient) -> Publish {
    loop {
        match client.recv_within(Duration::from_secs(10)).await {
            Received::Packet(Packet::Publish(p)) => return p,
            Received::Packet(_) => {}
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_server_sends_topic_aliases_up_to_the_clients_maximum() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.start();
    let login = |id: &str, alias_max: Option<u16>| {
        let mut connect = with_login(
            connect_packet(Protocol::V5, id),
            Some(&solution.id),
            Some(&solution.secret),
        );
        connect.properties = Properties {
            topic_alias_maximum: alias_max,
            ..Properties::default()
        };
        connect
    };
    let (mut aliased, ack) =
        RawClient::connect(broker.mqtt_addr(), login("aliased", Some(1))).await;
    assert_eq!(ack.code, 0);
    let (mut plain, ack) = RawClient::connect(broker.mqtt_addr(), login("plain", None)).await;
    assert_eq!(ack.code, 0);
    for client in [&mut aliased, &mut plain] {
        client
            .send(&subscribe_packet(1, "t/#", QoS::AtMostOnce))
            .await;
        assert!(matches!(client.recv().await, Packet::SubAck(_)));
    }
    let (mut publisher, _) = RawClient::connect(broker.mqtt_addr(), login("pub", None)).await;
    for topic in ["t/a", "t/a", "t/b", "t/a"] {
        publisher.send(&publish_packet(topic, b"x", None)).await;
    }

    // One alias allowed: `t/a` gets alias 1 (topic sent once), `t/b` goes without one.
    let seen: Vec<(String, Option<u16>)> = {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let p = next_publish(&mut aliased).await;
            seen.push((
                p.topic.as_str().to_owned(),
                p.properties.topic_alias.map(|a| a.get()),
            ));
        }
        seen
    };
    assert_eq!(
        seen,
        [
            ("t/a".to_owned(), Some(1)),
            (String::new(), Some(1)),
            ("t/b".to_owned(), None),
            (String::new(), Some(1)),
        ]
    );
    for expected in ["t/a", "t/a", "t/b", "t/a"] {
        let p = next_publish(&mut plain).await;
        assert_eq!(p.topic.as_str(), expected);
        assert_eq!(p.properties.topic_alias, None);
    }
}
