//! Test fixtures shared by the Mooncake crates' tests; not shipped.
//!
//! - [`EtcdCluster`]: one or three real `etcd` members on loopback, each with its own data
//!   directory, killed and removed on drop; [`etcd_installed`] says whether the host can run
//!   one (Debian's `etcd-server`).

mod etcd;

pub use etcd::{etcd_installed, EtcdCluster};
