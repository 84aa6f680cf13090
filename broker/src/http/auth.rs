//! Who an HTTP request is from (DESIGN.md §2, the seed's "solution identification"): the
//! `Authorization` header turned into the core's [`Credentials`] — `Basic` with solution ID and
//! secret, or `Bearer` with a JWT whose solution comes from its claim or from the
//! `x-cr-api-token` header — and authenticated by [`Core::authenticate`], which counts and
//! rate-limits failures per source address and claimed identity as for MQTT. The API token
//! alone grants nothing: a request without `Authorization` is 401.

use std::net::IpAddr;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;

use crate::core::identity::{API_TOKEN_PROPERTY, JWT_METHOD};
use crate::core::{Core, Credentials, Identity, Refusal};

/// The challenge of a 401: both schemes the API takes.
pub const CHALLENGE: &str = r#"Basic realm="thingsgate", Bearer realm="thingsgate""#;

/// Why a request is not served: 401 (or 429 while its source is slowed down), with Ditto's
/// gateway error and never a hint of which part failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unauthenticated {
    pub rate_limited: bool,
}

impl IntoResponse for Unauthenticated {
    fn into_response(self) -> Response {
        if self.rate_limited {
            let body = json!({
                "status": 429,
                "error": "gateway:request.toomany",
                "message": "Too many failed authentication attempts.",
                "description": "Wait a moment before trying again."
            });
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                axum::Json(body),
            )
                .into_response();
        }
        let body = json!({
            "status": 401,
            "error": "gateway:authentication.failed",
            "message": "The request could not be authenticated.",
            "description": "Send `Authorization: Basic <solutionId:secret>`, or `Authorization: Bearer <JWT>` with the `x-cr-api-token` header unless the token names its solution."
        });
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, CHALLENGE)],
            axum::Json(body),
        )
            .into_response()
    }
}

/// The parts of the `Authorization` header, owned (the core borrows them).
#[derive(Debug, Default)]
struct Presented {
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
    api_token: Option<String>,
}

fn presented(headers: &HeaderMap) -> Option<Presented> {
    let api_token = headers
        .get(API_TOKEN_PROPERTY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = authorization.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD.decode(rest).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, secret) = text.split_once(':')?;
        return Some(Presented {
            username: Some(user.to_owned()),
            password: Some(secret.to_owned()),
            token: None,
            api_token,
        });
    }
    if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        return Some(Presented {
            token: Some(rest.to_owned()),
            api_token,
            ..Presented::default()
        });
    }
    None
}

/// An operator's request (`Authorization: Basic operator/<name>:<secret>`): its subject.
pub async fn authenticate_operator(
    core: &Core,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<String, Unauthenticated> {
    let operator = presented(headers).and_then(|p| {
        let username = p.username?;
        username
            .starts_with(crate::core::identity::OPERATOR_PREFIX)
            .then_some((username, p.password?))
    });
    let Some((username, secret)) = operator else {
        core.metrics.refused("no_operator_credentials");
        return Err(Unauthenticated {
            rate_limited: false,
        });
    };
    core.auth
        .authenticate_operator(&username, &secret, peer)
        .await
        .map_err(|refusal| {
            core.metrics.refused(refusal.label());
            Unauthenticated {
                rate_limited: refusal == Refusal::RateLimited,
            }
        })
}

/// Authenticates the request's credentials from `peer`.
pub async fn authenticate(
    core: &Core,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<Identity, Unauthenticated> {
    let Some(p) = presented(headers) else {
        core.metrics.refused("no_credentials");
        return Err(Unauthenticated {
            rate_limited: false,
        });
    };
    let credentials = Credentials {
        client_id: "",
        username: p.username.as_deref(),
        password: p.password.as_deref().map(str::as_bytes),
        method: p.token.as_ref().map(|_| JWT_METHOD),
        token: p.token.as_deref().map(str::as_bytes),
        api_token: p.api_token.as_deref(),
    };
    core.authenticate(&credentials, peer)
        .await
        .map_err(|refusal| Unauthenticated {
            rate_limited: refusal == Refusal::RateLimited,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                *name,
                HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("")),
            );
        }
        map
    }

    #[test]
    fn basic_gives_solution_and_secret_and_bearer_gives_a_token() {
        let basic = presented(&headers(&[("authorization", "Basic c29sOnNlYzpyZXQ=")]));
        let basic = basic.map(|p| (p.username, p.password, p.token));
        assert_eq!(
            basic,
            Some((Some("sol".into()), Some("sec:ret".into()), None)),
            "the secret is everything after the first colon"
        );
        let bearer = presented(&headers(&[
            ("authorization", "Bearer eyJ.a.b"),
            ("x-cr-api-token", "tok"),
        ]));
        let bearer = bearer.map(|p| (p.username, p.token, p.api_token));
        assert_eq!(
            bearer,
            Some((None, Some("eyJ.a.b".into()), Some("tok".into())))
        );
    }

    #[test]
    fn the_api_token_alone_or_a_broken_header_presents_nothing() {
        assert!(presented(&headers(&[("x-cr-api-token", "tok")])).is_none());
        assert!(presented(&headers(&[("authorization", "Basic !!!")])).is_none());
        assert!(presented(&headers(&[("authorization", "Basic bm9jb2xvbg==")])).is_none());
        assert!(presented(&headers(&[("authorization", "Bearer ")])).is_none());
        assert!(presented(&headers(&[("authorization", "Digest x")])).is_none());
    }
}
