//! The master's state machine.
//!
//! [`Master`] holds everything the master knows and changes it only through its methods, each
//! of which takes `now`. The gRPC service wraps it in a lock and calls the periodic
//! [`Master::tick`] (eviction, abandoned writes, client liveness); tests call the same methods
//! with a clock of their own.
//!
//! - [`placement`]: which segments receive the replicas of an object;
//! - [`config`]: the master's knobs and Mooncake's defaults;
//! - [`types`]: ids, replica descriptors, write configuration;
//! - [`service`]: the gRPC service over the state machine;
//! - `mooncake_rpc`: Mooncake's own master protocol over the same service;
//! - [`log`]: the durable log of what the master acknowledged (local disk or etcd);
//! - [`ha`]: leader election through etcd, and standbys that follow the leader's log;
//! - [`server`]: a running master: RPC, periodic tick, admin HTTP, embedded metadata server;
//! - [`admin`]: the admin HTTP server: `/metrics`, `/health`, a live dashboard, `/get_all_keys`, ...

pub mod admin;
pub mod config;
#[cfg(test)]
mod fuzz;
pub mod ha;
pub mod log;
mod mooncake_rpc;
pub mod placement;
pub mod server;
pub mod service;
mod tls;
pub mod types;

mod state;

pub use config::{AllocationStrategy, MasterConfig};
pub use ha::HaConfig;
pub use server::{Durability, MasterServer, MasterServerConfig};
pub use state::{
    Master, MasterStats, NodeRails, ReservationGrant, ReservedPart, SegmentReport, MAX_RESERVATION,
    MAX_STORED_RAILS, RESERVATION_TTL,
};
pub use types::{
    ClientId, ClientStatus, RailReport, RailState, ReplicaDesc, ReplicaStatus, SegmentId,
    SegmentSpec, SoftPin, WriteConfig, WriteGrant, WriteId, MAX_RAIL_LABEL_LEN, MAX_REPORTED_RAILS,
};
