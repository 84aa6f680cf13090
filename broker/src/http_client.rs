//! The HTTP client of the online commands (`thingsgate connection --http`, `thingsgate bench
//! provision`): a running server's API for one solution, authenticated with
//! `Authorization: Basic` and a secret of the solution taken from the environment variable
//! [`SECRET_ENV`] — never from the command line, where every user of the machine would see it
//! in `ps`.
//!
//! Plain HTTP/1 (hyper-util's client), bounded everywhere: connecting ([`CONNECT_TIMEOUT`]),
//! each request ([`REQUEST_TIMEOUT`], enforced by the caller around [`Api::send`]) and each
//! answer's size ([`MAX_ANSWER_BYTES`]). An error answer becomes a [`Refused`] carrying the
//! Ditto error's code, message and description. The secret is never part of a message, and
//! [`Api`]'s `Debug` leaves the `Authorization` header out.

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::auth::solution::SolutionId;

/// The environment variable holding the secret of `--http` commands.
pub(crate) const SECRET_ENV: &str = "THINGSGATE_SECRET";
/// How long connecting to the server may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, connecting included.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest answer read (a solution has at most 100 connections; a thing or policy is
/// far smaller).
pub(crate) const MAX_ANSWER_BYTES: usize = 4 << 20;

/// The hyper client the commands send with.
pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The secret in [`SECRET_ENV`], or an error saying how to give it.
pub(crate) fn secret_from_env(solution: &SolutionId) -> anyhow::Result<String> {
    match std::env::var(SECRET_ENV) {
        Ok(secret) if !secret.is_empty() => Ok(secret),
        Ok(_) | Err(std::env::VarError::NotPresent) => bail!(
            "`--http` needs a secret of solution `{solution}` in the environment variable \
             {SECRET_ENV} (it is not taken from the command line, where `ps` would show it)"
        ),
        Err(std::env::VarError::NotUnicode(_)) => bail!("{SECRET_ENV} is not UTF-8"),
    }
}

/// A checked `--http` URL: plain `http://host:port[/prefix]`, without credentials or query.
#[derive(Debug, Clone)]
pub(crate) struct BaseUrl {
    /// `http://host:port[/prefix]`, without a final `/`.
    full: String,
    /// The host as written, IPv6 addresses without their brackets.
    host: String,
}

impl BaseUrl {
    /// Checks `url` (`http://` may be left out). `command` names the command in the message
    /// refusing https (`thingsgate connection`).
    pub(crate) fn parse(url: &str, command: &str) -> anyhow::Result<Self> {
        let url = url.trim().trim_end_matches('/');
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let parsed: hyper::Uri = full
            .parse()
            .map_err(|e| anyhow!("`--http {url}` is not a URL: {e}"))?;
        match parsed.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "`--http`: https is not supported by `{command}` yet; use the \
                 server's plain HTTP address (e.g. on the same host, or through an SSH tunnel)"
            ),
            _ => bail!("`--http`: the URL must start with `http://`"),
        }
        let Some(authority) = parsed.authority() else {
            bail!("`--http`: the URL names no host, e.g. `http://127.0.0.1:8080`");
        };
        if authority.as_str().contains('@') {
            // Not echoed: it may hold a password.
            bail!("`--http`: put no credentials in the URL; the secret comes from {SECRET_ENV}");
        }
        if parsed.query().is_some() {
            bail!("`--http`: the URL takes no query, e.g. `http://127.0.0.1:8080`");
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(BaseUrl { full, host })
    }

    /// `http://host:port[/prefix]`, without a final `/`.
    pub(crate) fn as_str(&self) -> &str {
        &self.full
    }

    /// The host as written (IPv6 without brackets).
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// Whether the host is this machine: `localhost` or a loopback address. A name other than
    /// `localhost` is not resolved: it counts as remote.
    pub(crate) fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// A running server's API for one solution.
pub(crate) struct Api {
    base: BaseUrl,
    solution: SolutionId,
    /// `Basic …`: holds the secret, so this type's `Debug` leaves it out.
    authorization: String,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base.full)
            .field("solution", &self.solution)
            .finish_non_exhaustive()
    }
}

/// The server answered with an error status.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) status: u16,
    pub(crate) message: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

/// Percent-encodes one path segment.
pub(crate) fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An error with its causes, `: `-separated (hyper's own message is only "client error
/// (Connect)").
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

/// A client keeping up to `idle` connections open between requests (0: one connection per
/// request). It must be used within one tokio runtime: pooled connections belong to it.
pub(crate) fn client(idle: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(idle)
        .build(connector)
}

impl Api {
    /// The API at `base` for `solution`, with the secret `secret` gives.
    pub(crate) fn new(
        base: BaseUrl,
        solution: &SolutionId,
        secret: impl FnOnce(&SolutionId) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let secret = secret(solution)?;
        let authorization = format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{secret}", solution.as_str()))
        );
        Ok(Api {
            base,
            solution: solution.clone(),
            authorization,
        })
    }

    /// `http://host:port[/prefix]`, without a final `/`.
    pub(crate) fn base(&self) -> &str {
        self.base.as_str()
    }

    pub(crate) fn solution(&self) -> &SolutionId {
        &self.solution
    }

    /// Sends `method url` with `body` (JSON) through `client`: the status and the whole
    /// answer (at most [`MAX_ANSWER_BYTES`]), or why the server could not be asked. Not
    /// bounded in time: the caller puts it under [`REQUEST_TIMEOUT`].
    pub(crate) async fn send(
        &self,
        client: &HttpClient,
        method: hyper::Method,
        url: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(hyper::StatusCode, Bytes)> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header(hyper::header::AUTHORIZATION, &self.authorization)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("thingsgate/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| anyhow!("cannot build the request to {url}: {e}"))?;
        let response = client.request(request).await.map_err(|e| {
            anyhow!(
                "cannot reach the server at {}: {}",
                self.base(),
                error_chain(&e)
            )
        })?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow!("cannot read the answer of {url}: {e}"))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// An error answer as a message: the Ditto error's code, message and description.
    pub(crate) fn refusal(&self, status: hyper::StatusCode, body: &[u8]) -> Refused {
        let error: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let field = |k: &str| error.get(k).and_then(Value::as_str);
        let message = match status.as_u16() {
            401 => format!(
                "the server at {} did not accept the credentials: is `{}` the solution, and \
                 {SECRET_ENV} one of its active secrets?",
                self.base(),
                self.solution
            ),
            429 => format!(
                "the server at {} is slowing down this address after failed \
                 authentications; wait a moment (and check {SECRET_ENV})",
                self.base()
            ),
            code => {
                let mut message = format!("the server refused ({code}");
                if let Some(error) = field("error") {
                    message.push(' ');
                    message.push_str(error);
                }
                message.push(')');
                match field("message") {
                    Some(text) => {
                        message.push_str(": ");
                        message.push_str(text);
                    }
                    None => {
                        let text = String::from_utf8_lossy(body);
                        let text = text.trim();
                        if !text.is_empty() {
                            message.push_str(": ");
                            message.extend(text.chars().take(300));
                        }
                    }
                }
                if let Some(description) = field("description") {
                    message.push_str(" — ");
                    message.push_str(description);
                }
                message
            }
        };
        Refused {
            status: status.as_u16(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn api(url: &str) -> anyhow::Result<Api> {
        let id = SolutionId::parse("acme").unwrap();
        Api::new(BaseUrl::parse(url, "thingsgate connection")?, &id, |_| {
            Ok("s3cr3t".to_owned())
        })
    }

    #[test]
    fn urls_are_plain_http_without_credentials() {
        let a = api("127.0.0.1:8080/").unwrap();
        assert_eq!(a.base(), "http://127.0.0.1:8080");
        assert!(!format!("{a:?}").contains("Basic"));
        let e = api("https://h").unwrap_err().to_string();
        assert!(
            e.contains("https") && e.contains("thingsgate connection"),
            "{e}"
        );
        let e = api("http://u:pw@h").unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
        assert!(api("ftp://h").is_err());
        assert!(api("http://h/?q=1").is_err());
        assert_eq!(segment("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn only_localhost_and_loopback_addresses_are_loopback() {
        for local in [
            "127.0.0.1:8080",
            "http://127.8.9.10",
            "localhost:1",
            "LOCALHOST",
            "[::1]:8080",
        ] {
            assert!(BaseUrl::parse(local, "x").unwrap().is_loopback(), "{local}");
        }
        for remote in [
            "10.0.0.1:8080",
            "example.com",
            "localhost.example.com",
            "[::2]:1",
            "0.0.0.0:80",
        ] {
            assert!(
                !BaseUrl::parse(remote, "x").unwrap().is_loopback(),
                "{remote}"
            );
        }
        assert_eq!(BaseUrl::parse("[::1]:8", "x").unwrap().host(), "::1");
    }

    #[test]
    fn refusals_carry_the_ditto_error() {
        let a = api("http://h").unwrap();
        let body = br#"{"status":400,"error":"connectivity:connection.configuration.invalid","message":"`uri`: bad"}"#;
        let r = a.refusal(hyper::StatusCode::BAD_REQUEST, body);
        assert_eq!(r.status, 400);
        assert!(
            r.message
                .contains("400 connectivity:connection.configuration.invalid): `uri`: bad"),
            "{}",
            r.message
        );
        let r = a.refusal(hyper::StatusCode::UNAUTHORIZED, b"{}");
        assert!(r.message.contains(SECRET_ENV), "{}", r.message);
    }
}
