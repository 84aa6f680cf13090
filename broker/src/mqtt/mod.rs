//! The MQTT 3.1.1/5.0 adapter (DESIGN.md §3): MQTT packets in and out, translated to and from
//! the core's calls; flow control (inflight windows, acknowledgement order, keep-alive) is its
//! own, decisions are the core's.
//!
//! In the order bytes flow: `server` (listeners, TLS, shutdown; `admission`: handshake and
//! connection slots; `websocket`: the upgrade at `/mqtt` on the HTTP listener, admitted alike)
//! → `transport` (the socket: TCP, TLS or WebSocket) → `codec` (packets: check the fixed
//! header, then parse) →
//! `handshake` (CONNECT → `Core::authenticate` → `Core::attach` → CONNACK) → `connection`
//! (the main loop; each packet to a core call, acknowledgements in order) → `outbound`
//! (deliveries and answers into PUBLISH packets: topic aliases, maximum packet size).
//! `reason`: reason codes, CONNACK refusals and close reasons as types. `will`: last wills.

pub(crate) mod admission;
pub mod codec;
pub(crate) mod connection;
pub(crate) mod handshake;
pub mod outbound;
pub(crate) mod reason;
pub(crate) mod server;
pub(crate) mod transport;
pub(crate) mod websocket;
pub(crate) mod will;
