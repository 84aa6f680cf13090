//! The twin topic space over MQTT (DESIGN.md §3, §4): thing and policy commands, their events,
//! and live messages, each authorized against the policy of the thing it is about.
//!
//! A command goes: solution namespace check → the thing's policy (its compiled current revision
//! from the [`PolicyCache`], keyed by policy ID and entity revision) → the requester's view of
//! it (memoized per session: [`crate::core::session::PolicyViews`]) → the command's requirements
//! (`twin::authz`) → `apply` under the entity's lock in the store → the journal. The caller
//! acknowledges once [`Executed::Written::durable`] completes and only then publishes the
//! events: a subscriber never sees a change that a crash could take back.
//!
//! A policy change bumps the policy entity's revision: the next check anywhere (commands,
//! event deliveries, live messages) finds the cached enforcer stale and compiles the new
//! revision, and every session's memoized view follows (it compares enforcers). So a
//! revocation takes effect for every live connection at once, with no reconnect.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use policy::{Enforcer, Mode, Permission, PolicyCache, ResourceType, Timestamp};
use serde_json::{Value, json};
use twin::apply::{Applied, apply_policy_command, apply_thing_command};
use twin::authz::{
    cut_event_to_view, cut_policy_to_view, cut_to_view, denied, first_denied,
    grants_without_allocation, policy_denied, required_permissions, required_policy_permissions,
};
use twin::command::{Action, Command, CommandHeaders, PolicyCommand, ThingCommand};
use twin::entity::{Entity, EntityKey, EntityKind, Event};
use twin::error::DittoError;
use twin::path::ThingPath;
use twin::protocol::envelope::Envelope;
use twin::protocol::message::LiveMessage;
use twin::protocol::mqtt::write_event_topic;
use twin::store::{Durable, EmbeddedStore, TwinStore, TwinStoreExt, WriteError, Written};
use twin::thing::{self, Limits};

use crate::mqtt::codec::{QoS, TopicName};
use crate::core::dispatch::{self, Target};
use crate::metrics::Metrics;
use crate::core::session::{Delivery, Message, Session};
use crate::core::space::SolutionSpace;

/// The store and the compiled policies.
#[derive(Debug)]
pub struct Twins {
    pub store: Arc<EmbeddedStore>,
    cache: PolicyCache,
    /// For policies with imports: each imported policy's revision when the importer was
    /// compiled (`None`: it did not exist).
    imports: RwLock<HashMap<Box<str>, ImportRevisions>>,
    pub limits: Limits,
}

/// The policies one policy imports, each with its revision when the importer was compiled.
type ImportRevisions = Vec<(Box<str>, Option<u64>)>;

/// A policy's ID and its compiled current revision.
#[derive(Debug, Clone)]
pub struct PolicyRef {
    pub id: Arc<str>,
    pub enforcer: Arc<Enforcer>,
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
    },
}

impl Executed {
    fn error(command: &Command, error: &DittoError, denied: bool) -> Self {
        Executed::Answered {
            reply: Envelope::command_error(command, error),
            denied,
        }
    }
}

/// Who sends a command: the solution (its namespaces, its policy) and the session (subjects and
/// their memoized views).
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    pub namespaces: &'a [String],
    pub space: &'a SolutionSpace,
    pub session: &'a Session,
}

impl Requester<'_> {
    fn owns(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| n == namespace)
    }

    /// Whether the solution policy grants `permission` on `kind:/` (CREATE on `thing:/` or
    /// `policy:/`).
    fn solution_grants(&self, kind: ResourceType, permission: Permission, now: Timestamp) -> bool {
        let policy = self.space.policy();
        let mut state = self.session.lock();
        state.refresh_view(&policy, now);
        state
            .view()
            .check(kind, "/", permission, Mode::Unrestricted)
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
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        Twins {
            store,
            cache: PolicyCache::new(100_000),
            imports: RwLock::new(HashMap::new()),
            limits: Limits::default(),
        }
    }

    /// The compiled current revision of policy `id` (`None`: no such policy).
    pub fn enforcer(&self, id: &str) -> Option<Arc<Enforcer>> {
        let entity = self.store.get(&policy_key(id))?;
        if let Some(cached) = self.cache.get(id)
            && cached.revision == entity.revision
            && self.imports_unchanged(id)
        {
            return Some(cached.enforcer);
        }
        // Stored policies were validated when written; one that no longer parses grants nothing.
        let policy = policy::policy_from_value(&entity.doc).ok()?;
        let mut revisions = Vec::with_capacity(policy.imports.len());
        let imported: Vec<policy::Policy> = policy
            .imports
            .keys()
            .filter_map(|import| {
                let doc = self.store.get(&policy_key(import.as_str()));
                revisions.push((
                    Box::<str>::from(import.as_str()),
                    doc.as_ref().map(|d| d.revision),
                ));
                policy::policy_from_value(&doc?.doc).ok()
            })
            .collect();
        let refs: Vec<&policy::Policy> = imported.iter().collect();
        let enforcer = Arc::new(Enforcer::compile_with_imports(&policy, &refs));
        {
            let mut imports = self.imports.write().unwrap_or_else(PoisonError::into_inner);
            if revisions.is_empty() {
                imports.remove(id);
            } else {
                imports.insert(id.into(), revisions);
            }
        }
        self.cache.insert(id, entity.revision, enforcer.clone());
        Some(enforcer)
    }

    /// Whether the policies `id` imports are at the revisions its cached enforcer was compiled
    /// with (a change to an imported policy changes the importer's effective entries).
    fn imports_unchanged(&self, id: &str) -> bool {
        let imports = self.imports.read().unwrap_or_else(PoisonError::into_inner);
        let Some(recorded) = imports.get(id) else {
            return true;
        };
        recorded.iter().all(|(import, revision)| {
            self.store.get(&policy_key(import)).map(|e| e.revision) == *revision
        })
    }

    /// The policy of thing `thing_id` (`None`: no such thing, or its policy is gone).
    pub fn thing_policy(&self, thing_id: &str) -> Option<PolicyRef> {
        let id = self.store.thing_policy_id(thing_id)?;
        let enforcer = self.enforcer(&id)?;
        Some(PolicyRef { id, enforcer })
    }

    fn policy_ref(&self, id: &str) -> Option<PolicyRef> {
        Some(PolicyRef {
            enforcer: self.enforcer(id)?,
            id: id.into(),
        })
    }

    /// Authorizes and applies a command for `requester`.
    pub fn execute(&self, requester: Requester<'_>, command: Command, now: Timestamp) -> Executed {
        match command {
            Command::Thing(cmd) => self.execute_thing(requester, cmd, now),
            Command::Policy(cmd) => self.execute_policy(requester, cmd, now),
        }
    }

    fn execute_thing(
        &self,
        requester: Requester<'_>,
        cmd: ThingCommand,
        now: Timestamp,
    ) -> Executed {
        let namespace = cmd.thing_id.namespace();
        let refused = |cmd: ThingCommand| {
            let error = if cmd.action == Action::Retrieve {
                thing::not_found(&cmd.thing_id, &cmd.path)
            } else {
                thing::not_modifiable(&cmd.thing_id, &cmd.path, &cmd.path.to_string())
            };
            Executed::error(&Command::Thing(cmd), &error, true)
        };
        if !requester.owns(namespace) {
            return refused(cmd);
        }
        let Some(policy_id) = self.store.thing_policy_id(cmd.thing_id.as_str()) else {
            return if cmd.action != Action::Retrieve
                && cmd.action != Action::Delete
                && cmd.path.is_root()
            {
                self.create_thing(requester, cmd, now)
            } else {
                let error = thing::not_found(&cmd.thing_id, &cmd.path);
                Executed::error(&Command::Thing(cmd), &error, false)
            };
        };
        let Some(enforcer) = self.enforcer(&policy_id) else {
            // A thing whose policy is gone is inaccessible (as in Ditto).
            return refused(cmd);
        };
        let policy = PolicyRef {
            id: policy_id,
            enforcer,
        };
        // Authorize, and for a retrieve answer from the same view.
        {
            let mut state = requester.session.lock();
            let view = state.policy_view(&policy.id, &policy.enforcer, namespace, now);
            // The common case (one requirement) is decided without allocating; a denial or a
            // merge goes through the requirement list, which also names the denied resource.
            if grants_without_allocation(view, &cmd) != Some(true)
                && let Some(requirement) = first_denied(view, &required_permissions(&cmd))
            {
                let error = denied(&cmd, requirement);
                drop(state);
                return Executed::error(&Command::Thing(cmd), &error, true);
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
                        let command = Command::Thing(cmd);
                        Executed::Answered {
                            reply: Envelope::response(&command, status, value),
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
            && new_policy != &*policy.id
        {
            // A thing may only be moved to an existing policy of the solution's namespaces.
            let owned = new_policy
                .split_once(':')
                .is_some_and(|(ns, _)| requester.owns(ns));
            if !owned || self.enforcer(new_policy).is_none() {
                let error = policy_not_found(new_policy);
                return Executed::error(&Command::Thing(cmd), &error, false);
            }
        }
        self.write_thing(cmd, now, policy)
    }

    /// Applies a thing change authorized with `policy`, which the thing must still name when
    /// the write runs (else 409, nothing applied).
    fn write_thing(&self, cmd: ThingCommand, now: Timestamp, policy: PolicyRef) -> Executed {
        let id = policy.id.clone();
        self.write_executed(Command::Thing(cmd), now, Some(policy), move |current| {
            current.is_none_or(|e| e.doc.get("policyId").and_then(Value::as_str) == Some(&*id))
        })
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
        unchanged: impl FnOnce(Option<&Entity>) -> bool,
    ) -> Executed {
        match self.write_command(&command, now, unchanged) {
            Ok((written, status, value)) => Executed::Written {
                durable: written.durable,
                events: written.events,
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
    fn create_thing(
        &self,
        requester: Requester<'_>,
        mut cmd: ThingCommand,
        now: Timestamp,
    ) -> Executed {
        if !requester.solution_grants(ResourceType::Thing, Permission::Create, now) {
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
        let policy = match self.policy_ref(&policy_id) {
            Some(policy) => policy,
            None if named.is_some() => {
                let error = policy_not_found(&policy_id);
                return Executed::error(&Command::Thing(cmd), &error, false);
            }
            None => {
                let subjects: serde_json::Map<String, Value> = requester
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
                let Ok(policy_id_parsed) = policy::PolicyId::parse(&policy_id) else {
                    let error = DittoError::id_invalid(format!("`{policy_id}` is not a policy ID"));
                    return Executed::error(&Command::Thing(cmd), &error, false);
                };
                let create = PolicyCommand {
                    policy_id: policy_id_parsed,
                    action: Action::Create,
                    path: "/".to_owned(),
                    value: Some(doc),
                    headers: CommandHeaders::default(),
                };
                // The thing's journal record follows the policy's: once the thing's write is
                // durable, so is the policy.
                if let Err(error) = self.write_command(&Command::Policy(create), now, |_| true) {
                    return Executed::error(&Command::Thing(cmd), &error, false);
                }
                match self.policy_ref(&policy_id) {
                    Some(policy) => policy,
                    None => {
                        let error = policy_not_found(&policy_id);
                        return Executed::error(&Command::Thing(cmd), &error, false);
                    }
                }
            }
        };
        {
            let mut state = requester.session.lock();
            let view = state.policy_view(&policy.id, &policy.enforcer, &namespace, now);
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
        self.write_executed(Command::Thing(cmd), now, Some(policy), |current| {
            current.is_none()
        })
    }

    fn execute_policy(
        &self,
        requester: Requester<'_>,
        cmd: PolicyCommand,
        now: Timestamp,
    ) -> Executed {
        let id = cmd.policy_id.as_str().to_owned();
        let namespace = id.split_once(':').map_or("", |(ns, _)| ns).to_owned();
        if !requester.owns(&namespace) {
            let error = policy_refusal(&cmd);
            return Executed::error(&Command::Policy(cmd), &error, true);
        }
        let key = policy_key(&id);
        let current = self.store.get(&key);
        let policy = match &current {
            Some(_) => match self.policy_ref(&id) {
                Some(policy) => Some(policy),
                None => {
                    let error = policy_not_found(&id);
                    return Executed::error(&Command::Policy(cmd), &error, false);
                }
            },
            None => None,
        };
        match &policy {
            Some(policy) => {
                let mut state = requester.session.lock();
                let view = state.policy_view(&policy.id, &policy.enforcer, &namespace, now);
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
                            Executed::Answered {
                                reply: Envelope::response(&Command::Policy(cmd), status, value),
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
                    let error = policy_not_found(&id);
                    return Executed::error(&Command::Policy(cmd), &error, false);
                }
                if !requester.solution_grants(ResourceType::Policy, Permission::Create, now) {
                    let error = policy_refusal(&cmd);
                    return Executed::error(&Command::Policy(cmd), &error, true);
                }
            }
        }
        let expected_revision = current.as_ref().map(|e| e.revision);
        self.write_executed(Command::Policy(cmd), now, policy, move |current| {
            current.map(|e| e.revision) == expected_revision
        })
    }

    /// Publishes durable events to the subscribers of their topics, each delivery checked on
    /// partial READ at the event's path in the entity's policy and its value cut to the
    /// subscriber's view (nothing visible: not delivered).
    pub fn publish_events(
        &self,
        space: &SolutionSpace,
        events: &[Event],
        fallback: Option<&PolicyRef>,
        metrics: &Metrics,
        now: Timestamp,
    ) {
        let mut topic = String::new();
        for event in events {
            topic.clear();
            if write_event_topic(&mut topic, event).is_err() {
                continue;
            }
            let (kind, policy) = match event.key.kind {
                EntityKind::Thing => (
                    ResourceType::Thing,
                    self.thing_policy(&event.key.id)
                        .or_else(|| fallback.cloned()),
                ),
                EntityKind::Policy => (
                    ResourceType::Policy,
                    self.policy_ref(&event.key.id).or_else(|| fallback.cloned()),
                ),
                _ => continue,
            };
            let Some(policy) = policy else { continue };
            let Ok(topic_name) = topic.parse::<TopicName>() else {
                continue;
            };
            let namespace = event.key.id.split(':').next().unwrap_or_default();
            // Parsed only if some delivery has to be cut.
            let thing_path = std::cell::OnceCell::new();
            let mut full: Option<Arc<Message>> = None;
            let message = |payload: String| {
                Arc::new(Message {
                    topic: topic_name.clone(),
                    payload: Bytes::from(payload),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: None,
                    expires_at: None,
                    publisher: 0,
                })
            };
            dispatch::route(space, &topic, 0, QoS::AtLeastOnce, |session, target| {
                let outcome = session.offer_with(metrics, |state| {
                    let view = state.policy_view(&policy.id, &policy.enforcer, namespace, now);
                    let path = if event.path.is_empty() {
                        "/"
                    } else {
                        &event.path
                    };
                    if !view.check(kind, path, Permission::Read, Mode::Partial) {
                        return None;
                    }
                    let whole = view.check(kind, path, Permission::Read, Mode::Unrestricted);
                    let message = if whole || event.value.is_none() {
                        full.get_or_insert_with(|| {
                            message(event_payload(event, event.value.as_ref()))
                        })
                        .clone()
                    } else {
                        let value = event.value.as_ref()?;
                        let path_of_event =
                            thing_path.get_or_init(|| ThingPath::parse(&event.path).ok());
                        let cut = match (kind, path_of_event) {
                            (ResourceType::Thing, Some(p)) => cut_event_to_view(view, p, value)?,
                            _ => cut_policy_to_view(view, path, value)?,
                        };
                        message(event_payload(event, Some(&cut)))
                    };
                    Some(delivery(message, target))
                });
                dispatch::note_offer(space, session, outcome, metrics)
            });
        }
    }

    /// Routes a live message (DESIGN.md §3): the sender needs unrestricted WRITE on its
    /// `message:` resource in the thing's policy, each receiver unrestricted READ on it. Not
    /// stored. `Err`: the sender may not send it (or the thing does not exist).
    #[allow(clippy::too_many_arguments)]
    pub fn route_message(
        &self,
        requester: Requester<'_>,
        message: &LiveMessage,
        topic: &TopicName,
        payload: Bytes,
        forwarded: Option<Box<crate::core::session::ForwardedProperties>>,
        qos: QoS,
        metrics: &Metrics,
        now: Timestamp,
    ) -> Result<usize, DittoError> {
        let namespace = message.thing_id.namespace();
        let resource = message.path();
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
        if !requester.owns(namespace) {
            return Err(not_allowed());
        }
        let policy = self
            .thing_policy(message.thing_id.as_str())
            .ok_or_else(not_allowed)?;
        {
            let mut state = requester.session.lock();
            let view = state.policy_view(&policy.id, &policy.enforcer, namespace, now);
            if !view.check(
                ResourceType::Message,
                &resource,
                Permission::Write,
                Mode::Unrestricted,
            ) {
                return Err(not_allowed());
            }
        }
        let shared = Arc::new(Message {
            topic: topic.clone(),
            payload,
            qos,
            retain: false,
            properties: forwarded,
            expires_at: None,
            publisher: requester.session.id,
        });
        Ok(dispatch::route(
            requester.space,
            topic.as_str(),
            requester.session.id,
            qos,
            |session, target| {
                let outcome = session.offer_with(metrics, |state| {
                    let view = state.policy_view(&policy.id, &policy.enforcer, namespace, now);
                    view.check(
                        ResourceType::Message,
                        &resource,
                        Permission::Read,
                        Mode::Unrestricted,
                    )
                    .then(|| delivery(shared.clone(), target))
                });
                dispatch::note_offer(requester.space, session, outcome, metrics)
            },
        ))
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

fn delivery(message: Arc<Message>, target: Target) -> Delivery {
    Delivery {
        qos: target.qos,
        retain: false,
        subscription_ids: target.subscription_ids,
        message,
    }
}

fn event_payload(event: &Event, value: Option<&Value>) -> String {
    let mut out = String::new();
    let _ = twin::protocol::mqtt::write_event_payload(&mut out, event, value);
    out
}

/// Whether a subscription filter in the twin topic space is inside `namespaces`: its first level
/// is one of them or a wildcard (a wildcard only matches the solution's own topics, since each
/// solution has its own tree), or the filter is `ditto/…`.
pub fn twin_filter_allowed(filter: &str, namespaces: &[String]) -> bool {
    let first = filter.split('/').next().unwrap_or_default();
    first == "ditto" || first == "+" || first == "#" || namespaces.iter().any(|n| n == first)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use policy::{Mode, Permission, ResourceType, Timestamp};
    use serde_json::{Value, json};
    use twin::apply::{Applied, apply_policy_command};
    use twin::command::{Action, CommandHeaders, PolicyCommand};
    use twin::store::{EmbeddedStore, StoreOptions, TwinStoreExt};

    use super::{Twins, policy_key, twin_filter_allowed};

    fn put_policy(twins: &Twins, doc: Value) {
        let id = doc["policyId"].as_str().unwrap().to_owned();
        let cmd = PolicyCommand {
            policy_id: policy::PolicyId::parse(&id).unwrap(),
            action: Action::Modify,
            path: "/".to_owned(),
            value: Some(doc),
            headers: CommandHeaders::default(),
        };
        let limits = twins.limits;
        let written = twins
            .store
            .write(&policy_key(&id), |current| -> Result<_, twin::DittoError> {
                match apply_policy_command(current, &cmd, Timestamp::from_unix_millis(1), &limits)?
                {
                    Applied::Change(change) => Ok(vec![change.event]),
                    Applied::Retrieve(_) => Ok(Vec::new()),
                }
            })
            .unwrap();
        written.durable.wait().unwrap();
    }

    #[test]
    fn a_change_to_an_imported_policy_reaches_the_importers_cached_enforcer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(StoreOptions::new(dir.path())).unwrap());
        let twins = Twins::new(store);
        let admin = json!({"subjects": {"s:admin": {"type": "t"}},
            "resources": {"policy:/": {"grant": ["READ", "WRITE"], "revoke": []}}});
        let base = |grant: &[&str]| {
            json!({"policyId": "org.acme:base", "entries": {
                "admin": admin.clone(),
                "readers": {"subjects": {"s:reader": {"type": "t"}},
                    "resources": {"thing:/": {"grant": grant, "revoke": []}}}
            }})
        };
        put_policy(&twins, base(&["READ"]));
        put_policy(
            &twins,
            json!({"policyId": "org.acme:p", "imports": {"org.acme:base": {}},
                "entries": {"admin": admin.clone()}}),
        );
        let reads = |twins: &Twins| {
            twins
                .enforcer("org.acme:p")
                .unwrap()
                .for_subjects(
                    &["s:reader"],
                    Some("org.acme"),
                    Timestamp::from_unix_millis(2),
                )
                .check(ResourceType::Thing, "/", Permission::Read, Mode::Partial)
        };
        assert!(reads(&twins));
        // The importer itself does not change; the imported policy revokes the grant.
        put_policy(&twins, base(&[]));
        assert!(!reads(&twins), "the importer's enforcer was recompiled");
    }

    #[test]
    fn twin_filters_must_stay_in_the_solutions_namespaces() {
        let owned = ["org.acme".to_owned()];
        assert!(twin_filter_allowed(
            "org.acme/+/things/twin/events/#",
            &owned
        ));
        assert!(twin_filter_allowed("+/+/things/twin/events/#", &owned));
        assert!(twin_filter_allowed("ditto/responses", &owned));
        assert!(!twin_filter_allowed("com.other/+/things/#", &owned));
        assert!(!twin_filter_allowed("org.acme.fleet/x/things/#", &owned));
    }
}
