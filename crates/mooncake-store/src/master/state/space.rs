//! Allocation, and space that no object owns but somebody may still touch.
//!
//! Space leaves an object in three ways, and goes back to the allocator only when nobody can
//! write or read it any more:
//! - a preempted write: its writer may still be moving bytes in, until it ends or revokes
//!   that write (or the release timeout passes, for a writer that vanished);
//! - a revoked write: bytes already sent may still land, for up to the client TTL (an owner
//!   frozen for longer is taken out of service, see `silence_segments`);
//! - a removed, evicted or replaced object: its readers may read until their leases end.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};

use super::{Master, Replica};
use crate::allocator::Block;
use crate::master::placement::{self, Candidate};
use crate::master::types::{ClientId, ReplicaStatus, SegmentId, WriteConfig, WriteId};

/// A block no object owns, kept until `release_at`, or until its writer lets go of it.
pub(super) struct Parked {
    pub(super) segment: SegmentId,
    pub(super) block: Block,
    pub(super) release_at: Instant,
    /// The unfinished write that may still be moving bytes into it.
    pub(super) writer: Option<(ClientId, WriteId)>,
}

/// When a writer's parked space goes back, once the writer has ended or revoked its write.
pub(super) enum Release {
    /// Its transfers completed: the bytes have landed.
    Now,
    /// Its transfers failed: bytes already sent may still land.
    AfterLanding,
}

impl Master {
    /// How long bytes of a failed transfer may still land after the writer gave up.
    pub(super) fn landing_grace(&self) -> Duration {
        self.config.client_ttl
    }

    pub(super) fn park(
        &mut self,
        segment: SegmentId,
        block: Block,
        release_at: Instant,
        writer: Option<(ClientId, WriteId)>,
    ) {
        self.parked.push(Parked {
            segment,
            block,
            release_at,
            writer,
        });
    }

    /// The writer of `write` let go of it: its parked space goes back now or after landing.
    pub(super) fn release_parked(
        &mut self,
        client: ClientId,
        write: WriteId,
        when: Release,
        now: Instant,
    ) {
        let landing = now + self.landing_grace();
        let mut freed = Vec::new();
        self.parked.retain_mut(|p| {
            if p.writer != Some((client, write)) {
                return true;
            }
            p.writer = None;
            match when {
                Release::Now => {
                    freed.push((p.segment, p.block));
                    false
                }
                Release::AfterLanding => {
                    p.release_at = p.release_at.min(landing);
                    true
                }
            }
        });
        for (segment, block) in freed {
            self.free(segment, block);
        }
    }

    /// Frees parked space whose time has come.
    pub(super) fn release_due(&mut self, now: Instant) {
        if !self.parked.iter().any(|p| p.release_at <= now) {
            return;
        }
        let (due, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.release_at <= now);
        self.parked = kept;
        for p in due {
            self.free(p.segment, p.block);
        }
    }

    /// Takes `key` out of the map and parks its space until nobody can still be using it: a
    /// writer (PROCESSING replicas) until it lets go or the release timeout after its start,
    /// readers until their lease ends.
    pub(super) fn discard_object(&mut self, key: &str, now: Instant) {
        let Some(object) = self.objects.remove(key) else {
            return;
        };
        if object.readable() {
            self.touch_key(key);
        }
        for replica in object.replicas {
            let (release_at, writer) = match replica.status {
                ReplicaStatus::Processing => (
                    object.put_start + self.config.put_start_release_timeout,
                    Some((object.writer, object.write)),
                ),
                ReplicaStatus::Complete => (object.lease_until.max(now), None),
            };
            if release_at <= now {
                self.free(replica.segment, replica.block);
            } else {
                self.park(replica.segment, replica.block, release_at, writer);
            }
        }
    }

    pub(super) fn allocate(
        &mut self,
        now: Instant,
        key: &str,
        size: u64,
        config: &WriteConfig,
    ) -> Result<Vec<Replica>> {
        let mut replicas = self.try_allocate(now, key, size, config);
        if replicas.is_empty() && self.eviction_can_help(now, size) {
            // Make room now rather than fail a write the cache could hold.
            self.need_eviction = true;
            self.evict(now);
            replicas = self.try_allocate(now, key, size, config);
        }
        if replicas.is_empty() {
            let settling = self.segments.values().any(|s| {
                s.alive()
                    && s.unmount_at.is_none()
                    && s.allocatable_at > now
                    && s.allocator.largest_free() >= size
            });
            if settling {
                return Err(Error::new(
                    ErrorKind::UnavailableInCurrentStatus,
                    format!(
                        "'{key}': the nodes with room for it mounted again moments ago and take \
                         new objects shortly"
                    ),
                ));
            }
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

    /// Whether evicting could make room for `size` bytes: some segment that takes new
    /// objects is large enough and holds an object that eviction may take.
    fn eviction_can_help(&self, now: Instant, size: u64) -> bool {
        if self.config.eviction_ratio <= 0.0 {
            return false;
        }
        let large_enough: HashSet<SegmentId> = self
            .segments
            .iter()
            .filter(|(_, s)| {
                s.alive()
                    && s.unmount_at.is_none()
                    && s.allocatable_at <= now
                    && s.allocator.capacity() >= size
            })
            .map(|(id, _)| *id)
            .collect();
        !large_enough.is_empty()
            && self.objects.values().any(|o| {
                self.evictable(o, now)
                    && o.replicas.iter().any(|r| large_enough.contains(&r.segment))
            })
    }

    /// [`allocate`](Self::allocate) without evicting anything to make room.
    pub(super) fn allocate_free(
        &mut self,
        now: Instant,
        key: &str,
        size: u64,
        config: &WriteConfig,
    ) -> Vec<Replica> {
        self.try_allocate(now, key, size, config)
    }

    fn try_allocate(
        &mut self,
        now: Instant,
        key: &str,
        size: u64,
        config: &WriteConfig,
    ) -> Vec<Replica> {
        let ids: Vec<SegmentId> = self.segments.keys().copied().collect();
        let candidates: Vec<Candidate<'_>> = self
            .segments
            .values()
            .enumerate()
            .map(|(index, s)| Candidate {
                index,
                name: &s.spec.name,
                host_id: &s.spec.host_id,
                largest_free: if !s.alive() || s.unmount_at.is_some() || s.allocatable_at > now {
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
            let Some(segment) = ids.get(index).and_then(|id| self.segments.get_mut(id)) else {
                continue;
            };
            if used_names.contains(&segment.spec.name) {
                continue;
            }
            if let Some(block) = segment.allocator.allocate(size) {
                used_names.insert(segment.spec.name.clone());
                replicas.push(Replica {
                    id: self.next_replica,
                    segment: segment.spec.id,
                    block,
                    status: ReplicaStatus::Processing,
                });
                self.next_replica = self.next_replica.saturating_add(1);
            }
        }
        replicas
    }
}
