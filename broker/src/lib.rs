//! The `thingsgate` binary's library: command line, and (as the issues land) config, auth,
//! solutions, the MQTT server, bridges, HTTP, metrics and the hot-path dispatch.
//!
//! # Layout
//! - `cli`: the command line (a contract: DESIGN.md §7; extend it, never rename).
//! - `policy_cmd`: `thingsgate policy test` and `thingsgate policy check`.

pub mod cli;
pub mod policy_cmd;
