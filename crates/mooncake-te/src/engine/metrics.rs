//! The engine's Prometheus metrics: settled requests by transport and direction, and the state
//! of every rail. Read at scrape time from the counters the data path keeps anyway.

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
    let rails: Vec<_> = peers
        .iter()
        .flat_map(|(peer, rails)| {
            rails.iter().map(move |rail| {
                let labels = [
                    ("peer", peer.as_str()),
                    ("local", rail.local.as_str()),
                    ("remote", rail.remote.as_str()),
                ];
                (labels, rail)
            })
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
