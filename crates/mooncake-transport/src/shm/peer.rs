//! The mapper's side: one connection per same-host owner, its mappings, and the copies.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_common::service::opening;
use mooncake_common::{Error, ErrorKind, Result};
use sendfd::RecvWithFd;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::control::{ControlView, Slot, SLOTS};
use super::server::{KIND_ARENA, KIND_CONTROL, KIND_WATCH, REPLY_LEN};
use crate::copy::copy_bytes;
use crate::memory::{Mapping, Region};
use crate::Opcode;

/// What an owner publishes so that same-host peers can reach its memory (the descriptor's
/// `shm` object; Mooncake peers ignore it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmTarget {
    /// The owner's host identity (see [`super::host`]).
    pub host: String,
    /// Its abstract socket name.
    pub socket: String,
    /// Its process id, for `process_vm_*` on memory outside arenas.
    pub pid: u32,
    /// An address in the owner that is always readable, to test `process_vm_*` permission.
    pub probe: u64,
}

/// Where a remote buffer is, for a same-host peer (the buffer descriptor's `shm` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmBuffer {
    /// Its slot in the owner's control table.
    pub slot: u32,
    /// The generation the slot was claimed in for this buffer; a copy is refused once the
    /// slot holds another one. 0 (absent) names no claim and is always refused.
    #[serde(default)]
    pub generation: u32,
    /// The arena that holds it (whole), if engine-owned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arena: Option<u64>,
}

/// How one copy reaches the remote side.
#[derive(Debug, Clone, Copy)]
pub struct RemoteRange {
    /// The buffer's shared-memory description.
    pub buffer: ShmBuffer,
    /// The buffer's start address in the owner.
    pub buffer_addr: u64,
    /// The first byte of the copy, an address in the owner.
    pub addr: u64,
}

/// Which mechanism a copy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A mapping of the owner's arena.
    Mapped,
    /// `process_vm_readv`/`process_vm_writev`.
    CrossMemory,
}

/// How long the owner may take to answer one request (or, when connecting, all of them).
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to one same-host owner.
///
/// The owner answers on a task of its runtime, which may be ours: a thread of that runtime
/// must never wait for an answer. Connecting is asynchronous; an arena's first use asks the
/// owner for it with a blocking round trip, which [`ShmPeer::copy`] makes and
/// [`ShmPeer::copy_if_mapped`] declines to make.
pub struct ShmPeer {
    target: ShmTarget,
    /// Blocking, for arena requests made off the async workers.
    requests: Mutex<UnixStream>,
    control: ControlView,
    arenas: Mutex<HashMap<u64, Arc<Mapping>>>,
    alive: Arc<AtomicBool>,
    cross_memory: bool,
}

impl std::fmt::Debug for ShmPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPeer")
            .field("target", &self.target)
            .field("alive", &self.is_alive())
            .field("cross_memory", &self.cross_memory)
            .finish()
    }
}

impl ShmPeer {
    /// Connects to `target`: maps its control table and checks `process_vm_*` permission.
    /// Returns the peer and the watch connection, whose end (EOF) means the owner is gone; the
    /// caller watches it with [`ShmPeer::watch`]. Waits for the owner without holding a thread,
    /// two seconds at most.
    /// With `token`, both connections open with its challenge-response, and an owner that
    /// cannot prove it holds the token fails the connect with `ERR_UNAUTHENTICATED`.
    pub async fn connect(
        target: &ShmTarget,
        token: Option<&ClusterToken>,
    ) -> Result<(Arc<Self>, tokio::net::UnixStream)> {
        let timed_out = || {
            Error::socket(
                format!("shared-memory request to @{}", target.socket),
                std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"),
            )
        };
        let (requests, watch, fd, len) = tokio::time::timeout(IO_TIMEOUT, handshake(target, token))
            .await
            .map_err(|_| timed_out())??;
        if len < SLOTS as usize * 8 {
            return Err(Error::new(
                ErrorKind::Protocol,
                "shared-memory control table too small",
            ));
        }
        let control = ControlView::new(Mapping::map(std::os::fd::AsFd::as_fd(&fd), len)?);
        // From here on, requests are made by threads that may block.
        let requests = requests
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
            .and_then(|s| {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Ok(s)
            })
            .map_err(|e| Error::socket("socket timeout", e))?;
        let cross_memory = probe_cross_memory(target);
        tracing::debug!(socket = %target.socket, cross_memory, "connected to a same-host peer");
        let peer = Arc::new(Self {
            target: target.clone(),
            requests: Mutex::new(requests),
            control,
            arenas: Mutex::new(HashMap::new()),
            alive: Arc::new(AtomicBool::new(true)),
            cross_memory,
        });
        Ok((peer, watch))
    }

    /// Waits for the owner to go away, then drops every mapping of it. Run it on a task.
    pub async fn watch(self: Arc<Self>, mut watch: tokio::net::UnixStream) {
        let mut sink = [0u8; 16];
        while matches!(watch.read(&mut sink).await, Ok(n) if n > 0) {}
        self.alive.store(false, Ordering::Release);
        self.arenas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        tracing::debug!(socket = %self.target.socket, "same-host peer went away");
    }

    /// Whether the owner is still there.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// The owner this connects to.
    pub fn target(&self) -> &ShmTarget {
        &self.target
    }

    /// How a copy to `buffer` would go, if it can go through shared memory at all.
    pub fn path(&self, buffer: &ShmBuffer) -> Option<Path> {
        match buffer.arena {
            Some(_) => Some(Path::Mapped),
            None if self.cross_memory => Some(Path::CrossMemory),
            None => None,
        }
    }

    /// Copies `len` bytes between local registered memory at `local_addr` (inside `region`)
    /// and `remote`. Fails cleanly when the owner is gone or unregistered the buffer.
    ///
    /// The first copy to an arena asks the owner for it, a blocking round trip: call this only
    /// where blocking is allowed, never on an async worker (see [`ShmPeer::copy_if_mapped`]).
    pub fn copy(
        &self,
        op: Opcode,
        region: &Region,
        local_addr: usize,
        len: usize,
        remote: &RemoteRange,
    ) -> Result<()> {
        self.copy_with(op, region, local_addr, len, remote, true)
            .map(|_| ())
    }

    /// [`ShmPeer::copy`], unless it would have to ask the owner for an arena first: then
    /// `None`, and nothing was done. Never blocks on the owner.
    pub fn copy_if_mapped(
        &self,
        op: Opcode,
        region: &Region,
        local_addr: usize,
        len: usize,
        remote: &RemoteRange,
    ) -> Option<Result<()>> {
        self.copy_with(op, region, local_addr, len, remote, false)
            .transpose()
    }

    /// The copy; `Ok(None)` when the arena is not mapped and `may_ask` is false.
    fn copy_with(
        &self,
        op: Opcode,
        region: &Region,
        local_addr: usize,
        len: usize,
        remote: &RemoteRange,
        may_ask: bool,
    ) -> Result<Option<()>> {
        if !self.is_alive() {
            return Err(Error::new(
                ErrorKind::Socket,
                format!("the same-host peer behind @{} is gone", self.target.socket),
            ));
        }
        let path = self.path(&remote.buffer);
        if let (Some(Path::Mapped), Some(id), false) = (path, remote.buffer.arena, may_ask) {
            if self.mapped(id).is_none() {
                return Ok(None);
            }
        }
        let slot = Slot {
            index: remote.buffer.slot,
            generation: remote.buffer.generation,
        };
        let Some(_use) = self.control.acquire(slot) else {
            if let Some(id) = remote.buffer.arena {
                // Unregistered for good: let go of our mapping of it.
                self.arenas
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            return Err(Error::new(
                ErrorKind::AddressNotRegistered,
                format!(
                    "the buffer at {:#x} is no longer registered by its owner",
                    remote.buffer_addr
                ),
            ));
        };
        let offset = remote.addr.checked_sub(remote.buffer_addr).ok_or_else(|| {
            Error::new(ErrorKind::AddressNotRegistered, "address below its buffer")
        })? as usize;
        match path {
            Some(Path::Mapped) => {
                let id = remote.buffer.arena.expect("mapped path has an arena");
                let mapping = match self.mapped(id) {
                    Some(mapping) => mapping,
                    None if may_ask => self.arena(id)?,
                    // Dropped since the check above (the owner went away, say).
                    None => return Ok(None),
                };
                if offset
                    .checked_add(len)
                    .is_none_or(|end| end > mapping.len())
                {
                    return Err(Error::new(
                        ErrorKind::AddressNotRegistered,
                        format!("[{:#x}, +{len}) runs past the owner's arena", remote.addr),
                    ));
                }
                // SAFETY: `offset + len` lies inside the live mapping (checked above); the
                // local range lies inside `region`, which the caller holds registered. The
                // two never overlap: one is in the owner's memfd, the other in ours.
                unsafe {
                    let remote_ptr = mapping.as_ptr().add(offset);
                    match op {
                        Opcode::Write => {
                            copy_bytes(region.bytes(local_addr, len).as_ptr(), remote_ptr, len)
                        }
                        Opcode::Read => copy_bytes(
                            remote_ptr,
                            region.bytes_mut(local_addr, len).as_mut_ptr(),
                            len,
                        ),
                    }
                }
                Ok(Some(()))
            }
            Some(Path::CrossMemory) => self
                .cross_memory_copy(op, local_addr, len, remote.addr)
                .map(Some),
            None => Err(Error::new(
                ErrorKind::NotSupportedTransport,
                "this buffer is outside the owner's arenas and process_vm access is not permitted",
            )),
        }
    }

    /// Our mapping of arena `id`, if we have one.
    fn mapped(&self, id: u64) -> Option<Arc<Mapping>> {
        self.arenas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Our mapping of arena `id`, asking the owner for it (blocking) the first time.
    fn arena(&self, id: u64) -> Result<Arc<Mapping>> {
        if let Some(mapping) = self.mapped(id) {
            return Ok(mapping);
        }
        let (fd, len) = {
            let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            ask(&requests, KIND_ARENA, id, &self.target.socket)?
        };
        let mapping = Arc::new(Mapping::map(std::os::fd::AsFd::as_fd(&fd), len)?);
        if !self.is_alive() {
            return Err(Error::new(
                ErrorKind::Socket,
                "the same-host peer went away",
            ));
        }
        self.arenas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, mapping.clone());
        Ok(mapping)
    }

    fn cross_memory_copy(
        &self,
        op: Opcode,
        local_addr: usize,
        len: usize,
        remote_addr: u64,
    ) -> Result<()> {
        let mut done = 0;
        while done < len {
            let local = libc::iovec {
                iov_base: (local_addr + done) as *mut libc::c_void,
                iov_len: len - done,
            };
            let remote = libc::iovec {
                iov_base: (remote_addr as usize + done) as *mut libc::c_void,
                iov_len: len - done,
            };
            let pid = self.target.pid as libc::pid_t;
            // SAFETY: the local iovec lies in registered memory the caller holds; the kernel
            // checks the remote one against the owner's address space, which the slot use
            // keeps registered (and so mapped) for the duration.
            let moved = unsafe {
                match op {
                    Opcode::Read => libc::process_vm_readv(pid, &local, 1, &remote, 1, 0),
                    Opcode::Write => libc::process_vm_writev(pid, &local, 1, &remote, 1, 0),
                }
            };
            if moved <= 0 {
                let io = std::io::Error::last_os_error();
                return Err(Error::new(
                    ErrorKind::Socket,
                    format!("process_vm copy with pid {pid}: {io}"),
                )
                .with_source(io));
            }
            done += moved as usize;
        }
        Ok(())
    }
}

/// The connection's opening, without blocking: both connections, the watch request sent, the
/// control table's descriptor and length received.
async fn handshake(
    target: &ShmTarget,
    token: Option<&ClusterToken>,
) -> Result<(
    tokio::net::UnixStream,
    tokio::net::UnixStream,
    OwnedFd,
    usize,
)> {
    let mut requests = connect(&target.socket).await?;
    let mut watch = connect(&target.socket).await?;
    if let Some(token) = token {
        let refused = |e: Error| {
            Error::new(
                ErrorKind::Unauthenticated,
                format!("@{}: {}", target.socket, e.message()),
            )
        };
        let (a, b) = tokio::join!(
            opening::open(&mut requests, token),
            opening::open(&mut watch, token)
        );
        a.map_err(refused)?;
        b.map_err(refused)?;
    }
    watch
        .write_all(&request(KIND_WATCH, 0))
        .await
        .map_err(|e| Error::socket(format!("watch @{}", target.socket), e))?;
    let (fd, len) = ask_async(&mut requests, KIND_CONTROL, 0, &target.socket).await?;
    Ok((requests, watch, fd, len))
}

async fn connect(socket: &str) -> Result<tokio::net::UnixStream> {
    let addr = SocketAddr::from_abstract_name(socket)
        .map_err(|e| Error::socket(format!("socket name @{socket}"), e))?;
    tokio::net::UnixStream::connect_addr(&addr.into())
        .await
        .map_err(|e| Error::socket(format!("connect @{socket}"), e))
}

fn request(kind: u8, id: u64) -> [u8; super::server::REQUEST_LEN] {
    let mut out = [0u8; super::server::REQUEST_LEN];
    out[0] = kind;
    out[1..].copy_from_slice(&id.to_le_bytes());
    out
}

/// One request on a blocking connection (with timeouts): for threads that may block.
fn ask(stream: &UnixStream, kind: u8, id: u64, socket: &str) -> Result<(OwnedFd, usize)> {
    let io = |e: std::io::Error| Error::socket(format!("shared-memory request to @{socket}"), e);
    (&*stream).write_all(&request(kind, id)).map_err(io)?;
    let mut reply = [0u8; REPLY_LEN];
    let mut fds = [-1; 1];
    let (n, received) = stream.recv_with_fd(&mut reply, &mut fds).map_err(io)?;
    // SAFETY: a descriptor received through SCM_RIGHTS is ours to own and close.
    let fd = (received == 1).then(|| unsafe { OwnedFd::from_raw_fd(fds[0]) });
    if n < REPLY_LEN {
        (&*stream).read_exact(&mut reply[n..]).map_err(io)?;
    }
    answer(&reply, fd, id, socket)
}

/// One request on an async connection: waits for the answer without holding a thread.
async fn ask_async(
    stream: &mut tokio::net::UnixStream,
    kind: u8,
    id: u64,
    socket: &str,
) -> Result<(OwnedFd, usize)> {
    let io = |e: std::io::Error| Error::socket(format!("shared-memory request to @{socket}"), e);
    stream.write_all(&request(kind, id)).await.map_err(io)?;
    let mut reply = [0u8; REPLY_LEN];
    let mut fds = [-1; 1];
    let (n, received) = loop {
        stream.readable().await.map_err(io)?;
        // Clears the readiness on WouldBlock (the crate's tokio impl goes through `try_io`).
        match stream.recv_with_fd(&mut reply, &mut fds) {
            Ok(got) => break got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(io(e)),
        }
    };
    // SAFETY: a descriptor received through SCM_RIGHTS is ours to own and close.
    let fd = (received == 1).then(|| unsafe { OwnedFd::from_raw_fd(fds[0]) });
    if n < REPLY_LEN {
        stream.read_exact(&mut reply[n..]).await.map_err(io)?;
    }
    answer(&reply, fd, id, socket)
}

/// The descriptor and length of a whole reply.
fn answer(
    reply: &[u8; REPLY_LEN],
    fd: Option<OwnedFd>,
    id: u64,
    socket: &str,
) -> Result<(OwnedFd, usize)> {
    let len = u64::from_le_bytes(reply[1..].try_into().expect("8 bytes")) as usize;
    match (reply[0], fd) {
        (0, Some(fd)) => Ok((fd, len)),
        _ => Err(Error::new(
            ErrorKind::AddressNotRegistered,
            format!("@{socket} no longer has arena {id}"),
        )),
    }
}

fn probe_cross_memory(target: &ShmTarget) -> bool {
    let mut byte = 0u8;
    let local = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: target.probe as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: reads one byte into a local variable; the kernel validates the remote address.
    let moved =
        unsafe { libc::process_vm_readv(target.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    moved == 1
}
