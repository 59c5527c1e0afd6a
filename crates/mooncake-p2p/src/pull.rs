//! Pulling a payload: every missing shard read with one one-sided READ from the copy expected
//! to finish soonest, checked against its checksum, and tried elsewhere when a source fails.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_te::engine::SubmitOptions;
use mooncake_te::{Opcode, TransferEngine, TransferRequest};
use tokio::task::JoinSet;

use crate::catalogue::{not_found, Catalogue, Location, Payload};
use crate::layout::{checksum, shard_places};
use crate::liveness::live_segments;
use crate::sources::{SourceReport, Sources};

/// Rounds of "pull what is missing, then check the sources still stand" before giving up.
const ROUNDS: usize = 4;

/// How far a pull has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes held, resumed ones included.
    pub bytes_done: u64,
    /// Bytes of the payload.
    pub bytes_total: u64,
    /// Shards held.
    pub shards_done: usize,
    /// Shards of the payload.
    pub shards_total: usize,
}

/// Called as shards arrive.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// What a finished pull did.
#[derive(Debug, Clone, PartialEq)]
pub struct PullReport {
    /// Bytes read in this call.
    pub bytes: u64,
    /// Bytes already held from an interrupted pull, checked and kept.
    pub resumed_bytes: u64,
    /// Reads that failed and were made again elsewhere.
    pub retries: usize,
    /// Each source read from, most bytes first.
    pub sources: Vec<SourceReport>,
    /// Time from start to the catalogue update.
    pub elapsed: Duration,
}

/// A pull in progress: the payload as last read, the local buffers, what is held.
pub(crate) struct Pull {
    pub(crate) engine: Arc<TransferEngine>,
    pub(crate) catalogue: Catalogue,
    pub(crate) payload: Payload,
    /// Address of each local buffer, as `size_list`.
    pub(crate) bases: Vec<usize>,
    /// Shards held and checked.
    pub(crate) done: Vec<bool>,
    pub(crate) concurrency: usize,
    pub(crate) progress: Option<ProgressFn>,
}

/// What a pull learned, for the catalogue update that follows it.
pub(crate) struct Pulled {
    pub(crate) sources: Sources,
    /// Copies whose bytes did not match their checksum.
    pub(crate) corrupt: HashSet<Location>,
    pub(crate) bytes: u64,
    pub(crate) retries: usize,
}

impl Pull {
    /// The local address of each shard.
    pub(crate) fn shard_addrs(&self) -> Result<Vec<(usize, usize)>> {
        shard_places(&self.payload.size_list, self.payload.max_shard_size)?
            .into_iter()
            .map(|(buffer, offset, len)| {
                let addr = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.bases[buffer].checked_add(o));
                match (addr, usize::try_from(len)) {
                    (Some(addr), Ok(len)) => Ok((addr, len)),
                    _ => Err(Error::invalid("shard address out of range")),
                }
            })
            .collect()
    }

    /// Pulls every shard not yet held. On failure `done` still says what was held, so that a
    /// later call resumes.
    pub(crate) async fn run(&mut self, name: &str) -> Result<Pulled> {
        let store = self.catalogue.store().clone();
        let live = live_segments(store.as_ref()).await.unwrap_or_else(|e| {
            tracing::warn!("P2P pull of '{name}': liveness unknown: {e}");
            HashSet::new()
        });
        let mut sources = Sources::new(live, self.engine.segment_name());
        let mut bytes = 0;
        let mut retries = 0;
        let mut corrupt = HashSet::new();
        for _ in 0..ROUNDS {
            let used = self
                .round(&mut sources, &mut corrupt, &mut bytes, &mut retries)
                .await?;
            let Some((latest, _)) = self.catalogue.get(name).await? else {
                return Err(not_found(name));
            };
            if latest.size_list != self.payload.size_list
                || latest.max_shard_size != self.payload.max_shard_size
            {
                return Err(Error::new(
                    ErrorKind::PayloadNotFound,
                    format!("'{name}' was replaced by a payload of another layout while pulled"),
                ));
            }
            // Bytes with no checksum are only as good as their source: one that left the
            // catalogue while read from may have reused the memory, so read those again.
            let mut again = false;
            for (i, used) in used.into_iter().enumerate() {
                let shard = &latest.shards[i];
                if let Some(location) = used {
                    if shard.checksum.is_none() && !shard.locations().any(|l| *l == location) {
                        self.done[i] = false;
                        again = true;
                    }
                }
            }
            self.payload = latest;
            if !again {
                return Ok(Pulled {
                    sources,
                    corrupt,
                    bytes,
                    retries,
                });
            }
        }
        Err(Error::new(
            ErrorKind::TooManyRetries,
            format!("the sources of '{name}' kept leaving while it was pulled"),
        ))
    }

    /// One pass over the missing shards; where each one was read from.
    async fn round(
        &mut self,
        sources: &mut Sources,
        corrupt: &mut HashSet<Location>,
        bytes: &mut u64,
        retries: &mut usize,
    ) -> Result<Vec<Option<Location>>> {
        let addrs = self.shard_addrs()?;
        let count = addrs.len();
        let mut used: Vec<Option<Location>> = vec![None; count];
        let mut tried: Vec<HashSet<Location>> = vec![HashSet::new(); count];
        let mut attempts = vec![0usize; count];
        let mut pending: VecDeque<usize> = (0..count).filter(|&i| !self.done[i]).collect();
        let mut reads = JoinSet::new();
        let mut failure: Option<Error> = None;
        loop {
            while failure.is_none() && reads.len() < self.concurrency.max(1) {
                let Some(i) = pending.pop_front() else { break };
                let shard = &self.payload.shards[i];
                let Some(from) = sources.pick(i, shard, &tried[i]).cloned() else {
                    failure = Some(Error::new(
                        ErrorKind::TooManyRetries,
                        format!("no node serves shard {i} of '{}'", self.payload.name),
                    ));
                    break;
                };
                sources.started(&from.segment_name);
                let (addr, len) = addrs[i];
                let read = read_shard(
                    self.engine.clone(),
                    from.clone(),
                    addr,
                    len,
                    shard.checksum.clone(),
                );
                reads.spawn(async move {
                    let started = Instant::now();
                    let result = read.await;
                    (i, from, started.elapsed(), result)
                });
            }
            let Some(joined) = reads.join_next().await else {
                break;
            };
            let (i, from, took, result) = joined.map_err(|e| {
                Error::new(
                    ErrorKind::InternalError,
                    format!("a shard read panicked: {e}"),
                )
            })?;
            let len = addrs[i].1 as u64;
            match result {
                Ok(()) => {
                    sources.finished(&from.segment_name, len, took);
                    self.done[i] = true;
                    used[i] = Some(from);
                    *bytes += len;
                    self.report_progress(&addrs);
                }
                Err(e) => {
                    let bad_bytes = e.kind() == ErrorKind::ChecksumMismatch;
                    tracing::info!(
                        "P2P shard {i} from {}@{:#x}: {e}; trying elsewhere",
                        from.segment_name,
                        from.offset
                    );
                    sources.failed(&from.segment_name, bad_bytes);
                    if bad_bytes {
                        corrupt.insert(from.clone());
                    }
                    tried[i].insert(from);
                    attempts[i] += 1;
                    *retries += 1;
                    let limit = self.payload.shards[i].locations().count().max(3);
                    if attempts[i] >= limit {
                        failure.get_or_insert_with(|| {
                            Error::new(
                                ErrorKind::TooManyRetries,
                                format!(
                                    "shard {i} of '{}' failed {} times, last: {e}",
                                    self.payload.name, attempts[i]
                                ),
                            )
                        });
                    } else {
                        pending.push_front(i);
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(used),
        }
    }

    fn report_progress(&self, addrs: &[(usize, usize)]) {
        let Some(progress) = &self.progress else {
            return;
        };
        let (mut bytes_done, mut shards_done) = (0u64, 0usize);
        for (i, (_, len)) in addrs.iter().enumerate() {
            if self.done[i] {
                bytes_done += *len as u64;
                shards_done += 1;
            }
        }
        progress(Progress {
            bytes_done,
            bytes_total: self.payload.size,
            shards_done,
            shards_total: addrs.len(),
        });
    }
}

/// Reads one shard from `from` into `[local, local+len)` and checks it.
async fn read_shard(
    engine: Arc<TransferEngine>,
    from: Location,
    local: usize,
    len: usize,
    expected: Option<String>,
) -> Result<()> {
    let segment = engine.open_segment(&from.segment_name).await?;
    let request = TransferRequest {
        op: Opcode::Read,
        segment: segment.id,
        local_addr: local,
        remote_addr: from.offset,
        len,
    };
    engine
        .transfer(&[request], SubmitOptions::default())
        .await?;
    if let Some(expected) = expected {
        // SAFETY: the range lies inside a buffer the pull registered and keeps alive until it
        // returns, and the read that filled it has completed.
        let bytes = unsafe { std::slice::from_raw_parts(local as *const u8, len) };
        let found = checksum(bytes);
        if found != expected {
            return Err(Error::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "{len} bytes from {}@{:#x} hash to {found}, not {expected}",
                    from.segment_name, from.offset
                ),
            ));
        }
    }
    Ok(())
}

/// How long a probe of a silent source may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `at` answers a one-byte read: how a puller tells a source that publishes no
/// liveness (a Mooncake node, or one whose entry expired) from a dead one.
pub(crate) async fn answers(engine: &Arc<TransferEngine>, at: &Location) -> bool {
    let scratch = Box::new([0u8; 8]);
    let addr = scratch.as_ptr() as usize;
    // SAFETY: the box is the registration's owner, so the 8 bytes live as long as it does.
    if let Err(e) = unsafe { engine.register_private(addr, 8, scratch) } {
        tracing::debug!("no probe of {}: {e}", at.segment_name);
        return true;
    }
    let read = async {
        let segment = engine.open_segment(&at.segment_name).await?;
        let request = TransferRequest {
            op: Opcode::Read,
            segment: segment.id,
            local_addr: addr,
            remote_addr: at.offset,
            len: 1,
        };
        let options = SubmitOptions {
            timeout: Some(PROBE_TIMEOUT),
            ..SubmitOptions::default()
        };
        engine.transfer(&[request], options).await
    };
    let answered = tokio::time::timeout(PROBE_TIMEOUT * 2, read).await;
    if let Err(e) = engine.unregister(addr) {
        tracing::debug!("probe scratch at {addr:#x} stays registered: {e}");
    }
    matches!(answered, Ok(Ok(())))
}
