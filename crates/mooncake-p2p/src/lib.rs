//! Mooncake's P2P Store: large read-only payloads (checkpoints) registered where they live and
//! pulled with one-sided reads from every node that holds them; each puller becomes a source.
//! No master: the catalogue is a metadata store (etcd, Redis, or the HTTP server), in
//! Mooncake's format.
//!
//! Layout:
//! - [`store`]: [`P2PStore`], one node: register, pull, withdraw, close;
//! - [`catalogue`]: the entries and their compare-and-swap updates;
//! - [`layout`]: shards and the local memory they live in;
//! - `local`: what this node holds, and the memory it registered for it;
//! - [`pull`]: reading the missing shards, checked, from the best source;
//! - [`sources`]: which source is best;
//! - [`liveness`]: the expiring entries that say which nodes are alive;
//! - [`partial`]: the shards pullers hold before they finish, offered to each other.

pub mod catalogue;
pub mod layout;
pub mod liveness;
mod local;
pub mod partial;
pub mod pull;
pub mod sources;
pub mod store;

pub use catalogue::{Location, Payload, PayloadInfo, Shard};
pub use layout::LocalBuffer;
pub use pull::{Progress, ProgressFn, PullReport};
pub use sources::SourceReport;
pub use store::{P2PConfig, P2PStore, RegisterOptions};
