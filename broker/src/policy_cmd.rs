//! `thingsgate policy test` and `thingsgate policy check`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use policy::{Enforcer, Permission, Permissions, Policy, ResourceKey, Timestamp};

fn now_or(text: Option<&str>) -> anyhow::Result<Timestamp> {
    match text {
        None => Ok(Timestamp::from(std::time::SystemTime::now())),
        Some(t) => Timestamp::parse_rfc3339(t)
            .map_err(|e| anyhow::anyhow!("--now `{t}` is not RFC 3339: {e}")),
    }
}

fn read_policy(path: &Path) -> anyhow::Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    policy::parse_policy(&text).with_context(|| format!("invalid policy in {}", path.display()))
}

/// Runs a vector file; exit code 1 when any vector fails or cannot be run.
pub fn test(file: &Path, verbose: bool, now: Option<&str>) -> anyhow::Result<ExitCode> {
    let now = now_or(now)?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read vector file {}", file.display()))?;
    let results = policy::vectors::run_vectors(&text, now);
    let mut out = std::io::stdout().lock();
    let mut failed = 0usize;
    for result in &results {
        if !result.passed() {
            failed += 1;
            writeln!(out, "{}: {result}", file.display())?;
        } else if verbose {
            writeln!(out, "{}: {result}", file.display())?;
        }
    }
    writeln!(out, "{} passed, {failed} failed", results.len() - failed)?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The arguments of `policy check`.
#[derive(Debug)]
pub struct CheckArgs<'a> {
    pub policy: &'a Path,
    pub subjects: &'a [String],
    pub imports: &'a [std::path::PathBuf],
    pub namespace: Option<&'a str>,
    pub now: Option<&'a str>,
    pub partial: bool,
    pub resource: &'a str,
    /// One permission or several separated by commas (`READ,WRITE`): each must hold.
    pub permission: &'a str,
}

/// `READ` or a comma-separated set such as `READ,WRITE` (duplicates collapse).
fn parse_permissions(text: &str) -> anyhow::Result<Permissions> {
    let mut set = Permissions::NONE;
    for name in text.split(',').map(str::trim) {
        if name.is_empty() {
            bail!("empty permission in `{text}` (expected e.g. READ or READ,WRITE)");
        }
        let Some(permission) = Permission::parse(name) else {
            bail!(
                "unknown permission `{name}` (expected READ, WRITE, EXECUTE or CREATE, comma-separated)"
            );
        };
        set.insert(permission);
    }
    Ok(set)
}

/// Decides one request and prints the explanation (one per permission asked); exit code 0
/// when every permission is granted, 1 when one is denied.
pub fn check(args: &CheckArgs<'_>) -> anyhow::Result<ExitCode> {
    let now = now_or(args.now)?;
    let policy = read_policy(args.policy)?;
    let imported: Vec<Policy> = args
        .imports
        .iter()
        .map(|p| read_policy(p))
        .collect::<Result<_, _>>()?;
    let imported_refs: Vec<&Policy> = imported.iter().collect();
    let resource = ResourceKey::parse(args.resource)?;
    let permissions = parse_permissions(args.permission)?;
    let enforcer = Arc::new(Enforcer::compile_with_imports(&policy, &imported_refs));
    // One explanation per permission: each must hold on its own (no combined Ditto weight).
    let explanations: Vec<_> = permissions
        .iter()
        .map(|p| enforcer.explain(args.subjects, args.namespace, now, &resource, p))
        .collect();
    let (mode, granted) = if args.partial {
        ("partial", explanations.iter().all(|e| e.partial))
    } else {
        ("unrestricted", explanations.iter().all(|e| e.unrestricted))
    };
    let verdict = if granted { "GRANTED" } else { "DENIED" };
    let asked: Vec<&str> = permissions.iter().map(Permission::as_str).collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{verdict} ({mode} {} on {resource})", asked.join("+"))?;
    for explanation in &explanations {
        write!(out, "{explanation}")?;
    }
    Ok(if granted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
