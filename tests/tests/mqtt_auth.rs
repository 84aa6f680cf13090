#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Authentication at CONNECT against the real `thingsgate serve` (DESIGN.md §2): solution
//! secrets, JWTs with the API token or a solution claim, the bad tokens an attacker tries, the
//! failure rate limit, token expiry and MQTT 5 re-authentication. Clients: rumqttc 3.1.1 and 5,
//! and a raw client on the broker's codec where exact packets matter (AUTH, reason strings, the
//! moment a connection closes).
//!
//! Each test runs its own broker; the failure limiter allows about ten failures per address in a
//! row, so no test makes more than eight refused attempts unless it is about the limiter.

use std::time::{Duration, SystemTime};

use broker::mqtt::codec::{Packet, Protocol};
use bytes::Bytes;
use e2e::broker::{Broker, Solution};
use e2e::clients::{
    Closed, V4Client, V5Client, connect_v4_login, connect_v5, connect_v5_login, v5_options,
};
use e2e::issuer::{self, SOLUTION_CLAIM, at_unix, dev_issuer, signature_of};
use e2e::raw::{
    RawClient, Received, auth_packet, connect_packet, publish_packet, subscribe_packet, utf8,
    with_login,
};
use rumqttc::ConnectReturnCode as V4Code;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as V5Code, DisconnectReasonCode, PubAckReason, SubscribeReasonCode,
};
use rumqttc::v5::{ConnectionError as V5Error, StateError};
use serde_json::json;

const NS: &str = "org.acme";
/// A JWT subject the test policy grants every plain topic.
const ALICE: &str = "alice";
/// A JWT subject the policy does not name.
const BOB: &str = "bob";
const HOUR: Duration = Duration::from_secs(3600);

/// A broker (stopped) with one solution, the dev issuer's JWKS and config (leeway 0, solution
/// claim `solution_id`), and a policy granting `dev:alice` READ and WRITE on every plain topic.
fn setup() -> (Broker, Solution) {
    let broker = Broker::new();
    let solution = broker.create_solution(NS);
    dev_issuer().write_jwks(&broker.dir().join("jwks.json"), &[]);
    broker.write_config(&dev_issuer().config_toml("jwks.json"));
    broker.grant_topics(&solution.id, &[&format!("{}:{ALICE}", issuer::KEY)]);
    (broker, solution)
}

/// [`setup`], started.
fn started() -> (Broker, Solution) {
    let (mut broker, solution) = setup();
    broker.start();
    (broker, solution)
}

async fn v4_refused(broker: &Broker, client_id: &str, username: &str, password: &str) -> V4Code {
    match connect_v4_login(broker.mqtt_addr(), client_id, username, password).await {
        Ok(_) => panic!("3.1.1 CONNECT of `{client_id}` was accepted"),
        Err(code) => code,
    }
}

async fn v4_accepted(broker: &Broker, client_id: &str, username: &str, password: &str) -> V4Client {
    connect_v4_login(broker.mqtt_addr(), client_id, username, password)
        .await
        .unwrap_or_else(|code| panic!("3.1.1 CONNECT of `{client_id}` refused: {code:?}"))
}

async fn v5_refused(options: rumqttc::v5::MqttOptions) -> V5Code {
    let id = options.client_id();
    match connect_v5(options).await {
        Ok(_) => panic!("5.0 CONNECT of `{id}` was accepted"),
        Err(code) => code,
    }
}

async fn v5_accepted(options: rumqttc::v5::MqttOptions) -> V5Client {
    let id = options.client_id();
    connect_v5(options)
        .await
        .unwrap_or_else(|code| panic!("5.0 CONNECT of `{id}` refused: {code:?}"))
}

/// MQTT 5 options with the JWT as password and the API token in the `x-cr-api-token` user
/// property (no user name).
fn v5_jwt_with_api_token_property(
    broker: &Broker,
    client_id: &str,
    token: &str,
    api_token: &str,
) -> rumqttc::v5::MqttOptions {
    let mut options = v5_options(broker.mqtt_addr(), client_id);
    options.set_credentials("", token);
    options.set_user_properties(vec![("x-cr-api-token".to_owned(), api_token.to_owned())]);
    options
}

/// A raw MQTT 5 CONNECT with Authentication Method `jwt` and the token in Authentication Data,
/// the API token (if any) in the `x-cr-api-token` user property.
fn raw_jwt_connect(
    client_id: &str,
    token: &str,
    api_token: Option<&str>,
) -> broker::mqtt::codec::Connect {
    let mut connect = connect_packet(Protocol::V5, client_id);
    connect.properties.authentication_method = Some(utf8("jwt"));
    connect.properties.authentication_data = Some(Bytes::copy_from_slice(token.as_bytes()));
    if let Some(api_token) = api_token {
        connect
            .properties
            .user_properties
            .push((utf8("x-cr-api-token"), utf8(api_token)));
    }
    connect
}

/// Subscribes `sub` to `e2e/+/temp`, publishes on `e2e/<tag>/temp` from `publisher` and
/// checks the delivery (3.1.1).
async fn v4_round_trip(sub: &mut V4Client, publisher: &mut V4Client, tag: &str) {
    let granted = sub.subscribe("e2e/+/temp", rumqttc::QoS::AtLeastOnce).await;
    assert_eq!(
        granted,
        rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)
    );
    let topic = format!("e2e/{tag}/temp");
    publisher.publish_qos1(&topic, b"21.5").await;
    let delivered = sub.next_publish().await;
    assert_eq!(delivered.topic, topic);
    assert_eq!(&delivered.payload[..], b"21.5");
}

/// The same with MQTT 5 clients.
async fn v5_round_trip(sub: &mut V5Client, publisher: &mut V5Client, tag: &str) {
    use rumqttc::v5::mqttbytes::QoS;
    let granted = sub.subscribe("e2e/+/temp", QoS::AtLeastOnce).await;
    assert_eq!(granted, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    let topic = format!("e2e/{tag}/temp");
    assert_eq!(
        publisher.publish_qos1(&topic, b"21.5").await,
        PubAckReason::Success
    );
    let delivered = sub.next_publish().await;
    assert_eq!(&delivered.topic[..], topic.as_bytes());
    assert_eq!(&delivered.payload[..], b"21.5");
}

// --- solution secrets ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v311_client_with_the_solution_secret_connects_and_round_trips_a_message() {
    let (broker, s) = started();
    let mut sub = v4_accepted(&broker, "v4-sub", &s.id, &s.secret).await;
    let mut publisher = v4_accepted(&broker, "v4-pub", &s.id, &s.secret).await;
    v4_round_trip(&mut sub, &mut publisher, "secret").await;
    broker.assert_logs_never_contain(&[&s.secret, &s.api_token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_client_with_the_solution_secret_connects_and_round_trips_a_message() {
    let (broker, s) = started();
    let mut sub = connect_v5_login(broker.mqtt_addr(), "v5-sub", &s.id, &s.secret)
        .await
        .unwrap();
    let mut publisher = connect_v5_login(broker.mqtt_addr(), "v5-pub", &s.id, &s.secret)
        .await
        .unwrap();
    v5_round_trip(&mut sub, &mut publisher, "secret").await;
    broker.assert_logs_never_contain(&[&s.secret, &s.api_token]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_or_an_unknown_solution_is_refused_as_bad_user_name_or_password() {
    let (broker, s) = started();
    let wrong = "x".repeat(s.secret.len());
    assert_eq!(
        v4_refused(&broker, "d1", &s.id, &wrong).await,
        V4Code::BadUserNamePassword
    );
    // An unknown solution answers like a wrong secret: the client is not told which part failed.
    assert_eq!(
        v4_refused(&broker, "d1", "s-nobody0", &s.secret).await,
        V4Code::BadUserNamePassword
    );
    let mut options = v5_options(broker.mqtt_addr(), "d1");
    options.set_credentials(s.id.as_str(), wrong.as_str());
    assert_eq!(v5_refused(options).await, V5Code::BadUserNamePassword);
    let mut options = v5_options(broker.mqtt_addr(), "d1");
    options.set_credentials("s-nobody0", s.secret.as_str());
    assert_eq!(v5_refused(options).await, V5Code::BadUserNamePassword);
    // The right secret still connects: four failures do not lock the address out.
    v4_accepted(&broker, "d1", &s.id, &s.secret).await;
    broker.assert_logs_never_contain(&[&s.secret, &wrong]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_secret_is_refused_after_a_restart_while_another_secret_still_connects() {
    let (mut broker, s) = setup();
    let (second_id, second) = broker.add_secret(&s.id);
    assert_eq!(second_id, "s2");
    broker.start();
    drop(v4_accepted(&broker, "d1", &s.id, &s.secret).await);

    broker.stop();
    broker.revoke_secret(&s.id, "s1");
    broker.start();
    assert_eq!(
        v4_refused(&broker, "d1", &s.id, &s.secret).await,
        V4Code::BadUserNamePassword
    );
    let mut options = v5_options(broker.mqtt_addr(), "d2");
    options.set_credentials(s.id.as_str(), s.secret.as_str());
    assert_eq!(v5_refused(options).await, V5Code::BadUserNamePassword);
    let mut sub = v4_accepted(&broker, "d1", &s.id, &second).await;
    let mut publisher = v4_accepted(&broker, "d3", &s.id, &second).await;
    v4_round_trip(&mut sub, &mut publisher, "second").await;
    broker.assert_logs_never_contain(&[&s.secret, &second]);
}

// --- JWTs: how the solution is found -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_with_the_api_token_as_v311_user_name_connects_as_its_subject() {
    let (broker, s) = started();
    let token = dev_issuer().token(ALICE, HOUR);
    let mut sub = v4_accepted(&broker, "jwt-sub", &s.api_token, &token).await;
    // An RS256 token from the same issuer too.
    let rsa_token = dev_issuer().sign_rsa(&dev_issuer().claims(ALICE, HOUR));
    let mut publisher = v4_accepted(&broker, "jwt-pub", &s.api_token, &rsa_token).await;
    // `dev:alice` is granted every plain topic by the policy: the round trip proves the subject.
    v4_round_trip(&mut sub, &mut publisher, "jwt").await;
    broker.assert_logs_never_contain(&[
        &s.api_token,
        &token,
        signature_of(&token),
        signature_of(&rsa_token),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_with_the_api_token_in_the_v5_user_property_or_user_name_connects_as_its_subject() {
    let (broker, s) = started();
    let token = dev_issuer().token(ALICE, HOUR);
    let mut sub = v5_accepted(v5_jwt_with_api_token_property(
        &broker,
        "jwt-sub",
        &token,
        &s.api_token,
    ))
    .await;
    // The user name form of 3.1.1 is accepted on 5.0 too.
    let mut options = v5_options(broker.mqtt_addr(), "jwt-pub");
    options.set_credentials(s.api_token.as_str(), token.as_str());
    let mut publisher = v5_accepted(options).await;
    v5_round_trip(&mut sub, &mut publisher, "jwt").await;
    broker.assert_logs_never_contain(&[&s.api_token, &token, signature_of(&token)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_naming_its_solution_in_the_solution_claim_needs_no_api_token() {
    let (broker, s) = started();
    let mut claims = dev_issuer().claims(ALICE, HOUR);
    claims.insert(SOLUTION_CLAIM.into(), json!(s.id));
    let token = dev_issuer().sign(&claims);
    // 3.1.1 needs a user name with a password: any, the claim decides.
    let mut sub = v4_accepted(&broker, "claim-sub", "device-7", &token).await;
    let mut publisher = v4_accepted(&broker, "claim-pub", "device-8", &token).await;
    v4_round_trip(&mut sub, &mut publisher, "claim").await;
    // 5.0: password only.
    let mut v5_sub = connect_v5_login(broker.mqtt_addr(), "claim-v5-sub", "", &token)
        .await
        .unwrap_or_else(|code| panic!("5.0 JWT with solution claim refused: {code:?}"));
    let mut v5_pub = connect_v5_login(broker.mqtt_addr(), "claim-v5-pub", "", &token)
        .await
        .unwrap_or_else(|code| panic!("5.0 JWT with solution claim refused: {code:?}"));
    v5_round_trip(&mut v5_sub, &mut v5_pub, "claim5").await;
    broker.assert_logs_never_contain(&[&token, signature_of(&token)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_without_api_token_or_solution_claim_is_refused_as_not_authorized() {
    let (broker, s) = started();
    let token = dev_issuer().token(ALICE, HOUR);
    // 3.1.1: a user name that is no API token.
    assert_eq!(
        v4_refused(&broker, "d1", "no-such-api-token", &token).await,
        V4Code::NotAuthorized
    );
    // 5.0: the token alone, then with an API token of no solution.
    let mut options = v5_options(broker.mqtt_addr(), "d1");
    options.set_credentials("", token.as_str());
    assert_eq!(v5_refused(options).await, V5Code::NotAuthorized);
    let wrong_api_token = "A".repeat(s.api_token.len());
    let options = v5_jwt_with_api_token_property(&broker, "d1", &token, &wrong_api_token);
    assert_eq!(v5_refused(options).await, V5Code::NotAuthorized);
    // A solution ID is not an API token.
    let options = v5_jwt_with_api_token_property(&broker, "d1", &token, &s.id);
    assert_eq!(v5_refused(options).await, V5Code::NotAuthorized);
    broker.assert_logs_never_contain(&[&token, signature_of(&token)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_subject_the_solution_policy_does_not_name_connects_but_may_not_publish_or_subscribe()
{
    use rumqttc::v5::mqttbytes::QoS;
    let (broker, s) = started();
    let bob = dev_issuer().token(BOB, HOUR);
    let mut client = v5_accepted(v5_jwt_with_api_token_property(
        &broker,
        "bob",
        &bob,
        &s.api_token,
    ))
    .await;
    assert_eq!(
        client.publish_qos1("e2e/bob/temp", b"1").await,
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        client.subscribe("e2e/#", QoS::AtLeastOnce).await,
        SubscribeReasonCode::NotAuthorized
    );
    let mut v4 = v4_accepted(&broker, "bob-v4", &s.api_token, &bob).await;
    assert_eq!(
        v4.subscribe("e2e/#", rumqttc::QoS::AtLeastOnce).await,
        rumqttc::SubscribeReasonCode::Failure
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_with_a_jwt_reaches_a_subscriber_authenticated_with_a_secret() {
    let (broker, s) = started();
    let token = dev_issuer().token(ALICE, HOUR);
    let mut sub = v4_accepted(&broker, "secret-sub", &s.id, &s.secret).await;
    let mut publisher = v4_accepted(&broker, "jwt-pub", &s.api_token, &token).await;
    v4_round_trip(&mut sub, &mut publisher, "mixed").await;
    // And the other way round.
    let mut jwt_sub = v4_accepted(&broker, "jwt-sub", &s.api_token, &token).await;
    let mut secret_pub = v4_accepted(&broker, "secret-pub", &s.id, &s.secret).await;
    let granted = jwt_sub
        .subscribe("e2e/back/#", rumqttc::QoS::AtLeastOnce)
        .await;
    assert_eq!(
        granted,
        rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)
    );
    secret_pub.publish_qos1("e2e/back/temp", b"7").await;
    assert_eq!(jwt_sub.next_publish().await.topic, "e2e/back/temp");
}

// --- bad tokens --------------------------------------------------------------------------------

/// Seven tokens that must not authenticate, with what is wrong with each.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let issuer = dev_issuer();
    let now = issuer::unix_now();
    let with = |changes: serde_json::Value| {
        let mut claims = issuer.claims(ALICE, HOUR);
        for (k, v) in changes.as_object().unwrap() {
            claims.insert(k.clone(), v.clone());
        }
        claims
    };
    vec![
        (
            "expired",
            issuer.sign(&with(json!({"iat": now - 600, "exp": now - 60}))),
        ),
        (
            "not yet valid",
            issuer.sign(&with(json!({"nbf": now + 600}))),
        ),
        (
            "wrong audience",
            issuer.sign(&with(json!({"aud": "someone-else"}))),
        ),
        (
            "wrong issuer",
            issuer.sign(&with(json!({"iss": "https://elsewhere.example"}))),
        ),
        ("alg none", issuer.alg_none(&issuer.claims(ALICE, HOUR))),
        (
            "HS256 keyed with the RSA public key",
            issuer.hs256_with_rsa_public_key(&issuer.claims(ALICE, HOUR)),
        ),
        (
            "tampered payload",
            issuer.tampered(&issuer.claims(BOB, HOUR)),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jwts_are_refused_as_bad_user_name_or_password_over_v311() {
    let (broker, s) = started();
    let tokens = bad_tokens();
    for (what, token) in &tokens {
        assert_eq!(
            v4_refused(&broker, "d1", &s.api_token, token).await,
            V4Code::BadUserNamePassword,
            "{what}"
        );
    }
    // The same connection with a good token is accepted: it was the token that was refused.
    v4_accepted(
        &broker,
        "d1",
        &s.api_token,
        &dev_issuer().token(ALICE, HOUR),
    )
    .await;
    let signatures: Vec<&str> = tokens
        .iter()
        .map(|(_, t)| signature_of(t))
        .filter(|sig| !sig.is_empty())
        .collect();
    broker.assert_logs_never_contain(&signatures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jwts_are_refused_as_bad_user_name_or_password_over_v5() {
    let (broker, s) = started();
    for (what, token) in bad_tokens() {
        let options = v5_jwt_with_api_token_property(&broker, "d1", &token, &s.api_token);
        assert_eq!(
            v5_refused(options).await,
            V5Code::BadUserNamePassword,
            "{what}"
        );
    }
    let good = dev_issuer().token(ALICE, HOUR);
    v5_accepted(v5_jwt_with_api_token_property(
        &broker,
        "d1",
        &good,
        &s.api_token,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_with_an_unknown_kid_connects_once_the_jwks_file_holds_its_key() {
    let (mut broker, s) = setup();
    let rotated_pem = issuer::fresh_ec_pem();
    let rotated = broker::token_cmd::SigningKey::from_pkcs8_pem(&rotated_pem).unwrap();
    let token = rotated
        .sign(&dev_issuer().claims(ALICE, HOUR), None)
        .unwrap();
    broker.start();
    assert_eq!(
        v4_refused(&broker, "d1", &s.api_token, &token).await,
        V4Code::BadUserNamePassword
    );
    // The issuer rotates its keys: the JWKS file now holds the new one. The server re-reads it
    // on an unknown kid, at most every few seconds (10 s by default): retry until then.
    dev_issuer().write_jwks(&broker.dir().join("jwks.json"), &[&rotated]);
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let mut refusals = 1;
    loop {
        match connect_v4_login(broker.mqtt_addr(), "d1", &s.api_token, &token).await {
            Ok(_) => break,
            Err(code) => {
                assert_eq!(code, V4Code::BadUserNamePassword);
                refusals += 1;
                assert!(
                    std::time::Instant::now() < deadline,
                    "still refused after {refusals} attempts over 25 s: the JWKS was not re-read"
                );
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
        }
    }
}

// --- MQTT 5 enhanced authentication -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_authentication_method_is_refused_with_0x8c() {
    let (broker, s) = started();
    let mut connect = with_login(
        connect_packet(Protocol::V5, "d1"),
        Some(&s.id),
        Some(&s.secret),
    );
    connect.properties.authentication_method = Some(utf8("SCRAM-SHA-256"));
    connect.properties.authentication_data = Some(Bytes::from_static(b"n,,n=user,r=nonce"));
    let (mut client, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0x8C, "{ack:?}");
    assert!(matches!(
        client.recv_within(Duration::from_secs(5)).await,
        Received::Closed
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_connect_with_authentication_method_jwt_takes_the_token_from_authentication_data() {
    let (broker, s) = started();
    let token = dev_issuer().token(ALICE, HOUR);
    let (mut client, ack) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("jwt-method", &token, Some(&s.api_token)),
    )
    .await;
    assert_eq!(ack.code, 0x00, "{ack:?}");
    client
        .send(&subscribe_packet(
            1,
            "e2e/#",
            broker::mqtt::codec::QoS::AtMostOnce,
        ))
        .await;
    match client.recv().await {
        Packet::SubAck(ack) => assert_eq!(ack.codes, [0x00]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The token in the password with method `jwt` works too.
    let mut connect = with_login(
        connect_packet(Protocol::V5, "jwt-password"),
        None,
        Some(&token),
    );
    connect.properties.authentication_method = Some(utf8("jwt"));
    connect
        .properties
        .user_properties
        .push((utf8("x-cr-api-token"), utf8(&s.api_token)));
    let (_second, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0x00, "{ack:?}");
    // A bad token with method `jwt`: bad user name or password.
    let expired = dev_issuer().sign(&{
        let mut c = dev_issuer().claims(ALICE, HOUR);
        c.insert("exp".into(), json!(issuer::unix_now() - 60));
        c
    });
    let (_third, ack) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("jwt-expired", &expired, Some(&s.api_token)),
    )
    .await;
    assert_eq!(ack.code, 0x86, "{ack:?}");
}

// --- the failure limiter -----------------------------------------------------------------------

/// Connects as `client_id` with a wrong secret until the limiter answers instead of the check
/// (3.1.1 "not authorized" in place of "bad user name or password"); the failures until then.
async fn wrong_secret_until_limited(
    broker: &Broker,
    client_id: &str,
    solution: &str,
    wrong: &str,
) -> usize {
    let mut failures = 0;
    loop {
        match v4_refused(broker, client_id, solution, wrong).await {
            V4Code::BadUserNamePassword => failures += 1,
            V4Code::NotAuthorized => return failures,
            other => panic!("unexpected CONNACK {other:?}"),
        }
        assert!(
            failures <= 30,
            "30 wrong secrets in a row and `{client_id}` is still not limited"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_failures_from_one_address_refuse_even_the_right_secret_for_a_while() {
    let (broker, s) = started();
    let wrong = "y".repeat(s.secret.len());
    let bad_credentials = wrong_secret_until_limited(&broker, "d1", &s.id, &wrong).await;
    assert!(
        bad_credentials >= 5,
        "limited after only {bad_credentials} failures"
    );
    // Now the right secret is refused without being checked: 5 on 3.1.1, 0x9F on 5.0.
    assert_eq!(
        v4_refused(&broker, "d1", &s.id, &s.secret).await,
        V4Code::NotAuthorized
    );
    let connect = with_login(
        connect_packet(Protocol::V5, "d1"),
        Some(&s.id),
        Some(&s.secret),
    );
    let (_client, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0x9F, "{ack:?}");
    // "For a while": the right secret connects again once the address has cooled down.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if connect_v4_login(broker.mqtt_addr(), "d1", &s.id, &s.secret)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the address is still limited 20 s after its last failure"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    broker.assert_logs_never_contain(&[&s.secret, &wrong]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brute_force_on_one_device_does_not_lock_out_its_neighbours_behind_the_same_address() {
    // A carrier NAT: every device of the fleet comes from 127.0.0.1. One of them has a wrong
    // secret and keeps retrying.
    let (broker, s) = started();
    let wrong = "y".repeat(s.secret.len());
    wrong_secret_until_limited(&broker, "broken", &s.id, &wrong).await;
    // The broken identity now waits before it is checked again, even with the right secret…
    assert_eq!(
        v4_refused(&broker, "broken", &s.id, &s.secret).await,
        V4Code::NotAuthorized
    );
    // …while its neighbours with the right secret connect at once.
    for neighbour in ["dev-1", "dev-2", "dev-3"] {
        let started = std::time::Instant::now();
        connect_v4_login(broker.mqtt_addr(), neighbour, &s.id, &s.secret)
            .await
            .unwrap_or_else(|code| panic!("`{neighbour}` was refused: {code:?}"));
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "`{neighbour}` was slowed: {:?}",
            started.elapsed()
        );
    }
}

// --- token expiry and re-authentication ----------------------------------------------------------

/// A token for `sub` (with the API token's solution found via the user property or user name)
/// expiring `seconds` from now; returns it with its `exp` instant.
fn short_token(sub: &str, seconds: u64) -> (String, SystemTime) {
    let claims = dev_issuer().claims(sub, Duration::from_secs(seconds));
    let exp = claims["exp"].as_u64().unwrap();
    (dev_issuer().sign(&claims), at_unix(exp))
}

/// Asserts that `closed_at` is within the bounds the expiry rule allows: not before `exp` (less
/// clock granularity), at most 3 s after it.
fn assert_closed_at_expiry(closed_at: SystemTime, exp: SystemTime) {
    let early = exp.duration_since(closed_at).unwrap_or_default();
    let late = closed_at.duration_since(exp).unwrap_or_default();
    assert!(
        early <= Duration::from_millis(500),
        "closed {early:?} before the token expired"
    );
    assert!(
        late <= Duration::from_secs(3),
        "closed {late:?} after the token expired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v311_jwt_connection_is_closed_when_its_token_expires() {
    let (broker, s) = started();
    let (token, exp) = short_token(ALICE, 3);
    let connect = with_login(
        connect_packet(Protocol::V311, "expiring"),
        Some(&s.api_token),
        Some(&token),
    );
    let (mut client, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0);
    let limit = exp.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(6);
    match client.recv_within(limit).await {
        Received::Closed => assert_closed_at_expiry(SystemTime::now(), exp),
        other => panic!("expected the socket closed at token expiry, got {other:?}"),
    }
    // A secret connection on the same broker is not affected.
    let mut other = v4_accepted(&broker, "secret-client", &s.id, &s.secret).await;
    assert!(matches!(
        other.closed_within(Duration::from_millis(200)).await,
        Closed::StillOpen
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_jwt_connection_gets_disconnect_0x87_with_a_reason_string_when_its_token_expires() {
    let (broker, s) = started();
    let (token, exp) = short_token(ALICE, 3);
    let (mut raw, ack) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("expiring-raw", &token, Some(&s.api_token)),
    )
    .await;
    assert_eq!(ack.code, 0);
    let mut rumqttc_client = v5_accepted(v5_jwt_with_api_token_property(
        &broker,
        "expiring-rumqttc",
        &token,
        &s.api_token,
    ))
    .await;
    let limit = exp.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(6);
    match raw.recv_within(limit).await {
        Received::Packet(Packet::Disconnect(disconnect)) => {
            assert_closed_at_expiry(SystemTime::now(), exp);
            assert_eq!(disconnect.reason, 0x87, "{disconnect:?}");
            let reason = disconnect
                .properties
                .reason_string
                .as_ref()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default();
            assert!(
                !reason.is_empty(),
                "DISCONNECT 0x87 without a reason string"
            );
            assert!(!reason.contains(signature_of(&token)), "{reason}");
        }
        other => panic!("expected DISCONNECT 0x87 at token expiry, got {other:?}"),
    }
    assert!(matches!(
        raw.recv_within(Duration::from_secs(5)).await,
        Received::Closed
    ));
    match rumqttc_client.closed_within(Duration::from_secs(5)).await {
        Closed::Error(V5Error::MqttState(StateError::ServerDisconnect { reason_code, .. })) => {
            assert_eq!(reason_code, DisconnectReasonCode::NotAuthorized);
        }
        other => panic!("rumqttc: expected a server DISCONNECT 0x87, got {other:?}"),
    }
    broker.assert_logs_never_contain(&[&token, signature_of(&token)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_re_authentication_with_a_fresh_token_keeps_the_connection_open_past_the_first_expiry()
{
    let (broker, s) = started();
    let (first, exp) = short_token(ALICE, 3);
    let (mut client, ack) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("reauth", &first, Some(&s.api_token)),
    )
    .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    client
        .send(&subscribe_packet(
            1,
            "e2e/#",
            broker::mqtt::codec::QoS::AtMostOnce,
        ))
        .await;
    match client.recv().await {
        Packet::SubAck(ack) => assert_eq!(ack.codes, [0x00]),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    let fresh = dev_issuer().token(ALICE, HOUR);
    client.send(&auth_packet(0x19, "jwt", &fresh)).await;
    match client.recv().await {
        Packet::Auth(auth) => {
            assert_eq!(auth.reason, 0x00, "{auth:?}");
            if let Some(method) = &auth.properties.authentication_method {
                assert_eq!(method.as_str(), "jwt");
            }
        }
        other => panic!("expected AUTH 0x00 after re-authentication, got {other:?}"),
    }

    // Past the first token's expiry (plus the 3 s an expiry may take): still open, still
    // authorized.
    let quiet = exp.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(3);
    match client.recv_within(quiet).await {
        Received::Silent => {}
        other => panic!("after re-authentication, expected nothing, got {other:?}"),
    }
    client.ping().await;
    client
        .send(&publish_packet("e2e/reauth/temp", b"22", None))
        .await;
    match client.recv().await {
        Packet::Publish(p) => {
            assert_eq!(p.topic.as_str(), "e2e/reauth/temp");
            assert_eq!(&p.payload[..], b"22");
        }
        other => panic!("expected the delivery of our own publish, got {other:?}"),
    }
    broker.assert_logs_never_contain(&[signature_of(&first), signature_of(&fresh)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_re_authentication_with_an_unknown_kid_re_reads_the_keys_as_connect_does() {
    let (mut broker, s) = setup();
    broker.start();
    let started = std::time::Instant::now();
    let alice = dev_issuer().token(ALICE, HOUR);
    let (mut client, ack) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("reauth-kid", &alice, Some(&s.api_token)),
    )
    .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    // The issuer rotates: the JWKS file gains a new key, and the fresh token is signed with it.
    let rotated_pem = issuer::fresh_ec_pem();
    let rotated = broker::token_cmd::SigningKey::from_pkcs8_pem(&rotated_pem).unwrap();
    dev_issuer().write_jwks(&broker.dir().join("jwks.json"), &[&rotated]);
    let fresh = rotated
        .sign(&dev_issuer().claims(ALICE, HOUR), None)
        .unwrap();
    // The keys are re-read at most every 10 s (the default): wait until a re-read is allowed.
    let allowed = Duration::from_millis(10_500).saturating_sub(started.elapsed());
    tokio::time::sleep(allowed).await;
    client.send(&auth_packet(0x19, "jwt", &fresh)).await;
    match client.recv_within(Duration::from_secs(10)).await {
        Received::Packet(Packet::Auth(auth)) => assert_eq!(auth.reason, 0x00, "{auth:?}"),
        other => panic!("expected AUTH 0x00 after re-reading the keys, got {other:?}"),
    }
    client.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_re_authentication_with_another_subject_is_disconnected_with_0x87() {
    let (broker, s) = started();
    let alice = dev_issuer().token(ALICE, HOUR);
    let (mut client, ack) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("reauth-other", &alice, Some(&s.api_token)),
    )
    .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    let bob = dev_issuer().token(BOB, HOUR);
    client.send(&auth_packet(0x19, "jwt", &bob)).await;
    match client.recv().await {
        Packet::Disconnect(disconnect) => assert_eq!(disconnect.reason, 0x87, "{disconnect:?}"),
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }
    assert!(matches!(
        client.recv_within(Duration::from_secs(5)).await,
        Received::Closed
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v5_re_authentication_with_a_bad_token_is_disconnected_with_0x87() {
    let (broker, s) = started();
    let alice = dev_issuer().token(ALICE, HOUR);
    let (mut client, ack) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("reauth-bad", &alice, Some(&s.api_token)),
    )
    .await;
    assert_eq!(ack.code, 0, "{ack:?}");
    let tampered = dev_issuer().tampered(&dev_issuer().claims(ALICE, HOUR));
    client.send(&auth_packet(0x19, "jwt", &tampered)).await;
    match client.recv().await {
        Packet::Disconnect(disconnect) => assert_eq!(disconnect.reason, 0x87, "{disconnect:?}"),
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_packet_on_a_connection_that_did_not_use_method_jwt_is_a_protocol_error() {
    // MQTT 5 §4.12: AUTH only follows a CONNECT that named an authentication method.
    let (broker, s) = started();
    let connect = with_login(
        connect_packet(Protocol::V5, "no-method"),
        Some(&s.id),
        Some(&s.secret),
    );
    let (mut client, ack) = RawClient::connect(broker.mqtt_addr(), connect).await;
    assert_eq!(ack.code, 0, "{ack:?}");
    let token = dev_issuer().token(ALICE, HOUR);
    client.send(&auth_packet(0x19, "jwt", &token)).await;
    match client.recv().await {
        Packet::Disconnect(disconnect) => assert_eq!(disconnect.reason, 0x82, "{disconnect:?}"),
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
}

// --- logs ----------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debug_log_records_refusals_but_never_a_secret_an_api_token_or_a_token() {
    let (mut broker, s) = started();
    let wrong = "z".repeat(s.secret.len());
    let token = dev_issuer().token(ALICE, HOUR);
    let bad = dev_issuer().tampered(&dev_issuer().claims(ALICE, HOUR));
    drop(v4_accepted(&broker, "good-secret", &s.id, &s.secret).await);
    v4_refused(&broker, "bad-secret", &s.id, &wrong).await;
    drop(v4_accepted(&broker, "good-jwt", &s.api_token, &token).await);
    v4_refused(&broker, "bad-jwt", &s.api_token, &bad).await;
    let (_raw, _) = RawClient::connect(
        broker.mqtt_addr(),
        raw_jwt_connect("jwt-method", &token, Some(&s.api_token)),
    )
    .await;
    // A graceful stop flushes whatever the server buffered.
    broker.stop();
    // Each refusal's reason is recorded (a debug line with the refusal's label), never the
    // credential.
    let logs = broker.logs();
    for reason in [
        broker::auth::solution::AuthRefusal::WrongSecret.as_str(),
        broker::auth::jwt::JwtRefusal::BadSignature.as_str(),
    ] {
        assert!(
            logs.contains(reason),
            "no log line records `{reason}` (THINGSGATE_LOG=debug):\n{logs}"
        );
    }
    broker.assert_logs_never_contain(&[
        &s.secret,
        &wrong,
        &s.api_token,
        &token,
        signature_of(&token),
        &bad,
        signature_of(&bad),
    ]);
}
