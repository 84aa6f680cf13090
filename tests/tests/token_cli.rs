//! `thingsgate token`: minting a JWT from a PKCS#8 PEM key, run as the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::Command;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use e2e::thingsgate_bin;
use serde_json::{Value, json};

fn p256_pem() -> String {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let body = STANDARD.encode(pkcs8.as_ref());
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

fn part(token: &str, i: usize) -> Value {
    let segment = token.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
}

#[test]
fn token_mints_an_es256_jwt_with_the_requested_claims() {
    let dir = std::env::temp_dir().join(format!("thingsgate-e2e-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("dev.pem");
    std::fs::write(&key, p256_pem()).unwrap();
    let out = Command::new(thingsgate_bin())
        .args([
            "token",
            "--key",
            key.to_str().unwrap(),
            "--iss",
            "https://dev.local",
            "--sub",
            "alice",
        ])
        .args([
            "--aud",
            "thingsgate",
            "--claim",
            r#"groups=["ops","audit"]"#,
            "--claim",
            "azp=app",
            "--ttl",
            "15m",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3);
    let header = part(token, 0);
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].as_str().is_some_and(|k| !k.is_empty()));
    let claims = part(token, 1);
    assert_eq!(claims["iss"], "https://dev.local");
    assert_eq!(claims["sub"], "alice");
    assert!(
        claims["aud"] == json!("thingsgate") || claims["aud"] == json!(["thingsgate"]),
        "{claims}"
    );
    assert_eq!(claims["groups"], json!(["ops", "audit"]));
    assert_eq!(claims["azp"], "app");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );
}

#[test]
fn token_refuses_a_key_that_is_not_pkcs8_pem() {
    let dir = std::env::temp_dir().join(format!("thingsgate-e2e-token-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("bad.pem");
    std::fs::write(&key, "not a key").unwrap();
    let out = Command::new(thingsgate_bin())
        .args([
            "token",
            "--key",
            key.to_str().unwrap(),
            "--iss",
            "i",
            "--sub",
            "s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
}
