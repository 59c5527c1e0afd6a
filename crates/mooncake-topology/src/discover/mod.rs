//! Discovery from sysfs, and the matrix rules over what was found.

mod sysfs;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use mooncake_common::{Error, Result};
use serde::Serialize;

use self::sysfs::*;
use crate::matrix::{Entry, PriorityMatrix};

/// Environment variable holding the RDMA device allow-list, comma separated.
pub const FILTERS_ENV: &str = "MC_TE_FILTERS";

/// PCI vendors whose display-class devices are GPUs we can place buffers on.
const GPU_VENDORS: &[(u32, &str)] = &[(0x10de, "nvidia"), (0x1002, "amd")];

/// What [`Topology::discover`] reads and keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverOptions {
    /// Directory under which `sys/` is read: `/` on a host, a fixture tree in tests.
    pub root: PathBuf,
    /// RDMA device allow-list; `None` or an empty list keeps every device.
    pub filters: Option<Vec<String>>,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            filters: None,
        }
    }
}

impl DiscoverOptions {
    /// Root `/`, filters from `MC_TE_FILTERS`.
    pub fn from_env() -> Self {
        Self {
            filters: std::env::var(FILTERS_ENV)
                .ok()
                .and_then(|v| parse_filters(&v)),
            ..Self::default()
        }
    }

    fn allows(&self, name: &str) -> bool {
        match &self.filters {
            Some(list) if !list.is_empty() => list.iter().any(|f| f == name),
            _ => true,
        }
    }
}

fn parse_filters(value: &str) -> Option<Vec<String>> {
    let list: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    (!list.is_empty()).then_some(list)
}

/// A NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    /// Node number, as in `cpu:<id>`.
    pub id: u32,
    /// The node's CPUs in the kernel's list format (`0-31,64-95`), when readable.
    pub cpulist: Option<String>,
}

/// An RDMA device (`/sys/class/infiniband/<name>`) with at least one usable port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RdmaNic {
    /// Device name (`mlx5_0`).
    pub name: String,
    /// PCI address (`0000:0c:00.0`); `None` for software devices such as `rxe0`.
    pub pci_bus_id: Option<String>,
    /// Resolved sysfs path of the PCI function, which encodes its place in the PCIe tree.
    pub pci_path: Option<String>,
    /// NUMA node of the PCI function; 0 when the kernel reports none (-1).
    pub numa_node: u32,
    /// Every readable port.
    pub ports: Vec<RdmaPort>,
}

impl RdmaNic {
    /// Mooncake's rule: some port is ACTIVE and has a non-zero GID.
    pub fn is_usable(&self) -> bool {
        self.ports.iter().any(|p| p.active && !p.gids.is_empty())
    }
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RdmaPort {
    /// Port number (from 1).
    pub port: u32,
    /// The kernel's state line, e.g. `4: ACTIVE`.
    pub state: String,
    /// Whether the state is ACTIVE.
    pub active: bool,
    /// `InfiniBand` or `Ethernet`.
    pub link_layer: Option<String>,
    /// The populated (non-zero) GID table entries.
    pub gids: Vec<Gid>,
}

/// A populated GID table entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gid {
    /// Index in the port's GID table (what `MC_GID_INDEX` names).
    pub index: u32,
    /// The GID as sysfs prints it (`fe80:0000:...`).
    pub gid: String,
    /// `RoCE v2`, `IB/RoCE v1`, when the kernel reports it.
    pub gid_type: Option<String>,
    /// The network interface the GID belongs to (RoCE).
    pub netdev: Option<String>,
}

/// A network interface (`/sys/class/net/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetInterface {
    /// Interface name.
    pub name: String,
    /// PCI address of the backing device; `None` for virtual interfaces.
    pub pci_bus_id: Option<String>,
    /// Resolved sysfs path of the backing PCI function.
    pub pci_path: Option<String>,
    /// NUMA node of the backing PCI function (0 when unknown); `None` when virtual.
    pub numa_node: Option<u32>,
    /// `up`, `down`, `unknown`, ...
    pub operstate: Option<String>,
    /// Whether a link is detected; `None` when the kernel does not say (interface down).
    pub carrier: Option<bool>,
}

impl NetInterface {
    /// Whether a PCI device backs the interface.
    pub fn is_physical(&self) -> bool {
        self.pci_bus_id.is_some()
    }
}

/// A GPU found on the PCI bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gpu {
    /// Position in PCI bus order, which is CUDA's order under `CUDA_DEVICE_ORDER=PCI_BUS_ID`
    /// with every device visible.
    pub ordinal: u32,
    /// Location name, `cuda:<ordinal>`.
    pub location: String,
    /// PCI address, lower case.
    pub pci_bus_id: String,
    /// Resolved sysfs path of the PCI function.
    pub pci_path: Option<String>,
    /// `nvidia` or `amd`.
    pub vendor: String,
    /// NUMA node of the PCI function; 0 when the kernel reports none.
    pub numa_node: u32,
}

/// What a host looks like to the transfer engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// NUMA nodes; a host without `/sys/devices/system/node` has node 0 only.
    pub numa_nodes: Vec<NumaNode>,
    /// Usable RDMA devices that pass the filters, in natural name order.
    pub rdma_nics: Vec<RdmaNic>,
    /// Every network interface, by name.
    pub interfaces: Vec<NetInterface>,
    /// GPUs in PCI bus order.
    pub gpus: Vec<Gpu>,
}

impl Topology {
    /// Reads the topology under `options.root`. Unreadable or garbled devices are skipped;
    /// only a root that cannot be opened is an error.
    pub fn discover(options: &DiscoverOptions) -> Result<Self> {
        let sys = Sysfs::open(&options.root)?;
        Ok(Self {
            numa_nodes: sys.numa_nodes(),
            rdma_nics: sys.rdma_nics(options),
            interfaces: sys.interfaces(),
            gpus: sys.gpus(),
        })
    }

    /// Mooncake's priority matrix over the RDMA NICs.
    ///
    /// `cpu:N` prefers the NICs on node N. `cuda:K` takes the NICs on the GPU's node (all NICs
    /// if none), prefers those at the smallest [`pci_distance`] (ties kept; all candidates when
    /// no distance is known), and lists every other NIC as available.
    pub fn matrix(&self) -> PriorityMatrix {
        let nics: Vec<(&str, u32)> = self
            .rdma_nics
            .iter()
            .map(|n| (n.name.as_str(), n.numa_node))
            .collect();
        let mut matrix = self.cpu_matrix(&nics);
        for gpu in &self.gpus {
            let same_node: Vec<&RdmaNic> = self
                .rdma_nics
                .iter()
                .filter(|n| n.numa_node == gpu.numa_node)
                .collect();
            let candidates = if same_node.is_empty() {
                self.rdma_nics.iter().collect()
            } else {
                same_node
            };
            let distance = |nic: &RdmaNic| match (&gpu.pci_path, &nic.pci_path) {
                (Some(a), Some(b)) => Some(pci_distance(a, b)),
                _ => None,
            };
            let best = candidates.iter().filter_map(|n| distance(n)).min();
            let preferred: Vec<String> = candidates
                .iter()
                .filter(|n| best.is_none() || distance(n) == best)
                .map(|n| n.name.clone())
                .collect();
            let available = self
                .rdma_nics
                .iter()
                .filter(|n| !preferred.contains(&n.name))
                .map(|n| n.name.clone())
                .collect();
            matrix.insert(
                gpu.location.clone(),
                Entry {
                    preferred,
                    available,
                },
            );
        }
        matrix
    }

    /// The CPU rule of [`Topology::matrix`] over physical network interfaces (TCP rails).
    pub fn net_matrix(&self) -> PriorityMatrix {
        let nics: Vec<(&str, u32)> = self
            .interfaces
            .iter()
            .filter(|i| i.is_physical())
            .map(|i| (i.name.as_str(), i.numa_node.unwrap_or(0)))
            .collect();
        self.cpu_matrix(&nics)
    }

    fn cpu_matrix(&self, nics: &[(&str, u32)]) -> PriorityMatrix {
        let mut matrix = PriorityMatrix::new();
        for node in &self.numa_nodes {
            let (preferred, available): (Vec<_>, Vec<_>) =
                nics.iter().partition(|(_, numa)| *numa == node.id);
            let names = |list: Vec<&(&str, u32)>| list.iter().map(|(n, _)| n.to_string()).collect();
            matrix.insert(
                format!("cpu:{}", node.id),
                Entry {
                    preferred: names(preferred),
                    available: names(available),
                },
            );
        }
        matrix
    }
}

/// Hops between two PCI functions: the path components of both resolved sysfs paths after
/// their common prefix. Components are compared whole, so sibling functions (`...00.0`,
/// `...00.1`) are 2 apart rather than Mooncake's character-prefix 0.
pub fn pci_distance(a: &str, b: &str) -> usize {
    let a: Vec<&str> = a.split('/').filter(|c| !c.is_empty()).collect();
    let b: Vec<&str> = b.split('/').filter(|c| !c.is_empty()).collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    a.len() + b.len() - 2 * common
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        writeln!(f, "NUMA nodes: {}", self.numa_nodes.len())?;
        for node in &self.numa_nodes {
            writeln!(f, "  node{}  cpus {}", node.id, or_dash(&node.cpulist))?;
        }
        writeln!(f, "RDMA NICs: {}", self.rdma_nics.len())?;
        for nic in &self.rdma_nics {
            let bus = or_dash(&nic.pci_bus_id);
            writeln!(f, "  {}  pci {bus}  numa {}", nic.name, nic.numa_node)?;
            for port in &nic.ports {
                let layer = or_dash(&port.link_layer);
                writeln!(f, "    port {}  {}  {layer}", port.port, port.state)?;
                for gid in &port.gids {
                    writeln!(
                        f,
                        "      gid {:<3} {}  {}  {}",
                        gid.index,
                        gid.gid,
                        or_dash(&gid.gid_type),
                        or_dash(&gid.netdev)
                    )?;
                }
            }
        }
        writeln!(f, "Network interfaces: {}", self.interfaces.len())?;
        for i in &self.interfaces {
            let place = match (&i.pci_bus_id, i.numa_node) {
                (Some(bus), Some(numa)) => format!("pci {bus}  numa {numa}"),
                _ => "virtual".to_owned(),
            };
            let carrier = match i.carrier {
                Some(true) => "carrier",
                Some(false) => "no carrier",
                None => "-",
            };
            writeln!(
                f,
                "  {}  {place}  {}  {carrier}",
                i.name,
                or_dash(&i.operstate)
            )?;
        }
        writeln!(f, "GPUs: {}", self.gpus.len())?;
        for gpu in &self.gpus {
            writeln!(
                f,
                "  {}  pci {}  {}  numa {}",
                gpu.location, gpu.pci_bus_id, gpu.vendor, gpu.numa_node
            )?;
        }
        writeln!(f, "Priority matrix (RDMA):")?;
        write!(f, "{}", self.matrix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_apply() {
        assert_eq!(parse_filters(" , "), None);
        let filters = parse_filters("mlx5_0, mlx5_2,");
        assert_eq!(filters, Some(vec!["mlx5_0".into(), "mlx5_2".into()]));
        let options = DiscoverOptions {
            filters,
            ..DiscoverOptions::default()
        };
        assert!(options.allows("mlx5_2") && !options.allows("mlx5_1"));
        assert!(DiscoverOptions::default().allows("anything"));
    }

    #[test]
    fn names_sort_naturally_and_addresses_are_recognised() {
        let mut names = vec!["mlx5_10", "mlx5_2", "eth0", "mlx5_1"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["eth0", "mlx5_1", "mlx5_2", "mlx5_10"]);
        assert!(is_pci_address("0000:af:00.1"));
        assert!(!is_pci_address("virtio2") && !is_pci_address("pci0000:00"));
    }

    #[test]
    fn distance_counts_components_past_the_common_prefix() {
        let root = "/sys/devices/pci0000:00/0000:00:01.0";
        assert_eq!(
            pci_distance(
                &format!("{root}/0000:01:00.0"),
                &format!("{root}/0000:01:00.0")
            ),
            0
        );
        assert_eq!(
            pci_distance(
                &format!("{root}/0000:01:00.0"),
                &format!("{root}/0000:01:00.1")
            ),
            2
        );
        assert_eq!(
            pci_distance(&format!("{root}/a/b"), "/sys/devices/pci0000:80/c"),
            6
        );
    }
}
