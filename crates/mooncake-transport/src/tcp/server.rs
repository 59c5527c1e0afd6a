//! Serves registered memory over Mooncake's TCP data protocol.
//!
//! Sessions are persistent: after a request the server reads the next header on the same
//! connection. A request is served only when its whole range lies inside one registered
//! region; anything else is answered with a reject (v2) or a close (v1) without touching
//! memory. A garbage header closes only its own connection.

use std::net::SocketAddr;
use std::sync::Arc;

use mooncake_common::{Error, Result, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::exchange::{serve, ServerStep};
use super::wire::{Header, HEADER_LEN};
use crate::memory::MemoryRegistry;

/// A running data server.
pub struct TcpServer {
    addr: SocketAddr,
    service: Service,
}

/// Data sessions served at once; more wait in the listen backlog.
const MAX_SESSIONS: usize = 1024;

impl TcpServer {
    /// Serves `registry` on `listener` until [`close`](Self::close).
    pub fn start(listener: TcpListener, registry: Arc<MemoryRegistry>) -> Result<Self> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::socket("TCP data listener address", e))?;
        let service = Service::start(listener, MAX_SESSIONS, move |stream, peer| {
            let registry = registry.clone();
            async move {
                match session(stream, &registry).await {
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
}

async fn session(mut stream: TcpStream, registry: &MemoryRegistry) -> Result<(), SessionError> {
    let mut header = [0u8; HEADER_LEN];
    loop {
        // A clean EOF between requests ends the session quietly.
        match stream.read(&mut header[..1]).await? {
            0 => return Ok(()),
            _ => stream.read_exact(&mut header[1..]).await?,
        };
        let request = Header::decode(&header)?;
        let range = usize::try_from(request.addr)
            .ok()
            .zip(usize::try_from(request.size).ok());
        let region = range.and_then(|(addr, len)| registry.find_remote(addr, len));
        for step in serve(&request, region.is_some()) {
            // `serve` asks for the payload only of a range `region` holds.
            let (Some(region), Some((addr, len))) = (&region, range) else {
                match step {
                    ServerStep::SendStatus(status) => stream.write_all(&status.encode()).await?,
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
                    // SAFETY: `find_remote` proved the range lies inside `region`, which stays
                    // mapped while we hold it; peers writing registered memory is the
                    // engine's contract.
                    let target = unsafe { region.bytes_mut(addr, len) };
                    stream.read_exact(target).await?;
                }
                ServerStep::SendPayload => {
                    // SAFETY: as above, for reading.
                    let source = unsafe { region.bytes(addr, len) };
                    stream.write_all(source).await?;
                }
                ServerStep::SendStatus(status) => stream.write_all(&status.encode()).await?,
                ServerStep::Close => return Ok(()),
            }
        }
    }
}
