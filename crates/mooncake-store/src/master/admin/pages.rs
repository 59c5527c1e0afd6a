//! The pages that name keys and segments (Mooncake's admin API): `/query_key`,
//! `/get_all_keys` (paged), `/get_all_segments`, `/get_segments_detail`.

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::{Admin, Master};

/// Keys a `/get_all_keys` page holds unless `limit` says otherwise.
pub const DEFAULT_KEYS_PAGE: usize = 1000;
/// Most keys one page holds, whatever `limit` says.
pub const MAX_KEYS_PAGE: usize = 10_000;
/// A page ends early rather than grow past this many bytes (4 KiB keys make 10,000 of them
/// 40 MB).
const MAX_PAGE_BYTES: usize = 4 << 20;
/// The header that names the `after` of the next page, percent-encoded, when there is one.
pub const NEXT_PAGE_HEADER: &str = "x-mooncake-next-after";

#[derive(serde::Deserialize)]
pub(super) struct KeyQuery {
    key: Option<String>,
}

#[derive(serde::Deserialize)]
pub(super) struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

/// Newline-separated keys in order, a page at a time: `?limit=` (default
/// [`DEFAULT_KEYS_PAGE`], at most [`MAX_KEYS_PAGE`]) after `?after=`; [`NEXT_PAGE_HEADER`]
/// names the next page's `after` while more follow.
pub(super) async fn all_keys(State(admin): State<Admin>, Query(q): Query<PageQuery>) -> Response {
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

pub(super) async fn query_key(
    State(admin): State<Admin>,
    Query(q): Query<KeyQuery>,
) -> impl IntoResponse {
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

pub(super) async fn all_segments(State(admin): State<Admin>) -> String {
    let mut names: Vec<String> = Master::lock(&admin.state)
        .segments()
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    names.sort();
    names.dedup();
    names.join("\n")
}

pub(super) async fn segments_detail(State(admin): State<Admin>) -> Json<serde_json::Value> {
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
    use std::sync::Arc;

    use mooncake_common::auth::{ClusterToken, ProofChecker};

    use super::super::test_support::{admin, get, get_with, master_with, serve};
    use super::*;
    use crate::access::PROOF_HEADER;
    use crate::master::MasterConfig;

    #[tokio::test]
    async fn all_keys_come_in_pages() {
        let (addr, server) = serve(admin(master_with(&["node-1"]))).await;

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
        server.abort();
    }

    #[tokio::test]
    async fn with_a_token_pages_that_name_keys_need_a_proof() {
        let token = ClusterToken::new("admin-pages-secret-0001").unwrap();
        let mut open = admin(Master::new(MasterConfig::default()).unwrap());
        open.proofs = Some(Arc::new(ProofChecker::new(token.clone())));
        let (addr, server) = serve(open).await;
        for open in [
            "/metrics",
            "/health",
            "/",
            "/dashboard",
            "/dashboard/data",
            "/dashboard/app.js",
            "/dashboard/app.css",
        ] {
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
