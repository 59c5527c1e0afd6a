//! `MasterServer`.

use mooncake_store::access::Tokens;
use mooncake_store::master::server::TlsFiles;
use mooncake_store::master::{
    AllocationStrategy, Durability, HaConfig, MasterServer, MasterServerConfig,
};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio::sync::Mutex;

use crate::convert::{millis, KeepAlive};
use crate::error::{invalid, IntoNapi};

/// Options of `MasterServer.start`.
#[napi(object)]
pub struct MasterOptions {
    /// Interface to bind (default 127.0.0.1).
    pub host: Option<String>,
    /// gRPC port; 0 picks one (default 50051).
    pub rpc_port: Option<u32>,
    /// Admin HTTP port (`/metrics`, ...); 0 picks one (default 9003); -1 disables it.
    pub metrics_port: Option<i32>,
    /// Interface the admin HTTP binds (default 127.0.0.1).
    pub admin_host: Option<String>,
    /// Run the Transfer Engine HTTP metadata server in the same process (default false).
    pub http_metadata_server: Option<bool>,
    /// Its port; 0 picks one (default 8080).
    pub http_metadata_port: Option<u32>,
    /// Read lease, ms (default 10000).
    pub default_kv_lease_ttl_ms: Option<f64>,
    /// Default soft pin TTL, ms (default 30 min).
    pub default_kv_soft_pin_ttl_ms: Option<f64>,
    /// Longest soft pin, ms (default 24 h).
    pub max_kv_soft_pin_ttl_ms: Option<f64>,
    /// Whether eviction's second pass may take soft-pinned objects (default true).
    pub allow_evict_soft_pinned_objects: Option<bool>,
    /// Fraction evicted per round (default 0.05).
    pub eviction_ratio: Option<f64>,
    /// Usage above which eviction runs (default 0.90).
    pub eviction_high_watermark_ratio: Option<f64>,
    /// A client silent this long is dead, ms (default 10000).
    pub client_ttl_ms: Option<f64>,
    /// An unfinished write younger than this is not preempted, ms (default 30000).
    pub put_start_discard_timeout_ms: Option<f64>,
    /// Space of abandoned writes is freed this long after their start, ms (default 600000).
    pub put_start_release_timeout_ms: Option<f64>,
    /// `random` (default), `free_ratio_first` or `local_first`.
    pub allocation_strategy: Option<String>,
    /// Keep the metadata log and snapshots in this directory: a restarted master recovers
    /// every acknowledged object.
    pub data_dir: Option<String>,
    /// High availability: elect a leader through etcd and keep the metadata log there.
    pub enable_ha: Option<bool>,
    /// etcd endpoints, `h1:2379;h2:2379` (with `enableHa`).
    pub etcd_endpoints: Option<String>,
    /// Masters of one cluster share it (default `mooncake_cluster`).
    pub cluster_id: Option<String>,
    /// The address clients reach this master at, advertised through etcd (default: host and
    /// port, 127.0.0.1 for an unspecified host).
    pub advertise_address: Option<String>,
    /// Every call must prove this token (default `MC_CLUSTER_TOKEN`; an empty string means
    /// none: the master is open, as Mooncake's is).
    pub cluster_token: Option<String>,
    /// `removeAll` and `removeByRegex` must prove this token (default `MC_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Serve gRPC and the admin HTTP over TLS: a PEM certificate chain...
    pub tls_cert: Option<String>,
    /// ...and its PEM private key.
    pub tls_key: Option<String>,
    /// Also serve Mooncake's own master protocol on this port, for Mooncake's Python and C++
    /// clients (they use 50051); 0 picks one. Default: off.
    pub mooncake_rpc_port: Option<u32>,
    /// Interface Mooncake's protocol binds (default 127.0.0.1): its clients prove no token.
    pub mooncake_rpc_host: Option<String>,
    /// Serve Mooncake's protocol next to a cluster token, which its clients cannot prove
    /// (default false).
    pub allow_mooncake_clients: Option<bool>,
}

impl MasterOptions {
    fn into_config(self) -> Result<MasterServerConfig> {
        let port = |p: u32, what: &str| {
            u16::try_from(p).map_err(|_| invalid(format!("{what} must be within 0-65535")))
        };
        let mut config = MasterServerConfig {
            host: self.host.unwrap_or_else(|| "127.0.0.1".to_owned()),
            admin_host: self.admin_host.unwrap_or_else(|| "127.0.0.1".to_owned()),
            ..MasterServerConfig::default()
        };
        if let Some(p) = self.rpc_port {
            config.rpc_port = port(p, "rpcPort")?;
        }
        config.mooncake_rpc_port = self
            .mooncake_rpc_port
            .map(|p| port(p, "mooncakeRpcPort"))
            .transpose()?;
        if let Some(host) = self.mooncake_rpc_host {
            config.mooncake_rpc_host = host;
        }
        config.allow_mooncake_clients = self.allow_mooncake_clients.unwrap_or(false);
        config.metrics_port = match self.metrics_port {
            None => Some(9003),
            Some(p) if p < 0 => None,
            Some(p) => Some(port(p as u32, "metricsPort")?),
        };
        if self.http_metadata_server.unwrap_or(false) {
            config.http_metadata_port = Some(port(
                self.http_metadata_port.unwrap_or(8080),
                "httpMetadataPort",
            )?);
        }
        let m = &mut config.master;
        millis(
            self.default_kv_lease_ttl_ms,
            "defaultKvLeaseTtlMs",
            &mut m.default_kv_lease_ttl,
        )?;
        millis(
            self.default_kv_soft_pin_ttl_ms,
            "defaultKvSoftPinTtlMs",
            &mut m.default_kv_soft_pin_ttl,
        )?;
        millis(
            self.max_kv_soft_pin_ttl_ms,
            "maxKvSoftPinTtlMs",
            &mut m.max_kv_soft_pin_ttl,
        )?;
        millis(self.client_ttl_ms, "clientTtlMs", &mut m.client_ttl)?;
        millis(
            self.put_start_discard_timeout_ms,
            "putStartDiscardTimeoutMs",
            &mut m.put_start_discard_timeout,
        )?;
        millis(
            self.put_start_release_timeout_ms,
            "putStartReleaseTimeoutMs",
            &mut m.put_start_release_timeout,
        )?;
        if let Some(allow) = self.allow_evict_soft_pinned_objects {
            m.allow_evict_soft_pinned_objects = allow;
        }
        if let Some(r) = self.eviction_ratio {
            m.eviction_ratio = r;
        }
        if let Some(r) = self.eviction_high_watermark_ratio {
            m.eviction_high_watermark_ratio = r;
        }
        if let Some(s) = self.allocation_strategy {
            m.allocation_strategy = AllocationStrategy::parse(&s).napi()?;
        }
        m.validate().napi()?;
        config.tokens =
            Tokens::resolve(self.cluster_token.as_deref(), self.admin_token.as_deref()).napi()?;
        config.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
            }),
            (None, None) => None,
            _ => return Err(invalid("tlsCert and tlsKey go together")),
        };
        config.durability = match (self.enable_ha.unwrap_or(false), self.data_dir) {
            (true, Some(_)) => {
                return Err(invalid(
                    "dataDir and enableHa exclude each other: with HA the log lives in etcd",
                ))
            }
            (true, None) => {
                let endpoints = self
                    .etcd_endpoints
                    .ok_or_else(|| invalid("enableHa needs etcdEndpoints"))?;
                let cluster = self
                    .cluster_id
                    .unwrap_or_else(|| "mooncake_cluster".to_owned());
                let mut ha = HaConfig::new(&endpoints, &cluster).napi()?;
                ha.advertise = self.advertise_address;
                Durability::Etcd(ha)
            }
            (false, Some(dir)) => Durability::Disk(dir.into()),
            (false, None) => Durability::Memory,
        };
        Ok(config)
    }
}

/// A running master.
#[napi]
pub struct NativeMaster {
    address: String,
    mooncake_rpc_address: Option<String>,
    metrics_url: Option<String>,
    metadata_url: Option<String>,
    inner: Mutex<Option<(MasterServer, KeepAlive)>>,
}

#[napi]
impl NativeMaster {
    /// `host:port` of the gRPC service.
    #[napi(getter)]
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// `host:port` of Mooncake's own protocol, when it is served.
    #[napi(getter)]
    pub fn mooncake_rpc_address(&self) -> Option<String> {
        self.mooncake_rpc_address.clone()
    }

    /// `http://host:port/metrics`, when the admin server runs.
    #[napi(getter)]
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_url.clone()
    }

    /// The embedded metadata server's URL, when it runs.
    #[napi(getter)]
    pub fn metadata_url(&self) -> Option<String> {
        self.metadata_url.clone()
    }

    /// Stops the master; idempotent.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        if let Some((master, keep_alive)) = self.inner.lock().await.take() {
            master.close().await;
            drop(keep_alive);
        }
        Ok(())
    }
}

/// Starts a master in this process; it keeps the process alive until closed.
#[napi(ts_args_type = "options: MasterOptions, keepAlive: () => void")]
pub async fn start_master(options: MasterOptions, keep_alive: KeepAlive) -> Result<NativeMaster> {
    crate::init_logging();
    let config = options.into_config()?;
    let server = MasterServer::start(config).await.napi()?;
    Ok(NativeMaster {
        address: server.rpc_addr().to_string(),
        mooncake_rpc_address: server.mooncake_rpc_addr().map(|a| a.to_string()),
        metrics_url: server.metrics_url(),
        metadata_url: server.metadata_url(),
        inner: Mutex::new(Some((server, keep_alive))),
    })
}
