//! What the P2P store's integration tests share: nodes on loopback and self-describing
//! payloads in engine-style memory.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_common::config::Protocol;
use mooncake_common::EngineConfig;
use mooncake_p2p::{LocalBuffer, P2PConfig, P2PStore, RegisterOptions};
use mooncake_transport::Arena;

/// A node over TCP on loopback (shared memory off), its liveness lasting `liveness`.
pub async fn node_with(metadata: &str, name: &str, liveness: Duration) -> Arc<P2PStore> {
    node_in(metadata, name, liveness, None).await
}

/// The same in a cluster with `token`.
pub async fn node_in(
    metadata: &str,
    name: &str,
    liveness: Duration,
    token: Option<ClusterToken>,
) -> Arc<P2PStore> {
    let mut engine = EngineConfig::from_env(name, metadata);
    engine.advertised_host = Some("127.0.0.1".into());
    engine.protocol = Protocol::Tcp;
    engine.shared_memory = false;
    engine.cluster_token = token;
    let mut config = P2PConfig::new(engine);
    config.liveness_ttl = liveness;
    P2PStore::start(config).await.expect("the node starts")
}

/// Register options with shards of `max_shard_size`.
pub fn sharded(max_shard_size: u64) -> RegisterOptions {
    RegisterOptions {
        max_shard_size,
        ..RegisterOptions::default()
    }
}

/// Zeroed engine-style memory.
pub fn arena(len: usize) -> Arc<Arena> {
    Arc::new(Arena::new("p2p-test", len).expect("memory"))
}

/// The arena's bytes.
pub fn bytes(arena: &Arena) -> &[u8] {
    // SAFETY: the arena is mapped for its whole length while borrowed; tests read it only
    // while no transfer writes it.
    unsafe { std::slice::from_raw_parts(arena.as_ptr(), arena.len()) }
}

/// Writes the arena's bytes.
pub fn write(arena: &Arena, fill: impl FnOnce(&mut [u8])) {
    // SAFETY: as for `bytes`; tests write it only while no transfer touches it.
    fill(unsafe { std::slice::from_raw_parts_mut(arena.as_ptr(), arena.len()) })
}

/// Buffers of `sizes` bytes holding payload `seed`'s bytes: each 8-byte word holds the seed
/// and its own offset in the payload.
pub fn payload(seed: u64, sizes: &[usize]) -> Vec<Arc<Arena>> {
    let mut offset = 0u64;
    sizes
        .iter()
        .map(|&len| {
            let a = arena(len);
            write(&a, |bytes| {
                for (i, b) in bytes.iter_mut().enumerate() {
                    let at = offset + i as u64;
                    *b = ((seed << 40 | (at & !7)).to_le_bytes())[(at % 8) as usize];
                }
            });
            offset += len as u64;
            a
        })
        .collect()
}

/// Zeroed buffers of `sizes` bytes.
pub fn empty(sizes: &[usize]) -> Vec<Arc<Arena>> {
    sizes.iter().map(|&len| arena(len)).collect()
}

/// The buffers as the store takes them.
pub fn local(arenas: &[Arc<Arena>]) -> Vec<LocalBuffer> {
    arenas.iter().cloned().map(LocalBuffer::arena).collect()
}

/// Whether two sets of buffers hold the same bytes.
pub fn same(a: &[Arc<Arena>], b: &[Arc<Arena>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| bytes(x) == bytes(y))
}
