//! Who may call a master: the cluster token at the door, the admin role for removing
//! everything, replayed proofs refused, and TLS with a chain the test makes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mooncake_common::auth::ClusterToken;
use mooncake_common::ErrorKind;
use mooncake_store::access::{Tokens, PROOF_HEADER};
use mooncake_store::client::master_client::{Credentials, MasterClient};
use mooncake_store::master::server::TlsFiles;
use mooncake_store::master::{MasterServer, MasterServerConfig};
use mooncake_store::proto;
use mooncake_store::proto::master_client::MasterClient as RawClient;

const CLUSTER: &str = "cluster-secret-for-this-test-0001";
const ADMIN: &str = "admin-secret-for-this-test-000001";
const TIMEOUT: Duration = Duration::from_secs(5);

fn token(secret: &str) -> ClusterToken {
    ClusterToken::new(secret).unwrap()
}

async fn master(tokens: Tokens, tls: Option<TlsFiles>) -> MasterServer {
    MasterServer::start(MasterServerConfig {
        host: "127.0.0.1".into(),
        rpc_port: 0,
        metrics_port: Some(0),
        tokens,
        tls,
        ..MasterServerConfig::default()
    })
    .await
    .unwrap()
}

fn guarded() -> Tokens {
    Tokens {
        cluster: Some(token(CLUSTER)),
        admin: Some(token(ADMIN)),
    }
}

async fn connect(server: &MasterServer, tokens: Tokens) -> mooncake_common::Result<MasterClient> {
    let credentials = Credentials {
        tokens,
        tls_ca: None,
    };
    MasterClient::connect(&server.rpc_addr().to_string(), TIMEOUT, credentials).await
}

async fn remove_all(client: &MasterClient) -> mooncake_common::Result<u64> {
    client
        .call(
            proto::RemoveAllRequest { force: true },
            |mut g, r| async move { g.remove_all(r).await },
        )
        .await
        .map(|r| r.count)
}

#[tokio::test]
async fn calls_without_the_token_are_refused_before_any_handler() {
    let server = master(guarded(), None).await;
    let mut raw = RawClient::connect(format!("http://{}", server.rpc_addr()))
        .await
        .unwrap();
    let refused = raw
        .service_ready(proto::ServiceReadyRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(refused.message().starts_with("[ERR_UNAUTHENTICATED]"));
    let refused = raw
        .remove_all(proto::RemoveAllRequest { force: true })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let wrong = Tokens {
        cluster: Some(token("not-the-cluster-secret-at-all")),
        admin: None,
    };
    let error = connect(&server, wrong).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated, "{error}");
    let error = connect(&server, Tokens::default()).await.err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated, "{error}");
    server.close().await;
}

#[tokio::test]
async fn removing_everything_needs_the_admin_role() {
    let server = master(guarded(), None).await;
    let member = connect(
        &server,
        Tokens {
            cluster: Some(token(CLUSTER)),
            admin: None,
        },
    )
    .await
    .unwrap();
    let error = remove_all(&member).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");

    let admin = connect(&server, guarded()).await.unwrap();
    assert_eq!(remove_all(&admin).await.unwrap(), 0);

    // A master with a cluster token and no admin token removes everything for no one.
    let no_admin = master(
        Tokens {
            cluster: Some(token(CLUSTER)),
            admin: None,
        },
        None,
    )
    .await;
    let client = connect(&no_admin, guarded()).await.unwrap();
    let error = remove_all(&client).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthenticated, "{error}");

    // An admin token equal to the cluster token would make every member an admin.
    let same = MasterServer::start(MasterServerConfig {
        host: "127.0.0.1".into(),
        rpc_port: 0,
        metrics_port: None,
        tokens: Tokens {
            cluster: Some(token(CLUSTER)),
            admin: Some(token(CLUSTER)),
        },
        ..MasterServerConfig::default()
    })
    .await;
    assert_eq!(
        same.err().map(|e| e.kind()),
        Some(ErrorKind::InvalidArgument)
    );

    // Without tokens the master is open, as Mooncake's is.
    let open = master(Tokens::default(), None).await;
    let client = connect(&open, Tokens::default()).await.unwrap();
    assert_eq!(remove_all(&client).await.unwrap(), 0);
    for server in [server, no_admin, open] {
        server.close().await;
    }
}

#[tokio::test]
async fn a_proof_seen_on_the_wire_does_not_work_twice() {
    let server = master(guarded(), None).await;
    let proof = token(CLUSTER)
        .prove("/mooncake.store.v1.Master/ServiceReady")
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.rpc_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut replaying =
        RawClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert(PROOF_HEADER, proof.parse().unwrap());
            Ok(request)
        });
    replaying
        .service_ready(proto::ServiceReadyRequest {})
        .await
        .expect("the first use of a proof is good");
    let replayed = replaying
        .service_ready(proto::ServiceReadyRequest {})
        .await
        .unwrap_err();
    assert_eq!(replayed.code(), tonic::Code::Unauthenticated);
    // A proof for one call does not open another.
    let other = replaying
        .ping(proto::PingRequest::default())
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unauthenticated);
    server.close().await;
}

struct Chain {
    dir: std::path::PathBuf,
}

impl Chain {
    /// A CA and a leaf for 127.0.0.1 and localhost, as PEM files in a fresh directory.
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mooncake-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {name}"));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        Self { dir }
    }

    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.join("cert.pem"),
            key: self.dir.join("key.pem"),
        }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn tls_with_a_chain_the_client_trusts() {
    let chain = Chain::new("good");
    let stranger = Chain::new("stranger");
    let server = master(guarded(), Some(chain.files())).await;
    let address = server.rpc_addr().to_string();
    let with_ca = |ca: Option<std::path::PathBuf>| Credentials {
        tokens: guarded(),
        tls_ca: ca,
    };
    let client = MasterClient::connect(&address, TIMEOUT, with_ca(Some(chain.ca())))
        .await
        .unwrap();
    assert_eq!(remove_all(&client).await.unwrap(), 0);

    let plain = MasterClient::connect(&address, TIMEOUT, with_ca(None)).await;
    assert!(plain.is_err(), "plain text to a TLS master");
    let untrusted = MasterClient::connect(&address, TIMEOUT, with_ca(Some(stranger.ca()))).await;
    assert!(untrusted.is_err(), "a chain the client does not trust");

    let admin = server.metrics_addr().unwrap();
    assert_eq!(
        server.metrics_url().unwrap(),
        format!("https://{admin}/metrics")
    );
    let health = https_get(admin, &chain.ca(), "/health").await.unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(https_get(admin, &stranger.ca(), "/health").await.is_err());
    let mut plain = tokio::net::TcpStream::connect(admin).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, plain.read_to_end(&mut reply)).await;
    assert!(
        !String::from_utf8_lossy(&reply).contains("200 OK"),
        "plain HTTP to the TLS admin port"
    );
    server.close().await;
}

/// One HTTPS GET, trusting only the authorities in `ca`; the whole reply.
async fn https_get(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    path: &str,
) -> std::io::Result<String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply).await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// With a cluster token, clients follow only a master view a member signed: whoever can
/// write etcd cannot point them at a master of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
async fn clients_follow_only_a_signed_master_view() {
    use mooncake_metadata::etcd::EtcdStore;
    use mooncake_metadata::MetadataStore;
    use mooncake_store::master::{Durability, HaConfig};

    let etcd = mooncake_testkit::EtcdCluster::new(1).expect("etcd");
    let endpoints = etcd.connection_string();
    let ha = HaConfig::new(&endpoints, "signed_view").unwrap();
    let server = MasterServer::start(MasterServerConfig {
        host: "127.0.0.1".into(),
        rpc_port: 0,
        metrics_port: None,
        tokens: guarded(),
        durability: Durability::Etcd(ha),
        ..MasterServerConfig::default()
    })
    .await
    .unwrap();
    std::env::set_var("MC_STORE_CLUSTER_ID", "signed_view");
    let address = format!("etcd://{endpoints}");
    let client = MasterClient::connect(
        &address,
        Duration::from_secs(20),
        Credentials {
            tokens: guarded(),
            tls_ca: None,
        },
    )
    .await
    .expect("a signed view is followed");
    assert_eq!(client.address(), server.rpc_addr().to_string());

    let store = EtcdStore::new(&endpoints).unwrap();
    let key = "mooncake-store/signed_view/master_view";
    let value = store.get(key).await.unwrap().unwrap();
    assert!(value.starts_with(&server.rpc_addr().to_string()), "{value}");
    store.put(key, "127.0.0.1:1").await.unwrap();
    let refused = MasterClient::connect(
        &address,
        Duration::from_secs(5),
        Credentials {
            tokens: guarded(),
            tls_ca: None,
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(refused.kind(), ErrorKind::Unauthenticated, "{refused}");
    server.close().await;
}
