/**
 * Loads the native core. The glibc packages ship a second binary built with RDMA beside the
 * plain one; it is preferred when it loads, which takes libibverbs on this host, and the plain
 * binary (TCP and shared memory) serves silently otherwise. `MOONCAKE_RDMA=0` skips it. The
 * plain binary is found by the generated loader (`binding.js`), which knows every platform
 * package, musl ones included.
 */
import { join } from 'node:path'

type Binding = typeof import('./binding')

const platform = `${process.platform}-${process.arch}-gnu`
const RDMA_BINARY = `mooncake-rdma.${platform}.node`

function isGlibc(): boolean {
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return report?.header?.glibcVersionRuntime !== undefined
}

function load(): Binding {
  if (process.env.MOONCAKE_RDMA !== '0' && process.platform === 'linux' && isGlibc()) {
    for (const candidate of [join(__dirname, RDMA_BINARY), `mooncake-kv-${platform}/${RDMA_BINARY}`]) {
      try {
        return require(candidate) as Binding
      } catch {
        // Not shipped, or libibverbs is missing here.
      }
    }
  }
  return require('./binding') as Binding
}

const native: Binding = load()
export = native
