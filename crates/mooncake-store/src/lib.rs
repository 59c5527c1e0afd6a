//! Mooncake Store: a distributed object cache whose master keeps metadata only.
//!
//! Layout:
//! - [`master`]: the master's state machine, without I/O: object metadata and replicas,
//!   per-segment allocators and placement, two-phase writes, leases, pins, eviction, abandoned
//!   writes and client liveness. Every operation takes the current time, so tests drive time.
//!   Around it: the gRPC service, the admin HTTP server and the running server;
//! - [`client`]: the store client, which mounts memory and moves object bytes peer to peer
//!   through the Transfer Engine;
//! - [`coro_rpc`]: Mooncake's own master protocol (coro_rpc + struct_pack), sans-IO;
//! - [`wire`]: the master's wire, both sides: conversions, outcomes, the protocol version;
//! - [`access`]: who may call the master: the cluster and admin tokens, checked at one door;
//! - [`allocator`]: the offset allocator of a segment (the master's) or of staging (a client's).

pub mod access;
pub mod allocator;
pub mod client;
pub mod coro_rpc;
pub mod master;
pub mod wire;

/// Code generated from `proto/mooncake_store.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("mooncake.store.v1");

    /// Code generated from `proto/mooncake_journal.proto`: the master's log.
    pub mod journal {
        tonic::include_proto!("mooncake.store.v1.journal");
    }
}
