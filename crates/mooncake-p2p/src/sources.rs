//! Which copy of a shard to read next.
//!
//! Mooncake reads from a random copy, so every puller piles onto the seed as often as onto
//! anyone else. Here each puller keeps, per source, the shards it has in flight there and the
//! speed it observed, and reads from the source expected to finish soonest. Sources known to
//! be alive come first, then those whose liveness is unknown (a Mooncake node publishes none);
//! one that failed is tried again only when nothing else is left. Ties are broken by a hash of
//! (puller, shard, source), so that pullers starting together spread over the sources rather
//! than all picking the first.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::catalogue::Location;

/// Weight of the newest observation in a source's speed.
const SPEED_WEIGHT: f64 = 0.5;

/// What reading a copy is expected to cost: (tier: alive, unknown, failed; seconds per byte of
/// the queue there; tie-break). Lower is better.
pub(crate) type Cost = (u8, f64, u64);

/// What one puller knows of one source.
#[derive(Debug, Default, Clone)]
pub(crate) struct Source {
    /// Shards in flight from it.
    inflight: usize,
    /// Observed bytes per second, smoothed.
    speed: Option<f64>,
    /// Reads that failed (a dead peer, unregistered memory).
    failures: usize,
    /// Shards whose bytes did not match their checksum.
    corrupt: usize,
    /// Bytes and shards read from it.
    bytes: u64,
    shards: usize,
}

/// What a puller tells about one source once done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    /// Its segment name.
    pub segment: String,
    /// Bytes read from it.
    pub bytes: u64,
    /// Shards read from it.
    pub shards: usize,
    /// Reads from it that failed.
    pub failures: usize,
    /// Shards from it whose bytes did not match their checksum.
    pub corrupt: usize,
}

/// Every source a puller has seen.
#[derive(Debug)]
pub(crate) struct Sources {
    by_segment: HashMap<String, Source>,
    /// Segments that advertise they are alive.
    live: HashSet<String>,
    /// This puller's name, salting the tie-break.
    salt: String,
}

impl Sources {
    pub(crate) fn new(live: HashSet<String>, puller: &str) -> Self {
        Self {
            by_segment: HashMap::new(),
            live,
            salt: puller.to_owned(),
        }
    }

    /// Replaces the set of segments known to be alive.
    pub(crate) fn set_live(&mut self, live: HashSet<String>) {
        self.live = live;
    }

    /// The copy of shard `index` to read now, and what reading it costs; `None` to wait.
    ///
    /// A copy in `failed` (it failed this shard) is taken again only once every copy did. Of
    /// the rest, only the best tier counts (alive, unknown, failed), and a source with `limit`
    /// reads in flight is waited for rather than passed over for a worse one.
    pub(crate) fn choose<'a>(
        &self,
        index: usize,
        copies: &[&'a Location],
        failed: &HashSet<Location>,
        limit: usize,
    ) -> Option<(&'a Location, Cost)> {
        let untried = copies.iter().any(|l| !failed.contains(*l));
        let eligible = copies
            .iter()
            .copied()
            .filter(|l| !(untried && failed.contains(*l)));
        let best_tier = eligible.clone().map(|l| self.tier(&l.segment_name)).min()?;
        let best_speed = self
            .by_segment
            .values()
            .filter_map(|s| s.speed)
            .fold(None, |best: Option<f64>, s| {
                Some(best.map_or(s, |b| b.max(s)))
            });
        eligible
            .filter(|l| self.tier(&l.segment_name) == best_tier)
            .filter(|l| !self.busy(&l.segment_name, limit))
            .map(|l| (l, self.cost(index, l, best_speed)))
            .min_by(|(_, a), (_, b)| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal))
    }

    /// 0 for a source known alive, 1 for one whose liveness is unknown, 2 for one that failed.
    pub(crate) fn tier(&self, segment: &str) -> u8 {
        let failed = self
            .by_segment
            .get(segment)
            .is_some_and(|s| s.failures + s.corrupt > 0);
        match (failed, self.live.contains(segment)) {
            (false, true) => 0,
            (false, false) => 1,
            (true, _) => 2,
        }
    }

    fn cost(&self, index: usize, location: &Location, best_speed: Option<f64>) -> Cost {
        let segment = &location.segment_name;
        let source = self.by_segment.get(segment);
        let tier = self.tier(segment);
        // A source never measured is assumed as fast as the best one, so that it gets tried.
        let speed = source
            .and_then(|s| s.speed)
            .or(best_speed)
            .unwrap_or(1.0)
            .max(1.0);
        let queue = source.map_or(0, |s| s.inflight) as f64 + 1.0;
        let tie =
            xxhash_rust::xxh3::xxh3_64(format!("{}\0{index}\0{segment}", self.salt).as_bytes());
        (tier, queue / speed, tie)
    }

    /// Whether `limit` shards are already in flight from `segment`.
    fn busy(&self, segment: &str, limit: usize) -> bool {
        self.by_segment
            .get(segment)
            .is_some_and(|s| s.inflight >= limit)
    }

    pub(crate) fn started(&mut self, segment: &str) {
        self.entry(segment).inflight += 1;
    }

    pub(crate) fn finished(&mut self, segment: &str, bytes: u64, took: Duration) {
        let source = self.entry(segment);
        source.inflight = source.inflight.saturating_sub(1);
        source.bytes += bytes;
        source.shards += 1;
        let observed = bytes as f64 / took.as_secs_f64().max(1e-6);
        source.speed = Some(match source.speed {
            None => observed,
            Some(old) => old * (1.0 - SPEED_WEIGHT) + observed * SPEED_WEIGHT,
        });
    }

    pub(crate) fn failed(&mut self, segment: &str, corrupt: bool) {
        let source = self.entry(segment);
        source.inflight = source.inflight.saturating_sub(1);
        if corrupt {
            source.corrupt += 1;
        } else {
            source.failures += 1;
        }
    }

    /// Whether this puller has read, or tried to read, from `segment`.
    pub(crate) fn knows(&self, segment: &str) -> bool {
        self.by_segment.contains_key(segment)
    }

    /// Segments a read from failed (not for bad bytes).
    pub(crate) fn unreachable(&self) -> HashSet<String> {
        self.by_segment
            .iter()
            .filter(|(_, s)| s.failures > 0)
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub(crate) fn report(&self) -> Vec<SourceReport> {
        let mut out: Vec<SourceReport> = self
            .by_segment
            .iter()
            .map(|(segment, s)| SourceReport {
                segment: segment.clone(),
                bytes: s.bytes,
                shards: s.shards,
                failures: s.failures,
                corrupt: s.corrupt,
            })
            .collect();
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.segment.cmp(&b.segment)));
        out
    }

    fn entry(&mut self, segment: &str) -> &mut Source {
        self.by_segment.entry(segment.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Shard;

    fn shard(segments: &[&str]) -> Shard {
        Shard {
            size: 100,
            gold: vec![Location {
                segment_name: segments[0].into(),
                offset: 0,
            }],
            replica_list: segments[1..]
                .iter()
                .map(|s| Location {
                    segment_name: (*s).into(),
                    offset: 0,
                })
                .collect(),
            checksum: None,
        }
    }

    fn copies(shard: &Shard) -> Vec<&Location> {
        shard.locations().collect()
    }

    fn live(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn load_spreads_over_live_sources_and_failed_ones_come_last() {
        let shard = shard(&["seed", "a", "b"]);
        let mut sources = Sources::new(live(&["seed", "a", "b"]), "puller");
        let none = HashSet::new();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for i in 0..9 {
            let pick = sources
                .choose(i, &copies(&shard), &none, usize::MAX)
                .unwrap()
                .0
                .segment_name
                .clone();
            sources.started(&pick);
            *counts.entry(pick).or_default() += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [3, 3, 3]);

        let mut sources = Sources::new(live(&["a", "b"]), "puller");
        sources.failed("a", false);
        for i in 0..4 {
            assert_eq!(
                sources
                    .choose(i, &copies(&shard), &none, usize::MAX)
                    .unwrap()
                    .0
                    .segment_name,
                "b"
            );
            sources.started("b");
        }
        // Past the live one, the unknown one beats the failed one.
        let exclude: HashSet<Location> = shard
            .locations()
            .filter(|l| l.segment_name == "b")
            .cloned()
            .collect();
        assert_eq!(
            sources
                .choose(0, &copies(&shard), &exclude, usize::MAX)
                .unwrap()
                .0
                .segment_name,
            "seed"
        );
    }

    #[test]
    fn a_faster_source_takes_more() {
        let shard = shard(&["slow", "fast"]);
        let mut sources = Sources::new(live(&["slow", "fast"]), "p");
        sources.started("slow");
        sources.finished("slow", 100, Duration::from_secs(1));
        sources.started("fast");
        sources.finished("fast", 1000, Duration::from_secs(1));
        let none = HashSet::new();
        let mut fast = 0;
        for i in 0..11 {
            let pick = sources
                .choose(i, &copies(&shard), &none, usize::MAX)
                .unwrap()
                .0
                .segment_name
                .clone();
            fast += usize::from(pick == "fast");
            sources.started(&pick);
        }
        assert_eq!(fast, 10, "ten times the speed, ten times the queue");
    }

    #[test]
    fn a_busy_source_is_waited_for_rather_than_a_worse_one_taken() {
        let shard = shard(&["seed", "dead"]);
        let mut sources = Sources::new(live(&["seed"]), "p");
        sources.failed("dead", false);
        let none = HashSet::new();
        for _ in 0..2 {
            let (pick, _) = sources.choose(0, &copies(&shard), &none, 2).unwrap();
            assert_eq!(pick.segment_name, "seed");
            sources.started("seed");
        }
        assert!(sources.choose(0, &copies(&shard), &none, 2).is_none());
        sources.finished("seed", 100, Duration::from_millis(1));
        assert!(sources.choose(0, &copies(&shard), &none, 2).is_some());
    }
}
