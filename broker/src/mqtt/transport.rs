//! The socket of one MQTT connection: plain TCP, TLS or a WebSocket, read into a buffer that an
//! idle connection does not hold, written from the connection's write buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::mqtt::websocket::WsStream;

/// The socket: plain TCP, TLS or MQTT over WebSockets. The last two are boxed: the enum is
/// part of every connection's task, and a plain TCP connection must not pay for their size.
#[derive(Debug)]
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    WebSocket(Box<WsStream>),
}

impl Transport {
    /// The protocol a client on this socket speaks, for the core's metrics.
    pub fn protocol(&self) -> crate::core::session::Protocol {
        match self {
            Transport::WebSocket(_) => crate::core::session::Protocol::MqttWebSocket,
            _ => crate::core::session::Protocol::Mqtt,
        }
    }

    /// Reads what is available into `buf` (0: the peer closed). Cancel-safe.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_into(cx, buf)).await
    }

    /// Reads what is available into `buf` (0: the peer closed) without a future of its own, so
    /// that a waiting connection keeps no read state in its task. TCP waits for readability
    /// before reserving buffer space, so an idle connection holds none; TLS reads through a
    /// stack buffer; a WebSocket appends each binary message's payload once it has arrived.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Transport::Tcp(stream) => loop {
                std::task::ready!(stream.poll_read_ready(cx))?;
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
                let spare = buf.capacity() - buf.len();
                let mut read = None;
                // A read that leaves room in the buffer has drained the socket: its readiness
                // is cleared now, as tokio's own `poll_read` does, instead of by one more
                // `recvfrom` answering EAGAIN at the next wait (two syscalls per message for a
                // device sending one message at a time). Data arriving later raises a new edge.
                // (`try_io` clears readiness when its closure says WouldBlock.)
                let result = stream.try_io(tokio::io::Interest::READABLE, || {
                    match stream.try_read_buf(buf) {
                        Ok(n) if n > 0 && n < spare => {
                            read = Some(n);
                            Err(io::ErrorKind::WouldBlock.into())
                        }
                        other => other,
                    }
                });
                if let Some(n) = read {
                    return Poll::Ready(Ok(n));
                }
                match result {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Readiness was stale: give the space back before waiting again.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            Transport::Tls(stream) => {
                let mut chunk = [0u8; 4096];
                let mut read = ReadBuf::new(&mut chunk);
                std::task::ready!(Pin::new(&mut **stream).poll_read(cx, &mut read))?;
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Transport::WebSocket(stream) => stream.poll_read_into(cx, buf),
        }
    }

    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_write(cx, data)).await?;
            data = data.get(n..).unwrap_or_default();
        }
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Writes some of `data` (a WebSocket: all of it, as one binary message); `Ok(0)` only for
    /// empty `data` or a socket that takes no more.
    pub fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let n = match self {
            Transport::Tcp(stream) => std::task::ready!(Pin::new(stream).poll_write(cx, data))?,
            Transport::Tls(stream) => {
                std::task::ready!(Pin::new(&mut **stream).poll_write(cx, data))?
            }
            Transport::WebSocket(stream) => std::task::ready!(stream.poll_write(cx, data))?,
        };
        if n == 0 && !data.is_empty() {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        Poll::Ready(Ok(n))
    }

    /// Pushes what [`Transport::poll_write`] took onto the wire (TLS records, WebSocket frames).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Tcp(_) => Poll::Ready(Ok(())),
            Transport::Tls(stream) => Pin::new(&mut **stream).poll_flush(cx),
            Transport::WebSocket(stream) => stream.poll_flush(cx),
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = match self {
            Transport::Tcp(stream) => stream.shutdown().await,
            Transport::Tls(stream) => stream.shutdown().await,
            Transport::WebSocket(stream) => {
                stream.shutdown().await;
                Ok(())
            }
        };
    }
}
