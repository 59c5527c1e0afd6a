//! `MooncakeStore`.

use std::sync::Arc;
use std::time::Duration;

use mooncake_store::access::Tokens;
use mooncake_store::client::{StoreClient, StoreConfig, Value};
use mooncake_store::master::{SoftPin, WriteConfig};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::convert::{millis, to_len, KeepAlive};
use crate::engine::EngineOptions;
use crate::error::{invalid, to_napi_reason, IntoNapi};

/// Options of `MooncakeStore.connect`.
#[napi(object)]
pub struct StoreOptions {
    /// Master `host:port`.
    pub master_address: String,
    /// Bytes contributed to the pool (default 16 MiB; 0: a pure requester).
    pub global_segment_size: Option<f64>,
    /// Registered staging for the copying APIs (default 16 MiB).
    pub local_buffer_size: Option<f64>,
    /// Master RPC deadline, ms (default 30000).
    pub rpc_timeout_ms: Option<f64>,
    /// Proves the admin role to a master with tokens (for `removeAll` and `removeByRegex`;
    /// default `MC_ADMIN_TOKEN`). The cluster token is the engine's `clusterToken`.
    pub admin_token: Option<String>,
    /// Reach the master over TLS, trusting the certificate authorities in this PEM file.
    pub master_tls_ca: Option<String>,
}

/// Write options.
#[napi(object)]
pub struct PutConfig {
    /// Replicas on distinct segments (default 1).
    pub replica_num: Option<u32>,
    /// Segment names tried first.
    pub preferred_segments: Option<Vec<String>>,
    /// Soft pin: `true` for the master's default TTL.
    pub soft_pin: Option<bool>,
    /// Soft pin TTL in ms (implies a soft pin).
    pub soft_pin_ttl_ms: Option<f64>,
    /// Never evicted.
    pub hard_pin: Option<bool>,
}

fn write_config(config: Option<PutConfig>) -> Result<WriteConfig> {
    let Some(c) = config else {
        return Ok(WriteConfig::default());
    };
    let soft_pin = match (c.soft_pin, c.soft_pin_ttl_ms) {
        (_, Some(ms)) if ms.is_finite() && ms >= 0.0 => {
            SoftPin::Enable(Some(Duration::from_secs_f64(ms / 1000.0)))
        }
        (_, Some(ms)) => {
            return Err(invalid(format!(
                "softPin ttlMs must be a non-negative number, not {ms}"
            )))
        }
        (Some(true), None) => SoftPin::Enable(None),
        (Some(false), None) => SoftPin::Disable,
        (None, None) => SoftPin::Preserve,
    };
    Ok(WriteConfig {
        replica_num: c.replica_num.unwrap_or(1),
        preferred_segments: c.preferred_segments.unwrap_or_default(),
        soft_pin,
        hard_pin: c.hard_pin.unwrap_or(false),
        host_id: String::new(),
    })
}

/// One key's outcome in a batch.
#[napi(object)]
pub struct BatchItem {
    /// The value (copying reads).
    pub value: Option<Buffer>,
    /// The size (zero-copy reads).
    pub size: Option<f64>,
    /// `[ERR_...] message` when the key failed.
    pub error: Option<String>,
}

impl BatchItem {
    fn failed(e: mooncake_common::Error) -> Self {
        Self {
            value: None,
            size: None,
            error: Some(to_napi_reason(e)),
        }
    }
}

/// A store client.
#[napi]
pub struct NativeStore {
    inner: Arc<StoreClient>,
    keep_alive: std::sync::Mutex<Option<KeepAlive>>,
}

/// Connects a store client; it keeps the process alive until closed.
#[napi(ts_args_type = "engine: EngineOptions, options: StoreOptions, keepAlive: () => void")]
pub async fn connect_store(
    engine: EngineOptions,
    options: StoreOptions,
    keep_alive: KeepAlive,
) -> Result<NativeStore> {
    crate::init_logging();
    let engine = engine.into_config()?;
    let mut config = StoreConfig::new(engine);
    config.master_address = options.master_address;
    if let Some(size) = options.global_segment_size {
        config.global_segment_size = to_len(size, "globalSegmentSize")? as u64;
    }
    if let Some(size) = options.local_buffer_size {
        config.local_buffer_size = to_len(size, "localBufferSize")? as u64;
    }
    millis(
        options.rpc_timeout_ms,
        "rpcTimeoutMs",
        &mut config.rpc_timeout,
    )?;
    if let Some(token) = options.admin_token {
        config.admin_token = Tokens::resolve(Some(""), Some(&token)).napi()?.admin;
    }
    config.master_tls_ca = options.master_tls_ca.map(Into::into);
    let inner = StoreClient::connect(config).await.napi()?;
    Ok(NativeStore {
        inner,
        keep_alive: std::sync::Mutex::new(Some(keep_alive)),
    })
}

fn ranges(buffers: &[Uint8Array]) -> Vec<(usize, usize)> {
    buffers
        .iter()
        .map(|b| (b.as_ptr() as usize, b.len()))
        .collect()
}

#[napi]
impl NativeStore {
    /// This client's segment name.
    #[napi(getter)]
    pub fn segment_name(&self) -> String {
        self.inner.engine().segment_name().to_owned()
    }

    /// Stores a copy of `value` (insert if absent). The copy is taken before this returns,
    /// so the caller may change `value` as soon as it has the promise.
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn put<'env>(
        &self,
        env: &'env Env,
        key: String,
        value: &[u8],
        config: Option<PutConfig>,
    ) -> Result<PromiseRaw<'env, ()>> {
        write_copy(env, &self.inner, key, value, config, false)
    }

    /// Inserts or replaces; the copy is taken before this returns, as in `put`.
    #[napi(catch_unwind, ts_return_type = "Promise<void>")]
    pub fn upsert<'env>(
        &self,
        env: &'env Env,
        key: String,
        value: &[u8],
        config: Option<PutConfig>,
    ) -> Result<PromiseRaw<'env, ()>> {
        write_copy(env, &self.inner, key, value, config, true)
    }

    /// Stores registered memory (zero copy).
    #[napi]
    pub async fn put_from(
        &self,
        key: String,
        buffer: Uint8Array,
        config: Option<PutConfig>,
    ) -> Result<()> {
        let (addr, len) = (buffer.as_ptr() as usize, buffer.len());
        self.inner
            .put_from(&key, addr, len, &write_config(config)?)
            .await
            .napi()
    }

    /// Inserts or replaces from registered memory (zero copy).
    #[napi]
    pub async fn upsert_from(
        &self,
        key: String,
        buffer: Uint8Array,
        config: Option<PutConfig>,
    ) -> Result<()> {
        let (addr, len) = (buffer.as_ptr() as usize, buffer.len());
        self.inner
            .upsert_from(&key, addr, len, &write_config(config)?)
            .await
            .napi()
    }

    /// The value of `key`. It is read straight into memory that the returned Buffer then
    /// wraps (a block of the staging buffer, given back when the Buffer is collected).
    #[napi(catch_unwind, ts_return_type = "Promise<Buffer>")]
    pub fn get<'env>(
        &self,
        env: &'env Env,
        key: String,
    ) -> Result<PromiseRaw<'env, BufferSlice<'env>>> {
        let inner = self.inner.clone();
        env.spawn_future_with_callback(async move { inner.get(&key).await.napi() }, |env, value| {
            match value {
                Value::Owned(bytes) => BufferSlice::from_data(env, bytes),
                Value::Staged(mut staged) => {
                    let (ptr, len) = (staged.as_mut_ptr(), staged.as_slice().len());
                    if len == 0 {
                        return BufferSlice::from_data(env, Vec::new());
                    }
                    // V8 counts each new Buffer as that much more memory and collects garbage
                    // every few dozen MiB of it. A block of the configured staging buffer is
                    // not more memory (the buffer exists already), so it is taken off the count
                    // while the Buffer lives; a block of the reserve counts, so that collection
                    // comes round and frees the blocks.
                    let counted = if staged.in_configured_buffer() {
                        len as i64
                    } else {
                        0
                    };
                    // SAFETY: the block stays allocated to this Buffer until its finalizer drops
                    // `staged`, and nothing else writes it meanwhile.
                    let buffer = unsafe {
                        BufferSlice::from_external(env, ptr, len, staged, move |env, staged| {
                            drop(staged);
                            if counted > 0 {
                                let _ = env.adjust_external_memory(counted);
                            }
                        })
                    }?;
                    if counted > 0 {
                        env.adjust_external_memory(-counted)?;
                    }
                    Ok(buffer)
                }
            }
        })
    }

    /// Reads into registered memory; resolves to the size.
    #[napi]
    pub async fn get_into(&self, key: String, buffer: Uint8Array) -> Result<f64> {
        let (addr, len) = (buffer.as_ptr() as usize, buffer.len());
        self.inner
            .get_into(&key, addr, len)
            .await
            .napi()
            .map(|n| n as f64)
    }

    /// Batch of copying puts; the copies are taken before this returns, as in `put`.
    #[napi(catch_unwind, ts_return_type = "Promise<Array<BatchItem>>")]
    pub fn batch_put<'env>(
        &self,
        env: &'env Env,
        keys: Vec<String>,
        values: Vec<&[u8]>,
        config: Option<PutConfig>,
    ) -> Result<PromiseRaw<'env, Vec<BatchItem>>> {
        if keys.len() != values.len() {
            return Err(invalid("keys and values differ in number"));
        }
        write_copies(env, &self.inner, keys, &values, config, false)
    }

    /// Batch of zero-copy puts.
    #[napi]
    pub async fn batch_put_from(
        &self,
        keys: Vec<String>,
        buffers: Vec<Uint8Array>,
        config: Option<PutConfig>,
    ) -> Result<Vec<BatchItem>> {
        if keys.len() != buffers.len() {
            return Err(invalid("keys and buffers differ in number"));
        }
        let config = write_config(config)?;
        Ok(self
            .inner
            .batch_put_from(&keys, &ranges(&buffers), &config)
            .await
            .into_iter()
            .map(done)
            .collect())
    }

    /// Batch of copying reads.
    #[napi]
    pub async fn batch_get(&self, keys: Vec<String>) -> Result<Vec<BatchItem>> {
        Ok(self
            .inner
            .batch_get(&keys)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(v) => BatchItem {
                    value: Some(Buffer::from(v.to_vec())),
                    size: None,
                    error: None,
                },
                Err(e) => BatchItem::failed(e),
            })
            .collect())
    }

    /// Batch of zero-copy reads.
    #[napi]
    pub async fn batch_get_into(
        &self,
        keys: Vec<String>,
        buffers: Vec<Uint8Array>,
    ) -> Result<Vec<BatchItem>> {
        if keys.len() != buffers.len() {
            return Err(invalid("keys and buffers differ in number"));
        }
        Ok(self
            .inner
            .batch_get_into(&keys, &ranges(&buffers))
            .await
            .into_iter()
            .map(|r| match r {
                Ok(n) => BatchItem {
                    value: None,
                    size: Some(n as f64),
                    error: None,
                },
                Err(e) => BatchItem::failed(e),
            })
            .collect())
    }

    /// Removes `key`.
    #[napi]
    pub async fn remove(&self, key: String, force: Option<bool>) -> Result<()> {
        self.inner.remove(&key, force.unwrap_or(false)).await.napi()
    }

    /// Removes every key; resolves to the count.
    #[napi]
    pub async fn remove_all(&self, force: Option<bool>) -> Result<f64> {
        self.inner
            .remove_all(force.unwrap_or(false))
            .await
            .napi()
            .map(|n| n as f64)
    }

    /// Removes keys matching `pattern`; resolves to the count.
    #[napi]
    pub async fn remove_by_regex(&self, pattern: String, force: Option<bool>) -> Result<f64> {
        self.inner
            .remove_by_regex(&pattern, force.unwrap_or(false))
            .await
            .napi()
            .map(|n| n as f64)
    }

    /// Whether `key` exists.
    #[napi]
    pub async fn exists(&self, key: String) -> Result<bool> {
        self.inner.exists(&key).await.napi()
    }

    /// Per-key existence.
    #[napi]
    pub async fn batch_exists(&self, keys: Vec<String>) -> Result<Vec<bool>> {
        self.inner.batch_exists(&keys).await.napi()
    }

    /// The size of `key`.
    #[napi]
    pub async fn get_size(&self, key: String) -> Result<f64> {
        self.inner.get_size(&key).await.napi().map(|n| n as f64)
    }

    /// How many leading keys are present.
    #[napi]
    pub async fn longest_prefix(&self, keys: Vec<String>) -> Result<u32> {
        self.inner
            .longest_prefix(&keys)
            .await
            .napi()
            .map(|n| n as u32)
    }

    /// Registered memory for the zero-copy APIs.
    #[napi(catch_unwind)]
    pub fn allocate<'env>(&self, env: &'env Env, size: f64) -> Result<BufferSlice<'env>> {
        crate::engine::allocate(env, self.inner.engine(), size)
    }

    /// Registers caller memory for the zero-copy APIs.
    #[napi(catch_unwind)]
    pub fn register_buffer(&self, buffer: Uint8Array) -> Result<()> {
        crate::engine::register(self.inner.engine(), buffer, None)
    }

    /// Unregisters a buffer.
    #[napi(catch_unwind)]
    pub fn unregister_buffer(&self, buffer: &[u8]) -> Result<()> {
        self.inner
            .engine()
            .unregister(buffer.as_ptr() as usize)
            .napi()
    }

    /// This client's metrics (`mooncake_client_*`) and its engine's (`mooncake_engine_*`) in
    /// Prometheus's text format.
    #[napi(catch_unwind)]
    pub fn metrics(&self) -> Result<String> {
        self.inner.metrics_text().napi()
    }

    /// Unmounts, stops and closes; idempotent.
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

/// Puts and upserts of copies: the copy is taken on the JavaScript thread, before the promise
/// exists, so the caller may reuse its Buffer at once; the write runs in the background.
fn write_copies<'env>(
    env: &'env Env,
    inner: &Arc<StoreClient>,
    keys: Vec<String>,
    values: &[&[u8]],
    config: Option<PutConfig>,
    upsert: bool,
) -> Result<PromiseRaw<'env, Vec<BatchItem>>> {
    let config = write_config(config)?;
    let staged = inner.stage_values(values).napi()?;
    let inner = inner.clone();
    env.spawn_future(async move {
        Ok(inner
            .write_staged(&keys, staged, &config, upsert)
            .await
            .into_iter()
            .map(done)
            .collect())
    })
}

/// [`write_copies`] of one value, whose promise rejects on failure.
fn write_copy<'env>(
    env: &'env Env,
    inner: &Arc<StoreClient>,
    key: String,
    value: &[u8],
    config: Option<PutConfig>,
    upsert: bool,
) -> Result<PromiseRaw<'env, ()>> {
    let config = write_config(config)?;
    let staged = inner.stage_values(&[value]).napi()?;
    let inner = inner.clone();
    env.spawn_future(async move {
        let mut results = inner.write_staged(&[key], staged, &config, upsert).await;
        results.pop().unwrap_or(Ok(())).napi()
    })
}

fn done(result: mooncake_common::Result<()>) -> BatchItem {
    match result {
        Ok(()) => BatchItem {
            value: None,
            size: None,
            error: None,
        },
        Err(e) => BatchItem::failed(e),
    }
}
