//! A running master: the gRPC service, the periodic tick, the admin HTTP server and,
//! optionally, the Transfer Engine's HTTP metadata server in the same process.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use mooncake_common::{Error, Result};
use mooncake_metadata::http::MetadataServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::service::{MasterService, OpCounters};
use super::{Master, MasterConfig};
use crate::proto::master_server::MasterServer as GrpcMaster;

/// How often the state machine's periodic work runs (Mooncake's eviction thread period).
const TICK: Duration = Duration::from_millis(10);

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct MasterServerConfig {
    /// Interface to bind. Default `0.0.0.0`.
    pub host: String,
    /// gRPC port (0 picks one). Default 50051.
    pub rpc_port: u16,
    /// Admin HTTP port (`/metrics`, `/health`, ...); `None` disables it. Default 9003.
    pub metrics_port: Option<u16>,
    /// Port of the embedded Transfer Engine metadata server; `None` disables it (default).
    pub http_metadata_port: Option<u16>,
    /// The state machine's configuration.
    pub master: MasterConfig,
}

impl Default for MasterServerConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".to_owned(),
            rpc_port: 50051,
            metrics_port: Some(9003),
            http_metadata_port: None,
            master: MasterConfig::default(),
        }
    }
}

/// A running master.
pub struct MasterServer {
    rpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    metadata: Option<MetadataServer>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl MasterServer {
    /// Binds every port and starts serving.
    pub async fn start(config: MasterServerConfig) -> Result<Self> {
        let state = Arc::new(Mutex::new(Master::new(config.master.clone())?));
        let counters = Arc::new(OpCounters::default());
        let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.rpc_port))
            .await
            .map_err(|e| {
                Error::socket(
                    format!("bind master RPC on {}:{}", config.host, config.rpc_port),
                    e,
                )
            })?;
        let rpc_addr = listener
            .local_addr()
            .map_err(|e| Error::socket("master RPC address", e))?;
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();

        let service = GrpcMaster::new(MasterService::new(state.clone(), counters.clone()));
        let stop = shutdown.clone();
        tracker.spawn(async move {
            // A reply's trailers go out in a write of their own; without TCP_NODELAY they wait
            // for the client's delayed ACK (40 ms).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!("master RPC server stopped: {e}");
            }
        });

        let (ticked, stop) = (state.clone(), shutdown.clone());
        tracker.spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => lock(&ticked).tick(Instant::now()),
                }
            }
        });

        let metrics_addr = match config.metrics_port {
            None => None,
            Some(port) => {
                let listener = tokio::net::TcpListener::bind((config.host.as_str(), port))
                    .await
                    .map_err(|e| {
                        Error::socket(
                            format!("bind master admin HTTP on {}:{port}", config.host),
                            e,
                        )
                    })?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| Error::socket("admin HTTP address", e))?;
                let app = admin_routes(Admin { state, counters });
                let stop = shutdown.clone();
                tracker.spawn(async move {
                    let served = axum::serve(listener, app)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await;
                    if let Err(e) = served {
                        tracing::error!("master admin HTTP stopped: {e}");
                    }
                });
                Some(addr)
            }
        };
        let metadata = match config.http_metadata_port {
            None => None,
            Some(port) => Some(MetadataServer::start(&config.host, port).await?),
        };
        tracker.close();
        tracing::info!(%rpc_addr, ?metrics_addr, "master serving");
        Ok(Self {
            rpc_addr,
            metrics_addr,
            metadata,
            shutdown,
            tracker,
        })
    }

    /// The gRPC address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The admin HTTP address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The embedded metadata server's URL, when enabled.
    pub fn metadata_url(&self) -> Option<String> {
        self.metadata.as_ref().map(|m| m.url())
    }

    /// Stops every server and task.
    pub async fn close(self) {
        self.shutdown.cancel();
        self.tracker.wait().await;
        if let Some(metadata) = self.metadata {
            metadata.close().await;
        }
    }
}

fn lock(state: &Mutex<Master>) -> std::sync::MutexGuard<'_, Master> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
struct Admin {
    state: Arc<Mutex<Master>>,
    counters: Arc<OpCounters>,
}

#[derive(serde::Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

fn admin_routes(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/health",
            get(|| async {
                Json(serde_json::json!({ "status": "ok", "role": "leader", "service_ready": true }))
            }),
        )
        .route("/query_key", get(query_key))
        .route(
            "/get_all_keys",
            get(|State(a): State<Admin>| async move { lock(&a.state).keys().join("\n") }),
        )
        .route("/get_all_segments", get(all_segments))
        .route("/get_segments_detail", get(segments_detail))
        .with_state(admin)
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let (stats, segments) = {
        let master = lock(&admin.state);
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
    let _ = writeln!(out, "# TYPE segment_allocated_bytes gauge");
    for s in &segments {
        let _ = writeln!(
            out,
            "segment_allocated_bytes{{segment=\"{}\"}} {}",
            s.spec.name, s.used
        );
    }
    let _ = writeln!(out, "# TYPE segment_total_capacity_bytes gauge");
    for s in &segments {
        let _ = writeln!(
            out,
            "segment_total_capacity_bytes{{segment=\"{}\"}} {}",
            s.spec.name, s.capacity
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
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
    match lock(&admin.state).query_key(&key) {
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
    let mut names: Vec<String> = lock(&admin.state)
        .segments()
        .into_iter()
        .map(|s| s.spec.name)
        .collect();
    names.sort();
    names.dedup();
    names.join("\n")
}

async fn segments_detail(State(admin): State<Admin>) -> Json<serde_json::Value> {
    let segments = lock(&admin.state).segments();
    Json(serde_json::json!({
        "total_segments": segments.len(),
        "segments": segments.iter().map(|s| serde_json::json!({
            "segment_name": s.spec.name,
            "segment_id": format!("{:032x}", s.spec.id.0),
            "client_id": format!("{:032x}", s.client.0),
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
