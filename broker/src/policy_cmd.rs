//! `thingsgate policy test` and `thingsgate policy check`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use policy::{Enforcer, Permission, Policy, ResourceKey, Timestamp};

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
    pub permission: &'a str,
}

/// Decides one request and prints the explanation; exit code 0 granted, 1 denied.
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
    let Some(permission) = Permission::parse(args.permission) else {
        bail!(
            "unknown permission `{}` (expected READ, WRITE, EXECUTE or CREATE)",
            args.permission
        );
    };
    let enforcer = Arc::new(Enforcer::compile_with_imports(&policy, &imported_refs));
    let explanation = enforcer.explain(args.subjects, args.namespace, now, &resource, permission);
    let (mode, granted) = if args.partial {
        ("partial", explanation.partial)
    } else {
        ("unrestricted", explanation.unrestricted)
    };
    let verdict = if granted { "GRANTED" } else { "DENIED" };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{verdict} ({mode} {permission} on {resource})")?;
    write!(out, "{explanation}")?;
    Ok(if granted {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
