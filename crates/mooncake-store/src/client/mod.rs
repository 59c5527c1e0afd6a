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
//! - [`master_client`]: RPC plumbing;
//! - [`buffer`]: the staging buffer.

pub mod buffer;
mod lookups;
pub mod master_client;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_common::{EngineConfig, Error, ErrorKind, Result};
use mooncake_te::engine::SubmitOptions;
use mooncake_te::{Opcode, SegmentId as EngineSegment, TransferEngine, TransferRequest};
use mooncake_transport::copy::copy_bytes;
use mooncake_transport::Arena;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::buffer::LocalBuffer;
use self::lookups::Lookups;
use self::master_client::MasterClient;
use crate::master::service::{from_outcome, to_segment, to_uuid};
use crate::master::types::{ClientId, SegmentId, SegmentSpec, SoftPin, WriteConfig};
use crate::proto;

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
        }
    }
}

/// A replica as the client uses it.
#[derive(Debug, Clone)]
struct Replica {
    id: u64,
    endpoint: String,
    address: u64,
    size: u64,
}

fn replicas(list: &[proto::Replica]) -> Vec<Replica> {
    list.iter()
        .map(|r| Replica {
            id: r.id,
            endpoint: r.transport_endpoint.clone(),
            address: r.buffer_address,
            size: r.size,
        })
        .collect()
}

/// How often the client pings the master.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Attempts of a read whose lease keeps running out.
const READ_ATTEMPTS: usize = 3;

/// A store client.
pub struct StoreClient {
    engine: Arc<TransferEngine>,
    master: MasterClient,
    lookups: Arc<Lookups>,
    id: ClientId,
    segments: Vec<(SegmentSpec, Arc<Arena>)>,
    local: Arc<LocalBuffer>,
    host_id: String,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    closed: AtomicBool,
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
        let master = MasterClient::connect(&config.master_address, config.rpc_timeout).await?;
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
                protocol: "tcp".to_owned(),
                host_id: host_id.clone(),
            };
            engine.publish_now().await?;
            let request = proto::MountSegmentRequest {
                client_id: Some(to_uuid(id.0)),
                segment: Some(to_segment(&spec)),
            };
            let outcome = master
                .call(|mut g| async move { g.mount_segment(request).await })
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
                .call(|mut g| async move { g.re_mount_segment(request).await })
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
            master,
            id,
            segments,
            local,
            host_id,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            closed: AtomicBool::new(false),
        });
        client.spawn_heartbeat();
        tracing::info!(client = %name, "store client connected");
        Ok(client)
    }

    /// The Transfer Engine this client runs (for registering buffers, allocating memory).
    pub fn engine(&self) -> &Arc<TransferEngine> {
        &self.engine
    }

    fn spawn_heartbeat(self: &Arc<Self>) {
        let (weak, stop) = (Arc::downgrade(self), self.shutdown.clone());
        self.tracker.spawn(async move {
            let mut failures = 0u32;
            let mut interval = tokio::time::interval(PING_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => {}
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
        };
        let reply = self
            .master
            .call(|mut g| async move { g.ping(request).await })
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
                .call(|mut g| async move { g.re_mount_segment(request).await })
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

    // ----- writes ---------------------------------------------------------------------------

    /// Stores `value` under `key` (insert if absent: an existing key is left as it is).
    pub async fn put(&self, key: &str, value: &[u8], config: &WriteConfig) -> Result<()> {
        self.staged_write(key, value, config, false).await
    }

    /// Inserts or replaces `value` under `key`.
    pub async fn upsert(&self, key: &str, value: &[u8], config: &WriteConfig) -> Result<()> {
        self.staged_write(key, value, config, true).await
    }

    async fn staged_write(
        &self,
        key: &str,
        value: &[u8],
        config: &WriteConfig,
        upsert: bool,
    ) -> Result<()> {
        self.ensure_open()?;
        if value.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidParams,
                format!("'{key}': the value must not be empty"),
            ));
        }
        let staged = self.stage(value.len())?;
        // SAFETY: the staging range is registered memory this call owns until it returns.
        unsafe { copy_bytes(value.as_ptr(), staged.addr() as *mut u8, value.len()) };
        self.write_one(key, staged.addr(), value.len(), config, upsert)
            .await
    }

    /// Stores `len` bytes of registered memory at `addr` under `key` (zero copy).
    pub async fn put_from(
        &self,
        key: &str,
        addr: usize,
        len: usize,
        config: &WriteConfig,
    ) -> Result<()> {
        self.ensure_open()?;
        self.write_one(key, addr, len, config, false).await
    }

    /// Inserts or replaces `key` from registered memory (zero copy).
    pub async fn upsert_from(
        &self,
        key: &str,
        addr: usize,
        len: usize,
        config: &WriteConfig,
    ) -> Result<()> {
        self.ensure_open()?;
        self.write_one(key, addr, len, config, true).await
    }

    async fn write_one(
        &self,
        key: &str,
        addr: usize,
        len: usize,
        config: &WriteConfig,
        upsert: bool,
    ) -> Result<()> {
        let results = self
            .write_from(&[key.to_owned()], &[(addr, len)], config, upsert)
            .await;
        results.into_iter().next().unwrap_or(Ok(()))
    }

    /// Batch of zero-copy puts; one result per key, failures isolated per key.
    pub async fn batch_put_from(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
        config: &WriteConfig,
    ) -> Vec<Result<()>> {
        if let Err(e) = self.ensure_open() {
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        self.write_from(keys, ranges, config, false).await
    }

    /// Batch of copying puts.
    pub async fn batch_put(
        &self,
        keys: &[String],
        values: &[&[u8]],
        config: &WriteConfig,
    ) -> Vec<Result<()>> {
        if let Err(e) = self.ensure_open() {
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        let mut staged = Vec::with_capacity(values.len());
        let mut ranges = Vec::with_capacity(values.len());
        for value in values {
            match self.stage(value.len().max(1)) {
                Ok(s) => {
                    // SAFETY: as in `staged_write`.
                    unsafe { copy_bytes(value.as_ptr(), s.addr() as *mut u8, value.len()) };
                    ranges.push((s.addr(), value.len()));
                    staged.push(s);
                }
                Err(e) => return keys.iter().map(|_| Err(e.clone())).collect(),
            }
        }
        self.write_from(keys, &ranges, config, false).await
    }

    async fn write_from(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
        config: &WriteConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = vec![Ok(()); keys.len()];
        if keys.len() != ranges.len() {
            let e = Error::new(
                ErrorKind::InvalidParams,
                "keys and buffers differ in number",
            );
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        for (i, (key, (addr, len))) in keys.iter().zip(ranges).enumerate() {
            if *len == 0 {
                results[i] = Err(Error::new(
                    ErrorKind::InvalidParams,
                    format!("'{key}': the value must not be empty"),
                ));
            } else if !self.engine.is_registered(*addr, *len) {
                results[i] = Err(Error::new(
                    ErrorKind::InvalidParams,
                    format!("'{key}': the buffer is not registered (registerBuffer it, or use allocate)"),
                ));
            }
        }
        let todo: Vec<usize> = (0..keys.len()).filter(|i| results[*i].is_ok()).collect();
        if todo.is_empty() {
            return results;
        }
        let mut wire = config_to_wire(config);
        if wire.host_id.is_empty() {
            wire.host_id = self.host_id.clone();
        }
        let request = proto::BatchPutStartRequest {
            client_id: Some(to_uuid(self.id.0)),
            keys: todo.iter().map(|i| keys[*i].clone()).collect(),
            sizes: todo.iter().map(|i| ranges[*i].1 as u64).collect(),
            config: Some(wire),
        };
        let started = if upsert {
            self.master
                .call(|mut g| async move { g.batch_upsert_start(request).await })
                .await
        } else {
            self.master
                .call(|mut g| async move { g.batch_put_start(request).await })
                .await
        };
        let started = match started {
            Ok(s) => s.results,
            Err(e) => {
                for i in &todo {
                    results[*i] = Err(e.clone());
                }
                return results;
            }
        };
        // Plan every replica write: local ones are copies, remote ones one engine batch.
        let mut plan: Vec<(usize, Vec<Replica>)> = Vec::new();
        for (i, reply) in todo.iter().zip(started) {
            match from_outcome(reply.outcome.as_ref()) {
                Ok(()) => plan.push((*i, replicas(&reply.replicas))),
                // Put is insert-if-absent, as in Mooncake: the key already holds a value.
                Err(e) if e.kind() == ErrorKind::ObjectAlreadyExists && !upsert => {}
                Err(e) => results[*i] = Err(e),
            }
        }
        let outcomes = self
            .move_bytes(
                plan.iter()
                    .flat_map(|(i, reps)| reps.iter().map(move |r| (*i, r.clone())))
                    .map(|(i, r)| (i, Opcode::Write, ranges[i].0, r))
                    .collect(),
            )
            .await;
        let mut failed: HashMap<usize, Error> = HashMap::new();
        for (i, outcome) in outcomes {
            if let Err(e) = outcome {
                failed.entry(i).or_insert(e);
            }
        }
        let (mut commit, mut revoke) = (Vec::new(), Vec::new());
        for (i, _) in &plan {
            match failed.remove(i) {
                None => commit.push(*i),
                Some(e) => {
                    results[*i] = Err(Error::new(
                        ErrorKind::TransferFail,
                        format!("'{}': {}", keys[*i], e.message()),
                    ));
                    revoke.push(*i);
                }
            }
        }
        for (indices, end) in [(commit, true), (revoke, false)] {
            if indices.is_empty() {
                continue;
            }
            let request = proto::BatchKeysRequest {
                client_id: Some(to_uuid(self.id.0)),
                keys: indices.iter().map(|i| keys[*i].clone()).collect(),
            };
            let reply = if end {
                self.master
                    .call(|mut g| async move { g.batch_put_end(request).await })
                    .await
            } else {
                self.master
                    .call(|mut g| async move { g.batch_put_revoke(request).await })
                    .await
            };
            match reply {
                Ok(reply) if end => {
                    for (i, outcome) in indices.iter().zip(reply.results) {
                        if let Err(e) = from_outcome(Some(&outcome)) {
                            results[*i] = Err(e);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if end => {
                    for i in &indices {
                        results[*i] = Err(e.clone());
                    }
                }
                Err(e) => tracing::warn!("revoking failed writes: {e}"),
            }
        }
        results
    }

    /// Moves bytes for `(item, op, local address, replica)` tuples: copies for replicas in
    /// this process, one engine batch for the rest. Returns each tuple's outcome by item.
    async fn move_bytes(
        &self,
        work: Vec<(usize, Opcode, usize, Replica)>,
    ) -> Vec<(usize, Result<()>)> {
        let mut outcomes = Vec::with_capacity(work.len());
        let mut remote: Vec<(usize, TransferRequest)> = Vec::new();
        let own = self.engine.segment_name();
        for (item, op, local, replica) in work {
            if replica.endpoint == own
                && self
                    .engine
                    .is_registered(replica.address as usize, replica.size as usize)
            {
                let (src, dst) = match op {
                    Opcode::Write => (local as *const u8, replica.address as *mut u8),
                    Opcode::Read => (replica.address as *const u8, local as *mut u8),
                };
                // SAFETY: both ranges are registered memory of this process (checked above and
                // by the caller), and distinct: one is in our segment, the other in the caller's.
                unsafe { copy_bytes(src, dst, replica.size as usize) };
                outcomes.push((item, Ok(())));
                continue;
            }
            match self.segment(&replica.endpoint).await {
                Ok(segment) => remote.push((
                    item,
                    TransferRequest {
                        op,
                        segment,
                        local_addr: local,
                        remote_addr: replica.address,
                        len: replica.size as usize,
                    },
                )),
                Err(e) => outcomes.push((item, Err(e))),
            }
        }
        if remote.is_empty() {
            return outcomes;
        }
        let requests: Vec<TransferRequest> = remote.iter().map(|(_, r)| *r).collect();
        match self.engine.submit(
            &requests,
            SubmitOptions {
                copy_on_caller: true,
                ..SubmitOptions::default()
            },
        ) {
            Err(e) => outcomes.extend(remote.iter().map(|(i, _)| (*i, Err(e.clone())))),
            Ok(batch) => {
                let _ = self.engine.wait(batch).await;
                let reports = self.engine.status(batch).unwrap_or_default();
                self.engine.release_batch(batch);
                for ((item, _), report) in remote.iter().zip(reports) {
                    outcomes.push((
                        *item,
                        match report.error {
                            None => Ok(()),
                            Some(e) => Err(e),
                        },
                    ));
                }
            }
        }
        outcomes
    }

    async fn segment(&self, endpoint: &str) -> Result<EngineSegment> {
        Ok(self.engine.open_segment(endpoint).await?.id)
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

    // ----- reads ----------------------------------------------------------------------------

    /// The value of `key`.
    pub async fn get(&self, key: &str) -> Result<Value> {
        self.ensure_open()?;
        // Read straight into the memory the value is returned in: a block of the (registered)
        // staging buffer, or else a vector registered privately for this one read.
        let mut value: Option<Value> = None;
        let mut registered: Option<usize> = None;
        let result = self
            .read_object(key, |size| {
                if let Some(addr) = registered.take() {
                    let _ = self.engine.unregister(addr);
                }
                let len = size.max(1) as usize;
                if let Some(mut staged) = self.local.take(len) {
                    let addr = staged.as_mut_ptr() as usize;
                    value = Some(Value::Staged(staged));
                    return Ok(addr);
                }
                // Left uninitialised: the read writes it before anything reads it.
                let mut owned = Vec::with_capacity(len);
                let addr = owned.as_mut_ptr() as usize;
                // SAFETY: the vector outlives the registration: it is unregistered below before
                // the vector is moved out, and never reallocated meanwhile.
                unsafe { self.engine.register_private(addr, len, Box::new(())) }?;
                registered = Some(addr);
                value = Some(Value::Owned(owned));
                Ok(addr)
            })
            .await;
        if let Some(addr) = registered {
            let _ = self.engine.unregister(addr);
        }
        let size = result? as usize;
        let mut value = value
            .ok_or_else(|| Error::new(ErrorKind::InternalError, "read without a destination"))?;
        // SAFETY: the read succeeded, so it wrote `size` bytes at the destination.
        unsafe { value.filled(size) };
        Ok(value)
    }

    /// Reads `key` into registered memory at `addr` (capacity `cap`); returns its size.
    pub async fn get_into(&self, key: &str, addr: usize, cap: usize) -> Result<u64> {
        self.ensure_open()?;
        if !self.engine.is_registered(addr, cap.max(1)) {
            return Err(Error::new(
                ErrorKind::InvalidParams,
                "the buffer is not registered (registerBuffer it, or use allocate)",
            ));
        }
        self.read_object(key, |size| {
            if size as usize > cap {
                Err(Error::new(
                    ErrorKind::BufferOverflow,
                    format!("'{key}' is {size} bytes; the buffer holds {cap}"),
                ))
            } else {
                Ok(addr)
            }
        })
        .await
    }

    /// One read: the replica list (one RPC), a destination for the size it names, the bytes,
    /// and the lease check. Returns the size.
    async fn read_object(
        &self,
        key: &str,
        mut destination: impl FnMut(u64) -> Result<usize>,
    ) -> Result<u64> {
        let mut last = None;
        let mut target: Option<(u64, usize)> = None;
        for _ in 0..READ_ATTEMPTS {
            let asked = Instant::now();
            let (list, ttl) = self.lookups.lookup(key).await?;
            let size = list[0].size;
            let addr = match target {
                Some((known, addr)) if known == size => addr,
                _ => {
                    let addr = destination(size)?;
                    target = Some((size, addr));
                    addr
                }
            };
            let used = self.read_any(key, addr, &list).await?;
            if Instant::now() < asked + ttl {
                return Ok(size);
            }
            // The lease ran out while reading: the bytes are good only if the replica we read
            // is still the object's (ids change on removal, eviction and rewrite).
            match self.lookups.lookup(key).await {
                Ok((now, _)) if now.iter().any(|r| r.id == used) => return Ok(size),
                Ok(_) => {
                    last = Some(Error::new(
                        ErrorKind::LeaseExpired,
                        format!("'{key}' changed while being read"),
                    ))
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::new(ErrorKind::LeaseExpired, format!("'{key}' kept changing"))
        }))
    }

    /// Batch of zero-copy reads; one result (the size) per key.
    pub async fn batch_get_into(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
    ) -> Vec<Result<u64>> {
        if keys.len() != ranges.len() {
            let e = Error::new(
                ErrorKind::InvalidParams,
                "keys and buffers differ in number",
            );
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        self.batch_read(keys, |i, size| {
            let (addr, cap) = ranges[i];
            if !self.engine.is_registered(addr, cap.max(1)) {
                return Err(Error::new(
                    ErrorKind::InvalidParams,
                    "the buffer is not registered",
                ));
            }
            if size as usize > cap {
                return Err(Error::new(
                    ErrorKind::BufferOverflow,
                    format!("'{}' is {size} bytes; the buffer holds {cap}", keys[i]),
                ));
            }
            Ok((addr, cap))
        })
        .await
    }

    /// Batch of copying reads; all transfers overlap.
    pub async fn batch_get(&self, keys: &[String]) -> Vec<Result<Value>> {
        let mut staged: Vec<Option<Staged>> = keys.iter().map(|_| None).collect();
        let sizes = self
            .batch_read(keys, |i, size| {
                let block = self.stage(size.max(1) as usize)?;
                let range = (block.addr(), size.max(1) as usize);
                staged[i] = Some(block);
                Ok(range)
            })
            .await;
        sizes
            .into_iter()
            .zip(staged)
            .map(|(size, block)| {
                let size = size? as usize;
                let block = block.ok_or_else(|| {
                    Error::new(ErrorKind::InternalError, "read without a destination")
                })?;
                Ok(match block {
                    Staged::Local(mut staging) => {
                        staging.truncate(size);
                        Value::Staged(staging)
                    }
                    // A temporary allocation goes away with `block`: copy out of it.
                    temporary => {
                        // SAFETY: the read filled `size` bytes of the allocation, alive here.
                        Value::Owned(
                            unsafe {
                                std::slice::from_raw_parts(temporary.addr() as *const u8, size)
                            }
                            .to_vec(),
                        )
                    }
                })
            })
            .collect()
    }

    /// The batch read path: one master round trip for every key's replicas, one engine batch
    /// for every key's best replica into the memory `destination(index, size)` names, and the
    /// careful single-key path for keys whose first choice failed or whose lease ran out.
    async fn batch_read(
        &self,
        keys: &[String],
        mut destination: impl FnMut(usize, u64) -> Result<(usize, usize)>,
    ) -> Vec<Result<u64>> {
        if let Err(e) = self.ensure_open() {
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        let asked = Instant::now();
        let request = proto::BatchGetReplicaListRequest {
            keys: keys.to_vec(),
        };
        let lists = match self
            .master
            .call(|mut g| async move { g.batch_get_replica_list(request).await })
            .await
        {
            Ok(reply) => reply.results,
            Err(e) => return keys.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut results: Vec<Result<u64>> = Vec::with_capacity(keys.len());
        let mut work = Vec::new();
        let mut pending: Vec<Option<((usize, usize), Duration)>> = Vec::with_capacity(keys.len());
        for (i, reply) in lists.iter().enumerate().take(keys.len()) {
            let planned = lookups::parse(
                &keys[i],
                reply.outcome.as_ref(),
                &reply.replicas,
                reply.lease_ttl_ms,
            )
            .and_then(|(list, ttl)| {
                let best = self.preference(&list).swap_remove(0);
                let range = destination(i, best.size)?;
                Ok((best, range, ttl))
            });
            match planned {
                Ok((best, range, ttl)) => {
                    results.push(Ok(best.size));
                    work.push((i, Opcode::Read, range.0, best));
                    pending.push(Some((range, ttl)));
                }
                Err(e) => {
                    results.push(Err(e));
                    pending.push(None);
                }
            }
        }
        let mut failed = vec![false; keys.len()];
        for (i, outcome) in self.move_bytes(work).await {
            failed[i] |= outcome.is_err();
        }
        for (i, entry) in pending.iter().enumerate() {
            let Some(((addr, cap), ttl)) = entry else {
                continue;
            };
            // A failed first choice, or a lease that ran out: take the careful single-key path,
            // which falls back across replicas and re-validates.
            if failed[i] || Instant::now() >= asked + *ttl {
                results[i] = self.get_into(&keys[i], *addr, *cap).await;
            }
        }
        results.resize_with(keys.len(), || {
            Err(Error::new(
                ErrorKind::RpcFail,
                "the master answered fewer keys than asked",
            ))
        });
        results
    }

    /// Replicas best first: this process, then this host, then the rest.
    fn preference(&self, list: &[Replica]) -> Vec<Replica> {
        let own = self.engine.segment_name();
        let host = &self.host_id;
        let mut sorted = list.to_vec();
        sorted.sort_by_key(|r| {
            if r.endpoint == own {
                0
            } else if mooncake_te::address::split_host_port(&r.endpoint)
                .is_ok_and(|(h, _)| &h == host)
            {
                1
            } else {
                2
            }
        });
        sorted
    }

    /// Reads from the best replica, falling back to the next on failure; returns the id of
    /// the replica read.
    async fn read_any(&self, key: &str, addr: usize, list: &[Replica]) -> Result<u64> {
        let mut last = None;
        for replica in self.preference(list) {
            let id = replica.id;
            match self
                .move_bytes(vec![(0, Opcode::Read, addr, replica)])
                .await
                .pop()
            {
                Some((_, Ok(()))) => return Ok(id),
                Some((_, Err(e))) => {
                    tracing::debug!(
                        key,
                        replica = id,
                        "replica read failed, trying the next: {e}"
                    );
                    last = Some(e);
                }
                None => {}
            }
        }
        Err(Error::new(
            ErrorKind::TransferFail,
            format!(
                "every replica of '{key}' failed: {}",
                last.map(|e| e.message().to_owned()).unwrap_or_default()
            ),
        ))
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
            .call(|mut g| async move { g.batch_exist_key(request).await })
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
        self.ensure_open()?;
        let request = proto::RemoveRequest {
            key: key.to_owned(),
            force,
        };
        let outcome = self
            .master
            .call(|mut g| async move { g.remove(request).await })
            .await?;
        from_outcome(Some(&outcome))
    }

    /// Per-key removal.
    pub async fn batch_remove(&self, keys: &[String], force: bool) -> Result<Vec<Result<()>>> {
        self.ensure_open()?;
        let request = proto::BatchRemoveRequest {
            keys: keys.to_vec(),
            force,
        };
        let reply = self
            .master
            .call(|mut g| async move { g.batch_remove(request).await })
            .await?;
        Ok(reply
            .results
            .iter()
            .map(|o| from_outcome(Some(o)))
            .collect())
    }

    /// Removes every key matching `pattern`; returns how many.
    pub async fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        self.ensure_open()?;
        let request = proto::RemoveByRegexRequest {
            pattern: pattern.to_owned(),
            force,
        };
        Ok(self
            .master
            .call(|mut g| async move { g.remove_by_regex(request).await })
            .await?
            .count)
    }

    /// Removes every key; returns how many.
    pub async fn remove_all(&self, force: bool) -> Result<u64> {
        self.ensure_open()?;
        let request = proto::RemoveAllRequest { force };
        Ok(self
            .master
            .call(|mut g| async move { g.remove_all(request).await })
            .await?
            .count)
    }

    /// Unmounts the segment (best effort), stops the heartbeat and closes the engine.
    pub async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shutdown.cancel();
        self.tracker.wait().await;
        for (spec, _) in &self.segments {
            let request = proto::UnmountSegmentRequest {
                client_id: Some(to_uuid(self.id.0)),
                segment_id: Some(to_uuid(spec.id.0)),
            };
            if let Err(e) = self
                .master
                .call(|mut g| async move { g.unmount_segment(request).await })
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

fn config_to_wire(config: &WriteConfig) -> proto::ReplicateConfig {
    let (action, ttl) = match config.soft_pin {
        SoftPin::Preserve => (proto::SoftPinAction::SoftPinPreserve, None),
        SoftPin::Enable(ttl) => (
            proto::SoftPinAction::SoftPinEnable,
            ttl.map(|t| t.as_millis() as u64),
        ),
        SoftPin::Disable => (proto::SoftPinAction::SoftPinDisable, None),
    };
    proto::ReplicateConfig {
        replica_num: config.replica_num,
        preferred_segments: config.preferred_segments.clone(),
        soft_pin_action: action as i32,
        soft_pin_ttl_ms: ttl,
        with_hard_pin: config.hard_pin,
        host_id: config.host_id.clone(),
    }
}
