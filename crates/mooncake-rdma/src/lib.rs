//! Mooncake's RDMA transport, written against a narrow verbs interface.
//!
//! Layout:
//! - [`verbs`]: the interface (device, port, GID table, PD, MR, CQ, RC QP, async events);
//! - [`soft`]: an in-process software provider with fault injection, for tests;
//! - [`gid`]: Mooncake's GID auto-selection ranking;
//! - [`endpoint`]: the endpoint state machine and both sides of the QP handshake;
//! - [`store`]: the per-context endpoint cache (SIEVE or FIFO);
//! - [`peer`]: a peer as its segment descriptor describes it;
//! - `piece`: a slice cut into pieces, each carried by one work request;
//! - [`transport`]: [`RdmaTransport`], contexts, rails, retries;
//! - `ibverbs` (feature `ibverbs`): the provider for real devices through libibverbs.

pub mod config;
pub mod endpoint;
pub mod gid;
pub mod peer;
mod piece;
pub mod soft;
pub mod store;
pub mod transport;
pub mod verbs;

#[cfg(feature = "ibverbs")]
pub mod ibverbs;

pub use config::RdmaConfig;
pub use endpoint::EndpointState;
pub use peer::{DeviceDesc, PeerBuffer, PriorityMatrix, RdmaPeer};
pub use soft::SoftFabric;
pub use store::StoreKind;
pub use transport::{
    Connector, EndpointInfo, HandshakeConnector, RailInfo, RdmaOptions, RdmaTransport,
};
