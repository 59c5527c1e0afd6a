//! Fault handling over the software fabric: the CQ budget, forced teardown, deadlines,
//! retry budget, connect failures, and transports that go away.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::handshake::messages::ConnectionMessage;
use mooncake_rdma::transport::BoxFuture;
use mooncake_rdma::verbs::{AsyncEvent, Provider, WcStatus};
use mooncake_rdma::{Connector, RdmaConfig, RdmaOptions, RdmaTransport};
use mooncake_transport::rail::RailPolicy;
use mooncake_transport::{Opcode, TaskStatus};

/// Delegates to the world's connector, after a delay, failing or panicking as told.
struct Faulty {
    inner: Arc<DirectConnector>,
    delay: Duration,
    fail_with: Option<ErrorKind>,
    panic_once: AtomicBool,
}

impl Faulty {
    fn new(world: &World) -> Self {
        Self {
            inner: world.connector.clone(),
            delay: Duration::ZERO,
            fail_with: None,
            panic_once: AtomicBool::new(false),
        }
    }
}

impl Connector for Faulty {
    fn connect<'a>(
        &'a self,
        peer_rpc_addr: &'a str,
        msg: ConnectionMessage,
    ) -> BoxFuture<'a, Result<ConnectionMessage>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            if self.panic_once.swap(false, Ordering::AcqRel) {
                panic!("connector panics on purpose");
            }
            if let Some(kind) = self.fail_with {
                return Err(Error::new(kind, "connector fails on purpose"));
            }
            self.inner.connect(peer_rpc_addr, msg).await
        })
    }
}

async fn settle_within(batch: &Batch, limit: Duration) {
    tokio::time::timeout(limit, batch.progress.settled())
        .await
        .expect("batch settled in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_rejected() {
    let world = World::new();
    for config in [
        RdmaConfig {
            num_qp_per_ep: 0,
            ..config()
        },
        RdmaConfig {
            max_cqe: 0,
            ..config()
        },
        RdmaConfig {
            slice_size: 0,
            ..config()
        },
    ] {
        let options = RdmaOptions {
            server_name: "A".into(),
            devices: vec!["mlx_a0".into()],
            matrix: matrix(&["mlx_a0"]),
            config,
            rail_policy: RailPolicy::default(),
        };
        let provider: Arc<dyn Provider> = Arc::new(world.fabric.clone());
        let e = RdmaTransport::new(provider, options, world.connector.clone())
            .err()
            .expect("rejected");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posting_stays_within_the_cq_budget() {
    let world = World::new();
    let small = RdmaConfig {
        max_cqe: 4,
        ..config()
    };
    let a = world.node("A", &["mlx_a0", "mlx_a1"], 16 * MIB, small);
    let b = world.node("B", &["mlx_b0", "mlx_b1"], 16 * MIB, config());
    a.fill(21);
    for dev in ["mlx_a0", "mlx_a1"] {
        world
            .fabric
            .set_latency(dev, Duration::from_micros(50))
            .unwrap();
    }
    let peer = b.peer();
    let len = 4 * MIB;
    let batch = submit(&a, &peer, &[(Opcode::Write, 0, remote(&b, 0), len)], MIB);
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, len), a.bytes(0, len));
    for dev in ["mlx_a0", "mlx_a1"] {
        let stats = world.fabric.stats(dev);
        assert!(stats.completed > 0, "{dev}: {stats:?}");
        assert!(stats.cq_high_water <= 4, "{dev}: {stats:?}");
    }
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cq_error_takes_the_device_out_of_service() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(22);
    let peer = b.peer();
    round_trip_ok(&a, &b, &peer).await;
    world.fabric.raise("mlx_a0", AsyncEvent::CqError).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a
        .transport
        .priority_matrix()
        .iter()
        .any(|(_, e)| e.preferred.contains(&"mlx_a0".to_owned()))
    {
        assert!(Instant::now() < deadline, "CQ error never handled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let carried = world.fabric.stats("mlx_a0").bytes;
    round_trip_ok(&a, &b, &peer).await;
    assert_eq!(world.fabric.stats("mlx_a0").bytes, carried);
    close(&[&a, &b]).await;
}

async fn round_trip_ok(a: &Node, b: &Node, peer: &Arc<mooncake_rdma::RdmaPeer>) {
    let batch = submit(a, peer, &[(Opcode::Write, 0, remote(b, 0), 2 * MIB)], MIB);
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, 2 * MIB), a.bytes(0, 2 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_teardown_sends_outstanding_requests_elsewhere() {
    let world = World::new();
    let quick = RdmaConfig {
        destroy_timeout: Duration::from_millis(200),
        ..config()
    };
    let a = world.node("A", &["mlx_a0", "mlx_a1"], 16 * MIB, quick);
    let b = world.node("B", &["mlx_b0", "mlx_b1"], 16 * MIB, config());
    a.fill(23);
    let peer = b.peer();
    world.fabric.stall("mlx_a0", true).unwrap();
    let len = 4 * MIB;
    let batch = submit(&a, &peer, &[(Opcode::Write, 0, remote(&b, 0), len)], MIB);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!batch.progress.is_settled(), "requests on mlx_a0 are stuck");
    // Nothing on mlx_a0 will ever flush: after the drain timeout its endpoints are
    // destroyed anyway and their requests go over mlx_a1.
    world.fabric.set_port("mlx_a0", false).unwrap();
    settle_within(&batch, Duration::from_secs(10)).await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, len), a.bytes(0, len));
    world.fabric.stall("mlx_a0", false).unwrap();
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_fails_with_timeout() {
    let world = World::new();
    let (a, b) = world.pair();
    let peer = b.peer();
    let past = tokio::time::Instant::now() - Duration::from_millis(1);
    let batch = submit_by(
        &a,
        &peer,
        &[(Opcode::Write, 0, remote(&b, 0), MIB)],
        MIB,
        Some(past),
    );
    batch.wait().await;
    assert_eq!(batch.tasks[0].status(), TaskStatus::Timeout);
    assert_eq!(batch.errors()[0].kind(), ErrorKind::Timeout);
    assert_eq!(world.fabric.stats("mlx_a0").completed, 0);
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_waiting_for_a_connection_time_out() {
    let world = World::new();
    let slow = Arc::new(Faulty {
        delay: Duration::from_secs(3),
        ..Faulty::new(&world)
    });
    let a = world.node_via("A", &["mlx_a0", "mlx_a1"], 16 * MIB, config(), slow);
    let b = world.node("B", &["mlx_b0", "mlx_b1"], 16 * MIB, config());
    let peer = b.peer();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
    let batch = submit_by(
        &a,
        &peer,
        &[(Opcode::Write, 0, remote(&b, 0), MIB)],
        MIB,
        Some(deadline),
    );
    settle_within(&batch, Duration::from_secs(1)).await;
    assert_eq!(batch.tasks[0].status(), TaskStatus::Timeout);
    assert_eq!(batch.errors()[0].kind(), ErrorKind::Timeout);
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_transport_settles_what_it_holds() {
    let world = World::new();
    let (a, b) = world.pair();
    let batch = slow_write_in_flight(&world, &a, &b).await;
    let Node { transport, .. } = a;
    assert_eq!(Arc::strong_count(&transport), 1);
    drop(transport);
    settle_within(&batch, Duration::from_secs(10)).await;
    let task = &batch.tasks[0];
    assert!(task.status().is_terminal());
    if let Some(e) = task.error() {
        assert_eq!(e.kind(), ErrorKind::Closed, "{e:?}");
    }
    b.transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connect_task_releases_its_pieces() {
    let world = World::new();
    let faulty = Arc::new(Faulty::new(&world));
    faulty.panic_once.store(true, Ordering::Release);
    let single = RdmaConfig {
        num_qp_per_ep: 1,
        ..config()
    };
    let a = world.node_via("A", &["mlx_a0"], 16 * MIB, single.clone(), faulty);
    let b = world.node("B", &["mlx_b0"], 16 * MIB, single);
    a.fill(24);
    let peer = b.peer();
    let batch = submit(&a, &peer, &[(Opcode::Write, 0, remote(&b, 0), MIB)], MIB);
    settle_within(&batch, Duration::from_secs(10)).await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, MIB), a.bytes(0, MIB));
    close(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_makes_at_most_retry_cnt_attempts() {
    let world = World::new();
    let budget = RdmaConfig {
        retry_cnt: 4,
        ..config()
    };
    let a = world.node("A", &["mlx_a0", "mlx_a1"], 16 * MIB, budget);
    let b = world.node("B", &["mlx_b0", "mlx_b1"], 16 * MIB, config());
    for dev in ["mlx_a0", "mlx_a1"] {
        world
            .fabric
            .fail_next(dev, 100, WcStatus::RemoteOpErr)
            .unwrap();
    }
    let peer = b.peer();
    // One piece: every attempt is one request that fails on its own.
    let batch = submit(
        &a,
        &peer,
        &[(Opcode::Write, 0, remote(&b, 0), 64 * 1024)],
        MIB,
    );
    batch.wait().await;
    let errors = batch.errors();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message().contains("after 4 attempts"),
        "{errors:?}"
    );
    let attempts = world.fabric.stats("mlx_a0").failed + world.fabric.stats("mlx_a1").failed;
    assert_eq!(attempts, 4);
    close(&[&a, &b]).await;
}

/// A write from A to B whose connection attempts all fail with `kind`; the rails A has to B
/// once the write has failed.
async fn write_through_failing_connector(kind: ErrorKind) -> Vec<mooncake_rdma::RailInfo> {
    let world = World::new();
    let failing = Arc::new(Faulty {
        fail_with: Some(kind),
        ..Faulty::new(&world)
    });
    let a = world.node_via("A", &["mlx_a0", "mlx_a1"], 16 * MIB, config(), failing);
    let b = world.node("B", &["mlx_b0", "mlx_b1"], 16 * MIB, config());
    let batch = submit(
        &a,
        &b.peer(),
        &[(Opcode::Write, 0, remote(&b, 0), MIB)],
        MIB,
    );
    batch.wait().await;
    assert_eq!(batch.errors().len(), 1);
    let rails = a.transport.rails("B");
    close(&[&a, &b]).await;
    rails
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connector_charges_no_rail() {
    let rails = write_through_failing_connector(ErrorKind::Closed).await;
    assert!(
        rails
            .iter()
            .all(|r| r.stats.failures == 0 && r.stats.pauses == 0 && r.stats.usable),
        "{rails:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_charges_the_rail() {
    let rails = write_through_failing_connector(ErrorKind::Socket).await;
    assert!(rails.iter().any(|r| r.stats.pauses > 0), "{rails:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_fault_moves_the_piece_to_another_device() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(25);
    world
        .fabric
        .fail_next("mlx_a0", 1000, WcStatus::LocalProtErr)
        .unwrap();
    let peer = b.peer();
    let n = 8;
    for k in 0..n {
        let off = k * 64 * 1024;
        let batch = submit(
            &a,
            &peer,
            &[(Opcode::Write, off, remote(&b, off), 64 * 1024)],
            MIB,
        );
        batch.wait().await;
        assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    }
    assert_eq!(b.bytes(0, n * 64 * 1024), a.bytes(0, n * 64 * 1024));
    // Each piece failed on mlx_a0 at most once: its retry left the device.
    let a0 = world.fabric.stats("mlx_a0");
    assert_eq!(a0.completed, 0);
    assert!(a0.failed <= n as u64, "{a0:?}");
    assert_eq!(world.fabric.stats("mlx_a1").completed, n as u64);
    close(&[&a, &b]).await;
}
