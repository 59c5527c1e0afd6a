//! An O(1) offset allocator over a range: a mounted segment (the master's) or staging memory (a
//! client's).
//!
//! `offset-allocator` manages 32-bit units; segments beyond 3 GiB count in power-of-two units
//! so their unit count stays in range (the allocation granularity grows with them, as in
//! Mooncake). Requests round up to whole units.

use offset_allocator::{Allocation, Allocator};

const MAX_UNITS: u64 = 3 << 30;

/// A segment's space.
pub struct SegmentAllocator {
    inner: Allocator,
    shift: u32,
    capacity: u64,
    used: u64,
}

/// A piece of a segment.
#[derive(Clone, Copy)]
pub struct Block {
    allocation: Allocation,
    /// Offset from the segment base, in bytes.
    pub offset: u64,
    /// Bytes reserved (at least the request).
    pub reserved: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("offset", &self.offset)
            .field("reserved", &self.reserved)
            .finish()
    }
}

impl SegmentAllocator {
    /// Manages `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        let mut shift = 0;
        while capacity >> shift > MAX_UNITS {
            shift += 1;
        }
        let units = (capacity >> shift) as u32;
        let max_allocs = (capacity / 4096).clamp(16 << 10, 4 << 20) as u32;
        Self {
            inner: Allocator::with_max_allocs(units, max_allocs),
            shift,
            capacity: u64::from(units) << shift,
            used: 0,
        }
    }

    /// Reserves `size` bytes, or `None` when no free region is large enough.
    pub fn allocate(&mut self, size: u64) -> Option<Block> {
        let units = u32::try_from(size.div_ceil(1 << self.shift)).ok()?;
        if units == 0 {
            return None;
        }
        let allocation = self.inner.allocate(units)?;
        let reserved = u64::from(self.inner.allocation_size(allocation)) << self.shift;
        self.used += reserved;
        Some(Block {
            allocation,
            offset: u64::from(allocation.offset) << self.shift,
            reserved,
        })
    }

    /// Returns a block.
    pub fn free(&mut self, block: Block) {
        self.used = self.used.saturating_sub(block.reserved);
        self.inner.free(block.allocation);
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
        u64::from(self.inner.storage_report().largest_free_region) << self.shift
    }
}

#[cfg(test)]
mod tests {
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
        assert!(a.allocate(2 << 20).is_none());
        assert!(a.allocate(0).is_none());
    }

    #[test]
    fn large_segments_use_coarser_units() {
        let mut a = SegmentAllocator::new(16 << 30);
        assert!(a.shift > 0);
        let block = a.allocate(1).unwrap();
        assert_eq!(block.reserved, 1 << a.shift);
        assert!(a.allocate(8 << 30).is_some());
    }
}
