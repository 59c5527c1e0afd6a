//! The owner's side: hands out the control table and arenas to same-host peers.
//!
//! ```text
//! request  u8 kind (0 control table, 1 arena, 2 watch) | u64 LE arena id
//! reply    u8 status (0 ok, 1 unknown) | u64 LE length, the memfd attached (SCM_RIGHTS)
//! ```
//!
//! A watch request gets no reply: the peer keeps that connection open and takes its end (EOF)
//! as the owner going away. The socket lives in the abstract namespace, so nothing is left on
//! disk and only processes in the same network namespace can reach it.
//!
//! Bounds: a connection's first request must arrive within [`REQUEST_DEADLINE`], and every
//! request, once begun, be whole within as long; connections then stay open (peers keep
//! them), up to the caps per process and in all, over which the longest-silent one makes room
//! ([`mooncake_common::service`]). With a cluster token, a connection opens with the token's
//! challenge-response ([`mooncake_common::service::opening`]) and a peer that cannot answer
//! gets nothing: no table, no arena.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;
use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_common::service::{opening, Activity, Limits};
use mooncake_common::{Error, Result, Service};
use sendfd::SendWithFd;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use super::control::ControlTable;
use crate::memory::MemoryRegistry;

pub(crate) const REQUEST_LEN: usize = 9;
pub(crate) const REPLY_LEN: usize = 9;
pub(crate) const KIND_CONTROL: u8 = 0;
pub(crate) const KIND_ARENA: u8 = 1;
pub(crate) const KIND_WATCH: u8 = 2;

/// The opening, a connection's first request and any request once begun must be whole within
/// this long.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(1);

/// How a shared-memory server is bounded and who it serves.
#[derive(Debug, Clone)]
pub struct ShmServerOptions {
    /// Connection caps; peers are counted by process (each holds two connections per owner).
    pub limits: Limits,
    /// Serve only peers that prove they hold it.
    pub token: Option<ClusterToken>,
}

impl Default for ShmServerOptions {
    fn default() -> Self {
        Self {
            limits: Limits::new(1024, 64),
            token: None,
        }
    }
}

/// A running shared-memory server.
pub struct ShmServer {
    name: String,
    service: Service,
}

impl ShmServer {
    /// Listens on a fresh abstract socket and serves `control` and the arenas of `registry`,
    /// with the default bounds and no token.
    pub fn start(control: Arc<ControlTable>, registry: Arc<MemoryRegistry>) -> Result<Self> {
        Self::start_with(control, registry, ShmServerOptions::default())
    }

    /// As [`ShmServer::start`], bounded by `options`.
    pub fn start_with(
        control: Arc<ControlTable>,
        registry: Arc<MemoryRegistry>,
        options: ShmServerOptions,
    ) -> Result<Self> {
        let name = format!(
            "mooncake-shm-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name)
            .map_err(|e| Error::socket("shared-memory socket name", e))?;
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::UnixListener::from_std)
            .map_err(|e| Error::socket(format!("bind @{name}"), e))?;
        let ShmServerOptions { limits, token } = options;
        let service = Service::start(listener, limits, move |stream, peer, activity| {
            let (control, registry, token) = (control.clone(), registry.clone(), token.clone());
            async move {
                if let Err(e) = serve(stream, &control, &registry, token, activity).await {
                    tracing::debug!(%peer, "shared-memory connection ended: {e}");
                }
            }
        });
        Ok(Self { name, service })
    }

    /// The abstract socket name peers connect to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops serving and drops every connection, which tells watching peers we are gone.
    pub async fn close(&self) {
        self.service.close().await;
    }
}

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no request within {0:?}")]
    Stalled(Duration),
    #[error("{0}")]
    Unauthenticated(Error),
}

async fn serve(
    mut stream: UnixStream,
    control: &ControlTable,
    registry: &MemoryRegistry,
    token: Option<ClusterToken>,
    activity: Activity,
) -> Result<(), ServeError> {
    let stalled = |_| ServeError::Stalled(REQUEST_DEADLINE);
    if let Some(token) = &token {
        tokio::time::timeout(REQUEST_DEADLINE, opening::accept(&mut stream, token))
            .await
            .map_err(stalled)?
            .map_err(ServeError::Unauthenticated)?;
        activity.authenticated();
    }
    let mut request = [0u8; REQUEST_LEN];
    let mut first = true;
    loop {
        // Peers keep their connection between requests, but send the first one at once.
        let begun = if first {
            tokio::time::timeout(REQUEST_DEADLINE, stream.read(&mut request[..1]))
                .await
                .map_err(stalled)?
        } else {
            stream.read(&mut request[..1]).await
        };
        if !matches!(begun, Ok(1)) {
            return Ok(());
        }
        first = false;
        tokio::time::timeout(REQUEST_DEADLINE, stream.read_exact(&mut request[1..]))
            .await
            .map_err(stalled)??;
        activity.touch();
        let id = u64::from_le_bytes(request[1..].try_into().expect("8 bytes"));
        let arena;
        let (fd, len): (Option<&OwnedFd>, usize) = match request[0] {
            KIND_CONTROL => (Some(control.fd()), super::control::SLOTS as usize * 8),
            KIND_ARENA => {
                arena = registry.arena(id);
                match &arena {
                    Some(a) => (Some(a.fd()), a.len()),
                    None => (None, 0),
                }
            }
            KIND_WATCH => {
                // Hold the connection until the peer hangs up or we close.
                let mut sink = [0u8; 64];
                while stream.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown request kind {other}"),
                )
                .into())
            }
        };
        let mut reply = [0u8; REPLY_LEN];
        reply[0] = u8::from(fd.is_none());
        reply[1..].copy_from_slice(&(len as u64).to_le_bytes());
        let fds: Vec<_> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        loop {
            stream.writable().await?;
            match stream.send_with_fd(&reply, &fds) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
