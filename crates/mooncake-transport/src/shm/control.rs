//! The slot table: one word per reachable region, shared with same-host peers.
//!
//! ```text
//! bit 63       the region is registered
//! bits 32..62  generation: advanced each time the slot is claimed, never 0 (31 bits)
//! bits 0..31   copies in progress, by any peer
//! ```
//!
//! Slots are reused, and a peer names a region by what its (possibly stale) descriptor says,
//! so a slot number alone could name whichever region took the slot after the one the peer
//! knows. The owner publishes the generation with the slot, and a copy takes a use only while
//! the registered bit is set and the generation is the one it names (compare-and-swap); it
//! gives the use back when done. The owner clears the bit to unregister, then waits (bounded)
//! for the uses to drain. Words live in a memfd, so the atomics are shared across processes.
//!
//! Generations run through 2^31 - 1 values, so a stale pair is accepted again only if its slot
//! was claimed a multiple of 2^31 - 1 times since.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_common::Result;

use crate::memory::{Arena, Mapping};

/// Regions per engine that same-host peers can reach.
pub const SLOTS: u32 = 4096;

const REGISTERED: u64 = 1 << 63;
const GENERATION_SHIFT: u32 = 32;
const GENERATION_MASK: u32 = (1 << 31) - 1;
const USES_MASK: u64 = u32::MAX as u64;

/// A claimed slot: its index in the table and the generation it was claimed in. Peers name a
/// region by both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// Index in the table, below [`SLOTS`].
    pub index: u32,
    /// Generation of this claim, never 0.
    pub generation: u32,
}

/// The encoding of a slot word, without the atomics.
mod encoding {
    use super::{GENERATION_MASK, GENERATION_SHIFT, REGISTERED, USES_MASK};

    pub(super) fn generation(word: u64) -> u32 {
        (word >> GENERATION_SHIFT) as u32 & GENERATION_MASK
    }

    pub(super) fn uses(word: u64) -> u64 {
        word & USES_MASK
    }

    pub(super) fn is_registered(word: u64) -> bool {
        word & REGISTERED != 0
    }

    /// The generation after `generation`, skipping 0 (which names no claim) when it wraps.
    pub(super) fn next_generation(generation: u32) -> u32 {
        match generation.wrapping_add(1) & GENERATION_MASK {
            0 => 1,
            next => next,
        }
    }

    /// `word` claimed anew: registered, in the next generation, its uses kept (a use still
    /// held gives itself back with a plain decrement).
    pub(super) fn claimed(word: u64) -> u64 {
        REGISTERED | u64::from(next_generation(generation(word))) << GENERATION_SHIFT | uses(word)
    }

    /// `word` with one more use, if it is registered in `generation` and the count has room.
    pub(super) fn acquired(word: u64, generation: u32) -> Option<u64> {
        let current = is_registered(word) && self::generation(word) == generation;
        (current && uses(word) < USES_MASK).then_some(word + 1)
    }
}

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

    /// Claims a slot, marks it registered and advances its generation; `None` when every
    /// slot is taken (the region is then reachable over TCP only).
    pub fn claim(&self) -> Option<Slot> {
        let index = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        let previous = self
            .word(index)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                Some(encoding::claimed(word))
            })
            .unwrap_or_else(|word| word);
        Some(Slot {
            index,
            generation: encoding::generation(encoding::claimed(previous)),
        })
    }

    /// Clears the registered bit, so no new copy starts, and waits up to `drain` for copies in
    /// progress. Returns whether they drained.
    pub fn retire(&self, slot: Slot, drain: Duration) -> bool {
        let word = self.word(slot.index);
        word.fetch_and(!REGISTERED, Ordering::AcqRel);
        let deadline = Instant::now() + drain;
        while encoding::uses(word.load(Ordering::Acquire)) != 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// Returns a retired, drained slot for reuse (in a later generation).
    pub fn release(&self, slot: Slot) {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot.index);
    }

    /// Sets the registered bit again after a retire that did not drain.
    pub fn restore(&self, slot: Slot) {
        self.word(slot.index).fetch_or(REGISTERED, Ordering::AcqRel);
    }

    /// Clears every registered bit (engine close): peers fail from now on.
    pub fn retire_all(&self) {
        for index in 0..SLOTS {
            self.word(index).fetch_and(!REGISTERED, Ordering::AcqRel);
        }
    }

    fn word(&self, index: u32) -> &AtomicU64 {
        // SAFETY: the arena is the table mapping (`SLOTS` words), alive as long as `self`.
        unsafe { word(self.arena.as_ptr(), index) }
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

    /// Takes a use of `slot` if the region it names is still registered: the slot holds the
    /// same generation, so it was not claimed again since the caller learned of it.
    pub fn acquire(&self, slot: Slot) -> Option<SlotUse<'_>> {
        if slot.index >= SLOTS || self.mapping.len() < SLOTS as usize * 8 {
            return None;
        }
        // SAFETY: the mapping holds the whole table (checked above) and outlives the use,
        // which borrows `self`.
        let word = unsafe { word(self.mapping.as_ptr(), slot.index) };
        word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            encoding::acquired(current, slot.generation)
        })
        .ok()
        .map(|_| SlotUse { word })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn table_and_view() -> (ControlTable, ControlView) {
        let table = ControlTable::new().unwrap();
        let view = ControlView::new(Mapping::map(table.fd().as_fd(), SLOTS as usize * 8).unwrap());
        (table, view)
    }

    #[test]
    fn uses_stop_at_retire_and_retire_waits_for_uses() {
        let (table, view) = table_and_view();
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
        let beyond = Slot {
            index: SLOTS + 1,
            ..slot
        };
        assert!(view.acquire(beyond).is_none());
    }

    #[test]
    fn a_reused_slot_refuses_its_earlier_generation() {
        let (table, view) = table_and_view();
        let first = table.claim().unwrap();
        assert!(view.acquire(first).is_some());
        assert!(table.retire(first, Duration::ZERO));
        table.release(first);
        let second = table.claim().unwrap();
        assert_eq!(second.index, first.index, "the free list is LIFO");
        assert_ne!(second.generation, first.generation);
        assert!(view.acquire(first).is_none(), "stale generation");
        let using = view.acquire(second).expect("current generation");
        // Even a use still held when the slot is claimed again gives itself back cleanly.
        assert!(!table.retire(second, Duration::ZERO));
        table.release(second);
        let third = table.claim().unwrap();
        assert_eq!(third.index, second.index);
        drop(using);
        let word = table.word(third.index).load(Ordering::Acquire);
        assert_eq!(encoding::uses(word), 0);
        assert_eq!(encoding::generation(word), third.generation);
        assert!(encoding::is_registered(word));
        assert!(view.acquire(second).is_none());
        assert!(view.acquire(third).is_some());
    }

    #[test]
    fn the_word_encoding_keeps_its_fields_apart() {
        let max = GENERATION_MASK;
        assert_eq!(encoding::next_generation(0), 1);
        assert_eq!(encoding::next_generation(7), 8);
        assert_eq!(encoding::next_generation(max), 1, "wraps past 0");
        assert_eq!(
            encoding::next_generation(u32::MAX),
            1,
            "stray high bit ignored"
        );

        // The last generation, registered, with uses: claiming again wraps the generation
        // and keeps the uses and the registered bit.
        let word = REGISTERED | u64::from(max) << GENERATION_SHIFT | 5;
        assert_eq!(encoding::generation(word), max);
        assert_eq!(encoding::uses(word), 5);
        let claimed = encoding::claimed(word);
        assert!(encoding::is_registered(claimed));
        assert_eq!(encoding::generation(claimed), 1);
        assert_eq!(encoding::uses(claimed), 5);

        // A use changes the count only, and only in the right generation.
        let used = encoding::acquired(claimed, 1).unwrap();
        assert_eq!(encoding::uses(used), 6);
        assert_eq!(encoding::generation(used), 1);
        assert!(encoding::is_registered(used));
        assert_eq!(encoding::acquired(claimed, max), None);
        assert_eq!(encoding::acquired(claimed & !REGISTERED, 1), None);

        // A full count refuses more uses instead of carrying into the generation.
        let full = REGISTERED | 1 << GENERATION_SHIFT | USES_MASK;
        assert_eq!(encoding::acquired(full, 1), None);
        assert_eq!(encoding::uses(full - 1), USES_MASK - 1);
        assert_eq!(encoding::generation(full - 1), 1);

        // A fresh word (all zero) claims generation 1.
        assert_eq!(encoding::generation(encoding::claimed(0)), 1);
        assert_eq!(encoding::uses(encoding::claimed(0)), 0);
    }
}
