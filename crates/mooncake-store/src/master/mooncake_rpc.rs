//! Mooncake's own master protocol (coro_rpc with struct_pack bodies), served over the same
//! state machine, log and counters as gRPC: Mooncake's Python clients and this project's
//! clients share one pool.
//!
//! Mooncake's clients send no token, so this door is off unless asked for, binds loopback
//! unless told otherwise, and is refused next to a cluster token unless the operator allows it.
//! Mooncake's `PutEnd` names a key, not a write: it commits the key's write in progress when the
//! caller is that write's writer.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use super::service::MasterService;
use super::types::{
    ClientId, ClientStatus, ReplicaDesc, ReplicaStatus, SegmentId, SegmentSpec, SoftPin,
    WriteConfig, WriteId,
};
use super::Master;
use crate::coro_rpc::frame::{
    errc, RequestHeader, ResponseHeader, MAX_BODY_LEN, REQUEST_HEADER_LEN,
};
use crate::coro_rpc::messages::*;
use crate::coro_rpc::read_body;
use crate::coro_rpc::struct_pack::encode;
use crate::wire::from_status;

/// Connections served at once: Mooncake's clients keep a pool of 3 or 4 each.
const MAX_CONNECTIONS: usize = 4096;
/// Connections from one address: one host cannot take every slot.
const MAX_CONNECTIONS_PER_PEER: usize = 1024;
/// Calls one connection may have in flight (the client pipelines).
const MAX_IN_FLIGHT: usize = 16;
/// Reply bytes one connection may have waiting to be written: a peer that does not read its
/// replies stops being read.
const REPLY_BUDGET: usize = 32 << 20;
/// The largest request body: a batch of 10,000 keys of 300 bytes is 3 MB.
const MAX_REQUEST_LEN: u32 = 4 << 20;
/// Keys in one batch call (Mooncake's connectors send hundreds).
const MAX_BATCH: usize = 10_000;
/// A peer that started a frame must finish it within this.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// The door: what Mooncake's calls become.
pub(super) struct MooncakeDoor {
    service: MasterService,
    /// Whether callers here may remove by pattern or everything: only on a master without
    /// tokens, as Mooncake's own.
    admin: bool,
}

impl MooncakeDoor {
    pub(super) fn new(service: MasterService, admin: bool) -> Self {
        Self { service, admin }
    }
}

/// Accepts connections until `stop`.
pub(super) async fn serve(
    listener: TcpListener,
    door: Arc<MooncakeDoor>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("Mooncake RPC accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "Mooncake RPC: {MAX_CONNECTIONS} connections open; refused");
            continue;
        };
        let Some(peer_slot) = PeerSlot::take(&peers, peer.ip()) else {
            tracing::warn!(
                %peer,
                "Mooncake RPC: {MAX_CONNECTIONS_PER_PEER} connections open from this address; \
                 refused"
            );
            continue;
        };
        let (door, stop, calls) = (door.clone(), stop.clone(), tracker.clone());
        tracker.spawn(async move {
            if let Err(e) = connection(stream, door, stop, calls).await {
                tracing::debug!(%peer, "Mooncake RPC connection closed: {e}");
            }
            drop((slot, peer_slot));
        });
    }
}

/// One connection counted against its peer's address.
struct PeerSlot {
    peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut open = peers.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(Self {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Reads requests, answers each as it completes (replies carry the request's `seq`).
async fn connection(
    stream: TcpStream,
    door: Arc<MooncakeDoor>,
    stop: CancellationToken,
    tracker: TaskTracker,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let (replies, mut outgoing) = mpsc::channel::<(Vec<u8>, OwnedSemaphorePermit)>(MAX_IN_FLIGHT);
    let budget = Arc::new(Semaphore::new(REPLY_BUDGET));
    // Ends with the server, or when the peer stops reading its replies: such a peer loses the
    // connection, and never holds up a close.
    let ended = stop.child_token();
    let end = ended.clone();
    let write = tracker.spawn(async move {
        loop {
            let frame = tokio::select! {
                _ = end.cancelled() => break,
                frame = outgoing.recv() => frame,
            };
            // The reply's share of the budget goes back once it is written.
            let Some((frame, _share)) = frame else { break };
            let written = tokio::select! {
                _ = end.cancelled() => break,
                written = tokio::time::timeout(FRAME_TIMEOUT, writer.write_all(&frame)) => written,
            };
            if !matches!(written, Ok(Ok(()))) {
                end.cancel();
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let read = async {
        loop {
            let mut header = [0u8; REQUEST_HEADER_LEN];
            reader.read_exact(&mut header[..1]).await?;
            let rest = tokio::time::timeout(FRAME_TIMEOUT, async {
                reader.read_exact(&mut header[1..]).await?;
                let parsed = RequestHeader::parse(&header).map_err(invalid)?;
                if parsed.length > MAX_REQUEST_LEN {
                    return Err(invalid(format!(
                        "a request of {} bytes is more than the {MAX_REQUEST_LEN} allowed",
                        parsed.length
                    )));
                }
                let body = read_body(&mut reader, parsed.length, parsed.attach_length).await?;
                Ok::<_, std::io::Error>((parsed, body))
            });
            let (request, body) = rest.await.map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "a frame stalled")
            })??;
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| invalid("closed"))?;
            let (door, replies, budget) = (door.clone(), replies.clone(), budget.clone());
            tracker.spawn(async move {
                let (mut err_code, mut reply) = door.call(request.function_id, &body).await;
                if reply.len() > MAX_BODY_LEN as usize {
                    tracing::warn!(
                        function = format_args!("{:#010x}", request.function_id),
                        bytes = reply.len(),
                        "Mooncake RPC: a reply too large to send"
                    );
                    (err_code, reply) =
                        framework_error(errc::MESSAGE_TOO_LARGE, "message too large");
                }
                let frame = ResponseHeader::frame(err_code, request.seq, &reply);
                let share = u32::try_from(frame.len().min(REPLY_BUDGET)).unwrap_or(u32::MAX);
                if let Ok(share) = budget.acquire_many_owned(share).await {
                    let _ = replies.send((frame, share)).await;
                }
                drop(permit);
            });
        }
    };
    let result: std::io::Result<()> = tokio::select! {
        _ = ended.cancelled() => Ok(()),
        result = read => result,
    };
    ended.cancel();
    drop(replies);
    let _ = write.await;
    result
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// A framework error's reply body: its message, as a struct_pack string.
fn framework_error(code: u8, message: &str) -> (u8, Vec<u8>) {
    (code, encode(&message.to_owned(), true))
}

/// Mooncake's code for a failure.
fn code(error: &Error) -> Code {
    match error.kind() {
        // Mooncake has no codes of its own for these: it answers ILLEGAL_CLIENT.
        ErrorKind::PermissionDenied | ErrorKind::Unauthenticated => -601,
        kind => kind.errno().unwrap_or(-1),
    }
}

fn status_code(status: &Status) -> Code {
    code(&from_status(status))
}

const INVALID_PARAMS: Code = -600;

/// Whether a batch has more keys than one call may carry.
fn too_many(keys: usize) -> bool {
    if keys > MAX_BATCH {
        tracing::warn!("Mooncake RPC: refused a batch of {keys} keys (at most {MAX_BATCH})");
    }
    keys > MAX_BATCH
}

/// Keys live in one namespace here: Mooncake's default tenant.
fn check_tenant(tenant: &str) -> std::result::Result<(), Code> {
    if tenant.is_empty() || tenant == "default" {
        return Ok(());
    }
    tracing::warn!(tenant, "Mooncake RPC: only the default tenant is served");
    Err(INVALID_PARAMS)
}

fn client(id: Uuid) -> ClientId {
    ClientId(id.to_u128())
}

fn segment(s: Segment) -> SegmentSpec {
    SegmentSpec {
        id: SegmentId(s.id.to_u128()),
        name: s.name,
        base: s.base,
        size: s.size,
        te_endpoint: s.te_endpoint,
        protocol: s.protocol,
        host_id: s.host_id,
    }
}

fn write_config(c: ReplicateConfig) -> std::result::Result<WriteConfig, Code> {
    if c.nof_replica_num > 0 || c.dfs_replica_num > 0 {
        tracing::warn!("Mooncake RPC: NVMe-oF and DFS replicas are not served");
        return Err(INVALID_PARAMS);
    }
    // As Mooncake's master: a TTL means something only to a pin being enabled.
    if c.soft_pin_ttl_ms.is_some() && c.soft_pin_action != soft_pin_action::ENABLE {
        return Err(INVALID_PARAMS);
    }
    let soft_pin = match c.soft_pin_action {
        soft_pin_action::PRESERVE => SoftPin::Preserve,
        soft_pin_action::ENABLE => SoftPin::Enable(c.soft_pin_ttl_ms.map(Duration::from_millis)),
        soft_pin_action::DISABLE => SoftPin::Disable,
        _ => return Err(INVALID_PARAMS),
    };
    let mut preferred = c.preferred_segments;
    if !c.preferred_segment.is_empty() && !preferred.contains(&c.preferred_segment) {
        preferred.insert(0, c.preferred_segment);
    }
    Ok(WriteConfig {
        replica_num: u32::try_from(c.replica_num).map_err(|_| INVALID_PARAMS)?,
        preferred_segments: preferred,
        soft_pin,
        hard_pin: c.with_hard_pin,
        host_id: c.host_id,
    })
}

fn descriptor(d: &ReplicaDesc) -> ReplicaDescriptor {
    ReplicaDescriptor {
        id: d.id,
        placement: Placement::Memory(MemoryDescriptor {
            buffer_descriptor: BufferDescriptor {
                size: d.size,
                buffer_address: d.address,
                protocol: d.protocol.clone(),
                transport_endpoint: d.te_endpoint.clone(),
            },
        }),
        status: match d.status {
            ReplicaStatus::Processing => replica_status::PROCESSING,
            ReplicaStatus::Complete => replica_status::COMPLETE,
        },
    }
}

/// Every key's result, or every key failed with the whole call's code.
fn per_key<T>(
    n: usize,
    results: std::result::Result<Vec<Result<T>>, Status>,
    map: impl Fn(T) -> Result<T>,
) -> Vec<Expected<T>> {
    match results {
        Ok(results) => results
            .into_iter()
            .map(|r| r.and_then(&map).map_err(|e| code(&e)))
            .collect(),
        Err(status) => (0..n).map(|_| Err(status_code(&status))).collect(),
    }
}

impl MooncakeDoor {
    /// Decodes the arguments of `M`, runs `handle`, encodes its reply. Arguments of another
    /// shape (another Mooncake release) are refused before anything runs.
    async fn serve<M, F, Fut>(&self, body: &[u8], handle: F) -> (u8, Vec<u8>)
    where
        M: Method,
        F: FnOnce(M::Args) -> Fut,
        Fut: Future<Output = M::Reply>,
    {
        match <M::Args as Args>::decode_args(body) {
            Ok(args) => (0, encode(&handle(args).await, true)),
            Err(e) => {
                tracing::warn!(
                    function = M::NAME,
                    "Mooncake RPC: refused a call whose arguments do not decode ({e}); this \
                     master speaks the wire of {WIRE_RELEASE} (service version {SERVICE_VERSION})"
                );
                framework_error(errc::INVALID_RPC_ARGUMENTS, "invalid rpc arg")
            }
        }
    }

    async fn call(&self, function_id: u32, body: &[u8]) -> (u8, Vec<u8>) {
        match function_id {
            ServiceReady::ID => {
                self.serve::<ServiceReady, _, _>(body, |_| async { Ok(SERVICE_VERSION.to_owned()) })
                    .await
            }
            GetStorageConfig::ID => {
                // Mooncake's master answers so without a file tier configured.
                self.serve::<GetStorageConfig, _, _>(body, |_| async {
                    Ok(StorageConfig {
                        enable_disk_eviction: true,
                        ..StorageConfig::default()
                    })
                })
                .await
            }
            GetFsdir::ID => {
                self.serve::<GetFsdir, _, _>(body, |_| async { Ok(String::new()) })
                    .await
            }
            MountSegment::ID => {
                self.serve::<MountSegment, _, _>(body, |(s, c)| {
                    let spec = segment(s);
                    self.change("mount_segment", move |m| {
                        m.mount_segment(Instant::now(), client(c), spec)
                    })
                })
                .await
            }
            ReMountSegment::ID => {
                self.serve::<ReMountSegment, _, _>(body, |(s, c)| {
                    let specs = s.into_iter().map(segment).collect();
                    self.change("remount_segment", move |m| {
                        m.remount_segments(Instant::now(), client(c), specs)
                    })
                })
                .await
            }
            UnmountSegment::ID => {
                self.serve::<UnmountSegment, _, _>(body, |(s, c)| {
                    self.change("unmount_segment", move |m| {
                        m.unmount_segment(client(c), SegmentId(s.to_u128()))
                    })
                })
                .await
            }
            GracefulUnmountSegment::ID => {
                self.serve::<GracefulUnmountSegment, _, _>(body, |(s, c, grace)| {
                    self.change("graceful_unmount_segment", move |m| {
                        let grace = Duration::from_millis(grace);
                        m.graceful_unmount_segment(
                            Instant::now(),
                            client(c),
                            SegmentId(s.to_u128()),
                            grace,
                        )
                    })
                })
                .await
            }
            Ping::ID => self.serve::<Ping, _, _>(body, |c| self.ping(c)).await,
            FetchTasks::ID => {
                self.serve::<FetchTasks, _, _>(body, |_| async { Ok(Vec::new()) })
                    .await
            }
            ExistKey::ID => {
                self.serve::<ExistKey, _, _>(body, |(key, tenant)| async move {
                    check_tenant(&tenant)?;
                    first(self.exist(vec![key]))
                })
                .await
            }
            BatchExistKey::ID => {
                self.serve::<BatchExistKey, _, _>(body, |(keys, tenant)| async move {
                    match check_tenant(&tenant) {
                        Ok(()) => self.exist(keys),
                        Err(code) => vec![Err(code); keys.len()],
                    }
                })
                .await
            }
            GetReplicaList::ID => {
                self.serve::<GetReplicaList, _, _>(body, |(key, tenant)| async move {
                    check_tenant(&tenant)?;
                    first(self.replica_lists(vec![key]))
                })
                .await
            }
            BatchGetReplicaList::ID => {
                self.serve::<BatchGetReplicaList, _, _>(body, |(keys, tenant)| async move {
                    match check_tenant(&tenant) {
                        Ok(()) => self.replica_lists(keys),
                        Err(code) => vec![Err(code); keys.len()],
                    }
                })
                .await
            }
            PutStart::ID => {
                self.serve::<PutStart, _, _>(body, |(c, key, size, config, tenant)| async move {
                    first(
                        self.start(c, vec![key], vec![size], config, tenant, false)
                            .await,
                    )
                })
                .await
            }
            UpsertStart::ID => {
                self.serve::<UpsertStart, _, _>(body, |(c, key, size, config, tenant)| async move {
                    first(
                        self.start(c, vec![key], vec![size], config, tenant, true)
                            .await,
                    )
                })
                .await
            }
            BatchPutStart::ID => {
                self.serve::<BatchPutStart, _, _>(body, |(c, keys, sizes, config, tenant)| {
                    self.start(c, keys, sizes, config, tenant, false)
                })
                .await
            }
            BatchUpsertStart::ID => {
                self.serve::<BatchUpsertStart, _, _>(body, |(c, keys, sizes, config, tenant)| {
                    self.start(c, keys, sizes, config, tenant, true)
                })
                .await
            }
            PutEnd::ID => {
                self.serve::<PutEnd, _, _>(body, |(c, meta, _, tenant)| async move {
                    first(self.end(c, vec![meta.key], tenant).await)
                })
                .await
            }
            UpsertEnd::ID => {
                self.serve::<UpsertEnd, _, _>(body, |(c, meta, _, tenant)| async move {
                    first(self.end(c, vec![meta.key], tenant).await)
                })
                .await
            }
            BatchPutEnd::ID => {
                self.serve::<BatchPutEnd, _, _>(body, |(c, metas, _, tenant)| {
                    self.end(c, metas.into_iter().map(|m| m.key).collect(), tenant)
                })
                .await
            }
            BatchUpsertEnd::ID => {
                self.serve::<BatchUpsertEnd, _, _>(body, |(c, metas, tenant)| {
                    self.end(c, metas.into_iter().map(|m| m.key).collect(), tenant)
                })
                .await
            }
            PutRevoke::ID => {
                self.serve::<PutRevoke, _, _>(body, |(c, key, _, tenant)| async move {
                    first(self.revoke(c, vec![key], tenant).await)
                })
                .await
            }
            UpsertRevoke::ID => {
                self.serve::<UpsertRevoke, _, _>(body, |(c, key, _, tenant)| async move {
                    first(self.revoke(c, vec![key], tenant).await)
                })
                .await
            }
            BatchPutRevoke::ID => {
                self.serve::<BatchPutRevoke, _, _>(body, |(c, keys, _, tenant)| {
                    self.revoke(c, keys, tenant)
                })
                .await
            }
            BatchUpsertRevoke::ID => {
                self.serve::<BatchUpsertRevoke, _, _>(body, |(c, keys, tenant)| {
                    self.revoke(c, keys, tenant)
                })
                .await
            }
            Remove::ID => {
                self.serve::<Remove, _, _>(body, |(key, force, tenant)| async move {
                    check_tenant(&tenant)?;
                    first(self.remove(vec![key], force).await)
                })
                .await
            }
            BatchRemove::ID => {
                self.serve::<BatchRemove, _, _>(body, |(keys, force, tenant)| async move {
                    match check_tenant(&tenant) {
                        Ok(()) => self.remove(keys, force).await,
                        Err(code) => vec![Err(code); keys.len()],
                    }
                })
                .await
            }
            RemoveByRegex::ID => {
                self.serve::<RemoveByRegex, _, _>(body, |(pattern, force, tenant)| async move {
                    check_tenant(&tenant)?;
                    self.admin()?;
                    let removed = self
                        .service
                        .durably(|m| m.remove_by_regex(Instant::now(), &pattern, force))
                        .await
                        .map_err(|s| status_code(&s))?;
                    self.service
                        .count("remove_by_regex", 1, usize::from(removed.is_err()));
                    removed.map(|n| n as i64).map_err(|e| code(&e))
                })
                .await
            }
            RemoveAll::ID => {
                self.serve::<RemoveAll, _, _>(body, |(force, tenant)| async move {
                    // A plain count: a refusal is a negative one.
                    let run = async {
                        check_tenant(&tenant)?;
                        self.admin()?;
                        let removed = self
                            .service
                            .durably(|m| m.remove_all(Instant::now(), force))
                            .await
                            .map_err(|s| status_code(&s))?;
                        self.service.count("remove_all", 1, 0);
                        Ok::<_, Code>(removed as i64)
                    };
                    run.await.unwrap_or_else(i64::from)
                })
                .await
            }
            other => {
                tracing::debug!("Mooncake RPC: function {other:#010x} is not served");
                framework_error(
                    errc::FUNCTION_NOT_REGISTERED,
                    "the rpc function not registered",
                )
            }
        }
    }

    fn admin(&self) -> std::result::Result<(), Code> {
        if self.admin {
            Ok(())
        } else {
            tracing::warn!("Mooncake RPC: removing by pattern or everything needs the admin token");
            Err(code(&Error::new(ErrorKind::PermissionDenied, "")))
        }
    }

    /// One durable change of the state machine.
    async fn change(
        &self,
        op: &'static str,
        change: impl FnOnce(&mut Master) -> Result<()>,
    ) -> Expected<()> {
        let result = self
            .service
            .durably(change)
            .await
            .map_err(|s| status_code(&s))?;
        self.service.count(op, 1, usize::from(result.is_err()));
        result.map_err(|e| code(&e))
    }

    async fn ping(&self, c: Uuid) -> Expected<PingReply> {
        let mut master = self.service.master().map_err(|s| status_code(&s))?;
        let status = master.ping(Instant::now(), client(c));
        drop(master);
        self.service.count("ping", 1, 0);
        Ok(PingReply {
            view_version_id: 0,
            client_status: match status {
                ClientStatus::Ok => client_status::OK,
                ClientStatus::NeedRemount => client_status::NEED_REMOUNT,
            },
        })
    }

    fn exist(&self, keys: Vec<String>) -> Vec<Expected<bool>> {
        if too_many(keys.len()) {
            return vec![Err(INVALID_PARAMS); keys.len()];
        }
        let now = Instant::now();
        let results: std::result::Result<Vec<_>, Status> = self
            .service
            .master()
            .map(|mut m| keys.iter().map(|k| m.exist_key(now, k)).collect());
        let answers = per_key(keys.len(), results, Ok);
        self.service.count(
            "exist_key",
            answers.len(),
            answers.iter().filter(|a| a.is_err()).count(),
        );
        answers
    }

    fn replica_lists(&self, keys: Vec<String>) -> Vec<Expected<ReplicaList>> {
        if too_many(keys.len()) {
            return vec![Err(INVALID_PARAMS); keys.len()];
        }
        match self.service.replica_lists(&keys) {
            Ok(results) => results
                .into_iter()
                .map(|r| match r {
                    Ok((replicas, lease)) => Ok(ReplicaList {
                        replicas: replicas.iter().map(descriptor).collect(),
                        lease_ttl_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
                        object_checksum: None,
                    }),
                    Err(e) => Err(code(&e)),
                })
                .collect(),
            Err(status) => vec![Err(status_code(&status)); keys.len()],
        }
    }

    async fn start(
        &self,
        c: Uuid,
        keys: Vec<String>,
        sizes: Vec<u64>,
        config: ReplicateConfig,
        tenant: String,
        upsert: bool,
    ) -> Vec<StartReply> {
        let n = keys.len();
        // Mooncake's client checks that a batch answer has one entry per key.
        if sizes.len() != n || too_many(n) {
            return vec![Err(INVALID_PARAMS); n];
        }
        let config = match check_tenant(&tenant).and_then(|()| write_config(config)) {
            Ok(config) => config,
            Err(code) => return vec![Err(code); n],
        };
        let writes: Vec<(String, u64)> = keys.into_iter().zip(sizes).collect();
        let op = if upsert { "upsert_start" } else { "put_start" };
        let results = self
            .service
            .start_writes(op, client(c), &writes, &config, upsert, true)
            .await;
        match results {
            Ok(results) => results
                .into_iter()
                .map(|r| {
                    r.map(|grant| grant.replicas.iter().map(descriptor).collect())
                        .map_err(|e| code(&e))
                })
                .collect(),
            Err(status) => vec![Err(status_code(&status)); n],
        }
    }

    /// The write in progress of each key, which `c` must have started: Mooncake's ends and
    /// revokes name keys, this state machine names writes.
    fn writes_of(
        &self,
        c: Uuid,
        keys: &[String],
    ) -> std::result::Result<Vec<std::result::Result<WriteId, Code>>, Status> {
        let master = self.service.master()?;
        Ok(keys
            .iter()
            .map(|key| match master.write_in_progress(key) {
                Some((writer, write)) if writer == client(c) => Ok(write),
                Some(_) => Err(code(&Error::new(ErrorKind::IllegalClient, ""))),
                None => Err(code(&Error::new(ErrorKind::InvalidWrite, ""))),
            })
            .collect())
    }

    async fn finish(
        &self,
        op: &'static str,
        c: Uuid,
        keys: Vec<String>,
        tenant: String,
        apply: impl Fn(&mut Master, ClientId, &str, WriteId) -> Result<()>,
    ) -> Vec<Expected<()>> {
        let n = keys.len();
        if let Err(code) = check_tenant(&tenant) {
            return vec![Err(code); n];
        }
        if too_many(n) {
            return vec![Err(INVALID_PARAMS); n];
        }
        let found = match self.writes_of(c, &keys) {
            Ok(found) => found,
            Err(status) => return vec![Err(status_code(&status)); n],
        };
        let writes: Vec<(String, WriteId)> = keys
            .into_iter()
            .zip(&found)
            .filter_map(|(key, write)| write.ok().map(|w| (key, w)))
            .collect();
        let mut results = per_key(
            writes.len(),
            self.service
                .finish_writes(op, client(c), &writes, apply)
                .await,
            Ok,
        )
        .into_iter();
        found
            .into_iter()
            .map(|write| match write {
                Ok(_) => results.next().unwrap_or(Err(-1)),
                Err(code) => Err(code),
            })
            .collect()
    }

    async fn end(&self, c: Uuid, keys: Vec<String>, tenant: String) -> Vec<Expected<()>> {
        let now = Instant::now();
        self.finish("put_end", c, keys, tenant, |m, c, k, w| {
            m.put_end(now, c, k, w)
        })
        .await
    }

    async fn revoke(&self, c: Uuid, keys: Vec<String>, tenant: String) -> Vec<Expected<()>> {
        let now = Instant::now();
        self.finish("put_revoke", c, keys, tenant, |m, c, k, w| {
            m.put_revoke(now, c, k, w)
        })
        .await
    }

    async fn remove(&self, keys: Vec<String>, force: bool) -> Vec<Expected<()>> {
        if too_many(keys.len()) {
            return vec![Err(INVALID_PARAMS); keys.len()];
        }
        let now = Instant::now();
        let results = self
            .service
            .durably(|m| {
                keys.iter()
                    .map(|k| m.remove(now, k, force))
                    .collect::<Vec<_>>()
            })
            .await;
        let answers = per_key(keys.len(), results, Ok);
        self.service.count(
            "remove",
            answers.len(),
            answers.iter().filter(|a| a.is_err()).count(),
        );
        answers
    }
}

/// The one answer of a one-key batch.
fn first<T>(mut answers: Vec<Expected<T>>) -> Expected<T> {
    answers.pop().unwrap_or(Err(-1))
}
