//! The command line. Its shape is a contract (DESIGN.md §7): scripts and tests rely on it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::policy_cmd;

/// Thingsgate: a device-connection broker for digital twins, authorizing every message against
/// Ditto-style policies.
#[derive(Debug, Parser)]
#[command(name = "thingsgate", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Test and inspect policies offline.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run a file of policy test vectors (JSON Lines, one decision per line).
    ///
    /// Prints one line per failing vector and a summary; exits 1 if any vector fails or cannot
    /// be run.
    Test {
        /// The vector file (`.jsonl`).
        file: PathBuf,
        /// Also print a line for every passing vector.
        #[arg(long, short)]
        verbose: bool,
        /// The instant that decides subject expiry (RFC 3339); default: now.
        #[arg(long)]
        now: Option<String>,
    },
    /// Decide one request and explain the decision.
    ///
    /// Exits 0 when granted, 1 when denied, 2 on bad input.
    Check {
        /// The policy (Ditto policy JSON).
        #[arg(long)]
        policy: PathBuf,
        /// A subject of the requester (repeat for several; all count together).
        #[arg(long = "subject", required = true)]
        subjects: Vec<String>,
        /// A policy that the policy imports (repeatable).
        #[arg(long = "import")]
        imports: Vec<PathBuf>,
        /// Namespace of the thing (entries restricted to other namespaces are ignored).
        #[arg(long)]
        namespace: Option<String>,
        /// The instant that decides subject expiry (RFC 3339); default: now.
        #[arg(long)]
        now: Option<String>,
        /// Partial check (retrieves, events) instead of unrestricted (changes).
        #[arg(long)]
        partial: bool,
        /// The resource, e.g. `thing:/features/lamp`.
        resource: String,
        /// READ, WRITE, EXECUTE or CREATE.
        permission: String,
    },
}

/// Runs a parsed command line; the exit code says the outcome.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Policy(PolicyCommand::Test { file, verbose, now }) => {
            policy_cmd::test(&file, verbose, now.as_deref())
        }
        Command::Policy(PolicyCommand::Check {
            policy,
            subjects,
            imports,
            namespace,
            now,
            partial,
            resource,
            permission,
        }) => policy_cmd::check(&policy_cmd::CheckArgs {
            policy: &policy,
            subjects: &subjects,
            imports: &imports,
            namespace: namespace.as_deref(),
            now: now.as_deref(),
            partial,
            resource: &resource,
            permission: &permission,
        }),
    }
}
