//! Two engines over RDMA, through the real handshake listener, on the software verbs
//! provider (no machine here has an RDMA NIC; the transport code is the one real NICs run).

mod common;

use std::sync::Arc;

use common::{bytes, fill};
use mooncake_common::config::Protocol;
use mooncake_common::{EngineConfig, ErrorKind};
use mooncake_rdma::SoftFabric;
use mooncake_te::engine::SubmitOptions;
use mooncake_te::stats::TransportKind;
use mooncake_te::{Opcode, TransferEngine, TransferRequest};

const LEN: usize = 16 << 20;

async fn engine(fabric: &SoftFabric, devices: [&str; 2], seed: u8) -> Arc<TransferEngine> {
    for (i, device) in devices.iter().enumerate() {
        let mut gid = [0u8; 16];
        gid[10..12].copy_from_slice(&[0xff, 0xff]);
        gid[12..].copy_from_slice(&[10, seed, i as u8, 1]);
        fabric.add_device(device, gid).unwrap();
    }
    let mut config = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    config.protocol = Protocol::Rdma;
    config.shared_memory = false;
    config.topology_json = Some(format!(
        r#"{{"cpu:0": [["{}", "{}"], []]}}"#,
        devices[0], devices[1]
    ));
    TransferEngine::start_with_verbs(config, Arc::new(fabric.clone()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_and_read_back_over_rdma() {
    let fabric = SoftFabric::new();
    let target = engine(&fabric, ["ta0", "ta1"], 1).await;
    let initiator = engine(&fabric, ["ia0", "ia1"], 2).await;
    assert_eq!(initiator.transports(), ["tcp", "rdma"]);
    let remote = target.allocate(LEN).unwrap();
    let local = initiator.allocate(2 * LEN).unwrap();
    fill(local.as_ptr(), LEN, 7);

    let published = target.local_descriptor();
    assert!(published.speaks("rdma") && published.speaks("tcp"));
    let rkeys = published.buffers[0].extra["rkey"].as_array().unwrap();
    assert_eq!(rkeys.len(), 2);

    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let request = |op, local_offset: usize| TransferRequest {
        op,
        segment: segment.id,
        local_addr: local.as_ptr() as usize + local_offset,
        remote_addr: remote.as_ptr() as u64,
        len: LEN,
    };
    initiator
        .transfer(&[request(Opcode::Write, 0)], SubmitOptions::default())
        .await
        .unwrap();
    assert!(bytes(remote.as_ptr(), LEN) == bytes(local.as_ptr(), LEN));
    initiator
        .transfer(&[request(Opcode::Read, LEN)], SubmitOptions::default())
        .await
        .unwrap();
    // SAFETY: the second half of `local` is LEN bytes.
    let back = bytes(unsafe { local.as_ptr().add(LEN) }, LEN);
    assert!(back == bytes(local.as_ptr(), LEN), "read-back differs");

    let rdma = initiator
        .stats()
        .into_iter()
        .find(|(kind, _, _)| *kind == TransportKind::Rdma)
        .unwrap();
    assert_eq!((rdma.1, rdma.2), (2, 2 * LEN as u64));
    let rails: Vec<_> = initiator
        .rail_stats()
        .into_iter()
        .flat_map(|(_, rails)| rails)
        .collect();
    for device in ["ia0", "ia1"] {
        let carried: u64 = rails
            .iter()
            .filter(|r| r.local == device)
            .map(|r| r.bytes)
            .sum();
        assert!(carried > 0, "{device} carried nothing: {rails:?}");
    }
    initiator.close().await;
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_going_down_leaves_the_other_device_to_finish() {
    let fabric = SoftFabric::new();
    let target = engine(&fabric, ["tb0", "tb1"], 3).await;
    let initiator = engine(&fabric, ["ib0", "ib1"], 4).await;
    let remote = target.allocate(LEN).unwrap();
    let local = initiator.allocate(LEN).unwrap();
    fill(local.as_ptr(), LEN, 9);
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let write = TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote.as_ptr() as u64,
        len: LEN,
    };
    initiator
        .transfer(&[write], SubmitOptions::default())
        .await
        .unwrap();

    let batch = initiator
        .submit(&[write; 4], SubmitOptions::default())
        .unwrap();
    fabric.set_port("ib1", false).unwrap();
    initiator.wait(batch).await.unwrap();
    assert!(bytes(remote.as_ptr(), LEN) == bytes(local.as_ptr(), LEN));
    // The port event arrives asynchronously, as from a NIC: on a busy host the batch may be
    // done before it is handled.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let rails: Vec<_> = initiator
            .rail_stats()
            .into_iter()
            .flat_map(|(_, rails)| rails)
            .collect();
        if rails.iter().filter(|r| r.local == "ib1").all(|r| !r.usable) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{rails:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    initiator.close().await;
    target.close().await;
}

#[tokio::test]
async fn rdma_without_a_device_is_refused() {
    let mut config = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    config.protocol = Protocol::Rdma;
    let error = TransferEngine::start(config).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::DeviceNotFound);
}
