//! The two phases of a write. `put_start`/`upsert_start` grant a [`WriteId`]; `put_end` and
//! `put_revoke` must name it. A step that names a write which is no longer the object's
//! current one (preempted, revoked, removed, expired) fails with `ERR_INVALID_WRITE` and
//! changes nothing but the parked space of that write, which its writer has now let go of.

use std::collections::HashSet;
use std::time::Instant;

use mooncake_common::{Error, ErrorKind, Result};

use super::space::Release;
use super::{check_key, Master, Object, MAX_SEGMENT_SIZE};
use crate::master::types::{ClientId, ReplicaStatus, SoftPin, WriteConfig, WriteGrant, WriteId};

impl Master {
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
    ) -> Result<WriteGrant> {
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
        let object = self.new_object(now, client, size, config, replicas);
        Ok(self.insert_writing(key, object))
    }

    /// Insert or update. Absent keys behave as [`put_start`](Self::put_start). A readable
    /// object of the same size, with at least the replicas asked for, that no reader holds a
    /// lease on is rewritten in place (its replicas go back to PROCESSING with new ids and the
    /// same addresses); otherwise new space is allocated and the old replicas are parked until
    /// their readers' leases end. A write in progress is preempted.
    pub fn upsert_start(
        &mut self,
        now: Instant,
        client: ClientId,
        key: &str,
        size: u64,
        config: &WriteConfig,
    ) -> Result<WriteGrant> {
        self.validate_write(key, size, config)?;
        let Some(object) = self.objects.get(key) else {
            return self.put_start(now, client, key, size, config);
        };
        let in_place = object.size == size
            && object.replicas.len() >= config.replica_num as usize
            && object.readable()
            && !object.writing()
            && !object.leased(now);
        if in_place {
            let write = self.new_write();
            // Its bytes are about to change: the log must stop vouching for them first.
            self.touch_key(key);
            let Some(mut object) = self.objects.remove(key) else {
                return Err(Error::new(ErrorKind::InternalError, "object vanished"));
            };
            // New ids: a reader that re-validates by replica id sees the rewrite.
            for replica in &mut object.replicas {
                replica.status = ReplicaStatus::Processing;
                replica.id = self.next_replica;
                self.next_replica = self.next_replica.saturating_add(1);
            }
            object.write = write;
            object.writer = client;
            object.put_start = now;
            object.pending_soft_pin = config.soft_pin;
            return Ok(self.insert_writing(key, object));
        }
        let hard_pinned = object.hard_pinned;
        let soft_pin_until = object.soft_pin_until;
        let preempting = object.writing();
        let replicas = self.allocate(now, key, size, config)?;
        if preempting {
            self.stats.put_start_discards += 1;
        }
        self.discard_object(key, now);
        // The replaced object's pins pass on.
        let mut object = self.new_object(now, client, size, config, replicas);
        object.soft_pin_until = soft_pin_until;
        object.hard_pinned |= hard_pinned;
        Ok(self.insert_writing(key, object))
    }

    /// A new object whose write fills freshly allocated `replicas`.
    fn new_object(
        &mut self,
        now: Instant,
        client: ClientId,
        size: u64,
        config: &WriteConfig,
        replicas: Vec<super::Replica>,
    ) -> Object {
        Object {
            size,
            write: self.new_write(),
            writer: client,
            put_start: now,
            replicas,
            lease_until: now,
            soft_pin_until: None,
            pending_soft_pin: config.soft_pin,
            hard_pinned: config.hard_pin,
        }
    }

    /// Phase two: the writer moved the bytes of `write`; its replicas become readable. Ending
    /// a write that already ended is a no-op.
    pub fn put_end(
        &mut self,
        now: Instant,
        client: ClientId,
        key: &str,
        write: WriteId,
    ) -> Result<()> {
        check_key(key)?;
        let default_pin = self.config.default_kv_soft_pin_ttl;
        let Some(object) = self.current_write(client, key, write)? else {
            // The writer is done with the write's space: its bytes landed.
            self.release_parked(client, write, Release::Now, now);
            return Err(stale(key, write));
        };
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
        self.touch_key(key);
        Ok(())
    }

    /// Abandons `write`: its replicas are parked until bytes still in flight to them have
    /// surely landed, and the object is erased if none is left.
    pub fn put_revoke(
        &mut self,
        now: Instant,
        client: ClientId,
        key: &str,
        write: WriteId,
    ) -> Result<()> {
        check_key(key)?;
        let Some(object) = self.current_write(client, key, write)? else {
            self.release_parked(client, write, Release::AfterLanding, now);
            return Err(stale(key, write));
        };
        if !object.writing() {
            return Err(Error::new(
                ErrorKind::InvalidWrite,
                format!("write {} of '{key}' was already committed", write.0),
            ));
        }
        let (revoked, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut object.replicas)
            .into_iter()
            .partition(|r| r.status == ReplicaStatus::Processing);
        object.replicas = keep;
        let empty = object.replicas.is_empty();
        let until = now + self.landing_grace();
        for replica in revoked {
            self.park(replica.segment, replica.block, until, None);
        }
        if empty {
            self.objects.remove(key);
        }
        Ok(())
    }

    /// The object whose current write is `write`, or `None` when `write` is not (or no
    /// longer) the current write of `key`.
    fn current_write(
        &mut self,
        client: ClientId,
        key: &str,
        write: WriteId,
    ) -> Result<Option<&mut Object>> {
        match self.objects.get_mut(key) {
            Some(object) if object.write == write => {
                if object.writer != client {
                    return Err(Error::new(
                        ErrorKind::IllegalClient,
                        format!("write {} of '{key}' belongs to another client", write.0),
                    ));
                }
                Ok(Some(object))
            }
            _ => Ok(None),
        }
    }

    pub(super) fn new_write(&mut self) -> WriteId {
        let write = WriteId(self.next_write);
        self.next_write = self.next_write.saturating_add(1);
        write
    }

    fn insert_writing(&mut self, key: &str, object: Object) -> WriteGrant {
        let grant = WriteGrant {
            write: object.write,
            replicas: self.describe(&object),
        };
        self.objects.insert(key.to_owned(), object);
        grant
    }

    fn validate_write(&self, key: &str, size: u64, config: &WriteConfig) -> Result<()> {
        let invalid = |message: String| Err(Error::new(ErrorKind::InvalidArgument, message));
        check_key(key)?;
        if size == 0 {
            return invalid(format!("'{key}': the value must not be empty"));
        }
        if size > MAX_SEGMENT_SIZE {
            return invalid(format!(
                "'{key}': {size} bytes is more than any segment can hold"
            ));
        }
        if config.replica_num == 0 {
            return invalid("replicaNum must be at least 1".into());
        }
        let names: HashSet<&str> = self
            .segments
            .values()
            .filter(|s| s.alive())
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
}

fn stale(key: &str, write: WriteId) -> Error {
    Error::new(
        ErrorKind::InvalidWrite,
        format!(
            "write {} of '{key}' is no longer current (a newer write, a removal or a timeout \
             replaced it)",
            write.0
        ),
    )
}
