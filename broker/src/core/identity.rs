//! `authenticate(credentials) → Identity` (DESIGN.md §2): the three ways in, the same for every
//! transport, each ending in the connection's solution and subjects, or in a [`Refusal`] that
//! each adapter maps to its wire (CONNACK code, AMQP reply code, HTTP status) without saying
//! which part failed.
//!
//! 1. user name = solution ID, password = a solution secret;
//! 2. password = a JWT of a configured issuer; the solution from the issuer's solution claim,
//!    else from the API token (given apart, e.g. MQTT 5 user property `x-cr-api-token`, else
//!    the user name);
//! 3. an explicit token (MQTT 5 enhanced authentication with method `jwt`, HTTP `Bearer`): the
//!    same rules as 2, and the connection may re-authenticate with a fresh token.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::auth::jwt::{Issuers, JwtIdentity, JwtRefusal};
use crate::auth::limiter::{Admission, FailureLimiter};
use crate::auth::solution::{Solution, Solutions};

/// The name of token authentication (MQTT 5 Authentication Method, AMQP SASL mechanism).
pub const JWT_METHOD: &str = "jwt";

/// The name under which a client gives its solution's API token apart from its user name (MQTT
/// 5 user property, AMQP client property, HTTP header).
pub const API_TOKEN_PROPERTY: &str = "x-cr-api-token";

/// Client IDs longer than this are refused.
pub const MAX_CLIENT_ID_LEN: usize = 256;

/// What a client presented, as its transport received it.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The client ID (assigned by the adapter if the client gave none).
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    /// A solution secret or a JWT.
    pub password: Option<&'a [u8]>,
    /// An authentication method the client named (only [`JWT_METHOD`] exists).
    pub method: Option<&'a str>,
    /// The token of that method, if given apart from the password.
    pub token: Option<&'a [u8]>,
    /// The API token, if given apart from the user name.
    pub api_token: Option<&'a str>,
}

impl Credentials<'_> {
    /// The identity these credentials claim, for the failure limiter: the user name (solution ID
    /// or API token) and the client ID, or the API token given apart.
    fn claimed_identity(&self) -> String {
        format!(
            "{}\u{0}{}\u{0}{}",
            self.username.unwrap_or_default(),
            self.api_token.unwrap_or_default(),
            self.client_id
        )
    }
}

/// Who a connection (or request) is: what every later decision about it starts from.
#[derive(Debug, Clone)]
pub struct Identity {
    pub solution: Arc<Solution>,
    /// Its subjects, matched together against policies; shared with its session.
    pub subjects: Arc<[String]>,
    pub client_id: Arc<str>,
    /// When the token expires (JWT connections), in milliseconds since the Unix epoch: the
    /// connection ends then ([`Identity::expires_at`]). Eight bytes, not a `SystemTime`'s 16:
    /// the identity is part of every connection.
    pub expiry: Option<std::num::NonZeroU64>,
    /// Authenticated with method `jwt`: may re-authenticate with a fresh token.
    pub jwt_method: bool,
    /// The number of the solution secret it authenticated with (`s3` → 3): revoking it ends
    /// the connection.
    pub secret: Option<std::num::NonZeroU32>,
}

impl Identity {
    /// When the token expires (JWT connections): the connection ends then.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expiry
            .map(|ms| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.get()))
    }
}

/// `at` as [`Identity::expiry`] (an instant before 1970 as its first millisecond).
fn expiry_millis(at: SystemTime) -> Option<std::num::NonZeroU64> {
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    std::num::NonZeroU64::new(ms.max(1))
}

/// Why authentication failed; the label goes to metrics and debug logs, never to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Credentials present but wrong (secret, token): "bad user name or password".
    BadCredentials(&'static str),
    /// No way to tell the solution, no credentials, or an expired token: "not authorized".
    NotAuthorized(&'static str),
    /// An authentication method other than `jwt`.
    BadAuthenticationMethod,
    /// Too many failures from this address.
    RateLimited,
    /// The client ID is not acceptable (too long).
    BadClientId,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadCredentials(reason) | Refusal::NotAuthorized(reason) => reason,
            Refusal::BadAuthenticationMethod => "bad_authentication_method",
            Refusal::RateLimited => "rate_limited",
            Refusal::BadClientId => "client_id_rejected",
        }
    }
}

/// A re-authentication that cannot keep the connection open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReauthRefusal {
    /// The token is not valid.
    Invalid(&'static str),
    /// A valid token of another solution or other subjects.
    OtherIdentity,
}

/// Everything authentication needs, shared by all connections.
#[derive(Debug)]
pub struct Authenticator {
    pub solutions: Arc<Solutions>,
    pub issuers: Arc<Issuers>,
    pub limiter: FailureLimiter,
    /// Who may create solutions (`[[operator]]` in the config).
    pub operators: Vec<crate::config::OperatorConfig>,
}

/// The name an operator gives as user name: `operator/<name>` (a `/` is in no solution ID).
pub const OPERATOR_PREFIX: &str = "operator/";

/// The number of secret ID `s<n>` (`None` for any other form).
pub fn secret_number(secret_id: &str) -> Option<u32> {
    secret_id.strip_prefix('s')?.parse().ok().filter(|&n| n > 0)
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
    /// Authenticates `credentials` from `peer`. Failures are recorded for the rate limiter. A
    /// token that expired is refused ("not authorized").
    pub async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
        peer: IpAddr,
    ) -> Result<Identity, Refusal> {
        if credentials.client_id.len() > MAX_CLIENT_ID_LEN {
            return Err(Refusal::BadClientId);
        }
        // The identity a client claims: the limiter slows a brute force on it without touching
        // its neighbours behind the same address (`crate::auth::limiter`).
        let claimed = credentials.claimed_identity();
        match self.limiter.admit(peer, &claimed, Instant::now()) {
            Admission::Allowed => {}
            Admission::Limited { .. } => return Err(Refusal::RateLimited),
            Admission::Slowed { delay } => tokio::time::sleep(delay).await,
        }
        let result = self.check(credentials).await.and_then(|identity| {
            if identity
                .expires_at()
                .is_some_and(|at| at <= SystemTime::now())
            {
                Err(Refusal::NotAuthorized("expired"))
            } else {
                Ok(identity)
            }
        });
        match &result {
            Ok(_) => self.limiter.record_success(peer, &claimed),
            Err(_) => self.limiter.record_failure(peer, &claimed, Instant::now()),
        }
        result
    }

    async fn check(&self, credentials: &Credentials<'_>) -> Result<Identity, Refusal> {
        let password = credentials
            .password
            .map(|p| {
                std::str::from_utf8(p).map_err(|_| Refusal::BadCredentials("password_not_utf8"))
            })
            .transpose()?;
        if let Some(method) = credentials.method {
            if method != JWT_METHOD {
                return Err(Refusal::BadAuthenticationMethod);
            }
            let token = match credentials.token {
                Some(data) => std::str::from_utf8(data)
                    .map_err(|_| Refusal::BadCredentials("token_not_utf8"))?,
                None => password.ok_or(Refusal::NotAuthorized("no_token"))?,
            };
            let mut identity = self.with_token(credentials, token).await?;
            identity.jwt_method = true;
            return Ok(identity);
        }
        let Some(password) = password else {
            return Err(Refusal::NotAuthorized("no_credentials"));
        };
        if !self.issuers.is_empty() && looks_like_jwt(password) {
            return self.with_token(credentials, password).await;
        }
        let Some(username) = credentials.username else {
            return Err(Refusal::NotAuthorized("no_solution"));
        };
        let (subjects, secret_id) = self
            .solutions
            .check_secret(username, password, credentials.client_id)
            .map_err(|refusal| Refusal::BadCredentials(refusal.as_str()))?;
        let solution = self
            .solutions
            .get(username)
            .ok_or(Refusal::BadCredentials("unknown_solution"))?;
        Ok(Identity {
            solution,
            subjects: subjects.into_vec().into(),
            client_id: credentials.client_id.into(),
            expiry: None,
            jwt_method: false,
            secret: secret_number(&secret_id).and_then(std::num::NonZeroU32::new),
        })
    }

    /// Validates a token (re-reading the issuers' keys once on an unknown `kid`) and finds its
    /// solution.
    async fn with_token(
        &self,
        credentials: &Credentials<'_>,
        token: &str,
    ) -> Result<Identity, Refusal> {
        let jwt = self.validate_token(token).await?;
        let solution = match &jwt.solution {
            Some(id) => self
                .solutions
                .get(id)
                .ok_or(Refusal::NotAuthorized("unknown_solution_claim"))?,
            None => {
                let api_token = credentials
                    .api_token
                    .or(credentials.username)
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
            subjects: jwt.subjects.into(),
            client_id: credentials.client_id.into(),
            expiry: expiry_millis(jwt.expires_at),
            jwt_method: false,
            secret: None,
        })
    }

    /// An operator's credentials (user name `operator/<name>`, its secret) from `peer`: its
    /// subject `operator:<name>`. Limited like every other authentication.
    pub async fn authenticate_operator(
        &self,
        username: &str,
        secret: &str,
        peer: IpAddr,
    ) -> Result<String, Refusal> {
        let claimed = format!("{username}\u{0}operator");
        match self.limiter.admit(peer, &claimed, Instant::now()) {
            Admission::Allowed => {}
            Admission::Limited { .. } => return Err(Refusal::RateLimited),
            Admission::Slowed { delay } => tokio::time::sleep(delay).await,
        }
        let name = username.strip_prefix(OPERATOR_PREFIX).unwrap_or_default();
        let candidate = crate::auth::secret::Digest::of(secret);
        // Every operator's digest is compared, in constant time, whatever matches.
        let mut found = false;
        for operator in &self.operators {
            let digest_matches =
                crate::auth::secret::verify_digest(&candidate, &operator.secret_digest);
            found |= digest_matches && operator.name == name;
        }
        if found {
            self.limiter.record_success(peer, &claimed);
            Ok(format!("operator:{name}"))
        } else {
            self.limiter.record_failure(peer, &claimed, Instant::now());
            Err(Refusal::BadCredentials("wrong_operator_secret"))
        }
    }

    /// Re-authentication of `identity` with a fresh token (DESIGN.md §2): the same solution
    /// and the same subjects; the connection then lives until the new token's expiry, which
    /// is written into `identity`. An unknown `kid` re-reads the issuers' keys once, as at
    /// connect.
    pub async fn reauthenticate(
        &self,
        identity: &mut Identity,
        token: &str,
    ) -> Result<(), ReauthRefusal> {
        let jwt: JwtIdentity = self
            .validate_token(token)
            .await
            .map_err(|refusal| ReauthRefusal::Invalid(refusal.label()))?;
        let same_solution = jwt
            .solution
            .as_deref()
            .is_none_or(|s| s == identity.solution.id.as_str());
        let mut old: Vec<&str> = identity.subjects.iter().map(String::as_str).collect();
        let mut new: Vec<&str> = jwt.subjects.iter().map(String::as_str).collect();
        old.sort_unstable();
        new.sort_unstable();
        if !same_solution || old != new {
            return Err(ReauthRefusal::OtherIdentity);
        }
        identity.expiry = expiry_millis(jwt.expires_at);
        Ok(())
    }

    /// Validates a token at the current time; on an unknown `kid` the keys are re-read
    /// (rate-limited) and the token checked once more.
    pub async fn validate_token(&self, token: &str) -> Result<JwtIdentity, Refusal> {
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
