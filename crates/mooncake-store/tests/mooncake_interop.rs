//! Mooncake's own protocol, both ways: Mooncake's Python client (the pinned wheel) on this
//! master, this project's clients on Mooncake's `mooncake_master`, and both kinds of client in
//! one pool. Values are self-describing (`mooncake_py::pattern`), so a read says whose bytes
//! it got. Plus the wire's refusals, which need no wheel.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mooncake_store::coro_rpc::frame::{RequestHeader, ResponseHeader};
use mooncake_store::coro_rpc::messages::{
    BatchExistKey, BatchGetReplicaList, ExistKey, GetReplicaList, GracefulUnmountSegment, Method,
    MountSegment, ObjectMeta, PutEnd, PutRevoke, PutStart, ReplicateConfig, Segment, ServiceReady,
    UpsertEnd, UpsertStart, Uuid,
};
use mooncake_store::coro_rpc::struct_pack::{decode, encode};
use mooncake_store::master::WriteConfig;
use mooncake_testkit::mooncake_py::{pattern, MooncakeWheel, PyClient, RealMaster};
use mooncake_testkit::mooncake_scenarios::{self as scenario, SHORT_LEASE_MS};
use serde_json::json;
use support::{free_port, store_client, MasterProcess};

const MIB: u64 = 1 << 20;

/// This project's master with Mooncake's protocol on a port of its own.
fn our_master(extra: &[&str]) -> (MasterProcess, String) {
    let port = free_port();
    let mut args = vec!["--mooncake-rpc-port".to_owned(), port.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (MasterProcess::start(&args), format!("127.0.0.1:{port}"))
}

fn on_our_master(extra: &[&str], scenario: fn(&MooncakeWheel, &str)) {
    let wheel = MooncakeWheel::for_test();
    let (_master, mooncake) = our_master(extra);
    scenario(&wheel, &mooncake);
}

macro_rules! python_scenarios {
    ($($name:ident $(($($arg:expr),*))?;)*) => {$(
        #[test]
        #[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
        fn $name() {
            on_our_master(&[$($($arg),*)?], scenario::$name);
        }
    )*};
}

python_scenarios! {
    put_get_exist_and_remove;
    leases_expire_and_bulk_removal_counts("--default-kv-lease-ttl", &SHORT_LEASE_MS.to_string());
    batches_of_2_and_300_keys;
    zero_copy_batches;
    upserts_replace_values;
    a_value_crosses_processes;
    edge_cases;
}

fn py_client(wheel: &MooncakeWheel, master: &str, segment: u64) -> PyClient {
    scenario::client(wheel, master, segment)
}

/// Python and this project's clients in one pool, each reading what the other wrote, with
/// replicas in either's segment.
async fn mixed_pool(wheel: &MooncakeWheel, python_master: &str, our_address: &str) {
    let mut node = py_client(wheel, python_master, 16 * MIB);
    let ours = store_client(our_address, 0).await;

    // Python writes into its own segment; this client reads it over the Transfer Engine.
    let put = scenario::rc(&mut node, json!({"op": "put", "key": "py-1", "size": MIB}));
    assert_eq!(put, 0);
    let got = ours.get("py-1").await.unwrap();
    assert!(
        got.to_vec() == pattern("py-1", MIB as usize),
        "py-1 differs"
    );

    // This client, without a segment, writes into the Python node's; Python reads it.
    let keys: Vec<String> = (0..3).map(|i| format!("ts-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let value = pattern(key, 1000 + i * 70_000);
        ours.put(key, &value, &WriteConfig::default())
            .await
            .unwrap();
    }
    let got = scenario::call(&mut node, json!({"op": "get_batch", "keys": keys}));
    for (i, key) in keys.iter().enumerate() {
        scenario::assert_value(&got["values"][i], key, 0, 1000 + i * 70_000);
    }
    assert!(ours.exists("ts-0").await.unwrap());
    ours.remove("ts-0", true).await.unwrap();
    assert_eq!(
        scenario::rc(&mut node, json!({"op": "is_exist", "key": "ts-0"})),
        0
    );

    // A segment of this project's client takes replicas Python writes and reads.
    let holder = store_client(our_address, 16 * MIB).await;
    let mut requester = py_client(wheel, python_master, 0);
    scenario::close(&mut node);
    let put = scenario::rc(
        &mut requester,
        json!({"op": "put", "key": "py-2", "size": 300_000}),
    );
    assert_eq!(put, 0);
    let got = scenario::call(&mut requester, json!({"op": "get", "key": "py-2"}));
    scenario::assert_value(&got, "py-2", 0, 300_000);
    assert!(holder.get("py-2").await.unwrap().to_vec() == pattern("py-2", 300_000));
    scenario::close(&mut requester);
    ours.close().await;
    holder.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
async fn python_and_our_clients_share_our_masters_pool() {
    let wheel = MooncakeWheel::for_test();
    let (master, mooncake) = our_master(&[]);
    mixed_pool(&wheel, &mooncake, &master.address()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
async fn our_clients_join_a_pool_run_by_mooncakes_master() {
    let wheel = MooncakeWheel::for_test();
    let master = RealMaster::start(&wheel, &[]).unwrap();
    let address = format!("mooncake://{}", master.addr());

    let a = store_client(&address, 16 * MIB).await;
    let b = store_client(&address, 0).await;
    let keys: Vec<String> = (0..40).map(|i| format!("k-{i}")).collect();
    let values: Vec<Vec<u8>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| pattern(k, 100 + i * 9000))
        .collect();
    let slices: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
    for result in b.batch_put(&keys, &slices, &WriteConfig::default()).await {
        result.unwrap();
    }
    for (key, got) in keys.iter().zip(a.batch_get(&keys).await) {
        let i = keys.iter().position(|k| k == key).unwrap();
        assert!(got.unwrap().to_vec() == values[i], "{key} differs");
    }
    assert_eq!(
        b.batch_exists(&["k-1".to_owned(), "nope".to_owned()])
            .await
            .unwrap(),
        vec![true, false]
    );
    // Insert-if-absent, as Mooncake's own client: the first value stays.
    b.put("k-1", b"other", &WriteConfig::default())
        .await
        .unwrap();
    assert!(a.get("k-1").await.unwrap().to_vec() == values[1]);
    b.upsert("k-2", b"replaced", &WriteConfig::default())
        .await
        .unwrap();
    assert_eq!(a.get("k-2").await.unwrap().to_vec(), b"replaced");
    b.remove("k-3", true).await.unwrap();
    assert!(!a.exists("k-3").await.unwrap());
    let missing = a.get("k-3").await.unwrap_err();
    assert_eq!(missing.kind(), mooncake_common::ErrorKind::ObjectNotFound);

    // And a Python node in the same pool reads what ours wrote.
    mixed_pool(&wheel, &master.addr(), &address).await;
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
async fn python_clients_remount_after_a_durable_master_restarts() {
    let wheel = MooncakeWheel::for_test();
    let dir = std::env::temp_dir().join(format!("mooncake-interop-{}", free_port()));
    let dir_arg = dir.display().to_string();
    let (mut master, mooncake) = our_master(&["--data-dir", &dir_arg]);
    let mut node = py_client(&wheel, &mooncake, 16 * MIB);
    let keys: Vec<String> = (0..20).map(|i| format!("d-{i}")).collect();
    let sizes: Vec<u64> = (0..20).map(|i| 1000 + i * 3000).collect();
    let put = scenario::rc(
        &mut node,
        json!({"op": "put_batch", "keys": keys, "sizes": sizes}),
    );
    assert_eq!(put, 0);

    master.kill();
    master.restart();
    // The client's pings fail, it reconnects, is told to remount, and remounts.
    scenario::call(&mut node, json!({"op": "sleep", "seconds": 4}));
    let mut reader = py_client(&wheel, &mooncake, 0);
    let got = scenario::call(&mut reader, json!({"op": "get_batch", "keys": keys}));
    for (i, key) in keys.iter().enumerate() {
        scenario::assert_value(&got["values"][i], key, 0, sizes[i] as usize);
    }
    let put = scenario::rc(
        &mut reader,
        json!({"op": "put", "key": "after", "size": 5000}),
    );
    assert_eq!(put, 0);
    let got = scenario::call(&mut node, json!({"op": "get", "key": "after"}));
    scenario::assert_value(&got, "after", 0, 5000);
    scenario::close(&mut reader);
    scenario::close(&mut node);
    drop(master);
    let _ = std::fs::remove_dir_all(dir);
}

// ----- the wire's refusals (no wheel needed) --------------------------------------------------

struct Raw(TcpStream);

impl Raw {
    fn connect(address: &str) -> Self {
        let stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self(stream)
    }

    fn send(&mut self, seq: u32, function_id: u32, body: &[u8]) {
        self.0
            .write_all(&RequestHeader::frame(seq, function_id, body))
            .unwrap();
    }

    fn reply(&mut self) -> (ResponseHeader, Vec<u8>) {
        let mut header = [0u8; 16];
        self.0.read_exact(&mut header).unwrap();
        let header = ResponseHeader::parse(&header).unwrap();
        let mut body = vec![0u8; header.length as usize];
        self.0.read_exact(&mut body).unwrap();
        (header, body)
    }

    /// Whether the master closed the connection.
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.0.read(&mut byte), Ok(0) | Err(_))
    }
}

fn put_start_args(key: &str) -> <PutStart as Method>::Args {
    let config = ReplicateConfig {
        replica_num: 1,
        ..ReplicateConfig::default()
    };
    (
        Uuid {
            first: 1,
            second: 2,
        },
        key.to_owned(),
        100,
        config,
        "default".to_owned(),
    )
}

#[test]
fn another_release_is_refused_before_anything_runs() {
    let (_master, mooncake) = our_master(&[]);
    let mut raw = Raw::connect(&mooncake);
    // A PutStart whose type hash is not 0.3.13's (one bit flipped): refused, nothing written.
    let mut body = encode(&put_start_args("foreign"), true);
    body[1] ^= 0x10;
    raw.send(0, PutStart::ID, &body);
    let (header, message) = raw.reply();
    assert_eq!((header.seq, header.err_code), (0, 4));
    assert_eq!(decode::<String>(&message).unwrap(), "invalid rpc arg");
    // The same with a literal that does not match the hash.
    let mut body = encode(&put_start_args("foreign"), true);
    body[8] = 0x03;
    raw.send(1, PutStart::ID, &body);
    assert_eq!(raw.reply().0.err_code, 4);

    let exists = encode(&("foreign".to_owned(), "default".to_owned()), false);
    raw.send(2, ExistKey::ID, &exists);
    let (header, body) = raw.reply();
    assert_eq!((header.seq, header.err_code), (2, 0));
    assert_eq!(decode::<Result<bool, i32>>(&body).unwrap(), Ok(false));

    // An unknown function: coro_rpc's "not registered", and the connection goes on.
    raw.send(3, 0x1234_5678, &[]);
    let (header, message) = raw.reply();
    assert_eq!(header.err_code, 11);
    assert_eq!(
        decode::<String>(&message).unwrap(),
        "the rpc function not registered"
    );
    raw.send(4, ServiceReady::ID, &[]);
    let (header, body) = raw.reply();
    assert_eq!(header.err_code, 0);
    assert_eq!(
        decode::<Result<String, i32>>(&body).unwrap(),
        Ok("2.0.0".to_owned())
    );
}

#[test]
fn pipelined_calls_are_answered_by_seq() {
    let (_master, mooncake) = our_master(&[]);
    let mut raw = Raw::connect(&mooncake);
    let keys: Vec<String> = (0..50).map(|i| format!("p-{i}")).collect();
    for (seq, key) in keys.iter().enumerate() {
        let body = encode(&(key.clone(), "default".to_owned()), true);
        raw.send(seq as u32, GetReplicaList::ID, &body);
    }
    let mut seen = vec![false; keys.len()];
    for _ in &keys {
        let (header, body) = raw.reply();
        assert_eq!(header.err_code, 0);
        let reply: Result<mooncake_store::coro_rpc::messages::ReplicaList, i32> =
            decode(&body).unwrap();
        assert_eq!(reply.unwrap_err(), -704);
        assert!(!std::mem::replace(&mut seen[header.seq as usize], true));
    }
}

#[test]
fn malformed_frames_close_only_their_connection() {
    let (_master, mooncake) = our_master(&[]);
    let mut other = Raw::connect(&mooncake);
    // Not coro_rpc.
    let mut raw = Raw::connect(&mooncake);
    raw.0.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(raw.closed());
    // A header announcing a body beyond the cap.
    let mut raw = Raw::connect(&mooncake);
    let mut frame = RequestHeader::frame(0, ServiceReady::ID, &[]);
    frame[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    raw.0.write_all(&frame).unwrap();
    assert!(raw.closed());
    // A body whose lengths run past its end.
    let mut raw = Raw::connect(&mooncake);
    let mut body = encode(&("k".to_owned(), "default".to_owned()), false);
    body[4] = 0xff;
    raw.send(0, ExistKey::ID, &body);
    assert_eq!(raw.reply().0.err_code, 4);
    // Others are served throughout.
    other.send(0, ServiceReady::ID, &[]);
    assert_eq!(other.reply().0.err_code, 0);
}

#[test]
fn a_cluster_token_keeps_mooncakes_clients_out_unless_allowed() {
    let dir = std::env::temp_dir().join(format!("mooncake-token-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(
        &token,
        "a-cluster-token-of-enough-length-0123456789abcdef\n",
    )
    .unwrap();
    let binary = env!("CARGO_BIN_EXE_mooncake-master");
    let refused = std::process::Command::new(binary)
        .args([
            "--rpc-port",
            "0",
            "--metrics-port",
            "0",
            "--mooncake-rpc-port",
            "0",
        ])
        .arg("--cluster-token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("allow-mooncake-clients"), "{stderr}");

    let port = free_port();
    let token_arg = token.display().to_string();
    let _master = MasterProcess::start(&[
        "--mooncake-rpc-port",
        &port.to_string(),
        "--cluster-token-file",
        &token_arg,
        "--allow-mooncake-clients",
    ]);
    let mut raw = Raw::connect(&format!("127.0.0.1:{port}"));
    raw.send(0, ServiceReady::ID, &[]);
    assert_eq!(raw.reply().0.err_code, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_peer_that_never_reads_its_replies_holds_up_nothing() {
    let (mut master, mooncake) = our_master(&[]);
    let mut deaf = Raw::connect(&mooncake);
    deaf.0
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Pipelined calls until the master's replies fill every buffer between them.
    let body = encode(&("k".to_owned(), "default".to_owned()), true);
    let frame = RequestHeader::frame(0, GetReplicaList::ID, &body);
    let burst: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 4096)
        .collect();
    while deaf.0.write_all(&burst).is_ok() {}
    // Others are served meanwhile.
    let mut other = Raw::connect(&mooncake);
    other.send(0, ServiceReady::ID, &[]);
    assert_eq!(other.reply().0.err_code, 0);
    // And the master stops at once when asked.
    let asked = std::time::Instant::now();
    master.terminate();
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
}

fn call<M: Method>(raw: &mut Raw, seq: u32, args: &M::Args) -> M::Reply {
    use mooncake_store::coro_rpc::messages::Args;
    raw.send(seq, M::ID, &args.encode_args(true));
    let (header, body) = raw.reply();
    assert_eq!((header.seq, header.err_code), (seq, 0));
    decode(&body).unwrap()
}

fn segment(id: u64, base: u64) -> Segment {
    Segment {
        id: Uuid {
            first: 9,
            second: id,
        },
        name: format!("node-{id}"),
        base,
        size: 1 << 20,
        te_endpoint: format!("127.0.0.1:{}", 20_000 + id),
        protocol: "tcp".into(),
        host_id: String::new(),
    }
}

const A: Uuid = Uuid {
    first: 1,
    second: 1,
};
const B: Uuid = Uuid {
    first: 2,
    second: 2,
};

#[test]
fn writes_named_by_key_stay_each_clients_own() {
    let (_master, mooncake) = our_master(&[]);
    let mut raw = Raw::connect(&mooncake);
    assert_eq!(
        call::<MountSegment>(&mut raw, 0, &(segment(1, 1 << 30), A)),
        Ok(())
    );
    let start = |key: &str| {
        (
            A,
            key.to_owned(),
            100,
            ReplicateConfig {
                replica_num: 1,
                ..Default::default()
            },
            "default".to_owned(),
        )
    };

    // A second upsert of a key its own client is writing would let the first one's end commit
    // the second's unwritten replica: refused as busy.
    let first = call::<UpsertStart>(&mut raw, 1, &start("u")).unwrap();
    let (client_b, key) = (B, "u".to_owned());
    assert_eq!(call::<UpsertStart>(&mut raw, 2, &start("u")), Err(-714));
    // Another client's end or revoke of A's write: not its write.
    let meta = ObjectMeta {
        key: key.clone(),
        object_checksum: None,
    };
    assert_eq!(
        call::<PutEnd>(&mut raw, 3, &(client_b, meta.clone(), 4, "default".into())),
        Err(-601)
    );
    assert_eq!(
        call::<PutRevoke>(&mut raw, 4, &(client_b, key.clone(), 4, "default".into())),
        Err(-601)
    );
    assert_eq!(
        call::<UpsertEnd>(&mut raw, 5, &(A, meta.clone(), 4, "default".into())),
        Ok(())
    );
    let list = call::<GetReplicaList>(&mut raw, 6, &(key.clone(), "default".into())).unwrap();
    assert_eq!(list.replicas[0].placement, first[0].placement);
    // An end with no write in progress commits nothing.
    assert_eq!(
        call::<PutEnd>(&mut raw, 7, &(A, meta, 4, "default".into())),
        Err(-700)
    );
    // A put of a key its own client is writing finds it existing, as Mooncake's client expects.
    assert!(call::<PutStart>(&mut raw, 8, &start("p")).is_ok());
    assert_eq!(call::<PutStart>(&mut raw, 9, &start("p")), Err(-705));
}

#[test]
fn oversized_requests_are_refused_and_replies_stay_bounded() {
    let (_master, mooncake) = our_master(&[]);
    let mut raw = Raw::connect(&mooncake);
    // A protocol or host id fit for every replica list, or no mount.
    let mut bloated = segment(1, 1 << 30);
    bloated.protocol = "t".repeat(100_000);
    assert_eq!(call::<MountSegment>(&mut raw, 0, &(bloated, A)), Err(-600));
    let mut bloated = segment(2, 1 << 31);
    bloated.host_id = "h".repeat(1000);
    assert_eq!(call::<MountSegment>(&mut raw, 1, &(bloated, A)), Err(-600));
    // Batches beyond 10,000 keys.
    let keys: Vec<String> = (0..10_001).map(|i| i.to_string()).collect();
    let answers = call::<BatchGetReplicaList>(&mut raw, 2, &(keys.clone(), "default".into()));
    assert_eq!(answers.len(), keys.len());
    assert!(answers.iter().all(|a| *a == Err(-600)));
    let answers = call::<BatchExistKey>(&mut raw, 3, &(keys, "default".into()));
    assert!(answers.iter().all(|a| *a == Err(-600)));
    // A grace period of centuries.
    assert_eq!(
        call::<MountSegment>(&mut raw, 4, &(segment(3, 1 << 32), A)),
        Ok(())
    );
    let id = segment(3, 0).id;
    assert_eq!(
        call::<GracefulUnmountSegment>(&mut raw, 5, &(id, A, u64::MAX)),
        Err(-600)
    );
    // A body beyond the cap closes the connection.
    let mut raw = Raw::connect(&mooncake);
    let huge = encode(&("k".repeat(5 << 20), "default".to_owned()), false);
    // (The master may close before the whole body is written.)
    let _ = raw
        .0
        .write_all(&RequestHeader::frame(0, ExistKey::ID, &huge));
    assert!(raw.closed());
}
