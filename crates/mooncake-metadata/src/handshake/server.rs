//! The handshake listener.
//!
//! Unlike Mooncake's single sequential thread, connections are served concurrently, capped by
//! a semaphore; each still carries exactly one request and one reply. A malformed, oversized
//! or truncated frame, or a peer that stalls, costs only its own connection: it is closed and
//! the accept loop goes on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_common::{Error, Result, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::frame::{self, FrameError, MessageType};
use super::messages::{ConnectionMessage, NotifyMessage, ProbeReply};

/// How long a peer may take to send its request, and to hang up after the reply.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the listener asks of the engine.
pub trait HandshakeHandler: Send + Sync + 'static {
    /// A P2P peer sent its descriptor; reply with ours.
    fn on_metadata(&self, peer_desc: &str) -> Result<String>;
    /// A peer sent a notification.
    fn on_notify(&self, message: NotifyMessage);
    /// An RDMA connection request; the reply, accepting or rejecting.
    fn on_connection(&self, request: ConnectionMessage) -> ConnectionMessage {
        ConnectionMessage {
            local_nic_path: request.peer_nic_path,
            peer_nic_path: request.local_nic_path,
            reply_msg: "RDMA is not enabled on this peer".to_owned(),
            ..ConnectionMessage::default()
        }
    }
}

/// A running listener.
pub struct HandshakeServer {
    addr: SocketAddr,
    service: Service,
}

impl HandshakeServer {
    /// Serves `listener` until [`close`](Self::close).
    pub fn start(
        listener: TcpListener,
        handler: Arc<dyn HandshakeHandler>,
        max_frame: usize,
        max_connections: usize,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::socket("handshake listener address", e))?;
        let service = Service::start(listener, max_connections, move |stream, peer| {
            let handler = handler.clone();
            async move {
                if let Err(e) = serve(stream, handler.as_ref(), max_frame).await {
                    tracing::debug!(%peer, "handshake connection dropped: {e}");
                }
            }
        });
        Ok(Self { addr, service })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drops open connections and waits for every task.
    pub async fn close(&self) {
        self.service.close().await;
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ServeError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("peer sent nothing for {0:?}")]
    Stalled(Duration),
    #[error("peer closed the connection mid-frame")]
    Truncated,
    #[error("malformed JSON in a {0:?} message: {1}")]
    Json(MessageType, serde_json::Error),
}

async fn serve(
    mut stream: TcpStream,
    handler: &dyn HandshakeHandler,
    max_frame: usize,
) -> Result<(), ServeError> {
    let request = tokio::time::timeout(PEER_TIMEOUT, read_frame(&mut stream, max_frame))
        .await
        .map_err(|_| ServeError::Stalled(PEER_TIMEOUT))??;
    let reply = match request.kind {
        MessageType::Metadata => {
            let text = String::from_utf8_lossy(&request.body);
            match handler.on_metadata(&text) {
                Ok(desc) => desc,
                Err(e) => {
                    tracing::debug!("rejecting metadata request: {e}");
                    String::new()
                }
            }
        }
        MessageType::Notify => {
            let message: NotifyMessage = serde_json::from_slice(&request.body)
                .map_err(|e| ServeError::Json(request.kind, e))?;
            handler.on_notify(message);
            json(&NotifyMessage::success())
        }
        MessageType::Probe => json(&ProbeReply {
            status: "success".to_owned(),
        }),
        MessageType::Connection => {
            let message: ConnectionMessage = serde_json::from_slice(&request.body)
                .map_err(|e| ServeError::Json(request.kind, e))?;
            json(&handler.on_connection(message))
        }
    };
    stream
        .write_all(&frame::encode(request.kind, reply.as_bytes()))
        .await?;
    stream.shutdown().await?;
    // Wait for the peer to hang up (as Mooncake does), but never for long.
    let mut sink = [0u8; 256];
    let _ = tokio::time::timeout(PEER_TIMEOUT, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

pub(super) async fn read_frame(
    stream: &mut TcpStream,
    max_frame: usize,
) -> Result<frame::Frame, ServeError> {
    let mut buf = Vec::with_capacity(512);
    loop {
        match frame::check(&buf, max_frame) {
            Ok(total) => return Ok(frame::parse(&buf, total)),
            Err(FrameError::Incomplete) => {}
            Err(e) => return Err(e.into()),
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ServeError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("handshake messages always serialize")
}
