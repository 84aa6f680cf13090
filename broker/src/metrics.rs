//! The broker's counters, in Prometheus' exposition format (`prometheus-client`).
//!
//! Hot-path counters are plain `Counter`s (one atomic add); labelled families are only touched
//! on rare paths (refusals, denials, drops), where a label lookup is affordable.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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
    /// HTTP requests by route, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
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
            http_requests: Family::default(),
        };
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

    /// The exposition text (`text/plain; version=0.0.4` / OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
