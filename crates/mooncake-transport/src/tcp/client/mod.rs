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

mod lane;

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

use self::lane::Lane;
use crate::rail::{Failure, RailPolicy, RailSet, RailStats};
use crate::tcp::wire::Version;
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
    /// Each connection opens with this token's challenge-response before its first request.
    pub token: Option<mooncake_common::auth::ClusterToken>,
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

    /// The rails to `peer`, when a transfer to it has used them.
    pub fn rails_to(&self, peer: &TcpPeer) -> Option<Vec<RailStats>> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .map(|rails| rails.rails.stats())
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
