//! The command line. Its shape is a contract (DESIGN.md §7): scripts and tests rely on it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{connection_cmd, policy_cmd, solution_cmd};

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
    /// Manage solutions (tenants) in a stopped data dir: credentials, namespaces, policy.
    ///
    /// Exits 0 on success, 2 on bad input or any error (the message is on stderr).
    #[command(subcommand)]
    Solution(SolutionCommand),
    /// Manage a solution's connections to external brokers (bridges): offline in a stopped
    /// data dir (`--data DIR`), or online through a running server (`--http URL`, with a secret
    /// of the solution in the environment variable THINGSGATE_SECRET — never on the command
    /// line, where `ps` would show it).
    ///
    /// Passwords in connection URIs are never printed (shown as `***`). Exits 0 on success, 2
    /// on bad input or any error (the message is on stderr).
    #[command(subcommand)]
    Connection(ConnectionCommand),
    /// Mint a JWT signed with a PKCS#8 PEM private key (RSA → RS256, P-256 → ES256,
    /// Ed25519 → EdDSA); prints the token. For development and tests.
    Token(crate::token_cmd::TokenArgs),
    /// Run the broker: MQTT listeners (plain and TLS) until SIGINT/SIGTERM.
    ///
    /// Prints `mqtt listening on ADDR` per listener, then `ready`, on stdout.
    Serve(crate::serve_cmd::ServeArgs),
    /// Simulated devices: provision a solution for a load test, run one, report.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Check a config file without starting the server.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Read and validate a TOML config file as `serve` would, with the `THINGSGATE_…`
    /// environment overrides: unknown keys, wrong types, invalid values, listen addresses, TLS
    /// files and JWKS files.
    ///
    /// Prints `ok` and exits 0, or prints the error (the file, line and column, the field and
    /// what is wrong) on stderr and exits 2.
    Check {
        /// The config file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SolutionCommand {
    /// Create a solution; prints its ID, API token and first secret, once.
    ///
    /// Only SHA-256 digests of the token and the secret are stored: keep them now.
    Create {
        /// The data directory (the server must not be running on it).
        #[arg(long, required_unless_present = "cluster")]
        data: Option<PathBuf>,
        /// Instead of a data directory: the NATS servers of a cluster (`nats://host:port`,
        /// comma-separated); the solution is shared by every node at once, online.
        #[arg(long, conflicts_with = "data", value_name = "NATS_URL")]
        cluster: Option<String>,
        /// A namespace the solution owns (repeat for several); owned by one solution only.
        #[arg(long = "namespace", required = true)]
        namespaces: Vec<String>,
        /// The solution ID (lowercase letters, digits, `-`); default: generated `s-<8 hex>`.
        #[arg(long)]
        id: Option<String>,
        /// Print only `{"solutionId","apiToken","secret"}` on stdout (the rest goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// List solutions: IDs, namespaces, number of active secrets (never secrets or digests).
    List {
        #[arg(long, required_unless_present = "cluster")]
        data: Option<PathBuf>,
        /// Instead of a data directory: the NATS servers of a cluster.
        #[arg(long, conflicts_with = "data", value_name = "NATS_URL")]
        cluster: Option<String>,
        /// JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Add a generated secret to a solution; prints it once.
    AddSecret {
        #[arg(long)]
        data: PathBuf,
        /// The solution ID.
        #[arg(long)]
        solution: String,
        /// Print only `{"solutionId","secretId","secret"}` on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a secret of a solution (by its ID, e.g. `s1`).
    RevokeSecret {
        #[arg(long)]
        data: PathBuf,
        /// The solution ID.
        #[arg(long)]
        solution: String,
        /// The secret's ID, as printed when it was created (`s1`, `s2`, …).
        #[arg(long = "secret-id")]
        secret_id: String,
    },
    /// Add a namespace to a solution (refused if another solution owns it).
    AddNamespace {
        #[arg(long)]
        data: PathBuf,
        /// The solution ID.
        #[arg(long)]
        solution: String,
        /// The namespace, e.g. `org.acme.fleet`.
        #[arg(long)]
        namespace: String,
    },
    /// Show or replace a solution's policy.
    #[command(subcommand)]
    Policy(SolutionPolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConnectionCommand {
    /// Create a connection from its JSON document (Ditto-style: `id`, `connectionType`, `uri`,
    /// `sources`, `targets`, …); refused if the solution has a connection with that `id`.
    Create {
        #[command(flatten)]
        at: connection_cmd::Where,
        /// Print only `{"solutionId","id"}` on stdout.
        #[arg(long)]
        json: bool,
        /// The connection document (JSON), or `-` for stdin.
        file: PathBuf,
    },
    /// List the connections: ID, type, open/closed, sources, targets, URI (password hidden).
    List {
        #[command(flatten)]
        at: connection_cmd::Where,
        /// The documents as a JSON array (passwords hidden).
        #[arg(long)]
        json: bool,
    },
    /// Delete a connection (a running server stops it at once).
    Delete {
        #[command(flatten)]
        at: connection_cmd::Where,
        /// The connection's ID.
        #[arg(long)]
        id: String,
    },
    /// The state of connections in a running server (`--http` only): one line per connection
    /// (state, since when, the last error, messages in/out/denied/failed).
    Status {
        #[command(flatten)]
        at: connection_cmd::Where,
        /// One connection (default: every connection of the solution).
        #[arg(long)]
        id: Option<String>,
        /// The status documents as JSON (one object with `--id`, else an array).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SolutionPolicyCommand {
    /// Print the solution policy (JSON, without `policyId`).
    Get {
        #[arg(long)]
        data: PathBuf,
        /// The solution ID.
        #[arg(long)]
        solution: String,
    },
    /// Replace the solution policy; refused if nobody could administer the solution after it.
    Set {
        #[arg(long)]
        data: PathBuf,
        /// The solution ID.
        #[arg(long)]
        solution: String,
        /// The policy (Ditto policy JSON, without `policyId`).
        file: PathBuf,
    },
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
    /// Exits 0 when granted (every permission asked), 1 when denied, 2 on bad input.
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
        /// READ, WRITE, EXECUTE or CREATE, or several separated by commas (`READ,WRITE`): each
        /// must hold on its own.
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
        Command::Solution(command) => run_solution(command),
        Command::Connection(command) => run_connection(command),
        Command::Serve(args) => crate::serve_cmd::run(args),
        Command::Bench(command) => crate::bench::main(command),
        Command::Config(ConfigCommand::Check { file }) => check_config(&file),
        Command::Token(args) => {
            println!("{}", crate::token_cmd::run(&args)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `thingsgate config check FILE`.
fn check_config(file: &std::path::Path) -> anyhow::Result<ExitCode> {
    crate::auth::jwt::install_crypto_provider()
        .map_err(|e| anyhow::anyhow!("cannot install the crypto provider: {e}"))?;
    for note in crate::config::check(file, std::env::vars())? {
        eprintln!("note: {note}");
    }
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

fn run_connection(command: ConnectionCommand) -> anyhow::Result<ExitCode> {
    match command {
        ConnectionCommand::Create { at, json, file } => connection_cmd::create(&at, &file, json),
        ConnectionCommand::List { at, json } => connection_cmd::list(&at, json),
        ConnectionCommand::Delete { at, id } => connection_cmd::delete(&at, &id),
        ConnectionCommand::Status { at, id, json } => {
            connection_cmd::status(&at, id.as_deref(), json)
        }
    }
}

fn run_solution(command: SolutionCommand) -> anyhow::Result<ExitCode> {
    match command {
        SolutionCommand::Create {
            data,
            cluster,
            namespaces,
            id,
            json,
        } => solution_cmd::create(
            solution_cmd::At::new(data, cluster),
            &namespaces,
            id.as_deref(),
            json,
        ),
        SolutionCommand::List {
            data,
            cluster,
            json,
        } => solution_cmd::list(solution_cmd::At::new(data, cluster), json),
        SolutionCommand::AddSecret {
            data,
            solution,
            json,
        } => solution_cmd::add_secret(&data, &solution, json),
        SolutionCommand::RevokeSecret {
            data,
            solution,
            secret_id,
        } => solution_cmd::revoke_secret(&data, &solution, &secret_id),
        SolutionCommand::AddNamespace {
            data,
            solution,
            namespace,
        } => solution_cmd::add_namespace(&data, &solution, &namespace),
        SolutionCommand::Policy(SolutionPolicyCommand::Get { data, solution }) => {
            solution_cmd::policy_get(&data, &solution)
        }
        SolutionCommand::Policy(SolutionPolicyCommand::Set {
            data,
            solution,
            file,
        }) => solution_cmd::policy_set(&data, &solution, &file),
    }
}
