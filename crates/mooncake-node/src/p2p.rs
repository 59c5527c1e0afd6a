//! `P2PStore`.

use std::sync::Arc;

use mooncake_p2p::{LocalBuffer, P2PConfig, P2PStore, Progress, PullReport, RegisterOptions};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;

use crate::convert::{millis, to_len, KeepAlive};
use crate::engine::{EngineOptions, Held};
use crate::error::{invalid, IntoNapi};

/// Options of `P2PStore.create` beyond the engine's.
#[napi(object)]
pub struct P2POptions {
    /// How long this node's liveness entry outlives its last refresh, ms (default 10000).
    pub liveness_ttl_ms: Option<f64>,
    /// Shards a pull reads at once (default 4).
    pub concurrency: Option<u32>,
    /// The least time a shard read is given before it is made elsewhere, ms (default 5000).
    pub read_timeout_ms: Option<f64>,
}

/// Options of `register`.
#[napi(object)]
pub struct NativeRegisterOptions {
    /// Largest shard in bytes (default 64 MiB).
    pub max_shard_size: Option<f64>,
    /// Replace an entry of the same name.
    pub force: Option<bool>,
    /// A name for each buffer.
    pub buffer_names: Option<Vec<String>>,
}

/// A payload in the catalogue.
#[napi(object)]
pub struct PayloadInfo {
    pub name: String,
    pub total_size: f64,
    pub size_list: Vec<f64>,
    pub max_shard_size: f64,
    pub buffer_names: Option<Vec<String>>,
}

/// How far a pull has come.
#[napi(object)]
pub struct PullProgress {
    pub bytes_done: f64,
    pub bytes_total: f64,
    pub shards_done: u32,
    pub shards_total: u32,
}

/// What one source gave a pull.
#[napi(object)]
pub struct PullSource {
    pub segment: String,
    pub bytes: f64,
    pub shards: u32,
    pub failures: u32,
    pub corrupt: u32,
}

/// What a pull did.
#[napi(object)]
pub struct NativePullReport {
    pub bytes: f64,
    pub resumed_bytes: f64,
    pub retries: u32,
    pub sources: Vec<PullSource>,
    pub elapsed_ms: f64,
}

type ProgressCallback = ThreadsafeFunction<PullProgress, (), PullProgress, Status, false>;

/// A node of the P2P store.
#[napi]
pub struct NativeP2PStore {
    inner: Arc<P2PStore>,
    keep_alive: std::sync::Mutex<Option<KeepAlive>>,
}

/// Starts a P2P store node; it keeps the process alive until closed.
#[napi(ts_args_type = "engine: EngineOptions, options: P2POptions, keepAlive: () => void")]
pub async fn create_p2p_store(
    engine: EngineOptions,
    options: P2POptions,
    keep_alive: KeepAlive,
) -> Result<NativeP2PStore> {
    crate::init_logging();
    let mut config = P2PConfig::new(engine.into_config()?);
    millis(
        options.liveness_ttl_ms,
        "livenessTtlMs",
        &mut config.liveness_ttl,
    )?;
    millis(
        options.read_timeout_ms,
        "readTimeoutMs",
        &mut config.read_timeout,
    )?;
    if let Some(concurrency) = options.concurrency {
        if !(1..=256).contains(&concurrency) {
            return Err(invalid("concurrency must be within 1-256"));
        }
        config.concurrency = concurrency as usize;
    }
    let inner = P2PStore::start(config).await.napi()?;
    Ok(NativeP2PStore {
        inner,
        keep_alive: std::sync::Mutex::new(Some(keep_alive)),
    })
}

fn local(buffers: Vec<Uint8Array>) -> Vec<LocalBuffer> {
    buffers
        .into_iter()
        .map(|buffer| {
            let (addr, len) = (buffer.as_ptr() as usize, buffer.len());
            // SAFETY: the owner references the JavaScript buffer, so its memory stays valid
            // for as long as the P2P store holds the owner.
            unsafe { LocalBuffer::external(addr, len, Box::new(Held(buffer))) }
        })
        .collect()
}

fn report(report: PullReport) -> NativePullReport {
    NativePullReport {
        bytes: report.bytes as f64,
        resumed_bytes: report.resumed_bytes as f64,
        retries: report.retries as u32,
        sources: report
            .sources
            .into_iter()
            .map(|s| PullSource {
                segment: s.segment,
                bytes: s.bytes as f64,
                shards: s.shards as u32,
                failures: s.failures as u32,
                corrupt: s.corrupt as u32,
            })
            .collect(),
        elapsed_ms: report.elapsed.as_secs_f64() * 1000.0,
    }
}

#[napi]
impl NativeP2PStore {
    /// This node's segment name.
    #[napi(getter)]
    pub fn segment_name(&self) -> String {
        self.inner.segment_name().to_owned()
    }

    /// Publishes `buffers` as payload `name`.
    #[napi]
    pub async fn register(
        &self,
        name: String,
        buffers: Vec<Uint8Array>,
        options: Option<NativeRegisterOptions>,
    ) -> Result<()> {
        let mut register = RegisterOptions::default();
        if let Some(options) = options {
            if let Some(size) = options.max_shard_size {
                register.max_shard_size = to_len(size, "maxShardSize")? as u64;
            }
            register.force = options.force.unwrap_or(false);
            register.buffer_names = options.buffer_names;
        }
        self.inner
            .register(&name, local(buffers), register)
            .await
            .napi()
    }

    /// Stops serving a registered payload.
    #[napi]
    pub async fn unregister(&self, name: String) -> Result<()> {
        self.inner.unregister(&name).await.napi()
    }

    /// Removes registrants' copies of `name` from the catalogue on their behalf.
    #[napi]
    pub async fn forget(&self, name: String, segment: Option<String>) -> Result<()> {
        self.inner.forget(&name, segment.as_deref()).await.napi()
    }

    /// Payloads whose names start with `prefix`.
    #[napi]
    pub async fn list(&self, prefix: String) -> Result<Vec<PayloadInfo>> {
        Ok(self
            .inner
            .list(&prefix)
            .await
            .napi()?
            .into_iter()
            .map(|p| PayloadInfo {
                name: p.name,
                total_size: p.total_size as f64,
                size_list: p.size_list.into_iter().map(|s| s as f64).collect(),
                max_shard_size: p.max_shard_size as f64,
                buffer_names: p.buffer_names,
            })
            .collect())
    }

    /// Pulls payload `name` into `buffers`, then serves it.
    #[napi(
        ts_args_type = "name: string, buffers: Uint8Array[], onProgress?: (progress: PullProgress) => void"
    )]
    pub async fn get_replica(
        &self,
        name: String,
        buffers: Vec<Uint8Array>,
        on_progress: Option<ProgressCallback>,
    ) -> Result<NativePullReport> {
        let progress = on_progress.map(|callback| {
            let callback = Arc::new(callback);
            Arc::new(move |p: Progress| {
                callback.call(
                    PullProgress {
                        bytes_done: p.bytes_done as f64,
                        bytes_total: p.bytes_total as f64,
                        shards_done: p.shards_done as u32,
                        shards_total: p.shards_total as u32,
                    },
                    ThreadsafeFunctionCallMode::NonBlocking,
                );
            }) as mooncake_p2p::ProgressFn
        });
        self.inner
            .get_replica(&name, local(buffers), progress)
            .await
            .map(report)
            .napi()
    }

    /// Stops serving a pulled payload.
    #[napi]
    pub async fn delete_replica(&self, name: String) -> Result<()> {
        self.inner.delete_replica(&name).await.napi()
    }

    /// Withdraws everything, stops and closes; idempotent.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.inner.close().await;
        drop(
            self.keep_alive
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        Ok(())
    }
}
