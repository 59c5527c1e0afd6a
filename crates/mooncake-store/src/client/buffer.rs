//! The local buffer: registered staging memory for the copying APIs (`put(bytes)`, `get()`).

use std::sync::{Arc, Mutex};

use mooncake_transport::Arena;

use crate::master::allocator::{Block, SegmentAllocator};

/// Registered staging memory, handed out in blocks.
pub struct LocalBuffer {
    arena: Option<Arc<Arena>>,
    allocator: Mutex<SegmentAllocator>,
}

/// A staging block; returned to the buffer on drop.
pub struct Staging<'a> {
    owner: &'a LocalBuffer,
    block: Block,
    /// Address of the first byte.
    pub addr: usize,
}

impl LocalBuffer {
    /// Staging over `arena` (none: every request is served by a temporary allocation).
    pub fn new(arena: Option<Arc<Arena>>) -> Self {
        let size = arena.as_ref().map_or(0, |a| a.len() as u64);
        Self {
            arena,
            allocator: Mutex::new(SegmentAllocator::new(size.max(1))),
        }
    }

    /// A block of `len` bytes, if one is free.
    pub fn take(&self, len: usize) -> Option<Staging<'_>> {
        let arena = self.arena.as_ref()?;
        let block = self
            .allocator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allocate(len as u64)?;
        Some(Staging {
            owner: self,
            addr: arena.as_ptr() as usize + block.offset as usize,
            block,
        })
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        self.owner
            .allocator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free(self.block);
    }
}
