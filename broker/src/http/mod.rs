//! The HTTP adapter (axum, DESIGN.md §7): the Ditto-compatible API under `/api/2`
//! (`twin.rs`: things and policies), authenticated per request (`auth.rs`), and the
//! operational endpoints — `/metrics` (Prometheus text format), `/health` (the process serves)
//! and `/ready` (listeners bound, not shutting down). Like every adapter it decides nothing:
//! each request is a call of the core.

pub mod auth;
pub mod messages;
pub mod solutions;
pub mod sse;
pub mod twin;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::core::Core;

async fn metrics(State(core): State<Arc<Core>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        core.metrics_text(),
    )
}

/// The OpenAPI document of this API (`tests/tests/http_openapi.rs` checks it against the
/// running server).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(core): State<Arc<Core>>) -> (StatusCode, String) {
    if *core.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    // A cluster node that cannot reach NATS, or lags behind its stream, refuses writes and
    // checks (fail closed): a load balancer should send clients elsewhere.
    match core.twins.store.current() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
    }
}

/// Counts each request by its route (the matched pattern, never the raw path) and status.
async fn count(
    State(core): State<Arc<Core>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    core.metrics
        .http_request(route, method, response.status().as_u16());
    response
}

/// Binds `address` and serves until the broker shuts down; returns the bound address.
pub async fn start(
    core: Arc<Core>,
    websocket: crate::mqtt::websocket::Endpoint,
    address: &str,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on `{address}`: {e}")))?;
    let bound = listener.local_addr()?;
    let mut shutdown = core.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/api/2/openapi.json", get(openapi))
        .merge(twin::routes())
        .merge(solutions::routes())
        .route(
            crate::mqtt::websocket::PATH,
            crate::mqtt::websocket::route(websocket),
        )
        .layer(axum::middleware::from_fn_with_state(core.clone(), count))
        .with_state(core);
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    });
    Ok(bound)
}
