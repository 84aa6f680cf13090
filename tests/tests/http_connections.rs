#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! A solution's connections over HTTP (`/api/2/solutions/{id}/connections…`, DESIGN.md §5)
//! against the real broker: create, replace, list and delete; passwords shown as `***` and
//! never logged, and a document sent back as shown keeps the stored password; invalid
//! documents refused naming the field; other solutions' connections not found; every route
//! authorized by the solution policy; a running connection's state and counters in `/metrics`.
//! Connections that connect use RabbitMQ at 127.0.0.1:5672 (guest/guest) and a queue each
//! test declares and deletes.

use std::time::Duration;

use e2e::bridge::{
    create_thing, declare_queue, delete_queue, modify_temp, put_connection, unique, wait_status,
};
use e2e::broker::{Broker, Solution};
use e2e::http::{Api, Auth, http_addr};
use e2e::issuer::{SOLUTION_CLAIM, dev_issuer};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};
use reqwest::Method;
use serde_json::{Value, json};

fn path(solution: &Solution, rest: &str) -> String {
    format!("/api/2/solutions/{}/connections{rest}", solution.id)
}

/// An AMQP connection to RabbitMQ consuming `queue`, logging in with `password`.
fn amqp_connection(queue: &str, password: &str) -> Value {
    json!({
        "connectionType": "amqp-091",
        "uri": format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
        "sources": [{
            "addresses": [queue],
            "authorizationContext": ["integration:{{ header:device_id }}"]
        }]
    })
}

/// `doc` with `id` set.
fn with_id(mut doc: Value, id: &str) -> Value {
    doc["id"] = json!(id);
    doc
}

/// A bearer token of the dev issuer for `sub` (subject `dev:<sub>`) in `solution`.
fn jwt_user(solution: &Solution, sub: &str) -> Auth {
    let mut claims = dev_issuer().claims(sub, Duration::from_secs(3600));
    claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
    Auth::bearer(&dev_issuer().sign(&claims), None)
}

/// A started broker (HTTP, the dev issuer) with two solutions: `org.acme` and `org.other`.
fn two_solutions() -> (Broker, Solution, Solution, Api) {
    let issuer = dev_issuer();
    let mut broker = Broker::new();
    issuer.write_jwks(&broker.dir().join("jwks.json"), &[]);
    broker.write_config(&issuer.config_toml("jwks.json"));
    let acme = broker.create_solution("org.acme");
    let other = broker.create_solution("org.other");
    broker.arg("--http").arg("127.0.0.1:0");
    broker.start();
    let api = Api::new(http_addr(&broker));
    (broker, acme, other, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_created_replaced_and_deleted_and_their_passwords_never_shown() {
    let (broker, solution, api) = e2e::bridge::started();
    let owner = Auth::basic(&solution);
    // A password RabbitMQ refuses: the connection fails, and says so, without showing it.
    let password = unique("pw");
    let doc = amqp_connection("nowhere", &password);

    let created = api.post(&path(&solution, ""), &owner, &doc).await;
    assert_eq!(created.status, 201, "{created:?}");
    let generated = created.body["id"].as_str().unwrap().to_owned();
    assert!(generated.starts_with("c-"), "a generated ID: {generated}");
    let shown = api
        .get(&path(&solution, &format!("/{generated}")), &owner)
        .await;
    assert_eq!(shown.status, 200, "{shown:?}");
    assert_eq!(shown.body["id"], generated.as_str());
    assert_eq!(shown.body["uri"], "amqp://guest:***@127.0.0.1:5672/%2f");

    let put = api
        .put(
            &path(&solution, "/hub"),
            &owner,
            &with_id(doc.clone(), "hub"),
        )
        .await;
    assert_eq!(put.status, 201, "created: {put:?}");
    let mut renamed = with_id(doc.clone(), "hub");
    renamed["name"] = json!("the hub");
    let replaced = api.put(&path(&solution, "/hub"), &owner, &renamed).await;
    assert_eq!(replaced.status, 204, "replaced: {replaced:?}");
    // The ID may also be left out of a PUT: the URL names it.
    let mut no_id = renamed.clone();
    no_id.as_object_mut().unwrap().remove("id");
    no_id["name"] = json!("still the hub");
    let replaced = api.put(&path(&solution, "/hub"), &owner, &no_id).await;
    assert_eq!(replaced.status, 204, "replaced: {replaced:?}");
    let hub = api.get(&path(&solution, "/hub"), &owner).await;
    assert_eq!(hub.body["name"], "still the hub");

    let listed = api.get(&path(&solution, ""), &owner).await;
    assert_eq!(listed.status, 200);
    let ids: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&"hub") && ids.contains(&generated.as_str()));

    // POST of an ID that exists is a conflict, and changes nothing.
    let conflict = api
        .post(&path(&solution, ""), &owner, &with_id(doc.clone(), "hub"))
        .await;
    assert_eq!(conflict.status, 409, "{conflict:?}");
    assert_eq!(conflict.error(), Some("connectivity:connection.conflict"));
    let hub = api.get(&path(&solution, "/hub"), &owner).await;
    assert_eq!(hub.body["name"], "still the hub");

    // It runs, fails (RabbitMQ refuses the password), and says why — without the password.
    let failed = wait_status(&api, &solution, "hub", "failed", |_| true).await;
    let failure = failed.to_string();
    assert!(failed["lastError"].is_string(), "{failed}");

    let deleted = api.delete(&path(&solution, "/hub"), &owner).await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let gone = api.get(&path(&solution, "/hub"), &owner).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.error(), Some("connectivity:connection.notfound"));
    let again = api.delete(&path(&solution, "/hub"), &owner).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.error(), Some("connectivity:connection.notfound"));

    for answer in [&shown.body, &listed.body, &hub.body] {
        assert!(
            !answer.to_string().contains(&password),
            "a password in an answer: {answer}"
        );
    }
    assert!(!failure.contains(&password), "{failure}");
    broker.assert_logs_never_contain(&[&password, &solution.secret]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_sent_back_as_shown_keeps_the_stored_password() {
    let (amqp, queue) = declare_queue("http-keep").await;
    let (broker, solution, api) = e2e::bridge::started();
    let owner = Auth::basic(&solution);
    put_connection(
        &api,
        &solution,
        "hub",
        &with_id(amqp_connection(&queue, "guest"), "hub"),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    // Shown with `***`; sent back closed, then open again: each time with `***`.
    let mut shown = api.get(&path(&solution, "/hub"), &owner).await.body;
    assert_eq!(shown["uri"], "amqp://guest:***@127.0.0.1:5672/%2f");
    shown["connectionStatus"] = json!("closed");
    let closed = api.put(&path(&solution, "/hub"), &owner, &shown).await;
    assert_eq!(closed.status, 204, "{closed:?}");
    wait_status(&api, &solution, "hub", "closed", |_| true).await;
    shown["connectionStatus"] = json!("open");
    let opened = api.put(&path(&solution, "/hub"), &owner, &shown).await;
    assert_eq!(opened.status, 204, "{opened:?}");
    // It logs in to RabbitMQ again: the stored password was kept, not replaced by `***`.
    let status = wait_status(&api, &solution, "hub", "connected", |_| true).await;
    assert!(status.get("lastError").is_none(), "{status}");
    let shown = api.get(&path(&solution, "/hub"), &owner).await.body;
    assert_eq!(shown["uri"], "amqp://guest:***@127.0.0.1:5672/%2f");

    // A `***` with another user or host is not a kept password: it is the password `***`.
    let mut moved = shown.clone();
    moved["uri"] = json!("amqp://other:***@127.0.0.1:5672/%2f");
    let moved = api.put(&path(&solution, "/hub"), &owner, &moved).await;
    assert_eq!(moved.status, 204, "{moved:?}");
    wait_status(&api, &solution, "hub", "failed", |_| true).await;
    broker.assert_logs_never_contain(&["guest:guest"]);
    drop(broker);
    delete_queue(&amqp, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_documents_are_refused_naming_the_field() {
    let (_broker, solution, api) = e2e::bridge::started();
    let owner = Auth::basic(&solution);
    let good = with_id(amqp_connection("q", "guest"), "hub");
    let invalid = "connectivity:connection.configuration.invalid";

    let mut cases: Vec<(&str, Value, &str)> = Vec::new();
    let mut scheme = good.clone();
    scheme["uri"] = json!("http://guest:guest@127.0.0.1:5672");
    cases.push(("a URI of another scheme", scheme, "`uri`"));
    let mut placeholder = good.clone();
    placeholder["sources"][0]["authorizationContext"] = json!(["integration:{{ jwt:sub }}"]);
    cases.push((
        "a placeholder a source cannot resolve",
        placeholder,
        "sources[0].authorizationContext",
    ));
    let mut target = good.clone();
    target["targets"] = json!([{"address": "amq.topic/{{ thing:colour }}",
        "topics": ["_/_/things/twin/events"], "authorizationContext": ["integration:acme:hub"]}]);
    cases.push(("an unknown placeholder", target, "targets[0].address"));
    let mut unknown = good.clone();
    unknown["sourcez"] = json!([]);
    cases.push(("an unknown field", unknown, "sourcez"));
    let mut mismatch = good.clone();
    mismatch["id"] = json!("other");
    cases.push(("another ID than the URL's", mismatch, "`id`"));
    for (what, doc, field) in &cases {
        let refused = api.put(&path(&solution, "/hub"), &owner, doc).await;
        assert_eq!(refused.status, 400, "{what}: {refused:?}");
        assert_eq!(refused.error(), Some(invalid), "{what}: {refused:?}");
        let message = refused.body["message"].as_str().unwrap();
        assert!(message.contains(field), "{what}: `{field}` in {message}");
        if *what != "another ID than the URL's" {
            let posted = api.post(&path(&solution, ""), &owner, doc).await;
            assert_eq!(posted.status, 400, "{what} (POST): {posted:?}");
            assert_eq!(posted.error(), Some(invalid));
        }
    }
    let not_json = api
        .send(
            api.request(Method::PUT, &path(&solution, "/hub"), &owner)
                .header("content-type", "application/json")
                .body("{\"id\":"),
        )
        .await;
    assert_eq!(not_json.status, 400, "{not_json:?}");
    assert_eq!(not_json.error(), Some(invalid));
    // Nothing was stored.
    let listed = api.get(&path(&solution, ""), &owner).await;
    assert_eq!(listed.body, json!([]), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_connections_and_other_solutions_connections_are_not_found() {
    let (_broker, acme, other, api) = two_solutions();
    let acme_auth = Auth::basic(&acme);
    let other_auth = Auth::basic(&other);
    let doc = with_id(amqp_connection("q", "guest"), "hub");
    let theirs = api.put(&path(&other, "/hub"), &other_auth, &doc).await;
    assert_eq!(theirs.status, 201, "{theirs:?}");

    for rest in ["/nope", "/nope/status"] {
        let missing = api.get(&path(&acme, rest), &acme_auth).await;
        assert_eq!(missing.status, 404, "{rest}: {missing:?}");
        assert_eq!(missing.error(), Some("connectivity:connection.notfound"));
    }
    let missing = api.delete(&path(&acme, "/nope"), &acme_auth).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error(), Some("connectivity:connection.notfound"));

    // The other solution's connections: not found, whatever the request, and untouched.
    for rest in ["", "/hub", "/hub/status"] {
        let foreign = api.get(&path(&other, rest), &acme_auth).await;
        assert_eq!(foreign.status, 404, "GET {rest}: {foreign:?}");
        assert_eq!(foreign.error(), Some("solutions:solution.notfound"));
    }
    let foreign = api.put(&path(&other, "/hub"), &acme_auth, &doc).await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let foreign = api.post(&path(&other, ""), &acme_auth, &doc).await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let foreign = api.delete(&path(&other, "/hub"), &acme_auth).await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    assert_eq!(
        api.get(&path(&acme, ""), &acme_auth).await.body,
        json!([]),
        "acme has none of its own"
    );
    let still = api.get(&path(&other, "/hub"), &other_auth).await;
    assert_eq!(still.status, 200, "{still:?}");
    // An unknown solution likewise.
    let unknown = api
        .get("/api/2/solutions/nobody/connections", &acme_auth)
        .await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_solution_policy_decides_who_reads_and_who_changes_connections() {
    let (_broker, solution, api) = e2e::bridge::started();
    let owner = Auth::basic(&solution);
    let doc = with_id(amqp_connection("q", "guest"), "hub");
    put_connection(&api, &solution, "hub", &doc).await;
    let policy_path = format!("/api/2/solutions/{}/policy", solution.id);

    // `dev:ops` may read the connections, not change them.
    let mut policy = api.get(&policy_path, &owner).await.body;
    policy["entries"]["ops"] = json!({
        "subjects": {"dev:ops": {"type": "operations staff"}},
        "resources": {"solution:/connections": {"grant": ["READ"], "revoke": []}}
    });
    let set = api.put(&policy_path, &owner, &policy).await;
    assert_eq!(set.status, 204, "{set:?}");
    let ops = jwt_user(&solution, "ops");
    for rest in ["", "/hub", "/hub/status"] {
        let read = api.get(&path(&solution, rest), &ops).await;
        assert_eq!(read.status, 200, "GET {rest}: {read:?}");
    }
    let denied = [
        api.put(&path(&solution, "/hub"), &ops, &doc).await,
        api.post(&path(&solution, ""), &ops, &with_id(doc.clone(), "new"))
            .await,
        api.delete(&path(&solution, "/hub"), &ops).await,
    ];
    for answer in &denied {
        assert_eq!(answer.status, 403, "{answer:?}");
        assert_eq!(answer.error(), Some("solutions:solution.notmodifiable"));
    }
    // Someone the policy does not name reads nothing (not found) and changes nothing.
    let alice = jwt_user(&solution, "alice");
    assert_eq!(api.get(&path(&solution, ""), &alice).await.status, 404);
    assert_eq!(api.get(&path(&solution, "/hub"), &alice).await.status, 404);
    assert_eq!(
        api.put(&path(&solution, "/hub"), &alice, &doc).await.status,
        403
    );

    // Granted WRITE on one connection online: that one only, at once.
    policy["entries"]["ops"]["resources"]["solution:/connections/hub"] =
        json!({"grant": ["WRITE"], "revoke": []});
    let set = api.put(&policy_path, &owner, &policy).await;
    assert_eq!(set.status, 204, "{set:?}");
    let mut renamed = doc.clone();
    renamed["name"] = json!("renamed by ops");
    let changed = api.put(&path(&solution, "/hub"), &ops, &renamed).await;
    assert_eq!(changed.status, 204, "{changed:?}");
    let other = api
        .put(
            &path(&solution, "/other"),
            &ops,
            &with_id(doc.clone(), "other"),
        )
        .await;
    assert_eq!(other.status, 403, "{other:?}");
    assert_eq!(api.delete(&path(&solution, "/hub"), &ops).await.status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_a_running_connections_state_and_counters() {
    let (amqp, queue) = declare_queue("http-metrics").await;
    let (broker, solution, api) = e2e::bridge::started();
    let thing = "org.acme:sensor-1";
    create_thing(&api, &solution, thing, "integration:acme:reader").await;
    put_connection(
        &api,
        &solution,
        "hub",
        &with_id(amqp_connection(&queue, "guest"), "hub"),
    )
    .await;
    wait_status(&api, &solution, "hub", "connected", |_| true).await;

    // One command through the connection: counted in.
    let channel = amqp.create_channel().await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert(
        "device_id".into(),
        AMQPValue::LongString(LongString::from(thing.as_bytes().to_vec())),
    );
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            modify_temp(thing, json!(21), "m-1").to_string().as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_status(&api, &solution, "hub", "connected", |s| {
        e2e::bridge::counter(s, "in") == 1
    })
    .await;

    let metrics = api.get("/metrics", &Auth::None).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body.as_str().unwrap();
    let labels = format!("solution=\"{}\",connection=\"hub\"", solution.id);
    for line in [
        format!("thingsgate_connection_state{{{labels},state=\"connected\"}} 1"),
        format!("thingsgate_connection_state{{{labels},state=\"failed\"}} 0"),
        format!("thingsgate_connection_messages_total{{{labels},kind=\"in\"}} 1"),
        format!("thingsgate_connection_messages_total{{{labels},kind=\"denied\"}} 0"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "`{line}` in /metrics:\n{}",
            text.lines()
                .filter(|l| l.contains("thingsgate_connection_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    drop(broker);
    delete_queue(&amqp, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_valid_credentials_are_401() {
    let (_broker, solution, api) = e2e::bridge::started();
    let doc = with_id(amqp_connection("q", "guest"), "hub");
    let wrong = Auth::Basic {
        solution: solution.id.clone(),
        secret: "not-the-secret".into(),
    };
    for auth in [&Auth::None, &wrong] {
        let answers = [
            api.get(&path(&solution, ""), auth).await,
            api.get(&path(&solution, "/hub"), auth).await,
            api.get(&path(&solution, "/hub/status"), auth).await,
            api.put(&path(&solution, "/hub"), auth, &doc).await,
            api.post(&path(&solution, ""), auth, &doc).await,
            api.delete(&path(&solution, "/hub"), auth).await,
        ];
        for answer in &answers {
            assert_eq!(answer.status, 401, "{auth:?}: {answer:?}");
            assert!(answer.header("www-authenticate").is_some());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_request_is_401_whatever_its_body() {
    let (_broker, solution, api) = e2e::bridge::started();
    for body in [json!("x"), json!({"id": "other"}), json!({"sourcez": []})] {
        let put = api.put(&path(&solution, "/hub"), &Auth::None, &body).await;
        assert_eq!(put.status, 401, "PUT {body}: {put:?}");
        let post = api.post(&path(&solution, ""), &Auth::None, &body).await;
        assert_eq!(post.status, 401, "POST {body}: {post:?}");
    }
}
