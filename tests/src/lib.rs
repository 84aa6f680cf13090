//! Helpers for the end-to-end tests: locating (and building) the real `thingsgate` binary.
//!
//! Test support code: failing loudly (panicking) is how it reports a broken setup.
//!
//! # Layout
//! - this file: the binary ([`thingsgate_bin`]) and running one-shot commands.
//! - [`amqp`]: lapin clients against the broker's AMQP listener, bounded waits.
//! - [`bridge`]: bridge tests' broker, things, connections and the external brokers.
//! - [`broker`]: a running `thingsgate serve` per test (temp data dir, config, port 0, logs).
//! - [`nats`]: the machine's NATS service, nats-server processes of a test's own (1 or a cluster of
//!   3), kill -9 and restart.
//! - [`process`]: third-party client processes, bounded, or streaming their stdout.
//! - [`issuer`]: a local JWT issuer: keys, JWKS file, config block, good and bad tokens.
//! - [`raw`]: a raw MQTT client on the broker's codec, for AUTH packets and exact reason codes.
//! - [`clients`]: rumqttc 3.1.1 and 5 clients with their event loop in a task, bounded waits.
//! - [`protocol_support`]: packet builders and bounded waits for the protocol tests.
//! - [`twin_random_support`]: a timestamping client, a naive policy oracle (checked against the
//!   policy crate through `thingsgate policy test`) and a seeded generator for twin tests.
#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

pub mod amqp;
pub mod bridge;
pub mod broker;
pub mod clients;
pub mod http;
pub mod issuer;
pub mod nats;
pub mod process;
pub mod protocol_support;
pub mod raw;
pub mod twin_random_support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The path of the `thingsgate` binary, built once per test process with the same profile as
/// the tests (`THINGSGATE_BIN` overrides it, e.g. to test a release build).
pub fn thingsgate_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("THINGSGATE_BIN") {
            return PathBuf::from(path);
        }
        let root = workspace_root();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--quiet", "-p", "broker", "--bin", "thingsgate"])
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("building thingsgate failed: {other:?}"),
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug").join("thingsgate")
    })
    .clone()
}

/// The repository root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Runs the real `thingsgate` with `args` and collects its output.
pub fn thingsgate(args: &[&str]) -> std::process::Output {
    Command::new(thingsgate_bin())
        .args(args)
        .output()
        .expect("thingsgate runs")
}

/// A process's stdout as text.
pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A process's stderr as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
