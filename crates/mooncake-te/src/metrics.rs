//! Prometheus metrics: a lock-free latency histogram for hot paths, helpers that write metric
//! families through `prometheus-client`'s encoder, and the rendering of a registry as the
//! Prometheus text format.
//!
//! `prometheus-client` writes OpenMetrics, where a counter family `x` has samples `x_total`.
//! Prometheus's classic text format (what `promtool check metrics` and most scrapers expect
//! under `text/plain`) names the family `x_total` itself; [`render`] converts, so the same
//! collectors serve both.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Upper bounds, in seconds, of the latency buckets: 10 µs to 10 s, three per decade.
pub const LATENCY_BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The bucket bounds in nanoseconds, so an observation compares integers.
const BUCKET_NANOS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A histogram of durations over [`LATENCY_BUCKETS`]. Observing costs three relaxed atomic
/// adds and no lock (`prometheus-client`'s own histogram takes a lock per observation).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; 20],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        self.observe_many(elapsed, 1);
    }

    /// Records `times` observations of the same duration (the keys of one batch call).
    pub fn observe_many(&self, elapsed: Duration, times: u64) {
        if times == 0 {
            return;
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BUCKET_NANOS.partition_point(|bound| *bound < nanos);
        self.buckets[bucket].fetch_add(times, Ordering::Relaxed);
        self.count.fetch_add(times, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(nanos.saturating_mul(times), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// `(upper bound, observations)` per bucket, not cumulative, the last bound `f64::MAX`
    /// (written as `+Inf`), as `prometheus-client`'s encoder takes them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect()
    }

    fn encode(&self, encoder: &mut MetricEncoder<'_>) -> std::fmt::Result {
        // Read the buckets first: `count` is never below their sum when it is read after.
        let buckets = self.buckets();
        let in_buckets: u64 = buckets.iter().map(|(_, n)| n).sum();
        let count = self.count().max(in_buckets);
        encoder.encode_histogram::<NoLabelSet>(self.sum_seconds(), count, &buckets, None)
    }
}

/// Writes a counter family: one sample per label set.
pub fn counter_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&value, None::<&Exemplar<NoLabelSet, u64>>)?;
    }
    Ok(())
}

/// Writes a gauge without labels.
pub fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// Writes a gauge family: one sample per label set.
pub fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, i64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// Writes a histogram family: one histogram per label set.
pub fn histogram_family<'h, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, &'h LatencyHistogram)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, histogram) in samples {
        histogram.encode(&mut family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The registry's metrics in Prometheus's text format (version 0.0.4, served as
/// `text/plain; version=0.0.4`).
pub fn render(registry: &Registry) -> Result<String> {
    let mut openmetrics = String::new();
    prometheus_client::encoding::text::encode_registry(&mut openmetrics, registry)
        .map_err(|_| Error::new(ErrorKind::InternalError, "metrics could not be encoded"))?;
    Ok(to_prometheus_text(&openmetrics))
}

/// Converts OpenMetrics text to Prometheus's classic text format: counter families are named
/// with their `_total` suffix, `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let described = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            (counters.contains(name) && !name.ends_with("_total"))
                .then(|| format!("{prefix}{name}_total {rest}"))
        });
        out.push_str(described.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = LatencyHistogram::default();
        histogram.observe(Duration::from_micros(10));
        histogram.observe(Duration::from_micros(11));
        histogram.observe_many(Duration::from_millis(3), 2);
        histogram.observe(Duration::from_secs(60));
        let buckets = histogram.buckets();
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
        let count_at = |bound: f64| buckets.iter().find(|(b, _)| *b == bound).map(|(_, n)| *n);
        assert_eq!(count_at(0.000_01), Some(1));
        assert_eq!(count_at(0.000_025), Some(1));
        assert_eq!(count_at(0.005), Some(2));
        assert_eq!(count_at(f64::MAX), Some(1));
        assert_eq!(histogram.count(), 5);
        let expected = 10e-6 + 11e-6 + 2.0 * 3e-3 + 60.0;
        assert!((histogram.sum_seconds() - expected).abs() < 1e-9);
    }

    #[test]
    fn counters_are_named_with_their_total_suffix() {
        #[derive(Debug)]
        struct Sample(LatencyHistogram);
        impl prometheus_client::collector::Collector for Sample {
            fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
                counter_family(
                    &mut encoder,
                    "demo_requests",
                    "Requests.",
                    [([("op", "read")], 3u64)],
                )?;
                gauge(&mut encoder, "demo_in_use_bytes", "In use.", 7)?;
                histogram_family(
                    &mut encoder,
                    "demo_seconds",
                    "Latency.",
                    [([("op", "read")], &self.0)],
                )
            }
        }
        let sample = Sample(LatencyHistogram::default());
        sample.0.observe(Duration::from_millis(1));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(sample));
        let text = render(&registry).unwrap();
        assert!(text.contains("# HELP demo_requests_total Requests.\n"));
        assert!(text.contains("# TYPE demo_requests_total counter\n"));
        assert!(text.contains("demo_requests_total{op=\"read\"} 3\n"));
        assert!(text.contains("# TYPE demo_in_use_bytes gauge\ndemo_in_use_bytes 7\n"));
        assert!(text.contains("demo_seconds_bucket{le=\"0.001\",op=\"read\"} 1\n"));
        assert!(text.contains("demo_seconds_bucket{le=\"+Inf\",op=\"read\"} 1\n"));
        assert!(text.contains("demo_seconds_count{op=\"read\"} 1\n"));
        assert!(!text.contains("# EOF"));
    }
}
