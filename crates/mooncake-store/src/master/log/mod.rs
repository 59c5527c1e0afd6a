//! Where the master's log goes, and the task that writes it.
//!
//! The state machine turns each critical section's acknowledged changes into an [`Entry`]
//! (see `Master::take_entry`); [`Log::submit`] queues it while the lock is still held, so
//! entries keep the order of the changes. One task appends whatever has queued up in one write
//! (group commit: while a write is in flight the next batch gathers), then tells the waiting
//! requests their entries are durable. Every so many entries it replaces the log with a
//! snapshot of the state.
//!
//! - [`disk`]: a directory on local disk (`--data-dir`), fsync'd;
//! - [`etcd`]: etcd, fenced by the leader's lease (`--enable-ha`).

pub mod disk;
pub mod etcd;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use mooncake_common::{Error, ErrorKind, Result};
pub use mooncake_metadata::store::BoxFuture;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Master;
use crate::proto::journal::{Entry, Snapshot};

/// What a log holds: the latest snapshot and the entries after it, in order.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The latest snapshot, if one was taken.
    pub snapshot: Option<Snapshot>,
    /// Entries after the snapshot.
    pub entries: Vec<Entry>,
}

/// Durable storage for the log.
pub trait LogStore: Send + Sync {
    /// The latest snapshot and every entry after it.
    fn load(&self) -> BoxFuture<'_, Result<Recovered>>;
    /// Makes `entries` durable after those already appended. Fails when the store failed or
    /// this master may no longer write to it.
    fn append<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<()>>;
    /// Stores `snapshot` and drops every entry it includes.
    fn compact<'a>(&'a self, snapshot: &'a Snapshot) -> BoxFuture<'a, Result<()>>;
}

/// Appends and snapshots so far, for `/metrics` and `/health`.
#[derive(Debug, Clone, Default)]
pub struct LogProgress {
    /// The last durable entry.
    pub durable: u64,
    /// Appends (each one write to the store).
    pub appends: u64,
    /// Entries appended.
    pub entries: u64,
    /// Snapshots written.
    pub snapshots: u64,
    /// When the last snapshot was written.
    pub snapshot_at: Option<Instant>,
    /// Why the log stopped taking entries; nothing is acknowledged after that.
    pub failed: Option<String>,
}

/// When to replace the log with a snapshot: after so many entries or bytes since the last
/// one, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotPolicy {
    /// Entries since the last snapshot.
    pub entries: u64,
    /// Encoded bytes since the last snapshot.
    pub bytes: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self {
            entries: 50_000,
            bytes: 16 << 20,
        }
    }
}

/// Entries at most per append: etcd refuses requests over 1.5 MiB, and one batch must fit.
const MAX_BATCH_ENTRIES: usize = 1024;

/// The running log: queue entries, wait for them to be durable.
#[derive(Clone)]
pub struct Log {
    queue: mpsc::UnboundedSender<Entry>,
    progress: watch::Receiver<LogProgress>,
    /// A leader's lease: past it, this master must not answer anything.
    lease: Option<etcd::LeaseClock>,
}

impl Log {
    /// Starts the task that writes `state`'s entries to `store`; it ends when `stop` fires or
    /// the store fails.
    pub fn start(
        store: Arc<dyn LogStore>,
        state: Arc<Mutex<Master>>,
        policy: SnapshotPolicy,
        stop: CancellationToken,
        tracker: &TaskTracker,
        lease: Option<etcd::LeaseClock>,
    ) -> Self {
        let durable = Master::lock(&state).last_seq();
        let (queue, entries) = mpsc::unbounded_channel();
        let (report, progress) = watch::channel(LogProgress {
            durable,
            ..LogProgress::default()
        });
        let writer = Writer {
            store,
            state,
            policy,
            report,
            snapshot_seq: 0,
            since_snapshot: (0, 0),
        };
        tracker.spawn(writer.run(entries, stop));
        Self {
            queue,
            progress,
            lease,
        }
    }

    /// Queues the entry of the changes `master` made since the last call; returns its number
    /// when there was one. Call it with the state's lock held.
    pub fn submit(&self, master: &mut Master) -> Option<u64> {
        let entry = master.take_entry()?;
        let seq = entry.seq;
        // A closed queue means the writer stopped; `durable` reports why.
        let _ = self.queue.send(entry);
        Some(seq)
    }

    /// Waits until entry `seq` is durable; fails when the log stopped first.
    pub async fn durable(&self, seq: u64) -> Result<()> {
        let mut progress = self.progress.clone();
        let reached = progress
            .wait_for(|p| p.durable >= seq || p.failed.is_some())
            .await
            .map(|p| (p.durable >= seq, p.failed.clone()));
        match reached {
            Ok((true, _)) => Ok(()),
            Ok((false, why)) => Err(not_durable(why.as_deref().unwrap_or("the log stopped"))),
            Err(_) => Err(not_durable("the log stopped")),
        }
    }

    /// Whether the log still takes entries (and, for a leader, its lease holds).
    pub fn healthy(&self) -> bool {
        self.progress.borrow().failed.is_none() && self.lease.as_ref().is_none_or(|l| l.valid())
    }

    /// Appends and snapshots so far.
    pub fn progress(&self) -> LogProgress {
        self.progress.borrow().clone()
    }
}

/// The change ran but may not survive: not "refused" (`ERR_UNAVAILABLE_IN_CURRENT_STATUS`,
/// which promises nothing ran), so that a client never repeats a removal on its strength.
fn not_durable(why: &str) -> Error {
    Error::new(
        ErrorKind::RpcFail,
        format!("not acknowledged: the master could not make it durable ({why})"),
    )
}

struct Writer {
    store: Arc<dyn LogStore>,
    state: Arc<Mutex<Master>>,
    policy: SnapshotPolicy,
    report: watch::Sender<LogProgress>,
    snapshot_seq: u64,
    /// Entries and bytes appended since the last snapshot.
    since_snapshot: (u64, u64),
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Entry>, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                entry = queue.recv() => match entry {
                    Some(entry) => entry,
                    None => break,
                },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_ENTRIES {
                match queue.try_recv() {
                    Ok(entry) => batch.push(entry),
                    Err(_) => break,
                }
            }
            if let Err(e) = self.write(batch).await {
                tracing::error!("the master's log failed; nothing more is acknowledged: {e}");
                self.report
                    .send_modify(|p| p.failed = Some(e.message().to_owned()));
                break;
            }
        }
    }

    async fn write(&mut self, mut batch: Vec<Entry>) -> Result<()> {
        // A snapshot already holds these.
        batch.retain(|e| e.seq > self.snapshot_seq);
        let Some(last) = batch.last().map(|e| e.seq) else {
            return Ok(());
        };
        let appending = Instant::now();
        self.store.append(&batch).await?;
        tracing::trace!(entries = batch.len(), took = ?appending.elapsed(), "log appended");
        Master::lock(&self.state).entries_durable(last);
        let count = batch.len() as u64;
        let bytes: u64 = batch.iter().map(|e| e.encoded_len() as u64).sum();
        self.report.send_modify(|p| {
            p.durable = p.durable.max(last);
            p.appends += 1;
            p.entries += count;
        });
        self.since_snapshot.0 += count;
        self.since_snapshot.1 += bytes;
        if self.since_snapshot.0 >= self.policy.entries
            || self.since_snapshot.1 >= self.policy.bytes
        {
            self.snapshot().await?;
        }
        Ok(())
    }

    async fn snapshot(&mut self) -> Result<()> {
        let snapshot = Master::lock(&self.state).snapshot();
        let started = Instant::now();
        self.store.compact(&snapshot).await?;
        tracing::info!(
            seq = snapshot.seq,
            objects = snapshot.objects.len(),
            took = ?started.elapsed(),
            "log compacted into a snapshot"
        );
        self.snapshot_seq = snapshot.seq;
        self.since_snapshot = (0, 0);
        Master::lock(&self.state).entries_durable(snapshot.seq);
        self.report.send_modify(|p| {
            p.durable = p.durable.max(snapshot.seq);
            p.snapshots += 1;
            p.snapshot_at = Some(Instant::now());
        });
        Ok(())
    }
}
