import type { BatchItem, NativeStore, PutConfig } from './binding'
import { connectStore } from './native'
import { nativeEngineOptions, type TransferEngineOptions } from './engine'
import { invalidArgument, MooncakeError, native, nativeAsync, toMooncakeError } from './errors'

/**
 * Options of {@link MooncakeStore.connect}: the node's Transfer Engine takes every
 * {@link TransferEngineOptions} (devices, ports, lanes, slice size, retries, topology, ...), and
 * the store adds its own.
 */
export interface MooncakeStoreOptions extends Omit<TransferEngineOptions, 'localServerName'> {
  /**
   * The master's `host:port` ({@link MasterServer.address}), or `'etcd://h1:2379;h2:2379'` for
   * masters in high availability: the client finds the leader there (cluster id from
   * `MC_STORE_CLUSTER_ID`, default `mooncake_cluster`) and follows it through failovers.
   * `'mooncake://host:port'` joins a pool run by Mooncake's own `mooncake_master` (its 0.3.13
   * wire): bytes move peer to peer with Mooncake's nodes, which must be reachable through
   * `metadata` (`'P2PHANDSHAKE'` as Mooncake's clients use it by default).
   */
  masterAddress: string
  /** This node's name. Default `'127.0.0.1'`. */
  localServerName?: string
  /** Bytes of memory this node contributes to the pool. Default 16 MiB; 0 makes a pure client. */
  globalSegmentSize?: number
  /**
   * Registered staging for `put`/`get` of plain Buffers. Default 16 MiB. A Buffer from `get` keeps its block until it is
   * garbage-collected; when the staging is full, up to 64 MiB more is added, and beyond that values get memory of their own.
   */
  localBufferSize?: number
  /** Deadline of one master RPC in ms. Default 30000 (`MC_RPC_TIMEOUT_MS`). */
  rpcTimeoutMs?: number
  /**
   * Proves the admin role to a master started with an `adminToken`: needed for {@link MooncakeStore.removeAll} and
   * {@link MooncakeStore.removeByRegex}. Default `MC_ADMIN_TOKEN`. (`clusterToken` serves the master and the peers.)
   */
  adminToken?: string
  /** Reach the master over TLS, trusting the certificate authorities in this PEM file. */
  masterTlsCa?: string
}

/** How a value is stored. */
export interface PutOptions {
  /** Copies on distinct nodes (best effort: fewer when fewer nodes have room). Default 1. */
  replicaNum?: number
  /** Segment (node) names tried first, in order. */
  preferredSegments?: string[]
  /** Evicted only after ordinary objects: `true` for the master's default TTL (30 min), or `{ ttlMs }`. */
  softPin?: boolean | { ttlMs: number }
  /** Never evicted (removable with `remove`). */
  hardPin?: boolean
}

/** Options of removals. */
export interface RemoveOptions {
  /** Remove even while a reader holds a lease. */
  force?: boolean
}

function putConfig(options?: PutOptions): PutConfig | undefined {
  if (options === undefined) return undefined
  if (typeof options !== 'object' || options === null) throw invalidArgument('put options must be an object')
  const { replicaNum, preferredSegments, softPin, hardPin } = options
  return {
    replicaNum,
    preferredSegments,
    hardPin,
    ...(typeof softPin === 'object' && softPin !== null ? { softPinTtlMs: softPin.ttlMs } : { softPin }),
  }
}

function bytes(value: Uint8Array | string): Buffer {
  if (typeof value === 'string') return Buffer.from(value)
  if (value instanceof Uint8Array) return Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength)
  throw invalidArgument('a value must be a Buffer, a Uint8Array or a string')
}

function itemError(item: BatchItem): MooncakeError | undefined {
  return item.error === undefined || item.error === null ? undefined : toMooncakeError(item.error)
}

/**
 * A Mooncake Store node: contributes memory to the pool and reads and writes objects, moving
 * their bytes peer to peer (never through the master).
 *
 * A connected node keeps the process alive until {@link close}, like a server: its memory
 * is part of the pool.
 *
 * Batch methods resolve to arrays aligned with their keys; a key that failed is a
 * {@link MooncakeError} element, never a rejection of the whole batch.
 *
 * @example
 * ```ts
 * const store = await MooncakeStore.connect({ masterAddress: '127.0.0.1:50051', metadata: 'P2PHANDSHAKE' })
 * await store.put('prefix-hash/layer-0', kvBlock, { replicaNum: 2 })
 * const block = await store.get('prefix-hash/layer-0')
 * ```
 */
export class MooncakeStore {
  private constructor(private readonly inner: NativeStore) {}

  /** Starts a node: its Transfer Engine, its segment mounted at the master, its heartbeat. */
  static async connect(options: MooncakeStoreOptions): Promise<MooncakeStore> {
    if (typeof options !== 'object' || options === null) throw invalidArgument('options are required')
    const { masterAddress, globalSegmentSize, localBufferSize, rpcTimeoutMs, adminToken, masterTlsCa, ...engine } = options
    const store = { masterAddress, globalSegmentSize, localBufferSize, rpcTimeoutMs, adminToken, masterTlsCa }
    const engineOptions = nativeEngineOptions({ localServerName: '127.0.0.1', ...engine })
    return new MooncakeStore(await nativeAsync(() => connectStore(engineOptions, store, () => undefined)))
  }

  /** This node's segment name (what `preferredSegments` refers to). */
  get segmentName(): string {
    return this.inner.segmentName
  }

  /**
   * Stores a copy of `value` under `key`. Insert if absent: if the key exists, it is left as it is. The copy is taken
   * before this returns, so `value` may be reused at once.
   */
  put(key: string, value: Uint8Array | string, options?: PutOptions): Promise<void> {
    return nativeAsync(() => this.inner.put(key, bytes(value), putConfig(options)))
  }

  /** The value of `key`; `ERR_OBJECT_NOT_FOUND` when absent. */
  get(key: string): Promise<Buffer> {
    return nativeAsync(() => this.inner.get(key))
  }

  /** Stores registered memory ({@link allocate} or {@link registerBuffer}) without copying it. Do not touch it until this resolves. */
  putFrom(key: string, buffer: Uint8Array, options?: PutOptions): Promise<void> {
    return nativeAsync(() => this.inner.putFrom(key, buffer, putConfig(options)))
  }

  /** Reads `key` into registered memory; resolves to the value's size. `ERR_BUFFER_OVERFLOW` when it does not fit. */
  getInto(key: string, buffer: Uint8Array): Promise<number> {
    return nativeAsync(() => this.inner.getInto(key, buffer))
  }

  /**
   * Inserts or replaces `key` (in place when the size is equal and no reader holds a lease). The copy is taken before this
   * returns. When two writes of one key overlap, the later one wins and the earlier rejects with `ERR_INVALID_WRITE`.
   */
  upsert(key: string, value: Uint8Array | string, options?: PutOptions): Promise<void> {
    return nativeAsync(() => this.inner.upsert(key, bytes(value), putConfig(options)))
  }

  /** Inserts or replaces `key` from registered memory. */
  upsertFrom(key: string, buffer: Uint8Array, options?: PutOptions): Promise<void> {
    return nativeAsync(() => this.inner.upsertFrom(key, buffer, putConfig(options)))
  }

  /** Stores copies of many values (taken before this returns); all transfers overlap. Resolves to `undefined` or a {@link MooncakeError} per key. */
  async batchPut(keys: string[], values: (Uint8Array | string)[], options?: PutOptions): Promise<(MooncakeError | undefined)[]> {
    const items = await nativeAsync(() => this.inner.batchPut(keys, values.map(bytes), putConfig(options)))
    return items.map(itemError)
  }

  /** Stores many registered buffers without copying. */
  async batchPutFrom(keys: string[], buffers: Uint8Array[], options?: PutOptions): Promise<(MooncakeError | undefined)[]> {
    const items = await nativeAsync(() => this.inner.batchPutFrom(keys, buffers, putConfig(options)))
    return items.map(itemError)
  }

  /** Reads many values: a Buffer or a {@link MooncakeError} per key. */
  async batchGet(keys: string[]): Promise<(Buffer | MooncakeError)[]> {
    const items = await nativeAsync(() => this.inner.batchGet(keys))
    return items.map((item) => itemError(item) ?? item.value!)
  }

  /** Reads many values into registered buffers: the size or a {@link MooncakeError} per key. */
  async batchGetInto(keys: string[], buffers: Uint8Array[]): Promise<(number | MooncakeError)[]> {
    const items = await nativeAsync(() => this.inner.batchGetInto(keys, buffers))
    return items.map((item) => itemError(item) ?? item.size!)
  }

  /** Removes `key`. A key a reader holds a lease on needs `force`. */
  remove(key: string, options: RemoveOptions = {}): Promise<void> {
    return nativeAsync(() => this.inner.remove(key, options.force))
  }

  /** Removes every key (leased ones only with `force`); resolves to the count. */
  removeAll(options: RemoveOptions = {}): Promise<number> {
    return nativeAsync(() => this.inner.removeAll(options.force))
  }

  /** Removes every key that matches; resolves to the count. */
  removeByRegex(pattern: RegExp | string, options: RemoveOptions = {}): Promise<number> {
    const source = pattern instanceof RegExp ? pattern.source : pattern
    return nativeAsync(() => this.inner.removeByRegex(source, options.force))
  }

  /** Whether `key` is readable. */
  exists(key: string): Promise<boolean> {
    return nativeAsync(() => this.inner.exists(key))
  }

  /** Per-key existence. */
  batchExists(keys: string[]): Promise<boolean[]> {
    return nativeAsync(() => this.inner.batchExists(keys))
  }

  /** The size of `key`'s value. */
  getSize(key: string): Promise<number> {
    return nativeAsync(() => this.inner.getSize(key))
  }

  /** How many leading keys are present: the hit length of a prefix cache lookup. */
  longestPrefix(keys: string[]): Promise<number> {
    return nativeAsync(() => this.inner.longestPrefix(keys))
  }

  /** Registered memory for the zero-copy methods. */
  allocate(size: number): Buffer {
    return native(() => this.inner.allocate(size))
  }

  /** Registers a buffer of yours for the zero-copy methods; referenced until {@link unregisterBuffer}. */
  registerBuffer(buffer: Uint8Array): void {
    native(() => this.inner.registerBuffer(buffer))
  }

  /** Unregisters a buffer. */
  unregisterBuffer(buffer: Uint8Array): void {
    native(() => this.inner.unregisterBuffer(buffer))
  }

  /**
   * This client's metrics and its engine's, in Prometheus's text format (version 0.0.4; serve
   * it with `Content-Type: text/plain; version=0.0.4`).
   *
   * - `mooncake_client_requests_total`, `mooncake_client_failures_total` and the
   *   `mooncake_client_request_duration_seconds` histogram by `op` (`put`, `get`, `remove`):
   *   one request per key (the keys of a batch share its time); `removeAll` and
   *   `removeByRegex` count once per call;
   * - `mooncake_client_bytes_total` by `op` (`put`, `get`): value bytes of successful requests,
   *   once per value whatever the replica count (the engine's `mooncake_engine_transfer_bytes_total`
   *   counts what moved, every replica);
   * - `mooncake_client_staging_used_bytes` and `mooncake_client_staging_capacity_bytes`: the
   *   staging buffer (`localBufferSize` plus the reserve grown beyond it);
   * - every `mooncake_engine_*` metric of `TransferEngine.metrics()`, for this client's engine.
   */
  metrics(): string {
    return native(() => this.inner.metrics())
  }

  /** Unmounts this node's segment (its objects are dropped from the pool), stops and closes. Idempotent. */
  close(): Promise<void> {
    return nativeAsync(() => this.inner.close())
  }
}
