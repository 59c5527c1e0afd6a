//! Mooncake's handshake protocol: one request and one reply per TCP connection, each a frame
//! of `u64 LE length | u8 type | JSON` (see [`frame`]).
//!
//! - [`frame`]: the codec, sans-IO;
//! - [`messages`]: the JSON bodies of each message type;
//! - [`server`]: the concurrent listener, which hands requests to a [`HandshakeHandler`];
//! - [`client`]: one request/reply exchange with a peer.

pub mod client;
pub mod frame;
pub mod messages;
pub mod server;

pub use client::request;
pub use frame::{Frame, FrameError, MessageType};
pub use server::{HandshakeHandler, HandshakeServer};
