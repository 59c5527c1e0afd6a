//! The client's side of the master RPC: timeouts, failures mapped to store codes, and, with
//! `etcd://` addresses, following the leader.
//!
//! An `etcd://h1:2379;h2:2379` address names a cluster of masters: the client reads the
//! leader from `mooncake-store/<cluster_id>/master_view` (the cluster id comes from
//! `MC_STORE_CLUSTER_ID`, default `mooncake_cluster`, as in Mooncake). When a call fails
//! because the leader died or stepped down, the client finds the new leader and, where that is
//! safe, calls again: reads, mounts, and the ends of writes (which name their write id) are
//! idempotent; write starts and removals are repeated only when they surely did not run.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mooncake_common::auth::ClusterToken;
use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::etcd::EtcdStore;
use mooncake_metadata::MetadataStore;
use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use super::mooncake_master::MooncakeBridge;
use crate::access::{view_address, Prover, Tokens};
use crate::master::ha::validate_cluster_id;
use crate::master::log::etcd::ClusterKeys;
use crate::proto::master_client::MasterClient as Grpc;
use crate::proto::master_server::MasterServer as GrpcMaster;
use crate::wire::{from_status, STORE_VERSION};

/// How long a call keeps looking for a new leader: a lease (5 s) running out, an election
/// and a catch-up, with room to spare.
const FAILOVER_BUDGET: Duration = Duration::from_secs(20);
/// Between two reads of the view while no new leader is there.
const VIEW_POLL: Duration = Duration::from_millis(100);
/// Between two reads of the view in the background.
const VIEW_WATCH: Duration = Duration::from_millis(250);

/// How calls reach a master: a gRPC channel, or, for `mooncake://` addresses, the adapter
/// that answers them by calling Mooncake's own master.
type Transport = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    TransportError,
>;

/// A gRPC channel's failure (the adapter never fails below the RPC).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TransportError(tonic::transport::Error);

/// A master client's channel, each call signed with the client's tokens.
type Rpc = Grpc<InterceptedService<Transport, Prover>>;

/// Addresses of Mooncake's own masters start with this.
const MOONCAKE_SCHEME: &str = "mooncake://";

/// What a client shows a master.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Tokens to prove.
    pub tokens: Tokens,
    /// Speak TLS, trusting the certificate authorities in this PEM file.
    pub tls_ca: Option<std::path::PathBuf>,
}

/// A connection to the master (or to whichever master leads).
#[derive(Clone)]
pub struct MasterClient {
    inner: Arc<Inner>,
}

struct Inner {
    timeout: Duration,
    prover: Prover,
    /// PEM of the authorities a TLS master's certificate must chain to.
    tls_ca: Option<Vec<u8>>,
    /// Where the leader is written, for `etcd://` addresses.
    view: Option<View>,
    /// The master in use and its channel.
    current: RwLock<(String, Rpc)>,
    /// Signalled when calls move to a new leader.
    moved: tokio::sync::Notify,
    /// Counts moves: a call in flight to a master that is no longer the leader is abandoned.
    generation: tokio::sync::watch::Sender<u64>,
}

struct View {
    etcd: EtcdStore,
    key: String,
    /// With a cluster token, only a view a member signed is followed.
    token: Option<ClusterToken>,
}

impl MasterClient {
    /// Connects to `address` (`host:port`, or `etcd://h1:2379;h2:2379` for an HA cluster)
    /// and checks the master's version.
    pub async fn connect(
        address: &str,
        timeout: Duration,
        credentials: Credentials,
    ) -> Result<Self> {
        let tls_ca = credentials
            .tls_ca
            .as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|e| {
                    Error::invalid(format!("master TLS CA file '{}': {e}", path.display()))
                })
            })
            .transpose()?;
        let prover = Prover::new(credentials.tokens.clone());
        let view = if address.trim().starts_with("etcd://") {
            let cluster_id = std::env::var("MC_STORE_CLUSTER_ID")
                .unwrap_or_else(|_| "mooncake_cluster".to_owned());
            validate_cluster_id(&cluster_id)?;
            Some(View {
                etcd: EtcdStore::new(address)?,
                key: ClusterKeys::new(&cluster_id).view(),
                token: credentials.tokens.cluster.clone(),
            })
        } else {
            None
        };
        let leader = match &view {
            None => address.to_owned(),
            Some(view) => {
                view.wait_for_leader(None, timeout.max(FAILOVER_BUDGET))
                    .await?
            }
        };
        let rpc = rpc(&leader, timeout, &prover, tls_ca.as_deref())?;
        let client = Self {
            inner: Arc::new(Inner {
                timeout,
                prover,
                tls_ca,
                view,
                current: RwLock::new((leader.clone(), rpc)),
                moved: tokio::sync::Notify::new(),
                generation: tokio::sync::watch::Sender::new(0),
            }),
        };
        if client.inner.view.is_some() {
            tokio::spawn(watch_view(Arc::downgrade(&client.inner)));
        }
        let version = client
            .call(
                crate::proto::ServiceReadyRequest {},
                |mut g, r| async move { g.service_ready(r).await },
            )
            .await?
            .version;
        if version != STORE_VERSION {
            return Err(Error::new(
                ErrorKind::InvalidVersion,
                format!("master at {leader} speaks '{version}', this client '{STORE_VERSION}'"),
            ));
        }
        Ok(client)
    }

    /// Whether the master is Mooncake's own (`mooncake://`), which lacks this project's
    /// extensions (reservations).
    pub fn is_mooncakes(&self) -> bool {
        self.address().trim().starts_with(MOONCAKE_SCHEME)
    }

    /// The master in use.
    pub fn address(&self) -> String {
        self.current().0
    }

    /// Counts the moves to a new leader so far: an answer from before a move (a replica list,
    /// a write grant) may describe space the new leader has since given to something else.
    pub fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    /// Resolves once calls have moved to a new leader (which knows nothing of this client
    /// until it mounts again).
    pub async fn moved(&self) {
        self.inner.moved.notified().await;
    }

    /// Runs one idempotent RPC; after a failover, again on the new leader.
    pub async fn call<Req, T, F, Fut>(&self, request: Req, rpc: F) -> Result<T>
    where
        Req: Clone,
        F: Fn(Rpc, Req) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.run(request, rpc, true).await
    }

    /// Runs one RPC that must not run twice: repeated only when it surely did not run (the
    /// master refused it, or no connection was made).
    pub async fn call_once<Req, T, F, Fut>(&self, request: Req, rpc: F) -> Result<T>
    where
        Req: Clone,
        F: Fn(Rpc, Req) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.run(request, rpc, false).await
    }

    async fn run<Req, T, F, Fut>(&self, request: Req, rpc: F, idempotent: bool) -> Result<T>
    where
        Req: Clone,
        F: Fn(Rpc, Req) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        loop {
            let (address, grpc) = self.current();
            let (error, unrun) = match self.once(grpc, request.clone(), &rpc).await {
                Ok(reply) => return Ok(reply),
                Err(failed) => failed,
            };
            let Some(view) = &self.inner.view else {
                return Err(error);
            };
            let leader_lost = unrun
                || matches!(
                    error.kind(),
                    ErrorKind::RpcFail
                        | ErrorKind::RpcTimeout
                        | ErrorKind::UnavailableInCurrentStatus
                );
            let left = FAILOVER_BUDGET.saturating_sub(started.elapsed());
            tracing::debug!(%address, elapsed = ?started.elapsed(), "master call failed: {error}");
            if !leader_lost || left.is_zero() {
                return Err(error);
            }
            let leader = view.wait_for_leader(Some(&address), left).await;
            if let Ok(leader) = &leader {
                self.inner.follow(leader)?;
            }
            if !(idempotent || unrun) || leader.is_err() {
                return Err(error);
            }
        }
    }

    fn current(&self) -> (String, Rpc) {
        self.inner.current()
    }

    /// One RPC, mapping transport failures to `ERR_RPC_FAIL` / `ERR_RPC_TIMEOUT` and
    /// whole-call refusals to their stable codes; a failure comes with whether the call
    /// surely did not run (the master refused it, or no connection was made).
    async fn once<Req, T, F, Fut>(
        &self,
        grpc: Rpc,
        request: Req,
        rpc: &F,
    ) -> std::result::Result<T, (Error, bool)>
    where
        F: Fn(Rpc, Req) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let timeout = self.inner.timeout;
        let mut generation = self.inner.generation.subscribe();
        generation.mark_unchanged();
        let call = tokio::time::timeout(timeout + Duration::from_millis(100), rpc(grpc, request));
        let reply = tokio::select! {
            reply = call => reply.map_err(|_| {
                let e = Error::new(
                    ErrorKind::RpcTimeout,
                    format!("master did not answer within {timeout:?}"),
                );
                (e, false)
            })?,
            // The leader changed under the call (a frozen master's reply must not count).
            _ = generation.changed() => {
                let e = Error::new(ErrorKind::RpcFail, "the master leader changed during the call");
                return Err((e, false));
            }
        };
        match reply {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                let error = from_status(&status);
                let refused = error.kind() == ErrorKind::UnavailableInCurrentStatus;
                let not_connected = status.code() == tonic::Code::Unavailable
                    && status.message().contains("connect error");
                Err((error, refused || not_connected))
            }
        }
    }
}

impl Inner {
    fn current(&self) -> (String, Rpc) {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Moves calls to `leader` (nothing when they already go there).
    fn follow(&self, leader: &str) -> Result<()> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.0 == leader {
            return Ok(());
        }
        tracing::info!(from = %current.0, to = %leader, "following the new master leader");
        let rpc = rpc(leader, self.timeout, &self.prover, self.tls_ca.as_deref())?;
        *current = (leader.to_owned(), rpc);
        drop(current);
        self.generation.send_modify(|g| *g += 1);
        self.moved.notify_one();
        Ok(())
    }
}

/// Reads the view a few times a second and moves calls to a new leader as soon as it
/// appears, cutting short calls still waiting on the old one. Ends with the client.
async fn watch_view(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(VIEW_WATCH).await;
        let Some(inner) = inner.upgrade() else { return };
        let Some(view) = &inner.view else { return };
        if let Ok(Some(leader)) = view.etcd.get(&view.key).await {
            if let Err(e) = inner.follow(&leader) {
                tracing::warn!("master leader '{leader}': {e}");
            }
        }
    }
}

impl View {
    /// The leader's address, within `budget`. When it is still `not` (the master that just
    /// failed: it may recover, or its lease has not run out yet), after a short pause.
    async fn wait_for_leader(&self, not: Option<&str>, budget: Duration) -> Result<String> {
        let deadline = Instant::now() + budget;
        loop {
            let leader = self.etcd.get(&self.key).await;
            if let Ok(Some(value)) = &leader {
                let address = view_address(value, &self.key, self.token.as_ref())?;
                if Some(address.as_str()) == not {
                    tokio::time::sleep(VIEW_POLL).await;
                }
                return Ok(address);
            }
            if Instant::now() + VIEW_POLL >= deadline {
                return Err(match leader {
                    Err(e) => e,
                    Ok(_) => Error::new(
                        ErrorKind::RpcFail,
                        format!("no master leads (no '{}' in etcd)", self.key),
                    ),
                });
            }
            tokio::time::sleep(VIEW_POLL).await;
        }
    }
}

fn rpc(address: &str, timeout: Duration, prover: &Prover, tls_ca: Option<&[u8]>) -> Result<Rpc> {
    let transport = match address.trim().strip_prefix(MOONCAKE_SCHEME) {
        Some(host_port) => {
            if tls_ca.is_some() {
                return Err(Error::invalid(
                    "Mooncake's master protocol has no TLS: a TLS CA cannot be used with a \
                     mooncake:// address",
                ));
            }
            let bridge = MooncakeBridge::new(host_port, timeout);
            let service = GrpcMaster::new(bridge);
            BoxCloneSyncService::new(ServiceExt::<http::Request<tonic::body::Body>>::map_err(
                service,
                |never: std::convert::Infallible| -> TransportError { match never {} },
            ))
        }
        None => {
            BoxCloneSyncService::new(channel(address, timeout, tls_ca)?.map_err(TransportError))
        }
    };
    Ok(Grpc::with_interceptor(transport, prover.clone()))
}

fn channel(address: &str, timeout: Duration, tls_ca: Option<&[u8]>) -> Result<Channel> {
    let scheme = if tls_ca.is_some() { "https" } else { "http" };
    if tls_ca.is_some() && address.starts_with("http://") {
        return Err(Error::invalid(format!(
            "master address '{address}' says plain text, but a TLS CA was given"
        )));
    }
    let uri = if address.contains("://") {
        address.to_owned()
    } else {
        format!("{scheme}://{address}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("master address '{address}': {e}"),
            )
        })?
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .tcp_nodelay(true);
    let endpoint = match tls_ca {
        None => endpoint,
        Some(pem) => endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| Error::invalid(format!("master TLS: {e}")))?,
    };
    Ok(endpoint.connect_lazy())
}
