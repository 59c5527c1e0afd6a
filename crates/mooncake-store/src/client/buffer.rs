//! The local buffer: registered staging memory for the copying APIs (`put(bytes)`, `get()`).

use std::sync::{Arc, Mutex};

use mooncake_transport::Arena;

use crate::master::allocator::{Block, SegmentAllocator};

/// Registered staging memory, handed out in blocks.
pub struct LocalBuffer {
    arena: Option<Arc<Arena>>,
    allocator: Mutex<SegmentAllocator>,
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
    pub fn take(self: &Arc<Self>, len: usize) -> Option<Staging> {
        let arena = self.arena.as_ref()?;
        let block = self
            .allocator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allocate(len as u64)?;
        Some(Staging {
            owner: self.clone(),
            addr: arena.as_ptr() as usize + block.offset as usize,
            block,
            len,
        })
    }
}

/// A staging block. It owns its share of the buffer, so it can outlive the call that took it
/// (a value handed to JavaScript until it is garbage-collected); dropping it gives it back.
pub struct Staging {
    owner: Arc<LocalBuffer>,
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
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.owner
            .allocator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free(self.block);
    }
}
