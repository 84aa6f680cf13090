//! An HTTP client for the API tests (reqwest, no TLS): requests with each kind of credential,
//! answers as status, headers and JSON; every request bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::broker::{Broker, Solution};

/// A started broker with an HTTP listener and the dev JWT issuer (`crate::issuer`); one
/// solution owning `org.acme`; the API client for it.
pub fn started_with_http() -> (Broker, Solution, Api) {
    let issuer = crate::issuer::dev_issuer();
    let mut broker = Broker::new();
    issuer.write_jwks(&broker.dir().join("jwks.json"), &[]);
    broker.write_config(&issuer.config_toml("jwks.json"));
    let solution = broker.create_solution("org.acme");
    broker.arg("--http").arg("127.0.0.1:0");
    broker.start();
    let api = Api::new(http_addr(&broker));
    (broker, solution, api)
}

/// How long one request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(20);

/// The address `serve` printed as `http listening on ADDR` (the broker needs `--http`).
pub fn http_addr(broker: &Broker) -> SocketAddr {
    broker
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("http listening on "))
        .and_then(|a| a.parse().ok())
        .expect("the broker printed `http listening on ADDR` (was it started with --http?)")
}

/// How a request authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    /// `Authorization: Basic solutionId:secret`.
    Basic {
        solution: String,
        secret: String,
    },
    /// `Authorization: Bearer` with the API token in `x-cr-api-token` if given.
    Bearer {
        token: String,
        api_token: Option<String>,
    },
    /// Only `x-cr-api-token` (which must grant nothing).
    ApiTokenOnly(String),
}

impl Auth {
    pub fn basic(solution: &Solution) -> Auth {
        Auth::Basic {
            solution: solution.id.clone(),
            secret: solution.secret.clone(),
        }
    }

    pub fn bearer(token: &str, api_token: Option<&str>) -> Auth {
        Auth::Bearer {
            token: token.to_owned(),
            api_token: api_token.map(str::to_owned),
        }
    }
}

/// An answer: status, headers and the body (JSON if it parses, else `Value::String`).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The Ditto error code of an error answer.
    pub fn error(&self) -> Option<&str> {
        self.body.get("error").and_then(Value::as_str)
    }
}

/// The API of one running broker.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Api {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder()
                .timeout(HTTP_TIMEOUT)
                .build()
                .expect("an HTTP client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request builder for `method path` with `auth`.
    pub fn request(&self, method: Method, path: &str, auth: &Auth) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, self.url(path));
        match auth {
            Auth::None => builder,
            Auth::Basic { solution, secret } => builder.header(
                "authorization",
                format!("Basic {}", STANDARD.encode(format!("{solution}:{secret}"))),
            ),
            Auth::Bearer { token, api_token } => {
                let builder = builder.header("authorization", format!("Bearer {token}"));
                match api_token {
                    Some(t) => builder.header("x-cr-api-token", t),
                    None => builder,
                }
            }
            Auth::ApiTokenOnly(token) => builder.header("x-cr-api-token", token),
        }
    }

    /// Sends a request built by [`Api::request`] and reads the whole answer.
    pub async fn send(&self, builder: reqwest::RequestBuilder) -> Answer {
        let response = builder.send().await.expect("the HTTP request was answered");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("the HTTP body was read");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// [`Api::send`], but a request that fails on the way (connection refused or cut) is
    /// `None` rather than a panic.
    pub async fn try_send(&self, builder: reqwest::RequestBuilder) -> Option<Answer> {
        let response = builder.send().await.ok()?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.ok()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Some(Answer {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> Answer {
        self.send(self.request(Method::GET, path, auth)).await
    }

    pub async fn put(&self, path: &str, auth: &Auth, body: &Value) -> Answer {
        self.send(
            self.request(Method::PUT, path, auth)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn patch(&self, path: &str, auth: &Auth, body: &Value) -> Answer {
        self.send(
            self.request(Method::PATCH, path, auth)
                .header("content-type", "application/merge-patch+json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn post(&self, path: &str, auth: &Auth, body: &Value) -> Answer {
        self.send(
            self.request(Method::POST, path, auth)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn delete(&self, path: &str, auth: &Auth) -> Answer {
        self.send(self.request(Method::DELETE, path, auth)).await
    }
}

/// An open Server-Sent Events stream: events as (id, JSON data), read with a deadline.
#[derive(Debug)]
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl Api {
    /// Opens `GET path` with `Accept: text/event-stream` (and `Last-Event-ID` if given); the
    /// stream must be answered 200.
    pub async fn events(
        &self,
        path: &str,
        auth: &Auth,
        last_event_id: Option<&str>,
    ) -> EventStream {
        let mut builder = self
            .request(Method::GET, path, auth)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            builder = builder.header("last-event-id", id);
        }
        // No overall timeout on a stream: each read below has its own.
        let response = builder
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .expect("the SSE request was answered");
        assert_eq!(
            response.status().as_u16(),
            200,
            "SSE stream refused: {response:?}"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }
}

impl EventStream {
    /// The next event with data, within `within`: its `id` and its data as JSON; `None` if none
    /// came (or the stream ended).
    pub async fn next_within(&mut self, within: Duration) -> Option<(Option<String>, Value)> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let json = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Some((id, json));
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// The next event, which must come within `HTTP_TIMEOUT`.
    pub async fn next(&mut self) -> (Option<String>, Value) {
        self.next_within(HTTP_TIMEOUT)
            .await
            .expect("an SSE event within the timeout")
    }
}
