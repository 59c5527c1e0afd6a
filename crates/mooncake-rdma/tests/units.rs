//! Pure pieces: SIEVE eviction, GID ranking, slicing, descriptor parsing.

mod common;

use common::*;
use mooncake_common::ErrorKind;
use mooncake_rdma::gid::select_gid;
use mooncake_rdma::store::{EndpointStore, StoreKind};
use mooncake_rdma::verbs::{GidEntry, GidType};
use mooncake_rdma::RdmaPeer;
use mooncake_transport::Opcode;

#[test]
fn sieve_evicts_in_order() {
    let mut store = EndpointStore::new(StoreKind::Sieve, 3);
    for k in ["a", "b", "c"] {
        assert!(store.insert(k, k.to_owned()).is_none());
    }
    store.get("a");
    // The hand starts at the tail: a is visited (spared, bit cleared), b is evicted.
    assert_eq!(store.insert("d", "d".into()).map(|e| e.0), Some("b".into()));
    // The hand rests on c, unvisited.
    assert_eq!(store.insert("e", "e".into()).map(|e| e.0), Some("c".into()));
    store.get("d");
    // d is spared; e, newest but unvisited, goes.
    assert_eq!(store.insert("f", "f".into()).map(|e| e.0), Some("e".into()));
    // The hand wraps to the tail: a was cleared on the first pass.
    store.get("f");
    assert_eq!(store.insert("g", "g".into()).map(|e| e.0), Some("a".into()));
    let keys: Vec<String> = store.entries().into_iter().map(|e| e.0).collect();
    assert_eq!(keys, ["d", "f", "g"]);
    assert_eq!(store.remove("f"), Some("f".into()));
    assert_eq!(store.len(), 2);
}

#[test]
fn fifo_ignores_hits() {
    let mut store = EndpointStore::new(StoreKind::Fifo, 2);
    store.insert("a", 1);
    store.insert("b", 2);
    store.get("a");
    assert_eq!(store.insert("c", 3), Some(("a".into(), 1)));
    assert_eq!(store.insert("d", 4), Some(("b".into(), 2)));
}

#[test]
fn gid_ranking_prefers_routable_roce_v2() {
    let v4 = |index: u32, ip: [u8; 4], kind: GidType, netdev: Option<&str>| {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&ip);
        GidEntry {
            index,
            gid,
            kind,
            netdev: netdev.map(str::to_owned),
        }
    };
    let table = vec![
        GidEntry {
            index: 0,
            gid: [0; 16],
            kind: GidType::RoceV2,
            netdev: None,
        },
        v4(1, [10, 0, 0, 1], GidType::RoceV1, Some("eth0")),
        v4(2, [10, 244, 1, 1], GidType::RoceV2, Some("flannel.1")),
        v4(3, [10, 0, 0, 1], GidType::RoceV2, Some("eth0")),
        v4(4, [203, 0, 113, 5], GidType::RoceV2, Some("eth0")),
    ];
    assert_eq!(select_gid(&table, None), Some(4));
    assert_eq!(select_gid(&table[..4], None), Some(3));
    assert_eq!(select_gid(&table[..3], None), Some(2));
    assert_eq!(select_gid(&table[..2], None), Some(1));
    assert_eq!(
        select_gid(&table[..1], None),
        None,
        "a null GID is never chosen"
    );
    assert_eq!(select_gid(&table, Some(2)), Some(2), "MC_GID_INDEX wins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_cuts_slices_with_tail_merge_and_buffer_ends() {
    const K: usize = 1024;
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(11);
    let peer = b.peer();
    // Engine slices of 80 KiB, 80 KiB + 1 and 200 KiB: 1 + 2 + 3 work requests.
    let requests = [
        (Opcode::Write, 0, remote(&b, 0), 80 * K),
        (Opcode::Write, MIB, remote(&b, MIB), 80 * K + 1),
        (Opcode::Write, 2 * MIB, remote(&b, 2 * MIB), 200 * K),
    ];
    let batch = submit(&a, &peer, &requests, MIB);
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    let wrs = |w: &World| w.fabric.stats("mlx_a0").completed + w.fabric.stats("mlx_a1").completed;
    assert_eq!(wrs(&world), 6);

    // B publishes its arena as two buffers; a 40 KiB slice across the seam is cut there.
    let mut desc = b.desc();
    let whole = desc.buffers[0].clone();
    let half = whole.length / 2;
    let mut first = whole.clone();
    first.length = half;
    let mut second = whole.clone();
    second.addr += half;
    second.length -= half;
    desc.buffers = vec![first, second];
    let split_peer = std::sync::Arc::new(RdmaPeer::from_desc(&desc, "rpc-B").unwrap());
    let seam = half as usize;
    let requests = [(
        Opcode::Write,
        seam - 10 * K,
        remote(&b, seam - 10 * K),
        40 * K,
    )];
    let batch = submit(&a, &split_peer, &requests, MIB);
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(wrs(&world), 8);
    assert_eq!(
        b.bytes(seam - 10 * K, 40 * K),
        a.bytes(seam - 10 * K, 40 * K)
    );
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_keys_are_resolved_by_device_name() {
    let world = World::new();
    let (a, b) = world.pair();
    let mut desc = b.desc();
    // The matrix lists the devices in the opposite order of devices[].
    desc.extra.insert(
        "priority_matrix".into(),
        serde_json::json!({"cpu:0": [["mlx_b1"], ["mlx_b0"]]}),
    );
    let (_, rkeys) = b.transport.buffer_keys(b.region.addr()).unwrap();
    let peer = std::sync::Arc::new(RdmaPeer::from_desc(&desc, "rpc-B").unwrap());
    assert_eq!(peer.devices[0].name, "mlx_b0");
    assert_eq!(peer.rkey(0, "mlx_b0"), Some(rkeys[0]));
    assert_eq!(peer.rkey(0, "mlx_b1"), Some(rkeys[1]));
    assert_ne!(rkeys[0], rkeys[1]);
    assert_eq!(
        peer.matrix.get("cpu:0").unwrap().preferred,
        vec!["mlx_b1".to_owned()]
    );

    // Transfers with that matrix land only on mlx_b1 (preferred), with its key.
    a.fill(12);
    let batch = submit(
        &a,
        &peer,
        &[(Opcode::Write, 0, remote(&b, 0), 2 * MIB)],
        MIB,
    );
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, 2 * MIB), a.bytes(0, 2 * MIB));
    let rails = a.transport.rails("B");
    assert!(rails
        .iter()
        .filter(|r| r.stats.bytes > 0)
        .all(|r| r.stats.remote == "mlx_b1"));

    // A key array that does not match devices[] is refused.
    desc.buffers[0]
        .extra
        .insert("rkey".into(), serde_json::json!([1, 2, 3]));
    let err = RdmaPeer::from_desc(&desc, "rpc-B").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MalformedJson);
    close(&[&a, &b]).await;
}
