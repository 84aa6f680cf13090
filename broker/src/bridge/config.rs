//! A connection as a solution stores it (DESIGN.md §5) — the shape of Ditto's connection JSON
//! where it fits — and [`Compiled`], the same checked once with its templates parsed, which the
//! runtime uses:
//!
//! ```json
//! {"id": "hub", "connectionType": "amqp-091", "connectionStatus": "open",
//!  "uri": "amqp://user:password@hub.example:5672/%2f",
//!  "sources": [{"addresses": ["telemetry"], "prefetch": 100,
//!               "authorizationContext": ["integration:{{ header:device_id }}"],
//!               "enforcement": {"input": "{{ header:device_id }}", "filters": ["{{ thing:id }}"]},
//!               "headerMapping": {"correlation-id": "{{ header:message-id }}"}}],
//!  "targets": [{"address": "amq.topic/{{ thing:namespace }}.{{ thing:name }}.{{ topic:action }}",
//!               "topics": ["_/_/things/twin/events", "_/_/things/live/messages"],
//!               "authorizationContext": ["integration:acme:hub"]}]}
//! ```
//!
//! The URI's password is stored (the bridge needs it to connect) but never logged, and every
//! answer shows it as `***` ([`ConnectionDoc::redacted`]); a document sent back with `***`
//! keeps the stored password ([`ConnectionDoc::keep_password_of`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bridge::placeholder::{Allowed, Template, TemplateError};

/// Connections one solution may have.
pub const MAX_CONNECTIONS: usize = 100;
/// Sources, and targets, of one connection.
pub const MAX_ENDPOINTS: usize = 16;
/// Addresses of one source, subjects of one authorization context, header mappings.
pub const MAX_ITEMS: usize = 64;
/// The prefetch of an AMQP source when none is given.
pub const DEFAULT_PREFETCH: u16 = 100;
/// What a password is shown as.
pub const HIDDEN: &str = "***";

/// The protocol a connection speaks to the external broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionType {
    #[serde(rename = "amqp-091")]
    Amqp091,
    #[serde(rename = "mqtt")]
    Mqtt,
    #[serde(rename = "mqtt-5")]
    Mqtt5,
}

impl ConnectionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionType::Amqp091 => "amqp-091",
            ConnectionType::Mqtt => "mqtt",
            ConnectionType::Mqtt5 => "mqtt-5",
        }
    }
}

/// Whether the connection should run (`closed`: kept, not connected).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    #[default]
    Open,
    Closed,
}

/// A connection, as stored with its solution and shown by the API (with the password hidden).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionDoc {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub connection_type: ConnectionType,
    #[serde(default)]
    pub connection_status: Desired,
    pub uri: String,
    #[serde(default)]
    pub sources: Vec<SourceDoc>,
    #[serde(default)]
    pub targets: Vec<TargetDoc>,
    /// Protocol-specific settings: `clientId` (MQTT; default `thingsgate-<solution>-<id>`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub specific_config: BTreeMap<String, String>,
}

/// Where commands come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceDoc {
    /// AMQP queue names, or MQTT topic filters.
    pub addresses: Vec<String>,
    /// The subjects a consumed command is authorized as; `{{ header:… }}` placeholders.
    pub authorization_context: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<EnforcementDoc>,
    /// MQTT: the subscription's QoS (default 1: at least once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// AMQP: messages delivered and not yet settled (`basic.qos`; default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u16>,
    /// Extra headers computed from the consumed message's (`{{ header:… }}`): e.g.
    /// `reply-to` or `correlation-id` from headers the hub sets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub header_mapping: BTreeMap<String, String>,
}

/// Ditto's source enforcement: the consumed message's `input` must equal one of `filters`
/// resolved for the addressed thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnforcementDoc {
    pub input: String,
    pub filters: Vec<String>,
}

/// Where events and live messages go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetDoc {
    /// AMQP: `exchange/routing-key` (or `exchange` alone: the topic's routing key is empty);
    /// MQTT: a topic. `{{ thing:… }}` and `{{ topic:… }}` placeholders.
    pub address: String,
    /// `_/_/things/twin/events`, `_/_/things/live/messages`, optionally with
    /// `?namespaces=a,b`.
    pub topics: Vec<String>,
    /// The subjects whose view of each event or message is published (fixed).
    pub authorization_context: Vec<String>,
    /// MQTT: the QoS published with (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// Headers (AMQP) or user properties (MQTT 5) set on each published message.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub header_mapping: BTreeMap<String, String>,
}

impl fmt::Debug for ConnectionDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionDoc")
            .field("id", &self.id)
            .field("connection_type", &self.connection_type)
            .field("uri", &redact_uri(&self.uri))
            .field("sources", &self.sources)
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

/// Why a connection document was refused; the text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the connection is not valid JSON of a connection: {0}")]
    Json(String),
    #[error("`id` must be 1 to 64 letters, digits, `-`, `_` or `.`, found `{0}`")]
    BadId(String),
    #[error("`uri`: {0}")]
    BadUri(String),
    #[error("`{field}`: {error}")]
    Template { field: String, error: TemplateError },
    #[error("`{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn template(field: String, raw: &str, allowed: Allowed) -> Result<Template, ConfigError> {
    Template::parse(raw, allowed).map_err(|error| ConfigError::Template { field, error })
}

/// The endpoint a URI names, its credentials decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The path without its leading `/` (AMQP: the vhost, percent-encoded).
    pub path: String,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("scheme", &self.scheme)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// `host:port`, for status and logs.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "a `%` not followed by two hex digits".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding that is not UTF-8".to_owned())
}

/// Parses `scheme://[user[:password]@]host[:port][/path]`.
pub fn parse_uri(uri: &str, kind: ConnectionType) -> Result<Endpoint, ConfigError> {
    let bad = |reason: &str| ConfigError::BadUri(format!("{reason} (in `{}`)", redact_uri(uri)));
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| bad("no scheme: write e.g. `amqp://user:password@host:5672/%2f`"))?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match (kind, scheme.as_str()) {
        (ConnectionType::Amqp091, "amqp") => 5672,
        (ConnectionType::Mqtt | ConnectionType::Mqtt5, "mqtt" | "tcp") => 1883,
        (ConnectionType::Amqp091, "amqps") | (_, "mqtts" | "ssl") => {
            return Err(bad(
                "TLS connections to external brokers are not supported yet; use a plain `amqp://`/`mqtt://` URI on a trusted network",
            ));
        }
        (ConnectionType::Amqp091, _) => {
            return Err(bad("the scheme of an amqp-091 connection is `amqp`"));
        }
        _ => return Err(bad("the scheme of an mqtt connection is `mqtt` or `tcp`")),
    };
    // User information may not hold an unencoded `/` (nor `@`): the host would be misread.
    if let Some(at) = rest.rfind('@')
        && rest
            .get(..at)
            .is_some_and(|info| info.contains('/') || info.contains('@'))
    {
        return Err(bad(
            "the user name or password holds `/` or `@`: percent-encode them (`%2F`, `%40`)",
        ));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (
            rest.get(..i).unwrap_or_default(),
            rest.get(i + 1..).unwrap_or_default(),
        ),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => (
            Some(authority.get(..i).unwrap_or_default()),
            authority.get(i + 1..).unwrap_or_default(),
        ),
        None => (None, authority),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => {
            let (user, password) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            (
                Some(percent_decode(user).map_err(|e| bad(&e))?),
                password
                    .map(percent_decode)
                    .transpose()
                    .map_err(|e| bad(&e))?,
            )
        }
    };
    let (host, port) = if let Some(stripped) = hostport.strip_prefix('[') {
        let (host, after) = stripped
            .split_once(']')
            .ok_or_else(|| bad("an unclosed `[`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
            None => default_port,
        };
        (host.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse()
                    .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            ),
            None => (hostport.to_owned(), default_port),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok(Endpoint {
        scheme,
        host,
        port,
        username,
        password,
        path: path.to_owned(),
    })
}

/// `uri` with the password replaced by `***` (for answers, errors and logs). Everything
/// between `scheme://` and the last `@` counts as user information, so a password with an
/// unencoded `/` or `@` is hidden too (such a URI is refused by [`parse_uri`]).
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let Some(at) = rest.rfind('@') else {
        return uri.to_owned();
    };
    let userinfo = rest.get(..at).unwrap_or_default();
    let user = match userinfo.split_once(':') {
        Some((user, _)) => user,
        None if userinfo.contains('/') => HIDDEN,
        None => userinfo,
    };
    let hidden = if userinfo.contains(':') {
        format!("{user}:{HIDDEN}")
    } else {
        user.to_owned()
    };
    format!("{scheme}://{hidden}{}", rest.get(at..).unwrap_or_default())
}

/// A source, checked.
#[derive(Debug, Clone)]
pub struct Source {
    pub addresses: Vec<String>,
    pub authorization_context: Vec<Template>,
    pub enforcement: Option<Enforcement>,
    pub qos: u8,
    pub prefetch: u16,
    pub header_mapping: Vec<(String, Template)>,
}

/// An enforcement, checked.
#[derive(Debug, Clone)]
pub struct Enforcement {
    pub input: Template,
    pub filters: Vec<Template>,
}

/// Which events and messages a target takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    TwinEvents,
    LiveMessages,
}

/// A target, checked.
#[derive(Debug, Clone)]
pub struct Target {
    /// AMQP: the exchange (empty: the default exchange); MQTT: unused.
    pub exchange: String,
    /// AMQP: the routing key; MQTT: the topic.
    pub address: Template,
    /// The core subscription filters (MQTT form) the target's topics stand for.
    pub filters: Vec<String>,
    pub authorization_context: Vec<String>,
    pub qos: u8,
    pub header_mapping: Vec<(String, Template)>,
}

/// A connection, checked and ready to run.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub doc: ConnectionDoc,
    pub endpoint: Endpoint,
    pub sources: Vec<Source>,
    pub targets: Vec<Target>,
}

fn check_count<T>(field: &str, list: &[T], min: usize) -> Result<(), ConfigError> {
    if list.len() < min {
        return Err(invalid(field, format!("needs at least {min} entry")));
    }
    if list.len() > MAX_ITEMS {
        return Err(invalid(field, format!("at most {MAX_ITEMS} entries")));
    }
    Ok(())
}

fn check_subject(field: &str, subject: &str) -> Result<(), ConfigError> {
    match subject.split_once(':') {
        Some((issuer, id)) if !issuer.is_empty() && !id.is_empty() => Ok(()),
        _ => Err(invalid(
            field,
            format!(
                "`{subject}` is not a subject `issuer:id` (e.g. `integration:<solution>:<label>`)"
            ),
        )),
    }
}

/// The core filters a target topic stands for.
fn target_filters(field: &str, topic: &str) -> Result<(TopicKind, Vec<String>), ConfigError> {
    let (path, query) = match topic.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (topic, None),
    };
    let (kind, suffix) = match path {
        "_/_/things/twin/events" => (TopicKind::TwinEvents, "things/twin/events/#"),
        "_/_/things/live/messages" => (TopicKind::LiveMessages, "things/live/messages/#"),
        other => {
            return Err(invalid(
                field,
                format!(
                    "`{other}` is not a topic a target can take (`_/_/things/twin/events`, `_/_/things/live/messages`)"
                ),
            ));
        }
    };
    let namespaces: Vec<&str> = match query {
        None => Vec::new(),
        Some(q) => {
            let list = q.strip_prefix("namespaces=").ok_or_else(|| {
                invalid(
                    field,
                    format!("unknown parameter in `{topic}` (only `namespaces=a,b`)"),
                )
            })?;
            let list: Vec<&str> = list.split(',').filter(|n| !n.is_empty()).collect();
            for ns in &list {
                if !policy::model::is_valid_namespace(ns) {
                    return Err(invalid(field, format!("`{ns}` is not a namespace")));
                }
            }
            list
        }
    };
    if namespaces.is_empty() {
        Ok((kind, vec![format!("+/+/{suffix}")]))
    } else {
        Ok((
            kind,
            namespaces
                .iter()
                .map(|ns| format!("{ns}/+/{suffix}"))
                .collect(),
        ))
    }
}

fn header_mapping(
    field: &str,
    mapping: &BTreeMap<String, String>,
    allowed: Allowed,
) -> Result<Vec<(String, Template)>, ConfigError> {
    if mapping.len() > MAX_ITEMS {
        return Err(invalid(field, format!("at most {MAX_ITEMS} entries")));
    }
    mapping
        .iter()
        .map(|(name, value)| {
            if name.is_empty() || name.len() > 255 {
                return Err(invalid(field, "a header name must have 1 to 255 bytes"));
            }
            Ok((
                name.to_ascii_lowercase(),
                template(format!("{field}.{name}"), value, allowed)?,
            ))
        })
        .collect()
}

impl ConnectionDoc {
    /// Reads a connection document (JSON).
    pub fn from_json(text: &[u8]) -> Result<Self, ConfigError> {
        serde_json::from_slice(text).map_err(|e| ConfigError::Json(e.to_string()))
    }

    /// The document as the API shows it: the password hidden.
    pub fn redacted(&self) -> ConnectionDoc {
        ConnectionDoc {
            uri: redact_uri(&self.uri),
            ..self.clone()
        }
    }

    /// A document sent back as it was shown (password `***`) keeps `stored`'s password, if
    /// everything else of the URI's user and host is the same.
    pub fn keep_password_of(&mut self, stored: &ConnectionDoc) {
        if redact_uri(&stored.uri) == self.uri && self.uri.contains(HIDDEN) {
            self.uri.clone_from(&stored.uri);
        }
    }

    /// Checks everything and parses the templates.
    pub fn compile(&self) -> Result<Compiled, ConfigError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !id_ok {
            return Err(ConfigError::BadId(self.id.clone()));
        }
        let endpoint = parse_uri(&self.uri, self.connection_type)?;
        if self.sources.is_empty() && self.targets.is_empty() {
            return Err(invalid(
                "sources",
                "a connection needs a source or a target",
            ));
        }
        if self.sources.len() > MAX_ENDPOINTS || self.targets.len() > MAX_ENDPOINTS {
            return Err(invalid(
                "sources",
                format!("at most {MAX_ENDPOINTS} sources and {MAX_ENDPOINTS} targets"),
            ));
        }
        for key in self.specific_config.keys() {
            if key != "clientId" {
                return Err(invalid(
                    format!("specificConfig.{key}"),
                    "unknown setting (known: `clientId`)",
                ));
            }
        }
        let mqtt = self.connection_type != ConnectionType::Amqp091;
        let mut sources = Vec::new();
        for (i, s) in self.sources.iter().enumerate() {
            let field = |f: &str| format!("sources[{i}].{f}");
            check_count(&field("addresses"), &s.addresses, 1)?;
            for address in &s.addresses {
                if address.is_empty() || address.len() > 255 {
                    return Err(invalid(
                        field("addresses"),
                        "an address must have 1 to 255 bytes",
                    ));
                }
                if mqtt && address.parse::<crate::mqtt::codec::TopicFilter>().is_err() {
                    return Err(invalid(
                        field("addresses"),
                        format!("`{address}` is not an MQTT topic filter"),
                    ));
                }
            }
            check_count(&field("authorizationContext"), &s.authorization_context, 1)?;
            let mut context = Vec::new();
            for subject in &s.authorization_context {
                check_subject(&field("authorizationContext"), subject)?;
                context.push(template(
                    field("authorizationContext"),
                    subject,
                    Allowed::Headers,
                )?);
            }
            let enforcement = match &s.enforcement {
                None => None,
                Some(e) => {
                    check_count(&field("enforcement.filters"), &e.filters, 1)?;
                    Some(Enforcement {
                        input: template(field("enforcement.input"), &e.input, Allowed::Headers)?,
                        filters: e
                            .filters
                            .iter()
                            .map(|f| template(field("enforcement.filters"), f, Allowed::Thing))
                            .collect::<Result<_, _>>()?,
                    })
                }
            };
            let qos = s.qos.unwrap_or(1);
            if qos > 2 {
                return Err(invalid(field("qos"), "0, 1 or 2"));
            }
            if s.qos.is_some() && !mqtt {
                return Err(invalid(
                    field("qos"),
                    "only MQTT sources have a QoS (AMQP: `prefetch`)",
                ));
            }
            if s.prefetch.is_some() && mqtt {
                return Err(invalid(
                    field("prefetch"),
                    "only AMQP sources have a prefetch",
                ));
            }
            let prefetch = s.prefetch.unwrap_or(DEFAULT_PREFETCH);
            if prefetch == 0 {
                return Err(invalid(
                    field("prefetch"),
                    "1 to 65535 (0 would be unbounded)",
                ));
            }
            sources.push(Source {
                addresses: s.addresses.clone(),
                authorization_context: context,
                enforcement,
                qos,
                prefetch,
                header_mapping: header_mapping(
                    &field("headerMapping"),
                    &s.header_mapping,
                    Allowed::Headers,
                )?,
            });
        }
        let mut targets = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let field = |f: &str| format!("targets[{i}].{f}");
            check_count(&field("topics"), &t.topics, 1)?;
            let mut filters = Vec::new();
            for topic in &t.topics {
                filters.extend(target_filters(&field("topics"), topic)?.1);
            }
            check_count(&field("authorizationContext"), &t.authorization_context, 1)?;
            for subject in &t.authorization_context {
                check_subject(&field("authorizationContext"), subject)?;
                template(field("authorizationContext"), subject, Allowed::Nothing)?;
            }
            let (exchange, key) = if mqtt {
                (String::new(), t.address.as_str())
            } else {
                match t.address.split_once('/') {
                    Some((exchange, key)) => (exchange.to_owned(), key),
                    None => (t.address.clone(), ""),
                }
            };
            if mqtt && t.address.is_empty() {
                return Err(invalid(field("address"), "an MQTT target needs a topic"));
            }
            let qos = t.qos.unwrap_or(1);
            if qos > 2 {
                return Err(invalid(field("qos"), "0, 1 or 2"));
            }
            if t.qos.is_some() && !mqtt {
                return Err(invalid(
                    field("qos"),
                    "AMQP targets always publish with confirms",
                ));
            }
            targets.push(Target {
                exchange,
                address: template(field("address"), key, Allowed::ThingAndTopic)?,
                filters,
                authorization_context: t.authorization_context.clone(),
                qos,
                header_mapping: header_mapping(
                    &field("headerMapping"),
                    &t.header_mapping,
                    Allowed::ThingAndTopic,
                )?,
            });
        }
        Ok(Compiled {
            doc: self.clone(),
            endpoint,
            sources,
            targets,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn doc(json: serde_json::Value) -> Result<Compiled, ConfigError> {
        ConnectionDoc::from_json(json.to_string().as_bytes())?.compile()
    }

    #[test]
    fn a_hub_connection_compiles_and_hides_its_password() {
        let json = serde_json::json!({
            "id": "hub", "connectionType": "amqp-091",
            "uri": "amqp://hub%40acme:s3cr%2Ft@127.0.0.1:5672/%2f",
            "sources": [{"addresses": ["telemetry"],
                "authorizationContext": ["integration:{{ header:device_id }}"],
                "enforcement": {"input": "{{ header:device_id }}", "filters": ["{{ thing:id }}"]}}],
            "targets": [{"address": "amq.topic/{{ thing:namespace }}.{{ topic:action }}",
                "topics": ["_/_/things/twin/events?namespaces=org.acme"],
                "authorizationContext": ["integration:acme:hub"]}]
        });
        let c = doc(json).unwrap();
        assert_eq!(c.endpoint.username.as_deref(), Some("hub@acme"));
        assert_eq!(c.endpoint.password.as_deref(), Some("s3cr/t"));
        assert_eq!(c.endpoint.port, 5672);
        assert_eq!(c.sources[0].prefetch, DEFAULT_PREFETCH);
        assert_eq!(c.targets[0].exchange, "amq.topic");
        assert_eq!(c.targets[0].filters, ["org.acme/+/things/twin/events/#"]);
        let shown = c.doc.redacted();
        assert_eq!(shown.uri, "amqp://hub%40acme:***@127.0.0.1:5672/%2f");
        assert!(!format!("{:?}", c.doc).contains("s3cr"));
        let mut back = shown.clone();
        back.keep_password_of(&c.doc);
        assert_eq!(back.uri, c.doc.uri);
    }

    #[test]
    fn mistakes_are_refused_with_the_field_named() {
        let base = |patch: serde_json::Value| {
            let mut v = serde_json::json!({
                "id": "m", "connectionType": "mqtt", "uri": "mqtt://127.0.0.1:1883",
                "sources": [{"addresses": ["hub/#"], "authorizationContext": ["integration:x"]}]
            });
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            doc(v)
        };
        assert!(base(serde_json::json!({})).is_ok());
        let e = base(serde_json::json!({"uri": "http://x"})).unwrap_err();
        assert!(e.to_string().contains("uri"), "{e}");
        let e = base(serde_json::json!({"id": "a b"})).unwrap_err();
        assert!(matches!(e, ConfigError::BadId(_)));
        let e = base(serde_json::json!({"sources": [{"addresses": ["a/#/b"], "authorizationContext": ["integration:x"]}]})).unwrap_err();
        assert!(e.to_string().contains("sources[0].addresses"), "{e}");
        let e = base(serde_json::json!({"sources": [{"addresses": ["a"], "authorizationContext": ["integration:{{ jwt:sub }}"]}]})).unwrap_err();
        assert!(e.to_string().contains("authorizationContext"), "{e}");
        let e = base(serde_json::json!({"targets": [{"address": "t", "topics": ["_/_/things/twin/commands"], "authorizationContext": ["integration:x"]}]})).unwrap_err();
        assert!(e.to_string().contains("targets[0].topics"), "{e}");
        let e = base(serde_json::json!({"sources": [{"addresses": ["a"], "authorizationContext": ["nocolon"]}]})).unwrap_err();
        assert!(e.to_string().contains("issuer:id"), "{e}");
        let e = ConnectionDoc::from_json(
            br#"{"id":"x","connectionType":"mqtt","uri":"mqtt://h","sourcez":[]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("sourcez"), "{e}");
        for uri in [
            "amqp://u:pa/ss@h",
            "amqp://admin:1/x@rabbit:5672/%2f",
            "amqp://u:a@b@h",
        ] {
            let e = doc(
                serde_json::json!({"id": "a", "connectionType": "amqp-091", "uri": uri,
                "sources": [{"addresses": ["q"], "authorizationContext": ["integration:x"]}]}),
            )
            .unwrap_err();
            assert!(e.to_string().contains("percent-encode"), "{e}");
            assert!(
                !e.to_string().contains("ss@")
                    && !e.to_string().contains("1/x")
                    && !e.to_string().contains("a@b"),
                "{e}"
            );
            assert!(
                !redact_uri(uri).contains("ss") && !redact_uri(uri).contains("1/x"),
                "{}",
                redact_uri(uri)
            );
        }
        let e = base(serde_json::json!({"uri": "amqps://h"})).unwrap_err();
        assert!(
            e.to_string().contains("scheme") || e.to_string().contains("TLS"),
            "{e}"
        );
    }
}
