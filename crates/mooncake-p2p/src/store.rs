//! [`P2PStore`]: one node of the P2P store, its engine, what it serves and its liveness.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_common::{EngineConfig, Error, ErrorKind, Result};
use mooncake_metadata::{connect, MetadataBackend};
use mooncake_te::TransferEngine;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalogue::{
    check_buffer_names, Catalogue, Change, Location, Payload, PayloadInfo, Shard,
};
use crate::layout::{checksum, shard_places, LocalBuffer};
use crate::liveness::{heartbeat, live_segments};
use crate::pull::{answers, ProgressFn, Pull, PullReport, Pulled};

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct P2PConfig {
    /// Its transfer engine; `metadata` must name a store (etcd, Redis or HTTP).
    pub engine: EngineConfig,
    /// How long the node's liveness entry outlives its last refresh.
    pub liveness_ttl: Duration,
    /// Shards a pull reads at once.
    pub concurrency: usize,
}

impl P2PConfig {
    /// Defaults: 10 s liveness, four shards in flight.
    pub fn new(engine: EngineConfig) -> Self {
        Self {
            engine,
            liveness_ttl: Duration::from_secs(10),
            concurrency: 4,
        }
    }
}

/// Options of [`P2PStore::register`].
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// Largest shard. Default 64 MiB.
    pub max_shard_size: u64,
    /// Replace an entry of the same name already in the catalogue (left by a node that died,
    /// say) rather than fail with `ERR_PAYLOAD_OPENED`.
    pub force: bool,
    /// A name for each buffer (the file it came from, say), kept in the catalogue for pullers.
    pub buffer_names: Option<Vec<String>>,
}

impl Default for RegisterOptions {
    fn default() -> Self {
        Self {
            max_shard_size: 64 << 20,
            force: false,
            buffer_names: None,
        }
    }
}

/// Why this node holds a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Registered,
    Pulling,
    Replica,
}

struct Held {
    role: Role,
    buffers: Vec<(usize, usize)>,
    owners: Vec<Box<dyn Any + Send + Sync>>,
}

/// Shards held when a pull failed, for the next try with the same buffers.
struct Partial {
    buffers: Vec<(usize, usize)>,
    max_shard_size: u64,
    done: Vec<bool>,
}

#[derive(Default)]
struct Local {
    payloads: HashMap<String, Held>,
    partial: HashMap<String, Partial>,
    /// Registered ranges, `addr -> (len, payloads using it)`.
    regions: HashMap<usize, (usize, usize)>,
    /// Owners of memory the engine could not let go of; dropped after the engine closes.
    lingering: Vec<Box<dyn Any + Send + Sync>>,
}

/// One node of the P2P store.
pub struct P2PStore {
    engine: Arc<TransferEngine>,
    catalogue: Catalogue,
    config: P2PConfig,
    local: Mutex<Local>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl P2PStore {
    /// Starts a node: its engine, and its liveness entry. Must run inside a tokio runtime.
    pub async fn start(config: P2PConfig) -> Result<Arc<Self>> {
        let token = config.engine.cluster_token.as_ref();
        let store = match connect(&config.engine.metadata, token)? {
            MetadataBackend::Store(store) => store,
            MetadataBackend::P2pHandshake => {
                return Err(Error::invalid(
                    "the P2P store keeps its catalogue in a metadata store: use etcd://, redis:// or http://, not P2PHANDSHAKE",
                ))
            }
        };
        if config.liveness_ttl < Duration::from_millis(300) {
            return Err(Error::invalid("livenessTtl must be at least 300 ms"));
        }
        let engine = TransferEngine::start(config.engine.clone()).await?;
        let node = Arc::new(Self {
            catalogue: Catalogue::new(store.clone()),
            engine,
            config,
            local: Mutex::new(Local::default()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        node.tasks.spawn(heartbeat(
            store,
            node.engine.segment_name().to_owned(),
            node.config.liveness_ttl,
            node.stop.clone(),
        ));
        Ok(node)
    }

    /// The engine's segment name: what the catalogue's locations call this node.
    pub fn segment_name(&self) -> &str {
        self.engine.segment_name()
    }

    /// The engine, for its statistics.
    pub fn engine(&self) -> &Arc<TransferEngine> {
        &self.engine
    }

    /// Publishes `buffers` as payload `name`: they are cut into shards, each with a checksum,
    /// and this node serves them until [`unregister`](Self::unregister). No bytes move. The
    /// buffers must not change while registered.
    pub async fn register(
        &self,
        name: &str,
        buffers: Vec<LocalBuffer>,
        options: RegisterOptions,
    ) -> Result<()> {
        check_name(name)?;
        let sizes: Vec<u64> = buffers.iter().map(|b| b.len() as u64).collect();
        let places = shard_places(&sizes, options.max_shard_size)?;
        if let Some(names) = &options.buffer_names {
            check_buffer_names(names, sizes.len())?;
        }
        let spans: Vec<(usize, usize)> = buffers.iter().map(|b| (b.addr(), b.len())).collect();
        let owners: Vec<_> = buffers.into_iter().map(LocalBuffer::into_owner).collect();
        self.open(name, Role::Registered, &spans, owners)?;
        let published = self.publish(name, &spans, &places, options).await;
        if let Err(e) = published {
            self.close_payload(name);
            return Err(e);
        }
        Ok(())
    }

    async fn publish(
        &self,
        name: &str,
        spans: &[(usize, usize)],
        places: &[(usize, u64, u64)],
        options: RegisterOptions,
    ) -> Result<()> {
        let ranges: Vec<(usize, usize)> = places
            .iter()
            .map(|&(buffer, offset, len)| (spans[buffer].0 + offset as usize, len as usize))
            .collect();
        // Hashing a checkpoint takes a while: off the async workers. The buffers stay
        // registered, and their owners held, until this returns.
        let sums = tokio::task::spawn_blocking(move || {
            ranges
                .into_iter()
                .map(|(addr, len)| {
                    // SAFETY: the range lies inside a buffer registered above, whose owner
                    // keeps it alive until the payload is closed, which waits for us.
                    checksum(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::new(ErrorKind::InternalError, format!("checksums: {e}")))?;
        let me = self.segment_name();
        let shards = places
            .iter()
            .zip(sums)
            .map(|(&(buffer, offset, len), sum)| Shard {
                size: len,
                gold: vec![Location {
                    segment_name: me.to_owned(),
                    offset: spans[buffer].0 as u64 + offset,
                }],
                replica_list: Vec::new(),
                checksum: Some(sum),
            })
            .collect();
        let payload = Payload {
            name: name.to_owned(),
            size: spans.iter().map(|s| s.1 as u64).sum(),
            size_list: spans.iter().map(|s| s.1 as u64).collect(),
            max_shard_size: options.max_shard_size,
            shards,
            buffer_names: options.buffer_names,
        };
        if options.force {
            let text = serde_json::to_string(&payload)
                .map_err(|e| Error::new(ErrorKind::InternalError, e.to_string()))?;
            self.catalogue
                .store()
                .put(&Catalogue::key(name), &text)
                .await
        } else {
            self.catalogue.create(&payload).await
        }
    }

    /// Stops serving a payload this node registered; its entry goes when no one serves it.
    pub async fn unregister(&self, name: &str) -> Result<()> {
        self.withdraw(name, Role::Registered).await
    }

    /// Stops serving a payload this node pulled.
    pub async fn delete_replica(&self, name: &str) -> Result<()> {
        self.withdraw(name, Role::Replica).await
    }

    async fn withdraw(&self, name: &str, role: Role) -> Result<()> {
        let held = self.lock().payloads.get(name).map(|h| h.role);
        if held != Some(role) {
            let what = match role {
                Role::Registered => "registered",
                _ => "pulled",
            };
            return Err(Error::new(
                ErrorKind::PayloadNotOpened,
                format!("this node has not {what} '{name}'"),
            ));
        }
        let me = self.segment_name().to_owned();
        let removed = self
            .catalogue
            .update(name, |payload| {
                let mut next = payload.clone();
                for shard in &mut next.shards {
                    match role {
                        Role::Registered => shard.gold.retain(|l| l.segment_name != me),
                        _ => shard.replica_list.retain(|l| l.segment_name != me),
                    }
                }
                Ok(if next == *payload {
                    Change::Keep
                } else {
                    Change::Write(next)
                })
            })
            .await;
        match removed {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::PayloadNotFound => {}
            Err(e) => return Err(e),
        }
        self.close_payload(name);
        Ok(())
    }

    /// Removes registrants' copies of `name` from the catalogue on their behalf (those of
    /// `segment`, or all, as Mooncake's unregister does): for a registrant that is gone. The
    /// entry goes when no copy is left. A node's own copies go with
    /// [`unregister`](Self::unregister).
    pub async fn forget(&self, name: &str, segment: Option<&str>) -> Result<()> {
        check_name(name)?;
        let me = self.segment_name();
        if segment.is_none_or(|s| s == me) && self.lock().payloads.contains_key(name) {
            return Err(Error::new(
                ErrorKind::PayloadOpened,
                format!("this node holds '{name}': unregister it instead"),
            ));
        }
        self.catalogue
            .update(name, |payload| {
                let mut next = payload.clone();
                for shard in &mut next.shards {
                    shard
                        .gold
                        .retain(|l| segment.is_some_and(|s| l.segment_name != s));
                }
                Ok(if next == *payload {
                    Change::Keep
                } else {
                    Change::Write(next)
                })
            })
            .await
            .map(drop)
    }

    /// Payloads whose names start with `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<PayloadInfo>> {
        Ok(self
            .catalogue
            .list(prefix)
            .await?
            .iter()
            .map(Payload::info)
            .collect())
    }

    /// Pulls payload `name` into `buffers` (laid out as the registrant's: same count, same
    /// lengths), then serves it too. A pull that failed resumes from the shards it holds
    /// when called again with the same buffers.
    pub async fn get_replica(
        &self,
        name: &str,
        buffers: Vec<LocalBuffer>,
        progress: Option<ProgressFn>,
    ) -> Result<PullReport> {
        check_name(name)?;
        let started = Instant::now();
        let Some((payload, _)) = self.catalogue.get(name).await? else {
            return Err(crate::catalogue::not_found(name));
        };
        let sizes: Vec<u64> = buffers.iter().map(|b| b.len() as u64).collect();
        if sizes != payload.size_list {
            return Err(Error::invalid(format!(
                "'{name}' is laid out in buffers of {:?} bytes; these are {sizes:?}",
                payload.size_list
            )));
        }
        let spans: Vec<(usize, usize)> = buffers.iter().map(|b| (b.addr(), b.len())).collect();
        let owners: Vec<_> = buffers.into_iter().map(LocalBuffer::into_owner).collect();
        self.open(name, Role::Pulling, &spans, owners)?;
        let shard_count = payload.shards.len();
        let mut pull = Pull {
            engine: self.engine.clone(),
            catalogue: self.catalogue.clone(),
            bases: spans.iter().map(|s| s.0).collect(),
            done: vec![false; shard_count],
            payload,
            concurrency: self.config.concurrency,
            progress,
        };
        let resumed_bytes = self.resume(name, &spans, &mut pull);
        let result = match pull.run(name).await {
            Ok(pulled) => self.commit(name, &pull, pulled).await,
            Err(e) => Err(e),
        };
        match result {
            Ok((bytes, retries, sources)) => {
                if let Some(held) = self.lock().payloads.get_mut(name) {
                    held.role = Role::Replica;
                }
                Ok(PullReport {
                    bytes,
                    resumed_bytes,
                    retries,
                    sources,
                    elapsed: started.elapsed(),
                })
            }
            Err(e) => {
                let partial = Partial {
                    buffers: spans,
                    max_shard_size: pull.payload.max_shard_size,
                    done: pull.done,
                };
                let mut local = self.lock();
                local.partial.insert(name.to_owned(), partial);
                drop(local);
                self.close_payload(name);
                Err(e)
            }
        }
    }

    /// Marks the shards an earlier failed pull into the same buffers left behind, once their
    /// bytes check out; the bytes they hold.
    fn resume(&self, name: &str, spans: &[(usize, usize)], pull: &mut Pull) -> u64 {
        let Some(partial) = self.lock().partial.remove(name) else {
            return 0;
        };
        if partial.buffers != spans
            || partial.max_shard_size != pull.payload.max_shard_size
            || partial.done.len() != pull.done.len()
        {
            return 0;
        }
        let Ok(addrs) = pull.shard_addrs() else {
            return 0;
        };
        let mut bytes = 0;
        for (i, held) in partial.done.into_iter().enumerate() {
            let shard = &pull.payload.shards[i];
            let (addr, len) = addrs[i];
            let intact = |sum: &String| {
                // SAFETY: the range lies inside a buffer registered for this pull and kept
                // alive by its owner until the pull ends.
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                checksum(bytes) == *sum
            };
            if held && shard.checksum.as_ref().is_none_or(intact) {
                pull.done[i] = true;
                bytes += len as u64;
            }
        }
        bytes
    }

    /// Adds this node's copies to the catalogue, and drops copies found dead or corrupt.
    async fn commit(
        &self,
        name: &str,
        pull: &Pull,
        pulled: Pulled,
    ) -> Result<(u64, usize, Vec<crate::SourceReport>)> {
        let live = live_segments(self.catalogue.store().as_ref())
            .await
            .unwrap_or_default();
        let mut dead = pulled.sources.unreachable();
        dead.retain(|segment| !live.contains(segment));
        // Copies on nodes that keep no liveness entry and were not read from: one probe each.
        let me = self.segment_name().to_owned();
        let mut silent: HashMap<&str, &Location> = HashMap::new();
        for location in pull.payload.shards.iter().flat_map(Shard::locations) {
            let segment = location.segment_name.as_str();
            if segment != me && !live.contains(segment) && !pulled.sources.knows(segment) {
                silent.entry(segment).or_insert(location);
            }
        }
        let mut probes = tokio::task::JoinSet::new();
        for (segment, at) in silent {
            let (engine, segment, at) = (self.engine.clone(), segment.to_owned(), at.clone());
            probes.spawn(async move { (answers(&engine, &at).await, segment) });
        }
        while let Some(probed) = probes.join_next().await {
            if let Ok((false, segment)) = probed {
                dead.insert(segment);
            }
        }
        let addrs = pull.shard_addrs()?;
        let mine: Vec<Location> = addrs
            .iter()
            .map(|&(addr, _)| Location {
                segment_name: me.clone(),
                offset: addr as u64,
            })
            .collect();
        let updated = self
            .catalogue
            .update(name, |payload| {
                if payload.shards.len() != mine.len() {
                    return Err(Error::new(
                        ErrorKind::PayloadNotFound,
                        format!("'{name}' was replaced while pulled"),
                    ));
                }
                let mut next = payload.clone();
                for (shard, location) in next.shards.iter_mut().zip(&mine) {
                    let keep = |l: &Location| {
                        !dead.contains(&l.segment_name) && !pulled.corrupt.contains(l)
                    };
                    shard.gold.retain(keep);
                    shard.replica_list.retain(|l| keep(l) && l != location);
                    shard.replica_list.push(location.clone());
                }
                Ok(Change::Write(next))
            })
            .await?;
        if updated.is_none() {
            return Err(crate::catalogue::not_found(name));
        }
        if !dead.is_empty() || !pulled.corrupt.is_empty() {
            tracing::info!(
                "P2P '{name}': dropped unreachable sources {dead:?} and corrupt copies {:?}",
                pulled.corrupt
            );
        }
        Ok((pulled.bytes, pulled.retries, pulled.sources.report()))
    }

    /// Withdraws everything this node serves, stops its liveness and closes its engine.
    pub async fn close(&self) {
        let held: Vec<(String, Role)> = self
            .lock()
            .payloads
            .iter()
            .map(|(name, held)| (name.clone(), held.role))
            .collect();
        for (name, role) in held {
            let withdrawn = match role {
                Role::Registered | Role::Replica => self.withdraw(&name, role).await,
                Role::Pulling => Ok(()),
            };
            if let Err(e) = withdrawn {
                tracing::warn!("P2P close: '{name}' stays in the catalogue: {e}");
            }
        }
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.engine.close().await;
        let mut local = self.lock();
        local.payloads.clear();
        local.lingering.clear();
    }

    /// Registers `spans` for payload `name` (shared ranges counted, partial overlaps refused)
    /// and records it locally.
    fn open(
        &self,
        name: &str,
        role: Role,
        spans: &[(usize, usize)],
        owners: Vec<Box<dyn Any + Send + Sync>>,
    ) -> Result<()> {
        if self.engine.is_closed() {
            return Err(Error::closed("the P2P store"));
        }
        let mut local = self.lock();
        if local.payloads.contains_key(name) {
            return Err(Error::new(
                ErrorKind::PayloadOpened,
                format!("this node already holds '{name}'"),
            ));
        }
        check_spans(spans, &local.regions)?;
        let mut added = Vec::new();
        for &(addr, len) in spans {
            if let Some(region) = local.regions.get_mut(&addr) {
                region.1 += 1;
                continue;
            }
            // SAFETY: the memory stays valid while its owner lives; the owner is kept in
            // `Held` until the engine has let go of the range (`close_payload`).
            let registered = unsafe { self.engine.register(addr, len, "*", Box::new(())) };
            if let Err(e) = registered {
                for addr in added {
                    local.regions.remove(&addr);
                    let _ = self.engine.unregister(addr);
                }
                for &(addr, _) in spans {
                    if let Some(region) = local.regions.get_mut(&addr) {
                        region.1 -= 1;
                    }
                }
                return Err(e);
            }
            local.regions.insert(addr, (len, 1));
            added.push(addr);
        }
        local.payloads.insert(
            name.to_owned(),
            Held {
                role,
                buffers: spans.to_vec(),
                owners,
            },
        );
        Ok(())
    }

    /// Forgets payload `name` locally and lets go of ranges no other payload uses.
    fn close_payload(&self, name: &str) {
        let mut local = self.lock();
        let Some(held) = local.payloads.remove(name) else {
            return;
        };
        let mut keep = false;
        for (addr, _) in &held.buffers {
            let Some(region) = local.regions.get_mut(addr) else {
                continue;
            };
            region.1 -= 1;
            if region.1 > 0 {
                continue;
            }
            local.regions.remove(addr);
            if let Err(e) = self.engine.unregister(*addr) {
                tracing::warn!("P2P '{name}': {addr:#x} stays registered: {e}");
                keep = true;
            }
        }
        if keep {
            local.lingering.extend(held.owners);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        // Every change under this lock completes before it is released.
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for P2PStore {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 1024 || name.contains('\0') {
        return Err(Error::invalid(
            "a payload name is 1 to 1024 bytes without NUL",
        ));
    }
    Ok(())
}

/// Refuses empty buffers and buffers that overlap each other or a registered range other
/// than exactly.
fn check_spans(spans: &[(usize, usize)], regions: &HashMap<usize, (usize, usize)>) -> Result<()> {
    let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    let mut seen = HashSet::new();
    for (i, &(addr, len)) in spans.iter().enumerate() {
        if len == 0 || addr.checked_add(len).is_none() {
            return Err(Error::invalid(format!(
                "buffer {i} is empty or out of range"
            )));
        }
        if !seen.insert(addr) || spans[..i].iter().any(|&other| overlap(other, (addr, len))) {
            return Err(Error::new(
                ErrorKind::AddressOverlapped,
                format!("buffer {i} overlaps another buffer of the same payload"),
            ));
        }
        let clash = regions.iter().any(|(&start, &(rlen, _))| {
            (start, rlen) != (addr, len) && overlap((start, rlen), (addr, len))
        });
        if clash {
            return Err(Error::new(
                ErrorKind::AddressOverlapped,
                format!("buffer {i} ({addr:#x}+{len}) overlaps memory of another payload"),
            ));
        }
    }
    Ok(())
}
