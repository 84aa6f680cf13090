#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Solution administration over HTTP against the real broker (issue 11; DESIGN.md §1): each
//! route authorized by the solution policy, and each change applied to live connections at
//! once — a revoked secret ends the connections opened with it, a removed namespace isolates,
//! a changed solution policy decides the next publish.

use std::time::Duration;

use broker::mqtt::codec::{Packet, Protocol};
use e2e::broker::{Broker, Solution};
use e2e::http::{Api, Auth, http_addr, started_with_http as started};
use e2e::issuer::{SOLUTION_CLAIM, dev_issuer};
use e2e::protocol_support::{connect_ok, connected, login, publish_qos0, publish_qos1};
use e2e::raw::{NET_TIMEOUT, RawClient};
use serde_json::{Value, json};

fn path(solution: &Solution, rest: &str) -> String {
    format!("/api/2/solutions/{}{rest}", solution.id)
}

/// A client logged in with `secret` of `solution`.
async fn with_secret(
    addr: std::net::SocketAddr,
    solution: &Solution,
    client_id: &str,
    secret: &str,
) -> (RawClient, u8) {
    let mut connect = login(Protocol::V5, client_id, solution);
    connect.password = Some(bytes::Bytes::from(secret.to_owned()));
    let (client, ack) = RawClient::connect(addr, connect).await;
    (client, ack.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_solution_is_shown_to_its_administrators_only() {
    let (_broker, solution, api) = started();
    let owner = Auth::basic(&solution);
    let shown = api.get(&path(&solution, ""), &owner).await;
    assert_eq!(shown.status, 200, "{shown:?}");
    assert_eq!(shown.body["solutionId"], solution.id);
    assert_eq!(shown.body["namespaces"], json!(["org.acme"]));
    assert_eq!(shown.body["secrets"][0]["secretId"], "s1");
    assert!(
        !shown.body.to_string().contains("digest"),
        "no digest is shown: {}",
        shown.body
    );
    // Alice (a JWT user of the solution) has no grant on `solution:/`.
    let mut claims = dev_issuer().claims("alice", Duration::from_secs(3600));
    claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
    let alice = Auth::bearer(&dev_issuer().sign(&claims), None);
    assert_eq!(api.get(&path(&solution, ""), &alice).await.status, 404);
    let refused = api
        .post(&path(&solution, "/secrets"), &alice, &json!({}))
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.error(), Some("solutions:solution.notmodifiable"));
    // Another solution's administration is not found, whatever is presented.
    let other = api.get("/api/2/solutions/someone-else", &owner).await;
    assert_eq!(other.status, 404);
    let usage = api.get(&path(&solution, "/usage"), &owner).await;
    assert_eq!(usage.status, 200, "{usage:?}");
    assert!(usage.body["messagesIn"].is_u64(), "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_secret_works_at_once_and_revoking_it_ends_its_connections_only() {
    let (broker, solution, api) = started();
    let owner = Auth::basic(&solution);
    let created = api
        .post(&path(&solution, "/secrets"), &owner, &json!({}))
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body["secretId"], "s2");
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    let listed = api.get(&path(&solution, "/secrets"), &owner).await;
    assert_eq!(listed.body.as_array().unwrap().len(), 2);
    assert!(
        !listed.body.to_string().contains(&secret),
        "shown once only"
    );

    let addr = broker.mqtt_addr();
    let (mut second, code) = with_secret(addr, &solution, "with-s2", &secret).await;
    assert_eq!(code, 0, "the new secret connects at once");
    let mut first = connected(addr, Protocol::V5, "with-s1", &solution).await;

    let revoked = api.delete(&path(&solution, "/secrets/s2"), &owner).await;
    assert_eq!(revoked.status, 204, "{revoked:?}");
    match second.recv_within(NET_TIMEOUT).await {
        e2e::raw::Received::Packet(Packet::Disconnect(d)) => {
            assert_eq!(d.reason, 0x87, "DISCONNECT not authorized: {d:?}");
        }
        other => panic!("the connection of the revoked secret goes: {other:?}"),
    }
    let (_, code) = with_secret(addr, &solution, "with-s2", &secret).await;
    assert_eq!(code, 0x86, "the revoked secret no longer connects");
    // The other secret's connection is untouched.
    publish_qos0(&mut first, "still/here", b"yes").await;
    let missing = api.delete(&path(&solution, "/secrets/s9"), &owner).await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_added_and_removed_online_apply_to_live_connections_at_once() {
    let (broker, solution, api) = started();
    let owner = Auth::basic(&solution);
    let addr = broker.mqtt_addr();
    let mut device = connected(addr, Protocol::V5, "device", &solution).await;
    let create = |ns: &str| format!("{ns}/lamp/things/twin/commands/create");

    assert_eq!(
        publish_qos1(&mut device, &create("org.acme.two"), b"{}", 1).await,
        0x87,
        "not yet the solution's namespace"
    );
    let added = api
        .put(
            &path(&solution, "/namespaces/org.acme.two"),
            &owner,
            &json!({}),
        )
        .await;
    assert_eq!(added.status, 201, "{added:?}");
    assert_eq!(
        publish_qos1(&mut device, &create("org.acme.two"), b"{}", 2).await,
        0,
        "the same connection may use the new namespace at once"
    );
    assert_eq!(
        publish_qos1(&mut device, &create("org.acme"), b"{}", 3).await,
        0
    );
    let removed = api
        .delete(&path(&solution, "/namespaces/org.acme"), &owner)
        .await;
    assert_eq!(removed.status, 204, "{removed:?}");
    let modify = "org.acme/lamp/things/twin/commands/modify/attributes/x";
    assert_eq!(
        publish_qos1(&mut device, modify, b"1", 4).await,
        0x87,
        "the removed namespace is out of reach at once"
    );
    let read = api.get("/api/2/things/org.acme:lamp", &owner).await;
    assert!(read.status == 403 || read.status == 404, "{read:?}");
    let namespaces = api.get(&path(&solution, "/namespaces"), &owner).await;
    assert_eq!(namespaces.body, json!(["org.acme.two"]));
    let taken = api
        .put(&path(&solution, "/namespaces/Bad..ns"), &owner, &json!({}))
        .await;
    assert_eq!(taken.status, 400, "{taken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_solution_policy_replaced_online_decides_the_next_publish() {
    let (broker, solution, api) = started();
    let owner = Auth::basic(&solution);
    let addr = broker.mqtt_addr();
    let mut device = connected(addr, Protocol::V5, "device", &solution).await;
    assert_eq!(publish_qos1(&mut device, "sensors/t", b"1", 1).await, 0);

    let mut policy: Value = api.get(&path(&solution, "/policy"), &owner).await.body;
    let resources = &mut policy["entries"]["solution"]["resources"];
    resources["topic:/sensors"] = json!({"grant": [], "revoke": ["WRITE"]});
    let set = api
        .send(
            api.request(reqwest::Method::PUT, &path(&solution, "/policy"), &owner)
                .header("content-type", "application/json")
                .body(policy.to_string()),
        )
        .await;
    assert_eq!(set.status, 204, "{set:?}");
    assert_eq!(
        publish_qos1(&mut device, "sensors/t", b"2", 2).await,
        0x87,
        "the live connection's next publish is decided by the new policy"
    );
    assert_eq!(publish_qos1(&mut device, "other/t", b"3", 3).await, 0);

    // A policy that would lock everyone out is refused, and nothing changes.
    let lockout = json!({"entries": {"x": {
        "subjects": {"dev:nobody": {"type": "t"}},
        "resources": {"topic:/": {"grant": ["READ"], "revoke": []}}
    }}});
    let refused = api
        .send(
            api.request(reqwest::Method::PUT, &path(&solution, "/policy"), &owner)
                .body(lockout.to_string()),
        )
        .await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(publish_qos1(&mut device, "other/t", b"4", 4).await, 0);
    let (_c, ack) = connect_ok(addr, login(Protocol::V311, "v3", &solution)).await;
    assert!(!ack.session_present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_from_the_config_creates_solutions_online_and_nobody_else_can() {
    const OPERATOR_SECRET: &str = "operator-secret-for-the-e2e-test-7f3a";
    let digest = {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, OPERATOR_SECRET.as_bytes());
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let mut broker = Broker::new();
    broker.write_config(&format!(
        "[[operator]]\nname = \"ops\"\nsecret_sha256 = \"{digest}\"\n"
    ));
    let existing = broker.create_solution("org.acme");
    broker.arg("--http").arg("127.0.0.1:0");
    broker.start();
    let api = Api::new(http_addr(&broker));
    let operator = Auth::Basic {
        solution: "operator/ops".into(),
        secret: OPERATOR_SECRET.into(),
    };
    let created = api
        .post(
            "/api/2/solutions",
            &operator,
            &json!({"solutionId": "fresh", "namespaces": ["org.fresh"]}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.header("location"), Some("/api/2/solutions/fresh"));
    let fresh = Solution {
        id: "fresh".into(),
        api_token: created.body["apiToken"].as_str().unwrap().into(),
        secret: created.body["secret"].as_str().unwrap().into(),
    };
    // The new solution works at once: MQTT with its secret, HTTP administration.
    let mut device = connected(broker.mqtt_addr(), Protocol::V5, "d1", &fresh).await;
    assert_eq!(
        publish_qos1(
            &mut device,
            "org.fresh/t1/things/twin/commands/create",
            b"{}",
            1
        )
        .await,
        0
    );
    let shown = api
        .get("/api/2/solutions/fresh", &Auth::basic(&fresh))
        .await;
    assert_eq!(shown.body["namespaces"], json!(["org.fresh"]));

    for (what, auth, status) in [
        (
            "a wrong operator secret",
            Auth::Basic {
                solution: "operator/ops".into(),
                secret: "nope".into(),
            },
            401,
        ),
        ("a solution's own secret", Auth::basic(&existing), 401),
        ("nothing", Auth::None, 401),
    ] {
        let refused = api
            .post(
                "/api/2/solutions",
                &auth,
                &json!({"namespaces": ["org.other"]}),
            )
            .await;
        assert_eq!(refused.status, status, "{what}: {refused:?}");
    }
    let malformed = api
        .post("/api/2/solutions", &operator, &json!({"namespace": "x"}))
        .await;
    assert_eq!(
        (malformed.status, malformed.error()),
        (400, Some("solutions:json.invalid")),
        "{malformed:?}"
    );
    let taken = api
        .post(
            "/api/2/solutions",
            &operator,
            &json!({"namespaces": ["org.acme"]}),
        )
        .await;
    assert_eq!(
        taken.status, 409,
        "a namespace of another solution: {taken:?}"
    );
    let again = api
        .post(
            "/api/2/solutions",
            &operator,
            &json!({"solutionId": "fresh", "namespaces": ["org.fresh2"]}),
        )
        .await;
    assert_eq!(again.status, 409, "{again:?}");
    broker.assert_logs_never_contain(&[OPERATOR_SECRET, &fresh.secret, &fresh.api_token]);
}
