//! A target at work, whatever the transport: a core client with the target's authorization
//! context, subscribed to the filters its topics stand for — so the one fan-out judges every
//! event and live message for it and cuts events to its view, as for any subscriber — and a
//! bounded buffer between that session and the external broker: a message leaves the buffer
//! only once the broker confirmed it (AMQP publisher confirm, MQTT PUBACK), so a broken
//! connection keeps it for the next one; a full buffer drops its oldest, counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::bridge::config::Target;
use crate::bridge::placeholder::{TopicPart, Values};
use crate::bridge::{Status, TARGET_BUFFER};
use crate::core::{Client, Core, Identity};
use crate::mqtt::codec::{QoS, SubscriptionOptions};

/// One event or message ready for the external broker.
#[derive(Debug, Clone)]
pub struct OutMessage {
    /// The resolved address: AMQP routing key, MQTT topic.
    pub address: String,
    pub payload: Bytes,
    pub content_type: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// The Ditto topic of a core delivery, for the placeholders of a target.
struct Delivered<'a> {
    levels: Vec<&'a str>,
    full: &'a str,
}

impl<'a> Delivered<'a> {
    fn of(topic: &'a str) -> Self {
        let levels: Vec<&str> = topic.split('/').collect();
        // `{ns}/{name}/things/{channel}/{criterion}/{action}`: the first six levels.
        let full_len = levels
            .iter()
            .take(6)
            .map(|l| l.len() + 1)
            .sum::<usize>()
            .saturating_sub(1);
        Delivered {
            full: topic.get(..full_len).unwrap_or(topic),
            levels,
        }
    }
}

impl Values for Delivered<'_> {
    fn header(&self, _: &str) -> Option<&str> {
        None
    }
    fn thing(&self) -> Option<(&str, &str)> {
        Some((self.levels.first()?, self.levels.get(1)?))
    }
    fn topic(&self, part: TopicPart) -> Option<&str> {
        match part {
            TopicPart::Channel => self.levels.get(3).copied(),
            TopicPart::Criterion => self.levels.get(4).copied(),
            TopicPart::Action => self.levels.get(5).copied(),
            TopicPart::Full => Some(self.full),
        }
    }
}

/// A target's core client and buffer.
#[derive(Debug)]
pub struct TargetRuntime {
    core: Arc<Core>,
    client: Client,
    target: Target,
    status: Arc<Status>,
    buffer: VecDeque<OutMessage>,
}

impl TargetRuntime {
    /// Subscribes the target's authorization context to its topics. `None` if the solution is
    /// gone or a filter is refused (a namespace it does not own).
    pub fn new(
        core: Arc<Core>,
        solution: &str,
        connection: &str,
        target: Target,
        status: Arc<Status>,
    ) -> Option<Self> {
        let solution = core.auth.solutions.get(solution)?;
        let identity = Identity {
            solution,
            subjects: target.authorization_context.clone().into(),
            client_id: format!("bridge:{connection}:target").into(),
            expiry: None,
            jwt_method: false,
            secret: None,
        };
        // The session's queue as large as the target's buffer: the fan-out does not drop
        // while the target waits for confirms of its last batch (a burst of events).
        let client = core.transient_queue(
            identity,
            crate::core::session::Protocol::Bridge,
            TARGET_BUFFER,
        );
        for filter in &target.filters {
            if core
                .subscribe(
                    &client,
                    filter,
                    false,
                    SubscriptionOptions::qos(QoS::AtLeastOnce),
                    None,
                )
                .is_err()
            {
                tracing::warn!(connection, filter = %filter, "a target's topic was refused");
                core.release(&client);
                return None;
            }
        }
        Some(TargetRuntime {
            core,
            client,
            target,
            status,
            buffer: VecDeque::new(),
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Waits until the fan-out queued something for the target (or returns at once if it
    /// already did).
    pub async fn wait(&self) {
        if !self.client.session.lock().has_queued() {
            self.client.link.woken().await;
        }
    }

    /// Moves what the fan-out queued into the buffer, resolving addresses; a full buffer
    /// drops its oldest.
    pub fn fill(&mut self) {
        let mut state = self.client.session.lock();
        while let Some(delivery) = state.pop_next(&self.core.metrics) {
            let topic = delivery.message.topic.as_str();
            let values = Delivered::of(topic);
            let Ok(address) = self.target.address.resolve(&values) else {
                self.status.count_failed();
                continue;
            };
            let headers = self
                .target
                .header_mapping
                .iter()
                .filter_map(|(name, template)| {
                    template.resolve(&values).ok().map(|v| (name.clone(), v))
                })
                .collect();
            let content_type = delivery
                .message
                .properties
                .as_ref()
                .and_then(|p| p.content_type.as_ref())
                .map(|c| c.as_str().to_owned())
                .or_else(|| {
                    (values.topic(TopicPart::Criterion) == Some("events"))
                        .then(|| "application/vnd.eclipse.ditto+json".to_owned())
                });
            if self.buffer.len() >= TARGET_BUFFER {
                self.buffer.pop_front();
                self.status.dropped.fetch_add(1, Ordering::Relaxed);
                self.core.metrics.dropped("bridge_buffer_full");
            }
            self.buffer.push_back(OutMessage {
                address,
                payload: delivery.message.payload.clone(),
                content_type,
                headers,
            });
        }
    }

    /// The messages waiting, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &OutMessage> {
        self.buffer.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The broker refused one of the messages being confirmed (counted as failed; it still
    /// leaves the buffer with the others of its batch).
    pub fn refused(&self) {
        self.status.count_failed();
    }

    /// The oldest `n` messages were confirmed by the broker.
    pub fn confirmed(&mut self, n: usize) {
        let n = n.min(self.buffer.len());
        self.buffer.drain(..n);
        self.status.published.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for TargetRuntime {
    fn drop(&mut self) {
        self.core.release(&self.client);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_event_topic_fills_thing_and_topic_placeholders() {
        let d = Delivered::of("org.acme/lamp-1/things/twin/events/modified/features/temp");
        assert_eq!(d.thing(), Some(("org.acme", "lamp-1")));
        assert_eq!(d.topic(TopicPart::Action), Some("modified"));
        assert_eq!(d.topic(TopicPart::Channel), Some("twin"));
        assert_eq!(
            d.topic(TopicPart::Full),
            Some("org.acme/lamp-1/things/twin/events/modified")
        );
    }
}
