//! A best-fit range allocator: a mounted segment's space (the master's) or staging memory (a
//! client's).
//!
//! Free ranges are kept twice, by offset (to merge neighbours on free) and by size (to find
//! the smallest range that fits), so every operation is O(log n). A range can also be taken
//! at a given offset ([`SegmentAllocator::reserve`]): a master that recovers its metadata puts
//! every committed replica back exactly where its bytes are.

use std::collections::{BTreeMap, BTreeSet};

/// A segment's space.
pub struct SegmentAllocator {
    /// offset -> length of each free range; neighbours are always merged.
    free_by_offset: BTreeMap<u64, u64>,
    /// (length, offset) of the same ranges.
    free_by_size: BTreeSet<(u64, u64)>,
    capacity: u64,
    used: u64,
}

/// A piece of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// Offset from the segment base, in bytes.
    pub offset: u64,
    /// Bytes reserved (at least the request).
    pub reserved: u64,
}

impl SegmentAllocator {
    /// Manages `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        let mut allocator = Self {
            free_by_offset: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            capacity,
            used: 0,
        };
        if capacity > 0 {
            allocator.insert_free(0, capacity);
        }
        allocator
    }

    /// Reserves `size` bytes, or `None` when no free range is large enough.
    pub fn allocate(&mut self, size: u64) -> Option<Block> {
        if size == 0 {
            return None;
        }
        let &(len, offset) = self.free_by_size.range((size, 0)..).next()?;
        self.remove_free(offset, len);
        if len > size {
            self.insert_free(offset + size, len - size);
        }
        self.used += size;
        Some(Block {
            offset,
            reserved: size,
        })
    }

    /// Reserves exactly `[offset, offset + reserved)`, or `None` when any of it is taken or
    /// outside the space.
    pub fn reserve(&mut self, offset: u64, reserved: u64) -> Option<Block> {
        let end = offset.checked_add(reserved)?;
        if reserved == 0 || end > self.capacity {
            return None;
        }
        let (&start, &len) = self.free_by_offset.range(..=offset).next_back()?;
        let free_end = start + len;
        if free_end < end {
            return None;
        }
        self.remove_free(start, len);
        if start < offset {
            self.insert_free(start, offset - start);
        }
        if end < free_end {
            self.insert_free(end, free_end - end);
        }
        self.used += reserved;
        Some(Block { offset, reserved })
    }

    /// Returns a block.
    pub fn free(&mut self, block: Block) {
        let (mut start, mut len) = (block.offset, block.reserved);
        if len == 0 {
            return;
        }
        if let Some((&before, &before_len)) = self.free_by_offset.range(..start).next_back() {
            debug_assert!(before + before_len <= start, "double free at {start}");
            if before + before_len == start {
                self.remove_free(before, before_len);
                start = before;
                len += before_len;
            }
        }
        if let Some((&after, &after_len)) = self.free_by_offset.range(start + len..).next() {
            if after == start + len {
                self.remove_free(after, after_len);
                len += after_len;
            }
        }
        self.insert_free(start, len);
        self.used = self.used.saturating_sub(block.reserved);
    }

    /// Bytes managed.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes reserved.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The largest request that would succeed now.
    pub fn largest_free(&self) -> u64 {
        self.free_by_size.last().map_or(0, |&(len, _)| len)
    }

    /// Free ranges kept: the allocator's bookkeeping grows with these, not with its capacity.
    pub fn free_ranges(&self) -> usize {
        self.free_by_offset.len()
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.insert(offset, len);
        self.free_by_size.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.remove(&offset);
        self.free_by_size.remove(&(len, offset));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn allocates_frees_and_reports() {
        let mut a = SegmentAllocator::new(1 << 20);
        assert_eq!(a.capacity(), 1 << 20);
        let x = a.allocate(1000).unwrap();
        let y = a.allocate(4096).unwrap();
        assert!(x.reserved >= 1000 && y.reserved >= 4096);
        assert!(x.offset + x.reserved <= y.offset || y.offset + y.reserved <= x.offset);
        assert_eq!(a.used(), x.reserved + y.reserved);
        a.free(x);
        a.free(y);
        assert_eq!(a.used(), 0);
        assert_eq!(a.largest_free(), 1 << 20);
        assert!(a.allocate(2 << 20).is_none());
        assert!(a.allocate(0).is_none());
    }

    #[test]
    fn reserves_exact_ranges() {
        let mut a = SegmentAllocator::new(1 << 16);
        let b = a.reserve(100, 50).unwrap();
        assert_eq!((b.offset, b.reserved), (100, 50));
        assert!(a.reserve(120, 10).is_none(), "taken");
        assert!(a.reserve(149, 2).is_none(), "overlaps the end");
        assert!(a.reserve((1 << 16) - 1, 2).is_none(), "past the end");
        assert!(a.reserve(u64::MAX, 2).is_none(), "wraps");
        assert!(a.reserve(150, 10).is_some(), "right after");
        assert_eq!(a.used(), 60);
    }

    #[test]
    fn a_terabyte_is_one_entry_until_it_is_cut() {
        let mut a = SegmentAllocator::new(1 << 40);
        assert_eq!(a.free_ranges(), 1);
        let blocks: Vec<Block> = (0..1000).map(|_| a.allocate(1 << 30).unwrap()).collect();
        assert_eq!(a.free_ranges(), 1);
        for b in blocks.iter().step_by(2) {
            a.free(*b);
        }
        assert_eq!(a.free_ranges(), 501);
        for b in blocks.iter().skip(1).step_by(2) {
            a.free(*b);
        }
        assert_eq!((a.free_ranges(), a.used()), (1, 0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(u64),
        Reserve(u64, u64),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..3000).prop_map(Op::Allocate),
            (0u64..10_000, 1u64..3000).prop_map(|(o, l)| Op::Reserve(o, l)),
            any::<usize>().prop_map(Op::Free),
        ]
    }

    proptest! {
        /// Against a byte map: a block is granted exactly when its bytes are all free, blocks
        /// never overlap, and `used` and `largest_free` match the map.
        #[test]
        fn matches_a_byte_map(ops in proptest::collection::vec(op(), 1..200)) {
            const CAPACITY: u64 = 10_000;
            let mut a = SegmentAllocator::new(CAPACITY);
            let mut taken = vec![false; CAPACITY as usize];
            let mut live: Vec<Block> = Vec::new();
            for op in ops {
                match op {
                    Op::Allocate(size) => {
                        if let Some(b) = a.allocate(size) {
                            prop_assert_eq!(b.reserved, size);
                            for i in b.offset..b.offset + b.reserved {
                                prop_assert!(!taken[i as usize]);
                                taken[i as usize] = true;
                            }
                            live.push(b);
                        }
                    }
                    Op::Reserve(offset, len) => {
                        let fits = offset + len <= CAPACITY
                            && (offset..offset + len).all(|i| !taken[i as usize]);
                        let got = a.reserve(offset, len);
                        prop_assert_eq!(got.is_some(), fits);
                        if let Some(b) = got {
                            for i in offset..offset + len {
                                taken[i as usize] = true;
                            }
                            live.push(b);
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let b = live.swap_remove(i % live.len());
                        for i in b.offset..b.offset + b.reserved {
                            taken[i as usize] = false;
                        }
                        a.free(b);
                    }
                    Op::Free(_) => {}
                }
                let used = taken.iter().filter(|t| **t).count() as u64;
                prop_assert_eq!(a.used(), used);
                let longest = taken
                    .split(|t| *t)
                    .map(|run| run.len() as u64)
                    .max()
                    .unwrap_or(0);
                prop_assert_eq!(a.largest_free(), longest);
            }
        }
    }
}
