//! MQTT over WebSockets (DESIGN.md §3; MQTT 3.1.1 and 5.0, §6 "Using WebSocket as a network
//! transport"): `GET /mqtt` on the HTTP listener with subprotocol `mqtt`, upgraded to a
//! WebSocket whose binary messages carry the MQTT byte stream, for browser dashboards.
//!
//! After the upgrade the connection is served exactly like a TCP one: the same admission (a
//! handshake slot and one of its source address's before the upgrade is accepted, a connection
//! slot once the CONNECT is read), the same `handshake::open` → `connection` loop, the same
//! metrics and the same graceful shutdown (v5 DISCONNECT 0x8B, then the WebSocket close). The
//! socket is one more [`Transport`] variant, [`WsStream`]: binary messages are appended to the
//! read buffer as bytes arrive on TCP (a packet may span messages and a message may hold several
//! packets), pings are answered, a close frame is the end of input, a text frame is a protocol
//! error that closes the connection (MQTT-6.0.0-1).
//!
//! The HTTP router mounts it with [`route`] and the [`Endpoint`] of the running server:
//! `.route(websocket::PATH, websocket::route(server.websocket()))`, served with
//! `into_make_service_with_connect_info::<SocketAddr>()` (the source address is what the
//! per-address handshake limit counts; behind a reverse proxy that is the proxy's).
//!
//! No `Origin` check: a page from any origin may open the socket, as it may open a TCP
//! connection through any other means; what it can do is decided by the credentials in its
//! CONNECT, never by cookies or other ambient authority of the browser.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::core::Core;
use crate::metrics::Metrics;
use crate::mqtt::admission::Admission;
use crate::mqtt::connection;
use crate::mqtt::transport::Transport;

/// Where the HTTP listener serves MQTT over WebSockets.
pub const PATH: &str = "/mqtt";

/// The WebSocket subprotocol of MQTT 3.1.1 and 5.0 (their §6); a client that does not offer
/// it is refused.
pub const SUBPROTOCOL: &str = "mqtt";

/// How long a closing socket waits for the client's close frame (RFC 6455 §7.1.1: the server
/// closes TCP once the closing handshake is done) before it closes TCP anyway.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// tungstenite's read buffer, allocated per socket and kept while it is open (its default,
/// 128 KiB, would make an idle dashboard cost 50 idle devices). Bigger messages grow it.
const READ_BUFFER: usize = 4 * 1024;

/// What the upgrade handler needs of the running MQTT server ([`crate::mqtt::server::Server`]
/// hands it out): the core, the server's admission and its shutdown tally.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub(crate) core: Arc<Core>,
    pub(crate) admission: Arc<Admission>,
    /// The server's "every connection has finished" channel (`Server::shutdown` waits until
    /// every sender is gone). Weak: the router holding it must not keep shutdown waiting; each
    /// upgraded connection holds a strong sender while it runs.
    pub(crate) done: mpsc::WeakSender<()>,
}

/// `GET` [`PATH`] for the HTTP router, whatever its state: the upgrade handler with its own.
/// The router must be served with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn route<S>(endpoint: Endpoint) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(upgrade).with_state(endpoint)
}

/// Why an upgrade request is refused, as the HTTP answer says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRefusal {
    #[error("MQTT over WebSockets needs the subprotocol `mqtt` (Sec-WebSocket-Protocol: mqtt)")]
    NoMqttSubprotocol,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("too many connections are in their handshake; try again later")]
    Busy,
}

impl IntoResponse for UpgradeRefusal {
    fn into_response(self) -> Response {
        let status = match self {
            UpgradeRefusal::NoMqttSubprotocol => StatusCode::BAD_REQUEST,
            UpgradeRefusal::ShuttingDown | UpgradeRefusal::Busy => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, format!("{self}\n")).into_response()
    }
}

/// The upgrade handler: subprotocol `mqtt` negotiated, a handshake slot taken (at once or
/// refused: unlike a TCP socket in the kernel's accept queue, a waiting request would already
/// hold a socket and a task), then the upgraded socket is served as an MQTT connection.
pub async fn upgrade(
    State(endpoint): State<Endpoint>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Result<Response, UpgradeRefusal> {
    let Endpoint {
        core,
        admission,
        done,
    } = endpoint;
    let ws = ws.protocols([SUBPROTOCOL]);
    if ws.selected_protocol().is_none() {
        core.metrics.refused("websocket_subprotocol");
        tracing::debug!(%peer, "refused a WebSocket upgrade without subprotocol `mqtt`");
        return Err(UpgradeRefusal::NoMqttSubprotocol);
    }
    let Some(done) = done.upgrade().filter(|_| !*core.shutdown.borrow()) else {
        return Err(UpgradeRefusal::ShuttingDown);
    };
    let permit = tokio::select! {
        biased;
        permit = admission.handshake_permit() => permit.map_err(|_| UpgradeRefusal::ShuttingDown)?,
        () = std::future::ready(()) => {
            core.metrics.refused("handshakes");
            return Err(UpgradeRefusal::Busy);
        }
    };
    core.metrics.connections_accepted.inc();
    let Some(slot) = admission.enter(permit, peer.ip()) else {
        core.metrics.refused("handshakes_per_address");
        return Err(UpgradeRefusal::Busy);
    };
    // A message holds one packet as big as allowed (and its fixed header): bigger ones are
    // refused from the frame header, before buffering. A client packing several packets into
    // one message stays below that in practice (browser clients send a message per packet).
    let max_message = (core.settings.max_packet_size as usize).saturating_add(5);
    Ok(ws
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_failed_upgrade(move |error| tracing::debug!(%peer, %error, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| async move {
            let transport =
                Transport::WebSocket(Box::new(WsStream::new(socket, core.metrics.clone())));
            if tracing::enabled!(tracing::Level::DEBUG) {
                let serve = connection::serve(core, transport, peer, slot, admission, done);
                Box::pin(tracing::Instrument::instrument(
                    serve,
                    connection::span(peer),
                ))
                .await;
            } else {
                connection::serve(core, transport, peer, slot, admission, done).await;
            }
        }))
}

/// The close code for a failed read: 1009 for a message over the limit, 1002 for a broken
/// WebSocket protocol (an unmasked frame, a bad opcode), 1011 otherwise (the socket is
/// probably gone anyway).
fn close_code_for(error: Option<&tungstenite::Error>) -> u16 {
    match error {
        Some(tungstenite::Error::Capacity(_)) => close_code::SIZE,
        Some(tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_)) => close_code::PROTOCOL,
        _ => close_code::ERROR,
    }
}

/// An upgraded socket as an MQTT transport.
#[derive(Debug)]
pub struct WsStream {
    socket: WebSocket,
    metrics: Arc<Metrics>,
    /// The close code [`WsStream::shutdown`] sends: normal, unless reading met a frame or
    /// message MQTT does not allow.
    close: u16,
}

impl WsStream {
    fn new(socket: WebSocket, metrics: Arc<Metrics>) -> Self {
        WsStream {
            socket,
            metrics,
            close: close_code::NORMAL,
        }
    }

    /// Appends the payload of the next binary message to `buf` (0: the client closed).
    /// Cancel-safe: a message is taken from the socket and appended in one step. Pings are
    /// answered by tungstenite (the pong leaves with the next read or write).
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        loop {
            match std::task::ready!(self.socket.poll_next_unpin(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(0)),
                Some(Ok(Message::Binary(data))) => {
                    // An empty message is no end of input: wait for the next one.
                    if !data.is_empty() {
                        buf.extend_from_slice(&data);
                        return Poll::Ready(Ok(data.len()));
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    // MQTT-6.0.0-1: only binary data frames carry MQTT.
                    self.close = close_code::UNSUPPORTED;
                    self.metrics.protocol_error("websocket_text_frame");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a WebSocket text frame: MQTT travels in binary frames only",
                    )));
                }
                Some(Err(e)) => {
                    let e = e.into_inner();
                    self.close = close_code_for(e.downcast_ref::<tungstenite::Error>());
                    return Poll::Ready(Err(io::Error::other(e)));
                }
            }
        }
    }

    /// Takes all of `data` as one binary message once the socket has room for it.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.socket.poll_ready_unpin(cx)).map_err(io::Error::other)?;
        self.socket
            .start_send_unpin(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(data.len()))
    }

    /// Sends the messages [`WsStream::poll_write`] took.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.socket.poll_flush_unpin(cx).map_err(io::Error::other)
    }

    /// The closing handshake: our close frame (unless the client's came first: then its
    /// answer, queued by tungstenite, leaves with the next read), then the client's close frame
    /// or the end of its input, within [`CLOSE_WAIT`].
    pub async fn shutdown(&mut self) {
        let frame = CloseFrame {
            code: self.close,
            reason: "".into(),
        };
        let _ = self.socket.send(Message::Close(Some(frame))).await;
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(_)) = self.socket.recv().await {}
        })
        .await;
    }
}
