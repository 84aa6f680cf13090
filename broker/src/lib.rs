//! The `thingsgate` binary's library: command line, and (as the issues land) config, auth,
//! solutions, the MQTT server, bridges, HTTP, metrics and the hot-path dispatch.
//!
//! # Layout
//! - `cli`: the command line (a contract: DESIGN.md §7; extend it, never rename).
//! - `codec`: MQTT 3.1.1/5.0 packets: check the fixed header, then parse; encoding.
//! - `config`: the TOML configuration (`THINGSGATE_…` environment overrides); JWT issuers.
//! - `auth`: credentials → solution and subjects: generated secrets and their digests
//!   (`auth::secret`), solutions and the in-memory registry (`auth::solution`), JWT
//!   validation against configured issuers and subject templates (`auth::jwt`).
//! - `policy_cmd`: `thingsgate policy test` and `thingsgate policy check`.
//! - `solution_cmd`: `thingsgate solution …`, managing solutions in a stopped data dir.
//! - `token_cmd`: `thingsgate token …`, minting JWTs (development, tests, `serve --dev`).
//! - `topics`: the subscription tree (topic filters → subscriptions, MQTT matching rules).
//! - `limits`: every limit of the MQTT server and what happens when it is reached.
//! - The MQTT server, in the order bytes flow: `server` (listeners, accept loop, shutdown) →
//!   `connection` (CONNECT, authentication via `auth::connect`, packets, keep-alive, takeover)
//!   → `session` (subscriptions, queue, inflight) and `space` (a solution's topic tree,
//!   retained messages, sessions) → `dispatch` (authorized fan-out, per-subscriber checks).
//!   Twin topics: `connection::twin_topics` → `twins` (commands against each thing's policy,
//!   events cut per subscriber, live messages).
//! - `metrics`: counters (Prometheus format), served by `http` (`/metrics`, `/health`, `/ready`). `serve_cmd`, `dev`: `thingsgate serve [--dev]`.

pub mod auth;
pub mod cli;
pub mod config;
pub(crate) mod core;
pub(crate) mod dev;
pub(crate) mod http;
pub(crate) mod limits;
pub(crate) mod metrics;
pub mod mqtt;
pub(crate) mod policy_cmd;
pub(crate) mod serve_cmd;
pub(crate) mod solution_cmd;
pub mod testing;
pub mod token_cmd;
