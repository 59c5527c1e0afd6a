//! [`P2PStore`]: one node of the P2P store, its engine, what it serves and its liveness.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use mooncake_common::{EngineConfig, Error, ErrorKind, Result};
use mooncake_metadata::{connect, MetadataBackend};
use mooncake_te::TransferEngine;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalogue::{
    check_buffer_names, not_found, Catalogue, Change, Location, Payload, PayloadInfo, Shard,
};
use crate::layout::{checksum, shard_places, LocalBuffer};
use crate::liveness::{heartbeat, live_segments};
use crate::local::{Local, Owner, Partial, Role};
use crate::pull::{answers, ProgressFn, Pull, PullReport, Pulled};

/// Most silent sources one pull probes before it updates the catalogue.
const MAX_PROBES: usize = 16;

/// Settings of a node.
#[derive(Debug, Clone)]
pub struct P2PConfig {
    /// Its transfer engine; `metadata` must name a store (etcd, Redis or HTTP).
    pub engine: EngineConfig,
    /// How long the node's liveness entry outlives its last refresh.
    pub liveness_ttl: Duration,
    /// Shards a pull reads at once.
    pub concurrency: usize,
    /// The least time a shard read is given (more for a large shard, at 32 MB/s) before it
    /// is abandoned and made from another source.
    pub read_timeout: Duration,
}

impl P2PConfig {
    /// Defaults: 10 s liveness, four shards in flight, 5 s per shard read at least.
    pub fn new(engine: EngineConfig) -> Self {
        Self {
            engine,
            liveness_ttl: Duration::from_secs(10),
            concurrency: 4,
            read_timeout: Duration::from_secs(5),
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

/// One node of the P2P store.
pub struct P2PStore {
    me: Weak<P2PStore>,
    engine: Arc<TransferEngine>,
    catalogue: Catalogue,
    config: P2PConfig,
    local: Mutex<Local>,
    /// Held by every catalogue change of this node's own copies, so that restoring them never
    /// races withdrawing them.
    writes: tokio::sync::Mutex<()>,
    /// Registrations and pulls in progress; `close` waits for them.
    calls: TaskTracker,
    closing: AtomicBool,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// A payload opened by a call in progress: closed again if the call ends early (fails, or its
/// future is dropped). The closing waits for the call's reads still in flight (`settling`), so
/// that none lands in buffers used again, then withdraws what the call may have listed.
struct Opening<'a> {
    node: &'a P2PStore,
    name: String,
    armed: bool,
    settling: TaskTracker,
}

impl Opening<'_> {
    fn keep(mut self) {
        self.armed = false;
    }

    /// Closes the payload now: for a call that failed after every read settled and before
    /// anything was listed.
    fn close(mut self) {
        self.armed = false;
        self.node.lock().close(&self.node.engine, &self.name);
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.settling.close();
        let node = self.node;
        let (Some(strong), Ok(runtime)) =
            (node.me.upgrade(), tokio::runtime::Handle::try_current())
        else {
            node.lock().close(&node.engine, &self.name);
            return;
        };
        let (name, settling) = (std::mem::take(&mut self.name), self.settling.clone());
        let cleanup = async move {
            settling.wait().await;
            // Until this closes it, the name is held: no other call of this node has it.
            let _writes = strong.writes.lock().await;
            strong.lock().close(&strong.engine, &name);
            let me = strong.segment_name().to_owned();
            // A call dropped between its catalogue update and its return left this node listed.
            let _ = strong
                .catalogue
                .update(&name, |payload| Ok(without(payload, &me, true, true)))
                .await;
        };
        node.tasks.spawn_on(cleanup, &runtime);
    }
}

/// `payload` without `segment`'s copies (registrant ones, pulled ones, or both).
fn without(payload: &Payload, segment: &str, gold: bool, replicas: bool) -> Change {
    let mut next = payload.clone();
    for shard in &mut next.shards {
        if gold {
            shard.gold.retain(|l| l.segment_name != segment);
        }
        if replicas {
            shard.replica_list.retain(|l| l.segment_name != segment);
        }
    }
    if next == *payload {
        Change::Keep
    } else {
        Change::Write(next)
    }
}

/// Whether `a` and `b` describe the same bytes: same layout and, shard by shard, the same
/// checksum. Entries without checksums (Mooncake's) can never be told apart.
fn same_bytes(a: &Payload, b: &Payload) -> bool {
    a.size_list == b.size_list
        && a.max_shard_size == b.max_shard_size
        && a.shards.len() == b.shards.len()
        && a.shards
            .iter()
            .zip(&b.shards)
            .all(|(x, y)| x.checksum.is_some() && x.checksum == y.checksum)
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
        let node = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            catalogue: Catalogue::new(store.clone(), config.engine.cluster_token.clone()),
            engine,
            config,
            local: Mutex::new(Local::default()),
            writes: tokio::sync::Mutex::new(()),
            calls: TaskTracker::new(),
            closing: AtomicBool::new(false),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        node.tasks.spawn(heartbeat(
            store,
            node.engine.segment_name().to_owned(),
            node.config.liveness_ttl,
            node.stop.clone(),
        ));
        node.tasks.spawn(keep_listed(Arc::downgrade(&node)));
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
        let _call = self.call()?;
        check_name(name)?;
        let sizes: Vec<u64> = buffers.iter().map(|b| b.len() as u64).collect();
        let places = shard_places(&sizes, options.max_shard_size)?;
        if let Some(names) = &options.buffer_names {
            check_buffer_names(names, sizes.len())?;
        }
        let spans: Vec<(usize, usize)> = buffers.iter().map(|b| (b.addr(), b.len())).collect();
        let owners: Vec<Owner> = buffers
            .into_iter()
            .map(|b| Owner::from(b.into_owner()))
            .collect();
        let opening = self.open(name, Role::Registering, &spans, &owners)?;
        let payload = match self.publish(name, &spans, &places, owners, options).await {
            Ok(payload) => payload,
            Err(e) => {
                opening.close();
                return Err(e);
            }
        };
        let mine = payload.shards.iter().map(|s| s.gold[0].clone()).collect();
        self.listed(name, Role::Registered, payload, mine);
        opening.keep();
        Ok(())
    }

    async fn publish(
        &self,
        name: &str,
        spans: &[(usize, usize)],
        places: &[(usize, u64, u64)],
        owners: Vec<Owner>,
        options: RegisterOptions,
    ) -> Result<Payload> {
        let ranges: Vec<(usize, usize)> = places
            .iter()
            .map(|&(buffer, offset, len)| (spans[buffer].0 + offset as usize, len as usize))
            .collect();
        // Hashing a checkpoint takes a while: off the async workers, holding the memory.
        let sums = tokio::task::spawn_blocking(move || {
            let sums = ranges
                .into_iter()
                .map(|(addr, len)| {
                    // SAFETY: the range lies inside a buffer that `owners` keep valid.
                    checksum(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
                })
                .collect::<Vec<_>>();
            drop(owners);
            sums
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
            signature: None,
        };
        if options.force {
            self.catalogue.put(&payload).await?;
        } else {
            self.catalogue.create(&payload).await?;
        }
        Ok(payload)
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
        let _writes = self.writes.lock().await;
        {
            let mut local = self.lock();
            match local.role(name) {
                Some(held) if held == role => local.settle(name, Role::Withdrawing),
                held => {
                    let what = match (role, held) {
                        (_, Some(Role::Registering)) => "finished registering",
                        (_, Some(Role::Pulling)) => "finished pulling",
                        (Role::Registered, _) => "registered",
                        _ => "pulled",
                    };
                    return Err(Error::new(
                        ErrorKind::PayloadNotOpened,
                        format!("this node has not {what} '{name}'"),
                    ));
                }
            }
        }
        let me = self.segment_name().to_owned();
        let gold = role == Role::Registered;
        let removed = self
            .catalogue
            .update(name, |payload| Ok(without(payload, &me, gold, !gold)))
            .await;
        match removed {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::PayloadNotFound => {}
            Err(e) => {
                self.lock().settle(name, role);
                return Err(e);
            }
        }
        self.lock().close(&self.engine, name);
        Ok(())
    }

    /// Removes registrants' copies of `name` from the catalogue on their behalf (those of
    /// `segment`, or all, as Mooncake's unregister does): for a registrant that is gone. The
    /// entry goes when no copy is left. A node's own copies go with
    /// [`unregister`](Self::unregister).
    pub async fn forget(&self, name: &str, segment: Option<&str>) -> Result<()> {
        check_name(name)?;
        let me = self.segment_name();
        if segment.is_none_or(|s| s == me) && self.lock().role(name).is_some() {
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
        let _call = self.call()?;
        check_name(name)?;
        let started = Instant::now();
        let Some((payload, _)) = self.catalogue.get(name).await? else {
            return Err(not_found(name));
        };
        let sizes: Vec<u64> = buffers.iter().map(|b| b.len() as u64).collect();
        if sizes != payload.size_list {
            return Err(Error::invalid(format!(
                "'{name}' is laid out in buffers of {:?} bytes; these are {sizes:?}",
                payload.size_list
            )));
        }
        let spans: Vec<(usize, usize)> = buffers.iter().map(|b| (b.addr(), b.len())).collect();
        let owners: Vec<Owner> = buffers
            .into_iter()
            .map(|b| Owner::from(b.into_owner()))
            .collect();
        let opening = self.open(name, Role::Pulling, &spans, &owners)?;
        let shard_count = payload.shards.len();
        let mut pull = Pull {
            engine: self.engine.clone(),
            catalogue: self.catalogue.clone(),
            bases: spans.iter().map(|s| s.0).collect(),
            owners,
            from: vec![None; shard_count],
            done: vec![false; shard_count],
            payload,
            concurrency: self.config.concurrency,
            progress,
            holding_ttl: self.config.liveness_ttl,
            read_timeout: self.config.read_timeout,
            settling: opening.settling.clone(),
        };
        let resumed_bytes = self.resume(name, &spans, &mut pull);
        let result = match pull.run(name).await {
            Ok(pulled) => self.commit(name, &pull, pulled).await,
            Err(e) => Err(e),
        };
        let offered = crate::partial::key(name, self.segment_name());
        if let Err(e) = self.catalogue.store().delete(&offered).await {
            tracing::debug!("P2P '{name}': the offer of held shards stays until it expires: {e}");
        }
        match result {
            Ok((bytes, retries, sources, listed, mine)) => {
                self.listed(name, Role::Replica, listed, mine);
                opening.keep();
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
                    payload: pull.payload,
                    done: pull.done,
                };
                self.lock().partial.insert(name.to_owned(), partial);
                opening.close();
                Err(e)
            }
        }
    }

    /// Marks the shards an earlier failed pull into the same buffers left behind, once their
    /// bytes match the checksums of the same entry; the bytes they hold. Shards without a
    /// checksum are read again: nothing says they are still what was read.
    fn resume(&self, name: &str, spans: &[(usize, usize)], pull: &mut Pull) -> u64 {
        let Some(partial) = self.lock().partial.remove(name) else {
            return 0;
        };
        if partial.buffers != spans || !same_bytes(&partial.payload, &pull.payload) {
            return 0;
        }
        let Ok(addrs) = pull.shard_addrs() else {
            return 0;
        };
        let mut bytes = 0;
        for (i, held) in partial.done.into_iter().enumerate() {
            let (addr, len) = addrs[i];
            let intact = |sum: &String| {
                // SAFETY: the range lies inside a buffer this pull registered, whose owner
                // the pull holds.
                let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                checksum(bytes) == *sum
            };
            if held && pull.payload.shards[i].checksum.as_ref().is_some_and(intact) {
                pull.done[i] = true;
                bytes += len as u64;
            }
        }
        bytes
    }

    /// Sources that failed and keep no liveness entry, and those never tried that keep none,
    /// which then fail a probe too: they are gone.
    async fn dead_sources(&self, payload: &Payload, pulled: &Pulled) -> HashSet<String> {
        let live = live_segments(self.catalogue.store().as_ref())
            .await
            .unwrap_or_default();
        let me = self.segment_name();
        let mut suspects: Vec<Location> = Vec::new();
        let failed = pulled.sources.unreachable();
        for location in payload.shards.iter().flat_map(Shard::locations) {
            let segment = location.segment_name.as_str();
            let suspect = segment != me
                && !live.contains(segment)
                && (failed.contains(segment) || !pulled.sources.knows(segment));
            if suspect && !suspects.iter().any(|s| s.segment_name == segment) {
                suspects.push(location.clone());
            }
        }
        suspects.truncate(MAX_PROBES);
        let mut probes = tokio::task::JoinSet::new();
        for at in suspects {
            let engine = self.engine.clone();
            probes.spawn(async move { (answers(&engine, &at).await, at.segment_name) });
        }
        let mut dead = HashSet::new();
        while let Some(probed) = probes.join_next().await {
            if let Ok((false, segment)) = probed {
                dead.insert(segment);
            }
        }
        dead
    }

    /// Adds this node's copies to the entry it pulled, if the entry still describes the bytes
    /// pulled, and drops copies found dead or corrupt.
    async fn commit(
        &self,
        name: &str,
        pull: &Pull,
        pulled: Pulled,
    ) -> Result<(u64, usize, Vec<crate::SourceReport>, Payload, Vec<Location>)> {
        let dead = self.dead_sources(&pull.payload, &pulled).await;
        let me = self.segment_name().to_owned();
        let mine: Vec<Location> = pull
            .shard_addrs()?
            .iter()
            .map(|&(addr, _)| Location {
                segment_name: me.clone(),
                offset: addr as u64,
            })
            .collect();
        let updated = self
            .catalogue
            .update(name, |payload| {
                let pulled_from_it = pull.from.iter().zip(&payload.shards).all(|(from, shard)| {
                    shard.checksum.is_some()
                        || from
                            .as_ref()
                            .is_none_or(|f| shard.locations().any(|l| l == f))
                });
                let same = payload.size_list == pull.payload.size_list
                    && payload.max_shard_size == pull.payload.max_shard_size
                    && payload.shards.len() == pull.payload.shards.len()
                    && payload
                        .shards
                        .iter()
                        .zip(&pull.payload.shards)
                        .all(|(a, b)| a.checksum == b.checksum);
                if !same || !pulled_from_it {
                    return Err(Error::new(
                        ErrorKind::PayloadNotFound,
                        format!("'{name}' changed as its pull finished; pull it again"),
                    ));
                }
                let mut next = payload.clone();
                for (shard, location) in next.shards.iter_mut().zip(&mine) {
                    let keep = |l: &Location| {
                        l.segment_name != me
                            && !dead.contains(&l.segment_name)
                            && !pulled.corrupt.contains(l)
                    };
                    shard.gold.retain(keep);
                    shard.replica_list.retain(keep);
                    shard.replica_list.push(location.clone());
                }
                Ok(Change::Write(next))
            })
            .await?;
        let Some(listed) = updated else {
            return Err(not_found(name));
        };
        if !dead.is_empty() || !pulled.corrupt.is_empty() {
            tracing::info!(
                "P2P '{name}': dropped unreachable sources {dead:?} and corrupt copies {:?}",
                pulled.corrupt
            );
        }
        Ok((
            pulled.bytes,
            pulled.retries,
            pulled.sources.report(),
            listed,
            mine,
        ))
    }

    /// Records that `name` is in the catalogue as `payload`, with `mine` as this node's copies.
    fn listed(&self, name: &str, role: Role, payload: Payload, mine: Vec<Location>) {
        let mut local = self.lock();
        local.settle(name, role);
        if let Some(held) = local.payloads.get_mut(name) {
            held.listed = Some((payload, mine));
        }
    }

    /// Puts this node's copies back into entries that lost them (a puller that took this node
    /// for dead while it was paused, say), and entries back that are gone. Only entries with
    /// checksums: for any other, nothing tells the entry this node pulled from one that
    /// replaced it under the same name.
    async fn restore_listing(&self) {
        let _writes = self.writes.lock().await;
        let listed: Vec<(String, Role, Payload, Vec<Location>)> = self
            .lock()
            .payloads
            .iter()
            .filter(|(_, h)| matches!(h.role, Role::Registered | Role::Replica))
            .filter_map(|(name, h)| {
                let (payload, mine) = h.listed.clone()?;
                Some((name.clone(), h.role, payload, mine))
            })
            .filter(|(_, _, payload, _)| same_bytes(payload, payload))
            .collect();
        for (name, role, known, mine) in listed {
            let current = match self.catalogue.get(&name).await {
                Ok(entry) => entry.map(|(payload, _)| payload),
                Err(e) => {
                    tracing::debug!("P2P '{name}': listing not checked: {e}");
                    continue;
                }
            };
            // Shards whose copy here the entry lacks (all, when the entry is gone), put back
            // only if the bytes here still match: a copy dropped as corrupt stays dropped.
            let missing: Vec<usize> = (0..mine.len())
                .filter(|&i| {
                    current.as_ref().is_none_or(|p| {
                        p.shards
                            .get(i)
                            .is_some_and(|s| !s.locations().any(|l| *l == mine[i]))
                    })
                })
                .collect();
            if missing.is_empty() {
                continue;
            }
            let intact: HashSet<usize> = missing
                .iter()
                .copied()
                .filter(|&i| intact(&known.shards[i], &mine[i]))
                .collect();
            if intact.len() < missing.len() {
                tracing::error!(
                    "P2P '{name}': {} shards held here no longer match their checksums; not listed",
                    missing.len() - intact.len()
                );
            }
            if current.is_none() {
                if intact.len() == mine.len() {
                    let mut alone = known.clone();
                    for (shard, copy) in alone.shards.iter_mut().zip(&mine) {
                        let only = vec![copy.clone()];
                        (shard.gold, shard.replica_list) = match role {
                            Role::Registered => (only, Vec::new()),
                            _ => (Vec::new(), only),
                        };
                    }
                    if let Err(e) = self.catalogue.create(&alone).await {
                        tracing::debug!("P2P '{name}': entry not restored: {e}");
                    }
                }
                continue;
            }
            let restored = self
                .catalogue
                .update(&name, |payload| {
                    if !same_bytes(payload, &known) || self.lock().role(&name) != Some(role) {
                        return Ok(Change::Keep);
                    }
                    let mut next = payload.clone();
                    for &i in &intact {
                        let copies = match role {
                            Role::Registered => &mut next.shards[i].gold,
                            _ => &mut next.shards[i].replica_list,
                        };
                        if !copies.contains(&mine[i]) {
                            copies.push(mine[i].clone());
                        }
                    }
                    Ok(if next == *payload {
                        Change::Keep
                    } else {
                        tracing::info!("P2P '{name}': this node's copies are listed again");
                        Change::Write(next)
                    })
                })
                .await;
            if let Err(e) = restored {
                tracing::debug!("P2P '{name}': listing not restored: {e}");
            }
        }
    }

    /// Withdraws everything this node serves, waits for registrations and pulls in progress
    /// (they fail once the engine is closed), stops its liveness and closes its engine.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.withdraw_all().await;
        self.engine.close().await;
        self.calls.close();
        self.calls.wait().await;
        // A registration that finished meanwhile.
        self.withdraw_all().await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let names: Vec<String> = self.lock().payloads.keys().cloned().collect();
        for name in names {
            self.lock().close(&self.engine, &name);
        }
    }

    async fn withdraw_all(&self) {
        let held: Vec<(String, Role)> = self
            .lock()
            .payloads
            .iter()
            .map(|(name, held)| (name.clone(), held.role))
            .filter(|(_, role)| matches!(role, Role::Registered | Role::Replica))
            .collect();
        for (name, role) in held {
            if let Err(e) = self.withdraw(&name, role).await {
                tracing::warn!("P2P close: '{name}' stays in the catalogue: {e}");
            }
        }
    }

    /// Counts a registration or pull in progress; refused once the node is closing.
    fn call(&self) -> Result<tokio_util::task::task_tracker::TaskTrackerToken> {
        if self.closing.load(Ordering::Acquire) || self.engine.is_closed() {
            return Err(Error::closed("the P2P store"));
        }
        Ok(self.calls.token())
    }

    /// Registers `spans` for payload `name` and records it, until the returned guard is kept.
    fn open(
        &self,
        name: &str,
        role: Role,
        spans: &[(usize, usize)],
        owners: &[Owner],
    ) -> Result<Opening<'_>> {
        self.lock().open(&self.engine, name, role, spans, owners)?;
        Ok(Opening {
            node: self,
            name: name.to_owned(),
            armed: true,
            settling: TaskTracker::new(),
        })
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

/// Every liveness period, puts the node's copies back where they went missing; ends with the
/// node.
async fn keep_listed(node: Weak<P2PStore>) {
    let Some((period, stop)) = node
        .upgrade()
        .map(|n| (n.config.liveness_ttl, n.stop.clone()))
    else {
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        let Some(node) = node.upgrade() else { return };
        node.restore_listing().await;
    }
}

/// Whether this node's copy of `shard` at `mine` still matches the shard's checksum.
///
/// Only for a payload this node serves, with the node's `writes` lock held: that keeps the
/// payload, and so its buffers, from being closed meanwhile.
fn intact(shard: &Shard, mine: &Location) -> bool {
    let Some(sum) = &shard.checksum else {
        return false;
    };
    let (Ok(addr), Ok(len)) = (usize::try_from(mine.offset), usize::try_from(shard.size)) else {
        return false;
    };
    // SAFETY: `[addr, addr+len)` is this node's copy of the shard, inside a buffer it
    // registered for a payload it still serves (see above).
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    checksum(bytes) == *sum
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 1024 || name.contains('\0') {
        return Err(Error::invalid(
            "a payload name is 1 to 1024 bytes without NUL",
        ));
    }
    Ok(())
}
