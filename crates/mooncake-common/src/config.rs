//! Engine options. Every knob is an option first; Mooncake's `MC_*` variables supply the
//! defaults where one exists, read once by [`EngineConfig::from_env`]. Out-of-range values are
//! ignored with a warning, as Mooncake does.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::auth::{ClusterToken, TOKEN_ENV};

/// Which transport carries a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The best transport available for each target.
    Auto,
    /// Mooncake's TCP data protocol.
    Tcp,
    /// Shared memory with engines on the same host; other targets are refused.
    Shm,
    /// RDMA through the host's NICs; targets without a usable rail are refused.
    Rdma,
}

impl Protocol {
    /// Its name: `auto`, `tcp`, `shm` or `rdma`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Rdma => "rdma",
        }
    }

    /// Parses `auto`, `tcp`, `shm` or `rdma`.
    pub fn parse(text: &str) -> crate::Result<Self> {
        match text {
            "auto" => Ok(Self::Auto),
            "tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            "rdma" => Ok(Self::Rdma),
            other => Err(crate::Error::invalid(format!(
                "unknown protocol '{other}' (expected 'auto', 'tcp', 'shm' or 'rdma')"
            ))),
        }
    }
}

/// Everything an engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This engine's name: `host` or `host:port`. In P2P mode the published name becomes
    /// `host:<handshake port>`.
    pub local_server_name: String,
    /// `P2PHANDSHAKE`, `http://host:port/metadata` or `redis://host:port`.
    pub metadata: String,
    /// Transport choice. Default: auto.
    pub protocol: Protocol,
    /// IP or host name peers use to reach this engine. Default: `MC_TCP_BIND_ADDRESS`, else the
    /// host part of `local_server_name`.
    pub advertised_host: Option<String>,
    /// Handshake (RPC) port; `None` picks a free one in `rpc_port_range`.
    pub rpc_port: Option<u16>,
    /// Range the handshake port is drawn from. Default 15000-17000 (`MC_MIN_RPC_PORT`,
    /// `MC_MAX_RPC_PORT`).
    pub rpc_port_range: RangeInclusive<u16>,
    /// TCP data port; `None` picks a free one in `rpc_port_range`.
    pub tcp_data_port: Option<u16>,
    /// Largest handshake frame accepted. Default 1 MiB (`MC_HANDSHAKE_MAX_LENGTH`).
    pub handshake_max_length: usize,
    /// Connect timeout for handshakes and data lanes. Default 5 s
    /// (`MC_HANDSHAKE_CONNECT_TIMEOUT`).
    pub connect_timeout: Duration,
    /// A data lane that makes no progress for this long fails its slice. Default 30 s
    /// (`MC_TCP_STATUS_TIMEOUT_SEC`).
    pub io_timeout: Duration,
    /// Persistent connections per peer. Default 4 (`MC_TCP_LANES_PER_PEER`, 1-16).
    pub tcp_lanes_per_peer: usize,
    /// Largest piece a request is cut into; pieces spread over the lanes. Default 1 MiB.
    pub slice_size: usize,
    /// Speak TCP data protocol v1 even to v2 peers (`MC_TCP_PROTO=1`). A v1 write still
    /// completes only once applied: a one-byte read behind it on its connection proves it.
    pub tcp_force_v1: bool,
    /// Key prefix component (`MC_METADATA_CLUSTER_ID`).
    pub cluster_id: Option<String>,
    /// Concurrent handshake connections served at once. Default 256.
    pub handshake_max_connections: usize,
    /// Offer our memory to same-host peers and map theirs. Default true.
    pub shared_memory: bool,
    /// Devices to use, by name: RDMA NICs, and the network interfaces TCP rails leave
    /// through. `None` (the default, unless `MC_TE_FILTERS` lists some) means every RDMA NIC
    /// and a single TCP path by the routing table.
    pub devices: Option<Vec<String>>,
    /// A priority matrix in Mooncake's JSON (`{"cpu:0": [[preferred], [available]]}`) that
    /// replaces the discovered one. Default: the file `MC_CUSTOM_TOPO_JSON` names, if any.
    pub topology_json: Option<String>,
    /// Attempts a slice may make beyond its first, across rails (`MC_RETRY_CNT`, 1-127).
    /// Default 9.
    pub retry_budget: u32,
    /// The cluster's shared secret: with one, every peer must prove it holds the same token
    /// before it reads or writes anything (Mooncake peers hold none). Default:
    /// `MC_CLUSTER_TOKEN`.
    pub cluster_token: Option<ClusterToken>,
}

impl EngineConfig {
    /// Defaults for `local_server_name` and `metadata`, with `MC_*` overrides applied.
    pub fn from_env(local_server_name: impl Into<String>, metadata: impl Into<String>) -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let mut config = Self {
            local_server_name: local_server_name.into(),
            metadata: metadata.into(),
            protocol: Protocol::Auto,
            advertised_host: env("MC_TCP_BIND_ADDRESS"),
            rpc_port: None,
            rpc_port_range: 15000..=17000,
            tcp_data_port: None,
            handshake_max_length: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            tcp_lanes_per_peer: 4,
            slice_size: 1 << 20,
            tcp_force_v1: env("MC_TCP_PROTO").as_deref() == Some("1"),
            cluster_id: env("MC_METADATA_CLUSTER_ID"),
            handshake_max_connections: 256,
            shared_memory: true,
            devices: env("MC_TE_FILTERS").map(|list| {
                list.split(',')
                    .map(|d| d.trim().to_owned())
                    .filter(|d| !d.is_empty())
                    .collect()
            }),
            topology_json: None,
            retry_budget: 9,
            cluster_token: ClusterToken::resolve(None).unwrap_or_else(|e| {
                tracing::error!("ignoring {TOKEN_ENV}: {e}");
                None
            }),
        };
        if let Some(retries) = ranged("MC_RETRY_CNT", 1..=127) {
            config.retry_budget = retries;
        }
        let min = ranged("MC_MIN_RPC_PORT", 1024..=65535)
            .or_else(|| ranged("MC_MIN_PRC_PORT", 1024..=65535));
        let max = ranged("MC_MAX_RPC_PORT", 1024..=65535)
            .or_else(|| ranged("MC_MAX_PRC_PORT", 1024..=65535));
        if let (Some(min), Some(max)) = (min, max) {
            let ephemeral = 32768..=60999;
            if min <= max && !ephemeral.contains(&min) && !ephemeral.contains(&max) {
                config.rpc_port_range = min..=max;
            } else {
                tracing::warn!(min, max, "ignoring RPC port range: must avoid 32768-60999");
            }
        }
        if let Some(bytes) = ranged("MC_HANDSHAKE_MAX_LENGTH", (1 << 20)..=(128 << 20)) {
            config.handshake_max_length = bytes;
        }
        if let Some(secs) = ranged("MC_HANDSHAKE_CONNECT_TIMEOUT", 1..=3599) {
            config.connect_timeout = Duration::from_secs(secs);
        }
        if let Some(secs) = ranged("MC_TCP_STATUS_TIMEOUT_SEC", 1..=3600) {
            config.io_timeout = Duration::from_secs(secs);
        }
        if let Some(lanes) = ranged("MC_TCP_LANES_PER_PEER", 1..=16)
            .or_else(|| ranged("MC_TCP_MAX_CONNECTIONS_PER_PEER", 1..=16))
        {
            config.tcp_lanes_per_peer = lanes;
        }
        config
    }

    /// Checks values that options (not the environment) may have set out of range.
    pub fn validate(&self) -> crate::Result<()> {
        if self.local_server_name.trim().is_empty() {
            return Err(crate::Error::invalid("localServerName must not be empty"));
        }
        if !(1..=16).contains(&self.tcp_lanes_per_peer) {
            return Err(crate::Error::invalid("tcpLanesPerPeer must be within 1-16"));
        }
        if self.slice_size < 4096 {
            return Err(crate::Error::invalid(
                "sliceSize must be at least 4096 bytes",
            ));
        }
        if self.devices.as_ref().is_some_and(|d| d.is_empty()) {
            return Err(crate::Error::invalid(
                "devices must name at least one device (omit it to use them all)",
            ));
        }
        if self.cluster_token.is_none() {
            // A token in the environment too short to use must not leave the engine open.
            ClusterToken::resolve(None)?;
        }
        if self.rpc_port_range.is_empty() {
            return Err(crate::Error::invalid("the RPC port range is empty"));
        }
        Ok(())
    }
}

fn ranged<T>(name: &str, range: RangeInclusive<T>) -> Option<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let text = std::env::var(name).ok()?;
    match text.trim().parse::<T>() {
        Ok(value) if range.contains(&value) => Some(value),
        _ => {
            tracing::warn!(
                "ignoring {name}={text}: expected a value within {}-{}",
                range.start(),
                range.end()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_parses_known_names() {
        assert_eq!(Protocol::parse("tcp").unwrap(), Protocol::Tcp);
        assert_eq!(Protocol::parse("rdma").unwrap(), Protocol::Rdma);
        assert_eq!(
            Protocol::parse("carrier-pigeon").unwrap_err().kind(),
            crate::ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn defaults_validate() {
        let config = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
        config.validate().unwrap();
        assert!(config.rpc_port_range.contains(&15000));
    }
}
