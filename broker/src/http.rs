//! The HTTP listener (axum): for now the operational endpoints — `/metrics` (Prometheus text
//! format), `/health` (the process serves) and `/ready` (listeners bound, not shutting down).
//! The Ditto-compatible API joins it in a later release.

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
        core.metrics.encode(),
    )
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(core): State<Arc<Core>>) -> (StatusCode, &'static str) {
    if *core.shutdown.borrow() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Binds `address` and serves until the broker shuts down; returns the bound address.
pub async fn start(core: Arc<Core>, address: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on `{address}`: {e}")))?;
    let bound = listener.local_addr()?;
    let mut shutdown = core.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(core);
    tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    });
    Ok(bound)
}
