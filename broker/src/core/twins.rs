//! Authorize and apply (DESIGN.md §4): thing and policy commands, and the sender's side of
//! live messages, each against the policy of the thing it is about. Nothing here delivers:
//! events and live messages go out through `crate::core::dispatch`.
//!
//! A command goes: solution namespace check → the thing's policy (its compiled current revision
//! from [`Policies`]) → the requester's view of it (memoized per session:
//! [`crate::core::session::PolicyViews`]) → the command's requirements (`twin::authz`) →
//! `apply` under the entity's lock in the store → the journal. The caller acknowledges once
//! [`Executed::Written::durable`] completes and only then publishes the events: a subscriber
//! never sees a change that a crash could take back.
//!
//! A policy change bumps the policy entity's revision: the next check anywhere (commands,
//! event deliveries, live messages) finds the cached enforcer stale and compiles the new
//! revision, and every session's memoized view follows (it compares enforcers). So a
//! revocation takes effect for every live connection at once, with no reconnect.

use std::sync::Arc;

use policy::{Mode, Permission, ResourceType, Timestamp};
use serde_json::{Value, json};
use twin::apply::{Applied, apply_policy_command, apply_thing_command};
use twin::authz::{
    cut_policy_to_view, cut_to_view, denied, first_denied, grants_without_allocation,
    policy_denied, required_permissions, required_policy_permissions,
};
use twin::command::{Action, Command, CommandHeaders, PolicyCommand, ThingCommand};
use twin::entity::{Entity, EntityKey, EntityKind, Event};
use twin::error::DittoError;
use twin::protocol::envelope::Envelope;
use twin::protocol::message::LiveMessage;
use twin::store::{Durable, TwinStore, TwinStoreExt, WriteError, Written};
use twin::thing::{self, Limits};

use crate::core::Client;
use crate::core::policies::{Policies, PolicyId, PolicyRef};

/// The store and the compiled policies.
#[derive(Debug)]
pub struct Twins {
    pub store: Arc<dyn TwinStore>,
    pub policies: Policies,
    pub limits: Limits,
}

/// What a command led to.
#[derive(Debug)]
pub enum Executed {
    /// Answered at once: a retrieve, a refusal or an error. `denied`: refused by a policy (or
    /// by solution isolation).
    Answered { reply: Envelope, denied: bool },
    /// A change applied in memory: acknowledge once `durable` completes, then publish `events`
    /// and answer (`Envelope::response(&command, status, value)`, built only if someone will
    /// receive it).
    Written {
        durable: Durable,
        events: Vec<Event>,
        command: Command,
        status: u16,
        value: Option<Value>,
        /// The policy the events are judged with when the entity no longer names one (a
        /// deleted thing).
        policy: Option<PolicyRef>,
        /// When it was decided, and what it must still find if a cluster store reports that
        /// another node wrote first and it is decided again ([`Redo`]).
        now: Timestamp,
        precondition: Precondition,
    },
}

/// What a write must still find when it is decided again (the same check as the first time:
/// the authorization stands only for this).
#[derive(Debug, Clone)]
pub enum Precondition {
    /// The thing names this policy (or does not exist).
    PolicyIs(PolicyId),
    /// The entity does not exist.
    Absent,
    /// The policy still has this revision (`None`: does not exist).
    Revision(Option<u64>),
}

impl Precondition {
    fn holds(&self, current: Option<&Entity>) -> bool {
        match self {
            Precondition::PolicyIs(id) => current
                .is_none_or(|e| e.doc.get("policyId").and_then(Value::as_str) == Some(id.as_str())),
            Precondition::Absent => current.is_none(),
            Precondition::Revision(revision) => current.map(|e| e.revision) == *revision,
        }
    }
}

/// A change authorized and written once, to decide again on the state another node left when
/// the cluster store refused it ([`twin::store::StoreError::Conflict`]).
#[derive(Debug, Clone)]
pub struct Redo {
    pub command: Command,
    pub now: Timestamp,
    pub precondition: Precondition,
}

impl Executed {
    fn error(command: &Command, error: &DittoError, denied: bool) -> Self {
        Executed::Answered {
            reply: Envelope::command_error(command, error),
            denied,
        }
    }
}

/// Whether `current` (the thing; `None`: it does not exist), as `view` may read it, satisfies
/// Ditto's `condition`: `Ok` if so; 412 `things:condition.failed` if not; 400 if the
/// expression is malformed. Evaluated before the command is applied (for atomic optimistic
/// concurrency use `If-Match`).
fn condition_holds(
    view: &policy::SubjectView,
    condition: &str,
    current: Option<&Entity>,
) -> Result<(), DittoError> {
    let rql = twin::rql::Rql::parse(condition)?;
    let mut seen = current
        .and_then(|e| cut_to_view(view, &twin::path::ThingPath::root(), &e.doc))
        .unwrap_or_else(|| json!({}));
    if let (Some(entity), Some(fields)) = (current, seen.as_object_mut())
        && !fields.is_empty()
    {
        fields.insert("_revision".into(), json!(entity.revision));
        fields.insert("_created".into(), json!(entity.created.to_string()));
        fields.insert("_modified".into(), json!(entity.modified.to_string()));
    }
    if rql.matches(&seen) {
        Ok(())
    } else {
        Err(DittoError::condition_failed(format!(
            "the condition `{condition}` does not hold"
        )))
    }
}

fn thing_key(id: &str) -> EntityKey {
    EntityKey::new(EntityKind::Thing, id)
}

fn policy_key(id: &str) -> EntityKey {
    EntityKey::new(EntityKind::Policy, id)
}

fn store_failed(e: impl std::fmt::Display) -> DittoError {
    DittoError::new(
        500,
        "things:internal.error",
        format!("the change could not be stored: {e}"),
    )
}

fn policy_not_found(id: &str) -> DittoError {
    DittoError::new(
        404,
        "policies:policy.notfound",
        format!(
            "the policy `{id}` could not be found or the requester had insufficient permissions to access it"
        ),
    )
}

/// The error for a policy command refused before its policy could be consulted (a foreign
/// namespace, or no CREATE in the solution policy): as if its requirement were denied.
fn policy_refusal(cmd: &PolicyCommand) -> DittoError {
    match required_policy_permissions(cmd).first() {
        Some(requirement) => policy_denied(cmd, requirement),
        None => policy_not_found(cmd.policy_id.as_str()),
    }
}

fn changed_concurrently() -> DittoError {
    DittoError::new(
        409,
        "things:thing.conflict",
        "the thing or its policy changed while the command was authorized; retry",
    )
}

impl Twins {
    pub fn new(store: Arc<dyn TwinStore>) -> Self {
        Twins {
            policies: Policies::new(store.clone()),
            store,
            limits: Limits::default(),
        }
    }

    /// Authorizes and applies a command for `client`.
    pub fn execute(&self, client: &Client, command: Command, now: Timestamp) -> Executed {
        // Fail closed: a cluster node that cannot prove its state current decides nothing.
        if let Err(e) = self.store.current() {
            let error = DittoError::new(
                503,
                "things:unavailable",
                format!("the command cannot be decided now: {e}"),
            );
            return Executed::error(&command, &error, false);
        }
        match command {
            Command::Thing(cmd) => self.execute_thing(client, cmd, now),
            Command::Policy(cmd) => self.execute_policy(client, cmd, now),
        }
    }

    fn execute_thing(&self, client: &Client, cmd: ThingCommand, now: Timestamp) -> Executed {
        let namespace = cmd.thing_id.namespace();
        let refused = |cmd: ThingCommand| {
            let error = if cmd.action == Action::Retrieve {
                thing::not_found(&cmd.thing_id, &cmd.path)
            } else {
                thing::not_modifiable(&cmd.thing_id, &cmd.path, &cmd.path.to_string())
            };
            Executed::error(&Command::Thing(cmd), &error, true)
        };
        if !client.owns(namespace) {
            return refused(cmd);
        }
        let Some(policy_id) = self.policies.id_of_thing(&cmd.thing_id) else {
            return if cmd.action != Action::Retrieve
                && cmd.action != Action::Delete
                && cmd.path.is_root()
            {
                self.create_thing(client, cmd, now)
            } else {
                let error = thing::not_found(&cmd.thing_id, &cmd.path);
                Executed::error(&Command::Thing(cmd), &error, false)
            };
        };
        let Some(policy) = self.policies.get(&policy_id) else {
            // A thing whose policy is gone is inaccessible (as in Ditto).
            return refused(cmd);
        };
        // Authorize, and for a retrieve answer from the same view.
        {
            let mut state = client.session.lock();
            let view = state.policy_view(&policy, namespace, now);
            // The common case (one requirement) is decided without allocating; a denial or a
            // merge goes through the requirement list, which also names the denied resource.
            if grants_without_allocation(view, &cmd) != Some(true)
                && let Some(requirement) = first_denied(view, &required_permissions(&cmd))
            {
                let error = denied(&cmd, requirement);
                drop(state);
                return Executed::error(&Command::Thing(cmd), &error, true);
            }
            if let Some(condition) = &cmd.headers.condition {
                let current = self.store.get(&thing_key(cmd.thing_id.as_str()));
                if let Err(error) = condition_holds(view, condition, current.as_deref()) {
                    drop(state);
                    return Executed::error(&Command::Thing(cmd), &error, false);
                }
            }
            if cmd.action == Action::Retrieve {
                let current = self.store.get(&thing_key(cmd.thing_id.as_str()));
                return match apply_thing_command(current.as_deref(), &cmd, now, &self.limits) {
                    Ok(applied) => {
                        let response = applied.response();
                        let value = match &response.value {
                            Some(value) => match cut_to_view(view, &cmd.path, value) {
                                Some(cut) => Some(cut),
                                None => {
                                    let error = thing::not_found(&cmd.thing_id, &cmd.path);
                                    drop(state);
                                    return Executed::error(&Command::Thing(cmd), &error, true);
                                }
                            },
                            None => None,
                        };
                        let status = response.status;
                        drop(state);
                        let revision = current.as_deref().map(|e| e.revision);
                        let command = Command::Thing(cmd);
                        Executed::Answered {
                            reply: Envelope::response(&command, status, value)
                                .with_etag(revision.filter(|_| status == 200)),
                            denied: false,
                        }
                    }
                    Err(error) => {
                        drop(state);
                        Executed::error(&Command::Thing(cmd), &error, false)
                    }
                };
            }
        }
        if let Some(new_policy) = new_policy_id(&cmd)
            && new_policy != policy.id.as_str()
        {
            // A thing may only be moved to an existing policy of the solution's namespaces.
            let exists = twin::PolicyId::parse(new_policy).ok().is_some_and(|id| {
                client.owns(id.namespace()) && self.policies.get(&PolicyId::from(&id)).is_some()
            });
            if !exists {
                let error = policy_not_found(new_policy);
                return Executed::error(&Command::Thing(cmd), &error, false);
            }
        }
        self.write_thing(cmd, now, policy)
    }

    /// Applies a thing change authorized with `policy`, which the thing must still name when
    /// the write runs (else 409, nothing applied).
    fn write_thing(&self, cmd: ThingCommand, now: Timestamp, policy: PolicyRef) -> Executed {
        let precondition = Precondition::PolicyIs(policy.id.clone());
        self.write_executed(Command::Thing(cmd), now, Some(policy), precondition)
    }

    /// Decides `redo` again on the current state (after a cluster store's conflict), judged
    /// with `policy` as the first time.
    pub fn redo(&self, redo: Redo, policy: Option<PolicyRef>) -> Executed {
        self.write_executed(redo.command, redo.now, policy, redo.precondition)
    }

    /// Applies `command` to its entity under the entity's lock, if `unchanged` still holds for
    /// the current state then (else 409, nothing applied): the write, the answer's status and
    /// value.
    fn write_command(
        &self,
        command: &Command,
        now: Timestamp,
        unchanged: impl FnOnce(Option<&Entity>) -> bool,
    ) -> Result<(Written, u16, Option<Value>), DittoError> {
        let key = match command {
            Command::Thing(c) => thing_key(c.thing_id.as_str()),
            Command::Policy(c) => policy_key(c.policy_id.as_str()),
        };
        let mut answer = None;
        let written = self
            .store
            .write(&key, |current| {
                if !unchanged(current) {
                    return Err(changed_concurrently());
                }
                let applied = match command {
                    Command::Thing(c) => apply_thing_command(current, c, now, &self.limits)?,
                    Command::Policy(c) => apply_policy_command(current, c, now, &self.limits)?,
                };
                Ok(match applied {
                    Applied::Change(change) => {
                        answer = Some(change.response);
                        vec![change.event]
                    }
                    Applied::Retrieve(response) => {
                        answer = Some(response);
                        Vec::new()
                    }
                })
            })
            .map_err(|e| match e {
                WriteError::Rejected(error) => error,
                WriteError::Store(e) => store_failed(e),
            })?;
        let (status, value) = answer.map_or((204, None), |r| (r.status, r.value));
        Ok((written, status, value))
    }

    /// [`Twins::write_command`] as the outcome of `command`; its events are judged with
    /// `policy` when the entity no longer names one.
    fn write_executed(
        &self,
        command: Command,
        now: Timestamp,
        policy: Option<PolicyRef>,
        precondition: Precondition,
    ) -> Executed {
        match self.write_command(&command, now, |current| precondition.holds(current)) {
            Ok((written, status, value)) => Executed::Written {
                durable: written.durable,
                events: written.events,
                now,
                precondition,
                command,
                status,
                value,
                policy,
            },
            Err(error) => Executed::error(&command, &error, false),
        }
    }

    /// Creates a thing: CREATE on `thing:/` in the solution policy; its policy is the one it
    /// names (where the creator needs WRITE on `thing:/`), or a new inline policy with the
    /// thing's ID granting the creator's subjects READ and WRITE on `thing:/`, `policy:/` and
    /// `message:/` (as Ditto does).
    fn create_thing(&self, client: &Client, mut cmd: ThingCommand, now: Timestamp) -> Executed {
        if !client.solution_grants(ResourceType::Thing, Permission::Create, now) {
            let error = thing::not_modifiable(&cmd.thing_id, &cmd.path, "/");
            return Executed::error(&Command::Thing(cmd), &error, true);
        }
        let named = cmd
            .value
            .as_ref()
            .and_then(|v| v.get("policyId"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let policy_id = named
            .clone()
            .unwrap_or_else(|| cmd.thing_id.as_str().to_owned());
        let namespace = cmd.thing_id.namespace().to_owned();
        let mut policy_durable = None;
        let parsed = twin::PolicyId::parse(&policy_id);
        let existing = parsed
            .as_ref()
            .ok()
            .and_then(|id| self.policies.get(&PolicyId::from(id)));
        let policy = match existing {
            Some(policy) => policy,
            None if named.is_some() => {
                let error = policy_not_found(&policy_id);
                return Executed::error(&Command::Thing(cmd), &error, false);
            }
            None => {
                let subjects: serde_json::Map<String, Value> = client
                    .session
                    .lock()
                    .subjects()
                    .iter()
                    .map(|s| (s.clone(), json!({"type": "the creator of the thing"})))
                    .collect();
                let grant = json!({"grant": ["READ", "WRITE"], "revoke": []});
                let doc = json!({
                    "policyId": policy_id,
                    "entries": {"DEFAULT": {
                        "subjects": subjects,
                        "resources": {"thing:/": grant, "policy:/": grant, "message:/": grant},
                    }},
                });
                let Ok(policy_id_parsed) = parsed else {
                    let error = DittoError::id_invalid(format!("`{policy_id}` is not a policy ID"));
                    return Executed::error(&Command::Thing(cmd), &error, false);
                };
                let shared_id = PolicyId::from(&policy_id_parsed);
                let create = PolicyCommand {
                    policy_id: policy_id_parsed,
                    action: Action::Create,
                    path: "/".to_owned(),
                    value: Some(doc),
                    headers: CommandHeaders::default(),
                };
                // The thing is acknowledged only once its policy is durable too (the embedded
                // journal orders the two records anyway; a cluster store may not).
                match self.write_command(&Command::Policy(create), now, |_| true) {
                    Ok((written, _, _)) => policy_durable = Some(written.durable),
                    Err(error) => return Executed::error(&Command::Thing(cmd), &error, false),
                }
                match self.policies.get(&shared_id) {
                    Some(policy) => policy,
                    None => {
                        let error = policy_not_found(&policy_id);
                        return Executed::error(&Command::Thing(cmd), &error, false);
                    }
                }
            }
        };
        {
            let mut state = client.session.lock();
            let view = state.policy_view(&policy, &namespace, now);
            if !view.check(
                ResourceType::Thing,
                "/",
                Permission::Write,
                Mode::Unrestricted,
            ) {
                drop(state);
                let error = thing::not_modifiable(&cmd.thing_id, &cmd.path, "/");
                return Executed::error(&Command::Thing(cmd), &error, true);
            }
        }
        if named.is_none()
            && let Some(Value::Object(map)) = cmd.value.as_mut()
        {
            map.insert("policyId".to_owned(), Value::String(policy_id.clone()));
        }
        // The thing must still not exist when the write runs.
        let mut executed =
            self.write_executed(Command::Thing(cmd), now, Some(policy), Precondition::Absent);
        if let (Executed::Written { durable, .. }, Some(policy_durable)) =
            (&mut executed, policy_durable)
        {
            let thing = std::mem::replace(durable, Durable::done());
            *durable = thing.after(policy_durable);
        }
        executed
    }

    fn execute_policy(&self, client: &Client, cmd: PolicyCommand, now: Timestamp) -> Executed {
        let policy_id = PolicyId::from(&cmd.policy_id);
        let id = policy_id.as_str();
        let namespace = policy_id.namespace();
        if !client.owns(namespace) {
            let error = policy_refusal(&cmd);
            return Executed::error(&Command::Policy(cmd), &error, true);
        }
        let current = self.store.get(&policy_key(id));
        let policy = match &current {
            Some(_) => match self.policies.get(&policy_id) {
                Some(policy) => Some(policy),
                None => {
                    let error = policy_not_found(id);
                    return Executed::error(&Command::Policy(cmd), &error, false);
                }
            },
            None => None,
        };
        match &policy {
            Some(policy) => {
                let mut state = client.session.lock();
                let view = state.policy_view(policy, namespace, now);
                if let Some(requirement) = first_denied(view, &required_policy_permissions(&cmd)) {
                    let error = policy_denied(&cmd, requirement);
                    drop(state);
                    return Executed::error(&Command::Policy(cmd), &error, true);
                }
                if cmd.action == Action::Retrieve {
                    let answer = apply_policy_command(current.as_deref(), &cmd, now, &self.limits);
                    return match answer {
                        Ok(applied) => {
                            let status = applied.status();
                            let value = applied
                                .response()
                                .value
                                .as_ref()
                                .and_then(|v| cut_policy_to_view(view, &cmd.path, v));
                            drop(state);
                            let revision = current.as_deref().map(|e| e.revision);
                            Executed::Answered {
                                reply: Envelope::response(&Command::Policy(cmd), status, value)
                                    .with_etag(revision.filter(|_| status == 200)),
                                denied: false,
                            }
                        }
                        Err(error) => {
                            drop(state);
                            Executed::error(&Command::Policy(cmd), &error, false)
                        }
                    };
                }
            }
            None => {
                if cmd.action == Action::Retrieve || cmd.action == Action::Delete {
                    let error = policy_not_found(id);
                    return Executed::error(&Command::Policy(cmd), &error, false);
                }
                if !client.solution_grants(ResourceType::Policy, Permission::Create, now) {
                    let error = policy_refusal(&cmd);
                    return Executed::error(&Command::Policy(cmd), &error, true);
                }
            }
        }
        let expected_revision = current.as_ref().map(|e| e.revision);
        self.write_executed(
            Command::Policy(cmd),
            now,
            policy,
            Precondition::Revision(expected_revision),
        )
    }

    /// Authorizes the sender of a live message (DESIGN.md §3): unrestricted WRITE on its
    /// `message:` resource in the thing's policy. The policy the receivers are judged in, or
    /// the Ditto error (also when the thing does not exist: the sender learns nothing).
    pub fn authorize_message(
        &self,
        client: &Client,
        message: &LiveMessage,
        resource: &str,
        now: Timestamp,
    ) -> Result<PolicyRef, DittoError> {
        let namespace = message.thing_id.namespace();
        let not_allowed = || {
            DittoError::new(
                403,
                "messages:message.notallowed",
                format!(
                    "the message to `{}` could not be sent: the requester may not WRITE `message:{resource}`",
                    message.thing_id
                ),
            )
        };
        if !client.owns(namespace) {
            return Err(not_allowed());
        }
        if let Err(e) = self.store.current() {
            return Err(DittoError::new(
                503,
                "messages:unavailable",
                format!("the message cannot be authorized now: {e}"),
            ));
        }
        let policy = self
            .policies
            .of_thing(&message.thing_id)
            .ok_or_else(not_allowed)?;
        let mut state = client.session.lock();
        let view = state.policy_view(&policy, namespace, now);
        if view.check(
            ResourceType::Message,
            resource,
            Permission::Write,
            Mode::Unrestricted,
        ) {
            drop(state);
            Ok(policy)
        } else {
            Err(not_allowed())
        }
    }
}

/// The policy ID a thing command sets, if it sets one: a whole thing (create, modify, merge at
/// the root with `policyId`) or the `/policyId` path itself.
fn new_policy_id(cmd: &ThingCommand) -> Option<&str> {
    if cmd.action == Action::Retrieve || cmd.action == Action::Delete {
        return None;
    }
    let value = cmd.value.as_ref()?;
    match cmd.path.segments() {
        [] => value.get("policyId").and_then(Value::as_str),
        [only] if only == "policyId" => value.as_str(),
        _ => None,
    }
}
