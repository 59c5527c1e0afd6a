//! `/metrics`: a registry built per scrape from one look at the state, rendered by
//! [`TextFormat`]. A scraper that asks for OpenMetrics (Prometheus does) gets it; anyone else
//! (curl, promtool, older scrapers) gets the classic text format, version 0.0.4.
//!
//! Names are Mooncake's but for those that end in `_count`, which Prometheus keeps for
//! histograms and summaries (`promtool check metrics` refuses them): `master_key_count` is
//! `master_keys`, `master_soft_pin_key_count` `master_soft_pinned_keys`, `master_segment_count`
//! `master_segments`, `master_evicted_key_count` `master_evicted_keys_total`. Mooncake's
//! cumulative counts without a `_total` suffix (`master_evicted_size_bytes`,
//! `master_put_start_discard_cnt`, `master_put_start_release_cnt`) are typed as gauges, so that
//! their names stay as they are: a Prometheus counter's samples end in `_total`.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mooncake_te::metrics::TextFormat;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::super::log::Log;
use super::super::service::Role;
use super::{segments_by_name, Admin, Master};

pub(super) async fn metrics(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let format = requested_format(&headers);
    match format.render(&registry(&admin)) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("encoding /metrics failed: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// OpenMetrics for a client that names it in `Accept`, the classic format for anyone else.
fn requested_format(headers: &HeaderMap) -> TextFormat {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        TextFormat::OpenMetrics
    } else {
        TextFormat::Prometheus
    }
}

/// Everything `/metrics` shows, as of now.
fn registry(admin: &Admin) -> Registry {
    let (stats, segments, applied) = {
        let master = Master::lock(&admin.state);
        (
            master.stats(Instant::now()),
            master.segments(),
            master.last_seq(),
        )
    };
    let role = admin.role.borrow().clone();
    let mut r = Registry::default();
    let gauge = |r: &mut Registry, name: &str, help: &str, value: u64| {
        r.register(name, help, ConstGauge::new(value));
    };
    // Registered without the `_total` that the encoder appends.
    let counter = |r: &mut Registry, name: &str, help: &str, value: u64| {
        r.register(name, help, ConstCounter::new(value));
    };
    gauge(
        &mut r,
        "master_allocated_bytes",
        "Bytes reserved in all segments",
        stats.allocated_bytes,
    );
    gauge(
        &mut r,
        "master_total_capacity_bytes",
        "Bytes mounted",
        stats.capacity_bytes,
    );
    gauge(&mut r, "master_keys", "Objects", stats.keys);
    gauge(
        &mut r,
        "master_soft_pinned_keys",
        "Soft-pinned objects",
        stats.soft_pinned_keys,
    );
    gauge(
        &mut r,
        "master_active_clients",
        "Clients alive",
        stats.active_clients,
    );
    gauge(
        &mut r,
        "master_segments",
        "Mounted segments",
        stats.segments,
    );
    counter(
        &mut r,
        "master_evicted_keys",
        "Objects evicted",
        stats.evicted_keys,
    );
    gauge(
        &mut r,
        "master_evicted_size_bytes",
        "Bytes evicted since the master started",
        stats.evicted_bytes,
    );
    counter(
        &mut r,
        "master_successful_evictions",
        "Eviction rounds",
        stats.eviction_rounds,
    );
    counter(
        &mut r,
        "master_put_start_alloc_failures",
        "Writes that found no space",
        stats.put_start_alloc_failures,
    );
    counter(
        &mut r,
        "master_put_start_partial_allocations",
        "Writes that got fewer replicas than asked",
        stats.put_start_partial_allocations,
    );
    gauge(
        &mut r,
        "master_put_start_discard_cnt",
        "Unfinished writes preempted since the master started",
        stats.put_start_discards,
    );
    gauge(
        &mut r,
        "master_put_start_release_cnt",
        "Abandoned writes released since the master started",
        stats.put_start_releases,
    );
    counter(
        &mut r,
        "master_put_bytes",
        "Bytes of objects granted space for writing",
        admin.counters.put_bytes(),
    );
    counter(
        &mut r,
        "master_get_bytes",
        "Bytes of objects whose replicas went to readers",
        admin.counters.get_bytes(),
    );
    gauge(
        &mut r,
        "master_log_applied_seq",
        "The last log entry this master applied or wrote",
        applied,
    );
    if let Role::Leader(Some(log)) = &role {
        register_log(&mut r, log);
    }
    if let Some(ha) = &admin.ha {
        let status = ha.snapshot();
        counter(
            &mut r,
            "master_ha_failovers",
            "Times this master became the leader",
            status.promotions,
        );
        gauge(
            &mut r,
            "master_ha_is_leader",
            "1 while this master leads",
            u64::from(matches!(role, Role::Leader(_))),
        );
        gauge(
            &mut r,
            "master_ha_log_lag_entries",
            "Entries the leader has written that this master has not applied",
            status.leader_seq.saturating_sub(applied),
        );
    }
    for (op, requests, failures) in admin.counters.snapshot() {
        counter(
            &mut r,
            &format!("master_{op}_requests"),
            &format!("Requests of {op} (a batch counts each key)"),
            requests,
        );
        counter(
            &mut r,
            &format!("master_{op}_failures"),
            &format!("Requests of {op} that failed"),
            failures,
        );
    }
    type PerSegment = Family<[(&'static str, String); 1], Gauge<u64, AtomicU64>>;
    let (allocated, capacity) = (PerSegment::default(), PerSegment::default());
    for (name, (used, managed)) in segments_by_name(&segments) {
        let labels = [("segment", name.to_owned())];
        allocated.get_or_create(&labels).set(used);
        capacity.get_or_create(&labels).set(managed);
    }
    r.register(
        "segment_allocated_bytes",
        "Bytes reserved in the segments of this name",
        allocated,
    );
    r.register(
        "segment_total_capacity_bytes",
        "Bytes managed in the segments of this name",
        capacity,
    );
    r
}

fn register_log(r: &mut Registry, log: &Log) {
    let progress = log.progress();
    r.register(
        "master_log_durable_seq",
        "The last durable log entry",
        ConstGauge::new(progress.durable),
    );
    r.register(
        "master_log_appends",
        "Writes to the log (each carries one or more entries)",
        ConstCounter::new(progress.appends),
    );
    r.register(
        "master_log_entries",
        "Log entries written",
        ConstCounter::new(progress.entries),
    );
    r.register(
        "master_log_snapshots",
        "Snapshots that replaced the log",
        ConstCounter::new(progress.snapshots),
    );
    if let Some(at) = progress.snapshot_at {
        r.register(
            "master_log_snapshot_age_seconds",
            "Seconds since the last snapshot",
            ConstGauge::new(at.elapsed().as_secs()),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use std::sync::Arc;

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::super::super::ha::HaStatus;
    use super::super::super::log::disk::DiskLog;
    use super::super::super::log::SnapshotPolicy;
    use super::super::test_support::{admin, get, get_with, master_with, serve};
    use super::*;
    use crate::master::MasterConfig;

    #[tokio::test]
    async fn segment_names_are_escaped_once_and_each_sample_is_one_line() {
        let (addr, server) = serve(admin(master_with(&["node \"1\" \\ é"]))).await;
        let (head, body) = get(addr, "/metrics").await;
        assert!(
            head.contains(TextFormat::Prometheus.content_type()),
            "{head}"
        );
        assert!(
            body.contains("segment_allocated_bytes{segment=\"node \\\"1\\\" \\\\ é\"} 25600\n"),
            "{body}"
        );
        assert!(body.contains("\nmaster_keys 25\n"), "{body}");
        server.abort();
    }

    #[tokio::test]
    async fn prometheus_gets_openmetrics_and_others_the_classic_format() {
        let admin = admin(master_with(&["a"]));
        admin.counters.count("put_start", 25, 1);
        let (addr, server) = serve(admin).await;
        let accept = "accept: application/openmetrics-text;version=1.0.0,\
                      text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";
        let (head, open) = get_with(addr, "/metrics", accept).await;
        assert!(
            head.contains(TextFormat::OpenMetrics.content_type()),
            "{head}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE master_put_start_requests counter\n"));
        assert!(open.contains("\nmaster_put_start_requests_total 25\n"));

        let (_, plain) = get(addr, "/metrics").await;
        assert!(!plain.contains("# EOF"), "{plain}");
        assert!(plain.contains("# TYPE master_put_start_requests_total counter\n"));
        assert!(plain.contains("\nmaster_put_start_requests_total 25\n"));
        assert!(plain.contains("# TYPE master_evicted_size_bytes gauge\n"));
        assert!(plain.contains("# TYPE master_evicted_keys_total counter\n"));
        server.abort();
    }

    #[tokio::test]
    #[cfg_attr(not(promtool), ignore = "needs promtool (Debian's prometheus)")]
    async fn every_family_passes_promtool_with_a_log_and_ha() {
        let dir = std::env::temp_dir().join(format!(
            "mooncake-metrics-log-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let now = Instant::now();
        let journaled = Master::recover(MasterConfig::default(), now, None, Vec::new()).unwrap();
        let mut admin = admin(journaled);
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let log = Log::start(
            Arc::new(DiskLog::open(&dir).unwrap()),
            admin.state.clone(),
            SnapshotPolicy::default(),
            stop.clone(),
            &tracker,
            None,
        );
        let seq = {
            let mut master = Master::lock(&admin.state);
            master.begin_epoch(now);
            log.submit(&mut master)
        };
        log.durable(seq.unwrap()).await.unwrap();
        let (_role_tx, role) = watch::channel(Role::Leader(Some(log)));
        admin.role = role;
        admin.ha = Some(HaStatus::default());
        admin.counters.count("put_start", 3, 1);
        admin.counters.count_put_bytes(1 << 20);

        let (addr, server) = serve(admin).await;
        let (_, metrics) = get(addr, "/metrics").await;
        for family in ["master_log_entries_total", "master_ha_is_leader 1"] {
            assert!(metrics.contains(family), "{family} in\n{metrics}");
        }
        if let Err(findings) = mooncake_testkit::promtool::check_metrics(&metrics) {
            panic!("{findings}\n{metrics}");
        }
        server.abort();
        stop.cancel();
        tracker.close();
        tracker.wait().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
