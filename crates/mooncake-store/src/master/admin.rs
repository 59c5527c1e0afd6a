//! The master's admin HTTP server: `/metrics` (Prometheus text, Mooncake's names), `/health`,
//! `/query_key`, `/get_all_keys` (paged), `/get_all_segments`, `/get_segments_detail`. Every
//! route only reads. On a master with a cluster token, the pages that name keys and segments
//! need a proof of it (`x-mooncake-proof` over `GET <path>`); `/metrics` and `/health` stay open
//! for scrapers and probes. Client ids, which own segments, are never shown.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::sync::watch;

use mooncake_common::auth::{unauthenticated, ProofChecker};

use super::ha::HaStatus;
use super::log::Log;
use super::service::{OpCounters, Role};
use super::Master;
use crate::access::PROOF_HEADER;

/// Keys a `/get_all_keys` page holds unless `limit` says otherwise.
pub const DEFAULT_KEYS_PAGE: usize = 1000;
/// Most keys one page holds, whatever `limit` says.
pub const MAX_KEYS_PAGE: usize = 10_000;
/// A page ends early rather than grow past this many bytes (4 KiB keys make 10,000 of them
/// 40 MB).
const MAX_PAGE_BYTES: usize = 4 << 20;
/// The header that names the `after` of the next page, percent-encoded, when there is one.
pub const NEXT_PAGE_HEADER: &str = "x-mooncake-next-after";

/// What the admin pages read.
#[derive(Clone)]
pub(super) struct Admin {
    pub(super) state: Arc<Mutex<Master>>,
    pub(super) counters: Arc<OpCounters>,
    pub(super) role: watch::Receiver<Role>,
    pub(super) ha: Option<HaStatus>,
    /// Checks proofs of the cluster token, when the master has one.
    pub(super) proofs: Option<Arc<ProofChecker>>,
}

#[derive(serde::Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

#[derive(serde::Deserialize)]
struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// The admin routes.
pub(super) fn routes(admin: Admin) -> Router {
    let named = Router::new()
        .route("/query_key", get(query_key))
        .route("/get_all_keys", get(all_keys))
        .route("/get_all_segments", get(all_segments))
        .route("/get_segments_detail", get(segments_detail))
        .route_layer(middleware::from_fn_with_state(admin.clone(), proven));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .merge(named)
        .with_state(admin)
}

/// Lets a request through when the master has no token or the request proves it.
async fn proven(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    if let Some(checker) = &admin.proofs {
        let scope = format!("GET {}", request.uri().path());
        let proof = request
            .headers()
            .get(PROOF_HEADER)
            .and_then(|v| v.to_str().ok());
        if let Err(e) = proof.map_or_else(
            || {
                Err(unauthenticated(
                    "this page needs a proof of the cluster token",
                ))
            },
            |proof| checker.check(proof, &scope),
        ) {
            return (StatusCode::UNAUTHORIZED, e.message().to_owned()).into_response();
        }
    }
    next.run(request).await
}

/// Newline-separated keys in order, a page at a time: `?limit=` (default
/// [`DEFAULT_KEYS_PAGE`], at most [`MAX_KEYS_PAGE`]) after `?after=`; [`NEXT_PAGE_HEADER`]
/// names the next page's `after` while more follow.
async fn all_keys(State(admin): State<Admin>, Query(q): Query<PageQuery>) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_KEYS_PAGE).clamp(1, MAX_KEYS_PAGE);
    let (mut keys, mut more) = Master::lock(&admin.state).keys_page(q.after.as_deref(), limit);
    let mut bytes = 0usize;
    let fits = keys
        .iter()
        .position(|k| {
            bytes = bytes.saturating_add(k.len() + 1);
            bytes > MAX_PAGE_BYTES
        })
        .map_or(keys.len(), |over| over.max(1));
    if fits < keys.len() {
        keys.truncate(fits);
        more = true;
    }
    let next = more.then(|| keys.last()).flatten().and_then(|last| {
        HeaderValue::from_str(&utf8_percent_encode(last, NON_ALPHANUMERIC).to_string()).ok()
    });
    let mut response = keys.join("\n").into_response();
    if let Some(next) = next {
        response.headers_mut().insert(NEXT_PAGE_HEADER, next);
    }
    response
}

async fn health(State(admin): State<Admin>) -> Json<serde_json::Value> {
    let role = admin.role.borrow().clone();
    let applied = Master::lock(&admin.state).last_seq();
    let (role_name, log) = match &role {
        Role::Leader(log) => ("leader", log.as_ref().map(Log::progress)),
        Role::Standby => ("standby", None),
    };
    let mut body = serde_json::json!({
        "status": "ok",
        "role": role_name,
        "service_ready": matches!(role, Role::Leader(_)),
        "applied_seq": applied,
    });
    if let Some(log) = log {
        body["durable_seq"] = log.durable.into();
        body["log_failed"] = log.failed.into();
    }
    if let Some(ha) = &admin.ha {
        let status = ha.snapshot();
        body["leader"] = status.leader.into();
        body["view_version"] = status.view_version.into();
        body["leader_seq"] = status.leader_seq.into();
        body["lag"] = status.leader_seq.saturating_sub(applied).into();
        body["failovers"] = status.promotions.into();
    }
    Json(body)
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let (stats, segments) = {
        let master = Master::lock(&admin.state);
        (master.stats(Instant::now()), master.segments())
    };
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        "master_allocated_bytes",
        "Bytes reserved in all segments.",
        "gauge",
        stats.allocated_bytes,
    );
    gauge(
        "master_total_capacity_bytes",
        "Bytes mounted.",
        "gauge",
        stats.capacity_bytes,
    );
    gauge("master_key_count", "Objects.", "gauge", stats.keys);
    gauge(
        "master_soft_pin_key_count",
        "Soft-pinned objects.",
        "gauge",
        stats.soft_pinned_keys,
    );
    gauge(
        "master_active_clients",
        "Clients alive.",
        "gauge",
        stats.active_clients,
    );
    gauge(
        "master_segment_count",
        "Mounted segments.",
        "gauge",
        stats.segments,
    );
    gauge(
        "master_evicted_key_count",
        "Objects evicted.",
        "counter",
        stats.evicted_keys,
    );
    gauge(
        "master_evicted_size_bytes",
        "Bytes evicted.",
        "counter",
        stats.evicted_bytes,
    );
    gauge(
        "master_successful_evictions_total",
        "Eviction rounds.",
        "counter",
        stats.eviction_rounds,
    );
    gauge(
        "master_put_start_alloc_failures_total",
        "Writes that found no space.",
        "counter",
        stats.put_start_alloc_failures,
    );
    gauge(
        "master_put_start_partial_allocations_total",
        "Writes that got fewer replicas than asked.",
        "counter",
        stats.put_start_partial_allocations,
    );
    gauge(
        "master_put_start_discard_cnt",
        "Unfinished writes preempted.",
        "counter",
        stats.put_start_discards,
    );
    gauge(
        "master_put_start_release_cnt",
        "Abandoned writes released.",
        "counter",
        stats.put_start_releases,
    );
    let applied = Master::lock(&admin.state).last_seq();
    gauge(
        "master_log_applied_seq",
        "The last log entry this master applied or wrote.",
        "gauge",
        applied,
    );
    if let Role::Leader(Some(log)) = &*admin.role.borrow() {
        let progress = log.progress();
        gauge(
            "master_log_durable_seq",
            "The last durable log entry.",
            "gauge",
            progress.durable,
        );
        gauge(
            "master_log_appends_total",
            "Writes to the log (each carries one or more entries).",
            "counter",
            progress.appends,
        );
        gauge(
            "master_log_entries_total",
            "Log entries written.",
            "counter",
            progress.entries,
        );
        gauge(
            "master_log_snapshots_total",
            "Snapshots that replaced the log.",
            "counter",
            progress.snapshots,
        );
        if let Some(at) = progress.snapshot_at {
            gauge(
                "master_log_snapshot_age_seconds",
                "Seconds since the last snapshot.",
                "gauge",
                at.elapsed().as_secs(),
            );
        }
    }
    if let Some(ha) = &admin.ha {
        let status = ha.snapshot();
        gauge(
            "master_ha_failovers_total",
            "Times this master became the leader.",
            "counter",
            status.promotions,
        );
        gauge(
            "master_ha_is_leader",
            "1 while this master leads.",
            "gauge",
            u64::from(matches!(&*admin.role.borrow(), Role::Leader(_))),
        );
        gauge(
            "master_ha_log_lag_entries",
            "Entries the leader has written that this master has not applied.",
            "gauge",
            status.leader_seq.saturating_sub(applied),
        );
    }
    for (op, requests, failures) in admin.counters.snapshot() {
        let _ = writeln!(
            out,
            "# TYPE master_{op}_requests_total counter\nmaster_{op}_requests_total {requests}"
        );
        let _ = writeln!(
            out,
            "# TYPE master_{op}_failures_total counter\nmaster_{op}_failures_total {failures}"
        );
    }
    for (name, allocated) in [
        ("segment_allocated_bytes", true),
        ("segment_total_capacity_bytes", false),
    ] {
        let _ = writeln!(out, "# TYPE {name} gauge");
        for s in &segments {
            let value = if allocated { s.used } else { s.capacity };
            let label = LabelValue(&s.spec.name);
            let _ = writeln!(out, "{name}{{segment=\"{label}\"}} {value}");
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// A label value as the Prometheus text format escapes it: backslash, double quote and line
/// feed. Mount refuses names with control characters; a name recovered from an older log may
/// still hold one.
struct LabelValue<'a>(&'a str);

impl std::fmt::Display for LabelValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

async fn query_key(State(admin): State<Admin>, Query(q): Query<KeyQuery>) -> impl IntoResponse {
    let Some(key) = q.key else {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                serde_json::json!({ "success": false, "error_code": -600, "error_message": "missing key" }),
            ),
        );
    };
    match Master::lock(&admin.state).query_key(&key) {
        Some(replicas) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "success": true,
                "data": replicas.iter().map(|r| serde_json::json!({
                    "size_": r.size,
                    "buffer_address_": r.address,
                    "protocol_": "tcp",
                    "transport_endpoint_": r.te_endpoint,
                    "segment_name": r.segment_name,
                    "status": format!("{:?}", r.status).to_uppercase(),
                })).collect::<Vec<_>>(),
            })),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(
                serde_json::json!({ "success": false, "error_code": -704, "error_message": format!("'{key}' not found") }),
            ),
        ),
    }
}

async fn all_segments(State(admin): State<Admin>) -> String {
    let mut names: Vec<String> = Master::lock(&admin.state)
        .segments()
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    names.sort();
    names.dedup();
    names.join("\n")
}

async fn segments_detail(State(admin): State<Admin>) -> Json<serde_json::Value> {
    let segments = Master::lock(&admin.state).segments();
    Json(serde_json::json!({
        "total_segments": segments.len(),
        "segments": segments.iter().map(|s| serde_json::json!({
            "segment_name": s.spec.name,
            "segment_id": format!("{:032x}", s.spec.id.0),
            "base_address": format!("{:#x}", s.spec.base),
            "size_bytes": s.spec.size,
            "te_endpoint": s.spec.te_endpoint,
            "protocol": s.spec.protocol,
            "status": "OK",
            "allocator_used_bytes": s.used,
            "allocator_capacity_bytes": s.capacity,
            "allocator_usage_percent": if s.capacity == 0 { 0.0 } else { s.used as f64 * 100.0 / s.capacity as f64 },
        })).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::master::types::{ClientId, SegmentId, SegmentSpec, WriteConfig};
    use crate::master::MasterConfig;
    use mooncake_common::auth::ClusterToken;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            LabelValue("a\"b\\c\nd} 1\nx").to_string(),
            "a\\\"b\\\\c\\nd} 1\\nx"
        );
        assert_eq!(LabelValue("node-1:1234 é").to_string(), "node-1:1234 é");
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        get_with(addr, path, "").await
    }

    async fn get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: x\r\n{headers}connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn all_keys_come_in_pages_and_metrics_stay_one_line_per_sample() {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let (now, client) = (Instant::now(), ClientId(1));
        let spec = SegmentSpec {
            id: SegmentId(1),
            name: "node \"1\"".into(),
            base: 0x1000_0000,
            size: 64 << 20,
            te_endpoint: "127.0.0.1:1".into(),
            protocol: "tcp".into(),
            host_id: "host".into(),
        };
        master.mount_segment(now, client, spec).unwrap();
        let config = WriteConfig::default();
        for i in 0..25 {
            let key = format!("key/{i:02}");
            let grant = master.put_start(now, client, &key, 1024, &config).unwrap();
            master.put_end(now, client, &key, grant.write).unwrap();
        }
        let (_, role) = watch::channel(Role::Leader(None));
        let app = routes(Admin {
            state: Arc::new(Mutex::new(master)),
            counters: Arc::default(),
            role,
            ha: None,
            proofs: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let mut keys = Vec::new();
        let mut path = "/get_all_keys?limit=10".to_owned();
        loop {
            let (head, body) = get(addr, &path).await;
            let page: Vec<String> = body.lines().map(str::to_owned).collect();
            assert!(page.len() <= 10, "{}", page.len());
            keys.extend(page);
            let next = head
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{NEXT_PAGE_HEADER}: ")));
            match next {
                Some(after) => path = format!("/get_all_keys?limit=10&after={after}"),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25).map(|i| format!("key/{i:02}")).collect();
        assert_eq!(keys, expected);
        let (head, body) = get(addr, "/get_all_keys").await;
        assert_eq!(body.lines().count(), 25);
        assert!(!head.contains(NEXT_PAGE_HEADER));

        let (_, metrics) = get(addr, "/metrics").await;
        assert!(
            metrics.contains("segment_allocated_bytes{segment=\"node \\\"1\\\"\"} 25600"),
            "{metrics}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn with_a_token_pages_that_name_keys_need_a_proof() {
        let token = ClusterToken::new("admin-pages-secret-0001").unwrap();
        let (_, role) = watch::channel(Role::Leader(None));
        let app = routes(Admin {
            state: Arc::new(Mutex::new(Master::new(MasterConfig::default()).unwrap())),
            counters: Arc::default(),
            role,
            ha: None,
            proofs: Some(Arc::new(ProofChecker::new(token.clone()))),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        for open in ["/metrics", "/health"] {
            let (head, _) = get(addr, open).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{open}: {head}");
        }
        for named in [
            "/get_all_keys",
            "/get_segments_detail",
            "/get_all_segments",
            "/query_key?key=k",
        ] {
            let (head, _) = get(addr, named).await;
            assert!(head.starts_with("HTTP/1.1 401"), "{named}: {head}");
            let path = named.split('?').next().unwrap();
            let proof = token.prove(&format!("GET {path}")).unwrap();
            let header = format!("{PROOF_HEADER}: {proof}\r\n");
            let (head, _) = get_with(addr, named, &header).await;
            assert!(!head.starts_with("HTTP/1.1 401"), "{named}: {head}");
            let (head, _) = get_with(addr, named, &header).await;
            assert!(head.starts_with("HTTP/1.1 401"), "a replayed proof: {head}");
        }
        server.abort();
    }
}
