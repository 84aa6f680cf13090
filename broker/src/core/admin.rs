//! Solution administration online (DESIGN.md §1): a client of a solution reads and changes its
//! own solution — namespaces, secrets, the solution policy — and reads its registered clients
//! and usage, each authorized by the solution policy (`solution:/…`, for the client's subjects
//! together, as any check). Changes are durable before they are answered and apply to live
//! connections at once: the space takes the new namespaces and policy for the next check, and
//! revoking a secret ends the connections opened with it.
//!
//! | request | needs |
//! |---|---|
//! | show the solution, list secrets | READ `solution:/` (`solution:/secrets`) |
//! | namespaces: list / add, remove | READ / WRITE `solution:/namespaces` |
//! | secrets: add, revoke | WRITE `solution:/secrets` |
//! | policy: get / replace | READ / WRITE `solution:/policy` |
//! | clients, usage | READ `solution:/clients`, `solution:/usage` |
//! | connections: list | READ somewhere below `solution:/connections`; lists those the requester may READ |
//! | a connection: show / create, replace, delete | READ / WRITE `solution:/connections/<id>` |
//! | a connection's status | READ `solution:/connections/<id>/status` |
//!
//! A solution that is not the client's own is not found (404), whatever its policy says; a
//! read without READ is not found either, a change without WRITE is 403.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use policy::{Mode, Permission, ResourceType};
use serde_json::{Value, json};
use twin::DittoError;

use crate::auth::solution::{Solution, SolutionError, parse_solution_policy};
use crate::bridge::config::ConnectionDoc;
use crate::core::{Client, Core, now};

/// What a client asks of its solution.
#[derive(Debug, Clone)]
pub enum Admin {
    Show,
    Namespaces,
    AddNamespace(String),
    RemoveNamespace(String),
    Secrets,
    AddSecret,
    RevokeSecret(String),
    Policy,
    SetPolicy(String),
    Clients,
    Usage,
    /// The solution's connections (passwords hidden).
    Connections,
    Connection(String),
    /// Create or replace a connection (its ID in the document); `true`: create only (an
    /// existing ID is a conflict).
    PutConnection(Box<ConnectionDoc>, bool),
    DeleteConnection(String),
    /// A connection's state and counters.
    ConnectionStatus(String),
}

/// The answer to an [`Admin`] request.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminAnswer {
    /// 200 with this value.
    Value(Value),
    /// 201 with this value (a created namespace or secret).
    Created(Value),
    /// 204.
    Done,
}

impl Admin {
    /// The resource and permission it needs.
    fn needs(&self) -> (Cow<'static, str>, Permission) {
        let connection = |id: &str, suffix: &str| Cow::Owned(format!("/connections/{id}{suffix}"));
        let (path, permission) = match self {
            Admin::Connections => ("/connections", Permission::Read),
            Admin::Connection(id) => return (connection(id, ""), Permission::Read),
            Admin::PutConnection(doc, _) => return (connection(&doc.id, ""), Permission::Write),
            Admin::DeleteConnection(id) => return (connection(id, ""), Permission::Write),
            Admin::ConnectionStatus(id) => return (connection(id, "/status"), Permission::Read),
            Admin::Show => ("/", Permission::Read),
            Admin::Namespaces => ("/namespaces", Permission::Read),
            Admin::AddNamespace(_) | Admin::RemoveNamespace(_) => {
                ("/namespaces", Permission::Write)
            }
            Admin::Secrets => ("/secrets", Permission::Read),
            Admin::AddSecret | Admin::RevokeSecret(_) => ("/secrets", Permission::Write),
            Admin::Policy => ("/policy", Permission::Read),
            Admin::SetPolicy(_) => ("/policy", Permission::Write),
            Admin::Clients => ("/clients", Permission::Read),
            Admin::Usage => ("/usage", Permission::Read),
        };
        (Cow::Borrowed(path), permission)
    }
}

fn connection_not_found(solution_id: &str, id: &str) -> DittoError {
    DittoError::new(
        404,
        "connectivity:connection.notfound",
        format!(
            "the connection `{id}` of solution `{solution_id}` could not be found or the requester may not read it"
        ),
    )
}

fn not_found(solution_id: &str) -> DittoError {
    DittoError::new(
        404,
        "solutions:solution.notfound",
        format!("the solution `{solution_id}` could not be found or the requester may not read it"),
    )
}

/// A solution error as a Ditto error.
fn solution_error(e: &SolutionError) -> DittoError {
    let (status, code) = match e {
        SolutionError::NotFound(_) => (404, "solutions:solution.notfound"),
        SolutionError::NoSuchSecret { .. } => (404, "solutions:secret.notfound"),
        SolutionError::NoSuchConnection { .. } => (404, "connectivity:connection.notfound"),
        SolutionError::Connection(_) => (400, "connectivity:connection.configuration.invalid"),
        SolutionError::TooManyConnections(_) => (409, "connectivity:connections.limit"),
        SolutionError::ConnectionExists { .. } => (409, "connectivity:connection.conflict"),
        SolutionError::NamespaceTaken { .. } => (409, "solutions:namespace.conflict"),
        SolutionError::BadNamespace(_) => (400, "solutions:namespace.invalid"),
        SolutionError::Store(_) | SolutionError::Random(_) | SolutionError::Corrupt { .. } => {
            (500, "solutions:internal.error")
        }
        _ => (400, "solutions:policy.invalid"),
    };
    DittoError::new(status, code, e.to_string())
}

impl Core {
    /// Creates a solution for an operator (`operator:<name>`, authenticated by
    /// `Authenticator::authenticate_operator`): `id` (generated if `None`) owning `namespaces`;
    /// the answer holds its API token and first secret, shown this once.
    pub async fn create_solution(
        &self,
        operator: &str,
        id: Option<String>,
        namespaces: Vec<String>,
    ) -> Result<Value, DittoError> {
        let solutions = self.auth.solutions.clone();
        let store = self.twins.store.clone();
        let created = tokio::task::spawn_blocking(move || -> Result<Value, SolutionError> {
            let id = id
                .map(|id| crate::auth::solution::SolutionId::parse(&id))
                .transpose()?;
            let store: &dyn twin::store::TwinStore = &*store;
            let created = solutions.create(store, id, &namespaces, now())?;
            Ok(json!({
                "solutionId": created.solution_id.as_str(),
                "apiToken": created.api_token.expose(),
                "secret": created.secret.expose(),
            }))
        })
        .await
        .map_err(|e| {
            DittoError::new(
                500,
                "solutions:internal.error",
                format!("the creation failed: {e}"),
            )
        })?
        .map_err(|e| match e {
            SolutionError::Exists(_) => {
                DittoError::new(409, "solutions:solution.conflict", e.to_string())
            }
            SolutionError::BadId(_) => DittoError::new(400, "solutions:id.invalid", e.to_string()),
            other => solution_error(&other),
        })?;
        let id = created
            .get("solutionId")
            .and_then(Value::as_str)
            .unwrap_or_default();
        tracing::info!(operator, solution = id, "solution created");
        Ok(created)
    }

    /// Carries out `request` on solution `solution_id` for `client`.
    pub async fn administer(
        &self,
        client: &Client,
        solution_id: &str,
        request: Admin,
    ) -> Result<AdminAnswer, DittoError> {
        if client.space.id.as_str() != solution_id {
            return Err(not_found(solution_id));
        }
        let (path, permission) = request.needs();
        let path = &*path;
        // The list needs READ somewhere below `solution:/connections` and shows the connections
        // the requester may read; everything else needs its resource unrestricted.
        let mode = if matches!(request, Admin::Connections) {
            Mode::Partial
        } else {
            Mode::Unrestricted
        };
        if !client.solution_allows(ResourceType::Solution, path, permission, mode, now()) {
            client.space.denied(&self.metrics, "administration");
            return Err(match (permission, &request) {
                (Permission::Read, Admin::Connection(id) | Admin::ConnectionStatus(id))
                    if client.solution_allows(
                        ResourceType::Solution,
                        "/connections",
                        Permission::Read,
                        Mode::Partial,
                        now(),
                    ) =>
                {
                    connection_not_found(solution_id, id)
                }
                (Permission::Read, _) => not_found(solution_id),
                _ => DittoError::new(
                    403,
                    "solutions:solution.notmodifiable",
                    format!("the requester may not change `solution:{path}` of `{solution_id}`"),
                )
                .with_description("The solution policy must grant WRITE there."),
            });
        }
        let solution = client.space.solution();
        match request {
            Admin::Show => Ok(AdminAnswer::Value(json!({
                "solutionId": solution.id.as_str(),
                "namespaces": solution.namespaces,
                "secrets": secrets(&solution),
            }))),
            Admin::Namespaces => Ok(AdminAnswer::Value(json!(solution.namespaces))),
            Admin::Secrets => Ok(AdminAnswer::Value(secrets(&solution))),
            Admin::Policy => Ok(AdminAnswer::Value(policy::policy_to_value(
                &solution.policy,
            ))),
            Admin::Clients => {
                let mut clients: Vec<Value> = client
                    .space
                    .sessions()
                    .values()
                    .map(|session| {
                        let connected = session.lock().link.is_some();
                        json!({"clientId": &*session.client_id, "connected": connected})
                    })
                    .collect();
                clients.sort_by(|a, b| a["clientId"].as_str().cmp(&b["clientId"].as_str()));
                Ok(AdminAnswer::Value(Value::Array(clients)))
            }
            Admin::Usage => {
                let usage = &client.space.usage;
                let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                let sessions = client.space.sessions();
                let connected = sessions
                    .values()
                    .filter(|s| s.lock().link.is_some())
                    .count();
                Ok(AdminAnswer::Value(json!({
                    "connections": connected,
                    "sessions": sessions.len(),
                    "messagesIn": load(&usage.messages_in),
                    "messagesOut": load(&usage.messages_out),
                    "bytesIn": load(&usage.bytes_in),
                    "bytesOut": load(&usage.bytes_out),
                    "denied": load(&usage.denied),
                })))
            }
            Admin::Connections => {
                let now = now();
                Ok(AdminAnswer::Value(Value::Array(
                    solution
                        .connections
                        .iter()
                        .filter(|c| {
                            client.solution_allows(
                                ResourceType::Solution,
                                &format!("/connections/{}", c.id),
                                Permission::Read,
                                Mode::Unrestricted,
                                now,
                            )
                        })
                        .filter_map(|c| serde_json::to_value(c.redacted()).ok())
                        .collect(),
                )))
            }
            Admin::Connection(id) => solution
                .connections
                .iter()
                .find(|c| c.id == id)
                .and_then(|c| serde_json::to_value(c.redacted()).ok())
                .map(AdminAnswer::Value)
                .ok_or_else(|| connection_not_found(solution_id, &id)),
            Admin::ConnectionStatus(id) => {
                if !solution.connections.iter().any(|c| c.id == id) {
                    return Err(connection_not_found(solution_id, &id));
                }
                // Stored a moment ago and not started yet: it is about to connect.
                Ok(AdminAnswer::Value(
                    match self.bridges.status(solution_id, &id) {
                        Some(status) => status.to_json(&id),
                        None => json!({"id": id, "status": "connecting"}),
                    },
                ))
            }
            change => self.change_solution(client, change).await,
        }
    }

    /// A change: written (durable) off the async threads, then applied to the live space.
    async fn change_solution(
        &self,
        client: &Client,
        change: Admin,
    ) -> Result<AdminAnswer, DittoError> {
        let solutions = self.auth.solutions.clone();
        let store = self.twins.store.clone();
        let id = client.space.id.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<AdminAnswer, SolutionError> {
            let now = now();
            let store: &dyn twin::store::TwinStore = &*store;
            Ok(match change {
                Admin::AddNamespace(ns) => {
                    if solutions.add_namespace(store, &id, &ns, now)? {
                        AdminAnswer::Created(json!(ns))
                    } else {
                        AdminAnswer::Done
                    }
                }
                Admin::RemoveNamespace(ns) => {
                    if solutions.remove_namespace(store, &id, &ns, now)? {
                        AdminAnswer::Done
                    } else {
                        return Err(SolutionError::NotFound(format!("{id}/namespaces/{ns}")));
                    }
                }
                Admin::AddSecret => {
                    let new = solutions.add_secret(store, &id, now)?;
                    AdminAnswer::Created(json!({
                        "secretId": new.secret_id,
                        "secret": new.secret.expose(),
                    }))
                }
                Admin::RevokeSecret(secret_id) => {
                    solutions.revoke_secret(store, &id, &secret_id, now)?;
                    AdminAnswer::Done
                }
                Admin::PutConnection(doc, create_only) => {
                    let connection = doc.id.clone();
                    if solutions.put_connection(store, &id, *doc, create_only, now)? {
                        AdminAnswer::Created(json!({ "id": connection }))
                    } else {
                        AdminAnswer::Done
                    }
                }
                Admin::DeleteConnection(connection) => {
                    solutions.delete_connection(store, &id, &connection, now)?;
                    AdminAnswer::Done
                }
                Admin::SetPolicy(text) => {
                    let policy = parse_solution_policy(&id, &text)?;
                    solutions.set_policy(store, &id, policy, now)?;
                    AdminAnswer::Done
                }
                _ => AdminAnswer::Done,
            })
        })
        .await
        .map_err(|e| {
            DittoError::new(
                500,
                "solutions:internal.error",
                format!("the change failed: {e}"),
            )
        })?
        .map_err(|e| solution_error(&e))?;
        if let Some(changed) = self.auth.solutions.get(client.space.id.as_str()) {
            self.solution_changed(changed);
        }
        Ok(done)
    }

    /// `solution` changed: its space applies it from the next check on, and connections opened
    /// with a secret it no longer accepts are ended.
    pub fn solution_changed(&self, solution: Arc<Solution>) {
        let space = self.spaces.get_or_create(&solution);
        for record in solution.secrets.iter().filter(|s| s.revoked) {
            let Some(secret) = crate::core::identity::secret_number(&record.id) else {
                continue;
            };
            for link in space.links_with_secret(secret) {
                link.revoked.store(true, Ordering::Release);
                link.kick();
            }
        }
        tracing::info!(solution = %solution.id, "solution changed");
        space.replace_solution(solution);
        self.bridges.changed.notify_one();
    }
}

/// The secrets of `solution` without their digests.
fn secrets(solution: &Solution) -> Value {
    Value::Array(
        solution
            .secrets
            .iter()
            .map(|s| json!({"secretId": s.id, "created": s.created.to_string(), "revoked": s.revoked}))
            .collect(),
    )
}
