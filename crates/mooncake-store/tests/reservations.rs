//! Puts in one round trip: small values go into space the master reserved for the client and
//! are committed with one request; the master stays the authority over what each part holds.

mod support;

use std::time::Duration;

use mooncake_common::pattern;
use mooncake_store::master::WriteConfig;
use support::{store_client, MasterProcess};

fn value(key: usize, len: usize) -> Vec<u8> {
    pattern::bytes(key as u64 + 1, 0, len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_puts_take_one_round_trip_and_read_back_byte_for_byte() {
    let master = MasterProcess::start(&[]);
    let node = store_client(&master.address(), 64 << 20).await;
    let writer = store_client(&master.address(), 0).await;
    let config = WriteConfig::default();
    let sizes = [1, 4096, 65536, 1 << 20, (1 << 20) + 1, 3 << 20];
    for (i, len) in sizes.iter().enumerate() {
        writer
            .put(&format!("k{i}"), &value(i, *len), &config)
            .await
            .unwrap();
    }
    // Up to 1 MiB the reserved way; larger values the two-phase way.
    assert_eq!(
        master
            .counter("master_commit_reserved_requests_total")
            .await,
        4
    );
    assert_eq!(master.counter("master_put_start_requests_total").await, 2);
    for (i, len) in sizes.iter().enumerate() {
        let got = node.get(&format!("k{i}")).await.unwrap();
        assert!(got.to_vec() == value(i, *len), "k{i} differs");
    }
    // Insert if absent, as ever: the first value stays.
    writer.put("k0", b"other", &config).await.unwrap();
    assert_eq!(node.get("k0").await.unwrap().to_vec(), value(0, 1));
    // A batch, and values from registered memory.
    let keys: Vec<String> = (10..60).map(|i| format!("k{i}")).collect();
    let values: Vec<Vec<u8>> = (10..60).map(|i| value(i, 1000 + i * 997)).collect();
    let slices: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    for r in writer.batch_put(&keys, &slices, &config).await {
        r.unwrap();
    }
    for (key, got) in keys.iter().zip(node.batch_get(&keys).await) {
        let i: usize = key[1..].parse().unwrap();
        assert!(
            got.unwrap().to_vec() == value(i, 1000 + i * 997),
            "{key} differs"
        );
    }
    // Pins and several replicas are the master's to place: the two-phase way.
    let pinned = WriteConfig {
        hard_pin: true,
        ..WriteConfig::default()
    };
    let before = master.counter("master_put_start_requests_total").await;
    writer
        .put("pinned", &value(99, 100), &pinned)
        .await
        .unwrap();
    assert_eq!(
        master.counter("master_put_start_requests_total").await,
        before + 1
    );
    // What a client reserved goes back when it closes.
    let allocated = |page: String| {
        page.lines()
            .find_map(|l| l.strip_prefix("master_allocated_bytes "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN) as u64
    };
    writer.close().await;
    let objects: u64 = sizes.iter().map(|s| *s as u64).sum::<u64>()
        + (10..60).map(|i| 1000 + i as u64 * 997).sum::<u64>()
        + 100;
    let page = master.admin_page("/metrics").await.unwrap();
    assert_eq!(allocated(page), objects, "reserved space was given back");
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_of_a_master_that_restarted_are_never_written() {
    let dir = std::env::temp_dir().join(format!("mooncake-reservations-{}", support::free_port()));
    let dir_arg = dir.display().to_string();
    let mut master = MasterProcess::start(&["--data-dir", &dir_arg]);
    let node = store_client(&master.address(), 64 << 20).await;
    let writer = store_client(&master.address(), 0).await;
    let config = WriteConfig::default();
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        writer
            .put(&format!("a{i}"), &value(i, 10_000), &config)
            .await
            .unwrap();
        acknowledged.push(i);
    }
    master.kill();
    master.restart();
    // The writer's reservation died with the master: new puts find their way regardless.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for i in 20..40 {
        loop {
            match writer
                .put(&format!("a{i}"), &value(i, 10_000), &config)
                .await
            {
                Ok(()) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!("after the restart: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("a{i}: {e}"),
            }
        }
        acknowledged.push(i);
    }
    for i in acknowledged {
        let got = node.get(&format!("a{i}")).await.unwrap();
        assert!(got.to_vec() == value(i, 10_000), "a{i} differs");
    }
    writer.close().await;
    node.close().await;
    drop(master);
    let _ = std::fs::remove_dir_all(dir);
}

/// The writer process of [`a_frozen_writer_never_lands_on_another_keys_bytes`]: 1 MiB puts
/// without end, to the master `RESERVATION_WRITER_MASTER` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by a_frozen_writer_never_lands_on_another_keys_bytes"]
async fn reserved_writer_child() {
    let address = std::env::var("RESERVATION_WRITER_MASTER").unwrap();
    let writer = store_client(&address, 0).await;
    for i in 0.. {
        let _ = writer
            .put(
                &format!("w{i}"),
                &value(1000 + i, 1 << 20),
                &WriteConfig::default(),
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_writer_never_lands_on_another_keys_bytes() {
    let master = MasterProcess::start(&[]);
    let node = store_client(&master.address(), 64 << 20).await;
    let other = store_client(&master.address(), 0).await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["reserved_writer_child", "--exact", "--ignored", "--quiet"])
        .env("RESERVATION_WRITER_MASTER", master.address())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Frozen past its reservations' life and the client TTL, mid-put more likely than not.
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_secs(12)).await;
    let mut written = Vec::new();
    for n in 0..40usize {
        let key = format!("o{n}");
        if other
            .put(&key, &value(5000 + n, 1 << 20), &WriteConfig::default())
            .await
            .is_ok()
        {
            written.push((key, 5000 + n));
        }
    }
    assert!(written.len() >= 20, "{} puts", written.len());
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    // (The pool is full: eviction takes the oldest ones. What is there must be whole.)
    let mut present = 0;
    for (key, seed) in &written {
        if let Ok(got) = node.get(key).await {
            assert!(
                got.to_vec() == value(*seed, 1 << 20),
                "{key} was overwritten"
            );
            present += 1;
        }
    }
    assert!(present >= 10, "{present} of {} left", written.len());
    other.close().await;
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_gets_another_keys_bytes_after_a_master_restart() {
    for durable in [false, true] {
        let dir = std::env::temp_dir().join(format!("mooncake-restart-{}", support::free_port()));
        let dir_arg = dir.display().to_string();
        let args: Vec<&str> = if durable {
            vec!["--data-dir", &dir_arg]
        } else {
            vec![]
        };
        let mut master = MasterProcess::start(&args);
        let node = store_client(&master.address(), 64 << 20).await;
        let writer = store_client(&master.address(), 0).await;
        let reader = store_client(&master.address(), 0).await;
        let config = WriteConfig::default();
        writer.put("k", &value(1, 4096), &config).await.unwrap();
        assert!(reader.get("k").await.unwrap().to_vec() == value(1, 4096));
        master.kill();
        master.restart();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        if durable {
            while writer.remove("k", false).await.is_err() {
                assert!(std::time::Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        while writer.put("j", &value(2, 4096), &config).await.is_err() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Ok(got) = reader.get("k").await {
            assert!(
                got.to_vec() != value(2, 4096),
                "k read j's bytes (durable: {durable})"
            );
            assert!(got.to_vec() == value(1, 4096));
        }
        for client in [writer, reader, node] {
            client.close().await;
        }
        drop(master);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_too_small_to_lend_costs_no_extra_round_trip_per_put() {
    let master = MasterProcess::start(&[]);
    // 2 MiB: a sixteenth of it is below the smallest reservation worth lending.
    let node = store_client(&master.address(), 2 << 20).await;
    for i in 0..20 {
        node.put(&format!("s{i}"), &value(i, 1000), &WriteConfig::default())
            .await
            .unwrap();
    }
    assert_eq!(master.counter("master_put_start_requests_total").await, 20);
    let asked = master.counter("master_reserve_requests_total").await;
    assert!(asked <= 2, "{asked} reservations asked for");
    node.close().await;
}
