//! The log in etcd, under `mooncake-store/<cluster_id>/`:
//!
//! - `master_view`: the leader's RPC address, bound to its lease (Mooncake's key);
//! - `log/<seq>-<piece>`: a batch of entries, the key naming its first entry (zero-padded, so
//!   keys sort in log order). An entry larger than one etcd request is stored in pieces;
//! - `snapshot/latest` (`<seq>/<pieces>`) and `snapshot/<seq>/<piece>`: the latest snapshot.
//!
//! Every write is a transaction that holds only while `master_view` is still bound to the
//! writer's lease: a leader that lost its lease (frozen, partitioned) can write nothing, so it
//! can acknowledge nothing, once another master may have started.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, SortOrder, SortTarget, Txn, TxnOp,
};
use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::etcd::EtcdStore;
use prost::Message;

use super::{BoxFuture, LogStore, Recovered};
use crate::proto::journal::{Batch, Entry, Snapshot};

/// Largest value written in one request: etcd refuses requests over 1.5 MiB by default.
const PIECE_BYTES: usize = 1 << 20;
/// Keys read per page when loading.
const PAGE: i64 = 512;
/// How long one log write is retried against failures of etcd itself.
const WRITE_RETRY_LIMIT: Duration = Duration::from_secs(10);

/// The keys of one cluster.
#[derive(Debug, Clone)]
pub struct ClusterKeys {
    root: String,
}

impl ClusterKeys {
    /// Keys of `cluster_id` (Mooncake's `--cluster_id`).
    pub fn new(cluster_id: &str) -> Self {
        Self {
            root: format!("mooncake-store/{cluster_id}/"),
        }
    }

    /// Everything of this cluster.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The leader's address, bound to its lease.
    pub fn view(&self) -> String {
        format!("{}master_view", self.root)
    }

    /// Where log batches live.
    pub fn log_prefix(&self) -> String {
        format!("{}log/", self.root)
    }

    fn log(&self, seq: u64, piece: u32) -> String {
        format!("{}log/{seq:020}-{piece:06}", self.root)
    }

    fn snapshot_latest(&self) -> String {
        format!("{}snapshot/latest", self.root)
    }

    fn snapshot_piece(&self, seq: u64, piece: u32) -> String {
        format!("{}snapshot/{seq:020}/{piece:06}", self.root)
    }
}

/// When the leader's lease surely still holds: it stops serving at this instant.
#[derive(Debug, Clone)]
pub struct LeaseClock(Arc<Mutex<Instant>>);

impl LeaseClock {
    /// A clock valid until `until`.
    pub fn new(until: Instant) -> Self {
        Self(Arc::new(Mutex::new(until)))
    }

    /// Moves the end of validity (later only).
    pub fn extend(&self, until: Instant) {
        let mut at = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *at = (*at).max(until);
    }

    /// Ends validity now.
    pub fn expire(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Whether the lease still holds.
    pub fn valid(&self) -> bool {
        Instant::now() < *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The log of one cluster in etcd.
#[derive(Clone)]
pub struct EtcdLog {
    etcd: Arc<EtcdStore>,
    keys: ClusterKeys,
    /// Set when leading: the lease `master_view` must be bound to, and its clock.
    fence: Option<(i64, LeaseClock)>,
    /// The revision of the previous snapshot: history is compacted up to it, one snapshot
    /// behind, so that a reader that is only a little behind keeps its watch.
    previous_snapshot: Arc<Mutex<Option<i64>>>,
}

impl EtcdLog {
    /// Reads `keys`' log in `etcd`.
    pub fn new(etcd: Arc<EtcdStore>, keys: ClusterKeys) -> Self {
        Self {
            etcd,
            keys,
            fence: None,
            previous_snapshot: Arc::new(Mutex::new(None)),
        }
    }

    async fn get(&self, key: String, options: Option<GetOptions>) -> Result<GetResponse> {
        self.etcd
            .call("GET", |mut client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.get(key, options).await }
            })
            .await
    }

    /// The same log, written while `master_view` is bound to `lease`.
    pub fn leading(&self, lease: i64, clock: LeaseClock) -> Self {
        Self {
            fence: Some((lease, clock)),
            ..self.clone()
        }
    }

    /// The latest snapshot and the entries after it, as of one revision, which is returned:
    /// a watch from the next revision misses nothing.
    pub async fn load_at(&self) -> Result<(Recovered, i64)> {
        let latest = self.get(self.keys.snapshot_latest(), None).await?;
        let revision = latest.header().map_or(0, |h| h.revision());
        let mut snapshot = None;
        if let Some(kv_pair) = latest.kvs().first() {
            let text = kv_pair.value_str().map_err(etcd)?;
            let (seq, pieces) = text
                .split_once('/')
                .and_then(|(s, p)| Some((s.parse::<u64>().ok()?, p.parse::<u32>().ok()?)))
                .ok_or_else(|| corrupt(format!("snapshot pointer '{text}'")))?;
            let mut bytes = Vec::new();
            for piece in 0..pieces {
                let got = self
                    .get(
                        self.keys.snapshot_piece(seq, piece),
                        Some(GetOptions::new().with_revision(revision)),
                    )
                    .await?;
                let value = got
                    .kvs()
                    .first()
                    .ok_or_else(|| corrupt(format!("snapshot {seq} lacks piece {piece}")))?;
                bytes.extend_from_slice(value.value());
            }
            let decoded = Snapshot::decode(bytes.as_slice()).map_err(corrupt)?;
            if decoded.seq != seq {
                return Err(corrupt(format!(
                    "snapshot {seq} says it is at entry {}",
                    decoded.seq
                )));
            }
            snapshot = Some(decoded);
        }
        let after = snapshot.as_ref().map_or(0, |s| s.seq);
        let entries = self.entries_after(after, Some(revision)).await?;
        Ok((Recovered { snapshot, entries }, revision))
    }

    /// The entry the latest snapshot includes (0 without one).
    pub async fn snapshot_seq(&self) -> Result<u64> {
        let latest = self.get(self.keys.snapshot_latest(), None).await?;
        match latest.kvs().first() {
            None => Ok(0),
            Some(kv) => {
                let text = kv.value_str().map_err(etcd)?;
                text.split_once('/')
                    .and_then(|(seq, _)| seq.parse().ok())
                    .ok_or_else(|| corrupt(format!("snapshot pointer '{text}'")))
            }
        }
    }

    /// Entries after `seq`, in order, reassembled from their pieces (as of `revision`, or now).
    pub async fn entries_after(&self, seq: u64, revision: Option<i64>) -> Result<Vec<Entry>> {
        let end = prefix_end(&self.keys.log_prefix());
        // The entry after `seq` may sit in a batch named by an earlier entry: start from the
        // last key at or before its own.
        let first = self.keys.log(seq.saturating_add(1), 0);
        let mut upto = first.clone().into_bytes();
        upto.push(0);
        let mut options = GetOptions::new()
            .with_range(upto)
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only();
        if let Some(revision) = revision {
            options = options.with_revision(revision);
        }
        let before = self.get(self.keys.log_prefix(), Some(options)).await?;
        let mut from = match before.kvs().first() {
            Some(kv) => String::from_utf8(kv.key().to_vec()).map_err(corrupt)?,
            None => first,
        };
        let mut pieces = Pieces::default();
        let mut entries = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if let Some(revision) = revision {
                options = options.with_revision(revision);
            }
            let page = self.get(from.clone(), Some(options)).await?;
            for pair in page.kvs() {
                let batch = Batch::decode(pair.value()).map_err(corrupt)?;
                entries.extend(pieces.push(batch.entries));
            }
            match (page.more(), page.kvs().last()) {
                (true, Some(last)) => {
                    let mut next = last.key().to_vec();
                    next.push(0);
                    from = String::from_utf8(next).map_err(corrupt)?;
                }
                _ => break,
            }
        }
        entries.retain(|e| e.seq > seq);
        Ok(entries)
    }

    /// Runs `ops` in one transaction that holds only while this master leads; retries
    /// failures of etcd itself while the lease lasts.
    async fn fenced(&self, ops: Vec<TxnOp>) -> Result<()> {
        let Some((lease, clock)) = &self.fence else {
            return Err(Error::new(
                ErrorKind::UnavailableInCurrentStatus,
                "a standby does not write the log",
            ));
        };
        let mut delay = Duration::from_millis(20);
        let give_up = Instant::now() + WRITE_RETRY_LIMIT;
        loop {
            if !clock.valid() {
                return Err(lost());
            }
            let txn = Txn::new()
                .when([Compare::lease(self.keys.view(), CompareOp::Equal, *lease)])
                .and_then(ops.clone());
            let reply = self
                .etcd
                .call("log write", |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await;
            match reply {
                Ok(reply) if reply.succeeded() => return Ok(()),
                Ok(_) => {
                    clock.expire();
                    return Err(lost());
                }
                // A write etcd keeps refusing (out of space, too large) fails the log rather
                // than stalling every acknowledgement behind it.
                Err(e) if Instant::now() >= give_up => return Err(e),
                Err(e) => {
                    tracing::warn!("log write to etcd failed, retrying: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

impl LogStore for EtcdLog {
    fn load(&self) -> BoxFuture<'_, Result<Recovered>> {
        Box::pin(async move { Ok(self.load_at().await?.0) })
    }

    fn append<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            for (key, batch) in batches(&self.keys, entries) {
                self.fenced(vec![TxnOp::put(key, batch.encode_to_vec(), None)])
                    .await?;
            }
            Ok(())
        })
    }

    fn compact<'a>(&'a self, snapshot: &'a Snapshot) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let bytes = snapshot.encode_to_vec();
            let pieces: Vec<&[u8]> = if bytes.is_empty() {
                vec![&[]]
            } else {
                bytes.chunks(PIECE_BYTES).collect()
            };
            for (i, piece) in pieces.iter().enumerate() {
                let key = self.keys.snapshot_piece(snapshot.seq, i as u32);
                self.fenced(vec![TxnOp::put(key, piece.to_vec(), None)])
                    .await?;
            }
            let log_end = self.keys.log(snapshot.seq.saturating_add(1), 0);
            let snapshots_end = self.keys.snapshot_piece(snapshot.seq, 0);
            self.fenced(vec![
                TxnOp::put(
                    self.keys.snapshot_latest(),
                    format!("{}/{}", snapshot.seq, pieces.len()),
                    None,
                ),
                TxnOp::delete(
                    self.keys.log_prefix(),
                    Some(DeleteOptions::new().with_range(log_end)),
                ),
                TxnOp::delete(
                    format!("{}snapshot/0", self.keys.root),
                    Some(DeleteOptions::new().with_range(snapshots_end)),
                ),
            ])
            .await?;
            // Drop the history up to the previous snapshot, so that etcd's space stays bounded.
            let now = self
                .get(self.keys.snapshot_latest(), None)
                .await
                .ok()
                .and_then(|r| r.header().map(|h| h.revision()));
            let previous = std::mem::replace(
                &mut *self
                    .previous_snapshot
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
                now,
            );
            if let Some(revision) = previous {
                let compacted = self
                    .etcd
                    .call("compact", |mut client| async move {
                        client.compact(revision, None).await
                    })
                    .await;
                if let Err(e) = compacted {
                    tracing::debug!("etcd history compaction: {e}");
                }
            }
            Ok(())
        })
    }
}

/// Entries reassembled from pieces.
#[derive(Default)]
pub struct Pieces {
    /// An entry whose next piece has this number.
    partial: Option<(Entry, u32)>,
}

impl Pieces {
    /// Takes the next pieces in log order; returns the entries they complete.
    pub fn push(&mut self, pieces: Vec<Entry>) -> Vec<Entry> {
        let mut done = Vec::new();
        for piece in pieces {
            let (entry, next) = if piece.piece == 0 {
                // An entry starts: one left unfinished before it was never acknowledged (its
                // writer lost its lease mid-entry).
                (piece, 1)
            } else {
                match self.partial.take() {
                    Some((mut partial, next))
                        if partial.seq == piece.seq && next == piece.piece =>
                    {
                        partial.records.extend(piece.records);
                        partial.more = piece.more;
                        (partial, next + 1)
                    }
                    // The rest of an entry whose start this reader never saw (it began
                    // reading mid-entry) or that was abandoned: dropped. The gap it leaves
                    // makes the reader load the log again.
                    _ => continue,
                }
            };
            if entry.more {
                self.partial = Some((entry, next));
            } else {
                done.push(entry);
            }
        }
        done
    }
}

/// Splits `entries` into values under PIECE_BYTES, each with its key.
fn batches(keys: &ClusterKeys, entries: &[Entry]) -> Vec<(String, Batch)> {
    let mut out: Vec<(String, Batch)> = Vec::new();
    let mut size = 0;
    for entry in entries {
        for piece in split(entry) {
            let len = piece.encoded_len();
            let full = out.last().is_none_or(|_| size + len > PIECE_BYTES);
            if full {
                out.push((keys.log(piece.seq, piece.piece), Batch::default()));
                size = 0;
            }
            size += len;
            if let Some((_, batch)) = out.last_mut() {
                batch.entries.push(piece);
            }
        }
    }
    out
}

/// An entry in pieces under PIECE_BYTES each (one piece when it fits).
fn split(entry: &Entry) -> Vec<Entry> {
    if entry.encoded_len() <= PIECE_BYTES {
        return vec![entry.clone()];
    }
    let mut pieces = Vec::new();
    let mut current = Entry {
        seq: entry.seq,
        records: Vec::new(),
        more: true,
        piece: 0,
    };
    let mut size = 0;
    for record in &entry.records {
        let len = record.encoded_len() + 8;
        if size + len > PIECE_BYTES && !current.records.is_empty() {
            let piece = current.piece + 1;
            pieces.push(std::mem::replace(
                &mut current,
                Entry {
                    seq: entry.seq,
                    records: Vec::new(),
                    more: true,
                    piece,
                },
            ));
            size = 0;
        }
        size += len;
        current.records.push(record.clone());
    }
    current.more = false;
    pieces.push(current);
    pieces
}

/// The first key after every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn lost() -> Error {
    Error::new(
        ErrorKind::UnavailableInCurrentStatus,
        "this master lost its leadership lease; another master may be serving",
    )
}

/// An etcd failure.
pub fn etcd(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Metadata, format!("etcd: {e}"))
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InternalError,
        format!("the master's log in etcd is damaged: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::journal::{record::Change, Record};

    fn entry(seq: u64, records: usize, key_len: usize) -> Entry {
        Entry {
            seq,
            records: (0..records)
                .map(|i| Record {
                    change: Some(Change::Erase(format!("{seq}-{i}-{}", "k".repeat(key_len)))),
                })
                .collect(),
            more: false,
            piece: 0,
        }
    }

    #[test]
    fn large_entries_travel_in_pieces_and_come_back_whole() {
        let keys = ClusterKeys::new("c");
        let entries = vec![entry(1, 3, 10), entry(2, 5000, 500), entry(3, 1, 10)];
        let batches = batches(&keys, &entries);
        assert!(batches.len() > 2, "entry 2 needs several pieces");
        let mut sorted: Vec<&String> = batches.iter().map(|(k, _)| k).collect();
        sorted.sort();
        assert_eq!(
            sorted,
            batches.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "keys sort in log order"
        );
        for (_, batch) in &batches {
            assert!(batch.encoded_len() <= PIECE_BYTES + 64);
        }
        let mut pieces = Pieces::default();
        let back: Vec<Entry> = batches
            .into_iter()
            .flat_map(|(_, b)| pieces.push(b.entries))
            .collect();
        assert_eq!(back, entries);
    }

    #[test]
    fn an_unfinished_entry_and_a_piece_without_its_start_are_dropped() {
        let keys = ClusterKeys::new("c");
        let big = entry(2, 5000, 500);
        let pieces: Vec<Entry> = batches(&keys, std::slice::from_ref(&big))
            .into_iter()
            .flat_map(|(_, b)| b.entries)
            .collect();
        assert!(pieces.len() > 1);
        // A leader died after the first piece of entry 2; the next leader wrote its own.
        let mut reader = Pieces::default();
        let mut seen = reader.push(vec![entry(1, 1, 1), pieces[0].clone()]);
        let replacement = entry(2, 2, 3);
        seen.extend(reader.push(vec![replacement.clone()]));
        assert_eq!(seen, vec![entry(1, 1, 1), replacement]);
        // A reader that starts after the first piece sees nothing of the entry.
        let mut late = Pieces::default();
        assert!(late.push(pieces[1..].to_vec()).is_empty());
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("a/"), b"a0".to_vec());
    }
}
