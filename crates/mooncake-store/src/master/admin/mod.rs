//! The master's admin HTTP server. Every route only reads.
//!
//! - [`metrics`]: `/metrics`, Prometheus (OpenMetrics or the classic text format), Mooncake's
//!   names;
//! - [`health`]: `/health`, readiness with the reason when not ready;
//! - [`dashboard`]: `/` and `/dashboard`, a live page of the cluster, and the JSON it polls;
//! - [`sampler`]: the counters sampled every second, for the dashboard's charts;
//! - [`pages`]: `/query_key`, `/get_all_keys` (paged), `/get_all_segments`,
//!   `/get_segments_detail`.
//!
//! On a master with a cluster token, the pages that name keys and segments need a proof of it
//! (`x-mooncake-proof` over `GET <path>`); `/metrics`, `/health` and the dashboard stay open
//! for scrapers, probes and people: they show nothing `/metrics` does not, but for the rails
//! the clients report (NIC names and peers' data addresses, which engines publish in their
//! segment descriptors anyway). Client ids, which own segments, are never shown.

mod dashboard;
mod health;
mod metrics;
mod pages;
pub(super) mod sampler;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use mooncake_common::auth::{unauthenticated, ProofChecker};

use super::ha::HaStatus;
use super::service::{OpCounters, Role};
use super::{Master, SegmentReport};
use crate::access::PROOF_HEADER;
pub use pages::{DEFAULT_KEYS_PAGE, MAX_KEYS_PAGE, NEXT_PAGE_HEADER};
use sampler::Sampler;

/// What the admin pages read.
#[derive(Clone)]
pub(super) struct Admin {
    pub(super) state: Arc<Mutex<Master>>,
    pub(super) counters: Arc<OpCounters>,
    pub(super) role: watch::Receiver<Role>,
    pub(super) ha: Option<HaStatus>,
    /// Checks proofs of the cluster token, when the master has one.
    pub(super) proofs: Option<Arc<ProofChecker>>,
    /// Recent rates of the counters, for the dashboard.
    pub(super) sampler: Arc<Sampler>,
    /// The dashboard's recent read of the master's state.
    pub(super) views: Arc<dashboard::StateViews>,
}

/// The admin routes.
pub(super) fn routes(admin: Admin) -> Router {
    let named = Router::new()
        .route("/query_key", get(pages::query_key))
        .route("/get_all_keys", get(pages::all_keys))
        .route("/get_all_segments", get(pages::all_segments))
        .route("/get_segments_detail", get(pages::segments_detail))
        .route_layer(middleware::from_fn_with_state(admin.clone(), proven));
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .route("/health", get(health::health))
        .merge(dashboard::routes())
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

/// Used and managed bytes per segment name: segments that share a name (one node's) are summed,
/// so that each name is one series on `/metrics` and one bar on the dashboard.
fn segments_by_name(segments: &[SegmentReport]) -> BTreeMap<&str, (u64, u64)> {
    let mut by_name: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for s in segments {
        let (used, capacity) = by_name.entry(s.spec.name.as_str()).or_default();
        *used = used.saturating_add(s.used);
        *capacity = capacity.saturating_add(s.capacity);
    }
    by_name
}

#[cfg(test)]
mod test_support {
    use std::net::SocketAddr;
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::master::types::{ClientId, SegmentId, SegmentSpec, WriteConfig};
    use crate::master::MasterConfig;

    /// A master with a 64 MiB segment of each name and 25 objects of 1 KiB (`key/00`...).
    pub(super) fn master_with(names: &[&str]) -> Master {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let (now, client) = (Instant::now(), ClientId(1));
        for (i, name) in names.iter().enumerate() {
            let spec = SegmentSpec {
                id: SegmentId(i as u128 + 1),
                name: (*name).into(),
                base: 0x1000_0000 * (i as u64 + 1),
                size: 64 << 20,
                te_endpoint: "127.0.0.1:1".into(),
                protocol: "tcp".into(),
                host_id: "host".into(),
            };
            master.mount_segment(now, client, spec).unwrap();
        }
        let config = WriteConfig::default();
        for i in 0..25 {
            let key = format!("key/{i:02}");
            let grant = master.put_start(now, client, &key, 1024, &config).unwrap();
            master.put_end(now, client, &key, grant.write).unwrap();
        }
        master
    }

    /// The admin routes of `master` served on a loopback port, and the server's task.
    pub(super) async fn serve(admin: Admin) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = routes(admin);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, server)
    }

    /// An [`Admin`] over `master`, leading without a log, no HA, no token.
    pub(super) fn admin(master: Master) -> Admin {
        let (_, role) = watch::channel(Role::Leader(None));
        Admin {
            state: Arc::new(Mutex::new(master)),
            counters: Arc::default(),
            role,
            ha: None,
            proofs: None,
            sampler: Arc::default(),
            views: Arc::default(),
        }
    }

    /// `GET path` with extra header lines; the response's head and body.
    pub(super) async fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET {path} HTTP/1.1\r\nhost: x\r\n{headers}connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    pub(super) async fn get(addr: SocketAddr, path: &str) -> (String, String) {
        get_with(addr, path, "").await
    }
}
