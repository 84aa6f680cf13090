//! The protocol-neutral core (DESIGN.md §4). Every way in — MQTT, AMQP and HTTP/SSE now,
//! bridges next — is an adapter that turns its wire into these calls and its answers back into
//! its wire; an adapter never authorizes, applies or routes on its own.
//!
//! - [`Core::authenticate`]: credentials → [`Identity`] (solution, subjects, client ID, expiry),
//!   or a [`Refusal`] the adapter maps to its wire (`identity`).
//! - [`Core::attach`]: an identity takes its session (the sink its deliveries go into; a
//!   client ID is unique within its solution: a second one takes the session over) → [`Client`].
//! - [`Core::publish`] / [`Core::execute`]: a publish on a topic (the twin topic space or a
//!   plain topic), a thing or policy command, a live message → [`Outcome`]: what the requester
//!   is told ([`Told`]) now, or a [`Pending`] write that tells it once durable (`execute`).
//! - [`Core::subscribe`]: a filter for a client's session, with its retained messages.
//! - One fan-out, `dispatch`, for plain messages, events and live messages alike: READ checked
//!   per delivery, events cut to each subscriber's view.
//!
//! Below: `twins` (authorize and apply), `policies` (the compiled-policy cache), `space` (a
//! solution's topic tree, retained messages and sessions; `retained` keeps those in the
//! journal; `sessions` keeps persistent sessions there), `session` (a client's subjects,
//! views, subscriptions and queue), `topics` (the subscription tree), `message` (what travels).

pub mod admin;
pub mod deadlines;
pub mod dispatch;
mod documents;
mod execute;
pub mod identity;
pub mod message;
pub mod policies;
pub mod retained;
pub mod session;
pub mod sessions;
pub mod space;
pub mod stats;
pub mod topics;
pub mod twins;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use policy::{Mode, Permission, ResourceType, Timestamp};
use tokio::sync::watch;
use twin::protocol::space::FilterSpace;
use twin::store::Durable;

pub use execute::{Outcome, Pending, ReplyTo, Request, Told, Verdict};
pub use identity::{Credentials, Identity, Refusal};

use crate::auth::secret::{hex, random_bytes};
use crate::core::identity::{Authenticator, ReauthRefusal};
use crate::core::message::Message;
use crate::core::session::{Link, Session, SubscriptionRecord};
use crate::core::space::{SolutionSpace, Spaces, Subscriber, tree_filter};
use crate::core::twins::Twins;
use crate::limits::MqttSettings;
use crate::metrics::Metrics;
use crate::mqtt::codec::SubscriptionOptions;

/// Everything the adapters share: solutions and issuers, every solution's topics and sessions,
/// things and their compiled policies, limits, metrics and the shutdown signal.
#[derive(Debug)]
pub struct Core {
    pub settings: MqttSettings,
    pub auth: Authenticator,
    pub spaces: Spaces,
    /// Things, policies and their compiled policies.
    pub twins: Twins,
    pub metrics: Arc<Metrics>,
    /// Becomes `true` when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The solutions' bridge connections: their statuses, and the signal that they changed.
    pub bridges: crate::bridge::Bridges,
    /// The connections' keep-alive and token deadlines: one timer for all.
    pub deadlines: Arc<deadlines::Deadlines>,
    /// Cluster mode: where messages published here go to reach the other nodes' subscribers
    /// (unset: one node).
    pub relay: std::sync::OnceLock<Arc<dyn Relay>>,
}

/// Cluster mode: carries messages authorized on this node to the other nodes, whose own
/// fan-out judges them for their subscribers (events travel with the store instead).
pub trait Relay: Send + Sync + std::fmt::Debug {
    /// This node's ID (written into the sessions it holds).
    fn node(&self) -> &str;
    /// Whether node `node` was heard from lately (it holds what it says it holds).
    fn node_alive(&self, node: &str) -> bool;
    /// Asks every other node to let go of the session `client_id` of `solution` (its
    /// connection is ended, as by a takeover). With `wait`, completes once a node answered
    /// that it did, or after a bound: `true` if one did.
    fn claim<'a>(
        &'a self,
        solution: &'a str,
        client_id: &'a str,
        wait: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>;
    /// A plain message of `solution`, its publisher authorized.
    fn plain(&self, solution: &str, message: &Message);
    /// A live message to `thing` (`resource`: its `message:` path), its sender authorized.
    fn live(&self, solution: &str, message: &Message, thing: &str, resource: &str);
    /// An answer to a reply address nobody waits at on this node (an HTTP client waiting on
    /// another node for a device's answer to its live message).
    fn reply(&self, solution: &str, message: &Message);
}

/// The prefix of reply addresses ([`Core::reply_address`]).
pub const REPLY_PREFIX: &str = "$thingsgate/replies/";

/// The wall clock as the policy crate takes it.
pub fn now() -> Timestamp {
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_unix_millis(millis)
}

/// A client ID for a client that gave none: `tg-` and 16 random hex digits. `None` if the
/// system's random generator fails (then there is no unguessable ID to give: refuse).
pub fn assign_client_id() -> Option<String> {
    let bytes = random_bytes::<8>().ok()?;
    Some(format!("tg-{}", hex(&bytes)))
}

/// An identity attached to its session: who a request is from, and where its deliveries and
/// answers go.
#[derive(Debug)]
pub struct Client {
    pub identity: Identity,
    pub space: Arc<SolutionSpace>,
    pub session: Arc<Session>,
    /// The handle the session holds while this client is attached (a takeover kicks it).
    pub link: Arc<Link>,
    /// The session generation this client attached as.
    pub generation: u64,
}

impl Client {
    /// Whether the client's solution owns `namespace` now (checked before any policy; a
    /// namespace removed online isolates at once).
    pub fn owns(&self, namespace: &str) -> bool {
        self.space.owns(namespace)
    }

    /// Whether the solution policy grants `permission` on `kind:{path}` unrestricted.
    pub fn solution_allows(
        &self,
        kind: ResourceType,
        path: &str,
        permission: Permission,
        mode: Mode,
        now: Timestamp,
    ) -> bool {
        let policy = self.space.policy();
        let mut state = self.session.lock();
        state.refresh_view(&policy, now);
        state.view().check(kind, path, permission, mode)
    }

    /// Whether the solution policy grants `permission` on `kind:/` (CREATE on `thing:/` or
    /// `policy:/`).
    pub fn solution_grants(
        &self,
        kind: ResourceType,
        permission: Permission,
        now: Timestamp,
    ) -> bool {
        self.solution_allows(kind, "/", permission, Mode::Unrestricted, now)
    }
}

/// How an identity wants its session.
#[derive(Debug, Clone, Copy)]
pub struct SessionRequest {
    /// Start anew (MQTT Clean Start; an AMQP exclusive queue): an existing session is dropped.
    pub clean_start: bool,
    /// Seconds the session outlives its connection (0: ends with it; `u32::MAX`: never),
    /// before the broker's cap.
    pub expiry_seconds: u32,
    /// How the client connects (for metrics).
    pub protocol: session::Protocol,
}

/// A session granted by [`Core::attach`].
#[derive(Debug)]
pub struct Attached {
    pub client: Client,
    /// An existing session was resumed.
    pub session_present: bool,
    /// The expiry in force, if the broker capped the requested one.
    pub capped_expiry: Option<u32>,
    /// A persistent session's record: the session is acknowledged (CONNACK) once it is durable.
    pub saved: Option<Durable>,
}

/// A session seen from outside ([`Core::session_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionStatus {
    /// A client is attached to it now.
    pub held: bool,
    /// It outlives its connection.
    pub persistent: bool,
    /// Messages waiting in its queue.
    pub queued: usize,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeDenied;

impl Core {
    /// Authenticates `credentials` from `peer` (DESIGN.md §2); refusals are counted.
    pub async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
        peer: IpAddr,
    ) -> Result<Identity, Refusal> {
        match self.auth.authenticate(credentials, peer).await {
            Ok(identity) => {
                self.metrics.connects_accepted.inc();
                Ok(identity)
            }
            Err(refusal) => {
                self.metrics.refused(refusal.label());
                tracing::debug!(%peer, reason = refusal.label(), "authentication refused");
                Err(refusal)
            }
        }
    }

    /// Cluster mode: before [`Core::attach`], the client ID is claimed from the other nodes —
    /// a connection holding it elsewhere is ended (a takeover across nodes). If the stored
    /// session names another node, that node's answer is awaited (it stops writing the
    /// session), and then this node's store catching up with what it wrote; otherwise the
    /// claim is not waited for. One node: nothing.
    pub async fn claim(&self, identity: &Identity) {
        let Some(relay) = self.relay.get() else {
            return;
        };
        let solution = identity.solution.id.as_str();
        let key = twin::EntityKey::new(
            twin::EntityKind::Session,
            format!("{solution}/{}", identity.client_id),
        );
        let elsewhere = self.twins.store.get(&key).is_some_and(|e| {
            e.doc
                .get("node")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|node| node != relay.node())
        });
        if relay.claim(solution, &identity.client_id, elsewhere).await
            && let Err(e) = self.twins.store.caught_up().await
        {
            tracing::warn!(error = %e, "cluster: the store did not catch up after a session was handed over");
        }
    }

    /// Cluster mode: another node claimed `client_id` of `solution`: its session here is
    /// dropped from this node (not from the store: the claiming node continues it), and a
    /// connection holding it is ended as by a takeover. Whether there was one.
    pub fn release_claimed(&self, solution: &str, client_id: &str) -> bool {
        let Some(solution) = self.auth.solutions.get(solution) else {
            return false;
        };
        let space = self.spaces.get_or_create(&solution);
        let old = space.sessions().remove(client_id);
        let Some(old) = old else {
            return false;
        };
        let kicked = {
            let mut state = old.lock();
            // The old connection's detach is no longer its own: it writes nothing more.
            state.generation += 1;
            state.link.take()
        };
        if let Some(link) = kicked {
            link.kick();
            self.metrics.sessions_taken_over.inc();
        }
        space.unsubscribe_all(&old);
        space.cancel_pending_will(client_id);
        true
    }

    /// Writes a persistent session's record (with this node's ID in cluster mode).
    fn save_session(
        &self,
        space: &SolutionSpace,
        session: &Session,
        ended: Option<SystemTime>,
    ) -> Option<Durable> {
        let node = self.relay.get().map(|r| r.node());
        sessions::save(&*self.twins.store, space, session, ended, node)
    }

    /// Attaches `identity` to its session: a new one, or the one its client ID left (taken
    /// over from a connection still holding it). Refused when the solution has as many
    /// sessions as allowed and this client ID has none.
    pub fn attach(
        &self,
        identity: Identity,
        request: SessionRequest,
    ) -> Result<Attached, SessionLimit> {
        let settings = &self.settings;
        let expiry = request
            .expiry_seconds
            .min(settings.max_session_expiry_seconds);
        let space = self.spaces.get_or_create(&identity.solution);
        let client_id = identity.client_id.clone();
        let view = space.policy().for_subjects(&identity.subjects, None, now());
        // The check and the insert below are not atomic: a few concurrent attaches may pass
        // the bound together, which it tolerates.
        let over_limit = {
            let sessions = space.sessions();
            !sessions.contains_key(&*client_id) && sessions.len() >= settings.max_sessions
        };
        if over_limit {
            self.metrics.refused("session_limit");
            tracing::warn!(solution = %space.id, limit = settings.max_sessions, "session limit reached");
            return Err(SessionLimit);
        }
        if self.relay.get().is_some() && !space.sessions().contains_key(&*client_id) {
            // Cluster mode: the session another node left (claimed from it already, see
            // `claim`) lives on in the shared store.
            if let Some(relay) = self.relay.get() {
                // The node that left it (detached there, or gone) drops its copy: one holder.
                let relay = relay.clone();
                let (solution, client) = (space.id.as_str().to_owned(), client_id.clone());
                tokio::spawn(async move {
                    relay.claim(&solution, &client, false).await;
                });
            }
            if request.clean_start {
                sessions::forget_stored(&*self.twins.store, &space, &client_id);
            } else {
                sessions::adopt(
                    &*self.twins.store,
                    &self.auth.solutions,
                    &self.spaces,
                    &space,
                    &client_id,
                    settings.max_queued_messages,
                );
            }
        }
        let link = Arc::new(Link::new(
            request.protocol,
            identity.secret.map(std::num::NonZeroU32::get),
        ));
        let mut sessions = space.sessions();
        space.cancel_pending_will(&client_id);
        let mut resumed = None;
        if let Some(old) = sessions.get(&*client_id).cloned() {
            let kicked = old.lock().link.take();
            if let Some(kicked) = kicked {
                kicked.kick();
                self.metrics.sessions_taken_over.inc();
            }
            if request.clean_start {
                sessions.remove(&*client_id);
                space.unsubscribe_all(&old);
                old.lock().clear();
                sessions::remove(&*self.twins.store, &space, &old);
            } else {
                resumed = Some(old);
            }
        }
        let session_present = resumed.is_some();
        let session = resumed.unwrap_or_else(|| {
            Arc::new(Session::new(
                client_id.clone(),
                identity.subjects.clone(),
                view.clone(),
                expiry,
                settings.max_queued_messages,
            ))
        });
        let generation = {
            let mut state = session.lock();
            state.generation += 1;
            state.link = Some(link.clone());
            state.expiry_interval = expiry;
            state.set_subjects(identity.subjects.clone(), view);
            state.generation
        };
        sessions.insert(client_id, session.clone());
        drop(sessions);
        if *self.shutdown.borrow() {
            // Attached after `kick_all` went through this solution's sessions: told at once.
            link.kick();
        }
        let saved = if expiry > 0 {
            self.save_session(&space, &session, None)
        } else {
            sessions::remove(&*self.twins.store, &space, &session);
            None
        };
        Ok(Attached {
            client: Client {
                identity,
                space,
                session,
                link,
                generation,
            },
            session_present,
            capped_expiry: (expiry != request.expiry_seconds).then_some(expiry),
            saved,
        })
    }

    /// Server shutdown (the `shutdown` flag is set): every attached client's link is kicked,
    /// and its connection, seeing the flag, closes as a shutdown. One wake-up per connection
    /// instead of a shutdown future in every connection's wait (~120 bytes per idle
    /// connection); a client attaching after this is kicked by `attach`.
    pub fn kick_all(&self) {
        for space in self.spaces.all() {
            let links: Vec<Arc<Link>> = space
                .sessions()
                .values()
                .filter_map(|session| session.lock().link.clone())
                .collect();
            for link in links {
                link.kick();
            }
        }
    }

    /// The session named `client_id` in `client`'s solution, as another client sees it
    /// (whether it may resume it, how much waits in it); `None` if there is none.
    pub fn session_status(&self, client: &Client, client_id: &str) -> Option<SessionStatus> {
        let Some(session) = client.space.sessions().get(client_id).cloned() else {
            return self.session_status_elsewhere(client, client_id);
        };
        let state = session.lock();
        Some(SessionStatus {
            held: state.link.is_some(),
            persistent: state.expiry_interval > 0,
            queued: state.queued_len(),
        })
    }

    /// Cluster mode: a persistent session this node does not hold, as the store has it: held
    /// while a live node says it is attached there.
    fn session_status_elsewhere(&self, client: &Client, client_id: &str) -> Option<SessionStatus> {
        let relay = self.relay.get()?;
        let key = twin::EntityKey::new(
            twin::EntityKind::Session,
            format!("{}/{client_id}", client.space.id),
        );
        let entity = self.twins.store.get(&key)?;
        let attached = entity
            .doc
            .get("endedAtMillis")
            .is_none_or(serde_json::Value::is_null);
        let node = entity.doc.get("node").and_then(serde_json::Value::as_str);
        Some(SessionStatus {
            held: attached
                && node.is_some_and(|node| node != relay.node() && relay.node_alive(node)),
            persistent: true,
            queued: 0,
        })
    }

    /// A client for one request or stream (HTTP, SSE) or a bridge's subject set: `identity`
    /// with a session of its own that no client ID names and nothing journals — answers and
    /// deliveries go into it and its adapter takes them out. Subscriptions it makes end with
    /// [`Core::release`].
    pub fn transient(&self, identity: Identity) -> Client {
        self.transient_as(identity, session::Protocol::Http)
    }

    /// [`Core::transient`] for an adapter other than HTTP (`protocol` for metrics).
    pub fn transient_as(&self, identity: Identity, protocol: session::Protocol) -> Client {
        self.transient_queue(identity, protocol, self.settings.max_queued_messages)
    }

    /// [`Core::transient_as`] with a queue of `max_queued` messages instead of the sessions'
    /// `max_queued_messages` (a bridge target, drained into a buffer of its own).
    pub fn transient_queue(
        &self,
        identity: Identity,
        protocol: session::Protocol,
        max_queued: usize,
    ) -> Client {
        let space = self.spaces.get_or_create(&identity.solution);
        let view = space.policy().for_subjects(&identity.subjects, None, now());
        let session = Arc::new(Session::new(
            identity.client_id.clone(),
            identity.subjects.clone(),
            view,
            0,
            max_queued,
        ));
        let link = Arc::new(Link::new(protocol, None));
        session.lock().link = Some(link.clone());
        Client {
            identity,
            space,
            session,
            link,
            generation: 0,
        }
    }

    /// The things of `client`'s solution (in `namespaces`, if given) changed at or after
    /// `since`: IDs only, for an adapter catching a stream up (their content is read through
    /// [`Core::execute`], authorized and cut like any retrieve).
    pub fn things_changed_since(
        &self,
        client: &Client,
        since: Timestamp,
        namespaces: Option<&[String]>,
    ) -> Vec<twin::ThingId> {
        let mut changed = Vec::new();
        for key in self.twins.store.keys(twin::EntityKind::Thing) {
            let Ok(id) = twin::ThingId::parse(&key.id) else {
                continue;
            };
            let wanted = client.owns(id.namespace())
                && namespaces.is_none_or(|list| list.iter().any(|n| n == id.namespace()));
            if wanted
                && self
                    .twins
                    .store
                    .get(&key)
                    .is_some_and(|entity| entity.modified >= since)
            {
                changed.push(id);
            }
        }
        changed.sort();
        changed
    }

    /// An unguessable address for answers to `client` (the response topic of a live message
    /// it sends): a publish to it by anyone of the solution reaches `client`'s session alone,
    /// with no topic policy consulted — knowing the address is the permission, as a Ditto
    /// response finds its requester by correlation — until [`Core::release`]. `None` if the
    /// system's random generator fails.
    pub fn reply_address(&self, client: &Client) -> Option<crate::mqtt::codec::TopicName> {
        let bytes = random_bytes::<16>().ok()?;
        let topic = format!("{REPLY_PREFIX}{}", hex(&bytes));
        client.space.add_reply(&topic, &client.session);
        topic.parse().ok()
    }

    /// Ends a [`Core::transient`] client's subscriptions and reply addresses.
    pub fn release(&self, client: &Client) {
        client.space.remove_replies(&client.session);
        client.space.unsubscribe_all(&client.session);
        let mut state = client.session.lock();
        state.link = None;
        state.clear();
    }

    /// The client lets go of its session (its connection ended). Whether the session was
    /// still its own (not taken over) and the session's expiry interval then.
    pub fn detach(&self, client: &Client) -> (bool, u32) {
        let (ours, expiry) = {
            let mut state = client.session.lock();
            let ours = state.generation == client.generation;
            if ours {
                state.link = None;
            }
            (ours, state.expiry_interval)
        };
        if ours && expiry > 0 {
            // The countdown of its expiry starts now, also across a restart.
            self.save_session(&client.space, &client.session, Some(SystemTime::now()));
        }
        (ours, expiry)
    }

    /// Changes how long `client`'s session outlives its connection (capped like at attach).
    /// A session that was to end with its connection cannot be given an expiry at the end
    /// (MQTT-3.14.2-2): `Err`, nothing changed.
    pub fn change_session_expiry(
        &self,
        client: &Client,
        seconds: u32,
    ) -> Result<(), ExpiryAfterZero> {
        let mut state = client.session.lock();
        if state.expiry_interval == 0 && seconds != 0 {
            return Err(ExpiryAfterZero);
        }
        state.expiry_interval = seconds.min(self.settings.max_session_expiry_seconds);
        Ok(())
    }

    /// Ends a detached session now (expiry 0) or once its expiry interval has passed without
    /// a new attach.
    pub fn expire_session(&self, client: &Client, expiry: u32) {
        self.expire_later(
            client.space.clone(),
            client.session.clone(),
            client.generation,
            expiry,
        );
    }

    /// Ends `session` (attached as `generation`) after `seconds` unless a client attached to it
    /// meanwhile; 0: now; `u32::MAX`: never.
    fn expire_later(
        &self,
        space: Arc<SolutionSpace>,
        session: Arc<Session>,
        generation: u64,
        seconds: u32,
    ) {
        if seconds == 0 {
            space.end_session(&session);
            sessions::remove(&*self.twins.store, &space, &session);
        } else if seconds != u32::MAX {
            let store = self.twins.store.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(u64::from(seconds))).await;
                let expired = {
                    let state = session.lock();
                    state.generation == generation && state.link.is_none()
                };
                if expired {
                    space.end_session(&session);
                    sessions::remove(&*store, &space, &session);
                }
            });
        }
    }

    /// Puts the persistent sessions of the store back (`crate::core::sessions`), their expiry
    /// counting on from where it was. Must run inside the runtime. Returns how many.
    pub fn restore_sessions(&self) -> usize {
        if self.twins.store.shared() {
            // Cluster mode: a stored session may be held by another node; each is taken up
            // (`attach`) when its client connects here.
            return 0;
        }
        let restored = sessions::restore(
            &*self.twins.store,
            &self.auth.solutions,
            &self.spaces,
            self.settings.max_queued_messages,
        );
        let count = restored.len();
        for r in restored {
            self.expire_later(r.space, r.session, 0, r.left);
        }
        count
    }

    /// A message published on `topic` by `client`: a command or live message if the topic is
    /// in the twin space (DESIGN.md §3: the compact form or a Ditto envelope on
    /// `ditto/commands`), else a plain message.
    pub fn subscribe(
        &self,
        client: &Client,
        filter: &str,
        shared: bool,
        options: SubscriptionOptions,
        id: Option<std::num::NonZeroU32>,
    ) -> Result<(), SubscribeDenied> {
        let inner = tree_filter(filter);
        let allowed = match FilterSpace::of(inner) {
            FilterSpace::Twin { first } => {
                first == "ditto" || first == "+" || first == "#" || client.owns(first)
            }
            FilterSpace::Mixed { namespace }
                if !client.owns(namespace)
                    && self
                        .auth
                        .solutions
                        .owner_of_namespace(namespace)
                        .is_some_and(|owner| owner != client.identity.solution.id) =>
            {
                false
            }
            FilterSpace::Mixed { .. } | FilterSpace::Plain => {
                let policy = client.space.policy();
                let mut state = client.session.lock();
                state.refresh_view(&policy, now());
                let prefix = inner.split('/').take_while(|l| *l != "+" && *l != "#");
                state.view().check_segments(
                    ResourceType::Topic,
                    prefix,
                    Permission::Read,
                    Mode::Partial,
                )
            }
        };
        if !allowed {
            client.space.denied(&self.metrics, "subscribe");
            tracing::debug!(
                solution = %client.space.id,
                client = %client.session.client_id,
                filter,
                "subscription denied"
            );
            return Err(SubscribeDenied);
        }
        let subscriber = Subscriber {
            session: client.session.clone(),
            options,
            id,
            share: shared.then(|| Arc::from(filter)),
        };
        let existed = client
            .session
            .lock()
            .subscriptions
            .insert(filter.into(), SubscriptionRecord { options, id })
            .is_some();
        {
            let mut tree = client.space.tree_write();
            let session = &client.session;
            let share = &subscriber.share;
            tree.remove(inner, |s| {
                Arc::ptr_eq(&s.session, session) && s.share == *share
            });
            tree.insert(inner, subscriber.clone());
        }
        self.save_if_persistent(client);
        dispatch::deliver_retained(&client.space, &subscriber, inner, existed, &self.metrics);
        Ok(())
    }

    /// Removes `client`'s subscription to `filter`; whether it had one.
    pub fn unsubscribe(&self, client: &Client, filter: &str, shared: bool) -> bool {
        let existed = client.session.lock().subscriptions.remove(filter).is_some();
        let share: Option<Arc<str>> = shared.then(|| Arc::from(filter));
        let session = &client.session;
        client.space.tree_write().remove(tree_filter(filter), |s| {
            Arc::ptr_eq(&s.session, session) && s.share == share
        });
        if existed {
            self.save_if_persistent(client);
        }
        existed
    }

    /// `client` received QoS 2 PUBLISH `packet_id` (to be PUBREC'd; a resend before PUBREL is
    /// a duplicate). For a persistent session the identifier is journaled: PUBREC once the
    /// returned `Pending` completes.
    pub fn received_exactly_once(
        &self,
        client: &Client,
        packet_id: std::num::NonZeroU16,
    ) -> Option<Pending> {
        let persisted = {
            let mut state = client.session.lock();
            state.incoming_qos2.push(packet_id);
            state.persisted()
        };
        persisted.then(|| {
            self.save_session(&client.space, &client.session, None);
            Pending::durable_so_far(self)
        })
    }

    /// `client` released QoS 2 packet `packet_id` (PUBREL); whether it was known.
    pub fn released(&self, client: &Client, packet_id: std::num::NonZeroU16) -> bool {
        let (known, persisted) = {
            let mut state = client.session.lock();
            let before = state.incoming_qos2.len();
            state.incoming_qos2.retain(|&id| id != packet_id);
            (state.incoming_qos2.len() != before, state.persisted())
        };
        if known && persisted {
            self.save_session(&client.space, &client.session, None);
        }
        known
    }

    /// Records the packet identifiers `client`'s journaled deliveries were sent under.
    pub fn record_sent(&self, client: &Client, sent: &[(u64, std::num::NonZeroU16)]) {
        sessions::record_sent(
            &*self.twins.store,
            client.space.id.as_str(),
            &client.session.client_id,
            sent,
        );
    }

    /// Deletes the journal records of deliveries that left `client`'s session.
    pub fn forget_delivered(&self, client: &Client, stored: &[u64]) {
        sessions::forget(
            &*self.twins.store,
            client.space.id.as_str(),
            &client.session.client_id,
            stored,
        );
    }

    /// For a session the journal holds: completes once what was written of it so far (a
    /// subscription change) is durable; the adapter acknowledges the change then.
    pub fn session_saved(&self, client: &Client) -> Option<Pending> {
        let persisted = client.session.lock().persisted();
        persisted.then(|| Pending::durable_so_far(self))
    }

    /// Writes `client`'s session to the journal if it outlives its connection.
    fn save_if_persistent(&self, client: &Client) {
        if client.session.lock().expiry_interval > 0 {
            self.save_session(&client.space, &client.session, None);
        }
    }

    /// Re-authenticates `client` with a fresh token (DESIGN.md §2): same solution and subjects,
    /// then the connection lives until the new token's expiry. Refusals are counted.
    pub async fn reauthenticate(
        &self,
        identity: &mut Identity,
        token: &str,
    ) -> Result<(), ReauthRefusal> {
        let result = self.auth.reauthenticate(identity, token).await;
        if let Err(ReauthRefusal::Invalid(reason)) = result {
            self.metrics.refused(reason);
            tracing::debug!(client = %identity.client_id, reason, "re-authentication refused");
        }
        result
    }
}

/// A session without expiry cannot be given one when its connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryAfterZero;

/// The session limit of the solution is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimit;
