//! Shards held by pullers that have not finished: each puller keeps an expiring entry at
//! `mooncake/p2p/partial/<name>/<segment>` listing the shards it holds and has checked, so that
//! pullers of the same payload read from each other while they pull, as a torrent's peers do.
//! The catalogue itself (what Mooncake's nodes read) lists a puller only once it holds
//! everything.
//!
//! Only shards with a checksum are offered or taken this way: the reader checks what it got.

use mooncake_common::Result;
use mooncake_metadata::MetadataStore;
use serde::{Deserialize, Serialize};

use crate::catalogue::{Location, Payload};

/// Where partial holdings live.
pub const PARTIAL_PREFIX: &str = "mooncake/p2p/partial/";

/// What one puller holds of one payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Holding {
    pub(crate) name: String,
    pub(crate) segment_name: String,
    pub(crate) size_list: Vec<u64>,
    pub(crate) max_shard_size: u64,
    /// `(shard index, address of its first byte)`.
    pub(crate) shards: Vec<(usize, u64)>,
}

pub(crate) fn key(name: &str, segment: &str) -> String {
    format!("{PARTIAL_PREFIX}{name}/{segment}")
}

/// Other pullers' checked copies of each shard of `payload`.
pub(crate) async fn holders(
    store: &dyn MetadataStore,
    payload: &Payload,
    me: &str,
) -> Result<Vec<Vec<Location>>> {
    let mut found = vec![Vec::new(); payload.shards.len()];
    let prefix = format!("{PARTIAL_PREFIX}{}/", payload.name);
    for (entry, value) in store.list(&prefix).await? {
        let Ok(holding) = serde_json::from_str::<Holding>(&value) else {
            tracing::debug!("skipping malformed partial holding '{entry}'");
            continue;
        };
        // The prefix also matches longer names; a holding of another layout is of another
        // payload that had this name.
        if holding.name != payload.name
            || holding.segment_name == me
            || entry != key(&holding.name, &holding.segment_name)
            || holding.size_list != payload.size_list
            || holding.max_shard_size != payload.max_shard_size
        {
            continue;
        }
        for (index, offset) in holding.shards {
            let checked = payload
                .shards
                .get(index)
                .is_some_and(|s| s.checksum.is_some());
            let location = Location {
                segment_name: holding.segment_name.clone(),
                offset,
            };
            if checked && !found[index].contains(&location) {
                found[index].push(location);
            }
        }
    }
    Ok(found)
}

/// Publishes what this puller holds, for `ttl`.
pub(crate) async fn offer(
    store: &dyn MetadataStore,
    holding: &Holding,
    ttl: std::time::Duration,
) -> Result<()> {
    let value = serde_json::to_string(holding).map_err(|e| {
        mooncake_common::Error::new(mooncake_common::ErrorKind::InternalError, e.to_string())
    })?;
    store
        .put_expiring(&key(&holding.name, &holding.segment_name), &value, ttl)
        .await
}
