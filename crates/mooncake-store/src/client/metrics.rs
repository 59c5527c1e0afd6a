//! The client's Prometheus metrics: puts, gets and removes (one request per key), their
//! failures, bytes and latency, and the staging buffer's use. The engine's metrics come with
//! them (see [`StoreClient::register_metrics`]).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mooncake_common::Result;
use mooncake_te::metrics::{counter_family, gauge, histogram_family, LatencyHistogram, TextFormat};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::StoreClient;

/// What a request did to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operation {
    /// Puts and upserts.
    Put,
    /// Gets, copying or into caller memory.
    Get,
    /// Removes.
    Remove,
}

impl Operation {
    const ALL: [Self; 3] = [Self::Put, Self::Get, Self::Remove];

    fn name(self) -> &'static str {
        match self {
            Self::Put => "put",
            Self::Get => "get",
            Self::Remove => "remove",
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    requests: AtomicU64,
    failures: AtomicU64,
    bytes: AtomicU64,
    latency: LatencyHistogram,
}

/// Counters of the client's requests.
#[derive(Debug, Default)]
pub(super) struct ClientMetrics {
    by_op: [Tally; 3],
}

impl ClientMetrics {
    /// Records a call of `op` that began at `started`, with one outcome per key: the value's
    /// bytes when the key succeeded, `None` when it failed. Every key gets the call's latency
    /// (a batch answers all its keys at once).
    pub(super) fn record(
        &self,
        op: Operation,
        started: Instant,
        outcomes: impl IntoIterator<Item = Option<u64>>,
    ) {
        let (mut requests, mut failures, mut bytes) = (0u64, 0u64, 0u64);
        for outcome in outcomes {
            requests += 1;
            match outcome {
                Some(len) => bytes = bytes.saturating_add(len),
                None => failures += 1,
            }
        }
        if requests == 0 {
            return;
        }
        let tally = self.tally(op);
        tally.requests.fetch_add(requests, Ordering::Relaxed);
        tally.failures.fetch_add(failures, Ordering::Relaxed);
        tally.bytes.fetch_add(bytes, Ordering::Relaxed);
        tally.latency.observe_many(started.elapsed(), requests);
    }

    /// Runs a one-key request and records it; a success counts `bytes(value)`.
    pub(super) async fn observe<T>(
        &self,
        op: Operation,
        work: impl Future<Output = Result<T>>,
        bytes: impl FnOnce(&T) -> u64,
    ) -> Result<T> {
        let started = Instant::now();
        let result = work.await;
        self.record(op, started, [result.as_ref().ok().map(bytes)]);
        result
    }

    /// Runs a request of many keys and records each; key `i`'s success counts `bytes(i, value)`.
    pub(super) async fn observe_each<T>(
        &self,
        op: Operation,
        work: impl Future<Output = Vec<Result<T>>>,
        bytes: impl Fn(usize, &T) -> u64,
    ) -> Vec<Result<T>> {
        let started = Instant::now();
        let results = work.await;
        let outcomes = results
            .iter()
            .enumerate()
            .map(|(i, result)| result.as_ref().ok().map(|value| bytes(i, value)));
        self.record(op, started, outcomes);
        results
    }

    fn tally(&self, op: Operation) -> &Tally {
        match op {
            Operation::Put => &self.by_op[0],
            Operation::Get => &self.by_op[1],
            Operation::Remove => &self.by_op[2],
        }
    }
}

impl StoreClient {
    /// Adds this client's metrics (`mooncake_client_*`) and its engine's (`mooncake_engine_*`)
    /// to `registry`; they are read at each encoding.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        self.engine.register_metrics(registry);
        registry.register_collector(Box::new(ClientCollector(self.clone())));
    }

    /// This client's and its engine's metrics in Prometheus's text format.
    pub fn metrics_text(self: &Arc<Self>) -> Result<String> {
        let mut registry = Registry::default();
        self.register_metrics(&mut registry);
        TextFormat::Prometheus.render(&registry)
    }
}

struct ClientCollector(Arc<StoreClient>);

impl std::fmt::Debug for ClientCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClientCollector")
            .field(&self.0.engine.segment_name())
            .finish()
    }
}

impl Collector for ClientCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let metrics = &self.0.metrics;
        let each = |value: fn(&Tally) -> u64| {
            Operation::ALL
                .into_iter()
                .map(move |op| ([("op", op.name())], value(metrics.tally(op))))
        };
        counter_family(
            &mut encoder,
            "mooncake_client_requests",
            "Store requests by operation, one per key, whether they succeeded or not (removeAll and removeByRegex count once per call).",
            each(|t| t.requests.load(Ordering::Relaxed)),
        )?;
        counter_family(
            &mut encoder,
            "mooncake_client_failures",
            "Store requests that failed, by operation.",
            each(|t| t.failures.load(Ordering::Relaxed)),
        )?;
        counter_family(
            &mut encoder,
            "mooncake_client_bytes",
            "Value bytes of successful puts and gets (a put counts its value once, whatever the replica count).",
            each(|t| t.bytes.load(Ordering::Relaxed))
                .filter(|([(_, op)], _)| *op != Operation::Remove.name()),
        )?;
        histogram_family(
            &mut encoder,
            "mooncake_client_request_duration_seconds",
            "Time from call to result of store requests, by operation (the keys of a batch share the call's time).",
            Operation::ALL
                .into_iter()
                .map(|op| ([("op", op.name())], &metrics.tally(op).latency)),
        )?;
        let (used, capacity) = self.0.local.usage();
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "mooncake_client_staging_used_bytes",
            "Bytes of the staging buffer (localBufferSize, and the reserve grown beyond it) held by values in flight or not yet collected.",
            as_gauge(used),
        )?;
        gauge(
            &mut encoder,
            "mooncake_client_staging_capacity_bytes",
            "Bytes of the staging buffer: localBufferSize plus the reserve grown so far.",
            as_gauge(capacity),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_counts_each_key_with_the_call_latency() {
        let metrics = ClientMetrics::default();
        let started = Instant::now();
        metrics.record(Operation::Put, started, [Some(10), None, Some(5)]);
        metrics.record(Operation::Get, started, []);
        let put = metrics.tally(Operation::Put);
        assert_eq!(put.requests.load(Ordering::Relaxed), 3);
        assert_eq!(put.failures.load(Ordering::Relaxed), 1);
        assert_eq!(put.bytes.load(Ordering::Relaxed), 15);
        assert_eq!(put.latency.count(), 3);
        assert_eq!(metrics.tally(Operation::Get).latency.count(), 0);
    }
}
