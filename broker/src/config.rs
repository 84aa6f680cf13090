//! The TOML configuration file (DESIGN.md §7), with `THINGSGATE_…` environment overrides.
//!
//! For now it holds the JWT issuers (DESIGN.md §1, §2):
//!
//! ```toml
//! [[issuer]]
//! key = "google"                          # subject prefix: subjects are `google:<value>`
//! issuer = "https://accounts.google.com"  # the exact `iss` claim
//! audiences = ["thingsgate"]              # at least one, unless `allow_any_audience = true`
//! jwks_file = "google-jwks.json"          # relative to this file's directory, or instead:
//! # jwks_url = "https://www.googleapis.com/oauth2/v3/certs"  # http:// or https://
//! # jwks_refresh_seconds = 300            # with jwks_url: default 300, at least 10, at most 86400
//! # jwks_ca_file = "idp-ca.pem"           # with jwks_url: extra trusted roots (PEM), relative
//! #                                       # to this file's directory; the platform's roots stay
//! algorithms = ["RS256"]                  # default ["RS256", "ES256", "EdDSA"]; never none/HS*
//! leeway_seconds = 30                     # default 30, at most 300
//! auth_subjects = ["{{ jwt:sub }}", "{{ jwt:sub }}@{{ jwt:azp }}"]  # default ["{{ jwt:sub }}"]
//! solution_claim = "solution_id"          # optional claim path naming the solution
//! ```
//!
//! # Environment overrides
//! Every field of an issuer can be replaced by `THINGSGATE_ISSUER_<KEY>_<FIELD>`, where `<KEY>` is
//! the issuer's `key` upper-cased with every character other than `A-Z0-9` turned into `_`, and
//! `<FIELD>` the field name upper-cased: `THINGSGATE_ISSUER_GOOGLE_LEEWAY_SECONDS=60`,
//! `THINGSGATE_ISSUER_GOOGLE_AUDIENCES=a,b`. Lists are comma-separated (so a template containing
//! `,` can only be set in the file); booleans are `true`/`false`. Overrides apply to issuers
//! present in the file (an issuer cannot be created from the environment); a
//! `THINGSGATE_ISSUER_…` variable that matches no issuer field is an error, so a typo is not
//! silently ignored.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::auth::jwt::{ClaimPath, SubjectTemplate};

/// Prefix of the environment variables that override issuer fields.
pub const ISSUER_ENV_PREFIX: &str = "THINGSGATE_ISSUER_";

/// The default algorithm allow-list of an issuer.
pub const DEFAULT_ALGORITHMS: [Algorithm; 3] =
    [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// The default clock-skew allowance for `exp` and `nbf`.
pub const DEFAULT_LEEWAY_SECONDS: u64 = 30;

/// The largest leeway accepted: more would keep expired tokens alive noticeably.
pub const MAX_LEEWAY_SECONDS: u64 = 300;

/// The default time between two fetches of a `jwks_url`.
pub const DEFAULT_JWKS_REFRESH_SECONDS: u64 = 300;

/// The shortest `jwks_refresh_seconds`: more often would hammer the identity provider (a key
/// rotation is picked up anyway, by the re-fetch on an unknown `kid`).
pub const MIN_JWKS_REFRESH_SECONDS: u64 = 10;

/// The longest `jwks_refresh_seconds`: a key the identity provider withdrew must stop verifying
/// tokens within a day.
pub const MAX_JWKS_REFRESH_SECONDS: u64 = 86_400;

/// Subject prefixes that other credential kinds produce (DESIGN.md §1): a JWT issuer with one of
/// these keys could mint subjects that impersonate solution clients, bridges or operators.
pub const RESERVED_KEYS: [&str; 3] = ["iot-things", "integration", "operator"];

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `[[issuer]]` tables: the JWT issuers whose tokens are accepted.
    pub issuers: Vec<IssuerConfig>,
    /// The `[mqtt]` table: listeners, TLS files, limits (`crate::limits`).
    pub mqtt: crate::limits::MqttSettings,
    /// The directory relative paths of the file are resolved against.
    pub base_dir: PathBuf,
    /// `[[operator]]` tables: who may create solutions online (subject `operator:<name>`).
    pub operators: Vec<OperatorConfig>,
    /// The `[cluster]` table: share state with other nodes through NATS JetStream (`None`:
    /// the embedded store, one node).
    pub cluster: Option<ClusterConfig>,
}

/// Prefix of the environment variables that override `[cluster]` fields.
pub const CLUSTER_ENV_PREFIX: &str = "THINGSGATE_CLUSTER_";

/// Cluster mode (DESIGN.md §6): the NATS servers and the stream the nodes share.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`); any of the NATS cluster's servers.
    pub urls: Vec<String>,
    /// The JetStream stream the nodes share (also its subjects' first token).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Replicas of the stream when a node creates it: 1, or 3 on a NATS cluster (R3 needs
    /// nats-server ≥ 2.9.21).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

fn default_stream() -> String {
    "THINGSGATE".to_owned()
}

fn default_replicas() -> usize {
    1
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.urls.is_empty() {
            return Err("`urls` needs at least one NATS URL (nats://host:port)".into());
        }
        for url in &self.urls {
            let rest = url.strip_prefix("nats://").unwrap_or(url);
            if rest.is_empty() || rest.contains(['/', ' ']) || !rest.contains(':') {
                return Err(format!("`{url}` is not a NATS URL (nats://host:port)"));
            }
        }
        let valid_stream = !self.stream.is_empty()
            && self.stream.len() <= 64
            && self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_stream {
            return Err(format!(
                "`{}` is not a stream name (1 to 64 of A-Z, a-z, 0-9, `-`, `_`)",
                self.stream
            ));
        }
        if !matches!(self.replicas, 1..=5) {
            return Err(format!("replicas must be 1 to 5, not {}", self.replicas));
        }
        Ok(())
    }

    /// Applies `THINGSGATE_CLUSTER_URLS`, `…_STREAM`, `…_REPLICAS` to `config` (creating the
    /// table if one is set: `urls` may then still be empty, to be given by `--cluster`); any
    /// other `THINGSGATE_CLUSTER_` variable is an error. Validated where it is used.
    pub fn apply_env(
        config: &mut Option<ClusterConfig>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(CLUSTER_ENV_PREFIX))
            .collect();
        if vars.is_empty() {
            return Ok(());
        }
        vars.sort();
        let c = config.get_or_insert_with(|| ClusterConfig {
            urls: Vec::new(),
            stream: default_stream(),
            replicas: default_replicas(),
        });
        for (var, value) in &vars {
            let env_error = |message: String| ConfigError::Env {
                var: var.clone(),
                message,
            };
            match var.strip_prefix(CLUSTER_ENV_PREFIX).unwrap_or_default() {
                "URLS" => c.urls = split_list(value),
                "STREAM" => c.stream = value.clone(),
                "REPLICAS" => {
                    c.replicas = value
                        .parse()
                        .map_err(|_| env_error(format!("`{value}` is not a number")))?;
                }
                _ => return Err(env_error("names no [cluster] field".into())),
            }
        }
        Ok(())
    }

    /// The cluster settings a command runs with: the file's (or none), the environment's
    /// overrides, then `--cluster URLS` (`flag`) replacing the URLs; checked.
    pub fn resolve(
        file: Option<ClusterConfig>,
        flag: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Option<ClusterConfig>> {
        let mut config = file;
        ClusterConfig::apply_env(&mut config, env)?;
        if let Some(urls) = flag {
            let urls = split_list(urls);
            match &mut config {
                Some(c) => c.urls = urls,
                None => {
                    config = Some(ClusterConfig {
                        urls,
                        stream: default_stream(),
                        replicas: default_replicas(),
                    });
                }
            }
        }
        if let Some(c) = &config {
            c.validate().map_err(|e| {
                anyhow::anyhow!(
                    "cluster settings (--cluster, [cluster], {CLUSTER_ENV_PREFIX}…): {e}"
                )
            })?;
        }
        Ok(config)
    }
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A configured operator: a name and the SHA-256 digest of its secret (never the secret).
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub name: String,
    pub secret_digest: crate::auth::secret::Digest,
}

/// A configured JWT issuer, validated.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// The subject prefix (`google` → `google:<sub>`).
    pub key: String,
    /// The exact `iss` claim of its tokens.
    pub issuer: String,
    /// Accepted `aud` values (a token needs one of them), unless `allow_any_audience`.
    pub audiences: Vec<String>,
    /// Skip the audience check: only for issuers that mint tokens for us alone.
    pub allow_any_audience: bool,
    /// Where the verification keys come from.
    pub jwks: JwksSource,
    /// The algorithm allow-list (asymmetric algorithms only).
    pub algorithms: Vec<Algorithm>,
    /// Clock-skew allowance for `exp` and `nbf`, in seconds.
    pub leeway_seconds: u64,
    /// Subject templates; each resolved value becomes `<key>:<value>`.
    pub auth_subjects: Vec<SubjectTemplate>,
    /// The claim naming the connection's solution (like Suite Auth's service-instance ID).
    pub solution_claim: Option<ClaimPath>,
}

/// Where an issuer's JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JWKS JSON file, re-read on [`crate::auth::jwt::Issuers::reload_jwks`] and
    /// [`crate::auth::jwt::Issuers::refresh_on_unknown_kid`].
    File(PathBuf),
    /// A JWKS fetched over HTTP(S) at start-up, periodically and on an unknown `kid`.
    Url(JwksUrl),
}

/// An issuer's `jwks_url` and how it is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl {
    /// An `http://` or `https://` URL with a host and no credentials.
    pub url: hyper::Uri,
    /// The time between two periodic fetches (`jwks_refresh_seconds`).
    pub refresh_interval: std::time::Duration,
    /// PEM certificates trusted for this URL besides the platform's roots (`jwks_ca_file`), e.g.
    /// a private CA of an on-premises identity provider.
    pub ca_file: Option<PathBuf>,
}

/// The configuration cannot be used. Every message names the file (or variable), the line and
/// column when the problem has one in the file (not for a value from the environment or a field
/// the file leaves out), and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("config file `{path}` is not valid{at}: {message}{}", at.excerpt())]
    Syntax {
        path: String,
        at: At,
        message: String,
    },
    #[error("config file `{path}`{at}: {field}: {message}{}", at.excerpt())]
    Invalid {
        path: String,
        at: At,
        field: String,
        message: String,
    },
    #[error("environment variable `{var}`: {message}")]
    Env { var: String, message: String },
}

/// A place in the config file: 1-based line and column (in characters), with the line's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
    /// The whole line, shown under the message with a caret at the column; `None` when the line
    /// holds a secret (credentials in a URL).
    pub text: Option<String>,
}

impl Position {
    /// The position of byte `offset` of `text` (clamped to its length).
    fn of(text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = text.get(..offset).unwrap_or_default();
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line_end = text
            .get(offset..)
            .and_then(|rest| rest.find('\n'))
            .map_or(text.len(), |i| offset + i);
        Position {
            line: before.matches('\n').count() + 1,
            column: before.get(line_start..).unwrap_or_default().chars().count() + 1,
            text: text
                .get(line_start..line_end)
                .map(|line| line.trim_end_matches('\r').to_owned()),
        }
    }
}

/// Where an error sits in the file, if it sits anywhere: displayed as `, line L, column C`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct At(pub Option<Position>);

impl At {
    /// The line of the file with a caret under the column, on lines of their own (or nothing).
    pub fn excerpt(&self) -> String {
        match &self.0 {
            None | Some(Position { text: None, .. }) => String::new(),
            Some(Position {
                line,
                column,
                text: Some(text),
            }) => {
                let number = line.to_string();
                let pad = " ".repeat(number.len());
                let caret = " ".repeat(column.saturating_sub(1));
                format!("\n {number} | {text}\n {pad} | {caret}^")
            }
        }
    }
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => Ok(()),
            Some(p) => write!(f, ", line {}, column {}", p.line, p.column),
        }
    }
}

/// One step of a path into the TOML document, to find where a value is.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    /// A key of a table (also tried with `-` for `_`, the spelling of serde aliases).
    Name(&'a str),
    /// An element of an array (of tables).
    Index(usize),
}

/// The config text and its name, for errors that point into it.
struct Source<'a> {
    path: &'a str,
    text: &'a str,
}

impl Source<'_> {
    /// Where the value at `keys` is; if the file leaves it out, where the nearest enclosing
    /// table or value is (e.g. the `[[issuer]]` header of an issuer missing a field). The text
    /// is parsed again (only when there is an error to report).
    fn locate(&self, keys: &[Key<'_>]) -> At {
        use toml::de::{DeTable, DeValue};
        let Ok(root) = DeTable::parse(self.text) else {
            return At(None);
        };
        let mut span: Option<std::ops::Range<usize>> = None;
        let mut value: Option<&DeValue<'_>> = None;
        for key in keys {
            let next = match (key, value) {
                (Key::Name(name), None) => find(root.get_ref(), name),
                (Key::Name(name), Some(DeValue::Table(table))) => find(table, name),
                (Key::Index(index), Some(DeValue::Array(array))) => array.get(*index),
                _ => None,
            };
            let Some(next) = next else { break };
            span = Some(next.span());
            value = Some(next.get_ref());
        }
        At(span.map(|span| Position::of(self.text, span.start)))
    }

    fn syntax(&self, error: &toml::de::Error) -> ConfigError {
        ConfigError::Syntax {
            path: self.path.to_owned(),
            at: At(error.span().map(|span| Position::of(self.text, span.start))),
            message: error.message().trim_end().to_owned(),
        }
    }
}

/// The value of `name` (or of its `-` spelling) in `table`.
fn find<'t, 'i>(
    table: &'t toml::de::DeTable<'i>,
    name: &str,
) -> Option<&'t toml::Spanned<toml::de::DeValue<'i>>> {
    let dashed = name.replace('_', "-");
    table
        .iter()
        .find(|(key, _)| key.get_ref() == name || key.get_ref() == &dashed)
        .map(|(_, value)| value)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, rename = "issuer")]
    issuers: Vec<RawIssuer>,
    #[serde(default)]
    mqtt: crate::limits::MqttSettings,
    #[serde(default, rename = "operator")]
    operators: Vec<RawOperator>,
    #[serde(default)]
    cluster: Option<ClusterConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    name: String,
    secret_sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    key: String,
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    allow_any_audience: bool,
    jwks_file: Option<String>,
    jwks_url: Option<String>,
    jwks_refresh_seconds: Option<u64>,
    jwks_ca_file: Option<String>,
    algorithms: Option<Vec<String>>,
    leeway_seconds: Option<u64>,
    #[serde(alias = "auth-subjects")]
    auth_subjects: Option<Vec<String>>,
    solution_claim: Option<String>,
}

/// The overridable issuer fields, as named in the file and (upper-cased) in variables.
const ISSUER_FIELDS: [&str; 11] = [
    "issuer",
    "audiences",
    "allow_any_audience",
    "jwks_file",
    "jwks_url",
    "jwks_refresh_seconds",
    "jwks_ca_file",
    "algorithms",
    "leeway_seconds",
    "auth_subjects",
    "solution_claim",
];

impl Config {
    /// Reads `path` and applies the process environment's overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Reads `path` and applies overrides from `env` (name, value pairs).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text, path, env)
    }

    /// Parses config text; `path` names the file in errors and anchors relative paths.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let source = Source {
            path: &display,
            text,
        };
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| source.syntax(&e))?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        let overridden = apply_env(&mut raw, env.iter().cloned())?;
        raw.mqtt.apply_env(env.iter().cloned()).map_err(|e| {
            if e.field.starts_with(crate::limits::MQTT_ENV_PREFIX) {
                return ConfigError::Env {
                    var: e.field,
                    message: e.message,
                };
            }
            mqtt_invalid(&source, &env, &e.field, None, e.message)
        })?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        let mut issuers: Vec<IssuerConfig> = Vec::with_capacity(raw.issuers.len());
        for (index, raw_issuer) in raw.issuers.into_iter().enumerate() {
            let site = Site {
                source: &source,
                index,
                key: raw_issuer.key.clone(),
                overridden: &overridden,
            };
            let issuer = validate_issuer(raw_issuer, &site, base_dir)?;
            if issuers.iter().any(|i| i.key == issuer.key) {
                return Err(site.invalid("key", "another issuer has the same key"));
            }
            if issuers
                .iter()
                .any(|i| env_key(&i.key) == env_key(&issuer.key))
            {
                return Err(site.invalid(
                    "key",
                    "another issuer's key maps to the same THINGSGATE_ISSUER_ variable name",
                ));
            }
            if issuers.iter().any(|i| i.issuer == issuer.issuer) {
                return Err(site.invalid("issuer", "another issuer has the same `iss`"));
            }
            issuers.push(issuer);
        }
        let mut operators: Vec<OperatorConfig> = Vec::with_capacity(raw.operators.len());
        for (index, raw_operator) in raw.operators.into_iter().enumerate() {
            let invalid = |field: &str, message: String| ConfigError::Invalid {
                path: source.path.to_owned(),
                at: source.locate(&[Key::Name("operator"), Key::Index(index), Key::Name(field)]),
                field: format!("operator.{field}"),
                message,
            };
            let name = raw_operator.name;
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid_name {
                return Err(invalid(
                    "name",
                    format!("`{name}` is not an operator name (1 to 64 of a-z, 0-9, `-`, `_`)"),
                ));
            }
            if operators.iter().any(|o| o.name == name) {
                return Err(invalid(
                    "name",
                    format!("another operator is named `{name}`"),
                ));
            }
            let secret_digest = crate::auth::secret::Digest::from_hex(&raw_operator.secret_sha256)
                .map_err(|_| {
                    invalid(
                        "secret_sha256",
                        "expected the SHA-256 of the operator's secret as 64 hex digits \
                         (`printf %s \"$SECRET\" | sha256sum`)"
                            .to_owned(),
                    )
                })?;
            operators.push(OperatorConfig {
                name,
                secret_digest,
            });
        }
        let mut cluster = raw.cluster;
        if let Some(c) = &cluster {
            c.validate().map_err(|message| ConfigError::Invalid {
                path: source.path.to_owned(),
                at: source.locate(&[Key::Name("cluster")]),
                field: "cluster".to_owned(),
                message,
            })?;
        }
        ClusterConfig::apply_env(&mut cluster, env.iter().cloned())?;
        Ok(Config {
            issuers,
            mqtt: raw.mqtt,
            base_dir: base_dir.to_path_buf(),
            operators,
            cluster,
        })
    }
}

/// `thingsgate config check FILE`: everything `serve` would refuse at start-up because of the
/// file, found without starting it: the file read and validated with the environment's
/// overrides ([`Config::parse`]), then every listen address resolved, the TLS certificate and
/// key loaded (when both are set) and every issuer's JWKS file read and parsed. Returns notes
/// on what was not checked (a `jwks_url` is fetched only by `serve`). The crypto provider must
/// be installed ([`crate::auth::jwt::install_crypto_provider`]).
pub fn check(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: display.clone(),
        error,
    })?;
    let env: Vec<(String, String)> = env.into_iter().collect();
    let config = Config::parse(&text, path, env.iter().cloned())?;
    let source = Source {
        path: &display,
        text: &text,
    };
    for (index, address) in config.mqtt.listen.iter().enumerate() {
        check_address(address)
            .map_err(|m| mqtt_invalid(&source, &env, "listen", Some(index), m))?;
    }
    if let Some(address) = &config.mqtt.tls_listen {
        check_address(address).map_err(|m| mqtt_invalid(&source, &env, "tls_listen", None, m))?;
    }
    if let (Some(cert), Some(key)) = (&config.mqtt.tls_cert_file, &config.mqtt.tls_key_file) {
        use crate::mqtt::server::{TlsError, tls_acceptor};
        if let Err(e) = tls_acceptor(&config.base_dir.join(cert), &config.base_dir.join(key)) {
            let field = match e {
                TlsError::Key { .. } => "tls_key_file",
                TlsError::Certificate { .. } | TlsError::Config(_) => "tls_cert_file",
            };
            return Err(mqtt_invalid(&source, &env, field, None, e.to_string()));
        }
    }
    let mut notes = Vec::new();
    for (index, issuer) in config.issuers.iter().enumerate() {
        let overridden = ISSUER_FIELDS
            .iter()
            .filter(|f| {
                let var = issuer_env_var(&issuer.key, f);
                env.iter().any(|(name, _)| *name == var)
            })
            .map(|f| (index, *f))
            .collect();
        let site = Site {
            source: &source,
            index,
            key: issuer.key.clone(),
            overridden: &overridden,
        };
        match &issuer.jwks {
            JwksSource::File(_) => {
                crate::auth::jwt::Issuers::from_config(std::slice::from_ref(issuer))
                    .map_err(|e| site.invalid("jwks_file", e.to_string()))?;
            }
            JwksSource::Url(jwks) => notes.push(format!(
                "issuer `{}`: jwks_url `{}` is fetched when `serve` starts, not checked here",
                issuer.key, jwks.url
            )),
        }
    }
    Ok(notes)
}

/// A listen address `serve` can bind: `HOST:PORT` that resolves.
fn check_address(address: &str) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    match address.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!("`{address}` resolves to no address")),
        Err(e) => Err(format!(
            "`{address}` is not a listen address (HOST:PORT): {e}"
        )),
    }
}

/// A bad `[mqtt]` value (element `index` of a list field), located in the file unless `env`
/// set it.
fn mqtt_invalid(
    source: &Source<'_>,
    env: &[(String, String)],
    field: &str,
    index: Option<usize>,
    message: String,
) -> ConfigError {
    let var = mqtt_env_var(field);
    let (at, from_env) = if env.iter().any(|(name, _)| *name == var) {
        (At(None), format!(" (set by {var})"))
    } else {
        let mut keys = vec![Key::Name("mqtt"), Key::Name(field)];
        keys.extend(index.map(Key::Index));
        (source.locate(&keys), String::new())
    };
    ConfigError::Invalid {
        path: source.path.to_owned(),
        at,
        field: format!("[mqtt] field `{field}`{from_env}"),
        message,
    }
}

/// The environment-variable form of an issuer key: `my-idp` → `MY_IDP`.
pub fn env_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The variable that overrides `field` of the issuer with `key`.
pub fn issuer_env_var(key: &str, field: &str) -> String {
    format!(
        "{ISSUER_ENV_PREFIX}{}_{}",
        env_key(key),
        field.to_ascii_uppercase()
    )
}

/// The variable that overrides `field` of `[mqtt]`.
fn mqtt_env_var(field: &str) -> String {
    format!(
        "{}{}",
        crate::limits::MQTT_ENV_PREFIX,
        field.to_ascii_uppercase()
    )
}

/// Applies `THINGSGATE_ISSUER_…` overrides; returns `(issuer index, field)` pairs it set, so that
/// errors can say where a bad value came from.
fn apply_env(
    raw: &mut RawConfig,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<HashSet<(usize, &'static str)>, ConfigError> {
    let mut overridden = HashSet::new();
    for (var, value) in env {
        if !var.starts_with(ISSUER_ENV_PREFIX) {
            continue;
        }
        let target = raw.issuers.iter_mut().enumerate().find_map(|(i, issuer)| {
            ISSUER_FIELDS
                .iter()
                .find(|f| issuer_env_var(&issuer.key, f) == var)
                .map(|f| (i, *f, issuer))
        });
        let Some((index, field, issuer)) = target else {
            return Err(ConfigError::Env {
                var,
                message: "names no field of a configured issuer \
                          (THINGSGATE_ISSUER_<KEY>_<FIELD>)"
                    .to_owned(),
            });
        };
        let env_error = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let list = || -> Vec<String> {
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let text = || Some(value.clone()).filter(|v| !v.is_empty());
        match field {
            "issuer" => issuer.issuer = value.clone(),
            "audiences" => issuer.audiences = list(),
            "allow_any_audience" => {
                issuer.allow_any_audience = match value.trim() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    other => return Err(env_error(format!("`{other}` is not true or false"))),
                }
            }
            "jwks_file" => issuer.jwks_file = text(),
            "jwks_url" => issuer.jwks_url = text(),
            "jwks_refresh_seconds" => {
                issuer.jwks_refresh_seconds = Some(value.trim().parse().map_err(|_| {
                    env_error(format!("`{value}` is not a whole number of seconds"))
                })?)
            }
            "jwks_ca_file" => issuer.jwks_ca_file = text(),
            "algorithms" => issuer.algorithms = Some(list()),
            "leeway_seconds" => {
                issuer.leeway_seconds = Some(value.trim().parse().map_err(|_| {
                    env_error(format!("`{value}` is not a whole number of seconds"))
                })?)
            }
            "auth_subjects" => issuer.auth_subjects = Some(list()),
            "solution_claim" => issuer.solution_claim = text(),
            _ => {}
        }
        overridden.insert((index, field));
    }
    Ok(overridden)
}

/// Where a value sits, for error messages.
struct Site<'a> {
    source: &'a Source<'a>,
    index: usize,
    key: String,
    overridden: &'a HashSet<(usize, &'static str)>,
}

impl Site<'_> {
    fn invalid(&self, field: &'static str, message: impl Into<String>) -> ConfigError {
        self.invalid_at(field, message, true)
    }

    /// As [`Site::invalid`], without quoting the line: the value holds a secret.
    fn invalid_unquoted(&self, field: &'static str, message: impl Into<String>) -> ConfigError {
        self.invalid_at(field, message, false)
    }

    fn invalid_at(
        &self,
        field: &'static str,
        message: impl Into<String>,
        quote: bool,
    ) -> ConfigError {
        let (at, from_env) = if self.overridden.contains(&(self.index, field)) {
            (
                At(None),
                format!(" (set by {})", issuer_env_var(&self.key, field)),
            )
        } else {
            let keys = [
                Key::Name("issuer"),
                Key::Index(self.index),
                Key::Name(field),
            ];
            let mut at = self.source.locate(&keys);
            if let (false, Some(position)) = (quote, &mut at.0) {
                position.text = None;
            }
            (at, String::new())
        };
        ConfigError::Invalid {
            path: self.source.path.to_owned(),
            at,
            field: format!(
                "[[issuer]] #{} (key `{}`) field `{field}`{from_env}",
                self.index + 1,
                self.key
            ),
            message: message.into(),
        }
    }
}

fn validate_issuer(
    raw: RawIssuer,
    site: &Site<'_>,
    base_dir: &Path,
) -> Result<IssuerConfig, ConfigError> {
    let key = raw.key.trim().to_owned();
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(site.invalid(
            "key",
            format!("`{key}` must be non-empty ASCII letters, digits, `-`, `_` or `.`"),
        ));
    }
    if RESERVED_KEYS.contains(&key.as_str()) {
        return Err(site.invalid(
            "key",
            format!("`{key}` is reserved for subjects of another credential kind"),
        ));
    }
    if raw.issuer.trim().is_empty() {
        return Err(site.invalid("issuer", "must not be empty"));
    }
    let audiences: Vec<String> = raw
        .audiences
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect();
    match (audiences.is_empty(), raw.allow_any_audience) {
        (true, false) => {
            return Err(site.invalid(
                "audiences",
                "list at least one audience (or set `allow_any_audience = true` to skip the check)",
            ));
        }
        (false, true) => {
            return Err(site.invalid(
                "allow_any_audience",
                "`audiences` are listed: remove them or `allow_any_audience`",
            ));
        }
        _ => {}
    }
    let jwks = match (raw.jwks_file, raw.jwks_url) {
        (Some(file), None) if !file.is_empty() => {
            if raw.jwks_refresh_seconds.is_some() {
                return Err(site.invalid("jwks_refresh_seconds", "only applies to `jwks_url`"));
            }
            if raw.jwks_ca_file.is_some() {
                return Err(site.invalid("jwks_ca_file", "only applies to `jwks_url`"));
            }
            JwksSource::File(base_dir.join(file))
        }
        (None, Some(url)) => {
            // A URL with `@` may hold credentials: its line is not quoted.
            let url = parse_jwks_url(&url).map_err(|m| match url.contains('@') {
                true => site.invalid_unquoted("jwks_url", m),
                false => site.invalid("jwks_url", m),
            })?;
            let refresh_seconds = raw
                .jwks_refresh_seconds
                .unwrap_or(DEFAULT_JWKS_REFRESH_SECONDS);
            if !(MIN_JWKS_REFRESH_SECONDS..=MAX_JWKS_REFRESH_SECONDS).contains(&refresh_seconds) {
                return Err(site.invalid(
                    "jwks_refresh_seconds",
                    format!(
                        "{refresh_seconds} is not between {MIN_JWKS_REFRESH_SECONDS} and \
                         {MAX_JWKS_REFRESH_SECONDS}"
                    ),
                ));
            }
            let ca_file = match raw.jwks_ca_file {
                Some(file) if file.is_empty() => {
                    return Err(site.invalid("jwks_ca_file", "must not be empty"));
                }
                file => file.map(|f| base_dir.join(f)),
            };
            JwksSource::Url(JwksUrl {
                url,
                refresh_interval: std::time::Duration::from_secs(refresh_seconds),
                ca_file,
            })
        }
        (Some(_), Some(_)) => {
            return Err(site.invalid("jwks_file", "set `jwks_file` or `jwks_url`, not both"));
        }
        _ => {
            return Err(site.invalid("jwks_file", "missing: set `jwks_file` or `jwks_url`"));
        }
    };
    let algorithms = match raw.algorithms {
        None => DEFAULT_ALGORITHMS.to_vec(),
        Some(names) => {
            if names.is_empty() {
                return Err(site.invalid("algorithms", "must list at least one algorithm"));
            }
            let mut algorithms = Vec::with_capacity(names.len());
            for name in &names {
                let alg = parse_algorithm(name).map_err(|m| site.invalid("algorithms", m))?;
                if !algorithms.contains(&alg) {
                    algorithms.push(alg);
                }
            }
            algorithms
        }
    };
    let leeway_seconds = raw.leeway_seconds.unwrap_or(DEFAULT_LEEWAY_SECONDS);
    if leeway_seconds > MAX_LEEWAY_SECONDS {
        return Err(site.invalid(
            "leeway_seconds",
            format!("{leeway_seconds} is more than {MAX_LEEWAY_SECONDS}"),
        ));
    }
    let auth_subjects = match raw.auth_subjects {
        None => vec![SubjectTemplate::sub()],
        Some(templates) if templates.is_empty() => {
            return Err(site.invalid("auth_subjects", "must list at least one template"));
        }
        Some(templates) => templates
            .iter()
            .map(|t| {
                SubjectTemplate::from_str(t)
                    .map_err(|e| site.invalid("auth_subjects", format!("`{t}`: {e}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let solution_claim = raw
        .solution_claim
        .map(|c| {
            ClaimPath::parse(&c).map_err(|e| site.invalid("solution_claim", format!("`{c}`: {e}")))
        })
        .transpose()?;
    Ok(IssuerConfig {
        key,
        issuer: raw.issuer,
        audiences,
        allow_any_audience: raw.allow_any_audience,
        jwks,
        algorithms,
        leeway_seconds,
        auth_subjects,
        solution_claim,
    })
}

/// A `jwks_url`: `http://` or `https://`, with a host and without credentials (they would end
/// up in logs and error messages).
fn parse_jwks_url(text: &str) -> Result<hyper::Uri, String> {
    let not_http = || format!("`{text}` is not an http:// or https:// URL");
    let url: hyper::Uri = text.trim().parse().map_err(|_| not_http())?;
    if !matches!(url.scheme_str(), Some("http" | "https")) {
        return Err(not_http());
    }
    match url.authority() {
        None => Err(format!("`{text}` has no host")),
        // Not echoed: the URL holds a secret.
        Some(authority) if authority.as_str().contains('@') => {
            Err("holds credentials (`user:password@`): a JWKS URL must not".to_owned())
        }
        Some(authority) if authority.host().is_empty() => Err(format!("`{text}` has no host")),
        Some(_) => Ok(url),
    }
}

/// An allowed algorithm name: asymmetric only.
fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    if name.eq_ignore_ascii_case("none") {
        return Err("`none` (unsigned tokens) is never allowed".to_owned());
    }
    if name.to_ascii_uppercase().starts_with("HS") {
        return Err(format!(
            "`{name}` is symmetric (a shared secret): only RS*, PS*, ES256, ES384 and EdDSA \
             can be verified with an issuer's public keys"
        ));
    }
    Algorithm::from_str(name).map_err(|_| {
        format!("unknown algorithm `{name}` (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[issuer]]
        key = "google"
        issuer = "https://accounts.google.com"
        audiences = ["thingsgate"]
        jwks_file = "jwks.json"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/tg/config.toml"), Vec::new())
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_apply_to_a_minimal_issuer() {
        let config = parse(GOOD).unwrap();
        let [issuer] = config.issuers.as_slice() else {
            panic!("one issuer expected")
        };
        assert_eq!(issuer.key, "google");
        assert_eq!(issuer.algorithms, DEFAULT_ALGORITHMS);
        assert_eq!(issuer.leeway_seconds, 30);
        assert_eq!(issuer.auth_subjects, [SubjectTemplate::sub()]);
        assert_eq!(
            issuer.jwks,
            JwksSource::File(PathBuf::from("/etc/tg/jwks.json"))
        );
        assert!(issuer.solution_claim.is_none());
    }

    #[test]
    fn an_empty_file_has_no_issuers() {
        assert!(parse("").unwrap().issuers.is_empty());
    }

    #[test]
    fn audiences_are_required_unless_any_audience_is_allowed() {
        let text = GOOD.replace(r#"audiences = ["thingsgate"]"#, "");
        let message = error(&text);
        assert!(message.contains("field `audiences`"), "{message}");
        let allowed = text.replace("jwks_file", "allow_any_audience = true\njwks_file");
        assert!(parse(&allowed).unwrap().issuers[0].allow_any_audience);
    }

    #[test]
    fn reserved_keys_are_refused() {
        let message = error(&GOOD.replace(r#""google""#, r#""iot-things""#));
        assert!(message.contains("reserved"), "{message}");
    }

    #[test]
    fn duplicate_keys_and_issuers_are_refused() {
        let twice = format!("{GOOD}{GOOD}");
        assert!(error(&twice).contains("same key"));
        let other_key = format!("{GOOD}{}", GOOD.replace(r#""google""#, r#""g2""#));
        assert!(error(&other_key).contains("same `iss`"));
    }

    fn with_url(url_lines: &str) -> String {
        GOOD.replace(r#"jwks_file = "jwks.json""#, url_lines)
    }

    #[test]
    fn jwks_url_takes_defaults_and_resolves_the_ca_file() {
        let config = parse(&with_url(r#"jwks_url = "https://idp.test/jwks""#)).unwrap();
        let JwksSource::Url(jwks) = &config.issuers[0].jwks else {
            panic!("a URL source expected")
        };
        assert_eq!(jwks.url, "https://idp.test/jwks");
        assert_eq!(
            jwks.refresh_interval,
            std::time::Duration::from_secs(DEFAULT_JWKS_REFRESH_SECONDS)
        );
        assert_eq!(jwks.ca_file, None);

        let text = with_url(
            "jwks_url = \"http://127.0.0.1:8080/keys\"\n\
             jwks_refresh_seconds = 60\njwks_ca_file = \"ca.pem\"",
        );
        let config = parse(&text).unwrap();
        let JwksSource::Url(jwks) = &config.issuers[0].jwks else {
            panic!("a URL source expected")
        };
        assert_eq!(jwks.refresh_interval, std::time::Duration::from_secs(60));
        assert_eq!(jwks.ca_file, Some(PathBuf::from("/etc/tg/ca.pem")));
    }

    #[test]
    fn jwks_url_must_be_http_or_https_with_a_host() {
        for url in [
            "ftp://idp.test/jwks",
            "idp.test/jwks",
            "file:///etc/jwks.json",
            "",
        ] {
            let message = error(&with_url(&format!("jwks_url = \"{url}\"")));
            assert!(message.contains("field `jwks_url`"), "{message}");
            assert!(
                message.contains("is not an http:// or https:// URL")
                    || message.contains("has no host"),
                "{message}"
            );
        }
        let message = error(&with_url(r#"jwks_url = "ftp://idp.test/jwks""#));
        assert!(
            message.contains("`ftp://idp.test/jwks` is not an http:// or https:// URL"),
            "{message}"
        );
        let message = error(&with_url(r#"jwks_url = "https://user:pw@idp.test/jwks""#));
        assert!(message.contains("credentials"), "{message}");
        assert!(!message.contains("pw"), "{message}");
    }

    #[test]
    fn jwks_refresh_seconds_is_bounded() {
        let text = with_url("jwks_url = \"https://idp.test/jwks\"\njwks_refresh_seconds = 5");
        let message = error(&text);
        assert!(
            message.contains("field `jwks_refresh_seconds`"),
            "{message}"
        );
        assert!(message.contains("between 10 and 86400"), "{message}");
        let text = with_url("jwks_url = \"https://idp.test/jwks\"\njwks_refresh_seconds = 10");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn url_options_without_jwks_url_are_refused() {
        let message = error(&format!("{GOOD}jwks_refresh_seconds = 60\n"));
        assert!(
            message.contains("field `jwks_refresh_seconds`"),
            "{message}"
        );
        assert!(message.contains("only applies to `jwks_url`"), "{message}");
        let message = error(&format!("{GOOD}jwks_ca_file = \"ca.pem\"\n"));
        assert!(message.contains("field `jwks_ca_file`"), "{message}");
        let both = format!("{GOOD}jwks_url = \"https://idp.test/jwks\"\n");
        assert!(error(&both).contains("not both"));
    }

    #[test]
    fn jwks_url_fields_can_be_set_from_the_environment() {
        let env = [
            ("THINGSGATE_ISSUER_GOOGLE_JWKS_FILE", ""),
            ("THINGSGATE_ISSUER_GOOGLE_JWKS_URL", "https://idp.test/jwks"),
            ("THINGSGATE_ISSUER_GOOGLE_JWKS_REFRESH_SECONDS", "120"),
            ("THINGSGATE_ISSUER_GOOGLE_JWKS_CA_FILE", "/ca/idp.pem"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::parse(GOOD, Path::new("/etc/tg/config.toml"), env).unwrap();
        let JwksSource::Url(jwks) = &config.issuers[0].jwks else {
            panic!("a URL source expected")
        };
        assert_eq!(jwks.url, "https://idp.test/jwks");
        assert_eq!(jwks.refresh_interval, std::time::Duration::from_secs(120));
        assert_eq!(jwks.ca_file, Some(PathBuf::from("/ca/idp.pem")));

        let env = [("THINGSGATE_ISSUER_GOOGLE_JWKS_REFRESH_SECONDS", "often")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let message = Config::parse(GOOD, Path::new("/etc/tg/config.toml"), env)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("THINGSGATE_ISSUER_GOOGLE_JWKS_REFRESH_SECONDS"),
            "{message}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let message = error(&GOOD.replace("jwks_file", "jwks_fil"));
        assert!(message.contains("jwks_fil"), "{message}");
    }

    #[test]
    fn bad_templates_and_leeway_name_the_field() {
        let text = format!("{GOOD}auth_subjects = [\"{{{{ jwt:sub\"]\n");
        assert!(error(&text).contains("field `auth_subjects`"));
        let text = format!("{GOOD}leeway_seconds = 3600\n");
        assert!(error(&text).contains("field `leeway_seconds`"));
    }

    /// The `(line, column)` an error points at, if any.
    fn position(error: &ConfigError) -> Option<(usize, usize)> {
        match error {
            ConfigError::Syntax { at, .. } | ConfigError::Invalid { at, .. } => {
                at.0.as_ref().map(|p| (p.line, p.column))
            }
            _ => None,
        }
    }

    #[test]
    fn an_invalid_value_is_located_at_its_line_and_column() {
        let text = format!("# issuers\n{GOOD}algorithms = [\"RS256\", \"HS256\"]\n");
        let e = parse(&text).unwrap_err();
        // GOOD starts with a newline and indents by 8: line 8, after `    algorithms = `.
        assert_eq!(position(&e), Some((8, 18)), "{e}");
        let message = e.to_string();
        assert!(
            message.starts_with("config file `/etc/tg/config.toml`, line 8, column 18: "),
            "{message}"
        );
        assert!(message.contains("field `algorithms`"), "{message}");
        assert!(message.contains("`HS256` is symmetric"), "{message}");
        assert!(
            message.ends_with("algorithms = [\"RS256\", \"HS256\"]\n   |                  ^"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_field_points_at_its_table() {
        let text = format!("{GOOD}{}", GOOD.replace(r#""google""#, r#""g2""#))
            .replacen("jwks_file = \"jwks.json\"", "", 2)
            .replacen("https://accounts.google.com", "https://other", 1);
        let e = parse(&text).unwrap_err();
        assert_eq!(position(&e), Some((2, 9)), "{e}");
        assert!(e.to_string().contains("`jwks_file` or `jwks_url`"), "{e}");
    }

    #[test]
    fn the_second_issuer_is_located_in_its_own_table() {
        let second = GOOD
            .replace(r#""google""#, r#""g2""#)
            .replace("https://accounts.google.com", "https://other");
        let text = format!("{GOOD}{second}leeway_seconds = 301\n");
        let e = parse(&text).unwrap_err();
        assert_eq!(position(&e), Some((13, 22)), "{e}");
        assert!(e.to_string().contains("#2 (key `g2`)"), "{e}");
    }

    #[test]
    fn syntax_errors_unknown_keys_and_wrong_types_are_located() {
        let e = parse("[mqtt]\nmax_inflight = \"many\"\n").unwrap_err();
        assert_eq!(position(&e), Some((2, 16)), "{e}");
        assert!(e.to_string().contains("expected u16"), "{e}");
        let e = parse("\n\n[mqtt]\nmax_inflite = 3\n").unwrap_err();
        assert_eq!(position(&e), Some((4, 1)), "{e}");
        assert!(e.to_string().contains("unknown field `max_inflite`"), "{e}");
        let e = parse("[mqtt\n").unwrap_err();
        assert_eq!(position(&e).map(|(line, _)| line), Some(1), "{e}");
        let e = parse("unknown = 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `unknown`"), "{e}");
        assert_eq!(position(&e), Some((1, 1)), "{e}");
    }

    #[test]
    fn mqtt_values_are_located_unless_the_environment_set_them() {
        let text = "[mqtt]\nmax_packet_size = 10\n";
        let e = parse(text).unwrap_err();
        assert_eq!(position(&e), Some((2, 19)), "{e}");
        assert!(
            e.to_string().contains("[mqtt] field `max_packet_size`"),
            "{e}"
        );
        let env =
            [("THINGSGATE_MQTT_MAX_INFLIGHT", "0")].map(|(k, v)| (k.to_owned(), v.to_owned()));
        let e = Config::parse("", Path::new("c.toml"), env).unwrap_err();
        assert_eq!(position(&e), None, "{e}");
        assert!(
            e.to_string()
                .contains("`max_inflight` (set by THINGSGATE_MQTT_MAX_INFLIGHT)"),
            "{e}"
        );
        let env =
            [("THINGSGATE_MQTT_MAX_INFLIGHT", "lots")].map(|(k, v)| (k.to_owned(), v.to_owned()));
        let e = Config::parse("", Path::new("c.toml"), env).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("environment variable `THINGSGATE_MQTT_MAX_INFLIGHT`"),
            "{e}"
        );
    }

    #[test]
    fn an_issuer_value_from_the_environment_is_not_located_in_the_file() {
        let env = [("THINGSGATE_ISSUER_GOOGLE_LEEWAY_SECONDS", "999")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let e = Config::parse(GOOD, Path::new("c.toml"), env).unwrap_err();
        assert_eq!(position(&e), None, "{e}");
        assert!(
            e.to_string()
                .contains("(set by THINGSGATE_ISSUER_GOOGLE_LEEWAY_SECONDS)"),
            "{e}"
        );
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let p = Position::of("a = \"é\"\nb = 1\n", 12);
        assert_eq!((p.line, p.column), (2, 4));
        assert_eq!(p.text.as_deref(), Some("b = 1"));
        let p = Position::of("é = 1", 3);
        assert_eq!((p.line, p.column), (1, 3));
        let p = Position::of("x", 99);
        assert_eq!((p.line, p.column), (1, 2));
    }

    /// The fields a table accepts, as serde names them when refusing an unknown one: derived
    /// from the struct itself, so a new field shows up here without anyone listing it.
    fn accepted_fields(toml_with_unknown_field: &str) -> Vec<String> {
        let message = toml::from_str::<RawConfig>(toml_with_unknown_field)
            .unwrap_err()
            .message()
            .to_owned();
        let (_, expected) = message.split_once("expected").unwrap();
        let fields: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        assert!(fields.len() > 1, "{message}");
        fields
    }

    /// The rows (`| `field` | …`) of the section of `docs/configuration.md` whose heading
    /// starts with `heading`, by field.
    fn documented(doc: &str, heading: &str) -> std::collections::BTreeMap<String, String> {
        let (_, section) = doc.split_once(&format!("\n## {heading}")).unwrap();
        let section = section.split("\n## ").next().unwrap();
        section
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("| `")?;
                let (field, _) = rest.split_once('`')?;
                Some((field.to_owned(), line.to_owned()))
            })
            .collect()
    }

    #[test]
    fn every_config_field_is_documented_with_its_environment_variable() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
        let doc = std::fs::read_to_string(path).unwrap();

        let tables = accepted_fields("no_such_table = 1");
        assert_eq!(
            tables,
            ["issuer", "mqtt", "operator", "cluster"],
            "a new top-level table needs a section"
        );
        let cluster = accepted_fields("[cluster]\nno_such_field = 1");
        let rows = documented(&doc, "`[cluster]`");
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            cluster
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            "the [cluster] rows of docs/configuration.md and the fields of ClusterConfig"
        );
        for field in &cluster {
            let var = format!("`{CLUSTER_ENV_PREFIX}{}`", field.to_ascii_uppercase());
            assert!(rows[field].contains(&var), "{field}: {var}");
        }
        let operator = accepted_fields("[[operator]]\nno_such_field = 1");
        let rows = documented(&doc, "`[[operator]]`");
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            operator.iter().collect::<Vec<_>>(),
            "the [[operator]] rows of docs/configuration.md and the fields of RawOperator"
        );

        let mqtt = accepted_fields("[mqtt]\nno_such_field = 1");
        let rows = documented(&doc, "`[mqtt]`");
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            mqtt.iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            "the [mqtt] rows of docs/configuration.md and the fields of MqttSettings"
        );
        for field in &mqtt {
            let var = mqtt_env_var(field);
            assert!(rows[field].contains(&format!("`{var}`")), "{field}: {var}");
            // The variable exists: a value it cannot take is refused for its own reason,
            // not as an unknown field.
            let e = crate::limits::MqttSettings::default()
                .apply_env([(var.clone(), "x".to_owned())])
                .err();
            assert!(
                e.is_none_or(|e| !e.message.contains("names no field")),
                "{var} is not read"
            );
        }

        let accepted = accepted_fields("[[issuer]]\nno_such_field = 1");
        let rows = documented(&doc, "`[[issuer]]`");
        // Aliases (Ditto's `auth-subjects`) are named in their field's row.
        let (aliases, issuer): (Vec<String>, Vec<String>) =
            accepted.into_iter().partition(|f| f.contains('-'));
        for alias in &aliases {
            let field = alias.replace('-', "_");
            assert!(rows[&field].contains(&format!("`{alias}`")), "{alias}");
        }
        let mut sorted = issuer.clone();
        sorted.sort();
        assert_eq!(
            rows.keys().collect::<Vec<_>>(),
            sorted.iter().collect::<Vec<_>>(),
            "the [[issuer]] rows of docs/configuration.md and the fields of RawIssuer"
        );
        for field in issuer.iter().filter(|f| *f != "key") {
            assert!(
                ISSUER_FIELDS.contains(&field.as_str()),
                "`{field}` has no THINGSGATE_ISSUER_ override"
            );
            let var = format!("`THINGSGATE_ISSUER_<KEY>_{}`", field.to_ascii_uppercase());
            assert!(rows[field].contains(&var), "{field}: {var}");
        }

        // The complete example parses.
        let (_, example) = doc.split_once("## A complete example").unwrap();
        let (_, example) = example.split_once("```toml\n").unwrap();
        let (example, _) = example.split_once("```").unwrap();
        let config = parse(example).unwrap();
        assert_eq!(config.issuers.len(), 2);
    }

    #[test]
    fn env_key_replaces_non_alphanumerics() {
        assert_eq!(env_key("my-idp.eu"), "MY_IDP_EU");
        assert_eq!(
            issuer_env_var("google", "leeway_seconds"),
            "THINGSGATE_ISSUER_GOOGLE_LEEWAY_SECONDS"
        );
    }
}
