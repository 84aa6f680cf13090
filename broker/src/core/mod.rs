//! The protocol-neutral core (DESIGN.md §4): every adapter (MQTT now; AMQP, HTTP/SSE and bridges
//! later) turns its wire into these calls and never authorizes, applies or routes on its own.

pub mod dispatch;
pub mod identity;
pub mod session;
pub mod space;
pub mod topics;
pub mod twins;
