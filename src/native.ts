/**
 * Loads the native core. The glibc packages ship a second binary built with RDMA beside the
 * plain one; it is preferred when it loads, which takes libibverbs on this host, and the plain
 * binary (TCP and shared memory) serves otherwise. `MOONCAKE_RDMA=0` skips it; `MOONCAKE_RDMA=1`
 * requires it, and fails with the reason it did not load. The plain binary is found by the
 * generated loader (`binding.js`), which knows every platform package, musl ones included.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { MooncakeError } from './errors'

type Binding = typeof import('./binding')

const platform = `${process.platform}-${process.arch}-gnu`
const RDMA_BINARY = `mooncake-rdma.${platform}.node`

/** Whether this is a glibc Linux: `ldd` names its C library, as the generated loader checks. */
function isGlibc(): boolean {
  if (process.platform !== 'linux') return false
  try {
    return !readFileSync('/usr/bin/ldd', 'utf8').includes('musl')
  } catch {
    const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
    return report?.header?.glibcVersionRuntime !== undefined
  }
}

function load(): Binding {
  const rdma = process.env.MOONCAKE_RDMA
  if (rdma !== '0' && isGlibc()) {
    const failures: string[] = []
    for (const candidate of [join(__dirname, RDMA_BINARY), `mooncake-kv-${platform}/${RDMA_BINARY}`]) {
      try {
        return require(candidate) as Binding
      } catch (e) {
        // Not shipped, or libibverbs is missing here.
        failures.push(`${candidate}: ${(e as Error).message}`)
      }
    }
    if (rdma === '1') throw new MooncakeError('ERR_NOT_SUPPORTED_TRANSPORT', `MOONCAKE_RDMA=1, but no RDMA binary loads:\n${failures.join('\n')}`)
  } else if (rdma === '1') {
    throw new MooncakeError('ERR_NOT_SUPPORTED_TRANSPORT', 'MOONCAKE_RDMA=1, but RDMA binaries exist for glibc Linux only')
  }
  return require('./binding') as Binding
}

const native: Binding = load()
export = native
