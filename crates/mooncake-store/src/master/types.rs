//! Ids, descriptors and write options, as the master's API speaks them.

use std::time::Duration;

/// A client's id: a random 128-bit value it picks at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u128);

/// A mounted segment's id: a random 128-bit value its client picks per mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId(pub u128);

impl ClientId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(..)))
    }
}

impl SegmentId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(u128::from(fastrand::u64(..)) << 64 | u128::from(fastrand::u64(..)))
    }
}

/// Names one write: what `PutStart`/`UpsertStart` returned. `PutEnd` and `PutRevoke` must name
/// it, so a late or duplicate step of an older write can never commit or free a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriteId(pub u64);

/// What a write's first step grants: its id and where its replicas go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteGrant {
    /// The write's id.
    pub write: WriteId,
    /// The replicas to fill (PROCESSING).
    pub replicas: Vec<ReplicaDesc>,
}

/// A segment a client contributes: `size` bytes of its engine memory at `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSpec {
    /// Per-mount id.
    pub id: SegmentId,
    /// The client's name (several segments may share it).
    pub name: String,
    /// Address of the first byte in the owner's memory.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// What peers pass to `openSegment` to reach it.
    pub te_endpoint: String,
    /// Transport the owner speaks.
    pub protocol: String,
    /// The owner's host, for `local_first` placement.
    pub host_id: String,
}

/// Replica states readers and writers see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaStatus {
    /// Allocated; the writer is moving bytes in.
    Processing,
    /// Committed and readable.
    Complete,
}

/// Where one replica of an object lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaDesc {
    /// Master-wide replica id.
    pub id: u64,
    /// Segment name (the owning client's name).
    pub segment_name: String,
    /// Segment id.
    pub segment_id: SegmentId,
    /// Transfer Engine segment to open.
    pub te_endpoint: String,
    /// Transport the owner speaks.
    pub protocol: String,
    /// Address of the first byte in the owner's memory.
    pub address: u64,
    /// Object size in bytes.
    pub size: u64,
    /// State.
    pub status: ReplicaStatus,
}

/// Soft pin request of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SoftPin {
    /// Keep whatever the object had (new objects: not pinned).
    #[default]
    Preserve,
    /// Pin for this long (default: the master's soft-pin TTL), starting when the write commits.
    Enable(Option<Duration>),
    /// Unpin.
    Disable,
}

/// Options of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteConfig {
    /// Memory replicas, each on a different segment. Default 1.
    pub replica_num: u32,
    /// Segment names tried first, in order.
    pub preferred_segments: Vec<String>,
    /// Soft pin.
    pub soft_pin: SoftPin,
    /// Never evicted; fixed at creation.
    pub hard_pin: bool,
    /// The writer's host, for `local_first` placement.
    pub host_id: String,
}

impl Default for WriteConfig {
    fn default() -> Self {
        Self {
            replica_num: 1,
            preferred_segments: Vec::new(),
            soft_pin: SoftPin::Preserve,
            hard_pin: false,
            host_id: String::new(),
        }
    }
}

/// What a ping tells the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStatus {
    /// Known and alive.
    Ok,
    /// Unknown to this master (restarted, or the client missed its TTL): remount.
    NeedRemount,
}
