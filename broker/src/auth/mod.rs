//! Authentication: turning credentials into a solution and the subjects policies match.
//!
//! # Layout
//! - [`secret`]: generated secrets and API tokens, their SHA-256 digests, constant-time checks.
//! - [`solution`]: solutions (tenants) as stored in the twin store, the in-memory
//!   [`solution::Solutions`] registry, and authentication with a solution secret or API token.
//! - [`limiter`]: rate limiting of failed attempts per source address.
//! - [`jwt`]: JWTs from configured issuers: signature (JWKS, `kid`), algorithm allow-list,
//!   `iss`/`aud`/`exp`/`nbf`, and the subjects from each issuer's templates.

pub mod jwt;
pub(crate) mod limiter;
pub(crate) mod secret;
pub mod solution;

use std::fmt;

/// The subjects of one authenticated connection or request (`issuer:id` strings, DESIGN.md §1),
/// matched together against policies. Shared by every credential kind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subjects(Vec<String>);

impl Subjects {
    pub fn new(subjects: Vec<String>) -> Self {
        Subjects(subjects)
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn contains(&self, subject: &str) -> bool {
        self.0.iter().any(|s| s == subject)
    }
}

impl fmt::Display for Subjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}
