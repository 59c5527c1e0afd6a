//! The engine's Prometheus metrics: settled requests by transport and direction, and the state
//! of every rail. Read at scrape time from the counters the data path keeps anyway.

use std::collections::HashMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::*;
use crate::metrics::{counter_family, gauge, gauge_family, histogram_family, TextFormat};
use crate::stats::{op_name, route_name};

impl TransferEngine {
    /// Adds this engine's metrics (`mooncake_engine_*`) to `registry`; they are read at each
    /// encoding. Render with [`TextFormat::render`].
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(EngineMetrics(self.clone())));
    }

    /// This engine's metrics in Prometheus's text format.
    pub fn metrics_text(self: &Arc<Self>) -> Result<String> {
        let mut registry = Registry::default();
        self.register_metrics(&mut registry);
        TextFormat::Prometheus.render(&registry)
    }
}

struct EngineMetrics(Arc<TransferEngine>);

impl std::fmt::Debug for EngineMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("EngineMetrics")
            .field(&self.0.segment_name())
            .finish()
    }
}

impl Collector for EngineMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let engine = &self.0;
        let settled: Vec<_> = engine.stats.settled().collect();
        let labels = |route, op| [("transport", route_name(route)), ("op", op_name(op))];
        counter_family(
            &mut encoder,
            "mooncake_engine_transfers",
            "Transfer requests that completed, by transport and direction.",
            settled
                .iter()
                .filter(|(route, _, _)| route.is_some())
                .map(|(route, op, s)| (labels(*route, *op), s.completed())),
        )?;
        counter_family(
            &mut encoder,
            "mooncake_engine_transfer_failures",
            "Transfer requests that failed, timed out or were cancelled, by transport (none: before one was chosen) and direction.",
            settled
                .iter()
                .map(|(route, op, s)| (labels(*route, *op), s.failed())),
        )?;
        counter_family(
            &mut encoder,
            "mooncake_engine_transfer_bytes",
            "Bytes that arrived, by transport and direction (each replica of a store put counts).",
            settled
                .iter()
                .filter(|(route, _, _)| route.is_some())
                .map(|(route, op, s)| (labels(*route, *op), s.bytes())),
        )?;
        histogram_family(
            &mut encoder,
            "mooncake_engine_transfer_duration_seconds",
            "Time from submission to completion of completed transfer requests, by transport and direction.",
            settled
                .iter()
                .filter(|(route, _, _)| route.is_some())
                .map(|(route, op, s)| (labels(*route, *op), s.latency())),
        )?;
        gauge(
            &mut encoder,
            "mooncake_engine_batches",
            "Batches submitted and not yet freed.",
            i64::try_from(engine.batch_count()).unwrap_or(i64::MAX),
        )?;
        encode_rails(&mut encoder, &engine.rail_stats())
    }
}

/// A per-rail counter: name, help and how to read it.
type RailCounter = (&'static str, &'static str, fn(&RailStats) -> u64);

fn encode_rails(
    encoder: &mut DescriptorEncoder<'_>,
    peers: &[(String, Vec<RailStats>)],
) -> std::fmt::Result {
    // Two rails may share a peer and both NICs (two addresses of one device, or a peer known
    // under two descriptors): `rail` numbers them, as a scrape with a repeated series is
    // refused whole.
    let mut seen: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let numbered: Vec<(&str, &RailStats, String)> = peers
        .iter()
        .flat_map(|(peer, rails)| rails.iter().map(move |rail| (peer.as_str(), rail)))
        .map(|(peer, rail)| {
            let n = seen
                .entry((peer, rail.local.as_str(), rail.remote.as_str()))
                .or_default();
            let number = n.to_string();
            *n += 1;
            (peer, rail, number)
        })
        .collect();
    let rails: Vec<_> = numbered
        .iter()
        .map(|(peer, rail, number)| {
            let labels = [
                ("peer", *peer),
                ("local", rail.local.as_str()),
                ("remote", rail.remote.as_str()),
                ("rail", number.as_str()),
            ];
            (labels, *rail)
        })
        .collect();
    let gauge_of = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    gauge_family(
        encoder,
        "mooncake_engine_rail_usable",
        "Whether new slices may take the rail now (0 while paused or its link is down).",
        rails.iter().map(|(l, r)| (*l, i64::from(r.usable))),
    )?;
    gauge_family(
        encoder,
        "mooncake_engine_rail_preferred",
        "Whether the rail is in the preferred tier for its memory.",
        rails.iter().map(|(l, r)| (*l, i64::from(r.preferred))),
    )?;
    gauge_family(
        encoder,
        "mooncake_engine_rail_inflight_bytes",
        "Bytes handed to the rail and not yet settled.",
        rails.iter().map(|(l, r)| (*l, gauge_of(r.inflight_bytes))),
    )?;
    let counters: [RailCounter; 5] = [
        (
            "mooncake_engine_rail_bytes",
            "Bytes the rail carried.",
            |r| r.bytes,
        ),
        (
            "mooncake_engine_rail_slices",
            "Slices the rail carried.",
            |r| r.slices,
        ),
        (
            "mooncake_engine_rail_failures",
            "Slices that failed on the rail.",
            |r| r.failures,
        ),
        (
            "mooncake_engine_rail_pauses",
            "Times the rail was paused after errors.",
            |r| r.pauses,
        ),
        (
            "mooncake_engine_rail_rescued_slices",
            "Slices the rail carried after they had failed on another rail.",
            |r| r.rescued,
        ),
    ];
    for (name, help, value) in counters {
        counter_family(
            encoder,
            name,
            help,
            rails.iter().map(|(l, r)| (*l, value(r))),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mooncake_transport::rail::RailStats;
    use prometheus_client::encoding::DescriptorEncoder;

    use super::encode_rails;

    struct Rails(Vec<(String, Vec<RailStats>)>);

    impl std::fmt::Debug for Rails {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Rails")
        }
    }

    impl prometheus_client::collector::Collector for Rails {
        fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
            encode_rails(&mut encoder, &self.0)
        }
    }

    #[test]
    fn rails_with_one_peer_and_the_same_nics_are_distinct_series() {
        let rail = |bytes| RailStats {
            local: "eth0".into(),
            remote: "eth1".into(),
            bytes,
            ..RailStats::default()
        };
        let peers = vec![
            ("10.0.0.2:1".to_owned(), vec![rail(1), rail(2)]),
            ("10.0.0.2:1".to_owned(), vec![rail(3)]),
        ];
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Rails(peers)));
        let text = crate::metrics::TextFormat::Prometheus
            .render(&registry)
            .expect("encodes");
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("mooncake_engine_rail_bytes_total{"))
            .map(|l| l.rsplit_once(' ').map_or(l, |(labels, _)| labels))
            .collect();
        assert_eq!(series.len(), 3, "{text}");
        let mut unique = series.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 3, "{text}");
    }
}
