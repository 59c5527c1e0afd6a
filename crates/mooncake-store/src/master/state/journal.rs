//! The state's durable side: which changes clients may see acknowledged, as log entries, and
//! the state rebuilt from a snapshot and entries.
//!
//! The committed state is the mounted segments and the readable objects with their COMPLETE
//! replicas. Methods that change it mark what they touched; [`Master::take_entry`] turns the
//! marks into one [`Entry`] of records that describe the new state of each touched key and
//! segment. The caller appends entries in order and acknowledges only once they are durable.
//!
//! Space a removal frees goes back to the allocator only once the entry that removed its
//! object is durable: otherwise a master that crashed in between would recover the object over
//! bytes that a newer write had already replaced.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use mooncake_common::{Error, ErrorKind, Result};

use super::{Master, Object, Replica, SegmentEntry};
use crate::allocator::{Block, SegmentAllocator};
use crate::master::types::{ClientId, ReplicaStatus, SegmentId, SoftPin, WriteId};
use crate::proto::journal::{
    record::Change, CommittedObject, CommittedReplica, Entry, MountedSegment, Record, Snapshot,
};
use crate::wire::{from_segment, from_uuid, to_segment, to_uuid};

/// Ids a master hands out in one epoch: `epoch << EPOCH_SHIFT` onwards, so that a write id
/// granted by an earlier master (or an earlier life of this one) is never granted again.
const EPOCH_SHIFT: u32 = 40;

/// What the log still has to hear of, and what waits for it.
#[derive(Default)]
pub(super) struct Journal {
    keys: HashSet<String>,
    segments: HashSet<SegmentId>,
    epoch_changed: bool,
    /// Space freed since the last entry.
    freed: Vec<(SegmentId, Block)>,
    /// Space that goes back once entry `.0` is durable.
    awaiting: VecDeque<(u64, SegmentId, Block)>,
    last_seq: u64,
    durable_seq: u64,
    epoch: u64,
}

impl Master {
    /// `key`'s committed state may have changed.
    pub(super) fn touch_key(&mut self, key: &str) {
        if let Some(journal) = &mut self.journal {
            journal.keys.insert(key.to_owned());
        }
    }

    /// A segment was mounted or dropped.
    pub(super) fn touch_segment(&mut self, id: SegmentId) {
        if let Some(journal) = &mut self.journal {
            journal.segments.insert(id);
        }
    }

    /// Returns space to its segment: now, or once the log has the change that freed it.
    pub(super) fn free(&mut self, segment: SegmentId, block: Block) {
        match &mut self.journal {
            Some(journal) => journal.freed.push((segment, block)),
            None => self.free_now(segment, block),
        }
    }

    fn free_now(&mut self, segment: SegmentId, block: Block) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.allocator.free(block);
        }
    }

    /// The changes since the last call as one entry, or `None` when clients saw no change of
    /// the committed state. Call it before releasing the lock that the changes were made
    /// under, so that entries follow the order of the changes.
    pub fn take_entry(&mut self) -> Option<Entry> {
        let journal = self.journal.as_mut()?;
        let mut records = Vec::new();
        if std::mem::take(&mut journal.epoch_changed) {
            records.push(Change::Epoch(journal.epoch));
        }
        let segments = std::mem::take(&mut journal.segments);
        let keys = std::mem::take(&mut journal.keys);
        let freed = std::mem::take(&mut journal.freed);
        for id in segments {
            records.push(match self.segments.get(&id) {
                Some(s) => Change::Mount(mounted(s)),
                None => Change::Unmount(to_uuid(id.0)),
            });
        }
        // Mounts and unmounts first: a commit may name a segment mounted in the same entry.
        records.sort_by_key(|c| !matches!(c, Change::Epoch(_) | Change::Mount(_)));
        for key in keys {
            records.push(match self.objects.get(&key) {
                Some(object) if object.readable() => Change::Commit(self.committed(&key, object)),
                _ => Change::Erase(key),
            });
        }
        let journal = self.journal.as_mut()?;
        if !records.is_empty() {
            journal.last_seq += 1;
        }
        let seq = journal.last_seq;
        let durable = journal.durable_seq;
        for (segment, block) in freed {
            if seq <= durable {
                self.free_now(segment, block);
            } else if let Some(journal) = &mut self.journal {
                journal.awaiting.push_back((seq, segment, block));
            }
        }
        (!records.is_empty()).then(|| Entry {
            seq,
            records: records
                .into_iter()
                .map(|change| Record {
                    change: Some(change),
                })
                .collect(),
            more: false,
            piece: 0,
        })
    }

    /// Drops deferred frees of `segments`, which are gone.
    pub(super) fn forget_frees(&mut self, segments: &[SegmentId]) {
        if let Some(journal) = &mut self.journal {
            journal.freed.retain(|(s, _)| !segments.contains(s));
            journal.awaiting.retain(|(_, s, _)| !segments.contains(s));
        }
    }

    /// Every entry up to `seq` is durable: space they freed goes back.
    pub fn entries_durable(&mut self, seq: u64) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        journal.durable_seq = journal.durable_seq.max(seq);
        let mut ready = Vec::new();
        while let Some(&(at, segment, block)) = journal.awaiting.front() {
            if at > journal.durable_seq {
                break;
            }
            journal.awaiting.pop_front();
            ready.push((segment, block));
        }
        for (segment, block) in ready {
            self.free_now(segment, block);
        }
    }

    /// Space freed but held until the log has the change that freed it.
    #[cfg(test)]
    pub(super) fn awaiting_log(&self) -> Vec<(SegmentId, Block)> {
        self.journal.as_ref().map_or_else(Vec::new, |j| {
            j.freed
                .iter()
                .copied()
                .chain(j.awaiting.iter().map(|&(_, s, b)| (s, b)))
                .collect()
        })
    }

    /// The last entry taken or applied.
    pub fn last_seq(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.last_seq)
    }

    /// The committed state as of [`last_seq`](Self::last_seq).
    pub fn snapshot(&self) -> Snapshot {
        let journal = self.journal.as_ref();
        let mut objects: Vec<CommittedObject> = self
            .objects
            .iter()
            .filter(|(_, o)| o.readable())
            .map(|(key, o)| self.committed(key, o))
            .collect();
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Snapshot {
            seq: journal.map_or(0, |j| j.last_seq),
            epoch: journal.map_or(0, |j| j.epoch),
            segments: self.segments.values().map(mounted).collect(),
            objects,
        }
    }

    /// A master that keeps a log, rebuilt from `snapshot` and the `entries` after it. Every
    /// segment waits for its owner to mount it again; their replicas are not served before.
    pub fn recover(
        config: crate::master::MasterConfig,
        now: Instant,
        snapshot: Option<Snapshot>,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Self> {
        let mut master = Self::new(config)?;
        master.journal = Some(Journal::default());
        if let Some(snapshot) = snapshot {
            master.install(now, snapshot)?;
        }
        for entry in entries {
            master.apply(now, &entry)?;
        }
        Ok(master)
    }

    /// Replaces the state with `snapshot`.
    pub fn install(&mut self, now: Instant, snapshot: Snapshot) -> Result<()> {
        let config = self.config.clone();
        *self = Self::new(config)?;
        self.journal = Some(Journal {
            last_seq: snapshot.seq,
            durable_seq: snapshot.seq,
            ..Journal::default()
        });
        self.set_epoch(snapshot.epoch);
        for segment in snapshot.segments {
            self.apply_mount(now, segment)?;
        }
        for object in snapshot.objects {
            self.apply_commit(object)?;
        }
        Ok(())
    }

    /// Applies the next entry of the log (entries already applied are skipped). A gap or a
    /// record that contradicts the state fails: the state must then be rebuilt.
    pub fn apply(&mut self, now: Instant, entry: &Entry) -> Result<()> {
        let last = self.last_seq();
        if entry.seq <= last {
            return Ok(());
        }
        if Some(entry.seq) != last.checked_add(1) {
            return Err(corrupt(format!(
                "log entry {} follows entry {last}: entries are missing",
                entry.seq
            )));
        }
        for record in &entry.records {
            match record.change.clone() {
                Some(Change::Mount(segment)) => self.apply_mount(now, segment)?,
                Some(Change::Unmount(id)) => self.drop_segments(&[SegmentId(from_uuid(id))], true),
                Some(Change::Commit(object)) => self.apply_commit(object)?,
                Some(Change::Erase(key)) => {
                    if let Some(object) = self.objects.remove(&key) {
                        self.free_blocks(object);
                    }
                }
                Some(Change::Epoch(epoch)) => self.set_epoch(epoch),
                None => return Err(corrupt(format!("entry {} has an empty record", entry.seq))),
            }
        }
        let journal = self.journal.get_or_insert_with(Journal::default);
        journal.keys.clear();
        journal.segments.clear();
        journal.last_seq = entry.seq;
        journal.durable_seq = entry.seq;
        let freed = std::mem::take(&mut journal.freed);
        for (segment, block) in freed {
            self.free_now(segment, block);
        }
        Ok(())
    }

    /// Starts serving after a recovery or as a new leader: a new epoch of ids, which the caller
    /// must make durable before it serves; every segment waits for its owner to remount.
    pub fn begin_epoch(&mut self, now: Instant) {
        let epoch = self
            .journal
            .as_ref()
            .map_or(0, |j| j.epoch)
            .saturating_add(1);
        self.set_epoch(epoch);
        if let Some(journal) = &mut self.journal {
            journal.epoch_changed = true;
        }
        self.clients.clear();
        self.rails.clear();
        for (id, segment) in &mut self.segments {
            segment.dead_since = Some(now);
            self.awaiting_owner.insert(*id);
        }
    }

    /// Ids from a random epoch: a master that keeps no log cannot know which ids an earlier
    /// life of it granted, and a late step naming one must not meet a new grant.
    pub fn ids_from_random_epoch(&mut self) {
        let epoch = fastrand::u64(1..(1 << (64 - EPOCH_SHIFT)));
        let first = epoch << EPOCH_SHIFT | 1;
        self.next_write = first;
        self.next_replica = first;
    }

    fn set_epoch(&mut self, epoch: u64) {
        if let Some(journal) = &mut self.journal {
            journal.epoch = epoch;
        }
        // Beyond 2^24 epochs (restarts and failovers) ids would not fit: the last epoch's
        // range is reused rather than wrapping into the first.
        let first = epoch.min((1 << (64 - EPOCH_SHIFT)) - 1) << EPOCH_SHIFT | 1;
        self.next_write = self.next_write.max(first);
        self.next_replica = self.next_replica.max(first);
    }

    fn apply_mount(&mut self, now: Instant, record: MountedSegment) -> Result<()> {
        let client = ClientId(from_uuid(record.client_id.unwrap_or_default()));
        let spec = from_segment(record.segment)?;
        if let Some(existing) = self.segments.get(&spec.id) {
            if existing.spec == spec && existing.client == client {
                return Ok(());
            }
            return Err(corrupt(format!(
                "segment '{}' mounted twice with different descriptions",
                spec.name
            )));
        }
        self.awaiting_owner.insert(spec.id);
        self.segments.insert(
            spec.id,
            SegmentEntry {
                allocator: SegmentAllocator::new(spec.size),
                spec,
                client,
                unmount_at: None,
                allocatable_at: now,
                dead_since: Some(now),
            },
        );
        Ok(())
    }

    fn apply_commit(&mut self, record: CommittedObject) -> Result<()> {
        if let Some(old) = self.objects.remove(&record.key) {
            self.free_blocks(old);
        }
        let mut replicas = Vec::with_capacity(record.replicas.len());
        for r in &record.replicas {
            let segment = SegmentId(from_uuid(r.segment_id.unwrap_or_default()));
            let block = self
                .segments
                .get_mut(&segment)
                .and_then(|s| s.allocator.reserve(r.offset, r.reserved));
            match block {
                Some(block) => replicas.push(Replica {
                    id: r.id,
                    segment,
                    block,
                    status: ReplicaStatus::Complete,
                }),
                None => {
                    for replica in replicas {
                        self.free_now(replica.segment, replica.block);
                    }
                    return Err(corrupt(format!(
                        "'{}': replica {} is not free in its segment",
                        record.key, r.id
                    )));
                }
            }
        }
        if replicas.is_empty() || replicas.iter().any(|r| r.block.reserved < record.size) {
            for replica in replicas {
                self.free_now(replica.segment, replica.block);
            }
            return Err(corrupt(format!(
                "'{}': a committed object needs replicas that hold it",
                record.key
            )));
        }
        let now = Instant::now();
        let soft_pin_until = record
            .soft_pinned
            .then(|| now + self.config.default_kv_soft_pin_ttl);
        self.objects.insert(
            record.key,
            Object {
                size: record.size,
                write: WriteId(record.write_id),
                writer: ClientId(from_uuid(record.writer.unwrap_or_default())),
                put_start: now,
                replicas,
                lease_until: now,
                soft_pin_until,
                pending_soft_pin: SoftPin::Preserve,
                hard_pinned: record.hard_pinned,
            },
        );
        Ok(())
    }

    fn free_blocks(&mut self, object: Object) {
        for replica in object.replicas {
            self.free_now(replica.segment, replica.block);
        }
    }

    fn committed(&self, key: &str, object: &Object) -> CommittedObject {
        let now = Instant::now();
        CommittedObject {
            key: key.to_owned(),
            size: object.size,
            write_id: object.write.0,
            writer: Some(to_uuid(object.writer.0)),
            replicas: object
                .replicas
                .iter()
                .filter(|r| r.status == ReplicaStatus::Complete)
                .map(|r| CommittedReplica {
                    id: r.id,
                    segment_id: Some(to_uuid(r.segment.0)),
                    offset: r.block.offset,
                    reserved: r.block.reserved,
                })
                .collect(),
            hard_pinned: object.hard_pinned,
            soft_pinned: object.soft_pinned(now),
        }
    }
}

fn mounted(segment: &SegmentEntry) -> MountedSegment {
    MountedSegment {
        client_id: Some(to_uuid(segment.client.0)),
        segment: Some(to_segment(&segment.spec)),
    }
}

fn corrupt(message: String) -> Error {
    Error::new(
        ErrorKind::InternalError,
        format!("the master's log cannot be applied: {message}"),
    )
}
