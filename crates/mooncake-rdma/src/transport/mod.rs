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
//!
//! - this file: the transport's API (open, register, submit, rails, close);
//! - [`options`]: what it is built from, the handshake connector, the states it reports;
//! - [`context`]: a device context and its polling thread;
//! - [`pieces`]: slices, pieces, rails and how outcomes are charged;
//! - [`dispatch`]: a rail per piece, retries, posting;
//! - [`recovery`]: completions, events, endpoint retirement;
//! - [`connect`]: endpoints, the active connect and the passive accept.

mod connect;
mod context;
mod dispatch;
mod options;
mod pieces;
mod recovery;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::handshake::messages::ConnectionMessage;
use mooncake_metadata::handshake::MessageType;
use mooncake_transport::rail::{Failure, RailPolicy, RailSet, RailStats};
use mooncake_transport::{slicing, Opcode, Region, Slice};
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RdmaConfig;
use crate::endpoint::{AcceptError, ActiveStart, Endpoint, EndpointState, LinkInfo, Teardown};
use crate::gid::select_gid;
use crate::peer::{DeviceDesc, RdmaPeer};
use crate::piece::{Piece, RailEntry, SliceState};
use crate::store::EndpointStore;
use crate::verbs::{
    gid_to_string, parse_gid, Access, AsyncEvent, Completion, CompletionQueue, Device,
    MemoryRegion, PortState, ProtectionDomain, Provider, WcStatus, WorkRequest, WrOp,
};
use mooncake_topology::{Entry, PriorityMatrix, WILDCARD};

pub(crate) use self::context::Context;
use self::context::*;
pub use self::options::{
    BoxFuture, Connector, EndpointInfo, HandshakeConnector, RailInfo, RdmaOptions,
};
use self::pieces::*;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Mooncake's RDMA transport.
pub struct RdmaTransport {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
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
        let mut published = PriorityMatrix::new();
        for (location, entry) in self.inner.matrix.iter() {
            let only_usable =
                |names: &[String]| names.iter().filter(|n| usable(n)).cloned().collect();
            published.insert(
                location,
                Entry {
                    preferred: only_usable(&entry.preferred),
                    available: only_usable(&entry.available),
                },
            );
        }
        published
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
            let mut n = slicing::next_len(slice.len - offset, slice_size, config.fragment_limit)
                .min(u32::MAX as usize);
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
