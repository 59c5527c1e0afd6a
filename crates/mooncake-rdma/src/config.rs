//! Knobs of the RDMA transport, with Mooncake's `MC_*` environment variables as defaults.

use std::time::Duration;

use mooncake_common::{Error, Result};

use crate::store::StoreKind;

/// RDMA transport configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Queue pairs per endpoint (`MC_NUM_QP_PER_EP`, 2); both sides must agree.
    pub num_qp_per_ep: usize,
    /// Endpoints cached per context (`MC_MAX_EP_PER_CTX`, 65536).
    pub max_ep_per_ctx: usize,
    /// Eviction policy of the endpoint cache (`MC_ENDPOINT_STORE_TYPE`, SIEVE).
    pub store_kind: StoreKind,
    /// Slice size in bytes (`MC_SLICE_SIZE`, 65536).
    pub slice_size: usize,
    /// A tail up to this long is merged into the previous slice (16384).
    pub fragment_limit: usize,
    /// Attempts a slice may make in all (`MC_RETRY_CNT`, 9). As in Mooncake, every failed
    /// attempt counts one and a slice fails for good once the count reaches this budget
    /// (`retry_cnt >= max_retry_cnt`), so 9 allows 9 attempts, not 9 retries after a first.
    pub retry_cnt: u32,
    /// GID index to use instead of auto-selection (`MC_GID_INDEX`).
    pub gid_index: Option<u32>,
    /// Port number (`MC_IB_PORT`, 1).
    pub ib_port: u8,
    /// Outstanding work requests per QP (`MC_MAX_WR`, 256).
    pub max_wr: u32,
    /// Completion queue entries per context (`MC_MAX_CQE_PER_CTX`, 4096).
    pub max_cqe: usize,
    /// Path MTU cap (`MC_MTU`, 4096).
    pub mtu: u32,
    /// How long a passive endpoint waits for the ready-ack before it is deleted (10 s).
    pub ready_ack_timeout: Duration,
    /// How long a retired endpoint waits for its requests to drain (30 s).
    pub destroy_timeout: Duration,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            num_qp_per_ep: 2,
            max_ep_per_ctx: 65536,
            store_kind: StoreKind::Sieve,
            slice_size: 65536,
            fragment_limit: 16384,
            retry_cnt: 9,
            gid_index: None,
            ib_port: 1,
            max_wr: 256,
            max_cqe: 4096,
            mtu: 4096,
            ready_ack_timeout: Duration::from_secs(10),
            destroy_timeout: Duration::from_secs(30),
        }
    }
}

impl RdmaConfig {
    /// Checks the values the transport cannot run with: zero counts and sizes, a port 0,
    /// an MTU outside 256..=4096. Fails with `ERR_INVALID_ARGUMENT`.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("num_qp_per_ep", self.num_qp_per_ep),
            ("max_ep_per_ctx", self.max_ep_per_ctx),
            ("slice_size", self.slice_size),
            ("retry_cnt", self.retry_cnt as usize),
            ("ib_port", usize::from(self.ib_port)),
            ("max_wr", self.max_wr as usize),
            ("max_cqe", self.max_cqe),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid(format!("RDMA config: {name} must be > 0")));
            }
        }
        if self.num_qp_per_ep > 255 {
            return Err(Error::invalid(format!(
                "RDMA config: num_qp_per_ep {} exceeds 255",
                self.num_qp_per_ep
            )));
        }
        if !(256..=4096).contains(&self.mtu) {
            return Err(Error::invalid(format!(
                "RDMA config: mtu {} is outside 256..=4096",
                self.mtu
            )));
        }
        if self.slice_size > u32::MAX as usize {
            return Err(Error::invalid(format!(
                "RDMA config: slice_size {} exceeds one work request",
                self.slice_size
            )));
        }
        Ok(())
    }

    /// Defaults overridden by the `MC_*` variables that are set and valid.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut config = Self::default();
        let num = |name: &str, min: u64, max: u64| -> Option<u64> {
            let value = var(name)?;
            match value.trim().parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Some(n),
                _ => {
                    tracing::warn!("ignoring {name}={value}: expected {min}..={max}");
                    None
                }
            }
        };
        if let Some(n) = num("MC_NUM_QP_PER_EP", 1, 255) {
            config.num_qp_per_ep = n as usize;
        }
        if let Some(n) = num("MC_MAX_EP_PER_CTX", 1, 65536) {
            config.max_ep_per_ctx = n as usize;
        }
        if let Some(n) = num("MC_SLICE_SIZE", 1, u32::MAX as u64) {
            config.slice_size = n as usize;
        }
        if let Some(n) = num("MC_FRAGMENT_RATIO", 1, 1 << 20) {
            config.fragment_limit = config.slice_size / n as usize;
        }
        if let Some(n) = num("MC_RETRY_CNT", 1, 127) {
            config.retry_cnt = n as u32;
        }
        let gid = var("MC_GID_INDEX").or_else(|| var("NCCL_IB_GID_INDEX"));
        if let Some(value) = gid {
            match value.trim().parse::<i64>() {
                Ok(n) if (0..=255).contains(&n) => config.gid_index = Some(n as u32),
                Ok(-1) => {}
                _ => tracing::warn!("ignoring MC_GID_INDEX={value}: expected 0..=255"),
            }
        }
        if let Some(n) = num("MC_IB_PORT", 1, 255) {
            config.ib_port = n as u8;
        }
        if let Some(n) = num("MC_MAX_WR", 1, 1 << 20) {
            config.max_wr = n as u32;
        }
        if let Some(n) = num("MC_MAX_CQE_PER_CTX", 1, 65535) {
            config.max_cqe = n as usize;
        }
        if let Some(n) = num("MC_MTU", 512, 4096) {
            if [512, 1024, 2048, 4096].contains(&n) {
                config.mtu = n as u32;
            }
        }
        if let Some(kind) = var("MC_ENDPOINT_STORE_TYPE") {
            match kind.trim().to_ascii_uppercase().as_str() {
                "FIFO" => config.store_kind = StoreKind::Fifo,
                "SIEVE" => config.store_kind = StoreKind::Sieve,
                _ => tracing::warn!("ignoring MC_ENDPOINT_STORE_TYPE={kind}: FIFO or SIEVE"),
            }
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_and_rejects() {
        let env = |name: &str| -> Option<String> {
            match name {
                "MC_NUM_QP_PER_EP" => Some("4".into()),
                "MC_SLICE_SIZE" => Some("131072".into()),
                "MC_RETRY_CNT" => Some("500".into()),
                "MC_GID_INDEX" => Some("3".into()),
                "MC_ENDPOINT_STORE_TYPE" => Some("fifo".into()),
                "MC_MTU" => Some("1000".into()),
                _ => None,
            }
        };
        let config = RdmaConfig::from_lookup(env);
        assert_eq!(config.num_qp_per_ep, 4);
        assert_eq!(config.slice_size, 131072);
        assert_eq!(
            config.fragment_limit, 16384,
            "computed once, as Mooncake does"
        );
        assert_eq!(config.retry_cnt, 9);
        assert_eq!(config.gid_index, Some(3));
        assert_eq!(config.store_kind, StoreKind::Fifo);
        assert_eq!(config.mtu, 4096);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn zero_sizes_are_invalid() {
        assert!(RdmaConfig::default().validate().is_ok());
        let broken = [
            RdmaConfig {
                num_qp_per_ep: 0,
                ..RdmaConfig::default()
            },
            RdmaConfig {
                max_wr: 0,
                ..RdmaConfig::default()
            },
            RdmaConfig {
                max_cqe: 0,
                ..RdmaConfig::default()
            },
            RdmaConfig {
                slice_size: 0,
                ..RdmaConfig::default()
            },
            RdmaConfig {
                retry_cnt: 0,
                ..RdmaConfig::default()
            },
            RdmaConfig {
                mtu: 100,
                ..RdmaConfig::default()
            },
        ];
        for config in broken {
            let e = config.validate().unwrap_err();
            assert_eq!(e.kind(), mooncake_common::ErrorKind::InvalidArgument, "{e}");
        }
    }
}
