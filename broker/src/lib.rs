//! The `thingsgate` binary's library: command line, and (as the issues land) config, auth,
//! solutions, the MQTT server, bridges, HTTP, metrics and the hot-path dispatch.
//!
//! # Layout
//! - `cli`: the command line (a contract: DESIGN.md §7; extend it, never rename).
//! - `auth`: credentials → solution and subjects: generated secrets and their digests
//!   (`auth::secret`), solutions and the in-memory registry (`auth::solution`).
//! - `policy_cmd`: `thingsgate policy test` and `thingsgate policy check`.
//! - `solution_cmd`: `thingsgate solution …`, managing solutions in a stopped data dir.

pub mod auth;
pub mod cli;
pub mod policy_cmd;
pub mod solution_cmd;
