//! The P2P store on each metadata backend it supports besides the HTTP server (which
//! `p2p.rs` uses): real Redis and etcd servers on loopback, ignored where not installed.

use std::sync::Arc;
use std::time::Duration;

use mooncake_common::config::Protocol;
use mooncake_common::EngineConfig;
use mooncake_metadata::{connect, MetadataBackend};
use mooncake_p2p::liveness::live_key;
use mooncake_p2p::{LocalBuffer, P2PConfig, P2PStore, RegisterOptions};
use mooncake_testkit::{EtcdCluster, RedisServer};
use mooncake_transport::Arena;

async fn node(metadata: &str, name: &str) -> Arc<P2PStore> {
    let mut engine = EngineConfig::from_env(name, metadata);
    engine.advertised_host = Some("127.0.0.1".into());
    engine.protocol = Protocol::Tcp;
    engine.shared_memory = false;
    engine.cluster_token = None;
    let mut config = P2PConfig::new(engine);
    config.liveness_ttl = Duration::from_secs(2);
    P2PStore::start(config).await.expect("the node starts")
}

fn filled(len: usize, seed: u8) -> Arc<Arena> {
    let arena = Arc::new(Arena::new("p2p-backend-test", len).expect("memory"));
    // SAFETY: the arena is mapped for its whole length and nothing else uses it yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(arena.as_ptr(), len) };
    // Each 8-byte word holds the seed and its own offset.
    for (i, b) in bytes.iter_mut().enumerate() {
        let at = i as u64;
        *b = ((u64::from(seed) << 40 | (at & !7)).to_le_bytes())[(at % 8) as usize];
    }
    arena
}

fn bytes(arena: &Arena) -> &[u8] {
    // SAFETY: mapped for its whole length; read only once no transfer writes it.
    unsafe { std::slice::from_raw_parts(arena.as_ptr(), arena.len()) }
}

/// Register, pull from two nodes (the second reads from both), list, withdraw: the entry goes
/// with the last copy, and each node's liveness entry with the node.
async fn cycle(metadata: &str) {
    let MetadataBackend::Store(store) = connect(metadata, None).unwrap() else {
        panic!("{metadata} is a store");
    };
    let name = format!("ckpt-{}", std::process::id());
    let seed = node(metadata, "seed").await;
    let source = filled((3 << 20) + 11, 1);
    let options = RegisterOptions {
        max_shard_size: 256 << 10,
        ..RegisterOptions::default()
    };
    seed.register(&name, vec![LocalBuffer::arena(source.clone())], options)
        .await
        .unwrap();
    assert!(store.get(&live_key("seed")).await.unwrap().is_some());
    let listed = seed.list("ckpt-").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].total_size, (3 << 20) + 11);

    let mut pulled = Vec::new();
    for puller in ["first", "second"] {
        let node = node(metadata, puller).await;
        let into = Arc::new(Arena::new("p2p-backend-test", source.len()).unwrap());
        let report = node
            .get_replica(&name, vec![LocalBuffer::arena(into.clone())], None)
            .await
            .unwrap();
        assert!(bytes(&into) == bytes(&source), "{puller} is byte-exact");
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
