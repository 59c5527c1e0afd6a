//! The P2P store on each metadata backend it supports besides the HTTP server (which
//! `p2p.rs` uses): real Redis and etcd servers on loopback, ignored where not installed.

mod support;

use std::time::Duration;

use mooncake_metadata::{connect, MetadataBackend};
use mooncake_p2p::liveness::live_key;
use mooncake_p2p::RegisterOptions;
use mooncake_testkit::{EtcdCluster, RedisServer};
use support::{empty, local, node_with, payload, same};

/// Register, pull from two nodes (the second reads from both), list, withdraw: the entry goes
/// with the last copy, and each node's liveness entry with the node.
async fn cycle(metadata: &str) {
    let MetadataBackend::Store(store) = connect(metadata, None).unwrap() else {
        panic!("{metadata} is a store");
    };
    let name = format!("ckpt-{}", std::process::id());
    let liveness = Duration::from_secs(2);
    let seed = node_with(metadata, "seed", liveness).await;
    let sizes = [(3 << 20) + 11];
    let source = payload(1, &sizes);
    let options = RegisterOptions {
        max_shard_size: 256 << 10,
        ..RegisterOptions::default()
    };
    seed.register(&name, local(&source), options).await.unwrap();
    assert!(store.get(&live_key("seed")).await.unwrap().is_some());
    let listed = seed.list("ckpt-").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].total_size, (3 << 20) + 11);

    let mut pulled = Vec::new();
    for puller in ["first", "second"] {
        let node = node_with(metadata, puller, liveness).await;
        let into = empty(&sizes);
        let report = node.get_replica(&name, local(&into), None).await.unwrap();
        assert!(same(&into, &source), "{puller} is byte-exact");
        if puller == "second" {
            assert!(report
                .sources
                .iter()
                .any(|s| s.segment == "first" && s.shards > 0));
        }
        pulled.push(node);
    }
    seed.close().await;
    assert!(store.get(&live_key("seed")).await.unwrap().is_none());
    assert_eq!(
        pulled[0].list(&name).await.unwrap().len(),
        1,
        "the pullers still serve it"
    );
    for node in pulled {
        node.close().await;
    }
    assert!(store
        .get(&format!("mooncake/checkpoint/{name}"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(redis_server),
    ignore = "redis-server is not installed (apt-get install redis-server)"
)]
async fn the_p2p_store_runs_on_redis() {
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .unwrap()
        .expect("redis-server starts");
    cycle(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(etcd_server),
    ignore = "etcd is not installed (apt-get install etcd-server)"
)]
async fn the_p2p_store_runs_on_etcd() {
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::new(1))
        .await
        .unwrap()
        .expect("etcd starts");
    cycle(&etcd.connection_string()).await;
}
