//! A running master: the gRPC service, the periodic tick, the admin HTTP server and,
//! optionally, the Transfer Engine's HTTP metadata server in the same process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_common::auth::ProofChecker;
use mooncake_common::{Error, Result};
use mooncake_metadata::http::{MetadataServer, MetadataServerConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::admin::sampler::{self, Sampler};
use super::ha::{self, HaConfig};
use super::log::disk::DiskLog;
use super::log::{Log, LogStore, SnapshotPolicy};
use super::mooncake_rpc::{self, MooncakeDoor};
use super::service::{MasterService, OpCounters, Role};
pub use super::tls::TlsFiles;
use super::{Master, MasterConfig};
use crate::access::{Guarded, Tokens};
use crate::proto::master_server::MasterServer as GrpcMaster;

/// How often the state machine's periodic work runs (Mooncake's eviction thread period).
const TICK: Duration = Duration::from_millis(10);

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct MasterServerConfig {
    /// Interface to bind. Default `127.0.0.1`: binding wider is a choice.
    pub host: String,
    /// gRPC port (0 picks one). Default 50051.
    pub rpc_port: u16,
    /// Admin HTTP port (`/metrics`, `/health`, ...); `None` disables it. Default 9003.
    pub metrics_port: Option<u16>,
    /// Interface the admin HTTP binds. Default `127.0.0.1`: its routes only read, and a
    /// Prometheus scraper elsewhere is the reason to widen it.
    pub admin_host: String,
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
    /// Port of Mooncake's own master protocol (coro_rpc), for Mooncake's C++ and Python
    /// clients; `None` disables it (default). Mooncake's clients use 50051.
    pub mooncake_rpc_port: Option<u16>,
    /// Interface Mooncake's protocol binds. Default `127.0.0.1`: its clients prove nothing.
    pub mooncake_rpc_host: String,
    /// Serve Mooncake's protocol next to a cluster token: its clients cannot prove the token,
    /// so anyone who reaches that port can mount, read, write and remove. Default false.
    pub allow_mooncake_clients: bool,
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
            host: "127.0.0.1".to_owned(),
            rpc_port: 50051,
            metrics_port: Some(9003),
            admin_host: "127.0.0.1".to_owned(),
            http_metadata_port: None,
            master: MasterConfig::default(),
            durability: Durability::Memory,
            snapshot: SnapshotPolicy::default(),
            tokens: Tokens::default(),
            tls: None,
            mooncake_rpc_port: None,
            mooncake_rpc_host: "127.0.0.1".to_owned(),
            allow_mooncake_clients: false,
        }
    }
}

/// A running master.
pub struct MasterServer {
    rpc_addr: SocketAddr,
    mooncake_rpc_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    admin_tls: bool,
    metadata: Option<MetadataServer>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl MasterServer {
    /// Binds every port and starts serving.
    pub async fn start(config: MasterServerConfig) -> Result<Self> {
        if config
            .mooncake_rpc_port
            .is_some_and(|p| p != 0 && p == config.rpc_port)
        {
            return Err(Error::invalid(format!(
                "gRPC and Mooncake's protocol cannot share port {}: move gRPC (rpcPort, \
                 --rpc-port) off Mooncake's 50051",
                config.rpc_port
            )));
        }
        if config.mooncake_rpc_port.is_some()
            && config.tokens.cluster.is_some()
            && !config.allow_mooncake_clients
        {
            return Err(Error::invalid(
                "Mooncake's clients cannot prove the cluster token: serving its protocol \
                 (mooncakeRpcPort) next to one needs allowMooncakeClients \
                 (--allow-mooncake-clients), which lets anyone who reaches that port in",
            ));
        }
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
                Master::lock(&state).ids_from_random_epoch();
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
                let ha = HaConfig {
                    token: config.tokens.cluster.clone(),
                    ..ha.clone()
                };
                Some(ha::start(
                    ha,
                    config.snapshot,
                    advertised,
                    state.clone(),
                    role_tx,
                    shutdown.clone(),
                    &tracker,
                )?)
            }
        };

        if let (Some(cluster), Some(admin)) = (&config.tokens.cluster, &config.tokens.admin) {
            if cluster.same_secret(admin) {
                return Err(Error::invalid(
                    "the admin token must differ from the cluster token, or every member is an admin",
                ));
            }
        }
        if config.tokens.cluster.is_none() && !is_loopback(&config.host) {
            tracing::warn!(
                host = %config.host,
                "the master listens beyond loopback without a cluster token: anyone who reaches \
                 it can mount, read and remove objects"
            );
        }
        let shared = MasterService::new(state.clone(), role.clone(), counters.clone());
        let mooncake_rpc_addr = match config.mooncake_rpc_port {
            None => None,
            Some(port) => {
                let host = config.mooncake_rpc_host.as_str();
                let listener = tokio::net::TcpListener::bind((host, port))
                    .await
                    .map_err(|e| {
                        Error::socket(format!("bind Mooncake's master RPC on {host}:{port}"), e)
                    })?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| Error::socket("Mooncake RPC address", e))?;
                if !is_loopback(host) {
                    tracing::warn!(
                        %addr,
                        "Mooncake's master protocol is served beyond loopback: its clients prove \
                         nothing, so anyone who reaches it can mount, read, write and remove"
                    );
                }
                let open = config.tokens.cluster.is_none() && config.tokens.admin.is_none();
                let door = Arc::new(MooncakeDoor::new(shared.clone(), open));
                tracker.spawn(mooncake_rpc::serve(
                    listener,
                    door,
                    shutdown.clone(),
                    tracker.clone(),
                ));
                Some(addr)
            }
        };
        let service = Guarded::new(GrpcMaster::new(shared), config.tokens.clone());
        // Dead and silent connections are found and dropped; no one connection may open
        // streams without end.
        let mut rpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .max_concurrent_streams(Some(1024));
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
                let host = config.admin_host.as_str();
                let listener = tokio::net::TcpListener::bind((host, port))
                    .await
                    .map_err(|e| {
                        Error::socket(format!("bind master admin HTTP on {host}:{port}"), e)
                    })?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| Error::socket("admin HTTP address", e))?;
                let sampler = Arc::new(Sampler::default());
                tracker.spawn(sampler::run(
                    sampler.clone(),
                    counters.clone(),
                    shutdown.clone(),
                ));
                let app = super::admin::routes(super::admin::Admin {
                    state,
                    counters,
                    role,
                    ha,
                    sampler,
                    views: Arc::default(),
                    proofs: config
                        .tokens
                        .cluster
                        .clone()
                        .map(|token| Arc::new(ProofChecker::new(token))),
                });
                let stop = shutdown.clone();
                match config.tls.as_ref().map(TlsFiles::acceptor).transpose()? {
                    Some(acceptor) => {
                        tracker.spawn(super::tls::serve_https(listener, acceptor, app, stop));
                    }
                    None => {
                        tracker.spawn(async move {
                            let served = axum::serve(listener, app)
                                .with_graceful_shutdown(stop.cancelled_owned())
                                .await;
                            if let Err(e) = served {
                                tracing::error!("master admin HTTP stopped: {e}");
                            }
                        });
                    }
                }
                Some(addr)
            }
        };
        let metadata = match config.http_metadata_port {
            None => None,
            Some(port) => {
                let metadata = MetadataServerConfig {
                    token: config.tokens.cluster.clone(),
                    ..MetadataServerConfig::default()
                };
                Some(MetadataServer::start_with(&config.host, port, metadata).await?)
            }
        };
        tracker.close();
        tracing::info!(%rpc_addr, ?metrics_addr, "master serving");
        Ok(Self {
            rpc_addr,
            mooncake_rpc_addr,
            metrics_addr,
            admin_tls: config.tls.is_some(),
            metadata,
            shutdown,
            tracker,
        })
    }

    /// The gRPC address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The address of Mooncake's master protocol, when enabled.
    pub fn mooncake_rpc_addr(&self) -> Option<SocketAddr> {
        self.mooncake_rpc_addr
    }

    /// The admin HTTP address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http(s)://host:port/metrics`, when the admin HTTP is enabled.
    pub fn metrics_url(&self) -> Option<String> {
        let scheme = if self.admin_tls { "https" } else { "http" };
        self.metrics_addr
            .map(|addr| format!("{scheme}://{addr}/metrics"))
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
