//! Registered memory and the transports that move bytes between segments.
//!
//! Layout:
//! - [`memory`]: engine-owned arenas (sealed memfd mappings) and the registry of every range
//!   peers may touch;
//! - [`copy`]: bulk copies, with streaming stores for large ones;
//! - [`completion`]: per-task and per-batch progress, which slices report into;
//! - [`rail`]: the paths to a peer over several devices, selection and rail health;
//! - [`slicing`]: how every transport cuts a request into pieces;
//! - [`shm`]: same-host transfers through mapped arenas (and `process_vm_*`);
//! - [`tcp`]: Mooncake's TCP data protocol (v1 and v2): the wire codec, the server that serves
//!   registered memory, and the client with persistent lanes per peer.
//!
//! A transport receives [`Slice`]s, moves their bytes directly between the socket and
//! registered memory, and reports each slice to its [`Task`] exactly once.

pub mod completion;
pub mod copy;
pub mod memory;
pub mod rail;
pub mod shm;
pub mod slicing;
pub mod tcp;

pub use completion::{BatchProgress, Task, TaskStatus};
pub use memory::{Arena, MemoryRegistry, Region};

use std::sync::Arc;
use tokio::time::Instant;

/// Direction of a transfer, from the initiator's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// Remote to local.
    Read,
    /// Local to remote.
    Write,
}

/// The unit a transport moves: a contiguous piece of one request.
pub struct Slice {
    /// Direction.
    pub op: Opcode,
    /// Start in local registered memory.
    pub local_addr: usize,
    /// Length in bytes.
    pub len: usize,
    /// Start in the target's registered memory.
    pub remote_addr: u64,
    /// Keeps the local memory registered and mapped until the slice is done.
    pub region: Arc<Region>,
    /// Where the outcome is reported.
    pub task: Arc<Task>,
    /// When the request stops being worth finishing.
    pub deadline: Option<Instant>,
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slice")
            .field("op", &self.op)
            .field("local_addr", &format_args!("{:#x}", self.local_addr))
            .field("len", &self.len)
            .field("remote_addr", &format_args!("{:#x}", self.remote_addr))
            .finish()
    }
}
