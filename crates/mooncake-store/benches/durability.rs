//! What durability costs and what failover takes, measured in one run on loopback:
//!
//! 1. puts against a master that keeps nothing, one with `--data-dir`, and an HA master on a
//!    three-member etcd cluster: batched put throughput and single-put latency (medians);
//! 2. failover: the HA leader SIGKILLed, until a put that began after the kill is acknowledged
//!    through a client that only knows the etcd address (median of several rounds);
//! 3. the log in etcd after a million puts and removes, with compaction.
//!
//! `cargo bench -p mooncake-store --bench durability` (needs Debian's etcd-server).
//! `DURABILITY_ROUNDS`, `DURABILITY_SECONDS` and `DURABILITY_KEYS` shorten or lengthen it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_metadata::etcd::EtcdStore;
use mooncake_store::master::WriteConfig;
use mooncake_store::master::{ClientId, SegmentId, SegmentSpec};
use mooncake_store::proto;
use mooncake_store::proto::master_client::MasterClient;
use mooncake_store::wire::{to_segment, to_uuid};
use mooncake_testkit::EtcdCluster;
use support::{env, median, spawn_load, store_client, Ledger, MasterProcess};
use tokio_util::sync::CancellationToken;

/// Batched puts/s and single-put p50 of one master: (memory, data-dir, HA).
type Row = ((f64, Duration), (f64, Duration), (f64, Duration));

/// Batched puts per second and the median latency of single puts against one master.
async fn put_figures(address: &str, seconds: u64, inflight: usize) -> (f64, Duration) {
    let nodes = [
        store_client(address, 768 << 20).await,
        store_client(address, 768 << 20).await,
    ];
    let client = store_client(address, 0).await;
    let config = WriteConfig::default();
    // Several batches in flight from one client, as a serving process with several requests
    // would have; the pool holds every value of the run, so nothing is evicted or removed
    // while the clock runs.
    let busy = Arc::new(Mutex::new(Duration::ZERO));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..inflight {
        let (client, busy, done) = (client.clone(), busy.clone(), done.clone());
        let config = config.clone();
        writers.push(tokio::spawn(async move {
            let mut round = 0;
            let mut timed = Duration::ZERO;
            while started.elapsed() < Duration::from_secs(seconds) {
                let keys: Vec<String> = (0..64).map(|i| format!("b/{w}/{round}/{i}")).collect();
                let values: Vec<Vec<u8>> = keys.iter().map(|_| vec![7u8; 4096]).collect();
                let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
                let at = Instant::now();
                let ok = client
                    .batch_put(&keys, &refs, &config)
                    .await
                    .iter()
                    .filter(|r| r.is_ok())
                    .count();
                timed += at.elapsed();
                done.fetch_add(ok, std::sync::atomic::Ordering::Relaxed);
                round += 1;
            }
            *busy.lock().unwrap() += timed;
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    let busy = busy.lock().unwrap().as_secs_f64() / inflight as f64;
    let done = done.load(std::sync::atomic::Ordering::Relaxed);
    client.remove_all(true).await.expect("remove all");
    let batched = done as f64 / busy;
    let mut latencies = Vec::new();
    for i in 0..500 {
        let key = format!("s/{i}");
        let value = vec![3u8; 4096];
        let at = Instant::now();
        client.put(&key, &value, &config).await.expect("single put");
        latencies.push(at.elapsed().as_secs_f64());
    }
    client.close().await;
    for node in nodes {
        node.close().await;
    }
    (batched, Duration::from_secs_f64(median(latencies)))
}

async fn wait_for_leader(masters: &[MasterProcess]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, m) in masters.iter().enumerate() {
            if m.health()
                .await
                .is_some_and(|h| h.contains("\"role\":\"leader\""))
            {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Leader SIGKILL -> first acknowledged put that began after it.
async fn failover_rounds(rounds: u64) -> Vec<Duration> {
    let etcd = EtcdCluster::new(3).expect("etcd");
    let connection = etcd.connection_string();
    let flags = ["--enable-ha", "--etcd-endpoints", connection.as_str()];
    let mut masters: Vec<MasterProcess> = (0..3).map(|_| MasterProcess::start(&flags)).collect();
    wait_for_leader(&masters).await;
    let address = format!("etcd://{connection}");
    let node = store_client(&address, 64 << 20).await;
    let writer = store_client(&address, 0).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let load = spawn_load(writer.clone(), "f", 1, ledger.clone(), stop.clone());
    let mut times = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = wait_for_leader(&masters).await;
        masters[leader].kill();
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(60);
        let took = loop {
            if let Some(first) = ledger.lock().unwrap().resumed(killed, 1) {
                break first;
            }
            assert!(Instant::now() < deadline, "puts did not resume");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!("  failover round: {took:?}");
        times.push(took);
        masters[leader].restart();
    }
    stop.cancel();
    let _ = load.await;
    writer.close().await;
    node.close().await;
    drop(masters);
    times
}

/// A million puts and removes straight through the master's RPC, then the log's footprint
/// in etcd.
async fn log_footprint(keys: u64) {
    let etcd = EtcdCluster::new(1).expect("etcd");
    let connection = etcd.connection_string();
    let master = MasterProcess::start(&["--enable-ha", "--etcd-endpoints", connection.as_str()]);
    let masters = [master];
    wait_for_leader(&masters).await;
    let mut rpc = MasterClient::connect(format!("http://{}", masters[0].address()))
        .await
        .expect("master RPC");
    let client = ClientId::random();
    let segment = SegmentSpec {
        id: SegmentId::random(),
        name: "bench-node".into(),
        base: 1 << 32,
        size: 1 << 30,
        te_endpoint: "127.0.0.1:1".into(),
        protocol: "tcp".into(),
        host_id: "127.0.0.1".into(),
    };
    rpc.mount_segment(proto::MountSegmentRequest {
        client_id: Some(to_uuid(client.0)),
        segment: Some(to_segment(&segment)),
    })
    .await
    .expect("mount");
    let batch = 500u64;
    let started = Instant::now();
    let mut n = 0;
    while n < keys {
        if n % 100_000 == 0 {
            println!("  {n} puts and removes");
        }
        let names: Vec<String> = (n..n + batch).map(|i| format!("log/{i}")).collect();
        let grants = rpc
            .batch_put_start(proto::BatchPutStartRequest {
                client_id: Some(to_uuid(client.0)),
                keys: names.clone(),
                sizes: vec![4096; names.len()],
                config: None,
            })
            .await
            .expect("put start")
            .into_inner()
            .results;
        rpc.batch_put_end(proto::BatchKeysRequest {
            client_id: Some(to_uuid(client.0)),
            keys: names.clone(),
            write_ids: grants.iter().map(|g| g.write_id).collect(),
        })
        .await
        .expect("put end");
        rpc.batch_remove(proto::BatchRemoveRequest {
            keys: names,
            force: true,
        })
        .await
        .expect("remove");
        n += batch;
    }
    let took = started.elapsed();
    // Let the last snapshot land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store = EtcdStore::with_endpoints(etcd.endpoints()).expect("etcd client");
    let prefix = "mooncake-store/mooncake_cluster/".to_owned();
    let (mut count, mut bytes) = (0usize, 0usize);
    let end = mooncake_store::master::log::etcd::prefix_end(&prefix);
    let mut from = prefix.clone().into_bytes();
    loop {
        let page = store
            .call("GET", |mut c| {
                let (from, end) = (from.clone(), end.clone());
                async move {
                    let options = etcd_client::GetOptions::new()
                        .with_range(end)
                        .with_limit(16);
                    c.get(from, Some(options)).await
                }
            })
            .await
            .expect("range");
        count += page.kvs().len();
        bytes += page
            .kvs()
            .iter()
            .map(|kv| kv.key().len() + kv.value().len())
            .sum::<usize>();
        match (page.more(), page.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    let status = store
        .call("status", |mut c| async move { c.status().await })
        .await
        .expect("status");
    println!(
        "log after {keys} puts and {keys} removes ({:.0} puts+removes/s): {} keys, {} bytes under \
         {prefix}; etcd db {} bytes ({} in use)",
        keys as f64 / took.as_secs_f64(),
        count,
        bytes,
        status.db_size(),
        status.raft_used_db_size(),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !mooncake_testkit::etcd_installed() {
        println!("durability bench skipped: etcd is not installed (apt-get install etcd-server)");
        return;
    }
    let seconds = env("DURABILITY_SECONDS", 2);
    let inflight = env("DURABILITY_INFLIGHT", 4) as usize;
    let rounds = env("DURABILITY_ROUNDS", 5);
    let keys = env("DURABILITY_KEYS", 1_000_000);

    println!(
        "durability cost (2 nodes, 1 client with {inflight} batches of 64 puts of 4 KiB in \
         flight; single puts one at a time):"
    );
    let dir = std::env::temp_dir().join(format!("mooncake-bench-{}", std::process::id()));
    let data_dir = dir.to_string_lossy().into_owned();
    let mut rows = Vec::new();
    for repeat in 0..3 {
        let memory = MasterProcess::start(&[]);
        let m = put_figures(&memory.address(), seconds, inflight).await;
        drop(memory);
        let disk = MasterProcess::start(&["--data-dir", &data_dir]);
        let d = put_figures(&disk.address(), seconds, inflight).await;
        drop(disk);
        let _ = std::fs::remove_dir_all(&dir);
        let etcd = EtcdCluster::new(3).expect("etcd");
        let connection = etcd.connection_string();
        let ha = MasterProcess::start(&["--enable-ha", "--etcd-endpoints", connection.as_str()]);
        wait_for_leader(std::slice::from_ref(&ha)).await;
        let h = put_figures(&format!("etcd://{connection}"), seconds, inflight).await;
        drop(ha);
        println!(
            "  round {repeat}: memory {:.0} puts/s p50 {:?} | data-dir {:.0} p50 {:?} | HA {:.0} p50 {:?}",
            m.0, m.1, d.0, d.1, h.0, h.1
        );
        rows.push((m, d, h));
    }
    let med = |f: &dyn Fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let (m_ops, d_ops, h_ops) = (med(&|r| r.0 .0), med(&|r| r.1 .0), med(&|r| r.2 .0));
    let (m_p50, d_p50, h_p50) = (
        med(&|r| r.0 .1.as_secs_f64()) * 1e6,
        med(&|r| r.1 .1.as_secs_f64()) * 1e6,
        med(&|r| r.2 .1.as_secs_f64()) * 1e6,
    );
    println!(
        "  median batched puts/s: memory {m_ops:.0}, data-dir {d_ops:.0} ({:.2}x), HA {h_ops:.0} ({:.2}x)",
        d_ops / m_ops,
        h_ops / m_ops
    );
    println!(
        "  median single-put p50: memory {m_p50:.0} us, data-dir {d_p50:.0} us, HA {h_p50:.0} us"
    );

    println!("failover (3 etcd, 3 masters; leader SIGKILLed, until a fresh put is acknowledged):");
    let times = failover_rounds(rounds).await;
    println!(
        "  median {:.2} s over {} rounds",
        median(times.iter().map(Duration::as_secs_f64).collect()),
        times.len()
    );

    log_footprint(keys).await;
}
