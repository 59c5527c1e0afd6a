//! Masters as real processes (the `mooncake-master` binary), store clients in the test
//! process, and a load that records which puts were acknowledged. Values are self-describing:
//! every byte follows from the key, so a read can say whose bytes it got.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_common::{pattern, EngineConfig, ErrorKind};
use mooncake_store::client::{StoreClient, StoreConfig};
use mooncake_store::master::WriteConfig;
use tokio_util::sync::CancellationToken;

/// A number from the environment variable `name`, else `default` (benches' knobs).
pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (NaN for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A master process.
pub struct MasterProcess {
    child: Option<Child>,
    args: Vec<String>,
    pub rpc_port: u16,
    pub metrics_port: u16,
}

impl MasterProcess {
    /// Starts `mooncake-master` on fresh loopback ports with `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        let rpc_port = free_port();
        let metrics_port = free_port();
        let mut args: Vec<String> = vec![
            "--rpc-address".into(),
            "127.0.0.1".into(),
            "--rpc-port".into(),
            rpc_port.to_string(),
            "--metrics-port".into(),
            metrics_port.to_string(),
            "--client-ttl".into(),
            "10".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut master = Self {
            child: None,
            args,
            rpc_port,
            metrics_port,
        };
        master.restart();
        master
    }

    /// Starts it again with the same flags and ports.
    pub fn restart(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_mooncake-master"))
            .args(&self.args)
            .env(
                "MOONCAKE_LOG",
                std::env::var("MOONCAKE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mooncake-master");
        let mut child = child;
        if let Some(stderr) = child.stderr.take() {
            let port = self.rpc_port;
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    eprintln!("[master :{port}] {line}");
                }
            });
        }
        self.child = Some(child);
        // Its admin port opens last.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).is_err() {
            assert!(Instant::now() < deadline, "mooncake-master did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.rpc_port)
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for it to exit.
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// `/health` as JSON text, or `None` when it does not answer within a second.
    pub async fn health(&self) -> Option<String> {
        self.admin_page("/health").await
    }

    /// The value of counter `name` on `/metrics` (0 when absent).
    pub async fn counter(&self, name: &str) -> u64 {
        let page = self.admin_page("/metrics").await.unwrap_or_default();
        page.lines()
            .filter_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .next()
            .unwrap_or(0.0) as u64
    }

    /// An admin page, with its HTTP head.
    pub async fn admin_page(&self, path: &str) -> Option<String> {
        let address = format!("127.0.0.1:{}", self.metrics_port);
        let request = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(&address).await.ok()?;
            let head = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
            stream.write_all(head.as_bytes()).await.ok()?;
            let mut body = String::new();
            stream.read_to_string(&mut body).await.ok()?;
            Some(body)
        };
        tokio::time::timeout(Duration::from_secs(1), request)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for MasterProcess {
    fn drop(&mut self) {
        self.thaw();
        self.kill();
    }
}

/// A store client of `master_address` contributing `segment` bytes.
pub async fn store_client(master_address: &str, segment: u64) -> Arc<StoreClient> {
    let mut engine = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    engine.advertised_host = Some("127.0.0.1".into());
    let mut config = StoreConfig::new(engine);
    config.master_address = master_address.to_owned();
    config.global_segment_size = segment;
    config.local_buffer_size = 4 << 20;
    config.rpc_timeout = Duration::from_secs(5);
    StoreClient::connect(config).await.expect("store client")
}

/// The value of `key`: a different pattern per key, sized by the key too (1-9 KiB: a load
/// of minutes stays far below eviction).
pub fn value_of(key: &str) -> Vec<u8> {
    let seed = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let len = 1024 + (seed % 8192) as usize;
    pattern::bytes(seed, 0, len)
}

/// What a load saw: each key with whether its put was acknowledged, and when puts began and
/// succeeded.
#[derive(Default)]
pub struct Ledger {
    pub keys: BTreeMap<String, bool>,
    /// (began, acknowledged)
    pub successes: Vec<(Instant, Instant)>,
    pub failures: Vec<(Instant, ErrorKind)>,
}

impl Ledger {
    /// How long after `since` the first put that began after it was acknowledged, once
    /// `count` such puts were.
    pub fn resumed(&self, since: Instant, count: usize) -> Option<Duration> {
        let after: Vec<Instant> = self
            .successes
            .iter()
            .filter(|(began, _)| *began > since)
            .map(|(_, done)| *done)
            .collect();
        (after.len() >= count).then(|| after.iter().min().map_or(Duration::ZERO, |t| *t - since))
    }
}

/// Puts fresh keys `<prefix>/<n>` in batches of `batch` until `stop`, recording each outcome.
pub fn spawn_load(
    client: Arc<StoreClient>,
    prefix: &str,
    batch: usize,
    ledger: Arc<Mutex<Ledger>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        let mut n = 0usize;
        while !stop.is_cancelled() {
            let keys: Vec<String> = (n..n + batch).map(|i| format!("{prefix}/{i}")).collect();
            n += batch;
            let values: Vec<Vec<u8>> = keys.iter().map(|k| value_of(k)).collect();
            let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            let began = Instant::now();
            let results = client
                .batch_put(&keys, &refs, &WriteConfig::default())
                .await;
            let now = Instant::now();
            let failed = {
                let mut ledger = ledger.lock().unwrap();
                let mut failed = false;
                for (key, result) in keys.iter().zip(results) {
                    ledger.keys.insert(key.clone(), result.is_ok());
                    match result {
                        Ok(()) => ledger.successes.push((began, now)),
                        Err(e) => {
                            failed = true;
                            ledger.failures.push((now, e.kind()));
                        }
                    }
                }
                failed
            };
            if failed {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
}

/// Reads every key of the ledger back: every acknowledged one must be readable byte-exact
/// (waiting up to `settle` for owners to remount); an unacknowledged one may be absent or
/// whole, never anything else. Returns (acknowledged, read back, unacknowledged found whole).
pub async fn verify(
    client: &StoreClient,
    ledger: &Ledger,
    settle: Duration,
) -> (usize, usize, usize) {
    let deadline = Instant::now() + settle;
    let (mut acknowledged, mut read_back, mut whole) = (0, 0, 0);
    for (key, acked) in &ledger.keys {
        let expected = value_of(key);
        loop {
            match client.get(key).await {
                Ok(value) => {
                    assert!(
                        value.as_ref() == expected.as_slice(),
                        "'{key}' came back with other bytes ({} of {} bytes)",
                        value.as_ref().len(),
                        expected.len()
                    );
                    if *acked {
                        read_back += 1;
                    } else {
                        whole += 1;
                    }
                    break;
                }
                // An unacknowledged put may be gone, or still held as being written when its
                // writer gave up across the failover (until the master discards it).
                Err(e)
                    if !*acked
                        && matches!(
                            e.kind(),
                            ErrorKind::ObjectNotFound | ErrorKind::ReplicaIsNotReady
                        ) =>
                {
                    break
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("'{key}' (acknowledged: {acked}) unreadable: {e}"),
            }
        }
        if *acked {
            acknowledged += 1;
        }
    }
    (acknowledged, read_back, whole)
}
