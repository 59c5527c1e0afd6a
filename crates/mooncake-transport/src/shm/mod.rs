//! Same-host transfers through shared memory.
//!
//! An engine's arenas are sealed memfds. A peer on the same host asks the owner for an arena's
//! descriptor once, over a Unix socket (SCM_RIGHTS), maps it, and from then on reads and writes
//! with plain copies: the owner's CPU takes no part. Caller-registered memory that is not in an
//! arena is reached with `process_vm_readv`/`process_vm_writev` where the kernel permits it.
//!
//! Registration is still enforced. Every region a peer may touch has a slot in the owner's
//! [`control`] table, a shared array of words the peer maps too. A copy first takes a use of
//! the slot, which fails once the owner has unregistered the region (or registered another in
//! its slot: the descriptor names the slot's generation too), and the owner's unregister waits
//! for uses to drain. A peer that loses its connection to the owner (the owner exited or
//! closed) drops every mapping of that owner and fails further copies.
//!
//! - [`control`]: the slot table, both sides;
//! - [`host`]: the host identity that says two engines share memory at all;
//! - [`server`]: the owner's side of the socket;
//! - [`peer`]: the mapper's side: connection, mappings, the copy itself;
//! - [`transport`]: peers by owner, and where copies run (inline when small and already
//!   mapped, on a pool of copy threads otherwise).

pub mod control;
pub mod host;
pub mod peer;
pub mod server;
pub mod transport;

pub use control::{ControlTable, ControlView, Slot};
pub use peer::{Path, RemoteRange, ShmBuffer, ShmPeer, ShmTarget};
pub use server::{ShmServer, ShmServerOptions};
pub use transport::{ShmSlice, ShmTransport};
