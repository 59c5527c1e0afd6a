//! The periodic tick: parked space, client liveness, abandoned writes and eviction.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{Master, Object};
use crate::master::types::{ClientId, SegmentId};

impl Master {
    /// Periodic work: expires silent clients, releases parked space and abandoned writes, and
    /// evicts when usage is above the high watermark (or an allocation failed).
    pub fn tick(&mut self, now: Instant) {
        self.expire_reservations(now);
        self.release_due(now);
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
                    "client missed its pings; its segments are out of service"
                );
            }
            self.silence_segments(now, &segments);
        }
        // Recovered segments whose owners did not come back: their replicas are gone.
        let unclaimed: Vec<SegmentId> = self
            .awaiting_owner
            .iter()
            .filter(|id| {
                self.segments
                    .get(id)
                    .is_none_or(|s| s.dead_since.is_some_and(|at| at + ttl <= now))
            })
            .copied()
            .collect();
        if !unclaimed.is_empty() {
            tracing::warn!(
                segments = unclaimed.len(),
                "recovered segments were not mounted again within the client TTL; their replicas are dropped"
            );
            for id in &unclaimed {
                self.awaiting_owner.remove(id);
            }
            self.silence_segments(now, &unclaimed);
        }
        let ending: Vec<SegmentId> = self
            .segments
            .iter()
            .filter(|(_, s)| s.unmount_at.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        self.drop_segments(&ending, true);
        // A silent segment is forgotten once nothing on it can be touched any more; its
        // client, if it comes back, mounts it as new.
        let forgotten: Vec<SegmentId> = self
            .segments
            .iter()
            .filter(|(id, s)| {
                !s.alive() && s.allocator.used() == 0 && !self.awaiting_owner.contains(id)
            })
            .map(|(id, _)| *id)
            .collect();
        self.drop_segments(&forgotten, false);
        let owners: HashSet<ClientId> = self.segments.values().map(|s| s.client).collect();
        self.clients
            .retain(|id, c| c.ok || c.last_seen + 10 * ttl > now || owners.contains(id));
        // A silent client's rails say nothing about the cluster now.
        let clients = &self.clients;
        self.rails
            .retain(|id| clients.get(&id).is_some_and(|c| c.ok));

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
        let live = self.segments.values().filter(|s| s.alive());
        let (used, capacity) = live.fold((0u64, 0u64), |(u, c), s| {
            (u + s.allocator.used(), c + s.allocator.capacity())
        });
        if capacity == 0 {
            0.0
        } else {
            used as f64 / capacity as f64
        }
    }

    /// Whether eviction may take `object` in some pass.
    pub(super) fn evictable(&self, object: &Object, now: Instant) -> bool {
        object.readable()
            && !object.writing()
            && !object.hard_pinned
            && !object.leased(now)
            && (self.config.allow_evict_soft_pinned_objects || !object.soft_pinned(now))
    }

    /// Mooncake's two-pass eviction: a fraction of the objects, oldest lease first; soft-pinned
    /// objects only in the second pass, leased and hard-pinned ones never.
    pub(super) fn evict(&mut self, now: Instant) {
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

        let mut plain: Vec<(Instant, String)> = Vec::new();
        let mut pinned: Vec<(Instant, String)> = Vec::new();
        for (key, object) in &self.objects {
            if !self.evictable(object, now) {
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
}
