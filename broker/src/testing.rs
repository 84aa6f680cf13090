//! Deliberate entry points for benchmarks and tests that drive the core without sockets: a
//! [`Harness`] holds a core with one solution over a store in a given directory; its clients are
//! attached like authenticated MQTT connections of that solution (secret subjects
//! `iot-things:{solution}:{client}` and `iot-things:{solution}`); their deliveries are encoded as
//! MQTT 3.1.1 PUBLISH packets. Nothing in the server uses this module.

use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::sync::watch;
use twin::authz::{first_denied, grants_without_allocation, required_permissions};
use twin::command::{Command, ThingCommand};
use twin::store::{EmbeddedStore, StoreOptions};

use crate::auth::jwt::Issuers;
use crate::auth::limiter::{FailureLimiter, LimiterConfig};
use crate::auth::solution::{Solution, SolutionId, Solutions};
use crate::core::identity::Authenticator;
use crate::core::message::Origin;
use crate::core::twins::Twins;
use crate::core::{Client, Core, Identity, Outcome, Pending, ReplyTo, SessionRequest, Told};
use crate::limits::MqttSettings;
use crate::metrics::Metrics;
use crate::mqtt::codec::{Protocol, QoS, SubscriptionOptions, TopicName};
use crate::mqtt::outbound::{Outbound, TopicAliases};

/// Why a harness could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("bad solution: {0}")]
    Solution(String),
}

/// A core without listeners.
#[derive(Debug)]
pub struct Harness {
    core: Arc<Core>,
    solution: Arc<Solution>,
    /// Keeps the shutdown signal open.
    _stop: watch::Sender<bool>,
}

/// A client attached to its session.
#[derive(Debug)]
pub struct TestClient(Client);

/// A twin change applied in memory and waiting for the journal.
#[derive(Debug)]
pub struct Change(Pending);

impl Harness {
    /// A core over a new store in `data_dir` (no background snapshots; a journal queue large
    /// enough that a slow disk never blocks the caller), with solution `solution` owning
    /// `namespaces` and the default solution policy.
    pub fn new(data_dir: &Path, solution: &str, namespaces: &[&str]) -> Result<Self, HarnessError> {
        let mut options = StoreOptions::new(data_dir);
        options.max_queued_bytes = 1 << 30;
        options.snapshot_every_events = 0;
        options.snapshot_every = None;
        let store =
            Arc::new(EmbeddedStore::open(options).map_err(|e| HarnessError::Store(e.to_string()))?);
        // The solution as `thingsgate solution create` makes it.
        let bad = |e: &dyn std::fmt::Display| HarnessError::Solution(e.to_string());
        let id = SolutionId::parse(solution).map_err(|e| bad(&e))?;
        let solutions = Solutions::load(&*store).map_err(|e| bad(&e))?;
        let namespaces: Vec<String> = namespaces.iter().map(|n| (*n).to_owned()).collect();
        solutions
            .create(&*store, Some(id.clone()), &namespaces, crate::core::now())
            .map_err(|e| bad(&e))?;
        let solution = solutions
            .get(id.as_str())
            .ok_or_else(|| HarnessError::Solution(format!("`{id}` was not created")))?;
        let issuers = Issuers::from_config(&[]).map_err(|e| bad(&e))?;
        let (stop, shutdown) = watch::channel(false);
        let settings = MqttSettings::default();
        let core = Arc::new(Core {
            auth: Authenticator {
                solutions: Arc::new(solutions),
                issuers: Arc::new(issuers),
                limiter: FailureLimiter::new(LimiterConfig::default()),
                operators: Vec::new(),
            },
            spaces: crate::core::space::Spaces::new(settings.max_retained_messages),
            settings,
            twins: Twins::new(store),
            metrics: Arc::new(Metrics::default()),
            shutdown,
            bridges: crate::bridge::Bridges::default(),
            deadlines: Arc::default(),
            relay: std::sync::OnceLock::new(),
        });
        Ok(Harness {
            core,
            solution,
            _stop: stop,
        })
    }

    /// Attaches client `client_id` (a clean session), online.
    pub fn connect(&self, client_id: &str) -> TestClient {
        let subjects: Arc<[String]> = vec![
            format!("iot-things:{}:{client_id}", self.solution.id),
            format!("iot-things:{}", self.solution.id),
        ]
        .into();
        let identity = Identity {
            solution: self.solution.clone(),
            subjects,
            client_id: client_id.into(),
            expiry: None,
            jwt_method: false,
            secret: None,
        };
        let request = SessionRequest {
            clean_start: true,
            expiry_seconds: 0,
            protocol: crate::core::session::Protocol::Mqtt,
        };
        match self.core.attach(identity, request) {
            Ok(attached) => TestClient(attached.client),
            // INVARIANT: a harness's solution has far fewer sessions than the limit.
            Err(_) => unreachable_session_limit(),
        }
    }

    /// Subscribes `client` to `filter`; whether the core allowed it.
    pub fn subscribe(&self, client: &TestClient, filter: &str, qos: QoS) -> bool {
        self.core
            .subscribe(
                &client.0,
                filter,
                false,
                SubscriptionOptions::qos(qos),
                None,
            )
            .is_ok()
    }

    /// What a connection does with a PUBLISH: [`Core::publish`] (no response topic).
    pub fn publish(
        &self,
        client: &TestClient,
        topic: &TopicName,
        payload: &[u8],
        qos: QoS,
    ) -> Result<Change, Told> {
        let origin = Origin {
            qos,
            publisher: client.0.session.id,
            ..Origin::default()
        };
        let reply = ReplyTo {
            wanted: true,
            ..ReplyTo::default()
        };
        match self.core.publish(&client.0, topic, payload, origin, reply) {
            Outcome::Pending(pending) => Ok(Change(pending)),
            Outcome::Now(told) => Err(told),
        }
    }

    /// A command through [`Core::execute`] (no answer wanted).
    pub fn execute(&self, client: &TestClient, command: Command) -> Result<Change, Told> {
        match self.core.execute(
            &client.0,
            crate::core::Request::Command(command),
            ReplyTo::default(),
        ) {
            Outcome::Pending(pending) => Ok(Change(pending)),
            Outcome::Now(told) => Err(told),
        }
    }

    /// The authorization of a thing command alone, as `execute` does it: the thing's policy
    /// from the cache, the client's memoized view, the command's requirements.
    pub fn authorize(&self, client: &TestClient, command: &ThingCommand) -> bool {
        let Some(policy) = self.core.twins.policies.of_thing(&command.thing_id) else {
            return false;
        };
        let mut state = client.0.session.lock();
        let view = state.policy_view(&policy, command.thing_id.namespace(), crate::core::now());
        grants_without_allocation(view, command) == Some(true)
            || first_denied(view, &required_permissions(command)).is_none()
    }

    /// Encodes what `client`'s session has queued as MQTT 3.1.1 PUBLISH packets into `buf`
    /// and acknowledges each (as the client's PUBACK/PUBCOMP would). Returns how many.
    pub fn drain(
        &self,
        client: &TestClient,
        buf: &mut BytesMut,
        aliases: &mut TopicAliases,
    ) -> usize {
        let mut state = client.0.session.lock();
        let mut out = Outbound {
            buf,
            protocol: Protocol::V311,
            max_packet_size: u32::MAX,
            metrics: &self.core.metrics,
            aliases,
        };
        // The identifiers sent (at most the window of 32), acknowledged once the drain is done.
        let mut sent = [None; 32];
        let mut next = 0;
        let count = state.drain(sent.len(), &self.core.metrics, |delivery, qos| {
            let ok = out.publish(delivery, qos, false);
            if let (Some(id), Some(slot)) = (qos.packet_id(), sent.get_mut(next)) {
                *slot = Some((id, qos.qos()));
                next += 1;
            }
            ok
        });
        for (id, qos) in sent.into_iter().flatten() {
            state.complete(id, qos);
        }
        count
    }
}

#[expect(
    clippy::panic,
    reason = "a harness with more sessions than the limit is a broken fixture"
)]
fn unreachable_session_limit() -> TestClient {
    panic!("the test harness's solution reached its session limit")
}

impl Harness {
    /// Waits until `change` (made by `client`) is durable; then its events and answer go out.
    pub fn wait(&self, client: &TestClient, mut change: Change) -> Told {
        let (core, space, session) = (&*self.core, &client.0.space, &client.0.session);
        futures_block_on(std::future::poll_fn(|cx| {
            change.0.poll_done(cx, core, space, session)
        }))
    }

    /// Publishes the events of `change` (made by `client`) through the fan-out as if it had
    /// just become durable, and keeps the change (for benchmarks of the fan-out alone).
    pub fn fan_out(&self, client: &TestClient, change: &Change) {
        change.0.publish_events_again(&self.core, &client.0.space);
    }

    /// Completes `change` (made by `client`) as if its journal batch were durable now (the
    /// journal's writer thread still writes and syncs it in the background): for benchmarks of
    /// the in-memory path. The server never does this.
    pub fn announce(&self, client: &TestClient, mut change: Change) -> Told {
        change
            .0
            .finish(Ok(()), &self.core, &client.0.space, &client.0.session)
    }
}

/// Blocks the calling thread on `future` (no runtime needed: the journal completes it from its
/// writer thread).
fn futures_block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Thread(std::thread::Thread);
    impl Wake for Thread {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Thread(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(output) => return output,
            Poll::Pending => std::thread::park(),
        }
    }
}
