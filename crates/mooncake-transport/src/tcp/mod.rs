//! Mooncake's TCP data protocol.
//!
//! - [`wire`]: the 24-byte request header and the v2 "MCTV" status frames, sans-IO;
//! - [`exchange`]: what each side sends and expects for one request, sans-IO;
//! - [`server`]: serves registered memory to peers, one persistent session per connection;
//! - [`client`]: persistent lanes per peer that carry slices, several in flight.

pub mod client;
pub mod exchange;
pub mod server;
pub mod wire;

pub use client::{LocalNic, PeerAddr, TcpClient, TcpClientConfig, TcpPath, TcpPeer};
pub use server::{DataServerOptions, TcpServer};
