//! Two transports, "A" and "B", on one software fabric.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mooncake_common::Result;
use mooncake_metadata::handshake::messages::ConnectionMessage;
use mooncake_metadata::{BufferDesc, SegmentDesc};
use mooncake_rdma::peer::PriorityMatrix;
use mooncake_rdma::transport::BoxFuture;
use mooncake_rdma::verbs::Provider;
use mooncake_rdma::{Connector, RdmaConfig, RdmaOptions, RdmaPeer, RdmaTransport, SoftFabric};
use mooncake_topology::Entry;
use mooncake_transport::rail::RailPolicy;
use mooncake_transport::{Arena, BatchProgress, Opcode, Region, Slice, Task};

pub const MIB: usize = 1 << 20;

/// Routes Connection messages to transports in this process by rpc address, and records them.
#[derive(Default)]
pub struct DirectConnector {
    pub peers: Mutex<HashMap<String, Weak<RdmaTransport>>>,
    pub log: Mutex<Vec<(ConnectionMessage, ConnectionMessage)>>,
}

impl Connector for DirectConnector {
    fn connect<'a>(
        &'a self,
        peer_rpc_addr: &'a str,
        msg: ConnectionMessage,
    ) -> BoxFuture<'a, Result<ConnectionMessage>> {
        Box::pin(async move {
            let peer = self
                .peers
                .lock()
                .unwrap()
                .get(peer_rpc_addr)
                .and_then(Weak::upgrade)
                .ok_or_else(|| {
                    mooncake_common::Error::new(
                        mooncake_common::ErrorKind::Socket,
                        format!("nobody at {peer_rpc_addr}"),
                    )
                })?;
            let reply = peer.on_connection(msg.clone());
            self.log.lock().unwrap().push((msg, reply.clone()));
            Ok(reply)
        })
    }
}

pub struct Node {
    pub name: String,
    pub devices: Vec<String>,
    pub transport: Arc<RdmaTransport>,
    pub region: Arc<Region>,
    pub matrix: PriorityMatrix,
}

impl Node {
    pub fn ptr(&self) -> *mut u8 {
        self.region.addr() as *mut u8
    }

    pub fn fill(&self, seed: u8) {
        // SAFETY: the arena is ours and nothing transfers into it now.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.region.len()) };
        mooncake_common::pattern::fill(bytes, u64::from(seed), 0);
    }

    pub fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        // SAFETY: reads inside the arena after transfers settled.
        unsafe { std::slice::from_raw_parts(self.ptr().add(offset), len).to_vec() }
    }

    /// Mooncake's descriptor for this node (matrix keys in `matrix`, devices in open order).
    pub fn desc(&self) -> SegmentDesc {
        let mut desc = SegmentDesc::tcp(&self.name, 0);
        desc.protocol = serde_json::json!("rdma");
        desc.extra.insert(
            "devices".into(),
            serde_json::to_value(self.transport.local_devices()).unwrap(),
        );
        desc.extra.insert(
            "priority_matrix".into(),
            serde_json::to_value(&self.matrix).unwrap(),
        );
        let (lkeys, rkeys) = self.transport.buffer_keys(self.region.addr()).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("lkey".into(), serde_json::json!(lkeys));
        extra.insert("rkey".into(), serde_json::json!(rkeys));
        desc.buffers.push(BufferDesc {
            name: self.region.location().to_owned(),
            addr: self.region.addr() as u64,
            length: self.region.len() as u64,
            extra,
        });
        desc
    }

    pub fn peer(&self) -> Arc<RdmaPeer> {
        Arc::new(RdmaPeer::from_desc(&self.desc(), &format!("rpc-{}", self.name)).unwrap())
    }
}

pub fn matrix(devices: &[&str]) -> PriorityMatrix {
    let mut m = PriorityMatrix::new();
    m.insert(
        "cpu:0",
        Entry {
            preferred: devices.iter().map(|s| s.to_string()).collect(),
            available: Vec::new(),
        },
    );
    m
}

pub fn config() -> RdmaConfig {
    RdmaConfig::default()
}

pub struct World {
    pub fabric: SoftFabric,
    pub connector: Arc<DirectConnector>,
}

fn gid(n: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[10] = 0xff;
    g[11] = 0xff;
    g[12] = 192;
    g[13] = 0;
    g[14] = 2;
    g[15] = n;
    g
}

impl World {
    pub fn new() -> Self {
        let fabric = SoftFabric::new();
        for (i, d) in ["mlx_a0", "mlx_a1", "mlx_b0", "mlx_b1"].iter().enumerate() {
            fabric.add_device(d, gid(i as u8 + 1)).unwrap();
        }
        Self {
            fabric,
            connector: Arc::new(DirectConnector::default()),
        }
    }

    pub fn node(&self, name: &str, devices: &[&str], arena_len: usize, config: RdmaConfig) -> Node {
        self.node_via(name, devices, arena_len, config, self.connector.clone())
    }

    /// A node whose active handshakes go through `connector` (reachable itself through
    /// the world's connector).
    pub fn node_via(
        &self,
        name: &str,
        devices: &[&str],
        arena_len: usize,
        config: RdmaConfig,
        connector: Arc<dyn Connector>,
    ) -> Node {
        let matrix = matrix(devices);
        let options = RdmaOptions {
            server_name: name.to_owned(),
            devices: devices.iter().map(|s| s.to_string()).collect(),
            matrix: matrix.clone(),
            config,
            rail_policy: RailPolicy::default(),
        };
        let provider: Arc<dyn Provider> = Arc::new(self.fabric.clone());
        let transport = Arc::new(RdmaTransport::new(provider, options, connector).unwrap());
        self.connector
            .peers
            .lock()
            .unwrap()
            .insert(format!("rpc-{name}"), Arc::downgrade(&transport));
        let arena = Arc::new(Arena::new(name, arena_len).unwrap());
        let region = Arc::new(Region::arena(arena, "cpu:0"));
        transport.register(&region).unwrap();
        Node {
            name: name.to_owned(),
            devices: devices.iter().map(|s| s.to_string()).collect(),
            transport,
            region,
            matrix,
        }
    }

    pub fn pair(&self) -> (Node, Node) {
        (
            self.node("A", &["mlx_a0", "mlx_a1"], 16 * MIB, config()),
            self.node("B", &["mlx_b0", "mlx_b1"], 16 * MIB, config()),
        )
    }
}

/// One request per (op, local offset, remote offset, len); every request one engine slice
/// of `chunk` bytes at most.
pub struct Batch {
    pub progress: Arc<BatchProgress>,
    pub tasks: Vec<Arc<Task>>,
}

impl Batch {
    pub async fn wait(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.progress.settled())
            .await
            .expect("batch settled in time");
    }

    pub fn errors(&self) -> Vec<mooncake_common::Error> {
        self.tasks
            .iter()
            .filter_map(|t| t.error().cloned())
            .collect()
    }
}

pub fn submit(
    from: &Node,
    to: &Arc<RdmaPeer>,
    requests: &[(Opcode, usize, u64, usize)],
    chunk: usize,
) -> Batch {
    submit_by(from, to, requests, chunk, None)
}

/// As [`submit`], every slice with `deadline`.
pub fn submit_by(
    from: &Node,
    to: &Arc<RdmaPeer>,
    requests: &[(Opcode, usize, u64, usize)],
    chunk: usize,
    deadline: Option<tokio::time::Instant>,
) -> Batch {
    let progress = BatchProgress::new(requests.len());
    let mut tasks = Vec::new();
    let mut slices = Vec::new();
    for &(op, local_off, remote_addr, len) in requests {
        let n = len.div_ceil(chunk);
        let task = Task::new(n as u32, progress.clone());
        for k in 0..n {
            let off = k * chunk;
            let l = chunk.min(len - off);
            slices.push(Slice {
                op,
                local_addr: from.region.addr() + local_off + off,
                len: l,
                remote_addr: remote_addr + off as u64,
                region: from.region.clone(),
                task: task.clone(),
                deadline,
            });
        }
        tasks.push(task);
    }
    from.transport.submit(to, slices);
    Batch { progress, tasks }
}

/// An 8 MiB write from A to B, both of A's devices slowed down so it is still in flight when
/// this returns.
pub async fn slow_write_in_flight(world: &World, a: &Node, b: &Node) -> Batch {
    for dev in ["mlx_a0", "mlx_a1"] {
        world
            .fabric
            .set_latency(dev, Duration::from_micros(500))
            .unwrap();
    }
    let batch = submit(
        a,
        &b.peer(),
        &[(Opcode::Write, 0, remote(b, 0), 8 * MIB)],
        MIB,
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    batch
}

pub fn remote(node: &Node, offset: usize) -> u64 {
    (node.region.addr() + offset) as u64
}

pub async fn close(nodes: &[&Node]) {
    for n in nodes {
        n.transport.close().await;
    }
}
