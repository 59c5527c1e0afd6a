//! Reads: replica lists (which grant leases), existence, and the admin views.

use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};

use super::{check_key, Master, Object};
use crate::master::types::{ClientId, ReplicaDesc, ReplicaStatus, SegmentId, WriteId};

impl Master {
    // ----- reads ----------------------------------------------------------------------------

    /// The readable replicas of `key`, granting (or extending) a read lease; returns the lease
    /// length too.
    pub fn get_replica_list(
        &mut self,
        now: Instant,
        key: &str,
    ) -> Result<(Vec<ReplicaDesc>, Duration)> {
        check_key(key)?;
        let ttl = self.config.default_kv_lease_ttl;
        let object = self
            .objects
            .get(key)
            .ok_or_else(|| Error::new(ErrorKind::ObjectNotFound, format!("'{key}' not found")))?;
        if !object.readable() {
            return Err(Error::new(
                ErrorKind::ReplicaIsNotReady,
                format!("'{key}' is still being written"),
            ));
        }
        let descs: Vec<ReplicaDesc> = self
            .describe(object)
            .into_iter()
            .filter(|d| d.status == ReplicaStatus::Complete && self.serving(d.segment_id))
            .collect();
        if descs.is_empty() {
            return Err(Error::new(
                ErrorKind::UnavailableInCurrentStatus,
                format!(
                    "'{key}': this master recovered it, but the nodes that hold it have not \
                     mounted their memory again yet"
                ),
            ));
        }
        if let Some(object) = self.objects.get_mut(key) {
            object.lease_until = object.lease_until.max(now + ttl);
        }
        Ok((descs, ttl))
    }

    /// Whether `key` is readable; a readable key gets a read lease. An empty or over-long key
    /// is `ERR_INVALID_ARGUMENT`.
    pub fn exist_key(&mut self, now: Instant, key: &str) -> Result<bool> {
        check_key(key)?;
        let ttl = self.config.default_kv_lease_ttl;
        let servable = self.objects.get(key).is_some_and(|object| {
            object
                .replicas
                .iter()
                .any(|r| r.status == ReplicaStatus::Complete && self.serving(r.segment))
        });
        if let (true, Some(object)) = (servable, self.objects.get_mut(key)) {
            object.lease_until = object.lease_until.max(now + ttl);
        }
        Ok(servable)
    }

    /// Whether replicas on `segment` may be read: its owner is alive and has mounted it.
    fn serving(&self, segment: SegmentId) -> bool {
        self.segments.get(&segment).is_some_and(|s| s.alive())
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

    /// One page of keys in order: at most `limit` of those after `after` (all, without it),
    /// and whether more follow. Costs one pass over the keys, not a sort of them all.
    pub fn keys_page(&self, after: Option<&str>, limit: usize) -> (Vec<String>, bool) {
        let mut later: Vec<&String> = self
            .objects
            .keys()
            .filter(|k| after.is_none_or(|after| k.as_str() > after))
            .collect();
        let more = later.len() > limit;
        if more {
            later.select_nth_unstable(limit);
            later.truncate(limit);
        }
        later.sort_unstable();
        (later.into_iter().cloned().collect(), more)
    }

    pub(super) fn describe(&self, object: &Object) -> Vec<ReplicaDesc> {
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
                    protocol: s.spec.protocol.clone(),
                    // Cannot wrap: the block lies inside the segment, whose end was checked.
                    address: s.spec.base.checked_add(r.block.offset)?,
                    size: object.size,
                    status: r.status,
                })
            })
            .collect()
    }

    /// The writer and id of `key`'s write in progress, if one is.
    pub fn write_in_progress(&self, key: &str) -> Option<(ClientId, WriteId)> {
        self.objects
            .get(key)
            .filter(|o| o.writing())
            .map(|o| (o.writer, o.write))
    }
}
