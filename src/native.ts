/**
 * Loads the native core. A package built with RDMA ships a second binary beside the plain
 * one; it is preferred when it loads, which takes libibverbs on this host, and the plain
 * binary (TCP and shared memory) serves silently otherwise. `MOONCAKE_RDMA=0` skips it.
 */
import { join } from 'node:path'

type Binding = typeof import('./binding')

const platform = `${process.platform}-${process.arch}-gnu`
const RDMA_BINARY = `mooncake-rdma.${platform}.node`

function load(): Binding {
  if (process.env.MOONCAKE_RDMA !== '0') {
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
