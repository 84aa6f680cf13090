//! JSON Web Tokens from configured issuers (DESIGN.md §1 "Subjects", §2): which issuer, which key,
//! whether the token holds now, and the subjects and solution it stands for.
//!
//! # How a token is checked
//! 1. Size and shape: three base64url parts, a JSON header and a JSON object payload.
//! 2. Header: `alg: none` and the symmetric `HS*` algorithms are refused before anything else
//!    (no issuer is ever configured with a shared secret, so an `HS*` token can only be an
//!    attempt to use a public key as an HMAC secret); a `crit` header is refused (we understand no
//!    extension).
//! 3. The unverified payload is read **only** to route by `iss` to a configured issuer.
//! 4. `alg` must be in that issuer's allow-list and fit the key selected by `kid` (RSA for `RS*`/
//!    `PS*`, P-256 for `ES256`, P-384 for `ES384`, Ed25519 for `EdDSA`; a key whose JWK names an
//!    `alg` only verifies that one). Without `kid` the issuer must have exactly one key.
//! 5. The signature is verified with the key parsed once at load time.
//! 6. Claims: `exp` required, `exp`/`nbf` with the issuer's leeway, `aud` against its audiences.
//! 7. Subjects from the issuer's templates, each prefixed `<key>:`; the solution from its solution
//!    claim.
//!
//! Refusals are values ([`JwtRefusal`]) for metrics and debug logs; nothing here logs or returns
//! a token or key material.
//!
//! # Where keys come from
//! An issuer's JWKS is a file or an `http(s)://` URL ([`JwksSource`]). [`Issuers::load`] reads
//! or fetches every JWKS before the broker accepts a connection; a URL that cannot be fetched
//! then is an error. Afterwards keys are replaced whole, while [`Issuers::validate`] keeps
//! running on other threads with the set it cloned (validation never does I/O):
//! - every `jwks_refresh_seconds`, URLs are fetched again ([`Issuers::spawn_refresher`]);
//! - after [`JwtRefusal::UnknownKid`] (a key rotation), [`Issuers::refresh_on_unknown_kid`]
//!   re-reads files and re-fetches URLs, at most once per issuer per minimum reload interval,
//!   so a flood of invented `kid`s costs the identity provider one request per interval;
//!   concurrent callers share the fetch in flight.
//!
//! A failed refresh keeps the previous keys (logged as a warning). Fetches trust the platform's
//! root certificates plus the issuer's `jwks_ca_file`, use aws-lc-rs (DESIGN.md §9), follow no
//! redirects, and are bounded: [`JWKS_CONNECT_TIMEOUT`], [`JWKS_FETCH_TIMEOUT`],
//! [`MAX_JWKS_BYTES`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{IssuerConfig, JwksSource, JwksUrl};

/// Longest token accepted, in bytes. Large enough for identity-provider tokens with group lists,
/// small enough that a hostile client cannot make us decode megabytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Most subjects one token may produce (array claims multiply): beyond this the token is refused
/// rather than letting a claim with thousands of elements blow up every policy check.
pub const MAX_SUBJECTS: usize = 256;

/// Default for the least time between two JWKS reloads of one issuer.
pub const DEFAULT_MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// How long opening the TCP connection to a JWKS URL may take.
pub const JWKS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one JWKS fetch may take in all: connection, TLS handshake, request and whole body.
/// A hanging identity provider must not hold a refresh (and the connections waiting on it) long.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest JWKS body accepted. Real ones are a few KiB; the cap keeps a misbehaving server
/// from filling our memory.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The least time between two periodic fetches, whatever an [`IssuerConfig`] built by hand says
/// (the config file allows no less than 10 s).
const MIN_REFRESH_PERIOD: Duration = Duration::from_millis(100);

/// Makes sure jsonwebtoken uses the aws-lc-rs backend (DESIGN.md §9). jsonwebtoken 12 picks it
/// from the crate features when exactly one backend is enabled, and panics at first use when it
/// cannot; installing it explicitly at start-up turns a misbuilt binary into an error here instead.
/// Idempotent.
pub fn install_crypto_provider() -> Result<(), CryptoProviderMissing> {
    // An `Err` only says a provider is already installed: the check below decides.
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    match CryptoProvider::try_get_default() {
        Some(_) => Ok(()),
        None => Err(CryptoProviderMissing),
    }
}

/// jsonwebtoken has no crypto backend (a build with the wrong features).
#[derive(Debug, thiserror::Error)]
#[error("jsonwebtoken has no crypto provider (build must enable exactly the `aws_lc_rs` feature)")]
pub struct CryptoProviderMissing;

/// Why a token was refused. A value, for metrics labels ([`JwtRefusal::as_str`]) and debug logs;
/// callers answer "not authorized" without saying which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtRefusal {
    /// Longer than [`MAX_TOKEN_LEN`].
    TooLarge,
    /// Not three base64url parts with a JSON header and a JSON object payload.
    Malformed,
    /// `alg: none` (an unsigned token).
    AlgNone,
    /// `HS256`/`HS384`/`HS512`: never accepted (no shared secrets; the classic attack signs with
    /// the issuer's public key as HMAC secret).
    SymmetricAlgorithm,
    /// An `alg` jsonwebtoken does not know.
    UnsupportedAlgorithm,
    /// A `crit` header: extensions we do not understand must not be ignored (RFC 7515 §4.1.11).
    UnsupportedCriticalHeader,
    /// No `iss` claim (or not a string).
    MissingIssuer,
    /// `iss` names no configured issuer.
    UnknownIssuer,
    /// `alg` is not in the issuer's allow-list.
    AlgorithmNotAllowed,
    /// No `kid`, and the issuer has several keys.
    MissingKid,
    /// `kid` names no key of the issuer: the caller may [`Issuers::refresh_on_unknown_kid`] and,
    /// if that returns `true`, validate once more.
    UnknownKid,
    /// `alg` does not fit the selected key's type (or the `alg` its JWK names).
    AlgorithmKeyMismatch,
    /// The signature does not verify (tampered or forged token).
    BadSignature,
    /// No `exp` claim.
    MissingExpiry,
    /// `exp` (plus leeway) has passed.
    Expired,
    /// `nbf` (minus leeway) is still ahead.
    NotYetValid,
    /// The issuer checks audiences and the token has no `aud`.
    MissingAudience,
    /// None of the token's audiences is configured for the issuer.
    WrongAudience,
    /// `exp`, `nbf` or `aud` has the wrong JSON type.
    InvalidClaim,
    /// The issuer's solution claim is present but not a non-empty string.
    InvalidSolutionClaim,
    /// No subject template could be resolved.
    NoSubjects,
    /// The templates produce more than [`MAX_SUBJECTS`] subjects.
    TooManySubjects,
}

impl JwtRefusal {
    /// A stable snake_case name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtRefusal::TooLarge => "too_large",
            JwtRefusal::Malformed => "malformed",
            JwtRefusal::AlgNone => "alg_none",
            JwtRefusal::SymmetricAlgorithm => "symmetric_algorithm",
            JwtRefusal::UnsupportedAlgorithm => "unsupported_algorithm",
            JwtRefusal::UnsupportedCriticalHeader => "unsupported_critical_header",
            JwtRefusal::MissingIssuer => "missing_issuer",
            JwtRefusal::UnknownIssuer => "unknown_issuer",
            JwtRefusal::AlgorithmNotAllowed => "algorithm_not_allowed",
            JwtRefusal::MissingKid => "missing_kid",
            JwtRefusal::UnknownKid => "unknown_kid",
            JwtRefusal::AlgorithmKeyMismatch => "algorithm_key_mismatch",
            JwtRefusal::BadSignature => "bad_signature",
            JwtRefusal::MissingExpiry => "missing_expiry",
            JwtRefusal::Expired => "expired",
            JwtRefusal::NotYetValid => "not_yet_valid",
            JwtRefusal::MissingAudience => "missing_audience",
            JwtRefusal::WrongAudience => "wrong_audience",
            JwtRefusal::InvalidClaim => "invalid_claim",
            JwtRefusal::InvalidSolutionClaim => "invalid_solution_claim",
            JwtRefusal::NoSubjects => "no_subjects",
            JwtRefusal::TooManySubjects => "too_many_subjects",
        }
    }
}

impl fmt::Display for JwtRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for JwtRefusal {}

/// Who a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIdentity {
    /// The configured issuer's key (the subject prefix, e.g. `google`).
    pub issuer: String,
    /// `<key>:<value>` per resolved template value, in template order, without duplicates.
    pub subjects: Vec<String>,
    /// The value of the issuer's solution claim, when configured and present.
    pub solution: Option<String>,
    /// `exp`: the connection is closed at this instant (DESIGN.md §2). Leeway is not added.
    pub expires_at: SystemTime,
}

/// A JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("issuer `{issuer}`: cannot read JWKS file `{path}`: {source}")]
    Read {
        issuer: String,
        path: String,
        source: std::io::Error,
    },
    #[error("issuer `{issuer}`: JWKS file `{path}`: {message}")]
    Invalid {
        issuer: String,
        path: String,
        message: String,
    },
    #[error("issuer `{issuer}`: JWKS URL `{url}`: {source}")]
    Fetch {
        issuer: String,
        url: String,
        source: FetchError,
    },
    #[error("issuer `{issuer}`: jwks_ca_file `{path}`: {message}")]
    CaFile {
        issuer: String,
        path: String,
        message: String,
    },
    #[error("issuer `{issuer}`: cannot set up TLS for JWKS URL `{url}`: {message}")]
    Tls {
        issuer: String,
        url: String,
        message: String,
    },
    #[error(
        "issuer `{issuer}`: a JWKS URL is fetched at start-up: use `Issuers::load`, not `from_config`"
    )]
    UrlNeedsAsyncLoad { issuer: String },
    #[error(transparent)]
    CryptoProvider(#[from] CryptoProviderMissing),
}

/// Why fetching a JWKS URL failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// A status other than 2xx (redirects are not followed).
    #[error("HTTP status {0}")]
    Status(hyper::StatusCode),
    /// No complete answer within [`JWKS_FETCH_TIMEOUT`].
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    /// The body is larger than [`MAX_JWKS_BYTES`].
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    /// Connecting, TLS (e.g. an untrusted certificate) or HTTP failed; the whole cause chain.
    #[error("{0}")]
    Transport(String),
    /// The body is not a JWKS we accept.
    #[error("not a usable JWKS: {0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------------------------
// Subject templates
// ---------------------------------------------------------------------------------------------

/// A claim path such as `sub` or `extra/roles` (`/` walks into objects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(Vec<String>);

impl ClaimPath {
    /// Parses `a/b/c`; empty segments are refused.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TemplateError::EmptyClaimPath);
        }
        let segments: Vec<String> = text.split('/').map(str::to_owned).collect();
        if segments.iter().any(|s| s.is_empty() || s.trim() != s) {
            return Err(TemplateError::BadClaimPath(text.to_owned()));
        }
        Ok(ClaimPath(segments))
    }

    fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        let mut segments = self.0.iter();
        let first = segments.next()?;
        let mut value = claims.get(first)?;
        for segment in segments {
            value = value.as_object()?.get(segment)?;
        }
        Some(value)
    }
}

impl fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

/// A subject template is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("empty template")]
    Empty,
    #[error("`{{{{` without a closing `}}}}`")]
    Unclosed,
    #[error("placeholder `{0}` is not supported (only `{{{{ jwt:<claim path> }}}}`)")]
    UnknownPlaceholder(String),
    #[error("placeholder functions (`|`) are not supported yet: `{0}`")]
    Pipeline(String),
    #[error("empty claim path")]
    EmptyClaimPath,
    #[error("bad claim path `{0}` (segments separated by `/`, none empty)")]
    BadClaimPath(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Claim(ClaimPath),
}

/// An `auth_subjects` template: literal text and Ditto-style `{{ jwt:<claim path> }}`
/// placeholders, e.g. `{{ jwt:sub }}@{{ jwt:azp }}`. Compiled once at config load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    source: String,
    parts: Vec<TemplatePart>,
}

impl SubjectTemplate {
    /// The default template: the `sub` claim.
    pub fn sub() -> Self {
        SubjectTemplate {
            source: "{{ jwt:sub }}".to_owned(),
            parts: vec![TemplatePart::Claim(ClaimPath(vec!["sub".to_owned()]))],
        }
    }

    /// The template as written in the config.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Every value of the template for these claims (the cartesian product of its array claims),
    /// or nothing when a placeholder cannot be resolved (missing claim, object, null, empty
    /// string, empty array). Stops at `limit` values and returns `false` when more would follow.
    fn expand(&self, claims: &Map<String, Value>, limit: usize, out: &mut Vec<String>) -> bool {
        let mut partial: Vec<String> = vec![String::new()];
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => partial.iter_mut().for_each(|p| p.push_str(text)),
                TemplatePart::Claim(path) => {
                    let values = match path.lookup(claims) {
                        Some(value) => claim_strings(value),
                        None => Vec::new(),
                    };
                    if values.is_empty() {
                        return true;
                    }
                    if partial.len().saturating_mul(values.len()) > limit {
                        return false;
                    }
                    partial = partial
                        .iter()
                        .flat_map(|p| values.iter().map(move |v| format!("{p}{v}")))
                        .collect();
                }
            }
        }
        if out.len().saturating_add(partial.len()) > limit {
            return false;
        }
        out.extend(partial.into_iter().filter(|s| !s.is_empty()));
        true
    }
}

impl FromStr for SubjectTemplate {
    type Err = TemplateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            let (literal, tail) = rest.split_at(start);
            if !literal.is_empty() {
                parts.push(TemplatePart::Literal(literal.to_owned()));
            }
            let tail = tail.get(2..).unwrap_or_default();
            let Some(end) = tail.find("}}") else {
                return Err(TemplateError::Unclosed);
            };
            let (inner, after) = tail.split_at(end);
            let inner = inner.trim();
            if inner.contains('|') {
                return Err(TemplateError::Pipeline(inner.to_owned()));
            }
            let Some(path) = inner.strip_prefix("jwt:") else {
                return Err(TemplateError::UnknownPlaceholder(inner.to_owned()));
            };
            parts.push(TemplatePart::Claim(ClaimPath::parse(path)?));
            rest = after.get(2..).unwrap_or_default();
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        Ok(SubjectTemplate {
            source: text.to_owned(),
            parts,
        })
    }
}

/// The strings a claim value stands for: a scalar is one, an array is one per scalar element;
/// objects, null and empty strings stand for nothing.
fn claim_strings(value: &Value) -> Vec<String> {
    fn scalar(value: &Value) -> Option<String> {
        match value {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    match value {
        Value::Array(items) => items.iter().filter_map(scalar).collect(),
        other => scalar(other).into_iter().collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// What a JWKS key can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyType {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyType {
    fn fits(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                KeyType::Rsa,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (KeyType::EcP256, Algorithm::ES256)
                | (KeyType::EcP384, Algorithm::ES384)
                | (KeyType::Ed25519, Algorithm::EdDSA)
        )
    }
}

/// One verification key, parsed once when the JWKS is loaded.
struct VerifyingKey {
    kid: Option<String>,
    key_type: KeyType,
    /// The JWK's own `alg`, when it names one: the key then verifies only that algorithm.
    alg: Option<Algorithm>,
    decoding: DecodingKey,
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("key_type", &self.key_type)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The keys of one issuer as last loaded.
#[derive(Debug)]
struct KeySet {
    keys: Vec<VerifyingKey>,
    /// The accepted JWK objects, to tell whether a reload changed anything.
    jwks: Vec<Value>,
}

impl KeySet {
    fn select(&self, kid: Option<&str>) -> Result<&VerifyingKey, JwtRefusal> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or(JwtRefusal::UnknownKid),
            None => match self.keys.as_slice() {
                [only] => Ok(only),
                [] => Err(JwtRefusal::UnknownKid),
                _ => Err(JwtRefusal::MissingKid),
            },
        }
    }
}

/// Parses a JWKS document into verification keys. Keys marked `"use": "enc"` are skipped;
/// symmetric (`oct`) keys, unsupported curves and duplicate `kid`s are errors (a misconfigured
/// JWKS should be fixed, not half-used).
fn parse_jwks(text: &str) -> Result<KeySet, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Some(items) = doc.get("keys").and_then(Value::as_array) else {
        return Err("no `keys` array".to_owned());
    };
    let mut keys = Vec::with_capacity(items.len());
    let mut jwks = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        if item.get("use").and_then(Value::as_str) == Some("enc") {
            continue;
        }
        let key = parse_jwk(item).map_err(|m| format!("key #{index}: {m}"))?;
        if let Some(kid) = &key.kid
            && keys
                .iter()
                .any(|k: &VerifyingKey| k.kid.as_deref() == Some(kid))
        {
            return Err(format!("key #{index}: duplicate kid `{kid}`"));
        }
        keys.push(key);
        jwks.push(item.clone());
    }
    Ok(KeySet { keys, jwks })
}

fn parse_jwk(item: &Value) -> Result<VerifyingKey, String> {
    let jwk = Jwk::deserialize(item).map_err(|e| format!("not a supported JWK: {e}"))?;
    let key_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyType::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match &p.curve {
            EllipticCurve::P256 => KeyType::EcP256,
            EllipticCurve::P384 => KeyType::EcP384,
            other => return Err(format!("unsupported EC curve {other:?}")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match &p.curve {
            EllipticCurve::Ed25519 => KeyType::Ed25519,
            other => return Err(format!("unsupported OKP curve {other:?}")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (`oct`) keys are not accepted".to_owned());
        }
        _ => return Err("unsupported key type".to_owned()),
    };
    let alg = match item.get("alg").and_then(Value::as_str) {
        None => None,
        Some(name) => {
            let alg = Algorithm::from_str(name).map_err(|_| format!("unknown alg `{name}`"))?;
            if !key_type.fits(alg) {
                return Err(format!("alg `{name}` does not fit the key type"));
            }
            Some(alg)
        }
    };
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
    Ok(VerifyingKey {
        kid: jwk.common.key_id.clone(),
        key_type,
        alg,
        decoding,
    })
}

// ---------------------------------------------------------------------------------------------
// Issuers
// ---------------------------------------------------------------------------------------------

/// One configured issuer with its current keys.
#[derive(Debug)]
struct Issuer {
    config: IssuerConfig,
    source: KeySource,
    keys: RwLock<Arc<KeySet>>,
    /// When the JWKS was last (re)loaded, for rate-limiting reloads.
    loaded_at: Mutex<Instant>,
    /// Bumped whenever `keys` is replaced, so that a caller that waited for another's refresh
    /// learns whether the keys changed meanwhile.
    generation: AtomicU64,
    /// Held during a refresh: concurrent callers (a flood of unknown `kid`s) wait for the fetch
    /// in flight instead of starting their own.
    refreshing: tokio::sync::Mutex<()>,
}

impl Issuer {
    fn loaded(config: &IssuerConfig, source: KeySource, keys: KeySet) -> Self {
        tracing::info!(
            issuer = %config.key,
            keys = keys.keys.len(),
            jwks = %source,
            "JWT issuer loaded"
        );
        Issuer {
            config: config.clone(),
            source,
            keys: RwLock::new(Arc::new(keys)),
            loaded_at: Mutex::new(Instant::now()),
            generation: AtomicU64::new(0),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn current_keys(&self) -> Arc<KeySet> {
        // A poisoned lock still holds a complete `Arc` (it is only ever swapped whole).
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Starts a reload unless the last one is less than `min_interval` ago.
    fn claim_reload(&self, min_interval: Duration) -> bool {
        let mut loaded_at = self.loaded_at.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.saturating_duration_since(*loaded_at) < min_interval {
            return false;
        }
        *loaded_at = now;
        true
    }

    /// Replaces the keys if they differ from the current ones; returns whether they did.
    fn install(&self, keys: KeySet) -> bool {
        if keys.jwks == self.current_keys().jwks {
            return false;
        }
        tracing::info!(issuer = %self.config.key, keys = keys.keys.len(), "JWKS changed");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Reads or fetches the JWKS again and installs it; returns whether the keys changed. With
    /// `min_interval`, does nothing if the last reload is more recent. A failure keeps the
    /// previous keys and is logged.
    async fn refresh(&self, min_interval: Option<Duration>) -> bool {
        let seen = self.generation.load(Ordering::Acquire);
        let _refreshing = self.refreshing.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            // Another caller's refresh replaced the keys while this one waited.
            return true;
        }
        match min_interval {
            Some(min_interval) if !self.claim_reload(min_interval) => return false,
            Some(_) => {}
            None => *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now(),
        }
        match self.source.load(&self.config.key).await {
            Ok(keys) => self.install(keys),
            Err(error) => {
                tracing::warn!(
                    issuer = %self.config.key,
                    %error,
                    "JWKS refresh failed; keeping the previous keys"
                );
                false
            }
        }
    }
}

/// Where an issuer's keys are loaded from.
#[derive(Debug)]
enum KeySource {
    File(PathBuf),
    Url(Box<UrlSource>),
}

impl KeySource {
    /// Prepares the source (for a URL: its HTTP client and trusted roots); loads nothing yet.
    fn new(
        config: &IssuerConfig,
        native_roots: &mut Option<Vec<CertificateDer<'static>>>,
    ) -> Result<Self, JwksError> {
        match &config.jwks {
            JwksSource::File(path) => Ok(KeySource::File(path.clone())),
            JwksSource::Url(jwks) => {
                if jwks.url.scheme_str() == Some("http") {
                    tracing::warn!(
                        issuer = %config.key,
                        url = %jwks.url,
                        "JWKS fetched over plain http: anyone on the path can replace the keys"
                    );
                }
                let roots = native_roots.get_or_insert_with(load_native_roots);
                Ok(KeySource::Url(Box::new(UrlSource {
                    url: jwks.url.clone(),
                    refresh_interval: jwks.refresh_interval,
                    client: https_client(&config.key, jwks, roots)?,
                })))
            }
        }
    }

    async fn load(&self, issuer: &str) -> Result<KeySet, JwksError> {
        match self {
            // A small local file: read in place rather than on a blocking thread.
            KeySource::File(path) => load_jwks_file(issuer, path),
            KeySource::Url(source) => source.fetch().await.map_err(|error| JwksError::Fetch {
                issuer: issuer.to_owned(),
                url: source.url.to_string(),
                source: error,
            }),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(path) => write!(f, "{}", path.display()),
            KeySource::Url(source) => write!(f, "{}", source.url),
        }
    }
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A JWKS URL with the client that fetches it (one per issuer: trusted roots differ).
#[derive(Debug)]
struct UrlSource {
    url: hyper::Uri,
    refresh_interval: Duration,
    client: HttpsClient,
}

impl UrlSource {
    async fn fetch(&self) -> Result<KeySet, FetchError> {
        let body = tokio::time::timeout(JWKS_FETCH_TIMEOUT, self.fetch_body())
            .await
            .map_err(|_| FetchError::Timeout(JWKS_FETCH_TIMEOUT))??;
        let text = std::str::from_utf8(&body)
            .map_err(|_| FetchError::Invalid("the body is not UTF-8".to_owned()))?;
        parse_jwks(text).map_err(FetchError::Invalid)
    }

    async fn fetch_body(&self) -> Result<Bytes, FetchError> {
        let request = hyper::Request::get(self.url.clone())
            .header(
                hyper::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .header(
                hyper::header::USER_AGENT,
                concat!("thingsgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| FetchError::Transport(error_chain(&e)))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| FetchError::Transport(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status(status));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    FetchError::TooLarge(MAX_JWKS_BYTES)
                } else {
                    FetchError::Transport(error_chain(e.as_ref()))
                }
            })?;
        Ok(body.to_bytes())
    }
}

/// An error with its causes, `: `-separated (hyper's own message is only "client error
/// (Connect)"; the cause says "invalid peer certificate: UnknownIssuer").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The platform's trusted root certificates (what hyper-rustls's `native-tokio` reads). None
/// found is not an error here: an issuer may bring its own in `jwks_ca_file`.
fn load_native_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(%error, "a platform root certificate could not be loaded");
    }
    found.certs
}

/// The HTTP(S) client of one JWKS URL: rustls with aws-lc-rs, the platform's roots plus the
/// issuer's `jwks_ca_file`, HTTP/1.1, a connect timeout, no kept-alive connections (a fetch
/// every few minutes gains nothing from them).
fn https_client(
    issuer: &str,
    jwks: &JwksUrl,
    native_roots: &[CertificateDer<'static>],
) -> Result<HttpsClient, JwksError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(native_roots.iter().cloned());
    if let Some(path) = &jwks.ca_file {
        let ca_error = |message: String| JwksError::CaFile {
            issuer: issuer.to_owned(),
            path: path.display().to_string(),
            message,
        };
        let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        let mut found = 0_usize;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| ca_error(format!("not valid PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ca_error(format!("not a usable certificate: {e}")))?;
            found += 1;
        }
        if found == 0 {
            return Err(ca_error("holds no `CERTIFICATE` PEM block".to_owned()));
        }
    }
    let tls_error = |message: String| JwksError::Tls {
        issuer: issuer.to_owned(),
        url: jwks.url.to_string(),
        message,
    };
    if roots.is_empty() && jwks.url.scheme_str() == Some("https") {
        return Err(tls_error(
            "no trusted root certificates: the platform has none and no `jwks_ca_file` is set"
                .to_owned(),
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    // The TLS layer above handles `https`; without this the plain connector refuses it.
    http.enforce_http(false);
    http.set_connect_timeout(Some(JWKS_CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https))
}

fn load_jwks_file(issuer: &str, path: &Path) -> Result<KeySet, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        issuer: issuer.to_owned(),
        path: path.display().to_string(),
        source,
    })?;
    parse_jwks(&text).map_err(|message| JwksError::Invalid {
        issuer: issuer.to_owned(),
        path: path.display().to_string(),
        message,
    })
}

/// The configured JWT issuers, routed by `iss`. Shared by every connection (`Arc<Issuers>`):
/// validation only takes a read lock to clone the current key set, which refreshes replace
/// whole.
#[derive(Debug)]
pub struct Issuers {
    issuers: Vec<Issuer>,
    by_iss: HashMap<String, usize>,
    min_reload_interval: Duration,
}

/// The JOSE header fields we read.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

impl Issuers {
    /// Reads every issuer's JWKS file; an issuer with a `jwks_url` is an error
    /// ([`JwksError::UrlNeedsAsyncLoad`]): use [`Issuers::load`]. Installs the crypto provider if
    /// needed.
    pub fn from_config(configs: &[IssuerConfig]) -> Result<Self, JwksError> {
        install_crypto_provider()?;
        let mut issuers = Vec::with_capacity(configs.len());
        for config in configs {
            let JwksSource::File(path) = &config.jwks else {
                return Err(JwksError::UrlNeedsAsyncLoad {
                    issuer: config.key.clone(),
                });
            };
            let keys = load_jwks_file(&config.key, path)?;
            issuers.push(Issuer::loaded(config, KeySource::File(path.clone()), keys));
        }
        Ok(Self::from_issuers(issuers))
    }

    /// Reads every issuer's JWKS file and fetches every JWKS URL (one after the other, each
    /// within [`JWKS_FETCH_TIMEOUT`]). Any failure is an error naming the issuer and the file or
    /// URL: the broker should not start with an issuer whose tokens it cannot check. Installs
    /// the crypto provider if needed.
    pub async fn load(configs: &[IssuerConfig]) -> Result<Self, JwksError> {
        install_crypto_provider()?;
        let mut native_roots = None;
        let mut issuers = Vec::with_capacity(configs.len());
        for config in configs {
            let source = KeySource::new(config, &mut native_roots)?;
            let keys = source.load(&config.key).await?;
            issuers.push(Issuer::loaded(config, source, keys));
        }
        Ok(Self::from_issuers(issuers))
    }

    fn from_issuers(issuers: Vec<Issuer>) -> Self {
        let by_iss = issuers
            .iter()
            .enumerate()
            .map(|(index, issuer)| (issuer.config.issuer.clone(), index))
            .collect();
        Issuers {
            issuers,
            by_iss,
            min_reload_interval: DEFAULT_MIN_RELOAD_INTERVAL,
        }
    }

    /// Changes the least time between two reloads of one issuer's JWKS (default 10 s).
    pub fn with_min_reload_interval(mut self, interval: Duration) -> Self {
        self.min_reload_interval = interval;
        self
    }

    /// The number of configured issuers.
    pub fn len(&self) -> usize {
        self.issuers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Re-reads the JWKS file of every file issuer not reloaded within the minimum interval (and
    /// not being refreshed right now); returns whether any issuer's keys changed. A file that
    /// cannot be read or parsed leaves that issuer's keys as they were (logged as a warning).
    /// Synchronous, so URL issuers are left to [`Issuers::refresh_on_unknown_kid`] and
    /// [`Issuers::spawn_refresher`].
    pub fn reload_jwks(&self) -> bool {
        let mut changed = false;
        for issuer in &self.issuers {
            let KeySource::File(path) = &issuer.source else {
                continue;
            };
            let Ok(_refreshing) = issuer.refreshing.try_lock() else {
                continue;
            };
            if !issuer.claim_reload(self.min_reload_interval) {
                continue;
            }
            match load_jwks_file(&issuer.config.key, path) {
                Ok(keys) => changed |= issuer.install(keys),
                Err(error) => {
                    tracing::warn!(
                        issuer = %issuer.config.key,
                        %error,
                        "JWKS reload failed; keeping the previous keys"
                    );
                }
            }
        }
        changed
    }

    /// Called by a connection whose token was refused with [`JwtRefusal::UnknownKid`] (the
    /// identity provider may have rotated its keys): re-reads JWKS files and re-fetches JWKS
    /// URLs of every issuer not reloaded within the minimum interval; returns whether any
    /// issuer's keys changed, in which case the caller validates the token once more. Callers
    /// arriving while a refresh is in flight wait for it and share its outcome; a failed
    /// refresh keeps the previous keys (logged as a warning) and returns `false`.
    pub async fn refresh_on_unknown_kid(&self) -> bool {
        let mut changed = false;
        for issuer in &self.issuers {
            changed |= issuer.refresh(Some(self.min_reload_interval)).await;
        }
        changed
    }

    /// Starts a task that fetches every JWKS URL again each `jwks_refresh_seconds` of its
    /// issuer (file issuers are reloaded on demand only). A failed fetch keeps the previous keys
    /// and logs a warning; the next one comes a full interval later. Runs until the returned
    /// handle is aborted (at shutdown). Must be called within a Tokio runtime.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let issuers = Arc::clone(self);
        tokio::spawn(async move {
            let mut loops = tokio::task::JoinSet::new();
            for index in 0..issuers.issuers.len() {
                let issuers = Arc::clone(&issuers);
                loops.spawn(async move { issuers.refresh_periodically(index).await });
            }
            // Aborting this task drops the set, which aborts every loop.
            while loops.join_next().await.is_some() {}
        })
    }

    /// The refresh loop of the issuer at `index`; returns at once for a file issuer.
    async fn refresh_periodically(&self, index: usize) {
        let Some(issuer) = self.issuers.get(index) else {
            return;
        };
        let KeySource::Url(source) = &issuer.source else {
            return;
        };
        let period = source.refresh_interval.max(MIN_REFRESH_PERIOD);
        loop {
            tokio::time::sleep(period).await;
            issuer.refresh(None).await;
        }
    }

    /// Validates a token at `now` (see the module documentation for the order of checks).
    pub fn validate(&self, token: &str, now: SystemTime) -> Result<JwtIdentity, JwtRefusal> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtRefusal::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtRefusal::Malformed);
        };
        let header: Header = decode_json_part(header_b64)?;
        let alg = match header.alg.as_str() {
            "none" | "None" | "NONE" => return Err(JwtRefusal::AlgNone),
            "HS256" | "HS384" | "HS512" => return Err(JwtRefusal::SymmetricAlgorithm),
            name => Algorithm::from_str(name).map_err(|_| JwtRefusal::UnsupportedAlgorithm)?,
        };
        if header.crit.is_some() {
            return Err(JwtRefusal::UnsupportedCriticalHeader);
        }
        // Unverified: only to route to an issuer. Nothing is trusted before the signature.
        let claims: Map<String, Value> = decode_json_part(payload_b64)?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(JwtRefusal::MissingIssuer)?;
        let issuer = self
            .by_iss
            .get(iss)
            .and_then(|&i| self.issuers.get(i))
            .ok_or(JwtRefusal::UnknownIssuer)?;
        let config = &issuer.config;
        if !config.algorithms.contains(&alg) {
            return Err(JwtRefusal::AlgorithmNotAllowed);
        }
        let keys = issuer.current_keys();
        let key = keys.select(header.kid.as_deref())?;
        if !key.key_type.fits(alg) || key.alg.is_some_and(|a| a != alg) {
            return Err(JwtRefusal::AlgorithmKeyMismatch);
        }
        let signed_len = header_b64.len() + 1 + payload_b64.len();
        let message = token.get(..signed_len).ok_or(JwtRefusal::Malformed)?;
        match jsonwebtoken::crypto::verify(signature_b64, message.as_bytes(), &key.decoding, alg) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(JwtRefusal::BadSignature),
        }

        let now = unix_seconds(now);
        let leeway = i64::try_from(config.leeway_seconds).unwrap_or(i64::MAX);
        let exp = match claims.get("exp") {
            None => return Err(JwtRefusal::MissingExpiry),
            Some(value) => numeric_date(value)?,
        };
        if now >= exp.saturating_add(leeway) {
            return Err(JwtRefusal::Expired);
        }
        if let Some(value) = claims.get("nbf")
            && now.saturating_add(leeway) < numeric_date(value)?
        {
            return Err(JwtRefusal::NotYetValid);
        }
        if !config.allow_any_audience {
            check_audience(claims.get("aud"), &config.audiences)?;
        }

        let solution = match &config.solution_claim {
            None => None,
            Some(path) => match path.lookup(&claims) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(_) => return Err(JwtRefusal::InvalidSolutionClaim),
            },
        };
        let mut values = Vec::new();
        for template in &config.auth_subjects {
            if !template.expand(&claims, MAX_SUBJECTS, &mut values) {
                return Err(JwtRefusal::TooManySubjects);
            }
        }
        let mut subjects: Vec<String> = Vec::with_capacity(values.len());
        for value in values {
            let subject = format!("{}:{value}", config.key);
            if !subjects.contains(&subject) {
                subjects.push(subject);
            }
        }
        if subjects.is_empty() {
            return Err(JwtRefusal::NoSubjects);
        }
        let expires_at = u64::try_from(exp)
            .ok()
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
            .unwrap_or(UNIX_EPOCH);
        Ok(JwtIdentity {
            issuer: config.key.clone(),
            subjects,
            solution,
            expires_at,
        })
    }
}

fn decode_json_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, JwtRefusal> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtRefusal::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtRefusal::Malformed)
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// A NumericDate (RFC 7519 §2): seconds since the epoch, possibly fractional (rounded down).
fn numeric_date(value: &Value) -> Result<i64, JwtRefusal> {
    let Value::Number(n) = value else {
        return Err(JwtRefusal::InvalidClaim);
    };
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    match n.as_f64() {
        // Rounded down; `as` saturates values beyond the i64 range.
        Some(f) if f.is_finite() => Ok(f.floor() as i64),
        _ => Err(JwtRefusal::InvalidClaim),
    }
}

fn check_audience(aud: Option<&Value>, accepted: &[String]) -> Result<(), JwtRefusal> {
    let accepted_one = |a: &Value| match a {
        Value::String(s) => Ok(accepted.iter().any(|x| x == s)),
        _ => Err(JwtRefusal::InvalidClaim),
    };
    let found = match aud {
        None | Some(Value::Null) => return Err(JwtRefusal::MissingAudience),
        Some(Value::Array(items)) if items.is_empty() => return Err(JwtRefusal::MissingAudience),
        Some(Value::Array(items)) => {
            let mut found = false;
            for item in items {
                found |= accepted_one(item)?;
            }
            found
        }
        Some(other) => accepted_one(other)?,
    };
    if found {
        Ok(())
    } else {
        Err(JwtRefusal::WrongAudience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("claims must be an object"),
        }
    }

    fn expand(template: &str, value: Value) -> Vec<String> {
        let template: SubjectTemplate = template.parse().unwrap();
        let mut out = Vec::new();
        assert!(template.expand(&claims(value), MAX_SUBJECTS, &mut out));
        out
    }

    #[test]
    fn sub_template_gives_the_subject() {
        assert_eq!(expand("{{ jwt:sub }}", json!({"sub": "alice"})), ["alice"]);
        assert_eq!(expand("{{jwt:sub}}", json!({"sub": "alice"})), ["alice"]);
    }

    #[test]
    fn literal_text_surrounds_placeholders() {
        assert_eq!(
            expand(
                "{{ jwt:sub }}@{{ jwt:azp }}",
                json!({"sub": "alice", "azp": "app"})
            ),
            ["alice@app"]
        );
        assert_eq!(
            expand("user-{{ jwt:sub }}!", json!({"sub": "a"})),
            ["user-a!"]
        );
    }

    #[test]
    fn array_claim_expands_to_one_value_per_element() {
        assert_eq!(
            expand("group/{{ jwt:groups }}", json!({"groups": ["a", "b", 3]})),
            ["group/a", "group/b", "group/3"]
        );
    }

    #[test]
    fn two_array_claims_give_their_cartesian_product() {
        assert_eq!(
            expand(
                "{{ jwt:sub }}/{{ jwt:scp }}@{{ jwt:cid }}",
                json!({"sub": "s", "scp": ["r", "w"], "cid": ["x", "y"]})
            ),
            ["s/r@x", "s/r@y", "s/w@x", "s/w@y"]
        );
    }

    #[test]
    fn nested_claim_path_walks_into_objects() {
        assert_eq!(
            expand(
                "{{ jwt:extra/roles }}",
                json!({"extra": {"roles": ["admin"]}})
            ),
            ["admin"]
        );
    }

    #[test]
    fn unresolvable_template_gives_nothing() {
        for value in [
            json!({}),
            json!({"azp": null}),
            json!({"azp": {}}),
            json!({"azp": []}),
            json!({"azp": ""}),
        ] {
            let mut input = claims(value);
            input.insert("sub".into(), json!("alice"));
            let template: SubjectTemplate = "{{ jwt:sub }}@{{ jwt:azp }}".parse().unwrap();
            let mut out = Vec::new();
            assert!(template.expand(&input, MAX_SUBJECTS, &mut out));
            assert!(out.is_empty(), "{input:?} gave {out:?}");
        }
    }

    #[test]
    fn expansion_beyond_the_limit_is_reported() {
        let many: Vec<u32> = (0..20).collect();
        let template: SubjectTemplate = "{{ jwt:a }}{{ jwt:b }}".parse().unwrap();
        let mut out = Vec::new();
        assert!(!template.expand(&claims(json!({"a": many, "b": many})), 256, &mut out));
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert_eq!(
            "{{ jwt:sub".parse::<SubjectTemplate>(),
            Err(TemplateError::Unclosed)
        );
        assert!(matches!(
            "{{ header:x }}".parse::<SubjectTemplate>(),
            Err(TemplateError::UnknownPlaceholder(_))
        ));
        assert!(matches!(
            "{{ jwt:scope | fn:split(' ') }}".parse::<SubjectTemplate>(),
            Err(TemplateError::Pipeline(_))
        ));
        assert!(matches!(
            "{{ jwt:a//b }}".parse::<SubjectTemplate>(),
            Err(TemplateError::BadClaimPath(_))
        ));
        assert_eq!("  ".parse::<SubjectTemplate>(), Err(TemplateError::Empty));
    }

    #[test]
    fn audience_accepts_a_string_or_an_array_containing_a_configured_one() {
        let accepted = vec!["things".to_owned()];
        assert_eq!(check_audience(Some(&json!("things")), &accepted), Ok(()));
        assert_eq!(
            check_audience(Some(&json!(["other", "things"])), &accepted),
            Ok(())
        );
        assert_eq!(
            check_audience(Some(&json!(["other"])), &accepted),
            Err(JwtRefusal::WrongAudience)
        );
        assert_eq!(
            check_audience(None, &accepted),
            Err(JwtRefusal::MissingAudience)
        );
        assert_eq!(
            check_audience(Some(&json!(7)), &accepted),
            Err(JwtRefusal::InvalidClaim)
        );
    }

    #[test]
    fn numeric_dates_may_be_fractional() {
        assert_eq!(numeric_date(&json!(10)), Ok(10));
        assert_eq!(numeric_date(&json!(10.9)), Ok(10));
        assert_eq!(numeric_date(&json!("10")), Err(JwtRefusal::InvalidClaim));
    }

    #[test]
    fn jwks_with_a_symmetric_key_is_refused() {
        let err = parse_jwks(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"a"}]}"#).unwrap_err();
        assert!(err.contains("symmetric"), "{err}");
    }

    #[test]
    fn jwks_without_keys_array_is_refused() {
        assert!(parse_jwks("{}").is_err());
        assert!(parse_jwks("not json").is_err());
    }

    #[test]
    fn refusal_names_are_stable() {
        assert_eq!(JwtRefusal::UnknownKid.as_str(), "unknown_kid");
        assert_eq!(JwtRefusal::AlgNone.to_string(), "alg_none");
    }
}
