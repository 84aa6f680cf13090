//! The container files, checked as far as they can be without a Docker engine: `Dockerfile`
//! builds with CI's release build command, runs as a user other than root and exposes only ports
//! `serve` listens on; `docker-compose.yml` parses as YAML (Python's PyYAML, which `cargo xtask
//! test` provides) and starts `serve` with flags that exist, on ports the image exposes, with the
//! image's data volume; its default services are the single-node setup, and its `cluster`
//! profile is three nodes on a three-server NATS cluster whose names and ports agree.
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
        } else if matches!(word.as_str(), "--data" | "--config" | "--cluster") {
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
    // `docker compose up` alone: services without `profiles`.
    let mut names: Vec<&String> = services
        .iter()
        .filter(|(_, s)| s.get("profiles").is_none())
        .map(|(name, _)| name)
        .collect();
    names.sort();
    assert_eq!(names, ["rabbitmq", "thingsgate"]);
    for name in names {
        for needed in depends_on(&services[name]) {
            assert!(
                services[&needed].get("profiles").is_none(),
                "`{name}` depends on `{needed}`, which `docker compose up` does not start"
            );
        }
    }

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

/// The names of the services `service` depends on (`depends_on` as a list or a map).
fn depends_on(service: &Value) -> Vec<String> {
    match service.get("depends_on") {
        None => Vec::new(),
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| n.as_str().unwrap().to_owned())
            .collect(),
        Some(Value::Object(names)) => names.keys().cloned().collect(),
        Some(other) => panic!("depends_on: {other}"),
    }
}

/// A service's exec-form command.
fn command_of(service: &Value) -> Vec<String> {
    serde_json::from_value(service["command"].clone())
        .unwrap_or_else(|e| panic!("{} is no list of words: {e}", service["command"]))
}

/// The word after `flag` in `command` (the first time it is given).
fn value_of<'a>(command: &'a [String], flag: &str) -> Option<&'a str> {
    let at = command.iter().position(|w| w == flag)?;
    Some(
        command
            .get(at + 1)
            .unwrap_or_else(|| panic!("{flag} without a value")),
    )
}

/// A service's published ports as (host, container) pairs.
fn published(service: &Value) -> Vec<(u16, u16)> {
    service
        .get("ports")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|port| {
            let port = port.as_str().unwrap();
            let (outside, inside) = port.rsplit_once(':').unwrap();
            let host = outside.rsplit(':').next().unwrap();
            (host.parse().unwrap(), inside.parse().unwrap())
        })
        .collect()
}

/// A `nats://host:port` URL's host and port.
fn nats_host_port(url: &str) -> (&str, u16) {
    let rest = url
        .strip_prefix("nats://")
        .unwrap_or_else(|| panic!("`{url}` is no nats:// URL"));
    let (host, port) = rest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("`{url}` names no port"));
    (host, port.parse().unwrap())
}

/// The services built from this repository (the Thingsgate image).
fn thingsgate_services(compose: &Value) -> Vec<(&String, &Value)> {
    compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("thingsgate:"))
        })
        .collect()
}

/// The NATS servers (image `nats:…`).
fn nats_services(compose: &Value) -> Vec<(&String, &Value)> {
    compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("nats:")))
        .collect()
}

/// The value of one of a nats-server's flag spellings (`-sd` / `--store_dir`, …).
fn nats_flag<'a>(command: &'a [String], spellings: &[&str]) -> Option<&'a str> {
    spellings.iter().find_map(|flag| value_of(command, flag))
}

#[test]
fn every_thingsgate_service_runs_serve_with_flags_that_exist_and_publishes_what_it_listens_on() {
    let compose = compose();
    let nodes = thingsgate_services(&compose);
    assert!(nodes.len() >= 4, "the single node and three cluster nodes");
    let exposed = exposed_ports();
    let installed = ["thingsgate", "ca-certificates"];
    for (name, service) in &nodes {
        assert_eq!(
            service["build"], ".",
            "{name} is built from this repository"
        );
        let command = command_of(service);
        let listened = listened_ports(&command);
        let published = published(service);
        for port in &listened {
            assert!(
                published.iter().any(|(_, inside)| inside == port),
                "{name} listens on {port} but does not publish it: {published:?}"
            );
        }
        for (_, inside) in &published {
            assert!(
                listened.contains(inside),
                "{name} publishes {inside} but does not listen on it"
            );
            assert!(
                exposed.contains(inside),
                "{name} publishes {inside} but the image does not expose it"
            );
        }
        for (variable, _) in service["environment"].as_object().unwrap() {
            assert!(variable.starts_with("THINGSGATE_"), "{name}: {variable}");
        }
        assert_eq!(service["restart"], "unless-stopped", "{name}");
        // A healthcheck must run a program the runtime image has (it has no curl or wget).
        if let Some(check) = service.get("healthcheck") {
            let test: Vec<String> = serde_json::from_value(check["test"].clone()).unwrap();
            let program = match test.first().map(String::as_str) {
                Some("CMD-SHELL") => test[1].split_whitespace().next().unwrap().to_owned(),
                Some("CMD") => test[1].clone(),
                _ => panic!("{name}: healthcheck {test:?}"),
            };
            assert!(
                installed.contains(&program.as_str()),
                "{name}: the image has no `{program}` (Dockerfile's runtime stage)"
            );
        }
    }

    // Every profile may run at once: no two services publish the same host port.
    let mut hosts: Vec<(u16, &String)> = compose["services"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(name, s)| published(s).into_iter().map(move |(host, _)| (host, name)))
        .collect();
    hosts.sort();
    for pair in hosts.windows(2) {
        assert_ne!(
            pair[0].0, pair[1].0,
            "{} and {} publish the same host port",
            pair[0].1, pair[1].1
        );
    }
}

#[test]
fn the_cluster_profile_is_three_nodes_on_a_three_server_nats_cluster() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let cluster = Value::from(vec!["cluster"]);
    let in_profile: Vec<&String> = services
        .iter()
        .filter(|(_, s)| s.get("profiles").is_some())
        .map(|(name, s)| {
            assert_eq!(
                s["profiles"], cluster,
                "{name}: the only profile is `cluster`"
            );
            name
        })
        .collect();

    // NATS: three JetStream servers, each with its own store volume, routing to the others by
    // service name on their cluster port.
    let mut nats = nats_services(&compose);
    nats.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(
        nats.len(),
        3,
        "three NATS servers: R3 needs a quorum of 2 of 3"
    );
    let names: Vec<&str> = nats.iter().map(|(name, _)| name.as_str()).collect();
    let mut server_names = Vec::new();
    let mut store_volumes = Vec::new();
    let mut cluster_names = Vec::new();
    let mut client_ports = Vec::new();
    for (name, service) in &nats {
        assert!(
            in_profile.contains(name),
            "{name} is in the `cluster` profile"
        );
        // A replicated stream needs nats-server >= 2.9.21.
        let tag = service["image"]
            .as_str()
            .unwrap()
            .strip_prefix("nats:")
            .unwrap();
        let mut parts = tag
            .split(['-', '.'])
            .map_while(|p| p.parse::<u32>().ok())
            .chain(std::iter::repeat(0));
        let version = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        assert!(
            version >= (2, 9, 21),
            "{name}: nats:{tag} is older than 2.9.21"
        );
        let command = command_of(service);
        assert!(
            command.iter().any(|w| w == "--jetstream" || w == "-js"),
            "{name}: JetStream is on: {command:?}"
        );
        server_names.push(
            nats_flag(&command, &["--name", "-n", "--server_name"])
                .unwrap()
                .to_owned(),
        );
        cluster_names.push(nats_flag(&command, &["--cluster_name"]).unwrap().to_owned());
        client_ports.push(
            nats_flag(&command, &["--port", "-p"]).map_or(4222, |p| p.parse::<u16>().unwrap()),
        );
        let store = nats_flag(&command, &["-sd", "--store_dir"]).unwrap();
        let volume = service["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .find_map(|v| {
                let (volume, at) = v.split_once(':')?;
                (at.trim_end_matches(":rw") == store).then_some(volume)
            })
            .unwrap_or_else(|| panic!("{name}: no volume at its store dir {store}"));
        assert!(
            compose["volumes"].get(volume).is_some(),
            "volume `{volume}` is declared"
        );
        store_volumes.push(volume.to_owned());
        let (host, cluster_port) = nats_host_port(nats_flag(&command, &["--cluster"]).unwrap());
        assert_eq!(host, "0.0.0.0", "{name} takes routes on every interface");
        let mut routed: Vec<&str> = nats_flag(&command, &["--routes"])
            .unwrap()
            .split(',')
            .map(|url| {
                let (host, port) = nats_host_port(url.trim());
                assert_eq!(
                    port, cluster_port,
                    "{name}: route {url} is to the cluster port"
                );
                host
            })
            .collect();
        routed.sort();
        let others: Vec<&str> = names.iter().copied().filter(|n| n != name).collect();
        assert_eq!(routed, others, "{name} routes to the other NATS services");
        assert_eq!(service["restart"], "unless-stopped", "{name}");
    }
    for distinct in [&mut server_names, &mut store_volumes] {
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "each NATS server its own: {distinct:?}");
    }
    cluster_names.dedup();
    assert_eq!(
        cluster_names.len(),
        1,
        "one NATS cluster: {cluster_names:?}"
    );

    // The nodes: `serve --cluster` with every NATS server's client port, replicas 3, started
    // after the NATS servers, no data dir.
    let nodes: Vec<(&String, Vec<String>)> = thingsgate_services(&compose)
        .into_iter()
        .map(|(name, s)| (name, command_of(s)))
        .filter(|(_, command)| command.iter().any(|w| w == "--cluster"))
        .collect();
    assert_eq!(nodes.len(), 3, "three cluster nodes");
    for (name, command) in &nodes {
        let service = &services[name.as_str()];
        assert!(
            in_profile.contains(name),
            "{name} is in the `cluster` profile"
        );
        for refused in ["--data", "--dev"] {
            assert!(
                !command.iter().any(|w| w == refused),
                "{name}: `{refused}` with --cluster"
            );
        }
        let mut urls: Vec<&str> = value_of(command, "--cluster")
            .unwrap()
            .split(',')
            .map(|url| {
                let (host, port) = nats_host_port(url.trim());
                let at = names
                    .iter()
                    .position(|n| *n == host)
                    .unwrap_or_else(|| panic!("{name}: {url} names no NATS service: {names:?}"));
                assert_eq!(
                    port, client_ports[at],
                    "{name}: {url} is NATS's client port"
                );
                host
            })
            .collect();
        urls.sort();
        assert_eq!(urls, names, "{name} knows every NATS server");
        assert_eq!(
            service["environment"]["THINGSGATE_CLUSTER_REPLICAS"], "3",
            "{name}: one replica per NATS server"
        );
        let mut needs = depends_on(service);
        needs.sort();
        assert_eq!(needs, names, "{name} starts after the NATS servers");
    }
    let mut members: Vec<&str> = nats
        .iter()
        .map(|(name, _)| name.as_str())
        .chain(nodes.iter().map(|(name, _)| name.as_str()))
        .collect();
    members.sort();
    let mut in_profile: Vec<&str> = in_profile.iter().map(|n| n.as_str()).collect();
    in_profile.sort();
    assert_eq!(
        in_profile, members,
        "the profile is the NATS servers and the nodes"
    );

    // The header documents each node's host ports and commands for services that exist.
    let text = read("docker-compose.yml");
    let header: Vec<&str> = text.lines().take_while(|l| l.starts_with('#')).collect();
    for (name, _) in &nodes {
        for (host, _) in published(&services[name.as_str()]) {
            assert!(
                header
                    .iter()
                    .any(|l| l.contains(name.as_str()) && l.contains(&format!("localhost:{host}"))),
                "the header documents {name}'s port {host}"
            );
        }
    }
    let commands: Vec<&str> = header
        .iter()
        .filter_map(|l| {
            l.trim_start_matches('#')
                .trim()
                .strip_prefix("docker compose ")
        })
        .collect();
    assert!(
        commands
            .iter()
            .any(|c| c.contains("--profile cluster up") && !c.contains(" run ")),
        "the header says how to start the profile: {commands:?}"
    );
    let create = commands
        .iter()
        .find(|c| c.contains("solution create --cluster"))
        .expect("the header says how to create a solution in the cluster");
    let words: Vec<String> = create.split_whitespace().map(str::to_owned).collect();
    let service = value_of(&words, "--rm").unwrap();
    assert!(
        nodes.iter().any(|(name, _)| name.as_str() == service),
        "`{create}` runs a cluster node's image"
    );
    let (host, port) = nats_host_port(value_of(&words, "--cluster").unwrap());
    let at = names.iter().position(|n| *n == host).unwrap();
    assert_eq!(
        port, client_ports[at],
        "`{create}` names NATS's client port"
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
