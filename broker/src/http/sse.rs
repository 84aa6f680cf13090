//! Server-Sent Events of thing changes, as Ditto streams them: `GET /api/2/things` with
//! `Accept: text/event-stream`, optionally `ids=…` (those things only), `namespaces=…` and
//! `fields=…`. Each event is the changed part of a thing as thing JSON — `thingId`, the changed
//! value at its place, `_revision`, `_modified` — cut to the caller's view by the core's one
//! fan-out (the stream is a transient session subscribed to the things' event topics).
//! Deletions have no thing JSON and are not streamed (as in Ditto's SSE).
//!
//! Each event's `id` is its `_modified` time in milliseconds. A client that comes back with
//! `Last-Event-ID` gets, first, the current state (cut to its view) of every thing in its
//! selection changed at or after that time — the store keeps states, not every past change, so
//! this is where it can resume from — then the live events.
//!
//! The stream ends when the client goes, when its token expires, or when the broker shuts down.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use policy::Timestamp;
use serde_json::{Map, Value};
use twin::apply::select_fields;
use twin::entity::path_segments;
use twin::protocol::envelope::Envelope;
use twin::protocol::topic::Criterion;
use twin::rql::Rql;
use twin::{DittoError, EventAction, ThingId};

use crate::core::{Client, Core, Identity};
use crate::http::twin::{ditto_error, execute, retrieve};
use crate::mqtt::codec::{QoS, SubscriptionOptions};

/// What the stream selects.
#[derive(Debug, Default)]
pub struct Selection {
    pub ids: Option<Vec<ThingId>>,
    pub namespaces: Option<Vec<String>>,
    pub fields: Option<String>,
    /// `filter`: an RQL expression each change (as thing JSON, cut to the view) must satisfy.
    pub filter: Option<String>,
    /// `Last-Event-ID`: resume from this time (milliseconds).
    pub since: Option<i64>,
}

/// Ends the transient session's subscriptions when the stream is dropped.
struct Subscribed {
    core: Arc<Core>,
    client: Client,
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.core.release(&self.client);
    }
}

/// The SSE response for `identity`'s selection, or the Ditto error of a bad one.
pub async fn stream(core: Arc<Core>, identity: Identity, selection: Selection) -> Response {
    if let Some(fields) = &selection.fields
        && let Err(e) = twin::apply::parse_field_selector(fields)
    {
        return ditto_error(&e);
    }
    let filter = match selection.filter.as_deref().map(Rql::parse).transpose() {
        Ok(filter) => filter.map(Arc::new),
        Err(e) => return ditto_error(&e),
    };
    let expires = identity.expires_at();
    let client = core.transient(identity.clone());
    let filters: Vec<String> = match (&selection.ids, &selection.namespaces) {
        (Some(ids), _) => ids
            .iter()
            .map(|id| format!("{}/{}/things/twin/events/#", id.namespace(), id.name()))
            .collect(),
        (None, Some(namespaces)) => namespaces
            .iter()
            .map(|ns| format!("{ns}/+/things/twin/events/#"))
            .collect(),
        (None, None) => client
            .identity
            .solution
            .namespaces
            .iter()
            .map(|ns| format!("{ns}/+/things/twin/events/#"))
            .collect(),
    };
    for filter in &filters {
        if core
            .subscribe(
                &client,
                filter,
                false,
                SubscriptionOptions::qos(QoS::AtMostOnce),
                None,
            )
            .is_err()
        {
            core.release(&client);
            return ditto_error(&DittoError::new(
                403,
                "things:namespace.notallowed",
                format!("the solution does not own the things of `{filter}`"),
            ));
        }
    }
    // Catch-up first (subscribed already, so nothing falls between the two).
    let mut backlog = Vec::new();
    if let Some(since) = selection.since {
        let candidates = match &selection.ids {
            Some(ids) => ids.clone(),
            None => core.things_changed_since(
                &client,
                Timestamp::from_unix_millis(since),
                selection.namespaces.as_deref(),
            ),
        };
        for id in candidates {
            if let Some(event) = current_state(
                &core,
                &identity,
                id,
                since,
                selection.fields.as_deref(),
                filter.as_deref(),
            )
            .await
            {
                backlog.push(event);
            }
        }
    }
    let subscribed = Subscribed {
        core: core.clone(),
        client,
    };
    let fields = selection.fields;
    let live = stream::unfold(
        (subscribed, core.shutdown.clone()),
        move |(subscribed, mut stop)| {
            let fields = fields.clone();
            let filter = filter.clone();
            async move {
                loop {
                    let next = {
                        let mut state = subscribed.client.session.lock();
                        state.pop_next(&subscribed.core.metrics)
                    };
                    if let Some(delivery) = next {
                        if let Some(event) = change_event(
                            &delivery.message.payload,
                            fields.as_deref(),
                            filter.as_deref(),
                        ) {
                            return Some((Ok::<_, Infallible>(event), (subscribed, stop)));
                        }
                        continue;
                    }
                    let until_expiry = expires.map(|at| {
                        at.duration_since(SystemTime::now())
                            .unwrap_or(Duration::ZERO)
                    });
                    tokio::select! {
                        () = subscribed.client.link.woken() => {}
                        _ = stop.wait_for(|stop| *stop) => return None,
                        () = tokio::time::sleep(until_expiry.unwrap_or(Duration::MAX)), if until_expiry.is_some() => return None,
                    }
                }
            }
        },
    );
    let events = stream::iter(backlog.into_iter().map(Ok::<_, Infallible>));
    Sse::new(futures_util::StreamExt::chain(events, live))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The SSE event of one event delivery: the changed part as thing JSON (`None`: a deletion, or
/// not an event).
fn change_event(payload: &[u8], fields: Option<&str>, filter: Option<&Rql>) -> Option<SseEvent> {
    let envelope = Envelope::parse(payload).ok()?;
    match envelope.topic.criterion() {
        Criterion::Events(action) if *action != EventAction::Deleted => {}
        _ => return None,
    }
    let thing_id = envelope.topic.thing_id().ok()?;
    let mut thing = Map::new();
    thing.insert("thingId".into(), Value::from(thing_id.as_str()));
    let value = envelope.value.unwrap_or(Value::Null);
    let segments: Vec<String> = path_segments(&envelope.path)
        .map(|s| s.into_owned())
        .collect();
    match segments.split_last() {
        None => {
            if let Value::Object(whole) = value {
                for (k, v) in whole {
                    thing.entry(k).or_insert(v);
                }
            }
        }
        Some((last, parents)) => {
            let mut at = &mut thing;
            for segment in parents {
                let entry = at
                    .entry(segment.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                at = match entry {
                    Value::Object(inner) => inner,
                    _ => return None,
                };
            }
            at.insert(last.clone(), value);
        }
    }
    if let Some(revision) = envelope.revision {
        thing.insert("_revision".into(), Value::from(revision));
    }
    let modified = envelope.timestamp;
    if let Some(ts) = modified {
        thing.insert("_modified".into(), Value::from(ts.to_string()));
    }
    let thing = Value::Object(thing);
    if filter.is_some_and(|f| !f.matches(&thing)) {
        return None;
    }
    sse_event(thing, modified, fields)
}

fn sse_event(thing: Value, modified: Option<Timestamp>, fields: Option<&str>) -> Option<SseEvent> {
    let data = match fields {
        Some(fields) => select_fields(&thing, fields).ok()?,
        None => thing,
    };
    let mut event = SseEvent::default().data(data.to_string());
    if let Some(ts) = modified {
        event = event.id(ts.unix_millis().to_string());
    }
    Some(event)
}

/// A thing's current state as an SSE event, if it changed at or after `since` and the caller
/// may read something of it (a retrieve through the core: authorized and cut).
async fn current_state(
    core: &Arc<Core>,
    identity: &Identity,
    thing_id: ThingId,
    since: i64,
    fields: Option<&str>,
    filter: Option<&Rql>,
) -> Option<SseEvent> {
    let command = retrieve(
        thing_id,
        Some("thingId,attributes,features,definition,_revision,_modified".into()),
    );
    let answer = execute(core.clone(), identity.clone(), command).await;
    if answer.status != Some(200) {
        return None;
    }
    let thing = answer.value?;
    let modified = thing
        .get("_modified")
        .and_then(Value::as_str)
        .and_then(|t| Timestamp::parse_rfc3339(t).ok())?;
    if modified.unix_millis() < since || filter.is_some_and(|f| !f.matches(&thing)) {
        return None;
    }
    sse_event(thing, Some(modified), fields)
}
