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

/// A staging block that owns its share of the buffer, so it can outlive the call that took
/// it (a value handed to JavaScript until it is garbage-collected).
pub struct OwnedStaging {
    owner: Arc<LocalBuffer>,
    block: Block,
    addr: usize,
    len: usize,
}

impl OwnedStaging {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the block is `len` bytes of the live arena, owned by this value alone.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Sets the length (at most what was taken).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for OwnedStaging {
    fn drop(&mut self) {
        self.owner
            .allocator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free(self.block);
    }
}

impl LocalBuffer {
    /// An owned block of `len` bytes, if one is free.
    pub fn take_owned(self: &Arc<Self>, len: usize) -> Option<OwnedStaging> {
        let arena = self.arena.as_ref()?;
        let block = self
            .allocator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allocate(len as u64)?;
        Some(OwnedStaging {
            owner: self.clone(),
            addr: arena.as_ptr() as usize + block.offset as usize,
            block,
            len,
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
