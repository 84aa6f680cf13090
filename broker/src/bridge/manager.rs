//! Keeps the running connection tasks equal to the stored connection documents: at start-up,
//! and whenever a solution changes ([`Bridges::changed`](crate::bridge::Bridges)) — a new
//! connection is started, a changed one restarted, a deleted or closed one stopped — without a
//! restart of the server. At shutdown every task is stopped (each settles what is under way
//! and closes its connection) within a bound.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bridge::config::{ConnectionDoc, ConnectionType, Desired};
use crate::bridge::{State, Status};
use crate::core::Core;

struct Running {
    doc: ConnectionDoc,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// Starts the manager; it ends (having stopped every connection) when the server shuts down.
pub fn spawn(core: Arc<Core>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut running: HashMap<(String, String), Running> = HashMap::new();
        let mut shutdown = core.shutdown.clone();
        loop {
            // Registered before reconciling: a change made meanwhile is not missed.
            let changed = core.bridges.changed.notified();
            reconcile(&core, &mut running).await;
            tokio::select! {
                () = changed => {}
                () = crate::bridge::until_set(&mut shutdown) => break,
            }
        }
        let stops: Vec<_> = running.into_values().collect();
        stop_all(stops).await;
    })
}

async fn stop_all(list: Vec<Running>) {
    let mut tasks = Vec::new();
    for mut r in list {
        let _ = r.stop.send(true);
        if let Some(task) = r.task.take() {
            tasks.push(task);
        }
    }
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

async fn reconcile(core: &Arc<Core>, running: &mut HashMap<(String, String), Running>) {
    let mut wanted: HashMap<(String, String), ConnectionDoc> = HashMap::new();
    // Cluster mode: one node runs every bridge (`cluster.rs` picks it); the others none.
    let here = !core
        .bridges
        .elsewhere
        .load(std::sync::atomic::Ordering::Acquire);
    for solution in core.auth.solutions.list().into_iter().filter(|_| here) {
        for doc in &solution.connections {
            wanted.insert(
                (solution.id.as_str().to_owned(), doc.id.clone()),
                doc.clone(),
            );
        }
    }
    let mut stopping = Vec::new();
    let keys: Vec<_> = running.keys().cloned().collect();
    for key in keys {
        let same = wanted
            .get(&key)
            .is_some_and(|doc| running.get(&key).is_some_and(|r| &r.doc == doc));
        if !same && let Some(r) = running.remove(&key) {
            core.bridges.remove(&key.0, &key.1);
            tracing::info!(solution = %key.0, connection = %key.1, "bridge connection stopped");
            stopping.push(r);
        }
    }
    // Stopped before their replacements start (a consumer must not run twice).
    stop_all(stopping).await;
    for (key, doc) in wanted {
        if running.contains_key(&key) {
            continue;
        }
        let (stop, stopped) = watch::channel(false);
        let compiled = match doc.compile() {
            Ok(c) => c,
            Err(e) => {
                // Checked when stored; a document from an older version may still fail.
                let status = Arc::new(Status::new(doc.connection_type.as_str(), String::new()));
                status.set(State::Failed(e.to_string()));
                core.bridges.insert(&key.0, &key.1, status);
                running.insert(
                    key,
                    Running {
                        doc,
                        stop,
                        task: None,
                    },
                );
                continue;
            }
        };
        let status = Arc::new(Status::new(
            doc.connection_type.as_str(),
            compiled.endpoint.address(),
        ));
        core.bridges.insert(&key.0, &key.1, status.clone());
        let task = if doc.connection_status == Desired::Closed {
            status.set(State::Closed);
            None
        } else {
            tracing::info!(solution = %key.0, connection = %key.1, kind = doc.connection_type.as_str(), "bridge connection starting");
            let core = core.clone();
            let solution = key.0.clone();
            Some(match doc.connection_type {
                ConnectionType::Amqp091 => tokio::spawn(crate::bridge::amqp::run(
                    core, solution, compiled, status, stopped,
                )),
                ConnectionType::Mqtt | ConnectionType::Mqtt5 => tokio::spawn(
                    crate::bridge::mqtt::run(core, solution, compiled, status, stopped),
                ),
            })
        };
        running.insert(key, Running { doc, stop, task });
    }
}
