//! A local JWT issuer for the tests: keys, its JWKS file, its `[[issuer]]` config block, good
//! tokens and the classic bad ones (`alg: none`, HS256 keyed with the RSA public key, a tampered
//! payload). Tokens are signed with the broker's own minting code (`broker::token_cmd`), which
//! `thingsgate token` uses too.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use broker::token_cmd::{SigningKey, pem_encode};
use serde_json::{Map, Value, json};

/// The issuer's `key`: its subjects are `dev:<sub>`.
pub const KEY: &str = "dev";
/// The issuer's `iss`.
pub const ISS: &str = "https://dev.local";
/// The one configured audience.
pub const AUD: &str = "thingsgate";
/// The claim naming the solution.
pub const SOLUTION_CLAIM: &str = "solution_id";

/// The issuer's two keys (EC P-256 signs the good tokens; RSA is there so that HS256 keyed with
/// its public key can be tried), generated once per test binary.
#[derive(Debug)]
pub struct DevIssuer {
    pub ec_pem: String,
    pub rsa_pem: String,
    /// The RSA public key (SubjectPublicKeyInfo PEM), what an attacker would know.
    pub rsa_public_pem: String,
    pub ec: SigningKey,
    pub rsa: SigningKey,
}

/// The process-wide dev issuer.
pub fn dev_issuer() -> &'static DevIssuer {
    static ISSUER: OnceLock<DevIssuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .expect("RSA key generated");
        let rsa_der: Pkcs8V1Der<'static> = rsa.as_der().expect("RSA PKCS#8");
        let rsa_public: PublicKeyX509Der<'static> = aws_lc_rs::signature::KeyPair::public_key(&rsa)
            .as_der()
            .expect("RSA SPKI");
        let ec_pem = fresh_ec_pem();
        let rsa_pem = pem_encode("PRIVATE KEY", rsa_der.as_ref());
        DevIssuer {
            ec: SigningKey::from_pkcs8_pem(&ec_pem).expect("EC key"),
            rsa: SigningKey::from_pkcs8_pem(&rsa_pem).expect("RSA key"),
            rsa_public_pem: pem_encode("PUBLIC KEY", rsa_public.as_ref()),
            ec_pem,
            rsa_pem,
        }
    })
}

/// A new EC P-256 private key (PKCS#8 PEM).
pub fn fresh_ec_pem() -> String {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .expect("EC key generated");
    pem_encode("PRIVATE KEY", doc.as_ref())
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The instant `exp` (seconds since the epoch) stands for.
pub fn at_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

impl DevIssuer {
    /// The `[[issuer]]` block: leeway 0 (expiry tests measure against `exp` itself), the
    /// solution claim `solution_id`, the JWKS in `jwks_file` (relative to the config file).
    pub fn config_toml(&self, jwks_file: &str) -> String {
        format!(
            "[[issuer]]\nkey = \"{KEY}\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
             jwks_file = \"{jwks_file}\"\nleeway_seconds = 0\nsolution_claim = \"{SOLUTION_CLAIM}\"\n"
        )
    }

    /// Writes the JWKS holding the issuer's EC and RSA public keys plus `extra` ones.
    pub fn write_jwks(&self, path: &Path, extra: &[&SigningKey]) {
        let mut keys = vec![self.ec.public_jwk(None), self.rsa.public_jwk(None)];
        keys.extend(extra.iter().map(|k| k.public_jwk(None)));
        std::fs::write(path, json!({ "keys": keys }).to_string()).expect("JWKS written");
    }

    /// Claims of a token for `sub` valid for `ttl` from now (`iat` = now).
    pub fn claims(&self, sub: &str, ttl: Duration) -> Map<String, Value> {
        let now = unix_now();
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(ISS));
        claims.insert("sub".into(), json!(sub));
        claims.insert("aud".into(), json!(AUD));
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + ttl.as_secs()));
        claims
    }

    /// A good ES256 token for `sub`, valid for `ttl`.
    pub fn token(&self, sub: &str, ttl: Duration) -> String {
        self.sign(&self.claims(sub, ttl))
    }

    /// `claims` signed with the EC key (`kid` = its thumbprint).
    pub fn sign(&self, claims: &Map<String, Value>) -> String {
        self.ec.sign(claims, None).expect("token signed")
    }

    /// `claims` signed with the RSA key (RS256).
    pub fn sign_rsa(&self, claims: &Map<String, Value>) -> String {
        self.rsa.sign(claims, None).expect("token signed")
    }

    /// An unsigned token: `{"alg":"none"}` naming the EC key's `kid`, empty signature.
    pub fn alg_none(&self, claims: &Map<String, Value>) -> String {
        let header = json!({"alg": "none", "typ": "JWT", "kid": self.ec.thumbprint()});
        format!("{}.{}.", b64(&header), b64(&Value::Object(claims.clone())))
    }

    /// The key-confusion attack: HS256 with the RSA public key (PEM text) as the HMAC secret,
    /// naming the RSA key's `kid`.
    pub fn hs256_with_rsa_public_key(&self, claims: &Map<String, Value>) -> String {
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": self.rsa.thumbprint()});
        let signed = format!("{}.{}", b64(&header), b64(&Value::Object(claims.clone())));
        let key =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, self.rsa_public_pem.as_bytes());
        let tag = aws_lc_rs::hmac::sign(&key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// A good token's header and signature around another payload (`sub` changed to `admin`).
    pub fn tampered(&self, claims: &Map<String, Value>) -> String {
        let token = self.sign(claims);
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(signature)) = (parts.next(), parts.next(), parts.next())
        else {
            panic!("a JWT has three parts: {token}");
        };
        let mut forged = claims.clone();
        forged.insert("sub".into(), json!("admin"));
        format!("{header}.{}.{signature}", b64(&Value::Object(forged)))
    }
}

/// The signature part of a JWT (what must never be logged, even if the rest were).
pub fn signature_of(token: &str) -> &str {
    token.rsplit('.').next().unwrap_or_default()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}
