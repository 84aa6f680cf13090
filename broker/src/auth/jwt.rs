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

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{IssuerConfig, JwksSource};

/// Longest token accepted, in bytes. Large enough for identity-provider tokens with group lists,
/// small enough that a hostile client cannot make us decode megabytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Most subjects one token may produce (array claims multiply): beyond this the token is refused
/// rather than letting a claim with thousands of elements blow up every policy check.
pub const MAX_SUBJECTS: usize = 256;

/// Default for the least time between two JWKS reloads of one issuer.
pub const DEFAULT_MIN_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

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
    /// `kid` names no key of the issuer: the caller may [`Issuers::reload_jwks`] and retry.
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
    #[error("issuer `{issuer}`: JWKS from a URL is not supported yet (use `jwks_file`)")]
    UrlNotSupported { issuer: String },
    #[error(transparent)]
    CryptoProvider(#[from] CryptoProviderMissing),
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
    jwks_file: PathBuf,
    keys: RwLock<Arc<KeySet>>,
    /// When the JWKS was last (re)loaded, for rate-limiting reloads.
    loaded_at: Mutex<Instant>,
}

impl Issuer {
    fn current_keys(&self) -> Arc<KeySet> {
        // A poisoned lock still holds a complete `Arc` (it is only ever swapped whole).
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn load_keys(&self) -> Result<KeySet, JwksError> {
        load_jwks_file(&self.config.key, &self.jwks_file)
    }
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
/// validation only takes a read lock to clone the current key set.
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
    /// Loads every issuer's JWKS. Installs the crypto provider if needed.
    pub fn from_config(configs: &[IssuerConfig]) -> Result<Self, JwksError> {
        install_crypto_provider()?;
        let mut issuers = Vec::with_capacity(configs.len());
        let mut by_iss = HashMap::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let jwks_file = match &config.jwks {
                JwksSource::File(path) => path.clone(),
                // TODO(JWKS over HTTP): fetch, cache, refresh periodically and on unknown kid.
                JwksSource::Url(_) => {
                    return Err(JwksError::UrlNotSupported {
                        issuer: config.key.clone(),
                    });
                }
            };
            let keys = load_jwks_file(&config.key, &jwks_file)?;
            tracing::info!(
                issuer = %config.key,
                keys = keys.keys.len(),
                jwks = %jwks_file.display(),
                "JWT issuer loaded"
            );
            by_iss.insert(config.issuer.clone(), index);
            issuers.push(Issuer {
                config: config.clone(),
                jwks_file,
                keys: RwLock::new(Arc::new(keys)),
                loaded_at: Mutex::new(Instant::now()),
            });
        }
        Ok(Issuers {
            issuers,
            by_iss,
            min_reload_interval: DEFAULT_MIN_RELOAD_INTERVAL,
        })
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

    /// Re-reads the JWKS of every issuer not reloaded within the minimum interval; returns
    /// whether any issuer's keys changed. A file that cannot be read or parsed leaves that
    /// issuer's keys as they were (logged as a warning). Called after [`JwtRefusal::UnknownKid`]
    /// (a key rotation) and periodically.
    pub fn reload_jwks(&self) -> bool {
        let mut changed = false;
        for issuer in &self.issuers {
            {
                let mut loaded_at = issuer.loaded_at.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                if now.saturating_duration_since(*loaded_at) < self.min_reload_interval {
                    continue;
                }
                *loaded_at = now;
            }
            match issuer.load_keys() {
                Ok(keys) => {
                    if keys.jwks != issuer.current_keys().jwks {
                        tracing::info!(
                            issuer = %issuer.config.key,
                            keys = keys.keys.len(),
                            "JWKS changed"
                        );
                        *issuer.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                        changed = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "JWKS reload failed; keeping the previous keys");
                }
            }
        }
        changed
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
