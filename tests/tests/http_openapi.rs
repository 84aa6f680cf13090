#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! The OpenAPI document at `/api/2/openapi.json` against the running server (issue 11): every
//! documented operation is called — with the solution's credentials, and without any — and
//! the status it answers must be one the document lists for it; every route the server
//! matched while doing so must be documented.

use std::collections::BTreeSet;

use e2e::broker::Broker;
use e2e::http::{Api, Auth, http_addr};
use reqwest::Method;
use serde_json::{Value, json};

/// A value for each path parameter the document uses.
fn sample(name: &str, solution: &str) -> String {
    match name {
        "thingId" => "org.acme:lamp".into(),
        "attributePath" => "room".into(),
        "featureId" => "power".into(),
        "propertyPath" => "on".into(),
        "messageSubject" => "ping".into(),
        "policyId" => "org.acme:lamp".into(),
        "label" => "owner".into(),
        "subjectId" => format!("iot-things:{solution}"),
        "resourcePath" => "thing:/".into(),
        "importedPolicyId" => "org.acme:other".into(),
        "solutionId" => solution.into(),
        "namespace" => "org.acme.extra".into(),
        "secretId" => "s9".into(),
        "connectionId" => "c9".into(),
        other => panic!("no sample for path parameter `{other}`"),
    }
}

/// `template` with its `{parameters}` filled in.
fn fill(template: &str, solution: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').unwrap() + open;
        out.push_str(&sample(&rest[open + 1..close], solution));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Whether `route` (axum's pattern: `{thing_id}`, `{*path}`) covers documented `path`.
fn covers(route: &str, path: &str) -> bool {
    let route: Vec<&str> = route.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    for (i, segment) in route.iter().enumerate() {
        if segment.starts_with("{*") {
            return path.len() > i;
        }
        match path.get(i) {
            Some(p) if segment.starts_with('{') && p.starts_with('{') => {}
            Some(p) if p == segment => {}
            _ => return false,
        }
    }
    route.len() == path.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_only_documented_statuses() {
    let mut broker = Broker::new();
    let solution = broker.create_solution("org.acme");
    broker.arg("--http").arg("127.0.0.1:0");
    broker.start();
    let api = Api::new(http_addr(&broker));
    let owner = Auth::basic(&solution);

    let doc = api.get("/api/2/openapi.json", &Auth::None).await;
    assert_eq!(doc.status, 200);
    let doc = doc.body;
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().expect("paths");
    // Something to work on.
    let created = api
        .put(
            "/api/2/things/org.acme:lamp",
            &owner,
            &json!({"attributes": {"room": "hall"}, "features": {"power": {"properties": {"on": false}}}}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");

    let order = ["get", "post", "put", "patch", "delete"];
    let mut operations: Vec<(usize, String, String, Value)> = Vec::new();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let rank = order
                .iter()
                .position(|m| m == method)
                .expect("a known method");
            operations.push((rank, path.clone(), method.clone(), op.clone()));
        }
    }
    // Reads first, deletions last; the root of a thing or policy after its parts.
    operations.sort_by(|a, b| {
        (a.0, std::cmp::Reverse(a.1.len())).cmp(&(b.0, std::cmp::Reverse(b.1.len())))
    });
    let mut failures = Vec::new();
    for (_, path, method, op) in &operations {
        if path == "/mqtt" {
            continue; // an upgrade: `mqtt_websocket.rs` tests it
        }
        let documented: BTreeSet<u16> = op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.parse().unwrap())
            .collect();
        let mut url = fill(path, &solution.id);
        if path.contains("/messages/") {
            url.push_str("?timeout=0");
        }
        let open = op.get("security").is_some_and(|s| s == &json!([]));
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let with_body = |builder: reqwest::RequestBuilder, method: &Method| match *method {
            Method::PUT | Method::POST => builder.header("content-type", "application/json").body(
                if path.ends_with("/policy")
                    || path.starts_with("/api/2/policies/{policyId}")
                        && !path.contains("entries/")
                        && !path.contains("imports")
                {
                    "{}".to_owned()
                } else {
                    "\"x\"".to_owned()
                },
            ),
            Method::PATCH => builder
                .header("content-type", "application/merge-patch+json")
                .body("{}"),
            _ => builder,
        };
        for (who, auth) in [("owner", &owner), ("nobody", &Auth::None)] {
            let answer = api
                .send(with_body(api.request(method.clone(), &url, auth), &method))
                .await;
            if !documented.contains(&answer.status) {
                failures.push(format!(
                    "{method} {url} as {who}: {} is not among {documented:?} ({})",
                    answer.status, answer.body
                ));
            }
            if who == "nobody" && !open && answer.status != 401 {
                failures.push(format!(
                    "{method} {url} without credentials: {}",
                    answer.status
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Every route the server matched is documented.
    let metrics = api.get("/metrics", &Auth::None).await.body;
    let text = metrics.as_str().unwrap_or_default();
    for line in text
        .lines()
        .filter(|l| l.starts_with("thingsgate_http_requests_total{"))
    {
        let route = line
            .split("route=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap();
        if route == "unmatched" {
            continue;
        }
        assert!(
            paths.keys().any(|p| covers(route, p)),
            "route `{route}` is not in the OpenAPI document"
        );
    }
}
