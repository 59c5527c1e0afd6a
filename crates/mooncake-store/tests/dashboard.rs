//! The master's admin port from outside: a master in this process, segments whose names need
//! escaping (a quote, a backslash, markup, non-ASCII) and traffic over its gRPC port; then
//! `promtool check metrics` over a real scrape, and the dashboard rendered by headless
//! Chromium, its DOM checked and a screenshot taken.
//!
//! Most clients here speak the master's protocol without moving bytes (the master never sees
//! bytes), so the segments can have any name, and their pings report made-up rails in every
//! state. The Chromium test adds real store clients that move bytes to each other over TCP, and
//! finds the rails their engines report. `UPDATE_SCREENSHOTS=1` makes it write its screenshot
//! to `docs/dashboard.png`.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mooncake_common::config::Protocol;
use mooncake_common::EngineConfig;
use mooncake_store::client::{StoreClient, StoreConfig};
use mooncake_store::master::{
    Durability, MasterConfig, MasterServer, MasterServerConfig, WriteConfig, MAX_RAIL_LABEL_LEN,
    MAX_REPORTED_RAILS,
};
use mooncake_store::proto;
use mooncake_store::proto::master_client::MasterClient as RawClient;

/// Segment names, and their sizes in MiB.
const SEGMENTS: [(&str, u64); 4] = [
    ("node \"α\"", 96),
    ("rack\\b-07", 128),
    ("nœud-3 ✓", 64),
    ("edge <b>4</b>", 160),
];
/// How long Chromium may take for one page before it is killed.
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);
/// Chromium's window, and so the screenshot: tall enough for every panel.
const WINDOW: (u32, u32) = (1280, 1140);
/// How long the real clients' rails may take to reach the dashboard (they ride on pings,
/// every second).
const RAILS_DEADLINE: Duration = Duration::from_secs(60);

/// A made-up rail of a raw client's report: (client, peer, local, remote, state, MiB, failures).
type MadeUpRail = (
    u64,
    &'static str,
    &'static str,
    &'static str,
    proto::RailState,
    u64,
    u64,
);

/// What the raw clients' pings report: every state, and labels that need escaping.
const MADE_UP_RAILS: [MadeUpRail; 5] = [
    (
        1,
        "rack\\b-07",
        "eth0",
        "eth0",
        proto::RailState::Usable,
        3 << 10,
        0,
    ),
    (
        1,
        "rack\\b-07",
        "eth1",
        "eth1",
        proto::RailState::Paused,
        1 << 10,
        7,
    ),
    (
        1,
        "edge <b>4</b>",
        "eth0",
        "10.0.4.2:15001",
        proto::RailState::Usable,
        900,
        0,
    ),
    (
        4,
        "node \"α\"",
        "mlx5_0",
        "mlx5_1",
        proto::RailState::Failed,
        12,
        3,
    ),
    (
        4,
        "node \"α\"",
        "mlx5_1",
        "mlx5_1",
        proto::RailState::Usable,
        2 << 10,
        1,
    ),
];

struct Cluster {
    master: MasterServer,
    rpc: RawClient<tonic::transport::Channel>,
    admin: SocketAddr,
}

fn uuid(n: u64) -> Option<proto::Uuid> {
    Some(proto::Uuid { high: 0, low: n })
}

impl Cluster {
    /// A master with one client per segment of [`SEGMENTS`], each mounted.
    async fn start(durability: Durability) -> Self {
        let master = MasterServer::start(MasterServerConfig {
            host: "127.0.0.1".into(),
            rpc_port: 0,
            metrics_port: Some(0),
            durability,
            master: MasterConfig {
                // These clients never ping.
                client_ttl: Duration::from_secs(3600),
                ..MasterConfig::default()
            },
            ..MasterServerConfig::default()
        })
        .await
        .expect("master");
        let admin = master.metrics_addr().expect("admin port");
        let mut rpc = RawClient::connect(format!("http://{}", master.rpc_addr()))
            .await
            .expect("connect to the master");
        for (i, (name, mib)) in SEGMENTS.iter().enumerate() {
            let n = i as u64 + 1;
            let outcome = rpc
                .mount_segment(proto::MountSegmentRequest {
                    client_id: uuid(n),
                    segment: Some(proto::Segment {
                        id: uuid(100 + n),
                        name: (*name).to_owned(),
                        base: n << 40,
                        size: mib << 20,
                        te_endpoint: format!("127.0.0.1:{}", 20000 + n),
                        protocol: "tcp".into(),
                        host_id: format!("host-{n}"),
                    }),
                })
                .await
                .expect("mount")
                .into_inner();
            assert_eq!(outcome.code, 0, "mount {name}: {outcome:?}");
        }
        Self { master, rpc, admin }
    }

    /// One wave of traffic: `puts` objects written by the clients in turn, each read twice,
    /// and a few reads of keys that do not exist.
    async fn wave(&mut self, wave: usize, puts: usize) {
        let mut written = Vec::new();
        for i in 0..puts {
            let key = format!("wave-{wave}/object-{i}");
            let client = uuid((i % SEGMENTS.len()) as u64 + 1);
            let size = (256 << 10) * (1 + (i as u64 * 7 + wave as u64) % 8);
            let started = self
                .rpc
                .put_start(proto::PutStartRequest {
                    client_id: client,
                    key: key.clone(),
                    size,
                    config: Some(proto::ReplicateConfig {
                        replica_num: 1,
                        ..Default::default()
                    }),
                })
                .await
                .expect("put start")
                .into_inner();
            if started.outcome.as_ref().is_some_and(|o| o.code != 0) {
                continue;
            }
            self.rpc
                .put_end(proto::KeyRequest {
                    client_id: client,
                    key: key.clone(),
                    write_id: started.write_id,
                })
                .await
                .expect("put end");
            written.push(key);
        }
        let mut keys = written.clone();
        keys.extend(written);
        keys.extend((0..3).map(|i| format!("wave-{wave}/missing-{i}")));
        self.rpc
            .batch_get_replica_list(proto::BatchGetReplicaListRequest { keys })
            .await
            .expect("reads");
    }

    async fn page(&self, path: &str) -> (String, String) {
        http_get(self.admin, path).await
    }

    /// The raw clients ping once, reporting [`MADE_UP_RAILS`].
    async fn report_made_up_rails(&mut self) {
        for n in 1..=SEGMENTS.len() as u64 {
            let rails = MADE_UP_RAILS
                .iter()
                .filter(|rail| rail.0 == n)
                .map(
                    |&(_, peer, local, remote, state, mib, failures)| proto::RailReport {
                        peer: peer.to_owned(),
                        local: local.to_owned(),
                        remote: remote.to_owned(),
                        state: state as i32,
                        bytes: mib << 20,
                        failures,
                    },
                )
                .collect();
            let reply = self
                .rpc
                .ping(proto::PingRequest {
                    client_id: uuid(n),
                    rails,
                })
                .await
                .expect("ping")
                .into_inner();
            assert_eq!(reply.client_status, proto::ClientStatus::Ok as i32);
        }
    }

    /// The dashboard's data, parsed.
    async fn data(&self) -> serde_json::Value {
        let (_, body) = self.page("/dashboard/data").await;
        serde_json::from_str(&body).expect("dashboard data")
    }

    /// The dashboard's data once `shows` holds of it (it reads the master's state at most
    /// once a second), or the last data after ten seconds.
    async fn data_showing(&self, shows: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let data = self.data().await;
            if shows(&data) || Instant::now() >= deadline {
                return data;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A real store client of `master` whose engine moves bytes over TCP only (same-host shared
/// memory has no rails).
async fn tcp_store_client(master: SocketAddr) -> Arc<StoreClient> {
    let mut engine = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    engine.advertised_host = Some("127.0.0.1".into());
    engine.protocol = Protocol::Tcp;
    engine.shared_memory = false;
    let mut config = StoreConfig::new(engine);
    config.master_address = master.to_string();
    config.global_segment_size = 32 << 20;
    config.local_buffer_size = 4 << 20;
    config.rpc_timeout = Duration::from_secs(10);
    StoreClient::connect(config).await.expect("store client")
}

/// Each client writes values into the other's segment and reads them back: bytes on the
/// rails both ways.
async fn move_bytes_between(a: &StoreClient, b: &StoreClient) {
    for (writer, target) in [(a, b), (b, a)] {
        let config = WriteConfig {
            preferred_segments: vec![target.engine().segment_name().to_owned()],
            ..WriteConfig::default()
        };
        for i in 0..6u8 {
            let key = format!("rails/{}/{i}", writer.engine().segment_name());
            let value = vec![i; (256 << 10) * (usize::from(i) + 1)];
            writer.put(&key, &value, &config).await.expect("put");
            let back = writer.get(&key).await.expect("get");
            assert!(back == value, "{key} came back different");
        }
    }
}

/// The dashboard's rails of the node named `node`.
fn rails_of<'a>(data: &'a serde_json::Value, node: &str) -> Vec<&'a serde_json::Value> {
    data["rails"]
        .as_array()
        .expect("rails")
        .iter()
        .filter(|n| n["node"] == node)
        .flat_map(|n| n["rails"].as_array().expect("a node's rails"))
        .collect()
}

/// Whether the dashboard shows a usable rail from `from` to `to` that carried bytes.
fn carried(data: &serde_json::Value, from: &str, to: &str) -> bool {
    rails_of(data, from).iter().any(|rail| {
        rail["peer"] == to && rail["state"] == "usable" && rail["bytes"].as_u64() > Some(0)
    })
}

/// Text as Chromium serializes a text node.
fn escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `GET path`: the response's head and body.
async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the admin port answers")
        .expect("an HTTP answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP head");
    (head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(promtool), ignore = "needs promtool (Debian's prometheus)")]
async fn a_scrape_passes_promtool_check_metrics() {
    // With a log on disk, so that the log's metrics are scraped too.
    let data = TempDir::new("promtool-master");
    let mut cluster = Cluster::start(Durability::Disk(data.0.clone())).await;
    for wave in 0..3 {
        cluster.wave(wave, 12).await;
    }
    let (head, metrics) = cluster.page("/metrics").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    for escaped in [
        r#"segment="node \"α\"""#,
        r#"segment="rack\\b-07""#,
        r#"segment="nœud-3 ✓""#,
    ] {
        assert!(metrics.contains(escaped), "{escaped} in\n{metrics}");
    }
    assert!(metrics.contains("\nmaster_get_replica_list_requests_total 81\n"));
    assert!(metrics.contains("\nmaster_get_replica_list_failures_total 9\n"));
    assert!(metrics.contains("\nmaster_log_entries_total "), "{metrics}");

    if let Err(findings) = mooncake_testkit::promtool::check_metrics(&metrics) {
        panic!("{findings}\n--- scrape:\n{metrics}");
    }
    cluster.master.close().await;
}

/// A directory of its own under the system's temporary one, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "mooncake-{what}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs headless Chromium on `url` with `extra` flags, in a profile of its own, killed if it
/// outlives [`CHROMIUM_DEADLINE`]; returns what it printed on stdout.
fn chromium(url: &str, extra: &[String], scratch: &Path) -> String {
    let profile = TempDir::new("chromium-profile");
    let stdout_path = scratch.join(format!("stdout-{}", fastrand::u64(..)));
    let stdout = std::fs::File::create(&stdout_path).expect("chromium's stdout file");
    let mut child = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--mute-audio",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        // A group of its own, so that a timeout ends its helper processes too.
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + CHROMIUM_DEADLINE;
    loop {
        match child.try_wait().expect("chromium's status") {
            Some(status) => {
                assert!(status.success(), "chromium failed: {status}");
                break;
            }
            None if Instant::now() >= deadline => {
                // SAFETY: kill(2) on the process group of our own child; no memory is involved.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                panic!("chromium did not finish within {CHROMIUM_DEADLINE:?}");
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    std::fs::read_to_string(&stdout_path).expect("chromium's output")
}

/// The text of the element with id `id` in a dumped DOM.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').expect("a tag's end") + 1;
    let end = rest[start..].find('<').expect("the next tag") + start;
    &rest[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(chromium), ignore = "needs chromium (Debian's chromium)")]
async fn chromium_renders_the_dashboard_with_the_clusters_numbers() {
    let mut cluster = Cluster::start(Durability::Memory).await;
    let real = [
        tcp_store_client(cluster.master.rpc_addr()).await,
        tcp_store_client(cluster.master.rpc_addr()).await,
    ];
    let names = real
        .each_ref()
        .map(|client| client.engine().segment_name().to_owned());
    move_bytes_between(&real[0], &real[1]).await;
    cluster.report_made_up_rails().await;
    // Waves a second apart, so that the charts have samples to draw.
    for wave in 0..8 {
        cluster.wave(wave, 8 + 4 * (wave % 4)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The real clients' rails arrive with their pings.
    let waiting = Instant::now();
    let before = loop {
        let data = cluster.data().await;
        if carried(&data, &names[0], &names[1]) && carried(&data, &names[1], &names[0]) {
            break data;
        }
        assert!(
            waiting.elapsed() < RAILS_DEADLINE,
            "the real clients' rails never showed: {}",
            data["rails"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let scratch = TempDir::new("dashboard");
    let url = format!("http://{}/", cluster.admin);
    let dom = {
        let (url, scratch) = (url.clone(), scratch.0.clone());
        tokio::task::spawn_blocking(move || chromium(&url, &["--dump-dom".into()], &scratch))
            .await
            .expect("chromium's thread")
    };
    let shot = scratch.0.join("dashboard.png");
    {
        let (url, scratch) = (url.clone(), scratch.0.clone());
        let flag = format!("--screenshot={}", shot.display());
        tokio::task::spawn_blocking(move || chromium(&url, &[flag], &scratch))
            .await
            .expect("chromium's thread");
    }
    let (_, after) = cluster.page("/dashboard/data").await;
    let after: serde_json::Value = serde_json::from_str(&after).expect("dashboard data");
    assert_eq!(before["keys"], after["keys"], "objects changed meanwhile");

    let keys = before["keys"].as_u64().expect("keys");
    assert!(keys > 0);
    assert_eq!(text_of(&dom, "keys").replace(',', ""), keys.to_string());
    let (gets, hits) = (
        before["gets"].as_f64().expect("gets"),
        before["hits"].as_f64().expect("hits"),
    );
    assert!(gets > hits && hits > 0.0, "{before}");
    let shown: f64 = text_of(&dom, "hit-rate")
        .trim_end_matches('%')
        .parse()
        .expect("a hit rate in percent");
    assert!((shown - hits * 100.0 / gets).abs() < 0.06, "{shown}%");
    assert_eq!(text_of(&dom, "role"), "leader");
    assert_eq!(
        text_of(&dom, "clients"),
        (SEGMENTS.len() + real.len()).to_string()
    );
    // Text nodes as the DOM serializes them: markup in a name stays text.
    for escaped in [
        "node \"α\"",
        "rack\\b-07",
        "nœud-3 ✓",
        "edge &lt;b&gt;4&lt;/b&gt;",
    ] {
        assert!(
            dom.contains(&format!("<td class=\"name\">{escaped}</td>")),
            "{escaped} in\n{dom}"
        );
    }
    assert!(!dom.contains("<b>4</b>"), "a segment name became markup");
    // Every rail the master knows, under its node, with its state: the real clients' own
    // and the made-up ones.
    let nodes = before["rails"].as_array().expect("rails");
    assert_eq!(nodes.len(), 2 + real.len(), "{}", before["rails"]);
    for node in nodes {
        let name = node["node"]
            .as_str()
            .expect("every node here has a segment");
        let heading = format!("<span class=\"node-name\">{}</span>", escaped(name));
        assert!(dom.contains(&heading), "{heading} in\n{dom}");
        for rail in node["rails"].as_array().expect("a node's rails") {
            let text = |field: &str| escaped(rail[field].as_str().expect("a rail's label"));
            let row = format!(
                "<tr><td class=\"name\">{}</td><td class=\"name path\">{} → {}</td>\
                 <td><span class=\"state {state}\">{state}</span></td>",
                text("peer"),
                text("local"),
                text("remote"),
                state = text("state"),
            );
            assert!(dom.contains(&row), "{row} in\n{dom}");
        }
    }
    for state in ["usable", "paused", "failed"] {
        assert!(
            dom.contains(&format!("<span class=\"state {state}\">{state}</span>")),
            "no {state} rail in\n{dom}"
        );
    }
    let total = text_of(&dom, "rails-total");
    assert!(total.ends_with("1 paused, 1 failed"), "{total}");
    assert!(text_of(&dom, "no-rails").starts_with("No rails reported yet"));
    assert!(
        dom.contains("id=\"no-rails\" class=\"note\" hidden"),
        "the empty state shows beside rails"
    );
    assert!(
        dom.contains("class=\"series ops\""),
        "no request chart in\n{dom}"
    );
    assert!(
        !text_of(&dom, "status").contains("no answer"),
        "the page lost the master"
    );

    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // The IHDR chunk: width and height, big-endian.
    let size = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    assert_eq!((size(16), size(20)), WINDOW);
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/dashboard.png");
        std::fs::write(&docs, &png).expect("write docs/dashboard.png");
    }
    for client in real {
        client.close().await;
    }
    cluster.master.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_cluster_says_no_rails_were_reported() {
    let cluster = Cluster::start(Durability::Memory).await;
    let data = cluster.data().await;
    assert_eq!(data["rails"], serde_json::json!([]));
    cluster.master.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_with_a_hostile_rail_report_is_answered_and_kept_bounded() {
    let mut cluster = Cluster::start(Durability::Memory).await;
    let megabyte = "m".repeat(1 << 20);
    let rail = |peer: String, label: &str, state: proto::RailState| proto::RailReport {
        peer,
        local: label.to_owned(),
        remote: label.to_owned(),
        state: state as i32,
        bytes: u64::MAX,
        failures: u64::MAX,
    };
    let reports = [
        (0..10_000)
            .map(|i| rail(format!("peer-{i}"), "eth0", proto::RailState::Usable))
            .collect::<Vec<_>>(),
        vec![rail(megabyte.clone(), &megabyte, proto::RailState::Paused)],
        // A state no version defines, and nothing else.
        vec![proto::RailReport {
            state: 99,
            ..rail("peer".into(), "eth0", proto::RailState::Usable)
        }],
    ];
    let expected_rails = [MAX_REPORTED_RAILS, 1, 0];
    for (rails, expected) in reports.into_iter().zip(expected_rails) {
        let reply = cluster
            .rpc
            .ping(proto::PingRequest {
                client_id: uuid(2),
                rails,
            })
            .await
            .expect("the ping is answered")
            .into_inner();
        assert_eq!(reply.client_status, proto::ClientStatus::Ok as i32);
        let data = cluster
            .data_showing(|d| rails_of(d, SEGMENTS[1].0).len() == expected)
            .await;
        assert!(
            data.to_string().len() < 64 << 10,
            "{} bytes of data",
            data.to_string().len()
        );
        let shown = rails_of(&data, SEGMENTS[1].0);
        assert_eq!(shown.len(), expected, "{}", data["rails"]);
        for rail in shown {
            for field in ["peer", "local", "remote"] {
                let label = rail[field].as_str().expect("a label");
                assert!(
                    label.len() <= MAX_RAIL_LABEL_LEN,
                    "{field}: {} bytes",
                    label.len()
                );
            }
        }
    }
    // The master still serves everyone.
    cluster.wave(0, 4).await;
    let data = cluster.data_showing(|d| d["keys"].as_u64() > Some(0)).await;
    assert!(data["keys"].as_u64() > Some(0));
    cluster.master.close().await;
}
