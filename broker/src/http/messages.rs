//! Live messages over HTTP, as Ditto's API has them: `POST /api/2/things/{thingId}/inbox/
//! messages/{subject}` (also `outbox`, and both under `features/{featureId}/`), the body being
//! the message (its `Content-Type` travels with it). The core authorizes the sender (WRITE on
//! `message:/…`) and routes the message to every subscriber allowed to READ it, exactly as an
//! MQTT live message (the same `Core::execute`).
//!
//! The answer: with `timeout=0` or `response-required: false`, 202 once routed. Otherwise the
//! message carries a reply address (MQTT 5 Response Topic, unguessable, `Core::reply_address`)
//! and a correlation ID, and the request waits up to `timeout` seconds (default 10, at most 60)
//! for the device's answer published there: its payload, `Content-Type` and status (an MQTT 5
//! user property `status`, default 200) become the HTTP response; none in time is 408.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use twin::protocol::envelope::Envelope;
use twin::protocol::message::{LiveMessage, MessageDirection};
use twin::protocol::mqtt::write_message_topic;
use twin::{DittoError, ThingId};

use crate::core::message::{ForwardedProperties, Origin};
use crate::core::{Core, Identity, Outcome, ReplyTo, Request, Verdict};
use crate::http::twin::{answer_topic, ditto_error};
use crate::mqtt::codec::{QoS, TopicName};

/// The longest a request waits for an answer.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it waits when `timeout` is not given (Ditto's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// `features/{id}/inbox/messages/{subject}` and the like, parsed: `None` if `path` is not a
/// message path.
pub fn message_path(thing_id: &ThingId, path: &str) -> Option<Result<LiveMessage, DittoError>> {
    let (feature, rest) = match path.strip_prefix("features/") {
        Some(rest) => {
            let (feature, rest) = rest.split_once('/')?;
            (Some(feature.to_owned()), rest)
        }
        None => (None, path),
    };
    let (direction, subject) = if let Some(s) = rest.strip_prefix("inbox/messages/") {
        (MessageDirection::Inbox, s)
    } else if let Some(s) = rest.strip_prefix("outbox/messages/") {
        (MessageDirection::Outbox, s)
    } else {
        return None;
    };
    if subject.is_empty() || subject.contains('/') {
        return Some(Err(DittoError::new(
            400,
            "messages:subject.invalid",
            format!("`{subject}` is not a message subject"),
        )
        .with_description("A subject is one path segment, without `/`.")));
    }
    Some(Ok(LiveMessage::new(
        thing_id.clone(),
        direction,
        feature,
        subject,
    )))
}

/// What the request asked about waiting.
#[derive(Debug, Clone, Copy)]
pub struct Waiting {
    /// `None`: no answer wanted (202 once routed).
    pub timeout: Option<Duration>,
}

impl Waiting {
    /// From the `timeout` query parameter (seconds) and the `response-required` header.
    pub fn from_request(timeout: Option<&str>, headers: &HeaderMap) -> Result<Self, DittoError> {
        let required = headers
            .get("response-required")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| !v.eq_ignore_ascii_case("false"));
        let timeout = match timeout {
            None => DEFAULT_TIMEOUT,
            Some(text) => {
                let seconds: u64 = text.trim().parse().map_err(|_| {
                    DittoError::new(
                        400,
                        "messages:timeout.invalid",
                        format!("`{text}` is not a timeout in seconds"),
                    )
                })?;
                Duration::from_secs(seconds).min(MAX_TIMEOUT)
            }
        };
        Ok(Waiting {
            timeout: (required && !timeout.is_zero()).then_some(timeout),
        })
    }
}

/// Sends `message` with `body` for `identity` and answers as the module says.
pub async fn send(
    core: Arc<Core>,
    identity: Identity,
    mut message: LiveMessage,
    headers: &HeaderMap,
    body: Bytes,
    waiting: Waiting,
) -> Response {
    let mut text = String::new();
    let topic = match write_message_topic(&mut text, &message)
        .map_err(DittoError::from)
        .and_then(|()| {
            text.parse::<TopicName>()
                .map_err(|e| DittoError::json_invalid(format!("no topic for the message: {e}")))
        }) {
        Ok(topic) => topic,
        Err(e) => return ditto_error(&e),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let correlation = headers
        .get("correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            crate::auth::secret::random_bytes::<12>()
                .ok()
                .map(|b| crate::auth::secret::hex(&b))
        });
    message.headers.correlation_id = correlation.clone();
    message.headers.content_type = content_type.clone();
    message.headers.response_required = Some(waiting.timeout.is_some());
    let client = core.transient(identity);
    let reply_address = match waiting.timeout {
        Some(_) => match core.reply_address(&client) {
            Some(address) => Some(address),
            None => {
                core.release(&client);
                return ditto_error(&DittoError::new(
                    500,
                    "messages:internal.error",
                    "no reply address could be made",
                ));
            }
        },
        None => None,
    };
    let properties = ForwardedProperties {
        payload_format_utf8: None,
        content_type: content_type.as_deref().and_then(|t| t.parse().ok()),
        response_topic: reply_address,
        correlation_data: correlation.map(|c| Bytes::from(c.into_bytes())),
        user_properties: Vec::new(),
    };
    let origin = Origin {
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Some(Box::new(properties)),
        expiry_seconds: waiting
            .timeout
            .map(|t| u32::try_from(t.as_secs()).unwrap_or(u32::MAX)),
        publisher: client.session.id,
    };
    let reply = ReplyTo {
        wanted: true,
        topic: answer_topic(),
        correlation: None,
    };
    let outcome = core.execute(
        &client,
        Request::Message {
            message,
            topic,
            payload: &body,
            origin,
        },
        reply,
    );
    let told = match outcome {
        Outcome::Now(told) => told,
        Outcome::Pending(mut pending) => {
            std::future::poll_fn(|cx| pending.poll_done(cx, &core, &client.space, &client.session))
                .await
        }
    };
    if told.verdict != Verdict::Accepted {
        // The core's Ditto error went into the request's session.
        let answer = client.session.lock().pop_next(&core.metrics);
        core.release(&client);
        let error = answer
            .and_then(|d| Envelope::parse(&d.message.payload).ok())
            .and_then(|e| e.value)
            .unwrap_or_else(|| {
                DittoError::new(
                    403,
                    "messages:message.notallowed",
                    told.reason.unwrap_or_default(),
                )
                .to_json()
            });
        let status = error
            .get("status")
            .and_then(Value::as_u64)
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::FORBIDDEN);
        return (status, axum::Json(error)).into_response();
    }
    let Some(timeout) = waiting.timeout else {
        core.release(&client);
        return StatusCode::ACCEPTED.into_response();
    };
    let answer = tokio::time::timeout(timeout, async {
        loop {
            if let Some(delivery) = client.session.lock().pop_next(&core.metrics) {
                return delivery;
            }
            client.link.woken().await;
        }
    })
    .await;
    core.release(&client);
    let Ok(delivery) = answer else {
        return ditto_error(
            &DittoError::new(
                408,
                "messages:response.timeout",
                format!("no answer came within {} seconds", timeout.as_secs()),
            )
            .with_description(
                "The device may be offline; try a longer `timeout`, or `timeout=0` to only send.",
            ),
        );
    };
    let message = &delivery.message;
    let properties = message.properties.as_deref();
    let status = properties
        .and_then(|p| {
            p.user_properties
                .iter()
                .find(|(k, _)| k.as_str() == "status")
        })
        .and_then(|(_, v)| v.as_str().parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Response::new(Body::from(message.payload.clone()));
    *response.status_mut() = status;
    if let Some(content_type) = properties
        .and_then(|p| p.content_type.as_ref())
        .and_then(|t| HeaderValue::from_str(t.as_str()).ok())
    {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
}
