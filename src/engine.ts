import { EventEmitter } from 'node:events'

import type { EngineOptions, NativeBatch, NativeEngine, NativeRequest } from './binding'
import { createEngine } from './native'
import { invalidArgument, MooncakeError, native, nativeAsync, toMooncakeError } from './errors'

/** Options of {@link TransferEngine.create}. */
export interface TransferEngineOptions {
  /**
   * This engine's name: a host (`'127.0.0.1'`, `'node01'`) or `host:port`. In P2P mode the
   * published segment name becomes `host:<rpc port>`; read it from {@link TransferEngine.segmentName}.
   */
  localServerName: string
  /** `'P2PHANDSHAKE'` (no metadata server), `'http://host:port/metadata'` or `'redis://host:port'`. */
  metadata: string
  /**
   * Transport. `'auto'` (default): shared memory for engines on this host, RDMA where both ends
   * have it, TCP otherwise. `'tcp'`: always TCP. `'shm'`: shared memory only. `'rdma'`: RDMA
   * only (the engine fails to start with `ERR_DEVICE_NOT_FOUND` without a usable NIC). A forced
   * transport fails requests it cannot carry with `ERR_NOT_SUPPORTED_TRANSPORT`.
   */
  protocol?: 'auto' | 'tcp' | 'shm' | 'rdma'
  /**
   * Offer this engine's memory to same-host peers and map theirs. Default true. With false,
   * same-host traffic goes over TCP.
   */
  sharedMemory?: boolean
  /** Address peers use to reach this engine. Default: `MC_TCP_BIND_ADDRESS`, else the host of `localServerName` if it resolves, else the first network interface. */
  ipOrHostName?: string
  /** Handshake (RPC) port. Default: random in 15000-17000 (`MC_MIN_RPC_PORT`/`MC_MAX_RPC_PORT`). */
  rpcPort?: number
  /** TCP data port. Default: random in the same range. */
  tcpDataPort?: number
  /** Persistent connections per peer, 1-16. Default 4 (`MC_TCP_LANES_PER_PEER`). More lanes, more requests in flight. */
  tcpLanesPerPeer?: number
  /** Largest piece a request is cut into; pieces spread over the lanes. Default 1 MiB. */
  sliceSize?: number
  /** Connect timeout for handshakes and data lanes, ms. Default 5000 (`MC_HANDSHAKE_CONNECT_TIMEOUT`). */
  connectTimeoutMs?: number
  /** A data exchange that makes no progress for this long fails, ms. Default 30000 (`MC_TCP_STATUS_TIMEOUT_SEC`). */
  ioTimeoutMs?: number
  /** Metadata key namespace (`MC_METADATA_CLUSTER_ID`). */
  clusterId?: string
  /**
   * Devices to use, by name (`MC_TE_FILTERS`): RDMA NICs, and the network interfaces TCP rails
   * leave through. With interfaces listed, transfers to a peer that publishes several
   * addresses are sprayed over every (local interface, peer address) pair on a shared network,
   * and a failing or downed link's slices move to the others. Default: every RDMA NIC and a
   * single TCP path.
   */
  devices?: string[]
  /** A NIC priority matrix that replaces the discovered one (default: the file `MC_CUSTOM_TOPO_JSON` names). */
  topology?: PriorityMatrix | string
  /** Attempts a slice may make beyond its first, across rails, 1-127. Default 9 (`MC_RETRY_CNT`). */
  retryCount?: number
  /**
   * The cluster's shared secret, at least 16 characters (`mooncake token` makes one). With it, every peer proves it
   * holds the same token before it reads or writes this engine's memory (a challenge-response: the token never
   * travels), and descriptors this engine publishes are signed so that a rewritten metadata entry is refused.
   * Default `MC_CLUSTER_TOKEN`; `''` means none (Mooncake peers hold none).
   */
  clusterToken?: string
}

/**
 * Mooncake's NIC priority matrix: for each memory location (`cpu:<numa node>`, `cuda:<gpu>`),
 * the preferred devices and the merely available ones.
 */
export type PriorityMatrix = Record<string, [preferred: string[], available: string[]]>

/** One rail: a (local device, peer device) pair, and what it carried. */
export interface RailStats {
  /** Local interface or NIC; `*` when the routing table picks. */
  local: string
  /** The peer's device or address. */
  remote: string
  /** In the preferred tier for its memory. */
  preferred: boolean
  /** Whether new slices may take it now (false while paused or its link is down). */
  usable: boolean
  /** Bytes handed to it and not yet settled. */
  inflightBytes: number
  /** Bytes it carried. */
  bytes: number
  /** Slices it carried. */
  slices: number
  /** Slices that failed on it. */
  failures: number
  /** Times it was paused. */
  pauses: number
  /** Slices it carried after they had failed on another rail. */
  rescued: number
}

/** One registered buffer of a remote segment. */
export interface BufferDescriptor {
  /** Address of its first byte in the owner's memory: what requests target. */
  readonly address: bigint
  /** Length in bytes. */
  readonly length: number
  /** Memory location (`cpu:0`, `*`); Mooncake TCP peers publish their segment name here. */
  readonly location: string
}

/** An opened remote segment. */
export interface Segment {
  /** The name it was opened by. */
  readonly name: string
  /** Its registered buffers, as of the last refresh. */
  readonly buffers: readonly BufferDescriptor[]
}

/** The engine's handle of each segment it opened; requests name segments by these. */
const handles = new WeakMap<Segment, bigint>()

/** The native handle of a segment from {@link TransferEngine.openSegment}. */
export function segmentHandle(segment: Segment): bigint | undefined {
  return typeof segment === 'object' && segment !== null ? handles.get(segment) : undefined
}

/** Options of {@link TransferEngine.write} and {@link TransferEngine.read}. */
export interface ReadWriteOptions {
  /** Bytes to move. Default: the rest of `local` after `localOffset`. */
  length?: number
  /** Offset into `local`. Default 0. */
  localOffset?: number
  /** The request must finish within this many ms, or it fails with `ERR_TIMEOUT`. */
  timeoutMs?: number
}

/** The transports an engine can use. */
export type TransportName = 'tcp' | 'shm' | 'rdma'

/** A one-sided request. */
export interface TransferRequest {
  /** `'read'`: remote to local. `'write'`: local to remote. */
  op: 'read' | 'write'
  /** Target segment, from {@link TransferEngine.openSegment}. */
  segment: Segment
  /** Local memory: a Buffer from {@link TransferEngine.allocate}, or one passed to {@link TransferEngine.register}. */
  local: Uint8Array
  /** Offset into `local`. Default 0. */
  localOffset?: number
  /** Address in the target's memory (a buffer's `address` plus an offset). */
  remoteAddress: bigint
  /** Bytes to move. Default: the rest of `local` after `localOffset`. */
  length?: number
}

/** Options of a submission. */
export interface TransferOptions {
  /** Sent to the first request's segment once the whole batch has completed. */
  notify?: string
  /** Every request must finish within this many ms, or its task ends as `TIMEOUT`. */
  timeoutMs?: number
}

/** Mooncake's task states; `code` in {@link TaskStatus} carries its numbering (0-6). */
export type TaskStatusName = 'WAITING' | 'PENDING' | 'INVALID' | 'CANCELED' | 'COMPLETED' | 'TIMEOUT' | 'FAILED'

/** The state of one request of a batch. */
export interface TaskStatus {
  /** State name. */
  status: TaskStatusName
  /** Mooncake's numeric state: WAITING 0, PENDING 1, INVALID 2, CANCELED 3, COMPLETED 4, TIMEOUT 5, FAILED 6. */
  code: number
  /** Bytes that arrived (a lower bound while `WAITING`). */
  transferredBytes: number
  /** Why the task did not complete. */
  error?: MooncakeError
}

/** Traffic through one transport since the engine started. */
export interface TransportStats {
  /** Requests submitted through it. */
  requests: number
  /** Bytes submitted through it. */
  bytes: number
}

/** A notification from a peer. */
export interface NotifyEvent {
  /** The sender's segment name. */
  from: string
  /** The payload. */
  message: string
}

/**
 * A submitted batch. Its requests run concurrently; {@link Batch.done} settles when all have.
 *
 * The memory of every request belongs to the engine until the batch settles: do not read or
 * write those bytes from JavaScript meanwhile.
 */
export class Batch {
  private constructor(private readonly inner: NativeBatch) {}

  /** @internal */
  static of(inner: NativeBatch): Batch {
    return new Batch(inner)
  }

  /** Resolves when every request completed; rejects with the first failure (a {@link MooncakeError}). Never stays pending: dead peers, timeouts and `close()` settle it. */
  done(): Promise<void> {
    return nativeAsync(() => this.inner.done())
  }

  /** Per-request state, in request order. */
  status(): TaskStatus[] {
    return native(() => this.inner.status()).map((task) => ({
      status: task.status as TaskStatusName,
      code: task.code,
      transferredBytes: task.transferredBytes,
      ...(task.error === undefined || task.error === null ? {} : { error: toMooncakeError(task.error) }),
    }))
  }
}

/** Engine options as the native layer takes them (a matrix object becomes its JSON). */
export function nativeEngineOptions(options: TransferEngineOptions): EngineOptions {
  const { topology, ...rest } = options
  return { ...rest, topology: topology === undefined || typeof topology === 'string' ? topology : JSON.stringify(topology) }
}

/**
 * A Mooncake transfer engine: one segment of registered memory that peers read and write, and
 * batched one-sided reads and writes of other segments, over Mooncake's wire protocols.
 *
 * Rule of registered memory: while a transfer that uses a buffer is pending, JavaScript must
 * not touch those bytes; peers may read and write registered memory at any time.
 *
 * An open engine keeps the process alive (like a listening server); {@link close} releases it.
 *
 * @example
 * ```ts
 * const engine = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE' })
 * const buf = engine.allocate(1 << 20)
 * const peer = await engine.openSegment('127.0.0.1:15123')
 * await engine.read(peer, buf, peer.buffers[0].address)
 * await engine.close()
 * ```
 */
export class TransferEngine extends EventEmitter<{ notify: [NotifyEvent] }> {
  private constructor(private readonly inner: NativeEngine) {
    super()
  }

  /** Starts an engine: binds its handshake and data ports and publishes its metadata. */
  static async create(options: TransferEngineOptions): Promise<TransferEngine> {
    if (typeof options !== 'object' || options === null) throw invalidArgument('options are required')
    let engine: TransferEngine | undefined
    const inner = await nativeAsync(() =>
      createEngine(nativeEngineOptions(options), (event) => {
        engine?.emit('notify', event)
      }),
    )
    engine = new TransferEngine(inner)
    return engine
  }

  /** The name peers pass to {@link openSegment}: `host:port` in P2P mode. */
  get segmentName(): string {
    return this.inner.segmentName
  }

  /** The handshake (RPC) port. */
  get rpcPort(): number {
    return this.inner.rpcPort
  }

  /** The TCP data port. */
  get dataPort(): number {
    return this.inner.dataPort
  }

  /**
   * Allocates `size` bytes of registered engine memory (shared memory owned by the engine),
   * zero-filled. Peers can read and write it at once; it stays valid while the Buffer is
   * reachable, even after {@link close}.
   */
  allocate(size: number): Buffer {
    return native(() => this.inner.allocate(size))
  }

  /** Registers caller memory so transfers and peers can use it. It is referenced until {@link unregister}. Overlapping registrations fail with `ERR_ADDRESS_OVERLAPPED`. */
  register(buffer: Uint8Array, location?: string): void {
    native(() => this.inner.register(buffer, location))
  }

  /** Unregisters `buffer` (its first byte must be the start of a registration). Fails with `ERR_BUFFER_BUSY` while a transfer uses it. */
  unregister(buffer: Uint8Array): void {
    native(() => this.inner.unregister(buffer))
  }

  /** The address of `buffer`'s first byte, as a peer targets it. */
  addressOf(buffer: Uint8Array): bigint {
    return native(() => this.inner.addressOf(buffer))
  }

  /** Opens a segment by name (`host:port` in P2P mode). Cached after the first call. */
  async openSegment(name: string): Promise<Segment> {
    const { id, ...info } = await nativeAsync(() => this.inner.openSegment(name))
    const segment: Segment = Object.freeze({ name: info.name, buffers: Object.freeze(info.buffers.map((b) => Object.freeze(b))) })
    handles.set(segment, id)
    return segment
  }

  /**
   * Writes `local[localOffset, localOffset + length)` to `remoteAddress` in `segment`. The
   * fourth argument is the options object, or `length` (then `localOffset` fifth).
   */
  write(segment: Segment, local: Uint8Array, remoteAddress: bigint, options?: ReadWriteOptions | number, localOffset?: number): Promise<void> {
    return this.oneSided('write', segment, local, remoteAddress, options, localOffset)
  }

  /**
   * Reads `length` bytes at `remoteAddress` in `segment` into `local` at `localOffset`. The
   * fourth argument is the options object, or `length` (then `localOffset` fifth).
   */
  read(segment: Segment, local: Uint8Array, remoteAddress: bigint, options?: ReadWriteOptions | number, localOffset?: number): Promise<void> {
    return this.oneSided('read', segment, local, remoteAddress, options, localOffset)
  }

  private oneSided(
    op: 'read' | 'write',
    segment: Segment,
    local: Uint8Array,
    remoteAddress: bigint,
    options: ReadWriteOptions | number | undefined,
    localOffset: number | undefined,
  ): Promise<void> {
    const { length, timeoutMs, ...rest } = typeof options === 'object' && options !== null ? options : { length: options, localOffset }
    return this.transfer([{ op, segment, local, remoteAddress, length, localOffset: rest.localOffset }], timeoutMs === undefined ? undefined : { timeoutMs })
  }

  /** Runs a batch and resolves when every request completed; rejects with the first failure. */
  transfer(requests: readonly TransferRequest[], options?: TransferOptions): Promise<void> {
    return nativeAsync(() => this.inner.transfer(toNative(requests), options))
  }

  /** Submits a batch and returns at once; await {@link Batch.done}. */
  submit(requests: readonly TransferRequest[], options?: TransferOptions): Batch {
    return Batch.of(native(() => this.inner.submit(toNative(requests), options)))
  }

  /** Sends a notification to a segment; its engine emits `'notify'`. */
  sendNotify(segmentName: string, message: string): Promise<void> {
    return nativeAsync(() => this.inner.sendNotify(segmentName, message))
  }

  /** Requests and bytes submitted through each transport (`tcp`, `shm`, `rdma`) since start. */
  stats(): Record<'tcp' | 'shm' | 'rdma', TransportStats> {
    const out = { tcp: { requests: 0, bytes: 0 }, shm: { requests: 0, bytes: 0 }, rdma: { requests: 0, bytes: 0 } }
    for (const s of native(() => this.inner.stats())) {
      if (s.transport === 'tcp' || s.transport === 'shm' || s.transport === 'rdma') {
        out[s.transport] = { requests: s.requests, bytes: s.bytes }
      }
    }
    return out
  }

  /**
   * This engine's metrics in Prometheus's text format (version 0.0.4): serve it from an HTTP
   * handler with `Content-Type: text/plain; version=0.0.4`.
   *
   * - `mooncake_engine_transfers_total`, `mooncake_engine_transfer_bytes_total` and the
   *   `mooncake_engine_transfer_duration_seconds` histogram (submission to completion), by
   *   `transport` (`tcp`, `shm`, `rdma`) and `op` (`read`, `write`), for completed requests;
   * - `mooncake_engine_transfer_failures_total` by the same labels (`transport="none"`: failed
   *   before a transport was chosen);
   * - `mooncake_engine_batches`: batches not yet freed;
   * - `mooncake_engine_rail_*`: per rail (`peer`, `local`, `remote`), whether it is usable and
   *   preferred, bytes in flight, and the bytes, slices, failures, pauses and rescued slices it
   *   carried.
   *
   * A request is counted once its batch has settled and been awaited or freed; its latency is
   * measured to the moment it settled.
   *
   * @example
   * ```ts
   * createServer((req, res) => {
   *   res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4' })
   *   res.end(engine.metrics())
   * }).listen(9100)
   * ```
   */
  metrics(): string {
    return native(() => this.inner.metrics())
  }

  /** The NIC priority matrix the engine selects devices by (discovered from sysfs, or the one given). */
  topology(): PriorityMatrix {
    return JSON.parse(native(() => this.inner.topology())) as PriorityMatrix
  }

  /** The transports this engine can use: `'tcp'`, `'shm'` unless shared memory is off, `'rdma'` when it runs. */
  transports(): TransportName[] {
    return native(() => this.inner.transports()) as TransportName[]
  }

  /** The rails to every peer used so far, keyed by the peer's first data address. */
  railStats(): Record<string, RailStats[]> {
    const out: Record<string, RailStats[]> = {}
    for (const peer of native(() => this.inner.railStats())) out[peer.peer] = peer.rails
    return out
  }

  /**
   * Closes the engine: stops serving peers, settles every pending batch with `ERR_CLOSED`,
   * removes published metadata and joins every background task. Idempotent.
   */
  close(): Promise<void> {
    return nativeAsync(() => this.inner.close())
  }

  /** @internal The native engine, for the bench. */
  get native(): NativeEngine {
    return this.inner
  }
}

function toNative(requests: readonly TransferRequest[]): NativeRequest[] {
  if (!Array.isArray(requests)) throw invalidArgument('requests must be an array')
  return requests.map((request, i) => {
    if (typeof request !== 'object' || request === null) throw invalidArgument(`request ${i} is not an object`)
    const { op, segment, local, remoteAddress } = request
    if (!(local instanceof Uint8Array)) throw invalidArgument(`request ${i}: local must be a Buffer or Uint8Array`)
    const handle = segmentHandle(segment)
    if (handle === undefined) throw invalidArgument(`request ${i}: segment must come from openSegment()`)
    if (typeof remoteAddress !== 'bigint') throw invalidArgument(`request ${i}: remoteAddress must be a bigint`)
    const localOffset = request.localOffset ?? 0
    const length = request.length ?? local.byteLength - localOffset
    return { op, segment: handle, local, localOffset, remoteAddress, length }
  })
}
