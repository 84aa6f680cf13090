//! The MQTT 3.1.1/5.0 adapter.

pub mod codec;
pub mod connection;
pub mod server;
mod twin_topics;
