//! The `thingsgate` binary's library: one protocol-neutral core and the adapters around it
//! (DESIGN.md §4), plus the command line.
//!
//! # Layout
//! - `core`: the core every transport uses — `authenticate` (credentials → identity),
//!   `attach` (sessions by client ID), `publish`/`execute` (twin and policy commands, live
//!   messages, plain messages; durable before acknowledged), `subscribe`, and the one fan-out
//!   (`core::dispatch`: READ per delivery, events cut to each subscriber's view). Below it:
//!   `twins` (authorize and apply), `policies` (the compiled-policy cache), `space`, `session`,
//!   `topics`, `message`.
//! - `mqtt`: the MQTT 3.1.1/5.0 adapter — `server` → `transport` → `codec` → `handshake` →
//!   `connection` → `outbound`; `reason` (codes as types), `will`.
//! - `amqp`: the AMQP 0.9.1 adapter — `codec` (frames) → `handshake` → `connection` (channels,
//!   queues as core sessions, consumers, confirms); `mapping` (routing keys ⇄ MQTT topics,
//!   properties), `reply` (reply codes). Listeners come from `mqtt::server`.
//! - `auth`: credential checks — solution secrets and API tokens (`secret`, `solution`), JWTs
//!   of configured issuers (`jwt`), failed attempts per address (`limiter`).
//! - `cli` (the command line: a contract, DESIGN.md §7; extend it, never rename) and its
//!   commands: `serve_cmd` and `dev` (`thingsgate serve [--dev]`), `policy_cmd`,
//!   `solution_cmd`, `connection_cmd`, `token_cmd`; `config` (TOML, `THINGSGATE_…` overrides, issuers);
//!   `limits` (every limit and what happens at it); `logging` (text or JSON, every value a
//!   client chose escaped); `metrics`.
//! - `bridge`: bridges — a solution's AMQP 0.9.1 and MQTT connections to external brokers,
//!   one more adapter: `inbound` (consumed commands → `Core::publish`), `outbound` (targets:
//!   a core subscription and a confirmed buffer), `amqp`/`mqtt` (the client tasks), `manager`
//!   (tasks follow the stored documents), `config`, `placeholder`.
//! - `bench`: `thingsgate bench` — `provision` (things and policies for a load test, through
//!   the HTTP API) and `run` (the load generator: simulated MQTT devices and subscribers, a
//!   report with HDR latency percentiles); `http_client` is the small HTTP client of the
//!   commands that talk to a running server (`connection --http`, `bench provision`).
//! - `http`: the HTTP adapter — the Ditto-compatible API under `/api/2` (`twin`, `messages`,
//!   `sse`, `solutions`, authenticated by `auth`), `/metrics`, `/health`, `/ready`, the
//!   OpenAPI document, and the mount point of MQTT over WebSockets (`mqtt::websocket`).
//! - `testing`: the core without sockets, for benchmarks and tests.
//!
//! The public surface is what the binary, the tests and the benchmarks use: `cli`, `config`,
//! `auth::jwt`, `auth::solution`, `token_cmd`, `mqtt::codec`, `mqtt::outbound`, `testing`.
//! Everything else is `pub(crate)`.

pub(crate) mod amqp;
pub mod auth;
pub(crate) mod bench;
pub(crate) mod bridge;
pub mod cli;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod connection_cmd;
pub(crate) mod core;
pub(crate) mod dev;
pub(crate) mod http;
pub(crate) mod http_client;
pub(crate) mod limits;
pub(crate) mod logging;
pub(crate) mod metrics;
pub mod mqtt;
pub(crate) mod policy_cmd;
pub(crate) mod serve_cmd;
pub(crate) mod solution_cmd;
pub mod testing;
pub mod token_cmd;
