//! What an RDMA transport is built from, how it reaches a peer's handshake listener, and
//! the states it reports.

use super::*;

pub use mooncake_metadata::store::BoxFuture;

/// The active side of the RDMA handshake: delivers a Connection message to a peer's
/// handshake listener and returns its reply.
pub trait Connector: Send + Sync + 'static {
    /// Sends `msg` to `peer_rpc_addr` (`host:port`) and returns the reply.
    fn connect<'a>(
        &'a self,
        peer_rpc_addr: &'a str,
        msg: ConnectionMessage,
    ) -> BoxFuture<'a, Result<ConnectionMessage>>;
}

/// A [`Connector`] over Mooncake's handshake socket protocol.
#[derive(Debug, Clone)]
pub struct HandshakeConnector {
    /// Connect timeout (`MC_HANDSHAKE_CONNECT_TIMEOUT`, 5 s).
    pub connect_timeout: Duration,
    /// Largest accepted frame (`MC_HANDSHAKE_MAX_LENGTH`, 1 MiB).
    pub max_frame: usize,
    /// The cluster token handshakes open with, if the cluster has one.
    pub token: Option<mooncake_common::auth::ClusterToken>,
}

impl Default for HandshakeConnector {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            max_frame: 1 << 20,
            token: None,
        }
    }
}

impl Connector for HandshakeConnector {
    fn connect<'a>(
        &'a self,
        peer_rpc_addr: &'a str,
        msg: ConnectionMessage,
    ) -> BoxFuture<'a, Result<ConnectionMessage>> {
        Box::pin(async move {
            let body = serde_json::to_string(&msg)
                .map_err(|e| Error::new(ErrorKind::MalformedJson, e.to_string()))?;
            let reply = mooncake_metadata::handshake::request(
                peer_rpc_addr,
                MessageType::Connection,
                &body,
                self.connect_timeout,
                self.max_frame,
                self.token.as_ref(),
            )
            .await?;
            serde_json::from_str(&reply).map_err(|e| {
                Error::new(
                    ErrorKind::MalformedJson,
                    format!("connection reply from {peer_rpc_addr}: {e}"),
                )
            })
        })
    }
}

/// What an [`RdmaTransport`] is built from.
#[derive(Debug, Clone)]
pub struct RdmaOptions {
    /// Server name used in NIC paths (the segment name, or `rdma_server_name`).
    pub server_name: String,
    /// Devices to open, in order; this order is the order of published devices and keys.
    pub devices: Vec<String>,
    /// Local priority matrix: location → (preferred, available) device names.
    pub matrix: PriorityMatrix,
    /// Tunables.
    pub config: RdmaConfig,
    /// Rail health; its `retry_budget` is replaced by `config.retry_cnt`.
    pub rail_policy: RailPolicy,
}

impl RdmaOptions {
    /// Options with defaults from the environment.
    pub fn new(server_name: &str, devices: Vec<String>, matrix: PriorityMatrix) -> Self {
        Self {
            server_name: server_name.to_owned(),
            devices,
            matrix,
            config: RdmaConfig::from_env(),
            rail_policy: RailPolicy::default(),
        }
    }
}

/// A rail's state, for stats and tests.
#[derive(Debug, Clone)]
pub struct RailInfo {
    /// Peer server name.
    pub peer: String,
    /// Location of the local memory.
    pub local_location: String,
    /// Location of the peer memory.
    pub remote_location: String,
    /// The rail itself.
    pub stats: RailStats,
}

/// An endpoint's state, for stats and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// State.
    pub state: EndpointState,
    /// Local QP numbers.
    pub qp_nums: Vec<u32>,
    /// Peer QP numbers, once connected.
    pub peer_qp_nums: Option<Vec<u32>>,
}
