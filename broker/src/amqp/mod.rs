//! The AMQP 0.9.1 adapter (DESIGN.md §3 "AMQP 0.9.1 devices"): an AMQP client (lapin, pika,
//! `amqp-tools`) connects to Thingsgate as it would to RabbitMQ, and every publish, binding and
//! delivery goes through the same core as MQTT's — one topic space through `amq.topic`.
//!
//! In the order bytes flow: the listener (`crate::mqtt::server`: the same accept loop,
//! admission, TLS and shutdown as MQTT) → `codec` (frames: size checked from the header, then
//! `amq-protocol` parses methods and content headers) → `handshake` (protocol header → start
//! → credentials → `Core::authenticate` → tune → open) → `connection` (channels, queues as core
//! sessions, consumers, confirms). `mapping`: routing keys ⇄ MQTT topics, properties ⇄ MQTT 5
//! properties. `reply`: reply codes and the methods the server sends.

pub(crate) mod codec;
pub(crate) mod connection;
pub(crate) mod handshake;
pub(crate) mod mapping;
pub(crate) mod reply;
