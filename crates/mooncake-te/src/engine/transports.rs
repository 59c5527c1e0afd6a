//! The transports behind one door: each says what it can reach and carries slices there, and
//! the [`Router`] picks one per request.
//!
//! - [`InProcess`]: this engine's own memory, a copy;
//! - [`SharedMemory`]: an engine on this host, through its mapped arenas;
//! - [`Rdma`]: a peer whose buffers publish remote keys;
//! - [`Tcp`]: anyone, over Mooncake's TCP data protocol.

use super::*;
use mooncake_metadata::store::BoxFuture;
use mooncake_transport::copy::copy_bytes;
use mooncake_transport::shm::ShmBuffer;

/// One way of moving slices.
pub(crate) trait Transport: Send + Sync {
    /// What its traffic counts as.
    fn kind(&self) -> TransportKind;

    /// Whether it carries `request` to `segment`: `Ok(false)` when the target is not its kind,
    /// `Err` when it is but cannot be reached now. Never blocks.
    fn reaches(&self, segment: &RemoteSegment, request: &TransferRequest) -> Result<bool>;

    /// What has to happen before [`Transport::reaches`] can answer for `request` to `segment`
    /// (a connection to make, say), if anything: the router has it run, without blocking a
    /// thread, and routes the request again afterwards.
    fn prepare(
        &self,
        _segment: &RemoteSegment,
        _request: &TransferRequest,
    ) -> Option<BoxFuture<'static, ()>> {
        None
    }

    /// Carries the slices of `request`; each reports to its task exactly once. With
    /// `copy_here`, the calling thread may carry the last slice itself.
    fn submit(
        &self,
        segment: &RemoteSegment,
        request: &TransferRequest,
        slices: Vec<Slice>,
        copy_here: bool,
    );

    /// Stops: every slice still pending settles.
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Where a request goes.
pub(crate) enum Route<'a> {
    /// To this transport, now.
    Ready(&'a Arc<dyn Transport>),
    /// Nowhere yet: route it again once this is done.
    After(BoxFuture<'static, ()>),
}

/// The transports in the order `auto` tries them, and the protocol that limits the choice.
pub(crate) struct Router {
    protocol: Protocol,
    transports: Vec<Arc<dyn Transport>>,
}

impl Router {
    pub(crate) fn new(protocol: Protocol, transports: Vec<Arc<dyn Transport>>) -> Self {
        Self {
            protocol,
            transports,
        }
    }

    /// Under `auto`: this engine's own memory, then an engine on this host, then RDMA, then
    /// TCP. A forced protocol takes its own transport (shared memory also covers this engine's
    /// own memory) or fails. Never blocks: a transport that needs something done before it can
    /// answer hands that back ([`Route::After`]), unless `prepared` says it was done already.
    pub(crate) fn route(
        &self,
        segment: &RemoteSegment,
        request: &TransferRequest,
        prepared: bool,
    ) -> Result<Route<'_>> {
        let allowed = |kind: TransportKind| match self.protocol {
            Protocol::Auto => true,
            Protocol::Tcp => kind == TransportKind::Tcp,
            Protocol::Shm => kind == TransportKind::Shm,
            Protocol::Rdma => kind == TransportKind::Rdma,
        };
        let mut unreachable = None;
        for transport in self.transports.iter().filter(|t| allowed(t.kind())) {
            if !prepared {
                if let Some(first) = transport.prepare(segment, request) {
                    return Ok(Route::After(first));
                }
            }
            match transport.reaches(segment, request) {
                Ok(true) => return Ok(Route::Ready(transport)),
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(segment = %segment.name, kind = transport.kind().name(), "unreachable ({e}); trying the next transport");
                    unreachable = Some(e);
                }
            }
        }
        Err(unreachable.unwrap_or_else(|| {
            Error::new(
                ErrorKind::NotSupportedTransport,
                format!(
                    "no {} path to [{:#x}, +{}) in '{}'",
                    self.protocol.name(),
                    request.remote_addr,
                    request.len,
                    segment.name
                ),
            )
        }))
    }

    /// Every transport, for closing.
    pub(crate) fn transports(&self) -> &[Arc<dyn Transport>] {
        &self.transports
    }
}

/// Mooncake's TCP data protocol: reaches every segment.
pub(crate) struct Tcp(pub(crate) Arc<TcpClient>);

impl Transport for Tcp {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn reaches(&self, _: &RemoteSegment, _: &TransferRequest) -> Result<bool> {
        Ok(true)
    }

    fn submit(&self, segment: &RemoteSegment, _: &TransferRequest, slices: Vec<Slice>, _: bool) {
        self.0.submit(&segment.tcp, slices);
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.close())
    }
}

/// RDMA: reaches a peer whose buffer publishes remote keys.
pub(crate) struct Rdma(pub(crate) Arc<RdmaTransport>);

impl Transport for Rdma {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn reaches(&self, segment: &RemoteSegment, request: &TransferRequest) -> Result<bool> {
        Ok(segment.rdma().is_some_and(|peer| {
            peer.buffer_index(request.remote_addr)
                .is_some_and(|i| !peer.buffers[i].rkeys.is_empty())
        }))
    }

    fn submit(
        &self,
        segment: &RemoteSegment,
        request: &TransferRequest,
        slices: Vec<Slice>,
        _: bool,
    ) {
        match segment.rdma() {
            Some(peer) => self.0.submit(&peer, slices),
            None => fail_all(
                slices,
                request,
                "the segment no longer publishes RDMA devices",
            ),
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.close())
    }
}

/// Shared memory: reaches an engine on this host whose buffer is one of its arenas (or any
/// buffer, where `process_vm_*` is permitted).
pub(crate) struct SharedMemory(pub(crate) Arc<ShmTransport>);

impl SharedMemory {
    /// The owner and the buffer's shared-memory description, when `request` names one of an
    /// engine on this host.
    fn target(
        segment: &RemoteSegment,
        request: &TransferRequest,
    ) -> Option<(ShmTarget, u64, ShmBuffer)> {
        let target = segment.same_host()?;
        let desc = segment.desc();
        let buffer = desc.buffer_containing(request.remote_addr, request.len as u64)?;
        Some((target, buffer.addr, shm_buffer(buffer)?))
    }

    /// The connection to the owner comes from [`Transport::prepare`]: this only looks it up.
    fn path(
        &self,
        segment: &RemoteSegment,
        request: &TransferRequest,
    ) -> Result<Option<(Arc<ShmPeer>, RemoteRange)>> {
        let Some((target, buffer_addr, buffer)) = Self::target(segment, request) else {
            return Ok(None);
        };
        let peer = self.0.peer(&target)?;
        if peer.path(&buffer).is_none() {
            tracing::debug!(segment = %segment.name, "buffer outside arenas and process_vm not permitted");
            return Ok(None);
        }
        let remote = RemoteRange {
            buffer,
            buffer_addr,
            addr: request.remote_addr,
        };
        Ok(Some((peer, remote)))
    }
}

impl Transport for SharedMemory {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn reaches(&self, segment: &RemoteSegment, request: &TransferRequest) -> Result<bool> {
        Ok(self.path(segment, request)?.is_some())
    }

    fn prepare(
        &self,
        segment: &RemoteSegment,
        request: &TransferRequest,
    ) -> Option<BoxFuture<'static, ()>> {
        let (target, _, _) = Self::target(segment, request)?;
        if self.0.is_connected(&target) {
            return None;
        }
        let shm = self.0.clone();
        Some(Box::pin(async move {
            // A failure stays with the transport, for `reaches` to report.
            if let Err(e) = shm.connect(&target).await {
                tracing::debug!(socket = %target.socket, "no shared-memory connection: {e}");
            }
        }))
    }

    fn submit(
        &self,
        segment: &RemoteSegment,
        request: &TransferRequest,
        slices: Vec<Slice>,
        copy_here: bool,
    ) {
        let (peer, remote) = match self.path(segment, request) {
            Ok(Some(path)) => path,
            Ok(None) => return fail_all(slices, request, "the shared-memory path went away"),
            Err(e) => {
                for slice in slices {
                    slice.task.slice_failed(e.clone());
                }
                return;
            }
        };
        let slices = slices
            .into_iter()
            .map(|slice| ShmSlice {
                op: slice.op,
                region: slice.region,
                local_addr: slice.local_addr,
                len: slice.len,
                remote: RemoteRange {
                    addr: slice.remote_addr,
                    ..remote
                },
                task: slice.task,
                deadline: slice.deadline,
            })
            .collect();
        self.0.submit(&peer, slices, copy_here);
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.0.close())
    }
}

/// This engine's own memory: a copy between two of its registered regions. Counted as shared
/// memory.
pub(crate) struct InProcess {
    pub(crate) local: Arc<Local>,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl InProcess {
    fn is_own(&self, segment: &RemoteSegment) -> bool {
        segment.name == self.local.name && segment.desc().tcp_data_port == self.local.data_port
    }

    /// Copies one slice; reports it.
    fn carry(registry: &MemoryRegistry, slice: Slice) {
        if slice.deadline.is_some_and(|d| d <= Instant::now()) {
            slice.task.slice_failed(Error::new(
                ErrorKind::Timeout,
                "the request missed its deadline",
            ));
            return;
        }
        let target = usize::try_from(slice.remote_addr)
            .ok()
            .and_then(|addr| Some((addr, registry.find_remote(addr, slice.len)?)));
        let Some((remote_addr, _remote)) = target else {
            slice.task.slice_failed(Error::new(
                ErrorKind::AddressNotRegistered,
                format!(
                    "{} bytes at {:#x} are not inside one registered buffer",
                    slice.len, slice.remote_addr
                ),
            ));
            return;
        };
        let (src, dst) = match slice.op {
            Opcode::Write => (slice.local_addr, remote_addr),
            Opcode::Read => (remote_addr, slice.local_addr),
        };
        let apart = src.abs_diff(dst) >= slice.len;
        // SAFETY: both ranges lie inside registered regions (the engine checked the local one,
        // `find_remote` the other), which `slice.region` and `_remote` keep mapped until the
        // copy is done; the transfer rule keeps JavaScript off them until the slice settles.
        // Ranges of one region may overlap: those are moved, not copied.
        unsafe {
            if apart {
                copy_bytes(src as *const u8, dst as *mut u8, slice.len);
            } else {
                std::ptr::copy(src as *const u8, dst as *mut u8, slice.len);
            }
        }
        slice.task.slice_done(slice.len);
    }
}

impl Transport for InProcess {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn reaches(&self, segment: &RemoteSegment, request: &TransferRequest) -> Result<bool> {
        Ok(self.is_own(segment)
            && usize::try_from(request.remote_addr)
                .is_ok_and(|addr| self.local.registry.find_remote(addr, request.len).is_some()))
    }

    fn submit(
        &self,
        _: &RemoteSegment,
        _: &TransferRequest,
        mut slices: Vec<Slice>,
        copy_here: bool,
    ) {
        let here = if copy_here { slices.pop() } else { None };
        if !slices.is_empty() {
            let local = self.local.clone();
            self.runtime.spawn_blocking(move || {
                for slice in slices {
                    Self::carry(&local.registry, slice);
                }
            });
        }
        if let Some(slice) = here {
            Self::carry(&self.local.registry, slice);
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

fn fail_all(slices: Vec<Slice>, request: &TransferRequest, why: &str) {
    let error = Error::new(
        ErrorKind::NotSupportedTransport,
        format!("[{:#x}, +{}): {why}", request.remote_addr, request.len),
    );
    for slice in slices {
        slice.task.slice_failed(error.clone());
    }
}
