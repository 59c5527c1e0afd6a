//! Pieces every Mooncake crate shares.
//!
//! Layout:
//! - [`auth`]: the cluster token: per-request proofs, session challenge-response, signatures;
//! - [`error`]: the one error type, with stable string codes and Mooncake's numeric codes;
//! - [`handle`]: generational slab handles (batch ids, segment ids);
//! - [`config`]: engine options with `MC_*` environment defaults;
//! - [`service`]: the accept loop every TCP listener runs, with a real close;
//! - [`pattern`]: self-describing test data, unique per position.

pub mod auth;
pub mod config;
pub mod error;
pub mod handle;
pub mod pattern;
pub mod service;

pub use config::EngineConfig;
pub use error::{Error, ErrorKind, Result};
pub use handle::{Handle, HandleSlab};
pub use service::Service;
