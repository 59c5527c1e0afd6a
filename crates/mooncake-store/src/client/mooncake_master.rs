//! This client on Mooncake's own `mooncake_master` (`mooncake://host:port`): a pool of
//! coro_rpc connections, and an adapter that serves the client's master API in process by
//! calling Mooncake's functions, so every other part of the client is the same on either
//! master.
//!
//! Mooncake's master names writes by key, not by a write id: the adapter grants every write
//! the same id and commits by key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use super::lock;
use crate::coro_rpc::frame::{errc, RequestHeader, ResponseHeader, RESPONSE_HEADER_LEN};
use crate::coro_rpc::messages::*;
use crate::coro_rpc::read_body;
use crate::coro_rpc::struct_pack::{decode, DecodeError};
use crate::proto;
use crate::wire::{first, from_uuid, to_outcome, to_status, STORE_VERSION};

/// Connections to the master; calls spread over them (Mooncake's client keeps 3 or 4).
const POOL: usize = 4;
/// The write id every write gets: Mooncake's master names writes by key.
const WRITE: u64 = 1;
/// `ReplicaType::ALL`, which Mooncake's client sends with `PutEnd`.
const REPLICA_TYPE_ALL: i32 = 4;
/// The only tenant this client uses.
const TENANT: &str = "default";

/// Calls awaiting their reply, by `seq`; `None` for a call given up (its late reply is dropped).
type Pending = Mutex<HashMap<u32, Option<oneshot::Sender<(u8, Vec<u8>)>>>>;

/// One connection: a writer task sends whole frames (a call given up mid-write never leaves half
/// a frame behind), a reader task hands replies back by `seq`.
struct Connection {
    outgoing: mpsc::Sender<Vec<u8>>,
    pending: Arc<Pending>,
    seq: AtomicU32,
    closed: Arc<AtomicBool>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Marks a call given up when it ends unanswered.
struct Waiting<'a> {
    pending: &'a Pending,
    seq: u32,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(slot) = lock(self.pending).get_mut(&self.seq) {
            *slot = None;
        }
    }
}

impl Connection {
    async fn open(address: &str, timeout: Duration) -> Result<Self> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::RpcTimeout,
                    format!("Mooncake master {address}: no connection within {timeout:?}"),
                )
            })?
            .map_err(|e| {
                Error::new(
                    ErrorKind::RpcFail,
                    format!("Mooncake master {address}: {e}"),
                )
            })?;
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let pending: Arc<Pending> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (outgoing, mut frames) = mpsc::channel::<Vec<u8>>(256);
        let (waiting, done) = (pending.clone(), closed.clone());
        let write = tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
            }
            done.store(true, Ordering::Release);
            lock(&waiting).clear();
        });
        let (replies, done) = (pending.clone(), closed.clone());
        let reader = tokio::spawn(async move {
            let read = async {
                loop {
                    let mut header = [0u8; RESPONSE_HEADER_LEN];
                    reader.read_exact(&mut header).await?;
                    let header = ResponseHeader::parse(&header).map_err(invalid)?;
                    let body = read_body(&mut reader, header.length, header.attach_length).await?;
                    let waiter = lock(&replies).remove(&header.seq);
                    match waiter {
                        Some(Some(waiter)) => {
                            let _ = waiter.send((header.err_code, body));
                        }
                        Some(None) => {}
                        // As Mooncake's client: a reply to nothing ends the connection.
                        None => return Err(invalid("a reply to no request")),
                    }
                }
            };
            let result: std::io::Result<()> = read.await;
            if let Err(e) = result {
                tracing::debug!("Mooncake master connection closed: {e}");
            }
            done.store(true, Ordering::Release);
            // Waiters see their sender dropped.
            lock(&replies).clear();
        });
        Ok(Self {
            outgoing,
            pending,
            seq: AtomicU32::new(0),
            closed,
            tasks: [reader, write],
        })
    }

    async fn call(&self, function_id: u32, body: &[u8]) -> std::io::Result<(u8, Vec<u8>)> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(seq, Some(tx));
        let _waiting = Waiting {
            pending: &self.pending,
            seq,
        };
        let frame = RequestHeader::frame(seq, function_id, body);
        if self.outgoing.send(frame).await.is_err() {
            self.closed.store(true, Ordering::Release);
            return Err(invalid("the connection is closed"));
        }
        rx.await
            .map_err(|_| invalid("the connection closed before the reply"))
    }
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// A pool of connections to one Mooncake master.
pub(crate) struct CoroClient {
    address: String,
    timeout: Duration,
    connections: Vec<tokio::sync::Mutex<Option<Arc<Connection>>>>,
    next: AtomicUsize,
}

impl CoroClient {
    pub(crate) fn new(address: &str, timeout: Duration) -> Self {
        Self {
            address: address.to_owned(),
            timeout,
            connections: (0..POOL).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>> {
        let slot = &self.connections[self.next.fetch_add(1, Ordering::Relaxed) % POOL];
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref() {
            if !connection.closed.load(Ordering::Acquire) {
                return Ok(connection.clone());
            }
        }
        let connection = Arc::new(Connection::open(&self.address, self.timeout).await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Calls `M` with `args`.
    pub(crate) async fn call<M: Method>(&self, args: &M::Args) -> Result<M::Reply> {
        let body = args.encode_args(false);
        let connection = self.connection().await?;
        let reply = tokio::time::timeout(self.timeout, connection.call(M::ID, &body))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::RpcTimeout,
                    format!(
                        "Mooncake master {}: no answer to {} within {:?}",
                        self.address,
                        M::NAME,
                        self.timeout
                    ),
                )
            })?;
        let (err_code, body) = reply.map_err(|e| {
            Error::new(
                ErrorKind::RpcFail,
                format!("Mooncake master {}: {}: {e}", self.address, M::NAME),
            )
        })?;
        if err_code != 0 {
            let message: String = decode(&body).unwrap_or_default();
            let kind = if err_code == errc::INVALID_RPC_ARGUMENTS {
                // It reads another release's types.
                ErrorKind::InvalidVersion
            } else {
                ErrorKind::RpcFail
            };
            return Err(Error::new(
                kind,
                format!(
                    "Mooncake master {} refused {} (coro_rpc error {err_code}: {message}); this \
                     client speaks {WIRE_RELEASE}",
                    self.address,
                    M::NAME
                ),
            ));
        }
        decode::<M::Reply>(&body).map_err(|e| {
            let kind = match e {
                DecodeError::TypeMismatch { .. } | DecodeError::LiteralMismatch => {
                    ErrorKind::InvalidVersion
                }
                _ => ErrorKind::Protocol,
            };
            Error::new(
                kind,
                format!(
                    "Mooncake master {}: the answer to {} does not read as {WIRE_RELEASE}'s: {e}",
                    self.address,
                    M::NAME
                ),
            )
        })
    }
}

/// A Mooncake error code as this side's error.
fn mooncake_error(function: &str, code: Code) -> Error {
    let kind = ErrorKind::ALL
        .iter()
        .copied()
        .find(|k| k.errno() == Some(code))
        .unwrap_or(ErrorKind::InternalError);
    Error::new(
        kind,
        format!("Mooncake master: {function} failed with {code}"),
    )
}

fn outcome(function: &str, result: Expected<()>) -> proto::Outcome {
    to_outcome(&result.map_err(|code| mooncake_error(function, code)))
}

fn uuid(id: Option<proto::Uuid>, what: &str) -> std::result::Result<Uuid, Status> {
    let id = id.ok_or_else(|| {
        to_status(&Error::new(
            ErrorKind::InvalidArgument,
            format!("{what} is required"),
        ))
    })?;
    Ok(Uuid::from_u128(from_uuid(id)))
}

fn segment(s: proto::Segment) -> std::result::Result<Segment, Status> {
    Ok(Segment {
        id: uuid(s.id, "segment id")?,
        name: s.name,
        base: s.base,
        size: s.size,
        te_endpoint: s.te_endpoint,
        protocol: s.protocol,
        host_id: s.host_id,
    })
}

fn config(c: Option<proto::ReplicateConfig>) -> ReplicateConfig {
    let c = c.unwrap_or_default();
    let action = match proto::SoftPinAction::try_from(c.soft_pin_action).unwrap_or_default() {
        proto::SoftPinAction::SoftPinPreserve => soft_pin_action::PRESERVE,
        proto::SoftPinAction::SoftPinEnable => soft_pin_action::ENABLE,
        proto::SoftPinAction::SoftPinDisable => soft_pin_action::DISABLE,
    };
    ReplicateConfig {
        replica_num: u64::from(c.replica_num),
        soft_pin_action: action,
        soft_pin_ttl_ms: c.soft_pin_ttl_ms,
        with_hard_pin: c.with_hard_pin,
        preferred_segments: c.preferred_segments,
        host_id: c.host_id,
        ..ReplicateConfig::default()
    }
}

/// The memory replicas (the only ones this client can read or write).
fn replicas(list: &[ReplicaDescriptor]) -> Vec<proto::Replica> {
    list.iter()
        .filter_map(|r| match &r.placement {
            Placement::Memory(m) => {
                let d = &m.buffer_descriptor;
                Some(proto::Replica {
                    id: r.id,
                    segment_name: d.transport_endpoint.clone(),
                    segment_id: None,
                    transport_endpoint: d.transport_endpoint.clone(),
                    buffer_address: d.buffer_address,
                    size: d.size,
                    status: match r.status {
                        replica_status::COMPLETE => proto::ReplicaStatus::Complete as i32,
                        replica_status::PROCESSING => proto::ReplicaStatus::Processing as i32,
                        _ => proto::ReplicaStatus::Undefined as i32,
                    },
                })
            }
            _ => None,
        })
        .collect()
}

fn start_response(function: &str, reply: StartReply) -> proto::PutStartResponse {
    match reply {
        Ok(list) => proto::PutStartResponse {
            outcome: Some(proto::Outcome::default()),
            replicas: replicas(&list),
            write_id: WRITE,
        },
        Err(code) => proto::PutStartResponse {
            outcome: Some(outcome(function, Err(code))),
            ..Default::default()
        },
    }
}

fn replica_list(reply: Expected<ReplicaList>) -> proto::GetReplicaListResponse {
    match reply {
        Ok(list) => proto::GetReplicaListResponse {
            outcome: Some(proto::Outcome::default()),
            replicas: replicas(&list.replicas),
            lease_ttl_ms: list.lease_ttl_ms,
        },
        Err(code) => proto::GetReplicaListResponse {
            outcome: Some(outcome("GetReplicaList", Err(code))),
            ..Default::default()
        },
    }
}

fn not_served(function: &str) -> Status {
    status(Error::new(
        ErrorKind::NotImplemented,
        format!("Mooncake's master has no {function}"),
    ))
}

fn status(error: Error) -> Status {
    to_status(&error)
}

type Reply<T> = std::result::Result<Response<T>, Status>;

/// The client's master API, answered by calling Mooncake's master.
pub(crate) struct MooncakeBridge {
    rpc: CoroClient,
    /// This client's writes in progress, by key, and whether each is an upsert (Mooncake ends
    /// those with `UpsertEnd`). Mooncake names writes by key, so a key has one write here at a
    /// time: a second would let the first one's end commit the second's unwritten replicas.
    /// An entry older than [`ABANDONED`] is a write this client gave up on.
    writing: Mutex<HashMap<String, (bool, Instant)>>,
}

/// Mooncake's master frees the space of a write not ended within this (its
/// `put_start_release_timeout`); the key is free to write again by then.
const ABANDONED: Duration = Duration::from_secs(600);

impl MooncakeBridge {
    pub(crate) fn new(address: &str, timeout: Duration) -> Self {
        Self {
            rpc: CoroClient::new(address, timeout),
            writing: Mutex::default(),
        }
    }

    async fn call<M: Method>(&self, args: &M::Args) -> std::result::Result<M::Reply, Status> {
        self.rpc.call::<M>(args).await.map_err(status)
    }

    /// Ends (or revokes) each key's write, as a put or an upsert, whichever started it. A key
    /// with no write of this client in progress (or named twice) gets `ERR_INVALID_WRITE`.
    async fn finish(
        &self,
        client: Uuid,
        keys: Vec<String>,
        commit: bool,
    ) -> std::result::Result<Vec<proto::Outcome>, Status> {
        let kinds: Vec<Option<bool>> = {
            let mut writing = lock(&self.writing);
            keys.iter()
                .map(|k| writing.remove(k).map(|(upsert, _)| upsert))
                .collect()
        };
        let mut results: Vec<proto::Outcome> = kinds
            .iter()
            .zip(&keys)
            .map(|(kind, key)| match kind {
                Some(_) => proto::Outcome::default(),
                None => to_outcome(&Err(Error::new(
                    ErrorKind::InvalidWrite,
                    format!("no write of '{key}' by this client is in progress"),
                ))),
            })
            .collect();
        let tenant = || TENANT.to_owned();
        for upsert in [false, true] {
            let (at, named): (Vec<usize>, Vec<String>) = kinds
                .iter()
                .enumerate()
                .filter(|(_, kind)| **kind == Some(upsert))
                .map(|(i, _)| (i, keys[i].clone()))
                .unzip();
            if named.is_empty() {
                continue;
            }
            let metas = || {
                named
                    .iter()
                    .map(|key| ObjectMeta {
                        key: key.clone(),
                        object_checksum: None,
                    })
                    .collect::<Vec<_>>()
            };
            let (answers, function) = match (upsert, commit) {
                (false, true) => (
                    self.call::<BatchPutEnd>(&(client, metas(), REPLICA_TYPE_ALL, tenant()))
                        .await?,
                    "BatchPutEnd",
                ),
                (false, false) => (
                    self.call::<BatchPutRevoke>(&(
                        client,
                        named.clone(),
                        REPLICA_TYPE_ALL,
                        tenant(),
                    ))
                    .await?,
                    "BatchPutRevoke",
                ),
                (true, true) => (
                    self.call::<BatchUpsertEnd>(&(client, metas(), tenant()))
                        .await?,
                    "BatchUpsertEnd",
                ),
                (true, false) => (
                    self.call::<BatchUpsertRevoke>(&(client, named.clone(), tenant()))
                        .await?,
                    "BatchUpsertRevoke",
                ),
            };
            let answers = one_per_key(named.len(), answers, function)?;
            for (i, answer) in at.into_iter().zip(answers) {
                results[i] = outcome(function, answer);
            }
        }
        Ok(results)
    }

    async fn start_one(
        &self,
        r: proto::PutStartRequest,
        upsert: bool,
    ) -> Reply<proto::PutStartResponse> {
        Ok(Response::new(first(
            self.start(r.into(), upsert).await?.into_inner().results,
        )))
    }

    /// Starts a write of each key that this client is not writing already.
    async fn start(
        &self,
        request: proto::BatchPutStartRequest,
        upsert: bool,
    ) -> Reply<proto::BatchPutStartResponse> {
        let client = uuid(request.client_id, "client_id")?;
        let n = request.keys.len();
        if request.sizes.len() != n {
            return Err(status(Error::new(
                ErrorKind::InvalidArgument,
                format!("{n} keys but {} sizes", request.sizes.len()),
            )));
        }
        let function = if upsert {
            "BatchUpsertStart"
        } else {
            "BatchPutStart"
        };
        // A key being written already: a put finds it existing, an upsert finds it busy.
        let busy = |key: &str| {
            let (kind, what) = if upsert {
                (
                    ErrorKind::ObjectReplicaBusy,
                    "is being written by this client",
                )
            } else {
                (ErrorKind::ObjectAlreadyExists, "is being written")
            };
            proto::PutStartResponse {
                outcome: Some(to_outcome(&Err(Error::new(
                    kind,
                    format!("'{key}' {what}"),
                )))),
                ..Default::default()
            }
        };
        let mut results: Vec<Option<proto::PutStartResponse>> = vec![None; n];
        let (at, keys, sizes) = {
            let mut writing = lock(&self.writing);
            let mut chosen = (Vec::new(), Vec::new(), Vec::new());
            let now = Instant::now();
            for (i, (key, size)) in request.keys.iter().zip(&request.sizes).enumerate() {
                let started = writing.get(key).map(|(_, at)| *at);
                if started.is_some_and(|at| now.duration_since(at) < ABANDONED) {
                    results[i] = Some(busy(key));
                } else {
                    writing.insert(key.clone(), (upsert, now));
                    chosen.0.push(i);
                    chosen.1.push(key.clone());
                    chosen.2.push(*size);
                }
            }
            chosen
        };
        let answers = if keys.is_empty() {
            Ok(Vec::new())
        } else {
            let args = (
                client,
                keys.clone(),
                sizes,
                config(request.config),
                TENANT.to_owned(),
            );
            let answers = if upsert {
                self.call::<BatchUpsertStart>(&args).await
            } else {
                self.call::<BatchPutStart>(&args).await
            };
            answers.and_then(|a| one_per_key(keys.len(), a, function))
        };
        let answers = match answers {
            Ok(answers) => answers,
            Err(e) => {
                let mut writing = lock(&self.writing);
                for key in &keys {
                    writing.remove(key);
                }
                return Err(e);
            }
        };
        {
            let mut writing = lock(&self.writing);
            for (key, answer) in keys.iter().zip(&answers) {
                if answer.is_err() {
                    writing.remove(key);
                }
            }
        }
        for (i, answer) in at.into_iter().zip(answers) {
            results[i] = Some(start_response(function, answer));
        }
        Ok(Response::new(proto::BatchPutStartResponse {
            results: results.into_iter().map(Option::unwrap_or_default).collect(),
        }))
    }
}

/// A batch answer, which must have one entry per key.
fn one_per_key<T>(
    keys: usize,
    answers: Vec<T>,
    function: &str,
) -> std::result::Result<Vec<T>, Status> {
    if answers.len() != keys {
        return Err(status(Error::new(
            ErrorKind::Protocol,
            format!(
                "Mooncake master: {keys} keys but {} answers to {function}",
                answers.len()
            ),
        )));
    }
    Ok(answers)
}

#[tonic::async_trait]
impl proto::master_server::Master for MooncakeBridge {
    async fn service_ready(
        &self,
        _: Request<proto::ServiceReadyRequest>,
    ) -> Reply<proto::ServiceReadyResponse> {
        let version = self.call::<ServiceReady>(&NoArgs).await?;
        match version {
            Ok(v) if v == SERVICE_VERSION => Ok(Response::new(proto::ServiceReadyResponse {
                version: STORE_VERSION.to_owned(),
            })),
            other => Err(status(Error::new(
                ErrorKind::InvalidVersion,
                format!(
                    "the Mooncake master answers {other:?}; this client speaks \
                     {SERVICE_VERSION} ({WIRE_RELEASE})"
                ),
            ))),
        }
    }

    async fn ping(&self, request: Request<proto::PingRequest>) -> Reply<proto::PingResponse> {
        // The rail report is dropped: Mooncake's master has no place for it.
        let client = uuid(request.into_inner().client_id, "client_id")?;
        let reply = self
            .call::<Ping>(&client)
            .await?
            .map_err(|code| status(mooncake_error("Ping", code)))?;
        Ok(Response::new(proto::PingResponse {
            view_version: reply.view_version_id,
            client_status: if reply.client_status == client_status::OK {
                proto::ClientStatus::Ok as i32
            } else {
                proto::ClientStatus::NeedRemount as i32
            },
        }))
    }

    async fn mount_segment(
        &self,
        request: Request<proto::MountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        let segment = segment(r.segment.unwrap_or_default())?;
        let answer = self
            .call::<MountSegment>(&(segment.clone(), client))
            .await?;
        if answer.is_ok() {
            // Mooncake's master counts a client alive only once it remounted; without this its
            // first ping would ask for a remount that loses nothing.
            let remounted = self
                .call::<ReMountSegment>(&(vec![segment], client))
                .await?;
            if let Err(code) = remounted {
                tracing::debug!("Mooncake master: ReMountSegment after MountSegment: {code}");
            }
        }
        Ok(Response::new(outcome("MountSegment", answer)))
    }

    async fn re_mount_segment(
        &self,
        request: Request<proto::ReMountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        let segments = r
            .segments
            .into_iter()
            .map(segment)
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let answer = self.call::<ReMountSegment>(&(segments, client)).await?;
        Ok(Response::new(outcome("ReMountSegment", answer)))
    }

    async fn unmount_segment(
        &self,
        request: Request<proto::UnmountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        let segment = uuid(r.segment_id, "segment_id")?;
        let answer = self.call::<UnmountSegment>(&(segment, client)).await?;
        Ok(Response::new(outcome("UnmountSegment", answer)))
    }

    async fn graceful_unmount_segment(
        &self,
        request: Request<proto::GracefulUnmountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        let segment = uuid(r.segment_id, "segment_id")?;
        let answer = self
            .call::<GracefulUnmountSegment>(&(segment, client, r.grace_period_ms))
            .await?;
        Ok(Response::new(outcome("GracefulUnmountSegment", answer)))
    }

    async fn put_start(
        &self,
        request: Request<proto::PutStartRequest>,
    ) -> Reply<proto::PutStartResponse> {
        self.start_one(request.into_inner(), false).await
    }

    async fn put_end(&self, request: Request<proto::KeyRequest>) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        Ok(Response::new(first(
            self.finish(client, vec![r.key], true).await?,
        )))
    }

    async fn put_revoke(&self, request: Request<proto::KeyRequest>) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        Ok(Response::new(first(
            self.finish(client, vec![r.key], false).await?,
        )))
    }

    async fn upsert_start(
        &self,
        request: Request<proto::PutStartRequest>,
    ) -> Reply<proto::PutStartResponse> {
        self.start_one(request.into_inner(), true).await
    }

    async fn batch_put_start(
        &self,
        request: Request<proto::BatchPutStartRequest>,
    ) -> Reply<proto::BatchPutStartResponse> {
        self.start(request.into_inner(), false).await
    }

    async fn batch_put_end(
        &self,
        request: Request<proto::BatchKeysRequest>,
    ) -> Reply<proto::BatchOutcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        Ok(Response::new(proto::BatchOutcome {
            results: self.finish(client, r.keys, true).await?,
        }))
    }

    async fn batch_put_revoke(
        &self,
        request: Request<proto::BatchKeysRequest>,
    ) -> Reply<proto::BatchOutcome> {
        let r = request.into_inner();
        let client = uuid(r.client_id, "client_id")?;
        Ok(Response::new(proto::BatchOutcome {
            results: self.finish(client, r.keys, false).await?,
        }))
    }

    async fn batch_upsert_start(
        &self,
        request: Request<proto::BatchPutStartRequest>,
    ) -> Reply<proto::BatchPutStartResponse> {
        self.start(request.into_inner(), true).await
    }

    async fn get_replica_list(
        &self,
        request: Request<proto::GetReplicaListRequest>,
    ) -> Reply<proto::GetReplicaListResponse> {
        let key = request.into_inner().key;
        let answer = self
            .call::<GetReplicaList>(&(key, TENANT.to_owned()))
            .await?;
        Ok(Response::new(replica_list(answer)))
    }

    async fn batch_get_replica_list(
        &self,
        request: Request<proto::BatchGetReplicaListRequest>,
    ) -> Reply<proto::BatchGetReplicaListResponse> {
        let keys = request.into_inner().keys;
        let n = keys.len();
        let answers = self
            .call::<BatchGetReplicaList>(&(keys, TENANT.to_owned()))
            .await?;
        let answers = one_per_key(n, answers, "BatchGetReplicaList")?;
        Ok(Response::new(proto::BatchGetReplicaListResponse {
            results: answers.into_iter().map(replica_list).collect(),
        }))
    }

    async fn exist_key(
        &self,
        request: Request<proto::ExistKeyRequest>,
    ) -> Reply<proto::ExistKeyResponse> {
        let key = request.into_inner().key;
        let exists = self
            .call::<ExistKey>(&(key, TENANT.to_owned()))
            .await?
            .map_err(|code| status(mooncake_error("ExistKey", code)))?;
        Ok(Response::new(proto::ExistKeyResponse { exists }))
    }

    async fn batch_exist_key(
        &self,
        request: Request<proto::BatchExistKeyRequest>,
    ) -> Reply<proto::BatchExistKeyResponse> {
        let keys = request.into_inner().keys;
        let n = keys.len();
        let answers = self
            .call::<BatchExistKey>(&(keys, TENANT.to_owned()))
            .await?;
        let answers = one_per_key(n, answers, "BatchExistKey")?;
        let exists = answers
            .into_iter()
            .collect::<std::result::Result<Vec<bool>, Code>>()
            .map_err(|code| status(mooncake_error("BatchExistKey", code)))?;
        Ok(Response::new(proto::BatchExistKeyResponse { exists }))
    }

    // Mooncake's master has no reservations: this client's puts take two round trips there.
    async fn reserve(&self, _: Request<proto::ReserveRequest>) -> Reply<proto::ReserveResponse> {
        Err(not_served("Reserve"))
    }

    async fn renew_reservations(
        &self,
        _: Request<proto::RenewReservationsRequest>,
    ) -> Reply<proto::RenewReservationsResponse> {
        Err(not_served("RenewReservations"))
    }

    async fn release_reservation(
        &self,
        _: Request<proto::ReleaseReservationRequest>,
    ) -> Reply<proto::Outcome> {
        Err(not_served("ReleaseReservation"))
    }

    async fn commit_reserved(
        &self,
        _: Request<proto::CommitReservedRequest>,
    ) -> Reply<proto::BatchOutcome> {
        Err(not_served("CommitReserved"))
    }

    async fn remove(&self, request: Request<proto::RemoveRequest>) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let answer = self
            .call::<Remove>(&(r.key, r.force, TENANT.to_owned()))
            .await?;
        Ok(Response::new(outcome("Remove", answer)))
    }

    async fn batch_remove(
        &self,
        request: Request<proto::BatchRemoveRequest>,
    ) -> Reply<proto::BatchOutcome> {
        let r = request.into_inner();
        let n = r.keys.len();
        let answers = self
            .call::<BatchRemove>(&(r.keys, r.force, TENANT.to_owned()))
            .await?;
        let answers = one_per_key(n, answers, "BatchRemove")?;
        Ok(Response::new(proto::BatchOutcome {
            results: answers
                .into_iter()
                .map(|a| outcome("BatchRemove", a))
                .collect(),
        }))
    }

    async fn remove_by_regex(
        &self,
        request: Request<proto::RemoveByRegexRequest>,
    ) -> Reply<proto::CountResponse> {
        let r = request.into_inner();
        let count = self
            .call::<RemoveByRegex>(&(r.pattern, r.force, TENANT.to_owned()))
            .await?
            .map_err(|code| status(mooncake_error("RemoveByRegex", code)))?;
        Ok(Response::new(proto::CountResponse {
            count: u64::try_from(count).unwrap_or(0),
        }))
    }

    async fn remove_all(
        &self,
        request: Request<proto::RemoveAllRequest>,
    ) -> Reply<proto::CountResponse> {
        let force = request.into_inner().force;
        let count = self.call::<RemoveAll>(&(force, TENANT.to_owned())).await?;
        let count = u64::try_from(count).map_err(|_| {
            status(mooncake_error(
                "RemoveAll",
                i32::try_from(count).unwrap_or(-1),
            ))
        })?;
        Ok(Response::new(proto::CountResponse { count }))
    }
}
