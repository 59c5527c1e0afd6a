//! The engine.
//!
//! - this file: the engine's types, identity, segments and lifecycle;
//! - [`startup`]: discovery, transports, listeners;
//! - [`local`]: the published descriptor and the handshake listener's answers;
//! - [`memory`]: registered memory;
//! - [`batches`]: submission and completion;
//! - [`transports`]: the transports behind one trait, and the router that picks one;
//! - [`routing`]: requests cut into slices and dispatched;
//! - [`metrics`]: the engine's Prometheus metrics;
//! - [`notify`]: notifications between segments.

mod batches;
mod local;
mod memory;
mod metrics;
mod notify;
mod routing;
mod startup;
mod transports;

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
use mooncake_rdma::verbs::Provider;
use mooncake_rdma::{HandshakeConnector, RdmaOptions, RdmaTransport};
use mooncake_topology::{memory_location, DiscoverOptions, PriorityMatrix, Topology};
use mooncake_transport::rail::{RailPolicy, RailStats};
use mooncake_transport::shm::{
    self, ControlTable, RemoteRange, ShmPeer, ShmServer, ShmSlice, ShmTarget, ShmTransport,
};
use mooncake_transport::slicing;
use mooncake_transport::tcp::{TcpClient, TcpClientConfig, TcpServer};
use mooncake_transport::{
    Arena, BatchProgress, MemoryRegistry, Opcode, Region, Slice, Task, TaskStatus,
};
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
use crate::stats::{Routes, TransportKind, TransportStats};

use self::local::*;
use self::routing::*;
use self::transports::{InProcess, Rdma, Route, Router, SharedMemory, Tcp, Transport};

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
    /// request, the hand-off and the wake-ups cost more than the copy. Only a copy that needs
    /// nothing from the owner first: the first use of a peer or of one of its arenas goes
    /// through a copy thread all the same. For callers on an async worker; never on a thread
    /// that must not block (JavaScript's).
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

/// A Mooncake transfer engine: one segment, its registered memory, and batched one-sided
/// transfers to other segments.
pub struct TransferEngine {
    config: EngineConfig,
    local: Arc<Local>,
    resolver: Resolver,
    handshake: HandshakeServer,
    data: TcpServer,
    tcp: Arc<TcpClient>,
    shm_server: Option<ShmServer>,
    shm: Option<Arc<ShmTransport>>,
    router: Router,
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
        for transport in self.router.transports() {
            transport.close().await;
        }
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(publisher) = &self.publisher {
            let remove = |key: String| async move {
                if let Err(e) = publisher.store.delete(&key).await {
                    tracing::warn!("could not remove {key} on close: {e}");
                }
            };
            // Together: against a store that is down, close waits out one timeout, not two.
            tokio::join!(
                remove(publisher.keys.segment(&self.local.name)),
                remove(publisher.keys.rpc_meta(&self.local.name)),
            );
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
