//! Generated secrets (solution secrets, API tokens) and the SHA-256 digests we store instead.
//!
//! A [`Secret`] is [`SECRET_BYTES`] bytes from the operating system's random generator
//! (aws-lc-rs `SystemRandom`), written as URL-safe base64 without padding (43 characters). It
//! is shown to its owner once and never stored: the store keeps its [`Digest`], the SHA-256 of
//! the secret's **text** (the base64 string, as the client sends it), written as 64 lowercase
//! hex digits. [`verify`] hashes a candidate and compares the two digests in constant time
//! (aws-lc-rs `verify_slices_are_equal`), so the time taken does not depend on how many
//! leading bytes match.
//!
//! Why a plain SHA-256 and not a slow password hash: the secrets are 256 random bits, not
//! human-chosen passwords, so there is nothing to brute-force, and a connect must stay cheap.

use std::fmt;

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// How many random bytes a generated secret holds (DESIGN.md §1: at least 32).
pub const SECRET_BYTES: usize = 32;

/// Why a secret could not be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the operating system's random generator failed")]
pub struct RandomError;

/// A generated secret value. Its `Debug` prints `Secret(…)`; it has no `Display`, so it cannot
/// end up in a log line or an error message by accident: [`Secret::expose`] is the one way to
/// read it, for showing it to its owner once.
pub struct Secret(String);

impl Secret {
    /// A new secret of [`SECRET_BYTES`] random bytes.
    pub fn generate() -> Result<Self, RandomError> {
        let bytes = random_bytes::<SECRET_BYTES>()?;
        Ok(Secret(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The secret's text, to show to its owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest to store in place of the secret.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.0)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Lowercase hexadecimal, two digits per byte.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(text, "{b:02x}");
    }
    text
}

/// `N` bytes from the operating system's random generator.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| RandomError)?;
    Ok(bytes)
}

/// The SHA-256 of a secret's text. Not secret itself, but still never shown to users (listing
/// digests would only help an attacker that found a way to test guesses offline).
///
/// `Eq` and `Hash` are ordinary (not constant-time): they serve the in-memory API-token index,
/// whose lookups are confirmed with [`verify_digest`]. Checking a candidate secret always goes
/// through [`verify`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

/// Why a stored digest could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a digest must be 64 lowercase hex digits (SHA-256), got {len} characters")]
pub struct DigestFormatError {
    len: usize,
}

impl Digest {
    /// The SHA-256 of `text`'s UTF-8 bytes.
    pub fn of(text: &str) -> Self {
        let mut out = [0u8; 32];
        for (o, b) in out
            .iter_mut()
            .zip(digest(&SHA256, text.as_bytes()).as_ref())
        {
            *o = *b;
        }
        Digest(out)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The stored form: 64 lowercase hex digits.
    pub fn to_hex(self) -> String {
        hex(&self.0)
    }

    /// Reads the stored form (64 lowercase hex digits; anything else is refused).
    pub fn from_hex(text: &str) -> Result<Self, DigestFormatError> {
        let error = || DigestFormatError {
            len: text.chars().count(),
        };
        if text.len() != 64 {
            return Err(error());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            let (hi, lo) = match pair {
                [hi, lo] => (hex_value(*hi), hex_value(*lo)),
                _ => (None, None),
            };
            *o = (hi.ok_or_else(error)? << 4) | lo.ok_or_else(error)?;
        }
        Ok(Digest(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Debug for Digest {
    /// A short prefix: enough to tell digests apart in a debug dump.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        write!(f, "Digest({}…)", hex.get(..8).unwrap_or_default())
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `candidate` is the secret whose digest is `digest`, compared in constant time.
#[cfg(test)]
pub fn verify(candidate: &str, digest: &Digest) -> bool {
    verify_digest(&Digest::of(candidate), digest)
}

/// Whether two digests are equal, compared in constant time.
pub fn verify_digest(a: &Digest, b: &Digest) -> bool {
    constant_time_eq(a.as_bytes(), b.as_bytes())
}

/// Constant-time equality of two byte strings (slices of different lengths are unequal).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::collections::HashSet;

    use super::*;

    #[test]
    fn generated_secrets_hold_32_random_bytes_in_url_safe_base64() {
        let secret = Secret::generate().unwrap();
        assert_eq!(secret.expose().len(), 43);
        let bytes = URL_SAFE_NO_PAD.decode(secret.expose()).unwrap();
        assert_eq!(bytes.len(), SECRET_BYTES);
        assert!(
            secret
                .expose()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn generated_secrets_are_unique() {
        let secrets: HashSet<String> = (0..1000)
            .map(|_| Secret::generate().unwrap().expose().to_owned())
            .collect();
        assert_eq!(secrets.len(), 1000);
    }

    #[test]
    fn debug_of_a_secret_hides_its_value() {
        let secret = Secret::generate().unwrap();
        let debug = format!("{secret:?}");
        assert_eq!(debug, "Secret(…)");
        assert!(!debug.contains(secret.expose()));
        assert!(!format!("{:?}", secret.digest()).contains(&secret.digest().to_hex()));
    }

    #[test]
    fn digest_is_the_sha256_of_the_text_in_lowercase_hex() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Digest::of("abc").to_hex(), hex);
        assert_eq!(Digest::from_hex(hex).unwrap(), Digest::of("abc"));
        assert!(Digest::from_hex(&hex.to_uppercase()).is_err());
        assert!(Digest::from_hex(&hex[..62]).is_err());
        assert!(Digest::from_hex(&format!("{hex}00")).is_err());
        assert!(Digest::from_hex(&format!("{}zz", &hex[..62])).is_err());
        assert!(Digest::from_hex(&format!("{}é", &hex[..62])).is_err());
        let json = serde_json::to_string(&Digest::of("abc")).unwrap();
        assert_eq!(json, format!("\"{hex}\""));
        assert_eq!(
            serde_json::from_str::<Digest>(&json).unwrap(),
            Digest::of("abc")
        );
    }

    #[test]
    fn verify_accepts_the_secret_and_refuses_anything_else() {
        let secret = Secret::generate().unwrap();
        let digest = secret.digest();
        assert!(verify(secret.expose(), &digest));
        let other = Secret::generate().unwrap();
        assert!(!verify(other.expose(), &digest));
        // One character changed, a prefix, a longer text, the empty string.
        let text = secret.expose();
        let flipped = format!(
            "{}{}",
            if text.starts_with('A') { 'B' } else { 'A' },
            &text[1..]
        );
        assert!(!verify(&flipped, &digest));
        assert!(!verify(&text[..42], &digest));
        assert!(!verify(&format!("{text}x"), &digest));
        assert!(!verify("", &digest));
        // The digest itself is not the secret.
        assert!(!verify(&digest.to_hex(), &digest));
    }

    #[test]
    fn comparisons_go_through_the_constant_time_function() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        let a = Digest::of("a");
        assert!(verify_digest(&a, &Digest::of("a")));
        assert!(!verify_digest(&a, &Digest::of("b")));
    }
}
