//! What moves: engine slices cut into pieces, their rails, and how an outcome is charged.

use super::*;

/// Consecutive local faults after which a context is taken out of service.
pub(super) const MAX_LOCAL_FAILURES: u32 = 32;

pub(super) struct RailEntry {
    pub(super) peer: String,
    pub(super) local_location: String,
    pub(super) remote_location: String,
    pub(super) preferred: Vec<(String, String)>,
    pub(super) available: Vec<(String, String)>,
    pub(super) set: RailSet,
}

pub(super) type RailKey = (String, String, String);

pub(super) struct Registration {
    // Dropped before `region`: the MRs must go before the memory may.
    pub(super) mrs: Vec<Arc<dyn MemoryRegion>>,
    pub(super) remote: bool,
    pub(super) _region: Arc<Region>,
}

/// One engine slice, reported once all its pieces settled.
pub(crate) struct SliceState {
    pub(super) task: Arc<Task>,
    pub(super) len: usize,
    pub(super) region: Mutex<Option<Arc<Region>>>,
    pub(super) left: AtomicUsize,
    pub(super) error: OnceLock<Error>,
}

impl SliceState {
    pub(super) fn piece_finished(&self, outcome: Result<()>) {
        if let Err(e) = outcome {
            let _ = self.error.set(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Let go of the memory before reporting: whoever awaits the task may unregister
            // it the moment it settles.
            drop(lock(&self.region).take());
            match self.error.get() {
                None => self.task.slice_done(self.len),
                Some(e) => self.task.slice_failed(e.clone()),
            }
        }
    }
}

/// A contiguous part of a slice that one work request carries.
pub(crate) struct Piece {
    pub(super) slice: Arc<SliceState>,
    pub(super) op: Opcode,
    pub(super) region_addr: usize,
    pub(super) local_addr: usize,
    pub(super) len: usize,
    pub(super) remote_addr: u64,
    pub(super) peer: Arc<RdmaPeer>,
    pub(super) buffer: usize,
    pub(super) rails: Arc<RailEntry>,
    pub(super) rail: Option<usize>,
    pub(super) avoid: Option<usize>,
    /// A local fault happened on this device: prefer rails of another one.
    pub(super) avoid_device: Option<String>,
    pub(super) attempts: u32,
    pub(super) last_error: Option<Error>,
    pub(super) deadline: Option<TokioInstant>,
}

impl Piece {
    pub(crate) fn expired(&self, now: TokioInstant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

pub(super) struct Posted {
    pub(super) piece: Piece,
    pub(super) ep: Arc<Endpoint>,
    pub(super) qp: usize,
}

/// How a failed attempt counts against its rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Charge {
    /// Not the rail's fault (a flush, a retired endpoint).
    None,
    /// Counts toward the threshold.
    Transient,
    /// The path is broken: pause at once if another rail can take over, else transient.
    Remote,
}

pub(super) fn settle(set: &RailSet, rail: usize, bytes: u64, charge: Charge) {
    match charge {
        Charge::None => set.release(rail, bytes),
        Charge::Transient => set.failed(rail, bytes, Failure::Transient),
        // A remote fault condemns the path; the rail set keeps the last usable rail open.
        Charge::Remote => set.failed(rail, bytes, Failure::Fatal),
    }
}

pub(super) fn deadline_error(piece: &Piece) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "{} bytes to {} missed the request deadline",
            piece.len, piece.peer.server_name
        ),
    )
}

/// Picks a rail for `piece`. After a local fault, rails of the faulty device are passed
/// over while the tier selection would use has a usable rail of another device.
/// `RailSet::pick` avoids one rail only, so each rail of that device it offers is loaded
/// with a huge byte count, which steers the least-loaded choice away from it, and unloaded
/// once a rail is chosen.
pub(super) fn pick_rail(piece: &Piece) -> Option<usize> {
    const SHUN: u64 = 1 << 50;
    let set = &piece.rails.set;
    let len = piece.len as u64;
    let Some(bad) = piece.avoid_device.as_deref() else {
        return set.pick(len, piece.avoid);
    };
    if !(0..set.len()).any(|i| set.rail(i).0 != bad && set.is_usable(i)) {
        return set.pick(len, piece.avoid);
    }
    let mut shunned: Vec<usize> = Vec::new();
    let chosen = loop {
        let Some(rail) = set.pick(SHUN, piece.avoid) else {
            break None;
        };
        if set.rail(rail).0 != bad {
            set.release(rail, SHUN - len);
            break Some(rail);
        }
        let again = shunned.contains(&rail);
        shunned.push(rail);
        if again {
            break None;
        }
    };
    for &rail in &shunned {
        set.release(rail, SHUN);
    }
    chosen.or_else(|| set.pick(len, piece.avoid))
}
