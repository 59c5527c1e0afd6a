//! The load generator behind `mooncake bench`, modelled on Mooncake's
//! `transfer_engine_bench`: `threads` submitters each loop over batches of `batch_size`
//! requests of `block_size` bytes for `duration`, request *i* of submitter *t* at offset
//! `block_size * (i * threads + t)` (wrapping) in both buffers.
//!
//! [`raw`] is the baseline it is compared with: a plain TCP socket pump.

pub mod raw;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mooncake_common::{Error, Result};
use tokio::time::Instant;

use crate::engine::{SubmitOptions, TransferEngine, TransferRequest};
use crate::segments::SegmentId;
use crate::Opcode;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Target segment (opened).
    pub segment: SegmentId,
    /// Base and length of the remote buffer to use.
    pub remote: (u64, u64),
    /// Base and length of the local registered buffer to use.
    pub local: (usize, usize),
    /// Read or write.
    pub op: Opcode,
    /// Bytes per request.
    pub block_size: usize,
    /// Requests per batch.
    pub batch_size: usize,
    /// Concurrent submitters.
    pub threads: usize,
    /// How long to run.
    pub duration: Duration,
    /// Where the run counts what it completed, for a progress display to poll.
    pub meter: Arc<BenchMeter>,
}

/// What a run has completed so far: bytes and requests of the batches that finished, and the
/// wall time since it started. Polled by a progress display while the run goes on.
#[derive(Debug, Default)]
pub struct BenchMeter {
    bytes: AtomicU64,
    requests: AtomicU64,
    started: OnceLock<std::time::Instant>,
}

/// One reading of a [`BenchMeter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeterReading {
    /// Bytes of completed batches.
    pub bytes: u64,
    /// Requests of completed batches.
    pub requests: u64,
    /// Seconds since the run started (0 before).
    pub seconds: f64,
}

impl BenchMeter {
    /// What the run has completed so far.
    pub fn read(&self) -> MeterReading {
        MeterReading {
            bytes: self.bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            seconds: self
                .started
                .get()
                .map_or(0.0, |at| at.elapsed().as_secs_f64()),
        }
    }

    fn completed(&self, bytes: u64, requests: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.requests.fetch_add(requests, Ordering::Relaxed);
    }
}

/// What it measured.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BenchReport {
    /// Bytes moved.
    pub bytes: u64,
    /// Requests completed.
    pub requests: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// GB/s (10^9 bytes).
    pub gbps: f64,
    /// Requests per second.
    pub requests_per_sec: f64,
    /// Median request latency in microseconds (submission to completion).
    pub p50_us: f64,
    /// 99th-percentile request latency in microseconds.
    pub p99_us: f64,
}

impl BenchReport {
    /// A report of throughput alone (no per-request latency).
    pub fn throughput(bytes: u64, requests: u64, seconds: f64) -> Self {
        Self {
            bytes,
            requests,
            seconds,
            gbps: bytes as f64 / seconds / 1e9,
            requests_per_sec: requests as f64 / seconds,
            p50_us: 0.0,
            p99_us: 0.0,
        }
    }
}

/// Runs the load and reports.
pub async fn run(engine: &Arc<TransferEngine>, options: &BenchOptions) -> Result<BenchReport> {
    let span = options.block_size as u64;
    if options.block_size == 0 || options.batch_size == 0 || options.threads == 0 {
        return Err(Error::invalid(
            "block size, batch size and threads must be positive",
        ));
    }
    let slots = (options.remote.1 / span).min((options.local.1 / options.block_size) as u64);
    if slots == 0 {
        return Err(Error::invalid("buffers are smaller than one block"));
    }
    let meter = options.meter.clone();
    let start = Instant::now();
    let _ = meter.started.set(start.into_std());
    let stop_at = start + options.duration;
    let mut workers = Vec::new();
    for tid in 0..options.threads {
        let (engine, options, meter) = (engine.clone(), options.clone(), meter.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut round = 0u64;
            while Instant::now() < stop_at {
                let requests: Vec<_> = (0..options.batch_size as u64)
                    .map(|i| {
                        let slot = ((round * options.batch_size as u64 + i)
                            * options.threads as u64
                            + tid as u64)
                            % slots;
                        TransferRequest {
                            op: options.op,
                            segment: options.segment,
                            local_addr: options.local.0 + (slot * span) as usize,
                            remote_addr: options.remote.0 + slot * span,
                            len: options.block_size,
                        }
                    })
                    .collect();
                let id = engine.submit(&requests, SubmitOptions::default())?;
                let waited = engine.wait(id).await;
                let (submitted, finished) = engine.timings(id)?;
                engine.release_batch(id);
                waited?;
                latencies.extend(
                    finished
                        .into_iter()
                        .flatten()
                        .map(|at| at.duration_since(submitted).as_secs_f64() * 1e6),
                );
                meter.completed(span * options.batch_size as u64, options.batch_size as u64);
                round += 1;
            }
            Ok::<_, Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    let mut failure = None;
    for worker in workers {
        match worker.await {
            Ok(Ok(mut l)) => latencies.append(&mut l),
            Ok(Err(e)) => failure = Some(e),
            Err(e) => {
                failure = Some(Error::new(
                    mooncake_common::ErrorKind::TransferFailed,
                    format!("bench worker: {e}"),
                ))
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let seconds = start.elapsed().as_secs_f64();
    let bytes = meter.read().bytes;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            latencies[((latencies.len() - 1) as f64 * p).round() as usize]
        }
    };
    Ok(BenchReport {
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        ..BenchReport::throughput(bytes, latencies.len() as u64, seconds)
    })
}
