//! Reads: replica lists (which grant leases), existence, and the admin views.

use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};

use super::{Master, Object};
use crate::master::types::{ReplicaDesc, ReplicaStatus};

impl Master {
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
                    // Cannot wrap: the block lies inside the segment, whose end was checked.
                    address: s.spec.base.checked_add(r.block.offset)?,
                    size: object.size,
                    status: r.status,
                })
            })
            .collect()
    }
}
