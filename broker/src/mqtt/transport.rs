//! The socket of one MQTT connection: plain TCP, TLS or a WebSocket, read into a buffer that an
//! idle connection does not hold, written from the connection's write buffer.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

    /// Reads what is available into `buf` (0: the peer closed). Cancel-safe. TCP waits for
    /// readability before reserving buffer space, so an idle connection holds none; a
    /// WebSocket appends each binary message's payload once it has arrived.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Tcp(stream) => loop {
                stream.readable().await?;
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
                    return Ok(n);
                }
                match result {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Readiness was stale: give the space back before waiting again.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            },
            Transport::Tls(stream) => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
                stream.read_buf(buf).await
            }
            Transport::WebSocket(stream) => stream.read_into(buf).await,
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Tcp(stream) => stream.write_all(data).await,
            Transport::Tls(stream) => {
                stream.write_all(data).await?;
                stream.flush().await
            }
            Transport::WebSocket(stream) => stream.write_all(data).await,
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
