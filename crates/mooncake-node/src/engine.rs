//! `TransferEngine` and `Batch`.

use std::sync::Arc;
use std::time::Duration;

use mooncake_common::config::Protocol;
use mooncake_common::{EngineConfig, Handle};
use mooncake_te::engine::SubmitOptions;
use mooncake_te::{BatchId, Notification, Opcode, TransferEngine, TransferRequest};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

use crate::convert::{bigint_u64, to_len};
use crate::error::{invalid, to_napi, to_napi_reason, IntoNapi};
use mooncake_common::auth::ClusterToken;

/// Options of `TransferEngine.create`.
#[napi(object)]
pub struct EngineOptions {
    /// `host` or `host:port`; in P2P mode the segment name becomes `host:<rpc port>`.
    pub local_server_name: String,
    /// `P2PHANDSHAKE`, `http://host:port/metadata` or `redis://host:port`.
    pub metadata: String,
    /// `auto`, `tcp`, `shm` or `rdma`.
    pub protocol: Option<String>,
    /// Offer memory to same-host peers and map theirs (default true).
    pub shared_memory: Option<bool>,
    /// Address peers use to reach this engine.
    pub ip_or_host_name: Option<String>,
    /// Handshake port (default: random in 15000-17000).
    pub rpc_port: Option<u32>,
    /// TCP data port (default: random in 15000-17000).
    pub tcp_data_port: Option<u32>,
    /// Persistent connections per peer (1-16, default 4).
    pub tcp_lanes_per_peer: Option<u32>,
    /// Largest piece a request is cut into (default 1 MiB).
    pub slice_size: Option<u32>,
    /// Connect timeout in ms (default 5000).
    pub connect_timeout_ms: Option<u32>,
    /// Stall timeout of a data exchange in ms (default 30000).
    pub io_timeout_ms: Option<u32>,
    /// Metadata key prefix component.
    pub cluster_id: Option<String>,
    /// Devices to use: RDMA NICs, and the network interfaces TCP rails leave through.
    pub devices: Option<Vec<String>>,
    /// A priority matrix in Mooncake's JSON that replaces the discovered one.
    pub topology: Option<String>,
    /// Attempts a slice may make beyond its first, across rails (1-127, default 9).
    pub retry_count: Option<u32>,
    /// The cluster's shared secret (at least 16 characters; default `MC_CLUSTER_TOKEN`; an
    /// empty string means none).
    pub cluster_token: Option<String>,
}

impl EngineOptions {
    pub(crate) fn into_config(self) -> Result<EngineConfig> {
        let mut config = EngineConfig::from_env(self.local_server_name, self.metadata);
        if let Some(protocol) = self.protocol {
            config.protocol = Protocol::parse(&protocol).napi()?;
        }
        if let Some(host) = self.ip_or_host_name {
            config.advertised_host = Some(host);
        }
        let port = |p: u32, what: &str| {
            u16::try_from(p).map_err(|_| invalid(format!("{what} must be within 0-65535")))
        };
        config.rpc_port = self
            .rpc_port
            .map(|p| port(p, "rpcPort"))
            .transpose()?
            .filter(|p| *p != 0);
        config.tcp_data_port = self
            .tcp_data_port
            .map(|p| port(p, "tcpDataPort"))
            .transpose()?
            .filter(|p| *p != 0);
        if let Some(lanes) = self.tcp_lanes_per_peer {
            config.tcp_lanes_per_peer = lanes as usize;
        }
        if let Some(size) = self.slice_size {
            config.slice_size = size as usize;
        }
        if let Some(ms) = self.connect_timeout_ms {
            config.connect_timeout = Duration::from_millis(u64::from(ms.max(1)));
        }
        if let Some(ms) = self.io_timeout_ms {
            config.io_timeout = Duration::from_millis(u64::from(ms.max(1)));
        }
        if let Some(id) = self.cluster_id {
            config.cluster_id = Some(id);
        }
        if let Some(shared) = self.shared_memory {
            config.shared_memory = shared;
        }
        if let Some(devices) = self.devices {
            config.devices = Some(devices);
        }
        config.topology_json = self.topology;
        if let Some(retries) = self.retry_count {
            if !(1..=127).contains(&retries) {
                return Err(invalid("retryCount must be within 1-127"));
            }
            config.retry_budget = retries;
        }
        if let Some(token) = self.cluster_token {
            config.cluster_token = ClusterToken::resolve(Some(&token)).napi()?;
        }
        config.validate().napi()?;
        Ok(config)
    }
}

/// A notification as JavaScript sees it.
#[napi(object)]
#[derive(Clone)]
pub struct NotifyEvent {
    /// Sender's segment name.
    pub from: String,
    /// Payload.
    pub message: String,
}

/// One buffer of an opened segment.
#[napi(object)]
pub struct BufferInfo {
    /// Address to target.
    pub address: BigInt,
    /// Length in bytes.
    pub length: f64,
    /// `cpu:N`, `*`, or the segment name for Mooncake TCP peers.
    pub location: String,
}

/// An opened segment.
#[napi(object)]
pub struct SegmentInfo {
    /// Handle used by requests.
    pub id: BigInt,
    /// Name.
    pub name: String,
    /// Registered buffers.
    pub buffers: Vec<BufferInfo>,
}

/// One rail: a (local device, remote device) pair and what it carried.
#[napi(object)]
pub struct RailInfo {
    /// Local interface or NIC (`*` for the routing table's choice).
    pub local: String,
    /// The peer's device or address.
    pub remote: String,
    /// In the preferred tier.
    pub preferred: bool,
    /// Selection may pick it now.
    pub usable: bool,
    /// Bytes handed to it and not yet settled.
    pub inflight_bytes: f64,
    /// Bytes carried.
    pub bytes: f64,
    /// Slices carried.
    pub slices: f64,
    /// Slices that failed on it.
    pub failures: f64,
    /// Times it was paused.
    pub pauses: f64,
    /// Slices it carried after they failed on another rail.
    pub rescued: f64,
}

/// The rails to one peer.
#[napi(object)]
pub struct PeerRails {
    /// The peer's first data address.
    pub peer: String,
    /// Its rails.
    pub rails: Vec<RailInfo>,
}

/// The host's topology, as `mooncake topology` prints it (`json`: as JSON, with the matrix).
/// `root` points discovery at another sysfs tree.
#[napi(catch_unwind)]
pub fn describe_topology(root: Option<String>, json: Option<bool>) -> Result<String> {
    let mut options = mooncake_topology::DiscoverOptions::from_env();
    if let Some(root) = root {
        options.root = root.into();
    }
    let topology = mooncake_topology::Topology::discover(&options).napi()?;
    if json.unwrap_or(false) {
        let report = serde_json::json!({
            "topology": topology,
            "priority_matrix": topology.matrix(),
        });
        return Ok(report.to_string());
    }
    Ok(topology.to_string())
}

/// One request, as the facade hands it over.
#[napi(object)]
pub struct NativeRequest {
    /// `read` or `write`.
    pub op: String,
    /// Segment handle from `openSegment`.
    pub segment: BigInt,
    /// Local registered memory.
    pub local: Uint8Array,
    /// Offset into `local`.
    pub local_offset: f64,
    /// Address in the target's memory.
    pub remote_address: BigInt,
    /// Bytes to move.
    pub length: f64,
}

/// Options of one submission.
#[napi(object)]
pub struct NativeSubmitOptions {
    /// Sent to the first request's segment when the batch completes.
    pub notify: Option<String>,
    /// Deadline for every request, in ms.
    pub timeout_ms: Option<f64>,
}

/// Traffic through one transport.
#[napi(object)]
pub struct TransportStat {
    /// `tcp`, `shm` or `rdma`.
    pub transport: String,
    /// Requests submitted through it.
    pub requests: f64,
    /// Bytes submitted through it.
    pub bytes: f64,
}

/// Status of one task.
#[napi(object)]
pub struct TaskStatusInfo {
    /// `WAITING`, `COMPLETED`, `FAILED`, `TIMEOUT`, `CANCELED`, ...
    pub status: String,
    /// Mooncake's numeric status (0-6).
    pub code: u32,
    /// Bytes that arrived.
    pub transferred_bytes: f64,
    /// `[ERR_...] message` when the task did not complete.
    pub error: Option<String>,
}

type NotifyCallback = ThreadsafeFunction<NotifyEvent, (), NotifyEvent, Status, false>;

/// A running engine.
#[napi]
pub struct NativeEngine {
    inner: Arc<TransferEngine>,
}

/// Starts an engine. `on_notify` receives notifications; it also keeps the process alive
/// until `close()`, like a listening server.
#[napi(ts_args_type = "options: EngineOptions, onNotify: (event: NotifyEvent) => void")]
pub async fn create_engine(
    options: EngineOptions,
    on_notify: NotifyCallback,
) -> Result<NativeEngine> {
    crate::init_logging();
    let config = options.into_config()?;
    let engine = TransferEngine::start(config).await.napi()?;
    let callback = Arc::new(on_notify);
    engine.set_notify_listener(Some(Arc::new(move |n: Notification| {
        callback.call(
            NotifyEvent {
                from: n.from,
                message: n.message,
            },
            ThreadsafeFunctionCallMode::NonBlocking,
        );
    })));
    Ok(NativeEngine { inner: engine })
}

#[napi]
impl NativeEngine {
    /// The name peers open.
    #[napi(getter)]
    pub fn segment_name(&self) -> String {
        self.inner.segment_name().to_owned()
    }

    /// Handshake port.
    #[napi(getter)]
    pub fn rpc_port(&self) -> u32 {
        u32::from(self.inner.rpc_port())
    }

    /// TCP data port.
    #[napi(getter)]
    pub fn data_port(&self) -> u32 {
        u32::from(self.inner.data_port())
    }

    /// Allocates registered engine memory, returned as a Buffer that stays valid for as long as
    /// JavaScript holds it (even after `close`).
    #[napi(catch_unwind)]
    pub fn allocate<'env>(&self, env: &'env Env, size: f64) -> Result<BufferSlice<'env>> {
        allocate(env, &self.inner, size)
    }

    /// Registers caller memory; it is referenced until `unregister`.
    #[napi(catch_unwind)]
    pub fn register(&self, buffer: Uint8Array, location: Option<String>) -> Result<()> {
        register(&self.inner, buffer, location)
    }

    /// Unregisters a buffer passed to `register` or returned by `allocate`.
    #[napi(catch_unwind)]
    pub fn unregister(&self, buffer: &[u8]) -> Result<()> {
        self.inner.unregister(buffer.as_ptr() as usize).napi()
    }

    /// Address of the first byte of `buffer`, as peers target it.
    #[napi(catch_unwind)]
    pub fn address_of(&self, buffer: &[u8]) -> BigInt {
        BigInt::from(buffer.as_ptr() as u64)
    }

    /// Whether `buffer` lies inside registered memory.
    #[napi(catch_unwind)]
    pub fn is_registered(&self, buffer: &[u8]) -> bool {
        self.inner
            .is_registered(buffer.as_ptr() as usize, buffer.len())
    }

    /// Opens a segment by name.
    #[napi]
    pub async fn open_segment(&self, name: String) -> Result<SegmentInfo> {
        let info = self.inner.open_segment(&name).await.napi()?;
        Ok(SegmentInfo {
            id: BigInt::from(info.id.to_u64()),
            name: info.name,
            buffers: info
                .buffers
                .into_iter()
                .map(|(address, length, location)| BufferInfo {
                    address: BigInt::from(address),
                    length: length as f64,
                    location,
                })
                .collect(),
        })
    }

    /// Submits a batch.
    #[napi(catch_unwind)]
    pub fn submit(
        &self,
        requests: Vec<NativeRequest>,
        options: Option<NativeSubmitOptions>,
    ) -> Result<NativeBatch> {
        let requests = convert_requests(requests)?;
        let id = self
            .inner
            .submit(&requests, submit_options(options)?)
            .napi()?;
        Ok(NativeBatch {
            engine: self.inner.clone(),
            id,
        })
    }

    /// Submits a batch and resolves when it completes.
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn transfer<'env>(
        &self,
        env: &'env Env,
        requests: Vec<NativeRequest>,
        options: Option<NativeSubmitOptions>,
    ) -> Result<PromiseRaw<'env, ()>> {
        let requests = convert_requests(requests)?;
        let options = submit_options(options)?;
        let engine = self.inner.clone();
        let id = engine.submit(&requests, options).napi()?;
        env.spawn_future(async move {
            let result = engine.wait(id).await;
            engine.release_batch(id);
            result.napi()
        })
    }

    /// Sends a notification to a segment.
    #[napi]
    pub async fn send_notify(&self, segment_name: String, message: String) -> Result<()> {
        self.inner.send_notify(&segment_name, &message).await.napi()
    }

    /// Requests and bytes submitted through each transport since start.
    #[napi(catch_unwind)]
    pub fn stats(&self) -> Vec<TransportStat> {
        self.inner
            .stats()
            .into_iter()
            .map(|(kind, requests, bytes)| TransportStat {
                transport: kind.name().to_owned(),
                requests: requests as f64,
                bytes: bytes as f64,
            })
            .collect()
    }

    /// This engine's metrics (`mooncake_engine_*`) in Prometheus's text format.
    #[napi(catch_unwind)]
    pub fn metrics(&self) -> Result<String> {
        self.inner.metrics_text().napi()
    }

    /// The NIC priority matrix, as Mooncake's JSON.
    #[napi(catch_unwind)]
    pub fn topology(&self) -> String {
        self.inner.topology().to_json()
    }

    /// The transports this engine can use.
    #[napi(catch_unwind)]
    pub fn transports(&self) -> Vec<String> {
        self.inner
            .transports()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Every rail to every peer used so far.
    #[napi(catch_unwind)]
    pub fn rail_stats(&self) -> Vec<PeerRails> {
        self.inner
            .rail_stats()
            .into_iter()
            .map(|(peer, rails)| PeerRails {
                peer,
                rails: rails
                    .into_iter()
                    .map(|r| RailInfo {
                        local: r.local,
                        remote: r.remote,
                        preferred: r.preferred,
                        usable: r.usable,
                        inflight_bytes: r.inflight_bytes as f64,
                        bytes: r.bytes as f64,
                        slices: r.slices as f64,
                        failures: r.failures as f64,
                        pauses: r.pauses as f64,
                        rescued: r.rescued as f64,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Closes the engine; idempotent.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await;
        Ok(())
    }

    /// Starts the bench load (see `mooncake bench`) in the background.
    #[napi(catch_unwind)]
    pub fn start_bench(
        &self,
        options: crate::bench::BenchOptions,
    ) -> Result<crate::bench::NativeBenchRun> {
        crate::bench::start(&self.inner, options)
    }
}

/// A submitted batch. Dropping it frees the batch once it has settled.
#[napi]
pub struct NativeBatch {
    engine: Arc<TransferEngine>,
    id: BatchId,
}

#[napi]
impl NativeBatch {
    /// Resolves when every task completed; rejects with the first error otherwise.
    #[napi]
    pub async fn done(&self) -> Result<()> {
        self.engine.wait(self.id).await.napi()
    }

    /// Per-task status, in request order.
    #[napi(catch_unwind)]
    pub fn status(&self) -> Result<Vec<TaskStatusInfo>> {
        Ok(self
            .engine
            .status(self.id)
            .napi()?
            .into_iter()
            .map(|report| TaskStatusInfo {
                status: report.status.name().to_owned(),
                code: report.status as u32,
                transferred_bytes: report.transferred_bytes as f64,
                error: report.error.map(to_napi_reason),
            })
            .collect())
    }
}

impl Drop for NativeBatch {
    fn drop(&mut self) {
        self.engine.release_batch(self.id);
    }
}

/// Allocates registered engine memory as an external Buffer (valid while JavaScript holds it).
pub(crate) fn allocate<'env>(
    env: &'env Env,
    engine: &TransferEngine,
    size: f64,
) -> Result<BufferSlice<'env>> {
    let size = to_len(size, "size")?;
    if size == 0 {
        return Err(invalid("cannot allocate 0 bytes"));
    }
    let arena = engine.allocate(size).napi()?;
    let ptr = arena.as_ptr();
    // SAFETY: the arena stays mapped while the finalizer hint (an Arc of it) lives, and
    // that hint is dropped only when V8 collects the Buffer.
    let buffer =
        unsafe { BufferSlice::from_external(env, ptr, size, arena, |_, arena| drop(arena)) }?;
    if buffer.as_ptr() != ptr.cast_const() {
        // The runtime refuses external buffers and handed back a copy, which is not
        // registered memory.
        let _ = engine.unregister(ptr as usize);
        return Err(to_napi(mooncake_common::Error::new(
            mooncake_common::ErrorKind::Memory,
            "this JavaScript runtime does not allow external buffers; use register() on your own buffers",
        )));
    }
    Ok(buffer)
}

/// Registers caller memory, referenced until unregistered.
pub(crate) fn register(
    engine: &TransferEngine,
    buffer: Uint8Array,
    location: Option<String>,
) -> Result<()> {
    let (addr, len) = (buffer.as_ptr() as usize, buffer.len());
    if len == 0 {
        return Err(invalid("cannot register an empty buffer"));
    }
    let owner = Box::new(Held(buffer));
    // SAFETY: `owner` references the JavaScript buffer, so its memory stays valid for as long as
    // the registration holds the owner.
    unsafe { engine.register(addr, len, location.as_deref().unwrap_or("*"), owner) }.napi()
}

/// Keeps a JavaScript buffer referenced; never read, only dropped.
pub(crate) struct Held(#[allow(dead_code)] pub(crate) Uint8Array);

// SAFETY: the wrapped reference is never accessed, only dropped, and napi-rs routes an
// off-thread drop of a buffer reference back to the JavaScript thread.
unsafe impl Sync for Held {}

fn convert_requests(requests: Vec<NativeRequest>) -> Result<Vec<TransferRequest>> {
    requests
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let op = match r.op.as_str() {
                "read" => Opcode::Read,
                "write" => Opcode::Write,
                other => return Err(invalid(format!("request {i}: op must be 'read' or 'write', not '{other}'"))),
            };
            let offset = to_len(r.local_offset, "localOffset")?;
            let length = to_len(r.length, "length")?;
            if offset.checked_add(length).is_none_or(|end| end > r.local.len()) {
                return Err(invalid(format!(
                    "request {i}: localOffset {offset} + length {length} exceeds the local buffer ({} bytes)",
                    r.local.len()
                )));
            }
            Ok(TransferRequest {
                op,
                segment: Handle::from_u64(bigint_u64(&r.segment, "segment")?),
                local_addr: r.local.as_ptr() as usize + offset,
                remote_addr: bigint_u64(&r.remote_address, "remoteAddress")?,
                len: length,
            })
        })
        .collect()
}

fn submit_options(options: Option<NativeSubmitOptions>) -> Result<SubmitOptions> {
    let Some(options) = options else {
        return Ok(SubmitOptions::default());
    };
    let timeout = match options.timeout_ms {
        None => None,
        Some(ms) if ms.is_finite() && ms > 0.0 => Some(Duration::from_secs_f64(ms / 1000.0)),
        Some(ms) => {
            return Err(invalid(format!(
                "timeoutMs must be a positive number, not {ms}"
            )))
        }
    };
    Ok(SubmitOptions {
        timeout,
        notify: options.notify,
        ..SubmitOptions::default()
    })
}
