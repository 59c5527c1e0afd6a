import type { NativeMaster } from './binding'
import { startMaster } from './native'
import { nativeAsync } from './errors'

/** Options of {@link MasterServer.start}. Durations are in milliseconds. */
export interface MasterServerOptions {
  /** Interface to bind. Default `'127.0.0.1'`. */
  host?: string
  /** gRPC port; 0 picks a free one. Default 50051. */
  rpcPort?: number
  /** Admin HTTP port (`/metrics`, `/health`, `/query_key`, ...); 0 picks one; -1 disables it. Default 9003. */
  metricsPort?: number
  /** Interface the admin HTTP binds; its routes only read. Default `'127.0.0.1'`, whatever `host` is. */
  adminHost?: string
  /** Also run the Transfer Engine HTTP metadata server in this process. Default false. */
  httpMetadataServer?: boolean
  /** Its port; 0 picks one. Default 8080. */
  httpMetadataPort?: number
  /** Read lease granted by `get`/`exists`. Default 10000. */
  defaultKvLeaseTtlMs?: number
  /** Soft pin TTL when a put asks for a pin without one. Default 30 min. */
  defaultKvSoftPinTtlMs?: number
  /** Longest soft pin a put may ask for. Default 24 h. */
  maxKvSoftPinTtlMs?: number
  /** Whether eviction's second pass may take soft-pinned objects. Default true. */
  allowEvictSoftPinnedObjects?: boolean
  /** Fraction of objects evicted per round. Default 0.05. */
  evictionRatio?: number
  /** Usage above which eviction runs. Default 0.90. */
  evictionHighWatermarkRatio?: number
  /** A client that stops pinging for this long is dropped with its segments. Default 10000. */
  clientTtlMs?: number
  /** An unfinished write younger than this cannot be preempted by another. Default 30000. */
  putStartDiscardTimeoutMs?: number
  /** Space of an abandoned write is freed this long after it started. Default 600000. */
  putStartReleaseTimeoutMs?: number
  /** Replica placement: `'random'` (default), `'free_ratio_first'`, `'local_first'`. */
  allocationStrategy?: 'random' | 'free_ratio_first' | 'local_first'
  /**
   * Keep the metadata log and snapshots in this directory (fsync'd): a master that restarts,
   * even after a crash, serves every object it had acknowledged. Default: none (a restart
   * forgets every object, as in Mooncake).
   */
  dataDir?: string
  /**
   * High availability: masters of one `clusterId` elect a leader through etcd
   * (`mooncake-store/<clusterId>/master_view`, lease 5 s) and keep the metadata log there;
   * standbys follow it and take over. Clients pass `masterAddress: 'etcd://h1:2379;h2:2379'`.
   */
  enableHa?: boolean
  /** etcd endpoints for `enableHa`: `'h1:2379;h2:2379'` (commas work too). */
  etcdEndpoints?: string
  /** Masters (and clients, through `MC_STORE_CLUSTER_ID`) of one cluster share it. Default `'mooncake_cluster'`. */
  clusterId?: string
  /** The address clients reach this master at, advertised through etcd. Default: `host:rpcPort`. */
  advertiseAddress?: string
  /**
   * Every call must prove this shared secret (clients pass the same `clusterToken`); calls without a fresh proof get
   * `ERR_UNAUTHENTICATED`. Default `MC_CLUSTER_TOKEN`; `''` means none: the master is open, as Mooncake's is.
   */
  clusterToken?: string
  /** `removeAll` and `removeByRegex` must prove this token (`ERR_PERMISSION_DENIED` otherwise). Default `MC_ADMIN_TOKEN`. */
  adminToken?: string
  /** Serve gRPC and the admin HTTP over TLS with this PEM certificate chain (with `tlsKey`). */
  tlsCert?: string
  /** The PEM private key of `tlsCert`. */
  tlsKey?: string
  /**
   * Also serve Mooncake's own master protocol (coro_rpc) on this port, so that Mooncake's Python
   * `MooncakeDistributedStore` (the vLLM, SGLang and LMCache connectors) and C++ clients use this
   * master, sharing one pool, one log and one eviction with this package's clients. Mooncake's
   * clients use 50051; 0 picks a free port. Default: off.
   */
  mooncakeRpcPort?: number
  /** Interface Mooncake's protocol binds. Default `'127.0.0.1'`: its clients prove no token. */
  mooncakeRpcHost?: string
  /**
   * Serve Mooncake's protocol next to a `clusterToken`. Mooncake's clients cannot prove the
   * token, so anyone who reaches that port can mount, read, write and remove. Default false:
   * `mooncakeRpcPort` with a cluster token is refused.
   */
  allowMooncakeClients?: boolean
}

/**
 * A Mooncake Store master running in this process: object metadata, space allocation in the
 * segments clients mount, leases, eviction and client liveness. It never touches object bytes.
 * A running master keeps the process alive until {@link close}.
 */
export class MasterServer {
  /** @hideconstructor */
  private constructor(private readonly inner: NativeMaster) {}

  /** Starts a master. */
  static async start(options: MasterServerOptions = {}): Promise<MasterServer> {
    return new MasterServer(await nativeAsync(() => startMaster(options, () => undefined)))
  }

  /** `host:port` that clients pass as `masterAddress`. */
  get address(): string {
    return this.inner.address
  }

  /** `host:port` that Mooncake's own clients pass as their master address, when `mooncakeRpcPort` is set. */
  get mooncakeRpcAddress(): string | undefined {
    return this.inner.mooncakeRpcAddress ?? undefined
  }

  /** `http://host:port/metrics` (Prometheus; `https` with `tlsCert`), when the admin server runs. */
  get metricsUrl(): string | undefined {
    return this.inner.metricsUrl ?? undefined
  }

  /** The embedded Transfer Engine metadata server's URL, when it runs. */
  get metadataUrl(): string | undefined {
    return this.inner.metadataUrl ?? undefined
  }

  /** Stops the master. Idempotent. */
  close(): Promise<void> {
    return nativeAsync(() => this.inner.close())
  }
}
