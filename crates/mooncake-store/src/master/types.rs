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

/// Rails a client reports with one ping, at most: the troubled ones first (see
/// [`RailState::severity`]).
pub const MAX_REPORTED_RAILS: usize = 64;

/// Longest peer or NIC label of a reported rail, in bytes: a segment name's bound.
pub const MAX_RAIL_LABEL_LEN: usize = 256;

/// What a rail can do now, as its engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RailState {
    /// Selection may pick it, and nothing failed on it since it last carried a slice.
    Usable,
    /// Selection may pick it, but a slice failed on it since it last carried one (a rail with
    /// nowhere else to steer to is never paused).
    Failed,
    /// Not picked: cooling down after errors, or its link is down.
    Paused,
}

impl RailState {
    /// Its name on the dashboard.
    pub fn name(self) -> &'static str {
        match self {
            Self::Usable => "usable",
            Self::Failed => "failed",
            Self::Paused => "paused",
        }
    }

    /// Orders rails for a bounded report, worst first: what must not be cut off comes first.
    pub fn severity(self) -> u8 {
        match self {
            Self::Paused => 0,
            Self::Failed => 1,
            Self::Usable => 2,
        }
    }
}

/// One rail of a client's engine, as its ping reports it: a NIC pair toward a peer segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailReport {
    /// The peer's segment name.
    pub peer: String,
    /// Local NIC or interface (`*`: whatever the routing table picks).
    pub local: String,
    /// The peer's NIC or data address.
    pub remote: String,
    /// What it can do now.
    pub state: RailState,
    /// Bytes it carried.
    pub bytes: u64,
    /// Slices that failed on it.
    pub failures: u64,
}

impl RailReport {
    /// The report with every label cut to [`MAX_RAIL_LABEL_LEN`] bytes and its control
    /// characters replaced: labels go into logs and admin pages.
    pub fn bounded(self) -> Self {
        Self {
            peer: bounded_label(self.peer),
            local: bounded_label(self.local),
            remote: bounded_label(self.remote),
            ..self
        }
    }

    /// The order of a bounded report: worst state first, then by peer and NICs.
    pub fn report_order(&self, other: &Self) -> std::cmp::Ordering {
        (self.state.severity(), &self.peer, &self.local, &self.remote).cmp(&(
            other.state.severity(),
            &other.peer,
            &other.local,
            &other.remote,
        ))
    }
}

/// `text` cut at a character boundary to [`MAX_RAIL_LABEL_LEN`] bytes, control characters
/// replaced. A label cut short is a fresh allocation, so a huge one is not kept alive.
fn bounded_label(text: String) -> String {
    if text.len() <= MAX_RAIL_LABEL_LEN && !text.chars().any(char::is_control) {
        return text;
    }
    let mut bounded = String::with_capacity(text.len().min(MAX_RAIL_LABEL_LEN));
    for c in text.chars() {
        let c = if c.is_control() {
            char::REPLACEMENT_CHARACTER
        } else {
            c
        };
        if bounded.len().saturating_add(c.len_utf8()) > MAX_RAIL_LABEL_LEN {
            break;
        }
        bounded.push(c);
    }
    bounded
}
