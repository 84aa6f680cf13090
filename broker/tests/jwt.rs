#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! JWT issuers end to end: config → JWKS file → tokens minted by `thingsgate token`'s code and
//! independently with jsonwebtoken → `Issuers::validate`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use broker::auth::jwt::{Issuers, JwtRefusal};
use broker::config::{Config, ConfigError};
use broker::token_cmd::{self, SigningKey, TokenArgs, jwks_for_private_key, pem_encode};
use jsonwebtoken::jwk::{Jwk, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

const ISS: &str = "https://issuer.test";
const OTHER_ISS: &str = "https://other.test";
const AUD: &str = "thingsgate";

/// A fixed "now" for validation: 2023-11-14T22:13:20Z.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn now_secs() -> i64 {
    1_700_000_000
}

struct Keys {
    rsa: String,
    rsa_public_pem: String,
    ec: String,
    ed: String,
}

/// Keys are generated once per test binary (RSA generation is the slow part).
fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let rsa_der: Pkcs8V1Der<'static> = rsa.as_der().unwrap();
        let rsa_public: PublicKeyX509Der<'static> = aws_lc_rs::signature::KeyPair::public_key(&rsa)
            .as_der()
            .unwrap();
        let rng = SystemRandom::new();
        let ec = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        // PKCS#8 v1, as `openssl genpkey` writes it (jsonwebtoken's own JWK code reads only v1).
        let ed = Ed25519KeyPair::generate_pkcs8v1(&rng).unwrap();
        Keys {
            rsa: pem_encode("PRIVATE KEY", rsa_der.as_ref()),
            rsa_public_pem: pem_encode("PUBLIC KEY", rsa_public.as_ref()),
            ec: pem_encode("PRIVATE KEY", ec.as_ref()),
            ed: pem_encode("PRIVATE KEY", ed.as_ref()),
        }
    })
}

fn fresh_ec_key() -> String {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .unwrap();
    pem_encode("PRIVATE KEY", doc.as_ref())
}

fn public_jwk(pem: &str) -> Value {
    jwks_for_private_key(pem).unwrap()["keys"][0].clone()
}

fn write_jwks(path: &Path, pems: &[&str]) {
    let keys: Vec<Value> = pems.iter().map(|p| public_jwk(p)).collect();
    std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
}

/// A temp dir with `jwks.json` (RSA, EC, Ed25519 keys), `other-jwks.json` (the EC key only) and
/// the config of two issuers.
struct Fixture {
    dir: tempfile::TempDir,
}

const CONFIG: &str = r#"
[[issuer]]
key = "test"
issuer = "https://issuer.test"
audiences = ["thingsgate", "second"]
jwks_file = "jwks.json"
auth_subjects = ["{{ jwt:sub }}", "{{ jwt:sub }}@{{ jwt:azp }}", "group/{{ jwt:groups }}"]
solution_claim = "ext/solution"

[[issuer]]
key = "other"
issuer = "https://other.test"
allow_any_audience = true
jwks_file = "other-jwks.json"
algorithms = ["ES256"]
"#;

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let k = keys();
        write_jwks(&dir.path().join("jwks.json"), &[&k.rsa, &k.ec, &k.ed]);
        write_jwks(&dir.path().join("other-jwks.json"), &[&k.ec]);
        std::fs::write(dir.path().join("config.toml"), CONFIG).unwrap();
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config_with_env(&self, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load_with_env(
            &self.path("config.toml"),
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    fn issuers(&self) -> Issuers {
        let config = self.config_with_env(&[]).unwrap();
        Issuers::from_config(&config.issuers).unwrap()
    }
}

fn claims(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => panic!("claims must be an object"),
    }
}

/// Claims valid at [`now`] for the main issuer.
fn good_claims() -> Map<String, Value> {
    claims(json!({
        "iss": ISS,
        "sub": "alice",
        "aud": AUD,
        "iat": now_secs() - 10,
        "exp": now_secs() + 600,
    }))
}

fn with(mut base: Map<String, Value>, changes: Value) -> Map<String, Value> {
    for (k, v) in claims(changes) {
        if v.is_null() {
            base.remove(&k);
        } else {
            base.insert(k, v);
        }
    }
    base
}

/// Signed by our minting code, `kid` = thumbprint.
fn mint(pem: &str, claims: &Map<String, Value>) -> String {
    SigningKey::from_pkcs8_pem(pem)
        .unwrap()
        .sign(claims, None)
        .unwrap()
}

/// The RFC 7638 thumbprint as jsonwebtoken computes it.
fn jsonwebtoken_thumbprint(pem: &str, alg: Algorithm) -> String {
    let key = encoding_key(pem, alg);
    Jwk::from_encoding_key(&key, alg)
        .unwrap()
        .thumbprint(ThumbprintHash::SHA256)
        .unwrap()
}

fn encoding_key(pem: &str, alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
        other => panic!("no test key for {other:?}"),
    }
}

/// Signed with jsonwebtoken directly, not through our minting code.
fn encode_independently(
    pem: &str,
    alg: Algorithm,
    kid: Option<String>,
    claims: &Map<String, Value>,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid;
    jsonwebtoken::encode(&header, claims, &encoding_key(pem, alg)).unwrap()
}

fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn all_keys() -> [(&'static str, Algorithm); 3] {
    let k = keys();
    [
        (k.rsa.as_str(), Algorithm::RS256),
        (k.ec.as_str(), Algorithm::ES256),
        (k.ed.as_str(), Algorithm::EdDSA),
    ]
}

// --- good tokens -------------------------------------------------------------------------------

#[test]
fn tokens_minted_by_thingsgate_are_valid_for_rsa_ec_and_ed25519_keys() {
    let fixture = Fixture::new();
    let issuers = fixture.issuers();
    for (pem, alg) in all_keys() {
        assert_eq!(SigningKey::from_pkcs8_pem(pem).unwrap().algorithm(), alg);
        let identity = issuers
            .validate(&mint(pem, &good_claims()), now())
            .unwrap_or_else(|r| panic!("{alg:?}: {r}"));
        assert_eq!(identity.issuer, "test");
        assert_eq!(identity.subjects, ["test:alice"]);
        assert_eq!(identity.solution, None);
        assert_eq!(
            identity.expires_at,
            UNIX_EPOCH + Duration::from_secs(1_700_000_600)
        );
    }
}

#[test]
fn tokens_signed_independently_with_jsonwebtoken_are_valid_for_each_algorithm() {
    let fixture = Fixture::new();
    let issuers = fixture.issuers();
    for (pem, alg) in all_keys() {
        let kid = jsonwebtoken_thumbprint(pem, alg);
        let token = encode_independently(pem, alg, Some(kid), &good_claims());
        let identity = issuers
            .validate(&token, now())
            .unwrap_or_else(|r| panic!("{alg:?}: {r}"));
        assert_eq!(identity.subjects, ["test:alice"]);
    }
}

#[test]
fn the_default_kid_is_the_rfc7638_thumbprint_jsonwebtoken_computes() {
    for (pem, alg) in all_keys() {
        let key = SigningKey::from_pkcs8_pem(pem).unwrap();
        assert_eq!(
            key.thumbprint(),
            jsonwebtoken_thumbprint(pem, alg),
            "{alg:?}"
        );
        assert_eq!(public_jwk(pem)["kid"], key.thumbprint());
    }
}

#[test]
fn an_ed25519_key_in_pkcs8_v2_form_mints_valid_tokens_too() {
    let fixture = Fixture::new();
    let issuers = fixture.issuers().with_min_reload_interval(Duration::ZERO);
    let v2 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let v2 = pem_encode("PRIVATE KEY", v2.as_ref());
    let k = keys();
    write_jwks(&fixture.path("jwks.json"), &[&k.rsa, &k.ec, &k.ed, &v2]);
    assert!(issuers.reload_jwks());
    let token = mint(&v2, &good_claims());
    assert_eq!(
        issuers.validate(&token, now()).unwrap().subjects,
        ["test:alice"]
    );
}

#[test]
fn the_token_command_mints_a_token_the_issuer_accepts_until_its_ttl() {
    let fixture = Fixture::new();
    let issuers = fixture.issuers();
    let key_file = fixture.path("key.pem");
    std::fs::write(&key_file, &keys().ec).unwrap();
    let args = TokenArgs {
        key: key_file,
        iss: ISS.into(),
        sub: "device-1".into(),
        aud: vec![AUD.into()],
        claims: vec!["azp=console".into(), r#"groups=["ops","dev"]"#.into()],
        ttl: "15m".into(),
        kid: None,
    };
    let token = token_cmd::run(&args).unwrap();
    let issued = SystemTime::now();
    let identity = issuers.validate(&token, issued).unwrap();
    assert_eq!(
        identity.subjects,
        [
            "test:device-1",
            "test:device-1@console",
            "test:group/ops",
            "test:group/dev"
        ]
    );
    let lifetime = identity
        .expires_at
        .duration_since(issued - Duration::from_secs(2))
        .unwrap();
    assert!(lifetime <= Duration::from_secs(902) && lifetime >= Duration::from_secs(898));
    let after_expiry = identity.expires_at + Duration::from_secs(31);
    assert_eq!(
        issuers.validate(&token, after_expiry),
        Err(JwtRefusal::Expired)
    );
}

// --- refusals ----------------------------------------------------------------------------------

#[test]
fn an_expired_token_is_refused_once_the_leeway_has_passed() {
    let issuers = Fixture::new().issuers();
    let pem = &keys().ec;
    let just_expired = mint(pem, &with(good_claims(), json!({"exp": now_secs() - 10})));
    assert!(
        issuers.validate(&just_expired, now()).is_ok(),
        "within leeway"
    );
    let expired = mint(pem, &with(good_claims(), json!({"exp": now_secs() - 30})));
    assert_eq!(issuers.validate(&expired, now()), Err(JwtRefusal::Expired));
}

#[test]
fn a_token_not_yet_valid_is_refused_beyond_the_leeway() {
    let issuers = Fixture::new().issuers();
    let pem = &keys().ec;
    let soon = mint(pem, &with(good_claims(), json!({"nbf": now_secs() + 20})));
    assert!(issuers.validate(&soon, now()).is_ok(), "within leeway");
    let later = mint(pem, &with(good_claims(), json!({"nbf": now_secs() + 60})));
    assert_eq!(
        issuers.validate(&later, now()),
        Err(JwtRefusal::NotYetValid)
    );
}

#[test]
fn a_token_for_another_audience_is_refused() {
    let issuers = Fixture::new().issuers();
    let pem = &keys().rsa;
    let wrong = mint(pem, &with(good_claims(), json!({"aud": "someone-else"})));
    assert_eq!(
        issuers.validate(&wrong, now()),
        Err(JwtRefusal::WrongAudience)
    );
    let missing = mint(pem, &with(good_claims(), json!({"aud": null})));
    assert_eq!(
        issuers.validate(&missing, now()),
        Err(JwtRefusal::MissingAudience)
    );
    let one_of_several = mint(pem, &with(good_claims(), json!({"aud": ["x", "second"]})));
    assert!(issuers.validate(&one_of_several, now()).is_ok());
}

#[test]
fn a_token_from_an_unconfigured_issuer_is_refused() {
    let issuers = Fixture::new().issuers();
    let pem = &keys().ec;
    let token = mint(
        pem,
        &with(good_claims(), json!({"iss": "https://evil.test"})),
    );
    assert_eq!(
        issuers.validate(&token, now()),
        Err(JwtRefusal::UnknownIssuer)
    );
    let no_iss = mint(pem, &with(good_claims(), json!({"iss": null})));
    assert_eq!(
        issuers.validate(&no_iss, now()),
        Err(JwtRefusal::MissingIssuer)
    );
}

#[test]
fn a_token_claiming_another_issuer_is_checked_against_that_issuers_keys() {
    let issuers = Fixture::new().issuers();
    // The Ed25519 key belongs to `test` only; claiming `other` routes to other's keys.
    let token = mint(&keys().ed, &with(good_claims(), json!({"iss": OTHER_ISS})));
    assert_eq!(
        issuers.validate(&token, now()),
        Err(JwtRefusal::AlgorithmNotAllowed)
    );
    let stranger = fresh_ec_key();
    let token = mint(&stranger, &with(good_claims(), json!({"iss": OTHER_ISS})));
    assert_eq!(issuers.validate(&token, now()), Err(JwtRefusal::UnknownKid));
}

#[test]
fn an_unknown_kid_is_accepted_after_reload_jwks_finds_the_rotated_key() {
    let fixture = Fixture::new();
    let issuers = fixture.issuers().with_min_reload_interval(Duration::ZERO);
    let new_key = fresh_ec_key();
    let token = mint(&new_key, &good_claims());
    assert_eq!(issuers.validate(&token, now()), Err(JwtRefusal::UnknownKid));
    assert!(!issuers.reload_jwks(), "nothing changed yet");
    let k = keys();
    write_jwks(
        &fixture.path("jwks.json"),
        &[&k.rsa, &k.ec, &k.ed, &new_key],
    );
    assert!(issuers.reload_jwks(), "the new key is found");
    assert_eq!(
        issuers.validate(&token, now()).unwrap().subjects,
        ["test:alice"]
    );
}

#[test]
fn jwks_reloads_are_rate_limited_per_issuer() {
    let fixture = Fixture::new();
    let issuers = fixture.issuers();
    let new_key = fresh_ec_key();
    let k = keys();
    write_jwks(
        &fixture.path("jwks.json"),
        &[&k.rsa, &k.ec, &k.ed, &new_key],
    );
    assert!(!issuers.reload_jwks(), "loaded less than 10 s ago");
    assert_eq!(
        issuers.validate(&mint(&new_key, &good_claims()), now()),
        Err(JwtRefusal::UnknownKid)
    );
}

#[test]
fn a_broken_jwks_file_on_reload_keeps_the_previous_keys() {
    let fixture = Fixture::new();
    let issuers = fixture.issuers().with_min_reload_interval(Duration::ZERO);
    std::fs::write(fixture.path("jwks.json"), "{not json").unwrap();
    assert!(!issuers.reload_jwks());
    assert!(
        issuers
            .validate(&mint(&keys().rsa, &good_claims()), now())
            .is_ok()
    );
}

#[test]
fn an_unsigned_alg_none_token_is_refused() {
    let issuers = Fixture::new().issuers();
    let payload = Value::Object(good_claims());
    for alg in ["none", "None"] {
        let token = format!("{}.{}.", b64(&json!({"alg": alg})), b64(&payload));
        assert_eq!(issuers.validate(&token, now()), Err(JwtRefusal::AlgNone));
    }
    let kid = SigningKey::from_pkcs8_pem(&keys().rsa)
        .unwrap()
        .thumbprint()
        .to_owned();
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
        b64(&payload)
    );
    assert_eq!(issuers.validate(&token, now()), Err(JwtRefusal::AlgNone));
}

#[test]
fn hs256_signed_with_the_rsa_public_key_as_secret_is_refused() {
    let issuers = Fixture::new().issuers();
    let k = keys();
    let kid = SigningKey::from_pkcs8_pem(&k.rsa)
        .unwrap()
        .thumbprint()
        .to_owned();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid);
    for secret in [
        k.rsa_public_pem.as_bytes().to_vec(),
        public_jwk(&k.rsa).to_string().into_bytes(),
    ] {
        let token = jsonwebtoken::encode(
            &header,
            &good_claims(),
            &EncodingKey::from_secret(&secret).unwrap(),
        )
        .unwrap();
        assert_eq!(
            issuers.validate(&token, now()),
            Err(JwtRefusal::SymmetricAlgorithm)
        );
    }
}

#[test]
fn a_tampered_payload_is_refused() {
    let issuers = Fixture::new().issuers();
    for (pem, alg) in all_keys() {
        let token = mint(pem, &good_claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64(&Value::Object(with(good_claims(), json!({"sub": "admin"}))));
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        assert_eq!(
            issuers.validate(&tampered, now()),
            Err(JwtRefusal::BadSignature),
            "{alg:?}"
        );
        // A flipped signature bit, too.
        let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        signature[0] ^= 1;
        let flipped = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            URL_SAFE_NO_PAD.encode(signature)
        );
        assert_eq!(
            issuers.validate(&flipped, now()),
            Err(JwtRefusal::BadSignature),
            "{alg:?}"
        );
    }
}

#[test]
fn a_token_without_exp_is_refused() {
    let issuers = Fixture::new().issuers();
    let token = mint(&keys().ed, &with(good_claims(), json!({"exp": null})));
    assert_eq!(
        issuers.validate(&token, now()),
        Err(JwtRefusal::MissingExpiry)
    );
}

#[test]
fn an_algorithm_outside_the_issuers_allow_list_is_refused() {
    let issuers = Fixture::new().issuers();
    // `other` allows ES256 only; RS256 with the RSA key is refused before any key lookup.
    let token = mint(&keys().rsa, &with(good_claims(), json!({"iss": OTHER_ISS})));
    assert_eq!(
        issuers.validate(&token, now()),
        Err(JwtRefusal::AlgorithmNotAllowed)
    );
}

#[test]
fn an_algorithm_that_does_not_fit_the_selected_key_is_refused() {
    let issuers = Fixture::new().issuers();
    let k = keys();
    let rsa_kid = SigningKey::from_pkcs8_pem(&k.rsa)
        .unwrap()
        .thumbprint()
        .to_owned();
    // An ES256 signature presented under the RSA key's kid.
    let token = encode_independently(&k.ec, Algorithm::ES256, Some(rsa_kid), &good_claims());
    assert_eq!(
        issuers.validate(&token, now()),
        Err(JwtRefusal::AlgorithmKeyMismatch)
    );
}

#[test]
fn a_token_without_kid_is_accepted_only_when_the_issuer_has_exactly_one_key() {
    let issuers = Fixture::new().issuers();
    let ec = &keys().ec;
    let token = encode_independently(ec, Algorithm::ES256, None, &good_claims());
    assert_eq!(issuers.validate(&token, now()), Err(JwtRefusal::MissingKid));
    let token = encode_independently(
        ec,
        Algorithm::ES256,
        None,
        &with(good_claims(), json!({"iss": OTHER_ISS})),
    );
    assert_eq!(
        issuers.validate(&token, now()).unwrap().subjects,
        ["other:alice"]
    );
}

#[test]
fn malformed_and_oversized_tokens_are_refused() {
    let issuers = Fixture::new().issuers();
    for token in ["", "a.b", "a.b.c.d", "!!.??.xx", "e30.e30.", "W10.e30.sig"] {
        assert_eq!(
            issuers.validate(token, now()),
            Err(JwtRefusal::Malformed),
            "{token}"
        );
    }
    let huge = "a".repeat(broker::auth::jwt::MAX_TOKEN_LEN + 1);
    assert_eq!(issuers.validate(&huge, now()), Err(JwtRefusal::TooLarge));
}

// --- subjects ----------------------------------------------------------------------------------

#[test]
fn subjects_combine_sub_azp_and_expand_array_claims() {
    let issuers = Fixture::new().issuers();
    let token = mint(
        &keys().rsa,
        &with(
            good_claims(),
            json!({"azp": "console", "groups": ["ops", "dev", "ops"], "ext": {"solution": "s1"}}),
        ),
    );
    let identity = issuers.validate(&token, now()).unwrap();
    assert_eq!(
        identity.subjects,
        [
            "test:alice",
            "test:alice@console",
            "test:group/ops",
            "test:group/dev"
        ]
    );
    assert_eq!(identity.solution.as_deref(), Some("s1"));
}

#[test]
fn an_unresolvable_template_gives_no_subject() {
    let issuers = Fixture::new().issuers();
    // No `azp`, `groups` empty: only the `sub` template resolves.
    let token = mint(&keys().rsa, &with(good_claims(), json!({"groups": []})));
    assert_eq!(
        issuers.validate(&token, now()).unwrap().subjects,
        ["test:alice"]
    );
    // Nothing resolves at all: refused.
    let token = mint(&keys().rsa, &with(good_claims(), json!({"sub": null})));
    assert_eq!(issuers.validate(&token, now()), Err(JwtRefusal::NoSubjects));
}

#[test]
fn a_solution_claim_of_the_wrong_type_is_refused() {
    let issuers = Fixture::new().issuers();
    let token = mint(
        &keys().rsa,
        &with(good_claims(), json!({"ext": {"solution": 7}})),
    );
    assert_eq!(
        issuers.validate(&token, now()),
        Err(JwtRefusal::InvalidSolutionClaim)
    );
}

// --- config ------------------------------------------------------------------------------------

fn config_error(fixture: &Fixture, text: &str) -> String {
    std::fs::write(fixture.path("bad.toml"), text).unwrap();
    let err = Config::load_with_env(&fixture.path("bad.toml"), Vec::new()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("bad.toml"), "names the file: {message}");
    message
}

const ONE_ISSUER: &str = r#"
[[issuer]]
key = "test"
issuer = "https://issuer.test"
audiences = ["thingsgate"]
jwks_file = "jwks.json"
"#;

#[test]
fn config_refuses_alg_none_naming_the_field() {
    let fixture = Fixture::new();
    let message = config_error(
        &fixture,
        &format!("{ONE_ISSUER}algorithms = [\"RS256\", \"none\"]\n"),
    );
    assert!(message.contains("field `algorithms`"), "{message}");
    assert!(message.contains("`none`"), "{message}");
}

#[test]
fn config_refuses_hs256_naming_the_field() {
    let fixture = Fixture::new();
    let message = config_error(&fixture, &format!("{ONE_ISSUER}algorithms = [\"HS256\"]\n"));
    assert!(message.contains("field `algorithms`"), "{message}");
    assert!(message.contains("symmetric"), "{message}");
}

#[test]
fn config_refuses_an_issuer_without_jwks_naming_the_field() {
    let fixture = Fixture::new();
    let message = config_error(
        &fixture,
        &ONE_ISSUER.replace("jwks_file = \"jwks.json\"", ""),
    );
    assert!(message.contains("field `jwks_file`"), "{message}");
}

#[test]
fn config_refuses_bad_toml_naming_the_file_and_place() {
    let fixture = Fixture::new();
    let message = config_error(&fixture, "[[issuer]\nkey = ");
    assert!(message.contains("not valid"), "{message}");
    let message = config_error(&fixture, &ONE_ISSUER.replace("issuer = ", "isuer = "));
    assert!(message.contains("isuer"), "{message}");
    let message = config_error(&fixture, &format!("{ONE_ISSUER}leeway_seconds = \"30\"\n"));
    assert!(message.contains("leeway_seconds"), "{message}");
}

#[test]
fn a_missing_or_invalid_jwks_file_is_an_error_naming_issuer_and_file() {
    let fixture = Fixture::new();
    std::fs::write(
        fixture.path("c.toml"),
        ONE_ISSUER.replace("jwks.json", "absent.json"),
    )
    .unwrap();
    let config = Config::load_with_env(&fixture.path("c.toml"), Vec::new()).unwrap();
    let message = Issuers::from_config(&config.issuers)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("`test`") && message.contains("absent.json"),
        "{message}"
    );
    std::fs::write(fixture.path("jwks.json"), r#"{"keys":[{"kty":"RSA"}]}"#).unwrap();
    let config = Config::load_with_env(&fixture.path("config.toml"), Vec::new()).unwrap();
    let message = Issuers::from_config(&config.issuers)
        .unwrap_err()
        .to_string();
    assert!(message.contains("jwks.json"), "{message}");
}

#[test]
fn environment_variables_override_issuer_fields() {
    let fixture = Fixture::new();
    let config = fixture
        .config_with_env(&[
            ("THINGSGATE_ISSUER_TEST_AUDIENCES", "elsewhere, second2"),
            ("THINGSGATE_ISSUER_TEST_LEEWAY_SECONDS", "0"),
            ("THINGSGATE_ISSUER_OTHER_ALGORITHMS", "ES256,EdDSA"),
            ("UNRELATED", "x"),
        ])
        .unwrap();
    assert_eq!(config.issuers[0].audiences, ["elsewhere", "second2"]);
    assert_eq!(config.issuers[0].leeway_seconds, 0);
    assert_eq!(
        config.issuers[1].algorithms,
        [Algorithm::ES256, Algorithm::EdDSA]
    );
    let issuers = Issuers::from_config(&config.issuers).unwrap();
    let pem = &keys().ec;
    assert_eq!(
        issuers.validate(&mint(pem, &good_claims()), now()),
        Err(JwtRefusal::WrongAudience)
    );
    let token = mint(pem, &with(good_claims(), json!({"aud": "elsewhere"})));
    assert!(issuers.validate(&token, now()).is_ok());
    let barely_expired = mint(
        pem,
        &with(
            good_claims(),
            json!({"aud": "elsewhere", "exp": now_secs()}),
        ),
    );
    assert_eq!(
        issuers.validate(&barely_expired, now()),
        Err(JwtRefusal::Expired),
        "leeway 0"
    );
}

#[test]
fn a_bad_environment_override_names_the_variable() {
    let fixture = Fixture::new();
    let message = fixture
        .config_with_env(&[("THINGSGATE_ISSUER_TEST_LEEWAY_SECONDS", "soon")])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("THINGSGATE_ISSUER_TEST_LEEWAY_SECONDS"),
        "{message}"
    );
    let message = fixture
        .config_with_env(&[("THINGSGATE_ISSUER_TEST_ALGORITHMS", "HS256")])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("field `algorithms` (set by THINGSGATE_ISSUER_TEST_ALGORITHMS)"),
        "{message}"
    );
    let message = fixture
        .config_with_env(&[("THINGSGATE_ISSUER_TSET_AUDIENCES", "x")])
        .unwrap_err()
        .to_string();
    assert!(message.contains("names no field"), "{message}");
}
