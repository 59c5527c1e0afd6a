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

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::sync::Arc;

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

/// A running shared-memory server.
pub struct ShmServer {
    name: String,
    service: Service,
}

impl ShmServer {
    /// Listens on a fresh abstract socket and serves `control` and the arenas of `registry`.
    pub fn start(control: Arc<ControlTable>, registry: Arc<MemoryRegistry>) -> Result<Self> {
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
        let service = Service::start(listener, 1024, move |stream, peer| {
            let (control, registry) = (control.clone(), registry.clone());
            async move {
                if let Err(e) = serve(stream, &control, &registry).await {
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

async fn serve(
    mut stream: UnixStream,
    control: &ControlTable,
    registry: &MemoryRegistry,
) -> std::io::Result<()> {
    let mut request = [0u8; REQUEST_LEN];
    loop {
        if stream.read_exact(&mut request).await.is_err() {
            return Ok(());
        }
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
                ))
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
                Err(e) => return Err(e),
            }
        }
    }
}
