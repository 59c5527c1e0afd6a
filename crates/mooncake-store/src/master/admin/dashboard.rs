//! The live dashboard: a static page, script and stylesheet built into the binary (nothing
//! from elsewhere: no CDN, no fonts), and `/dashboard/data`, the JSON the page polls. It shows
//! what `/metrics` shows openly (segment names, counts, rates) and never keys or client ids;
//! the rails the clients report with their pings are shown by node, named by its segments.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::super::service::Role;
use super::super::{MasterStats, NodeRails, SegmentReport};
use super::sampler::{Rates, Totals};
use super::{segments_by_name, Admin, Master};

const PAGE: &str = include_str!("dashboard.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");

/// The page loads its script, stylesheet and data from this origin and nothing else; no
/// inline script or style runs, and no other site may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
        .route("/dashboard/data", get(data))
}

/// `body` as `content_type`, with the headers every dashboard response carries.
fn guarded(content_type: &'static str, body: impl IntoResponse) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    (headers, body).into_response()
}

async fn page() -> Response {
    guarded("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    guarded("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    guarded("text/css; charset=utf-8", STYLE)
}

/// What the dashboard shows, as of now.
#[derive(Debug, serde::Serialize)]
struct Snapshot {
    role: &'static str,
    service_ready: bool,
    keys: u64,
    soft_pinned_keys: u64,
    active_clients: u64,
    allocated_bytes: u64,
    capacity_bytes: u64,
    evicted_keys: u64,
    evicted_bytes: u64,
    eviction_rounds: u64,
    /// Since the master started: reads, and reads that found their object.
    gets: u64,
    hits: u64,
    put_bytes: u64,
    get_bytes: u64,
    /// One per segment name, by name.
    segments: Vec<SegmentUse>,
    /// The rails of each node that reported any, by node name.
    rails: Vec<NodeRailsView>,
    rates: Rates,
    ha: Option<HaSnapshot>,
}

#[derive(Debug, serde::Serialize)]
struct SegmentUse {
    name: String,
    used: u64,
    capacity: u64,
}

#[derive(Debug, serde::Serialize)]
struct NodeRailsView {
    /// Its segment names; `None` for clients that mount no segment.
    node: Option<String>,
    rails: Vec<RailView>,
}

#[derive(Debug, serde::Serialize)]
struct RailView {
    peer: String,
    local: String,
    remote: String,
    state: &'static str,
    bytes: u64,
    failures: u64,
}

impl From<NodeRails> for NodeRailsView {
    fn from(node: NodeRails) -> Self {
        Self {
            node: node.node,
            rails: node
                .rails
                .into_iter()
                .map(|r| RailView {
                    peer: r.peer,
                    local: r.local,
                    remote: r.remote,
                    state: r.state.name(),
                    bytes: r.bytes,
                    failures: r.failures,
                })
                .collect(),
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct HaSnapshot {
    leader: Option<String>,
    view_version: i64,
    leader_seq: u64,
    lag: u64,
    failovers: u64,
}

/// How long one read of the master's state serves the dashboard's polls.
const STATE_VIEW_TTL: Duration = Duration::from_secs(1);

/// What the dashboard reads under the master's state lock.
struct StateView {
    stats: MasterStats,
    segments: Vec<SegmentReport>,
    rails: Vec<NodeRails>,
    applied: u64,
}

/// The dashboard's reads of the master's state: at most one a second however many pages poll
/// (counting soft-pinned objects walks them all), each on a blocking thread, so that a lock
/// held long (a snapshot of a large pool) never holds up the async workers.
pub(crate) struct StateViews {
    ttl: Duration,
    latest: tokio::sync::Mutex<Option<(Instant, Arc<StateView>)>>,
}

impl Default for StateViews {
    fn default() -> Self {
        Self::with_ttl(STATE_VIEW_TTL)
    }
}

impl StateViews {
    fn with_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            latest: tokio::sync::Mutex::new(None),
        }
    }

    async fn get(&self, state: &Arc<Mutex<Master>>) -> Option<Arc<StateView>> {
        let mut latest = self.latest.lock().await;
        if let Some((at, view)) = latest.as_ref() {
            if at.elapsed() < self.ttl {
                return Some(view.clone());
            }
        }
        let state = state.clone();
        let view = tokio::task::spawn_blocking(move || {
            let master = Master::lock(&state);
            StateView {
                stats: master.stats(Instant::now()),
                segments: master.segments(),
                rails: master.rails_by_node(),
                applied: master.last_seq(),
            }
        })
        .await
        .ok()?;
        let view = Arc::new(view);
        *latest = Some((Instant::now(), view.clone()));
        Some(view)
    }
}

async fn data(State(admin): State<Admin>) -> Response {
    let Some(view) = admin.views.get(&admin.state).await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let StateView {
        stats,
        segments,
        rails,
        applied,
    } = &*view;
    let applied = *applied;
    let role = admin.role.borrow().clone();
    let totals = Totals::of(&admin.counters);
    let snapshot = Snapshot {
        role: match role {
            Role::Leader(_) => "leader",
            Role::Standby => "standby",
        },
        service_ready: matches!(role, Role::Leader(_)),
        keys: stats.keys,
        soft_pinned_keys: stats.soft_pinned_keys,
        active_clients: stats.active_clients,
        allocated_bytes: stats.allocated_bytes,
        capacity_bytes: stats.capacity_bytes,
        evicted_keys: stats.evicted_keys,
        evicted_bytes: stats.evicted_bytes,
        eviction_rounds: stats.eviction_rounds,
        gets: totals.gets,
        hits: totals.hits,
        put_bytes: totals.put_bytes,
        get_bytes: totals.get_bytes,
        segments: segments_by_name(segments)
            .into_iter()
            .map(|(name, (used, capacity))| SegmentUse {
                name: name.to_owned(),
                used,
                capacity,
            })
            .collect(),
        rails: rails.iter().cloned().map(NodeRailsView::from).collect(),
        rates: admin.sampler.rates(),
        ha: admin.ha.as_ref().map(|ha| {
            let view = ha.snapshot();
            HaSnapshot {
                leader: view.leader,
                view_version: view.view_version,
                leader_seq: view.leader_seq,
                lag: view.leader_seq.saturating_sub(applied),
                failovers: view.promotions,
            }
        }),
    };
    guarded("application/json", Json(snapshot))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::super::ha::HaStatus;
    use super::super::test_support::{admin, get, master_with, serve};
    use super::*;
    use crate::master::types::{
        ClientId, RailReport, RailState, SegmentId, SegmentSpec, WriteConfig,
    };
    use crate::master::MasterConfig;

    #[tokio::test]
    async fn every_part_comes_with_a_policy_that_allows_only_this_origin() {
        let (addr, server) = serve(admin(Master::new(MasterConfig::default()).unwrap())).await;
        for (path, kind) in [
            ("/", "text/html"),
            ("/dashboard", "text/html"),
            ("/dashboard/app.js", "text/javascript"),
            ("/dashboard/app.css", "text/css"),
            ("/dashboard/data", "application/json"),
        ] {
            let (head, _) = get(addr, path).await;
            let head = head.to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
            assert!(
                head.contains(&format!("content-type: {kind}")),
                "{path}: {head}"
            );
            assert_eq!(head.matches("content-type:").count(), 1, "{path}: {head}");
            assert!(
                head.contains("x-content-type-options: nosniff"),
                "{path}: {head}"
            );
            assert!(
                head.contains("content-security-policy: default-src 'none'"),
                "{path}: {head}"
            );
        }
        server.abort();
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [("page", PAGE), ("script", SCRIPT), ("style", STYLE)] {
            for outside in ["http://", "https://", "//", "@import", "url("] {
                let found = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .any(|l| l.contains(outside) && !l.contains("http://www.w3.org/2000/svg"));
                assert!(!found, "the {name} names {outside}");
            }
        }
        assert!(!PAGE.contains("<style"), "inline style would be refused");
        assert!(!PAGE.contains("<script>"), "inline script would be refused");
    }

    #[tokio::test]
    async fn the_data_names_segments_and_counts_but_no_keys() {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let (now, client) = (Instant::now(), ClientId(7));
        for (id, name) in [(1, "node-a"), (2, "node-a"), (3, "node \"b\"")] {
            let spec = SegmentSpec {
                id: SegmentId(id),
                name: name.into(),
                base: 0x1000_0000 * id as u64,
                size: 16 << 20,
                te_endpoint: "127.0.0.1:1".into(),
                protocol: "tcp".into(),
                host_id: "host".into(),
            };
            master.mount_segment(now, client, spec).unwrap();
        }
        let config = WriteConfig::default();
        for i in 0..3 {
            let key = format!("secret-key-{i}");
            let grant = master.put_start(now, client, &key, 4096, &config).unwrap();
            master.put_end(now, client, &key, grant.write).unwrap();
        }
        let admin = admin(master);
        admin.counters.count("get_replica_list", 4, 1);
        let (addr, server) = serve(admin).await;
        let (_, body) = get(addr, "/dashboard/data").await;
        assert!(!body.contains("secret-key"), "{body}");
        let data: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(data["keys"], 3);
        assert_eq!(data["gets"], 4);
        assert_eq!(data["hits"], 3);
        assert_eq!(data["role"], "leader");
        let segments = data["segments"].as_array().unwrap();
        assert_eq!(segments.len(), 2, "{body}");
        assert_eq!(segments[0]["name"], "node \"b\"");
        assert_eq!(segments[1]["name"], "node-a");
        assert_eq!(segments[1]["capacity"], 32 << 20);
        assert!(data["ha"].is_null());
        server.abort();
    }

    #[tokio::test]
    async fn the_data_shows_rails_by_node_and_no_client_ids() {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let (now, client) = (Instant::now(), ClientId(0xdead_beef_cafe));
        let spec = SegmentSpec {
            id: SegmentId(1),
            name: "node-a".into(),
            base: 0x1000_0000,
            size: 16 << 20,
            te_endpoint: "127.0.0.1:1".into(),
            protocol: "tcp".into(),
            host_id: "host".into(),
        };
        master.mount_segment(now, client, spec).unwrap();
        let rail = |local: &str, state| RailReport {
            peer: "node-b".into(),
            local: local.into(),
            remote: "10.0.0.2:9000".into(),
            state,
            bytes: 3 << 20,
            failures: 2,
        };
        master.report_rails(
            client,
            [
                rail("eth1", RailState::Paused),
                rail("eth0", RailState::Usable),
            ],
        );
        let (addr, server) = serve(admin(master)).await;
        let (_, body) = get(addr, "/dashboard/data").await;
        for id in [client.0.to_string(), format!("{:x}", client.0)] {
            assert!(!body.to_ascii_lowercase().contains(&id), "{body}");
        }
        let data: serde_json::Value = serde_json::from_str(&body).unwrap();
        let nodes = data["rails"].as_array().unwrap();
        assert_eq!(nodes.len(), 1, "{body}");
        assert_eq!(nodes[0]["node"], "node-a");
        let rails = nodes[0]["rails"].as_array().unwrap();
        assert_eq!(rails[0]["local"], "eth0");
        assert_eq!(rails[0]["state"], "usable");
        assert_eq!(rails[1]["state"], "paused");
        assert_eq!(rails[1]["peer"], "node-b");
        assert_eq!(rails[1]["remote"], "10.0.0.2:9000");
        assert_eq!(rails[1]["bytes"], 3 << 20);
        assert_eq!(rails[1]["failures"], 2);
        server.abort();
    }

    #[tokio::test]
    async fn with_ha_the_data_names_the_leader_and_the_lag() {
        let mut admin = admin(Master::new(MasterConfig::default()).unwrap());
        admin.ha = Some(HaStatus::default());
        let (addr, server) = serve(admin).await;
        let (_, body) = get(addr, "/dashboard/data").await;
        let data: serde_json::Value = serde_json::from_str(&body).unwrap();
        for field in ["leader", "view_version", "leader_seq", "lag", "failovers"] {
            assert!(data["ha"].get(field).is_some(), "{field} in {body}");
        }
        server.abort();
    }

    #[tokio::test]
    async fn polls_share_one_read_of_the_state_until_it_is_old() {
        let state = Arc::new(Mutex::new(master_with(&["node-1"])));
        let remove_one = || {
            let mut master = Master::lock(&state);
            master.remove(Instant::now(), "key/00", true).unwrap();
        };

        let shared = StateViews::with_ttl(Duration::from_secs(3600));
        let first = shared.get(&state).await.expect("a view");
        assert_eq!(first.stats.keys, 25);
        remove_one();
        let again = shared.get(&state).await.expect("a view");
        assert!(Arc::ptr_eq(&first, &again), "the state was read again");

        let fresh = StateViews::with_ttl(Duration::ZERO);
        assert_eq!(fresh.get(&state).await.expect("a view").stats.keys, 24);
    }
}
