//! The etcd backend against real etcd members (Debian's `etcd-server`), started per test on
//! free loopback ports by mooncake-testkit.

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mooncake_common::ErrorKind;
use mooncake_metadata::etcd::EtcdStore;
use mooncake_metadata::{connect, MetadataBackend, MetadataStore};
use mooncake_testkit::EtcdCluster;

/// Bound on each test, cluster start included.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test finishes in time")
}

async fn cluster(members: usize) -> EtcdCluster {
    tokio::task::spawn_blocking(move || EtcdCluster::new(members))
        .await
        .expect("the start does not panic")
        .expect("etcd starts")
}

/// A name no other test or earlier run has used.
fn unique(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{label}-{}-{nanos}", std::process::id())
}

fn store(conn: &str) -> std::sync::Arc<dyn MetadataStore> {
    match connect(conn, None).expect("the connection string is valid") {
        MetadataBackend::Store(store) => store,
        MetadataBackend::P2pHandshake => panic!("'{conn}' picked P2P handshake"),
    }
}

/// What `etcdctl` reads at `key`: the key is stored as the engine spelled it.
fn etcdctl_get(endpoints: &[String], key: &str) -> String {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["get", "--print-value-only", key])
        .output()
        .expect("etcdctl runs");
    assert!(output.status.success(), "etcdctl get {key}: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .trim_end_matches('\n')
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn put_get_delete_round_trip() {
    bounded(async {
        let etcd = cluster(1).await;
        let store = store(&etcd.connection_string());
        let name = unique("round-trip");
        let key = format!("mooncake/ram/{name}");
        let value = format!(r#"{{"name":"{name}","protocol":"tcp","buffers":[]}}"#);

        assert_eq!(store.get(&key).await.unwrap(), None);
        store.put(&key, &value).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap().as_deref(), Some(&*value));
        assert_eq!(etcdctl_get(&etcd.endpoints(), &key), value);

        let replaced = format!("{value}\n");
        store.put(&key, &replaced).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), Some(replaced));

        store.delete(&key).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), None);
        store
            .delete(&key)
            .await
            .expect("deleting an absent key succeeds");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn every_connection_string_form_reaches_the_cluster() {
    bounded(async {
        let etcd = cluster(3).await;
        let endpoints = etcd.endpoints();
        let forms = [
            format!("etcd://{}", endpoints.join(",")),
            format!("etcd://{}", endpoints.join(";")),
            endpoints.join(";"),
            etcd.connection_string(),
        ];
        for (i, conn) in forms.iter().enumerate() {
            let key = format!("mooncake/rpc_meta/{}", unique(&format!("form{i}")));
            let value = format!(r#"{{"ip_or_host_name":"10.0.0.{i}","rpc_port":12345}}"#);
            store(conn).put(&key, &value).await.unwrap();
            // Every member serves what was written through any of them.
            for endpoint in &endpoints {
                let one = EtcdStore::with_endpoints([endpoint.as_str()]).unwrap();
                assert_eq!(
                    one.get(&key).await.unwrap().as_deref(),
                    Some(&*value),
                    "{conn} via {endpoint}"
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn losing_one_member_of_three_is_survived() {
    bounded(async {
        let mut etcd = cluster(3).await;
        let store = store(&etcd.connection_string());
        let name = unique("survivor");
        let before = format!("mooncake/ram/{name}");
        store.put(&before, "before").await.unwrap();

        // Each member in turn, so that the leader is among the lost; the client keeps its
        // connections to the dead one throughout.
        for lost in 0..etcd.len() {
            etcd.kill(lost);
            for round in 0..10 {
                let key = format!("mooncake/ram/{name}-{lost}-{round}");
                store
                    .put(&key, "after")
                    .await
                    .unwrap_or_else(|e| panic!("put with member {lost} down: {e}"));
                assert_eq!(store.get(&key).await.unwrap().as_deref(), Some("after"));
                assert_eq!(store.get(&before).await.unwrap().as_deref(), Some("before"));
                store.delete(&key).await.unwrap();
            }
            tokio::task::block_in_place(|| etcd.start(lost)).expect("the member comes back");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn a_dead_endpoint_is_a_prompt_metadata_error() {
    bounded(async {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let conn = format!("127.0.0.1:{port}");
        let store = store(&conn);
        let key = format!("mooncake/ram/{}", unique("dead"));
        for operation in ["get", "put", "delete"] {
            let started = Instant::now();
            let error = match operation {
                "get" => store.get(&key).await.map(drop),
                "put" => store.put(&key, "{}").await,
                _ => store.delete(&key).await,
            }
            .expect_err("nothing answers");
            let elapsed = started.elapsed();
            assert_eq!(error.kind(), ErrorKind::Metadata, "{operation}: {error}");
            assert!(
                error.message().contains(&conn),
                "the error names the endpoint: {error}"
            );
            // The store gives up after about 4 s; a generous margin over that.
            assert!(
                elapsed < Duration::from_secs(8),
                "{operation} took {elapsed:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn a_lost_cluster_is_a_prompt_metadata_error_and_a_restart_heals() {
    bounded(async {
        let mut etcd = cluster(1).await;
        let store = store(&etcd.connection_string());
        let key = format!("mooncake/ram/{}", unique("restart"));
        store.put(&key, "kept").await.unwrap();

        tokio::task::block_in_place(|| etcd.stop(0));
        let started = Instant::now();
        let error = store.get(&key).await.unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(error.kind(), ErrorKind::Metadata, "{error}");
        assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");

        tokio::task::block_in_place(|| etcd.start(0)).expect("the member comes back");
        assert_eq!(store.get(&key).await.unwrap().as_deref(), Some("kept"));
    })
    .await;
}

/// Needs no etcd: a listener that never answers, as a hung member or a black hole would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_endpoint_is_a_prompt_metadata_error() {
    bounded(async {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = format!("etcd://{}", silent.local_addr().unwrap());
        let store = store(&conn);
        let started = Instant::now();
        let error = store.get("mooncake/ram/silent").await.unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(error.kind(), ErrorKind::Metadata, "{error}");
        assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
        drop(silent);
    })
    .await;
}
