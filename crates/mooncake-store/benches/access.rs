//! What the cluster token and TLS cost a master call, measured in one run on loopback: calls
//! per second with 16 in flight and the median latency of one call at a time, against a
//! master without tokens, with a cluster token, and with a token over TLS. Rounds alternate
//! between the three so that a noisy neighbour hurts them alike.
//!
//! `cargo bench -p mooncake-store --bench access`; `ACCESS_SECONDS` and `ACCESS_ROUNDS` change
//! the length.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use mooncake_common::auth::ClusterToken;
use mooncake_store::access::Tokens;
use mooncake_store::client::master_client::{Credentials, MasterClient};
use mooncake_store::master::server::TlsFiles;
use mooncake_store::master::{MasterServer, MasterServerConfig};
use mooncake_store::proto;
use support::{env, median};

async fn ping(client: &MasterClient) {
    let request = proto::PingRequest {
        client_id: Some(proto::Uuid { high: 1, low: 1 }),
        rails: Vec::new(),
    };
    client
        .call(request, |mut g, r| async move { g.ping(r).await })
        .await
        .expect("ping");
}

/// Calls per second with `inflight` at once, and the median latency of one at a time.
async fn figures(client: &MasterClient, seconds: u64, inflight: usize) -> (f64, Duration) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let workers: Vec<_> = (0..inflight)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut calls = 0u64;
                while Instant::now() < deadline {
                    ping(&client).await;
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for worker in workers {
        calls += worker.await.expect("worker");
    }
    let rate = calls as f64 / started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for _ in 0..2_000 {
        let began = Instant::now();
        ping(client).await;
        latencies.push(began.elapsed().as_secs_f64());
    }
    (rate, Duration::from_secs_f64(median(latencies)))
}

/// A CA and a leaf for 127.0.0.1, as PEM files.
fn chain(dir: &std::path::Path) -> (TlsFiles, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("cert.pem"), leaf.pem()).expect("write");
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).expect("write");
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    (files, dir.join("ca.pem"))
}

#[tokio::main]
async fn main() {
    let seconds = env("ACCESS_SECONDS", 3);
    let rounds = env("ACCESS_ROUNDS", 3);
    let dir = std::env::temp_dir().join(format!("mooncake-access-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (tls, ca) = chain(&dir);
    let token = ClusterToken::new(&ClusterToken::generate().expect("token")).expect("token");
    let tokens = Tokens {
        cluster: Some(token),
        admin: None,
    };
    let cases = [
        ("open", Tokens::default(), None),
        ("cluster token", tokens.clone(), None),
        ("token over TLS", tokens, Some(tls)),
    ];
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for (_, tokens, tls) in &cases {
        let server = MasterServer::start(MasterServerConfig {
            host: "127.0.0.1".into(),
            rpc_port: 0,
            metrics_port: None,
            tokens: tokens.clone(),
            tls: tls.clone(),
            ..MasterServerConfig::default()
        })
        .await
        .expect("master");
        let credentials = Credentials {
            tokens: tokens.clone(),
            tls_ca: tls.as_ref().map(|_| ca.clone()),
        };
        let client = MasterClient::connect(
            &server.rpc_addr().to_string(),
            Duration::from_secs(10),
            credentials,
        )
        .await
        .expect("client");
        servers.push(server);
        clients.push(client);
    }
    let mut results = vec![(Vec::new(), Vec::new()); cases.len()];
    for round in 0..rounds {
        for (i, client) in clients.iter().enumerate() {
            let (rate, p50) = figures(client, seconds, 16).await;
            eprintln!(
                "round {round}: {:<15} {rate:>9.0} calls/s, p50 {:>4} µs",
                cases[i].0,
                p50.as_micros()
            );
            results[i].0.push(rate);
            results[i].1.push(p50.as_secs_f64());
        }
    }
    let base = median(results[0].0.clone());
    println!("master calls (Ping), {rounds} rounds of {seconds} s, medians:");
    for (i, (rates, latencies)) in results.into_iter().enumerate() {
        let rate = median(rates);
        println!(
            "  {:<15} {rate:>9.0} calls/s ({:.2}x open), one at a time p50 {:.0} µs",
            cases[i].0,
            rate / base,
            median(latencies) * 1e6
        );
    }
    for server in servers {
        server.close().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
