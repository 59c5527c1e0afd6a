//! Segment metadata: what a segment publishes, where it is kept, and the handshake protocol
//! that carries it between peers.
//!
//! Layout:
//! - [`keys`]: Mooncake's key scheme (`mooncake/[cluster/]ram/<name>`, `.../rpc_meta/<name>`);
//! - [`segment`]: the segment descriptor JSON and the RPC address entry;
//! - [`store`]: the [`MetadataStore`] trait and an in-process store;
//! - [`backend`]: [`connect`], which picks a backend from a connection string;
//! - [`http`]: the HTTP backend (client) and the embedded HTTP metadata server;
//! - [`redis`]: the Redis backend;
//! - [`etcd`]: the etcd backend (Mooncake's default);
//! - [`handshake`]: Mooncake's handshake framing (sans-IO), its listener and its client.

pub mod backend;
pub mod etcd;
pub mod handshake;
pub mod http;
pub mod keys;
pub mod redis;
pub mod segment;
pub mod store;

pub use backend::{connect, MetadataBackend};
pub use keys::Keys;
pub use segment::{BufferDesc, RpcMeta, SegmentDesc};
pub use store::{MetadataStore, Revisioned};
