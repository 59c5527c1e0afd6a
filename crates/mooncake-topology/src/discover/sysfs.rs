//! Reading sysfs under a root: PCI functions, NUMA nodes, RDMA devices and their ports,
//! network interfaces and GPUs. Unreadable or garbled entries are skipped.

use super::*;

/// A PCI function found by resolving a `device` link.
pub(super) struct Pci {
    pub(super) bus_id: String,
    pub(super) path: String,
    pub(super) numa_node: u32,
}

pub(super) struct Sysfs {
    pub(super) root: PathBuf,
    pub(super) real_root: PathBuf,
}

impl Sysfs {
    pub(super) fn open(root: &Path) -> Result<Self> {
        let real_root = fs::canonicalize(root).map_err(|e| {
            Error::invalid(format!("topology root {}: {e}", root.display())).with_source(e)
        })?;
        if !real_root.is_dir() {
            return Err(Error::invalid(format!(
                "topology root {} is not a directory",
                root.display()
            )));
        }
        Ok(Self {
            root: root.to_path_buf(),
            real_root,
        })
    }

    pub(super) fn dir(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub(super) fn numa_nodes(&self) -> Vec<NumaNode> {
        let dir = self.dir("sys/devices/system/node");
        let mut ids: Vec<u32> = list_dir(&dir)
            .iter()
            .filter_map(|name| name.strip_prefix("node")?.parse().ok())
            .collect();
        ids.sort_unstable();
        if ids.is_empty() {
            ids.push(0);
        }
        ids.into_iter()
            .map(|id| NumaNode {
                id,
                cpulist: read_trim(&dir.join(format!("node{id}/cpulist"))),
            })
            .collect()
    }

    pub(super) fn rdma_nics(&self, options: &DiscoverOptions) -> Vec<RdmaNic> {
        let class = self.dir("sys/class/infiniband");
        let mut names = list_dir(&class);
        names.sort_by_key(|n| natural_key(n));
        let mut nics = Vec::new();
        for name in names {
            if !options.allows(&name) {
                tracing::debug!(device = %name, "RDMA device not in the filter list");
                continue;
            }
            let dev = class.join(&name);
            let pci = self.pci_of(&dev.join("device"));
            let mut ports: Vec<u32> = list_dir(&dev.join("ports"))
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect();
            ports.sort_unstable();
            let nic = RdmaNic {
                ports: ports
                    .into_iter()
                    .filter_map(|p| read_port(&dev.join(format!("ports/{p}")), p))
                    .collect(),
                name,
                numa_node: pci.as_ref().map_or(0, |p| p.numa_node),
                pci_bus_id: pci.as_ref().map(|p| p.bus_id.clone()),
                pci_path: pci.map(|p| p.path),
            };
            if nic.is_usable() {
                nics.push(nic);
            } else {
                tracing::debug!(device = %nic.name, "RDMA device has no ACTIVE port with a GID");
            }
        }
        nics
    }

    pub(super) fn interfaces(&self) -> Vec<NetInterface> {
        let class = self.dir("sys/class/net");
        let mut names = list_dir(&class);
        names.sort_by_key(|n| natural_key(n));
        names
            .into_iter()
            .map(|name| {
                let dir = class.join(&name);
                let device = dir.join("device");
                let pci = if device.exists() {
                    self.pci_of(&device)
                } else {
                    None
                };
                let carrier = match read_trim(&dir.join("carrier")).as_deref() {
                    Some("1") => Some(true),
                    Some("0") => Some(false),
                    _ => None,
                };
                NetInterface {
                    operstate: read_trim(&dir.join("operstate")),
                    carrier,
                    numa_node: pci.as_ref().map(|p| p.numa_node),
                    pci_bus_id: pci.as_ref().map(|p| p.bus_id.clone()),
                    pci_path: pci.map(|p| p.path),
                    name,
                }
            })
            .collect()
    }

    pub(super) fn gpus(&self) -> Vec<Gpu> {
        let bus = self.dir("sys/bus/pci/devices");
        let mut ids: Vec<String> = list_dir(&bus)
            .into_iter()
            .map(|id| id.to_ascii_lowercase())
            .filter(|id| is_pci_address(id))
            .collect();
        ids.sort();
        let mut gpus = Vec::new();
        for id in ids {
            let dir = bus.join(&id);
            let (Some(class), Some(vendor)) =
                (read_hex(&dir.join("class")), read_hex(&dir.join("vendor")))
            else {
                tracing::debug!(device = %id, "PCI device without readable class or vendor");
                continue;
            };
            let Some(&(_, vendor)) = GPU_VENDORS.iter().find(|(v, _)| *v == vendor) else {
                continue;
            };
            if class >> 16 != 0x03 {
                continue;
            }
            let ordinal = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
            let pci = self.pci_of(&dir);
            gpus.push(Gpu {
                ordinal,
                location: format!("cuda:{ordinal}"),
                pci_path: pci.as_ref().map(|p| p.path.clone()),
                numa_node: pci.map_or_else(|| numa_of(&dir), |p| p.numa_node),
                pci_bus_id: id,
                vendor: vendor.to_owned(),
            });
        }
        gpus
    }

    /// Resolves `link` and walks up to the nearest PCI function (a `virtio` or USB device
    /// hangs below one).
    pub(super) fn pci_of(&self, link: &Path) -> Option<Pci> {
        let real = fs::canonicalize(link)
            .map_err(|e| tracing::debug!(path = %link.display(), error = %e, "cannot resolve"))
            .ok()?;
        let pci_dir = real
            .ancestors()
            .take_while(|p| p.starts_with(&self.real_root) && *p != self.real_root)
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_pci_address)
            })?;
        let rel = pci_dir.strip_prefix(&self.real_root).ok()?;
        Some(Pci {
            bus_id: pci_dir.file_name()?.to_str()?.to_ascii_lowercase(),
            path: format!("/{}", rel.display()),
            numa_node: numa_of(pci_dir),
        })
    }
}

pub(super) fn read_port(dir: &Path, port: u32) -> Option<RdmaPort> {
    let Some(state) = read_trim(&dir.join("state")) else {
        tracing::debug!(path = %dir.display(), "RDMA port without a readable state");
        return None;
    };
    let active = state
        .split_once(':')
        .map_or(state.as_str(), |(_, s)| s)
        .trim()
        == "ACTIVE";
    let mut indices: Vec<u32> = list_dir(&dir.join("gids"))
        .iter()
        .filter_map(|i| i.parse().ok())
        .collect();
    indices.sort_unstable();
    let gids = indices
        .into_iter()
        .filter_map(|index| {
            let gid = read_trim(&dir.join(format!("gids/{index}")))?;
            let valid = !gid.is_empty() && gid.chars().all(|c| c == ':' || c.is_ascii_hexdigit());
            let zero = gid.chars().all(|c| c == ':' || c == '0');
            (valid && !zero).then(|| Gid {
                index,
                gid_type: read_trim(&dir.join(format!("gid_attrs/types/{index}"))),
                netdev: read_trim(&dir.join(format!("gid_attrs/ndevs/{index}"))),
                gid,
            })
        })
        .collect();
    Some(RdmaPort {
        port,
        state,
        active,
        link_layer: read_trim(&dir.join("link_layer")),
        gids,
    })
}

/// Entry names of a directory; a missing directory is simply empty.
pub(super) fn list_dir(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(path = %dir.display(), error = %e, "cannot list");
            }
            Vec::new()
        }
    }
}

pub(super) fn read_trim(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    Some(text.trim().to_owned())
}

pub(super) fn read_hex(path: &Path) -> Option<u32> {
    let text = read_trim(path)?;
    u32::from_str_radix(text.strip_prefix("0x").unwrap_or(&text), 16).ok()
}

/// The kernel writes -1 on hosts without NUMA; like Mooncake's single-node hosts, that is 0.
pub(super) fn numa_of(pci_dir: &Path) -> u32 {
    read_trim(&pci_dir.join("numa_node"))
        .and_then(|n| n.parse::<i64>().ok())
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

/// `dddd:bb:dd.f` in hex.
pub(super) fn is_pci_address(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// Sorts `mlx5_2` before `mlx5_10`.
pub(super) fn natural_key(name: &str) -> (String, u64) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, num) = name.split_at(name.len() - digits);
    (stem.to_owned(), num.parse().unwrap_or(0))
}
