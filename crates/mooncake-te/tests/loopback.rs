//! Two engines in one process, over loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{bytes, fill, round_trip};
use mooncake_common::config::Protocol;
use mooncake_common::EngineConfig;
use mooncake_metadata::http::MetadataServer;
use mooncake_metadata::redis::RedisStore;
use mooncake_metadata::{Keys, MetadataStore};
use mooncake_te::engine::SubmitOptions;
use mooncake_te::stats::TransportKind;
use mooncake_te::{ErrorKind, Opcode, TaskStatus, TransferEngine, TransferRequest};
use mooncake_testkit::RedisServer;

async fn engine(metadata: &str, name: &str) -> Arc<TransferEngine> {
    engine_over(metadata, name, Protocol::Auto).await
}

async fn engine_over(metadata: &str, name: &str, protocol: Protocol) -> Arc<TransferEngine> {
    let mut config = EngineConfig::from_env(name, metadata);
    config.advertised_host = Some("127.0.0.1".into());
    config.protocol = protocol;
    TransferEngine::start(config).await.unwrap()
}

fn sent_through(engine: &TransferEngine, kind: TransportKind) -> u64 {
    engine
        .stats()
        .into_iter()
        .find(|(k, _, _)| *k == kind)
        .map_or(0, |(_, requests, _)| requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read_back_over_tcp() {
    write_then_read_back(Protocol::Tcp, TransportKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read_back_over_shared_memory() {
    write_then_read_back(Protocol::Auto, TransportKind::Shm).await;
}

async fn write_then_read_back(protocol: Protocol, expected: TransportKind) {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = engine_over("P2PHANDSHAKE", "127.0.0.1", protocol).await;
    let len = 8 << 20;
    let remote = target.allocate(len).unwrap();
    let local = initiator.allocate(2 * len).unwrap();
    fill(local.as_ptr(), len, 7);

    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    assert_eq!(segment.buffers.len(), 1);
    assert_eq!(segment.buffers[0].0, remote.as_ptr() as u64);
    let write = TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote.as_ptr() as u64 + 3,
        len: len - 3,
    };
    initiator
        .transfer(&[write], SubmitOptions::default())
        .await
        .unwrap();
    assert!(
        bytes(remote.as_ptr(), len)[3..] == bytes(local.as_ptr(), len)[..len - 3],
        "write landed wrong"
    );

    let read = TransferRequest {
        op: Opcode::Read,
        local_addr: local.as_ptr() as usize + len,
        ..write
    };
    // Over shared memory, this thread copies the last slice and the copy threads the rest.
    let on_caller = SubmitOptions {
        copy_on_caller: true,
        ..SubmitOptions::default()
    };
    initiator
        .transfer(&[read], on_caller.clone())
        .await
        .unwrap();
    assert!(
        bytes(local.as_ptr(), len)[..len - 3] == bytes(local.as_ptr(), 2 * len)[len..2 * len - 3],
        "read-back differs"
    );
    assert_eq!(initiator.batch_count(), 0, "transfer() frees its batch");
    assert_eq!(
        sent_through(&initiator, expected),
        2,
        "{expected:?} carried both requests"
    );
    // Rails are named by the segment they lead to; shared memory has none.
    let rails = initiator.rails_by_segment();
    if expected == TransportKind::Tcp {
        assert_eq!(rails.len(), 1, "{rails:?}");
        assert_eq!(rails[0].0, target.segment_name());
        let carried: u64 = rails[0].1.iter().map(|r| r.bytes).sum();
        assert_eq!(carried, 2 * (len as u64 - 3), "{rails:?}");
        assert!(rails[0].1.iter().all(|r| r.usable && !r.failing));
    } else {
        assert!(rails.is_empty(), "{rails:?}");
    }
    if expected == TransportKind::Shm {
        // One slice above the inline limit: the caller copies it before `submit` returns.
        let one = TransferRequest {
            len: 1 << 20,
            ..read
        };
        let batch = initiator.submit(&[one], on_caller).unwrap();
        assert_eq!(
            initiator.status(batch).unwrap()[0].status,
            TaskStatus::Completed
        );
        initiator.release_batch(batch);
    }
    // A settled transfer holds no memory: unregistering right away succeeds.
    initiator.unregister(local.as_ptr() as usize).unwrap();
    initiator.close().await;
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_remote_ranges_fail_their_task_only() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let remote = target.allocate(1 << 16).unwrap();
    let local = initiator.allocate(1 << 16).unwrap();
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let good = TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote.as_ptr() as u64,
        len: 4096,
    };
    let bad = TransferRequest {
        remote_addr: remote.as_ptr() as u64 + (1 << 16) - 10,
        ..good
    };
    let id = initiator
        .submit(&[good, bad], SubmitOptions::default())
        .unwrap();
    let err = initiator.wait(id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddressNotRegistered);
    let status = initiator.status(id).unwrap();
    assert_eq!(status[0].status, TaskStatus::Completed);
    assert_eq!(status[1].status, TaskStatus::Failed);
    initiator.free_batch(id).unwrap();

    let unknown_local = TransferRequest {
        local_addr: 0x10,
        ..good
    };
    let err = initiator
        .submit(&[unknown_local], SubmitOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddressNotRegistered);
    initiator.close().await;
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_metadata_and_notifications() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let target = engine(&url, "node-target").await;
    let initiator = engine(&url, "node-initiator").await;
    assert_eq!(target.segment_name(), "node-target");
    let remote = target.allocate(1 << 20).unwrap();
    target.publish_now().await.unwrap();
    let options = SubmitOptions {
        notify: Some("kv-ready".into()),
        timeout: Some(Duration::from_secs(10)),
        ..SubmitOptions::default()
    };
    write_one_mib(&initiator, "node-target", remote.as_ptr(), options).await;
    let received = target.take_notifies();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].from, "node-initiator");
    assert_eq!(received[0].message, "kv-ready");

    initiator.close().await;
    target.close().await;
    assert!(server.store().is_empty(), "close removes published keys");
    server.close().await;
}

/// Writes 1 MiB from a fresh buffer to `remote` in the segment `target`, which the initiator
/// finds through the metadata, and checks that it landed.
async fn write_one_mib(
    initiator: &Arc<TransferEngine>,
    target: &str,
    remote: *mut u8,
    options: SubmitOptions,
) {
    let local = initiator.allocate(1 << 20).unwrap();
    fill(local.as_ptr(), 1 << 20, 1);
    let segment = initiator.open_segment(target).await.unwrap();
    let request = TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote as u64,
        len: 1 << 20,
    };
    initiator.transfer(&[request], options).await.unwrap();
    assert!(
        bytes(remote, 1 << 20) == bytes(local.as_ptr(), 1 << 20),
        "write landed wrong"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(redis_server),
    ignore = "redis-server is not installed (apt-get install redis-server)"
)]
async fn redis_metadata_carries_descriptors() {
    let redis = RedisServer::start().expect("redis-server starts");
    let url = redis.url();
    let target = engine(&url, "redis-target").await;
    let initiator = engine(&url, "redis-initiator").await;
    let remote = target.allocate(1 << 20).unwrap();
    target.publish_now().await.unwrap();
    let store = RedisStore::new(&url).unwrap();
    let key = Keys::new(None).segment("redis-target");
    let published = store
        .get(&key)
        .await
        .unwrap()
        .expect("the descriptor is in Redis");
    assert!(published.contains(&format!("{}", remote.as_ptr() as u64)));

    write_one_mib(
        &initiator,
        "redis-target",
        remote.as_ptr(),
        SubmitOptions::default(),
    )
    .await;

    initiator.close().await;
    target.close().await;
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "close removes the descriptor"
    );

    drop(redis);
    assert_eq!(
        store.get(&key).await.unwrap_err().kind(),
        ErrorKind::Metadata,
        "the server is gone: a clear error, no hang"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_settles_pending_work_and_refuses_more() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let remote = target.allocate(64 << 20).unwrap();
    let local = initiator.allocate(64 << 20).unwrap();
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let request = TransferRequest {
        op: Opcode::Read,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote.as_ptr() as u64,
        len: 64 << 20,
    };
    let id = initiator
        .submit(&[request; 8], SubmitOptions::default())
        .unwrap();
    target.close().await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), initiator.wait(id)).await;
    assert!(outcome
        .expect("a dead peer must not hang the batch")
        .is_err());
    initiator.close().await;
    assert_eq!(
        initiator.allocate(10).unwrap_err().kind(),
        ErrorKind::Closed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_tcp_data_protocol_v1_when_asked() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = v1_initiator().await;
    let len = 3 << 20;
    let remote = target.allocate(len).unwrap();
    let local = initiator.allocate(2 * len).unwrap();
    fill(local.as_ptr(), len, 0x42);
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let [write, read] = round_trip(segment.id, local.as_ptr(), remote.as_ptr() as u64, len);
    initiator
        .transfer(&[write], SubmitOptions::default())
        .await
        .unwrap();
    assert_same(
        bytes(remote.as_ptr(), len),
        bytes(local.as_ptr(), len),
        "a completed v1 write has landed",
    );
    initiator
        .transfer(&[read], SubmitOptions::default())
        .await
        .unwrap();
    assert_same(
        &bytes(local.as_ptr(), 2 * len)[len..],
        bytes(local.as_ptr(), len),
        "v1 read-back",
    );
    // v1 has no reject status: the server closes, and the slice fails instead of hanging.
    let outside = TransferRequest {
        remote_addr: remote.as_ptr() as u64 + len as u64 - 1,
        len: 2,
        ..write
    };
    let err = initiator
        .transfer(&[outside], SubmitOptions::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::AddressNotRegistered,
        "caught by the descriptor check first"
    );
    initiator.close().await;
    target.close().await;
}

/// An engine that speaks TCP v1 to everyone, over 4 lanes, in 64 KiB slices.
async fn v1_initiator() -> Arc<TransferEngine> {
    let mut config = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    config.advertised_host = Some("127.0.0.1".into());
    config.tcp_force_v1 = true;
    config.protocol = Protocol::Tcp;
    config.tcp_lanes_per_peer = 4;
    config.slice_size = 64 << 10;
    TransferEngine::start(config).await.unwrap()
}

/// Asserts `got == want`, naming the 64 KiB slices that differ and where the first wrong
/// word came from (see `fill`).
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    // A copy, so that bytes still arriving do not change the story halfway.
    let got = &got.to_vec()[..];
    let slices: Vec<usize> = (0..got.len().div_ceil(64 << 10))
        .filter(|i| {
            let range = i * (64 << 10)..((i + 1) * (64 << 10)).min(got.len());
            got[range.clone()] != want[range]
        })
        .collect();
    let first = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(0) / 8 * 8;
    let word = |b: &[u8]| u64::from_le_bytes(b[first..first + 8].try_into().unwrap());
    panic!(
        "{what}: 64 KiB slices {slices:?} differ; first at byte {first:#x}: got {:#x}, want {:#x}",
        word(got),
        word(want)
    );
}

// A v1 write reports done once the peer applied it, so the bytes are there when it completes
// and a read right after it, on any lane, returns them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_writes_have_landed_when_they_complete() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = v1_initiator().await;
    let len = 3 << 20;
    let remote = target.allocate(len).unwrap();
    let local = initiator.allocate(2 * len).unwrap();
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    for round in 0..40u64 {
        // Each round writes the range at a different offset, so stale bytes show.
        let offset = (round as usize * 4104) % (64 << 10);
        let size = len - offset;
        fill(local.as_ptr(), size, round + 1);
        let write = TransferRequest {
            op: Opcode::Write,
            segment: segment.id,
            local_addr: local.as_ptr() as usize,
            remote_addr: remote.as_ptr() as u64 + offset as u64,
            len: size,
        };
        let read = TransferRequest {
            op: Opcode::Read,
            local_addr: local.as_ptr() as usize + len,
            ..write
        };
        initiator
            .transfer(&[write], SubmitOptions::default())
            .await
            .unwrap();
        assert_same(
            &bytes(remote.as_ptr(), len)[offset..],
            bytes(local.as_ptr(), size),
            &format!("round {round}: remote memory after the write completed"),
        );
        initiator
            .transfer(&[read], SubmitOptions::default())
            .await
            .unwrap();
        assert_same(
            &bytes(local.as_ptr(), 2 * len)[len..len + size],
            bytes(local.as_ptr(), size),
            &format!("round {round}: read right after the write"),
        );
    }
    initiator.close().await;
    target.close().await;
}

// A v1 server refuses an address by closing the connection; a write it refused must fail,
// not count as done because its bytes left our socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_write_the_target_refused_fails() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = v1_initiator().await;
    let remote = target.allocate(1 << 20).unwrap();
    let local = initiator.allocate(1 << 20).unwrap();
    fill(local.as_ptr(), 1 << 20, 7);
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    // The initiator's cached descriptor still lists the buffer, so the request goes out.
    target.unregister(remote.as_ptr() as usize).unwrap();
    let write = TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote.as_ptr() as u64,
        len: 1 << 20,
    };
    let outcome = initiator.transfer(&[write], SubmitOptions::default()).await;
    assert!(outcome.is_err(), "a refused v1 write reported done");
    assert!(
        bytes(remote.as_ptr(), 1 << 20).iter().all(|b| *b == 0),
        "a refused write touched memory"
    );
    initiator.close().await;
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_respects_unregister_and_owner_close() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = engine_over("P2PHANDSHAKE", "127.0.0.1", Protocol::Shm).await;
    let remote = target.allocate(1 << 20).unwrap();
    let kept = target.allocate(1 << 20).unwrap();
    let local = initiator.allocate(1 << 20).unwrap();
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let write = |addr: *mut u8| TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: addr as u64,
        len: 4096,
    };
    initiator
        .transfer(&[write(remote.as_ptr())], SubmitOptions::default())
        .await
        .unwrap();
    target.unregister(remote.as_ptr() as usize).unwrap();
    let err = initiator
        .transfer(&[write(remote.as_ptr())], SubmitOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddressNotRegistered, "{err:?}");
    initiator
        .transfer(&[write(kept.as_ptr())], SubmitOptions::default())
        .await
        .unwrap();
    target.close().await;
    let err = initiator
        .transfer(&[write(kept.as_ptr())], SubmitOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::AddressNotRegistered | ErrorKind::Socket
        ),
        "{err:?}"
    );
    assert_eq!(sent_through(&initiator, TransportKind::Tcp), 0);
    initiator.close().await;
}

// Unregistering a buffer frees its shared-memory slot, and the next registration takes the
// same slot. A peer still holding the old descriptor names that slot: its copy must be
// refused, not land in the new registration. Checked for both paths: a mapped arena
// (re-registered as caller memory at the same address) and process_vm (caller memory
// registered again at the same address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_descriptor_never_reaches_a_reused_shared_memory_slot() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = engine_over("P2PHANDSHAKE", "127.0.0.1", Protocol::Shm).await;
    let len = 1 << 20;
    let local = initiator.allocate(len).unwrap();
    fill(local.as_ptr(), len, 1);
    let arena = target.allocate(len).unwrap();
    let mut caller = vec![0u8; len].into_boxed_slice();
    let caller_ptr = caller.as_mut_ptr();
    // SAFETY: `caller` outlives both engines; the test closes them before dropping it.
    unsafe { target.register(caller_ptr as usize, len, "*", Box::new(())) }.unwrap();

    for (what, memory) in [("mapped arena", arena.as_ptr()), ("process_vm", caller_ptr)] {
        let segment = initiator.open_segment(target.segment_name()).await.unwrap();
        let write = TransferRequest {
            op: Opcode::Write,
            segment: segment.id,
            local_addr: local.as_ptr() as usize,
            remote_addr: memory as u64,
            len,
        };
        initiator
            .transfer(&[write], SubmitOptions::default())
            .await
            .unwrap();
        // The initiator keeps this descriptor: nothing tells it about the changes below.
        target.unregister(memory as usize).unwrap();
        // SAFETY: as above; the arena's mapping lives as long as `arena`.
        unsafe { target.register(memory as usize, len, "*", Box::new(())) }.unwrap();
        fill(memory, len, 2);
        let err = initiator
            .transfer(&[write], SubmitOptions::default())
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::AddressNotRegistered,
            "{what}: {err:?}"
        );
        let untouched = target.allocate(len).unwrap();
        fill(untouched.as_ptr(), len, 2);
        assert_same(
            bytes(memory, len),
            bytes(untouched.as_ptr(), len),
            &format!("{what}: the new registration"),
        );
        target.unregister(untouched.as_ptr() as usize).unwrap();
        // A peer with a fresh descriptor reaches the new registration.
        let fresh = engine_over("P2PHANDSHAKE", "127.0.0.1", Protocol::Shm).await;
        let source = fresh.allocate(len).unwrap();
        fill(source.as_ptr(), len, 3);
        let segment = fresh.open_segment(target.segment_name()).await.unwrap();
        let request = TransferRequest {
            segment: segment.id,
            local_addr: source.as_ptr() as usize,
            ..write
        };
        fresh
            .transfer(&[request], SubmitOptions::default())
            .await
            .unwrap();
        assert_same(
            bytes(memory, len),
            bytes(source.as_ptr(), len),
            &format!("{what}: a write through a fresh descriptor"),
        );
        fresh.close().await;
    }
    assert_eq!(sent_through(&initiator, TransportKind::Tcp), 0);
    initiator.close().await;
    target.close().await;
    drop(caller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forcing_shared_memory_needs_a_same_host_target() {
    let mut config = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    config.shared_memory = false;
    let target = TransferEngine::start(config).await.unwrap();
    let initiator = engine_over("P2PHANDSHAKE", "127.0.0.1", Protocol::Shm).await;
    let remote = target.allocate(4096).unwrap();
    let local = initiator.allocate(4096).unwrap();
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let request = TransferRequest {
        op: Opcode::Read,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote.as_ptr() as u64,
        len: 4096,
    };
    let err = initiator
        .submit(&[request], SubmitOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotSupportedTransport);
    // Auto falls back to TCP for the same target.
    let fallback = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let local = fallback.allocate(4096).unwrap();
    let segment = fallback.open_segment(target.segment_name()).await.unwrap();
    let request = TransferRequest {
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        ..request
    };
    fallback
        .transfer(&[request], SubmitOptions::default())
        .await
        .unwrap();
    assert_eq!(sent_through(&fallback, TransportKind::Tcp), 1);
    for engine in [fallback, initiator, target] {
        engine.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_on_another_host_never_goes_through_shared_memory() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let target = engine(&server.url(), "real-node").await;
    let remote = target.allocate(4096).unwrap();
    target.publish_now().await.unwrap();
    // Publish the same segment as if it ran on another host.
    let store = server.store();
    let mut desc: serde_json::Value =
        serde_json::from_str(&store.get_now("mooncake/ram/real-node").unwrap()).unwrap();
    desc["name"] = "far-node".into();
    desc["shm"]["host"] = "another-host-entirely".into();
    store.put_now("mooncake/ram/far-node", desc.to_string());
    store.put_now(
        "mooncake/rpc_meta/far-node",
        store.get_now("mooncake/rpc_meta/real-node").unwrap(),
    );

    let forced = engine_over(&server.url(), "forced", Protocol::Shm).await;
    let local = forced.allocate(4096).unwrap();
    let segment = forced.open_segment("far-node").await.unwrap();
    let request = TransferRequest {
        op: Opcode::Read,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: remote.as_ptr() as u64,
        len: 4096,
    };
    let err = forced
        .submit(&[request], SubmitOptions::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotSupportedTransport);

    let auto = engine(&server.url(), "auto").await;
    let local = auto.allocate(4096).unwrap();
    let segment = auto.open_segment("far-node").await.unwrap();
    let request = TransferRequest {
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        ..request
    };
    auto.transfer(&[request], SubmitOptions::default())
        .await
        .unwrap();
    assert_eq!(sent_through(&auto, TransportKind::Tcp), 1);
    for engine in [auto, forced, target] {
        engine.close().await;
    }
    server.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registrations_serve_local_transfers_only() {
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = engine_over("P2PHANDSHAKE", "127.0.0.1", Protocol::Tcp).await;
    let remote = target.allocate(4096).unwrap();
    let mut hidden = vec![0u8; 4096];
    // SAFETY: `hidden` outlives the registration (unregistered below).
    unsafe { target.register_private(hidden.as_mut_ptr() as usize, hidden.len(), Box::new(())) }
        .unwrap();
    assert_eq!(
        target.local_descriptor().buffers.len(),
        1,
        "private memory is not published"
    );
    let local = initiator.allocate(4096).unwrap();
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let read = |addr: u64| TransferRequest {
        op: Opcode::Read,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: addr,
        len: 4096,
    };
    initiator
        .transfer(&[read(remote.as_ptr() as u64)], SubmitOptions::default())
        .await
        .unwrap();
    let err = initiator
        .transfer(&[read(hidden.as_ptr() as u64)], SubmitOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AddressNotRegistered);
    target.unregister(hidden.as_ptr() as usize).unwrap();
    initiator.close().await;
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_moves_its_own_memory_in_process_and_over_tcp_when_told() {
    for (protocol, expected) in [
        (Protocol::Auto, TransportKind::Shm),
        (Protocol::Tcp, TransportKind::Tcp),
    ] {
        let engine = engine_over("P2PHANDSHAKE", "127.0.0.1", protocol).await;
        let len = 3 << 20;
        let a = engine.allocate(len).unwrap();
        let b = engine.allocate(len).unwrap();
        fill(a.as_ptr(), len, 11);
        let own = engine.open_segment(engine.segment_name()).await.unwrap();
        let request =
            |op, local: &Arc<mooncake_transport::Arena>, remote: u64, n| TransferRequest {
                op,
                segment: own.id,
                local_addr: local.as_ptr() as usize,
                remote_addr: remote,
                len: n,
            };
        let b_addr = b.as_ptr() as u64;
        engine
            .transfer(
                &[request(Opcode::Write, &a, b_addr, len)],
                SubmitOptions::default(),
            )
            .await
            .unwrap();
        assert!(
            bytes(b.as_ptr(), len) == bytes(a.as_ptr(), len),
            "{protocol:?}: write"
        );
        // Within one buffer: its second half read into its first.
        let half = len / 2;
        let second_half = bytes(b.as_ptr(), len)[half..].to_vec();
        engine
            .transfer(
                &[request(Opcode::Read, &b, b_addr + half as u64, half)],
                SubmitOptions::default(),
            )
            .await
            .unwrap();
        assert!(
            bytes(b.as_ptr(), half) == &second_half[..],
            "{protocol:?}: read"
        );
        assert_eq!(sent_through(&engine, expected), 2, "{protocol:?}");
        engine.close().await;
    }
}

// Same-host transfers never wait on the owner's shared-memory server from a thread that
// server needs. Here both engines share one single-threaded runtime, so the owner's server
// only answers while nothing else holds that thread: connecting to the owner and mapping each
// fresh arena must not block it. A blocked thread shows as a transfer that waits out the
// peer's socket timeout (2 s) and then falls back to TCP, or fails.
#[tokio::test(flavor = "current_thread")]
async fn shared_memory_never_blocks_the_runtime_its_owner_serves_on() {
    // The peer side's socket timeout: a transfer this slow waited for an answer that could
    // not come.
    const IO_TIMEOUT: Duration = Duration::from_secs(2);
    const ARENAS: usize = 16;
    const LEN: usize = 4 << 10;
    let target = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let initiator = engine("P2PHANDSHAKE", "127.0.0.1").await;
    let local = initiator.allocate(2 * ARENAS * LEN).unwrap();
    fill(local.as_ptr(), 2 * ARENAS * LEN, 11);
    // Every arena is fresh: each write maps it first.
    let arenas: Vec<_> = (0..2 * ARENAS)
        .map(|_| target.allocate(LEN).unwrap())
        .collect();
    let segment = initiator.open_segment(target.segment_name()).await.unwrap();
    let write = |i: usize| TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize + i * LEN,
        remote_addr: arenas[i].as_ptr() as u64,
        len: LEN,
    };
    let timed = |what: String, took: Duration| {
        assert!(
            took < IO_TIMEOUT,
            "{what} took {took:?}: it waited for the owner's shared-memory server"
        );
    };
    // One at a time, half of them copied on the submitting thread.
    for i in 0..ARENAS {
        let options = SubmitOptions {
            copy_on_caller: i % 2 == 0,
            ..SubmitOptions::default()
        };
        let started = tokio::time::Instant::now();
        let outcome = initiator.transfer(&[write(i)], options).await;
        timed(format!("write {i}"), started.elapsed());
        outcome.unwrap();
    }
    // All at once, in one batch.
    let batch: Vec<_> = (ARENAS..2 * ARENAS).map(write).collect();
    let on_caller = SubmitOptions {
        copy_on_caller: true,
        ..SubmitOptions::default()
    };
    let started = tokio::time::Instant::now();
    let outcome = initiator.transfer(&batch, on_caller).await;
    timed(format!("a batch of {ARENAS} writes"), started.elapsed());
    outcome.unwrap();
    for (i, arena) in arenas.iter().enumerate() {
        assert_same(
            bytes(arena.as_ptr(), LEN),
            &bytes(local.as_ptr(), 2 * ARENAS * LEN)[i * LEN..(i + 1) * LEN],
            &format!("arena {i}"),
        );
    }
    assert_eq!(sent_through(&initiator, TransportKind::Tcp), 0);
    assert_eq!(
        sent_through(&initiator, TransportKind::Shm),
        2 * ARENAS as u64
    );
    initiator.close().await;
    target.close().await;
}
