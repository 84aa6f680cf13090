//! `thingsgate solution …`: managing solutions in a stopped data dir (DESIGN.md §7).
//!
//! Each command opens the data dir's store (taking its lock, so it refuses to run while a server
//! holds it), makes its change through [`Solutions`], and closes the store. Secrets and API
//! tokens are printed once, on stdout, and never logged.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use policy::Timestamp;
use serde::Serialize;
use twin::store::{EmbeddedStore, StoreError, StoreOptions, TwinStore};

use crate::auth::solution::{SolutionId, Solutions, default_policy_summary};

/// An open data dir (or cluster store): the store and the solutions loaded from it.
pub(crate) struct DataDir {
    pub(crate) store: Box<dyn TwinStore>,
    pub(crate) solutions: Solutions,
    /// The runtime a cluster store's calls run on, when a command opened one.
    runtime: Option<tokio::runtime::Runtime>,
}

impl DataDir {
    /// Opens `dir`; unless `create`, it must exist already (a typo should not make a new one).
    pub(crate) fn open(dir: &Path, create: bool) -> anyhow::Result<Self> {
        if !create && !dir.is_dir() {
            bail!("data directory `{}` does not exist", dir.display());
        }
        let store = EmbeddedStore::open(StoreOptions::new(dir)).map_err(|e| match e {
            StoreError::InUse { .. } => anyhow::anyhow!(
                "data directory `{}` is locked by a running Thingsgate (`thingsgate serve`?): \
                 `thingsgate solution` commands work on a stopped data dir; stop the server \
                 first, or make the change online through the HTTP API",
                dir.display()
            ),
            e => anyhow::Error::new(e)
                .context(format!("cannot open data directory `{}`", dir.display())),
        })?;
        let solutions = Solutions::load(&store)
            .with_context(|| format!("cannot load the solutions of `{}`", dir.display()))?;
        Ok(DataDir {
            store: Box::new(store),
            solutions,
            runtime: None,
        })
    }

    /// The solutions of an open store (cluster mode: the store is shared, not a directory).
    pub(crate) fn from_store(store: Box<dyn TwinStore>) -> anyhow::Result<Self> {
        let solutions =
            Solutions::load(&*store).context("cannot load the solutions of the cluster")?;
        Ok(DataDir {
            store,
            solutions,
            runtime: None,
        })
    }

    /// Opens the cluster's shared store for a command (`--cluster URLS`): changes go to every
    /// node at once, no server needs to stop.
    pub(crate) fn open_cluster(urls: &str) -> anyhow::Result<Self> {
        let config = crate::config::ClusterConfig::resolve(None, Some(urls), std::env::vars())?
            .context("no cluster settings")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let store = runtime.block_on(crate::cluster::open_store(&config))?;
        let mut dir = DataDir::from_store(Box::new(store))?;
        dir.runtime = Some(runtime);
        Ok(dir)
    }

    /// Flushes and releases the data dir (a cluster store: waits until its writes are acked).
    pub(crate) fn close(self) -> anyhow::Result<()> {
        if let Some(runtime) = &self.runtime {
            runtime
                .block_on(self.store.durable_so_far())
                .context("a change did not reach the cluster")?;
        }
        self.store
            .close()
            .context("cannot close the data directory cleanly")
    }
}

/// `create --json`, in the field order of DESIGN.md §7.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreatedJson<'a> {
    solution_id: &'a str,
    api_token: &'a str,
    secret: &'a str,
}

/// `add-secret --json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NewSecretJson<'a> {
    solution_id: &'a str,
    secret_id: &'a str,
    secret: &'a str,
}

/// One solution of `list --json`: never a secret or a digest.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListedJson<'a> {
    solution_id: &'a str,
    namespaces: &'a [String],
    active_secrets: usize,
}

fn now() -> Timestamp {
    Timestamp::from(std::time::SystemTime::now())
}

fn solution_id(text: &str) -> anyhow::Result<SolutionId> {
    Ok(SolutionId::parse(text)?)
}

/// Where a command finds the solutions: a stopped data dir, or a cluster's shared store.
#[derive(Debug)]
pub enum At {
    Data(std::path::PathBuf),
    Cluster(String),
}

impl At {
    /// From `--data` and `--cluster` (the command line makes exactly one present).
    pub fn new(data: Option<std::path::PathBuf>, cluster: Option<String>) -> Self {
        match (data, cluster) {
            (_, Some(urls)) => At::Cluster(urls),
            (Some(data), None) => At::Data(data),
            (None, None) => At::Data(std::path::PathBuf::new()),
        }
    }

    fn open(&self, create: bool) -> anyhow::Result<DataDir> {
        match self {
            At::Data(dir) => DataDir::open(dir, create),
            At::Cluster(urls) => DataDir::open_cluster(urls),
        }
    }
}

/// `solution create`.
pub fn create(
    at: At,
    namespaces: &[String],
    id: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let id = id.map(solution_id).transpose()?;
    let dir = at.open(true)?;
    let created = dir.solutions.create(&*dir.store, id, namespaces, now())?;
    dir.close()?;
    let id = &created.solution_id;
    let policy = default_policy_summary(id);
    let mut out = std::io::stdout().lock();
    if json {
        let doc = CreatedJson {
            solution_id: id.as_str(),
            api_token: created.api_token.expose(),
            secret: created.secret.expose(),
        };
        writeln!(out, "{}", serde_json::to_string(&doc)?)?;
        eprintln!("created solution {id}; {policy}");
    } else {
        writeln!(
            out,
            "created solution {id} (namespaces: {})",
            namespaces.join(", ")
        )?;
        writeln!(out, "API token: {}", created.api_token.expose())?;
        writeln!(
            out,
            "secret {}: {}",
            created.secret_id,
            created.secret.expose()
        )?;
        writeln!(
            out,
            "keep the API token and the secret now: they are not shown again (only their SHA-256 digests are stored)"
        )?;
        writeln!(out, "{policy}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `solution list`.
pub fn list(at: At, json: bool) -> anyhow::Result<ExitCode> {
    let dir = at.open(false)?;
    let solutions = dir.solutions.list();
    dir.close()?;
    let mut out = std::io::stdout().lock();
    if json {
        let doc: Vec<_> = solutions
            .iter()
            .map(|s| ListedJson {
                solution_id: s.id.as_str(),
                namespaces: &s.namespaces,
                active_secrets: s.active_secrets(),
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string(&doc)?)?;
    } else if solutions.is_empty() {
        writeln!(out, "no solutions")?;
    } else {
        writeln!(
            out,
            "{:<24} {:>14}  NAMESPACES",
            "SOLUTION", "ACTIVE SECRETS"
        )?;
        for s in &solutions {
            writeln!(
                out,
                "{:<24} {:>14}  {}",
                s.id.as_str(),
                s.active_secrets(),
                s.namespaces.join(", ")
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `solution add-secret`.
pub fn add_secret(data: &Path, solution: &str, json: bool) -> anyhow::Result<ExitCode> {
    let id = solution_id(solution)?;
    let dir = DataDir::open(data, false)?;
    let new = dir.solutions.add_secret(&*dir.store, &id, now())?;
    dir.close()?;
    let mut out = std::io::stdout().lock();
    if json {
        let doc = NewSecretJson {
            solution_id: id.as_str(),
            secret_id: &new.secret_id,
            secret: new.secret.expose(),
        };
        writeln!(out, "{}", serde_json::to_string(&doc)?)?;
    } else {
        writeln!(
            out,
            "secret {} of solution {id}: {}",
            new.secret_id,
            new.secret.expose()
        )?;
        writeln!(
            out,
            "keep it now: it is not shown again (only its SHA-256 digest is stored)"
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `solution revoke-secret`.
pub fn revoke_secret(data: &Path, solution: &str, secret_id: &str) -> anyhow::Result<ExitCode> {
    let id = solution_id(solution)?;
    let dir = DataDir::open(data, false)?;
    let revoked = dir
        .solutions
        .revoke_secret(&*dir.store, &id, secret_id, now())?;
    dir.close()?;
    let mut out = std::io::stdout().lock();
    if revoked.already {
        writeln!(
            out,
            "secret {secret_id} of solution {id} was already revoked"
        )?;
    } else {
        writeln!(out, "revoked secret {secret_id} of solution {id}")?;
    }
    match revoked.active_left {
        0 => writeln!(
            out,
            "solution {id} has no active secret left: no client can authenticate with a secret until `thingsgate solution add-secret` adds one"
        )?,
        1 => writeln!(out, "1 active secret left")?,
        n => writeln!(out, "{n} active secrets left")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `solution add-namespace`.
pub fn add_namespace(data: &Path, solution: &str, namespace: &str) -> anyhow::Result<ExitCode> {
    let id = solution_id(solution)?;
    let dir = DataDir::open(data, false)?;
    let added = dir
        .solutions
        .add_namespace(&*dir.store, &id, namespace, now())?;
    dir.close()?;
    let mut out = std::io::stdout().lock();
    if added {
        writeln!(out, "solution {id} now owns namespace {namespace}")?;
    } else {
        writeln!(out, "solution {id} already owns namespace {namespace}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `solution policy get`.
pub fn policy_get(data: &Path, solution: &str) -> anyhow::Result<ExitCode> {
    let id = solution_id(solution)?;
    let dir = DataDir::open(data, false)?;
    let found = dir.solutions.get(id.as_str());
    dir.close()?;
    let Some(found) = found else {
        bail!("there is no solution `{id}`");
    };
    let text = serde_json::to_string_pretty(&policy::policy_to_value(&found.policy))?;
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(ExitCode::SUCCESS)
}

/// `solution policy set`.
pub fn policy_set(data: &Path, solution: &str, file: &Path) -> anyhow::Result<ExitCode> {
    let id = solution_id(solution)?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    let parsed = crate::auth::solution::parse_solution_policy(&id, &text)
        .with_context(|| format!("invalid policy in {}", file.display()))?;
    let dir = DataDir::open(data, false)?;
    dir.solutions
        .set_policy(&*dir.store, &id, parsed, now())
        .with_context(|| format!("policy of solution `{id}` not changed"))?;
    dir.close()?;
    writeln!(
        std::io::stdout().lock(),
        "policy of solution {id} replaced from {}",
        file.display()
    )?;
    Ok(ExitCode::SUCCESS)
}
