//! Serves registered memory over Mooncake's TCP data protocol.
//!
//! Sessions are persistent: after a request the server reads the next header on the same
//! connection. A request is served only when its whole range lies inside one registered
//! region; anything else is answered with a reject (v2) or a close (v1) without touching
//! memory. A garbage header closes only its own connection.
//!
//! Bounds: a session silent between requests for [`DataServerOptions::idle_timeout`] ends; a
//! header, once begun, must be whole within [`HEADER_DEADLINE`]; a payload that makes no
//! progress for [`DataServerOptions::progress_timeout`] ends its session; over the caps, the
//! longest-silent session makes room ([`mooncake_common::service`]). A request holds its
//! region through a [`PeerHold`], which the owner's unregister revokes.
//!
//! With a cluster token, a session is served only after the token's challenge-response
//! ([`mooncake_common::service::opening`]), whose first frame no Mooncake header resembles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_common::service::{opening, Activity, Limits};
use mooncake_common::{Error, Result, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::exchange::{serve, ServerStep};
use super::wire::{Header, HEADER_LEN};
use crate::memory::{MemoryRegistry, PeerHold};

/// A running data server.
pub struct TcpServer {
    addr: SocketAddr,
    service: Service,
}

/// Data sessions served at once.
pub const MAX_SESSIONS: usize = 1024;
/// Data sessions one peer address may hold at once.
pub const MAX_SESSIONS_PER_PEER: usize = 256;
/// A header, once its first byte arrived, and the opening with a token, must be whole within
/// this long.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(1);

/// How a data server is bounded and who it serves.
#[derive(Debug, Clone)]
pub struct DataServerOptions {
    /// Session caps.
    pub limits: Limits,
    /// A session silent this long between requests ends.
    pub idle_timeout: Duration,
    /// A payload (or a reply the peer does not read) that makes no progress this long ends
    /// its session.
    pub progress_timeout: Duration,
    /// Serve only peers that prove they hold it.
    pub token: Option<ClusterToken>,
}

impl Default for DataServerOptions {
    fn default() -> Self {
        Self {
            limits: Limits::new(MAX_SESSIONS, MAX_SESSIONS_PER_PEER),
            idle_timeout: Duration::from_secs(60),
            progress_timeout: Duration::from_secs(5),
            token: None,
        }
    }
}

impl TcpServer {
    /// Serves `registry` on `listener` until [`close`](Self::close), with the default bounds
    /// and no token.
    pub fn start(listener: TcpListener, registry: Arc<MemoryRegistry>) -> Result<Self> {
        Self::start_with(listener, registry, DataServerOptions::default())
    }

    /// Serves `registry` on `listener` until [`close`](Self::close).
    pub fn start_with(
        listener: TcpListener,
        registry: Arc<MemoryRegistry>,
        options: DataServerOptions,
    ) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::socket("TCP data listener address", e))?;
        let options = Arc::new(options);
        let service = Service::start(listener, options.limits, move |stream, peer, activity| {
            let (registry, options) = (registry.clone(), options.clone());
            async move {
                match session(stream, &registry, &options, &activity).await {
                    Ok(()) => tracing::trace!(%peer, "TCP data session ended"),
                    Err(e) => tracing::debug!(%peer, "TCP data session closed: {e}"),
                }
            }
        });
        Ok(Self { addr, service })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drops every session and waits for their tasks.
    pub async fn close(&self) {
        self.service.close().await;
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Opcode(#[from] super::wire::BadOpcode),
    #[error("rejected {size} bytes at {addr:#x}: not inside one registered buffer")]
    Rejected { addr: u64, size: u64 },
    #[error("no progress for {0:?}")]
    Stalled(Duration),
    #[error("the owner unregistered the buffer mid-request")]
    Revoked,
    #[error("{0}")]
    Unauthenticated(Error),
}

/// `fut`, or [`SessionError::Stalled`] after `limit`.
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, SessionError> {
    Ok(tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| SessionError::Stalled(limit))??)
}

async fn session(
    mut stream: TcpStream,
    registry: &MemoryRegistry,
    options: &DataServerOptions,
    activity: &Activity,
) -> Result<(), SessionError> {
    if let Some(token) = &options.token {
        tokio::time::timeout(HEADER_DEADLINE, opening::accept(&mut stream, token))
            .await
            .map_err(|_| SessionError::Stalled(HEADER_DEADLINE))?
            .map_err(SessionError::Unauthenticated)?;
        activity.authenticated();
    }
    let stall = options.progress_timeout;
    let mut header = [0u8; HEADER_LEN];
    loop {
        // A clean EOF, or silence, between requests ends the session quietly.
        match tokio::time::timeout(options.idle_timeout, stream.read(&mut header[..1])).await {
            Err(_) | Ok(Ok(0)) => return Ok(()),
            Ok(read) => read?,
        };
        within(HEADER_DEADLINE, stream.read_exact(&mut header[1..])).await?;
        activity.touch();
        let request = Header::decode(&header)?;
        let range = usize::try_from(request.addr)
            .ok()
            .zip(usize::try_from(request.size).ok());
        let hold = range.and_then(|(addr, len)| registry.hold_remote(addr, len));
        for step in serve(&request, hold.is_some()) {
            // `serve` asks for the payload only of a range `hold` holds.
            let (Some(hold), Some((addr, len))) = (&hold, range) else {
                match step {
                    ServerStep::SendStatus(status) => {
                        within(stall, stream.write_all(&status.encode())).await?
                    }
                    _ => {
                        return Err(SessionError::Rejected {
                            addr: request.addr,
                            size: request.size,
                        })
                    }
                }
                continue;
            };
            match step {
                ServerStep::ReadPayload => {
                    receive(&stream, hold, addr, len, activity, stall).await?;
                }
                ServerStep::SendPayload => send(&stream, hold, addr, len, activity, stall).await?,
                ServerStep::SendStatus(status) => {
                    within(stall, stream.write_all(&status.encode())).await?
                }
                ServerStep::Close => return Ok(()),
            }
        }
        activity.touch();
    }
}

/// Reads `len` bytes from the peer into the held range at `addr`, one non-blocking read at a
/// time inside the hold, so that a revocation stops it between two reads.
async fn receive(
    stream: &TcpStream,
    hold: &PeerHold,
    addr: usize,
    len: usize,
    activity: &Activity,
    stall: Duration,
) -> Result<(), SessionError> {
    let mut done = 0;
    while done < len {
        tokio::select! {
            () = hold.revoked() => return Err(SessionError::Revoked),
            ready = within(stall, stream.readable()) => ready?,
        }
        let (at, want) = (addr + done, len - done);
        // SAFETY: `hold_remote` proved `[addr, addr+len)` lies inside the held region, which
        // stays mapped while held; peers writing registered memory is the engine's contract.
        let read = hold.access(|region| stream.try_read(unsafe { region.bytes_mut(at, want) }));
        match read {
            None => return Err(SessionError::Revoked),
            Some(Ok(0)) => {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
            }
            Some(Ok(n)) => {
                done += n;
                activity.touch();
            }
            Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends the held range at `addr` to the peer, as [`receive`] reads.
async fn send(
    stream: &TcpStream,
    hold: &PeerHold,
    addr: usize,
    len: usize,
    activity: &Activity,
    stall: Duration,
) -> Result<(), SessionError> {
    let mut done = 0;
    while done < len {
        tokio::select! {
            () = hold.revoked() => return Err(SessionError::Revoked),
            ready = within(stall, stream.writable()) => ready?,
        }
        let (at, want) = (addr + done, len - done);
        // SAFETY: as in `receive`, for reading.
        let written = hold.access(|region| stream.try_write(unsafe { region.bytes(at, want) }));
        match written {
            None => return Err(SessionError::Revoked),
            Some(Ok(0)) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Some(Ok(n)) => {
                done += n;
                activity.touch();
            }
            Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
    Ok(())
}
