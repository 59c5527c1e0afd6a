//! What moves: an engine slice cut into pieces, each carried by one work request on one rail.
//! Endpoints hold pieces; the transport makes and settles them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use mooncake_common::{Error, Result};
use mooncake_transport::rail::RailSet;
use mooncake_transport::{Opcode, Region, Task};
use tokio::time::Instant as TokioInstant;

use crate::peer::RdmaPeer;

/// The rails between one peer's location and one of ours.
pub(crate) struct RailEntry {
    pub(crate) peer: String,
    pub(crate) local_location: String,
    pub(crate) remote_location: String,
    pub(crate) preferred: Vec<(String, String)>,
    pub(crate) available: Vec<(String, String)>,
    pub(crate) set: RailSet,
}

/// One engine slice, reported once all its pieces settled.
pub(crate) struct SliceState {
    pub(crate) task: Arc<Task>,
    pub(crate) len: usize,
    pub(crate) region: Mutex<Option<Arc<Region>>>,
    pub(crate) left: AtomicUsize,
    pub(crate) error: OnceLock<Error>,
}

impl SliceState {
    pub(crate) fn piece_finished(&self, outcome: Result<()>) {
        if let Err(e) = outcome {
            let _ = self.error.set(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Let go of the memory before reporting: whoever awaits the task may unregister
            // it the moment it settles.
            drop(self.region.lock().unwrap_or_else(|p| p.into_inner()).take());
            match self.error.get() {
                None => self.task.slice_done(self.len),
                Some(e) => self.task.slice_failed(e.clone()),
            }
        }
    }
}

/// A contiguous part of a slice that one work request carries.
pub(crate) struct Piece {
    pub(crate) slice: Arc<SliceState>,
    pub(crate) op: Opcode,
    pub(crate) region_addr: usize,
    pub(crate) local_addr: usize,
    pub(crate) len: usize,
    pub(crate) remote_addr: u64,
    pub(crate) peer: Arc<RdmaPeer>,
    pub(crate) buffer: usize,
    pub(crate) rails: Arc<RailEntry>,
    pub(crate) rail: Option<usize>,
    pub(crate) avoid: Option<usize>,
    /// A local fault happened on this device: prefer rails of another one.
    pub(crate) avoid_device: Option<String>,
    pub(crate) attempts: u32,
    pub(crate) last_error: Option<Error>,
    pub(crate) deadline: Option<TokioInstant>,
}

impl Piece {
    pub(crate) fn expired(&self, now: TokioInstant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}
