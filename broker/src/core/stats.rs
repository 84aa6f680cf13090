//! Metrics read at scrape time from the core's own state rather than counted on the hot path:
//! connections by protocol and solution, authorization decisions and usage per solution, the
//! policy cache, and the journal's `fsync` latency and batch sizes. Written in the Prometheus /
//! OpenMetrics text format after the registry's families (`Metrics::encode`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use twin::store::{BATCH_WRITES_BOUNDS, SYNC_MICROS_BOUNDS};

use crate::core::Core;
use crate::core::space::Usage;

/// Escapes a label value (`\`, `"` and newlines).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP thingsgate_{name} {help}");
    let _ = writeln!(out, "# TYPE thingsgate_{name} {kind}");
}

/// A histogram from bucket counts (`counts[i]`: observations ≤ `bounds[i]`, the last: above
/// all), its sum, and a unit scale (bounds and sum are divided by it).
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[u64],
    (counts, sum): &([u64; 11], u64),
    scale: f64,
) {
    header(out, name, "histogram", help);
    let mut cumulative = 0;
    for (bound, count) in bounds.iter().zip(counts.iter()) {
        cumulative += count;
        let _ = writeln!(
            out,
            "thingsgate_{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / scale
        );
    }
    let total: u64 = counts.iter().sum();
    let _ = writeln!(out, "thingsgate_{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "thingsgate_{name}_sum {}", *sum as f64 / scale);
    let _ = writeln!(out, "thingsgate_{name}_count {total}");
}

impl Core {
    /// The whole `/metrics` text.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let spaces = self.spaces.all();
        // Connections by protocol and solution.
        let mut connections: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
        for space in &spaces {
            for session in space.sessions().values() {
                if let Some(link) = &session.lock().link {
                    *connections
                        .entry((space.id.to_string(), link.protocol.as_str()))
                        .or_default() += 1;
                }
            }
        }
        header(
            &mut out,
            "connections",
            "gauge",
            "Clients attached to a session now, by protocol and solution",
        );
        for ((solution, protocol), n) in &connections {
            let _ = writeln!(
                out,
                "thingsgate_connections{{protocol=\"{protocol}\",solution=\"{}\"}} {n}",
                label(solution)
            );
        }
        // Authorization decisions and usage per solution.
        type Pick = fn(&Usage) -> [(&'static str, &AtomicU64); 2];
        let families: [(&str, &str, &str, Pick); 3] = [
            (
                "authorizations",
                "outcome",
                "Authorization decisions (requests and deliveries) by solution and outcome",
                |u| [("allowed", &u.allowed), ("denied", &u.denied)],
            ),
            (
                "solution_messages",
                "direction",
                "Messages in (requests) and out (deliveries) per solution",
                |u| [("in", &u.messages_in), ("out", &u.messages_out)],
            ),
            (
                "solution_bytes",
                "direction",
                "Payload bytes in (MQTT publishes) and out (deliveries) per solution",
                |u| [("in", &u.bytes_in), ("out", &u.bytes_out)],
            ),
        ];
        for (name, key, help, pick) in families {
            header(&mut out, name, "counter", help);
            for space in &spaces {
                let solution = label(space.id.as_str());
                for (value, n) in pick(&space.usage) {
                    let _ = writeln!(
                        out,
                        "thingsgate_{name}_total{{solution=\"{solution}\",{key}=\"{value}\"}} {}",
                        n.load(Ordering::Relaxed)
                    );
                }
            }
        }
        // The policy cache.
        let policies = &self.twins.policies;
        header(
            &mut out,
            "policy_cache_lookups",
            "counter",
            "Policy lookups answered from the compiled cache (hit) or compiled (miss)",
        );
        let _ = writeln!(
            out,
            "thingsgate_policy_cache_lookups_total{{result=\"hit\"}} {}",
            policies.hits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "thingsgate_policy_cache_lookups_total{{result=\"miss\"}} {}",
            policies.misses.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "policy_cache_size",
            "gauge",
            "Compiled policies in the cache",
        );
        let _ = writeln!(out, "thingsgate_policy_cache_size {}", policies.cached());
        // The journal.
        let journal = self.twins.store.journal_stats().unwrap_or_default();
        histogram(
            &mut out,
            "journal_fsync_seconds",
            "Time to write and fsync one journal batch",
            &SYNC_MICROS_BOUNDS,
            &journal.sync_micros,
            1e6,
        );
        histogram(
            &mut out,
            "journal_batch_writes",
            "Writes made durable by one journal batch (one fsync)",
            &BATCH_WRITES_BOUNDS,
            &journal.batch_writes,
            1.0,
        );
        header(
            &mut out,
            "journal_bytes",
            "counter",
            "Bytes written to the journal",
        );
        let _ = writeln!(out, "thingsgate_journal_bytes_total {}", journal.bytes);
        self.bridge_metrics(&mut out);
        self.metrics.encode(&out)
    }

    /// Bridge connections: state (1 for the current one) and message counters.
    fn bridge_metrics(&self, out: &mut String) {
        let bridges = self.bridges.all();
        header(
            out,
            "connection_state",
            "gauge",
            "Bridge connections by state (1: the connection is in this state)",
        );
        for (solution, id, status) in &bridges {
            let state = status.state().0;
            for name in ["connecting", "connected", "failed", "closed"] {
                let _ = writeln!(
                    out,
                    "thingsgate_connection_state{{solution=\"{}\",connection=\"{}\",state=\"{name}\"}} {}",
                    label(solution),
                    label(id),
                    u8::from(state.label() == name)
                );
            }
        }
        header(
            out,
            "connection_messages",
            "counter",
            "Bridge connection messages: in (commands applied), out (published to targets), denied, failed, dropped, replies",
        );
        for (solution, id, status) in &bridges {
            let counters = [
                ("in", &status.consumed),
                ("out", &status.published),
                ("denied", &status.denied),
                ("failed", &status.failed),
                ("dropped", &status.dropped),
                ("replies", &status.replies),
            ];
            for (kind, counter) in counters {
                let _ = writeln!(
                    out,
                    "thingsgate_connection_messages_total{{solution=\"{}\",connection=\"{}\",kind=\"{kind}\"}} {}",
                    label(solution),
                    label(id),
                    counter.load(Ordering::Relaxed)
                );
            }
        }
    }
}
