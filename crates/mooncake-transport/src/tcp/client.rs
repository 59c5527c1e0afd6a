//! The TCP data client: persistent lanes per peer.
//!
//! Each peer gets a fixed set of lanes (Mooncake's connection pool, always on): persistent
//! connections that pull slices from one shared queue, so the slices of a large request
//! spread across lanes and several are in flight at once. A lane carries one request at a
//! time and moves payload bytes straight between its socket and registered memory.
//!
//! Nothing waits forever: every request runs under the earlier of its deadline and an
//! inactivity limit, a dead peer fails the slices sent to it (and, for a second after a
//! failed connect, the slices queued behind them, without new connect attempts), and closing
//! the client fails whatever is still queued. A slice that fails drops its connection, so a
//! late byte can never land in memory the caller has since taken back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::{Header, Op, Status, Version, STATUS_LEN};
use crate::{Opcode, Slice};

/// Where a peer's data server listens, and which protocol it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// IP or host name.
    pub host: String,
    /// TCP data port.
    pub port: u16,
    /// Protocol version to speak.
    pub version: Version,
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct TcpClientConfig {
    /// Lanes per peer.
    pub lanes_per_peer: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// A request that makes no progress for this long fails.
    pub io_timeout: Duration,
}

/// After a failed connect, slices to that peer fail fast for this long.
const RECONNECT_COOLDOWN: Duration = Duration::from_secs(1);

/// Sends slices to peers.
pub struct TcpClient {
    config: TcpClientConfig,
    runtime: tokio::runtime::Handle,
    peers: Mutex<HashMap<PeerAddr, async_channel::Sender<Slice>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for TcpClient {
    /// Dropping without `close` still stops every task; it just does not wait for them.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TcpClient {
    /// A client with no connections yet; its lanes run on `runtime`, so slices may be
    /// submitted from any thread.
    pub fn new(config: TcpClientConfig, runtime: tokio::runtime::Handle) -> Self {
        Self {
            config,
            runtime,
            peers: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Queues `slices` for `peer`; each is reported to its task exactly once.
    pub fn submit(&self, peer: &PeerAddr, slices: impl IntoIterator<Item = Slice>) {
        let queue = self.lanes_for(peer);
        for slice in slices {
            let Some(queue) = &queue else {
                slice.task.slice_failed(Error::closed("the TCP transport"));
                continue;
            };
            if let Err(rejected) = queue.try_send(slice) {
                rejected
                    .into_inner()
                    .task
                    .slice_failed(Error::closed("the TCP transport"));
            }
        }
    }

    /// Fails everything queued, drops every connection and waits for the lanes.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.tracker.close();
        self.tracker.wait().await;
    }

    fn lanes_for(&self, peer: &PeerAddr) -> Option<async_channel::Sender<Slice>> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = peers.get(peer) {
            return Some(queue.clone());
        }
        let (tx, rx) = async_channel::unbounded();
        for lane in 0..self.config.lanes_per_peer {
            let lane = Lane {
                peer: peer.clone(),
                index: lane,
                queue: rx.clone(),
                config: self.config.clone(),
                stop: self.shutdown.clone(),
                conn: None,
                down_until: None,
            };
            self.tracker.spawn_on(lane.run(), &self.runtime);
        }
        peers.insert(peer.clone(), tx.clone());
        Some(tx)
    }
}

struct Lane {
    peer: PeerAddr,
    index: usize,
    queue: async_channel::Receiver<Slice>,
    config: TcpClientConfig,
    stop: CancellationToken,
    conn: Option<TcpStream>,
    down_until: Option<Instant>,
}

impl Lane {
    async fn run(mut self) {
        loop {
            let slice = tokio::select! {
                _ = self.stop.cancelled() => break,
                next = self.queue.recv() => match next {
                    Ok(slice) => slice,
                    Err(_) => break,
                },
            };
            let outcome = self.carry(&slice).await;
            if let Err(e) = &outcome {
                tracing::debug!(peer = %self.peer, lane = self.index, ?slice, "slice failed: {e}");
            }
            // Let go of the memory before reporting: whoever awaits the task may unregister it
            // the moment it settles.
            let (task, len) = (slice.task.clone(), slice.len);
            drop(slice);
            match outcome {
                Ok(()) => task.slice_done(len),
                Err(e) => task.slice_failed(e),
            }
        }
        self.queue.close();
        while let Ok(slice) = self.queue.try_recv() {
            slice.task.slice_failed(Error::closed("the TCP transport"));
        }
    }

    async fn carry(&mut self, slice: &Slice) -> Result<()> {
        if slice.task.has_failed() {
            return Err(Error::new(
                ErrorKind::TransferFailed,
                "skipped: an earlier slice of the same request failed",
            ));
        }
        let now = Instant::now();
        if slice.deadline.is_some_and(|d| d <= now) {
            return Err(timeout_error(slice));
        }
        let stall_limit = now + self.config.io_timeout;
        let limit = slice.deadline.map_or(stall_limit, |d| d.min(stall_limit));
        let stop = self.stop.clone();
        let outcome = tokio::select! {
            _ = stop.cancelled() => Err(Error::closed("the TCP transport")),
            outcome = tokio::time::timeout_at(limit, self.exchange(slice)) => match outcome {
                Ok(outcome) => outcome,
                Err(_) if slice.deadline.is_some_and(|d| d <= Instant::now()) => Err(timeout_error(slice)),
                Err(_) => Err(Error::new(
                    ErrorKind::Socket,
                    format!("{}: no progress for {:?}", self.peer, self.config.io_timeout),
                )),
            },
        };
        if outcome.is_err() {
            // The exchange may have stopped mid-payload; this connection is out of step.
            self.conn = None;
        }
        outcome
    }

    async fn exchange(&mut self, slice: &Slice) -> Result<()> {
        let version = self.peer.version;
        let peer = self.peer.to_string();
        let conn = self.connection().await?;
        let header = Header {
            size: slice.len as u64,
            addr: slice.remote_addr,
            op: match slice.op {
                Opcode::Read => Op::Read,
                Opcode::Write => Op::Write,
            },
            version,
        };
        let io = |e: std::io::Error| Error::socket(format!("data exchange with {peer}"), e);
        let rejected = || {
            Error::new(
                ErrorKind::AddressNotRegistered,
                format!(
                    "{peer} rejected {} bytes at {:#x}: not inside one registered buffer",
                    slice.len, slice.remote_addr
                ),
            )
        };
        match (slice.op, version) {
            (Opcode::Write, Version::V1) => {
                conn.write_all(&header.encode()).await.map_err(io)?;
                // SAFETY: the engine checked the range lies in `slice.region`, which the
                // slice keeps registered and mapped.
                let payload = unsafe { slice.region.bytes(slice.local_addr, slice.len) };
                conn.write_all(payload).await.map_err(io)
            }
            (Opcode::Write, Version::V2) => {
                // SAFETY: as above.
                let payload = unsafe { slice.region.bytes(slice.local_addr, slice.len) };
                let (mut rx, mut tx) = conn.split();
                let send = async {
                    tx.write_all(&header.encode()).await?;
                    tx.write_all(payload).await
                };
                // The status is read while the body is still going out, so an early reject
                // ends the write instead of surfacing as a broken pipe.
                let status = read_status(&mut rx);
                tokio::pin!(send, status);
                tokio::select! {
                    sent = &mut send => match sent {
                        Ok(()) => match status.await.map_err(io)? {
                            Some(Status::Ok) => Ok(()),
                            Some(Status::AddressRejected) => Err(rejected()),
                            other => Err(bad_status(&peer, other)),
                        },
                        Err(e) => match tokio::time::timeout(Duration::from_millis(200), status).await {
                            Ok(Ok(Some(Status::AddressRejected))) => Err(rejected()),
                            _ => Err(io(e)),
                        },
                    },
                    early = &mut status => match early.map_err(io)? {
                        Some(Status::AddressRejected) => Err(rejected()),
                        other => Err(bad_status(&peer, other)),
                    },
                }
            }
            (Opcode::Read, _) => {
                conn.write_all(&header.encode()).await.map_err(io)?;
                if version == Version::V2 {
                    match read_status(conn).await.map_err(io)? {
                        Some(Status::Ok) => {}
                        Some(Status::AddressRejected) => return Err(rejected()),
                        other => return Err(bad_status(&peer, other)),
                    }
                }
                // SAFETY: the range lies in `slice.region` (checked by the engine) and the
                // transfer rule keeps everyone else off it until the slice settles.
                let target = unsafe { slice.region.bytes_mut(slice.local_addr, slice.len) };
                conn.read_exact(target).await.map_err(io).map(drop)
            }
        }
    }

    async fn connection(&mut self) -> Result<&mut TcpStream> {
        if self.conn.is_none() {
            if let Some(until) = self.down_until {
                if Instant::now() < until {
                    return Err(Error::new(
                        ErrorKind::Socket,
                        format!(
                            "{} is unreachable (a connect failed moments ago)",
                            self.peer
                        ),
                    ));
                }
            }
            let target = self.peer.to_string();
            let connect = async {
                let stream = TcpStream::connect(&target).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            };
            let stream = match tokio::time::timeout(self.config.connect_timeout, connect).await {
                Ok(Ok(stream)) => stream,
                failed => {
                    self.down_until = Some(Instant::now() + RECONNECT_COOLDOWN);
                    return Err(match failed {
                        Ok(Err(e)) => Error::socket(format!("connect to {target}"), e),
                        _ => {
                            Error::new(ErrorKind::Socket, format!("connect to {target} timed out"))
                        }
                    });
                }
            };
            self.down_until = None;
            self.conn = Some(stream);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

async fn read_status<R: AsyncReadExt + Unpin>(reader: &mut R) -> std::io::Result<Option<Status>> {
    let mut frame = [0u8; STATUS_LEN];
    reader.read_exact(&mut frame).await?;
    Ok(Status::decode(&frame))
}

fn bad_status(peer: &str, status: Option<Status>) -> Error {
    Error::new(
        ErrorKind::Protocol,
        format!("{peer} answered an unexpected status {status:?}"),
    )
}

fn timeout_error(slice: &Slice) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "{} bytes at {:#x} missed the request deadline",
            slice.len, slice.remote_addr
        ),
    )
}
