//! `rumqttd-baseline`: the `rumqttd` crate (the broker of the rumqtt project) embedded as a
//! second baseline broker for `thingsgate bench compare`. Not part of the Thingsgate build: the
//! root workspace excludes this directory (see README.md).
//!
//! ```text
//! rumqttd-baseline [--listen ADDR] [--listen5 ADDR]
//! ```
//!
//! Starts one MQTT 3.1.1 listener (`--listen`, default 127.0.0.1:0) and, with `--listen5`, one
//! MQTT 5 listener, with no authentication and the limits below. Prints
//! `mqtt listening on IP:PORT`, then `mqtt5 listening on IP:PORT` (with `--listen5`), then
//! `ready`, one per line, once each listener has answered an MQTT CONNECT with a CONNACK.
//! Exits 0 on SIGTERM or SIGINT, 1 if a listener cannot start or stops, 2 on bad arguments.
//! Logs go to stderr at `warn`, without rumqttd's per-connection end-of-connection lines
//! (`RUST_LOG` overrides both).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const USAGE: &str = "usage: rumqttd-baseline [--listen ADDR] [--listen5 ADDR]
  --listen ADDR    MQTT 3.1.1 listener [default: 127.0.0.1:0, a free port]
  --listen5 ADDR   also an MQTT 5 listener (port 0: a free port)
Prints `mqtt listening on IP:PORT` (and `mqtt5 listening on IP:PORT`), then `ready`.
No authentication. Logs on stderr at `warn` (RUST_LOG overrides). Stops on SIGTERM/SIGINT.";

/// The log filter unless `RUST_LOG` is set. rumqttd logs every accepted connection and
/// subscription at `info`; at `warn` only problems remain, among them `Read cursor start
/// jumped`, a subscriber skipping messages the commit log no longer holds (lost messages).
const DEFAULT_LOG_FILTER: &str = "warn";

/// rumqttd 0.20.0's `error!` call sites that fire for every connection that ends normally, as
/// (module, line). Unless `RUST_LOG` is set they are not printed: 10,000 connections closing at
/// the end of a run would otherwise print 10,000 to 20,000 "errors" that are none.
/// - `rumqttd::router::routing` 416, `no-connection id N is already gone`: a client that sends
///   DISCONNECT is disconnected twice, for the packet and then for its closed link (rumqttd's
///   own comment there says so), and the second finds nothing.
/// - `rumqttd::server::broker` 577 `connection-stop` and 581 `router-drop`: a connection's task
///   ending because the router closed its link, as it does after a DISCONNECT.
///
/// Still printed: `broker` 592 `disconnected` (a connection ended by a reset, a keep-alive
/// timeout, a protocol error such as an oversized packet), failed CONNECTs, refused links (the
/// connection limit) and everything else at `warn` and above. The lines are those of the exact
/// rumqttd version in Cargo.toml (`=0.20.0`); a new version needs them checked again.
const NORMAL_END_CALLSITES: [(&str, u32); 3] = [
    ("rumqttd::router::routing", 416),
    ("rumqttd::server::broker", 577),
    ("rumqttd::server::broker", 581),
];

fn is_normal_end(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.is_event()
        && NORMAL_END_CALLSITES.iter().any(|&(module, line)| {
            metadata.module_path() == Some(module) && metadata.line() == Some(line)
        })
}

// ---- Limits (all per listener unless said otherwise) ------------------------------------------

/// Router: the most connections at once (all listeners together). The router refuses a CONNECT
/// past it. 20,000 leaves room for the 10,000 idle connections of a connection-count test plus
/// the subscribers and a 2x margin. Each connection is a socket, so the process's open-files
/// soft limit is raised to its hard limit at start; where that hard limit is 20,000 or less it,
/// not this, is the real bound (a few descriptors go to listeners and the runtime).
const MAX_CONNECTIONS: usize = 20_000;

/// Largest packet accepted from a client, in bytes (rumqttd checks the packet's remaining
/// length, i.e. everything after the fixed header, against it): a 1 MiB payload plus room for
/// the longest topic (65,535 bytes) and the rest of the variable header.
const MAX_PACKET_SIZE: usize = 1024 * 1024 + 64 * 1024;

/// rumqttd's router keeps every PUBLISH in an in-memory commit log per subscription filter (and,
/// for a topic no filter matches, one per topic) and subscribers read from it at their own
/// pace, so it is this log, not a per-connection queue, that holds messages a subscriber has not
/// received yet. When the log holds `SEGMENT_COUNT` segments and the newest is full, the oldest
/// is dropped, and a subscriber still reading it jumps ahead (its messages are lost; rumqttd
/// logs `Read cursor start jumped` at `warn`).
///
/// 1 MiB x 16 = at most 16 MiB of messages per log, as rumqttd counts them (payload + topic + 4
/// bytes; the memory used is several times that: about 75 MB for a full log of 64-byte
/// payloads). A subscriber can lag about 15 MiB behind the newest message without losing any:
/// 100 devices x 10 messages in flight = 1,000 messages, so nothing is lost for payloads up to
/// about 15 KiB (at 64-byte payloads, about 170,000 messages of lag). A 1 MiB payload still
/// fits (a segment may overflow by one message), though then only ~15 such messages of lag.
/// The price of a larger log: rumqttd keeps it full in memory even after delivery, which shows
/// in its memory figures (4 MiB x 16 measured about 500 MB resident after a few runs).
const SEGMENT_SIZE: usize = 1024 * 1024;
const SEGMENT_COUNT: usize = 16;

/// QoS 0 messages the router moves from a commit log to one subscriber's outgoing buffer per
/// turn. rumqttd's outgoing buffer holds 200 notifications (a constant of rumqttd) and a fuller
/// buffer only pauses the subscriber's reads (the messages wait in the log), so this is a batch
/// size, not a loss point. At QoS 1/2 the batch is the subscriber's free in-flight slots
/// instead: rumqttd allows 100 unacknowledged PUBLISHes per subscriber (a constant of rumqttd),
/// the rest wait in the log, again without loss.
const MAX_OUTGOING_PACKET_COUNT: u64 = 200;

/// Packets read off one connection's socket per batch before they are handed to the router
/// (`max_inflight_count` in rumqttd's settings, despite its name only a batch size: packets past
/// it stay in the connection's read buffer for the next batch, so nothing is dropped). A device at `--inflight 10` has at
/// most 10 PUBLISHes outstanding, so 100 is 10 times that.
const MAX_READ_BATCH: usize = 100;

/// Time from TCP accept to the CONNECT packet before rumqttd closes the connection. The field is
/// a u16 of milliseconds in rumqttd: 60 s (rumqttd's own example value) is generous for a
/// ramp of 10,000 connections, which each send CONNECT straight away.
const CONNECTION_TIMEOUT_MS: u16 = 60_000;

/// rumqttd sleeps this long after each accepted connection (a throttle). 0: the ramp of a
/// connection-count test is set by the load generator, not by the broker.
const NEXT_CONNECTION_DELAY_MS: u64 = 0;

/// Giving up on the readiness probe after this long.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Version {
    V311,
    V5,
}

impl Version {
    fn label(self) -> &'static str {
        match self {
            Version::V311 => "mqtt",
            Version::V5 => "mqtt5",
        }
    }
}

#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    listen5: Option<SocketAddr>,
}

fn parse_args() -> Result<Args, String> {
    let mut listen: Option<SocketAddr> = None;
    let mut listen5: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--listen" | "--listen5" => {
                let value = match inline.or_else(|| args.next()) {
                    Some(v) => v,
                    None => return Err(format!("{name} needs an address (IP:PORT)")),
                };
                let addr: SocketAddr = value
                    .parse()
                    .map_err(|e| format!("{name} {value}: not an IP:PORT address ({e})"))?;
                if name == "--listen" {
                    listen = Some(addr);
                } else {
                    listen5 = Some(addr);
                }
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        listen: listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
        listen5,
    })
}

/// rumqttd binds its listener itself from a `SocketAddr` and does not tell which port it got, so
/// port 0 is resolved here: bind a std listener on it, read the port the OS chose and close it,
/// right before rumqttd binds that port. Race: another process may take the port in between (a
/// few milliseconds); rumqttd's bind then fails, the listener's thread ends with the error, and
/// this process exits 1 instead of printing `ready` (see `wait_ready`).
fn resolve_port(addr: SocketAddr) -> io::Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    drop(listener);
    Ok(local)
}

fn connection_settings() -> ConnectionSettings {
    ConnectionSettings {
        connection_timeout_ms: CONNECTION_TIMEOUT_MS,
        max_payload_size: MAX_PACKET_SIZE,
        max_inflight_count: MAX_READ_BATCH,
        // No authentication: neither user/password pairs nor an external handler.
        auth: None,
        external_auth: None,
        // A PUBLISH on a topic that no subscription matches gets its own commit log. Without
        // this rumqttd disconnects the publisher ("NoMatchingFilters"), which would make every
        // run without subscribers (or with devices connecting before subscribers) fail.
        dynamic_filters: true,
    }
}

fn router_config() -> RouterConfig {
    RouterConfig {
        max_connections: MAX_CONNECTIONS,
        max_outgoing_packet_count: MAX_OUTGOING_PACKET_COUNT,
        max_segment_size: SEGMENT_SIZE,
        max_segment_count: SEGMENT_COUNT,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

fn server_settings(version: Version, addr: SocketAddr) -> ServerSettings {
    ServerSettings {
        name: format!("{}-{}", version.label(), addr),
        listen: addr,
        tls: None,
        next_connection_delay_ms: NEXT_CONNECTION_DELAY_MS,
        connections: connection_settings(),
    }
}

/// What a listener's thread reports when it ends (its bind failed, or it stopped).
fn listener_end(version: Version, addr: SocketAddr, result: Result<(), String>) -> String {
    let why = match result {
        Ok(()) => "stopped".to_owned(),
        Err(e) => e,
    };
    format!("{} listener on {addr}: {why}", version.label())
}

/// An MQTT CONNECT (clean session, keep-alive 60 s; rumqttd refuses keep-alive 0) as a raw
/// packet, for a short client ID (the whole packet under 128 bytes: one length byte).
fn connect_packet(version: Version, client_id: &str) -> io::Result<Vec<u8>> {
    let too_long = |_| io::Error::other("probe client ID too long");
    let mut body = Vec::new();
    body.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T']);
    body.push(match version {
        Version::V311 => 4,
        Version::V5 => 5,
    });
    body.push(0x02); // clean session / clean start
    body.extend_from_slice(&60u16.to_be_bytes());
    if let Version::V5 = version {
        body.push(0x00); // no properties
    }
    body.extend_from_slice(
        &u16::try_from(client_id.len())
            .map_err(too_long)?
            .to_be_bytes(),
    );
    body.extend_from_slice(client_id.as_bytes());
    let len = u8::try_from(body.len()).map_err(too_long)?;
    if len >= 0x80 {
        return Err(io::Error::other("probe client ID too long"));
    }
    let mut packet = vec![0x10, len];
    packet.extend_from_slice(&body);
    Ok(packet)
}

/// One MQTT handshake against the listener: CONNECT, a CONNACK with return/reason code 0, then
/// DISCONNECT. Proves the listener accepts connections and the router registers them.
fn probe(version: Version, addr: SocketAddr) -> io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.set_nodelay(true)?;
    stream.write_all(&connect_packet(version, "rumqttd-baseline-ready-probe")?)?;
    // CONNACK: type 0x20, remaining length (one byte: rumqttd's CONNACK is short), then the
    // flags, the return code (3.1.1) or reason code (5), and in 5 the properties.
    let mut head = [0u8; 2];
    stream.read_exact(&mut head)?;
    let mut rest = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut rest)?;
    if head[0] != 0x20 || head[1] & 0x80 != 0 || rest.get(1) != Some(&0) {
        return Err(io::Error::other(format!(
            "unexpected CONNACK {head:02x?} {rest:02x?}"
        )));
    }
    // DISCONNECT, then wait for the broker to close the connection (all read, no reset).
    stream.write_all(&[0xE0, 0x00])?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut sink = Vec::new();
    let _ = stream.read_to_end(&mut sink);
    Ok(())
}

/// Waits until each listener answers `probe`, or one of them fails, or `READY_TIMEOUT` passes.
/// A listener whose bind failed (say the port was taken in `resolve_port`'s race) ends its
/// thread, so a probe that succeeds while a thread has ended is not taken as ready: the answer
/// came from someone else.
fn wait_ready(
    listeners: &[(Version, SocketAddr, thread::JoinHandle<()>)],
    failed: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for (version, addr, handle) in listeners {
        loop {
            if let Ok(why) = failed.try_recv() {
                return Err(why);
            }
            let result = probe(*version, *addr);
            if handle.is_finished() {
                return Err(failed.try_recv().unwrap_or_else(|_| {
                    format!("{} listener on {addr} stopped", version.label())
                }));
            }
            match result {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{} listener on {addr} not ready after {:?}: {e}",
                        version.label(),
                        READY_TIMEOUT
                    ));
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rumqttd-baseline: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };

    // Logs on stderr: `RUST_LOG` if set, else `warn` without rumqttd's per-connection
    // end-of-connection "errors" (`NORMAL_END_CALLSITES`).
    let (filter, quiet) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, false),
        Err(_) => (EnvFilter::new(DEFAULT_LOG_FILTER), true),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(false)
        .finish()
        .with(filter_fn(move |metadata| {
            !(quiet && is_normal_end(metadata))
        }))
        .init();

    // Each connection is a socket: raise the soft open-files limit to the hard one (say 1,024 to
    // the hard limit) so that 10,000+ connections are not refused by the OS first.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("rumqttd-baseline: cannot raise the open-files limit: {e}");
    }

    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rumqttd-baseline: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    let mut wanted = vec![(Version::V311, args.listen)];
    if let Some(addr) = args.listen5 {
        wanted.push((Version::V5, addr));
    }
    let mut resolved = Vec::new();
    for (version, addr) in wanted {
        let addr = resolve_port(addr)
            .map_err(|e| format!("cannot bind {} listener on {addr}: {e}", version.label()))?;
        resolved.push((version, addr));
    }

    // The router runs on its own thread (rumqttd's design); listeners send it their links.
    let router_tx = Router::new(0, router_config()).spawn();
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel();
    let mut listeners = Vec::new();
    for (version, addr) in resolved {
        // As `rumqttd::Broker::start` does for each `[v4.x]`/`[v5.x]` entry: a thread with a
        // current-thread tokio runtime running `Server::start`. Done here rather than through
        // `Broker` to keep each listener's result: a failed bind ends up on `failed_tx` (and so
        // in `wait_ready` or the signal loop), not only in a log line. Inline, not a function:
        // the router inbox's type names `Event`, which rumqttd does not export.
        let router_tx = router_tx.clone();
        let failed = failed_tx.clone();
        let settings = server_settings(version, addr);
        let handle = thread::Builder::new()
            .name(format!("rumqttd-{}", version.label()))
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("no runtime: {e}"))
                    .and_then(|runtime| {
                        runtime.block_on(async move {
                            match version {
                                Version::V311 => {
                                    Server::new(settings, router_tx, V4)
                                        .start(LinkType::Remote)
                                        .await
                                }
                                Version::V5 => {
                                    Server::new(settings, router_tx, V5)
                                        .start(LinkType::Remote)
                                        .await
                                }
                            }
                            .map_err(|e| format!("{e:?}"))
                        })
                    });
                let _ = failed.send(listener_end(version, addr, result));
            })
            .map_err(|e| format!("cannot start the {} listener thread: {e}", version.label()))?;
        listeners.push((version, addr, handle));
    }
    drop(failed_tx);

    wait_ready(&listeners, &mut failed_rx)?;

    let mut out = io::stdout().lock();
    for (version, addr, _) in &listeners {
        writeln!(out, "{} listening on {addr}", version.label()).map_err(|e| e.to_string())?;
    }
    writeln!(out, "ready").map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("no runtime for signals: {e}"))?;
    runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
        tokio::select! {
            _ = term.recv() => Ok(()),
            _ = int.recv() => Ok(()),
            why = failed_rx.recv() => Err(why.unwrap_or_else(|| "listeners stopped".to_owned())),
        }
    })?;
    // rumqttd's router and listener threads have no shutdown; ending the process ends them
    // (the caller of `run` returns and `main` exits 0). Clients see their connections close.
    Ok(ExitCode::SUCCESS)
}
