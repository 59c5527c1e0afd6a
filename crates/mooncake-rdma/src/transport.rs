//! The RDMA transport: one context per device, endpoints per peer NIC path, slices sprayed
//! over rails and retried on another rail when one fails.
//!
//! Data path: [`RdmaTransport::submit`] cuts each engine slice into pieces (64 KiB with
//! Mooncake's tail merge, clipped to buffer ends), picks a rail for each piece from the
//! [`RailSet`] of (local location, peer location), and hands it to the endpoint of that rail:
//! posted at once when the endpoint is connected, else parked until a connect task (on the
//! tokio runtime) finishes the handshake. Each context runs one thread that polls its CQ,
//! watches its async events, and retires and reclaims endpoints. A failed piece is charged
//! to its rail according to its status and dispatched again, avoiding that rail, until the
//! retry budget runs out. An engine slice reports to its task once, after its last piece.
//!
//! All endpoints of a context share its CQ, so a context posts at most `max_cqe` requests
//! at a time (an overflowing CQ loses completions); pieces beyond that wait in a queue of
//! the context that completions drain.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::handshake::messages::ConnectionMessage;
use mooncake_metadata::handshake::MessageType;
use mooncake_transport::rail::{Failure, RailPolicy, RailSet, RailStats};
use mooncake_transport::{Opcode, Region, Slice, Task};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RdmaConfig;
use crate::endpoint::{AcceptError, ActiveStart, Endpoint, EndpointState, LinkInfo, Teardown};
use crate::gid::select_gid;
use crate::peer::{DeviceDesc, PriorityMatrix, RdmaPeer};
use crate::store::EndpointStore;
use crate::verbs::{
    gid_to_string, parse_gid, Access, AsyncEvent, Completion, CompletionQueue, Device,
    MemoryRegion, PortState, ProtectionDomain, Provider, WcStatus, WorkRequest, WrOp,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The active side of the RDMA handshake: delivers a Connection message to a peer's
/// handshake listener and returns its reply.
pub trait Connector: Send + Sync + 'static {
    /// Sends `msg` to `peer_rpc_addr` (`host:port`) and returns the reply.
    fn connect<'a>(
        &'a self,
        peer_rpc_addr: &'a str,
        msg: ConnectionMessage,
    ) -> BoxFuture<'a, Result<ConnectionMessage>>;
}

/// A [`Connector`] over Mooncake's handshake socket protocol.
#[derive(Debug, Clone)]
pub struct HandshakeConnector {
    /// Connect timeout (`MC_HANDSHAKE_CONNECT_TIMEOUT`, 5 s).
    pub connect_timeout: Duration,
    /// Largest accepted frame (`MC_HANDSHAKE_MAX_LENGTH`, 1 MiB).
    pub max_frame: usize,
}

impl Default for HandshakeConnector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            max_frame: 1 << 20,
        }
    }
}

impl Connector for HandshakeConnector {
    fn connect<'a>(
        &'a self,
        peer_rpc_addr: &'a str,
        msg: ConnectionMessage,
    ) -> BoxFuture<'a, Result<ConnectionMessage>> {
        Box::pin(async move {
            let body = serde_json::to_string(&msg)
                .map_err(|e| Error::new(ErrorKind::MalformedJson, e.to_string()))?;
            let reply = mooncake_metadata::handshake::request(
                peer_rpc_addr,
                MessageType::Connection,
                &body,
                self.connect_timeout,
                self.max_frame,
            )
            .await?;
            serde_json::from_str(&reply).map_err(|e| {
                Error::new(
                    ErrorKind::MalformedJson,
                    format!("connection reply from {peer_rpc_addr}: {e}"),
                )
            })
        })
    }
}

/// What an [`RdmaTransport`] is built from.
#[derive(Debug, Clone)]
pub struct RdmaOptions {
    /// Server name used in NIC paths (the segment name, or `rdma_server_name`).
    pub server_name: String,
    /// Devices to open, in order; this order is the order of published devices and keys.
    pub devices: Vec<String>,
    /// Local priority matrix: location → (preferred, available) device names.
    pub matrix: PriorityMatrix,
    /// Tunables.
    pub config: RdmaConfig,
    /// Rail health; its `retry_budget` is replaced by `config.retry_cnt`.
    pub rail_policy: RailPolicy,
}

impl RdmaOptions {
    /// Options with defaults from the environment.
    pub fn new(server_name: &str, devices: Vec<String>, matrix: PriorityMatrix) -> Self {
        Self {
            server_name: server_name.to_owned(),
            devices,
            matrix,
            config: RdmaConfig::from_env(),
            rail_policy: RailPolicy::default(),
        }
    }
}

/// A rail's state, for stats and tests.
#[derive(Debug, Clone)]
pub struct RailInfo {
    /// Peer server name.
    pub peer: String,
    /// Location of the local memory.
    pub local_location: String,
    /// Location of the peer memory.
    pub remote_location: String,
    /// The rail itself.
    pub stats: RailStats,
}

/// An endpoint's state, for stats and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// State.
    pub state: EndpointState,
    /// Local QP numbers.
    pub qp_nums: Vec<u32>,
    /// Peer QP numbers, once connected.
    pub peer_qp_nums: Option<Vec<u32>>,
}

/// Mooncake's RDMA transport.
pub struct RdmaTransport {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

pub(crate) struct Context {
    index: usize,
    name: String,
    local_path: String,
    device: Arc<dyn Device>,
    pd: Arc<dyn ProtectionDomain>,
    cq: Arc<dyn CompletionQueue>,
    link: Mutex<LinkInfo>,
    port_up: AtomicBool,
    active: AtomicBool,
    local_failures: AtomicU32,
    endpoints: Mutex<EndpointStore<Arc<Endpoint>>>,
    retiring: Mutex<Vec<Arc<Endpoint>>>,
    /// Requests posted on the CQ and not yet completed (or written off).
    cq_outstanding: AtomicUsize,
    max_cqe: usize,
    /// Pieces that found the CQ full, with the endpoint they were meant for.
    cq_waiting: Mutex<VecDeque<(Arc<Endpoint>, Piece)>>,
}

impl Context {
    fn usable(&self) -> bool {
        self.port_up.load(Ordering::Acquire) && self.active.load(Ordering::Acquire)
    }

    /// Claims one CQ entry, if the CQ has room.
    fn reserve_cqe(&self) -> bool {
        self.cq_outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_cqe).then_some(n + 1)
            })
            .is_ok()
    }

    fn release_cqes(&self, count: usize) {
        if count > 0 {
            let _ = self
                .cq_outstanding
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(count))
                });
        }
    }

    fn link(&self) -> LinkInfo {
        lock(&self.link).clone()
    }
}

/// Consecutive local faults after which a context is taken out of service.
const MAX_LOCAL_FAILURES: u32 = 32;

struct RailEntry {
    peer: String,
    local_location: String,
    remote_location: String,
    preferred: Vec<(String, String)>,
    available: Vec<(String, String)>,
    set: RailSet,
}

type RailKey = (String, String, String);

struct Registration {
    // Dropped before `region`: the MRs must go before the memory may.
    mrs: Vec<Arc<dyn MemoryRegion>>,
    remote: bool,
    _region: Arc<Region>,
}

/// One engine slice, reported once all its pieces settled.
pub(crate) struct SliceState {
    task: Arc<Task>,
    len: usize,
    region: Mutex<Option<Arc<Region>>>,
    left: AtomicUsize,
    error: OnceLock<Error>,
}

impl SliceState {
    fn piece_finished(&self, outcome: Result<()>) {
        if let Err(e) = outcome {
            let _ = self.error.set(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Let go of the memory before reporting: whoever awaits the task may unregister
            // it the moment it settles.
            drop(lock(&self.region).take());
            match self.error.get() {
                None => self.task.slice_done(self.len),
                Some(e) => self.task.slice_failed(e.clone()),
            }
        }
    }
}

/// A contiguous part of a slice that one work request carries.
pub(crate) struct Piece {
    slice: Arc<SliceState>,
    op: Opcode,
    region_addr: usize,
    local_addr: usize,
    len: usize,
    remote_addr: u64,
    peer: Arc<RdmaPeer>,
    buffer: usize,
    rails: Arc<RailEntry>,
    rail: Option<usize>,
    avoid: Option<usize>,
    /// A local fault happened on this device: prefer rails of another one.
    avoid_device: Option<String>,
    attempts: u32,
    last_error: Option<Error>,
    deadline: Option<TokioInstant>,
}

impl Piece {
    pub(crate) fn expired(&self, now: TokioInstant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

struct Posted {
    piece: Piece,
    ep: Arc<Endpoint>,
    qp: usize,
}

/// How a failed attempt counts against its rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Charge {
    /// Not the rail's fault (a flush, a retired endpoint).
    None,
    /// Counts toward the threshold.
    Transient,
    /// The path is broken: pause at once if another rail can take over, else transient.
    Remote,
}

struct Inner {
    config: RdmaConfig,
    policy: RailPolicy,
    server_name: String,
    matrix: PriorityMatrix,
    contexts: Vec<Arc<Context>>,
    connector: Arc<dyn Connector>,
    runtime: tokio::runtime::Handle,
    inflight: Mutex<HashMap<u64, Posted>>,
    next_wr: AtomicU64,
    rails: Mutex<HashMap<RailKey, Arc<RailEntry>>>,
    registrations: RwLock<BTreeMap<usize, Registration>>,
    closed: AtomicBool,
    stop: AtomicBool,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl RdmaTransport {
    /// Opens a context on every device of `options.devices` that can be opened (those that
    /// fail are left out with a warning); fails with `ERR_DEVICE_NOT_FOUND` if none can, and
    /// with `ERR_INVALID_ARGUMENT` if the configuration is unusable.
    /// Must be called inside a tokio runtime, which runs the handshakes.
    pub fn new(
        provider: Arc<dyn Provider>,
        options: RdmaOptions,
        connector: Arc<dyn Connector>,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::invalid("the RDMA transport must be created inside a tokio runtime")
        })?;
        options.config.validate()?;
        let config = options.config;
        let mut contexts = Vec::new();
        for name in &options.devices {
            match open_context(
                provider.as_ref(),
                name,
                contexts.len(),
                &options.server_name,
                &config,
            ) {
                Ok(ctx) => contexts.push(Arc::new(ctx)),
                Err(e) => tracing::warn!(device = %name, "RDMA device left out: {e}"),
            }
        }
        if contexts.is_empty() {
            return Err(Error::new(
                ErrorKind::DeviceNotFound,
                format!("no usable RDMA device among {:?}", options.devices),
            ));
        }
        let policy = RailPolicy {
            retry_budget: config.retry_cnt,
            ..options.rail_policy
        };
        let inner = Arc::new(Inner {
            config,
            policy,
            server_name: options.server_name,
            matrix: options.matrix,
            contexts,
            connector,
            runtime,
            inflight: Mutex::new(HashMap::new()),
            next_wr: AtomicU64::new(1),
            rails: Mutex::new(HashMap::new()),
            registrations: RwLock::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let mut threads = Vec::new();
        for ctx in &inner.contexts {
            let weak = Arc::downgrade(&inner);
            let ctx = ctx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("rdma-{}", ctx.name))
                .spawn(move || poll_loop(weak, ctx))
                .map_err(|e| {
                    inner.stop.store(true, Ordering::Release);
                    Error::new(
                        ErrorKind::Context,
                        format!("cannot start a poller thread: {e}"),
                    )
                })?;
            threads.push(handle);
        }
        Ok(Self {
            inner,
            threads: Mutex::new(threads),
        })
    }

    /// The server name used in NIC paths.
    pub fn server_name(&self) -> &str {
        &self.inner.server_name
    }

    /// The opened devices, in the order their keys are published.
    pub fn local_devices(&self) -> Vec<DeviceDesc> {
        self.inner
            .contexts
            .iter()
            .map(|ctx| {
                let link = ctx.link();
                DeviceDesc {
                    name: ctx.name.clone(),
                    lid: link.lid,
                    gid: gid_to_string(&link.gid),
                }
            })
            .collect()
    }

    /// The local priority matrix to publish: only devices that are open and usable.
    pub fn priority_matrix(&self) -> PriorityMatrix {
        let usable = |name: &String| self.inner.context(name).is_some_and(|ctx| ctx.usable());
        self.inner
            .matrix
            .iter()
            .map(|(loc, (p, a))| {
                (
                    loc.clone(),
                    (
                        p.iter().filter(|n| usable(n)).cloned().collect(),
                        a.iter().filter(|n| usable(n)).cloned().collect(),
                    ),
                )
            })
            .collect()
    }

    /// Registers `region` on every context. The transport keeps a reference to the region
    /// until [`unregister`](Self::unregister), so the memory outlives every registration;
    /// unregister here before asking the engine's registry to let it go.
    pub fn register(&self, region: &Arc<Region>) -> Result<()> {
        let mut access = Access::LOCAL_WRITE;
        if region.is_remote() {
            access = access | Access::REMOTE_READ | Access::REMOTE_WRITE;
        }
        let mut regs = self
            .inner
            .registrations
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if regs.contains_key(&region.addr()) {
            return Err(Error::new(
                ErrorKind::AddressOverlapped,
                format!("{:#x} is already registered for RDMA", region.addr()),
            ));
        }
        let mut mrs = Vec::with_capacity(self.inner.contexts.len());
        for ctx in &self.inner.contexts {
            // SAFETY: the range is the region's, valid while the region lives; the
            // registration below keeps the region alive and drops the MRs first.
            let mr =
                unsafe { ctx.pd.register(region.addr(), region.len(), access) }.map_err(|e| {
                    Error::new(
                        ErrorKind::Context,
                        format!("register {:#x} on {}: {e}", region.addr(), ctx.name),
                    )
                })?;
            mrs.push(mr);
        }
        regs.insert(
            region.addr(),
            Registration {
                mrs,
                remote: region.is_remote(),
                _region: region.clone(),
            },
        );
        Ok(())
    }

    /// Deregisters the region that starts at `addr`.
    pub fn unregister(&self, addr: usize) -> Result<()> {
        self.inner
            .registrations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr)
            .map(drop)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::AddressNotRegistered,
                    format!("{addr:#x} is not registered for RDMA"),
                )
            })
    }

    /// `(lkeys, rkeys)` of the region at `addr`, aligned with [`local_devices`]
    /// (rkeys empty for a private region).
    ///
    /// [`local_devices`]: Self::local_devices
    pub fn buffer_keys(&self, addr: usize) -> Option<(Vec<u32>, Vec<u32>)> {
        let regs = self
            .inner
            .registrations
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let reg = regs.get(&addr)?;
        let lkeys = reg.mrs.iter().map(|m| m.lkey()).collect();
        let rkeys = if reg.remote {
            reg.mrs.iter().map(|m| m.rkey()).collect()
        } else {
            Vec::new()
        };
        Some((lkeys, rkeys))
    }

    /// Moves `slices` to or from `peer`. Every slice reports to its task exactly once; one
    /// whose deadline passes before all its pieces are posted fails with `ERR_TIMEOUT`.
    pub fn submit(&self, peer: &Arc<RdmaPeer>, slices: Vec<Slice>) {
        let mut rail_cache: HashMap<(String, usize), Arc<RailEntry>> = HashMap::new();
        for slice in slices {
            let pieces = match self.plan(peer, &slice, &mut rail_cache) {
                Ok(pieces) => pieces,
                Err(e) => {
                    let task = slice.task.clone();
                    drop(slice);
                    task.slice_failed(e);
                    continue;
                }
            };
            if pieces.is_empty() {
                let (task, len) = (slice.task.clone(), slice.len);
                drop(slice);
                task.slice_done(len);
                continue;
            }
            let state = Arc::new(SliceState {
                task: slice.task.clone(),
                len: slice.len,
                region: Mutex::new(Some(slice.region.clone())),
                left: AtomicUsize::new(pieces.len()),
                error: OnceLock::new(),
            });
            let (region_addr, op, deadline) = (slice.region.addr(), slice.op, slice.deadline);
            drop(slice);
            for (local_addr, len, remote_addr, buffer, rails) in pieces {
                self.inner.dispatch(Piece {
                    slice: state.clone(),
                    op,
                    region_addr,
                    local_addr,
                    len,
                    remote_addr,
                    peer: peer.clone(),
                    buffer,
                    rails,
                    rail: None,
                    avoid: None,
                    avoid_device: None,
                    attempts: 0,
                    last_error: None,
                    deadline,
                })
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn plan(
        &self,
        peer: &Arc<RdmaPeer>,
        slice: &Slice,
        rail_cache: &mut HashMap<(String, usize), Arc<RailEntry>>,
    ) -> Result<Vec<(usize, usize, u64, usize, Arc<RailEntry>)>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::closed("the RDMA transport"));
        }
        let region = &slice.region;
        if !region.contains(slice.local_addr, slice.len) {
            return Err(Error::new(
                ErrorKind::AddressNotRegistered,
                format!(
                    "local range at {:#x} is outside its region",
                    slice.local_addr
                ),
            ));
        }
        let registered = self
            .inner
            .registrations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&region.addr());
        if !registered {
            return Err(Error::new(
                ErrorKind::AddressNotRegistered,
                format!("{:#x} is not registered for RDMA", region.addr()),
            ));
        }
        let config = &self.inner.config;
        let slice_size = config.slice_size.clamp(1, u32::MAX as usize);
        let region_end = region.addr() + region.len();
        let mut out = Vec::new();
        let mut offset = 0usize;
        while offset < slice.len {
            let remaining = slice.len - offset;
            let mut n = if remaining <= slice_size.saturating_add(config.fragment_limit) {
                remaining
            } else {
                slice_size
            };
            n = n.min(u32::MAX as usize);
            let local = slice.local_addr + offset;
            let remote = slice
                .remote_addr
                .checked_add(offset as u64)
                .ok_or_else(|| {
                    Error::new(ErrorKind::AddressNotRegistered, "remote address overflows")
                })?;
            let buffer = peer.buffer_index(remote).ok_or_else(|| {
                Error::new(
                    ErrorKind::AddressNotRegistered,
                    format!("{remote:#x} is in no buffer of {}", peer.server_name),
                )
            })?;
            let pb = &peer.buffers[buffer];
            if pb.rkeys.is_empty() {
                return Err(Error::new(
                    ErrorKind::AddressNotRegistered,
                    format!(
                        "{remote:#x} of {} is not remotely accessible",
                        peer.server_name
                    ),
                ));
            }
            let remote_room = pb.addr.saturating_add(pb.length) - remote;
            n = n
                .min(usize::try_from(remote_room).unwrap_or(usize::MAX))
                .min(region_end - local);
            let rails = rail_cache
                .entry((region.location().to_owned(), buffer))
                .or_insert_with(|| self.inner.rails_for(peer, region.location(), buffer))
                .clone();
            out.push((local, n, remote, buffer, rails));
            offset += n;
        }
        Ok(out)
    }

    /// Passive side of the handshake: answers a Connection request.
    pub fn on_connection(&self, request: ConnectionMessage) -> ConnectionMessage {
        let mut reply = ConnectionMessage {
            local_nic_path: request.peer_nic_path.clone(),
            peer_nic_path: request.local_nic_path.clone(),
            ready_ack: request.ready_ack,
            ..ConnectionMessage::default()
        };
        match self.inner.accept(&request) {
            Ok((link, qp_num)) => {
                reply.local_gid = gid_to_string(&link.gid);
                reply.local_lid = link.lid;
                reply.qp_num = qp_num;
            }
            Err(e) => {
                tracing::warn!(
                    from = %request.local_nic_path,
                    to = %request.peer_nic_path,
                    "rejecting RDMA connection: {e}"
                );
                reply.reply_msg = e.message().to_owned();
            }
        }
        reply
    }

    /// Every rail to `peer` (a server name), with its state.
    pub fn rails(&self, peer: &str) -> Vec<RailInfo> {
        self.rails_where(|p| p == peer)
    }

    /// Every rail to every peer, with its state.
    pub fn all_rails(&self) -> Vec<RailInfo> {
        self.rails_where(|_| true)
    }

    fn rails_where(&self, wanted: impl Fn(&str) -> bool) -> Vec<RailInfo> {
        let rails = lock(&self.inner.rails);
        let mut out: Vec<RailInfo> = rails
            .values()
            .filter(|e| wanted(&e.peer))
            .flat_map(|e| {
                e.set.stats().into_iter().map(|stats| RailInfo {
                    peer: e.peer.clone(),
                    local_location: e.local_location.clone(),
                    remote_location: e.remote_location.clone(),
                    stats,
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (
                &a.local_location,
                &a.remote_location,
                &a.stats.local,
                &a.stats.remote,
            )
                .cmp(&(
                    &b.local_location,
                    &b.remote_location,
                    &b.stats.local,
                    &b.stats.remote,
                ))
        });
        out
    }

    /// The endpoint of device `local_device` to `peer_nic_path`, if cached.
    pub fn endpoint_info(&self, local_device: &str, peer_nic_path: &str) -> Option<EndpointInfo> {
        let ctx = self.inner.context(local_device)?;
        let ep = lock(&ctx.endpoints).peek(peer_nic_path).cloned()?;
        Some(EndpointInfo {
            state: ep.state(),
            qp_nums: ep.qp_nums(),
            peer_qp_nums: ep.peer_qp_nums(),
        })
    }

    /// Retires every endpoint, waits for posted requests to drain (bounded), joins the
    /// threads and tasks, then destroys what is left and fails its slices with `ERR_CLOSED`.
    pub async fn close(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        inner.cancel.cancel();
        for ctx in &inner.contexts {
            let endpoints = lock(&ctx.endpoints).drain();
            for (_, ep) in endpoints {
                inner.retire(ctx, &ep);
            }
        }
        let deadline = Instant::now() + inner.config.destroy_timeout.min(Duration::from_secs(5));
        while !lock(&inner.inflight).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        inner.tasks.close();
        inner.tasks.wait().await;
        inner.stop.store(true, Ordering::Release);
        let threads = std::mem::take(&mut *lock(&self.threads));
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
        inner.shut_down();
    }
}

impl Drop for RdmaTransport {
    /// A transport dropped without [`close`](RdmaTransport::close) still settles every
    /// slice it holds, with `ERR_CLOSED`. Threads see the flag within one poll period and
    /// exit on their own.
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.shut_down();
    }
}

fn open_context(
    provider: &dyn Provider,
    name: &str,
    index: usize,
    server_name: &str,
    config: &RdmaConfig,
) -> Result<Context> {
    let device = provider.open(name)?;
    let port = device.query_port(config.ib_port)?;
    if port.state != PortState::Active {
        return Err(Error::new(
            ErrorKind::Context,
            format!("{name} port {} is {:?}", config.ib_port, port.state),
        ));
    }
    let gids = device.gid_table(config.ib_port)?;
    let gid_index = select_gid(&gids, config.gid_index)
        .ok_or_else(|| Error::new(ErrorKind::Context, format!("{name} has no usable GID")))?;
    let gid = gids
        .iter()
        .find(|e| e.index == gid_index)
        .map(|e| e.gid)
        .ok_or_else(|| Error::new(ErrorKind::Context, format!("{name} lost its GID")))?;
    let pd = device.alloc_pd()?;
    let cq = device.create_cq(config.max_cqe)?;
    tracing::info!(device = %name, gid = %gid_to_string(&gid), gid_index, "RDMA context up");
    Ok(Context {
        index,
        name: name.to_owned(),
        local_path: format!("{server_name}@{name}"),
        device,
        pd,
        cq,
        link: Mutex::new(LinkInfo {
            gid,
            gid_index,
            lid: port.lid,
            port: config.ib_port,
            mtu: port.active_mtu.min(config.mtu),
        }),
        port_up: AtomicBool::new(true),
        active: AtomicBool::new(true),
        local_failures: AtomicU32::new(0),
        endpoints: Mutex::new(EndpointStore::new(config.store_kind, config.max_ep_per_ctx)),
        retiring: Mutex::new(Vec::new()),
        cq_outstanding: AtomicUsize::new(0),
        max_cqe: config.max_cqe,
        cq_waiting: Mutex::new(VecDeque::new()),
    })
}

fn poll_loop(inner: Weak<Inner>, ctx: Arc<Context>) {
    const TICK: Duration = Duration::from_millis(100);
    // While requests are outstanding or were recently, the CQ is polled closely; after
    // `PARK_AFTER` without any, the waits grow to `MAX_WAIT` so an idle context costs
    // hundreds of wakeups a second rather than tens of thousands.
    const PARK_AFTER: Duration = Duration::from_millis(100);
    const BUSY_WAIT: Duration = Duration::from_micros(50);
    const MAX_WAIT: Duration = Duration::from_millis(5);
    let mut last_tick = Instant::now();
    let mut last_busy = Instant::now();
    let mut wait = BUSY_WAIT;
    loop {
        let Some(transport) = inner.upgrade() else {
            return;
        };
        if transport.stop.load(Ordering::Acquire) {
            return;
        }
        let completions = ctx.cq.poll(64);
        let idle = completions.is_empty();
        for wc in completions {
            transport.on_completion(&ctx, wc);
        }
        if !idle {
            transport.drain_cq_waiting(&ctx);
        }
        while let Some(event) = ctx.device.next_event(Duration::ZERO) {
            transport.on_event(&ctx, event);
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            transport.tick(&ctx);
        }
        drop(transport);
        if !idle || ctx.cq_outstanding.load(Ordering::Acquire) > 0 {
            last_busy = Instant::now();
            wait = BUSY_WAIT;
        }
        if idle {
            if last_busy.elapsed() >= PARK_AFTER {
                wait = (wait * 2).min(MAX_WAIT);
            }
            ctx.cq.wait(wait);
        }
    }
}

fn settle(set: &RailSet, rail: usize, bytes: u64, charge: Charge) {
    match charge {
        Charge::None => set.release(rail, bytes),
        Charge::Transient => set.failed(rail, bytes, Failure::Transient),
        // A remote fault condemns the path; the rail set keeps the last usable rail open.
        Charge::Remote => set.failed(rail, bytes, Failure::Fatal),
    }
}

fn deadline_error(piece: &Piece) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "{} bytes to {} missed the request deadline",
            piece.len, piece.peer.server_name
        ),
    )
}

/// Picks a rail for `piece`. After a local fault, rails of the faulty device are passed
/// over while the tier selection would use has a usable rail of another device.
/// `RailSet::pick` avoids one rail only, so each rail of that device it offers is loaded
/// with a huge byte count, which steers the least-loaded choice away from it, and unloaded
/// once a rail is chosen.
fn pick_rail(piece: &Piece) -> Option<usize> {
    const SHUN: u64 = 1 << 50;
    let set = &piece.rails.set;
    let len = piece.len as u64;
    let Some(bad) = piece.avoid_device.as_deref() else {
        return set.pick(len, piece.avoid);
    };
    if !(0..set.len()).any(|i| set.rail(i).0 != bad && set.is_usable(i)) {
        return set.pick(len, piece.avoid);
    }
    let mut shunned: Vec<usize> = Vec::new();
    let chosen = loop {
        let Some(rail) = set.pick(SHUN, piece.avoid) else {
            break None;
        };
        if set.rail(rail).0 != bad {
            set.release(rail, SHUN - len);
            break Some(rail);
        }
        let again = shunned.contains(&rail);
        shunned.push(rail);
        if again {
            break None;
        }
    };
    for &rail in &shunned {
        set.release(rail, SHUN);
    }
    chosen.or_else(|| set.pick(len, piece.avoid))
}

/// Releases a connect claim if its task ends without reaching an outcome.
struct ConnectGuard {
    inner: Arc<Inner>,
    ctx: Arc<Context>,
    ep: Arc<Endpoint>,
    armed: bool,
}

impl ConnectGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ConnectGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(from = %self.ep.local_path, to = %self.ep.peer_path, "RDMA connect task ended without an outcome");
            let e = Error::new(ErrorKind::Endpoint, "the connect task ended early");
            self.inner
                .connect_failed(&self.ctx, &self.ep, e, Charge::None);
        }
    }
}

impl Inner {
    fn context(&self, name: &str) -> Option<&Arc<Context>> {
        self.contexts.iter().find(|c| c.name == name)
    }

    fn rails_for(&self, peer: &RdmaPeer, local_location: &str, buffer: usize) -> Arc<RailEntry> {
        let remote_location = peer.buffers[buffer].location.clone();
        let mine = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter(|n| self.context(n).is_some())
                .cloned()
                .collect()
        };
        let (mut lp, mut la) = self
            .matrix
            .get(local_location)
            .or_else(|| self.matrix.get("*"))
            .map(|(p, a)| (mine(p), mine(a)))
            .unwrap_or_default();
        if lp.is_empty() && la.is_empty() {
            lp = self.contexts.iter().map(|c| c.name.clone()).collect();
        }
        la.retain(|n| !lp.contains(n));
        let theirs = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter(|n| peer.rkey(buffer, n).is_some())
                .cloned()
                .collect()
        };
        let (mut rp, mut ra) = peer
            .matrix
            .get(&remote_location)
            .or_else(|| peer.matrix.get("*"))
            .map(|(p, a)| (theirs(p), theirs(a)))
            .unwrap_or_default();
        if rp.is_empty() && ra.is_empty() {
            rp = peer
                .devices
                .iter()
                .map(|d| d.name.clone())
                .filter(|n| peer.rkey(buffer, n).is_some())
                .collect();
        }
        ra.retain(|n| !rp.contains(n));
        let pairs = |ls: &[String], rs: &[String]| -> Vec<(String, String)> {
            ls.iter()
                .flat_map(|l| rs.iter().map(move |r| (l.clone(), r.clone())))
                .collect()
        };
        let preferred = pairs(&lp, &rp);
        let mut available = pairs(&lp, &ra);
        available.extend(pairs(&la, &rp));
        available.extend(pairs(&la, &ra));

        let key = (
            peer.server_name.clone(),
            local_location.to_owned(),
            remote_location.clone(),
        );
        let mut rails = lock(&self.rails);
        if let Some(entry) = rails.get(&key) {
            if entry.preferred == preferred && entry.available == available {
                return entry.clone();
            }
        }
        let set = RailSet::new(self.policy.clone(), preferred.clone(), available.clone());
        for i in 0..set.len() {
            if self.context(set.rail(i).0).is_some_and(|c| !c.usable()) {
                set.pause(i);
            }
        }
        let entry = Arc::new(RailEntry {
            peer: peer.server_name.clone(),
            local_location: local_location.to_owned(),
            remote_location,
            preferred,
            available,
            set,
        });
        rails.insert(key, entry.clone());
        entry
    }

    fn set_device_rails(&self, device: &str, up: bool) {
        let rails = lock(&self.rails);
        for entry in rails.values() {
            for i in 0..entry.set.len() {
                if entry.set.rail(i).0 == device {
                    if up {
                        entry.set.resume(i);
                    } else {
                        entry.set.pause(i);
                    }
                }
            }
        }
    }

    fn dispatch(self: &Arc<Self>, mut piece: Piece) {
        if self.closed.load(Ordering::Acquire) {
            return self.finish(piece, Err(Error::closed("the RDMA transport")));
        }
        if piece.slice.task.has_failed() {
            let e = Error::new(
                ErrorKind::TransferFailed,
                "another slice of the request failed",
            );
            return self.finish(piece, Err(e));
        }
        if piece.expired(TokioInstant::now()) {
            let e = deadline_error(&piece);
            return self.finish(piece, Err(e));
        }
        // Mooncake's rule: a slice fails for good once its failures reach MC_RETRY_CNT.
        if piece.attempts >= self.policy.retry_budget {
            let last = piece
                .last_error
                .take()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let e = Error::new(
                ErrorKind::TransferFailed,
                format!(
                    "slice to {} failed after {} attempts: {last}",
                    piece.peer.server_name, piece.attempts
                ),
            );
            return self.finish(piece, Err(e));
        }
        let Some(rail) = pick_rail(&piece) else {
            let last = piece
                .last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            let e = Error::new(
                ErrorKind::NoRail,
                format!(
                    "no usable rail to {} for {} -> {}{last}",
                    piece.peer.server_name, piece.rails.local_location, piece.rails.remote_location
                ),
            );
            return self.finish(piece, Err(e));
        };
        piece.rail = Some(rail);
        let (local, remote) = piece.rails.set.rail(rail);
        let Some(ctx) = self.context(local).cloned() else {
            let e = Error::new(ErrorKind::DeviceNotFound, format!("no context {local}"));
            return self.retry(piece, e, Charge::Transient);
        };
        let peer_path = piece.peer.nic_path(remote);
        let ep = match self.endpoint(&ctx, &peer_path) {
            Ok(ep) => ep,
            Err(e) => return self.retry(piece, e, Charge::Transient),
        };
        let peer = piece.peer.clone();
        let mut state = ep.lock();
        match state.state {
            EndpointState::Connected => {
                drop(state);
                self.post(&ctx, &ep, vec![piece]);
            }
            EndpointState::Destroying | EndpointState::Destroyed => {
                drop(state);
                let e = Error::new(
                    ErrorKind::Endpoint,
                    format!("endpoint to {peer_path} retired"),
                );
                self.retry(piece, e, Charge::None);
            }
            _ => {
                state.pending.push(piece);
                let spawn = !state.connecting;
                state.connecting = true;
                drop(state);
                if spawn {
                    self.spawn_connect(ctx, ep, peer);
                }
            }
        }
    }

    fn retry(self: &Arc<Self>, mut piece: Piece, error: Error, charge: Charge) {
        let rail = piece.rail.take();
        if let Some(r) = rail {
            settle(&piece.rails.set, r, piece.len as u64, charge);
        }
        tracing::debug!(
            peer = %piece.peer.server_name,
            attempt = piece.attempts,
            "RDMA slice retried: {error}"
        );
        piece.avoid = rail.or(piece.avoid);
        piece.attempts += 1;
        piece.last_error = Some(error);
        self.dispatch(piece);
    }

    fn finish(&self, mut piece: Piece, outcome: Result<()>) {
        if let Some(r) = piece.rail.take() {
            match &outcome {
                Ok(()) => piece.rails.set.done(r, piece.len as u64),
                Err(_) => settle(&piece.rails.set, r, piece.len as u64, Charge::None),
            }
        }
        piece.slice.piece_finished(outcome);
    }

    fn endpoint(self: &Arc<Self>, ctx: &Arc<Context>, peer_path: &str) -> Result<Arc<Endpoint>> {
        let mut store = lock(&ctx.endpoints);
        if let Some(ep) = store.get(peer_path) {
            return Ok(ep);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("the RDMA transport"));
        }
        let ep = Endpoint::new(
            ctx.local_path.clone(),
            peer_path.to_owned(),
            ctx.pd.clone(),
            ctx.cq.clone(),
            self.config.num_qp_per_ep,
            self.config.max_wr,
            self.config.ib_port,
        )?;
        let evicted = store.insert(peer_path, ep.clone());
        drop(store);
        if let Some((_, old)) = evicted {
            tracing::debug!(device = %ctx.name, peer = %old.peer_path, "endpoint evicted");
            self.retire(ctx, &old);
        }
        Ok(ep)
    }

    /// Two-phase destroy, first phase; pieces that never reached a QP are dispatched again.
    fn retire(self: &Arc<Self>, ctx: &Arc<Context>, ep: &Arc<Endpoint>) {
        self.retire_with(ctx, ep, false);
    }

    /// Retires `ep`; with `force`, or when a QP cannot reach ERR (nothing would flush), the
    /// QPs are destroyed at once and the requests they held are dispatched again.
    fn retire_with(self: &Arc<Self>, ctx: &Arc<Context>, ep: &Arc<Endpoint>, force: bool) {
        {
            let mut store = lock(&ctx.endpoints);
            if store
                .peek(&ep.peer_path)
                .is_some_and(|cur| Arc::ptr_eq(cur, ep))
            {
                store.remove(&ep.peer_path);
            }
        }
        let retired = ep.retire();
        let mut pieces = retired.pieces;
        let mut written_off = Vec::new();
        if force || retired.stuck {
            pieces.extend(ep.destroy_now());
            written_off = self.take_inflight(ctx, ep);
        } else if retired.now {
            lock(&ctx.retiring).push(ep.clone());
        }
        for piece in pieces {
            let e = Error::new(
                ErrorKind::Endpoint,
                format!("endpoint to {} retired", ep.peer_path),
            );
            self.retry(piece, e, Charge::None);
        }
        self.redispatch_written_off(ep, written_off);
    }

    fn retire_all(self: &Arc<Self>, ctx: &Arc<Context>, force: bool) {
        let endpoints = lock(&ctx.endpoints).drain();
        for (_, ep) in endpoints {
            self.retire_with(ctx, &ep, force);
        }
        if force {
            let retiring = std::mem::take(&mut *lock(&ctx.retiring));
            for ep in retiring {
                ep.destroy_now();
                let written_off = self.take_inflight(ctx, &ep);
                self.redispatch_written_off(&ep, written_off);
            }
        }
    }

    /// Removes every posted request of `ep` (whose QPs are gone, so they will never
    /// complete) and gives their CQ entries back. Whoever removes an entry owns its piece,
    /// so a completion racing with this still reports the piece once.
    fn take_inflight(&self, ctx: &Context, ep: &Arc<Endpoint>) -> Vec<Piece> {
        let mut inflight = lock(&self.inflight);
        let ids: Vec<u64> = inflight
            .iter()
            .filter(|(_, p)| Arc::ptr_eq(&p.ep, ep))
            .map(|(id, _)| *id)
            .collect();
        let pieces: Vec<Piece> = ids
            .iter()
            .filter_map(|id| inflight.remove(id))
            .map(|p| p.piece)
            .collect();
        drop(inflight);
        ctx.release_cqes(pieces.len());
        pieces
    }

    fn redispatch_written_off(self: &Arc<Self>, ep: &Endpoint, pieces: Vec<Piece>) {
        if !pieces.is_empty() {
            tracing::warn!(peer = %ep.peer_path, count = pieces.len(), "requests of a destroyed endpoint dispatched again");
        }
        for piece in pieces {
            let e = Error::new(
                ErrorKind::Endpoint,
                format!(
                    "endpoint to {} destroyed with the request outstanding",
                    ep.peer_path
                ),
            );
            self.retry(piece, e, Charge::None);
        }
    }

    /// Destroys everything and only then fails what is left with `ERR_CLOSED`: once a slice
    /// reports, no QP may still reach its memory. Idempotent.
    fn shut_down(self: &Arc<Self>) {
        self.closed.store(true, Ordering::Release);
        self.cancel.cancel();
        let mut left: Vec<Piece> = Vec::new();
        for ctx in &self.contexts {
            // Pieces that never reached a QP fail here already, through `dispatch`.
            let endpoints = lock(&ctx.endpoints).drain();
            for (_, ep) in endpoints {
                self.retire(ctx, &ep);
            }
            let retiring = std::mem::take(&mut *lock(&ctx.retiring));
            for ep in retiring {
                left.extend(ep.destroy_now());
                left.extend(self.take_inflight(ctx, &ep));
            }
            left.extend(lock(&ctx.cq_waiting).drain(..).map(|(_, piece)| piece));
        }
        left.extend(lock(&self.inflight).drain().map(|(_, posted)| posted.piece));
        self.registrations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for piece in left {
            self.finish(piece, Err(Error::closed("the RDMA transport")));
        }
    }

    /// Posts `pieces` on `ep`, as far as its send queues and the context's CQ have room.
    fn post(self: &Arc<Self>, ctx: &Arc<Context>, ep: &Arc<Endpoint>, pieces: Vec<Piece>) {
        if self.post_now(ctx, ep, pieces) {
            // The CQ may have emptied while the pieces were being queued.
            self.drain_cq_waiting(ctx);
        }
    }

    /// Posts what fits; returns whether some pieces were queued for room in the CQ.
    fn post_now(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        ep: &Arc<Endpoint>,
        pieces: Vec<Piece>,
    ) -> bool {
        let mut rejected: Vec<(Piece, Error)> = Vec::new();
        let mut broken: Vec<(Piece, Error)> = Vec::new();
        let mut waiting: Vec<Piece> = Vec::new();
        {
            let mut state = ep.lock();
            if state.state != EndpointState::Connected {
                drop(state);
                for piece in pieces {
                    let e = Error::new(
                        ErrorKind::Endpoint,
                        format!("endpoint to {} is not connected", ep.peer_path),
                    );
                    self.retry(piece, e, Charge::None);
                }
                return false;
            }
            let now = TokioInstant::now();
            let nqp = state.qps.len();
            let mut batches: Vec<Vec<WorkRequest>> = vec![Vec::new(); nqp];
            let regs = self.registrations.read().unwrap_or_else(|p| p.into_inner());
            let mut inflight = lock(&self.inflight);
            for piece in pieces {
                if piece.expired(now) {
                    let e = deadline_error(&piece);
                    broken.push((piece, e));
                    continue;
                }
                let Some(qp) = (0..nqp)
                    .map(|k| (state.next_qp + k) % nqp)
                    .find(|&i| state.depth[i] < self.config.max_wr)
                else {
                    state.backlog.push_back(piece);
                    continue;
                };
                if !ctx.reserve_cqe() {
                    waiting.push(piece);
                    continue;
                }
                state.next_qp = (qp + 1) % nqp;
                let lkey = regs
                    .get(&piece.region_addr)
                    .and_then(|r| r.mrs.get(ctx.index))
                    .map(|m| m.lkey());
                let remote_dev = piece
                    .rail
                    .map(|r| piece.rails.set.rail(r).1)
                    .unwrap_or_default();
                let rkey = piece.peer.rkey(piece.buffer, remote_dev);
                let (Some(lkey), Some(rkey)) = (lkey, rkey) else {
                    ctx.release_cqes(1);
                    let e = Error::new(
                        ErrorKind::AddressNotRegistered,
                        format!(
                            "no key for {:#x} on {} or {remote_dev}",
                            piece.local_addr, ctx.name
                        ),
                    );
                    broken.push((piece, e));
                    continue;
                };
                let wr_id = self.next_wr.fetch_add(1, Ordering::Relaxed);
                batches[qp].push(WorkRequest {
                    wr_id,
                    op: match piece.op {
                        Opcode::Read => WrOp::Read,
                        Opcode::Write => WrOp::Write,
                    },
                    local_addr: piece.local_addr as u64,
                    len: piece.len as u32,
                    lkey,
                    remote_addr: piece.remote_addr,
                    rkey,
                });
                state.depth[qp] += 1;
                ep.outstanding.fetch_add(1, Ordering::AcqRel);
                inflight.insert(
                    wr_id,
                    Posted {
                        piece,
                        ep: ep.clone(),
                        qp,
                    },
                );
            }
            for (qp, wrs) in batches.iter().enumerate() {
                if wrs.is_empty() {
                    continue;
                }
                if let Err(err) = state.qps[qp].post_send(wrs) {
                    for wr in &wrs[err.posted.min(wrs.len())..] {
                        if let Some(posted) = inflight.remove(&wr.wr_id) {
                            state.depth[qp] = state.depth[qp].saturating_sub(1);
                            ep.outstanding.fetch_sub(1, Ordering::AcqRel);
                            ctx.release_cqes(1);
                            rejected.push((posted.piece, err.error.clone()));
                        }
                    }
                }
            }
        }
        let queued = !waiting.is_empty();
        if queued {
            lock(&ctx.cq_waiting).extend(waiting.into_iter().map(|piece| (ep.clone(), piece)));
            if self.closed.load(Ordering::Acquire) {
                // `shut_down` may have emptied the queue before these arrived.
                let left: Vec<_> = lock(&ctx.cq_waiting).drain(..).collect();
                for (_, piece) in left {
                    self.finish(piece, Err(Error::closed("the RDMA transport")));
                }
            }
        }
        for (piece, e) in broken {
            self.finish(piece, Err(e));
        }
        if !rejected.is_empty() {
            self.retire(ctx, ep);
        }
        for (piece, e) in rejected {
            self.retry(piece, e, Charge::None);
        }
        queued
    }

    /// Posts pieces that waited for room in the CQ, as long as there is room.
    fn drain_cq_waiting(self: &Arc<Self>, ctx: &Arc<Context>) {
        loop {
            let room = ctx
                .max_cqe
                .saturating_sub(ctx.cq_outstanding.load(Ordering::Acquire));
            if room == 0 {
                return;
            }
            let batch: Vec<(Arc<Endpoint>, Piece)> = {
                let mut queue = lock(&ctx.cq_waiting);
                let n = room.min(queue.len());
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let mut requeued = false;
            let mut groups: Vec<(Arc<Endpoint>, Vec<Piece>)> = Vec::new();
            for (ep, piece) in batch {
                match groups.last_mut() {
                    Some((last, pieces)) if Arc::ptr_eq(last, &ep) => pieces.push(piece),
                    _ => groups.push((ep, vec![piece])),
                }
            }
            for (ep, pieces) in groups {
                requeued |= self.post_now(ctx, &ep, pieces);
            }
            // Requeued means the CQ filled up again; its completions will drain the rest.
            if requeued {
                return;
            }
        }
    }

    fn on_completion(self: &Arc<Self>, ctx: &Arc<Context>, wc: Completion) {
        let Some(Posted { piece, ep, qp }) = lock(&self.inflight).remove(&wc.wr_id) else {
            tracing::debug!(device = %ctx.name, wr_id = wc.wr_id, "completion for an unknown request");
            return;
        };
        ctx.release_cqes(1);
        let backlog: Vec<Piece> = {
            let mut state = ep.lock();
            if let Some(d) = state.depth.get_mut(qp) {
                *d = d.saturating_sub(1);
            }
            ep.outstanding.fetch_sub(1, Ordering::AcqRel);
            if state.state == EndpointState::Connected {
                state.backlog.drain(..).collect()
            } else {
                Vec::new()
            }
        };
        if !backlog.is_empty() {
            self.post(ctx, &ep, backlog);
        }
        if wc.status == WcStatus::Success {
            ctx.local_failures.store(0, Ordering::Relaxed);
            return self.finish(piece, Ok(()));
        }
        let error = Error::new(
            ErrorKind::TransferFailed,
            format!(
                "{} -> {}: work completion {}",
                ctx.name, ep.peer_path, wc.status
            ),
        );
        // Any error leaves the QP in ERR: the endpoint cannot carry more.
        self.retire(ctx, &ep);
        match wc.status {
            WcStatus::FlushErr => self.retry(piece, error, Charge::None),
            status if status.is_local() => {
                let failures = ctx.local_failures.fetch_add(1, Ordering::AcqRel) + 1;
                if failures >= MAX_LOCAL_FAILURES && ctx.active.swap(false, Ordering::AcqRel) {
                    tracing::error!(device = %ctx.name, "too many local faults: context disabled");
                    self.set_device_rails(&ctx.name, false);
                    self.retire_all(ctx, false);
                }
                // Mooncake hands a local fault to another local NIC: any rail of this
                // device would likely fail the same way.
                let mut piece = piece;
                piece.avoid_device = Some(ctx.name.clone());
                self.retry(piece, error, Charge::Transient);
            }
            _ => self.retry(piece, error, Charge::Remote),
        }
    }

    fn on_event(self: &Arc<Self>, ctx: &Arc<Context>, event: AsyncEvent) {
        tracing::info!(device = %ctx.name, ?event, "RDMA async event");
        let port = self.config.ib_port;
        match event {
            // A new LID invalidates every connection; the port is brought back by the
            // next PortActive or by the tick once the port reads ACTIVE.
            AsyncEvent::PortError(p) | AsyncEvent::LidChange(p) if p == port => {
                ctx.port_up.store(false, Ordering::Release);
                self.set_device_rails(&ctx.name, false);
                self.retire_all(ctx, false);
            }
            AsyncEvent::PortActive(p) if p == port => self.port_back(ctx),
            // Completions are lost or will never come: nothing drains, so destroy now.
            AsyncEvent::DeviceFatal | AsyncEvent::CqError | AsyncEvent::WqFatal => {
                ctx.active.store(false, Ordering::Release);
                self.set_device_rails(&ctx.name, false);
                self.retire_all(ctx, true);
            }
            AsyncEvent::QpFatal(qpn) => {
                let target = lock(&ctx.endpoints)
                    .entries()
                    .into_iter()
                    .map(|(_, ep)| ep)
                    .find(|ep| ep.qp_nums().contains(&qpn));
                if let Some(ep) = target {
                    self.retire(ctx, &ep);
                }
            }
            AsyncEvent::GidChange(p) if p == port => {
                self.reprobe_gid(ctx);
                self.retire_all(ctx, false);
            }
            _ => {}
        }
    }

    fn port_back(&self, ctx: &Context) {
        if let Ok(attr) = ctx.device.query_port(self.config.ib_port) {
            lock(&ctx.link).lid = attr.lid;
        }
        self.reprobe_gid(ctx);
        ctx.port_up.store(true, Ordering::Release);
        if ctx.active.load(Ordering::Acquire) {
            self.set_device_rails(&ctx.name, true);
        }
    }

    fn reprobe_gid(&self, ctx: &Context) {
        let table = match ctx.device.gid_table(self.config.ib_port) {
            Ok(table) => table,
            Err(e) => {
                tracing::warn!(device = %ctx.name, "GID re-probe failed: {e}");
                return;
            }
        };
        if let Some(index) = select_gid(&table, self.config.gid_index) {
            if let Some(entry) = table.iter().find(|e| e.index == index) {
                let mut link = lock(&ctx.link);
                link.gid = entry.gid;
                link.gid_index = index;
            }
        }
    }

    fn tick(self: &Arc<Self>, ctx: &Arc<Context>) {
        let timeout = self.config.destroy_timeout;
        let mut forced = Vec::new();
        lock(&ctx.retiring).retain(|ep| match ep.try_finish_destroy(timeout) {
            Teardown::Draining => true,
            Teardown::Drained => false,
            Teardown::Forced => {
                forced.push(ep.clone());
                false
            }
        });
        for ep in forced {
            let written_off = self.take_inflight(ctx, &ep);
            self.redispatch_written_off(&ep, written_off);
        }
        let endpoints: Vec<Arc<Endpoint>> = lock(&ctx.endpoints)
            .entries()
            .into_iter()
            .map(|(_, ep)| ep)
            .collect();
        for ep in endpoints
            .iter()
            .filter(|ep| ep.ack_overdue(self.config.ready_ack_timeout))
        {
            tracing::warn!(peer = %ep.peer_path, "no ready-ack in time: endpoint deleted");
            self.retire(ctx, ep);
        }
        let now = TokioInstant::now();
        let mut expired: Vec<Piece> = endpoints
            .iter()
            .flat_map(|ep| ep.take_expired(now))
            .collect();
        {
            let mut waiting = lock(&ctx.cq_waiting);
            if waiting.iter().any(|(_, piece)| piece.expired(now)) {
                let all = std::mem::take(&mut *waiting);
                for (ep, piece) in all {
                    if piece.expired(now) {
                        expired.push(piece);
                    } else {
                        waiting.push_back((ep, piece));
                    }
                }
            }
        }
        for piece in expired {
            let e = deadline_error(&piece);
            self.finish(piece, Err(e));
        }
        self.drain_cq_waiting(ctx);
        if !ctx.port_up.load(Ordering::Acquire)
            && ctx.active.load(Ordering::Acquire)
            && ctx
                .device
                .query_port(self.config.ib_port)
                .is_ok_and(|attr| attr.state == PortState::Active)
        {
            tracing::info!(device = %ctx.name, "port active again");
            self.port_back(ctx);
        }
    }

    fn spawn_connect(self: &Arc<Self>, ctx: Arc<Context>, ep: Arc<Endpoint>, peer: Arc<RdmaPeer>) {
        let cancel = self.cancel.clone();
        // Settles the pending pieces however the task ends: a panic, or a runtime that
        // drops it unfinished, still releases the connect claim.
        let guard = ConnectGuard {
            inner: self.clone(),
            ctx,
            ep,
            armed: true,
        };
        self.tasks.spawn_on(
            async move {
                let mut guard = guard;
                let (inner, ctx, ep) = (guard.inner.clone(), guard.ctx.clone(), guard.ep.clone());
                let outcome = tokio::select! {
                    r = inner.connect(&ctx, &ep, &peer) => r,
                    _ = cancel.cancelled() => Err((Error::closed("the RDMA transport"), Charge::None)),
                };
                guard.disarm();
                match outcome {
                    Ok(()) => match ep.mark_connected() {
                        Ok(pieces) => inner.post(&ctx, &ep, pieces),
                        Err(pieces) => {
                            for piece in pieces {
                                let e = Error::new(ErrorKind::Endpoint, "endpoint retired");
                                inner.retry(piece, e, Charge::None);
                            }
                        }
                    },
                    Err((e, charge)) => inner.connect_failed(&ctx, &ep, e, charge),
                }
            },
            &self.runtime,
        );
    }

    fn connect_failed(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        ep: &Arc<Endpoint>,
        e: Error,
        charge: Charge,
    ) {
        if charge != Charge::None {
            tracing::warn!(from = %ep.local_path, to = %ep.peer_path, "RDMA connect failed: {e}");
        }
        let (pieces, retire) = ep.active_failed();
        if retire {
            self.retire(ctx, ep);
        }
        for piece in pieces {
            self.retry(piece, e.clone(), charge);
        }
    }

    /// The active handshake. A failure says how to charge the rail: nothing when the
    /// transport closes or the endpoint was retired, `Transient` when this side failed
    /// (building or moving its own QPs), `Remote` when the peer rejected or never answered.
    async fn connect(
        &self,
        ctx: &Context,
        ep: &Endpoint,
        peer: &RdmaPeer,
    ) -> Result<(), (Error, Charge)> {
        let local = |e: Error| (e, Charge::Transient);
        let remote = |e: Error| (e, Charge::Remote);
        let retired = || {
            (
                Error::new(ErrorKind::Endpoint, "endpoint retired"),
                Charge::None,
            )
        };
        let link = ctx.link();
        let request = match ep.begin_active(&link).map_err(local)? {
            ActiveStart::Connected => return Ok(()),
            ActiveStart::Retired => return Err(retired()),
            ActiveStart::WaitForAck => return self.wait_connected(ep).await,
            ActiveStart::Send(request) => request,
        };
        if ep.peer_path == ep.local_path {
            return ep.connect_loopback(&link).map_err(local);
        }
        let remote_device = ep.peer_path.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        let fallback_gid = peer.device(remote_device).and_then(|d| parse_gid(&d.gid));
        let reply = self
            .connector
            .connect(&peer.rpc_addr, request)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::Closed => (e, Charge::None),
                _ => (e, Charge::Remote),
            })?;
        if let Err(e) = ep.complete_active(&reply, &link, fallback_gid) {
            if matches!(
                ep.state(),
                EndpointState::Destroying | EndpointState::Destroyed
            ) {
                return Err((e, Charge::None));
            }
            return Err(remote(e));
        }
        if reply.ready_ack.is_some() {
            let ack = self
                .connector
                .connect(&peer.rpc_addr, ep.ready_ack(&link))
                .await
                .map_err(remote)?;
            if !ack.reply_msg.is_empty() {
                return Err(remote(Error::new(
                    ErrorKind::RejectHandshake,
                    format!("{} rejected the ready-ack: {}", ep.peer_path, ack.reply_msg),
                )));
            }
        }
        Ok(())
    }

    async fn wait_connected(&self, ep: &Endpoint) -> Result<(), (Error, Charge)> {
        let deadline = Instant::now() + self.config.ready_ack_timeout;
        loop {
            match ep.state() {
                EndpointState::Connected => return Ok(()),
                EndpointState::Destroying | EndpointState::Destroyed => {
                    return Err((
                        Error::new(ErrorKind::Endpoint, "endpoint retired"),
                        Charge::None,
                    ));
                }
                _ if Instant::now() >= deadline => {
                    return Err((
                        Error::new(
                            ErrorKind::Endpoint,
                            format!("{} never sent its ready-ack", ep.peer_path),
                        ),
                        Charge::Remote,
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    fn accept(self: &Arc<Self>, request: &ConnectionMessage) -> Result<(LinkInfo, Vec<u32>)> {
        let reject = |msg: String| Error::new(ErrorKind::RejectHandshake, msg);
        if self.closed.load(Ordering::Acquire) {
            return Err(reject("the RDMA transport is closed".to_owned()));
        }
        let (server, device) = request
            .peer_nic_path
            .rsplit_once('@')
            .ok_or_else(|| reject(format!("bad peer_nic_path '{}'", request.peer_nic_path)))?;
        if server != self.server_name {
            return Err(reject(format!(
                "peer_nic_path names server '{server}', this is '{}'",
                self.server_name
            )));
        }
        let ctx = self
            .context(device)
            .cloned()
            .ok_or_else(|| reject(format!("no device {device} here")))?;
        if !ctx.usable() {
            return Err(reject(format!("device {device} is down")));
        }
        if !request.local_nic_path.contains('@') {
            return Err(reject(format!(
                "bad local_nic_path '{}'",
                request.local_nic_path
            )));
        }
        if request.qp_num.len() != self.config.num_qp_per_ep {
            return Err(reject(format!(
                "QP count mismatch: {} requested, {} here; check MC_NUM_QP_PER_EP",
                request.qp_num.len(),
                self.config.num_qp_per_ep
            )));
        }
        let link = ctx.link();
        if request.ready_ack == Some(true) {
            let ep = lock(&ctx.endpoints)
                .peek(&request.local_nic_path)
                .cloned()
                .ok_or_else(|| {
                    reject(format!("ready-ack for unknown {}", request.local_nic_path))
                })?;
            ep.on_ready_ack(request)?;
            return Ok((link, ep.qp_nums()));
        }
        let peer_gid = parse_gid(&request.local_gid)
            .ok_or_else(|| reject(format!("bad local_gid '{}'", request.local_gid)))?;
        for _ in 0..3 {
            let ep = self.endpoint(&ctx, &request.local_nic_path)?;
            match ep.accept(request, &link, peer_gid) {
                Ok(qp_num) => return Ok((link, qp_num)),
                Err(AcceptError::Retired) => {
                    self.retire(&ctx, &ep);
                }
                Err(AcceptError::PeerRestarted) => {
                    tracing::info!(peer = %request.local_nic_path, "peer restarted: endpoint rebuilt");
                    self.retire(&ctx, &ep);
                }
                Err(AcceptError::Failed(e)) => return Err(e),
            }
        }
        Err(reject(format!(
            "endpoint for {} keeps being retired",
            request.local_nic_path
        )))
    }
}
