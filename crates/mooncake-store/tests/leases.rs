//! Reads reuse the replica list they hold a lease on: no master round trip for a repeated get,
//! and the rule that gives: a reader sees the version it leased, whole, until the lease ends,
//! and always what it wrote or removed itself.

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
async fn a_reader_sees_its_leased_version_until_the_lease_ends() {
    let master = MasterProcess::start(&["--default-kv-lease-ttl", &LEASE_MS.to_string()]);
    let node = store_client(&master.address(), 8 << 20).await;
    let reader = store_client(&master.address(), 0).await;
    let writer = store_client(&master.address(), 0).await;
    let config = WriteConfig::default();
    let lookups = "master_get_replica_list_requests_total";

    writer.put("k", &version(1), &config).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap().to_vec(), version(1));
    let asked = master.counter(lookups).await;
    for _ in 0..20 {
        assert_eq!(reader.get("k").await.unwrap().to_vec(), version(1));
    }
    let batch = reader.batch_get(&["k".to_owned(), "k".to_owned()]).await;
    assert!(batch
        .iter()
        .all(|v| v.as_ref().unwrap().to_vec() == version(1)));
    assert_eq!(
        master.counter(lookups).await,
        asked,
        "repeated gets asked the master"
    );

    // Another client replaces it meanwhile: the reader keeps the version it leased, whole
    // (the new one went elsewhere: a leased object is not rewritten in place).
    writer.upsert("k", &version(2), &config).await.unwrap();
    assert_eq!(writer.get("k").await.unwrap().to_vec(), version(2));
    let seen = reader.get("k").await.unwrap().to_vec();
    assert!(seen == version(1) || seen == version(2), "a torn value");
    // Once the lease ran out, the new version.
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 100)).await;
    assert_eq!(reader.get("k").await.unwrap().to_vec(), version(2));

    // Its own writes and removals it sees at once.
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
