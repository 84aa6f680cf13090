//! The broker's counters, in Prometheus' exposition format (`prometheus-client`).
//!
//! Hot-path counters are plain `Counter`s (one atomic add); labelled families are only touched
//! on rare paths (refusals, denials, drops), where a label lookup is affordable.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub solution: String,
    /// `publish`, `subscribe` or `delivery`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route pattern (`/api/2/things/{thing_id}`), never the raw path.
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `plain`, `command`, `message` (in); `plain`, `event`, `live`, `answer` (out).
    pub kind: &'static str,
}

/// Counters of one label each, taken from their family once (a hot-path add is one atomic).
#[derive(Debug, Clone)]
pub struct ByKind {
    pub plain: Counter,
    pub command: Counter,
    pub message: Counter,
    pub event: Counter,
    pub live: Counter,
    pub answer: Counter,
}

impl ByKind {
    fn of(family: &Family<KindLabel, Counter>, kinds: &[&'static str]) -> Self {
        let get = |kind: &'static str| {
            if kinds.contains(&kind) {
                family.get_or_create(&KindLabel { kind }).clone()
            } else {
                Counter::default()
            }
        };
        ByKind {
            plain: get("plain"),
            command: get("command"),
            message: get("message"),
            event: get("event"),
            live: get("live"),
            answer: get("answer"),
        }
    }
}

/// Every metric the broker keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connections_accepted: Counter,
    pub connections_active: Gauge,
    /// Refused CONNECTs by reason (`wrong_secret`, `expired`, `rate_limited`, …): never the
    /// credentials themselves.
    pub connects_refused: Family<ReasonLabel, Counter>,
    pub connects_accepted: Counter,
    pub messages_received: Counter,
    pub messages_delivered: Counter,
    /// Messages not delivered by a limit (`queue_full`, `expired`, `too_large`).
    pub messages_dropped: Family<ReasonLabel, Counter>,
    /// Denied by a policy, per solution.
    pub messages_denied: Family<DeniedLabels, Counter>,
    /// Connections closed for a protocol violation or malformed packet, by reason.
    pub protocol_errors: Family<ReasonLabel, Counter>,
    pub sessions_taken_over: Counter,
    /// Cluster mode: twin changes decided again because another node wrote the entity first.
    pub cluster_conflicts: Counter,
    /// HTTP requests by route, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Requests the core executed, by kind (`plain`, `command`, `message`).
    pub core_in: ByKind,
    /// Deliveries the fan-out queued, by kind (`plain`, `event`, `live`; `answer`: to the
    /// requester).
    pub core_out: ByKind,
    /// How long the fan-out of one message took (sampled: one message in 64).
    pub dispatch_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("thingsgate");
        let m = Metrics {
            registry: Registry::default(),
            connections_accepted: Counter::default(),
            connections_active: Gauge::default(),
            connects_refused: Family::default(),
            connects_accepted: Counter::default(),
            messages_received: Counter::default(),
            messages_delivered: Counter::default(),
            messages_dropped: Family::default(),
            messages_denied: Family::default(),
            protocol_errors: Family::default(),
            sessions_taken_over: Counter::default(),
            cluster_conflicts: Counter::default(),
            http_requests: Family::default(),
            core_in: ByKind::of(&Family::default(), &[]),
            core_out: ByKind::of(&Family::default(), &[]),
            dispatch_seconds: Histogram::new(exponential_buckets(0.000_002, 4.0, 10)),
        };
        let core_in_family = Family::<KindLabel, Counter>::default();
        let core_out_family = Family::<KindLabel, Counter>::default();
        let m = Metrics {
            core_in: ByKind::of(&core_in_family, &["plain", "command", "message"]),
            core_out: ByKind::of(&core_out_family, &["plain", "event", "live", "answer"]),
            ..m
        };
        registry.register(
            "messages_in",
            "Requests executed by the core, by kind",
            core_in_family,
        );
        registry.register(
            "messages_out",
            "Deliveries queued by the fan-out, by kind",
            core_out_family,
        );
        registry.register(
            "dispatch_seconds",
            "Time to fan one message out to its subscribers (one message in 64 is measured)",
            m.dispatch_seconds.clone(),
        );
        registry.register(
            "connections_accepted",
            "TCP/TLS connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open now",
            m.connections_active.clone(),
        );
        registry.register(
            "connects_refused",
            "CONNECTs refused, by reason",
            m.connects_refused.clone(),
        );
        registry.register(
            "connects_accepted",
            "CONNECTs accepted",
            m.connects_accepted.clone(),
        );
        registry.register(
            "messages_received",
            "PUBLISH packets received",
            m.messages_received.clone(),
        );
        registry.register(
            "messages_delivered",
            "PUBLISH packets sent to subscribers",
            m.messages_delivered.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages not delivered because of a limit, by reason",
            m.messages_dropped.clone(),
        );
        registry.register(
            "messages_denied",
            "Publishes, subscriptions and deliveries denied by a policy, per solution",
            m.messages_denied.clone(),
        );
        registry.register(
            "protocol_errors",
            "Connections closed for a protocol error or malformed packet, by reason",
            m.protocol_errors.clone(),
        );
        registry.register(
            "sessions_taken_over",
            "Sessions taken over by a new connection with the same client ID",
            m.sessions_taken_over.clone(),
        );
        registry.register(
            "cluster_conflicts",
            "Cluster mode: twin changes decided again because another node wrote the entity first",
            m.cluster_conflicts.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.http_requests.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn dropped(&self, reason: &'static str) {
        self.messages_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.connects_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn protocol_error(&self, reason: &'static str) {
        self.protocol_errors
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn denied(&self, solution: &str, kind: &'static str) {
        self.messages_denied
            .get_or_create(&DeniedLabels {
                solution: solution.to_owned(),
                kind,
            })
            .inc();
    }

    pub fn http_request(&self, route: String, method: String, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route,
                method,
                status,
            })
            .inc();
    }

    /// The exposition text (OpenMetrics), with `extra` metric families written before its
    /// end (values read at scrape time: `crate::core::stats`).
    pub fn encode(&self, extra: &str) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        if let Some(body) = out.strip_suffix("# EOF\n") {
            let mut whole = String::with_capacity(out.len() + extra.len());
            whole.push_str(body);
            whole.push_str(extra);
            whole.push_str("# EOF\n");
            return whole;
        }
        out
    }
}
