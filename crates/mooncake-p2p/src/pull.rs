//! Pulling a payload: every missing shard read with one one-sided READ from the copy expected
//! to finish soonest, checked against its checksum, and tried elsewhere when a source fails.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_te::engine::SubmitOptions;
use mooncake_te::{Opcode, TransferEngine, TransferRequest};
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::catalogue::{not_found, Catalogue, Location, Payload};
use crate::layout::{checksum, shard_places};
use crate::liveness::live_segments;
use crate::local::Owner;
use crate::partial::{holders, offer, Holding};
use crate::sources::{Cost, SourceReport, Sources};

/// Rounds of "pull what is missing, then check the sources still stand" before giving up.
const ROUNDS: usize = 4;

/// Missing shards weighed for each read a pull starts, in its order.
const SCHEDULE_WINDOW: usize = 256;

/// How often a puller offers what it holds and learns what the others hold.
const EXCHANGE_PERIOD: Duration = Duration::from_millis(100);

/// The longest a pull waits on one exchange: a slow metadata store costs the exchange, never
/// the pull's pace.
const EXCHANGE_LIMIT: Duration = Duration::from_millis(500);

/// A shard that arrives is offered at once unless the last exchange is more recent than this.
const EXCHANGE_SOON: Duration = Duration::from_millis(20);

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
    /// What keeps each local buffer's memory valid, for the reads that check it.
    pub(crate) owners: Vec<Owner>,
    /// Where each held shard was read from (`None` for shards resumed).
    pub(crate) from: Vec<Option<Location>>,
    /// Shards held and checked.
    pub(crate) done: Vec<bool>,
    pub(crate) concurrency: usize,
    pub(crate) progress: Option<ProgressFn>,
    /// How long what this puller offers stays up without a refresh.
    pub(crate) holding_ttl: Duration,
    /// The least time a shard read is given before it is abandoned and made elsewhere.
    pub(crate) read_timeout: Duration,
    /// Where reads still in flight go on when the pull is dropped.
    pub(crate) settling: TaskTracker,
}

/// The reads of a pull. Dropped with reads in flight (the pull's future was dropped), it lets
/// them finish on `settling` rather than abort them: an aborted wait does not stop a transfer,
/// and whoever reuses the buffers must know when the last one landed.
struct Reads<T: Send + 'static> {
    set: JoinSet<T>,
    settling: TaskTracker,
}

impl<T: Send + 'static> Drop for Reads<T> {
    fn drop(&mut self) {
        if self.set.is_empty() {
            return;
        }
        let mut set = std::mem::take(&mut self.set);
        let drain = async move { while set.join_next().await.is_some() {} };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(self.settling.spawn_on(drain, &runtime)),
            Err(_) => tracing::warn!("P2P pull dropped outside a runtime; its reads are aborted"),
        }
    }
}

/// A shard read is given at least the time it takes at this rate.
const SLOWEST_SOURCE: f64 = 32e6;

/// What a pull learned, for the catalogue update that follows it.
pub(crate) struct Pulled {
    pub(crate) sources: Sources,
    /// Copies whose bytes did not match their checksum.
    pub(crate) corrupt: HashSet<Location>,
    pub(crate) bytes: u64,
    pub(crate) retries: usize,
}

impl Pull {
    /// The local address and length of each shard.
    pub(crate) fn shard_addrs(&self) -> Result<Vec<(usize, usize)>> {
        Ok(self
            .shard_spans()?
            .into_iter()
            .map(|(_, a, l)| (a, l))
            .collect())
    }

    /// The buffer, local address and length of each shard.
    fn shard_spans(&self) -> Result<Vec<(usize, usize, usize)>> {
        shard_places(&self.payload.size_list, self.payload.max_shard_size)?
            .into_iter()
            .map(|(buffer, offset, len)| {
                let addr = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.bases[buffer].checked_add(o));
                match (addr, usize::try_from(len)) {
                    (Some(addr), Ok(len)) => Ok((buffer, addr, len)),
                    _ => Err(Error::invalid("shard address out of range")),
                }
            })
            .collect()
    }

    /// Pulls every shard not yet held. On failure `done` still says what was held, so that a
    /// later call resumes.
    pub(crate) async fn run(&mut self, name: &str) -> Result<Pulled> {
        let mut sources = Sources::new(HashSet::new(), self.engine.segment_name());
        let mut bytes = 0;
        let mut retries = 0;
        let mut corrupt = HashSet::new();
        for _ in 0..ROUNDS {
            self.round(&mut sources, &mut corrupt, &mut bytes, &mut retries)
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
            // A payload registered again under the name (same layout, `force`) may hold other
            // bytes: what was checked against the old checksums is read again.
            let mut again = false;
            for (i, from) in self.from.iter().enumerate() {
                let shard = &latest.shards[i];
                let rewritten = shard.checksum != self.payload.shards[i].checksum;
                let source_left = from.as_ref().is_some_and(|location| {
                    shard.checksum.is_none() && !shard.locations().any(|l| l == location)
                });
                if self.done[i] && (rewritten || source_left) {
                    self.done[i] = false;
                    again = true;
                }
            }
            self.payload = latest;
            if self.done.iter().any(|held| !held) && !again {
                // Never list a copy with a hole in it.
                return Err(Error::new(
                    ErrorKind::InternalError,
                    format!("the pull of '{name}' ended with shards missing"),
                ));
            }
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
    ) -> Result<()> {
        let spans = self.shard_spans()?;
        let addrs: Vec<(usize, usize)> = spans.iter().map(|&(_, a, l)| (a, l)).collect();
        let count = addrs.len();
        let me = self.engine.segment_name().to_owned();
        let mut tried: Vec<HashSet<Location>> = vec![HashSet::new(); count];
        let mut attempts = vec![0usize; count];
        // Each puller takes the shards in its own order, so that pullers starting together
        // soon hold different shards to offer each other.
        let mut order: Vec<usize> = (0..count).filter(|&i| !self.done[i]).collect();
        order.sort_by_key(|i| xxhash_rust::xxh3::xxh3_64(format!("{me}\0{i}").as_bytes()));
        let mut pending: VecDeque<usize> = order.into();
        // Bytes and shards held, kept up to date rather than summed on every arrival.
        let mut held = (0u64, 0usize);
        for (i, &(_, len)) in addrs.iter().enumerate() {
            if self.done[i] {
                held = (held.0 + len as u64, held.1 + 1);
            }
        }
        let mut reads = Reads {
            set: JoinSet::new(),
            settling: self.settling.clone(),
        };
        let mut failure: Option<Error> = None;
        let mut peers = self.exchange(sources, &addrs, None).await;
        let per_source = self.concurrency.div_ceil(2).max(1);
        let mut exchanged = Instant::now();
        let mut tick = tokio::time::interval(EXCHANGE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            while failure.is_none() && reads.set.len() < self.concurrency.max(1) {
                // The missing shard with the cheapest copy next: a shard an idle peer offers
                // goes before one only a busy seed has. Ties keep this puller's own order.
                let mut best: Option<(usize, Location, Cost)> = None;
                for (position, &i) in pending.iter().enumerate().take(SCHEDULE_WINDOW) {
                    let copies = self.copies(i, &peers[i], &me);
                    if copies.is_empty() {
                        failure = Some(Error::new(
                            ErrorKind::TooManyRetries,
                            format!("no node serves shard {i} of '{}'", self.payload.name),
                        ));
                        break;
                    }
                    // Half the reads at most from one source: more would not make it serve
                    // faster, and the others are left for peers that may soon offer the shard.
                    let Some((from, cost)) = sources.choose(i, &copies, &tried[i], per_source)
                    else {
                        continue;
                    };
                    let better = best
                        .as_ref()
                        .is_none_or(|(_, _, b)| (cost.0, cost.1) < (b.0, b.1));
                    if better {
                        best = Some((position, from.clone(), cost));
                    }
                }
                if failure.is_some() {
                    break;
                }
                let Some((position, from, _)) = best else {
                    break;
                };
                let Some(i) = pending.remove(position) else {
                    break;
                };
                let shard = &self.payload.shards[i];
                sources.started(&from.segment_name);
                let (buffer, addr, len) = spans[i];
                let timeout = self
                    .read_timeout
                    .max(Duration::from_secs_f64(len as f64 / SLOWEST_SOURCE));
                let read = read_shard(
                    self.engine.clone(),
                    from.clone(),
                    (addr, len, self.owners[buffer].clone()),
                    shard.checksum.clone(),
                    timeout,
                );
                reads.set.spawn(async move {
                    let started = Instant::now();
                    let result = read.await;
                    (i, from, started.elapsed(), result)
                });
            }
            if reads.set.is_empty() {
                break;
            }
            let joined = tokio::select! {
                joined = reads.set.join_next() => joined,
                _ = tick.tick() => {
                    peers = self.exchange(sources, &addrs, Some(std::mem::take(&mut peers))).await;
                    exchanged = Instant::now();
                    continue;
                }
            };
            let Some(joined) = joined else { break };
            // A read that panicked fails the pull, once every other read has settled.
            let (i, from, took, result) = match joined {
                Ok(read) => read,
                Err(e) => {
                    failure.get_or_insert_with(|| {
                        Error::new(
                            ErrorKind::InternalError,
                            format!("a shard read panicked: {e}"),
                        )
                    });
                    continue;
                }
            };
            let len = addrs[i].1 as u64;
            match result {
                Ok(()) => {
                    sources.finished(&from.segment_name, len, took);
                    self.done[i] = true;
                    self.from[i] = Some(from);
                    *bytes += len;
                    held = (held.0 + len, held.1 + 1);
                    self.report_progress(held);
                    // Offered at once, so that pullers deciding now see it.
                    if exchanged.elapsed() >= EXCHANGE_SOON {
                        peers = self
                            .exchange(sources, &addrs, Some(std::mem::take(&mut peers)))
                            .await;
                        exchanged = Instant::now();
                    }
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
                    // Given up only once every copy known now failed, and each as often as
                    // there are copies (three times at least).
                    let all_tried = self
                        .copies(i, &peers[i], &me)
                        .into_iter()
                        .all(|l| tried[i].contains(l));
                    if all_tried && attempts[i] >= tried[i].len().max(3) {
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
            None => Ok(()),
        }
    }

    /// Offers the checked shards this puller holds to the others, and learns what they hold
    /// (and who is alive). Metadata trouble only costs the exchange, never the pull.
    async fn exchange(
        &self,
        sources: &mut Sources,
        addrs: &[(usize, usize)],
        known: Option<Vec<Vec<Location>>>,
    ) -> Vec<Vec<Location>> {
        let none = || vec![Vec::new(); addrs.len()];
        let exchange = self.exchange_now(sources, addrs);
        match tokio::time::timeout(EXCHANGE_LIMIT, exchange).await {
            Ok(peers) => peers,
            Err(_) => {
                tracing::debug!(
                    "P2P '{}': the metadata store is slow; exchange skipped",
                    self.payload.name
                );
                known.unwrap_or_else(none)
            }
        }
    }

    async fn exchange_now(
        &self,
        sources: &mut Sources,
        addrs: &[(usize, usize)],
    ) -> Vec<Vec<Location>> {
        let store = self.catalogue.store();
        let me = self.engine.segment_name();
        let shards: Vec<(usize, u64)> = (0..addrs.len())
            .filter(|&i| self.done[i] && self.payload.shards[i].checksum.is_some())
            .map(|i| (i, addrs[i].0 as u64))
            .collect();
        if !shards.is_empty() {
            let holding = Holding {
                name: self.payload.name.clone(),
                segment_name: me.to_owned(),
                size_list: self.payload.size_list.clone(),
                max_shard_size: self.payload.max_shard_size,
                shards,
            };
            if let Err(e) = offer(store.as_ref(), &holding, self.holding_ttl).await {
                tracing::debug!("P2P '{}': shards held not offered: {e}", self.payload.name);
            }
        }
        if let Ok(live) = live_segments(store.as_ref()).await {
            sources.set_live(live);
        }
        holders(store.as_ref(), &self.payload, me)
            .await
            .unwrap_or_else(|e| {
                tracing::debug!("P2P '{}': other pullers unknown: {e}", self.payload.name);
                vec![Vec::new(); addrs.len()]
            })
    }

    /// The copies of shard `i`: the catalogue's and those `peers` offer, less any under this
    /// node's own name (a stale one of an earlier run).
    fn copies<'a>(&'a self, i: usize, peers: &'a [Location], me: &str) -> Vec<&'a Location> {
        self.payload.shards[i]
            .locations()
            .chain(peers)
            .filter(|l| l.segment_name != me)
            .collect()
    }

    fn report_progress(&self, (bytes_done, shards_done): (u64, usize)) {
        if let Some(progress) = &self.progress {
            progress(Progress {
                bytes_done,
                bytes_total: self.payload.size,
                shards_done,
                shards_total: self.done.len(),
            });
        }
    }
}

/// Reads one shard from `from` into `[local, local+len)` (kept valid by `owner`) and checks
/// it.
async fn read_shard(
    engine: Arc<TransferEngine>,
    from: Location,
    (local, len, owner): (usize, usize, Owner),
    expected: Option<String>,
    timeout: Duration,
) -> Result<()> {
    read(&engine, &from, (local, len), timeout).await?;
    if let Some(expected) = expected {
        // SAFETY: the range lies inside the buffer `owner` keeps valid, and the read that
        // filled it has settled: nothing writes it any more.
        let bytes = unsafe { std::slice::from_raw_parts(local as *const u8, len) };
        let found = checksum(bytes);
        drop(owner);
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
    let probe = read(engine, at, (addr, 1), PROBE_TIMEOUT);
    let answered = tokio::time::timeout(PROBE_TIMEOUT * 2, probe).await;
    if let Err(e) = engine.unregister(addr) {
        tracing::debug!("probe scratch at {addr:#x} stays registered: {e}");
    }
    matches!(answered, Ok(Ok(())))
}

/// One READ of `len` bytes at `from` into registered `local`, bounded by `timeout`.
async fn read(
    engine: &Arc<TransferEngine>,
    from: &Location,
    (local, len): (usize, usize),
    timeout: Duration,
) -> Result<()> {
    let segment = engine.open_segment(&from.segment_name).await?;
    let request = TransferRequest {
        op: Opcode::Read,
        segment: segment.id,
        local_addr: local,
        remote_addr: from.offset,
        len,
    };
    let options = SubmitOptions {
        timeout: Some(timeout),
        ..SubmitOptions::default()
    };
    engine.transfer(&[request], options).await
}
