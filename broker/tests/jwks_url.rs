#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! JWT issuers whose JWKS comes from a URL, against real HTTP and HTTPS servers started by each
//! test on 127.0.0.1 (port 0): keys fetched at start, re-fetched on an unknown `kid` (rate
//! limited, shared by concurrent callers), refreshed periodically, kept when a refresh fails;
//! TLS trust through `jwks_ca_file`; clear errors at load.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use broker::auth::jwt::{Issuers, JwtRefusal, MAX_JWKS_BYTES};
use broker::config::{Config, JwksSource};
use broker::token_cmd::{SigningKey, generate_dev_key};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

const ISS: &str = "https://idp.test";

/// Every test finishes within this, or fails.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test did not finish in time")
}

// --- keys and tokens ---------------------------------------------------------------------------

/// An ES256 signing key with a `kid` of our choosing.
struct Key {
    signing: SigningKey,
    kid: &'static str,
}

impl Key {
    fn new(kid: &'static str) -> Self {
        let signing = SigningKey::from_pkcs8_pem(&generate_dev_key().unwrap()).unwrap();
        Key { signing, kid }
    }

    fn jwk(&self) -> Value {
        self.signing.public_jwk(Some(self.kid))
    }

    fn token(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims: Map<String, Value> = match json!({
            "iss": ISS,
            "sub": "alice",
            "aud": "thingsgate",
            "exp": now + 600,
        }) {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        self.signing.sign(&claims, Some(self.kid)).unwrap()
    }
}

fn jwks(keys: &[&Key]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
}

fn validate(issuers: &Issuers, key: &Key) -> Result<Vec<String>, JwtRefusal> {
    issuers
        .validate(&key.token(), SystemTime::now())
        .map(|identity| identity.subjects)
}

// --- the JWKS server ---------------------------------------------------------------------------

/// What the server answers to every request.
#[derive(Clone)]
struct Answer {
    status: u16,
    body: String,
}

/// A JWKS server: HTTP/1.1 (over TLS when given an acceptor), one request per connection. It
/// counts the requests it answered (the count and the answer change together, under one lock,
/// so "request n + 1 got the new answer" holds for an `n` read while setting it).
struct JwksServer {
    addr: SocketAddr,
    scheme: &'static str,
    answer: Arc<Mutex<(Answer, watch::Sender<usize>)>>,
    served: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    async fn http(jwks: &Value) -> Self {
        Self::start(jwks, None).await
    }

    async fn https(jwks: &Value, tls: &TestPki) -> Self {
        Self::start(jwks, Some(TlsAcceptor::from(Arc::clone(&tls.server)))).await
    }

    async fn start(jwks: &Value, acceptor: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (counter, served) = watch::channel(0_usize);
        let answer = Answer {
            status: 200,
            body: jwks.to_string(),
        };
        let answer = Arc::new(Mutex::new((answer, counter)));
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let shared = Arc::clone(&answer);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let answer = Arc::clone(&shared);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => serve(stream, &answer).await,
                        Some(acceptor) => {
                            // A client that refuses our certificate ends here.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, &answer).await;
                            }
                        }
                    }
                });
            }
        });
        JwksServer {
            addr,
            scheme,
            answer,
            served,
            task,
        }
    }

    fn url(&self) -> String {
        format!("{}://{}/jwks", self.scheme, self.addr)
    }

    /// Changes the answer; returns the number of requests answered before the change.
    fn answer(&self, status: u16, body: String) -> usize {
        let mut guard = self.answer.lock().unwrap();
        guard.0 = Answer { status, body };
        *guard.1.borrow()
    }

    fn serve_jwks(&self, jwks: &Value) -> usize {
        self.answer(200, jwks.to_string())
    }

    fn served(&self) -> usize {
        *self.served.borrow()
    }

    async fn wait_until_served(&mut self, count: usize) {
        self.served.wait_for(|n| *n >= count).await.unwrap();
    }

    /// Closes the listening socket: further connections are refused.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn serve(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    answer: &Mutex<(Answer, watch::Sender<usize>)>,
) {
    let mut head = Vec::new();
    let mut buf = [0_u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let Answer { status, body } = {
        let guard = answer.lock().unwrap();
        guard.1.send_modify(|n| *n += 1);
        guard.0.clone()
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Other",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// --- TLS -----------------------------------------------------------------------------------------

/// A test CA (its certificate as PEM, for `jwks_ca_file`) and a server config whose certificate,
/// for `127.0.0.1` and `localhost`, it signed.
struct TestPki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn test_pki() -> TestPki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "thingsgate test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    TestPki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

// --- config --------------------------------------------------------------------------------------

/// One issuer `idp` whose keys come from `url`; `extra` lines are appended to its table.
fn config(dir: &Path, url: &str, extra: &str) -> Config {
    let text = format!(
        "[[issuer]]\nkey = \"idp\"\nissuer = \"{ISS}\"\naudiences = [\"thingsgate\"]\n\
         jwks_url = \"{url}\"\n{extra}\n"
    );
    Config::parse(&text, &dir.join("config.toml"), Vec::new()).unwrap()
}

/// The config file allows no less than 10 s; tests refresh faster through the parsed value.
fn refreshing_every(mut config: Config, period: Duration) -> Config {
    for issuer in &mut config.issuers {
        if let JwksSource::Url(jwks) = &mut issuer.jwks {
            jwks.refresh_interval = period;
        }
    }
    config
}

async fn load(config: &Config) -> Issuers {
    Issuers::load(&config.issuers).await.unwrap()
}

async fn load_error(config: &Config) -> String {
    Issuers::load(&config.issuers)
        .await
        .expect_err("loading should fail")
        .to_string()
}

// --- start-up ------------------------------------------------------------------------------------

#[tokio::test]
async fn keys_are_fetched_from_an_http_url_at_start() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::new("k1");
        let server = JwksServer::http(&jwks(&[&key])).await;
        let issuers = load(&config(dir.path(), &server.url(), "")).await;
        assert_eq!(server.served(), 1);
        assert_eq!(validate(&issuers, &key), Ok(vec!["idp:alice".to_owned()]));
        assert_eq!(
            validate(&issuers, &Key::new("stranger")),
            Err(JwtRefusal::UnknownKid)
        );
    })
    .await;
}

#[tokio::test]
async fn an_https_url_is_trusted_through_the_jwks_ca_file() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki();
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
        let key = Key::new("k1");
        let server = JwksServer::https(&jwks(&[&key]), &pki).await;
        assert!(server.url().starts_with("https://127.0.0.1:"));
        let issuers = load(&config(
            dir.path(),
            &server.url(),
            "jwks_ca_file = \"ca.pem\"",
        ))
        .await;
        assert_eq!(validate(&issuers, &key), Ok(vec!["idp:alice".to_owned()]));
    })
    .await;
}

#[tokio::test]
async fn an_https_url_with_an_untrusted_certificate_fails_at_load() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki();
        let server = JwksServer::https(&jwks(&[&Key::new("k1")]), &pki).await;

        // The platform's roots alone do not know the test CA.
        let message = load_error(&config(dir.path(), &server.url(), "")).await;
        assert!(message.contains("issuer `idp`"), "{message}");
        assert!(message.contains(&server.url()), "{message}");
        assert!(message.contains("certificate"), "{message}");

        // Nor does another CA (of the same name: the signature gives it away).
        std::fs::write(dir.path().join("other-ca.pem"), test_pki().ca_pem).unwrap();
        let other = config(dir.path(), &server.url(), "jwks_ca_file = \"other-ca.pem\"");
        let message = load_error(&other).await;
        assert!(message.contains("invalid peer certificate"), "{message}");
        assert_eq!(server.served(), 0, "no request went out without trust");
    })
    .await;
}

#[tokio::test]
async fn a_missing_or_empty_jwks_ca_file_is_an_error_naming_it() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let url = "https://127.0.0.1:9/jwks";
        let message = load_error(&config(dir.path(), url, "jwks_ca_file = \"absent.pem\"")).await;
        assert!(
            message.contains("issuer `idp`") && message.contains("absent.pem"),
            "{message}"
        );
        std::fs::write(dir.path().join("empty.pem"), "no certificate here\n").unwrap();
        let message = load_error(&config(dir.path(), url, "jwks_ca_file = \"empty.pem\"")).await;
        assert!(message.contains("no `CERTIFICATE`"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn a_404_at_load_is_an_error_naming_the_status() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = JwksServer::http(&json!({})).await;
        server.answer(404, "nothing here".to_owned());
        let message = load_error(&config(dir.path(), &server.url(), "")).await;
        assert!(message.contains("issuer `idp`"), "{message}");
        assert!(message.contains(&server.url()), "{message}");
        assert!(message.contains("HTTP status 404 Not Found"), "{message}");
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_url_or_a_bad_body_at_load_is_an_error() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let server = JwksServer::http(&json!({})).await;
        let url = server.url();
        server.answer(200, "{not json".to_owned());
        let message = load_error(&config(dir.path(), &url, "")).await;
        assert!(message.contains("not a usable JWKS"), "{message}");

        server.answer(200, " ".repeat(MAX_JWKS_BYTES + 1));
        let message = load_error(&config(dir.path(), &url, "")).await;
        assert!(message.contains("larger than"), "{message}");

        server.stop().await;
        let message = load_error(&config(dir.path(), &url, "")).await;
        assert!(
            message.contains("issuer `idp`") && message.contains(&url),
            "{message}"
        );
    })
    .await;
}

#[test]
fn the_synchronous_constructor_refuses_a_url_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "https://idp.test/jwks", "");
    let message = Issuers::from_config(&config.issuers)
        .unwrap_err()
        .to_string();
    assert!(message.contains("Issuers::load"), "{message}");
}

// --- refresh on an unknown kid ---------------------------------------------------------------------

#[tokio::test]
async fn a_token_with_a_new_kid_validates_after_a_refresh_finds_the_rotated_jwks() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let old = Key::new("old");
        let new = Key::new("new");
        let server = JwksServer::http(&jwks(&[&old])).await;
        let issuers = load(&config(dir.path(), &server.url(), ""))
            .await
            .with_min_reload_interval(Duration::ZERO);

        assert_eq!(validate(&issuers, &new), Err(JwtRefusal::UnknownKid));
        assert!(
            !issuers.refresh_on_unknown_kid().await,
            "nothing rotated yet"
        );

        server.serve_jwks(&jwks(&[&old, &new]));
        assert!(
            issuers.refresh_on_unknown_kid().await,
            "the new key is found"
        );
        assert_eq!(validate(&issuers, &new), Ok(vec!["idp:alice".to_owned()]));
        assert!(validate(&issuers, &old).is_ok());
        assert_eq!(server.served(), 3);
    })
    .await;
}

#[tokio::test]
async fn refreshes_on_unknown_kids_are_rate_limited_and_a_flood_costs_one_request() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let old = Key::new("old");
        let new = Key::new("new");
        let server = JwksServer::http(&jwks(&[&old])).await;
        let interval = Duration::from_millis(500);
        let issuers = Arc::new(
            load(&config(dir.path(), &server.url(), ""))
                .await
                .with_min_reload_interval(interval),
        );
        server.serve_jwks(&jwks(&[&old, &new]));

        // Just loaded: the identity provider is not asked again yet.
        assert!(!issuers.refresh_on_unknown_kid().await);
        assert_eq!(server.served(), 1);
        assert_eq!(validate(&issuers, &new), Err(JwtRefusal::UnknownKid));

        // Once the interval has passed, many connections with unknown kids at once share one
        // fetch.
        tokio::time::sleep(interval).await;
        let mut flood = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let issuers = Arc::clone(&issuers);
            flood.spawn(async move { issuers.refresh_on_unknown_kid().await });
        }
        let changed: Vec<bool> = flood.join_all().await;
        assert!(changed.iter().any(|c| *c), "{changed:?}");
        assert_eq!(server.served(), 2);
        assert_eq!(validate(&issuers, &new), Ok(vec!["idp:alice".to_owned()]));

        // A second refresh right after does not reach the server.
        assert!(!issuers.refresh_on_unknown_kid().await);
        assert_eq!(server.served(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_server_down_at_refresh_keeps_the_previous_keys() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let old = Key::new("old");
        let server = JwksServer::http(&jwks(&[&old])).await;
        let issuers = load(&config(dir.path(), &server.url(), ""))
            .await
            .with_min_reload_interval(Duration::ZERO);
        server.stop().await;

        assert!(!issuers.refresh_on_unknown_kid().await);
        assert_eq!(validate(&issuers, &old), Ok(vec!["idp:alice".to_owned()]));
    })
    .await;
}

// --- periodic refresh ----------------------------------------------------------------------------

#[tokio::test]
async fn the_periodic_refresh_picks_up_a_rotation_and_drops_withdrawn_keys() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let old = Key::new("old");
        let new = Key::new("new");
        let mut server = JwksServer::http(&jwks(&[&old])).await;
        let config = refreshing_every(
            config(dir.path(), &server.url(), ""),
            Duration::from_millis(100),
        );
        let issuers = Arc::new(load(&config).await);
        let refresher = issuers.spawn_refresher();

        let before = server.serve_jwks(&jwks(&[&new]));
        // Request `before + 1` got the new JWKS; once `before + 2` arrives, the refresher has
        // installed it (it fetches, installs, sleeps, fetches).
        server.wait_until_served(before + 2).await;
        assert_eq!(validate(&issuers, &new), Ok(vec!["idp:alice".to_owned()]));
        assert_eq!(validate(&issuers, &old), Err(JwtRefusal::UnknownKid));

        refresher.abort();
        assert!(refresher.await.unwrap_err().is_cancelled());
    })
    .await;
}

#[tokio::test]
async fn a_failing_periodic_refresh_keeps_the_previous_keys_and_recovers() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let old = Key::new("old");
        let new = Key::new("new");
        let mut server = JwksServer::http(&jwks(&[&old])).await;
        let config = refreshing_every(
            config(dir.path(), &server.url(), ""),
            Duration::from_millis(100),
        );
        let issuers = Arc::new(load(&config).await);
        let refresher = issuers.spawn_refresher();

        let before = server.answer(503, "down for maintenance".to_owned());
        server.wait_until_served(before + 2).await;
        assert_eq!(validate(&issuers, &old), Ok(vec!["idp:alice".to_owned()]));

        let before = server.serve_jwks(&jwks(&[&old, &new]));
        server.wait_until_served(before + 2).await;
        assert_eq!(validate(&issuers, &new), Ok(vec!["idp:alice".to_owned()]));
        refresher.abort();
    })
    .await;
}
