//! Test fixtures shared by the Mooncake crates' tests; not shipped.
//!
//! - [`EtcdCluster`]: one or three real `etcd` members on loopback, each with its own data
//!   directory, killed and removed on drop; [`etcd_installed`] says whether the host can run
//!   one (Debian's `etcd-server`);
//! - [`RedisServer`]: a real `redis-server` on loopback, stopped on drop;
//! - [`mooncake_py`]: Mooncake's own Python client and `mooncake_master` from the pinned wheel,
//!   for differential tests, and [`mooncake_scenarios`], what its client does against a master;
//! - [`probe::declare_servers`]: for build scripts, which of those this host can run;
//! - [`promtool::check_metrics`]: what `promtool` says of a metrics page;
//! - [`rss_kib`]: this process's resident memory, for tests that print what a load costs.

mod etcd;
pub mod mooncake_py;
pub mod mooncake_scenarios;
pub mod probe;
pub mod promtool;
mod redis;

pub use etcd::{etcd_installed, EtcdCluster};
pub use redis::RedisServer;

/// This process's resident memory in KiB (0 where `/proc` is not there).
pub fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}
