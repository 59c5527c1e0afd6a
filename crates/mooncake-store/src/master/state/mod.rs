//! Everything the master knows, and every way it changes.
//!
//! - this file: the state, segments and clients, removal and reports;
//! - [`reads`]: replica lists, leases, existence and the admin views;
//! - [`writes`]: the two phases of a write, each step named by its [`WriteId`];
//! - [`space`]: allocation, and space parked until nobody can still touch it;
//! - [`reservations`]: space reserved ahead of need, for puts in one round trip;
//! - [`rails`]: what each live client's engine last said about its rails (never logged);
//! - [`upkeep`]: the periodic tick: liveness, abandoned writes, eviction;
//! - [`journal`]: the log entries of what clients saw acknowledged, and recovery from them.

mod journal;
mod rails;
mod reads;
mod reservations;
mod space;
mod upkeep;
mod writes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};

use self::journal::Journal;
use self::rails::RailBoard;
pub use self::rails::{NodeRails, MAX_STORED_RAILS};
use self::reservations::Reservation;
pub use self::reservations::{ReservationGrant, ReservedPart, MAX_RESERVATION, RESERVATION_TTL};
use self::space::Parked;
use super::config::MasterConfig;
use super::types::{
    ClientId, ClientStatus, ReplicaStatus, SegmentId, SegmentSpec, SoftPin, WriteId,
};
use crate::allocator::{Block, SegmentAllocator};

const MIN_SEGMENT_SIZE: u64 = 1 << 10;
const MAX_SEGMENT_SIZE: u64 = 1 << 40;

/// Longest key, as Mooncake's log allows: every log record names its key, and a record must
/// fit one etcd request.
pub(crate) const MAX_KEY_LEN: usize = 4096;

/// Longest grace period of a graceful unmount.
const MAX_UNMOUNT_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Longest segment name or endpoint: a host name (253) with a port, and room to spare.
pub(crate) const MAX_SEGMENT_NAME_LEN: usize = 256;

/// Refuses an empty or over-long key. Every operation that names a key goes through it, so a
/// key the master would never store costs nothing to ask about.
pub(super) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "the key must not be empty",
        ));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "a key of {} bytes is longer than the {MAX_KEY_LEN} allowed",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// A segment's name and endpoint end up in metrics labels, logs and admin pages: printable,
/// bounded, not empty.
fn check_segment_text(what: &str, text: &str) -> Result<()> {
    let bad = if text.is_empty() {
        Some("is empty".to_owned())
    } else if text.len() > MAX_SEGMENT_NAME_LEN {
        Some(format!(
            "has {} bytes, more than the {MAX_SEGMENT_NAME_LEN} allowed",
            text.len()
        ))
    } else if text.chars().any(char::is_control) {
        Some("contains control characters".to_owned())
    } else {
        None
    };
    match bad {
        Some(why) => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("segment {what} {:?} {why}", truncated(text)),
        )),
        None => Ok(()),
    }
}

/// The start of a caller's text, for an error message.
fn truncated(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A segment whose client went silent and came back takes no new replicas for this long:
/// bytes that were in flight to a frozen owner land as it wakes up, moments before its first
/// ping.
const REMOUNT_SETTLE: Duration = Duration::from_secs(2);

struct SegmentEntry {
    spec: SegmentSpec,
    client: ClientId,
    allocator: SegmentAllocator,
    /// Set by a graceful unmount: readable, no new objects, unmounted at this time.
    unmount_at: Option<Instant>,
    /// No new replicas before this.
    allocatable_at: Instant,
    /// Its client went silent at this time. The segment serves nothing and takes nothing, but
    /// keeps its allocator: the owner may only be frozen, and its old blocks stay parked while
    /// a writer or reader may still touch them, so that a remount can never hand them out.
    dead_since: Option<Instant>,
}

impl SegmentEntry {
    fn alive(&self) -> bool {
        self.dead_since.is_none()
    }
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
    /// The current write: the one whose replicas these are (PROCESSING) or were (COMPLETE).
    write: WriteId,
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

/// Counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct MasterStats {
    /// Objects.
    pub keys: u64,
    /// Soft-pinned objects.
    pub soft_pinned_keys: u64,
    /// Bytes reserved in all segments.
    pub allocated_bytes: u64,
    /// Bytes of that reserved by no object: parked until no writer or reader can touch them.
    pub parked_bytes: u64,
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
    parked: Vec<Parked>,
    reservations: HashMap<u64, Reservation>,
    next_replica: u64,
    next_write: u64,
    need_eviction: bool,
    last_sweep: Option<Instant>,
    stats: MasterStats,
    /// Present when the master keeps a log.
    journal: Option<Journal>,
    /// Recovered segments whose owners have not mounted them again; their replicas are not
    /// served, and are dropped when the owner does not return within the client TTL.
    awaiting_owner: HashSet<SegmentId>,
    /// The rails live clients reported with their pings.
    rails: RailBoard,
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
            parked: Vec::new(),
            reservations: HashMap::new(),
            next_replica: 1,
            next_write: 1,
            need_eviction: false,
            last_sweep: None,
            stats: MasterStats::default(),
            journal: None,
            awaiting_owner: HashSet::new(),
            rails: RailBoard::default(),
        })
    }

    /// Locks a shared master. A lock poisoned by a panic is taken as it is: every method
    /// leaves the state consistent even when it returns early.
    pub fn lock(state: &std::sync::Mutex<Self>) -> std::sync::MutexGuard<'_, Self> {
        state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration.
    pub fn config(&self) -> &MasterConfig {
        &self.config
    }

    // ----- segments and clients -------------------------------------------------------------

    /// Mounts a segment. Mounting the same id again with the same spec is a no-op, or brings
    /// back a segment whose client had gone silent.
    ///
    /// A segment is refused when its range wraps, when its size is outside 1 KiB-1 TiB, or
    /// when it overlaps a mounted segment of the same endpoint or name: two segments over the
    /// same memory would hand the same bytes to two objects.
    pub fn mount_segment(
        &mut self,
        now: Instant,
        client: ClientId,
        spec: SegmentSpec,
    ) -> Result<()> {
        check_segment_text("name", &spec.name)?;
        check_segment_text("endpoint", &spec.te_endpoint)?;
        // Copied into every replica list: as bounded as the name, though they may be empty.
        for (what, text) in [("protocol", &spec.protocol), ("host id", &spec.host_id)] {
            if !text.is_empty() {
                check_segment_text(what, text)?;
            }
        }
        let end = spec.base.checked_add(spec.size);
        if spec.base == 0
            || end.is_none()
            || !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&spec.size)
        {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "segment '{}' at {:#x} of {} bytes: needs a name, an endpoint, a non-null base, \
                     1 KiB-1 TiB and a range that does not wrap",
                    spec.name, spec.base, spec.size
                ),
            ));
        }
        if let Some(existing) = self.segments.get_mut(&spec.id) {
            if existing.client != client {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    "segment id mounted by another client",
                ));
            }
            if existing.spec != spec {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "segment id already mounted as '{}' at {:#x} of {} bytes",
                        existing.spec.name, existing.spec.base, existing.spec.size
                    ),
                ));
            }
            let restored = self.awaiting_owner.remove(&spec.id);
            if let Some(since) = existing.dead_since.take() {
                // A recovered segment's owner never went silent: only writes granted by the
                // previous master may still be landing, and those began before this one.
                let settled_from = if restored { since } else { now };
                existing.allocatable_at = settled_from + REMOUNT_SETTLE;
                tracing::info!(segment = %spec.name, "segment back");
            }
            self.seen(now, client).ok = true;
            return Ok(());
        }
        let same_memory = |s: &SegmentEntry| {
            (s.spec.te_endpoint == spec.te_endpoint || s.spec.name == spec.name)
                && ranges_overlap(s.spec.base, s.spec.size, spec.base, spec.size)
        };
        let overlapping = self.segments.values().find(|s| s.alive() && same_memory(s));
        if let Some(other) = overlapping {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "segment '{}' at {:#x} of {} bytes overlaps segment '{}' at {:#x} of {} bytes \
                     of the same owner",
                    spec.name,
                    spec.base,
                    spec.size,
                    other.spec.name,
                    other.spec.base,
                    other.spec.size
                ),
            ));
        }
        // A silent segment over the same memory belonged to a process whose endpoint another
        // one now holds: it is gone for good.
        let replaced: Vec<SegmentId> = self
            .segments
            .iter()
            .filter(|(_, s)| !s.alive() && same_memory(s))
            .map(|(id, _)| *id)
            .collect();
        self.drop_segments(&replaced, false);
        self.seen(now, client).ok = true;
        tracing::info!(segment = %spec.name, size = spec.size, "segment mounted");
        self.touch_segment(spec.id);
        let allocator = SegmentAllocator::new(spec.size);
        self.segments.insert(
            spec.id,
            SegmentEntry {
                spec,
                client,
                allocator,
                unmount_at: None,
                allocatable_at: now,
                dead_since: None,
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
                ErrorKind::PermissionDenied,
                "only the client that mounted a segment may unmount it",
            )),
            Some(_) => {
                self.drop_segments(&[id], true);
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
        if grace > MAX_UNMOUNT_GRACE {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a grace period of {grace:?} is longer than the {MAX_UNMOUNT_GRACE:?} allowed"
                ),
            ));
        }
        match self.segments.get_mut(&id) {
            None => Err(Error::new(ErrorKind::SegmentNotFound, "no such segment")),
            Some(s) if s.client != client => Err(Error::new(
                ErrorKind::PermissionDenied,
                "only the client that mounted a segment may unmount it",
            )),
            Some(s) if !s.alive() => Err(Error::new(
                ErrorKind::SegmentNotFound,
                "the segment's client went silent: remount it first",
            )),
            Some(s) => {
                s.unmount_at = Some(now.checked_add(grace).unwrap_or(now));
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

    /// Forgets segments with every replica and parked block on them: their owner unmounted
    /// them (its memory goes away with them) or was replaced. An owner that did not ask and
    /// is still alive is told by its next ping to mount again.
    fn drop_segments(&mut self, ids: &[SegmentId], asked_by_owner: bool) {
        if ids.is_empty() {
            return;
        }
        for id in ids {
            if let Some(s) = self.segments.remove(id) {
                tracing::info!(segment = %s.spec.name, "segment unmounted");
                if !asked_by_owner {
                    if let Some(owner) = self.clients.get_mut(&s.client) {
                        owner.ok = false;
                    }
                }
            }
            self.awaiting_owner.remove(id);
            self.touch_segment(*id);
        }
        self.parked.retain(|p| !ids.contains(&p.segment));
        self.drop_reservations_on(ids);
        // Its blocks went with it: none may be freed into a segment mounted later under the
        // same id.
        self.forget_frees(ids);
        let mut touched = Vec::new();
        self.objects.retain(|key, object| {
            let before = object.replicas.len();
            object.replicas.retain(|r| !ids.contains(&r.segment));
            if object.replicas.len() != before {
                touched.push(key.clone());
            }
            !object.replicas.is_empty()
        });
        for key in touched {
            self.touch_key(&key);
        }
    }

    /// Takes the segments of a silent client out of service: their replicas leave their
    /// objects (objects left without one are erased), and their blocks stay parked while a
    /// reader's lease or an unfinished write may still touch them.
    fn silence_segments(&mut self, now: Instant, ids: &[SegmentId]) {
        if ids.is_empty() {
            return;
        }
        let mut orphans = Vec::new();
        let mut touched = Vec::new();
        let release = self.config.put_start_release_timeout;
        self.objects.retain(|key, object| {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut object.replicas)
                .into_iter()
                .partition(|r| ids.contains(&r.segment));
            object.replicas = kept;
            if !gone.is_empty() {
                touched.push(key.clone());
            }
            for r in gone {
                let (release_at, writer) = match r.status {
                    ReplicaStatus::Processing => (
                        object.put_start + release,
                        Some((object.writer, object.write)),
                    ),
                    ReplicaStatus::Complete => (object.lease_until.max(now), None),
                };
                orphans.push((r.segment, r.block, release_at, writer));
            }
            !object.replicas.is_empty()
        });
        for key in touched {
            self.touch_key(&key);
        }
        for (segment, block, release_at, writer) in orphans {
            if release_at <= now {
                self.free(segment, block);
            } else {
                self.park(segment, block, release_at, writer);
            }
        }
        for id in ids {
            if let Some(s) = self.segments.get_mut(id) {
                s.dead_since.get_or_insert(now);
            }
        }
    }

    // ----- removal --------------------------------------------------------------------------

    /// Removes `key`. Without `force`, a leased object is refused (`ERR_OBJECT_HAS_LEASE`); an
    /// object being written is always refused (`ERR_REPLICA_IS_NOT_READY`).
    pub fn remove(&mut self, now: Instant, key: &str, force: bool) -> Result<()> {
        check_key(key)?;
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
        if pattern.len() > MAX_KEY_LEN {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "a pattern of {} bytes is longer than the {MAX_KEY_LEN} allowed",
                    pattern.len()
                ),
            ));
        }
        let re = regex::Regex::new(pattern).map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
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

    // ----- reports --------------------------------------------------------------------------

    /// Counters and gauges.
    pub fn stats(&self, now: Instant) -> MasterStats {
        let mut stats = self.stats.clone();
        stats.keys = self.objects.len() as u64;
        stats.soft_pinned_keys =
            self.objects.values().filter(|o| o.soft_pinned(now)).count() as u64;
        stats.segments = self.segments.values().filter(|s| s.alive()).count() as u64;
        stats.active_clients = self.clients.values().filter(|c| c.ok).count() as u64;
        for s in self.segments.values().filter(|s| s.alive()) {
            stats.allocated_bytes += s.allocator.used();
            stats.capacity_bytes += s.allocator.capacity();
        }
        stats.parked_bytes = self.parked.iter().map(|p| p.block.reserved).sum();
        stats
    }

    /// Every mounted segment (a silent client's are left out).
    pub fn segments(&self) -> Vec<SegmentReport> {
        self.segments
            .values()
            .filter(|s| s.alive())
            .map(|s| SegmentReport {
                spec: s.spec.clone(),
                client: s.client,
                used: s.allocator.used(),
                capacity: s.allocator.capacity(),
            })
            .collect()
    }

    /// Panics unless the state is consistent: every block (an object's or a parked one) lies
    /// inside its segment, no two overlap, and each segment's allocator counts exactly them.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut blocks: HashMap<SegmentId, Vec<(u64, u64)>> = HashMap::new();
        for object in self.objects.values() {
            assert!(!object.replicas.is_empty(), "an object without replicas");
            let names: std::collections::HashSet<_> =
                object.replicas.iter().map(|r| r.segment).collect();
            assert_eq!(
                names.len(),
                object.replicas.len(),
                "two replicas on one segment"
            );
            for r in &object.replicas {
                assert!(
                    r.block.reserved >= object.size,
                    "a block smaller than its object"
                );
                blocks
                    .entry(r.segment)
                    .or_default()
                    .push((r.block.offset, r.block.reserved));
            }
        }
        for p in &self.parked {
            blocks
                .entry(p.segment)
                .or_default()
                .push((p.block.offset, p.block.reserved));
        }
        for (segment, offset, reserved) in self.reserved_parts() {
            blocks.entry(segment).or_default().push((offset, reserved));
        }
        for (segment, block) in self.awaiting_log() {
            if self.segments.contains_key(&segment) {
                blocks
                    .entry(segment)
                    .or_default()
                    .push((block.offset, block.reserved));
            }
        }
        for (id, list) in &mut blocks {
            let segment = self
                .segments
                .get(id)
                .expect("a block on an unmounted segment");
            list.sort_unstable();
            for pair in list.windows(2) {
                assert!(
                    pair[0].0 + pair[0].1 <= pair[1].0,
                    "blocks overlap in {id:?}"
                );
            }
            let end = list.last().map_or(0, |(o, r)| o + r);
            assert!(
                end <= segment.allocator.capacity(),
                "a block past its segment"
            );
            let counted: u64 = list.iter().map(|(_, r)| r).sum();
            assert_eq!(
                segment.allocator.used(),
                counted,
                "allocated != live + parked"
            );
        }
        for (id, segment) in &self.segments {
            if !blocks.contains_key(id) {
                assert_eq!(segment.allocator.used(), 0, "allocated bytes nobody holds");
            }
        }
        self.rails.check_invariants();
    }
}

fn ranges_overlap(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    // Both ends were checked not to wrap.
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod tests;
