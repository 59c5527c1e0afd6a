/**
 * `mooncake bench-store` (and `npm run bench:store`): put and get of several value sizes from
 * several client processes against a store of several node processes on loopback, and in the
 * same run the same workload against Redis (a `redis-server` the bench starts) through a Node
 * Redis client (ioredis) and through Redis's own C client, `redis-benchmark`. Also measures master
 * operations per second with batched existence checks.
 *
 * The store runs twice per size: through the copying API (`put(Buffer)`, `get()` returning a new
 * Buffer, what Redis clients offer) and through the zero-copy API (`putFrom`/`getInto` on
 * registered memory, what a KV-cache server uses). Each client process owns a fixed set of keys
 * (an eighth of the pool in all). Puts: one untimed pass to warm both systems' memory, then
 * timed passes, each followed by an untimed removal, for the period. Gets: the last pass's keys,
 * over and over, for the period. `--inflight` operations run at once per client. The whole
 * sequence runs `--repeat` times, each round in a rotated order of the systems; the report gives
 * medians. `--clients` and `--sizes` take lists; `--protocol` forces the store's transport.
 *
 * `redis-benchmark` runs SET then GET of one key with `--clients` x `--inflight` connections, each
 * with one command in flight (no pipelining), for about `--duration` seconds per command; it
 * cannot check what GET returns, so the bench checks the stored value's length after each run.
 *
 * `--baseline mooncake` adds Mooncake's own store to the rounds: the `mooncake_master` and Python
 * client (`MooncakeDistributedStore`) of its PyPI wheel, through benches/mooncake-baseline.mjs
 * (so a clone of the repository, not the npm package), with as many node processes of the same
 * size and `--clients` client processes of `--inflight` threads each, over TCP. Its driver
 * compares a sample of the values it gets and reads back byte for byte; a wrong byte ends the
 * bench.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import { formatSize, renderChart } from './chart'
import { MooncakeError } from './errors'
import { MasterServer } from './master'
import { startProgress } from './progress'
import { MooncakeStore } from './store'

interface Phase {
  ops: number
  bytes: number
  seconds: number
  latenciesUs: number[]
}

type System = 'mooncake' | 'zero-copy' | 'redis' | 'redis-benchmark' | 'mooncake-wheel'

interface Row {
  system: System
  clients: number
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
  clients: { type: 'string', default: '1,2' },
  'node-size': { type: 'string', default: '1024' },
  staging: { type: 'string', default: '1024' },
  sizes: { type: 'string', default: '4096,65536,1048576,4194304' },
  protocol: { type: 'string', default: '' },
  duration: { type: 'string', default: '2' },
  inflight: { type: 'string', default: '4' },
  repeat: { type: 'string', default: '3' },
  api: { type: 'string', default: 'copy' },
  keys: { type: 'string', default: '0' },
  size: { type: 'string', default: '0' },
  master: { type: 'string', default: '' },
  metadata: { type: 'string', default: '' },
  redis: { type: 'string', default: '' },
  baseline: { type: 'string', default: '' },
  prefix: { type: 'string', default: 'k' },
  json: { type: 'boolean', default: false },
  chart: { type: 'string', default: '' },
  progress: { type: 'boolean', default: false },
} as const

const percentile = (sorted: number[], p: number) => (sorted.length ? sorted[Math.round((sorted.length - 1) * p)] : 0)

/**
 * Runs `count` operations on `inflight` lanes, then repeats them until `seconds` pass (if
 * `repeat`). `op(i, lane)` resolves to the bytes it moved.
 */
async function drive(
  count: number,
  inflight: number,
  seconds: number,
  repeat: boolean,
  op: (i: number, lane: number) => Promise<number>,
  completed?: { bytes: number },
): Promise<Phase> {
  const latenciesUs: number[] = []
  let bytes = 0
  let next = 0
  const start = process.hrtime.bigint()
  const stopAt = start + BigInt(Math.round(seconds * 1e9))
  const lane = async (index: number) => {
    for (;;) {
      const i = next++
      if (i >= count && !(repeat && process.hrtime.bigint() < stopAt)) return
      const began = process.hrtime.bigint()
      const moved = await op(i % count, index)
      bytes += moved
      if (completed) completed.bytes += moved
      latenciesUs.push(Number(process.hrtime.bigint() - began) / 1e3)
    }
  }
  await Promise.all(Array.from({ length: inflight }, (_, index) => lane(index)))
  return { ops: latenciesUs.length, bytes, seconds: Number(process.hrtime.bigint() - start) / 1e9, latenciesUs }
}

/** One worker's way of putting and getting: it owns its value buffer (registered, for zero copy). */
interface Worker {
  put(key: string): Promise<void>
  get(key: string): Promise<number>
}

interface Store {
  worker(size: number): Worker
  /** Drops this client's keys, so the next pass or size starts from an empty pool. */
  drop(prefix: string, keys: string[]): Promise<void>
  close(): Promise<void>
}

/** `--protocol`, for the store's processes; unset leaves the engine's default (`auto`). */
const transport = (o: Record<string, string | boolean>) => (o.protocol ? { protocol: o.protocol as 'auto' | 'tcp' | 'shm' } : {})

async function openStore(o: Record<string, string | boolean>): Promise<Store> {
  if (o.redis) {
    const redis = await openRedis(o.redis as string)
    return {
      worker: (size) => {
        const value = Buffer.alloc(size, 0x5a)
        return {
          put: async (key) => void (await redis.set(key, value)),
          get: async (key) => {
            const got = await redis.getBuffer(key)
            if (!got) throw new MooncakeError('ERR_OBJECT_NOT_FOUND', `redis lost '${key}'`)
            return got.length
          },
        }
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
    ...transport(o),
    globalSegmentSize: 0,
    // Room for the Buffers that gets return until the garbage collector frees them; Mooncake's
    // serving connectors stage through 1 GiB.
    localBufferSize: Number(o.staging) << 20,
  })
  const zeroCopy = o.api === 'zero-copy'
  return {
    worker: (size) => {
      if (zeroCopy) {
        const buffer = store.allocate(size).fill(0x5a)
        return { put: (key) => store.putFrom(key, buffer), get: (key) => store.getInto(key, buffer) }
      }
      const value = Buffer.alloc(size, 0x5a)
      return { put: (key) => store.put(key, value), get: async (key) => (await store.get(key)).length }
    },
    drop: async (prefix) => void (await store.removeByRegex(`^${prefix}/`, { force: true })),
    close: () => store.close(),
  }
}

interface RedisClient {
  set(key: string, value: Buffer): Promise<unknown>
  getBuffer(key: string): Promise<Buffer | null>
  strlen(key: string): Promise<number>
  del(...keys: string[]): Promise<number>
  disconnect(): void
}

const openRedis = async (url: string) => new ((await import('ioredis')) as { Redis: new (url: string) => RedisClient }).Redis(url)

/** Adds `next` to `total` (the time of both, all their latencies). */
function merge(total: Phase, next: Phase): Phase {
  return { ops: total.ops + next.ops, bytes: total.bytes + next.bytes, seconds: total.seconds + next.seconds, latenciesUs: total.latenciesUs.concat(next.latenciesUs) }
}

/** One client process: puts its keys, then gets them; prints both phases as JSON. */
async function client(o: Record<string, string | boolean>): Promise<void> {
  const store = await openStore(o)
  const size = Number(o.size)
  const count = Number(o.keys)
  const inflight = Number(o.inflight)
  const seconds = Number(o.duration)
  const keys = Array.from({ length: count }, (_, i) => `${o.prefix}/${i}`)
  const workers = Array.from({ length: inflight }, () => store.worker(size))
  const putOne = async (i: number, lane: number) => (await workers[lane].put(keys[i]), size)
  let put: Phase = { ops: 0, bytes: 0, seconds: 0, latenciesUs: [] }
  let get: Phase
  // Bytes this client completed so far, for the orchestrator's progress line.
  const completed = { bytes: 0 }
  const reporter = o.progress ? setInterval(() => console.log(JSON.stringify({ progress: completed.bytes })), 250) : undefined
  try {
    await drive(count, inflight, 0, false, putOne, completed)
    for (;;) {
      await store.drop(String(o.prefix), keys)
      put = merge(put, await drive(count, inflight, 0, false, putOne, completed))
      if (put.seconds >= seconds) break
    }
    get = await drive(count, inflight, seconds, true, (i, lane) => workers[lane].get(keys[i]), completed)
    await store.drop(String(o.prefix), keys)
  } finally {
    clearInterval(reporter)
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
    ...transport(o),
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

/** The last line a bench process prints, once it exited; its `{"progress":bytes}` lines go to `onProgress`. */
async function lastLine(proc: ChildProcess, onProgress?: (bytes: number) => void): Promise<string> {
  let last = ''
  createInterface({ input: proc.stdout! }).on('line', (line) => {
    if (!line.startsWith('{"progress":')) last = line
    else {
      try {
        onProgress?.((JSON.parse(line) as { progress: number }).progress)
      } catch {
        // A torn progress line only costs one update of the progress bar.
      }
    }
  })
  const [code] = await once(proc, 'exit')
  if (code !== 0) throw new MooncakeError('ERR_TRANSFER_FAILED', `bench process exited with ${code}`)
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

/** Runs the clients for one size against one system and returns its put and get rows. */
async function workload(
  system: System,
  target: string[],
  size: number,
  clients: number,
  o: Record<string, string | boolean>,
  poolBytes: number,
  onProgress?: (client: number, bytes: number) => void,
): Promise<Row[]> {
  // An eighth of the pool per run: removed keys stay parked while their readers' leases run,
  // and the runs that follow must not push the pool into eviction.
  const keys = Math.max(1, Math.min(2000, Math.floor(poolBytes / 8 / size / clients)))
  const api = system === 'zero-copy' ? ['--api', 'zero-copy'] : []
  const transportArgs = system === 'redis' || !o.protocol ? [] : ['--protocol', String(o.protocol)]
  const procs = Array.from({ length: clients }, (_, c) =>
    child(['--role', 'client', ...target, ...api, ...transportArgs, '--staging', String(o.staging), '--size', String(size), '--keys', String(keys), '--prefix', `c${c}-${Date.now()}`,
      '--duration', String(o.duration), '--inflight', String(o.inflight), ...(onProgress ? ['--progress'] : [])]),
  )
  const results = (await Promise.all(procs.map((proc, c) => lastLine(proc, onProgress && ((bytes) => onProgress(c, bytes)))))).map((l) => JSON.parse(l) as Record<'put' | 'get', Omit<Phase, 'latenciesUs'> & { p50Us: number; p99Us: number }>)
  return (['put', 'get'] as const).map((op) => {
    const bytes = results.reduce((s, r) => s + r[op].bytes, 0)
    const ops = results.reduce((s, r) => s + r[op].ops, 0)
    const seconds = Math.max(...results.map((r) => r[op].seconds))
    const p50 = results.map((r) => r[op].p50Us).sort((a, b) => a - b)
    const p99 = Math.max(...results.map((r) => r[op].p99Us))
    return { system, clients, op, size, gbps: bytes / seconds / 1e9, opsPerSec: ops / seconds, p50Us: p50[Math.floor(p50.length / 2)], p99Us: p99 }
  })
}

interface RedisServer {
  proc: ChildProcess
  port: number
  url: string
}

/**
 * `redis-benchmark`'s CSV, by test: Redis 7 prints a header and test, rps, avg/min/p50/p95/p99/max
 * latency in ms; Redis 6 only test and rps, without a header (its latencies come out NaN).
 */
function parseRedisBenchmark(csv: string): Map<string, Record<string, number>> {
  const lines = csv.split('\n').map((l) => l.trim()).filter((l) => l.startsWith('"'))
  const fields = (line: string) => line.split(',').map((f) => f.replace(/^"|"$/g, ''))
  const headed = fields(lines[0] ?? '')[0] === 'test'
  const header = headed ? fields(lines[0]) : ['test', 'rps']
  const byTest = new Map<string, Record<string, number>>()
  for (const line of lines.slice(headed ? 1 : 0)) {
    const values = fields(line)
    byTest.set(values[0], Object.fromEntries(header.slice(1).map((name, i) => [name, Number(values[i + 1])])))
  }
  return byTest
}

/**
 * One `redis-benchmark` run of SET then GET: `requests` of each over `connections` connections
 * without pipelining. Returns the put and get rows, after checking that the key holds `size` bytes.
 */
async function redisBenchmark(redis: RedisServer, size: number, clients: number, connections: number, requests: number): Promise<Row[]> {
  const proc = spawn('redis-benchmark', ['-h', '127.0.0.1', '-p', String(redis.port), '-t', 'set,get', '-d', String(size), '-c', String(connections), '-n', String(requests), '--csv'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  let out = ''
  proc.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()))
  const [code] = await once(proc, 'exit')
  if (code !== 0) throw new MooncakeError('ERR_TRANSFER_FAILED', `redis-benchmark exited with ${code}`)
  const tests = parseRedisBenchmark(out)
  const client = await openRedis(redis.url)
  try {
    // redis-benchmark's one key, unless given -r; SET wrote it, GET read it back `requests` times.
    const stored = await client.strlen('key:__rand_int__')
    if (stored !== size) throw new MooncakeError('ERR_TRANSFER_FAILED', `redis-benchmark stored ${stored} bytes, not ${size}`)
    await client.del('key:__rand_int__')
  } finally {
    client.disconnect()
  }
  return (['put', 'get'] as const).map((op) => {
    const t = tests.get(op === 'put' ? 'SET' : 'GET')
    if (!t || !(t.rps > 0)) throw new MooncakeError('ERR_TRANSFER_FAILED', `redis-benchmark printed no ${op === 'put' ? 'SET' : 'GET'} figures:\n${out}`)
    return { system: 'redis-benchmark', clients, op, size, gbps: (t.rps * size) / 1e9, opsPerSec: t.rps, p50Us: Number(t.p50_latency_ms) * 1e3, p99Us: Number(t.p99_latency_ms) * 1e3 }
  })
}

async function hasRedisBenchmark(): Promise<boolean> {
  const proc = spawn('redis-benchmark', ['--version'], { stdio: 'ignore' })
  return new Promise<boolean>((resolve) => {
    proc.once('exit', (code) => resolve(code === 0))
    proc.once('error', () => resolve(false))
  })
}

async function startRedis(): Promise<RedisServer | undefined> {
  const port = await freePort()
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--protected-mode', 'no'], {
    stdio: 'ignore',
  })
  // Not `once(proc, 'spawn')`: it rejects on 'error', and a missing binary would end the bench.
  const up = await new Promise<boolean>((resolve) => {
    proc.once('spawn', () => resolve(true))
    proc.once('error', () => resolve(false))
  })
  if (!up) {
    console.error('redis-server not found: install it (apt-get install redis-server) for the comparison')
    return undefined
  }
  await new Promise((r) => setTimeout(r, 300))
  return { proc, port, url: `redis://127.0.0.1:${port}` }
}

const list = (value: string | boolean) => String(value).split(',').map(Number)

/** Mooncake's own store from its wheel (`--baseline mooncake`), run by benches/mooncake-baseline.mjs. */
interface Baseline {
  /** What it runs, for the report: the wheel, its nodes, its sampling. */
  info: { wheel: string; nodes: number; nodeSize: number; verifyEvery: number }
  /** Values compared byte for byte so far. */
  verified: number
  /** A put cell then a get cell of `clients` processes with `inflight` threads each: their rows. */
  run(size: number, clients: number, inflight: number, seconds: number): Promise<Row[]>
  close(): Promise<void>
}

/**
 * Starts benches/mooncake-baseline.mjs with Mooncake's master and as many nodes as ours. Returns
 * undefined, after saying why, when it cannot: no clone of the repository around this package, or
 * no virtual environment with the wheel (it makes one when missing).
 */
async function startBaseline(o: Record<string, string | boolean>): Promise<Baseline | undefined> {
  const benches = join(__dirname, '..', 'benches')
  const script = join(benches, 'mooncake-baseline.mjs')
  const missing = [script, join(benches, 'mooncake-wheel.mjs'), join(benches, 'mooncake_master_load.py')].filter((f) => !existsSync(f))
  if (missing.length) {
    console.error(`--baseline mooncake: ${missing.join(', ')} missing (the drivers come with a clone of the repository, not the npm package): running without Mooncake's store`)
    return undefined
  }
  console.error("starting Mooncake's master and nodes from its wheel (its virtual environment is made first if missing: pip install)")
  const proc = spawn(process.execPath, [script, '--nodes', String(o.nodes), '--node-size', String(o['node-size'])], { stdio: ['pipe', 'pipe', 'inherit'] })
  // Its input is gone once it exits; writes to it then are dropped, not thrown.
  proc.stdin!.on('error', () => undefined)
  // Rejects if the process cannot start; raced with its answers.
  const spawned = new Promise<never>((_, reject) => proc.once('error', reject))
  spawned.catch(() => undefined)
  const lines = createInterface({ input: proc.stdout! })[Symbol.asyncIterator]()
  const next = async (): Promise<Record<string, unknown>> => {
    const { value, done } = await Promise.race([lines.next(), spawned])
    if (done) throw new MooncakeError('ERR_TRANSFER_FAILED', `${script} ended (exit ${proc.exitCode ?? proc.signalCode ?? 'pending'}) without an answer`)
    return JSON.parse(value as string) as Record<string, unknown>
  }
  const close = async () => {
    if (proc.exitCode !== null || proc.signalCode !== null) return
    const exited = once(proc, 'exit')
    proc.stdin!.end()
    const timer = setTimeout(() => proc.kill('SIGTERM'), 10_000)
    await exited
    clearTimeout(timer)
  }
  let ready: Record<string, unknown>
  try {
    ready = await next()
  } catch (error) {
    ready = { error: (error as Error).message }
  }
  if (!ready.ready) {
    console.error(`--baseline mooncake: Mooncake's store did not start: ${String(ready.error)}; running without it`)
    await close()
    return undefined
  }
  const baseline: Baseline = {
    info: { wheel: String(ready.wheel), nodes: Number(ready.nodes), nodeSize: Number(ready.nodeSize), verifyEvery: Number(ready.verifyEvery) },
    verified: 0,
    async run(size, clients, inflight, seconds) {
      proc.stdin!.write(`${JSON.stringify({ size, clients, inflight, seconds })}\n`)
      const reply = await next()
      if (reply.error) throw new MooncakeError('ERR_TRANSFER_FAILED', `Mooncake (wheel), ${formatSize(size)}, ${clients} clients: ${String(reply.error)}`)
      baseline.verified += Number(reply.verified)
      return reply.rows as Row[]
    },
    close,
  }
  return baseline
}

async function orchestrate(o: Record<string, string | boolean>): Promise<void> {
  if (o.protocol && !['auto', 'tcp', 'shm'].includes(o.protocol as string)) throw new MooncakeError('ERR_INVALID_ARGUMENT', `--protocol is auto, tcp or shm, not '${o.protocol}'`)
  if (o.baseline && o.baseline !== 'mooncake') throw new MooncakeError('ERR_INVALID_ARGUMENT', `--baseline is mooncake, not '${o.baseline}'`)
  // Before the progress line: making the wheel's virtual environment prints pip's output.
  const baseline = o.baseline ? await startBaseline(o) : undefined
  // Progress: runs done of all the runs, and the bytes the current run's clients completed.
  let done = 0
  let total = 1
  let phase = 'starting the store'
  let phaseStart = process.hrtime.bigint()
  let phaseBytes: number[] | undefined
  const progress = startProgress({ total, unit: 'runs', enabled: !o.json }, () => ({
    done,
    total,
    phase,
    bytes: phaseBytes?.reduce((a, b) => a + (b ?? 0), 0),
    seconds: Number(process.hrtime.bigint() - phaseStart) / 1e9,
  }))
  /** Runs one step of the bench under `label`; `work` gets where its clients' bytes go. */
  const step = async <T>(label: string, work: (onProgress: (client: number, bytes: number) => void) => Promise<T>): Promise<T> => {
    phase = label
    phaseStart = process.hrtime.bigint()
    phaseBytes = undefined
    try {
      return await work((client, bytes) => ((phaseBytes ??= [])[client] = bytes))
    } finally {
      done++
    }
  }
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: -1, httpMetadataServer: true, httpMetadataPort: 0 }).catch(async (e: unknown) => {
    progress.stop()
    await baseline?.close()
    throw e
  })
  const nodes: ChildProcess[] = []
  let redis: RedisServer | undefined
  try {
    const target = ['--master', master.address, '--metadata', master.metadataUrl!]
    for (let i = 0; i < Number(o.nodes); i++) {
      const proc = child(['--role', 'node', ...target, '--node-size', String(o['node-size']), ...(o.protocol ? ['--protocol', String(o.protocol)] : [])])
      nodes.push(proc)
      await once(createInterface({ input: proc.stdout! }), 'line')
    }
    redis = await startRedis()
    const benchmark = redis && (await hasRedisBenchmark())
    if (redis && !benchmark) console.error('redis-benchmark not found (it comes with redis-server): comparing with ioredis only')
    const pool = Number(o.nodes) * (Number(o['node-size']) << 20)
    const sizes = list(o.sizes)
    const clientCounts = list(o.clients)
    const inflight = Number(o.inflight)
    const seconds = Number(o.duration)
    const systems: System[] = ['mooncake', 'zero-copy']
    if (redis) systems.push('redis')
    if (benchmark) systems.push('redis-benchmark')
    if (baseline) systems.push('mooncake-wheel')
    // redis-benchmark counts requests, not time: an untimed pass per cell, as the other systems'
    // warm-up, sizes its runs to about `--duration` seconds for the slower command, and each run
    // resizes the next.
    const rates = new Map<string, number>()
    const runBenchmark = async (size: number, clients: number, requests: number) => {
      const rows = await redisBenchmark(redis!, size, clients, clients * inflight, requests)
      rates.set(`${size}/${clients}`, Math.min(...rows.map((r) => r.opsPerSec)))
      return rows
    }
    const cells = clientCounts.length * sizes.length
    total = (benchmark ? cells : 0) + Number(o.repeat) * cells * systems.length + 1
    const cell = (system: string, size: number, clients: number) => `${system}, ${formatSize(size)}, ${clients} client${clients === 1 ? '' : 's'}`
    if (benchmark) {
      for (const clients of clientCounts) {
        for (const size of sizes) {
          await step(cell('redis-benchmark warm-up', size, clients), () =>
            runBenchmark(size, clients, Math.max(clients * inflight * 20, Math.min(5000, Math.round((64 << 20) / size)))),
          )
        }
      }
    }
    const run = (system: System, size: number, clients: number): Promise<Row[]> =>
      step(cell(system, size, clients), (onProgress) =>
        system === 'redis-benchmark'
          ? runBenchmark(size, clients, Math.max(clients * inflight * 20, Math.round(rates.get(`${size}/${clients}`)! * seconds)))
          : system === 'mooncake-wheel'
            ? baseline!.run(size, clients, inflight, seconds)
            : workload(system, system === 'redis' ? ['--redis', redis!.url] : target, size, clients, o, pool, progress.active ? onProgress : undefined),
      )
    // Rounds alternate the systems, each round in a rotated order, so that a slow spell of a
    // shared machine or the cost of going first hits them alike.
    const rounds: Row[][] = []
    for (let r = 0; r < Number(o.repeat); r++) {
      const rows: Row[] = []
      const order = systems.map((_, i) => systems[(i + r) % systems.length])
      for (const clients of clientCounts) {
        for (const size of sizes) {
          for (const system of order) rows.push(...(await run(system, size, clients)))
        }
      }
      rounds.push(rows)
    }
    const opsLine = await step('master operations', () =>
      lastLine(child(['--role', 'master-ops', ...target, '--duration', String(o.duration), '--inflight', String(o.inflight)])),
    )
    progress.stop()
    const summary = summarize(rounds)
    if (o.chart) writeChart(String(o.chart), summary, o)
    report(summary, rounds, (JSON.parse(opsLine) as { opsPerSec: number }).opsPerSec, o, baseline)
  } finally {
    progress.stop()
    await baseline?.close()
    redis?.proc.kill('SIGTERM')
    for (const n of nodes) n.kill('SIGTERM')
    await Promise.all(nodes.map((n) => (n.exitCode === null ? once(n, 'exit') : undefined)))
    await master.close()
  }
}

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b)
  const mid = sorted.length >> 1
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
}

/**
 * Per client count, op and size: each system's median figures over the rounds, and the median
 * over the rounds of each round's ratio of ops/s (so GB/s too) to ioredis, to redis-benchmark and
 * to Mooncake's own store (with `--baseline mooncake`).
 */
function summarize(rounds: Row[][]) {
  const first = rounds[0].filter((r) => r.system === 'mooncake')
  return first.map(({ clients, op, size }) => {
    const find = (round: Row[], system: System) => round.find((r) => r.system === system && r.clients === clients && r.op === op && r.size === size)
    const pick = (system: System) => {
      const rows = rounds.map((round) => find(round, system)).filter((r) => r !== undefined)
      if (!rows.length) return undefined
      return {
        gbps: median(rows.map((r) => r.gbps)),
        opsPerSec: median(rows.map((r) => r.opsPerSec)),
        p50Us: median(rows.map((r) => r.p50Us)),
        p99Us: median(rows.map((r) => r.p99Us)),
      }
    }
    const ratio = (system: System, baseline: System) => {
      const ratios = rounds.flatMap((round) => {
        const ours = find(round, system)
        const theirs = find(round, baseline)
        return ours && theirs ? [ours.opsPerSec / theirs.opsPerSec] : []
      })
      return ratios.length ? median(ratios) : undefined
    }
    return {
      clients,
      op,
      size,
      mooncake: pick('mooncake'),
      zeroCopy: pick('zero-copy'),
      redis: pick('redis'),
      redisBenchmark: pick('redis-benchmark'),
      mooncakeWheel: pick('mooncake-wheel'),
      ratio: ratio('mooncake', 'redis'),
      zeroCopyRatio: ratio('zero-copy', 'redis'),
      benchmarkRatio: ratio('mooncake', 'redis-benchmark'),
      zeroCopyBenchmarkRatio: ratio('zero-copy', 'redis-benchmark'),
      wheelRatio: ratio('mooncake', 'mooncake-wheel'),
      zeroCopyWheelRatio: ratio('zero-copy', 'mooncake-wheel'),
    }
  })
}

const SYSTEM_NAMES: Record<System, string> = {
  mooncake: 'Mooncake put/get (Buffer)',
  'zero-copy': 'Mooncake putFrom/getInto',
  redis: 'Redis (ioredis)',
  'redis-benchmark': 'redis-benchmark',
  'mooncake-wheel': 'Mooncake (wheel)',
}

/** GB/s by value size, a panel per operation, a line per system (and client count). */
function writeChart(path: string, summary: Summary, o: Record<string, string | boolean>): void {
  const clientCounts = list(o.clients)
  const keys: [System, 'mooncake' | 'zeroCopy' | 'redis' | 'redisBenchmark' | 'mooncakeWheel'][] = [
    ['mooncake', 'mooncake'],
    ['zero-copy', 'zeroCopy'],
    ['redis', 'redis'],
    ['redis-benchmark', 'redisBenchmark'],
    ['mooncake-wheel', 'mooncakeWheel'],
  ]
  const panels = (['put', 'get'] as const).map((op) => ({
    title: op,
    series: keys.flatMap(([system, key]) =>
      clientCounts.map((clients) => ({
        name: clientCounts.length > 1 ? `${SYSTEM_NAMES[system]}, ${clients} client${clients === 1 ? '' : 's'}` : SYSTEM_NAMES[system],
        points: summary.filter((r) => r.op === op && r.clients === clients && r[key]).map((r) => ({ x: r.size, y: r[key]!.gbps })),
      })).filter((s) => s.points.length > 0),
    ),
  }))
  const protocol = (o.protocol as string) || 'auto'
  const wheel = summary.some((r) => r.mooncakeWheel)
  writeFileSync(
    path,
    renderChart({
      title: `Mooncake Store vs Redis${wheel ? " and Mooncake's own store (wheel)" : ''}: throughput by value size`,
      subtitle:
        `loopback over ${protocol}${wheel ? ' (Mooncake (wheel) over TCP)' : ''}, ${o.nodes} nodes x ${o['node-size']} MiB, ` +
        `${o.inflight} in flight per client; medians of ${o.repeat} rounds`,
      xLabel: 'value size',
      yLabel: 'GB/s (10^9 B/s)',
      panels,
    }),
  )
}

type Summary = ReturnType<typeof summarize>

function report(summary: Summary, rounds: Row[][], masterOpsPerSec: number, o: Record<string, string | boolean>, baseline?: Baseline): void {
  const protocol = (o.protocol as string) || 'auto'
  if (o.json) {
    const config = {
      protocol,
      nodes: Number(o.nodes),
      nodeSizeMiB: Number(o['node-size']),
      clients: list(o.clients),
      inflight: Number(o.inflight),
      duration: Number(o.duration),
      repeat: Number(o.repeat),
      baseline: baseline ? { system: 'mooncake-wheel', ...baseline.info, protocol: 'tcp', verified: baseline.verified } : null,
    }
    console.log(JSON.stringify({ config, summary, rounds, masterOpsPerSec }))
    return
  }
  const size = (b: number) => (b >= 1 << 20 ? `${b / (1 << 20)} MiB` : `${b / 1024} KiB`)
  type Figures = ReturnType<typeof summarize>[number]['redis']
  const cells = (x: Figures) =>
    x ? `${x.opsPerSec.toFixed(0).padStart(7)} ${x.gbps.toFixed(2).padStart(6)} ${(Number.isFinite(x.p50Us) ? x.p50Us.toFixed(0) : '-').padStart(6)}` : '      -      -      -'
  const times = (x: number | undefined) => (x === undefined ? '     -' : `${x.toFixed(2).padStart(5)}x`)
  console.log(
    `store on loopback over ${protocol}: ${o.nodes} node processes x ${o['node-size']} MiB, client processes x ${o.inflight} in flight ` +
      `(${o.staging} MiB staging each); redis-benchmark with as many connections as operations in flight; medians of ${o.repeat} rounds`,
  )
  if (baseline) {
    const { wheel, nodes, nodeSize, verifyEvery } = baseline.info
    console.log(
      `Mooncake (wheel): mooncake_master and the Python client MooncakeDistributedStore of ${wheel}, ${nodes} node processes x ${nodeSize >> 20} MiB, ` +
        `client processes x ${o.inflight} threads over TCP; one value in ${verifyEvery} compared byte for byte (${baseline.verified} in all, all equal)`,
    )
  }
  const wheelHead = baseline ? ['     Mooncake (wheel)       vs Mooncake', '    ops/s   GB/s  p50µs   Buffer zero-c'] : ['', '']
  console.log(`               put/get (Buffer)      putFrom/getInto       redis (ioredis)       redis-benchmark        Buffer vs        zero-copy vs${wheelHead[0]}`)
  console.log(`cl op  size      ops/s   GB/s  p50µs    ops/s   GB/s  p50µs    ops/s   GB/s  p50µs    ops/s   GB/s  p50µs   ioredis r-bench  ioredis r-bench${wheelHead[1]}`)
  for (const r of summary) {
    console.log(
      `${String(r.clients).padStart(2)} ${r.op.padEnd(3)} ${size(r.size).padEnd(7)} ${cells(r.mooncake)}  ${cells(r.zeroCopy)}  ${cells(r.redis)}  ${cells(r.redisBenchmark)}` +
        `   ${times(r.ratio)}  ${times(r.benchmarkRatio)}   ${times(r.zeroCopyRatio)}  ${times(r.zeroCopyBenchmarkRatio)}` +
        (baseline ? `  ${cells(r.mooncakeWheel)}   ${times(r.wheelRatio)}  ${times(r.zeroCopyWheelRatio)}` : ''),
    )
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
