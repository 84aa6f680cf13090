#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The HTTP API against the real `thingsgate serve --http` (issue 11; DESIGN.md §2 and §7, the
//! seed's solution identification): authentication and solution identification per request,
//! the Ditto-compatible things and policies routes with their status codes, errors, entity
//! tags and partial views — decided by the same core as MQTT, so an MQTT write is seen over
//! HTTP and an HTTP write reaches MQTT subscribers, each cut to its reader's view.

use std::time::Duration;

use broker::mqtt::codec::{Protocol, QoS};
use e2e::broker::Solution;
use e2e::http::{Api, Auth, http_addr, started_with_http as started};
use e2e::issuer::{SOLUTION_CLAIM, dev_issuer};
use e2e::protocol_support::{connected, expect_publish, opts, publish_qos1, subscribe_ok, text};
use serde_json::{Value, json};

const HOUR: Duration = Duration::from_secs(3600);

/// A token of the dev issuer for `sub`, naming `solution` in its claim.
fn token_with_claim(sub: &str, solution: &Solution) -> String {
    let mut claims = dev_issuer().claims(sub, HOUR);
    claims.insert(SOLUTION_CLAIM.into(), json!(solution.id));
    dev_issuer().sign(&claims)
}

/// The lamp's policy: the solution owns everything; `dev:alice` reads the attributes but not
/// `secret`; `dev:bob` may change `features/power` only.
fn lamp_policy(solution: &Solution) -> Value {
    json!({
        "entries": {
            "owner": {
                "subjects": {format!("iot-things:{}", solution.id): {"type": "solution"}},
                "resources": {
                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "message:/": {"grant": ["READ", "WRITE"], "revoke": []}
                }
            },
            "viewer": {
                "subjects": {"dev:alice": {"type": "user"}},
                "resources": {
                    "thing:/attributes": {"grant": ["READ"], "revoke": []},
                    "thing:/attributes/secret": {"grant": [], "revoke": ["READ"]}
                }
            },
            "operator": {
                "subjects": {"dev:bob": {"type": "user"}},
                "resources": {
                    "thing:/features/power": {"grant": ["READ", "WRITE"], "revoke": []}
                }
            }
        }
    })
}

/// Creates policy and thing `org.acme:lamp` over HTTP with the solution's secret.
async fn create_lamp(api: &Api, solution: &Solution) {
    let owner = Auth::basic(solution);
    let created = api
        .put(
            "/api/2/policies/org.acme:lamp",
            &owner,
            &lamp_policy(solution),
        )
        .await;
    assert_eq!(created.status, 201, "policy created: {created:?}");
    let created = api
        .put(
            "/api/2/things/org.acme:lamp",
            &owner,
            &json!({
                "policyId": "org.acme:lamp",
                "attributes": {"room": "hall", "secret": "s3"},
                "features": {"power": {"properties": {"on": false}}}
            }),
        )
        .await;
    assert_eq!(created.status, 201, "thing created: {created:?}");
    assert_eq!(
        created.header("location"),
        Some("/api/2/things/org.acme:lamp")
    );
    assert_eq!(created.header("etag"), Some("\"rev:1\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_valid_credentials_are_401_and_the_api_token_alone_grants_nothing() {
    let (_broker, solution, api) = started();
    let path = "/api/2/things/org.acme:lamp";
    let wrong_secret = Auth::Basic {
        solution: solution.id.clone(),
        secret: "not-the-secret".into(),
    };
    let bad_token = Auth::bearer(
        &dev_issuer().tampered(&dev_issuer().claims("alice", HOUR)),
        Some(&solution.api_token),
    );
    // A good token that names no solution, without the API token: not identified.
    let unidentified = Auth::bearer(&dev_issuer().token("alice", HOUR), None);
    for (what, auth) in [
        ("no credentials", Auth::None),
        (
            "only the API token",
            Auth::ApiTokenOnly(solution.api_token.clone()),
        ),
        ("a wrong secret", wrong_secret),
        ("a tampered token", bad_token),
        ("a token without solution or API token", unidentified),
    ] {
        let answer = api.get(path, &auth).await;
        assert_eq!(answer.status, 401, "{what}: {answer:?}");
        assert!(
            answer
                .header("www-authenticate")
                .is_some_and(|c| c.contains("Basic") && c.contains("Bearer")),
            "{what}: the challenge names both schemes: {answer:?}"
        );
        assert_eq!(answer.error(), Some("gateway:authentication.failed"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn things_and_their_parts_follow_dittos_methods_status_codes_and_entity_tags() {
    let (_broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let owner = Auth::basic(&solution);

    let got = api.get("/api/2/things/org.acme:lamp", &owner).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body["thingId"], "org.acme:lamp");
    assert_eq!(got.body["attributes"]["room"], "hall");
    assert_eq!(got.header("etag"), Some("\"rev:1\""));
    let fields = api
        .get(
            "/api/2/things/org.acme:lamp?fields=attributes/room,_revision",
            &owner,
        )
        .await;
    assert_eq!(
        fields.body,
        json!({"attributes": {"room": "hall"}, "_revision": 1})
    );

    // Conditional requests.
    let unchanged = api
        .send(
            api.request(reqwest::Method::GET, "/api/2/things/org.acme:lamp", &owner)
                .header("if-none-match", "\"rev:1\""),
        )
        .await;
    assert_eq!(unchanged.status, 304);
    let stale = api
        .send(
            api.request(
                reqwest::Method::PUT,
                "/api/2/things/org.acme:lamp/attributes/room",
                &owner,
            )
            .header("if-match", "\"rev:7\"")
            .body("\"kitchen\""),
        )
        .await;
    assert_eq!(stale.status, 412, "{stale:?}");
    assert_eq!(stale.error(), Some("things:condition.failed"));

    // Sub-resources: a new attribute (201), a changed one (204), a merge, a delete.
    let created = api
        .put(
            "/api/2/things/org.acme:lamp/attributes/floor",
            &owner,
            &json!(2),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.body, json!(2));
    let changed = api
        .put(
            "/api/2/things/org.acme:lamp/features/power/properties/on",
            &owner,
            &json!(true),
        )
        .await;
    assert_eq!(changed.status, 204, "{changed:?}");
    assert_eq!(changed.header("etag"), Some("\"rev:3\""));
    let not_merge = api
        .send(
            api.request(
                reqwest::Method::PATCH,
                "/api/2/things/org.acme:lamp",
                &owner,
            )
            .header("content-type", "application/json")
            .body("{}"),
        )
        .await;
    assert_eq!(not_merge.status, 415, "{not_merge:?}");
    let merged = api
        .patch(
            "/api/2/things/org.acme:lamp",
            &owner,
            &json!({"attributes": {"floor": null, "color": "red"}}),
        )
        .await;
    assert_eq!(merged.status, 204, "{merged:?}");
    let deleted = api
        .delete("/api/2/things/org.acme:lamp/attributes/color", &owner)
        .await;
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let attributes = api
        .get("/api/2/things/org.acme:lamp/attributes", &owner)
        .await;
    assert_eq!(attributes.body, json!({"room": "hall", "secret": "s3"}));
    let missing = api
        .get("/api/2/things/org.acme:lamp/attributes/color", &owner)
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error(), Some("things:attribute.notfound"));

    // Bad requests: an invalid ID, a path that addresses nothing, a body that is not JSON.
    let bad_id = api.get("/api/2/things/no-namespace", &owner).await;
    assert_eq!(
        (bad_id.status, bad_id.error()),
        (400, Some("things:id.invalid"))
    );
    let bad_path = api.get("/api/2/things/org.acme:lamp/nowhere", &owner).await;
    assert_eq!(
        (bad_path.status, bad_path.error()),
        (400, Some("things:path.invalid"))
    );
    let not_json = api
        .send(
            api.request(
                reqwest::Method::PUT,
                "/api/2/things/org.acme:lamp/attributes/x",
                &owner,
            )
            .body("{oops"),
        )
        .await;
    assert_eq!(
        (not_json.status, not_json.error()),
        (400, Some("things:json.invalid"))
    );

    // The thing goes, and is gone.
    let gone = api.delete("/api/2/things/org.acme:lamp", &owner).await;
    assert_eq!(gone.status, 204);
    let after = api.get("/api/2/things/org.acme:lamp", &owner).await;
    assert_eq!(
        (after.status, after.error()),
        (404, Some("things:thing.notfound"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_cut_to_the_callers_view_and_denied_writes_are_403_as_over_mqtt() {
    let (_broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    // Alice: a token naming the solution in its claim. Bob: a token plus the API token.
    let alice = Auth::bearer(&token_with_claim("alice", &solution), None);
    let bob = Auth::bearer(&dev_issuer().token("bob", HOUR), Some(&solution.api_token));

    let seen = api.get("/api/2/things/org.acme:lamp", &alice).await;
    assert_eq!(seen.status, 200, "{seen:?}");
    assert_eq!(
        seen.body,
        json!({"thingId": "org.acme:lamp", "attributes": {"room": "hall"}}),
        "alice reads the attributes but not `secret` nor the features (and the thing's ID: \
         DESIGN.md §1 rule 6)"
    );
    let secret = api
        .get("/api/2/things/org.acme:lamp/attributes/secret", &alice)
        .await;
    assert_eq!(
        (secret.status, secret.error()),
        (404, Some("things:attribute.notfound")),
        "{secret:?}"
    );
    let write = api
        .put(
            "/api/2/things/org.acme:lamp/attributes/room",
            &alice,
            &json!("attic"),
        )
        .await;
    assert_eq!(
        (write.status, write.error()),
        (403, Some("things:attribute.notmodifiable")),
        "{write:?}"
    );

    let switched = api
        .put(
            "/api/2/things/org.acme:lamp/features/power/properties/on",
            &bob,
            &json!(true),
        )
        .await;
    assert_eq!(
        switched.status, 204,
        "bob may switch the lamp: {switched:?}"
    );
    let hidden = api
        .get("/api/2/things/org.acme:lamp/attributes", &bob)
        .await;
    assert_eq!(hidden.status, 404, "bob cannot read attributes: {hidden:?}");

    // `GET /things?ids=` lists what each caller may see.
    let listed = api
        .get("/api/2/things?ids=org.acme:lamp,org.acme:missing", &alice)
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(
        listed.body,
        json!([{"thingId": "org.acme:lamp", "attributes": {"room": "hall"}}])
    );
    let no_ids = api.get("/api/2/things", &alice).await;
    assert_eq!(
        (no_ids.status, no_ids.error()),
        (400, Some("things:ids.missing"))
    );

    // The policy: alice may not read it, the owner may, cut to nothing more than it holds.
    let policy = api.get("/api/2/policies/org.acme:lamp", &alice).await;
    assert_eq!(policy.status, 404, "{policy:?}");
    let entry = api
        .get(
            "/api/2/policies/org.acme:lamp/entries/viewer/subjects",
            &Auth::basic(&solution),
        )
        .await;
    assert_eq!(entry.body, json!({"dev:alice": {"type": "user"}}));
    // The owner takes alice's READ of the room away: her next read no longer shows it.
    let revoked = api
        .put(
            "/api/2/policies/org.acme:lamp/entries/viewer/resources/thing:/attributes/room",
            &Auth::basic(&solution),
            &json!({"grant": [], "revoke": ["READ"]}),
        )
        .await;
    assert!(
        revoked.status == 201 || revoked.status == 204,
        "{revoked:?}"
    );
    let seen = api.get("/api/2/things/org.acme:lamp", &alice).await;
    assert_eq!(
        seen.body,
        json!({"thingId": "org.acme:lamp", "attributes": {}}),
        "READ still holds on `attributes`, on nothing inside: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thing_posted_without_an_id_gets_a_generated_one_in_the_solutions_namespace() {
    let (_broker, solution, api) = started();
    let owner = Auth::basic(&solution);
    let posted = api
        .post("/api/2/things", &owner, &json!({"attributes": {"a": 1}}))
        .await;
    assert_eq!(posted.status, 201, "{posted:?}");
    let location = posted.header("location").unwrap().to_owned();
    let id = location.strip_prefix("/api/2/things/").unwrap();
    assert!(id.starts_with("org.acme:"), "{id}");
    assert_eq!(posted.body["thingId"], id);
    let got = api.get(&location, &owner).await;
    assert_eq!(got.body["attributes"], json!({"a": 1}));
    let foreign = api
        .post("/api/2/things?namespace=org.other", &owner, &json!({}))
        .await;
    assert!(
        foreign.status == 403 || foreign.status == 404,
        "a namespace of no solution's: {foreign:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_write_is_read_over_http_and_an_http_write_reaches_mqtt_subscribers_cut_to_their_view()
 {
    let (broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let addr = broker.mqtt_addr();
    // MQTT → HTTP.
    let mut device = connected(addr, Protocol::V5, "device", &solution).await;
    assert_eq!(
        publish_qos1(
            &mut device,
            "org.acme/lamp/things/twin/commands/modify/attributes/room",
            b"\"cellar\"",
            1
        )
        .await,
        0
    );
    let room = api
        .get(
            "/api/2/things/org.acme:lamp/attributes/room",
            &Auth::basic(&solution),
        )
        .await;
    assert_eq!(room.body, json!("cellar"));
    // HTTP → MQTT: alice's subscription sees the attributes change without `secret`.
    let alice_token = token_with_claim("alice", &solution);
    let mut connect = e2e::protocol_support::login(Protocol::V5, "alice-app", &solution);
    connect.username = None;
    connect.password = Some(bytes::Bytes::from(alice_token.clone()));
    let (mut alice, _) = e2e::protocol_support::connect_ok(addr, connect).await;
    subscribe_ok(
        &mut alice,
        "org.acme/lamp/things/twin/events/#",
        opts(QoS::AtLeastOnce),
    )
    .await;
    let merged = api
        .patch(
            "/api/2/things/org.acme:lamp/attributes",
            &Auth::basic(&solution),
            &json!({"room": "loft", "secret": "s4"}),
        )
        .await;
    assert_eq!(merged.status, 204, "{merged:?}");
    let event = expect_publish(&mut alice).await;
    assert_eq!(
        event.topic.as_str(),
        "org.acme/lamp/things/twin/events/merged/attributes"
    );
    let payload: Value = serde_json::from_str(&text(&event)).unwrap();
    assert_eq!(
        payload["value"],
        json!({"room": "loft"}),
        "the event is cut to alice's view: {payload}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_stream_each_change_cut_to_the_readers_view_and_resume_from_last_event_id()
 {
    let (broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let owner = Auth::basic(&solution);
    let alice = Auth::bearer(&token_with_claim("alice", &solution), None);
    let mut owner_events = api.events("/api/2/things", &owner, None).await;
    let mut alice_events = api
        .events("/api/2/things?ids=org.acme:lamp", &alice, None)
        .await;
    let mut alice_fields = api
        .events(
            "/api/2/things?namespaces=org.acme&fields=thingId,attributes/room",
            &alice,
            None,
        )
        .await;

    // An MQTT device changes the attributes; then an HTTP write changes the feature.
    let mut device = connected(broker.mqtt_addr(), Protocol::V5, "device", &solution).await;
    assert_eq!(
        publish_qos1(
            &mut device,
            "org.acme/lamp/things/twin/commands/merge/attributes",
            br#"{"room":"loft","secret":"s9"}"#,
            1
        )
        .await,
        0
    );
    let switched = api
        .put(
            "/api/2/things/org.acme:lamp/features/power/properties/on",
            &owner,
            &json!(true),
        )
        .await;
    assert_eq!(switched.status, 204);

    let (id, first) = owner_events.next().await;
    assert_eq!(first["thingId"], "org.acme:lamp");
    assert_eq!(
        first["attributes"],
        json!({"room": "loft", "secret": "s9"}),
        "{first}"
    );
    assert_eq!(first["_revision"], 2);
    let id = id.expect("each event has an id");
    let (_, second) = owner_events.next().await;
    assert_eq!(
        second["features"],
        json!({"power": {"properties": {"on": true}}})
    );

    let (_, seen) = alice_events.next().await;
    assert_eq!(
        seen["attributes"],
        json!({"room": "loft"}),
        "alice's stream is cut to her view: {seen}"
    );
    assert!(
        alice_events
            .next_within(Duration::from_millis(700))
            .await
            .is_none(),
        "alice may not read the feature: its change is not streamed to her"
    );
    let (_, selected) = alice_fields.next().await;
    assert_eq!(
        selected,
        json!({"thingId": "org.acme:lamp", "attributes": {"room": "loft"}})
    );

    // Coming back with the first event's ID: the thing's current state, cut to the view.
    let mut resumed = api.events("/api/2/things", &alice, Some(&id)).await;
    let (_, state) = resumed.next().await;
    assert_eq!(state["thingId"], "org.acme:lamp");
    assert_eq!(state["attributes"], json!({"room": "loft"}), "{state}");
    assert!(state.get("features").is_none(), "{state}");

    // Over the API, an unauthenticated stream is refused like any request.
    let refused = api
        .send(
            api.request(reqwest::Method::GET, "/api/2/things", &Auth::None)
                .header("accept", "text/event-stream"),
        )
        .await;
    assert_eq!(refused.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_message_over_http_reaches_the_device_and_returns_its_answer() {
    let (broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let owner = Auth::basic(&solution);
    let mut device = connected(broker.mqtt_addr(), Protocol::V5, "device", &solution).await;
    subscribe_ok(
        &mut device,
        "org.acme/lamp/things/live/messages/#",
        opts(QoS::AtLeastOnce),
    )
    .await;

    // Fire and forget: 202 once routed.
    let sent = api
        .send(
            api.request(
                reqwest::Method::POST,
                "/api/2/things/org.acme:lamp/inbox/messages/blink?timeout=0",
                &owner,
            )
            .header("content-type", "text/plain")
            .body("twice"),
        )
        .await;
    assert_eq!(sent.status, 202, "{sent:?}");
    let blink = expect_publish(&mut device).await;
    assert_eq!(
        blink.topic.as_str(),
        "org.acme/lamp/things/live/messages/blink"
    );
    assert_eq!(text(&blink), "twice");
    assert_eq!(
        blink.properties.content_type.as_ref().map(|t| t.as_str()),
        Some("text/plain")
    );
    e2e::protocol_support::ack_if_needed(&mut device, &blink).await;

    // A question: the device answers on the reply address with the correlation data.
    let question = tokio::spawn({
        let api = api.clone();
        let owner = owner.clone();
        async move {
            api.send(
                api.request(
                    reqwest::Method::POST,
                    "/api/2/things/org.acme:lamp/features/power/inbox/messages/switch?timeout=10",
                    &owner,
                )
                .header("content-type", "application/json")
                .body(r#"{"on":true}"#),
            )
            .await
        }
    });
    let asked = expect_publish(&mut device).await;
    assert_eq!(
        asked.topic.as_str(),
        "org.acme/lamp/things/live/messages/switch/features/power"
    );
    e2e::protocol_support::ack_if_needed(&mut device, &asked).await;
    let reply_to = asked
        .properties
        .response_topic
        .clone()
        .expect("the message carries a reply address");
    let mut answer = e2e::protocol_support::publish(
        reply_to.as_str(),
        br#"{"switched":true}"#,
        e2e::protocol_support::qos1(7),
    );
    answer.properties.correlation_data = asked.properties.correlation_data.clone();
    answer.properties.content_type = Some(e2e::raw::utf8("application/json"));
    answer.properties.user_properties = vec![(e2e::raw::utf8("status"), e2e::raw::utf8("200"))];
    device
        .send(&broker::mqtt::codec::Packet::Publish(answer))
        .await;
    assert_eq!(
        e2e::protocol_support::expect_puback(&mut device, 7).await,
        0
    );
    let answered = question.await.unwrap();
    assert_eq!(answered.status, 200, "{answered:?}");
    assert_eq!(answered.body, json!({"switched": true}));
    assert_eq!(answered.header("content-type"), Some("application/json"));

    // The reply address is gone once answered: a second answer is refused.
    assert_eq!(
        publish_qos1(&mut device, reply_to.as_str(), b"late", 8).await,
        0x87
    );
    // Nobody answers: 408 within the timeout.
    let unanswered = api
        .send(
            api.request(
                reqwest::Method::POST,
                "/api/2/things/org.acme:lamp/inbox/messages/ping?timeout=1",
                &owner,
            )
            .body("?"),
        )
        .await;
    assert_eq!(unanswered.status, 408, "{unanswered:?}");
    // Bob may not send messages to the lamp: 403 with Ditto's error, nothing routed.
    let bob = Auth::bearer(&dev_issuer().token("bob", HOUR), Some(&solution.api_token));
    let denied = api
        .send(
            api.request(
                reqwest::Method::POST,
                "/api/2/things/org.acme:lamp/inbox/messages/switch?timeout=0",
                &bob,
            )
            .body("{}"),
        )
        .await;
    assert_eq!(denied.status, 403, "{denied:?}");
    let ping = expect_publish(&mut device).await;
    assert_eq!(
        ping.topic.as_str(),
        "org.acme/lamp/things/live/messages/ping"
    );
    e2e::protocol_support::assert_silent(&mut device, "bob's denied message was routed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_requests_decisions_the_cache_and_the_journal() {
    let (broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let mut device = connected(broker.mqtt_addr(), Protocol::V5, "device", &solution).await;
    assert_eq!(
        publish_qos1(
            &mut device,
            "org.acme/lamp/things/twin/commands/modify/attributes/room",
            b"\"attic\"",
            1
        )
        .await,
        0
    );
    let alice = Auth::bearer(&token_with_claim("alice", &solution), None);
    let denied = api
        .put(
            "/api/2/things/org.acme:lamp/attributes/room",
            &alice,
            &json!("x"),
        )
        .await;
    assert_eq!(denied.status, 403);
    let metrics = api.get("/metrics", &Auth::None).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body.as_str().unwrap_or_default().to_owned();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{line_start}` in the metrics:\n{text}"))
    };
    let solution_label = format!("solution=\"{}\"", solution.id);
    assert_eq!(
        value(&format!(
            "thingsgate_connections{{protocol=\"mqtt\",{solution_label}}}"
        )),
        1.0
    );
    assert!(value("thingsgate_messages_in_total{kind=\"command\"}") >= 3.0);
    assert!(
        value(&format!(
            "thingsgate_authorizations_total{{{solution_label},outcome=\"denied\"}}"
        )) >= 1.0
    );
    assert!(
        value(&format!(
            "thingsgate_authorizations_total{{{solution_label},outcome=\"allowed\"}}"
        )) >= 3.0
    );
    assert!(value("thingsgate_journal_fsync_seconds_count") >= 3.0);
    assert!(value("thingsgate_journal_batch_writes_count") >= 3.0);
    assert!(value("thingsgate_policy_cache_size") >= 1.0);
    assert!(value("thingsgate_policy_cache_lookups_total{result=\"hit\"}") >= 1.0);
    assert!(
        value(
            "thingsgate_http_requests_total{route=\"/api/2/things/{thing_id}/{*path}\",method=\"PUT\",status=\"403\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"));
    assert!(
        !text.contains(&solution.secret) && !text.contains(&solution.api_token),
        "no credential in the metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_of_any_kind_reaches_the_log_over_http() {
    let (broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let token = token_with_claim("alice", &solution);
    let plain_token = dev_issuer().token("bob", HOUR);
    let tampered = dev_issuer().tampered(&dev_issuer().claims("mallory", HOUR));
    let wrong = "wrong-secret-0123456789abcdef";
    for auth in [
        Auth::basic(&solution),
        Auth::bearer(&token, None),
        Auth::bearer(&plain_token, Some(&solution.api_token)),
        Auth::bearer(&tampered, Some(&solution.api_token)),
        Auth::Basic {
            solution: solution.id.clone(),
            secret: wrong.into(),
        },
        Auth::ApiTokenOnly(solution.api_token.clone()),
    ] {
        let _ = api.get("/api/2/things/org.acme:lamp", &auth).await;
        let _ = api
            .put(
                "/api/2/things/org.acme:lamp/attributes/room",
                &auth,
                &json!("den"),
            )
            .await;
    }
    // A created secret is answered once and never logged either.
    let created = api
        .post(
            &format!("/api/2/solutions/{}/secrets", solution.id),
            &Auth::basic(&solution),
            &json!({}),
        )
        .await;
    let new_secret = created.body["secret"].as_str().unwrap().to_owned();
    broker.assert_logs_never_contain(&[
        &solution.secret,
        &solution.api_token,
        &token,
        e2e::issuer::signature_of(&token),
        &plain_token,
        e2e::issuer::signature_of(&plain_token),
        e2e::issuer::signature_of(&tampered),
        wrong,
        &new_secret,
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_loses_no_write_acknowledged_over_http() {
    let (mut broker, solution, api) = started();
    let owner = Auth::basic(&solution);
    let created = api
        .put(
            "/api/2/things/org.acme:counter",
            &owner,
            &json!({"attributes": {}}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    // Writers keep writing while the broker is told to stop.
    let mut writers = Vec::new();
    for w in 0..4 {
        let api = api.clone();
        let owner = owner.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for n in 0..10_000u32 {
                let answer = api
                    .try_send(
                        api.request(
                            reqwest::Method::PUT,
                            &format!("/api/2/things/org.acme:counter/attributes/w{w}-{n}"),
                            &owner,
                        )
                        .header("content-type", "application/json")
                        .body(n.to_string())
                        .timeout(Duration::from_secs(5)),
                    )
                    .await;
                match answer {
                    Some(a) if a.status == 201 => acknowledged.push(format!("w{w}-{n}")),
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopped = broker.stop();
    assert!(stopped.success(), "a graceful stop: {stopped}");
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    broker.start();
    let api = Api::new(http_addr(&broker));
    let attributes = api
        .get("/api/2/things/org.acme:counter/attributes", &owner)
        .await;
    assert_eq!(attributes.status, 200);
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|key| attributes.body.get(key.as_str()).is_none())
        .collect();
    assert!(
        !acknowledged.is_empty() && missing.is_empty(),
        "{} writes acknowledged before the stop, missing after the restart: {missing:?}",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_and_sse_filters_evaluate_rql_on_what_the_requester_may_read() {
    let (_broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let owner = Auth::basic(&solution);
    let alice = Auth::bearer(&token_with_claim("alice", &solution), None);
    let get = |condition: &str| {
        format!(
            "/api/2/things/org.acme:lamp?condition={}",
            urlencode(condition)
        )
    };
    assert_eq!(
        api.get(&get(r#"eq(attributes/room,"hall")"#), &owner)
            .await
            .status,
        200
    );
    let failed = api
        .get(&get(r#"eq(attributes/room,"cellar")"#), &owner)
        .await;
    assert_eq!(
        (failed.status, failed.error()),
        (412, Some("things:condition.failed")),
        "{failed:?}"
    );
    // Alice may not read `secret`: for her it does not exist.
    assert_eq!(
        api.get(&get("exists(attributes/secret)"), &owner)
            .await
            .status,
        200
    );
    assert_eq!(
        api.get(&get("exists(attributes/secret)"), &alice)
            .await
            .status,
        412
    );
    let bad = api.get(&get("eq(attributes/room"), &owner).await;
    assert_eq!(
        (bad.status, bad.error()),
        (400, Some("rql.expression.invalid"))
    );
    // A conditional change: applied only while the condition holds.
    let put = |condition: &str| {
        format!(
            "/api/2/things/org.acme:lamp/attributes/room?condition={}",
            urlencode(condition)
        )
    };
    assert_eq!(
        api.put(&put("gt(_revision,5)"), &owner, &json!("x"))
            .await
            .status,
        412
    );
    assert_eq!(
        api.put(&put("ge(_revision,1)"), &owner, &json!("attic"))
            .await
            .status,
        204
    );

    // SSE: only the changes that satisfy the filter.
    let mut events = api
        .events(
            &format!(
                "/api/2/things?filter={}",
                urlencode(r#"eq(attributes/room,"loft")"#)
            ),
            &owner,
            None,
        )
        .await;
    for room in ["cellar", "loft"] {
        let changed = api
            .put(
                "/api/2/things/org.acme:lamp/attributes/room",
                &owner,
                &json!(room),
            )
            .await;
        assert_eq!(changed.status, 204);
    }
    let (_, event) = events.next().await;
    assert_eq!(event["attributes"], json!({"room": "loft"}), "{event}");
    assert!(
        events
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "nothing else passes the filter"
    );
}

/// Percent-encodes a query parameter value.
fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_live_messages_and_solution_requests_get_clear_errors() {
    let (_broker, solution, api) = started();
    create_lamp(&api, &solution).await;
    let owner = Auth::basic(&solution);
    for (method, path, status, error) in [
        (
            reqwest::Method::POST,
            "/api/2/things/org.acme:lamp/inbox/messages/ping?timeout=soon",
            400,
            "messages:timeout.invalid",
        ),
        (
            reqwest::Method::POST,
            "/api/2/things/org.acme:lamp/inbox/messages/a/b",
            400,
            "messages:subject.invalid",
        ),
        (
            reqwest::Method::GET,
            "/api/2/things/org.acme:lamp/inbox/messages/ping",
            405,
            "method.notallowed",
        ),
    ] {
        let answer = api
            .send(api.request(method.clone(), path, &owner).body("{}"))
            .await;
        assert_eq!(
            (answer.status, answer.error()),
            (status, Some(error)),
            "{method} {path}: {answer:?}"
        );
    }
    let bad = api
        .send(
            api.request(reqwest::Method::POST, "/api/2/solutions", &Auth::None)
                .body("not json"),
        )
        .await;
    assert_eq!(bad.status, 401, "operators only, before the body is read");
}
