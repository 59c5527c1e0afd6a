//! The local buffer: registered staging memory for the copying APIs (`put(bytes)`, `get()`).
//!
//! Blocks come from the configured buffer first. A value handed to JavaScript keeps its block
//! until the garbage collector frees the value, so a busy reader can find the buffer full of
//! blocks that are dead but not yet collected; the buffer then grows a reserve of further
//! arenas, up to [`RESERVE_LIMIT`], which it keeps (allocating and backing memory on every
//! call instead costs page faults on each).

use std::sync::{Arc, Mutex};

use mooncake_common::Result;
use mooncake_transport::Arena;

use crate::allocator::{Block, SegmentAllocator};

/// The most the reserve grows to. JavaScript engines collect garbage after every few dozen
/// MiB of new Buffers, which frees their blocks; a reader that holds more than this gets
/// allocations of its own.
pub const RESERVE_LIMIT: usize = 64 << 20;

/// The reserve grows by arenas of this size (or of the request, if larger).
pub const RESERVE_CHUNK: usize = 16 << 20;

/// Makes registered memory of the given size for the reserve.
pub type Grow = Box<dyn Fn(usize) -> Result<Arc<Arena>> + Send + Sync>;

struct Pool {
    arena: Arc<Arena>,
    allocator: SegmentAllocator,
}

/// Registered staging memory, handed out in blocks.
pub struct LocalBuffer {
    /// The configured buffer, then the reserve.
    pools: Mutex<Vec<Pool>>,
    grow: Option<Grow>,
}

impl LocalBuffer {
    /// Staging over `arena` (none: every request is served by a temporary allocation), with a
    /// reserve made by `grow` when it is full.
    pub fn new(arena: Option<Arc<Arena>>, grow: Option<Grow>) -> Self {
        let pools = arena.map(|arena| Pool {
            allocator: SegmentAllocator::new(arena.len() as u64),
            arena,
        });
        Self {
            grow: pools.as_ref().and(grow),
            pools: Mutex::new(pools.into_iter().collect()),
        }
    }

    /// A block of `len` bytes, if one is free or the reserve can grow by one.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<Staging> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let found = pools
            .iter_mut()
            .enumerate()
            .find_map(|(i, pool)| Some((i, pool.allocator.allocate(len as u64)?)));
        let (pool, block) = match found {
            Some(found) => found,
            None => {
                let grow = self.grow.as_ref()?;
                let size = len.max(RESERVE_CHUNK);
                let reserved: usize = pools.iter().skip(1).map(|p| p.arena.len()).sum();
                if reserved + size > RESERVE_LIMIT {
                    return None;
                }
                let arena = grow(size)
                    .inspect_err(|e| tracing::debug!("staging reserve not grown: {e}"))
                    .ok()?;
                let mut allocator = SegmentAllocator::new(arena.len() as u64);
                let block = allocator.allocate(len as u64)?;
                pools.push(Pool { arena, allocator });
                (pools.len() - 1, block)
            }
        };
        Some(Staging {
            owner: self.clone(),
            addr: pools[pool].arena.as_ptr() as usize + block.offset as usize,
            pool,
            block,
            len,
        })
    }

    /// Bytes held by blocks, and bytes of the configured buffer plus the reserve.
    pub fn usage(&self) -> (u64, u64) {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.iter().fold((0, 0), |(used, capacity), pool| {
            (
                used.saturating_add(pool.allocator.used()),
                capacity.saturating_add(pool.allocator.capacity()),
            )
        })
    }

    /// Bytes of reserve grown so far.
    pub fn reserve(&self) -> usize {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.iter().skip(1).map(|p| p.arena.len()).sum()
    }
}

/// A staging block. It owns its share of the buffer, so it can outlive the call that took it
/// (a value handed to JavaScript until it is garbage-collected); dropping it gives it back.
pub struct Staging {
    owner: Arc<LocalBuffer>,
    pool: usize,
    block: Block,
    addr: usize,
    len: usize,
}

impl Staging {
    /// Address of the first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the block is `len` bytes of the live arena, owned by this value alone.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The first byte, for writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Shortens the block's visible length (at most what was taken).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Whether the block lies in the configured buffer (memory that exists whether or not
    /// the block is taken) rather than in the reserve grown for a busy reader.
    pub fn in_configured_buffer(&self) -> bool {
        self.pool == 0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let mut pools = self.owner.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get_mut(self.pool) {
            pool.allocator.free(self.block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(size: usize) -> Arc<LocalBuffer> {
        let arena = Arc::new(Arena::new("staging", size).unwrap());
        let grow: Grow = Box::new(|size| Ok(Arc::new(Arena::new("reserve", size)?)));
        Arc::new(LocalBuffer::new(Some(arena), Some(grow)))
    }

    #[test]
    fn a_full_buffer_grows_a_reserve_up_to_its_limit_and_keeps_it() {
        let local = buffer(4 << 20);
        let held: Vec<Staging> = (0..4).map(|_| local.take(1 << 20).unwrap()).collect();
        assert!(held.iter().all(Staging::in_configured_buffer));
        assert_eq!(local.reserve(), 0);

        let mut more = Vec::new();
        while let Some(block) = local.take(1 << 20) {
            assert!(!block.in_configured_buffer());
            more.push(block);
        }
        assert_eq!(local.reserve(), RESERVE_LIMIT);
        assert_eq!(more.len(), RESERVE_LIMIT >> 20);
        assert!(
            local.take(1).is_none(),
            "nothing beyond the limit, not even a byte"
        );
        let addrs: std::collections::HashSet<usize> =
            held.iter().chain(&more).map(Staging::addr).collect();
        assert_eq!(addrs.len(), held.len() + more.len(), "blocks never overlap");

        drop(more);
        assert_eq!(local.reserve(), RESERVE_LIMIT, "the reserve is kept");
        assert!(!local.take(1 << 20).unwrap().in_configured_buffer());
        drop(held);
        assert!(local.take(1 << 20).unwrap().in_configured_buffer());
    }

    #[test]
    fn no_configured_buffer_means_no_staging() {
        let grow: Grow = Box::new(|size| Ok(Arc::new(Arena::new("reserve", size)?)));
        let local = Arc::new(LocalBuffer::new(None, Some(grow)));
        assert!(local.take(1).is_none());
        assert_eq!(local.reserve(), 0);
    }
}
