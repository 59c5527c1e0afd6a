//! The Mooncake Transfer Engine.
//!
//! An engine is one segment: it owns registered memory that peers read and write, and it
//! moves bytes to and from other segments in batches of one-sided requests.
//!
//! Layout:
//! - [`engine`]: [`TransferEngine`]: start-up, memory, segments, submission, notifications,
//!   close;
//! - [`segments`]: opening remote segments and caching their descriptors;
//! - [`batch`]: batches of tasks, their status and how they are awaited;
//! - [`stats`]: requests, bytes and latency per transport;
//! - [`metrics`]: Prometheus encoding shared with the store;
//! - [`address`]: `host[:port]` parsing and listener binding;
//! - [`bench`]: the load generator behind `mooncake bench`.

pub mod address;
pub mod batch;
pub mod bench;
pub mod engine;
pub mod metrics;
pub mod segments;
pub mod stats;

pub use batch::{BatchId, TaskReport};
pub use engine::{Notification, TransferEngine, TransferRequest};
pub use mooncake_common::{EngineConfig, Error, ErrorKind, Result};
pub use mooncake_transport::{Opcode, TaskStatus};
pub use segments::{SegmentId, SegmentInfo};
