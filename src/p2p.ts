import type { NativeP2PStore, NativePullReport } from './binding'
import { createP2PStore } from './native'
import { nativeEngineOptions, type TransferEngineOptions } from './engine'
import { invalidArgument, nativeAsync } from './errors'

/**
 * Options of {@link P2PStore.create}: the node's Transfer Engine takes every {@link TransferEngineOptions}; the
 * catalogue lives in its `metadata` store, which must be one (`'etcd://h:2379'`, `'redis://h:6379'` or
 * `'http://h:port/metadata'` from {@link startMetadataServer}), not `'P2PHANDSHAKE'`.
 */
export interface P2PStoreOptions extends TransferEngineOptions {
  /**
   * How long this node's liveness entry outlives its last refresh, ms. Default 10000. Pullers skip a node whose
   * entry expired and drop its copies from the catalogue.
   */
  livenessTtlMs?: number
  /** Shards a pull reads at once. Default 4. */
  concurrency?: number
  /**
   * The least time a shard read is given, ms, before it is abandoned and made from another node (a large shard gets
   * the time it takes at 32 MB/s if that is longer). Default 5000.
   */
  readTimeoutMs?: number
}

/** Options of {@link P2PStore.register}. */
export interface RegisterOptions {
  /** Largest shard in bytes: each buffer is cut into shards of this size, its last one shorter. Default 64 MiB. */
  maxShardSize?: number
  /** Replace an entry of the same name already in the catalogue (left by a node that died, say). */
  force?: boolean
  /** A name for each buffer (the file it came from, say), kept in the catalogue for pullers. */
  bufferNames?: string[]
}

/** A payload as {@link P2PStore.list} shows it. */
export interface PayloadInfo {
  /** Its name. */
  name: string
  /** Total bytes. */
  totalSize: number
  /** Length of each of the registrant's buffers: a puller passes buffers of these lengths. */
  sizeList: number[]
  /** Largest shard. */
  maxShardSize: number
  /** A name for each buffer, when the registrant gave them. Untrusted input: check before using one as a path. */
  bufferNames?: string[]
}

/** How far a pull has come. */
export interface PullProgress {
  /** Bytes held, resumed ones included. */
  bytesDone: number
  /** Bytes of the payload. */
  bytesTotal: number
  /** Shards held. */
  shardsDone: number
  /** Shards of the payload. */
  shardsTotal: number
}

/** Options of {@link P2PStore.getReplica}. */
export interface GetReplicaOptions {
  /** Called on the event loop as shards arrive; the last call may come just after the promise settles. */
  onProgress?: (progress: PullProgress) => void
}

/** What one source gave a pull. */
export interface PullSource {
  /** The source's segment name. */
  segment: string
  /** Bytes read from it. */
  bytes: number
  /** Shards read from it. */
  shards: number
  /** Reads from it that failed (a dead node, withdrawn memory) and were made elsewhere. */
  failures: number
  /** Shards from it whose bytes did not match their checksum, and were read elsewhere. */
  corrupt: number
}

/** What a finished pull did. */
export interface PullReport {
  /** Bytes read in this call. */
  bytes: number
  /** Bytes already held from an interrupted pull into the same buffers, checked and kept. */
  resumedBytes: number
  /** Reads that failed and were made again elsewhere. */
  retries: number
  /** Each source read from, most bytes first. */
  sources: PullSource[]
  /** Time from the call to the catalogue update, ms. */
  elapsedMs: number
}

function buffers(list: Uint8Array[], what: string): Uint8Array[] {
  if (!Array.isArray(list) || list.length === 0 || !list.every((b) => b instanceof Uint8Array)) {
    throw invalidArgument(`${what} must be a non-empty array of Buffers or Uint8Arrays`)
  }
  return list
}

function pullReport(report: NativePullReport): PullReport {
  return { ...report, sources: report.sources.map((s) => ({ ...s })) }
}

/**
 * A node of Mooncake's P2P Store: large read-only payloads (checkpoints) registered where they live and pulled with
 * one-sided reads from every node that holds them. Each puller serves what it pulled, so a payload spreads like a
 * torrent; there is no master, only a catalogue in the metadata store (Mooncake's format, at
 * `mooncake/checkpoint/<name>`).
 *
 * Each shard carries a checksum; a puller checks every shard before it serves it, and reads a shard that does not
 * match from another node. Nodes keep an expiring liveness entry, so copies of a node that died are skipped and
 * dropped. A node holds each name once.
 *
 * Memory rule: registered and pulled buffers belong to the store until {@link unregister} / {@link deleteReplica}
 * (or {@link close}): peers read them at any time, so do not change them.
 *
 * An open node keeps the process alive; {@link close} releases it.
 *
 * @example
 * ```ts
 * const trainer = await P2PStore.create({ metadata: 'etcd://127.0.0.1:2379', localServerName: 'trainer-0' })
 * await trainer.register('llama/step-1200', [weights0, weights1], { maxShardSize: 64 << 20 })
 *
 * const node = await P2PStore.create({ metadata: 'etcd://127.0.0.1:2379', localServerName: 'infer-3' })
 * const [info] = await node.list('llama/step-1200')
 * const into = info.sizeList.map((size) => Buffer.alloc(size))
 * await node.getReplica(info.name, into, { onProgress: (p) => console.log(p.bytesDone, '/', p.bytesTotal) })
 * ```
 */
export class P2PStore {
  private constructor(private readonly inner: NativeP2PStore) {}

  /** Starts a node: its engine and its liveness entry. */
  static async create(options: P2PStoreOptions): Promise<P2PStore> {
    if (typeof options !== 'object' || options === null) throw invalidArgument('options are required')
    const { livenessTtlMs, concurrency, readTimeoutMs, ...engine } = options
    const inner = await nativeAsync(() =>
      createP2PStore(nativeEngineOptions(engine), { livenessTtlMs, concurrency, readTimeoutMs }, () => undefined),
    )
    return new P2PStore(inner)
  }

  /** This node's segment name: what the catalogue's locations call it. */
  get segmentName(): string {
    return this.inner.segmentName
  }

  /**
   * Publishes `buffers` as payload `name`: no bytes move; the buffers are cut into shards, each with a checksum, and
   * served until {@link unregister}. `ERR_PAYLOAD_OPENED` when the name is taken (here or in the catalogue),
   * `ERR_ADDRESS_OVERLAPPED` when a buffer overlaps another payload's other than exactly.
   */
  register(name: string, list: Uint8Array[], options?: RegisterOptions): Promise<void> {
    return nativeAsync(() => this.inner.register(name, buffers(list, 'buffers'), options))
  }

  /** Stops serving a payload this node registered (`ERR_PAYLOAD_NOT_OPENED` otherwise); its entry goes when no node serves it. */
  unregister(name: string): Promise<void> {
    return nativeAsync(() => this.inner.unregister(name))
  }

  /** Payloads whose names start with `prefix`, in name order. */
  async list(prefix = ''): Promise<PayloadInfo[]> {
    const listed = await nativeAsync(() => this.inner.list(prefix))
    return listed.map(({ bufferNames, ...info }) => (bufferNames === undefined || bufferNames === null ? info : { ...info, bufferNames }))
  }

  /**
   * Removes registrants' copies of `name` from the catalogue on their behalf: those of `segment`, or every one (as
   * Mooncake's unregister does). For a registrant that is gone; the entry goes when no copy is left. This node's own
   * copies go with {@link unregister}.
   */
  forget(name: string, segment?: string): Promise<void> {
    return nativeAsync(() => this.inner.forget(name, segment))
  }

  /**
   * Pulls payload `name` into `into` (one buffer per entry of its `sizeList`, of those lengths), then serves it too.
   * Shards come from the nodes expected to finish soonest; one that fails or does not match its checksum is read
   * elsewhere. `ERR_PAYLOAD_NOT_FOUND` for an unknown name, `ERR_TOO_MANY_RETRIES` when a shard failed everywhere: a
   * later call with the same buffers resumes from the shards they hold.
   */
  async getReplica(name: string, into: Uint8Array[], options?: GetReplicaOptions): Promise<PullReport> {
    const onProgress = options?.onProgress
    if (onProgress !== undefined && typeof onProgress !== 'function') throw invalidArgument('onProgress must be a function')
    const report = await nativeAsync(() => this.inner.getReplica(name, buffers(into, 'into'), onProgress))
    return pullReport(report)
  }

  /** Stops serving a payload this node pulled (`ERR_PAYLOAD_NOT_OPENED` otherwise). */
  deleteReplica(name: string): Promise<void> {
    return nativeAsync(() => this.inner.deleteReplica(name))
  }

  /** Withdraws everything this node serves from the catalogue, then stops. Idempotent. */
  close(): Promise<void> {
    return nativeAsync(() => this.inner.close())
  }
}
