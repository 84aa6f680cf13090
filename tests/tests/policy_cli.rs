//! `thingsgate policy test|check`, `--help` and `--version`, run as the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;

use e2e::{stdout, thingsgate, workspace_root};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("thingsgate-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const POLICY: &str = r#"{"policyId":"org.acme:p","entries":{
  "owner":{"subjects":{"google:owner":{"type":"user"}},"resources":{"thing:/":{"grant":["READ","WRITE"],"revoke":[]},"policy:/":{"grant":["READ","WRITE"],"revoke":[]}}},
  "no-secret":{"subjects":{"google:auditor":{"type":"group"}},"resources":{"thing:/attributes":{"grant":["READ"],"revoke":[]},"thing:/attributes/secret":{"grant":[],"revoke":["READ"]}}}}}"#;

#[test]
fn help_and_version_work() {
    let help = thingsgate(&["--help"]);
    assert!(help.status.success());
    assert!(stdout(&help).contains("policy"), "{}", stdout(&help));
    let version = thingsgate(&["--version"]);
    assert!(version.status.success());
    assert!(
        stdout(&version).starts_with("thingsgate "),
        "{}",
        stdout(&version)
    );
}

#[test]
fn policy_test_passes_every_shared_vector() {
    let file = workspace_root().join("policy/tests/data/ditto-policy.jsonl");
    let out = thingsgate(&["policy", "test", file.to_str().unwrap()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().last().unwrap().ends_with(" passed, 0 failed"),
        "{text}"
    );
}

#[test]
fn policy_test_prints_one_line_per_failure_and_exits_non_zero() {
    let dir = temp_dir("vectors");
    let good = r#"{"id":"good","kind":"check","mode":"partial","subjects":["google:auditor"],"resource":"thing:/","permission":"READ","expect":true,"policy":POLICY}"#;
    let bad = r#"{"id":"bad","kind":"check","mode":"unrestricted","subjects":["google:auditor"],"resource":"thing:/attributes","permission":"READ","expect":true,"policy":POLICY}"#;
    let policy_line = POLICY.replace('\n', "");
    let text = [good, bad, "{oops"]
        .map(|l| l.replace("POLICY", &policy_line))
        .join("\n");
    let file = write(&dir, "mine.jsonl", &text);
    let out = thingsgate(&["policy", "test", &file]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("FAIL line 2: bad: expected granted"),
        "{text}"
    );
    assert!(lines[1].contains("ERROR line 3"), "{text}");
    assert_eq!(lines[2], "1 passed, 2 failed");
}

#[test]
fn policy_check_grants_and_explains() {
    let dir = temp_dir("check-grant");
    let policy = write(&dir, "p.json", POLICY);
    let out = thingsgate(&[
        "policy",
        "check",
        "--policy",
        &policy,
        "--subject",
        "google:auditor",
        "--partial",
        "thing:/",
        "READ",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.starts_with("GRANTED (partial READ on thing:/)"),
        "{text}"
    );
    assert!(
        text.contains("thing:/attributes (below) by google:auditor in entry `no-secret`"),
        "{text}"
    );
}

#[test]
fn policy_check_denies_and_names_the_revoke() {
    let dir = temp_dir("check-deny");
    let policy = write(&dir, "p.json", POLICY);
    let out = thingsgate(&[
        "policy",
        "check",
        "--policy",
        &policy,
        "--subject",
        "google:auditor",
        "--subject",
        "google:other",
        "thing:/attributes/secret/pin",
        "READ",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with("DENIED (unrestricted READ on thing:/attributes/secret/pin)"),
        "{text}"
    );
    assert!(
        text.contains("revoke thing:/attributes/secret by google:auditor"),
        "{text}"
    );
}

#[test]
fn policy_check_with_a_permission_set_needs_each_permission_and_explains_each() {
    let dir = temp_dir("check-set");
    let policy = write(&dir, "p.json", POLICY);
    let check = |subject: &str, partial: bool, permissions: &str| {
        let mut args = vec!["policy", "check", "--policy", &policy, "--subject", subject];
        if partial {
            args.push("--partial");
        }
        args.extend(["thing:/attributes", permissions]);
        thingsgate(&args)
    };

    let out = check("google:owner", false, "READ,WRITE");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.starts_with("GRANTED (unrestricted READ+WRITE on thing:/attributes)"),
        "{text}"
    );
    assert!(
        text.contains("\nREAD on thing:/attributes for [google:owner]"),
        "{text}"
    );
    assert!(
        text.contains("\nWRITE on thing:/attributes for [google:owner]"),
        "{text}"
    );

    // The auditor may read the attributes (partially) but never write them.
    let out = check("google:auditor", true, "READ");
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let out = check("google:auditor", true, "WRITE, READ");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with("DENIED (partial READ+WRITE on thing:/attributes)"),
        "{text}"
    );
    assert!(
        text.contains("no entry grants or revokes WRITE for these subjects here"),
        "{text}"
    );

    let out = check("google:owner", false, "READ,FLY");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown permission `FLY`"));
}

#[test]
fn policy_check_refuses_bad_input_with_a_clear_error() {
    let dir = temp_dir("check-bad");
    let broken = write(
        &dir,
        "broken.json",
        r#"{"entries":{"e":{"subjects":{},"resources":{"thing:/":{"grant":["READ","FLY"]}}}}}"#,
    );
    let out = thingsgate(&[
        "policy",
        "check",
        "--policy",
        &broken,
        "--subject",
        "g:a",
        "thing:/",
        "READ",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("/entries/e/resources/thing:~1/grant/1"),
        "{err}"
    );
    assert!(err.contains("unknown permission `FLY`"), "{err}");

    let good = write(&dir, "good.json", POLICY);
    let out = thingsgate(&[
        "policy",
        "check",
        "--policy",
        &good,
        "--subject",
        "g:a",
        "thing:/",
        "FLY",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown permission `FLY`"));

    let out = thingsgate(&[
        "policy",
        "check",
        "--policy",
        "/nonexistent/p.json",
        "--subject",
        "g:a",
        "thing:/",
        "READ",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read policy file"));
}
