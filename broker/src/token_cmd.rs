//! `thingsgate token`: mint a JWT with a local private key (DESIGN.md §7), for tests, load tests
//! and `serve --dev`'s local issuer; plus the public JWKS of such a key and a fresh dev key.
//!
//! The key file is a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`); its type decides the
//! algorithm: RSA → RS256, P-256 → ES256, Ed25519 → EdDSA. The `kid` is the key's RFC 7638 JWK
//! thumbprint unless given, so a JWKS made by [`jwks_for_private_key`] verifies the token.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use aws_lc_rs::digest;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair,
    RsaPublicKeyComponents,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

/// The arguments of `thingsgate token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The private key (PKCS#8 PEM): RSA → RS256, P-256 → ES256, Ed25519 → EdDSA.
    #[arg(long)]
    pub key: PathBuf,
    /// The `iss` claim (a configured issuer).
    #[arg(long)]
    pub iss: String,
    /// The `sub` claim.
    #[arg(long)]
    pub sub: String,
    /// The `aud` claim (repeat for several).
    #[arg(long = "aud")]
    pub aud: Vec<String>,
    /// An extra claim `K=V`; V is taken as JSON if it parses, else as a string (repeatable; also
    /// replaces iss/sub/aud/iat/exp, e.g. `--claim exp=1` for an expired token).
    #[arg(long = "claim", value_name = "K=V")]
    pub claims: Vec<String>,
    /// Lifetime: `90s`, `15m`, `1h`, `2d` (a bare number is seconds).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// The `kid` header; default: the key's RFC 7638 thumbprint.
    #[arg(long)]
    pub kid: Option<String>,
}

/// Reads the key and mints the token.
pub fn run(args: &TokenArgs) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(&args.key)
        .with_context(|| format!("cannot read key file {}", args.key.display()))?;
    let key = SigningKey::from_pkcs8_pem(&pem)
        .with_context(|| format!("key file {}", args.key.display()))?;
    let claims = token_claims(args, SystemTime::now())?;
    Ok(key.sign(&claims, args.kid.as_deref())?)
}

/// The claims `args` describe, issued at `now`.
pub fn token_claims(args: &TokenArgs, now: SystemTime) -> anyhow::Result<Map<String, Value>> {
    let ttl = parse_ttl(&args.ttl)?;
    let iat = now
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(args.iss));
    claims.insert("sub".into(), json!(args.sub));
    match args.aud.as_slice() {
        [] => {}
        [one] => {
            claims.insert("aud".into(), json!(one));
        }
        many => {
            claims.insert("aud".into(), json!(many));
        }
    }
    claims.insert("iat".into(), json!(iat));
    claims.insert("exp".into(), json!(iat.saturating_add(ttl.as_secs())));
    for claim in &args.claims {
        let Some((name, value)) = claim.split_once('=') else {
            anyhow::bail!("--claim `{claim}` is not K=V");
        };
        if name.is_empty() {
            anyhow::bail!("--claim `{claim}` has an empty name");
        }
        let value = serde_json::from_str(value).unwrap_or_else(|_| json!(value));
        claims.insert(name.to_owned(), value);
    }
    Ok(claims)
}

/// Parses a lifetime such as `90s`, `15m`, `1h`, `2d` (a bare number is seconds); zero is refused.
pub fn parse_ttl(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let count: u64 = digits
        .parse()
        .with_context(|| format!("--ttl `{text}`: expected a number and s, m, h or d"))?;
    let unit_seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("--ttl `{text}`: unit must be s, m, h or d"),
    };
    let seconds = count
        .checked_mul(unit_seconds)
        .with_context(|| format!("--ttl `{text}` is too long"))?;
    if seconds == 0 {
        anyhow::bail!("--ttl must be more than zero");
    }
    Ok(Duration::from_secs(seconds))
}

/// A private key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("not a PEM file (expected `-----BEGIN PRIVATE KEY-----`)")]
    NotPem,
    #[error(
        "PEM block `{0}` is not a PKCS#8 private key (convert with `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    NotPkcs8(String),
    #[error("PEM body is not base64")]
    BadBase64,
    #[error("unsupported private key (expected RSA of 2048 to 8192 bits, EC P-256 or Ed25519)")]
    Unsupported,
    #[error("cannot generate a key")]
    Generate,
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A private key that signs tokens. Its `Debug` shows only the algorithm and thumbprint.
pub struct SigningKey {
    algorithm: Algorithm,
    encoding: EncodingKey,
    /// The public JWK's required members (RFC 7638), without `kid`/`alg`/`use`.
    public: Map<String, Value>,
    thumbprint: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM private key and detects its type.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SigningKeyError> {
        let der = pem_body(pem, "PRIVATE KEY")?;
        let b64 = |bytes: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(bytes));
        let (algorithm, members, encoding) = if let Ok(pair) = Ed25519KeyPair::from_pkcs8(&der) {
            let members = vec![
                ("crv", json!("Ed25519")),
                ("kty", json!("OKP")),
                ("x", b64(pair.public_key().as_ref())),
            ];
            (Algorithm::EdDSA, members, EncodingKey::from_ed_der(&der))
        } else if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der) {
            // An uncompressed point: 0x04 ‖ x (32 bytes) ‖ y (32 bytes).
            let point = pair.public_key().as_ref();
            let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
                return Err(SigningKeyError::Unsupported);
            };
            let members = vec![
                ("crv", json!("P-256")),
                ("kty", json!("EC")),
                ("x", b64(x)),
                ("y", b64(y)),
            ];
            (Algorithm::ES256, members, EncodingKey::from_ec_der(&der))
        } else if let Ok(pair) = RsaKeyPair::from_pkcs8(&der) {
            let components = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
            let members = vec![
                ("e", b64(&components.e)),
                ("kty", json!("RSA")),
                ("n", b64(&components.n)),
            ];
            // jsonwebtoken's RSA signer wants the PKCS#1 key inside the PKCS#8 wrapper.
            let encoding = EncodingKey::from_rsa_pem(pem.as_bytes())
                .map_err(|_| SigningKeyError::Unsupported)?;
            (Algorithm::RS256, members, encoding)
        } else {
            return Err(SigningKeyError::Unsupported);
        };
        // RFC 7638: SHA-256 of the required members, lexicographically ordered, no whitespace
        // (serde_json's map without `preserve_order` is ordered and compact).
        let public: Map<String, Value> = members
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        let canonical = Value::Object(public.clone()).to_string();
        let thumbprint =
            URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes()));
        Ok(SigningKey {
            algorithm,
            encoding,
            public,
            thumbprint,
        })
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url): the default `kid`.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The public key as a JWK with `kid` (default: the thumbprint), `alg` and `use: sig`.
    pub fn public_jwk(&self, kid: Option<&str>) -> Value {
        let mut jwk = self.public.clone();
        jwk.insert("kid".into(), json!(kid.unwrap_or(&self.thumbprint)));
        jwk.insert("alg".into(), json!(self.algorithm));
        jwk.insert("use".into(), json!("sig"));
        Value::Object(jwk)
    }

    /// Signs `claims` with header `{alg, typ: JWT, kid}` (kid default: the thumbprint).
    pub fn sign(
        &self,
        claims: &Map<String, Value>,
        kid: Option<&str>,
    ) -> Result<String, SigningKeyError> {
        crate::auth::jwt::install_crypto_provider()
            .map_err(|e| SigningKeyError::Sign(e.to_string()))?;
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.unwrap_or(&self.thumbprint).to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| SigningKeyError::Sign(e.to_string()))
    }
}

/// The JWKS (`{"keys": [<public JWK>]}`) that verifies tokens signed by this private key, with
/// the thumbprint as `kid` (what [`run`] puts in the header by default).
pub fn jwks_for_private_key(pem: &str) -> Result<Value, SigningKeyError> {
    let key = SigningKey::from_pkcs8_pem(pem)?;
    Ok(json!({ "keys": [key.public_jwk(None)] }))
}

/// A fresh EC P-256 (ES256) private key as PKCS#8 PEM, for `serve --dev`'s local issuer.
pub fn generate_dev_key() -> Result<String, SigningKeyError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| SigningKeyError::Generate)?;
    Ok(pem_encode("PRIVATE KEY", document.as_ref()))
}

/// PEM-encodes DER bytes (RFC 7468: base64 in lines of 64 characters).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    let mut rest = body.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER bytes of the first PEM block, which must be labelled `label`.
fn pem_body(pem: &str, label: &str) -> Result<Vec<u8>, SigningKeyError> {
    let mut lines = pem.lines().map(str::trim);
    let found = lines
        .by_ref()
        .find_map(|l| l.strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or(SigningKeyError::NotPem)?;
    if found != label {
        return Err(SigningKeyError::NotPkcs8(found.to_owned()));
    }
    let mut body = String::new();
    for line in lines {
        if line.starts_with("-----END ") {
            return STANDARD
                .decode(body.as_bytes())
                .map_err(|_| SigningKeyError::BadBase64);
        }
        body.push_str(line);
    }
    Err(SigningKeyError::NotPem)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(claims: &[&str]) -> TokenArgs {
        TokenArgs {
            key: PathBuf::from("unused"),
            iss: "https://issuer".into(),
            sub: "alice".into(),
            aud: vec!["things".into()],
            claims: claims.iter().map(|c| (*c).to_owned()).collect(),
            ttl: "15m".into(),
            kid: None,
        }
    }

    #[test]
    fn ttl_accepts_seconds_minutes_hours_days() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_ttl("42").unwrap(), Duration::from_secs(42));
        for bad in ["", "0s", "1w", "h", "-1h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn claims_hold_iss_sub_aud_iat_exp_and_extra_claims_as_json_or_text() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let claims = token_claims(
            &args(&["groups=[\"a\",\"b\"]", "azp=app", "n=3", "exp=5"]),
            now,
        )
        .unwrap();
        assert_eq!(claims["iss"], "https://issuer");
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["aud"], "things");
        assert_eq!(claims["iat"], 1_000);
        assert_eq!(claims["groups"], json!(["a", "b"]));
        assert_eq!(claims["azp"], "app");
        assert_eq!(claims["n"], 3);
        assert_eq!(claims["exp"], 5, "--claim replaces exp");
        let claims = token_claims(&args(&[]), now).unwrap();
        assert_eq!(claims["exp"], 1_900);
        assert!(token_claims(&args(&["novalue"]), now).is_err());
    }

    #[test]
    fn dev_key_is_an_es256_pkcs8_pem_with_a_matching_jwks() {
        let pem = generate_dev_key().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let key = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(key.algorithm(), Algorithm::ES256);
        let jwks = jwks_for_private_key(&pem).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], key.thumbprint());
        assert_eq!(jwks["keys"][0]["crv"], "P-256");
        assert!(jwks["keys"][0].get("d").is_none(), "no private part");
    }

    #[test]
    fn non_pkcs8_pem_is_refused_with_a_hint() {
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        let message = SigningKey::from_pkcs8_pem(pem).unwrap_err().to_string();
        assert!(message.contains("openssl pkcs8"), "{message}");
        assert!(matches!(
            SigningKey::from_pkcs8_pem("hello"),
            Err(SigningKeyError::NotPem)
        ));
    }
}
