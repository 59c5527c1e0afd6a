//! The engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_common::config::Protocol;
use mooncake_common::{EngineConfig, Error, ErrorKind, HandleSlab, Result};
use mooncake_metadata::handshake::{
    self,
    messages::{ConnectionMessage, NotifyMessage},
    HandshakeHandler, HandshakeServer, MessageType,
};
use mooncake_metadata::{BufferDesc, Keys, MetadataBackend, MetadataStore, RpcMeta, SegmentDesc};
use mooncake_rdma::peer::matrix_to_json;
use mooncake_rdma::verbs::Provider;
use mooncake_rdma::{HandshakeConnector, RdmaOptions, RdmaPeer, RdmaTransport};
use mooncake_topology::{memory_location, DiscoverOptions, PriorityMatrix, Topology};
use mooncake_transport::rail::{RailPolicy, RailStats};
use mooncake_transport::shm::{
    self, ControlTable, RemoteRange, ShmPeer, ShmServer, ShmSlice, ShmTarget, ShmTransport,
};
use mooncake_transport::tcp::{TcpClient, TcpClientConfig, TcpServer};
use mooncake_transport::{Arena, BatchProgress, MemoryRegistry, Opcode, Region, Slice, Task};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::address::{
    advertised_host, bind, bind_ip, join_host_port, local_rails, split_host_port, LocalRail,
};
use crate::batch::{Batch, BatchId, PendingNotify, TaskReport};
use crate::segments::{
    shm_buffer, RailAddr, RemoteSegment, Resolver, SegmentId, SegmentInfo, SegmentTable,
};
use crate::slicing;
use crate::stats::{TransportKind, TransportStats};

/// One request of a batch.
#[derive(Debug, Clone, Copy)]
pub struct TransferRequest {
    /// Read (remote to local) or write (local to remote).
    pub op: Opcode,
    /// Target segment.
    pub segment: SegmentId,
    /// Start of the local range; must lie inside one registered buffer.
    pub local_addr: usize,
    /// Start of the remote range, an address in the target's memory.
    pub remote_addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Options of one submission.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Every request must finish within this long, or its task ends as TIMEOUT.
    pub timeout: Option<Duration>,
    /// Sent to the first request's segment once the whole batch completed.
    pub notify: Option<String>,
    /// The submitting thread copies one slice itself (the last of the last request, when that
    /// request goes through shared memory) rather than hand it to a copy thread: for a one-slice
    /// request, the hand-off and the wake-ups cost more than the copy. For callers on an async
    /// worker; never on a thread that must not block (JavaScript's).
    pub copy_on_caller: bool,
}

/// A notification received from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender's segment name.
    pub from: String,
    /// The payload.
    pub message: String,
}

type NotifyListener = Arc<dyn Fn(Notification) + Send + Sync>;

/// Undelivered notifications kept when nobody listens.
const NOTIFY_QUEUE_LIMIT: usize = 4096;

/// How long an unregister waits for same-host copies in progress.
const SHM_DRAIN: Duration = Duration::from_secs(1);

/// What the handshake listener needs of this engine.
struct Local {
    name: String,
    data_port: u16,
    /// Interfaces TCP rails leave from (empty: one path, by the routing table).
    tcp_rails: Vec<LocalRail>,
    registry: Arc<MemoryRegistry>,
    /// The control table and what same-host peers need to reach us, when offered.
    shm: Option<(Arc<ControlTable>, ShmTarget)>,
    rdma: Option<Arc<RdmaTransport>>,
    listener: Mutex<Option<NotifyListener>>,
    queued: Mutex<Vec<Notification>>,
}

impl Local {
    fn desc(&self) -> SegmentDesc {
        let mut desc = SegmentDesc::tcp(&self.name, self.data_port);
        if !self.tcp_rails.is_empty() {
            let rails: Vec<_> = self
                .tcp_rails
                .iter()
                .map(|rail| RailAddr {
                    device: rail.device.clone(),
                    ip: rail.ip.to_string(),
                    port: self.data_port,
                })
                .collect();
            desc.extra.insert(
                "tcp_rails".to_owned(),
                serde_json::to_value(rails).expect("rail addresses serialize"),
            );
        }
        if let Some((_, target)) = &self.shm {
            desc.extra.insert(
                "shm".to_owned(),
                serde_json::to_value(target).expect("shm target serializes"),
            );
        }
        if let Some(rdma) = &self.rdma {
            desc.protocol = serde_json::json!(["rdma", "tcp"]);
            desc.extra.insert(
                "devices".to_owned(),
                serde_json::to_value(rdma.local_devices()).expect("devices serialize"),
            );
            desc.extra.insert(
                "priority_matrix".to_owned(),
                matrix_to_json(&rdma.priority_matrix()),
            );
        }
        desc.buffers = self
            .registry
            .regions()
            .iter()
            .filter(|region| region.is_remote())
            .map(|region| {
                let mut extra = serde_json::Map::new();
                extra.insert("location".to_owned(), region.location().into());
                let keys = self
                    .rdma
                    .as_ref()
                    .and_then(|r| r.buffer_keys(region.addr()));
                if let Some((lkeys, rkeys)) = &keys {
                    extra.insert("lkey".to_owned(), lkeys.clone().into());
                    extra.insert("rkey".to_owned(), rkeys.clone().into());
                }
                if let Some(slot) = region.slot() {
                    let mut shm = serde_json::Map::new();
                    shm.insert("slot".to_owned(), slot.index.into());
                    shm.insert("generation".to_owned(), slot.generation.into());
                    if let Some(arena) = region.backing_arena() {
                        shm.insert("arena".to_owned(), arena.id().into());
                    }
                    extra.insert("shm".to_owned(), shm.into());
                }
                BufferDesc {
                    // RDMA peers read a buffer's location from its name; TCP ones ignore it.
                    name: match keys {
                        Some(_) => region.location().to_owned(),
                        None => self.name.clone(),
                    },
                    addr: region.addr() as u64,
                    length: region.len() as u64,
                    extra,
                }
            })
            .collect();
        desc
    }
}

impl HandshakeHandler for Local {
    fn on_metadata(&self, _peer_desc: &str) -> Result<String> {
        Ok(self.desc().encode())
    }

    fn on_connection(&self, request: ConnectionMessage) -> ConnectionMessage {
        match &self.rdma {
            Some(rdma) => rdma.on_connection(request),
            None => ConnectionMessage {
                local_nic_path: request.peer_nic_path,
                peer_nic_path: request.local_nic_path,
                reply_msg: "RDMA is not enabled on this peer".to_owned(),
                ..ConnectionMessage::default()
            },
        }
    }

    fn on_notify(&self, message: NotifyMessage) {
        let notification = Notification {
            from: message.name,
            message: message.notify_msg,
        };
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match listener {
            Some(listener) => listener(notification),
            None => {
                let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
                if queued.len() >= NOTIFY_QUEUE_LIMIT {
                    tracing::warn!("notification queue full; dropping the oldest");
                    queued.remove(0);
                }
                queued.push(notification);
            }
        }
    }
}

/// Republishes the local descriptor whenever registrations change (store mode only).
struct Publisher {
    store: Arc<dyn MetadataStore>,
    keys: Keys,
    dirty: Notify,
}

impl Publisher {
    async fn publish(&self, local: &Local) -> Result<()> {
        self.store
            .put(&self.keys.segment(&local.name), &local.desc().encode())
            .await
    }
}

/// A Mooncake transfer engine: one segment, its registered memory, and batched one-sided
/// transfers to other segments.
pub struct TransferEngine {
    config: EngineConfig,
    local: Arc<Local>,
    resolver: Resolver,
    handshake: HandshakeServer,
    data: TcpServer,
    tcp: TcpClient,
    shm_server: Option<ShmServer>,
    shm: Option<ShmTransport>,
    discovered: Topology,
    matrix: PriorityMatrix,
    stats: TransportStats,
    segments: Mutex<SegmentTable>,
    batches: Mutex<HandleSlab<Arc<Batch>>>,
    publisher: Option<Arc<Publisher>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    runtime: tokio::runtime::Handle,
    closed: AtomicBool,
}

impl TransferEngine {
    /// Starts an engine: binds the handshake and data listeners, and in store mode publishes
    /// its RPC address and descriptor. Must run inside a tokio runtime. RDMA runs on the
    /// host's NICs when this build has RDMA support and the host has usable devices.
    pub async fn start(config: EngineConfig) -> Result<Arc<Self>> {
        Self::start_on(config, None).await
    }

    /// Starts an engine whose RDMA transport runs on `verbs` (a software provider, say) over
    /// the devices of the priority matrix.
    pub async fn start_with_verbs(
        config: EngineConfig,
        verbs: Arc<dyn Provider>,
    ) -> Result<Arc<Self>> {
        Self::start_on(config, Some(verbs)).await
    }

    async fn start_on(config: EngineConfig, verbs: Option<Arc<dyn Provider>>) -> Result<Arc<Self>> {
        config.validate()?;
        let backend = mooncake_metadata::connect(&config.metadata)?;
        let (discovered, matrix) = discover(&config)?;
        let (host, named_port) = split_host_port(&config.local_server_name)?;
        let advertised = match &config.advertised_host {
            Some(host) => host.clone(),
            None => advertised_host(&host).await?,
        };
        let ip = bind_ip(&advertised);
        let p2p = matches!(backend, MetadataBackend::P2pHandshake);
        let rpc_port = config.rpc_port.or(if p2p { named_port } else { None });
        let mut tcp_rails = config
            .devices
            .as_deref()
            .map(local_rails)
            .unwrap_or_default();
        // Rails arrive on several interfaces, so the data port listens on all of them, in one
        // address family: IPv4 when any rail has it.
        let v4 = tcp_rails.iter().any(|rail| rail.ip.is_ipv4());
        tcp_rails.retain(|rail| rail.ip.is_ipv4() == v4);
        let data_ip = match (tcp_rails.is_empty(), v4) {
            (true, _) => ip.clone(),
            (false, true) => "0.0.0.0".to_owned(),
            (false, false) => "::".to_owned(),
        };
        let rpc_listener = bind(&ip, rpc_port, &config.rpc_port_range).await?;
        let data_listener = bind(&data_ip, config.tcp_data_port, &config.rpc_port_range).await?;
        let rpc_port = rpc_listener
            .local_addr()
            .map_err(|e| Error::socket("handshake listener address", e))?
            .port();
        let data_port = data_listener
            .local_addr()
            .map_err(|e| Error::socket("data listener address", e))?
            .port();
        let name = if p2p {
            join_host_port(&advertised, rpc_port)
        } else {
            config.local_server_name.clone()
        };
        let verbs = verbs.or_else(|| host_verbs(&discovered));
        let rdma = start_rdma(&config, verbs, &name, &matrix)?;
        let registry = Arc::new(MemoryRegistry::default());
        let (shm_server, shm_offer, shm) =
            match shm::host::host_id().filter(|_| config.shared_memory) {
                Some(host) => {
                    let control = Arc::new(ControlTable::new()?);
                    let server = ShmServer::start(control.clone(), registry.clone())?;
                    let target = ShmTarget {
                        host: host.to_owned(),
                        socket: server.name().to_owned(),
                        pid: std::process::id(),
                        probe: control.addr() as u64,
                    };
                    let transport = ShmTransport::new(tokio::runtime::Handle::current())?;
                    (Some(server), Some((control, target)), Some(transport))
                }
                None => (None, None, None),
            };
        let local = Arc::new(Local {
            name: name.clone(),
            data_port,
            tcp_rails,
            registry: registry.clone(),
            shm: shm_offer,
            rdma,
            listener: Mutex::new(None),
            queued: Mutex::new(Vec::new()),
        });
        let handshake = HandshakeServer::start(
            rpc_listener,
            local.clone(),
            config.handshake_max_length,
            config.handshake_max_connections,
        )?;
        let data = TcpServer::start(data_listener, registry)?;
        let tcp = TcpClient::new(
            TcpClientConfig {
                lanes_per_peer: config.tcp_lanes_per_peer,
                connect_timeout: config.connect_timeout,
                io_timeout: config.io_timeout,
                rails: RailPolicy {
                    retry_budget: config.retry_budget,
                    ..RailPolicy::default()
                },
            },
            tokio::runtime::Handle::current(),
        );
        let keys = Keys::new(config.cluster_id.as_deref());
        let publisher = match &backend {
            MetadataBackend::Store(store) => Some(Arc::new(Publisher {
                store: store.clone(),
                keys: keys.clone(),
                dirty: Notify::new(),
            })),
            MetadataBackend::P2pHandshake => None,
        };
        let engine = Arc::new(Self {
            resolver: Resolver {
                backend,
                keys,
                connect_timeout: config.connect_timeout,
                max_frame: config.handshake_max_length,
            },
            config,
            local,
            handshake,
            data,
            tcp,
            shm_server,
            shm,
            discovered,
            matrix,
            stats: TransportStats::default(),
            segments: Mutex::new(SegmentTable::default()),
            batches: Mutex::new(HandleSlab::default()),
            publisher,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            closed: AtomicBool::new(false),
        });
        if let Some(publisher) = &engine.publisher {
            let rpc = RpcMeta {
                ip_or_host_name: advertised.clone(),
                rpc_port,
            };
            let published = async {
                publisher
                    .store
                    .put(&publisher.keys.rpc_meta(&name), &rpc.encode())
                    .await?;
                engine.publish_now().await
            };
            if let Err(e) = published.await {
                engine.close().await;
                return Err(e);
            }
            engine.spawn_publisher();
        }
        tracing::info!(segment = %name, rpc_port, data_port, "transfer engine started");
        Ok(engine)
    }

    /// The name peers open: `host:port` in P2P mode, `local_server_name` otherwise.
    pub fn segment_name(&self) -> &str {
        &self.local.name
    }

    /// The handshake (RPC) port.
    pub fn rpc_port(&self) -> u16 {
        self.handshake.local_addr().port()
    }

    /// The TCP data port.
    pub fn data_port(&self) -> u16 {
        self.data.local_addr().port()
    }

    /// The options the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The NIC priority matrix this engine selects devices by: discovered, or the one given.
    pub fn topology(&self) -> &PriorityMatrix {
        &self.matrix
    }

    /// What discovery found on this host.
    pub fn host_topology(&self) -> &Topology {
        &self.discovered
    }

    /// The transports this engine can use: `tcp`, `shm` unless shared memory is off, and
    /// `rdma` when it runs.
    pub fn transports(&self) -> Vec<&'static str> {
        let mut active = vec!["tcp"];
        if self.shm.is_some() {
            active.push("shm");
        }
        if self.local.rdma.is_some() {
            active.push("rdma");
        }
        active
    }

    /// This engine's descriptor, as peers see it.
    pub fn local_descriptor(&self) -> SegmentDesc {
        self.local.desc()
    }

    // ----- memory -------------------------------------------------------------------------

    /// Allocates and registers `len` bytes of engine memory.
    pub fn allocate(&self, len: usize) -> Result<Arc<Arena>> {
        self.ensure_open()?;
        let arena = Arc::new(Arena::new("mooncake-segment", len)?);
        // The first touch places the page; the kernel then says where it went.
        // SAFETY: the arena is at least one byte long and mapped for reading.
        unsafe { std::ptr::read_volatile(arena.as_ptr()) };
        let location = memory_location(arena.as_ptr() as usize, len);
        self.register_region(Region::arena(arena.clone(), &location))?;
        Ok(arena)
    }

    /// Registers caller memory, kept alive by `owner` until unregistered.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay valid for reads and writes while `owner` lives.
    pub unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        location: &str,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<()> {
        self.ensure_open()?;
        if addr == 0 {
            return Err(Error::invalid("cannot register a null address"));
        }
        let location = match location {
            "" | "*" => memory_location(addr, len),
            given => given.to_owned(),
        };
        // SAFETY: forwarded from the caller's contract.
        let region = unsafe { Region::external(addr, len, &location, owner) };
        self.register_region(region)
    }

    /// Registers caller memory for this engine's own transfers only: peers never see it, and
    /// nothing is published (Mooncake's `remote_accessible = false`). Cheap enough to wrap a
    /// single transfer.
    ///
    /// # Safety
    /// As for [`register`](Self::register).
    pub unsafe fn register_private(
        &self,
        addr: usize,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<()> {
        self.ensure_open()?;
        if addr == 0 {
            return Err(Error::invalid("cannot register a null address"));
        }
        // SAFETY: forwarded from the caller's contract.
        let region = unsafe { Region::external(addr, len, "*", owner) }.private();
        let region = self.local.registry.register(region)?;
        if let Some(rdma) = &self.local.rdma {
            if let Err(e) = rdma.register(&region) {
                drop(region);
                let _ = self.local.registry.unregister(addr);
                return Err(e);
            }
        }
        Ok(())
    }

    fn register_region(&self, region: Region) -> Result<()> {
        let control = self.local.shm.as_ref().map(|(control, _)| control);
        let slot = control.and_then(|c| c.claim());
        let registered = self
            .local
            .registry
            .register(region.with_slot(slot))
            .and_then(|region| {
                let Some(rdma) = &self.local.rdma else {
                    return Ok(());
                };
                let keyed = rdma.register(&region);
                if keyed.is_err() {
                    let addr = region.addr();
                    drop(region);
                    let _ = self.local.registry.unregister(addr);
                }
                keyed
            });
        if let Err(e) = registered {
            if let (Some(control), Some(slot)) = (control, slot) {
                control.retire(slot, Duration::ZERO);
                control.release(slot);
            }
            return Err(e);
        }
        self.registrations_changed();
        Ok(())
    }

    /// Unregisters the buffer that starts at `addr`. Fails with `ERR_BUFFER_BUSY` while a
    /// transfer (ours, or a peer's over TCP or shared memory) is using it.
    pub fn unregister(&self, addr: usize) -> Result<()> {
        let found = self.local.registry.starting_at(addr);
        let published = found.as_ref().is_some_and(|r| r.is_remote());
        let shared =
            found.and_then(|region| Some((region.slot()?, region.backing_arena().is_none())));
        let control = self.local.shm.as_ref().map(|(control, _)| control);
        let mut drained = true;
        if let (Some(control), Some((slot, external))) = (control, shared) {
            drained = control.retire(slot, SHM_DRAIN);
            // A peer still copying into caller memory could outlive that memory: refuse. An
            // arena stays mapped in the peer whatever we do, so it may go.
            if !drained && external {
                control.restore(slot);
                return Err(Error::new(
                    ErrorKind::BufferBusy,
                    format!("a same-host peer is still copying at {addr:#x}"),
                ));
            }
        }
        // The RDMA transport holds the region while its keys are out; they go first, unless a
        // transfer holds it too (ours: the registry's, the transport's and this one).
        let rdma = self.local.rdma.as_ref();
        if let Some(rdma) = rdma {
            let holders = self
                .local
                .registry
                .starting_at(addr)
                .map(|r| Arc::strong_count(&r));
            if holders.is_some_and(|n| n > 3) {
                if let (Some(control), Some((slot, _))) = (control, shared) {
                    control.restore(slot);
                }
                return Err(Error::new(
                    ErrorKind::BufferBusy,
                    format!("the buffer at {addr:#x} is in use by a pending transfer"),
                ));
            }
            let _ = rdma.unregister(addr);
        }
        if let Err(e) = self.local.registry.unregister(addr) {
            if let (Some(control), Some((slot, _))) = (control, shared) {
                control.restore(slot);
            }
            if let (Some(rdma), Some(region)) = (rdma, self.local.registry.starting_at(addr)) {
                match rdma.register(&region) {
                    // New keys: peers must see them.
                    Ok(()) => self.registrations_changed(),
                    Err(e) => {
                        tracing::warn!("{addr:#x} stays registered but lost its RDMA keys: {e}")
                    }
                }
            }
            return Err(e);
        }
        if let (Some(control), Some((slot, _)), true) = (control, shared, drained) {
            control.release(slot);
        }
        if published {
            self.registrations_changed();
        }
        Ok(())
    }

    /// Whether `[addr, addr+len)` lies inside one registered buffer.
    pub fn is_registered(&self, addr: usize, len: usize) -> bool {
        self.local.registry.find(addr, len).is_some()
    }

    // ----- segments -----------------------------------------------------------------------

    /// Opens a segment by name (cached after the first call).
    pub async fn open_segment(&self, name: &str) -> Result<SegmentInfo> {
        Ok(self.open(name).await?.info())
    }

    /// The cached view of an opened segment.
    pub fn segment_info(&self, id: SegmentId) -> Option<SegmentInfo> {
        self.segments().get(id).map(|s| s.info())
    }

    async fn open(&self, name: &str) -> Result<Arc<RemoteSegment>> {
        self.ensure_open()?;
        let name = name.trim_start_matches('/');
        if name.is_empty() {
            return Err(Error::invalid("segment name must not be empty"));
        }
        if let Some(segment) = self.segments().by_name(name) {
            return Ok(segment);
        }
        let fetched = self
            .resolver
            .fetch(name, &self.local.desc().encode())
            .await?;
        if !fetched.desc.speaks("tcp") || fetched.desc.tcp_data_port == 0 {
            return Err(Error::new(
                ErrorKind::NotSupportedTransport,
                format!(
                    "segment '{name}' publishes no TCP data port (protocol {})",
                    fetched.desc.protocol
                ),
            ));
        }
        Ok(self
            .segments()
            .insert(fetched, self.config.tcp_force_v1, &self.local.tcp_rails))
    }

    fn segments(&self) -> std::sync::MutexGuard<'_, SegmentTable> {
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- transfers ----------------------------------------------------------------------

    /// Submits a batch. Local ranges and segment handles are checked here and the whole
    /// submission is refused if one is wrong; remote ranges are checked against the target's
    /// descriptor (refreshed once on a miss) and fail only their own task.
    pub fn submit(
        self: &Arc<Self>,
        requests: &[TransferRequest],
        options: SubmitOptions,
    ) -> Result<BatchId> {
        self.ensure_open()?;
        if options.notify.is_some() && requests.is_empty() {
            return Err(Error::invalid(
                "a batch with a notification needs at least one request",
            ));
        }
        let mut resolved = Vec::with_capacity(requests.len());
        {
            let segments = self.segments();
            for (i, request) in requests.iter().enumerate() {
                let segment = segments.get(request.segment).ok_or_else(|| {
                    Error::invalid(format!(
                        "request {i}: unknown segment handle (open the segment first)"
                    ))
                })?;
                if self.config.protocol == Protocol::Shm
                    && (self.shm.is_none() || segment.same_host().is_none())
                {
                    return Err(Error::new(
                        ErrorKind::NotSupportedTransport,
                        format!(
                            "protocol 'shm' needs a target on this host with shared memory enabled; '{}' is not",
                            segment.name
                        ),
                    ));
                }
                let region = self
                    .local
                    .registry
                    .find(request.local_addr, request.len)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::AddressNotRegistered,
                            format!(
                                "request {i}: local range [{:#x}, +{}) is not inside one registered buffer",
                                request.local_addr, request.len
                            ),
                        )
                    })?;
                resolved.push((segment, region));
            }
        }
        let submitted_at = Instant::now();
        let deadline = options.timeout.map(|t| submitted_at + t);
        let progress = BatchProgress::new(requests.len());
        let mut tasks = Vec::with_capacity(requests.len());
        let last = requests.len().saturating_sub(1);
        for (i, (request, (segment, region))) in requests.iter().zip(resolved.iter()).enumerate() {
            let count = slicing::slice_count(request.len, self.config.slice_size);
            let task = Task::new(count as u32, progress.clone());
            tasks.push(task.clone());
            if count == 0 {
                continue;
            }
            let job = Dispatch {
                request: *request,
                segment: segment.clone(),
                region: region.clone(),
                task,
                deadline,
                copy_here: options.copy_on_caller && i == last,
            };
            if segment
                .desc()
                .buffer_containing(request.remote_addr, request.len as u64)
                .is_some()
            {
                self.dispatch(job);
            } else {
                self.dispatch_after_refresh(job);
            }
        }
        let notify = options.notify.map(|message| PendingNotify {
            target: resolved[0].0.name.clone(),
            message,
            sent: OnceCell::new(),
        });
        let has_notify = notify.is_some();
        let batch = Arc::new(Batch {
            tasks,
            progress,
            submitted_at,
            notify,
        });
        let id = self.batches().insert(batch.clone());
        if has_notify {
            // Sent at completion even if nobody awaits the batch.
            let engine = self.clone();
            self.spawn(async move {
                if let Err(e) = engine.settle(&batch).await {
                    tracing::debug!("batch with a notification did not complete: {e}");
                }
            });
        }
        Ok(id)
    }

    /// Waits for a batch to settle. Resolves when every task completed (and a requested
    /// notification was delivered); otherwise fails with the first task's error.
    pub async fn wait(&self, id: BatchId) -> Result<()> {
        let batch = self.batch(id)?;
        self.settle(&batch).await
    }

    /// Per-task status of a batch.
    pub fn status(&self, id: BatchId) -> Result<Vec<TaskReport>> {
        Ok(self.batch(id)?.reports())
    }

    /// When the batch was submitted, and when each task finished (for latency figures).
    pub fn timings(&self, id: BatchId) -> Result<(Instant, Vec<Option<Instant>>)> {
        let batch = self.batch(id)?;
        Ok((
            batch.submitted_at,
            batch.tasks.iter().map(|t| t.finished_at()).collect(),
        ))
    }

    /// Frees a settled batch; `ERR_BATCH_BUSY` while some task is unfinished.
    pub fn free_batch(&self, id: BatchId) -> Result<()> {
        let mut batches = self.batches();
        let batch = batches
            .get(id)
            .ok_or_else(|| Error::invalid("unknown or freed batch id"))?;
        if !batch.progress.is_settled() {
            return Err(Error::new(
                ErrorKind::BatchBusy,
                "the batch still has unfinished tasks",
            ));
        }
        batches.remove(id);
        Ok(())
    }

    /// Frees the batch now if settled, or as soon as it settles.
    pub fn release_batch(self: &Arc<Self>, id: BatchId) {
        let Ok(batch) = self.batch(id) else { return };
        if batch.progress.is_settled() {
            self.batches().remove(id);
            return;
        }
        let engine = self.clone();
        self.spawn(async move {
            batch.progress.settled().await;
            engine.batches().remove(id);
        });
    }

    /// Submits, waits and frees: the one-call transfer.
    pub async fn transfer(
        self: &Arc<Self>,
        requests: &[TransferRequest],
        options: SubmitOptions,
    ) -> Result<()> {
        let id = self.submit(requests, options)?;
        let result = self.wait(id).await;
        self.release_batch(id);
        result
    }

    /// Live batches (submitted and not yet freed).
    pub fn batch_count(&self) -> usize {
        self.batches().len()
    }

    fn batch(&self, id: BatchId) -> Result<Arc<Batch>> {
        self.batches()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::invalid("unknown or freed batch id"))
    }

    fn batches(&self) -> std::sync::MutexGuard<'_, HandleSlab<Arc<Batch>>> {
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn settle(&self, batch: &Batch) -> Result<()> {
        batch.progress.settled().await;
        if let Some(error) = batch.first_error() {
            return Err(error);
        }
        match &batch.notify {
            None => Ok(()),
            Some(notify) => notify
                .sent
                .get_or_init(|| self.send_notify(&notify.target, &notify.message))
                .await
                .clone(),
        }
    }

    fn dispatch(&self, job: Dispatch) {
        let Dispatch {
            request,
            segment,
            region,
            task,
            deadline,
            copy_here,
        } = job;
        let pieces = slicing::slices(request.len, self.config.slice_size);
        let slice_at = |(offset, len): (usize, usize)| Slice {
            op: request.op,
            local_addr: request.local_addr + offset,
            len,
            remote_addr: request.remote_addr + offset as u64,
            region: region.clone(),
            task: task.clone(),
            deadline,
        };
        match self.route(&segment, &request) {
            Ok(Route::Tcp) => {
                self.stats.record(TransportKind::Tcp, request.len);
                tracing::debug!(segment = %segment.name, len = request.len, "request via tcp");
                self.tcp.submit(&segment.tcp, pieces.map(slice_at));
            }
            Ok(Route::Rdma(rdma, peer)) => {
                self.stats.record(TransportKind::Rdma, request.len);
                tracing::debug!(segment = %segment.name, len = request.len, "request via rdma");
                rdma.submit(&peer, pieces.map(slice_at).collect());
            }
            Ok(Route::Shm(transport, peer, remote)) => {
                self.stats.record(TransportKind::Shm, request.len);
                tracing::debug!(segment = %segment.name, len = request.len, path = ?peer.path(&remote.buffer), "request via shared memory");
                let slices = pieces
                    .map(|(offset, len)| ShmSlice {
                        op: request.op,
                        region: region.clone(),
                        local_addr: request.local_addr + offset,
                        len,
                        remote: RemoteRange {
                            addr: remote.addr + offset as u64,
                            ..remote
                        },
                        task: task.clone(),
                        deadline,
                    })
                    .collect();
                transport.submit(&peer, slices, copy_here);
            }
            Err(error) => {
                for _ in pieces {
                    task.slice_failed(error.clone());
                }
            }
        }
    }

    /// Under `auto`: shared memory when the target is on this host and the buffer is
    /// reachable that way, else RDMA when both ends have it and the buffer has remote keys,
    /// else TCP. A forced protocol takes its own path or fails.
    fn route(&self, segment: &RemoteSegment, request: &TransferRequest) -> Result<Route<'_>> {
        let protocol = self.config.protocol;
        let mut unreachable = None;
        if matches!(protocol, Protocol::Auto | Protocol::Shm) {
            if let (Some(transport), Some(target)) = (&self.shm, segment.same_host()) {
                let desc = segment.desc();
                let buffer = desc.buffer_containing(request.remote_addr, request.len as u64);
                let shared = buffer.and_then(|b| Some((b.addr, shm_buffer(b)?)));
                if let Some((buffer_addr, buffer)) = shared {
                    match transport.peer(&target) {
                        Ok(peer) if peer.path(&buffer).is_some() => {
                            let remote = RemoteRange {
                                buffer,
                                buffer_addr,
                                addr: request.remote_addr,
                            };
                            return Ok(Route::Shm(transport, peer, remote));
                        }
                        Ok(_) => {
                            tracing::debug!(segment = %segment.name, "buffer outside arenas and process_vm not permitted; using tcp")
                        }
                        Err(e) => {
                            tracing::debug!(segment = %segment.name, "same-host peer unreachable ({e}); using tcp");
                            unreachable = Some(e);
                        }
                    }
                }
            }
            if self.config.protocol == Protocol::Shm {
                return Err(unreachable.unwrap_or_else(|| {
                    Error::new(
                        ErrorKind::NotSupportedTransport,
                        format!(
                            "no shared-memory path to [{:#x}, +{}) in '{}'",
                            request.remote_addr, request.len, segment.name
                        ),
                    )
                }));
            }
        }
        if matches!(protocol, Protocol::Auto | Protocol::Rdma) {
            if let (Some(rdma), Some(peer)) = (&self.local.rdma, segment.rdma()) {
                let keyed = peer
                    .buffer_index(request.remote_addr)
                    .is_some_and(|i| !peer.buffers[i].rkeys.is_empty());
                if keyed {
                    return Ok(Route::Rdma(rdma, peer));
                }
            }
            if protocol == Protocol::Rdma {
                return Err(Error::new(
                    ErrorKind::NotSupportedTransport,
                    format!(
                        "no RDMA path to [{:#x}, +{}) in '{}'",
                        request.remote_addr, request.len, segment.name
                    ),
                ));
            }
        }
        Ok(Route::Tcp)
    }

    /// The rails to every peer used so far: TCP ones by the peer's first data address, RDMA
    /// ones by the peer's name and the two memory locations.
    pub fn rail_stats(&self) -> Vec<(String, Vec<RailStats>)> {
        let mut all = self.tcp.rail_stats();
        if let Some(rdma) = &self.local.rdma {
            let mut by_peer: Vec<(String, Vec<RailStats>)> = Vec::new();
            for rail in rdma.all_rails() {
                let key = format!(
                    "rdma {} ({} -> {})",
                    rail.peer, rail.local_location, rail.remote_location
                );
                match by_peer.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, rails)) => rails.push(rail.stats),
                    None => by_peer.push((key, vec![rail.stats])),
                }
            }
            all.extend(by_peer);
        }
        all
    }

    /// Requests and bytes submitted through each transport since start.
    pub fn stats(&self) -> Vec<(TransportKind, u64, u64)> {
        self.stats.snapshot()
    }

    fn dispatch_after_refresh(self: &Arc<Self>, job: Dispatch) {
        let engine = self.clone();
        self.spawn(async move {
            let local_desc = engine.local.desc().encode();
            let refreshed = tokio::select! {
                _ = engine.shutdown.cancelled() => Err(Error::closed("the transfer engine")),
                fetched = engine.resolver.fetch(&job.segment.name, &local_desc) => fetched,
            };
            let (addr, len) = (job.request.remote_addr, job.request.len);
            let outcome = refreshed.and_then(|fetched| {
                job.segment.set_desc(fetched.desc);
                match job.segment.desc().buffer_containing(addr, len as u64) {
                    Some(_) => Ok(()),
                    None => Err(Error::new(
                        ErrorKind::AddressNotRegistered,
                        format!(
                            "remote range [{addr:#x}, +{len}) is not inside one buffer of segment '{}'",
                            job.segment.name
                        ),
                    )),
                }
            });
            match outcome {
                Ok(()) => engine.dispatch(job),
                Err(error) => {
                    for _ in 0..slicing::slice_count(len, engine.config.slice_size) {
                        job.task.slice_failed(error.clone());
                    }
                }
            }
        });
    }

    // ----- notifications ------------------------------------------------------------------

    /// Sends `message` to the segment named `target`.
    pub async fn send_notify(&self, target: &str, message: &str) -> Result<()> {
        let segment = self.open(target).await?;
        let body = serde_json::to_string(&NotifyMessage {
            name: self.local.name.clone(),
            notify_msg: message.to_owned(),
        })
        .expect("notify messages serialize");
        let reply = handshake::request(
            &segment.rpc_addr,
            MessageType::Notify,
            &body,
            self.config.connect_timeout,
            self.config.handshake_max_length,
        )
        .await?;
        let reply: NotifyMessage = serde_json::from_str(&reply).map_err(|e| {
            Error::new(
                ErrorKind::MalformedJson,
                format!("notify reply from {target}: {e}"),
            )
        })?;
        if reply.notify_msg.is_empty() {
            return Err(Error::new(
                ErrorKind::Metadata,
                format!("{target} rejected the notification"),
            ));
        }
        Ok(())
    }

    /// Delivers incoming notifications to `listener` instead of queueing them; `None` goes
    /// back to queueing. Queued notifications are handed to a new listener at once.
    pub fn set_notify_listener(&self, listener: Option<Arc<dyn Fn(Notification) + Send + Sync>>) {
        let backlog = listener
            .as_ref()
            .map(|_| self.take_notifies())
            .unwrap_or_default();
        *self
            .local
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = listener.clone();
        if let Some(listener) = listener {
            backlog.into_iter().for_each(|n| listener(n));
        }
    }

    /// Drains queued notifications (Mooncake's `getNotifies`).
    pub fn take_notifies(&self) -> Vec<Notification> {
        std::mem::take(&mut *self.local.queued.lock().unwrap_or_else(|p| p.into_inner()))
    }

    // ----- lifecycle ----------------------------------------------------------------------

    /// Closes the engine: stops both listeners, fails every pending transfer with
    /// `ERR_CLOSED`, removes published metadata and joins every background task. Registered
    /// memory is released once the last transfer that used it is gone. Idempotent.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            self.tracker.wait().await;
            return;
        }
        self.shutdown.cancel();
        if let Some((control, _)) = &self.local.shm {
            control.retire_all();
        }
        if let Some(server) = &self.shm_server {
            server.close().await;
        }
        self.handshake.close().await;
        self.data.close().await;
        self.tcp.close().await;
        if let Some(rdma) = &self.local.rdma {
            rdma.close().await;
        }
        if let Some(shm) = &self.shm {
            shm.close().await;
        }
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(publisher) = &self.publisher {
            for key in [
                publisher.keys.segment(&self.local.name),
                publisher.keys.rpc_meta(&self.local.name),
            ] {
                if let Err(e) = publisher.store.delete(&key).await {
                    tracing::warn!("could not remove {key} on close: {e}");
                }
            }
        }
        self.local.registry.clear();
        self.set_notify_listener(None);
        tracing::info!(segment = %self.local.name, "transfer engine closed");
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Publishes the descriptor now and waits for the store to take it (store mode; a no-op
    /// in P2P mode, where peers ask for it directly).
    pub async fn publish_now(&self) -> Result<()> {
        match &self.publisher {
            Some(publisher) => publisher.publish(&self.local).await,
            None => Ok(()),
        }
    }

    fn spawn_publisher(&self) {
        let Some(publisher) = self.publisher.clone() else {
            return;
        };
        let (local, stop) = (self.local.clone(), self.shutdown.clone());
        self.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = publisher.dirty.notified() => {}
                }
                if let Err(e) = publisher.publish(&local).await {
                    tracing::warn!("could not publish the segment descriptor: {e}");
                }
            }
        });
    }

    /// Runs a background task on the engine's runtime; `close` joins it.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tracker.spawn_on(task, &self.runtime);
    }

    fn ensure_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(Error::closed("the transfer engine"))
        } else {
            Ok(())
        }
    }

    fn registrations_changed(&self) {
        if let Some(publisher) = &self.publisher {
            publisher.dirty.notify_one();
        }
    }
}

impl Drop for TransferEngine {
    /// An engine dropped without `close` stops its tasks and lets go of its notification
    /// listener (which may be what keeps a Node process alive); published metadata stays.
    fn drop(&mut self) {
        self.shutdown.cancel();
        *self
            .local
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The verbs provider for this host's NICs: libibverbs in a build with RDMA, when discovery
/// found a usable NIC.
fn host_verbs(topology: &Topology) -> Option<Arc<dyn Provider>> {
    #[cfg(feature = "rdma")]
    if topology.rdma_nics.iter().any(|nic| nic.is_usable()) {
        return Some(Arc::new(mooncake_rdma::ibverbs::IbvProvider::new()));
    }
    let _ = topology;
    None
}

/// The RDMA transport over the matrix's devices, unless the protocol rules RDMA out. Without
/// a provider or a device, `rdma` fails and `auto` goes on without RDMA.
fn start_rdma(
    config: &EngineConfig,
    verbs: Option<Arc<dyn Provider>>,
    name: &str,
    matrix: &PriorityMatrix,
) -> Result<Option<Arc<RdmaTransport>>> {
    if matches!(config.protocol, Protocol::Tcp | Protocol::Shm) {
        return Ok(None);
    }
    let devices = matrix.devices();
    let started = match verbs {
        Some(verbs) if !devices.is_empty() => {
            let by_name = matrix
                .iter()
                .map(|(location, entry)| {
                    let entry = (entry.preferred.clone(), entry.available.clone());
                    (location.to_owned(), entry)
                })
                .collect();
            let mut options = RdmaOptions::new(name, devices, by_name);
            options.config.retry_cnt = config.retry_budget;
            let connector = Arc::new(HandshakeConnector {
                connect_timeout: config.connect_timeout,
                max_frame: config.handshake_max_length,
            });
            RdmaTransport::new(verbs, options, connector).map(Arc::new)
        }
        _ => Err(Error::new(
            ErrorKind::DeviceNotFound,
            "no RDMA device: this build has no RDMA support or the host no usable NIC",
        )),
    };
    match started {
        Ok(rdma) => Ok(Some(rdma)),
        Err(e) if config.protocol == Protocol::Rdma => Err(e),
        Err(e) => {
            tracing::debug!("RDMA not in use: {e}");
            Ok(None)
        }
    }
}

/// Discovers the host (devices limited to `config.devices`) and settles the priority matrix:
/// the given one, else `MC_CUSTOM_TOPO_JSON`'s, else the discovered one.
fn discover(config: &EngineConfig) -> Result<(Topology, PriorityMatrix)> {
    let options = DiscoverOptions {
        filters: config.devices.clone(),
        ..DiscoverOptions::default()
    };
    let host = Topology::discover(&options).unwrap_or_else(|e| {
        tracing::warn!("topology discovery failed ({e}); continuing without devices");
        Topology::default()
    });
    let mut matrix = match &config.topology_json {
        Some(json) => PriorityMatrix::parse(json)?,
        None => match PriorityMatrix::from_env() {
            Some(loaded) => loaded?,
            None => host.matrix(),
        },
    };
    if let Some(devices) = &config.devices {
        matrix.restrict(devices);
    }
    Ok((host, matrix))
}

/// Where a request goes.
enum Route<'a> {
    Tcp,
    Rdma(&'a RdmaTransport, Arc<RdmaPeer>),
    Shm(&'a ShmTransport, Arc<ShmPeer>, RemoteRange),
}

/// One request on its way to a transport.
struct Dispatch {
    request: TransferRequest,
    segment: Arc<RemoteSegment>,
    region: Arc<Region>,
    task: Arc<Task>,
    deadline: Option<Instant>,
    /// Whether the submitting thread copies the last same-host slice itself.
    copy_here: bool,
}
