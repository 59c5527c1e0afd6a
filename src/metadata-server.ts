import type { NativeMetadataServer } from './binding'
import { startMetadataServer as startNative } from './native'
import { nativeAsync } from './errors'

/** Options of {@link startMetadataServer}. */
export interface MetadataServerOptions {
  /** Interface to listen on. Default `127.0.0.1`. */
  host?: string
  /** Port; 0 (the default) picks a free one. */
  port?: number
  /**
   * With the cluster token, `PUT` and `DELETE` need a fresh proof of it (engines with the same `clusterToken` send
   * one); reads stay open, and engines check their peers' signatures on what they read. Default `MC_CLUSTER_TOKEN`;
   * `''` means none.
   */
  clusterToken?: string
}

/** A running HTTP metadata server (Mooncake's `GET/PUT/DELETE /metadata?key=` protocol). */
export class MetadataServer {
  private constructor(private readonly inner: NativeMetadataServer) {}

  /** @internal */
  static of(inner: NativeMetadataServer): MetadataServer {
    return new MetadataServer(inner)
  }

  /** The URL engines pass as `metadata`: `http://host:port/metadata`. */
  get url(): string {
    return this.inner.url
  }

  /** The bound port. */
  get port(): number {
    return this.inner.port
  }

  /** Stops the server. Idempotent. */
  close(): Promise<void> {
    return nativeAsync(() => this.inner.close())
  }
}

/** Starts an HTTP metadata server in this process. */
export async function startMetadataServer(options: MetadataServerOptions = {}): Promise<MetadataServer> {
  const inner = await nativeAsync(() => startNative(options.host ?? '127.0.0.1', options.port ?? 0, options.clusterToken))
  return MetadataServer.of(inner)
}
