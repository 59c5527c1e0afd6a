//! A running master: the gRPC service, the periodic tick, the admin HTTP server and,
//! optionally, the Transfer Engine's HTTP metadata server in the same process.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use mooncake_common::{Error, Result};
use mooncake_metadata::http::MetadataServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ha::{self, HaConfig, HaStatus};
use super::log::disk::DiskLog;
use super::log::{Log, LogStore, SnapshotPolicy};
use super::service::{MasterService, OpCounters, Role};
use crate::access::{Guarded, Tokens};
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
    /// Where the metadata survives a restart. Default: nowhere.
    pub durability: Durability,
    /// When the log is replaced by a snapshot (with a durable log).
    pub snapshot: SnapshotPolicy,
    /// Tokens callers must prove. Default: none (open, as Mooncake's master is).
    pub tokens: Tokens,
    /// Serve gRPC and the admin HTTP over TLS with this certificate. Default: plain text.
    pub tls: Option<TlsFiles>,
}

/// A certificate chain and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    fn read(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| {
                Error::invalid(format!("master TLS {what} '{}': {e}", path.display()))
            })
        };
        Ok((read(&self.cert, "certificate")?, read(&self.key, "key")?))
    }

    fn grpc(&self) -> Result<tonic::transport::ServerTlsConfig> {
        let (cert, key) = self.read()?;
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key)))
    }
}

/// Whether `host` names a loopback interface only.
fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where a master keeps what it acknowledged.
#[derive(Debug, Clone, Default)]
pub enum Durability {
    /// In memory only: a restart forgets every object (Mooncake's default).
    #[default]
    Memory,
    /// A log and snapshots in a local directory, fsync'd: a restarted master recovers.
    Disk(PathBuf),
    /// High availability: masters elect a leader through etcd and keep the log there.
    Etcd(HaConfig),
}

impl Default for MasterServerConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".to_owned(),
            rpc_port: 50051,
            metrics_port: Some(9003),
            http_metadata_port: None,
            master: MasterConfig::default(),
            durability: Durability::Memory,
            snapshot: SnapshotPolicy::default(),
            tokens: Tokens::default(),
            tls: None,
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
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (role_tx, role) = watch::channel(Role::Standby);
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
        let ha = match &config.durability {
            Durability::Memory => {
                role_tx.send_replace(Role::Leader(None));
                None
            }
            Durability::Disk(dir) => {
                let log =
                    recover_from_disk(dir, config.snapshot, &state, &shutdown, &tracker).await?;
                role_tx.send_replace(Role::Leader(Some(log)));
                None
            }
            Durability::Etcd(ha) => {
                let advertised = ha.advertised(&config.host, rpc_addr.port());
                Some(ha::start(
                    ha.clone(),
                    config.snapshot,
                    advertised,
                    state.clone(),
                    role_tx,
                    shutdown.clone(),
                    &tracker,
                )?)
            }
        };

        if config.tokens.cluster.is_none() && !is_loopback(&config.host) {
            tracing::warn!(
                host = %config.host,
                "the master listens beyond loopback without a cluster token: anyone who reaches \
                 it can mount, read and remove objects"
            );
        }
        let service = Guarded::new(
            GrpcMaster::new(MasterService::new(
                state.clone(),
                role.clone(),
                counters.clone(),
            )),
            config.tokens.clone(),
        );
        let mut rpc = tonic::transport::Server::builder();
        if let Some(files) = &config.tls {
            rpc = rpc
                .tls_config(files.grpc()?)
                .map_err(|e| Error::invalid(format!("master TLS: {e}")))?;
        }
        let stop = shutdown.clone();
        tracker.spawn(async move {
            // A reply's trailers go out in a write of their own; without TCP_NODELAY they wait
            // for the client's delayed ACK (40 ms).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let served = rpc
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!("master RPC server stopped: {e}");
            }
        });

        let (ticked, stop, ticker_role) = (state.clone(), shutdown.clone(), role.clone());
        tracker.spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => {
                        let Role::Leader(log) = ticker_role.borrow().clone() else {
                            continue;
                        };
                        let mut master = Master::lock(&ticked);
                        // Again under the lock: a master that stepped down reloads under it.
                        if !matches!(*ticker_role.borrow(), Role::Leader(_)) {
                            continue;
                        }
                        master.tick(Instant::now());
                        // Evictions and dropped segments are changes too.
                        if let Some(log) = log {
                            log.submit(&mut master);
                        }
                    }
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
                let app = admin_routes(Admin {
                    state,
                    counters,
                    role,
                    ha,
                });
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

/// Loads what `dir` holds, starts its log, and makes the new epoch durable.
async fn recover_from_disk(
    dir: &std::path::Path,
    policy: SnapshotPolicy,
    state: &Arc<Mutex<Master>>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Log> {
    let store = Arc::new(DiskLog::open(dir)?);
    let recovered = store.load().await?;
    let now = Instant::now();
    let (objects, entries) = (
        recovered.snapshot.as_ref().map_or(0, |s| s.objects.len()),
        recovered.entries.len(),
    );
    {
        let mut master = Master::lock(state);
        let config = master.config().clone();
        *master = Master::recover(config, now, recovered.snapshot, recovered.entries)?;
        master.begin_epoch(now);
    }
    let log = Log::start(
        store,
        state.clone(),
        policy,
        shutdown.clone(),
        tracker,
        None,
    );
    let seq = log.submit(&mut Master::lock(state));
    if let Some(seq) = seq {
        log.durable(seq).await?;
    }
    tracing::info!(
        dir = %dir.display(),
        snapshot_objects = objects,
        entries,
        keys = Master::lock(state).keys().len(),
        "metadata recovered"
    );
    Ok(log)
}

#[derive(Clone)]
struct Admin {
    state: Arc<Mutex<Master>>,
    counters: Arc<OpCounters>,
    role: watch::Receiver<Role>,
    ha: Option<HaStatus>,
}

#[derive(serde::Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

fn admin_routes(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/query_key", get(query_key))
        .route(
            "/get_all_keys",
            get(|State(a): State<Admin>| async move { Master::lock(&a.state).keys().join("\n") }),
        )
        .route("/get_all_segments", get(all_segments))
        .route("/get_segments_detail", get(segments_detail))
        .with_state(admin)
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
