/**
 * `mooncake bench-store` (and `npm run bench:store`): put and get of several value sizes from
 * several client processes against a store of several node processes on loopback, and in the
 * same run the same workload against Redis (a `redis-server` the bench starts) through a Node
 * Redis client. Also measures master operations per second with batched existence checks.
 *
 * Each client process owns a fixed set of keys (sized to half the pool), puts them once, then
 * gets them for the rest of the period; `--inflight` operations run at once per client.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { createServer } from 'node:net'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import { MooncakeError } from './errors'
import { MasterServer } from './master'
import { MooncakeStore } from './store'

interface Phase {
  ops: number
  bytes: number
  seconds: number
  latenciesUs: number[]
}

interface Row {
  system: string
  op: string
  size: number
  gbps: number
  opsPerSec: number
  p50Us: number
  p99Us: number
}

const OPTIONS = {
  role: { type: 'string', default: 'bench' },
  nodes: { type: 'string', default: '2' },
  clients: { type: 'string', default: '2' },
  'node-size': { type: 'string', default: '1024' },
  sizes: { type: 'string', default: '65536,1048576,4194304' },
  duration: { type: 'string', default: '3' },
  inflight: { type: 'string', default: '4' },
  keys: { type: 'string', default: '0' },
  size: { type: 'string', default: '0' },
  master: { type: 'string', default: '' },
  metadata: { type: 'string', default: '' },
  redis: { type: 'string', default: '' },
  prefix: { type: 'string', default: 'k' },
  json: { type: 'boolean', default: false },
} as const

const percentile = (sorted: number[], p: number) => (sorted.length ? sorted[Math.round((sorted.length - 1) * p)] : 0)

/** Runs `count` operations, `inflight` at a time, then repeats them until `seconds` pass (if `repeat`). */
async function drive(count: number, inflight: number, seconds: number, repeat: boolean, op: (i: number) => Promise<number>): Promise<Phase> {
  const latenciesUs: number[] = []
  let bytes = 0
  let next = 0
  const start = process.hrtime.bigint()
  const stopAt = start + BigInt(Math.round(seconds * 1e9))
  const worker = async () => {
    for (;;) {
      const i = next++
      if (i >= count && !(repeat && process.hrtime.bigint() < stopAt)) return
      const began = process.hrtime.bigint()
      const moved = await op(i % count)
      bytes += moved
      latenciesUs.push(Number(process.hrtime.bigint() - began) / 1e3)
    }
  }
  await Promise.all(Array.from({ length: inflight }, worker))
  return { ops: latenciesUs.length, bytes, seconds: Number(process.hrtime.bigint() - start) / 1e9, latenciesUs }
}

interface Store {
  put(key: string, value: Buffer): Promise<void>
  get(key: string): Promise<Buffer>
  /** Drops this client's keys, so the next size starts from an empty pool. */
  drop(prefix: string, keys: string[]): Promise<void>
  close(): Promise<void>
}

async function openStore(o: Record<string, string | boolean>): Promise<Store> {
  if (o.redis) {
    const { Redis } = (await import('ioredis')) as { Redis: new (url: string) => RedisClient }
    const redis = new Redis(o.redis as string)
    return {
      put: async (key, value) => void (await redis.set(key, value)),
      get: async (key) => {
        const value = await redis.getBuffer(key)
        if (!value) throw new MooncakeError('ERR_OBJECT_NOT_FOUND', `redis lost '${key}'`)
        return value
      },
      drop: async (_, keys) => void (keys.length && (await redis.del(...keys))),
      close: async () => void redis.disconnect(),
    }
  }
  const store = await MooncakeStore.connect({
    masterAddress: o.master as string,
    metadata: o.metadata as string,
    localServerName: `bench-client-${process.pid}`,
    ipOrHostName: '127.0.0.1',
    globalSegmentSize: 0,
    localBufferSize: 64 << 20,
  })
  return {
    put: (k, v) => store.put(k, v),
    get: (k) => store.get(k),
    drop: async (prefix) => void (await store.removeByRegex(`^${prefix}/`, { force: true })),
    close: () => store.close(),
  }
}

interface RedisClient {
  set(key: string, value: Buffer): Promise<unknown>
  getBuffer(key: string): Promise<Buffer | null>
  del(...keys: string[]): Promise<number>
  disconnect(): void
}

/** One client process: puts its keys, then gets them; prints both phases as JSON. */
async function client(o: Record<string, string | boolean>): Promise<void> {
  const store = await openStore(o)
  const size = Number(o.size)
  const count = Number(o.keys)
  const inflight = Number(o.inflight)
  const value = Buffer.alloc(size, 0x5a)
  const key = (i: number) => `${o.prefix}/${i}`
  let put: Phase
  let get: Phase
  try {
    put = await drive(count, inflight, 0, false, async (i) => {
      await store.put(key(i), value)
      return size
    })
    get = await drive(count, inflight, Number(o.duration), true, async (i) => (await store.get(key(i))).length)
    await store.drop(String(o.prefix), Array.from({ length: count }, (_, i) => key(i)))
  } finally {
    await store.close()
  }
  const summary = (p: Phase) => {
    const sorted = p.latenciesUs.sort((a, b) => a - b)
    return { ops: p.ops, bytes: p.bytes, seconds: p.seconds, p50Us: percentile(sorted, 0.5), p99Us: percentile(sorted, 0.99) }
  }
  console.log(JSON.stringify({ put: summary(put), get: summary(get) }))
}

/** Master throughput: batched existence checks of 1,000 keys from one process. */
async function masterOps(o: Record<string, string | boolean>): Promise<void> {
  const store = await MooncakeStore.connect({
    masterAddress: o.master as string,
    metadata: o.metadata as string,
    localServerName: `bench-ops-${process.pid}`,
    ipOrHostName: '127.0.0.1',
    globalSegmentSize: 0,
    localBufferSize: 0,
  })
  const keys = Array.from({ length: 1000 }, (_, i) => `ops/${i}`)
  const phase = await drive(1, Number(o.inflight), Number(o.duration), true, async () => (await store.batchExists(keys)).length)
  await store.close()
  console.log(JSON.stringify({ opsPerSec: phase.bytes / phase.seconds }))
}

/** One store node: contributes memory until SIGTERM. */
async function node(o: Record<string, string | boolean>): Promise<void> {
  const store = await MooncakeStore.connect({
    masterAddress: o.master as string,
    metadata: o.metadata as string,
    localServerName: `bench-node-${process.pid}`,
    ipOrHostName: '127.0.0.1',
    globalSegmentSize: Number(o['node-size']) << 20,
    localBufferSize: 0,
  })
  console.log('ready')
  await new Promise((resolve) => process.once('SIGTERM', resolve))
  await store.close()
}

function child(args: string[]): ChildProcess {
  return spawn(process.execPath, [__filename.replace(/bench-store\.js$/, 'cli.js'), 'bench-store', ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
}

async function lastLine(proc: ChildProcess): Promise<string> {
  let last = ''
  createInterface({ input: proc.stdout! }).on('line', (line) => (last = line))
  const [code] = await once(proc, 'exit')
  if (code !== 0) throw new MooncakeError('ERR_TRANSFER_FAIL', `bench process exited with ${code}`)
  return last
}

async function freePort(): Promise<number> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as { port: number }).port
  server.close()
  return port
}

/** Runs the clients for every size against one system and returns the rows. */
async function workload(system: string, target: string[], o: Record<string, string | boolean>, poolBytes: number): Promise<Row[]> {
  const rows: Row[] = []
  const clients = Number(o.clients)
  for (const size of String(o.sizes).split(',').map(Number)) {
    // A quarter of the pool per size: removed keys stay parked while their readers' leases
    // run, and the next size must not push the pool into eviction.
    const keys = Math.max(1, Math.min(2000, Math.floor(poolBytes / 4 / size / clients)))
    const procs = Array.from({ length: clients }, (_, c) =>
      child(['--role', 'client', ...target, '--size', String(size), '--keys', String(keys), '--prefix', `c${c}-${Date.now()}`,
        '--duration', String(o.duration), '--inflight', String(o.inflight)]),
    )
    const results = (await Promise.all(procs.map(lastLine))).map((l) => JSON.parse(l) as Record<'put' | 'get', Omit<Phase, 'latenciesUs'> & { p50Us: number; p99Us: number }>)
    for (const op of ['put', 'get'] as const) {
      const bytes = results.reduce((s, r) => s + r[op].bytes, 0)
      const ops = results.reduce((s, r) => s + r[op].ops, 0)
      const seconds = Math.max(...results.map((r) => r[op].seconds))
      const p50 = results.map((r) => r[op].p50Us).sort((a, b) => a - b)
      const p99 = Math.max(...results.map((r) => r[op].p99Us))
      rows.push({ system, op, size, gbps: bytes / seconds / 1e9, opsPerSec: ops / seconds, p50Us: p50[Math.floor(p50.length / 2)], p99Us: p99 })
    }
  }
  return rows
}

async function orchestrate(o: Record<string, string | boolean>): Promise<void> {
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: -1, httpMetadataServer: true, httpMetadataPort: 0 })
  const nodes: ChildProcess[] = []
  let redis: ChildProcess | undefined
  try {
    const target = ['--master', master.address, '--metadata', master.metadataUrl!]
    for (let i = 0; i < Number(o.nodes); i++) {
      const proc = child(['--role', 'node', ...target, '--node-size', String(o['node-size'])])
      nodes.push(proc)
      await once(createInterface({ input: proc.stdout! }), 'line')
    }
    const pool = Number(o.nodes) * (Number(o['node-size']) << 20)
    const rows = await workload('mooncake', target, o, pool)
    const opsLine = await lastLine(child(['--role', 'master-ops', ...target, '--duration', String(o.duration), '--inflight', String(o.inflight)]))
    const masterOpsPerSec = (JSON.parse(opsLine) as { opsPerSec: number }).opsPerSec

    const port = await freePort()
    redis = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no'], {
      stdio: 'ignore',
    })
    const redisUp = await Promise.race([
      once(redis, 'spawn').then(() => true),
      once(redis, 'error').then(() => false),
    ])
    let redisRows: Row[] = []
    if (redisUp) {
      await new Promise((r) => setTimeout(r, 300))
      redisRows = await workload('redis', ['--redis', `redis://127.0.0.1:${port}`], o, pool)
    } else {
      console.error('redis-server not found: install it (apt-get install redis-server) for the comparison')
    }
    report([...rows, ...redisRows], masterOpsPerSec, o)
  } finally {
    redis?.kill('SIGTERM')
    for (const n of nodes) n.kill('SIGTERM')
    await Promise.all(nodes.map((n) => (n.exitCode === null ? once(n, 'exit') : undefined)))
    await master.close()
  }
}

function report(rows: Row[], masterOpsPerSec: number, o: Record<string, string | boolean>): void {
  if (o.json) {
    console.log(JSON.stringify({ rows, masterOpsPerSec }))
    return
  }
  const size = (b: number) => (b >= 1 << 20 ? `${b / (1 << 20)} MiB` : `${b / 1024} KiB`)
  console.log(`store on loopback: ${o.nodes} node processes x ${o['node-size']} MiB, ${o.clients} client processes, ${o.inflight} in flight each`)
  console.log('op   size     mooncake GB/s  ops/s    p50 µs  p99 µs   redis GB/s  ops/s    p50 µs  p99 µs   ratio')
  for (const r of rows.filter((r) => r.system === 'mooncake')) {
    const redis = rows.find((x) => x.system === 'redis' && x.op === r.op && x.size === r.size)
    const cells = (x: Row | undefined) =>
      x ? `${x.gbps.toFixed(2).padStart(6)}  ${Math.round(x.opsPerSec).toString().padStart(7)}  ${x.p50Us.toFixed(0).padStart(6)}  ${x.p99Us.toFixed(0).padStart(6)}` : '     -        -       -       -'
    console.log(`${r.op.padEnd(4)} ${size(r.size).padEnd(8)} ${cells(r)}       ${cells(redis)}   ${redis ? (r.gbps / redis.gbps).toFixed(2) : '-'}`)
  }
  console.log(`master: ${Math.round(masterOpsPerSec)} key checks/s (batchExists of 1,000 keys)`)
  console.log('targets: mooncake/redis >= 3 at 1 MiB for put and get; master >= 100,000 operations/s with batches')
}

/** Entry point for `mooncake bench-store`. */
export async function benchStore(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({ args: argv, options: OPTIONS, strict: true })
  switch (o.role) {
    case 'bench':
      return orchestrate(o)
    case 'node':
      return node(o)
    case 'client':
      return client(o)
    case 'master-ops':
      return masterOps(o)
    default:
      throw new MooncakeError('ERR_INVALID_ARGUMENT', `unknown role '${o.role}'`)
  }
}
