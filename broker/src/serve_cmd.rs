//! `thingsgate serve`: load the config and the data dir, start the listeners, print where they
//! are, run until SIGINT/SIGTERM, then shut down gracefully (connections closed, journal
//! flushed last). `--dev` prepares a demo solution, a local JWT issuer and a demo thing first
//! (`crate::dev`), and opens an HTTP listener even without `--http`.
//!
//! Start-up output on stdout (a contract scripts and tests rely on): one line per listener,
//! `mqtt listening on ADDR` / `mqtts listening on ADDR` / `amqp listening on ADDR` / `amqps
//! listening on ADDR` / `http listening on ADDR`, then `ready`. Logs go to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use twin::store::TwinStore;

use crate::auth::jwt::Issuers;
use crate::auth::limiter::{FailureLimiter, LimiterConfig};
use crate::config::Config;
use crate::core::identity::Authenticator;
use crate::mqtt::server;
use crate::solution_cmd::DataDir;

/// The arguments of `thingsgate serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The TOML config file (issuers, `[mqtt]` listeners and limits).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The data directory (created if missing); with `--dev`, default: a temporary one.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A plain MQTT listener address (repeatable); replaces `[mqtt] listen`.
    #[arg(long = "mqtt", value_name = "ADDR")]
    pub mqtt: Vec<String>,
    /// The MQTT-over-TLS listener address; replaces `[mqtt] tls_listen`.
    #[arg(long = "mqtts", value_name = "ADDR")]
    pub mqtts: Option<String>,
    /// A plain AMQP 0.9.1 listener address (repeatable); with `--dev`, default: 127.0.0.1:5673,
    /// or a free port if taken.
    #[arg(long = "amqp", value_name = "ADDR")]
    pub amqp: Vec<String>,
    /// The AMQP-over-TLS listener address (the certificate of `[mqtt] tls_cert_file` and
    /// `tls_key_file`).
    #[arg(long = "amqps", value_name = "ADDR")]
    pub amqps: Option<String>,
    /// The HTTP address: the API under `/api/2`, MQTT over WebSockets at `/mqtt`, `/metrics`,
    /// `/health`, `/ready`; with `--dev`, default: 127.0.0.1:8080, or a free port if taken.
    #[arg(long = "http", value_name = "ADDR")]
    pub http: Option<String>,
    /// Development mode: a demo solution, a local JWT issuer, a demo thing whose policy gives
    /// a device and two users different rights, ready-to-paste client commands.
    #[arg(long)]
    pub dev: bool,
    /// Cluster mode: share things, policies, solutions, retained messages and sessions with
    /// the other nodes through NATS JetStream at these servers (`nats://host:port`,
    /// comma-separated); replaces `[cluster] urls`. No data directory is used then.
    #[arg(long = "cluster", value_name = "NATS_URL")]
    pub cluster: Option<String>,
}

/// Runs the server until a signal.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let format = crate::logging::LogFormat::from_env().map_err(|e| anyhow::anyhow!(e))?;
    crate::logging::init(format);
    // One socket per connection: take the whole hard limit of open files (19,000 connections
    // need it; the usual soft limit is 1,024).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    crate::auth::jwt::install_crypto_provider()
        .map_err(|e| anyhow::anyhow!("cannot install the crypto provider: {e}"))?;
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            let mut config = Config::default();
            config
                .mqtt
                .apply_env(std::env::vars())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            config
        }
    };
    // The file's table had its environment overrides applied by `Config::load`.
    let env: Vec<(String, String)> = match &args.config {
        Some(_) => Vec::new(),
        None => std::env::vars().collect(),
    };
    config.cluster =
        crate::config::ClusterConfig::resolve(config.cluster.take(), args.cluster.as_deref(), env)?;
    if config.cluster.is_some() && args.dev {
        bail!(
            "`--dev` prepares a demo in a local data directory; it does not combine with cluster \
             mode (create solutions with `thingsgate solution create --cluster URLS`)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let _temp;
    let mut cluster_store = None;
    let (dir, data) = match &config.cluster {
        Some(cluster) => {
            let store = runtime.block_on(crate::cluster::open_store(cluster))?;
            cluster_store = Some(store.clone());
            (DataDir::from_store(Box::new(store))?, None)
        }
        None => {
            let data = match (&args.data, args.dev) {
                (Some(dir), _) => dir.clone(),
                (None, true) => {
                    let dir = tempfile::Builder::new()
                        .prefix("thingsgate-dev-")
                        .tempdir()
                        .context("cannot create a temporary data directory")?;
                    let path = dir.path().to_path_buf();
                    _temp = dir;
                    path
                }
                (None, false) => {
                    bail!(
                        "`--data DIR` is required (or `--dev` for a temporary one, or `--cluster URLS`)"
                    )
                }
            };
            (DataDir::open(&data, true)?, Some(data))
        }
    };
    let dev = if args.dev {
        let data = data.as_deref().context("`--dev` needs a data directory")?;
        Some(crate::dev::prepare(&dir, data, &mut config)?)
    } else {
        None
    };
    if !args.mqtt.is_empty() {
        config.mqtt.listen = args.mqtt.clone();
    }
    if args.mqtts.is_some() {
        config.mqtt.tls_listen = args.mqtts.clone();
    }
    config
        .mqtt
        .validate()
        .map_err(|e| anyhow::anyhow!("[mqtt] {e}"))?;
    let acceptor = if config.mqtt.tls_listen.is_some() || args.amqps.is_some() {
        let resolve = |file: &Option<String>| -> anyhow::Result<PathBuf> {
            let file = file
                .as_deref()
                .context("a TLS listener needs `tls_cert_file` and `tls_key_file`")?;
            Ok(resolve(&config.base_dir, file))
        };
        Some(server::tls_acceptor(
            &resolve(&config.mqtt.tls_cert_file)?,
            &resolve(&config.mqtt.tls_key_file)?,
        )?)
    } else {
        None
    };
    let tls = match (&config.mqtt.tls_listen, &acceptor) {
        (Some(address), Some(acceptor)) => Some((address.clone(), acceptor.clone())),
        _ => None,
    };
    let DataDir {
        store, solutions, ..
    } = dir;
    let store: Arc<dyn TwinStore> = Arc::from(store);
    let result = runtime.block_on(async {
        // JWKS files are read and URLs fetched now; a key set that cannot be had is an error.
        let issuers = Arc::new(Issuers::load(&config.issuers).await?);
        let refresher = issuers.spawn_refresher();
        let auth = Authenticator {
            solutions: Arc::new(solutions),
            issuers,
            limiter: FailureLimiter::new(LimiterConfig::default()),
            operators: config.operators.clone(),
        };
        let server = server::start(
            config.mqtt.clone(),
            auth,
            crate::core::twins::Twins::new(store.clone()),
            &config.mqtt.listen,
            tls.as_ref().map(|(a, t)| (a.as_str(), t.clone())),
            args.dev && args.mqtt.is_empty(),
        )
        .await?;
        if let (Some(store), Some(cluster)) = (&cluster_store, &config.cluster) {
            crate::cluster::join(&server.core, store, cluster).await?;
        }
        let mut amqp_addrs = Vec::new();
        for address in &args.amqp {
            amqp_addrs.push(server.listen_amqp(address, None).await?);
        }
        if args.amqp.is_empty() && args.dev {
            // Development mode speaks AMQP too: port 5673 (RabbitMQ may have 5672), or a free one.
            match server.listen_amqp(crate::dev::DEV_AMQP, None).await {
                Ok(address) => amqp_addrs.push(address),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    amqp_addrs.push(server.listen_amqp("127.0.0.1:0", None).await?);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let amqps_addr = match (&args.amqps, &acceptor) {
            (Some(address), Some(acceptor)) => {
                Some(server.listen_amqp(address, Some(acceptor.clone())).await?)
            }
            _ => None,
        };
        let http = match (&args.http, args.dev) {
            (Some(address), _) => {
                Some(crate::http::start(server.core.clone(), server.websocket(), address).await?)
            }
            // Development mode shows the HTTP API too: port 8080, or a free one if it is taken.
            (None, true) => {
                let start =
                    |address| crate::http::start(server.core.clone(), server.websocket(), address);
                match start(crate::dev::DEV_HTTP).await {
                    Ok(address) => Some(address),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        Some(start("127.0.0.1:0").await?)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            (None, false) => None,
        };
        {
            let mut out = std::io::stdout().lock();
            for address in &server.mqtt_addrs {
                writeln!(out, "mqtt listening on {address}")?;
            }
            if let Some(address) = server.mqtts_addr {
                writeln!(out, "mqtts listening on {address}")?;
            }
            for address in &amqp_addrs {
                writeln!(out, "amqp listening on {address}")?;
            }
            if let Some(address) = amqps_addr {
                writeln!(out, "amqps listening on {address}")?;
            }
            if let Some(address) = http {
                writeln!(out, "http listening on {address}")?;
            }
            if let (Some(dev), Some(address)) = (&dev, server.mqtt_addrs.first()) {
                crate::dev::print_instructions(
                    &mut out,
                    dev,
                    *address,
                    http,
                    amqp_addrs.first().copied(),
                )?;
            }
            writeln!(out, "ready")?;
            out.flush()?;
        }
        // Bridges: every stored connection of every solution starts now, later ones when stored.
        let bridges = crate::bridge::manager::spawn(server.core.clone());
        match (&data, &config.cluster) {
            (Some(data), _) => tracing::info!(data = %data.display(), "thingsgate is serving"),
            (None, Some(cluster)) => {
                tracing::info!(stream = %cluster.stream, "thingsgate is serving in cluster mode")
            }
            (None, None) => tracing::info!("thingsgate is serving"),
        }
        wait_for_signal().await;
        tracing::info!("shutting down");
        server.shutdown(Duration::from_secs(10)).await;
        if tokio::time::timeout(Duration::from_secs(10), bridges)
            .await
            .is_err()
        {
            tracing::warn!("bridge connections did not stop in time");
        }
        refresher.abort();
        anyhow::Ok(())
    });
    drop(runtime);
    store
        .close()
        .context("cannot close the data directory cleanly")?;
    result?;
    Ok(ExitCode::SUCCESS)
}

fn resolve(base: &Path, file: &str) -> PathBuf {
    let path = Path::new(file);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
