//! Where the bytes live and which NICs reach them best.
//!
//! - [`Topology::discover`] reads sysfs under a root (`/` on a host, a fixture tree in tests):
//!   NUMA nodes, RDMA NICs with their ports and GIDs, network interfaces and GPUs.
//! - [`Topology::matrix`] turns that into Mooncake's [`PriorityMatrix`]: for every location
//!   (`cpu:<numa>`, `cuda:<ordinal>`) the preferred and the merely available NICs.
//! - [`PriorityMatrix`] also parses and prints Mooncake's JSON, so a matrix can come from
//!   `MC_CUSTOM_TOPO_JSON` or from a peer's segment descriptor.
//! - [`memory_location`] asks the kernel which NUMA node holds a buffer.

mod discover;
mod matrix;
mod memory;

pub use discover::{
    pci_distance, DiscoverOptions, Gid, Gpu, NetInterface, NumaNode, RdmaNic, RdmaPort, Topology,
    FILTERS_ENV,
};
pub use matrix::{Entry, PriorityMatrix, CUSTOM_TOPO_ENV, WILDCARD};
pub use memory::memory_location;
