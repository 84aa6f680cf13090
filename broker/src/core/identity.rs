//! Authentication of an MQTT CONNECT (DESIGN.md §2): the three ways in, each ending in the
//! connection's solution and subjects, or in a [`Refusal`] that maps to a CONNACK code without
//! saying which part failed.
//!
//! 1. user name = solution ID, password = a solution secret;
//! 2. password = a JWT of a configured issuer; the solution from the issuer's solution claim,
//!    else from the API token (MQTT 5 user property `x-cr-api-token`, else the user name);
//! 3. MQTT 5 enhanced authentication with method `jwt`: the token in Authentication Data (or the
//!    password); the same rules as 2, and the connection may re-authenticate with AUTH.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::auth::Subjects;
use crate::auth::jwt::{Issuers, JwtRefusal};
use crate::auth::limiter::{Admission, FailureLimiter};
use crate::auth::solution::{Solution, Solutions};
use crate::mqtt::codec::{Connect, Protocol};

/// The authentication method name of MQTT 5 enhanced authentication with a JWT.
pub const JWT_METHOD: &str = "jwt";

/// The MQTT 5 user property that carries the API token.
pub const API_TOKEN_PROPERTY: &str = "x-cr-api-token";

/// Who a connection is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub solution: Arc<Solution>,
    pub subjects: Subjects,
    /// When the token expires (JWT connections): the connection ends then.
    pub expires_at: Option<SystemTime>,
    /// Authenticated with MQTT 5 method `jwt`: may re-authenticate with AUTH.
    pub jwt_method: bool,
}

/// Why a CONNECT was refused; the label goes to metrics and debug logs, never to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Credentials present but wrong (secret, token): "bad user name or password".
    BadCredentials(&'static str),
    /// No way to tell the solution, or no credentials: "not authorized".
    NotAuthorized(&'static str),
    /// An MQTT 5 authentication method other than `jwt`.
    BadAuthenticationMethod,
    /// Too many failures from this address.
    RateLimited,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadCredentials(reason) | Refusal::NotAuthorized(reason) => reason,
            Refusal::BadAuthenticationMethod => "bad_authentication_method",
            Refusal::RateLimited => "rate_limited",
        }
    }

    /// The CONNACK return code (3.1.1) or reason code (5.0).
    pub fn connack_code(self, protocol: Protocol) -> u8 {
        match (self, protocol) {
            (Refusal::BadCredentials(_), Protocol::V311) => 4,
            (Refusal::BadCredentials(_), Protocol::V5) => 0x86,
            (Refusal::NotAuthorized(_) | Refusal::RateLimited, Protocol::V311) => 5,
            (Refusal::BadAuthenticationMethod, Protocol::V311) => 5,
            (Refusal::NotAuthorized(_), Protocol::V5) => 0x87,
            (Refusal::BadAuthenticationMethod, Protocol::V5) => 0x8C,
            (Refusal::RateLimited, Protocol::V5) => 0x9F,
        }
    }
}

/// Everything authentication needs, shared by all connections.
#[derive(Debug)]
pub struct Authenticator {
    pub solutions: Arc<Solutions>,
    pub issuers: Arc<Issuers>,
    pub limiter: FailureLimiter,
}

/// Whether a password looks like a compact JWS (`xxx.yyy.zzz`, base64url parts).
pub fn looks_like_jwt(text: &str) -> bool {
    text.starts_with("eyJ")
        && text.bytes().filter(|&b| b == b'.').count() == 2
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

impl Authenticator {
    /// Authenticates `connect` from `peer`. `client_id` is the effective client ID (assigned if
    /// the client sent none). Failures are recorded for the rate limiter.
    pub async fn authenticate(
        &self,
        connect: &Connect,
        client_id: &str,
        peer: IpAddr,
    ) -> Result<Identity, Refusal> {
        if let Admission::Limited { .. } = self.limiter.admit(peer, Instant::now()) {
            return Err(Refusal::RateLimited);
        }
        let result = self.check(connect, client_id).await;
        if let Err(refusal) = result
            && refusal != Refusal::RateLimited
        {
            self.limiter.record_failure(peer, Instant::now());
        }
        result
    }

    async fn check(&self, connect: &Connect, client_id: &str) -> Result<Identity, Refusal> {
        let password = connect
            .password
            .as_deref()
            .map(|p| {
                std::str::from_utf8(p).map_err(|_| Refusal::BadCredentials("password_not_utf8"))
            })
            .transpose()?;
        if let Some(method) = &connect.properties.authentication_method {
            if method.as_str() != JWT_METHOD {
                return Err(Refusal::BadAuthenticationMethod);
            }
            let token = match &connect.properties.authentication_data {
                Some(data) => std::str::from_utf8(data)
                    .map_err(|_| Refusal::BadCredentials("token_not_utf8"))?,
                None => password.ok_or(Refusal::NotAuthorized("no_token"))?,
            };
            let mut identity = self.with_token(connect, token).await?;
            identity.jwt_method = true;
            return Ok(identity);
        }
        let Some(password) = password else {
            return Err(Refusal::NotAuthorized("no_credentials"));
        };
        if !self.issuers.is_empty() && looks_like_jwt(password) {
            return self.with_token(connect, password).await;
        }
        let Some(username) = &connect.username else {
            return Err(Refusal::NotAuthorized("no_solution"));
        };
        let subjects = self
            .solutions
            .authenticate_secret(username.as_str(), password, client_id)
            .map_err(|refusal| Refusal::BadCredentials(refusal.as_str()))?;
        let solution = self
            .solutions
            .get(username.as_str())
            .ok_or(Refusal::BadCredentials("unknown_solution"))?;
        Ok(Identity {
            solution,
            subjects,
            expires_at: None,
            jwt_method: false,
        })
    }

    /// Validates a token (re-reading the issuers' keys once on an unknown `kid`) and finds its
    /// solution.
    async fn with_token(&self, connect: &Connect, token: &str) -> Result<Identity, Refusal> {
        let jwt = self.validate_token(token).await?;
        let solution = match &jwt.solution {
            Some(id) => self
                .solutions
                .get(id)
                .ok_or(Refusal::NotAuthorized("unknown_solution_claim"))?,
            None => {
                let api_token = connect
                    .properties
                    .user_properties
                    .iter()
                    .find(|(k, _)| k.as_str() == API_TOKEN_PROPERTY)
                    .map(|(_, v)| v.as_str())
                    .or_else(|| connect.username.as_ref().map(|u| u.as_str()))
                    .ok_or(Refusal::NotAuthorized("no_api_token"))?;
                let id = self
                    .solutions
                    .solution_by_api_token(api_token)
                    .ok_or(Refusal::NotAuthorized("unknown_api_token"))?;
                self.solutions
                    .get(id.as_str())
                    .ok_or(Refusal::NotAuthorized("unknown_api_token"))?
            }
        };
        Ok(Identity {
            solution,
            subjects: Subjects::new(jwt.subjects),
            expires_at: Some(jwt.expires_at),
            jwt_method: false,
        })
    }

    /// Validates a token at the current time; on an unknown `kid` the keys are re-read
    /// (rate-limited) and the token checked once more.
    pub async fn validate_token(
        &self,
        token: &str,
    ) -> Result<crate::auth::jwt::JwtIdentity, Refusal> {
        match self.issuers.validate(token, SystemTime::now()) {
            Ok(identity) => Ok(identity),
            Err(JwtRefusal::UnknownKid) => {
                if self.issuers.refresh_on_unknown_kid().await {
                    self.issuers
                        .validate(token, SystemTime::now())
                        .map_err(|r| Refusal::BadCredentials(r.as_str()))
                } else {
                    Err(Refusal::BadCredentials(JwtRefusal::UnknownKid.as_str()))
                }
            }
            Err(refusal) => Err(Refusal::BadCredentials(refusal.as_str())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_jwt;

    #[test]
    fn jwts_are_told_from_secrets() {
        assert!(looks_like_jwt("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"));
        assert!(!looks_like_jwt("s3cr3t-with.two.dots"));
        assert!(!looks_like_jwt("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhIn0"));
        assert!(!looks_like_jwt("eyJ a.b.c"));
    }
}
