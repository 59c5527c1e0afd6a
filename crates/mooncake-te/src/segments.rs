//! Remote segments: opening them, and caching what they publish.
//!
//! A segment is opened once and cached by name, as Mooncake does. Its descriptor is refreshed
//! when a request targets a range the cached copy does not cover (the peer may have registered
//! more memory since), at most once per request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use mooncake_common::{Error, ErrorKind, Handle, HandleSlab, Result};
use mooncake_metadata::handshake::{self, MessageType};
use mooncake_metadata::{Keys, MetadataBackend, RpcMeta, SegmentDesc};
use mooncake_rdma::RdmaPeer;
use mooncake_transport::shm::{self, ShmBuffer, ShmTarget};
use mooncake_transport::tcp::{wire::Version, LocalNic, PeerAddr, TcpPath, TcpPeer};
use serde::{Deserialize, Serialize};

use crate::address::{join_host_port, split_host_port, LocalRail};

/// Handle of an opened segment.
pub type SegmentId = Handle;

/// A public view of a segment: its name and buffers.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// Handle for requests.
    pub id: SegmentId,
    /// Name.
    pub name: String,
    /// `(address, length, location)` of each buffer.
    pub buffers: Vec<(u64, u64, String)>,
}

/// An opened remote segment.
pub(crate) struct RemoteSegment {
    pub(crate) id: SegmentId,
    pub(crate) name: String,
    /// Handshake address (`host:port`).
    pub(crate) rpc_addr: String,
    desc: RwLock<Cached>,
    /// Every TCP path to its data server.
    pub(crate) tcp: TcpPeer,
}

/// One address a segment's data server is reachable on, published as `tcp_rails` (a field
/// Mooncake peers ignore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RailAddr {
    /// The interface it belongs to.
    pub(crate) device: String,
    /// Its IP address.
    pub(crate) ip: String,
    /// The data port on it.
    pub(crate) port: u16,
}

/// A descriptor and what it says about the paths to its segment.
struct Cached {
    desc: Arc<SegmentDesc>,
    shm: Option<ShmTarget>,
    rdma: Option<Arc<RdmaPeer>>,
}

impl Cached {
    fn new(desc: SegmentDesc, rpc_addr: &str) -> Self {
        let shm = desc
            .extra
            .get("shm")
            .and_then(|v| serde_json::from_value::<ShmTarget>(v.clone()).ok())
            .filter(|t| Some(t.host.as_str()) == shm::host::host_id());
        let rdma = desc
            .extra
            .contains_key("devices")
            .then(|| RdmaPeer::from_desc(&desc, rpc_addr))
            .and_then(|parsed| {
                parsed
                    .map_err(|e| tracing::debug!(segment = %desc.name, "no RDMA path: {e}"))
                    .ok()
            })
            .filter(|peer| !peer.devices.is_empty())
            .map(Arc::new);
        Self {
            desc: Arc::new(desc),
            shm,
            rdma,
        }
    }
}

impl RemoteSegment {
    fn cached(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        self.desc.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn desc(&self) -> Arc<SegmentDesc> {
        self.cached().desc.clone()
    }

    /// How to reach the segment through shared memory, when it runs on this host.
    pub(crate) fn same_host(&self) -> Option<ShmTarget> {
        self.cached().shm.clone()
    }

    /// The segment's RDMA devices and keys, when it publishes them.
    pub(crate) fn rdma(&self) -> Option<Arc<RdmaPeer>> {
        self.cached().rdma.clone()
    }

    pub(crate) fn set_desc(&self, desc: SegmentDesc) {
        *self.desc.write().unwrap_or_else(|p| p.into_inner()) = Cached::new(desc, &self.rpc_addr);
    }

    pub(crate) fn info(&self) -> SegmentInfo {
        let desc = self.desc();
        SegmentInfo {
            id: self.id,
            name: self.name.clone(),
            buffers: desc
                .buffers
                .iter()
                .map(|b| {
                    let location = b
                        .extra
                        .get("location")
                        .and_then(|l| l.as_str())
                        .unwrap_or(&b.name)
                        .to_owned();
                    (b.addr, b.length, location)
                })
                .collect(),
        }
    }
}

/// Opened segments, by handle and by name.
#[derive(Default)]
pub(crate) struct SegmentTable {
    by_id: HandleSlab<Arc<RemoteSegment>>,
    by_name: HashMap<String, SegmentId>,
}

impl SegmentTable {
    pub(crate) fn by_name(&self, name: &str) -> Option<Arc<RemoteSegment>> {
        self.by_name
            .get(name)
            .and_then(|id| self.by_id.get(*id))
            .cloned()
    }

    pub(crate) fn get(&self, id: SegmentId) -> Option<Arc<RemoteSegment>> {
        self.by_id.get(id).cloned()
    }

    /// Every opened segment.
    pub(crate) fn all(&self) -> Vec<Arc<RemoteSegment>> {
        self.by_name
            .values()
            .filter_map(|id| self.by_id.get(*id))
            .cloned()
            .collect()
    }

    /// Inserts a freshly fetched segment, unless a concurrent open got there first.
    pub(crate) fn insert(
        &mut self,
        fetched: Fetched,
        force_v1: bool,
        local_rails: &[LocalRail],
    ) -> Arc<RemoteSegment> {
        if let Some(existing) = self.by_name(&fetched.name) {
            existing.set_desc(fetched.desc);
            return existing;
        }
        let version = if fetched.desc.tcp_proto_version >= 2 && !force_v1 {
            Version::V2
        } else {
            Version::V1
        };
        let direct = PeerAddr {
            host: fetched.host.clone(),
            port: fetched.desc.tcp_data_port,
            version,
        };
        let tcp = tcp_paths(&fetched.desc, version, local_rails).unwrap_or_else(|| direct.into());
        let name = fetched.name.clone();
        let cached = Cached::new(fetched.desc, &fetched.rpc_addr);
        let id = self.by_id.insert_with(|id| {
            Arc::new(RemoteSegment {
                id,
                name: fetched.name,
                rpc_addr: fetched.rpc_addr,
                desc: RwLock::new(cached),
                tcp,
            })
        });
        self.by_name.insert(name, id);
        self.by_id.get(id).cloned().expect("just inserted")
    }
}

/// The rails to a segment that publishes several data addresses: each of its addresses from
/// every local rail on the same network (or from the routing table's choice when we have no
/// rails). `None` when it publishes none, or none we can reach that way.
fn tcp_paths(desc: &SegmentDesc, version: Version, local: &[LocalRail]) -> Option<TcpPeer> {
    let remote: Vec<RailAddr> = serde_json::from_value(desc.extra.get("tcp_rails")?.clone())
        .map_err(|e| tracing::debug!(segment = %desc.name, "ignoring malformed tcp_rails: {e}"))
        .ok()?;
    let mut paths = Vec::new();
    for rail in remote {
        let Ok(ip) = rail.ip.parse::<std::net::IpAddr>() else {
            continue;
        };
        let addr = PeerAddr {
            host: rail.ip.clone(),
            port: rail.port,
            version,
        };
        if local.is_empty() {
            paths.push(TcpPath {
                local: None,
                remote_nic: rail.device.clone(),
                remote: addr.clone(),
            });
        }
        for nic in local.iter().filter(|nic| nic.reaches(ip)) {
            paths.push(TcpPath {
                local: Some(LocalNic {
                    name: nic.device.clone(),
                    ip: nic.ip,
                }),
                remote_nic: rail.device.clone(),
                remote: addr.clone(),
            });
        }
    }
    (!paths.is_empty()).then_some(TcpPeer { paths })
}

/// The shared-memory description of a buffer, if its owner published one. One without a
/// slot generation (an owner from before generations) is not reached through shared memory:
/// its slot alone could name a region registered after the one it describes.
pub(crate) fn shm_buffer(buffer: &mooncake_metadata::BufferDesc) -> Option<ShmBuffer> {
    let shm = buffer.extra.get("shm")?;
    Some(ShmBuffer {
        slot: u32::try_from(shm.get("slot")?.as_u64()?).ok()?,
        generation: u32::try_from(shm.get("generation")?.as_u64()?)
            .ok()
            .filter(|g| *g != 0)?,
        arena: shm.get("arena").and_then(|a| a.as_u64()),
    })
}

/// What fetching a segment yields.
pub(crate) struct Fetched {
    pub(crate) name: String,
    pub(crate) host: String,
    pub(crate) rpc_addr: String,
    pub(crate) desc: SegmentDesc,
}

/// How to reach metadata, shared by every fetch.
pub(crate) struct Resolver {
    pub(crate) backend: MetadataBackend,
    pub(crate) keys: Keys,
    pub(crate) connect_timeout: std::time::Duration,
    pub(crate) max_frame: usize,
    /// With a cluster token, P2P handshakes open with its challenge-response, and only
    /// descriptors and entries signed with it are believed.
    pub(crate) token: Option<mooncake_common::auth::ClusterToken>,
}

impl Resolver {
    /// Fetches `name`'s descriptor and handshake address. In P2P mode `local_desc` is sent
    /// along, as Mooncake's Metadata message requires.
    pub(crate) async fn fetch(&self, name: &str, local_desc: &str) -> Result<Fetched> {
        match &self.backend {
            MetadataBackend::P2pHandshake => {
                let (host, port) = split_host_port(name)?;
                let port = port.ok_or_else(|| {
                    Error::invalid(format!(
                        "P2P segment names are host:port, as the peer prints them; got '{name}'"
                    ))
                })?;
                let rpc_addr = join_host_port(&host, port);
                let reply = handshake::request(
                    &rpc_addr,
                    MessageType::Metadata,
                    local_desc,
                    self.connect_timeout,
                    self.max_frame,
                    self.token.as_ref(),
                )
                .await?;
                if reply.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Metadata,
                        format!("{name} refused to describe itself"),
                    ));
                }
                let desc = SegmentDesc::decode(&reply)?;
                if let Some(token) = &self.token {
                    // The handshake proved the peer holds the token; the signature proves the
                    // descriptor is a member's, and its port that it is the one dialled (P2P
                    // names may spell the host differently).
                    desc.verify(token, &desc.name)?;
                    let published = split_host_port(&desc.name).ok().and_then(|(_, p)| p);
                    if published != Some(port) {
                        return Err(mooncake_common::auth::unauthenticated(format!(
                            "{name} answered with the descriptor of {}",
                            desc.name
                        )));
                    }
                }
                Ok(Fetched {
                    name: name.to_owned(),
                    host,
                    rpc_addr,
                    desc,
                })
            }
            MetadataBackend::Store(store) => {
                let missing = |what: &str| {
                    Error::new(
                        ErrorKind::Metadata,
                        format!("no {what} published for segment '{name}'"),
                    )
                };
                let desc = store
                    .get(&self.keys.segment(name))
                    .await?
                    .ok_or_else(|| missing("descriptor"))?;
                let desc = SegmentDesc::decode(&desc)?;
                if let Some(token) = &self.token {
                    desc.verify(token, name)?;
                }
                let rpc = store
                    .get(&self.keys.rpc_meta(name))
                    .await?
                    .ok_or_else(|| missing("rpc_meta entry"))?;
                let rpc = RpcMeta::decode(&rpc)?;
                if let Some(token) = &self.token {
                    rpc.verify(token, name)?;
                }
                Ok(Fetched {
                    name: name.to_owned(),
                    rpc_addr: join_host_port(&rpc.ip_or_host_name, rpc.rpc_port),
                    host: rpc.ip_or_host_name,
                    desc,
                })
            }
        }
    }
}
