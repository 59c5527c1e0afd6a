//! TCP multi-rail over real interfaces: two veth pairs into a network namespace, where the
//! peer engine runs on a thread that joined it. Needs root (it runs as root in CI); where
//! namespaces cannot be made, the test is reported as ignored (see `build.rs`).

use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mooncake_common::config::Protocol;
use mooncake_common::EngineConfig;
use mooncake_te::engine::SubmitOptions;
use mooncake_te::{Opcode, TransferEngine, TransferRequest};
use mooncake_transport::rail::RailStats;
use mooncake_transport::Arena;

const LEN: usize = 128 << 20;

/// A namespace with two veth pairs: `<tag>a<i>` (10.213.i.1/24) here, `<tag>b<i>`
/// (10.213.i.2/24) inside. Dropping it deletes the namespace, which takes the pairs along.
struct Testbed {
    ns: String,
    tag: String,
}

impl Testbed {
    fn create() -> Result<Self, String> {
        let tag = format!("mr{}", std::process::id() % 100_000);
        let bed = Self {
            ns: format!("{tag}-ns"),
            tag,
        };
        ip(&["netns", "add", &bed.ns])?;
        for i in 0..2 {
            let (here, there) = (bed.here(i), bed.there(i));
            ip(&["link", "add", &here, "type", "veth", "peer", "name", &there])?;
            ip(&["link", "set", &there, "netns", &bed.ns])?;
            ip(&["addr", "add", &format!("10.213.{i}.1/24"), "dev", &here])?;
            ip(&["link", "set", &here, "up"])?;
            ip(&[
                "-n",
                &bed.ns,
                "addr",
                "add",
                &format!("10.213.{i}.2/24"),
                "dev",
                &there,
            ])?;
            ip(&["-n", &bed.ns, "link", "set", &there, "up"])?;
        }
        ip(&["-n", &bed.ns, "link", "set", "lo", "up"])?;
        Ok(bed)
    }

    fn here(&self, i: usize) -> String {
        format!("{}a{i}", self.tag)
    }

    fn there(&self, i: usize) -> String {
        format!("{}b{i}", self.tag)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The peer: an engine on a thread inside the namespace, with 2 rails and `LEN` bytes.
struct Peer {
    name: String,
    memory: Arc<Arena>,
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

fn start_peer(bed: &Testbed) -> Peer {
    let (ns, devices) = (bed.ns.clone(), vec![bed.there(0), bed.there(1)]);
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("namespace file");
        // SAFETY: setns on a namespace fd we own; it moves only this thread (and the threads
        // it starts) into the namespace.
        let joined =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut config = EngineConfig::from_env("10.213.0.2", "P2PHANDSHAKE");
            config.devices = Some(devices);
            config.shared_memory = false;
            let engine = TransferEngine::start(config).await.expect("peer engine");
            let memory = engine.allocate(LEN).expect("peer memory");
            ready_tx
                .send((engine.segment_name().to_owned(), memory))
                .expect("test waits");
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            engine.close().await;
        });
    });
    let (name, memory) = ready_rx.recv().expect("peer started");
    Peer {
        name,
        memory,
        stop,
        thread,
    }
}

fn rails(engine: &TransferEngine) -> Vec<RailStats> {
    engine
        .rail_stats()
        .into_iter()
        .flat_map(|(_, rails)| rails)
        .collect()
}

fn rail<'a>(stats: &'a [RailStats], local: &str) -> &'a RailStats {
    stats
        .iter()
        .find(|r| r.local == local)
        .unwrap_or_else(|| panic!("no rail from {local} in {stats:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(net_namespaces),
    ignore = "network namespaces and veth pairs cannot be made here"
)]
async fn transfer_survives_a_link_going_down() {
    let bed = Testbed::create().unwrap_or_else(|why| panic!("the test bed: {why}"));
    let peer = start_peer(&bed);
    let mut config = EngineConfig::from_env("10.213.0.1", "P2PHANDSHAKE");
    config.devices = Some(vec![bed.here(0), bed.here(1)]);
    config.shared_memory = false;
    config.protocol = Protocol::Tcp;
    let engine = TransferEngine::start(config).await.unwrap();
    let local = engine.allocate(LEN).unwrap();
    // SAFETY: the arena is LEN bytes and nothing else touches it yet.
    let source = unsafe { std::slice::from_raw_parts_mut(local.as_ptr(), LEN) };
    for (i, chunk) in source.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    let segment = engine.open_segment(&peer.name).await.unwrap();
    // Every write puts the same bytes in the same place, so the result is checkable whichever
    // rail carried which slice.
    let write = TransferRequest {
        op: Opcode::Write,
        segment: segment.id,
        local_addr: local.as_ptr() as usize,
        remote_addr: peer.memory.as_ptr() as u64,
        len: LEN,
    };

    // Both rails carry a first write.
    engine
        .transfer(&[write], SubmitOptions::default())
        .await
        .unwrap();
    let before = rails(&engine);
    let (first, second) = (bed.here(0), bed.here(1));
    assert!(
        rail(&before, &first).bytes > 0 && rail(&before, &second).bytes > 0,
        "{before:?}"
    );

    // Several writes in flight; the second link goes down under them.
    let requests = vec![write; 6];
    let batch = engine.submit(&requests, SubmitOptions::default()).unwrap();
    let carried = rail(&before, &second).bytes;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rail(&rails(&engine), &second).bytes < carried + (LEN as u64) / 2 {
        assert!(Instant::now() < deadline, "the second rail carried nothing");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    ip(&["link", "set", &second, "down"]).unwrap();
    let down_at = Instant::now();
    let rescued_at = loop {
        let now = rails(&engine);
        if rail(&now, &first).rescued > 0 {
            break Instant::now();
        }
        if engine
            .status(batch)
            .unwrap()
            .iter()
            .all(|t| t.status.is_terminal())
        {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    engine.wait(batch).await.unwrap();
    engine.free_batch(batch).unwrap();
    let after = rails(&engine);
    println!(
        "link down -> first rerouted slice done on the other rail: {:.1} ms ({} slices rerouted)",
        (rescued_at - down_at).as_secs_f64() * 1e3,
        rail(&after, &first).rescued
    );
    assert!(rail(&after, &first).rescued > 0, "{after:?}");
    assert!(!rail(&after, &second).usable, "{after:?}");
    // SAFETY: the peer's arena is LEN bytes; no transfer is in flight.
    let landed = unsafe { std::slice::from_raw_parts(peer.memory.as_ptr(), LEN) };
    assert!(
        landed == &source[..],
        "the peer's memory differs from what was written"
    );

    // The link comes back and the rail with it.
    ip(&["link", "set", &second, "up"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rail(&rails(&engine), &second).usable {
        assert!(Instant::now() < deadline, "the rail did not come back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let carried = rail(&rails(&engine), &second).bytes;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let result = engine.transfer(&[write], SubmitOptions::default()).await;
        if result.is_ok() && rail(&rails(&engine), &second).bytes > carried {
            break;
        }
        // Right after the link comes back, the kernel may still refuse routes through it.
        assert!(
            Instant::now() < deadline,
            "the rail carries nothing after recovery: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    engine.close().await;
    let _ = peer.stop.send(());
    peer.thread.join().unwrap();
}
