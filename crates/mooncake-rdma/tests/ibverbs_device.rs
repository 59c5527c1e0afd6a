//! Loopback WRITE and READ through one real device. Run with
//! `MOONCAKE_TEST_RDMA_DEVICE=mlx5_0 cargo test -p mooncake-rdma --features ibverbs -- --ignored`.
#![cfg(feature = "ibverbs")]

use std::sync::Arc;

use mooncake_metadata::handshake::messages::ConnectionMessage;
use mooncake_metadata::{BufferDesc, SegmentDesc};
use mooncake_rdma::ibverbs::IbvProvider;
use mooncake_rdma::transport::BoxFuture;
use mooncake_rdma::{Connector, RdmaOptions, RdmaPeer, RdmaTransport};
use mooncake_transport::{Arena, BatchProgress, Opcode, Region, Slice, Task};

struct NoRpc;

impl Connector for NoRpc {
    fn connect<'a>(
        &'a self,
        _peer_rpc_addr: &'a str,
        _msg: ConnectionMessage,
    ) -> BoxFuture<'a, mooncake_common::Result<ConnectionMessage>> {
        Box::pin(async {
            Err(mooncake_common::Error::invalid(
                "loopback needs no handshake",
            ))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an RDMA device named by MOONCAKE_TEST_RDMA_DEVICE"]
async fn loopback_write_and_read_on_a_real_device() {
    let Ok(device) = std::env::var("MOONCAKE_TEST_RDMA_DEVICE") else {
        eprintln!("MOONCAKE_TEST_RDMA_DEVICE is not set; skipping");
        return;
    };
    let mut matrix = mooncake_topology::PriorityMatrix::new();
    matrix.insert(
        "cpu:0",
        mooncake_topology::Entry {
            preferred: vec![device.clone()],
            available: Vec::new(),
        },
    );
    let options = RdmaOptions::new("loop", vec![device.clone()], matrix.clone());
    let transport =
        RdmaTransport::new(Arc::new(IbvProvider::new()), options, Arc::new(NoRpc)).unwrap();
    const LEN: usize = 4 << 20;
    let arena = Arc::new(Arena::new("rdma-loop", 2 * LEN).unwrap());
    let region = Arc::new(Region::arena(arena, "cpu:0"));
    transport.register(&region).unwrap();
    let base = region.addr();
    // SAFETY: the arena is ours and idle.
    let bytes = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, 2 * LEN) };
    for (i, b) in bytes[..LEN].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }

    let mut desc = SegmentDesc::tcp("loop", 0);
    desc.protocol = serde_json::json!("rdma");
    desc.extra.insert(
        "devices".into(),
        serde_json::to_value(transport.local_devices()).unwrap(),
    );
    let (lkeys, rkeys) = transport.buffer_keys(base).unwrap();
    let mut extra = serde_json::Map::new();
    extra.insert("lkey".into(), serde_json::json!(lkeys));
    extra.insert("rkey".into(), serde_json::json!(rkeys));
    desc.buffers.push(BufferDesc {
        name: "cpu:0".into(),
        addr: base as u64,
        length: (2 * LEN) as u64,
        extra,
    });
    let peer = Arc::new(RdmaPeer::from_desc(&desc, "unused:0").unwrap());

    for (op, local, remote) in [
        (Opcode::Write, base, base + LEN),
        (Opcode::Read, base, base + LEN),
    ] {
        if op == Opcode::Read {
            bytes[..LEN].fill(0);
        }
        let batch = BatchProgress::new(1);
        let task = Task::new(1, batch.clone());
        transport.submit(
            &peer,
            vec![Slice {
                op,
                local_addr: local,
                len: LEN,
                remote_addr: remote as u64,
                region: region.clone(),
                task: task.clone(),
                deadline: None,
            }],
        );
        tokio::time::timeout(std::time::Duration::from_secs(30), batch.settled())
            .await
            .unwrap();
        assert!(task.error().is_none(), "{:?}", task.error());
    }
    for (i, b) in bytes[..LEN].iter().enumerate() {
        assert_eq!(*b, (i * 7 + 3) as u8, "byte {i}");
    }
    transport.close().await;
}
