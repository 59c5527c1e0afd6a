//! The master's knobs, with Mooncake's defaults.

use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};

/// How replicas are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllocationStrategy {
    /// Preferred segments first, then a random start and a linear scan.
    #[default]
    Random,
    /// Preferred segments first, then a sample of segments ranked by free space ratio.
    FreeRatioFirst,
    /// The writer's host first, then other hosts in order.
    LocalFirst,
}

impl AllocationStrategy {
    /// Parses `random`, `free_ratio_first` or `local_first`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "random" => Ok(Self::Random),
            "free_ratio_first" => Ok(Self::FreeRatioFirst),
            "local_first" => Ok(Self::LocalFirst),
            other => Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "unknown allocation strategy '{other}' (random, free_ratio_first, local_first)"
                ),
            )),
        }
    }
}

/// Master configuration.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Read lease granted by reads and existence checks. Default 10 s.
    pub default_kv_lease_ttl: Duration,
    /// Soft pin TTL when a write asks for one without a TTL. Default 30 min.
    pub default_kv_soft_pin_ttl: Duration,
    /// Longest soft pin a write may ask for. Default 24 h.
    pub max_kv_soft_pin_ttl: Duration,
    /// Whether the second eviction pass may take soft-pinned objects. Default true.
    pub allow_evict_soft_pinned_objects: bool,
    /// Fraction of objects evicted per round. Default 0.05.
    pub eviction_ratio: f64,
    /// Usage above which eviction runs. Default 0.90.
    pub eviction_high_watermark_ratio: f64,
    /// A client silent for this long is dead. Default 10 s.
    pub client_ttl: Duration,
    /// An unfinished write younger than this cannot be preempted. Default 30 s.
    pub put_start_discard_timeout: Duration,
    /// Space of an abandoned or preempted write is freed this long after its start. Default 600 s.
    pub put_start_release_timeout: Duration,
    /// Placement strategy. Default random.
    pub allocation_strategy: AllocationStrategy,
}

impl Default for MasterConfig {
    fn default() -> Self {
        Self {
            default_kv_lease_ttl: Duration::from_secs(10),
            default_kv_soft_pin_ttl: Duration::from_secs(30 * 60),
            max_kv_soft_pin_ttl: Duration::from_secs(24 * 3600),
            allow_evict_soft_pinned_objects: true,
            eviction_ratio: 0.05,
            eviction_high_watermark_ratio: 0.90,
            client_ttl: Duration::from_secs(10),
            put_start_discard_timeout: Duration::from_secs(30),
            put_start_release_timeout: Duration::from_secs(600),
            allocation_strategy: AllocationStrategy::Random,
        }
    }
}

impl MasterConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::new(ErrorKind::InvalidArgument, what.to_owned()));
        if !(0.0..=1.0).contains(&self.eviction_ratio) {
            return bad("eviction ratio must be within 0-1");
        }
        if !(0.0..=1.0).contains(&self.eviction_high_watermark_ratio) {
            return bad("eviction high watermark must be within 0-1");
        }
        if self.client_ttl.is_zero() {
            return bad("client TTL must be positive");
        }
        if self.default_kv_soft_pin_ttl > self.max_kv_soft_pin_ttl {
            return bad("the default soft pin TTL exceeds the maximum");
        }
        Ok(())
    }
}
