//! A single master with `--data-dir`, killed mid-load and started again: every put it
//! acknowledged is readable byte for byte afterwards, and no unacknowledged put shows up
//! half-written.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{spawn_load, store_client, verify, Ledger, MasterProcess};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_recovers_every_acknowledged_put() {
    let dir = std::env::temp_dir().join(format!("mooncake-durability-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_string_lossy().into_owned();
    let mut master = MasterProcess::start(&["--data-dir", &data_dir]);
    let address = master.address();
    let nodes = [
        store_client(&address, 32 << 20).await,
        store_client(&address, 32 << 20).await,
    ];
    let writer = store_client(&address, 0).await;

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = CancellationToken::new();
    let load = spawn_load(writer.clone(), "load", 4, ledger.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let before = ledger.lock().unwrap().successes.len();
    assert!(before > 20, "only {before} puts before the kill");
    master.kill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    master.restart();
    // Load goes on until puts succeed again for a while.
    let deadline = killed + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if ledger.lock().unwrap().resumed(killed, 40).is_some() || Instant::now() > deadline {
            break;
        }
    }
    stop.cancel();
    load.await.unwrap();

    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    let first_after = ledger.resumed(killed, 40);
    assert!(
        first_after.is_some(),
        "puts did not resume after the restart"
    );
    let (acknowledged, read_back, whole) = verify(&writer, &ledger, Duration::from_secs(15)).await;
    println!(
        "data-dir master killed mid-load: {acknowledged} puts acknowledged, {read_back} read back, \
         lost {}, unacknowledged found whole {whole}; first put after the kill in {:?}",
        acknowledged - read_back,
        first_after
    );
    assert_eq!(acknowledged, read_back);
    assert!(acknowledged > 40);

    writer.close().await;
    for node in nodes {
        node.close().await;
    }
    drop(master);
    let _ = std::fs::remove_dir_all(&dir);
}
