//! Reads under concurrent writes: a reader gets a whole version that some write wrote, never
//! a torn one, never an older one than it saw, and always what it wrote or removed itself.

mod support;

use std::time::Duration;

use mooncake_common::{pattern, ErrorKind};
use mooncake_store::master::WriteConfig;
use support::{store_client, MasterProcess};

const LEASE_MS: u64 = 800;

fn version(n: u64) -> Vec<u8> {
    pattern::bytes(n, 0, 64 << 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_sees_the_latest_version_and_its_own_changes_at_once() {
    let master = MasterProcess::start(&["--default-kv-lease-ttl", &LEASE_MS.to_string()]);
    let node = store_client(&master.address(), 8 << 20).await;
    let reader = store_client(&master.address(), 0).await;
    let writer = store_client(&master.address(), 0).await;
    let config = WriteConfig::default();

    writer.put("k", &version(1), &config).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap().to_vec(), version(1));
    // Replaced under the reader's lease: written elsewhere, and read at once.
    writer.upsert("k", &version(2), &config).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap().to_vec(), version(2));
    reader.upsert("k", &version(3), &config).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap().to_vec(), version(3));
    reader.remove("k", true).await.unwrap();
    let gone = reader.get("k").await.unwrap_err();
    assert_eq!(gone.kind(), ErrorKind::ObjectNotFound);
    reader.put("k", &version(4), &config).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap().to_vec(), version(4));

    for client in [reader, writer, node] {
        client.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upserts_never_give_a_reader_a_torn_or_unknown_value() {
    let master = MasterProcess::start(&["--default-kv-lease-ttl", "300"]);
    let node = store_client(&master.address(), 16 << 20).await;
    let reader = store_client(&master.address(), 0).await;
    let writer = store_client(&master.address(), 0).await;
    writer
        .put("hot", &version(0), &WriteConfig::default())
        .await
        .unwrap();
    let writes = tokio::spawn(async move {
        for n in 1..=60u64 {
            writer
                .upsert("hot", &version(n), &WriteConfig::default())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        writer
    });
    let mut last = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1800) {
        let value = match reader.get("hot").await {
            Ok(value) => value.to_vec(),
            // Unleased, it is rewritten in place: a read meanwhile is refused, never torn.
            Err(e) if e.kind() == ErrorKind::ReplicaIsNotReady => continue,
            Err(e) => panic!("{e}"),
        };
        let n = (0..=60)
            .find(|n| value == version(*n))
            .expect("a value that no write wrote");
        // Versions only move forward for one reader.
        assert!(n >= last, "version {n} after {last}");
        last = n;
    }
    let writer = writes.await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(reader.get("hot").await.unwrap().to_vec(), version(60));
    for client in [reader, writer, node] {
        client.close().await;
    }
}
