//! Data path over the software fabric: striping, rail failures, QP errors, port events.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mooncake_common::ErrorKind;
use mooncake_rdma::verbs::WcStatus;
use mooncake_rdma::EndpointState;
use mooncake_transport::{Opcode, TaskStatus};

/// Writes `len` bytes of A at `off` to B at `off`, then reads them back into A at `back`.
async fn round_trip(a: &Node, b: &Node, off: usize, back: usize, len: usize) {
    let peer = b.peer();
    let batch = submit(a, &peer, &[(Opcode::Write, off, remote(b, off), len)], MIB);
    batch.wait().await;
    assert!(
        batch.errors().is_empty(),
        "write failed: {:?}",
        batch.errors()
    );
    assert_eq!(b.bytes(off, len), a.bytes(off, len), "write is byte-exact");
    let batch = submit(a, &peer, &[(Opcode::Read, back, remote(b, off), len)], MIB);
    batch.wait().await;
    assert!(
        batch.errors().is_empty(),
        "read failed: {:?}",
        batch.errors()
    );
    assert_eq!(a.bytes(back, len), a.bytes(off, len), "read is byte-exact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_reads_use_both_rails_byte_exact() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(1);
    b.fill(2);
    let peer = b.peer();
    let requests = [
        (Opcode::Write, 0, remote(&b, 0), 3 * MIB + 12345),
        (Opcode::Write, 4 * MIB, remote(&b, 4 * MIB), 2 * MIB),
        (Opcode::Read, 8 * MIB, remote(&b, 12 * MIB), 3 * MIB + 7),
    ];
    let expected_read = b.bytes(12 * MIB, 3 * MIB + 7);
    let batch = submit(&a, &peer, &requests, MIB);
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    for t in &batch.tasks {
        assert_eq!(t.status(), TaskStatus::Completed);
    }
    assert_eq!(batch.tasks[0].transferred_bytes(), (3 * MIB + 12345) as u64);
    assert_eq!(b.bytes(0, 3 * MIB + 12345), a.bytes(0, 3 * MIB + 12345));
    assert_eq!(b.bytes(4 * MIB, 2 * MIB), a.bytes(4 * MIB, 2 * MIB));
    assert_eq!(a.bytes(8 * MIB, 3 * MIB + 7), expected_read);
    for dev in ["mlx_a0", "mlx_a1"] {
        let stats = world.fabric.stats(dev);
        assert!(stats.bytes > MIB as u64, "{dev} carried {stats:?}");
        assert_eq!(stats.failed, 0);
    }
    let rails = a.transport.rails("B");
    assert_eq!(rails.len(), 4);
    assert!(rails
        .iter()
        .all(|r| r.stats.usable && r.stats.inflight_bytes == 0));
    assert!(rails.iter().filter(|r| r.stats.bytes > 0).count() >= 2);
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_errors_on_one_device_pause_its_rails() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(3);
    world
        .fabric
        .fail_next("mlx_a1", 6, WcStatus::RetryExcErr)
        .unwrap();
    let peer = b.peer();
    let len = 6 * MIB;
    let batch = submit(&a, &peer, &[(Opcode::Write, 0, remote(&b, 0), len)], MIB);
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, len), a.bytes(0, len));
    let rails = a.transport.rails("B");
    let a1: Vec<_> = rails.iter().filter(|r| r.stats.local == "mlx_a1").collect();
    assert!(
        a1.iter().any(|r| r.stats.pauses > 0 && !r.stats.usable),
        "{a1:?}"
    );
    assert!(rails
        .iter()
        .filter(|r| r.stats.local == "mlx_a0")
        .all(|r| r.stats.usable));
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qp_forced_to_err_flushes_and_the_endpoint_is_rebuilt() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(4);
    let peer = b.peer();
    // Connect every endpoint first.
    round_trip(&a, &b, 0, 8 * MIB, 2 * MIB).await;
    let target = "B@mlx_b0";
    let before = a
        .transport
        .endpoint_info("mlx_a0", target)
        .expect("endpoint exists");
    assert_eq!(before.state, EndpointState::Connected);
    for dev in ["mlx_a0", "mlx_a1"] {
        world
            .fabric
            .set_latency(dev, Duration::from_micros(300))
            .unwrap();
    }
    let len = 6 * MIB;
    let batch = submit(&a, &peer, &[(Opcode::Write, 0, remote(&b, 0), len)], MIB);
    tokio::time::sleep(Duration::from_millis(5)).await;
    world.fabric.force_qp_error(before.qp_nums[0]).unwrap();
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, len), a.bytes(0, len));
    assert!(
        world.fabric.stats("mlx_a0").failed > 0,
        "some requests flushed"
    );
    for dev in ["mlx_a0", "mlx_a1"] {
        world.fabric.set_latency(dev, Duration::ZERO).unwrap();
    }
    // Flushes are not the rail's fault.
    assert!(a.transport.rails("B").iter().all(|r| r.stats.usable));
    // The next transfers over that rail use a rebuilt endpoint.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        round_trip(&a, &b, MIB, 10 * MIB, MIB).await;
        let after = a.transport.endpoint_info("mlx_a0", target);
        if let Some(after) = after {
            if after.state == EndpointState::Connected {
                assert_ne!(after.qp_nums, before.qp_nums);
                break;
            }
        }
        assert!(Instant::now() < deadline, "endpoint never rebuilt");
    }
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_down_moves_traffic_and_port_up_brings_it_back() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(5);
    let peer = b.peer();
    for dev in ["mlx_a0", "mlx_a1"] {
        world
            .fabric
            .set_latency(dev, Duration::from_micros(200))
            .unwrap();
    }
    let len = 6 * MIB;
    let batch = submit(&a, &peer, &[(Opcode::Write, 0, remote(&b, 0), len)], MIB);
    tokio::time::sleep(Duration::from_millis(5)).await;
    world.fabric.set_port("mlx_a0", false).unwrap();
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, len), a.bytes(0, len));
    let down = |a: &Node| {
        a.transport
            .rails("B")
            .iter()
            .filter(|r| r.stats.local == "mlx_a0")
            .all(|r| !r.stats.usable)
    };
    assert!(down(&a), "{:?}", a.transport.rails("B"));
    // While it is down, nothing goes over it.
    let carried = world.fabric.stats("mlx_a0").bytes;
    round_trip(&a, &b, 0, 8 * MIB, 2 * MIB).await;
    assert_eq!(world.fabric.stats("mlx_a0").bytes, carried);

    world.fabric.set_port("mlx_a0", true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while down(&a) {
        assert!(Instant::now() < deadline, "rails never resumed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    round_trip(&a, &b, 0, 8 * MIB, 4 * MIB).await;
    assert!(
        world.fabric.stats("mlx_a0").bytes > carried,
        "mlx_a0 used again"
    );
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rail_down_fails_with_no_rail() {
    let world = World::new();
    let (a, b) = world.pair();
    let peer = b.peer();
    world.fabric.set_port("mlx_a0", false).unwrap();
    world.fabric.set_port("mlx_a1", false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a
        .transport
        .priority_matrix()
        .iter()
        .any(|(_, e)| !e.preferred.is_empty() || !e.available.is_empty())
    {
        assert!(Instant::now() < deadline, "port events never processed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let batch = submit(
        &a,
        &peer,
        &[(Opcode::Write, 0, remote(&b, 0), 2 * MIB)],
        MIB,
    );
    batch.wait().await;
    let errors = batch.errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].kind(), ErrorKind::NoRail, "{errors:?}");
    assert_eq!(batch.tasks[0].status(), TaskStatus::Failed);
    assert_eq!(batch.tasks[0].transferred_bytes(), 0);
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_fails_what_is_pending_and_returns() {
    let world = World::new();
    let (a, b) = world.pair();
    let batch = slow_write_in_flight(&world, &a, &b).await;
    tokio::time::timeout(Duration::from_secs(10), a.transport.close())
        .await
        .expect("close returns");
    batch.wait().await;
    let task = &batch.tasks[0];
    assert!(task.status().is_terminal());
    if let Some(e) = task.error() {
        assert_eq!(e.kind(), ErrorKind::Closed, "{e:?}");
    }
    // After close, submissions fail at once.
    let batch = submit(
        &a,
        &b.peer(),
        &[(Opcode::Write, 0, remote(&b, 0), MIB)],
        MIB,
    );
    batch.wait().await;
    assert_eq!(batch.errors()[0].kind(), ErrorKind::Closed);
    b.transport.close().await;
}
