//! Listeners and the accept loop: plain TCP and TLS (rustls), a handshake slot before `accept`
//! and one per source address after it (`crate::mqtt::admission`), TLS handshakes within the
//! handshake timeout, and graceful shutdown as a
//! pair of signals (STYLE.md): a `watch` that says "stop", and an `mpsc` whose senders every
//! connection holds, so that waiting for the last one to drop waits for every connection.
//! MQTT over WebSockets is accepted by the HTTP listener and joins here
//! ([`Server::websocket`]): the same core, admission and shutdown.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::core::Core;
use crate::core::identity::Authenticator;
use crate::core::space::Spaces;
use crate::core::twins::Twins;
use crate::limits::MqttSettings;
use crate::metrics::Metrics;
use crate::mqtt::admission::{Admission, HandshakeSlot};
use crate::mqtt::connection;
use crate::mqtt::transport::Transport;
use crate::mqtt::websocket;

/// A TLS listener's material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate file `{path}`: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read TLS key file `{path}`: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS certificate and key do not form a valid server configuration: {0}")]
    Config(String),
}

/// Builds the rustls server configuration from PEM files.
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert_file.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert_file.display().to_string(),
            reason: "no certificate in the file".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key {
        path: key_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub core: Arc<Core>,
    /// The bound addresses of the plain listeners, in the order given.
    pub mqtt_addrs: Vec<SocketAddr>,
    pub mqtts_addr: Option<SocketAddr>,
    /// What the HTTP listener needs to serve MQTT over WebSockets.
    websocket: websocket::Endpoint,
    admission: Arc<Admission>,
    stop: watch::Sender<bool>,
    done_tx: Option<mpsc::Sender<()>>,
    done_rx: mpsc::Receiver<()>,
}

/// Binds the listeners and starts accepting.
pub async fn start(
    settings: MqttSettings,
    auth: Authenticator,
    twins: Twins,
    mqtt: &[String],
    mqtts: Option<(&str, TlsAcceptor)>,
    fallback_to_any_port: bool,
) -> io::Result<Server> {
    let (stop, shutdown) = watch::channel(false);
    let (done_tx, done_rx) = mpsc::channel(1);
    let admission = Arc::new(Admission::new(
        settings.max_handshakes,
        settings.max_handshakes_per_address,
        settings.max_connections,
    ));
    let spaces = Spaces::new(settings.max_retained_messages);
    let core = Arc::new(Core {
        settings,
        auth,
        spaces,
        twins,
        metrics: Arc::new(Metrics::default()),
        shutdown,
        bridges: crate::bridge::Bridges::default(),
        deadlines: Arc::default(),
        relay: std::sync::OnceLock::new(),
    });
    let restored =
        crate::core::retained::restore(&*core.twins.store, &core.auth.solutions, &core.spaces);
    tracing::info!(restored, "retained messages restored");
    let sessions = core.restore_sessions();
    tracing::info!(sessions, "persistent sessions restored");
    let mut mqtt_addrs = Vec::with_capacity(mqtt.len());
    for address in mqtt {
        let listener = match bind(address).await {
            Ok(listener) => listener,
            // `serve --dev`: another broker on 1883 should not stop a demo.
            Err(e) if fallback_to_any_port && e.kind() == io::ErrorKind::AddrInUse => {
                let any = match address.rsplit_once(':') {
                    Some((host, _)) => format!("{host}:0"),
                    None => "127.0.0.1:0".to_owned(),
                };
                tracing::warn!(%address, "address in use; listening on a free port instead");
                bind(&any).await?
            }
            Err(e) => return Err(e),
        };
        mqtt_addrs.push(listener.local_addr()?);
        tokio::spawn(accept_loop(
            core.clone(),
            listener,
            None,
            admission.clone(),
            done_tx.clone(),
            connection::serve,
        ));
    }
    let mut mqtts_addr = None;
    if let Some((address, acceptor)) = mqtts {
        let listener = bind(address).await?;
        mqtts_addr = Some(listener.local_addr()?);
        tokio::spawn(accept_loop(
            core.clone(),
            listener,
            Some(acceptor),
            admission.clone(),
            done_tx.clone(),
            connection::serve,
        ));
    }
    let websocket = websocket::Endpoint {
        core: core.clone(),
        admission: admission.clone(),
        done: done_tx.downgrade(),
    };
    Ok(Server {
        core,
        mqtt_addrs,
        mqtts_addr,
        websocket,
        admission,
        stop,
        done_tx: Some(done_tx),
        done_rx,
    })
}

async fn bind(address: &str) -> io::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on `{address}`: {e}")))
}

/// Accepts sockets for `serve` (MQTT or AMQP): admission, TLS, one task per connection.
async fn accept_loop<S, F>(
    core: Arc<Core>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    admission: Arc<Admission>,
    done: mpsc::Sender<()>,
    serve: S,
) where
    S: Fn(Arc<Core>, Transport, SocketAddr, HandshakeSlot, Arc<Admission>, mpsc::Sender<()>) -> F
        + Copy
        + Send
        + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let mut shutdown = core.shutdown.clone();
    loop {
        let permit = tokio::select! {
            permit = admission.handshake_permit() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        core.metrics.connections_accepted.inc();
        let Some(slot) = admission.enter(permit, peer.ip()) else {
            // As many handshakes from this address as it may have: closed at once.
            core.metrics.refused("handshakes_per_address");
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let core = core.clone();
        let tls = tls.clone();
        let done = done.clone();
        let admission = admission.clone();
        let Some(acceptor) = tls else {
            // Plain TCP: the task is the connection's own future, with nothing around it (a
            // wrapping block would keep its captured values beside it for the connection's
            // life: 150 bytes per idle connection).
            connection::spawn(
                peer,
                serve(core, Transport::Tcp(tcp), peer, slot, admission, done),
            );
            continue;
        };
        connection::spawn(peer, async move {
            // Boxed: the handshake's state is large and only needed while it runs, so it must
            // not size the task of every (idle) connection.
            let handshake = Box::pin(tokio::time::timeout(
                admission.handshake_timeout(core.settings.connect_timeout()),
                acceptor.accept(tcp),
            ))
            .await;
            let transport = match handshake {
                Ok(Ok(stream)) => Transport::Tls(Box::new(stream)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            serve(core, transport, peer, slot, admission, done).await;
        });
    }
}

impl Server {
    /// Opens an AMQP 0.9.1 listener (`crate::amqp`) on `address`, with TLS if `tls` is given:
    /// the same core, admission and shutdown as the MQTT listeners. Returns its bound address.
    pub async fn listen_amqp(
        &self,
        address: &str,
        tls: Option<TlsAcceptor>,
    ) -> io::Result<SocketAddr> {
        let listener = bind(address).await?;
        let bound = listener.local_addr()?;
        let Some(done) = self.done_tx.clone() else {
            return Err(io::Error::other("the server is shutting down"));
        };
        tokio::spawn(accept_loop(
            self.core.clone(),
            listener,
            tls,
            self.admission.clone(),
            done,
            crate::amqp::connection::serve,
        ));
        Ok(bound)
    }

    /// The upgrade endpoint the HTTP router mounts at `/mqtt`
    /// (`crate::mqtt::websocket::route`): its connections are admitted, served and shut down
    /// with this server's.
    pub fn websocket(&self) -> websocket::Endpoint {
        self.websocket.clone()
    }

    /// Stops accepting, tells every connection to close (v5: DISCONNECT 0x8B) and waits for
    /// them, at most `grace`.
    pub async fn shutdown(mut self, grace: std::time::Duration) {
        let _ = self.stop.send(true);
        self.core.kick_all();
        drop(self.done_tx.take());
        let _ = tokio::time::timeout(grace, self.done_rx.recv()).await;
    }
}
