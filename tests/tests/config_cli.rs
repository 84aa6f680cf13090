//! `thingsgate config check FILE` as an operator meets it: `ok` for a file `serve` starts with,
//! and for a bad one an error naming the file, the line and column and what is wrong — the same
//! error `serve --config` stops with.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use e2e::issuer::dev_issuer;
use e2e::{stderr, stdout, thingsgate_bin};

/// Runs `thingsgate config check FILE` with `env` (and no inherited `THINGSGATE_…` variable).
fn check(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(thingsgate_bin());
    command.args(["config", "check"]).arg(file);
    for (name, _) in std::env::vars() {
        if name.starts_with("THINGSGATE_") && name != "THINGSGATE_BIN" {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("thingsgate runs")
}

/// A directory with a JWKS file, a TLS certificate and key, and a config using them.
fn good_setup() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    dev_issuer().write_jwks(&dir.path().join("jwks.json"), &[]);
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        certified.signing_key.serialize_pem(),
    )
    .unwrap();
    let config = format!(
        "# a config as an operator writes it\n\
         {}\n\
         [mqtt]\n\
         listen = [\"127.0.0.1:0\"]\n\
         tls_listen = \"127.0.0.1:0\"\n\
         tls_cert_file = \"cert.pem\"\n\
         tls_key_file = \"key.pem\"\n\
         max_inflight = 32\n",
        dev_issuer().config_toml("jwks.json")
    );
    (dir, config)
}

#[test]
fn a_good_config_is_ok_and_serve_starts_with_it() {
    let (dir, config) = good_setup();
    let file = dir.path().join("thingsgate.toml");
    std::fs::write(&file, &config).unwrap();
    let out = check(&file, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok\n");

    let mut serve = Command::new(thingsgate_bin())
        .args(["serve", "--data"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&file)
        .env("THINGSGATE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(serve.stdout.take().unwrap()));
    let ready = lines.any(|line| line.map(|l| l == "ready").unwrap_or(false));
    let _ = serve.kill();
    let out = serve.wait_with_output().unwrap();
    assert!(ready, "serve did not start: {}", stderr(&out));
}

/// Writes `config` next to the good setup's files and checks it; it must fail.
fn check_fails(config: &str, env: &[(&str, &str)]) -> String {
    let (dir, _) = good_setup();
    let file = dir.path().join("thingsgate.toml");
    std::fs::write(&file, config).unwrap();
    let out = check(&file, env);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stdout(&out), "", "nothing on stdout when the check fails");
    stderr(&out)
}

#[test]
fn each_kind_of_mistake_is_named_with_its_line_and_column() {
    let (_, good) = good_setup();
    let cases: [(String, &str, &[&str]); 8] = [
        (
            good.replace("max_inflight = 32", "max_inflite = 32"),
            "line 15, column 1",
            &["unknown field `max_inflite`", "max_inflite = 32"],
        ),
        (
            good.replace("max_inflight = 32", "max_inflight = \"32\""),
            "line 15, column 16",
            &["invalid type: string \"32\", expected u16"],
        ),
        (
            good.replace("max_inflight = 32", "max_inflight = 0"),
            "line 15, column 16",
            &["[mqtt] field `max_inflight`", "must be at least 1"],
        ),
        (
            good.replace(
                "leeway_seconds = 0",
                "leeway_seconds = 0\nalgorithms = [\"HS256\"]",
            ),
            "line 8, column 14",
            &["field `algorithms`", "`HS256` is symmetric"],
        ),
        (
            good.replace(
                "leeway_seconds = 0",
                "leeway_seconds = 0\nalgorithms = [\"XS1\"]",
            ),
            "line 8, column 14",
            &["unknown algorithm `XS1`"],
        ),
        (
            good.replace("jwks.json", "missing.json"),
            "line 6, column 13",
            &["field `jwks_file`", "missing.json"],
        ),
        (
            good.replace("key.pem", "cert.pem"),
            "line 14, column 16",
            &["field `tls_key_file`", "cert.pem"],
        ),
        (
            good.replace("listen = [\"127.0.0.1:0\"]", "listen = [\"127.0.0.1\"]"),
            "line 11, column 11",
            &["field `listen`", "`127.0.0.1` is not a listen address"],
        ),
    ];
    for (config, at, words) in cases {
        let text = check_fails(&config, &[]);
        assert!(
            text.contains("thingsgate.toml`"),
            "the file is named: {text}"
        );
        assert!(text.contains(at), "`{at}` expected: {text}");
        for word in words {
            assert!(text.contains(word), "`{word}` expected: {text}");
        }
    }
}

#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    let (_, good) = good_setup();
    let text = check_fails(&good, &[("THINGSGATE_MQTT_MAX_PACKET_SIZE", "10")]);
    assert!(
        text.contains("(set by THINGSGATE_MQTT_MAX_PACKET_SIZE)"),
        "{text}"
    );
    let text = check_fails(&good, &[("THINGSGATE_ISSUER_DEV_ALGORITHMS", "none")]);
    assert!(
        text.contains("(set by THINGSGATE_ISSUER_DEV_ALGORITHMS)"),
        "{text}"
    );
    let text = check_fails(&good, &[("THINGSGATE_MQTT_MAX_INFLITE", "1")]);
    assert!(
        text.contains("environment variable `THINGSGATE_MQTT_MAX_INFLITE`: names no field"),
        "{text}"
    );
}

#[test]
fn serve_stops_with_the_same_error_as_config_check() {
    let (dir, good) = good_setup();
    let file = dir.path().join("thingsgate.toml");
    std::fs::write(&file, good.replace("max_inflight = 32", "max_inflight = 0")).unwrap();
    let checked = stderr(&check(&file, &[]));
    let out = Command::new(thingsgate_bin())
        .args(["serve", "--data"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&file)
        .env("THINGSGATE_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), checked);
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&dir.path().join("nope.toml"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read config file"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("nope.toml"), "{}", stderr(&out));
}
