//! Hostile peers against an engine's listeners: floods of stalled connections, and peers
//! without the cluster token (or with another one).
//!
//! Bounds are generous (a loaded two-core machine must pass), but each is far below what an
//! unbounded listener costs: there an honest peer waits tens of seconds, or forever.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bytes, fill, round_trip};
use mooncake_common::auth::{Challenge, ClusterToken};
use mooncake_common::config::Protocol;
use mooncake_common::service::opening::{self, Step};
use mooncake_common::EngineConfig;
use mooncake_metadata::handshake::{self, MessageType};
use mooncake_te::engine::SubmitOptions;
use mooncake_te::stats::TransportKind;
use mooncake_te::{ErrorKind, Opcode, TransferEngine, TransferRequest};
use mooncake_transport::tcp::wire::{Header, Op, Status, Version};
use std::os::linux::net::SocketAddrExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn engine(protocol: Protocol) -> Arc<TransferEngine> {
    let mut config = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    config.advertised_host = Some("127.0.0.1".into());
    config.protocol = protocol;
    TransferEngine::start(config).await.unwrap()
}

/// How long an honest peer may take while the listener is under attack;
/// `HOSTILE_BOUND_SECS` raises it, to measure a listener without bounds.
fn honest_bound() -> Duration {
    let secs = std::env::var("HOSTILE_BOUND_SECS").ok();
    Duration::from_secs(secs.and_then(|s| s.parse().ok()).unwrap_or(8))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_never_lock_out_an_honest_peer() {
    let target = engine(Protocol::Auto).await;
    let remote = target.allocate(1 << 20).unwrap();
    let addr = format!("127.0.0.1:{}", target.rpc_port());
    // Each announces a frame, sends none of it, and stays connected; more keep coming.
    let attack = Flood::start(&addr, 500, 1000u64.to_le_bytes().to_vec()).await;
    let initiator = engine(Protocol::Tcp).await;
    let local = initiator.allocate(1 << 20).unwrap();
    fill(local.as_ptr(), 1 << 20, 3);
    let started = Instant::now();
    let honest = async {
        let segment = initiator.open_segment(target.segment_name()).await.unwrap();
        let write = TransferRequest {
            op: Opcode::Write,
            segment: segment.id,
            local_addr: local.as_ptr() as usize,
            remote_addr: remote.as_ptr() as u64,
            len: 1 << 20,
        };
        initiator
            .transfer(&[write], SubmitOptions::default())
            .await
            .unwrap();
    };
    tokio::time::timeout(honest_bound(), honest)
        .await
        .expect("an honest peer got through while 500 handshakes stalled");
    eprintln!(
        "open + transfer under 500 stalled handshakes: {:?}",
        started.elapsed()
    );
    assert!(bytes(remote.as_ptr(), 1 << 20) == bytes(local.as_ptr(), 1 << 20));
    eprintln!("{} stalled handshakes opened", attack.stop().await.len());
    initiator.close().await;
    target.close().await;
}

/// Connections that each send `opening` and then nothing, from one address: `initial` of
/// them at once, then more, one every millisecond, until stopped.
struct Flood {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Vec<TcpStream>>,
}

impl Flood {
    async fn start(addr: &str, initial: usize, opening: Vec<u8>) -> Self {
        let open = |addr: String, opening: Vec<u8>| async move {
            let mut stream = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
            let _ = stream.write_all(&opening).await;
            Some(stream)
        };
        let mut held = Vec::new();
        for _ in 0..initial {
            held.extend(open(addr.to_owned(), opening.clone()).await);
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let (addr, until) = (addr.to_owned(), stop.clone());
        let task = tokio::spawn(async move {
            while !until.is_cancelled() && held.len() < 6000 {
                held.extend(open(addr.clone(), opening.clone()).await);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            held
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<TcpStream> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// A v2 WRITE header for `len` bytes at `addr`.
fn write_header(addr: u64, len: u64) -> [u8; 24] {
    Header {
        size: len,
        addr,
        op: Op::Write,
        version: Version::V2,
    }
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_data_sessions_never_lock_out_peers_or_pin_memory() {
    const GIB: usize = 1 << 30;
    let target = engine(Protocol::Auto).await;
    // Never touched whole: the pages stay unbacked.
    let remote = target.allocate(GIB).unwrap();
    let base = remote.as_ptr() as u64;
    let addr = format!("127.0.0.1:{}", target.data_port());
    // Each declares a 1 GiB write into the region and sends none of it; more keep coming.
    let attack = Flood::start(&addr, 1100, write_header(base, GIB as u64).to_vec()).await;
    let initiator = engine(Protocol::Tcp).await;
    let len = 4 << 20;
    let local = initiator.allocate(len).unwrap();
    fill(local.as_ptr(), len, 5);
    let started = Instant::now();
    let honest = async {
        let segment = initiator.open_segment(target.segment_name()).await.unwrap();
        let write = TransferRequest {
            op: Opcode::Write,
            segment: segment.id,
            local_addr: local.as_ptr() as usize,
            remote_addr: base + 4096,
            len,
        };
        initiator
            .transfer(&[write], SubmitOptions::default())
            .await
            .unwrap();
    };
    tokio::time::timeout(honest_bound(), honest)
        .await
        .expect("an honest transfer got through while 1,100 data sessions stalled");
    eprintln!(
        "open + transfer under 1,100 stalled data sessions: {:?}",
        started.elapsed()
    );
    assert!(bytes(local.as_ptr(), len) == &bytes(remote.as_ptr(), len + 4096)[4096..]);

    let mut stalled = attack.stop().await;
    eprintln!("{} stalled data sessions opened", stalled.len());
    // The stalled sessions hold the region; unregistering revokes them.
    let started = Instant::now();
    let unregistered = loop {
        match target.unregister(base as usize) {
            Ok(()) => break Ok(()),
            Err(e) if started.elapsed() > honest_bound() => break Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    unregistered.expect("unregister succeeds while stalled sessions declared writes into it");
    eprintln!("unregister under stalled writes: {:?}", started.elapsed());
    // Whatever the attackers send now lands nowhere.
    let before = bytes(remote.as_ptr(), 4096).to_vec();
    for stream in stalled.iter_mut().take(64) {
        let _ = stream.write_all(&[0xab; 4096]).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(bytes(remote.as_ptr(), 4096), &before[..]);
    initiator.close().await;
    target.close().await;
}

const SECRET: &str = "the-cluster-secret-of-this-test";
const OTHER_SECRET: &str = "the-secret-of-another-cluster";

async fn engine_with(protocol: Protocol, secret: Option<&str>) -> Arc<TransferEngine> {
    let mut config = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    config.advertised_host = Some("127.0.0.1".into());
    config.protocol = protocol;
    config.cluster_token = secret.map(|s| ClusterToken::new(s).unwrap());
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
async fn a_shared_token_carries_transfers_over_tcp_and_shared_memory() {
    let target = engine_with(Protocol::Auto, Some(SECRET)).await;
    let remote = target.allocate(2 << 20).unwrap();
    for (protocol, kind) in [
        (Protocol::Tcp, TransportKind::Tcp),
        (Protocol::Auto, TransportKind::Shm),
    ] {
        let initiator = engine_with(protocol, Some(SECRET)).await;
        let len = 2 << 20;
        let local = initiator.allocate(2 * len).unwrap();
        fill(local.as_ptr(), len, 11);
        let segment = initiator.open_segment(target.segment_name()).await.unwrap();
        for request in round_trip(segment.id, local.as_ptr(), remote.as_ptr() as u64, len) {
            initiator
                .transfer(&[request], SubmitOptions::default())
                .await
                .unwrap();
        }
        assert!(bytes(remote.as_ptr(), len) == bytes(local.as_ptr(), len));
        assert!(&bytes(local.as_ptr(), 2 * len)[len..] == bytes(local.as_ptr(), len));
        assert_eq!(sent_through(&initiator, kind), 2, "{protocol:?}");
        initiator
            .send_notify(target.segment_name(), "hello")
            .await
            .unwrap();
        initiator.close().await;
    }
    assert_eq!(target.take_notifies().len(), 2);
    target.close().await;
}

/// Everything `stream` sends before it closes, or `None` if it is still open after a while.
async fn until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
    match read {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

fn read_header(addr: u64, len: u64) -> [u8; 24] {
    Header {
        size: len,
        addr,
        op: Op::Read,
        version: Version::V2,
    }
    .encode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_token_get_nothing() {
    let target = engine_with(Protocol::Auto, Some(SECRET)).await;
    let remote = target.allocate(1 << 16).unwrap();
    fill(remote.as_ptr(), 1 << 16, 21);
    let base = remote.as_ptr() as u64;
    let data = format!("127.0.0.1:{}", target.data_port());

    // The data port: a read gets no status and no byte, a write lands nowhere.
    let mut reader = TcpStream::connect(&data).await.unwrap();
    reader.write_all(&read_header(base, 4096)).await.unwrap();
    assert_eq!(until_closed(&mut reader).await, Some(Vec::new()));
    let mut writer = TcpStream::connect(&data).await.unwrap();
    let _ = writer.write_all(&write_header(base, 4096)).await;
    let _ = writer.write_all(&[0xab; 4096]).await;
    assert_eq!(until_closed(&mut writer).await, Some(Vec::new()));
    let mut pattern = vec![0u8; 1 << 16];
    mooncake_common::pattern::fill(&mut pattern, 21, 0);
    assert!(
        bytes(remote.as_ptr(), 1 << 16) == &pattern[..],
        "memory untouched"
    );

    // The handshake port: a probe gets no answer.
    let rpc = format!("127.0.0.1:{}", target.rpc_port());
    let mut probe = TcpStream::connect(&rpc).await.unwrap();
    probe
        .write_all(&handshake::frame::encode(MessageType::Probe, b"{}"))
        .await
        .unwrap();
    assert_eq!(until_closed(&mut probe).await, Some(Vec::new()));

    // The shared-memory socket: no control table.
    let desc = target.local_descriptor();
    let socket = desc.extra["shm"]["socket"].as_str().unwrap().to_owned();
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&socket).unwrap();
    let mut shm = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
    shm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(&mut shm, &[0u8; 9]).unwrap();
    let mut reply = Vec::new();
    std::io::Read::read_to_end(&mut shm, &mut reply).unwrap();
    assert!(reply.is_empty(), "the table was handed out");

    // An engine without the token learns nothing.
    let stranger = engine_with(Protocol::Tcp, None).await;
    assert!(stranger.open_segment(target.segment_name()).await.is_err());
    stranger.close().await;
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_token_or_none_on_the_other_side_is_unauthenticated() {
    let target = engine_with(Protocol::Auto, Some(SECRET)).await;
    let plain = engine_with(Protocol::Auto, None).await;
    let other = engine_with(Protocol::Tcp, Some(OTHER_SECRET)).await;
    for server in [&target, &plain] {
        let error = other
            .open_segment(server.segment_name())
            .await
            .expect_err("opened a segment of another cluster");
        assert_eq!(error.kind(), ErrorKind::Unauthenticated, "{error}");
        assert!(error.message().contains("token"), "{error}");

        let mut stream = TcpStream::connect(format!("127.0.0.1:{}", server.data_port()))
            .await
            .unwrap();
        let token = ClusterToken::new(OTHER_SECRET).unwrap();
        let error = opening::open(&mut stream, &token).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unauthenticated, "{error}");
    }
    other.close().await;
    plain.close().await;
    target.close().await;
}

/// Performs the client's side of the opening by hand: returns the hello and answer frames.
async fn open_by_hand(stream: &mut TcpStream, token: &ClusterToken) -> (Vec<u8>, Vec<u8>) {
    let (nonce, session) = token.client_hello().unwrap();
    let hello = opening::encode(Step::Hello, &nonce);
    stream.write_all(&hello).await.unwrap();
    let mut frame = vec![0u8; Step::Challenge.frame_len()];
    stream.read_exact(&mut frame).await.unwrap();
    let body = opening::decode(&frame, Step::Challenge).unwrap();
    let challenge = Challenge::decode(body).unwrap();
    let answer = opening::encode(Step::Answer, &session.answer(&challenge).unwrap());
    stream.write_all(&answer).await.unwrap();
    (hello, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_opening_never_opens_again() {
    let target = engine_with(Protocol::Auto, Some(SECRET)).await;
    let remote = target.allocate(1 << 16).unwrap();
    fill(remote.as_ptr(), 1 << 16, 31);
    let base = remote.as_ptr() as u64;
    let data = format!("127.0.0.1:{}", target.data_port());
    let token = ClusterToken::new(SECRET).unwrap();

    // Opened: then it is Mooncake's protocol, unchanged.
    let mut honest = TcpStream::connect(&data).await.unwrap();
    let (hello, answer) = open_by_hand(&mut honest, &token).await;
    honest.write_all(&read_header(base, 64)).await.unwrap();
    let mut reply = [0u8; 8 + 64];
    honest.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        Status::decode(reply[..8].try_into().unwrap()),
        Some(Status::Ok)
    );
    assert!(reply[8..] == bytes(remote.as_ptr(), 64)[..]);

    // The same frames again, against a fresh challenge: closed, and nothing served.
    let mut replay = TcpStream::connect(&data).await.unwrap();
    replay.write_all(&hello).await.unwrap();
    let mut challenge = vec![0u8; Step::Challenge.frame_len()];
    replay.read_exact(&mut challenge).await.unwrap();
    replay.write_all(&answer).await.unwrap();
    let _ = replay.write_all(&read_header(base, 64)).await;
    assert_eq!(until_closed(&mut replay).await, Some(Vec::new()));
    target.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_data_port_speaks_plain_mooncake() {
    let target = engine_with(Protocol::Auto, None).await;
    let remote = target.allocate(1 << 16).unwrap();
    fill(remote.as_ptr(), 1 << 16, 41);
    let mut stream = TcpStream::connect(format!("127.0.0.1:{}", target.data_port()))
        .await
        .unwrap();
    stream
        .write_all(&read_header(remote.as_ptr() as u64, 64))
        .await
        .unwrap();
    let mut reply = [0u8; 8 + 64];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        Status::decode(reply[..8].try_into().unwrap()),
        Some(Status::Ok)
    );
    assert!(reply[8..] == bytes(remote.as_ptr(), 64)[..]);
    target.close().await;
}
