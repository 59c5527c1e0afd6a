//! The catalogue: one JSON entry per payload at `mooncake/checkpoint/<name>`, in Mooncake's
//! format (`Payload`, `Shard`, `Location`), updated only by compare-and-swap so that nodes
//! adding and removing themselves never lose each other's changes.
//!
//! Each shard may carry a `checksum` (`xxh3:<16 hex digits>`), a field Mooncake's nodes ignore.

use std::sync::Arc;

use mooncake_common::auth::ClusterToken;
use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::{MetadataStore, Revisioned};
use serde::{Deserialize, Deserializer, Serialize};

/// Where every payload entry lives.
pub const PAYLOAD_PREFIX: &str = "mooncake/checkpoint/";

/// What a payload entry's signature is for, so that it verifies for nothing else.
const PAYLOAD_PURPOSE: &[u8] = b"mooncake-p2p-payload";

/// Compare-and-swap attempts before an update gives up (others keep winning the race).
const SWAP_ATTEMPTS: usize = 64;

/// A payload as the catalogue describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Its name.
    pub name: String,
    /// Total bytes.
    pub size: u64,
    /// Length of each of the registrant's buffers.
    #[serde(deserialize_with = "null_as_empty")]
    pub size_list: Vec<u64>,
    /// Largest shard; each buffer is cut into shards of this size, the last one shorter.
    pub max_shard_size: u64,
    /// Every shard, buffer by buffer.
    #[serde(deserialize_with = "null_as_empty")]
    pub shards: Vec<Shard>,
    /// A name for each buffer (the file it came from, say), as the registrant gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_names: Option<Vec<String>>,
    /// In a cluster with a token: the last writer's signature over the rest of the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A contiguous piece of a payload and where it can be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Length in bytes.
    pub size: u64,
    /// The registrants' copies.
    #[serde(deserialize_with = "null_as_empty")]
    pub gold: Vec<Location>,
    /// Copies made by nodes that pulled the payload.
    #[serde(deserialize_with = "null_as_empty")]
    pub replica_list: Vec<Location>,
    /// Digest of the shard's bytes, recorded at register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// One copy of a shard: a segment and the address of the shard's first byte in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    /// The serving engine's segment name.
    pub segment_name: String,
    /// Address in that segment's memory.
    pub offset: u64,
}

/// What [`list`](crate::P2PStore::list) says of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadInfo {
    /// Its name.
    pub name: String,
    /// Total bytes.
    pub total_size: u64,
    /// Length of each buffer.
    pub size_list: Vec<u64>,
    /// Largest shard.
    pub max_shard_size: u64,
    /// A name for each buffer, when the registrant gave them.
    pub buffer_names: Option<Vec<String>>,
}

/// Go writes an empty slice as `null`.
fn null_as_empty<'de, D, T>(deserializer: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

impl Shard {
    /// Every copy, registrants first.
    pub fn locations(&self) -> impl Iterator<Item = &Location> {
        self.gold.iter().chain(&self.replica_list)
    }
}

impl Payload {
    /// Whether no node serves it any more.
    pub fn is_orphaned(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.gold.is_empty() && s.replica_list.is_empty())
    }

    /// What a listing shows.
    pub fn info(&self) -> PayloadInfo {
        PayloadInfo {
            name: self.name.clone(),
            total_size: self.size,
            size_list: self.size_list.clone(),
            max_shard_size: self.max_shard_size,
            buffer_names: self.buffer_names.clone(),
        }
    }

    /// Checks that the entry is self-consistent: shards cut from `size_list` by
    /// `max_shard_size`, sizes adding up. A malformed entry is refused, never pulled.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| {
            Error::new(
                ErrorKind::MalformedJson,
                format!("catalogue entry of '{}': {why}", self.name),
            )
        };
        let cut = crate::layout::shard_sizes(&self.size_list, self.max_shard_size)
            .map_err(|e| bad(e.message().to_owned()))?;
        if cut.len() != self.shards.len() || cut.iter().zip(&self.shards).any(|(c, s)| *c != s.size)
        {
            return Err(bad(format!(
                "{} shards do not cut buffers of {:?} bytes by {}",
                self.shards.len(),
                self.size_list,
                self.max_shard_size
            )));
        }
        let total = self
            .size_list
            .iter()
            .try_fold(0u64, |sum, s| sum.checked_add(*s));
        if total != Some(self.size) {
            return Err(bad(format!(
                "size {} is not the sum of size_list",
                self.size
            )));
        }
        Ok(())
    }
}

/// The catalogue in a metadata store.
#[derive(Clone)]
pub struct Catalogue {
    store: Arc<dyn MetadataStore>,
    /// With a cluster token, every entry written is signed and an entry read must be.
    token: Option<ClusterToken>,
}

/// What an update decided.
pub(crate) enum Change {
    /// Write this payload (or delete the entry, if no node serves it any more).
    Write(Payload),
    /// Leave the entry as it is.
    Keep,
}

impl Catalogue {
    /// The catalogue kept in `store`.
    pub fn new(store: Arc<dyn MetadataStore>, token: Option<ClusterToken>) -> Self {
        Self { store, token }
    }

    /// The key of `name`'s entry.
    pub fn key(name: &str) -> String {
        format!("{PAYLOAD_PREFIX}{name}")
    }

    /// The metadata store.
    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    /// `name`'s entry and the revision it was read at.
    pub async fn get(&self, name: &str) -> Result<Option<(Payload, Revisioned)>> {
        let Some(read) = self.store.get_revisioned(&Self::key(name)).await? else {
            return Ok(None);
        };
        let payload = parse(name, &read.value, self.token.as_ref())?;
        Ok(Some((payload, read)))
    }

    /// Adds `payload` as a new entry: fails with `ERR_PAYLOAD_OPENED` if one exists.
    pub async fn create(&self, payload: &Payload) -> Result<()> {
        let text = serialize(payload, self.token.as_ref())?;
        if self
            .store
            .swap(&Self::key(&payload.name), None, Some(&text))
            .await?
        {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::PayloadOpened,
            format!(
                "a payload named '{}' is already in the catalogue",
                payload.name
            ),
        ))
    }

    /// Writes `payload` whatever the entry holds now.
    pub async fn put(&self, payload: &Payload) -> Result<()> {
        let text = serialize(payload, self.token.as_ref())?;
        self.store.put(&Self::key(&payload.name), &text).await
    }

    /// Read-modify-swap of `name`'s entry until it sticks; an entry no node serves any more is
    /// deleted. `change` sees the current entry (and may be called again after a lost race).
    /// The entry as written, or `None` when it is gone.
    pub(crate) async fn update(
        &self,
        name: &str,
        mut change: impl FnMut(&mut Payload) -> Result<Change>,
    ) -> Result<Option<Payload>> {
        let key = Self::key(name);
        for _ in 0..SWAP_ATTEMPTS {
            let Some((mut payload, read)) = self.get(name).await? else {
                return Err(not_found(name));
            };
            match change(&mut payload)? {
                Change::Keep => return Ok(Some(payload)),
                Change::Write(next) if next.is_orphaned() => {
                    if self.store.swap(&key, Some(&read), None).await? {
                        return Ok(None);
                    }
                }
                Change::Write(next) => {
                    let text = serialize(&next, self.token.as_ref())?;
                    if self.store.swap(&key, Some(&read), Some(&text)).await? {
                        return Ok(Some(next));
                    }
                }
            }
        }
        Err(Error::new(
            ErrorKind::Metadata,
            format!("the catalogue entry of '{name}' kept changing under {SWAP_ATTEMPTS} updates"),
        ))
    }

    /// Every payload whose name starts with `prefix`, in name order. Entries that do not parse
    /// are skipped (and logged): one bad entry does not hide the others.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Payload>> {
        let entries = self.store.list(&Self::key(prefix)).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(key, value)| {
                let name = key.strip_prefix(PAYLOAD_PREFIX)?;
                parse(name, &value, self.token.as_ref())
                    .inspect_err(|e| tracing::warn!("skipping catalogue entry '{key}': {e}"))
                    .ok()
            })
            .collect())
    }
}

/// Buffer names are at most 4096 bytes, without NUL, one per buffer.
pub(crate) fn check_buffer_names(names: &[String], buffers: usize) -> Result<()> {
    if names.len() != buffers {
        return Err(Error::invalid(format!(
            "{} buffer names for {buffers} buffers",
            names.len()
        )));
    }
    if names.iter().any(|n| n.len() > 4096 || n.contains('\0')) {
        return Err(Error::invalid(
            "a buffer name is at most 4096 bytes, without NUL",
        ));
    }
    Ok(())
}

pub(crate) fn not_found(name: &str) -> Error {
    Error::new(
        ErrorKind::PayloadNotFound,
        format!("no payload named '{name}' in the catalogue"),
    )
}

/// What a payload entry's signature covers: the entry as this crate writes it, unsigned.
fn signed_text(payload: &Payload) -> Result<String> {
    let unsigned = Payload {
        signature: None,
        ..payload.clone()
    };
    serde_json::to_string(&unsigned)
        .map_err(|e| Error::new(ErrorKind::InternalError, format!("payload to JSON: {e}")))
}

fn parse(name: &str, text: &str, token: Option<&ClusterToken>) -> Result<Payload> {
    let payload: Payload = serde_json::from_str(text).map_err(|e| {
        Error::new(
            ErrorKind::MalformedJson,
            format!("catalogue entry of '{name}': {e}"),
        )
    })?;
    if payload.name != name {
        return Err(Error::new(
            ErrorKind::MalformedJson,
            format!("the entry at '{name}' names '{}'", payload.name),
        ));
    }
    payload.validate()?;
    if let Some(token) = token {
        let signed = payload.signature.as_deref().is_some_and(|signature| {
            signed_text(&payload)
                .is_ok_and(|text| token.verify(&[PAYLOAD_PURPOSE, text.as_bytes()], signature))
        });
        if !signed {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                format!("the catalogue entry of '{name}' does not carry this cluster's signature"),
            ));
        }
    }
    Ok(payload)
}

fn serialize(payload: &Payload, token: Option<&ClusterToken>) -> Result<String> {
    let mut payload = payload.clone();
    payload.signature = None;
    if let Some(token) = token {
        let text = signed_text(&payload)?;
        payload.signature = Some(token.sign(&[PAYLOAD_PURPOSE, text.as_bytes()]));
    }
    serde_json::to_string(&payload)
        .map_err(|e| Error::new(ErrorKind::InternalError, format!("payload to JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_mooncake_writes_and_writes_what_it_reads() {
        // As Go's encoding/json writes Mooncake's structs: nil slices as null.
        let go = r#"{"name":"ckpt","size":10,"size_list":[6,4],"max_shard_size":4,"shards":[{"size":4,"gold":[{"segment_name":"10.0.0.1:12345","offset":4096}],"replica_list":null},{"size":2,"gold":[{"segment_name":"10.0.0.1:12345","offset":4100}],"replica_list":[{"segment_name":"10.0.0.2:12345","offset":8192}]},{"size":4,"gold":null,"replica_list":null}]}"#;
        let payload = parse("ckpt", go, None).unwrap();
        assert_eq!(payload.shards.len(), 3);
        assert_eq!(payload.shards[1].replica_list[0].offset, 8192);
        assert!(payload.shards[2].gold.is_empty());
        let ours = serialize(&payload, None).unwrap();
        let value: serde_json::Value = serde_json::from_str(&ours).unwrap();
        for field in ["name", "size", "size_list", "max_shard_size", "shards"] {
            assert!(value.get(field).is_some(), "{field}");
        }
        assert!(value["shards"][0].get("checksum").is_none());
        assert_eq!(parse("ckpt", &ours, None).unwrap(), payload);
    }

    #[test]
    fn malformed_entries_are_refused() {
        let entry = |size: u64, sizes: &str, shards: &str| {
            format!(
                r#"{{"name":"p","size":{size},"size_list":{sizes},"max_shard_size":4,"shards":{shards}}}"#
            )
        };
        let shard = |n: u64| format!(r#"{{"size":{n},"gold":[],"replica_list":[]}}"#);
        let good = entry(6, "[6]", &format!("[{},{}]", shard(4), shard(2)));
        assert!(parse("p", &good, None).is_ok());
        for bad in [
            entry(7, "[6]", &format!("[{},{}]", shard(4), shard(2))),
            entry(6, "[6]", &format!("[{},{}]", shard(2), shard(4))),
            entry(6, "[6]", &format!("[{}]", shard(4))),
            entry(6, "[6]", "null"),
            "{".to_owned(),
        ] {
            assert_eq!(
                parse("p", &bad, None).unwrap_err().kind(),
                ErrorKind::MalformedJson,
                "{bad}"
            );
        }
        assert_eq!(
            parse("q", &good, None).unwrap_err().kind(),
            ErrorKind::MalformedJson,
            "an entry copied under another name"
        );
    }
}
