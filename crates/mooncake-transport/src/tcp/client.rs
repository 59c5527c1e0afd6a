//! The TCP data client: rails of persistent lanes per peer.
//!
//! A peer is reached over one or more paths (rails): a local interface (or the default route)
//! paired with one of the peer's addresses. Each rail has a fixed set of lanes (Mooncake's
//! connection pool, always on): persistent connections that pull slices from the rail's
//! queue, so the slices of a large request spread across lanes and rails and several are in
//! flight at once. Each slice goes to the rail with the fewest bytes in flight
//! ([`RailSet`]), and a lane carries one request at a time, moving payload bytes straight
//! between its socket and registered memory.
//!
//! A slice whose path fails (connect, I/O, a stall, its interface going down) is charged to
//! its rail and retried on another one, ahead of the queue there, within the retry budget; a
//! slice the peer refused fails its task at once. Interfaces are watched: a link that goes
//! down holds its rails paused and cuts their connections, so the slices on them move within
//! one watch period instead of waiting for TCP to notice.
//!
//! Nothing waits forever: every request runs under the earlier of its deadline and an
//! inactivity limit, a rail whose connect failed fails fast for a second, and closing the
//! client fails whatever is still queued. A slice that fails drops its connection, so a late
//! byte can never land in memory the caller has since taken back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::exchange::{ClientExchange, ClientStep, StatusVerdict};
use super::wire::{Op, Status, Version, STATUS_LEN};
use crate::rail::{Failure, RailPolicy, RailSet, RailStats};
use crate::{Opcode, Slice};

/// Where a peer's data server listens, and which protocol it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// IP or host name.
    pub host: String,
    /// TCP data port.
    pub port: u16,
    /// Protocol version to speak. Either way a write is reported done only once the peer
    /// has applied it: by its status frame in v2, by the answer to a one-byte read sent
    /// behind it on the same connection in v1 ([`super::wire`]).
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

/// A local interface a path leaves through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalNic {
    /// Interface name, watched for link state.
    pub name: String,
    /// Address the connection is bound to.
    pub ip: IpAddr,
}

/// One way to a peer's data server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpPath {
    /// The local interface, or `None` for whatever the routing table picks.
    pub local: Option<LocalNic>,
    /// The peer's device name for this address (for stats and logs).
    pub remote_nic: String,
    /// The peer's data server on that device.
    pub remote: PeerAddr,
}

impl TcpPath {
    /// The single path of a peer that publishes one address.
    pub fn direct(remote: PeerAddr) -> Self {
        Self {
            local: None,
            remote_nic: remote.to_string(),
            remote,
        }
    }
}

/// A peer and every path to it; paths that share a peer share its rail health.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TcpPeer {
    /// Preferred paths, in the order they were found.
    pub paths: Vec<TcpPath>,
}

impl From<PeerAddr> for TcpPeer {
    fn from(remote: PeerAddr) -> Self {
        Self {
            paths: vec![TcpPath::direct(remote)],
        }
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct TcpClientConfig {
    /// Lanes per rail.
    pub lanes_per_peer: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// A request that makes no progress for this long fails.
    pub io_timeout: Duration,
    /// Pauses and retries.
    pub rails: RailPolicy,
}

/// After a failed connect, slices on that rail fail fast for this long.
const RECONNECT_COOLDOWN: Duration = Duration::from_secs(1);

/// How often interface link state is read.
const LINK_POLL: Duration = Duration::from_millis(20);

/// Unacknowledged data older than this breaks a connection (`TCP_USER_TIMEOUT`), so a path
/// that silently stops carrying packets fails well before the inactivity limit.
const USER_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends slices to peers.
pub struct TcpClient {
    config: TcpClientConfig,
    runtime: tokio::runtime::Handle,
    peers: Mutex<HashMap<TcpPeer, Arc<PeerRails>>>,
    links: Arc<Links>,
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
            links: Arc::new(Mutex::new(HashMap::new())),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Queues `slices` for `peer`; each is reported to its task exactly once.
    pub fn submit(&self, peer: &TcpPeer, slices: impl IntoIterator<Item = Slice>) {
        let rails = self.rails_for(peer);
        for slice in slices {
            match &rails {
                Some(rails) => rails.send(Job {
                    slice,
                    rail: None,
                    attempts: 0,
                }),
                None => slice.task.slice_failed(Error::closed("the TCP transport")),
            }
        }
    }

    /// Every rail to every peer used so far: `(peer's first address, rails)`.
    pub fn rail_stats(&self) -> Vec<(String, Vec<RailStats>)> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|peer| (peer.label.clone(), peer.rails.stats()))
            .collect()
    }

    /// Fails everything queued, drops every connection and waits for the lanes.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.links.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.tracker.close();
        self.tracker.wait().await;
    }

    fn rails_for(&self, peer: &TcpPeer) -> Option<Arc<PeerRails>> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rails) = peers.get(peer) {
            return Some(rails.clone());
        }
        let names = peer
            .paths
            .iter()
            .map(|path| {
                let local = path.local.as_ref().map_or("*", |nic| nic.name.as_str());
                (local.to_owned(), path.remote_nic.clone())
            })
            .collect();
        let mut lanes = Vec::with_capacity(peer.paths.len());
        let mut receivers = Vec::with_capacity(peer.paths.len());
        for path in &peer.paths {
            let (normal_tx, normal_rx) = async_channel::unbounded();
            let (urgent_tx, urgent_rx) = async_channel::unbounded();
            let link = path.local.as_ref().map(|nic| self.watch(&nic.name));
            lanes.push(RailLanes {
                path: path.clone(),
                normal: normal_tx,
                urgent: urgent_tx,
                link,
                down_until: Mutex::new(None),
            });
            receivers.push((normal_rx, urgent_rx));
        }
        let rails = Arc::new(PeerRails {
            label: peer
                .paths
                .first()
                .map(|p| p.remote.to_string())
                .unwrap_or_default(),
            rails: RailSet::new(self.config.rails.clone(), names, Vec::new()),
            lanes,
        });
        for (index, lanes) in rails.lanes.iter().enumerate() {
            if let Some(link) = &lanes.link {
                link.users
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Arc::downgrade(&rails), index));
                if !link.up.load(Ordering::Acquire) {
                    rails.rails.pause(index);
                }
            }
        }
        for (rail, (normal, urgent)) in receivers.into_iter().enumerate() {
            for index in 0..self.config.lanes_per_peer {
                let lane = Lane {
                    peer: rails.clone(),
                    rail,
                    index,
                    normal: normal.clone(),
                    urgent: urgent.clone(),
                    config: self.config.clone(),
                    stop: self.shutdown.clone(),
                    conn: None,
                };
                self.tracker.spawn_on(lane.run(), &self.runtime);
            }
        }
        peers.insert(peer.clone(), rails.clone());
        Some(rails)
    }

    /// The link state of an interface, watched from now on.
    fn watch(&self, name: &str) -> Arc<Link> {
        let mut watched = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = watched.get(name) {
            return link.clone();
        }
        let link = Arc::new(Link {
            up: AtomicBool::new(link_is_up(name)),
            cut: Mutex::new(CancellationToken::new()),
            users: Mutex::new(Vec::new()),
        });
        watched.insert(name.to_owned(), link.clone());
        if watched.len() == 1 {
            let (links, stop) = (self.links.clone(), self.shutdown.clone());
            self.tracker
                .spawn_on(watch_links(links, stop), &self.runtime);
        }
        link
    }
}

/// The rails to one peer and the queues that feed their lanes.
struct PeerRails {
    label: String,
    rails: RailSet,
    lanes: Vec<RailLanes>,
}

struct RailLanes {
    path: TcpPath,
    normal: async_channel::Sender<Job>,
    /// Retried slices, taken before new ones.
    urgent: async_channel::Sender<Job>,
    link: Option<Arc<Link>>,
    /// After a failed connect, until when the rail fails fast.
    down_until: Mutex<Option<Instant>>,
}

/// A slice on its way, with the rail it is on and how often it was retried.
struct Job {
    slice: Slice,
    rail: Option<usize>,
    attempts: u32,
}

impl PeerRails {
    /// Puts a job on the rail selection picks (avoiding the one it failed on), or fails it.
    fn send(&self, mut job: Job) {
        let len = job.slice.len as u64;
        let Some(rail) = self.rails.pick(len, job.rail) else {
            let error = Error::new(
                ErrorKind::NoRail,
                format!("no usable path to {} (every rail is down)", self.label),
            );
            return job.slice.task.slice_failed(error);
        };
        let lanes = &self.lanes[rail];
        let queue = if job.rail.is_some() {
            &lanes.urgent
        } else {
            &lanes.normal
        };
        job.rail = Some(rail);
        if let Err(rejected) = queue.try_send(job) {
            self.rails.release(rail, len);
            rejected
                .into_inner()
                .slice
                .task
                .slice_failed(Error::closed("the TCP transport"));
        }
    }
}

/// Interfaces the client's rails leave through, by name.
type Links = Mutex<HashMap<String, Arc<Link>>>;

struct Link {
    up: AtomicBool,
    /// Cancelled when the link goes down, then replaced.
    cut: Mutex<CancellationToken>,
    /// The rails that leave through this link.
    users: Mutex<Vec<(std::sync::Weak<PeerRails>, usize)>>,
}

impl Link {
    fn cut_token(&self) -> CancellationToken {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a change of state: a link that went down holds its rails paused and cuts
    /// their connections; one that came back lets them carry slices again.
    fn set(&self, name: &str, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        if up {
            tracing::info!(interface = name, "link up");
        } else {
            tracing::warn!(interface = name, "link down");
        }
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users.retain(|(rails, _)| rails.strong_count() > 0);
        for (rails, index) in users.iter() {
            let Some(rails) = rails.upgrade() else {
                continue;
            };
            if up {
                rails.rails.resume(*index);
            } else {
                rails.rails.pause(*index);
            }
        }
        if !up {
            let mut cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
            cut.cancel();
            *cut = CancellationToken::new();
        }
    }
}

/// Polls the link state of every watched interface until the client closes.
async fn watch_links(links: Arc<Links>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(LINK_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let watched: Vec<_> = links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, link)| (name.clone(), link.clone()))
            .collect();
        for (name, link) in watched {
            link.set(&name, link_is_up(&name));
        }
    }
}

/// Whether an interface is up with a carrier, from sysfs; an interface that cannot be read
/// counts as up, so a missing sysfs never takes every rail down.
fn link_is_up(name: &str) -> bool {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    let Ok(state) = std::fs::read_to_string(dir.join("operstate")) else {
        return true;
    };
    let state = state.trim();
    // Loopback and some virtual devices report "unknown" while working.
    if state != "up" && state != "unknown" {
        return false;
    }
    std::fs::read_to_string(dir.join("carrier")).map_or(true, |c| c.trim() != "0")
}

struct Lane {
    peer: Arc<PeerRails>,
    rail: usize,
    index: usize,
    normal: async_channel::Receiver<Job>,
    urgent: async_channel::Receiver<Job>,
    config: TcpClientConfig,
    stop: CancellationToken,
    conn: Option<TcpStream>,
}

/// Why a slice did not make it, and whose fault that was.
enum Outcome {
    Done,
    /// The peer refused or the request ran out of time: the path is fine, the slice fails.
    Refused(Error),
    /// The path failed: charge the rail and try another.
    PathFailed(Error, Failure),
    /// The rail went down before the slice started: try another, charge nothing.
    Moved(Error),
}

impl Lane {
    async fn run(mut self) {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                next = self.urgent.recv() => next,
                next = self.normal.recv() => next,
            };
            let Ok(job) = next else { break };
            let outcome = self.carry(&job.slice).await;
            self.settle(job, outcome);
        }
        for queue in [&self.urgent, &self.normal] {
            queue.close();
            while let Ok(job) = queue.try_recv() {
                job.slice
                    .task
                    .slice_failed(Error::closed("the TCP transport"));
            }
        }
    }

    /// Reports a slice, or hands it to another rail.
    fn settle(&self, mut job: Job, outcome: Outcome) {
        let len = job.slice.len as u64;
        let rails = &self.peer.rails;
        let error = match outcome {
            Outcome::Done => {
                rails.done(self.rail, len);
                if job.attempts > 0 {
                    rails.rescued(self.rail);
                }
                // Let go of the memory before reporting: whoever awaits the task may
                // unregister it the moment it settles.
                let task = job.slice.task.clone();
                drop(job);
                return task.slice_done(len as usize);
            }
            Outcome::Refused(e) => {
                rails.release(self.rail, len);
                e
            }
            Outcome::PathFailed(e, how) => {
                rails.failed(self.rail, len, how);
                if job.attempts < rails.policy().retry_budget && !self.stop.is_cancelled() {
                    job.attempts += 1;
                    tracing::debug!(path = %self.path(), lane = self.index, slice = ?job.slice, attempt = job.attempts, "retrying on another rail: {e}");
                    return self.peer.send(job);
                }
                e
            }
            Outcome::Moved(e) => {
                rails.release(self.rail, len);
                if !self.stop.is_cancelled() {
                    return self.peer.send(job);
                }
                e
            }
        };
        tracing::debug!(path = %self.path(), lane = self.index, slice = ?job.slice, "slice failed: {error}");
        let task = job.slice.task.clone();
        drop(job);
        task.slice_failed(error);
    }

    fn path(&self) -> &PeerAddr {
        &self.peer.lanes[self.rail].path.remote
    }

    async fn carry(&mut self, slice: &Slice) -> Outcome {
        if slice.task.has_failed() {
            return Outcome::Refused(Error::new(
                ErrorKind::TransferFailed,
                "skipped: an earlier slice of the same request failed",
            ));
        }
        if !self.peer.rails.is_usable(self.rail) {
            return Outcome::Moved(Error::new(
                ErrorKind::NoRail,
                format!("the rail to {} is down", self.path()),
            ));
        }
        let now = Instant::now();
        if slice.deadline.is_some_and(|d| d <= now) {
            return Outcome::Refused(timeout_error(slice));
        }
        let stall_limit = now + self.config.io_timeout;
        let limit = slice.deadline.map_or(stall_limit, |d| d.min(stall_limit));
        let stop = self.stop.clone();
        let link = self.peer.lanes[self.rail].link.clone();
        let cut = link.as_ref().map(|link| link.cut_token());
        let link_down = async {
            match &cut {
                Some(cut) => cut.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => Outcome::Refused(Error::closed("the TCP transport")),
            _ = link_down => Outcome::PathFailed(
                Error::new(ErrorKind::Socket, format!("the link to {} went down", self.path())),
                Failure::Fatal,
            ),
            outcome = tokio::time::timeout_at(limit, self.exchange(slice)) => match outcome {
                Ok(Ok(())) => Outcome::Done,
                Ok(Err(e)) if e.kind() == ErrorKind::Socket => Outcome::PathFailed(e, Failure::Transient),
                Ok(Err(e)) => Outcome::Refused(e),
                Err(_) if slice.deadline.is_some_and(|d| d <= Instant::now()) => Outcome::Refused(timeout_error(slice)),
                Err(_) => Outcome::PathFailed(
                    Error::new(
                        ErrorKind::Socket,
                        format!("{}: no progress for {:?}", self.path(), self.config.io_timeout),
                    ),
                    Failure::Transient,
                ),
            },
        };
        if !matches!(outcome, Outcome::Done) {
            // The exchange may have stopped mid-payload; this connection is out of step.
            self.conn = None;
        }
        outcome
    }

    /// Performs the steps of one request ([`ClientExchange`]) on this lane's connection.
    async fn exchange(&mut self, slice: &Slice) -> Result<()> {
        let version = self.path().version;
        let peer = self.path().to_string();
        let op = match slice.op {
            Opcode::Read => Op::Read,
            Opcode::Write => Op::Write,
        };
        let plan = ClientExchange::new(op, version, slice.remote_addr, slice.len as u64)
            .map_err(|e| Error::invalid(e.to_string()))?;
        let conn = self.connection().await?;
        let io = |e: std::io::Error| Error::socket(format!("data exchange with {peer}"), e);
        let judge = |frame: Option<Status>| match ClientExchange::on_status(frame) {
            StatusVerdict::Continue => Ok(()),
            StatusVerdict::Rejected => Err(Error::new(
                ErrorKind::AddressNotRegistered,
                format!(
                    "{peer} rejected {} bytes at {:#x}: not inside one registered buffer",
                    slice.len, slice.remote_addr
                ),
            )),
            StatusVerdict::Broken => Err(bad_status(&peer, frame)),
        };
        let mut steps = plan.steps().iter().peekable();
        while let Some(step) = steps.next() {
            match step {
                ClientStep::SendHeader(header) => {
                    conn.write_all(&header.encode()).await.map_err(io)?;
                }
                ClientStep::SendPayload => {
                    // SAFETY: the engine checked the range lies in `slice.region`, which the
                    // slice keeps registered and mapped.
                    let payload = unsafe { slice.region.bytes(slice.local_addr, slice.len) };
                    if steps.next_if_eq(&&ClientStep::ReadStatus).is_none() {
                        conn.write_all(payload).await.map_err(io)?;
                        continue;
                    }
                    // The status is read while the body is still going out, so an early
                    // reject ends the write instead of surfacing as a broken pipe.
                    let (mut rx, mut tx) = conn.split();
                    let status = read_status(&mut rx);
                    let send = tx.write_all(payload);
                    tokio::pin!(send, status);
                    tokio::select! {
                        sent = &mut send => match sent {
                            Ok(()) => judge(status.await.map_err(io)?)?,
                            Err(e) => match tokio::time::timeout(Duration::from_millis(200), status).await {
                                Ok(Ok(frame @ Some(Status::AddressRejected))) => judge(frame)?,
                                _ => return Err(io(e)),
                            },
                        },
                        early = &mut status => match early.map_err(io)? {
                            Some(Status::Ok) => return Err(bad_status(&peer, Some(Status::Ok))),
                            frame => judge(frame)?,
                        },
                    }
                }
                ClientStep::ReadStatus => judge(read_status(conn).await.map_err(io)?)?,
                ClientStep::ReadPayload => {
                    // SAFETY: the range lies in `slice.region` (checked by the engine) and the
                    // transfer rule keeps everyone else off it until the slice settles.
                    let target = unsafe { slice.region.bytes_mut(slice.local_addr, slice.len) };
                    conn.read_exact(target).await.map_err(io)?;
                }
                ClientStep::ReadFence => {
                    let mut echo = [0u8; 1];
                    conn.read_exact(&mut echo).await.map_err(io)?;
                }
            }
        }
        Ok(())
    }

    async fn connection(&mut self) -> Result<&mut TcpStream> {
        if self.conn.is_none() {
            let rail = &self.peer.lanes[self.rail];
            let down_until = *rail.down_until.lock().unwrap_or_else(|p| p.into_inner());
            if down_until.is_some_and(|until| Instant::now() < until) {
                return Err(Error::new(
                    ErrorKind::Socket,
                    format!(
                        "{} is unreachable (a connect failed moments ago)",
                        rail.path.remote
                    ),
                ));
            }
            let connected = tokio::time::timeout(self.config.connect_timeout, connect(&rail.path));
            let stream = match connected.await {
                Ok(Ok(stream)) => stream,
                failed => {
                    *rail.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + RECONNECT_COOLDOWN);
                    let target = &rail.path.remote;
                    return Err(match failed {
                        Ok(Err(e)) => Error::socket(format!("connect to {target}"), e),
                        _ => {
                            Error::new(ErrorKind::Socket, format!("connect to {target} timed out"))
                        }
                    });
                }
            };
            *rail.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.conn = Some(stream);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

/// Connects over a path, from its local interface's address when it has one.
async fn connect(path: &TcpPath) -> std::io::Result<TcpStream> {
    let target = path.remote.to_string();
    let stream = match &path.local {
        None => TcpStream::connect(&target).await?,
        Some(nic) => {
            let remote = tokio::net::lookup_host(&target)
                .await?
                .find(|addr| addr.is_ipv4() == nic.ip.is_ipv4())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::AddrNotAvailable,
                        format!("{target} has no address of the family of {}", nic.ip),
                    )
                })?;
            let socket = match nic.ip {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(nic.ip, 0))?;
            socket.connect(remote).await?
        }
    };
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(stream)
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
