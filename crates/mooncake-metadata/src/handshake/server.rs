//! The handshake listener.
//!
//! Unlike Mooncake's single sequential thread, connections are served concurrently; each
//! still carries exactly one request and one reply. A malformed, oversized or truncated frame,
//! or a peer that stalls, costs only its own connection: it is closed and the accept loop goes
//! on. A request's header must arrive within [`frame::HEADER_DEADLINE`] of the connection, and
//! its body at [`frame::MIN_RATE`] at least; over the caps, the longest-silent connection makes
//! room ([`mooncake_common::service`]).
//!
//! With a cluster token, a connection opens with the token's challenge-response
//! ([`mooncake_common::service::opening`]) before the request; a peer that cannot answer gets
//! nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_common::service::{opening, Activity, Limits};
use mooncake_common::{Error, Result, Service};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::frame::{self, FrameError, MessageType};
use super::messages::{ConnectionMessage, NotifyMessage, ProbeReply};

/// How long a peer may take to hang up after the reply.
const HANG_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections one peer address may hold at once.
pub const MAX_PER_PEER: usize = 64;

/// How a listener is bounded and who it serves.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Connection caps.
    pub limits: Limits,
    /// Serve only peers that prove they hold it.
    pub token: Option<ClusterToken>,
}

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
    /// Serves `listener` until [`close`](Self::close), without a token, at most
    /// `max_connections` at once ([`MAX_PER_PEER`] per address).
    pub fn start(
        listener: TcpListener,
        handler: Arc<dyn HandshakeHandler>,
        max_frame: usize,
        max_connections: usize,
    ) -> Result<Self> {
        let options = HandshakeOptions {
            max_frame,
            limits: Limits::new(max_connections, MAX_PER_PEER),
            token: None,
        };
        Self::start_with(listener, handler, options)
    }

    /// Serves `listener` until [`close`](Self::close).
    pub fn start_with(
        listener: TcpListener,
        handler: Arc<dyn HandshakeHandler>,
        options: HandshakeOptions,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::socket("handshake listener address", e))?;
        let HandshakeOptions {
            max_frame,
            limits,
            token,
        } = options;
        let service = Service::start(listener, limits, move |stream, peer, activity| {
            let (handler, token) = (handler.clone(), token.clone());
            async move {
                let served = serve(stream, handler.as_ref(), max_frame, token, activity).await;
                if let Err(e) = served {
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
    #[error("peer sent too little in {0:?}")]
    Stalled(Duration),
    #[error("{0}")]
    Unauthenticated(Error),
    #[error("peer closed the connection mid-frame")]
    Truncated,
    #[error("malformed JSON in a {0:?} message: {1}")]
    Json(MessageType, serde_json::Error),
}

async fn serve(
    mut stream: TcpStream,
    handler: &dyn HandshakeHandler,
    max_frame: usize,
    token: Option<ClusterToken>,
    activity: Activity,
) -> Result<(), ServeError> {
    let accepted = Instant::now();
    if let Some(token) = &token {
        let deadline = accepted + frame::HEADER_DEADLINE;
        tokio::time::timeout_at(deadline, opening::accept(&mut stream, token))
            .await
            .map_err(|_| ServeError::Stalled(frame::HEADER_DEADLINE))?
            .map_err(ServeError::Unauthenticated)?;
        activity.authenticated();
    }
    let request = read_frame(&mut stream, max_frame, Some((accepted, &activity))).await?;
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
    let _ = tokio::time::timeout(HANG_UP_TIMEOUT, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

/// Reads one frame. With `bounds` (when the connection started, and its activity), the frame
/// must keep to [`frame::deadline`] and each read counts as progress.
pub(super) async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_frame: usize,
    bounds: Option<(Instant, &Activity)>,
) -> Result<frame::Frame, ServeError> {
    let mut buf = Vec::with_capacity(512);
    loop {
        match frame::check(&buf, max_frame) {
            Ok(total) => return Ok(frame::parse(&buf, total)),
            Err(FrameError::Incomplete) => {}
            Err(e) => return Err(e.into()),
        }
        let mut chunk = [0u8; 4096];
        let n = match bounds {
            None => stream.read(&mut chunk).await?,
            Some((started, activity)) => {
                let allowed = frame::deadline(&buf);
                let n = tokio::time::timeout_at(started + allowed, stream.read(&mut chunk))
                    .await
                    .map_err(|_| ServeError::Stalled(allowed))??;
                activity.touch();
                n
            }
        };
        if n == 0 {
            return Err(ServeError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("handshake messages always serialize")
}
