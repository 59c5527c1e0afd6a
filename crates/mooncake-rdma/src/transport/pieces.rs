//! What the transport keeps per piece in flight and per registration, and how an outcome is
//! charged to a rail.

use super::*;

/// Consecutive local faults after which a context is taken out of service.
pub(super) const MAX_LOCAL_FAILURES: u32 = 32;

pub(super) type RailKey = (String, String, String);

pub(super) struct Registration {
    // Dropped before `region`: the MRs must go before the memory may.
    pub(super) mrs: Vec<Arc<dyn MemoryRegion>>,
    pub(super) remote: bool,
    pub(super) _region: Arc<Region>,
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
