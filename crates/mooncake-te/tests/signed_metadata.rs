//! With a cluster token, engines sign what they publish and believe only signed entries, so
//! an entry rewritten in an open metadata store sends no one to the wrong memory.

use std::sync::Arc;

use mooncake_common::auth::ClusterToken;
use mooncake_common::EngineConfig;
use mooncake_metadata::http::{HttpStore, MetadataServer};
use mooncake_metadata::{Keys, MetadataStore};
use mooncake_te::{ErrorKind, TransferEngine};

const SECRET: &str = "metadata-signing-secret-0001";

async fn engine(url: &str, name: &str, token: Option<&str>) -> Arc<TransferEngine> {
    let mut config = EngineConfig::from_env(name, url);
    config.cluster_token = token.map(|t| ClusterToken::new(t).unwrap());
    TransferEngine::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_descriptor_is_refused_by_token_holders() {
    let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
    let url = server.url();
    let target = engine(&url, "node-target", Some(SECRET)).await;
    let _remote = target.allocate(1 << 20).unwrap();
    target.publish_now().await.unwrap();

    let reader = engine(&url, "node-reader", Some(SECRET)).await;
    reader
        .open_segment("node-target")
        .await
        .expect("a signed descriptor opens");

    // Someone without the token rewrites the entry: the buffer now claims twice its length.
    let keys = Keys::new(None);
    let attacker = HttpStore::new(&url).unwrap();
    let key = keys.segment("node-target");
    let published = attacker.get(&key).await.unwrap().unwrap();
    let mut tampered: serde_json::Value = serde_json::from_str(&published).unwrap();
    let length = tampered["buffers"][0]["length"].as_u64().unwrap();
    tampered["buffers"][0]["length"] = (length * 2).into();
    attacker.put(&key, &tampered.to_string()).await.unwrap();

    let fresh = engine(&url, "node-fresh", Some(SECRET)).await;
    let refused = fresh.open_segment("node-target").await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unauthenticated, "{refused}");

    // An unsigned descriptor (as a Mooncake peer or an impostor would write) is refused too.
    tampered.as_object_mut().unwrap().remove("signature");
    attacker.put(&key, &tampered.to_string()).await.unwrap();
    let refused = fresh.open_segment("node-target").await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unauthenticated, "{refused}");

    // The rpc_meta entry is signed as well: pointing it elsewhere is refused.
    target.publish_now().await.unwrap();
    let rpc_key = keys.rpc_meta("node-target");
    let rpc = attacker.get(&rpc_key).await.unwrap().unwrap();
    let mut moved: serde_json::Value = serde_json::from_str(&rpc).unwrap();
    moved["rpc_port"] = 9.into();
    attacker.put(&rpc_key, &moved.to_string()).await.unwrap();
    let refused = fresh.open_segment("node-target").await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unauthenticated, "{refused}");

    // An engine without a token reads entries as Mooncake does.
    attacker.put(&rpc_key, &rpc).await.unwrap();
    let open = engine(&url, "node-open", None).await;
    open.open_segment("node-target")
        .await
        .expect("no token: signatures are not checked");

    for engine in [target, reader, fresh, open] {
        engine.close().await;
    }
    server.close().await;
}
