//! The slot table: one word per reachable region, shared with same-host peers.
//!
//! ```text
//! bit 63      the region is registered
//! bits 0..62  copies in progress, by any peer
//! ```
//!
//! A peer's copy takes a use only while the registered bit is set (compare-and-swap), and
//! gives it back when done. The owner clears the bit to unregister, then waits (bounded) for
//! the uses to drain. Words live in a memfd, so the atomics are shared across processes.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_common::Result;

use crate::memory::{Arena, Mapping};

/// Regions per engine that same-host peers can reach.
pub const SLOTS: u32 = 4096;

const REGISTERED: u64 = 1 << 63;

/// # Safety
/// `base` must start a live mapping of at least `SLOTS` u64 words (page-aligned, so aligned
/// for `AtomicU64`) that outlives `'a`.
unsafe fn word<'a>(base: *mut u8, slot: u32) -> &'a AtomicU64 {
    assert!(slot < SLOTS, "slot {slot} out of range");
    // SAFETY: in bounds and aligned per the contract above.
    unsafe { &*(base.cast::<AtomicU64>().add(slot as usize)) }
}

/// The owner's side.
pub struct ControlTable {
    arena: Arena,
    free: Mutex<Vec<u32>>,
}

impl ControlTable {
    /// An empty table in a fresh memfd.
    pub fn new() -> Result<Self> {
        let arena = Arena::new("mooncake-control", SLOTS as usize * 8)?;
        Ok(Self {
            arena,
            free: Mutex::new((0..SLOTS).rev().collect()),
        })
    }

    /// The memfd to hand to peers.
    pub fn fd(&self) -> &OwnedFd {
        self.arena.fd()
    }

    /// Address of the table in this process (a known-valid address for access probes).
    pub fn addr(&self) -> usize {
        self.arena.as_ptr() as usize
    }

    /// Claims a slot and marks it registered; `None` when every slot is taken (the region is
    /// then reachable over TCP only).
    pub fn claim(&self) -> Option<u32> {
        let slot = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        // SAFETY: the arena is the table mapping, alive as long as `self`.
        unsafe { word(self.arena.as_ptr(), slot) }.store(REGISTERED, Ordering::Release);
        Some(slot)
    }

    /// Clears the registered bit, so no new copy starts, and waits up to `drain` for copies in
    /// progress. Returns whether they drained.
    pub fn retire(&self, slot: u32, drain: Duration) -> bool {
        // SAFETY: as in `claim`.
        let word = unsafe { word(self.arena.as_ptr(), slot) };
        word.fetch_and(!REGISTERED, Ordering::AcqRel);
        let deadline = Instant::now() + drain;
        while word.load(Ordering::Acquire) != 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Returns a retired, drained slot for reuse.
    pub fn release(&self, slot: u32) {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot);
    }

    /// Sets the registered bit again after a retire that did not drain.
    pub fn restore(&self, slot: u32) {
        // SAFETY: as in `claim`.
        unsafe { word(self.arena.as_ptr(), slot) }.fetch_or(REGISTERED, Ordering::AcqRel);
    }

    /// Clears every registered bit (engine close): peers fail from now on.
    pub fn retire_all(&self) {
        for slot in 0..SLOTS {
            // SAFETY: as in `claim`.
            unsafe { word(self.arena.as_ptr(), slot) }.fetch_and(!REGISTERED, Ordering::AcqRel);
        }
    }
}

/// A peer's mapping of an owner's table.
pub struct ControlView {
    mapping: Mapping,
}

/// One copy's use of a slot; given back on drop.
pub struct SlotUse<'a> {
    word: &'a AtomicU64,
}

impl Drop for SlotUse<'_> {
    fn drop(&mut self) {
        self.word.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ControlView {
    /// Wraps a mapping of the owner's table.
    pub fn new(mapping: Mapping) -> Self {
        Self { mapping }
    }

    /// Takes a use of `slot` if its region is registered.
    pub fn acquire(&self, slot: u32) -> Option<SlotUse<'_>> {
        if slot >= SLOTS || self.mapping.len() < SLOTS as usize * 8 {
            return None;
        }
        // SAFETY: the mapping holds the whole table (checked above) and outlives the use,
        // which borrows `self`.
        let word = unsafe { word(self.mapping.as_ptr(), slot) };
        let mut current = word.load(Ordering::Acquire);
        loop {
            if current & REGISTERED == 0 {
                return None;
            }
            match word.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(SlotUse { word }),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn uses_stop_at_retire_and_retire_waits_for_uses() {
        let table = ControlTable::new().unwrap();
        let view = ControlView::new(Mapping::map(table.fd().as_fd(), SLOTS as usize * 8).unwrap());
        let slot = table.claim().unwrap();
        let using = view.acquire(slot).expect("registered");
        assert!(
            !table.retire(slot, Duration::from_millis(20)),
            "a use is in progress"
        );
        assert!(view.acquire(slot).is_none(), "no new use after retire");
        table.restore(slot);
        drop(using);
        assert!(table.retire(slot, Duration::from_millis(20)));
        assert!(view.acquire(slot).is_none());
        assert!(view.acquire(SLOTS + 1).is_none());
    }
}
