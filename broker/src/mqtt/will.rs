//! Last wills (MQTT §3.1.2.5, v5 Will Delay Interval): kept from the CONNECT, published
//! through the core (authorized like a PUBLISH of the connection's subjects) when the
//! connection ends other than by a normal DISCONNECT — at once, or after the delay unless the
//! client ID connects again first.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::core::message::{Message, Origin, deep_copy_topic};
use crate::core::{Client, Core};
use crate::mqtt::codec::Will;
use crate::mqtt::outbound::forwarded;

/// A will in its own allocations (not slices of the CONNECT's read buffer).
pub fn owned(will: &Will) -> Will {
    let mut properties = will.properties.clone();
    if let Some(forwarded) = forwarded(&will.properties) {
        properties.content_type = forwarded.content_type;
        properties.response_topic = forwarded.response_topic;
        properties.correlation_data = forwarded.correlation_data;
        properties.user_properties = forwarded.user_properties;
    }
    Will {
        topic: deep_copy_topic(&will.topic),
        payload: Bytes::copy_from_slice(&will.payload),
        qos: will.qos,
        retain: will.retain,
        properties,
    }
}

fn message(will: &Will) -> Arc<Message> {
    Message::new(
        deep_copy_topic(&will.topic),
        Bytes::copy_from_slice(&will.payload),
        Origin {
            qos: will.qos,
            retain: will.retain,
            properties: forwarded(&will.properties),
            expiry_seconds: will.properties.message_expiry_interval,
            publisher: 0,
        },
    )
}

/// Publishes `will` of a connection that ended: now, or after its delay (capped by the
/// session's expiry when the session was still the connection's). `taken_over`: a new
/// connection for this client ID ended this one within the delay, so the will is not sent
/// (MQTT-3.1.3-9).
pub fn publish_on_close(
    core: &Arc<Core>,
    client: &Client,
    will: Will,
    taken_over: bool,
    session_still_ours: bool,
    session_expiry: u32,
) {
    let delay = will.properties.will_delay_interval.unwrap_or(0);
    let subjects = &client.identity.subjects;
    if delay == 0 {
        core.publish_will(
            &client.space,
            &client.session.client_id,
            subjects,
            message(&will),
        );
        return;
    }
    if taken_over {
        return;
    }
    // Otherwise it waits for the delay or the end of the session, whichever comes first,
    // unless a new connection cancels it.
    let delay = if session_still_ours {
        delay.min(session_expiry)
    } else {
        delay
    };
    let token = client
        .space
        .register_pending_will(&client.session.client_id);
    let core = core.clone();
    let space = client.space.clone();
    let subjects = subjects.clone();
    let client_id = client.session.client_id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
        if space.claim_pending_will(&client_id, token) {
            core.publish_will(&space, &client_id, &subjects, message(&will));
        }
    });
}
