//! Prometheus metrics: a lock-free latency histogram for hot paths, helpers that write metric
//! families through `prometheus-client`'s encoder, and [`TextFormat`], the one way this
//! workspace turns a registry into text. Collectors write through the library's generic
//! encoder, so the same code serves both formats.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};
use prometheus_client::encoding::{
    prometheus_text, text, DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFormat {
    /// Prometheus's classic text format, version 0.0.4: what `promtool check metrics`, curl
    /// users and older scrapers read. A counter family is named with its `_total` suffix.
    Prometheus,
    /// OpenMetrics 1.0.0, which Prometheus asks for in its `Accept` header.
    OpenMetrics,
}

impl TextFormat {
    /// The `Content-Type` to serve this format under.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The registry's metrics in this format.
    pub fn render(self, registry: &Registry) -> Result<String> {
        let mut out = String::new();
        match self {
            Self::Prometheus => prometheus_text::encode(&mut out, registry),
            Self::OpenMetrics => text::encode(&mut out, registry),
        }
        .map_err(|_| Error::new(ErrorKind::InternalError, "metrics could not be encoded"))?;
        Ok(out)
    }
}

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
    /// In microseconds, rounded: nanoseconds would wrap a u64 within weeks at ten thousand
    /// requests in flight (each observation adds its whole duration).
    sum_micros: AtomicU64,
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
        let micros = nanos.saturating_add(500) / 1000;
        self.sum_micros
            .fetch_add(micros.saturating_mul(times), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// `(upper bound, observations)` per bucket, not cumulative, the last bound infinite, as
    /// `prometheus-client`'s encoder takes them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
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
        assert_eq!(count_at(f64::INFINITY), Some(1));
        assert_eq!(histogram.count(), 5);
        let expected = 10e-6 + 11e-6 + 2.0 * 3e-3 + 60.0;
        assert!((histogram.sum_seconds() - expected).abs() < 1e-9);
    }

    #[derive(Debug)]
    struct Demo(LatencyHistogram);

    impl prometheus_client::collector::Collector for Demo {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            counter_family(
                &mut encoder,
                "demo_requests",
                "Requests.",
                [([("op", "read")], 3u64)],
            )?;
            gauge(&mut encoder, "demo_in_use_bytes", "In use.", 7)?;
            gauge_family(
                &mut encoder,
                "demo_peer_bytes",
                "Per peer.",
                [([("peer", "node \"1\" \\ é\nx")], 5)],
            )?;
            histogram_family(
                &mut encoder,
                "demo_seconds",
                "Latency.",
                [([("op", "read")], &self.0)],
            )
        }
    }

    fn demo_registry() -> Registry {
        let demo = Demo(LatencyHistogram::default());
        demo.0.observe(Duration::from_millis(1));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(demo));
        registry
    }

    #[test]
    fn the_classic_format_names_counters_by_their_samples() {
        let text = TextFormat::Prometheus.render(&demo_registry()).unwrap();
        assert!(text.contains("# HELP demo_requests_total Requests.\n"));
        assert!(text.contains("# TYPE demo_requests_total counter\n"));
        assert!(text.contains("demo_requests_total{op=\"read\"} 3\n"));
        assert!(text.contains("# TYPE demo_in_use_bytes gauge\ndemo_in_use_bytes 7\n"));
        assert!(text.contains("demo_seconds_bucket{op=\"read\",le=\"0.001\"} 1\n"));
        assert!(text.contains("demo_seconds_bucket{op=\"read\",le=\"+Inf\"} 1\n"));
        assert!(text.contains("demo_seconds_count{op=\"read\"} 1\n"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_names_counter_families_without_their_suffix() {
        let text = TextFormat::OpenMetrics.render(&demo_registry()).unwrap();
        assert!(text.contains("# TYPE demo_requests counter\n"));
        assert!(text.contains("demo_requests_total{op=\"read\"} 3\n"));
        assert!(text.contains("demo_seconds_bucket{le=\"+Inf\",op=\"read\"} 1\n"));
        assert_eq!(text.matches("le=\"+Inf\"").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn label_values_are_escaped_once_in_both_formats() {
        for format in [TextFormat::Prometheus, TextFormat::OpenMetrics] {
            let text = format.render(&demo_registry()).unwrap();
            assert!(
                text.contains("demo_peer_bytes{peer=\"node \\\"1\\\" \\\\ é\\nx\"} 5\n"),
                "{format:?}:\n{text}"
            );
        }
    }

    #[test]
    #[cfg_attr(not(promtool), ignore = "needs promtool (Debian's prometheus)")]
    fn the_classic_format_passes_promtool() {
        let text = TextFormat::Prometheus.render(&demo_registry()).unwrap();
        if let Err(findings) = mooncake_testkit::promtool::check_metrics(&text) {
            panic!("{findings}\n{text}");
        }
    }
}
