//! The Ditto protocol: topics, the JSON envelope, live messages, and the compact MQTT topic form.
//!
//! # Layout
//! - [`topic`]: Ditto topics (`{ns}/{name}/{group}/{channel}/{criterion}/{action}`) and
//!   [`TopicError`], which names the level that is wrong.
//! - [`envelope`]: the JSON envelope; envelope ⇄ command, event → envelope, responses, errors.
//! - [`message`]: live messages and the `message:` resource each is authorized on.
//! - [`mqtt`]: the compact MQTT form (DESIGN.md §3), both directions; its topic parser is on
//!   the hot path and allocates nothing for a valid topic.
//! - `json` (private): JSON text written piece by piece into a reusable buffer.

pub mod envelope;
mod json;
pub mod message;
pub mod mqtt;
pub mod space;
pub mod topic;

pub use envelope::{Envelope, Request};
pub use message::{LiveMessage, MessageDirection, MessageHeaders};
pub use mqtt::{
    MqttTopic, is_twin_topic, mqtt_command, mqtt_message, mqtt_request, parse_mqtt_topic,
};
pub use topic::{Channel, Criterion, Group, Topic, TopicError, TopicLevel};
