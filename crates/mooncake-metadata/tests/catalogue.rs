//! The catalogue operations (revisioned reads, compare-and-swap, prefix listing, expiring
//! entries) of every metadata store against one conformance body: the in-process store, the
//! embedded HTTP server with and without a cluster token, and real etcd and Redis servers
//! (reported as ignored where those are not installed). Then what only HTTP has: a server
//! without revisions (Mooncake's own) and the byte and key caps as entries expire.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use mooncake_common::auth::ClusterToken;
use mooncake_common::ErrorKind;
use mooncake_metadata::http::{HttpStore, MetadataServer, MetadataServerConfig};
use mooncake_metadata::store::MemoryStore;
use mooncake_metadata::{connect, MetadataBackend, MetadataStore, Revisioned};
use mooncake_testkit::RedisServer;

/// Bound on each test, server start included.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Swappers running at once, and the increments each makes.
const SWAPPERS: u64 = 8;
const INCREMENTS: u64 = 10;

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test finishes in time")
}

/// A prefix no other test or earlier run has used.
fn unique(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("catalogue/{label}-{}-{nanos}", std::process::id())
}

/// How a store's expiry is checked: an entry written for `ttl` must be gone within `gone`.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    ttl: Duration,
    gone: Duration,
}

/// The same value read back, whatever its revision.
async fn read(store: &dyn MetadataStore, key: &str) -> Option<Revisioned> {
    store.get_revisioned(key).await.expect("a revisioned read")
}

async fn conformance(store: Arc<dyn MetadataStore>, label: &str, expiry: Expiry) {
    let ns = unique(label);
    let s = &*store;

    // Create-if-absent succeeds once.
    let key = format!("{ns}/cas");
    assert!(s.swap(&key, None, Some("1")).await.unwrap(), "first create");
    assert!(
        !s.swap(&key, None, Some("2")).await.unwrap(),
        "second create"
    );
    let first = read(s, &key).await.expect("created");
    assert_eq!(first.value, "1");
    assert_eq!(s.get(&key).await.unwrap().as_deref(), Some("1"));

    // A read made stale by another write swaps nothing; a fresh one does.
    s.put(&key, "2").await.unwrap();
    assert!(
        !s.swap(&key, Some(&first), Some("3")).await.unwrap(),
        "stale"
    );
    assert_eq!(s.get(&key).await.unwrap().as_deref(), Some("2"));
    let fresh = read(s, &key).await.expect("present");
    assert_eq!(fresh.value, "2");
    assert!(
        s.swap(&key, Some(&fresh), Some("3")).await.unwrap(),
        "fresh"
    );
    assert!(
        !s.swap(&key, Some(&fresh), Some("4")).await.unwrap(),
        "the same read twice"
    );
    assert_eq!(s.get(&key).await.unwrap().as_deref(), Some("3"));

    // Delete by swap, only as read; deleting an absent key "if absent" is a success.
    let now = read(s, &key).await.expect("present");
    assert!(
        !s.swap(&key, Some(&fresh), None).await.unwrap(),
        "stale delete"
    );
    assert!(s.swap(&key, Some(&now), None).await.unwrap(), "delete");
    assert_eq!(s.get(&key).await.unwrap(), None);
    assert_eq!(read(s, &key).await, None);
    assert!(
        !s.swap(&key, Some(&now), None).await.unwrap(),
        "already gone"
    );
    assert!(
        s.swap(&key, None, None).await.unwrap(),
        "absent stays absent"
    );
    assert!(s.swap(&key, None, Some("5")).await.unwrap(), "recreate");

    // Listing: only the prefix, in key order, values intact. `*` and `?` in a prefix are
    // literal, and a key that would match them as a pattern is left out.
    let list = format!("{ns}/li*st?/");
    let entries = [
        (
            format!("{list}b"),
            r#"{"n":2,"text":"two words"}"#.to_owned(),
        ),
        (format!("{list}a"), "{\"n\":1,\n\"uni\":\"é✓\"}".to_owned()),
        (format!("{list}a/nested key&x=1"), "[]".to_owned()),
        (format!("{list}c"), String::new()),
    ];
    for (key, value) in &entries {
        s.put(key, value).await.unwrap();
    }
    s.put(&format!("{ns}/liXstY/a"), "{}").await.unwrap();
    s.put(&format!("{ns}/li*st?"), "{}").await.unwrap();
    s.put(&format!("{ns}/li"), "{}").await.unwrap();
    let mut expected = entries.to_vec();
    expected.sort();
    assert_eq!(s.list(&list).await.unwrap(), expected);
    assert_eq!(s.list(&format!("{ns}/nothing/")).await.unwrap(), []);
    let everything = s.list(&format!("{ns}/")).await.unwrap();
    assert_eq!(everything.len(), 8, "{everything:?}");
    assert!(
        everything.windows(2).all(|w| w[0].0 < w[1].0),
        "{everything:?}"
    );

    // An expiring entry is there, then gone; a plain one beside it stays.
    let brief = format!("{ns}/ttl/brief");
    let kept = format!("{ns}/ttl/kept");
    s.put_expiring(&brief, "{\"alive\":true}", expiry.ttl)
        .await
        .unwrap();
    s.put(&kept, "{}").await.unwrap();
    assert_eq!(
        s.get(&brief).await.unwrap().as_deref(),
        Some("{\"alive\":true}")
    );
    assert_eq!(s.list(&format!("{ns}/ttl/")).await.unwrap().len(), 2);
    let started = Instant::now();
    while s.get(&brief).await.unwrap().is_some() {
        assert!(
            started.elapsed() < expiry.gone,
            "an entry written for {:?} is still there after {:?}",
            expiry.ttl,
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.list(&format!("{ns}/ttl/")).await.unwrap(),
        [(kept.clone(), "{}".to_owned())]
    );
    // A swap may create it again once it is gone.
    assert!(s.swap(&brief, None, Some("{}")).await.unwrap());

    // Concurrent read-modify-swap increments lose no update.
    let counter = format!("{ns}/counter");
    let swappers: Vec<_> = (0..SWAPPERS)
        .map(|_| {
            let store = store.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    increment(&*store, &counter).await;
                }
            })
        })
        .collect();
    for swapper in swappers {
        swapper.await.expect("a swapper does not panic");
    }
    let total: serde_json::Value =
        serde_json::from_str(&s.get(&counter).await.unwrap().expect("counted")).unwrap();
    assert_eq!(total["n"], SWAPPERS * INCREMENTS, "an update was lost");
}

/// Adds one to the JSON counter at `key`, retrying from a fresh read when another got there
/// first.
async fn increment(store: &dyn MetadataStore, key: &str) {
    loop {
        let current = store.get_revisioned(key).await.unwrap();
        let n = current.as_ref().map_or(0, |read| {
            let value: serde_json::Value = serde_json::from_str(&read.value).unwrap();
            value["n"].as_u64().expect("a count")
        });
        let next = serde_json::json!({ "n": n + 1 }).to_string();
        if store
            .swap(key, current.as_ref(), Some(&next))
            .await
            .unwrap()
        {
            return;
        }
    }
}

const SHORT: Expiry = Expiry {
    ttl: Duration::from_millis(500),
    gone: Duration::from_secs(5),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_conforms() {
    bounded(conformance(
        Arc::new(MemoryStore::default()),
        "memory",
        SHORT,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_server_conforms() {
    bounded(async {
        let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
        let client = HttpStore::new(&server.url()).unwrap();
        conformance(Arc::new(client), "http", SHORT).await;
        server.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_server_with_a_token_conforms_and_refuses_unproven_swaps() {
    bounded(async {
        let token = ClusterToken::new("a-catalogue-secret-of-length").unwrap();
        let config = MetadataServerConfig {
            token: Some(token.clone()),
            ..MetadataServerConfig::default()
        };
        let server = MetadataServer::start_with("127.0.0.1", 0, config)
            .await
            .unwrap();
        let member = HttpStore::with_token(&server.url(), Some(token)).unwrap();
        conformance(Arc::new(member), "http-token", SHORT).await;

        let anonymous = HttpStore::new(&server.url()).unwrap();
        let key = unique("unproven");
        server.store().put_now(&key, "{}".to_owned());
        let read = anonymous.get_revisioned(&key).await.unwrap().unwrap();
        for swapped in [
            anonymous.swap(&key, Some(&read), Some("{\"x\":1}")).await,
            anonymous.swap(&key, Some(&read), None).await,
            anonymous
                .swap(&format!("{key}/new"), None, Some("{}"))
                .await,
            anonymous
                .put_expiring(&key, "{}", Duration::from_secs(1))
                .await
                .map(|()| true),
        ] {
            let err = swapped.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
        }
        assert_eq!(server.store().get_now(&key).as_deref(), Some("{}"));
        assert_eq!(server.store().get_now(&format!("{key}/new")), None);
        // Listing is a read: open.
        assert_eq!(anonymous.list(&key).await.unwrap().len(), 1);
        server.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn etcd_conforms() {
    bounded(async {
        let etcd = tokio::task::spawn_blocking(|| mooncake_testkit::EtcdCluster::new(1))
            .await
            .expect("the start does not panic")
            .expect("etcd starts");
        let store = match connect(&etcd.connection_string(), None).unwrap() {
            MetadataBackend::Store(store) => store,
            MetadataBackend::P2pHandshake => panic!("etcd picked P2P handshake"),
        };
        // Leases count whole seconds, and etcd lengthens one below its minimum (2 s).
        let expiry = Expiry {
            ttl: Duration::from_secs(1),
            gone: Duration::from_secs(10),
        };
        conformance(store, "etcd", expiry).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(redis_server),
    ignore = "redis-server is not installed (apt-get install redis-server)"
)]
async fn redis_conforms() {
    bounded(async {
        let redis = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .expect("the start does not panic")
            .expect("redis-server starts");
        let store = match connect(&redis.url(), None).unwrap() {
            MetadataBackend::Store(store) => store,
            MetadataBackend::P2pHandshake => panic!("Redis picked P2P handshake"),
        };
        conformance(store, "redis", SHORT).await;
    })
    .await;
}

/// A server speaking only Mooncake's protocol, as its own metadata server does: no ETag, no
/// conditions, no listing (a missing key is the empty one), no expiry.
async fn mooncake_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    type Entries = Arc<Mutex<HashMap<String, String>>>;
    #[derive(serde::Deserialize)]
    struct KeyOnly {
        key: Option<String>,
    }
    fn entries(state: &Entries) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        state.lock().unwrap_or_else(|p| p.into_inner())
    }
    async fn get_key(State(e): State<Entries>, Query(q): Query<KeyOnly>) -> (StatusCode, String) {
        match entries(&e).get(&q.key.unwrap_or_default()) {
            Some(value) => (StatusCode::OK, value.clone()),
            None => (StatusCode::NOT_FOUND, "metadata not found".to_owned()),
        }
    }
    async fn put_key(
        State(e): State<Entries>,
        Query(q): Query<KeyOnly>,
        body: String,
    ) -> &'static str {
        entries(&e).insert(q.key.unwrap_or_default(), body);
        "metadata updated"
    }
    async fn delete_key(State(e): State<Entries>, Query(q): Query<KeyOnly>) -> StatusCode {
        match entries(&e).remove(&q.key.unwrap_or_default()) {
            Some(_) => StatusCode::OK,
            None => StatusCode::NOT_FOUND,
        }
    }
    let app = Router::new()
        .route("/metadata", get(get_key).put(put_key).delete(delete_key))
        .with_state(Entries::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_revisions_is_refused_clearly() {
    bounded(async {
        let (addr, task) = mooncake_server().await;
        let client = HttpStore::new(&format!("http://{addr}/metadata")).unwrap();
        client.put("present", "{}").await.unwrap();
        assert_eq!(client.get("present").await.unwrap().as_deref(), Some("{}"));

        let conditional = "does not support conditional updates";
        let err = client.get_revisioned("present").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");
        assert!(err.message().contains(conditional), "{err}");
        assert!(err.message().contains("etcd, Redis"), "{err}");
        // A create is checked by a read first: an entry there is not overwritten.
        let err = client
            .swap("present", None, Some("{\"clobbered\":1}"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");
        assert!(err.message().contains(conditional), "{err}");
        assert_eq!(client.get("present").await.unwrap().as_deref(), Some("{}"));
        // A create of an absent key is written (unconditionally, to that server) but not
        // reported as a swap.
        let err = client.swap("absent", None, Some("{}")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");
        assert!(err.message().contains(conditional), "{err}");
        // So is a swap with a revision made up by hand (that server deletes regardless).
        let made_up = Revisioned {
            value: "{}".into(),
            revision: 1,
        };
        let err = client
            .swap("present", Some(&made_up), None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");

        let err = client.list("pre").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");
        assert!(err.message().contains("does not support listing"), "{err}");

        let err = client
            .put_expiring("brief", "{}", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotImplemented, "{err}");
        assert!(
            err.message().contains("does not support expiring entries"),
            "{err}"
        );
        task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_caps_free_room_as_entries_expire() {
    bounded(async {
        let config = MetadataServerConfig {
            max_keys: 3,
            max_total_bytes: 100,
            ..MetadataServerConfig::default()
        };
        let server = MetadataServer::start_with("127.0.0.1", 0, config)
            .await
            .unwrap();
        let client = HttpStore::new(&server.url()).unwrap();
        let full = |e: mooncake_common::Error| {
            assert!(e.message().contains("507"), "{e}");
        };
        let bytes = |n: usize| "v".repeat(n);
        let ttl = Duration::from_millis(600);

        // Two expiring entries of 41 bytes and a plain one of 11: 93 of 100, 3 of 3 keys.
        client.put_expiring("a", &bytes(40), ttl).await.unwrap();
        client.put_expiring("b", &bytes(40), ttl).await.unwrap();
        client.put("c", &bytes(10)).await.unwrap();
        full(client.put("d", "").await.unwrap_err());
        full(client.put("c", &bytes(19)).await.unwrap_err());
        tokio::time::sleep(ttl + Duration::from_millis(200)).await;

        // Their room is free again: keys and bytes.
        client.put("d", &bytes(40)).await.unwrap();
        client.put("e", &bytes(47)).await.unwrap();
        assert_eq!(server.store().len(), 3);
        // 11 + 41 + 48 = 100 fits exactly; one byte more does not.
        full(client.put("e", &bytes(48)).await.unwrap_err());

        // Every write path keeps the count: a swap that frees, one that takes, a plain
        // delete, an expiring entry overwritten after its time but (most likely) before it
        // was dropped.
        let e = client.get_revisioned("e").await.unwrap().unwrap();
        assert!(client.swap("e", Some(&e), None).await.unwrap());
        assert!(client.swap("f", None, Some(&bytes(47))).await.unwrap());
        full(client.put("f", &bytes(48)).await.unwrap_err());
        client.delete("d").await.unwrap();
        client.delete("f").await.unwrap();
        client
            .put_expiring("d", &bytes(10), Duration::from_millis(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        client.put("d", &bytes(39)).await.unwrap();
        // 11 + 40 + 49 = 100.
        client.put("e", &bytes(48)).await.unwrap();
        full(client.put("e", &bytes(49)).await.unwrap_err());
        for key in ["c", "d", "e"] {
            client.delete(key).await.unwrap();
        }
        // Empty again: the whole cap fits in one entry.
        client.put("g", &bytes(99)).await.unwrap();
        full(client.put("h", "").await.unwrap_err());
        server.close().await;
    })
    .await;
}

/// What the extended wire looks like to a plain HTTP client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_wire_carries_revisions_conditions_listing_and_expiry() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::{connect::HttpConnector, Client};
    use hyper_util::rt::TokioExecutor;

    bounded(async {
        let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
        let base = server.url();
        let http: Client<HttpConnector, Full<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let send = |method: &str, query: &str, headers: &[(&str, &str)], body: &str| {
            let mut request = axum::http::Request::builder()
                .method(method)
                .uri(format!("{base}?{query}"));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request
                .body(Full::new(bytes::Bytes::from(body.to_owned())))
                .unwrap();
            let http = http.clone();
            async move {
                let response = http.request(request).await.unwrap();
                let (parts, body) = response.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                (parts, String::from_utf8_lossy(&body).into_owned())
            }
        };

        let (put, _) = send("PUT", "key=p%2Fa", &[], "{\"a\":1}").await;
        assert_eq!(put.status, StatusCode::OK);
        let (got, body) = send("GET", "key=p%2Fa", &[], "").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(body, "{\"a\":1}");
        let tag = got.headers["etag"].to_str().unwrap().to_owned();
        assert!(tag.starts_with('"') && tag.ends_with('"'), "{tag}");

        let (stale, _) = send("PUT", "key=p%2Fa", &[("if-match", "\"999999\"")], "{}").await;
        assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
        assert!(stale.headers.contains_key("x-mooncake-condition"));
        let (taken, _) = send("PUT", "key=p%2Fa", &[("if-none-match", "*")], "{}").await;
        assert_eq!(taken.status, StatusCode::PRECONDITION_FAILED);
        let (swapped, _) = send("PUT", "key=p%2Fa", &[("if-match", &tag)], "{\"a\":2}").await;
        assert_eq!(swapped.status, StatusCode::OK);
        assert!(swapped.headers.contains_key("x-mooncake-condition"));
        for bad in ["*", "17", "W/\"1\"", "\"x\""] {
            let (refused, _) = send("PUT", "key=p%2Fa", &[("if-match", bad)], "{}").await;
            assert_eq!(refused.status, StatusCode::BAD_REQUEST, "If-Match: {bad}");
        }

        let (expiring, _) = send("PUT", "key=p%2Fb", &[("x-mooncake-ttl-ms", "60000")], "[]").await;
        assert_eq!(expiring.status, StatusCode::OK);
        assert_eq!(expiring.headers["x-mooncake-ttl-ms"], "60000");
        let (refused, _) = send("PUT", "key=p%2Fb", &[("x-mooncake-ttl-ms", "soon")], "[]").await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);

        let (listed, body) = send("GET", "prefix=p%2F", &[], "").await;
        assert_eq!(listed.status, StatusCode::OK);
        let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            listed,
            serde_json::json!([
                {"key": "p/a", "value": "{\"a\":2}"},
                {"key": "p/b", "value": "[]"},
            ])
        );
        let (both, _) = send("GET", "key=p%2Fa&prefix=p", &[], "").await;
        assert_eq!(both.status, StatusCode::BAD_REQUEST);
        let (write_prefix, _) = send("PUT", "prefix=p", &[], "{}").await;
        assert_eq!(write_prefix.status, StatusCode::BAD_REQUEST);
        server.close().await;
    })
    .await;
}
