//! The Ditto-compatible twin API under `/api/2` (DESIGN.md §7): things and their
//! sub-resources, policies and theirs. Each request becomes one core command — GET retrieve,
//! PUT modify (which creates what is missing), PATCH merge (`application/merge-patch+json`),
//! DELETE delete, POST on `/things` a create with a generated name — executed for the request's
//! identity by [`Core::execute`] exactly as an MQTT command is: the same authorization, the
//! same partial views, the same Ditto errors. The answer goes into the request's own transient
//! session and is read back from there; this module only maps HTTP onto commands and answers
//! onto HTTP (status, body, `ETag`, `Location`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde::Deserialize;
use serde_json::Value;
use twin::command::{Action, Command, CommandHeaders, EntityTags, PolicyCommand, ThingCommand};
use twin::path::ThingPath;
use twin::protocol::envelope::Envelope;
use twin::protocol::message::LiveMessage;
use twin::{DittoError, PolicyId, ThingId};

use crate::core::{Core, Identity, Outcome, ReplyTo, Request};
use crate::http::auth::{self, Unauthenticated};
use crate::http::{messages, sse};
use crate::mqtt::codec::TopicName;

/// The routes of this module.
pub fn routes() -> Router<Arc<Core>> {
    Router::new()
        .route("/api/2/things", get(list_things).post(create_thing))
        .route("/api/2/things/{thing_id}", any(thing))
        .route("/api/2/things/{thing_id}/{*path}", any(thing_part))
        .route("/api/2/policies/{policy_id}", any(policy))
        .route("/api/2/policies/{policy_id}/{*path}", any(policy_part))
}

/// The query parameters the twin API reads.
#[derive(Debug, Default, Deserialize)]
pub struct TwinQuery {
    /// Ditto's field selector for retrieves.
    fields: Option<String>,
    /// `GET /things?ids=a,b`.
    ids: Option<String>,
    /// `POST /things?namespace=…`: where the generated thing goes.
    namespace: Option<String>,
    /// SSE: the namespaces whose things are streamed (comma-separated).
    namespaces: Option<String>,
    /// Live messages: seconds to wait for the answer (0: do not wait).
    timeout: Option<String>,
    /// Ditto's conditional requests: an RQL expression the thing must satisfy.
    condition: Option<String>,
    /// SSE: an RQL expression each streamed change must satisfy.
    filter: Option<String>,
}

/// A Ditto error as an HTTP response: its status and its JSON.
pub fn ditto_error(error: &DittoError) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(error.to_json())).into_response()
}

/// Why a request went no further than its own parsing.
enum Refused {
    Unauthenticated(Unauthenticated),
    Error(DittoError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Unauthenticated(u) => u.into_response(),
            Refused::Error(e) => ditto_error(&e),
        }
    }
}

impl From<DittoError> for Refused {
    fn from(e: DittoError) -> Self {
        Refused::Error(e)
    }
}

/// Everything a twin request carries besides its target.
struct Call {
    core: Arc<Core>,
    peer: SocketAddr,
    method: Method,
    headers: HeaderMap,
    query: TwinQuery,
    body: Bytes,
}

impl FromRequest<Arc<Core>> for Call {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        core: &Arc<Core>,
    ) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let ConnectInfo(peer) = ConnectInfo::<SocketAddr>::from_request_parts(&mut parts, core)
            .await
            .map_err(IntoResponse::into_response)?;
        let Query(query) = Query::<TwinQuery>::from_request_parts(&mut parts, core)
            .await
            .map_err(IntoResponse::into_response)?;
        let (method, headers) = (parts.method.clone(), parts.headers.clone());
        let body = Bytes::from_request(axum::extract::Request::from_parts(parts, body), core)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Call {
            core: core.clone(),
            peer,
            method,
            headers,
            query,
            body,
        })
    }
}

async fn thing(Path(thing_id): Path<String>, call: Call) -> Response {
    call.thing(&thing_id, "").await
}

async fn thing_part(Path((thing_id, path)): Path<(String, String)>, call: Call) -> Response {
    call.thing(&thing_id, &path).await
}

async fn policy(Path(policy_id): Path<String>, call: Call) -> Response {
    call.policy(&policy_id, "").await
}

async fn policy_part(Path((policy_id, path)): Path<(String, String)>, call: Call) -> Response {
    call.policy(&policy_id, &path).await
}

/// `GET /api/2/things?ids=a,b[&fields=…]`: the things among `ids` the caller may read (each
/// cut to its view), in the order asked; the others are left out, as Ditto does.
async fn list_things(
    State(core): State<Arc<Core>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<TwinQuery>,
    headers: HeaderMap,
) -> Response {
    let identity = match auth::authenticate(&core, &headers, peer.ip()).await {
        Ok(identity) => identity,
        Err(u) => return u.into_response(),
    };
    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if wants_events {
        let ids = match query.ids.as_deref().map(parse_ids).transpose() {
            Ok(ids) => ids,
            Err(e) => return ditto_error(&e),
        };
        let selection = sse::Selection {
            ids,
            namespaces: query.namespaces.as_deref().map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect()
            }),
            fields: query.fields.clone(),
            filter: query.filter.clone(),
            since: headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        };
        return sse::stream(core, identity, selection).await;
    }
    let Some(ids) = query.ids.as_deref() else {
        return ditto_error(
            &DittoError::new(400, "things:ids.missing", "the parameter `ids` is missing")
                .with_description("List the thing IDs to retrieve: `/api/2/things?ids=ns:a,ns:b`."),
        );
    };
    let ids = match parse_ids(ids) {
        Ok(ids) => ids,
        Err(e) => return ditto_error(&e),
    };
    let mut things = Vec::new();
    for thing_id in ids {
        let command = retrieve(thing_id, query.fields.clone());
        let answer = execute(core.clone(), identity.clone(), command).await;
        if answer.status == Some(200)
            && let Some(value) = answer.value
        {
            things.push(value);
        }
    }
    (StatusCode::OK, axum::Json(Value::Array(things))).into_response()
}

/// A retrieve of a whole thing (`fields` selecting parts), answered to the requester.
pub(crate) fn retrieve(thing_id: ThingId, fields: Option<String>) -> Command {
    Command::Thing(ThingCommand {
        thing_id,
        action: Action::Retrieve,
        path: ThingPath::root(),
        value: None,
        headers: CommandHeaders {
            fields,
            response_required: Some(true),
            ..CommandHeaders::default()
        },
    })
}

/// The thing IDs of an `ids` parameter (comma-separated).
fn parse_ids(ids: &str) -> Result<Vec<ThingId>, DittoError> {
    ids.split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(|id| {
            ThingId::parse(id)
                .map_err(|e| DittoError::id_invalid(format!("`{id}` is not a valid thing ID: {e}")))
        })
        .collect()
}

/// `POST /api/2/things[?namespace=…]`: a new thing with a generated name, in the namespace
/// given or the solution's first.
async fn create_thing(
    State(core): State<Arc<Core>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<TwinQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let identity = match auth::authenticate(&core, &headers, peer.ip()).await {
        Ok(identity) => identity,
        Err(u) => return u.into_response(),
    };
    let value = match json_body(&body, true) {
        Ok(value) => value,
        Err(e) => return ditto_error(&e),
    };
    if value.get("thingId").is_some() {
        return ditto_error(
            &DittoError::new(
                400,
                "things:id.notsettable",
                "a thing created with POST gets a generated ID",
            )
            .with_description("Use `PUT /api/2/things/{thingId}` to choose the ID."),
        );
    }
    let namespace = query
        .namespace
        .clone()
        .or_else(|| identity.solution.namespaces.first().cloned())
        .unwrap_or_default();
    let Some(name) = generated_name() else {
        return ditto_error(&DittoError::new(
            500,
            "things:internal.error",
            "no random name could be generated",
        ));
    };
    let thing_id = match ThingId::from_parts(&namespace, &name) {
        Ok(id) => id,
        Err(e) => {
            return ditto_error(&DittoError::id_invalid(format!(
                "`{namespace}` is not a valid namespace: {e}"
            )));
        }
    };
    let command = Command::Thing(ThingCommand {
        thing_id: thing_id.clone(),
        action: Action::Create,
        path: ThingPath::root(),
        value: Some(value),
        headers: match command_headers(&headers, &query) {
            Ok(h) => h,
            Err(e) => return ditto_error(&e),
        },
    });
    let answer = execute(core, identity, command).await;
    respond(answer, Some(format!("/api/2/things/{thing_id}")))
}

/// A UUID-shaped random name (version 4 layout).
fn generated_name() -> Option<String> {
    let mut b = crate::auth::secret::random_bytes::<16>().ok()?;
    if let Some(version) = b.get_mut(6) {
        *version = (*version & 0x0f) | 0x40;
    }
    if let Some(variant) = b.get_mut(8) {
        *variant = (*variant & 0x3f) | 0x80;
    }
    let h = crate::auth::secret::hex(&b);
    Some(format!(
        "{}-{}-{}-{}-{}",
        h.get(0..8)?,
        h.get(8..12)?,
        h.get(12..16)?,
        h.get(16..20)?,
        h.get(20..32)?
    ))
}

impl Call {
    async fn thing(self, thing_id: &str, path: &str) -> Response {
        if let Ok(id) = ThingId::parse(thing_id)
            && let Some(message) = messages::message_path(&id, path)
        {
            return self.message(message).await;
        }
        let location = format!("/api/2/things/{thing_id}{}", suffix(path));
        match self.thing_command(thing_id, path).await {
            Ok((identity, command)) => {
                respond(execute(self.core, identity, command).await, Some(location))
            }
            Err(refused) => refused.into_response(),
        }
    }

    async fn policy(self, policy_id: &str, path: &str) -> Response {
        let location = format!("/api/2/policies/{policy_id}{}", suffix(path));
        match self.policy_command(policy_id, path).await {
            Ok((identity, command)) => {
                respond(execute(self.core, identity, command).await, Some(location))
            }
            Err(refused) => refused.into_response(),
        }
    }

    /// A live message to or from a thing (`POST` only).
    async fn message(self, message: Result<LiveMessage, DittoError>) -> Response {
        let identity = match self.identity().await {
            Ok(identity) => identity,
            Err(refused) => return refused.into_response(),
        };
        if self.method != Method::POST {
            return ditto_error(
                &DittoError::new(
                    405,
                    "method.notallowed",
                    format!("{} is not allowed on a message", self.method),
                )
                .with_description("Send a message with POST."),
            );
        }
        let message = match message {
            Ok(message) => message,
            Err(e) => return ditto_error(&e),
        };
        let waiting =
            match messages::Waiting::from_request(self.query.timeout.as_deref(), &self.headers) {
                Ok(waiting) => waiting,
                Err(e) => return ditto_error(&e),
            };
        messages::send(
            self.core,
            identity,
            message,
            &self.headers,
            self.body,
            waiting,
        )
        .await
    }

    async fn identity(&self) -> Result<Identity, Refused> {
        auth::authenticate(&self.core, &self.headers, self.peer.ip())
            .await
            .map_err(Refused::Unauthenticated)
    }

    /// The action of the request's method and its value.
    fn action(&self) -> Result<(Action, Option<Value>), DittoError> {
        match self.method {
            Method::GET => Ok((Action::Retrieve, None)),
            Method::PUT => Ok((Action::Modify, Some(json_body(&self.body, false)?))),
            Method::PATCH => {
                let merge_patch = self
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.trim_start().starts_with("application/merge-patch+json"));
                if !merge_patch {
                    return Err(DittoError::new(
                        415,
                        "mediatype.unsupported",
                        "PATCH takes a JSON merge patch",
                    )
                    .with_description("Send `Content-Type: application/merge-patch+json`."));
                }
                Ok((Action::Merge, Some(json_body(&self.body, false)?)))
            }
            Method::DELETE => Ok((Action::Delete, None)),
            _ => Err(DittoError::new(
                405,
                "method.notallowed",
                format!("{} is not allowed here", self.method),
            )
            .with_description("Use GET, PUT, PATCH or DELETE.")),
        }
    }

    async fn thing_command(
        &self,
        thing_id: &str,
        path: &str,
    ) -> Result<(Identity, Command), Refused> {
        let identity = self.identity().await?;
        let thing_id = ThingId::parse(thing_id).map_err(|e| {
            DittoError::id_invalid(format!("`{thing_id}` is not a valid thing ID: {e}"))
        })?;
        let path = ThingPath::parse(&slash(path))?;
        let (action, value) = self.action()?;
        let headers = command_headers(&self.headers, &self.query)?;
        Ok((
            identity,
            Command::Thing(ThingCommand {
                thing_id,
                action,
                path,
                value,
                headers,
            }),
        ))
    }

    async fn policy_command(
        &self,
        policy_id: &str,
        path: &str,
    ) -> Result<(Identity, Command), Refused> {
        let identity = self.identity().await?;
        let policy_id = PolicyId::parse(policy_id).map_err(|e| {
            DittoError::new(
                400,
                "policies:id.invalid",
                format!("`{policy_id}` is not a valid policy ID: {e}"),
            )
        })?;
        let (action, value) = self.action()?;
        let headers = command_headers(&self.headers, &self.query)?;
        Ok((
            identity,
            Command::Policy(PolicyCommand {
                policy_id,
                action,
                path: slash(path),
                value,
                headers,
            }),
        ))
    }
}

/// `path` (as the router gives it, without its leading `/`) as a JSON pointer.
fn slash(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        format!("/{}", path.trim_start_matches('/'))
    }
}

/// `path` as the end of a URL: empty, or with its leading `/`.
fn suffix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        slash(path)
    }
}

/// The request body as JSON; `empty_is_object`: an empty body is `{}`.
fn json_body(body: &[u8], empty_is_object: bool) -> Result<Value, DittoError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        if empty_is_object {
            return Ok(Value::Object(serde_json::Map::new()));
        }
        return Err(DittoError::json_invalid("the request body is empty")
            .with_description("Send the JSON value to set."));
    }
    serde_json::from_slice(body)
        .map_err(|e| DittoError::json_invalid(format!("the request body is not JSON: {e}")))
}

/// The command headers an HTTP request gives: `correlation-id`, `If-Match`, `If-None-Match`,
/// and the `fields` query parameter.
fn command_headers(headers: &HeaderMap, query: &TwinQuery) -> Result<CommandHeaders, DittoError> {
    let tags = |name: header::HeaderName| -> Result<Option<EntityTags>, DittoError> {
        let Some(value) = headers.get(&name) else {
            return Ok(None);
        };
        value
            .to_str()
            .ok()
            .and_then(EntityTags::parse)
            .map(Some)
            .ok_or_else(|| {
                DittoError::new(
                    400,
                    "header.invalid",
                    format!("the value of `{name}` is not a list of entity tags"),
                )
                .with_description("Send `*` or entity tags such as `\"rev:3\"`.")
            })
    };
    Ok(CommandHeaders {
        correlation_id: headers
            .get("correlation-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        response_required: Some(true),
        if_match: tags(header::IF_MATCH)?,
        if_none_match: tags(header::IF_NONE_MATCH)?,
        fields: query.fields.clone(),
        condition: query.condition.clone(),
        other: serde_json::Map::new(),
    })
}

/// Where the answer to an HTTP request goes: its own session, under this topic (never routed).
pub(crate) fn answer_topic() -> Option<TopicName> {
    "$thingsgate/http/answer".parse().ok()
}

/// Executes `command` for `identity` in a task of its own — a client that hangs up does not
/// cancel a write half-way: its events still go out once durable — and reads the answer from
/// the request's session.
pub(crate) async fn execute(core: Arc<Core>, identity: Identity, command: Command) -> Envelope {
    let task = tokio::spawn(async move {
        let client = core.transient(identity);
        let reply = ReplyTo {
            wanted: true,
            topic: answer_topic(),
            correlation: None,
        };
        if let Outcome::Pending(mut pending) =
            core.execute(&client, Request::Command(command), reply)
        {
            std::future::poll_fn(|cx| pending.poll_done(cx, &core, &client.space, &client.session))
                .await;
        }
        let answer = client.session.lock().pop_next(&core.metrics);
        core.release(&client);
        answer.and_then(|delivery| Envelope::parse(&delivery.message.payload).ok())
    });
    match task.await {
        Ok(Some(envelope)) => envelope,
        _ => Envelope::error(
            None,
            &DittoError::new(
                500,
                "things:internal.error",
                "the request could not be answered",
            ),
            None,
        ),
    }
}

/// An answer as HTTP: its status; `ETag` from its entity tag; `Location` on 201; the value as
/// JSON body (none for 204 and 304).
fn respond(answer: Envelope, location: Option<String>) -> Response {
    let status = answer
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match (status, answer.value) {
        (StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED, _) | (_, None) => {
            Response::new(Body::empty())
        }
        (_, Some(value)) => axum::Json(value).into_response(),
    };
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(etag) = answer
        .headers
        .get("etag")
        .and_then(Value::as_str)
        .and_then(|e| HeaderValue::from_str(e).ok())
    {
        headers.insert(header::ETAG, etag);
    }
    if status == StatusCode::CREATED
        && let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok())
    {
        headers.insert(header::LOCATION, location);
    }
    response
}
