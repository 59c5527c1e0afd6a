//! Everything the master knows, and every way it changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};

use super::allocator::{Block, SegmentAllocator};
use super::config::MasterConfig;
use super::placement::{self, Candidate};
use super::types::{
    ClientId, ClientStatus, ReplicaDesc, ReplicaStatus, SegmentId, SegmentSpec, SoftPin,
    WriteConfig,
};

const MIN_SEGMENT_SIZE: u64 = 1 << 10;
const MAX_SEGMENT_SIZE: u64 = 1 << 40;

struct SegmentEntry {
    spec: SegmentSpec,
    client: ClientId,
    allocator: SegmentAllocator,
    /// Set by a graceful unmount: readable, no new objects, unmounted at this time.
    unmount_at: Option<Instant>,
}

struct ClientEntry {
    last_seen: Instant,
    /// Known to this master since its last (re)mount; a ping from a client that is not gets
    /// NEED_REMOUNT.
    ok: bool,
}

struct Replica {
    id: u64,
    segment: SegmentId,
    block: Block,
    status: ReplicaStatus,
}

struct Object {
    size: u64,
    writer: ClientId,
    put_start: Instant,
    replicas: Vec<Replica>,
    lease_until: Instant,
    soft_pin_until: Option<Instant>,
    pending_soft_pin: SoftPin,
    hard_pinned: bool,
}

impl Object {
    fn readable(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.status == ReplicaStatus::Complete)
    }

    fn writing(&self) -> bool {
        self.replicas
            .iter()
            .any(|r| r.status == ReplicaStatus::Processing)
    }

    fn leased(&self, now: Instant) -> bool {
        self.lease_until > now
    }

    fn soft_pinned(&self, now: Instant) -> bool {
        self.soft_pin_until.is_some_and(|until| until > now)
    }
}

/// Space kept out of circulation until a slow writer or a late reader is surely done with it.
struct Discarded {
    segment: SegmentId,
    block: Block,
    release_at: Instant,
}

/// Counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct MasterStats {
    /// Objects.
    pub keys: u64,
    /// Soft-pinned objects.
    pub soft_pinned_keys: u64,
    /// Bytes reserved in all segments.
    pub allocated_bytes: u64,
    /// Bytes mounted.
    pub capacity_bytes: u64,
    /// Mounted segments.
    pub segments: u64,
    /// Clients known alive.
    pub active_clients: u64,
    /// Objects evicted so far.
    pub evicted_keys: u64,
    /// Bytes evicted so far.
    pub evicted_bytes: u64,
    /// Eviction rounds run.
    pub eviction_rounds: u64,
    /// Writes that found no space.
    pub put_start_alloc_failures: u64,
    /// Writes that got fewer replicas than asked.
    pub put_start_partial_allocations: u64,
    /// Unfinished writes preempted by a newer write.
    pub put_start_discards: u64,
    /// Abandoned writes whose space was released.
    pub put_start_releases: u64,
}

/// One segment, for the admin API.
#[derive(Debug, Clone)]
pub struct SegmentReport {
    /// What was mounted.
    pub spec: SegmentSpec,
    /// Its client.
    pub client: ClientId,
    /// Bytes reserved.
    pub used: u64,
    /// Bytes managed.
    pub capacity: u64,
}

/// The master's state machine. See the module docs.
pub struct Master {
    config: MasterConfig,
    segments: BTreeMap<SegmentId, SegmentEntry>,
    clients: HashMap<ClientId, ClientEntry>,
    objects: HashMap<String, Object>,
    discarded: Vec<Discarded>,
    next_replica: u64,
    need_eviction: bool,
    last_sweep: Option<Instant>,
    stats: MasterStats,
}

impl Master {
    /// An empty master.
    pub fn new(config: MasterConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            segments: BTreeMap::new(),
            clients: HashMap::new(),
            objects: HashMap::new(),
            discarded: Vec::new(),
            next_replica: 1,
            need_eviction: false,
            last_sweep: None,
            stats: MasterStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MasterConfig {
        &self.config
    }

    // ----- segments and clients -------------------------------------------------------------

    /// Mounts a segment. Mounting the same id again is a no-op.
    pub fn mount_segment(
        &mut self,
        now: Instant,
        client: ClientId,
        spec: SegmentSpec,
    ) -> Result<()> {
        if spec.base == 0
            || !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&spec.size)
            || spec.name.is_empty()
        {
            return Err(Error::new(
                ErrorKind::InvalidParams,
                format!(
                    "segment '{}' at {:#x} of {} bytes: needs a name, a non-null base and 1 KiB-1 TiB",
                    spec.name, spec.base, spec.size
                ),
            ));
        }
        self.seen(now, client).ok = true;
        if let Some(existing) = self.segments.get(&spec.id) {
            if existing.client != client {
                return Err(Error::new(
                    ErrorKind::InvalidParams,
                    "segment id mounted by another client",
                ));
            }
            return Ok(());
        }
        let overlaps = self.segments.values().any(|s| {
            s.spec.name == spec.name
                && spec.base < s.spec.base + s.spec.size
                && s.spec.base < spec.base + spec.size
        });
        if overlaps {
            return Err(Error::new(
                ErrorKind::InvalidParams,
                format!(
                    "segment at {:#x} overlaps another segment of '{}'",
                    spec.base, spec.name
                ),
            ));
        }
        tracing::info!(segment = %spec.name, size = spec.size, "segment mounted");
        let allocator = SegmentAllocator::new(spec.size);
        self.segments.insert(
            spec.id,
            SegmentEntry {
                spec,
                client,
                allocator,
                unmount_at: None,
            },
        );
        Ok(())
    }

    /// Mounts a returning client's segments again (after `NEED_REMOUNT`). Their old contents
    /// are gone from metadata.
    pub fn remount_segments(
        &mut self,
        now: Instant,
        client: ClientId,
        specs: Vec<SegmentSpec>,
    ) -> Result<()> {
        for spec in specs {
            self.mount_segment(now, client, spec)?;
        }
        self.seen(now, client).ok = true;
        Ok(())
    }

    /// Unmounts a segment: its replicas are dropped, and objects left without one erased.
    /// Unmounting an unknown id succeeds.
    pub fn unmount_segment(&mut self, client: ClientId, id: SegmentId) -> Result<()> {
        match self.segments.get(&id) {
            None => Ok(()),
            Some(s) if s.client != client => Err(Error::new(
                ErrorKind::InvalidParams,
                "the segment belongs to another client",
            )),
            Some(_) => {
                self.drop_segments(&[id]);
                Ok(())
            }
        }
    }

    /// Stops placing new objects on a segment and unmounts it after `grace`; its objects stay
    /// readable meanwhile.
    pub fn graceful_unmount_segment(
        &mut self,
        now: Instant,
        client: ClientId,
        id: SegmentId,
        grace: Duration,
    ) -> Result<()> {
        match self.segments.get_mut(&id) {
            None => Err(Error::new(ErrorKind::SegmentNotFound, "no such segment")),
            Some(s) if s.client != client => Err(Error::new(
                ErrorKind::InvalidParams,
                "the segment belongs to another client",
            )),
            Some(s) => {
                s.unmount_at = Some(now + grace);
                Ok(())
            }
        }
    }

    /// A client's heartbeat.
    pub fn ping(&mut self, now: Instant, client: ClientId) -> ClientStatus {
        if self.seen(now, client).ok {
            ClientStatus::Ok
        } else {
            ClientStatus::NeedRemount
        }
    }

    fn seen(&mut self, now: Instant, client: ClientId) -> &mut ClientEntry {
        let entry = self.clients.entry(client).or_insert(ClientEntry {
            last_seen: now,
            ok: false,
        });
        entry.last_seen = now;
        entry
    }

    fn drop_segments(&mut self, ids: &[SegmentId]) {
        for id in ids {
            if let Some(s) = self.segments.remove(id) {
                tracing::info!(segment = %s.spec.name, "segment unmounted");
            }
        }
        self.discarded.retain(|d| !ids.contains(&d.segment));
        self.objects.retain(|_, object| {
            object.replicas.retain(|r| !ids.contains(&r.segment));
            !object.replicas.is_empty()
        });
    }

    // ----- writes ---------------------------------------------------------------------------

    /// Phase one of a put: allocates replicas (PROCESSING) for `size` bytes under `key`.
    /// Fails with `ERR_OBJECT_ALREADY_EXISTS` when the key is readable or another write of it
    /// started less than the discard timeout ago; an older unfinished write is preempted.
    pub fn put_start(
        &mut self,
        now: Instant,
        client: ClientId,
        key: &str,
        size: u64,
        config: &WriteConfig,
    ) -> Result<Vec<ReplicaDesc>> {
        self.validate_write(key, size, config)?;
        if let Some(object) = self.objects.get(key) {
            if object.readable() || now < object.put_start + self.config.put_start_discard_timeout {
                return Err(Error::new(
                    ErrorKind::ObjectAlreadyExists,
                    format!("'{key}' already exists"),
                ));
            }
            self.stats.put_start_discards += 1;
            self.discard_object(key, now);
        }
        let replicas = self.allocate(now, key, size, config)?;
        let object = Object {
            size,
            writer: client,
            put_start: now,
            replicas,
            lease_until: now,
            soft_pin_until: None,
            pending_soft_pin: config.soft_pin,
            hard_pinned: config.hard_pin,
        };
        let descs = self.describe(&object);
        self.objects.insert(key.to_owned(), object);
        Ok(descs)
    }

    /// Phase two: the writer moved the bytes; its replicas become readable.
    pub fn put_end(&mut self, now: Instant, client: ClientId, key: &str) -> Result<()> {
        let default_pin = self.config.default_kv_soft_pin_ttl;
        let object = self.writable(client, key)?;
        if !object.writing() {
            return Ok(());
        }
        for replica in &mut object.replicas {
            replica.status = ReplicaStatus::Complete;
        }
        object.lease_until = object.lease_until.max(now);
        match std::mem::take(&mut object.pending_soft_pin) {
            SoftPin::Preserve => {}
            SoftPin::Disable => object.soft_pin_until = None,
            SoftPin::Enable(ttl) => object.soft_pin_until = Some(now + ttl.unwrap_or(default_pin)),
        }
        Ok(())
    }

    /// Abandons a write: its replicas are freed, and the object erased if none is left.
    pub fn put_revoke(&mut self, client: ClientId, key: &str) -> Result<()> {
        let object = self.writable(client, key)?;
        if !object.writing() {
            return Err(Error::new(
                ErrorKind::InvalidWrite,
                format!("no write of '{key}' is in progress"),
            ));
        }
        let (freed, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut object.replicas)
            .into_iter()
            .partition(|r| r.status == ReplicaStatus::Processing);
        object.replicas = keep;
        let empty = object.replicas.is_empty();
        for replica in freed {
            self.free(replica.segment, replica.block);
        }
        if empty {
            self.objects.remove(key);
        }
        Ok(())
    }

    /// Insert or update. Absent keys behave as [`put_start`](Self::put_start). A readable
    /// object of the same size that no reader holds a lease on is rewritten in place (its
    /// replicas go back to PROCESSING and the same addresses are returned); otherwise new
    /// space is allocated and the old replicas are released once their readers' leases end.
    /// A write in progress is preempted.
    pub fn upsert_start(
        &mut self,
        now: Instant,
        client: ClientId,
        key: &str,
        size: u64,
        config: &WriteConfig,
    ) -> Result<Vec<ReplicaDesc>> {
        self.validate_write(key, size, config)?;
        let Some(object) = self.objects.get_mut(key) else {
            return self.put_start(now, client, key, size, config);
        };
        if object.size == size && object.readable() && !object.writing() && !object.leased(now) {
            // New ids: a reader that re-validates by replica id sees the rewrite.
            for replica in &mut object.replicas {
                replica.status = ReplicaStatus::Processing;
                replica.id = self.next_replica;
                self.next_replica += 1;
            }
            object.writer = client;
            object.put_start = now;
            object.pending_soft_pin = config.soft_pin;
            let descs = self.describe(&self.objects[key]);
            return Ok(descs);
        }
        let hard_pinned = object.hard_pinned;
        let soft_pin_until = object.soft_pin_until;
        let replicas = self.allocate(now, key, size, config)?;
        self.discard_object(key, now);
        let object = Object {
            size,
            writer: client,
            put_start: now,
            replicas,
            lease_until: now,
            soft_pin_until,
            pending_soft_pin: config.soft_pin,
            hard_pinned: hard_pinned || config.hard_pin,
        };
        let descs = self.describe(&object);
        self.objects.insert(key.to_owned(), object);
        Ok(descs)
    }

    fn validate_write(&self, key: &str, size: u64, config: &WriteConfig) -> Result<()> {
        let invalid = |message: String| Err(Error::new(ErrorKind::InvalidParams, message));
        if key.is_empty() {
            return invalid("the key must not be empty".into());
        }
        if size == 0 {
            return invalid(format!("'{key}': the value must not be empty"));
        }
        if config.replica_num == 0 {
            return invalid("replicaNum must be at least 1".into());
        }
        let names: HashSet<&str> = self
            .segments
            .values()
            .map(|s| s.spec.name.as_str())
            .collect();
        if config.replica_num as usize > names.len() {
            return invalid(format!(
                "replicaNum {} exceeds the {} segment(s) mounted (replicas go to distinct segments)",
                config.replica_num,
                names.len()
            ));
        }
        if let SoftPin::Enable(Some(ttl)) = config.soft_pin {
            if ttl > self.config.max_kv_soft_pin_ttl {
                return invalid(format!(
                    "soft pin TTL {ttl:?} exceeds the maximum {:?}",
                    self.config.max_kv_soft_pin_ttl
                ));
            }
        }
        Ok(())
    }

    fn writable(&mut self, client: ClientId, key: &str) -> Result<&mut Object> {
        let object = self
            .objects
            .get_mut(key)
            .ok_or_else(|| Error::new(ErrorKind::ObjectNotFound, format!("'{key}' not found")))?;
        if object.writer != client {
            return Err(Error::new(
                ErrorKind::IllegalClient,
                format!("'{key}' is being written by another client"),
            ));
        }
        Ok(object)
    }

    /// Takes `key` out of the map and parks its space until nobody can still be using it: a
    /// writer (PROCESSING replicas) until the release timeout after its start, readers until
    /// their lease ends.
    fn discard_object(&mut self, key: &str, now: Instant) {
        let Some(object) = self.objects.remove(key) else {
            return;
        };
        for replica in object.replicas {
            let release_at = match replica.status {
                ReplicaStatus::Processing => {
                    object.put_start + self.config.put_start_release_timeout
                }
                ReplicaStatus::Complete => object.lease_until.max(now),
            };
            if release_at <= now {
                self.free(replica.segment, replica.block);
            } else {
                self.discarded.push(Discarded {
                    segment: replica.segment,
                    block: replica.block,
                    release_at,
                });
            }
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        key: &str,
        size: u64,
        config: &WriteConfig,
    ) -> Result<Vec<Replica>> {
        let mut replicas = self.try_allocate(key, size, config);
        if replicas.is_empty() {
            // Make room now rather than fail a write the cache could hold.
            self.need_eviction = true;
            self.evict(now);
            replicas = self.try_allocate(key, size, config);
        }
        if replicas.is_empty() {
            self.stats.put_start_alloc_failures += 1;
            return Err(Error::new(
                ErrorKind::NoAvailableHandle,
                format!("no segment has {size} free bytes for '{key}'"),
            ));
        }
        if replicas.len() < config.replica_num as usize {
            self.stats.put_start_partial_allocations += 1;
        }
        Ok(replicas)
    }

    fn try_allocate(&mut self, key: &str, size: u64, config: &WriteConfig) -> Vec<Replica> {
        let ids: Vec<SegmentId> = self.segments.keys().copied().collect();
        let candidates: Vec<Candidate<'_>> = self
            .segments
            .values()
            .enumerate()
            .map(|(index, s)| Candidate {
                index,
                name: &s.spec.name,
                host_id: &s.spec.host_id,
                largest_free: if s.unmount_at.is_some() {
                    0
                } else {
                    s.allocator.largest_free()
                },
                free_ratio: 1.0 - s.allocator.used() as f64 / s.allocator.capacity().max(1) as f64,
            })
            .collect();
        let order = placement::order(
            self.config.allocation_strategy,
            &candidates,
            &config.preferred_segments,
            &config.host_id,
            key,
            size,
        );
        let mut used_names = HashSet::new();
        let mut replicas = Vec::new();
        for index in order {
            if replicas.len() == config.replica_num as usize {
                break;
            }
            let id = ids[index];
            let segment = self.segments.get_mut(&id).expect("listed above");
            if used_names.contains(&segment.spec.name) {
                continue;
            }
            if let Some(block) = segment.allocator.allocate(size) {
                used_names.insert(segment.spec.name.clone());
                replicas.push(Replica {
                    id: self.next_replica,
                    segment: id,
                    block,
                    status: ReplicaStatus::Processing,
                });
                self.next_replica += 1;
            }
        }
        replicas
    }

    fn free(&mut self, segment: SegmentId, block: Block) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.allocator.free(block);
        }
    }

    fn describe(&self, object: &Object) -> Vec<ReplicaDesc> {
        object
            .replicas
            .iter()
            .filter_map(|r| {
                let s = self.segments.get(&r.segment)?;
                Some(ReplicaDesc {
                    id: r.id,
                    segment_name: s.spec.name.clone(),
                    segment_id: s.spec.id,
                    te_endpoint: s.spec.te_endpoint.clone(),
                    address: s.spec.base + r.block.offset,
                    size: object.size,
                    status: r.status,
                })
            })
            .collect()
    }

    // ----- reads ----------------------------------------------------------------------------

    /// The readable replicas of `key`, granting (or extending) a read lease; returns the lease
    /// length too.
    pub fn get_replica_list(
        &mut self,
        now: Instant,
        key: &str,
    ) -> Result<(Vec<ReplicaDesc>, Duration)> {
        let ttl = self.config.default_kv_lease_ttl;
        let object = self
            .objects
            .get_mut(key)
            .ok_or_else(|| Error::new(ErrorKind::ObjectNotFound, format!("'{key}' not found")))?;
        if !object.readable() {
            return Err(Error::new(
                ErrorKind::ReplicaIsNotReady,
                format!("'{key}' is still being written"),
            ));
        }
        object.lease_until = object.lease_until.max(now + ttl);
        let object = &self.objects[key];
        let descs = self
            .describe(object)
            .into_iter()
            .filter(|d| d.status == ReplicaStatus::Complete)
            .collect();
        Ok((descs, ttl))
    }

    /// Whether `key` is readable; a readable key gets a read lease.
    pub fn exist_key(&mut self, now: Instant, key: &str) -> bool {
        let ttl = self.config.default_kv_lease_ttl;
        match self.objects.get_mut(key) {
            Some(object) if object.readable() => {
                object.lease_until = object.lease_until.max(now + ttl);
                true
            }
            _ => false,
        }
    }

    /// The replicas of `key` without a lease (admin view).
    pub fn query_key(&self, key: &str) -> Option<Vec<ReplicaDesc>> {
        self.objects.get(key).map(|object| self.describe(object))
    }

    /// Every key, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<_> = self.objects.keys().cloned().collect();
        keys.sort();
        keys
    }

    // ----- removal --------------------------------------------------------------------------

    /// Removes `key`. Without `force`, a leased object is refused (`ERR_OBJECT_HAS_LEASE`); an
    /// object being written is always refused (`ERR_REPLICA_IS_NOT_READY`).
    pub fn remove(&mut self, now: Instant, key: &str, force: bool) -> Result<()> {
        let object = self
            .objects
            .get(key)
            .ok_or_else(|| Error::new(ErrorKind::ObjectNotFound, format!("'{key}' not found")))?;
        if !force && object.leased(now) {
            return Err(Error::new(
                ErrorKind::ObjectHasLease,
                format!("'{key}' is leased by a reader"),
            ));
        }
        if object.writing() {
            return Err(Error::new(
                ErrorKind::ReplicaIsNotReady,
                format!("'{key}' is being written"),
            ));
        }
        self.discard_object(key, now);
        Ok(())
    }

    /// Removes every key the pattern matches and [`remove`](Self::remove) would accept;
    /// returns how many.
    pub fn remove_by_regex(&mut self, now: Instant, pattern: &str, force: bool) -> Result<u64> {
        let re = regex::Regex::new(pattern).map_err(|e| {
            Error::new(
                ErrorKind::InvalidParams,
                format!("bad regex '{pattern}': {e}"),
            )
        })?;
        let keys: Vec<String> = self
            .objects
            .keys()
            .filter(|k| re.is_match(k))
            .cloned()
            .collect();
        Ok(keys
            .iter()
            .filter(|k| self.remove(now, k, force).is_ok())
            .count() as u64)
    }

    /// Removes every key [`remove`](Self::remove) would accept; returns how many.
    pub fn remove_all(&mut self, now: Instant, force: bool) -> u64 {
        let keys: Vec<String> = self.objects.keys().cloned().collect();
        keys.iter()
            .filter(|k| self.remove(now, k, force).is_ok())
            .count() as u64
    }

    // ----- background work ------------------------------------------------------------------

    /// Periodic work: expires silent clients, releases parked space and abandoned writes, and
    /// evicts when usage is above the high watermark (or an allocation failed).
    pub fn tick(&mut self, now: Instant) {
        if self.discarded.iter().any(|d| d.release_at <= now) {
            let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.discarded)
                .into_iter()
                .partition(|d| d.release_at <= now);
            self.discarded = kept;
            for d in due {
                self.free(d.segment, d.block);
            }
        }
        // Liveness and abandoned writes scan every client and object: once a second is
        // plenty (Mooncake's monitor period); eviction is checked on every tick.
        if self
            .last_sweep
            .is_none_or(|at| now >= at + Duration::from_secs(1))
        {
            self.last_sweep = Some(now);
            self.sweep(now);
        }
        self.evict_if_needed(now);
    }

    /// Drops silent clients with their segments, ends graceful unmounts, forgets long-gone
    /// clients and releases abandoned writes.
    fn sweep(&mut self, now: Instant) {
        let ttl = self.config.client_ttl;
        let dead: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.ok && c.last_seen + ttl <= now)
            .map(|(id, _)| *id)
            .collect();
        for client in dead {
            if let Some(entry) = self.clients.get_mut(&client) {
                entry.ok = false;
            }
            let segments: Vec<SegmentId> = self
                .segments
                .iter()
                .filter(|(_, s)| s.client == client)
                .map(|(id, _)| *id)
                .collect();
            if !segments.is_empty() {
                tracing::warn!(
                    client = client.0,
                    "client missed its pings; dropping its segments"
                );
            }
            self.drop_segments(&segments);
        }
        let ending: Vec<SegmentId> = self
            .segments
            .iter()
            .filter(|(_, s)| s.unmount_at.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        self.drop_segments(&ending);
        let owners: HashSet<ClientId> = self.segments.values().map(|s| s.client).collect();
        self.clients
            .retain(|id, c| c.ok || c.last_seen + 10 * ttl > now || owners.contains(id));

        let release = self.config.put_start_release_timeout;
        let abandoned: Vec<String> = self
            .objects
            .iter()
            .filter(|(_, o)| o.writing() && o.put_start + release <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in abandoned {
            self.stats.put_start_releases += 1;
            self.discard_object(&key, now);
        }
    }

    fn evict_if_needed(&mut self, now: Instant) {
        if self.used_ratio() > self.config.eviction_high_watermark_ratio {
            self.need_eviction = true;
        }
        if self.need_eviction {
            self.evict(now);
        }
    }

    fn used_ratio(&self) -> f64 {
        let (used, capacity) = self.segments.values().fold((0u64, 0u64), |(u, c), s| {
            (u + s.allocator.used(), c + s.allocator.capacity())
        });
        if capacity == 0 {
            0.0
        } else {
            used as f64 / capacity as f64
        }
    }

    /// Mooncake's two-pass eviction: a fraction of the objects, oldest lease first; soft-pinned
    /// objects only in the second pass, leased and hard-pinned ones never.
    fn evict(&mut self, now: Instant) {
        self.need_eviction = false;
        let ratio = self.config.eviction_ratio;
        if ratio <= 0.0 {
            return;
        }
        self.stats.eviction_rounds += 1;
        let used = self.used_ratio();
        let high = self.config.eviction_high_watermark_ratio;
        let target = ratio.max(used - high + ratio);
        let lower = (target * 0.5).max(used - high);
        let base = self.objects.values().filter(|o| o.readable()).count();
        let ideal = (base as f64 * target).ceil() as usize;
        let floor = (base as f64 * lower).ceil() as usize;

        let evictable =
            |o: &Object| o.readable() && !o.writing() && !o.hard_pinned && !o.leased(now);
        let mut plain: Vec<(Instant, String)> = Vec::new();
        let mut pinned: Vec<(Instant, String)> = Vec::new();
        for (key, object) in &self.objects {
            if !evictable(object) {
                continue;
            }
            let entry = (object.lease_until, key.clone());
            if object.soft_pinned(now) {
                pinned.push(entry);
            } else {
                plain.push(entry);
            }
        }
        plain.sort();
        pinned.sort();
        let mut chosen: Vec<String> = plain
            .into_iter()
            .take(ideal.max(1))
            .map(|(_, k)| k)
            .collect();
        if chosen.len() < floor && self.config.allow_evict_soft_pinned_objects {
            let more = floor - chosen.len();
            chosen.extend(pinned.into_iter().take(more).map(|(_, k)| k));
        }
        for key in chosen {
            if let Some(object) = self.objects.get(&key) {
                self.stats.evicted_keys += 1;
                self.stats.evicted_bytes += object.size;
            }
            self.discard_object(&key, now);
        }
    }

    // ----- reports --------------------------------------------------------------------------

    /// Counters and gauges.
    pub fn stats(&self, now: Instant) -> MasterStats {
        let mut stats = self.stats.clone();
        stats.keys = self.objects.len() as u64;
        stats.soft_pinned_keys =
            self.objects.values().filter(|o| o.soft_pinned(now)).count() as u64;
        stats.segments = self.segments.len() as u64;
        stats.active_clients = self.clients.values().filter(|c| c.ok).count() as u64;
        for s in self.segments.values() {
            stats.allocated_bytes += s.allocator.used();
            stats.capacity_bytes += s.allocator.capacity();
        }
        stats
    }

    /// Every mounted segment.
    pub fn segments(&self) -> Vec<SegmentReport> {
        self.segments
            .values()
            .map(|s| SegmentReport {
                spec: s.spec.clone(),
                client: s.client,
                used: s.allocator.used(),
                capacity: s.allocator.capacity(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
