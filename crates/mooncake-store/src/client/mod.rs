//! The store client: contributes memory to the pool and moves object bytes peer to peer.
//!
//! A client mounts `global_segment_size` bytes of its engine's memory as a segment that other
//! clients write replicas into, and keeps `local_buffer_size` bytes of registered staging for
//! the copying APIs. Object bytes never pass through the master: a write asks the master
//! where the replicas go (`PutStart`), writes them with one Transfer Engine batch, and commits
//! (`PutEnd`) or gives the space back (`PutRevoke`). A read asks for the replicas
//! (`GetReplicaList`, which grants a lease), reads the best one (this process: a plain copy;
//! same host: shared memory; else TCP) and falls back to the next replica if a transfer
//! fails. A read that outlives its lease re-validates the replica it used instead of
//! returning bytes that may have been replaced.
//!
//! - [`writes`]: puts and upserts, each step naming its write;
//! - [`reservations`]: space reserved ahead of need, for puts in one round trip;
//! - [`reads`]: gets, replica fallback and lease re-validation;
//! - [`transfer`]: replica lists checked, bytes moved, read deadlines;
//! - [`lookups`]: concurrent replica lookups coalesced;
//! - [`master_client`]: RPC plumbing;
//! - [`buffer`]: the staging buffer;
//! - [`metrics`]: requests, failures, bytes and latency by operation, staging use.

pub mod buffer;
mod lookups;
pub mod master_client;
mod metrics;
mod mooncake_master;
mod reads;
mod reservations;
mod transfer;
mod writes;

pub use writes::StagedValues;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_common::{EngineConfig, Error, ErrorKind, Result};
use mooncake_te::TransferEngine;
use mooncake_transport::Arena;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::buffer::LocalBuffer;
use self::lookups::Lookups;
use self::master_client::{Credentials, MasterClient};
use self::metrics::{ClientMetrics, Operation};
use self::reservations::Reservations;
use self::transfer::ReadPace;
use crate::access::Tokens;
use crate::master::types::{
    ClientId, RailReport, RailState, SegmentId, SegmentSpec, MAX_REPORTED_RAILS,
};
use crate::proto;
use crate::wire::{from_outcome, to_rail_report, to_segment, to_uuid};

/// Everything a client needs to start.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Master gRPC address, `host:port`. Default `127.0.0.1:50051`.
    pub master_address: String,
    /// The Transfer Engine this client runs (name, metadata, protocol).
    pub engine: EngineConfig,
    /// Bytes this client contributes to the pool (0: a pure requester). Default 16 MiB.
    pub global_segment_size: u64,
    /// Registered staging for the copying APIs (0: stage in temporary allocations). Default
    /// 16 MiB; when it is full, a reserve of up to 64 MiB more is added.
    pub local_buffer_size: u64,
    /// Deadline of one master RPC. Default 30 s (`MC_RPC_TIMEOUT_MS`).
    pub rpc_timeout: Duration,
    /// Proves the admin role to the master (needed for `remove_all` and `remove_by_regex` on
    /// a master with tokens). Default: `MC_ADMIN_TOKEN`. The cluster token is the engine's.
    pub admin_token: Option<ClusterToken>,
    /// Reach the master over TLS, trusting the authorities in this PEM file.
    pub master_tls_ca: Option<std::path::PathBuf>,
}

impl StoreConfig {
    /// Defaults for an engine config.
    pub fn new(engine: EngineConfig) -> Self {
        let rpc_timeout = std::env::var("MC_RPC_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(30), Duration::from_millis);
        Self {
            master_address: "127.0.0.1:50051".to_owned(),
            engine,
            global_segment_size: 16 << 20,
            local_buffer_size: 16 << 20,
            rpc_timeout,
            admin_token: None,
            master_tls_ca: None,
        }
    }
}

/// Takes a lock whose holder may have panicked: every holder leaves the data consistent.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often the client pings the master.
const PING_INTERVAL: Duration = Duration::from_secs(1);

/// The engine's rails as a ping reports them: at most [`MAX_REPORTED_RAILS`], the troubled
/// ones first so that a cut never hides them, labels bounded.
fn rail_reports(engine: &TransferEngine) -> Vec<proto::RailReport> {
    let mut rails: Vec<RailReport> = engine
        .rails_by_segment()
        .into_iter()
        .flat_map(|(peer, rails)| {
            rails.into_iter().map(move |rail| RailReport {
                peer: peer.clone(),
                state: if !rail.usable {
                    RailState::Paused
                } else if rail.failing {
                    RailState::Failed
                } else {
                    RailState::Usable
                },
                local: rail.local,
                remote: rail.remote,
                bytes: rail.bytes,
                failures: rail.failures,
            })
        })
        .collect();
    rails.sort_by(RailReport::report_order);
    rails.truncate(MAX_REPORTED_RAILS);
    rails
        .into_iter()
        .map(|rail| to_rail_report(&rail.bounded()))
        .collect()
}

/// A store client.
pub struct StoreClient {
    engine: Arc<TransferEngine>,
    master: MasterClient,
    lookups: Arc<Lookups>,
    reservations: Reservations,
    id: ClientId,
    segments: Vec<(SegmentSpec, Arc<Arena>)>,
    local: Arc<LocalBuffer>,
    pace: ReadPace,
    host_id: String,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    closed: AtomicBool,
    metrics: ClientMetrics,
}

/// Engine memory with every page already backed (see [`Arena::populate`]): the segment and
/// the staging buffer are written all the time, and a host short of memory fails here.
fn backed(engine: &TransferEngine, len: usize) -> Result<Arc<Arena>> {
    let arena = engine.allocate(len)?;
    arena.populate()?;
    Ok(arena)
}

/// [`backed`], off the async workers (backing a GiB takes a quarter of a second).
async fn backed_blocking(engine: &Arc<TransferEngine>, len: usize) -> Result<Arc<Arena>> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || backed(&engine, len))
        .await
        .map_err(|e| Error::new(ErrorKind::InternalError, format!("backing memory: {e}")))?
}

impl StoreClient {
    /// Starts the engine, connects to the master and mounts the global segment.
    pub async fn connect(config: StoreConfig) -> Result<Arc<Self>> {
        let admin = match &config.admin_token {
            Some(token) => Some(token.clone()),
            None => Tokens::resolve(Some(""), None)?.admin,
        };
        let credentials = Credentials {
            tokens: Tokens {
                cluster: config.engine.cluster_token.clone(),
                admin,
            },
            tls_ca: config.master_tls_ca.clone(),
        };
        let master =
            MasterClient::connect(&config.master_address, config.rpc_timeout, credentials).await?;
        let engine = TransferEngine::start(config.engine.clone()).await?;
        let started = Self::finish_connect(engine.clone(), master, &config).await;
        if started.is_err() {
            engine.close().await;
        }
        started
    }

    async fn finish_connect(
        engine: Arc<TransferEngine>,
        master: MasterClient,
        config: &StoreConfig,
    ) -> Result<Arc<Self>> {
        let id = ClientId::random();
        let name = engine.segment_name().to_owned();
        let host_id = mooncake_te::address::split_host_port(&name)
            .map(|(h, _)| h)
            .unwrap_or_default();
        let mut segments = Vec::new();
        if config.global_segment_size > 0 {
            let arena = backed_blocking(&engine, config.global_segment_size as usize).await?;
            let spec = SegmentSpec {
                id: SegmentId::random(),
                name: name.clone(),
                base: arena.as_ptr() as u64,
                size: arena.len() as u64,
                te_endpoint: name.clone(),
                // Mooncake's field: what peers reach the segment with.
                protocol: if engine.transports().contains(&"rdma") {
                    "rdma"
                } else {
                    "tcp"
                }
                .to_owned(),
                host_id: host_id.clone(),
            };
            engine.publish_now().await?;
            let request = proto::MountSegmentRequest {
                client_id: Some(to_uuid(id.0)),
                segment: Some(to_segment(&spec)),
            };
            let outcome = master
                .call(request, |mut g, r| async move { g.mount_segment(r).await })
                .await?;
            from_outcome(Some(&outcome))?;
            segments.push((spec, arena));
        } else {
            // A pure requester mounts nothing, but still registers so its pings are known.
            let request = proto::ReMountSegmentRequest {
                client_id: Some(to_uuid(id.0)),
                segments: Vec::new(),
            };
            let outcome = master
                .call(
                    request,
                    |mut g, r| async move { g.re_mount_segment(r).await },
                )
                .await?;
            from_outcome(Some(&outcome))?;
        }
        let staging = match config.local_buffer_size {
            0 => None,
            size => Some(backed_blocking(&engine, size as usize).await?),
        };
        let reserve_engine = engine.clone();
        let grow: buffer::Grow = Box::new(move |len| backed(&reserve_engine, len));
        let local = Arc::new(LocalBuffer::new(staging, Some(grow)));
        let client = Arc::new(Self {
            engine,
            lookups: Lookups::new(master.clone()),
            reservations: Reservations::new(master.clone(), id, host_id.clone()),
            master,
            id,
            segments,
            local,
            pace: ReadPace::new(),
            host_id,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            closed: AtomicBool::new(false),
            metrics: ClientMetrics::default(),
        });
        client.spawn_renewals();
        client.spawn_heartbeat();
        tracing::info!(client = %name, "store client connected");
        Ok(client)
    }

    /// The Transfer Engine this client runs (for registering buffers, allocating memory).
    pub fn engine(&self) -> &Arc<TransferEngine> {
        &self.engine
    }

    /// Renews the reservations held, a few times per lifetime.
    fn spawn_renewals(self: &Arc<Self>) {
        let (weak, stop) = (Arc::downgrade(self), self.shutdown.clone());
        self.tracker.spawn(async move {
            loop {
                let Some(client) = weak.upgrade() else { break };
                let every = client.reservations.renew_every();
                drop(client);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let Some(client) = weak.upgrade() else { break };
                client.reservations.renew().await;
            }
        });
    }

    fn spawn_heartbeat(self: &Arc<Self>) {
        let (weak, stop) = (Arc::downgrade(self), self.shutdown.clone());
        self.tracker.spawn(async move {
            let mut failures = 0u32;
            let mut interval = tokio::time::interval(PING_INTERVAL);
            loop {
                let Some(client) = weak.upgrade() else { break };
                let master = client.master.clone();
                drop(client);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => {}
                    // A new leader: mount there now rather than at the next ping.
                    _ = master.moved() => {}
                }
                let Some(client) = weak.upgrade() else { break };
                match client.heartbeat().await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures == 3 || failures.is_multiple_of(30) {
                            tracing::warn!("master unreachable ({failures} pings): {e}");
                        }
                    }
                }
            }
        });
        self.tracker.close();
    }

    async fn heartbeat(&self) -> Result<()> {
        let request = proto::PingRequest {
            client_id: Some(to_uuid(self.id.0)),
            rails: rail_reports(&self.engine),
        };
        let reply = self
            .master
            .call(request, |mut g, r| async move { g.ping(r).await })
            .await?;
        if reply.client_status == proto::ClientStatus::NeedRemount as i32 {
            tracing::warn!(
                "master asked for a remount; mounting segments again (their old contents are gone)"
            );
            self.engine.publish_now().await?;
            let request = proto::ReMountSegmentRequest {
                client_id: Some(to_uuid(self.id.0)),
                segments: self.segments.iter().map(|(s, _)| to_segment(s)).collect(),
            };
            let outcome = self
                .master
                .call(
                    request,
                    |mut g, r| async move { g.re_mount_segment(r).await },
                )
                .await?;
            from_outcome(Some(&outcome))?;
        }
        Ok(())
    }

    fn ensure_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed("the store client"))
        } else {
            Ok(())
        }
    }

    fn stage(&self, len: usize) -> Result<Staged> {
        match self.local.take(len) {
            Some(s) => Ok(Staged::Local(s)),
            // The staging buffer is full or too small: a temporary registered allocation.
            None => Ok(Staged::Temporary(Temporary {
                engine: self.engine.clone(),
                arena: self.engine.allocate(len)?,
            })),
        }
    }

    // ----- queries and removal --------------------------------------------------------------

    /// Whether `key` is readable (grants a read lease, as in Mooncake).
    pub async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.batch_exists(&[key.to_owned()]).await?[0])
    }

    /// Per-key existence.
    pub async fn batch_exists(&self, keys: &[String]) -> Result<Vec<bool>> {
        self.ensure_open()?;
        let request = proto::BatchExistKeyRequest {
            keys: keys.to_vec(),
        };
        Ok(self
            .master
            .call(
                request,
                |mut g, r| async move { g.batch_exist_key(r).await },
            )
            .await?
            .exists)
    }

    /// How many leading keys are present: the prefix-cache hit length.
    pub async fn longest_prefix(&self, keys: &[String]) -> Result<usize> {
        Ok(self
            .batch_exists(keys)
            .await?
            .iter()
            .take_while(|e| **e)
            .count())
    }

    /// The size of `key`'s value.
    pub async fn get_size(&self, key: &str) -> Result<u64> {
        self.ensure_open()?;
        Ok(self.lookups.lookup(key).await?.0[0].size)
    }

    /// Removes `key` (a leased object only with `force`).
    pub async fn remove(&self, key: &str, force: bool) -> Result<()> {
        let removal = async {
            self.ensure_open()?;
            let request = proto::RemoveRequest {
                key: key.to_owned(),
                force,
            };
            let outcome = self
                .master
                .call_once(request, |mut g, r| async move { g.remove(r).await })
                .await?;
            from_outcome(Some(&outcome))
        };
        self.metrics
            .observe(Operation::Remove, removal, |()| 0)
            .await
    }

    /// Per-key removal.
    pub async fn batch_remove(&self, keys: &[String], force: bool) -> Result<Vec<Result<()>>> {
        let started = std::time::Instant::now();
        let removed = self.batch_remove_unrecorded(keys, force).await;
        let outcomes: Box<dyn Iterator<Item = Option<u64>>> = match &removed {
            Ok(results) => Box::new(results.iter().map(|r| r.as_ref().ok().map(|()| 0))),
            Err(_) => Box::new(keys.iter().map(|_| None)),
        };
        self.metrics.record(Operation::Remove, started, outcomes);
        removed
    }

    async fn batch_remove_unrecorded(
        &self,
        keys: &[String],
        force: bool,
    ) -> Result<Vec<Result<()>>> {
        self.ensure_open()?;
        let request = proto::BatchRemoveRequest {
            keys: keys.to_vec(),
            force,
        };
        let reply = self
            .master
            .call_once(request, |mut g, r| async move { g.batch_remove(r).await })
            .await?;
        Ok(reply
            .results
            .iter()
            .map(|o| from_outcome(Some(o)))
            .collect())
    }

    /// Removes every key matching `pattern`; returns how many.
    pub async fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        let removal = async {
            self.ensure_open()?;
            let request = proto::RemoveByRegexRequest {
                pattern: pattern.to_owned(),
                force,
            };
            Ok(self
                .master
                .call_once(
                    request,
                    |mut g, r| async move { g.remove_by_regex(r).await },
                )
                .await?
                .count)
        };
        self.metrics
            .observe(Operation::Remove, removal, |_| 0)
            .await
    }

    /// Removes every key; returns how many.
    pub async fn remove_all(&self, force: bool) -> Result<u64> {
        let removal = async {
            self.ensure_open()?;
            let request = proto::RemoveAllRequest { force };
            Ok(self
                .master
                .call_once(request, |mut g, r| async move { g.remove_all(r).await })
                .await?
                .count)
        };
        self.metrics
            .observe(Operation::Remove, removal, |_| 0)
            .await
    }

    /// Unmounts the segment (best effort), stops the heartbeat and closes the engine.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shutdown.cancel();
        self.tracker.wait().await;
        self.reservations.release_all().await;
        for (spec, _) in &self.segments {
            let request = proto::UnmountSegmentRequest {
                client_id: Some(to_uuid(self.id.0)),
                segment_id: Some(to_uuid(spec.id.0)),
            };
            if let Err(e) = self
                .master
                .call(
                    request,
                    |mut g, r| async move { g.unmount_segment(r).await },
                )
                .await
            {
                tracing::debug!("unmount on close: {e}");
            }
        }
        self.engine.close().await;
    }
}

/// A value read from the store. It lives in the staging buffer when there was room (and
/// gives its block back when dropped), else in a vector of its own.
pub enum Value {
    /// In the staging buffer.
    Staged(buffer::Staging),
    /// In its own allocation.
    Owned(Vec<u8>),
}

impl Value {
    /// Marks the first `len` bytes (at most what was reserved) as the value.
    ///
    /// # Safety
    /// A read has written those `len` bytes.
    unsafe fn filled(&mut self, len: usize) {
        match self {
            Self::Staged(s) => s.truncate(len),
            // SAFETY: within the capacity, and written (the caller's contract).
            Self::Owned(v) => unsafe { v.set_len(len.min(v.capacity())) },
        }
    }

    /// The bytes, copied into a vector.
    pub fn to_vec(&self) -> Vec<u8> {
        self.as_ref().to_vec()
    }
}

impl AsRef<[u8]> for Value {
    fn as_ref(&self) -> &[u8] {
        match self {
            Self::Staged(s) => s.as_slice(),
            Self::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Value").field("len", &self.len()).finish()
    }
}

impl PartialEq<Vec<u8>> for Value {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.as_ref() == other.as_slice()
    }
}

impl std::ops::Deref for Value {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

/// Staging memory for one call.
enum Staged {
    Local(buffer::Staging),
    Temporary(Temporary),
}

/// Registered memory allocated for one call, unregistered when dropped.
struct Temporary {
    engine: Arc<TransferEngine>,
    arena: Arc<Arena>,
}

impl Staged {
    fn addr(&self) -> usize {
        match self {
            Self::Local(s) => s.addr(),
            Self::Temporary(t) => t.arena.as_ptr() as usize,
        }
    }
}

impl Drop for Temporary {
    fn drop(&mut self) {
        let _ = self.engine.unregister(self.arena.as_ptr() as usize);
    }
}
