//! The container files, checked as far as they can be without a Docker engine: `Dockerfile`
//! builds with CI's release build command, runs as a user other than root and exposes only ports
//! `serve` listens on; `docker-compose.yml` parses as YAML (Python's PyYAML, which `cargo xtask
//! test` provides) and starts `serve` with flags that exist, on ports the image exposes, with the
//! image's data volume.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::Command;

use e2e::{stdout, thingsgate, workspace_root};
use serde_json::Value;

fn read(file: &str) -> String {
    std::fs::read_to_string(workspace_root().join(file))
        .unwrap_or_else(|e| panic!("cannot read {file}: {e}"))
}

/// The Dockerfile's instructions (continuation lines joined, comments dropped), in order.
fn dockerfile() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (keyword, rest) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    instructions
}

/// The instructions of the last stage (the image that ships).
fn runtime_stage() -> Vec<(String, String)> {
    let all = dockerfile();
    let start = all.iter().rposition(|(k, _)| k == "FROM").unwrap();
    all[start..].to_vec()
}

/// A JSON array instruction argument (`["a", "b"]`).
fn exec_form(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("`{text}` is not exec form: {e}"))
}

/// The flags `thingsgate serve --help` lists.
fn serve_flags() -> Vec<String> {
    let out = thingsgate(&["serve", "--help"]);
    assert!(out.status.success());
    stdout(&out)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(',').to_owned())
        .collect()
}

/// Checks a `serve` command line against `serve --help`; returns the ports it listens on.
fn listened_ports(command: &[String]) -> Vec<u16> {
    assert_eq!(
        command.first().map(String::as_str),
        Some("serve"),
        "{command:?}"
    );
    let flags = serve_flags();
    let mut ports = Vec::new();
    let mut words = command.iter().skip(1).peekable();
    while let Some(word) = words.next() {
        assert!(
            flags.contains(word),
            "`{word}` is no flag of `serve`: {flags:?}"
        );
        if matches!(
            word.as_str(),
            "--mqtt" | "--mqtts" | "--amqp" | "--amqps" | "--http"
        ) {
            let address = words.next().unwrap();
            let (host, port) = address.rsplit_once(':').unwrap();
            assert_eq!(host, "0.0.0.0", "a container listens on every interface");
            ports.push(port.parse().unwrap());
        } else if matches!(word.as_str(), "--data" | "--config") {
            words.next().unwrap();
        }
    }
    ports
}

fn exposed_ports() -> Vec<u16> {
    runtime_stage()
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, ports)| ports.split_whitespace().map(|p| p.parse().unwrap()))
        .collect::<Vec<u16>>()
}

#[test]
fn the_image_is_built_with_the_release_build_ci_runs() {
    let run = dockerfile()
        .into_iter()
        .filter(|(k, _)| k == "RUN")
        .find(|(_, r)| r.contains("cargo build"))
        .unwrap()
        .1;
    let in_docker = run
        .split("&&")
        .map(|part| part.split_whitespace().collect::<Vec<_>>().join(" "))
        .find_map(|part| part.find("cargo build").map(|at| part[at..].to_owned()))
        .unwrap();
    let ci = read(".ci/run");
    let in_ci: Vec<&str> = ci
        .lines()
        .filter(|l| l.trim_start().starts_with("cargo build"))
        .collect();
    assert_eq!(
        in_ci,
        [in_docker.as_str()],
        "the Dockerfile and .ci/run build alike"
    );
    assert!(in_docker.contains("--release") && in_docker.contains("--locked"));

    // The builder's Rust is at least the workspace's rust-version.
    let (_, from) = dockerfile().into_iter().find(|(k, _)| k == "FROM").unwrap();
    let tag = from.strip_prefix("rust:").unwrap();
    let version = |v: &str| -> (u32, u32) {
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap())
    };
    let builder = version(tag.split(['-', ' ']).next().unwrap());
    let manifest = read("Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    assert!(builder >= version(msrv), "rust:{tag} is older than {msrv}");
}

#[test]
fn the_runtime_image_is_small_runs_as_a_user_and_exposes_only_what_serve_listens_on() {
    let stage = runtime_stage();
    assert_eq!(stage[0].1, "debian:bookworm-slim");
    let installs: Vec<&String> = stage
        .iter()
        .filter(|(k, r)| k == "RUN" && r.contains("apt-get install"))
        .map(|(_, r)| r)
        .collect();
    assert_eq!(installs.len(), 1);
    let packages: Vec<&str> = installs[0]
        .split("&&")
        .find(|p| p.contains("apt-get install"))
        .unwrap()
        .split_whitespace()
        .skip(2)
        .filter(|w| !w.starts_with('-'))
        .collect();
    assert_eq!(packages, ["ca-certificates"]);
    let user = stage.iter().rfind(|(k, _)| k == "USER").unwrap();
    assert!(!matches!(user.1.as_str(), "root" | "0"), "{user:?}");
    let volume = stage.iter().find(|(k, _)| k == "VOLUME").unwrap();
    assert_eq!(exec_form(&volume.1), ["/data"]);
    let entrypoint = stage.iter().find(|(k, _)| k == "ENTRYPOINT").unwrap();
    assert_eq!(exec_form(&entrypoint.1), ["thingsgate"]);
    let cmd = stage.iter().find(|(k, _)| k == "CMD").unwrap();
    let mut listened = listened_ports(&exec_form(&cmd.1));
    // 8883 needs TLS files from a config, so the default command leaves it out.
    listened.push(8883);
    listened.sort();
    let mut exposed = exposed_ports();
    exposed.sort();
    assert_eq!(exposed, listened);
}

/// `docker-compose.yml` as JSON, read by PyYAML.
fn compose() -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(workspace_root().join("docker-compose.yml"))
        .output()
        .expect("python3 runs (README's test command, `cargo xtask test`, installs PyYAML)");
    assert!(
        out.status.success(),
        "docker-compose.yml does not parse (or PyYAML is missing: `cargo xtask test` installs \
         it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_compose_file_parses_and_starts_serve_with_flags_and_ports_that_exist() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let mut names: Vec<&String> = services.keys().collect();
    names.sort();
    assert_eq!(names, ["rabbitmq", "thingsgate"]);

    let thingsgate = &services["thingsgate"];
    assert_eq!(thingsgate["build"], ".");
    let command: Vec<String> = serde_json::from_value(thingsgate["command"].clone()).unwrap();
    let listened = listened_ports(&command);
    let exposed = exposed_ports();
    for port in thingsgate["ports"].as_array().unwrap() {
        let (_, inside) = port.as_str().unwrap().rsplit_once(':').unwrap();
        let inside: u16 = inside.parse().unwrap();
        assert!(
            listened.contains(&inside),
            "{inside} is published but not listened on"
        );
        assert!(
            exposed.contains(&inside),
            "{inside} is published but not exposed"
        );
    }
    let volumes: Vec<&str> = thingsgate["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(volumes.iter().any(|v| v.ends_with(":/data")), "{volumes:?}");
    let data = command.iter().position(|w| w == "--data").unwrap();
    assert_eq!(command[data + 1], "/data");
    for (name, _) in thingsgate["environment"].as_object().unwrap() {
        assert!(name.starts_with("THINGSGATE_"), "{name}");
    }
    for volume in volumes {
        let (name, _) = volume.split_once(':').unwrap();
        assert!(
            name.starts_with('.') || compose["volumes"].get(name).is_some(),
            "volume `{name}` is declared"
        );
    }

    let rabbitmq = &services["rabbitmq"];
    assert!(rabbitmq["image"].as_str().unwrap().starts_with("rabbitmq:"));
    assert!(
        rabbitmq["ports"]
            .as_array()
            .unwrap()
            .contains(&Value::from("5672:5672"))
    );
}

#[test]
fn the_build_context_leaves_out_build_output_and_git() {
    let ignored = read(".dockerignore");
    let lines: Vec<&str> = ignored.lines().map(str::trim).collect();
    for pattern in ["target", ".git"] {
        assert!(lines.contains(&pattern), "{pattern} in .dockerignore");
    }
}
