//! Liveness: every node keeps an expiring entry at `mooncake/p2p/live/<segment>` while it runs
//! (an etcd lease, a Redis expiry, the HTTP server's TTL), so that pullers know which sources
//! are gone without waiting on them, and prune them from the catalogue.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mooncake_common::Result;
use mooncake_metadata::MetadataStore;
use tokio_util::sync::CancellationToken;

/// Where liveness entries live.
pub const LIVE_PREFIX: &str = "mooncake/p2p/live/";

/// The liveness key of `segment`.
pub fn live_key(segment: &str) -> String {
    format!("{LIVE_PREFIX}{segment}")
}

/// Segments whose liveness entry has not expired.
pub(crate) async fn live_segments(store: &dyn MetadataStore) -> Result<HashSet<String>> {
    Ok(store
        .list(LIVE_PREFIX)
        .await?
        .into_iter()
        .filter_map(|(key, _)| key.strip_prefix(LIVE_PREFIX).map(str::to_owned))
        .collect())
}

/// Keeps `segment`'s entry alive, written every third of `ttl`, until `stop`; then removes it.
pub(crate) async fn heartbeat(
    store: Arc<dyn MetadataStore>,
    segment: String,
    ttl: Duration,
    stop: CancellationToken,
) {
    let key = live_key(&segment);
    let value = serde_json::json!({ "segment_name": segment }).to_string();
    let period = ttl / 3;
    loop {
        if let Err(e) = store.put_expiring(&key, &value, ttl).await {
            tracing::warn!("P2P store liveness of {segment}: {e}");
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(period) => {}
        }
    }
    if let Err(e) = store.delete(&key).await {
        tracing::debug!("P2P store liveness of {segment} not withdrawn: {e}");
    }
}
