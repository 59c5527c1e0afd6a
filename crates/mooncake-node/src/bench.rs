//! `mooncake bench`: the engine load and the raw socket baseline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_common::Handle;
use mooncake_te::{bench, Opcode, TransferEngine};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio::sync::oneshot;

use crate::convert::{bigint_u64, to_len};
use crate::error::{invalid, to_napi, IntoNapi};

/// What to run.
#[napi(object)]
pub struct BenchOptions {
    /// Target segment handle.
    pub segment: BigInt,
    /// Remote buffer base.
    pub remote_address: BigInt,
    /// Remote buffer length.
    pub remote_length: f64,
    /// Local registered buffer.
    pub local: Uint8Array,
    /// `read` or `write`.
    pub op: String,
    /// Bytes per request.
    pub block_size: f64,
    /// Requests per batch.
    pub batch_size: u32,
    /// Concurrent submitters.
    pub threads: u32,
    /// Seconds to run.
    pub duration_sec: f64,
}

/// What a running bench has completed so far.
#[napi(object)]
pub struct BenchProgress {
    /// Bytes of completed batches.
    pub bytes: f64,
    /// Requests of completed batches.
    pub requests: f64,
    /// Wall time since the run started, seconds.
    pub seconds: f64,
}

/// A bench run in progress: poll `progress()` for a display, await `done()` for the report.
#[napi]
pub struct NativeBenchRun {
    meter: Arc<bench::BenchMeter>,
    outcome: Mutex<Option<oneshot::Receiver<mooncake_common::Result<bench::BenchReport>>>>,
}

#[napi]
impl NativeBenchRun {
    /// What the run has completed so far.
    #[napi(catch_unwind)]
    pub fn progress(&self) -> BenchProgress {
        let reading = self.meter.read();
        BenchProgress {
            bytes: reading.bytes as f64,
            requests: reading.requests as f64,
            seconds: reading.seconds,
        }
    }

    /// Resolves with the report once the run ends; once only.
    #[napi]
    pub async fn done(&self) -> Result<BenchReport> {
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| invalid("this bench run was awaited already"))?;
        let report = outcome.await.map_err(|_| {
            to_napi(mooncake_common::Error::new(
                mooncake_common::ErrorKind::InternalError,
                "the bench run ended without a report",
            ))
        })?;
        report.napi().map(Into::into)
    }
}

/// What it measured.
#[napi(object)]
pub struct BenchReport {
    /// Bytes moved.
    pub bytes: f64,
    /// Requests completed.
    pub requests: f64,
    /// Seconds measured.
    pub seconds: f64,
    /// GB/s (10^9 bytes per second).
    pub gbps: f64,
    /// Requests per second.
    pub requests_per_sec: f64,
    /// Median request latency, µs.
    pub p50_us: f64,
    /// 99th-percentile request latency, µs.
    pub p99_us: f64,
}

impl From<bench::BenchReport> for BenchReport {
    fn from(r: bench::BenchReport) -> Self {
        Self {
            bytes: r.bytes as f64,
            requests: r.requests as f64,
            seconds: r.seconds,
            gbps: r.gbps,
            requests_per_sec: r.requests_per_sec,
            p50_us: r.p50_us,
            p99_us: r.p99_us,
        }
    }
}

fn opcode(op: &str) -> Result<Opcode> {
    match op {
        "read" => Ok(Opcode::Read),
        "write" => Ok(Opcode::Write),
        other => Err(invalid(format!(
            "op must be 'read' or 'write', not '{other}'"
        ))),
    }
}

fn duration(seconds: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(seconds)
        .map_err(|_| invalid("duration must be a positive number of seconds"))
}

/// Checks `options` and starts the run in the background.
pub(crate) fn start(engine: &Arc<TransferEngine>, options: BenchOptions) -> Result<NativeBenchRun> {
    let local = (options.local.as_ptr() as usize, options.local.len());
    let options = bench::BenchOptions {
        segment: Handle::from_u64(bigint_u64(&options.segment, "segment")?),
        remote: (
            bigint_u64(&options.remote_address, "remoteAddress")?,
            to_len(options.remote_length, "remoteLength")? as u64,
        ),
        local,
        op: opcode(&options.op)?,
        block_size: to_len(options.block_size, "blockSize")?,
        batch_size: options.batch_size as usize,
        threads: options.threads as usize,
        duration: duration(options.duration_sec)?,
        meter: Arc::default(),
    };
    if !engine.is_registered(options.local.0, options.local.1) {
        return Err(invalid("the bench's local buffer must be registered"));
    }
    let (report, outcome) = oneshot::channel();
    let (engine, meter) = (engine.clone(), options.meter.clone());
    napi::bindgen_prelude::spawn(async move {
        // Nobody may be waiting any more; the report is then dropped.
        let _ = report.send(bench::run(&engine, &options).await);
    });
    Ok(NativeBenchRun {
        meter,
        outcome: Mutex::new(Some(outcome)),
    })
}

/// Starts the raw socket pump server on its own thread; returns its port.
#[napi(catch_unwind)]
pub fn raw_pump_serve(host: String, port: u32, buffer_size: f64) -> Result<u32> {
    let port = u16::try_from(port).map_err(|_| invalid("port must be within 0-65535"))?;
    bench::raw::serve(&host, port, to_len(buffer_size, "bufferSize")?)
        .napi()
        .map(u32::from)
}

/// Runs the raw socket pump against `addr` (`host:port`).
#[napi]
pub async fn raw_pump_run(
    addr: String,
    op: String,
    block_size: f64,
    buffer_size: f64,
    duration_sec: f64,
) -> Result<BenchReport> {
    let op = opcode(&op)?;
    let (block, buffer, duration) = (
        to_len(block_size, "blockSize")?,
        to_len(buffer_size, "bufferSize")?,
        duration(duration_sec)?,
    );
    tokio::task::spawn_blocking(move || bench::raw::run(&addr, op, block, buffer, duration))
        .await
        .map_err(|e| invalid(format!("raw pump thread: {e}")))?
        .napi()
        .map(Into::into)
}

/// Single-threaded memcpy of the same blocks over buffers of `buffer_size`: the shm ceiling.
#[napi]
pub async fn memcpy_bench(
    block_size: f64,
    buffer_size: f64,
    duration_sec: f64,
) -> Result<BenchReport> {
    let (block, buffer, duration) = (
        to_len(block_size, "blockSize")?,
        to_len(buffer_size, "bufferSize")?,
        duration(duration_sec)?,
    );
    tokio::task::spawn_blocking(move || bench::raw::memcpy(block, buffer, duration))
        .await
        .map_err(|e| invalid(format!("memcpy thread: {e}")))?
        .napi()
        .map(Into::into)
}
