//! Three etcd members, three masters (`--enable-ha`), three store nodes and two writers that
//! only know the etcd address, all on loopback. Faults in turn, under load: the leader
//! SIGKILLed, a leader frozen (SIGSTOP) past its lease and thawed, an etcd member killed,
//! every master stopped and started again. Afterwards every acknowledged put is readable byte
//! for byte, and no unacknowledged one shows up half-written.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_testkit::EtcdCluster;
use support::{spawn_load, store_client, verify, Ledger, MasterProcess};
use tokio_util::sync::CancellationToken;

/// Which masters say they lead.
async fn leaders(masters: &[MasterProcess]) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, m) in masters.iter().enumerate() {
        if let Some(health) = m.health().await {
            if health.contains("\"role\":\"leader\"") {
                out.push(i);
            }
        }
    }
    out
}

async fn one_leader(masters: &[MasterProcess], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let found = leaders(masters).await;
        if found.len() == 1 {
            return found[0];
        }
        assert!(Instant::now() < deadline, "leaders: {found:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `count` puts that began after `since` succeeded; returns when the first one
/// was acknowledged.
async fn puts_after(ledger: &Mutex<Ledger>, since: Instant, count: usize) -> Duration {
    let deadline = since + Duration::from_secs(40);
    loop {
        if let Some(first) = ledger.lock().unwrap().resumed(since, count) {
            return first;
        }
        assert!(Instant::now() < deadline, "puts did not resume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn ha_masters_lose_no_acknowledged_put() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .try_init();
    }
    let mut etcd = EtcdCluster::new(3).expect("etcd cluster");
    let connection = etcd.connection_string();
    // Snapshots every 100 entries: failovers also land between a snapshot and the entries
    // it replaced.
    let flags = [
        "--enable-ha",
        "--etcd-endpoints",
        connection.as_str(),
        "--snapshot-after-entries",
        "100",
    ];
    let mut masters: Vec<MasterProcess> = (0..3).map(|_| MasterProcess::start(&flags)).collect();
    one_leader(&masters, Duration::from_secs(20)).await;

    let address = format!("etcd://{connection}");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(store_client(&address, 64 << 20).await);
    }
    let writers = [
        store_client(&address, 0).await,
        store_client(&address, 0).await,
    ];
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let loads: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(i, w)| spawn_load(w.clone(), &format!("w{i}"), 4, ledger.clone(), stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 1. The leader dies.
    let leader = one_leader(&masters, Duration::from_secs(5)).await;
    masters[leader].kill();
    let killed = Instant::now();
    let failover = puts_after(&ledger, killed, 40).await;
    println!("leader SIGKILLed: first acknowledged put after {failover:?}");
    masters[leader].restart();

    // 2. The leader freezes past its lease, then wakes: it must not lead beside the new one.
    let frozen = one_leader(&masters, Duration::from_secs(20)).await;
    masters[frozen].freeze();
    let froze = Instant::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let during = puts_after(&ledger, froze, 40).await;
    println!("leader SIGSTOPped: first acknowledged put after {during:?}");
    masters[frozen].thaw();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now_leading = one_leader(&masters, Duration::from_secs(10)).await;
    assert_ne!(now_leading, frozen, "a thawed leader took its place back");

    // 3. An etcd member dies under load.
    let before = ledger.lock().unwrap().failures.len();
    etcd.kill(0);
    let member_killed = Instant::now();
    puts_after(&ledger, member_killed, 200).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed = ledger.lock().unwrap().failures.len() - before;
    println!("etcd member killed: {failed} puts failed");

    // 4. Every master stops; all start again.
    for m in &mut masters {
        m.terminate();
    }
    for m in &mut masters {
        m.restart();
    }
    let restarted = Instant::now();
    puts_after(&ledger, restarted, 40).await;
    stop.cancel();
    for load in loads {
        load.await.unwrap();
    }

    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let (acknowledged, read_back, whole) =
        verify(&writers[0], &ledger, Duration::from_secs(20)).await;
    println!(
        "HA faults: {acknowledged} puts acknowledged, {read_back} read back, lost {}, \
         unacknowledged found whole {whole}, {} failed",
        acknowledged - read_back,
        ledger.keys.len() - acknowledged
    );
    assert_eq!(acknowledged, read_back);
    assert_eq!(failed, 0, "losing one etcd member of three failed puts");

    for w in writers {
        w.close().await;
    }
    for n in nodes {
        n.close().await;
    }
}
