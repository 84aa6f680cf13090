//! `thingsgate solution …`, run as the real binary on a stopped data dir.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};

use e2e::{stderr, stdout, thingsgate};
use serde_json::Value;

/// Runs a command that must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = thingsgate(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Runs a command that must fail with exit code 2; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = thingsgate(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stderr(&out)
}

/// A fresh, empty directory for one test (the data dir is `DIR/data`, created by `create`).
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "thingsgate-e2e-solution-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn data_dir(name: &str) -> (PathBuf, String) {
    let dir = temp_dir(name);
    let data = dir.join("data").to_str().unwrap().to_owned();
    (dir, data)
}

/// `solution create --json` → (solutionId, apiToken, secret).
fn create(data: &str, extra: &[&str]) -> (String, String, String) {
    let mut args = vec!["solution", "create", "--data", data, "--json"];
    args.extend_from_slice(extra);
    let out = ok(&args);
    let doc: Value = serde_json::from_str(&out).unwrap();
    let field = |k: &str| doc[k].as_str().unwrap().to_owned();
    (field("solutionId"), field("apiToken"), field("secret"))
}

/// Every file below `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            found.push((path, bytes));
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn create_json_prints_exactly_the_three_credentials_and_stores_only_digests() {
    let (_dir, data) = data_dir("create-json");
    let out = thingsgate(&[
        "solution",
        "create",
        "--data",
        &data,
        "--namespace",
        "org.acme",
        "--namespace",
        "org.acme.fleet",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let doc: Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<&str> = doc
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 3, "{text}");
    let id = doc["solutionId"].as_str().unwrap();
    let token = doc["apiToken"].as_str().unwrap();
    let secret = doc["secret"].as_str().unwrap();
    assert!(
        id.starts_with("s-") && id.len() == 10,
        "generated ID `{id}`"
    );
    assert_eq!(token.len(), 43);
    assert_eq!(secret.len(), 43);
    assert_ne!(token, secret);
    // What the default policy grants is said, on stderr.
    let err = stderr(&out);
    assert!(err.contains(&format!("`iot-things:{id}`")), "{err}");
    assert!(err.contains("nothing else"), "{err}");

    // A second secret too: neither secrets nor the token are anywhere in the data dir.
    let added: Value = serde_json::from_str(&ok(&[
        "solution",
        "add-secret",
        "--data",
        &data,
        "--solution",
        id,
        "--json",
    ]))
    .unwrap();
    let second = added["secret"].as_str().unwrap();
    let stored = files(Path::new(&data));
    assert!(stored.len() >= 2, "{stored:?}");
    assert!(
        stored.iter().any(|(_, bytes)| contains(bytes, id)),
        "the solution is stored somewhere"
    );
    for (path, bytes) in &stored {
        for value in [token, secret, second] {
            assert!(
                !contains(bytes, value),
                "a credential is stored in clear in {}",
                path.display()
            );
        }
    }
}

#[test]
fn create_with_an_id_prints_the_credentials_once_and_the_default_policy() {
    let (_dir, data) = data_dir("create-text");
    let out = ok(&[
        "solution",
        "create",
        "--data",
        &data,
        "--namespace",
        "org.acme",
        "--id",
        "acme-prod",
    ]);
    assert!(out.starts_with("created solution acme-prod"), "{out}");
    assert!(out.contains("API token: "), "{out}");
    assert!(out.contains("secret s1: "), "{out}");
    assert!(out.contains("not shown again"), "{out}");
    assert!(
        out.contains("`iot-things:acme-prod`") && out.contains("READ and WRITE `topic:/`"),
        "{out}"
    );
    // The same ID twice, a bad ID, a bad namespace: refused, nothing created.
    let err = refused(&[
        "solution",
        "create",
        "--data",
        &data,
        "--namespace",
        "org.other",
        "--id",
        "acme-prod",
    ]);
    assert!(err.contains("solution `acme-prod` already exists"), "{err}");
    let err = refused(&[
        "solution",
        "create",
        "--data",
        &data,
        "--namespace",
        "org.x",
        "--id",
        "Acme",
    ]);
    assert!(err.contains("solution ID `Acme` is invalid"), "{err}");
    let err = refused(&[
        "solution",
        "create",
        "--data",
        &data,
        "--namespace",
        "org-x",
    ]);
    assert!(err.contains("namespace `org-x` is invalid"), "{err}");
    let list = ok(&["solution", "list", "--data", &data, "--json"]);
    let listed: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{list}");
}

#[test]
fn list_shows_namespaces_and_active_secrets_but_never_credentials() {
    let (_dir, data) = data_dir("list");
    let empty = ok(&["solution", "list", "--data", &data.replace("/data", "")]);
    assert_eq!(empty.trim(), "no solutions");
    let (a, a_token, a_secret) = create(&data, &["--namespace", "org.a", "--id", "alpha"]);
    let (b, b_token, b_secret) = create(&data, &["--namespace", "org.b", "--id", "beta"]);
    let json = ok(&["solution", "list", "--data", &data, "--json"]);
    let listed: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        listed,
        serde_json::json!([
            {"solutionId": a, "namespaces": ["org.a"], "activeSecrets": 1},
            {"solutionId": b, "namespaces": ["org.b"], "activeSecrets": 1},
        ])
    );
    let text = ok(&["solution", "list", "--data", &data]);
    assert!(text.contains("alpha") && text.contains("org.b"), "{text}");
    for out in [&json, &text] {
        for credential in [&a_token, &a_secret, &b_token, &b_secret] {
            assert!(!out.contains(credential.as_str()), "{out}");
        }
        assert!(!out.to_lowercase().contains("digest"), "{out}");
    }
}

#[test]
fn secrets_can_be_added_and_revoked_down_to_none() {
    let (_dir, data) = data_dir("secrets");
    let (id, _, _) = create(&data, &["--namespace", "org.acme", "--id", "acme"]);
    let added: Value = serde_json::from_str(&ok(&[
        "solution",
        "add-secret",
        "--data",
        &data,
        "--solution",
        &id,
        "--json",
    ]))
    .unwrap();
    assert_eq!(added["solutionId"], "acme");
    assert_eq!(added["secretId"], "s2");
    assert_eq!(added["secret"].as_str().unwrap().len(), 43);
    let text = ok(&["solution", "add-secret", "--data", &data, "--solution", &id]);
    assert!(text.starts_with("secret s3 of solution acme: "), "{text}");

    let revoke = |sid: &str| {
        ok(&[
            "solution",
            "revoke-secret",
            "--data",
            &data,
            "--solution",
            &id,
            "--secret-id",
            sid,
        ])
    };
    let out = revoke("s1");
    assert!(out.contains("revoked secret s1 of solution acme"), "{out}");
    assert!(out.contains("2 active secrets left"), "{out}");
    assert!(revoke("s1").contains("already revoked"));
    assert!(revoke("s2").contains("1 active secret left"));
    let last = revoke("s3");
    assert!(last.contains("no active secret left"), "{last}");
    let listed: Value =
        serde_json::from_str(&ok(&["solution", "list", "--data", &data, "--json"])).unwrap();
    assert_eq!(listed[0]["activeSecrets"], 0);

    let err = refused(&[
        "solution",
        "revoke-secret",
        "--data",
        &data,
        "--solution",
        &id,
        "--secret-id",
        "s9",
    ]);
    assert!(err.contains("solution `acme` has no secret `s9`"), "{err}");
    let err = refused(&[
        "solution",
        "add-secret",
        "--data",
        &data,
        "--solution",
        "nobody",
    ]);
    assert!(err.contains("there is no solution `nobody`"), "{err}");
}

#[test]
fn a_namespace_owned_by_another_solution_is_refused() {
    let (_dir, data) = data_dir("namespaces");
    create(&data, &["--namespace", "org.a", "--id", "alpha"]);
    create(&data, &["--namespace", "org.b", "--id", "beta"]);
    let add = |solution: &str, ns: &str| {
        thingsgate(&[
            "solution",
            "add-namespace",
            "--data",
            &data,
            "--solution",
            solution,
            "--namespace",
            ns,
        ])
    };
    let taken = add("beta", "org.a");
    assert_eq!(taken.status.code(), Some(2));
    assert!(
        stderr(&taken).contains("namespace `org.a` is already owned by solution `alpha`"),
        "{}",
        stderr(&taken)
    );
    let err = refused(&[
        "solution",
        "create",
        "--data",
        &data,
        "--namespace",
        "org.b",
    ]);
    assert!(err.contains("already owned by solution `beta`"), "{err}");

    let added = add("beta", "org.a.fleet");
    assert_eq!(added.status.code(), Some(0), "{}", stderr(&added));
    assert!(stdout(&added).contains("solution beta now owns namespace org.a.fleet"));
    let again = add("beta", "org.a.fleet");
    assert!(stdout(&again).contains("already owns"));
    assert_eq!(add("beta", "org..x").status.code(), Some(2));
    let listed: Value =
        serde_json::from_str(&ok(&["solution", "list", "--data", &data, "--json"])).unwrap();
    assert_eq!(
        listed[1]["namespaces"],
        serde_json::json!(["org.b", "org.a.fleet"])
    );
}

#[test]
fn a_solution_policy_may_name_itself_by_its_documented_id() {
    // A solution ID may contain `-`, which a policy ID's namespace may not: the documented ID
    // `<solutionId>:solution` (DESIGN.md §1) is accepted anyway, and stored without it.
    let (dir, data) = data_dir("policy-id");
    create(&data, &["--namespace", "org.acme", "--id", "acme-eu"]);
    let policy = r#"{"policyId":"acme-eu:solution","entries":{
      "ops":{"subjects":{"google:ops":{"type":"operators"}},"resources":{"solution:/":{"grant":["READ","WRITE"],"revoke":[]}}}}}"#;
    let file = dir.join("named.json");
    std::fs::write(&file, policy).unwrap();
    // `solution policy set` of `file`: its stdout (exit 0) or stderr (exit 2).
    let set = |file: &Path, accepted: bool| {
        let path = file.to_str().unwrap();
        let args = [
            "solution",
            "policy",
            "set",
            "--data",
            &data,
            "--solution",
            "acme-eu",
            path,
        ];
        if accepted { ok(&args) } else { refused(&args) }
    };
    set(&file, true);
    let stored: Value = serde_json::from_str(&ok(&[
        "solution",
        "policy",
        "get",
        "--data",
        &data,
        "--solution",
        "acme-eu",
    ]))
    .unwrap();
    assert!(stored.get("policyId").is_none(), "{stored}");
    assert!(stored["entries"]["ops"].is_object(), "{stored}");

    // Another solution's ID is refused, naming the one expected.
    let other = policy.replace("acme-eu:solution", "acme-us:solution");
    let file = dir.join("other.json");
    std::fs::write(&file, other).unwrap();
    let message = set(&file, false);
    assert!(
        message.contains("is `acme-eu:solution` (or has no `policyId`), not `acme-us:solution`"),
        "{message}"
    );
}

#[test]
fn the_solution_policy_round_trips_and_lockout_is_refused() {
    let (dir, data) = data_dir("policy");
    create(&data, &["--namespace", "org.acme", "--id", "acme"]);
    let get = || {
        ok(&[
            "solution",
            "policy",
            "get",
            "--data",
            &data,
            "--solution",
            "acme",
        ])
    };
    let default: Value = serde_json::from_str(&get()).unwrap();
    assert!(default.get("policyId").is_none(), "{default}");
    assert_eq!(
        default["entries"]["solution"]["resources"]["thing:/"]["grant"],
        serde_json::json!(["CREATE"])
    );
    assert!(default["entries"]["solution"]["subjects"]["iot-things:acme"].is_object());

    // get → set → get gives the same policy.
    let file = dir.join("default.json");
    std::fs::write(&file, get()).unwrap();
    let set = |file: &Path| {
        thingsgate(&[
            "solution",
            "policy",
            "set",
            "--data",
            &data,
            "--solution",
            "acme",
            file.to_str().unwrap(),
        ])
    };
    assert_eq!(set(&file).status.code(), Some(0));
    assert_eq!(serde_json::from_str::<Value>(&get()).unwrap(), default);

    let custom = r#"{"entries":{
      "ops":{"subjects":{"google:ops":{"type":"operators"}},"resources":{"solution:/":{"grant":["READ","WRITE"],"revoke":[]}}},
      "devices":{"subjects":{"iot-things:acme":{"type":"devices"}},"resources":{"topic:/telemetry":{"grant":["WRITE"],"revoke":[]}}}}}"#;
    let file = dir.join("custom.json");
    std::fs::write(&file, custom).unwrap();
    let out = set(&file);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stored: Value = serde_json::from_str(&get()).unwrap();
    assert_eq!(stored, serde_json::from_str::<Value>(custom).unwrap());

    // Refused: nobody could administer the solution; a policyId; not a policy at all.
    let refusals = [
        (
            r#"{"entries":{"devices":{"subjects":{"iot-things:acme":{"type":"d"}},"resources":{"topic:/":{"grant":["READ","WRITE"],"revoke":[]}}}}}"#,
            "would lock everyone out",
        ),
        (
            r#"{"policyId":"org.acme:solution","entries":{"ops":{"subjects":{"google:ops":{"type":"o"}},"resources":{"solution:/":{"grant":["WRITE"],"revoke":[]}}}}}"#,
            "is `acme:solution` (or has no `policyId`), not `org.acme:solution`",
        ),
        (
            r#"{"entries":{"e":{"subjects":{},"resources":{"thing:/":{"grant":["FLY"]}}}}}"#,
            "unknown permission `FLY`",
        ),
    ];
    for (i, (text, expected)) in refusals.iter().enumerate() {
        let file = dir.join(format!("bad-{i}.json"));
        std::fs::write(&file, text).unwrap();
        let out = set(&file);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(stderr(&out).contains(expected), "{}", stderr(&out));
    }
    assert_eq!(serde_json::from_str::<Value>(&get()).unwrap(), stored);
    let err = refused(&[
        "solution",
        "policy",
        "get",
        "--data",
        &data,
        "--solution",
        "nobody",
    ]);
    assert!(err.contains("there is no solution `nobody`"), "{err}");
}

/// The store locks `DATA/LOCK` with an exclusive advisory lock (`File::try_lock`); holding that
/// lock here is what a running server does (this crate does not depend on `twin` to open a
/// store itself).
#[test]
fn a_data_dir_in_use_by_a_server_is_refused_with_a_clear_error() {
    let (_dir, data) = data_dir("locked");
    create(&data, &["--namespace", "org.acme", "--id", "acme"]);
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(Path::new(&data).join("LOCK"))
        .unwrap();
    lock.try_lock().unwrap();
    for args in [
        &["solution", "list", "--data", &data][..],
        &[
            "solution",
            "create",
            "--data",
            &data,
            "--namespace",
            "org.b",
        ][..],
        &[
            "solution",
            "add-secret",
            "--data",
            &data,
            "--solution",
            "acme",
        ][..],
    ] {
        let err = refused(args);
        assert!(err.contains("is locked by a running Thingsgate"), "{err}");
        assert!(err.contains("stopped data dir"), "{err}");
    }
    drop(lock);
    assert!(ok(&["solution", "list", "--data", &data]).contains("acme"));
}

#[test]
fn a_missing_data_dir_is_not_created_by_commands_that_read_it() {
    let dir = temp_dir("missing");
    let missing = dir.join("nope");
    let err = refused(&["solution", "list", "--data", missing.to_str().unwrap()]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing.exists());
}
