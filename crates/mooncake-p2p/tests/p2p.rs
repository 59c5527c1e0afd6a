//! Nodes of the P2P store in one process, over TCP, with the embedded HTTP metadata server
//! holding the catalogue. Payload bytes are unique per position: each 8-byte word holds the
//! payload's seed and its own offset.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod support;

use mooncake_common::ErrorKind;
use mooncake_metadata::http::MetadataServer;
use mooncake_p2p::catalogue::{Catalogue, Payload};
use mooncake_p2p::liveness::live_key;
use mooncake_p2p::{LocalBuffer, P2PStore, RegisterOptions};
use support::*;

const SHARD: u64 = 64 << 10;

async fn node(metadata: &str, name: &str) -> Arc<P2PStore> {
    node_with(metadata, name, Duration::from_millis(600)).await
}

async fn entry(server: &MetadataServer, name: &str) -> Option<Payload> {
    let store: Arc<dyn mooncake_metadata::MetadataStore> = server.store().clone();
    Catalogue::new(store, None)
        .get(name)
        .await
        .unwrap()
        .map(|(p, _)| p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pullers_read_from_each_other_and_the_catalogue_follows() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let sizes = [300 << 10, (200 << 10) + 7, 5];
    let seed = node(&url, "seed").await;
    let source = payload(1, &sizes);
    let names = ["a.bin", "shards/b.bin", "c"].map(String::from).to_vec();
    let options = RegisterOptions {
        buffer_names: Some(names.clone()),
        ..sharded(SHARD)
    };
    seed.register("ckpt/step-1", local(&source), options.clone())
        .await
        .unwrap();
    let listed = seed.list("ckpt/").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].buffer_names.as_ref(), Some(&names));
    assert_eq!(listed[0].size_list, sizes.map(|s| s as u64));
    assert_eq!(listed[0].total_size, sizes.iter().sum::<usize>() as u64);
    assert!(seed.list("other/").await.unwrap().is_empty());

    let first = node(&url, "first").await;
    let into = empty(&sizes);
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let report = first
        .get_replica(
            "ckpt/step-1",
            local(&into),
            Some(Arc::new(move |p| {
                assert!(p.bytes_done <= p.bytes_total);
                counter.store(p.shards_done, Ordering::Relaxed);
            })),
        )
        .await
        .unwrap();
    assert!(same(&source, &into));
    assert_eq!(seen.load(Ordering::Relaxed), 10, "5 + 4 + 1 shards");
    assert_eq!(report.sources.len(), 1);
    assert_eq!(report.sources[0].segment, "seed");

    let second = node(&url, "second").await;
    let again = empty(&sizes);
    let report = second
        .get_replica("ckpt/step-1", local(&again), None)
        .await
        .unwrap();
    assert!(same(&source, &again));
    let from_first = report
        .sources
        .iter()
        .find(|s| s.segment == "first")
        .map_or(0, |s| s.shards);
    assert!(
        (2..=8).contains(&from_first),
        "load is spread over both sources: {report:?}"
    );

    let entry_now = entry(&server, "ckpt/step-1").await.unwrap();
    for shard in &entry_now.shards {
        let holders: Vec<&str> = shard.locations().map(|l| l.segment_name.as_str()).collect();
        assert_eq!(holders, ["seed", "first", "second"]);
        assert!(shard.checksum.is_some());
    }

    first.delete_replica("ckpt/step-1").await.unwrap();
    seed.unregister("ckpt/step-1").await.unwrap();
    let left = entry(&server, "ckpt/step-1").await.unwrap();
    assert!(left.shards.iter().all(|s| s.gold.is_empty()
        && s.replica_list.len() == 1
        && s.replica_list[0].segment_name == "second"));
    second.close().await;
    assert!(
        entry(&server, "ckpt/step-1").await.is_none(),
        "the entry goes with the last node serving it"
    );
    seed.close().await;
    first.close().await;
    assert_eq!(server.store().get_now(&live_key("seed")), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_codes() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let a = node(&url, "a").await;
    let b = node(&url, "b").await;
    let options = sharded(SHARD);
    let data = payload(2, &[100 << 10, 10]);
    a.register("p", local(&data), options.clone())
        .await
        .unwrap();

    let code = |r: mooncake_common::Result<()>| r.unwrap_err().kind();
    assert_eq!(
        code(a.register("p", local(&data), options.clone()).await),
        ErrorKind::PayloadOpened
    );
    let other = payload(3, &[10]);
    assert_eq!(
        code(b.register("p", local(&other), options.clone()).await),
        ErrorKind::PayloadOpened,
        "the catalogue already has it"
    );
    // The same buffers under another name share the registration; a partial overlap does not.
    a.register("p-again", local(&data), options.clone())
        .await
        .unwrap();
    let whole = &data[0];
    // SAFETY: the range lies inside the arena, which the owner keeps mapped.
    let inner =
        unsafe { LocalBuffer::external(whole.as_ptr() as usize + 8, 16, Box::new(whole.clone())) };
    assert_eq!(
        code(a.register("q", vec![inner], options.clone()).await),
        ErrorKind::AddressOverlapped
    );
    let twice = vec![
        LocalBuffer::arena(other[0].clone()),
        LocalBuffer::arena(other[0].clone()),
    ];
    assert_eq!(
        code(b.register("r", twice, options.clone()).await),
        ErrorKind::AddressOverlapped
    );
    let zero = sharded(0);
    assert_eq!(
        code(b.register("r", local(&other), zero).await),
        ErrorKind::InvalidArgument
    );

    let pulled = |r: mooncake_common::Result<mooncake_p2p::PullReport>| r.unwrap_err().kind();
    assert_eq!(
        pulled(b.get_replica("nothing", local(&empty(&[10])), None).await),
        ErrorKind::PayloadNotFound
    );
    assert_eq!(
        pulled(
            b.get_replica("p", local(&empty(&[10, 100 << 10])), None)
                .await
        ),
        ErrorKind::InvalidArgument,
        "buffers in another order"
    );
    assert_eq!(
        pulled(b.get_replica("p", local(&empty(&[100 << 10])), None).await),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        pulled(
            a.get_replica("p", local(&empty(&[100 << 10, 10])), None)
                .await
        ),
        ErrorKind::PayloadOpened,
        "a node holds a name once"
    );
    assert_eq!(code(b.unregister("p").await), ErrorKind::PayloadNotOpened);
    assert_eq!(code(a.forget("p", None).await), ErrorKind::PayloadOpened);
    assert_eq!(
        code(b.forget("nothing", None).await),
        ErrorKind::PayloadNotFound
    );
    b.forget("p", Some("elsewhere")).await.unwrap();
    assert_eq!(b.list("p").await.unwrap().len(), 2, "p and p-again");
    assert_eq!(
        code(a.delete_replica("p").await),
        ErrorKind::PayloadNotOpened
    );
    assert_eq!(
        code(b.delete_replica("p").await),
        ErrorKind::PayloadNotOpened
    );

    // A pull never writes memory another payload serves.
    let alike = payload(7, &[100 << 10, 10]);
    b.register("alike", local(&alike), sharded(SHARD))
        .await
        .unwrap();
    assert_eq!(
        a.get_replica("alike", local(&data), None)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::AddressOverlapped
    );
    // A failed call leaves nothing behind: the same buffers register fine afterwards.
    b.register("r", local(&other), options.clone())
        .await
        .unwrap();
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_copies_are_caught_fetched_elsewhere_and_dropped() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let sizes = [16 * SHARD as usize];
    let seed = node(&url, "seed").await;
    let source = payload(4, &sizes);
    let options = sharded(SHARD);
    seed.register("c", local(&source), options.clone())
        .await
        .unwrap();
    let first = node(&url, "first").await;
    let bad = empty(&sizes);
    first.get_replica("c", local(&bad), None).await.unwrap();
    write(&bad[0], |bytes| {
        for shard in 0..16 {
            bytes[shard * SHARD as usize + 100] ^= 0xff;
        }
    });
    let second = node(&url, "second").await;
    let good = empty(&sizes);
    let report = second.get_replica("c", local(&good), None).await.unwrap();
    assert!(same(&source, &good), "no altered byte is kept");
    let corrupt: usize = report.sources.iter().map(|s| s.corrupt).sum();
    assert!(
        corrupt > 0,
        "some shards were first read from the altered copy: {report:?}"
    );
    let after = entry(&server, "c").await.unwrap();
    for shard in &after.shards {
        let holders: Vec<&str> = shard.locations().map(|l| l.segment_name.as_str()).collect();
        assert!(!holders.contains(&"first") || holders.len() == 3);
        assert!(holders.contains(&"second"));
    }
    // The altered node is alive and puts back copies others dropped, but only those whose
    // bytes still match: the altered ones stay out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = entry(&server, "c").await.unwrap();
    assert_eq!(later, after);
    assert!(after
        .shards
        .iter()
        .any(|s| !s.locations().any(|l| l.segment_name == "first")));
    for node in [seed, first, second] {
        node.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_whose_only_source_died_resumes_from_what_it_holds() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let sizes = [12 * SHARD as usize + 3];
    let source = payload(5, &sizes);
    let options = sharded(SHARD);
    let seed = node(&url, "seed").await;
    seed.register("r", local(&source), options.clone())
        .await
        .unwrap();
    let puller = node(&url, "puller").await;
    let into = empty(&sizes);
    let dying = seed.clone();
    let killed = Arc::new(std::sync::Once::new());
    let error = puller
        .get_replica(
            "r",
            local(&into),
            Some(Arc::new(move |p| {
                if p.shards_done >= 4 {
                    let dying = dying.clone();
                    // The pull waits for its progress callback, so the seed is gone before
                    // it asks for another shard.
                    killed.call_once(|| {
                        tokio::task::block_in_place(|| {
                            tokio::runtime::Handle::current().block_on(dying.engine().close())
                        })
                    });
                }
            })),
        )
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::TooManyRetries, "{error}");

    let again = node(&url, "seed-2").await;
    let forced = RegisterOptions {
        force: true,
        ..sharded(SHARD)
    };
    again.register("r", local(&source), forced).await.unwrap();
    let report = puller.get_replica("r", local(&into), None).await.unwrap();
    assert!(same(&source, &into));
    // At least the four shards held when the seed died (the 3-byte one may be among them).
    assert!(report.resumed_bytes >= 3 * SHARD + 3, "{report:?}");
    assert_eq!(report.bytes + report.resumed_bytes, sizes[0] as u64);
    for node in [puller, again] {
        node.close().await;
    }
    seed.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_puts_back_copies_others_dropped_while_it_lives() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let seed = node(&url, "seed").await;
    let data = payload(6, &[3 * SHARD as usize]);
    seed.register("back", local(&data), sharded(SHARD))
        .await
        .unwrap();
    let puller = node(&url, "puller").await;
    let into = empty(&[3 * SHARD as usize]);
    puller
        .get_replica("back", local(&into), None)
        .await
        .unwrap();

    // Another node takes the seed for dead and drops its copies; the seed, alive, restores them
    // within a liveness period.
    let other = node(&url, "other").await;
    other.forget("back", Some("seed")).await.unwrap();
    let holders = |p: &Payload| -> Vec<Vec<String>> {
        p.shards
            .iter()
            .map(|s| s.locations().map(|l| l.segment_name.clone()).collect())
            .collect()
    };
    assert_eq!(
        holders(&entry(&server, "back").await.unwrap()),
        vec![vec!["puller".to_owned()]; 3]
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = holders(&entry(&server, "back").await.unwrap());
        if now == vec![vec!["seed".to_owned(), "puller".to_owned()]; 3] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not restored: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A whole entry deleted under a live node comes back too.
    server.store().delete_now(&Catalogue::key("back"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while entry(&server, "back").await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "entry not restored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Withdrawn copies stay withdrawn.
    seed.unregister("back").await.unwrap();
    puller.delete_replica("back").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(entry(&server, "back").await.is_none());
    for node in [seed, puller, other] {
        node.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_in_progress_cannot_be_withdrawn_and_stale_self_copies_are_ignored() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let seed = node(&url, "seed").await;
    // Hashing 256 MiB takes long enough for an unregister to arrive meanwhile.
    let big = payload(8, &[256 << 20]);
    let registering = {
        let (seed, big) = (seed.clone(), big.clone());
        tokio::spawn(async move { seed.register("big", local(&big), sharded(16 << 20)).await })
    };
    tokio::time::sleep(Duration::from_millis(2)).await;
    if let Err(e) = seed.unregister("big").await {
        assert_eq!(e.kind(), ErrorKind::PayloadNotOpened);
    }
    registering.await.unwrap().unwrap();
    seed.unregister("big").await.unwrap();

    // An entry that names the puller itself (left by an earlier run under the same name) is
    // never read from: the bytes come from the seed.
    let sizes = [4 * SHARD as usize];
    let data = payload(9, &sizes);
    seed.register("selfy", local(&data), sharded(SHARD))
        .await
        .unwrap();
    let puller = node(&url, "puller").await;
    let into = empty(&sizes);
    let mut listed = entry(&server, "selfy").await.unwrap();
    for (i, shard) in listed.shards.iter_mut().enumerate() {
        shard.replica_list.push(mooncake_p2p::Location {
            segment_name: "puller".into(),
            offset: into[0].as_ptr() as u64 + i as u64 * SHARD,
        });
    }
    server.store().put_now(
        &Catalogue::key("selfy"),
        serde_json::to_string(&listed).unwrap(),
    );
    let report = puller
        .get_replica("selfy", local(&into), None)
        .await
        .unwrap();
    assert!(same(&data, &into));
    assert_eq!(report.sources.len(), 1);
    assert_eq!(report.sources[0].segment, "seed");
    let after = entry(&server, "selfy").await.unwrap();
    assert!(after.shards.iter().all(|s| s.replica_list.len() == 1));
    seed.close().await;
    puller.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_as_mooncakes_go_nodes_write_it_is_pulled_and_stays_theirs() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let seed = node(&url, "seed").await;
    let sizes = [3 * SHARD as usize + 5];
    let data = payload(10, &sizes);
    seed.register("go", local(&data), sharded(SHARD))
        .await
        .unwrap();
    // What a Go node writes after rewriting our entry: its own fields only, empty lists null.
    let ours = entry(&server, "go").await.unwrap();
    let mut go: serde_json::Value = serde_json::to_value(&ours).unwrap();
    go.as_object_mut().unwrap().remove("buffer_names");
    for shard in go["shards"].as_array_mut().unwrap() {
        let shard = shard.as_object_mut().unwrap();
        shard.remove("checksum");
        shard.insert("replica_list".into(), serde_json::Value::Null);
    }
    server
        .store()
        .put_now(&Catalogue::key("go"), go.to_string());

    let puller = node(&url, "puller").await;
    let into = empty(&sizes);
    puller.get_replica("go", local(&into), None).await.unwrap();
    assert!(same(&data, &into));
    let text = server.store().get_now(&Catalogue::key("go")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    for shard in value["shards"].as_array().unwrap() {
        assert!(shard.get("checksum").is_none(), "no checksum is made up");
        assert_eq!(shard["replica_list"][0]["segment_name"], "puller");
        assert!(shard["replica_list"][0]["offset"].is_u64());
    }
    seed.close().await;
    puller.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_whose_future_is_dropped_settles_before_its_buffers_are_used_again() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let seed = node(&url, "seed").await;
    let sizes = [64 << 20];
    let data = payload(11, &sizes);
    seed.register("dropped", local(&data), sharded(1 << 20))
        .await
        .unwrap();
    let puller = node(&url, "puller").await;
    let into = empty(&sizes);
    let cut = tokio::time::timeout(
        Duration::from_millis(5),
        puller.get_replica("dropped", local(&into), None),
    )
    .await;
    assert!(cut.is_err(), "the pull was cut short");
    // Until its reads settled, the name stays held: a retry is refused, never overlapped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let report = loop {
        match puller.get_replica("dropped", local(&into), None).await {
            Ok(report) => break report,
            Err(e) => assert_eq!(e.kind(), ErrorKind::PayloadOpened, "{e}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(same(&data, &into));
    assert_eq!(report.bytes + report.resumed_bytes, 64 << 20);
    seed.close().await;
    puller.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_token_entries_are_signed_and_a_rewritten_one_is_refused() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let token =
        mooncake_common::auth::ClusterToken::new("p2p-test-cluster-token-0123456789").unwrap();
    let liveness = Duration::from_millis(600);
    let seed = node_in(&url, "seed", liveness, Some(token.clone())).await;
    let sizes = [2 * SHARD as usize + 1];
    let data = payload(12, &sizes);
    seed.register("signed", local(&data), sharded(SHARD))
        .await
        .unwrap();
    let puller = node_in(&url, "puller", liveness, Some(token.clone())).await;
    let into = empty(&sizes);
    puller
        .get_replica("signed", local(&into), None)
        .await
        .unwrap();
    assert!(same(&data, &into));
    let listed = entry(&server, "signed").await.unwrap();
    assert!(listed.signature.is_some());

    // Someone who can write the metadata store but holds no token points a shard elsewhere:
    // members refuse the entry.
    let mut forged = listed.clone();
    forged.shards[0].gold[0].offset += 8;
    server.store().put_now(
        &Catalogue::key("signed"),
        serde_json::to_string(&forged).unwrap(),
    );
    let other = node_in(&url, "other", liveness, Some(token)).await;
    let error = other
        .get_replica("signed", local(&empty(&sizes)), None)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated, "{error}");
    assert!(other.list("signed").await.unwrap().is_empty());
    for node in [seed, puller, other] {
        node.close().await;
    }
}
