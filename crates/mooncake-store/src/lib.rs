//! Mooncake Store: a distributed object cache whose master keeps metadata only.
//!
//! Layout:
//! - [`master`]: the master's state machine, without I/O: object metadata and replicas,
//!   per-segment allocators and placement, two-phase writes, leases, pins, eviction, abandoned
//!   writes and client liveness. Every operation takes the current time, so tests drive time.

pub mod master;
