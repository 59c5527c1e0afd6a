//! What the transport knows of a peer, parsed from its segment descriptor.

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::SegmentDesc;
use serde::{Deserialize, Serialize};

pub use mooncake_topology::PriorityMatrix;

/// One device as a segment descriptor publishes it (`devices: [{name, lid, gid}]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDesc {
    /// Device name.
    pub name: String,
    /// Port LID.
    #[serde(default)]
    pub lid: u16,
    /// GID, 16 lowercase hex bytes joined by `:`.
    pub gid: String,
}

/// One registered buffer of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBuffer {
    /// Memory location (`cpu:0`, `cuda:1`, `*`).
    pub location: String,
    /// Start address in the peer's process.
    pub addr: u64,
    /// Length in bytes.
    pub length: u64,
    /// Remote keys, aligned with the peer's `devices`; empty when not remote-accessible.
    pub rkeys: Vec<u32>,
}

impl PeerBuffer {
    fn end(&self) -> u64 {
        self.addr.saturating_add(self.length)
    }
}

/// An RDMA peer: where to handshake, its devices, buffers and priority matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaPeer {
    /// Server name used in NIC paths (`rdma_server_name`, else the segment name).
    pub server_name: String,
    /// `host:port` of its handshake listener.
    pub rpc_addr: String,
    /// Its devices, in the order its key arrays follow.
    pub devices: Vec<DeviceDesc>,
    /// Its buffers.
    pub buffers: Vec<PeerBuffer>,
    /// Its priority matrix, by device name.
    pub matrix: PriorityMatrix,
}

fn malformed(segment: &str, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::MalformedJson,
        format!("RDMA descriptor of segment '{segment}': {what}"),
    )
}

impl RdmaPeer {
    /// Parses the RDMA fields of `desc`; `rpc_addr` is where its handshake listener is.
    /// Keys are resolved through the peer's own `devices` order, by name; a buffer whose
    /// `rkey` array does not match `devices` in length is rejected.
    pub fn from_desc(desc: &SegmentDesc, rpc_addr: &str) -> Result<Self> {
        let name = &desc.name;
        let devices: Vec<DeviceDesc> = match desc.extra.get("devices") {
            None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| malformed(name, e))?,
        };
        if let Some(bad) = devices
            .iter()
            .find(|d| d.name.is_empty() || d.gid.is_empty())
        {
            return Err(malformed(
                name,
                format!("device '{}' lacks a name or GID", bad.name),
            ));
        }
        let mut buffers = Vec::with_capacity(desc.buffers.len());
        for buffer in &desc.buffers {
            let rkeys: Vec<u32> = match buffer.extra.get("rkey") {
                None => Vec::new(),
                Some(v) => serde_json::from_value(v.clone()).map_err(|e| malformed(name, e))?,
            };
            if !rkeys.is_empty() && rkeys.len() != devices.len() {
                return Err(malformed(
                    name,
                    format!(
                        "buffer at {:#x} has {} rkeys for {} devices",
                        buffer.addr,
                        rkeys.len(),
                        devices.len()
                    ),
                ));
            }
            buffers.push(PeerBuffer {
                location: buffer.name.clone(),
                addr: buffer.addr,
                length: buffer.length,
                rkeys,
            });
        }
        let matrix = match desc.extra.get("priority_matrix") {
            None | Some(serde_json::Value::Null) => PriorityMatrix::new(),
            Some(v) => PriorityMatrix::deserialize(v).map_err(|e| malformed(name, e))?,
        };
        let server_name = desc
            .extra
            .get("rdma_server_name")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(name)
            .to_owned();
        Ok(Self {
            server_name,
            rpc_addr: rpc_addr.to_owned(),
            devices,
            buffers,
            matrix,
        })
    }

    /// The NIC path of the peer's device `device`.
    pub fn nic_path(&self, device: &str) -> String {
        format!("{}@{}", self.server_name, device)
    }

    /// Index of the buffer that holds `addr`.
    pub fn buffer_index(&self, addr: u64) -> Option<usize> {
        self.buffers
            .iter()
            .position(|b| addr >= b.addr && addr < b.end())
    }

    /// The rkey of buffer `buffer` on device `device`, resolved by name.
    pub fn rkey(&self, buffer: usize, device: &str) -> Option<u32> {
        let index = self.devices.iter().position(|d| d.name == device)?;
        self.buffers.get(buffer)?.rkeys.get(index).copied()
    }

    /// The published device called `name`.
    pub fn device(&self, name: &str) -> Option<&DeviceDesc> {
        self.devices.iter().find(|d| d.name == name)
    }
}
