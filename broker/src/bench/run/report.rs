//! The report of a run: the scenario, connections, messages (sent, expected, received, lost,
//! duplicates), throughput, end-to-end latency percentiles, failures by kind and the
//! generator's own CPU; as text or as one JSON object.

use std::time::Duration;

use serde_json::{Value, json};

use super::load::Outcome;
use super::settings::{Login, Settings, Transport};
use crate::bench::thousands;
use crate::mqtt::codec::QoS;

/// This process's CPU time (user and system) at one moment, or over a span.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CpuUse {
    pub(super) user_seconds: f64,
    pub(super) system_seconds: f64,
    /// The wall time of the span (zero for a moment).
    pub(super) wall_seconds: f64,
}

impl CpuUse {
    /// Now, from `/proc/self/stat` (zero where there is no `/proc`).
    pub(super) fn now() -> Self {
        let (user_seconds, system_seconds) =
            crate::bench::procfs::cpu_seconds("self").unwrap_or_default();
        CpuUse {
            user_seconds,
            system_seconds,
            wall_seconds: 0.0,
        }
    }

    /// The span from `start` to this moment, `wall` long.
    pub(super) fn since(&self, start: &CpuUse, wall: Duration) -> Self {
        CpuUse {
            user_seconds: (self.user_seconds - start.user_seconds).max(0.0),
            system_seconds: (self.system_seconds - start.system_seconds).max(0.0),
            wall_seconds: wall.as_secs_f64(),
        }
    }

    fn total(&self) -> f64 {
        self.user_seconds + self.system_seconds
    }

    /// Percent of one core over the span.
    fn percent(&self) -> f64 {
        if self.wall_seconds > 0.0 {
            100.0 * self.total() / self.wall_seconds
        } else {
            0.0
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    samples: u64,
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// A run's figures, ready to print.
#[derive(Debug)]
pub(super) struct Report {
    scenario: Value,
    summary: String,
    devices: u64,
    subscribers: u64,
    outcome_counts: Counts,
    latency: Option<Latency>,
    failures: Vec<(String, u64)>,
    cpu: CpuUse,
    interrupted: bool,
    /// The JSON `timeline` (points) and `phases`.
    timeline: (Value, Value),
    policy_churn: Option<super::churn::Summary>,
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    devices_connected: u64,
    devices_failed: u64,
    subscribers_connected: u64,
    subscribers_failed: u64,
    connect_seconds: f64,
    sent: u64,
    expected: u64,
    received: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    publish_seconds: f64,
    receive_seconds: f64,
}

impl Counts {
    fn connects_per_second(&self) -> f64 {
        per_second(
            self.devices_connected + self.subscribers_connected,
            self.connect_seconds,
        )
    }
    fn sent_per_second(&self) -> f64 {
        per_second(self.sent, self.publish_seconds)
    }
    fn received_per_second(&self) -> f64 {
        per_second(self.received, self.receive_seconds)
    }
}

fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn qos_number(qos: QoS) -> u8 {
    qos as u8
}

impl Report {
    pub(super) fn new(s: &Settings, outcome: &Outcome) -> Self {
        let login = match &s.login {
            // AMQP has no anonymous login: `run/amqp.rs` logs in as every client's default.
            Login::Anonymous if s.transport == Transport::Amqp => "guest (AMQP default)",
            Login::Anonymous => "anonymous",
            Login::Plain { .. } => "user name and password",
            Login::Secret { .. } => "solution secret",
            Login::Jwt(_) => "JWT per connection",
        };
        let scenario = json!({
            "url": s.url,
            "transport": s.transport.name(),
            "protocol": s.protocol_name(),
            "devices": s.devices,
            "subscribers": s.subscribers,
            "qos": qos_number(s.qos),
            "rate": s.rate.to_string(),
            "inflight": s.inflight,
            "payload_size": s.payload_size,
            "topic": s.topic,
            "filter": s.filter.as_str(),
            "twin": s.twin,
            "duration": s.duration.as_secs_f64(),
            "count": s.count,
            "connect_rate": s.connect_rate,
            "login": login,
            "source_addresses": s.source_addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        let summary = format!(
            "{} devices -> {} subscribers, {}, QoS {}, rate {}{}, payload {} B, {}topic `{}`, \
             filter `{}`, {} s{}, {} ({login})",
            s.devices,
            s.subscribers,
            s.protocol_label(),
            qos_number(s.qos),
            s.rate,
            match s.rate {
                super::Rate::Max => format!(" (closed loop, inflight {})", s.inflight),
                super::Rate::Idle => " (connections held, no messages)".to_owned(),
                super::Rate::PerSecond(_) => format!(" msg/s per device (inflight {})", s.inflight),
            },
            s.payload_size,
            if s.twin.is_some() {
                "twin updates, "
            } else {
                ""
            },
            s.topic,
            s.filter.as_str(),
            s.duration.as_secs_f64(),
            s.count
                .map(|c| format!(" or {c} messages"))
                .unwrap_or_default(),
            s.url,
        );
        let histogram = &outcome.latency;
        let ms = |ns: u64| ns as f64 / 1e6;
        let latency = (!histogram.is_empty()).then(|| Latency {
            samples: histogram.len(),
            mean: histogram.mean() / 1e6,
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
        });
        let mut failures: Vec<(String, u64)> = outcome
            .failures
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        failures.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Report {
            scenario,
            summary,
            devices: s.devices as u64,
            subscribers: s.subscribers as u64,
            outcome_counts: Counts {
                devices_connected: outcome.devices_connected,
                devices_failed: outcome.devices_failed,
                subscribers_connected: outcome.subscribers_connected,
                subscribers_failed: outcome.subscribers_failed,
                connect_seconds: outcome.connect_seconds,
                sent: outcome.sent,
                expected: outcome.expected,
                received: outcome.received,
                lost: outcome.expected.saturating_sub(outcome.received),
                duplicates: outcome.duplicates,
                reordered: outcome.reordered,
                publish_seconds: outcome.publish_seconds,
                receive_seconds: outcome.receive_seconds,
            },
            latency,
            failures,
            cpu: outcome.cpu,
            interrupted: outcome.interrupted,
            timeline: (
                outcome.timeline.points_json(),
                outcome.timeline.phases_json(),
            ),
            policy_churn: outcome.policy_churn.clone(),
        }
    }

    /// Nothing could connect: no device (or, without devices, no subscriber).
    pub(super) fn nothing_connected(&self) -> bool {
        let c = &self.outcome_counts;
        if self.devices > 0 {
            c.devices_connected == 0
        } else {
            self.subscribers > 0 && c.subscribers_connected == 0
        }
    }

    pub(super) fn to_json(&self) -> Value {
        let c = &self.outcome_counts;
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let latency = self.latency.map(|l| {
            json!({
                "samples": l.samples,
                "mean": round(l.mean),
                "p50": round(l.p50),
                "p90": round(l.p90),
                "p99": round(l.p99),
                "p99_9": round(l.p999),
                "max": round(l.max),
            })
        });
        let errors: serde_json::Map<String, Value> = self
            .failures
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({
            "scenario": self.scenario,
            "completed": !self.interrupted,
            "connections": {
                "devices_connected": c.devices_connected,
                "devices_failed": c.devices_failed,
                "subscribers_connected": c.subscribers_connected,
                "subscribers_failed": c.subscribers_failed,
                "connect_seconds": round(c.connect_seconds),
                "connects_per_second": round(c.connects_per_second()),
            },
            "messages": {
                "sent": c.sent,
                "expected": c.expected,
                "received": c.received,
                "lost": c.lost,
                "duplicates": c.duplicates,
                "reordered": c.reordered,
            },
            "throughput": {
                "publish_seconds": round(c.publish_seconds),
                "sent_per_second": round(c.sent_per_second()),
                "receive_seconds": round(c.receive_seconds),
                "received_per_second": round(c.received_per_second()),
            },
            "latency_ms": latency,
            "errors": errors,
            "generator_cpu": {
                "user_seconds": round(self.cpu.user_seconds),
                "system_seconds": round(self.cpu.system_seconds),
                "seconds": round(self.cpu.total()),
                "wall_seconds": round(self.cpu.wall_seconds),
                "percent_of_one_core": round(self.cpu.percent()),
            },
            "policy_churn": self.policy_churn.as_ref().map(super::churn::Summary::to_json),
            "timeline": self.timeline.0,
            "phases": self.timeline.1,
        })
    }

    pub(super) fn to_text(&self) -> String {
        let c = &self.outcome_counts;
        let mut out = String::new();
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(format!("bench run: {}", self.summary));
        if self.interrupted {
            line("  (interrupted: publishing stopped early)".to_owned());
        }
        line(format!(
            "connections  devices {} connected, {} failed; subscribers {} connected, {} failed; \
             {} connects/s over {:.2} s",
            c.devices_connected,
            c.devices_failed,
            c.subscribers_connected,
            c.subscribers_failed,
            thousands(c.connects_per_second()),
            c.connect_seconds,
        ));
        line(format!(
            "messages     sent {}  expected {}  received {}  lost {}  duplicates {}  reordered {}",
            thousands(c.sent as f64),
            thousands(c.expected as f64),
            thousands(c.received as f64),
            thousands(c.lost as f64),
            thousands(c.duplicates as f64),
            thousands(c.reordered as f64),
        ));
        line(format!(
            "throughput   sent {}/s over {:.2} s  received {}/s over {:.2} s",
            thousands(c.sent_per_second()),
            c.publish_seconds,
            thousands(c.received_per_second()),
            c.receive_seconds,
        ));
        match self.latency {
            Some(l) => line(format!(
                "latency      p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} \
                 ms  (mean {:.3} ms, {} samples)",
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                l.mean,
                thousands(l.samples as f64),
            )),
            None => line("latency      no deliveries".to_owned()),
        }
        if self.failures.is_empty() {
            line("errors       none".to_owned());
        } else {
            let listed: Vec<String> = self
                .failures
                .iter()
                .map(|(kind, n)| format!("{kind}: {n}"))
                .collect();
            line(format!("errors       {}", listed.join("; ")));
        }
        if let Some(churn) = &self.policy_churn {
            line(format!("policy churn {}", churn.to_text()));
        }
        line(format!(
            "generator    CPU {:.2} s (user {:.2} s, system {:.2} s) = {:.0}% of one core over \
             {:.2} s",
            self.cpu.total(),
            self.cpu.user_seconds,
            self.cpu.system_seconds,
            self.cpu.percent(),
            self.cpu.wall_seconds,
        ));
        out
    }
}
