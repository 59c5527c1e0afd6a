//! `mooncake-master`: the Mooncake Store master as a standalone program, for hosts without
//! Node.js. The flags follow Mooncake's `mooncake_master` (underscore spellings work too).

use std::time::Duration;

use clap::Parser;
use mooncake_store::access::Tokens;
use mooncake_store::master::log::SnapshotPolicy;
use mooncake_store::master::server::TlsFiles;
use mooncake_store::master::{
    AllocationStrategy, Durability, HaConfig, MasterConfig, MasterServer, MasterServerConfig,
};

/// Mooncake Store master.
#[derive(Debug, Parser)]
#[command(name = "mooncake-master", version)]
struct Args {
    /// Address to bind the RPC, admin and metadata servers. Loopback unless told otherwise:
    /// pass `--rpc-address 0.0.0.0` to serve other hosts.
    #[arg(
        long,
        visible_alias = "host",
        alias = "rpc_address",
        default_value = "127.0.0.1"
    )]
    rpc_address: String,
    /// gRPC port.
    #[arg(long, alias = "rpc_port", default_value_t = 50051)]
    rpc_port: u16,
    /// Admin HTTP port (/metrics, /health, /query_key, ...).
    #[arg(long, alias = "metrics_port", default_value_t = 9003)]
    metrics_port: u16,
    /// Address to bind the admin HTTP (its routes only read; widen it for a remote scraper).
    #[arg(long, default_value = "127.0.0.1")]
    admin_address: String,
    /// Run the Transfer Engine HTTP metadata server too.
    #[arg(long, alias = "enable_http_metadata_server")]
    enable_http_metadata_server: bool,
    /// Its port.
    #[arg(long, alias = "http_metadata_server_port", default_value_t = 8080)]
    http_metadata_server_port: u16,
    /// Read lease (ms, or with a unit: 500ms, 10s, 5m, 1h).
    #[arg(long, alias = "default_kv_lease_ttl", default_value = "10000", value_parser = millis)]
    default_kv_lease_ttl: Duration,
    /// Default soft pin TTL.
    #[arg(long, alias = "default_kv_soft_pin_ttl", default_value = "30m", value_parser = millis)]
    default_kv_soft_pin_ttl: Duration,
    /// Longest soft pin a write may ask for.
    #[arg(long, alias = "max_kv_soft_pin_ttl", default_value = "24h", value_parser = millis)]
    max_kv_soft_pin_ttl: Duration,
    /// Whether eviction's second pass may take soft-pinned objects.
    #[arg(long, alias = "allow_evict_soft_pinned_objects", default_value_t = true, action = clap::ArgAction::Set)]
    allow_evict_soft_pinned_objects: bool,
    /// Usage above which eviction runs.
    #[arg(long, alias = "eviction_high_watermark_ratio", default_value_t = 0.90)]
    eviction_high_watermark_ratio: f64,
    /// Fraction of objects evicted per round.
    #[arg(long, alias = "eviction_ratio", default_value_t = 0.05)]
    eviction_ratio: f64,
    /// A client silent this long is dropped (seconds, or with a unit).
    #[arg(long, alias = "client_ttl", default_value = "10", value_parser = seconds)]
    client_ttl: Duration,
    /// random, free_ratio_first or local_first.
    #[arg(long, alias = "allocation_strategy", default_value = "random")]
    allocation_strategy: String,
    /// An unfinished write younger than this is not preempted (seconds).
    #[arg(long, alias = "put_start_discard_timeout_sec", default_value_t = 30)]
    put_start_discard_timeout_sec: u64,
    /// Space of abandoned writes is freed this long after their start (seconds).
    #[arg(long, alias = "put_start_release_timeout_sec", default_value_t = 600)]
    put_start_release_timeout_sec: u64,
    /// Keep the metadata log and snapshots here (fsync'd): a restarted master recovers every
    /// acknowledged object.
    #[arg(long, alias = "data_dir", conflicts_with = "enable_ha")]
    data_dir: Option<std::path::PathBuf>,
    /// High availability: elect a leader through etcd and keep the metadata log there.
    #[arg(long, alias = "enable_ha", requires = "etcd_endpoints")]
    enable_ha: bool,
    /// etcd endpoints for HA, `h1:2379;h2:2379`.
    #[arg(long, visible_alias = "ha-backend-connstring", aliases = ["etcd_endpoints", "ha_backend_connstring"])]
    etcd_endpoints: Option<String>,
    /// Masters of one cluster share it; clients set MC_STORE_CLUSTER_ID to the same.
    #[arg(long, alias = "cluster_id", default_value = "mooncake_cluster")]
    cluster_id: String,
    /// Replace the metadata log with a snapshot after this many entries...
    #[arg(long, default_value_t = SnapshotPolicy::default().entries)]
    snapshot_after_entries: u64,
    /// ...or this many bytes of entries, whichever comes first.
    #[arg(long, default_value_t = SnapshotPolicy::default().bytes)]
    snapshot_after_bytes: u64,
    /// A file holding the cluster token every call must prove (default: MC_CLUSTER_TOKEN).
    #[arg(long)]
    cluster_token_file: Option<std::path::PathBuf>,
    /// A file holding the admin token RemoveAll and RemoveByRegex must prove (default:
    /// MC_ADMIN_TOKEN).
    #[arg(long)]
    admin_token_file: Option<std::path::PathBuf>,
    /// Also serve Mooncake's own master protocol (for Mooncake's Python and C++ clients) on
    /// this port; without a value, Mooncake's 50051 (move --rpc-port off it).
    #[arg(long, num_args = 0..=1, default_missing_value = "50051")]
    mooncake_rpc_port: Option<u16>,
    /// Interface for Mooncake's protocol. Its clients prove no token: widen with care.
    #[arg(long, default_value = "127.0.0.1")]
    mooncake_rpc_address: String,
    /// Serve Mooncake's protocol next to a cluster token: anyone who reaches that port can
    /// mount, read, write and remove without proving it.
    #[arg(long)]
    allow_mooncake_clients: bool,
    /// Serve gRPC and admin HTTP over TLS with this certificate chain (PEM)...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// ...and its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

fn read_token(path: Option<&std::path::Path>) -> Result<Option<String>, String> {
    path.map(|path| {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("token file '{}': {e}", path.display()))?;
        // An empty file must never mean "no token".
        if text.trim().is_empty() {
            return Err(format!("token file '{}' is empty", path.display()));
        }
        Ok(text)
    })
    .transpose()
}

fn tokens(args: &Args) -> Result<Tokens, String> {
    let cluster = read_token(args.cluster_token_file.as_deref())?;
    let admin = read_token(args.admin_token_file.as_deref())?;
    Tokens::resolve(cluster.as_deref(), admin.as_deref()).map_err(|e| e.to_string())
}

fn duration(text: &str, bare: f64) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (text, bare)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: '{text}'"))?;
    Duration::try_from_secs_f64(value * scale).map_err(|e| e.to_string())
}

fn millis(text: &str) -> Result<Duration, String> {
    duration(text, 0.001)
}

fn seconds(text: &str) -> Result<Duration, String> {
    duration(text, 1.0)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber_init();
    let args = Args::parse();
    let strategy = match AllocationStrategy::parse(&args.allocation_strategy) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mooncake-master: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let durability = match (&args.data_dir, args.enable_ha, &args.etcd_endpoints) {
        (_, true, Some(endpoints)) => match HaConfig::new(endpoints, &args.cluster_id) {
            Ok(ha) => Durability::Etcd(ha),
            Err(e) => {
                eprintln!("mooncake-master: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        (Some(dir), _, _) => Durability::Disk(dir.clone()),
        _ => Durability::Memory,
    };
    let tokens = match tokens(&args) {
        Ok(tokens) => tokens,
        Err(e) => {
            eprintln!("mooncake-master: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let tls = args
        .tls_cert
        .clone()
        .zip(args.tls_key.clone())
        .map(|(cert, key)| TlsFiles { cert, key });
    let config = MasterServerConfig {
        tokens,
        tls,
        durability,
        snapshot: SnapshotPolicy {
            entries: args.snapshot_after_entries.max(1),
            bytes: args.snapshot_after_bytes.max(1),
        },
        host: args.rpc_address,
        rpc_port: args.rpc_port,
        mooncake_rpc_port: args.mooncake_rpc_port,
        mooncake_rpc_host: args.mooncake_rpc_address,
        allow_mooncake_clients: args.allow_mooncake_clients,
        metrics_port: Some(args.metrics_port),
        admin_host: args.admin_address,
        http_metadata_port: args
            .enable_http_metadata_server
            .then_some(args.http_metadata_server_port),
        master: MasterConfig {
            default_kv_lease_ttl: args.default_kv_lease_ttl,
            default_kv_soft_pin_ttl: args.default_kv_soft_pin_ttl,
            max_kv_soft_pin_ttl: args.max_kv_soft_pin_ttl,
            allow_evict_soft_pinned_objects: args.allow_evict_soft_pinned_objects,
            eviction_ratio: args.eviction_ratio,
            eviction_high_watermark_ratio: args.eviction_high_watermark_ratio,
            client_ttl: args.client_ttl,
            put_start_discard_timeout: Duration::from_secs(args.put_start_discard_timeout_sec),
            put_start_release_timeout: Duration::from_secs(args.put_start_release_timeout_sec),
            allocation_strategy: strategy,
        },
    };
    let server = match MasterServer::start(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("mooncake-master: {}: {}", e.kind(), e.report());
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("master: {}", server.rpc_addr());
    if let Some(addr) = server.mooncake_rpc_addr() {
        println!("Mooncake RPC: {addr}");
    }
    if let Some(url) = server.metrics_url() {
        println!("metrics: {url}");
    }
    if let Some(url) = server.metadata_url() {
        println!("metadata server: {url}");
    }
    stopped().await;
    server.close().await;
    std::process::ExitCode::SUCCESS
}

/// SIGINT or SIGTERM: a leader then hands over at once instead of letting its lease run out.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn tracing_subscriber_init() {
    let filter = std::env::var("MOONCAKE_LOG").unwrap_or_else(|_| "info".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(millis("10000").unwrap(), Duration::from_secs(10));
        assert_eq!(millis("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(seconds("10").unwrap(), Duration::from_secs(10));
        assert_eq!(seconds("500ms").unwrap(), Duration::from_millis(500));
        assert!(millis("soon").is_err());
        Args::parse_from([
            "mooncake-master",
            "--rpc_port",
            "6000",
            "--eviction-ratio",
            "0.1",
        ]);
    }
}
