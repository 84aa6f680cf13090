//! Solution administration under `/api/2/solutions/{solutionId}` (DESIGN.md §1, §7): each
//! route one [`Admin`] request of the core, which authorizes it by the solution policy and
//! applies it to live connections. A new secret is shown once, in the answer that creates it.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};

use crate::bridge::config::ConnectionDoc;
use crate::core::Core;
use crate::core::admin::{Admin, AdminAnswer};
use crate::http::auth;
use crate::http::twin::ditto_error;

/// The routes of this module.
pub fn routes() -> Router<Arc<Core>> {
    Router::new()
        .route("/api/2/solutions", axum::routing::post(create))
        .route("/api/2/solutions/{solution_id}", get(show))
        .route("/api/2/solutions/{solution_id}/namespaces", get(namespaces))
        .route(
            "/api/2/solutions/{solution_id}/namespaces/{namespace}",
            put(add_namespace).delete(remove_namespace),
        )
        .route(
            "/api/2/solutions/{solution_id}/secrets",
            get(secrets).post(add_secret),
        )
        .route(
            "/api/2/solutions/{solution_id}/secrets/{secret_id}",
            axum::routing::delete(revoke_secret),
        )
        .route(
            "/api/2/solutions/{solution_id}/policy",
            get(policy).put(set_policy),
        )
        .route("/api/2/solutions/{solution_id}/clients", get(clients))
        .route("/api/2/solutions/{solution_id}/usage", get(usage))
        .route(
            "/api/2/solutions/{solution_id}/connections",
            get(connections).post(create_connection),
        )
        .route(
            "/api/2/solutions/{solution_id}/connections/{connection_id}",
            get(connection)
                .put(put_connection)
                .delete(delete_connection),
        )
        .route(
            "/api/2/solutions/{solution_id}/connections/{connection_id}/status",
            get(connection_status),
        )
}

/// Who asks: the core, the peer and the request's headers (for authentication).
struct Caller {
    core: Arc<Core>,
    peer: SocketAddr,
    headers: HeaderMap,
}

impl FromRequestParts<Arc<Core>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, core: &Arc<Core>) -> Result<Self, Response> {
        let ConnectInfo(peer) = ConnectInfo::<SocketAddr>::from_request_parts(parts, core)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Caller {
            core: core.clone(),
            peer,
            headers: parts.headers.clone(),
        })
    }
}

impl Caller {
    /// Authenticates the request and carries out `request` on `solution_id`.
    async fn administer(self, solution_id: &str, request: Admin) -> Response {
        self.administer_with(solution_id, || Ok(request)).await
    }

    /// Authenticates the request, then builds the request from its body (an unauthenticated
    /// request is 401 whatever its body) and carries it out on `solution_id`.
    async fn administer_with(
        self,
        solution_id: &str,
        request: impl FnOnce() -> Result<Admin, Box<Response>>,
    ) -> Response {
        let Caller {
            core,
            peer,
            headers,
        } = self;
        let identity = match auth::authenticate(&core, &headers, peer.ip()).await {
            Ok(identity) => identity,
            Err(u) => return u.into_response(),
        };
        let request = match request() {
            Ok(request) => request,
            Err(response) => return *response,
        };
        let client = core.transient(identity);
        let answer = core.administer(&client, solution_id, request).await;
        core.release(&client);
        match answer {
            Ok(AdminAnswer::Value(value)) => (StatusCode::OK, axum::Json(value)).into_response(),
            Ok(AdminAnswer::Created(value)) => {
                (StatusCode::CREATED, axum::Json(value)).into_response()
            }
            Ok(AdminAnswer::Done) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => ditto_error(&e),
        }
    }
}

type Peer = ConnectInfo<SocketAddr>;

/// What `POST /api/2/solutions` takes.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NewSolution {
    solution_id: Option<String>,
    namespaces: Vec<String>,
}

/// `POST /api/2/solutions` by an operator: a new solution; its API token and first secret
/// are in this answer only.
async fn create(
    State(core): State<Arc<Core>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let operator = match auth::authenticate_operator(&core, &headers, peer.ip()).await {
        Ok(operator) => operator,
        Err(u) => return u.into_response(),
    };
    let request: NewSolution = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return ditto_error(&twin::DittoError::new(
                400,
                "solutions:json.invalid",
                format!("expected {{\"namespaces\": [...], \"solutionId\"?: ...}}: {e}"),
            ));
        }
    };
    match core
        .create_solution(&operator, request.solution_id, request.namespaces)
        .await
    {
        Ok(created) => {
            let location = format!(
                "/api/2/solutions/{}",
                created
                    .get("solutionId")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
            );
            (
                StatusCode::CREATED,
                [(axum::http::header::LOCATION, location)],
                axum::Json(created),
            )
                .into_response()
        }
        Err(e) => ditto_error(&e),
    }
}

async fn show(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Show).await
}

async fn namespaces(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Namespaces).await
}

async fn add_namespace(Path((id, ns)): Path<(String, String)>, caller: Caller) -> Response {
    caller.administer(&id, Admin::AddNamespace(ns)).await
}

async fn remove_namespace(Path((id, ns)): Path<(String, String)>, caller: Caller) -> Response {
    caller.administer(&id, Admin::RemoveNamespace(ns)).await
}

async fn secrets(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Secrets).await
}

async fn add_secret(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::AddSecret).await
}

async fn revoke_secret(Path((id, secret_id)): Path<(String, String)>, caller: Caller) -> Response {
    caller.administer(&id, Admin::RevokeSecret(secret_id)).await
}

async fn policy(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Policy).await
}

async fn set_policy(Path(id): Path<String>, caller: Caller, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    caller.administer(&id, Admin::SetPolicy(text)).await
}

async fn clients(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Clients).await
}

async fn usage(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Usage).await
}

async fn connections(Path(id): Path<String>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Connections).await
}

async fn connection(Path((id, connection)): Path<(String, String)>, caller: Caller) -> Response {
    caller.administer(&id, Admin::Connection(connection)).await
}

async fn connection_status(
    Path((id, connection)): Path<(String, String)>,
    caller: Caller,
) -> Response {
    caller
        .administer(&id, Admin::ConnectionStatus(connection))
        .await
}

async fn delete_connection(
    Path((id, connection)): Path<(String, String)>,
    caller: Caller,
) -> Response {
    caller
        .administer(&id, Admin::DeleteConnection(connection))
        .await
}

/// A connection document from a request body; `id`: the ID it must have (PUT), or the one it
/// gets if it names none (POST).
fn connection_body(
    body: &[u8],
    id: &str,
    must_match: bool,
) -> Result<ConnectionDoc, Box<Response>> {
    let invalid = |message: String| {
        Box::new(ditto_error(
            &twin::DittoError::new(
                400,
                "connectivity:connection.configuration.invalid",
                message,
            )
            .with_description("See the connection format in docs/bridges.md."),
        ))
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(invalid("the body is not a JSON object".into()));
    };
    match object.get("id").and_then(serde_json::Value::as_str) {
        Some(given) if must_match && given != id => {
            return Err(invalid(format!(
                "the document's `id` `{given}` is not the `{id}` of the URL"
            )));
        }
        Some(_) => {}
        None => {
            object.insert("id".into(), serde_json::Value::String(id.to_owned()));
        }
    }
    serde_json::from_value(value).map_err(|e| invalid(format!("not a connection: {e}")))
}

/// `POST …/connections`: a new connection, with a generated ID if it names none.
async fn create_connection(Path(id): Path<String>, caller: Caller, body: Bytes) -> Response {
    let generated = match crate::auth::secret::random_bytes::<4>() {
        Ok(bytes) => format!("c-{}", crate::auth::secret::hex(&bytes)),
        Err(_) => String::from("c-0"),
    };
    let mut created = None;
    let mut response = caller
        .administer_with(&id, || {
            let doc = connection_body(&body, &generated, false)?;
            created = Some(doc.id.clone());
            Ok(Admin::PutConnection(Box::new(doc), true))
        })
        .await;
    if response.status() == StatusCode::CREATED
        && let Some(location) = created
            .map(|c| format!("/api/2/solutions/{id}/connections/{c}"))
            .and_then(|l| axum::http::HeaderValue::from_str(&l).ok())
    {
        response
            .headers_mut()
            .insert(axum::http::header::LOCATION, location);
    }
    response
}

/// `PUT …/connections/{connectionId}`: creates or replaces it.
async fn put_connection(
    Path((id, connection)): Path<(String, String)>,
    caller: Caller,
    body: Bytes,
) -> Response {
    caller
        .administer_with(&id, || {
            let doc = connection_body(&body, &connection, true)?;
            Ok(Admin::PutConnection(Box::new(doc), false))
        })
        .await
}
