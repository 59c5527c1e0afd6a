//! The master's counters over the last minutes, for the dashboard's charts: a task records
//! their totals every [`SAMPLE_EVERY`] and the dashboard is sent the rates between samples.
//! Only counters that cost no lock of the state are read, so an idle dashboard costs nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::super::service::OpCounters;

/// How often the counters are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept: five minutes of them.
const KEPT: usize = 300;
/// Liveness pings, left out of the request rate: every client sends one a second, busy or not.
const PING: &str = "ping";
/// The read that finds an object or not.
const GET: &str = "get_replica_list";

/// Cumulative counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Requests of every kind but pings (a batch counts each key).
    pub(crate) requests: u64,
    /// Reads of an object's replicas.
    pub(crate) gets: u64,
    /// Reads that found the object.
    pub(crate) hits: u64,
    /// Bytes of objects granted space for writing.
    pub(crate) put_bytes: u64,
    /// Bytes of objects whose replicas went to readers.
    pub(crate) get_bytes: u64,
}

impl Totals {
    /// The counts `counters` hold now.
    pub(crate) fn of(counters: &OpCounters) -> Self {
        let mut totals = Self {
            put_bytes: counters.put_bytes(),
            get_bytes: counters.get_bytes(),
            ..Self::default()
        };
        for (op, requests, failures) in counters.snapshot() {
            if op != PING {
                totals.requests = totals.requests.saturating_add(requests);
            }
            if op == GET {
                totals.gets = requests;
                totals.hits = requests.saturating_sub(failures);
            }
        }
        totals
    }
}

/// Per-second rates between consecutive samples, oldest first, one array per series.
#[derive(Debug, Default, serde::Serialize, PartialEq)]
pub(crate) struct Rates {
    /// Seconds between samples.
    pub(crate) interval_s: f64,
    /// Requests per second.
    pub(crate) ops: Vec<f64>,
    /// Bytes written per second.
    pub(crate) put_bytes: Vec<f64>,
    /// Bytes read per second.
    pub(crate) get_bytes: Vec<f64>,
    /// Share of reads that found their object; `None` where there was no read.
    pub(crate) hit_rate: Vec<Option<f64>>,
}

/// The last [`KEPT`] samples.
#[derive(Debug, Default)]
pub(crate) struct Sampler {
    samples: Mutex<VecDeque<(Instant, Totals)>>,
}

impl Sampler {
    /// Records `totals` as of `at`, forgetting the oldest sample when full.
    pub(crate) fn record(&self, at: Instant, totals: Totals) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == KEPT {
            samples.pop_front();
        }
        samples.push_back((at, totals));
    }

    /// The rates between the samples kept.
    pub(crate) fn rates(&self) -> Rates {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut rates = Rates {
            interval_s: SAMPLE_EVERY.as_secs_f64(),
            ..Rates::default()
        };
        for (earlier, later) in samples.iter().zip(samples.iter().skip(1)) {
            let seconds = later.0.saturating_duration_since(earlier.0).as_secs_f64();
            if seconds <= 0.0 {
                continue;
            }
            let (a, b) = (earlier.1, later.1);
            let per_second = |from: u64, to: u64| to.saturating_sub(from) as f64 / seconds;
            rates.ops.push(per_second(a.requests, b.requests));
            rates.put_bytes.push(per_second(a.put_bytes, b.put_bytes));
            rates.get_bytes.push(per_second(a.get_bytes, b.get_bytes));
            let gets = b.gets.saturating_sub(a.gets);
            let hits = b.hits.saturating_sub(a.hits);
            rates
                .hit_rate
                .push((gets > 0).then(|| hits as f64 / gets as f64));
        }
        rates
    }
}

/// Samples `counters` into `sampler` every [`SAMPLE_EVERY`] until `stop`.
pub(crate) async fn run(sampler: Arc<Sampler>, counters: Arc<OpCounters>, stop: CancellationToken) {
    let mut interval = tokio::time::interval(SAMPLE_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = interval.tick() => sampler.record(Instant::now(), Totals::of(&counters)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_the_time_between_samples() {
        let sampler = Sampler::default();
        let start = Instant::now();
        let totals = |requests, gets, hits, put_bytes, get_bytes| Totals {
            requests,
            gets,
            hits,
            put_bytes,
            get_bytes,
        };
        sampler.record(start, totals(0, 0, 0, 0, 0));
        sampler.record(start + Duration::from_secs(2), totals(10, 4, 3, 2048, 512));
        sampler.record(start + Duration::from_secs(3), totals(10, 4, 3, 2048, 512));
        let rates = sampler.rates();
        assert_eq!(rates.ops, [5.0, 0.0]);
        assert_eq!(rates.put_bytes, [1024.0, 0.0]);
        assert_eq!(rates.get_bytes, [256.0, 0.0]);
        assert_eq!(rates.hit_rate, [Some(0.75), None]);
    }

    #[test]
    fn only_the_last_samples_are_kept() {
        let sampler = Sampler::default();
        let start = Instant::now();
        for i in 0..(KEPT as u64 + 50) {
            let totals = Totals {
                requests: i,
                ..Totals::default()
            };
            sampler.record(start + Duration::from_secs(i), totals);
        }
        let rates = sampler.rates();
        assert_eq!(rates.ops.len(), KEPT - 1);
        assert!(rates.ops.iter().all(|r| *r == 1.0));
    }

    #[test]
    fn pings_are_not_requests_and_gets_that_fail_are_misses() {
        let counters = OpCounters::default();
        counters.count(PING, 5, 0);
        counters.count(GET, 10, 4);
        counters.count("put_start", 3, 1);
        counters.count_put_bytes(300);
        counters.count_get_bytes(600);
        let totals = Totals::of(&counters);
        assert_eq!(
            totals,
            Totals {
                requests: 13,
                gets: 10,
                hits: 6,
                put_bytes: 300,
                get_bytes: 600,
            }
        );
    }
}
