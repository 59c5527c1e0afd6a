//! A master and store clients in one process, over loopback.

use std::sync::Arc;

use mooncake_common::{pattern, EngineConfig, ErrorKind};
use mooncake_store::client::{StoreClient, StoreConfig};
use mooncake_store::master::{MasterServer, MasterServerConfig, WriteConfig};

async fn master() -> MasterServer {
    MasterServer::start(MasterServerConfig {
        host: "127.0.0.1".into(),
        rpc_port: 0,
        metrics_port: Some(0),
        ..MasterServerConfig::default()
    })
    .await
    .unwrap()
}

async fn client(master: &MasterServer, segment: u64) -> Arc<StoreClient> {
    client_staging(master, segment, 4 << 20).await
}

async fn client_staging(master: &MasterServer, segment: u64, staging: u64) -> Arc<StoreClient> {
    let mut engine = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    engine.advertised_host = Some("127.0.0.1".into());
    let mut config = StoreConfig::new(engine);
    config.master_address = master.rpc_addr().to_string();
    config.global_segment_size = segment;
    config.local_buffer_size = staging;
    StoreClient::connect(config).await.unwrap()
}

fn value(len: usize, seed: u8) -> Vec<u8> {
    pattern::bytes(u64::from(seed), 0, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_across_clients_with_replicas() {
    let master = master().await;
    let a = client(&master, 32 << 20).await;
    let b = client(&master, 32 << 20).await;
    let c = client(&master, 0).await;
    let data = value(3 << 20, 1);
    let two = WriteConfig {
        replica_num: 2,
        ..WriteConfig::default()
    };
    a.put("obj", &data, &two).await.unwrap();
    assert_eq!(
        c.get("obj").await.unwrap(),
        data,
        "a pure requester reads it"
    );
    assert_eq!(b.get("obj").await.unwrap(), data);
    assert_eq!(c.get_size("obj").await.unwrap(), data.len() as u64);
    assert!(c.exists("obj").await.unwrap());
    assert_eq!(
        c.longest_prefix(&["obj".into(), "nope".into(), "obj".into()])
            .await
            .unwrap(),
        1
    );

    // Put is insert-if-absent; upsert replaces, in place or not.
    a.put("obj", &value(10, 9), &WriteConfig::default())
        .await
        .unwrap();
    assert_eq!(c.get("obj").await.unwrap(), data);
    c.upsert("obj", &value(1000, 7), &WriteConfig::default())
        .await
        .unwrap();
    assert_eq!(a.get("obj").await.unwrap(), value(1000, 7));

    // Batches report per key.
    let keys: Vec<String> = (0..8).map(|i| format!("batch/{i}")).collect();
    let values: Vec<Vec<u8>> = (0..8).map(|i| value(64 << 10, i as u8)).collect();
    let refs: Vec<&[u8]> = values.iter().map(|v| v.as_slice()).collect();
    assert!(b
        .batch_put(&keys, &refs, &WriteConfig::default())
        .await
        .iter()
        .all(|r| r.is_ok()));
    let got = c.batch_get(&keys).await;
    for (g, v) in got.iter().zip(&values) {
        assert_eq!(g.as_ref().unwrap(), v);
    }
    assert_eq!(c.batch_exists(&keys).await.unwrap(), vec![true; 8]);

    // Bad input gets its code and leaves nothing behind.
    assert_eq!(
        a.put("", b"x", &WriteConfig::default())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        a.put("k", b"", &WriteConfig::default())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidArgument
    );
    let three = WriteConfig {
        replica_num: 3,
        ..WriteConfig::default()
    };
    assert_eq!(
        a.put("k", b"x", &three).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        c.get("missing").await.unwrap_err().kind(),
        ErrorKind::ObjectNotFound
    );
    assert!(!c.exists("k").await.unwrap());

    // Reads grant leases; remove respects them unless forced.
    assert_eq!(
        c.remove("obj", false).await.unwrap_err().kind(),
        ErrorKind::ObjectHasLease
    );
    c.remove("obj", true).await.unwrap();
    assert_eq!(c.remove_by_regex("^batch/", true).await.unwrap(), 8);
    assert_eq!(c.remove_all(true).await.unwrap(), 0);

    for client in [a, b, c] {
        client.close().await;
    }
    master.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_share_lookups_and_keep_their_own_outcomes() {
    let master = master().await;
    let a = client(&master, 32 << 20).await;
    for i in 0..8u8 {
        a.put(&format!("k{i}"), &value(4096, i), &WriteConfig::default())
            .await
            .unwrap();
    }
    let mut gets = tokio::task::JoinSet::new();
    for i in 0..64usize {
        let a = a.clone();
        gets.spawn(async move {
            let key = match i % 9 {
                8 => "missing".to_owned(),
                k => format!("k{k}"),
            };
            (i, a.get(&key).await)
        });
    }
    while let Some(joined) = gets.join_next().await {
        let (i, got) = joined.unwrap();
        match i % 9 {
            8 => assert_eq!(got.unwrap_err().kind(), ErrorKind::ObjectNotFound),
            k => assert_eq!(got.unwrap(), value(4096, k as u8), "get {i}"),
        }
    }
    a.close().await;
    master.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_held_past_the_staging_buffer_and_its_reserve_read_exactly() {
    let master = master().await;
    let owner = client(&master, 32 << 20).await;
    let data = value(1 << 20, 9);
    owner
        .put("big", &data, &WriteConfig::default())
        .await
        .unwrap();

    // 4 MiB of staging, then the 64 MiB reserve, then values with memory of their own.
    let reader = client(&master, 0).await;
    let mut held = Vec::new();
    for i in 0..80 {
        let got = reader.get("big").await.unwrap();
        assert!(got == data, "get {i} differs");
        held.push(got);
    }
    // No staging at all: every value gets its own memory.
    let bare = client_staging(&master, 0, 0).await;
    assert!(bare.get("big").await.unwrap() == data);

    drop(held);
    for client in [owner, reader, bare] {
        client.close().await;
    }
    master.close().await;
}
